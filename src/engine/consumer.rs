//! The agent role: consume an agent's input stream and deliver each task to
//! the agent, effectively once.
//!
//! Owns the consume loop (consumer group per agent, bounded concurrency,
//! claiming a dead consumer's entries after the visibility timeout, safe
//! stop on a kill switch or shutdown) and the life of one entry: decode →
//! deliver → atomic completion, or retry with backoff, or dead-letter.
//!
//! # Invariants
//! - An entry is acked only by [`Queue::complete`] (with its outputs and its
//!   inbox key, one atomic step; sent through the group commit,
//!   [`super::commit`]) or by [`Queue::dead_letter`] (with its DLQ record,
//!   one atomic step). A crash at any instant leaves it pending, and a live
//!   engine claims it after `queue.visibilityTimeout`.
//! - At most `concurrency` deliveries run at once. A delivery slot is freed
//!   as soon as the agent answers, so the next entry is read while the
//!   completion travels; entries held (delivering or completing) stay at
//!   most twice `concurrency`.
//! - A retried entry stays pending with us; after the backoff we re-claim it
//!   by id ([`Queue::claim`]), which counts the delivery in Redis — so
//!   `deadLetter.maxDeliveries` holds across crashes — and tells us if
//!   someone else finished it meanwhile. One delivery or one backoff sleep
//!   never exceeds half the visibility timeout, so a live engine's entry is
//!   not claimed away from it.
//! - Anything read from the stream is validated ([`super::task`]); what is
//!   not a task for us goes to the DLQ with a reason. Nothing from outside
//!   is unwrapped; every queue call has the queue's deadline and every
//!   delivery `min(timeout.perAttempt, visibility/2)`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::workflow::DegradedAction;
use crate::queue::{Completing, Completion, Fields, Queue, QueueError, StreamEntry};

use super::commit::GroupCommit;
use super::config::{Agent, WorkflowConfig};
use super::degraded::{self, Downgrade};
use super::delivery::{Delivery, DeliveryRequest, Outputs, RequestKind, child_traceparent};
use super::dlq::{DlqRecord, reason};
use super::killswitch::{self, SwitchState};
use super::stats::{Outcome, Stats};
use super::task::{self, Attempt, Kind, Task};
use super::{EngineError, saga};

/// Tunables of the agent role (defaults suit production; tests shorten them).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Longest XREADGROUP block; bounds how fast a kill switch is obeyed.
    pub read_block: Duration,
    /// Most entries read per call.
    pub batch: usize,
    /// How long in-flight tasks may finish on shutdown before they are left
    /// pending (checkpointed) for another engine.
    pub drain: Duration,
    /// Seed of the backoff jitter (`r4 run --seed` makes a run repeatable);
    /// `None` draws from the thread's RNG.
    pub jitter_seed: Option<u64>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            read_block: Duration::from_millis(200),
            batch: 64,
            drain: Duration::from_secs(20),
            jitter_seed: None,
        }
    }
}

/// The agent role of one engine.
pub struct AgentRole {
    cfg: Arc<WorkflowConfig>,
    agent: Agent,
    queue: Arc<dyn Queue>,
    delivery: Arc<dyn Delivery>,
    stats: Arc<Stats>,
    engine_id: String,
    opts: AgentOptions,
}

/// What every task handler shares.
struct Ctx {
    cfg: Arc<WorkflowConfig>,
    agent: Agent,
    queue: Arc<dyn Queue>,
    delivery: Arc<dyn Delivery>,
    stats: Arc<Stats>,
    engine_id: String,
    stream: String,
    commit: GroupCommit,
    /// Deliveries in progress: at most the agent's `concurrency`.
    sem: Arc<Semaphore>,
    /// Entries this engine holds (delivering or completing): at most twice
    /// the concurrency, so completions in flight cannot pile up.
    held: Arc<Semaphore>,
    downgrade: watch::Receiver<Option<Downgrade>>,
    shutdown: watch::Receiver<bool>,
    jitter: Option<std::sync::Mutex<rand::rngs::SmallRng>>,
}

impl Ctx {
    /// A uniform draw in `[0, 1)` for backoff jitter.
    fn jitter_draw(&self) -> f64 {
        match &self.jitter {
            Some(rng) => rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .random::<f64>(),
            None => rand::rng().random::<f64>(),
        }
    }
}

impl AgentRole {
    pub fn new(
        cfg: Arc<WorkflowConfig>,
        agent: &str,
        queue: Arc<dyn Queue>,
        delivery: Arc<dyn Delivery>,
        engine_id: &str,
    ) -> Result<Self, EngineError> {
        let agent = cfg
            .agent(agent)
            .cloned()
            .ok_or_else(|| EngineError::Config(format!("unknown agent {agent:?}")))?;
        let stats = Arc::new(Stats::new(engine_id, "agent", Some(&agent.name)));
        Ok(Self {
            cfg,
            agent,
            queue,
            delivery,
            stats,
            engine_id: engine_id.to_owned(),
            opts: AgentOptions::default(),
        })
    }

    pub fn with_options(mut self, opts: AgentOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Share a stats object (e.g. one per process in `r4 run`).
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Run until `shutdown` turns true; then stop reading, let in-flight
    /// tasks finish for up to `drain`, and leave the rest pending.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let stream = self.cfg.keys.stream(&self.agent.consumes);
        let group = self.agent.name.clone();
        let q = self.queue.clone();
        // The group must exist before anything else; retry while Redis is away.
        loop {
            match q.ensure_group(&stream, &group).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create consumer group; retrying");
                    if wait_or_shutdown(&mut shutdown, Duration::from_millis(500)).await {
                        return Ok(());
                    }
                }
            }
        }
        let mut switch =
            killswitch::watch(q.clone(), self.cfg.keys.clone(), self.cfg.spec_switches());
        let acker = killswitch::Acknowledger::start(
            q.clone(),
            self.cfg.keys.clone(),
            self.engine_id.clone(),
        );
        let (down_tx, down_rx) = watch::channel(None);
        let ctx = Arc::new(Ctx {
            sem: Arc::new(Semaphore::new(self.agent.concurrency)),
            held: Arc::new(Semaphore::new(self.agent.concurrency.saturating_mul(2))),
            cfg: self.cfg.clone(),
            agent: self.agent.clone(),
            queue: q.clone(),
            delivery: self.delivery.clone(),
            stats: self.stats.clone(),
            engine_id: self.engine_id.clone(),
            stream: stream.clone(),
            commit: GroupCommit::start(
                q.clone(),
                stream.clone(),
                group.clone(),
                self.cfg.policy.idempotency_ttl,
                self.cfg.max_len,
            ),
            downgrade: down_rx,
            shutdown: shutdown.clone(),
            jitter: self.opts.jitter_seed.map(|s| {
                std::sync::Mutex::new(<rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(
                    s,
                ))
            }),
        });
        let stats_task = tokio::spawn(publish_stats(
            q.clone(),
            self.cfg.keys.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));
        let claim_every = (self.cfg.visibility_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut last_claim: Option<Instant> = None;
        let mut last_down_check: Option<Instant> = None;
        let mut tasks: JoinSet<()> = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let state = switch.borrow_and_update().clone();
            if last_down_check.is_none_or(|t| t.elapsed() >= killswitch::REREAD) {
                last_down_check = Some(Instant::now());
                self.refresh_downgrade(&state, &down_tx).await;
            }
            let paused = state.stops(Some(&self.agent.name))
                || down_tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|d| d.action == DegradedAction::Pause);
            // Acknowledge only once we are really not reading any more
            // (we are between reads here).
            acker.set(state.version, paused);
            if paused {
                tokio::select! {
                    _ = switch.changed() => {}
                    _ = tokio::time::sleep(killswitch::REREAD) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Wait for at least one free slot, then take what is free.
            let first = tokio::select! {
                p = ctx.sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => continue,
                _ = switch.changed() => continue,
            };
            let first_held = tokio::select! {
                p = ctx.held.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => continue,
                _ = switch.changed() => continue,
            };
            let mut permits = vec![(first, first_held)];
            while permits.len() < self.opts.batch {
                match (
                    ctx.sem.clone().try_acquire_owned(),
                    ctx.held.clone().try_acquire_owned(),
                ) {
                    (Ok(p), Ok(h)) => permits.push((p, h)),
                    _ => break,
                }
            }
            let mut entries = Vec::new();
            if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                last_claim = Some(Instant::now());
                match q
                    .autoclaim(
                        &stream,
                        &group,
                        &self.engine_id,
                        self.cfg.visibility_timeout,
                        permits.len(),
                    )
                    .await
                {
                    Ok(c) => {
                        if !c.entries.is_empty() {
                            tracing::info!(
                                n = c.entries.len(),
                                "claimed entries of a dead or slow consumer"
                            );
                        }
                        entries = c.entries;
                    }
                    Err(e) => tracing::warn!(error = %e, "autoclaim failed"),
                }
            }
            if entries.is_empty() {
                match q
                    .read_group(
                        &stream,
                        &group,
                        &self.engine_id,
                        permits.len(),
                        self.opts.read_block,
                    )
                    .await
                {
                    Ok(e) => entries = e,
                    Err(QueueError::NoGroup { .. }) => {
                        // The stream was deleted (e.g. a Redis without AOF restarted).
                        let _ = q.ensure_group(&stream, &group).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "read failed; retrying");
                        drop(permits);
                        if wait_or_shutdown(&mut shutdown, Duration::from_millis(200)).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            for entry in entries {
                let Some((permit, held)) = permits.pop() else {
                    break;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move { handle(ctx, entry, permit, held).await });
            }
        }
        // Safe stop: no more reads; let in-flight tasks finish for a while.
        let drained = tokio::time::timeout(self.opts.drain, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "in-flight tasks left pending for another engine"
            );
            tasks.abort_all();
        }
        let _ = stats_task.await;
        let _ = self
            .stats
            .publish(q.as_ref(), &self.cfg.keys, Duration::from_secs(30))
            .await;
        Ok(())
    }

    async fn refresh_downgrade(&self, state: &SwitchState, tx: &watch::Sender<Option<Downgrade>>) {
        if self.agent.degraded.is_none() {
            return;
        }
        let mut down: BTreeSet<String> = state.tools.clone();
        down.extend(self.cfg.spec_killed_tools());
        match super::breakers::BreakerStates::new(self.queue.as_ref(), &self.cfg.keys)
            .open_tools()
            .await
        {
            Ok(open) => down.extend(open),
            Err(e) => tracing::warn!(error = %e, "cannot read breaker states"),
        }
        let next = degraded::decide(&self.agent, &down);
        let changed = {
            let cur = tx.borrow();
            cur.as_ref().map(|d| (d.action, &d.tools))
                != next.as_ref().map(|d| (d.action, &d.tools))
        };
        if changed {
            tracing::warn!(agent = %self.agent.name, downgrade = ?next, "degraded mode changed");
            if let Err(e) = degraded::broadcast(
                self.queue.as_ref(),
                &self.cfg.keys,
                &self.agent.name,
                next.as_ref(),
            )
            .await
            {
                tracing::warn!(error = %e, "cannot broadcast degraded mode");
            }
            tx.send_replace(next);
        }
    }
}

/// Sleep `d` unless shutdown comes first (then true).
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

pub(crate) async fn publish_stats(
    q: Arc<dyn Queue>,
    keys: crate::queue::Keys,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = stats
            .publish(q.as_ref(), &keys, Duration::from_secs(15))
            .await
        {
            tracing::debug!(error = %e, "cannot publish stats");
        }
        if wait_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// The life of one entry. `permit` is a delivery slot (`ctx.sem`), released as
/// soon as the agent has answered so the next entry can be read while this
/// one's completion is on its way to Redis; `held` (`ctx.held`) bounds the
/// entries in this engine, and is kept until the entry is done or backs off.
async fn handle(
    ctx: Arc<Ctx>,
    mut entry: StreamEntry,
    permit: OwnedSemaphorePermit,
    held: OwnedSemaphorePermit,
) {
    let mut held = Some(held);
    let started = Instant::now();
    let _in_flight = ctx.stats.in_flight();
    let mut permit = Some(permit);
    let mut task = match Task::decode(&entry.fields, ctx.cfg.max_payload_bytes) {
        Ok(t) => t,
        Err(rej) => {
            let rec = record(
                &ctx,
                &entry,
                None,
                rej.reason.as_str(),
                &rej.to_string(),
                vec![],
                None,
                false,
            );
            dead_letter(&ctx, &entry, rec, None, started).await;
            return;
        }
    };
    if let Some(step) = task.step.as_deref()
        && step != ctx.agent.name
    {
        if ctx.cfg.agent(step).is_some() {
            // Another agent's entry on a shared stream: not ours to handle.
            let _ = retry_queue(&ctx, || {
                ctx.queue.ack(
                    &ctx.stream,
                    &ctx.agent.name,
                    std::slice::from_ref(&entry.id),
                )
            })
            .await;
            ctx.stats
                .record(Outcome::Skipped, started.elapsed(), Duration::ZERO);
        } else {
            let msg = format!("unknown step {step:?}");
            let rec = record(
                &ctx,
                &entry,
                Some(&task),
                reason::UNKNOWN_STEP,
                &msg,
                vec![],
                None,
                false,
            );
            dead_letter(&ctx, &entry, rec, None, started).await;
        }
        return;
    }
    let compensation = match &task.kind {
        Kind::Task => None,
        Kind::Compensate { compensation, rest } => {
            if ctx.agent.compensate.as_deref() != Some(compensation.as_str()) {
                let msg = format!(
                    "agent {} has no compensation {compensation:?}",
                    ctx.agent.name
                );
                let rec = record(
                    &ctx,
                    &entry,
                    Some(&task),
                    reason::UNKNOWN_STEP,
                    &msg,
                    vec![],
                    None,
                    false,
                );
                dead_letter(&ctx, &entry, rec, None, started).await;
                return;
            }
            Some((compensation.clone(), rest.clone()))
        }
    };
    let step_key = match &compensation {
        None => ctx.agent.name.clone(),
        Some(_) => format!("compensate:{}", ctx.agent.name),
    };
    let inbox = ctx.cfg.keys.inbox(&task.task_id, &step_key);
    // A redelivered entry may have completed already: ack without delivering.
    if entry.delivery_count > 1
        && let Ok(Some(_)) = ctx.queue.get(&inbox).await
    {
        if let Ok(Completion::AlreadyDone) = complete(&ctx, &entry, &inbox, vec![], vec![]).await {
            ctx.stats
                .record(Outcome::Duplicate, started.elapsed(), Duration::ZERO);
        }
        return;
    }
    // Degraded mode applies to tasks, not to compensations.
    let downgrade = ctx.downgrade.borrow().clone();
    if compensation.is_none()
        && let Some(d) = downgrade
    {
        match d.action {
            DegradedAction::Route => {
                let to = d.to.clone().unwrap_or_default();
                let mut routed = task.clone();
                routed.step = None;
                routed.traceparent = Some(child_traceparent(task.traceparent.as_deref()));
                let out = vec![(ctx.cfg.keys.stream(&to), routed.encode())];
                if let Ok(c) = complete(&ctx, &entry, &inbox, out, vec![]).await {
                    let o = if c == Completion::AlreadyDone {
                        Outcome::Duplicate
                    } else {
                        Outcome::Routed
                    };
                    ctx.stats.record(o, started.elapsed(), Duration::ZERO);
                }
                return;
            }
            DegradedAction::Fail => {
                let msg = format!("required tools down: {}", d.tools.join(", "));
                let tool = d.tools.first().cloned();
                let rec = record(
                    &ctx,
                    &entry,
                    Some(&task),
                    reason::DEGRADED,
                    &msg,
                    vec![],
                    tool,
                    true,
                );
                dead_letter(&ctx, &entry, rec, None, started).await;
                return;
            }
            // Pause: the loop stopped reading; an entry already read is delivered.
            DegradedAction::Pause => {}
        }
    }
    let policy = &ctx.cfg.policy;
    let hold = ctx.cfg.max_hold();
    let attempts_key = ctx.cfg.keys.attempts(&ctx.agent.name, &entry.id);
    // Attempts of this round made by engines that died with the entry.
    let mut round: Vec<Attempt> = if entry.delivery_count > 1 {
        match ctx.queue.get(&attempts_key).await {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_default(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let history_of = |round: &[Attempt]| {
        let mut h = task.history.clone();
        h.extend_from_slice(round);
        h
    };
    if entry.delivery_count > policy.max_deliveries {
        let msg = round.last().map(|a| a.error.clone()).unwrap_or_else(|| {
            format!(
                "delivered {} times without completing (engine crashes?)",
                entry.delivery_count - 1
            )
        });
        let tool = round.last().and_then(|a| a.tool.clone());
        let rec = record(
            &ctx,
            &entry,
            Some(&task),
            reason::MAX_DELIVERIES,
            &msg,
            history_of(&round),
            tool,
            true,
        );
        dead_letter(&ctx, &entry, rec, Some(&attempts_key), started).await;
        return;
    }
    let mut agent_time = Duration::ZERO;
    let traceparent = child_traceparent(task.traceparent.as_deref());
    // Built once for every attempt of this round; the payload moves into it
    // (no copy per task) and a pass-through output takes it from there.
    let mut req = DeliveryRequest {
        task_id: task.task_id.clone(),
        step: ctx.agent.name.clone(),
        kind: if compensation.is_some() {
            RequestKind::Compensate
        } else {
            RequestKind::Task
        },
        compensation: compensation.as_ref().map(|(c, _)| c.clone()),
        payload: std::mem::take(&mut task.payload),
        attempt: entry.delivery_count,
        idempotency_key: match &compensation {
            None => format!("{}:{}", task.task_id, ctx.agent.name),
            Some(_) => format!("{}:compensate:{}", task.task_id, ctx.agent.name),
        },
        traceparent,
        deadline: policy.per_attempt.min(hold),
    };
    loop {
        req.attempt = entry.delivery_count;
        let t = Instant::now();
        let res = ctx.delivery.deliver(&req).await;
        agent_time += t.elapsed();
        let err = match res {
            Ok(outputs) => {
                drop(permit.take());
                let out = build_outputs(
                    &ctx,
                    &task,
                    &req.payload,
                    outputs,
                    compensation.as_ref().map(|(_, r)| r.as_slice()),
                    &req.traceparent,
                );
                // A compensable step's saga-log record expires with its
                // inbox key: after that the step is new work anyway.
                let expire = match (&ctx.agent.compensate, &compensation) {
                    (Some(_), None) => vec![ctx.cfg.keys.saga(&task.task_id)],
                    _ => Vec::new(),
                };
                match complete(&ctx, &entry, &inbox, out, expire).await {
                    Ok(c) => {
                        if !round.is_empty() {
                            let _ = ctx.queue.del(std::slice::from_ref(&attempts_key)).await;
                        }
                        if compensation.is_some() {
                            ctx.stats.compensated();
                        }
                        let o = if c == Completion::AlreadyDone {
                            Outcome::Duplicate
                        } else {
                            Outcome::Completed
                        };
                        ctx.stats.record(o, started.elapsed(), agent_time);
                    }
                    // Left pending: another engine redelivers after the
                    // visibility timeout; the agent dedupes by key.
                    Err(e) => {
                        tracing::error!(error = %e, task = %task.task_id, "cannot complete; left pending")
                    }
                }
                return;
            }
            Err(e) => e,
        };
        let last = err.permanent || entry.delivery_count >= policy.max_deliveries;
        ctx.stats.failed_attempt(!last);
        round.push(Attempt {
            attempt: entry.delivery_count,
            round: task.replays,
            at_ms: task::now_ms(),
            engine: ctx.engine_id.clone(),
            error: err.message.clone(),
            kind: if err.permanent {
                "permanent"
            } else {
                "retryable"
            }
            .into(),
            tool: err.tool.clone(),
        });
        if last {
            let why = if err.permanent {
                reason::PERMANENT
            } else {
                reason::MAX_DELIVERIES
            };
            let rec = record(
                &ctx,
                &entry,
                Some(&task),
                why,
                &err.to_string(),
                history_of(&round),
                err.tool.clone(),
                !err.permanent,
            );
            dead_letter(&ctx, &entry, rec, Some(&attempts_key), started).await;
            return;
        }
        // Keep the history where a successor can find it, then back off
        // without holding a concurrency slot.
        let _ = ctx
            .queue
            .set(
                &attempts_key,
                Bytes::from(task::json_bytes(&round)),
                Some(policy.idempotency_ttl),
            )
            .await;
        drop(permit.take());
        drop(held.take());
        let retry_n = u32::try_from(round.len()).unwrap_or(u32::MAX);
        let delay = policy.backoff.delay(retry_n, ctx.jitter_draw()).min(hold);
        let mut shutdown = ctx.shutdown.clone();
        if wait_or_shutdown(&mut shutdown, delay).await {
            return; // left pending: checkpointed for redelivery
        }
        permit = match ctx.sem.clone().acquire_owned().await {
            Ok(p) => Some(p),
            Err(_) => return,
        };
        match ctx
            .queue
            .claim(
                &ctx.stream,
                &ctx.agent.name,
                &ctx.engine_id,
                std::slice::from_ref(&entry.id),
            )
            .await
        {
            Ok(mut c) if !c.is_empty() => entry.delivery_count = c.remove(0).delivery_count,
            // Acked or taken over meanwhile: not ours any more.
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-claim for retry; left pending");
                return;
            }
        }
        if entry.delivery_count > policy.max_deliveries {
            let rec = record(
                &ctx,
                &entry,
                Some(&task),
                reason::MAX_DELIVERIES,
                &err.to_string(),
                history_of(&round),
                err.tool.clone(),
                true,
            );
            dead_letter(&ctx, &entry, rec, Some(&attempts_key), started).await;
            return;
        }
    }
}

/// The output entries of a successful step: one per produced stream, the
/// saga-log record of a compensable step, or the next compensation.
fn build_outputs(
    ctx: &Ctx,
    task: &Task,
    input: &serde_json::Value,
    outputs: Outputs,
    compensation_rest: Option<&[task::SagaStep]>,
    traceparent: &str,
) -> Vec<(String, Fields)> {
    let mut out = Vec::new();
    if let Some(rest) = compensation_rest {
        if let Some(next) = saga::compensation_entry(
            &ctx.cfg,
            &task.task_id,
            rest,
            "compensating",
            Some(traceparent),
        ) {
            out.push(next);
        }
        return out;
    }
    for p in &ctx.agent.produces {
        let payload = match &outputs {
            Outputs::All(v) => v.clone(),
            Outputs::PassThrough => input.clone(),
            Outputs::PerStream(m) => match m.get(p) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        let mut next = Task::new(task.task_id.clone(), payload);
        next.traceparent = Some(traceparent.to_owned());
        next.submitted_ms = task.submitted_ms;
        out.push((ctx.cfg.keys.stream(p), next.encode()));
    }
    if let Some(c) = &ctx.agent.compensate {
        out.push(saga::log_output(
            &ctx.cfg,
            &task.task_id,
            &ctx.agent.name,
            c,
        ));
    }
    out
}

/// Retry a queue call for up to half the visibility timeout (Redis may be
/// restarting); after that the entry is left pending for redelivery.
async fn retry_queue<T, F, Fut>(ctx: &Ctx, mut op: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let give_up = Instant::now() + ctx.cfg.max_hold();
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e @ (QueueError::Invalid(_) | QueueError::WrongType(_))) => return Err(e),
            Err(e) if Instant::now() + wait >= give_up => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "queue call failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Complete `entry` through the group commit; `expire` are outputs that
/// live as long as the inbox key (the task's saga log).
async fn complete(
    ctx: &Ctx,
    entry: &StreamEntry,
    inbox: &str,
    outputs: Vec<(String, Fields)>,
    expire: Vec<String>,
) -> Result<Completion, QueueError> {
    retry_queue(ctx, || {
        ctx.commit.complete(Completing {
            entry_id: entry.id.clone(),
            inbox_key: inbox.to_owned(),
            outputs: outputs.clone(),
            expire: expire.clone(),
        })
    })
    .await
}

#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &Ctx,
    entry: &StreamEntry,
    task: Option<&Task>,
    why: &str,
    error: &str,
    history: Vec<Attempt>,
    tool: Option<String>,
    replayable: bool,
) -> DlqRecord {
    DlqRecord {
        id: String::new(),
        reason: why.to_owned(),
        error: error.to_owned(),
        task_id: task.map(|t| t.task_id.clone()).unwrap_or_default(),
        step: ctx.agent.name.clone(),
        source: ctx.agent.consumes.clone(),
        entry_id: entry.id.clone(),
        deliveries: entry.delivery_count,
        replays: task.map_or(0, |t| t.replays),
        replayable,
        tool,
        dead_at_ms: task::now_ms(),
        engine: ctx.engine_id.clone(),
        history,
        original: entry.fields.clone(),
    }
}

/// Dead-letter an entry (atomically with its XACK). A task that failed for
/// a reason replay cannot fix starts its saga compensations first (a crash
/// in between starts them twice, which the inbox key absorbs).
async fn dead_letter(
    ctx: &Ctx,
    entry: &StreamEntry,
    rec: DlqRecord,
    attempts_key: Option<&str>,
    started: Instant,
) {
    if !rec.replayable && !rec.task_id.is_empty() && rec.reason != reason::UNKNOWN_STEP {
        let tp = entry
            .field(task::TRACEPARENT)
            .and_then(|b| std::str::from_utf8(b).ok());
        if let Err(e) =
            saga::start(ctx.queue.as_ref(), &ctx.cfg, &rec.task_id, &rec.reason, tp).await
        {
            tracing::error!(error = %e, "cannot start compensations; entry left pending");
            return;
        }
    }
    if !rec.task_id.is_empty() && task::valid_task_id(&rec.task_id) {
        let _ = ctx
            .queue
            .set(
                &ctx.cfg.keys.task_dlq(&rec.task_id),
                Bytes::from(rec.reason.clone()),
                Some(ctx.cfg.policy.idempotency_ttl),
            )
            .await;
    }
    let fields = rec.encode();
    let dlq = ctx.cfg.keys.dlq();
    match retry_queue(ctx, || {
        ctx.queue.dead_letter(
            &ctx.stream,
            &ctx.agent.name,
            &entry.id,
            &dlq,
            fields.clone(),
        )
    })
    .await
    {
        Ok(_) => {
            tracing::warn!(task = %rec.task_id, step = %ctx.agent.name, reason = %rec.reason, error = %rec.error, "dead-lettered");
            ctx.stats
                .record(Outcome::DeadLettered, started.elapsed(), Duration::ZERO);
            if let Some(k) = attempts_key {
                let _ = ctx.queue.del(&[k.to_owned()]).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot dead-letter; entry left pending"),
    }
}
