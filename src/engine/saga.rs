//! Sagas: recording completed compensable steps and running their
//! compensations, newest first, when a task cannot complete.
//!
//! Owns the saga log and the compensation chain. A step whose agent names
//! `saga.compensate` appends `{agent, compensate}` to the task's saga log
//! (stream `r4:{ns/wf}:saga:<task-id>`) as one more output of the step's
//! atomic completion — so a step is in the log if and only if it completed.
//! The same step sets the log's TTL to the inbox keys' (`idempotency.ttl`):
//! once those have expired the steps are new work anyway, so the log goes
//! with them instead of piling up one stream per task.
//!
//! When the task cannot complete (dead-lettered for a permanent reason, or
//! quarantined as poison), [`first_compensation`] reads the log, reverses
//! it, and builds ONE compensation entry (`type=compensate`, `step=<agent>`,
//! `saga=<the rest>`) for the input stream of the newest step's agent; the
//! caller adds it in the same atomic step as the move that decides the
//! task's fate (the dead-lettering, the quarantine), so compensations start
//! if and only if that move happened. That agent's
//! consumer delivers it with the idempotency key `<task-id>:compensate:<step>`
//! and, in the same atomic completion that acks it, publishes the next
//! compensation to the next agent. So compensations run strictly in reverse
//! order, each at most once per inbox key, and a crash anywhere resumes the
//! chain where it stopped.

use bytes::Bytes;

use crate::queue::{Fields, Queue, QueueError};

use super::config::WorkflowConfig;
use super::task::{Kind, SagaStep, Task};

/// The saga-log output to add to a compensable step's completion.
pub fn log_output(
    cfg: &WorkflowConfig,
    task_id: &str,
    agent: &str,
    compensate: &str,
) -> (String, Fields) {
    (
        cfg.keys.saga(task_id),
        vec![
            ("agent".into(), Bytes::from(agent.to_owned())),
            ("compensate".into(), Bytes::from(compensate.to_owned())),
        ],
    )
}

/// Completed compensable steps of a task, oldest first.
pub async fn log(
    q: &dyn Queue,
    cfg: &WorkflowConfig,
    task_id: &str,
) -> Result<Vec<SagaStep>, QueueError> {
    let text = |e: &crate::queue::StreamEntry, k: &str| {
        e.field(k).map(|b| String::from_utf8_lossy(b).into_owned())
    };
    Ok(q.range(&cfg.keys.saga(task_id), "-", "+", 0)
        .await?
        .iter()
        .filter_map(|e| {
            Some(SagaStep {
                agent: text(e, "agent")?,
                compensate: text(e, "compensate")?,
            })
        })
        .collect())
}

/// The entry that asks `chain[0]` to compensate, handing on the rest.
/// `None` for an empty chain or an agent the workflow no longer has.
pub fn compensation_entry(
    cfg: &WorkflowConfig,
    task_id: &str,
    chain: &[SagaStep],
    reason: &str,
    traceparent: Option<&str>,
) -> Option<(String, Fields)> {
    let (first, rest) = chain.split_first()?;
    let agent = cfg.agent(&first.agent)?;
    let mut t = Task::new(
        task_id,
        serde_json::json!({"task_id": task_id, "reason": reason}),
    );
    t.kind = Kind::Compensate {
        compensation: first.compensate.clone(),
        rest: rest.to_vec(),
    };
    t.step = Some(first.agent.clone());
    t.traceparent = traceparent.map(str::to_owned);
    Some((cfg.keys.stream(&agent.consumes), t.encode()))
}

/// The entry that starts compensating a task that cannot complete, to be
/// added atomically with the move that decides so (`None`: no completed
/// compensable step).
pub async fn first_compensation(
    q: &dyn Queue,
    cfg: &WorkflowConfig,
    task_id: &str,
    reason: &str,
    traceparent: Option<&str>,
) -> Result<Option<(String, Fields)>, QueueError> {
    let mut chain = log(q, cfg, task_id).await?;
    chain.reverse();
    Ok(compensation_entry(
        cfg,
        task_id,
        &chain,
        reason,
        traceparent,
    ))
}
