//! The dead-letter queue of a workflow: the record format and the
//! operations on it (list, show, replay, quarantine as poison, purge).
//!
//! Owns the DLQ record fields. Writing a record is the consumer's (one
//! atomic `dead_letter` with the XACK); deciding *when* to replay is the
//! repair role's and the operator's (`r4 dlq`). Both replay through
//! [`replay`], so there is one replay path.
//!
//! # Lifecycle
//!
//! `work stream → (retries) → DLQ → replay → work stream …` at most
//! `deadLetter.replay.maxReplays` times, then `DLQ → poison` with the full
//! history. Replay and quarantine are each one atomic move
//! ([`Queue::transfer`]): the entry leaves the DLQ exactly when it lands in
//! the work stream (or the poison stream), two replayers cannot both move
//! it, and what goes with the move happens in the same step — a replay
//! clears the task's DLQ marker and its replay schedule, a quarantine starts
//! the task's saga compensations. A replayed task keeps its task id, so its
//! inbox keys and the agents' idempotency keys dedupe anything that had in
//! fact completed; it is replayed to the step that failed (`step`), so on a
//! stream several agents read only that agent takes it again.
//!
//! The DLQ and the poison stream are trimmed by `deadLetter.retention`
//! ([`trim_retention`]); replayable records are scheduled for the repair
//! role in a sorted set of due times (`Keys::dlq_due`), so a repair pass
//! reads only what is due, never the whole DLQ.
//!
//! Record fields: `reason`, `error`, `task_id`, `step`, `source` (stream
//! name), `entry_id` (in the source), `deliveries`, `replays`, `replayable`
//! (`1`: retryable failure, the repair role may replay it), `tool` (failing
//! dependency, if known), `dead_at_ms`, `engine`, `history` (JSON list of
//! every attempt of every round), `joins` (JSON list of the joins the
//! failure failed, reopened by a replay; absent when none) and `f:<name>`
//! for each field of the original entry, byte for byte (a corrupted entry
//! is kept as it came).

use bytes::Bytes;

use serde::{Deserialize, Serialize};

use crate::queue::{Fields, JoinRef, Keys, Queue, QueueError, StreamEntry, Transfer};

use super::task::{self, Attempt};

/// Why a task was dead-lettered.
pub mod reason {
    /// The entry is not a task (see `task::Reject`): `malformed`, `oversized`, `unknown_type`.
    pub const UNKNOWN_STEP: &str = "unknown_step";
    /// The agent answered with a permanent (4xx) failure.
    pub const PERMANENT: &str = "permanent";
    /// Retryable failures until `deadLetter.maxDeliveries`.
    pub const MAX_DELIVERIES: &str = "max_deliveries";
    /// `degradedMode.action: Fail` while a required tool was down.
    pub const DEGRADED: &str = "degraded";
    /// The entry was pending but is gone from its stream (deleted by hand,
    /// or lost by a Redis without persistence): only its id is known.
    pub const TRIMMED: &str = "trimmed";
    /// The agent's output is larger than `intake.maxPayloadBytes`, the
    /// limit of every hop: the producing step fails for good.
    pub const OVERSIZED_OUTPUT: &str = "oversized";
    /// A join did not receive every branch within its timeout.
    pub const JOIN_TIMEOUT: &str = "join-timeout";
}

/// A join a dead-lettered step failed (downstream of it): a replay of the
/// step reopens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedJoin {
    /// The joining agent.
    pub agent: String,
    /// Its `join.timeout`, in ms: the reopened join's new deadline is this
    /// far from the replay.
    pub timeout_ms: u64,
    /// TTL of the join's record, in ms.
    pub ttl_ms: u64,
}

impl FailedJoin {
    /// The join of `task_id` at this joining agent.
    pub fn join_ref(&self, keys: &Keys, task_id: &str) -> JoinRef {
        JoinRef::new(
            keys,
            &self.agent,
            task_id,
            std::time::Duration::from_millis(self.ttl_ms),
        )
    }
}

/// The DLQ or the poison stream of a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Dlq,
    Poison,
}

impl Store {
    pub fn key(self, keys: &Keys) -> String {
        match self {
            Store::Dlq => keys.dlq(),
            Store::Poison => keys.poison(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Store::Dlq => "DLQ",
            Store::Poison => "poison",
        }
    }
}

/// A decoded DLQ record.
#[derive(Debug, Clone, PartialEq)]
pub struct DlqRecord {
    /// Id of the record in the DLQ stream.
    pub id: String,
    pub reason: String,
    pub error: String,
    pub task_id: String,
    pub step: String,
    pub source: String,
    pub entry_id: String,
    pub deliveries: u64,
    pub replays: u32,
    pub replayable: bool,
    pub tool: Option<String>,
    pub dead_at_ms: u64,
    pub engine: String,
    pub history: Vec<Attempt>,
    /// Joins this failure failed.
    pub joins: Vec<FailedJoin>,
    pub original: Fields,
}

impl DlqRecord {
    pub fn encode(&self) -> Fields {
        let mut f: Fields = vec![
            ("reason".into(), Bytes::from(self.reason.clone())),
            ("error".into(), Bytes::from(self.error.clone())),
            ("task_id".into(), Bytes::from(self.task_id.clone())),
            ("step".into(), Bytes::from(self.step.clone())),
            ("source".into(), Bytes::from(self.source.clone())),
            ("entry_id".into(), Bytes::from(self.entry_id.clone())),
            (
                "deliveries".into(),
                Bytes::from(self.deliveries.to_string()),
            ),
            ("replays".into(), Bytes::from(self.replays.to_string())),
            (
                "replayable".into(),
                Bytes::from_static(if self.replayable { b"1" } else { b"0" }),
            ),
            (
                "dead_at_ms".into(),
                Bytes::from(self.dead_at_ms.to_string()),
            ),
            ("engine".into(), Bytes::from(self.engine.clone())),
            (
                "history".into(),
                Bytes::from(task::json_bytes(&self.history)),
            ),
        ];
        if let Some(t) = &self.tool {
            f.push(("tool".into(), Bytes::from(t.clone())));
        }
        if !self.joins.is_empty() {
            f.push(("joins".into(), Bytes::from(task::json_bytes(&self.joins))));
        }
        for (k, v) in &self.original {
            f.push((format!("f:{k}"), v.clone()));
        }
        f
    }

    /// Decode leniently: a record is shown even if some field is damaged.
    pub fn decode(e: &StreamEntry) -> Self {
        let s = |name: &str| {
            e.field(name)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let original: Fields = e
            .fields
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("f:").map(|k| (k.to_owned(), v.clone())))
            .collect();
        // A record written for an entry that could not be decoded may lack
        // the task id; the raw entry may still carry a readable one.
        let mut task_id = s("task_id");
        if task_id.is_empty()
            && let Some(raw) = original
                .iter()
                .find(|(k, _)| k == "task_id")
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|id| task::valid_task_id(id))
        {
            task_id = raw.to_owned();
        }
        Self {
            id: e.id.clone(),
            reason: s("reason"),
            error: s("error"),
            task_id,
            step: s("step"),
            source: s("source"),
            entry_id: s("entry_id"),
            deliveries: s("deliveries").parse().unwrap_or(0),
            replays: s("replays").parse().unwrap_or(0),
            replayable: s("replayable") == "1",
            tool: e
                .field("tool")
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            dead_at_ms: s("dead_at_ms").parse().unwrap_or(0),
            engine: s("engine"),
            history: e
                .field("history")
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default(),
            joins: e
                .field("joins")
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default(),
            original,
        }
    }

    /// Seconds since the record was written.
    pub fn age_secs(&self) -> u64 {
        task::now_ms().saturating_sub(self.dead_at_ms) / 1000
    }

    /// The entry to put back on the source stream: the original fields
    /// with `replays` bumped, the full history carried along, and `step`
    /// set to the agent that failed it (so on a stream several agents read,
    /// only that one takes it again).
    pub fn replay_fields(&self) -> Fields {
        let mut f: Fields = self
            .original
            .iter()
            .filter(|(k, _)| k != task::REPLAYS && k != task::HISTORY)
            .filter(|(k, _)| k != task::STEP || self.step.is_empty())
            .cloned()
            .collect();
        if !self.step.is_empty() {
            f.push((task::STEP.into(), Bytes::from(self.step.clone())));
        }
        f.push((
            task::REPLAYS.into(),
            Bytes::from((self.replays + 1).to_string()),
        ));
        if !self.history.is_empty() {
            f.push((
                task::HISTORY.into(),
                Bytes::from(task::json_bytes(&self.history)),
            ));
        }
        f
    }
}

/// Up to `count` records (0: all) of `store`, oldest first.
pub async fn list(
    q: &dyn Queue,
    keys: &Keys,
    store: Store,
    count: usize,
) -> Result<Vec<DlqRecord>, QueueError> {
    Ok(q.range(&store.key(keys), "-", "+", count)
        .await?
        .iter()
        .map(DlqRecord::decode)
        .collect())
}

/// One record by id.
pub async fn show(
    q: &dyn Queue,
    keys: &Keys,
    store: Store,
    id: &str,
) -> Result<Option<DlqRecord>, QueueError> {
    crate::queue::EntryId::parse(id)?;
    Ok(q.range(&store.key(keys), id, id, 1)
        .await?
        .first()
        .map(DlqRecord::decode))
}

/// Replay: move the record from `store` back to its source stream,
/// atomically with clearing the task's DLQ marker and its replay schedule
/// (see the module docs). `None` if it was no longer there; refused with
/// [`QueueError::Full`] while the source stream is at `limit`.
pub async fn replay(
    q: &dyn Queue,
    keys: &Keys,
    store: Store,
    record: &DlqRecord,
    limit: Option<u64>,
) -> Result<Option<String>, QueueError> {
    if record.reason == reason::JOIN_TIMEOUT {
        return Err(QueueError::Invalid(format!(
            "{} entry {} is a join that timed out (the parts it had are in the record); it cannot be replayed — replay or resubmit the missing branch's task",
            store.name(),
            record.id
        )));
    }
    if record.source.is_empty() || record.original.is_empty() {
        return Err(QueueError::Invalid(format!(
            "{} entry {} has no source stream or original fields to replay",
            store.name(),
            record.id
        )));
    }
    let mut del = Vec::new();
    let mut reopen_joins = Vec::new();
    if task::valid_task_id(&record.task_id) {
        del.push(keys.task_dlq(&record.task_id));
        let now = task::now_ms();
        for j in &record.joins {
            reopen_joins.push((
                j.join_ref(keys, &record.task_id),
                record.step.clone(),
                now.saturating_add(j.timeout_ms),
            ));
        }
    }
    q.transfer(Transfer {
        from: store.key(keys),
        id: record.id.clone(),
        to: keys.stream(&record.source),
        fields: record.replay_fields(),
        limit,
        also: Vec::new(),
        del,
        unschedule: Some((keys.dlq_due(), record.id.clone())),
        reopen_joins,
    })
    .await
}

/// Quarantine: move the record, with its full history, to the poison
/// stream; `compensation` (the task's first saga compensation) is added in
/// the same step, so compensations start exactly when the move happens.
pub async fn quarantine(
    q: &dyn Queue,
    keys: &Keys,
    record: &DlqRecord,
    compensation: Option<(String, Fields)>,
) -> Result<Option<String>, QueueError> {
    let mut f = record.encode();
    f.push((
        "quarantined_at_ms".into(),
        Bytes::from(task::now_ms().to_string()),
    ));
    f.push(("dlq_id".into(), Bytes::from(record.id.clone())));
    q.transfer(Transfer {
        from: keys.dlq(),
        id: record.id.clone(),
        to: keys.poison(),
        fields: f,
        limit: None,
        also: compensation.into_iter().collect(),
        del: Vec::new(),
        unschedule: Some((keys.dlq_due(), record.id.clone())),
        reopen_joins: Vec::new(),
    })
    .await
}

/// When replay number `replays` of a record written at `dead_at_ms` is due
/// (`deadLetter.replay.backoff * 2^replays` later).
pub fn due_at(replay_backoff: std::time::Duration, dead_at_ms: u64, replays: u32) -> u64 {
    let wait = replay_backoff * 2u32.saturating_pow(replays.min(20));
    dead_at_ms.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
}

/// Delete every record of `store`; returns how many there were.
pub async fn purge(q: &dyn Queue, keys: &Keys, store: Store) -> Result<u64, QueueError> {
    let key = store.key(keys);
    let ids: Vec<String> = q
        .range(&key, "-", "+", 0)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    let mut n = 0;
    for chunk in ids.chunks(500) {
        n += q.delete(&key, chunk).await?;
        if store == Store::Dlq {
            for id in chunk {
                q.unschedule(&keys.dlq_due(), id).await?;
            }
        }
    }
    Ok(n)
}

/// Drop DLQ and poison records older than `retention`; returns how many.
pub async fn trim_retention(
    q: &dyn Queue,
    keys: &Keys,
    retention: std::time::Duration,
) -> Result<u64, QueueError> {
    let ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let before = task::now_ms().saturating_sub(ms);
    if before == 0 {
        return Ok(0);
    }
    Ok(q.trim_older(&keys.dlq(), before).await? + q.trim_older(&keys.poison(), before).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fields;
    use crate::queue::memory::MemoryQueue;

    #[tokio::test]
    async fn record_round_trip_and_replay() {
        let q = MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let rec = DlqRecord {
            id: String::new(),
            reason: reason::MAX_DELIVERIES.into(),
            error: "503".into(),
            task_id: "t1".into(),
            step: "coder".into(),
            source: "code".into(),
            entry_id: "1-0".into(),
            deliveries: 5,
            replays: 1,
            replayable: true,
            tool: Some("bank".into()),
            dead_at_ms: task::now_ms(),
            engine: "e".into(),
            history: vec![],
            joins: Vec::new(),
            original: vec![
                ("task_id".into(), Bytes::from("t1")),
                ("payload".into(), Bytes::from_static(&[0xff, b'{'])),
                ("replays".into(), Bytes::from("1")),
            ],
        };
        let id = q.add(&keys.dlq(), rec.encode(), None).await.unwrap();
        let got = show(&q, &keys, Store::Dlq, &id).await.unwrap().unwrap();
        assert_eq!(
            got,
            DlqRecord {
                id: id.clone(),
                ..rec.clone()
            }
        );
        let moved = replay(&q, &keys, Store::Dlq, &got, None).await.unwrap();
        assert!(moved.is_some());
        assert!(
            replay(&q, &keys, Store::Dlq, &got, None)
                .await
                .unwrap()
                .is_none(),
            "once"
        );
        let back = q.range(&keys.stream("code"), "-", "+", 0).await.unwrap();
        assert_eq!(back[0].field("replays"), Some(&Bytes::from("2")));
        assert_eq!(
            back[0].field("payload"),
            Some(&Bytes::from_static(&[0xff, b'{']))
        );
        q.add(&keys.dlq(), fields([("reason", "x")]), None)
            .await
            .unwrap();
        q.add(&keys.dlq(), fields([("reason", "y")]), None)
            .await
            .unwrap();
        assert_eq!(list(&q, &keys, Store::Dlq, 0).await.unwrap().len(), 2);
        assert_eq!(purge(&q, &keys, Store::Dlq).await.unwrap(), 2);
        assert_eq!(q.len(&keys.dlq()).await.unwrap(), 0);
    }
}
