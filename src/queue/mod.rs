//! The queue layer of r4: a [`Queue`] trait with Redis Streams semantics and
//! two backends, [`redis::RedisQueue`] (real Redis, via a reconnecting
//! `ConnectionManager`) and [`memory::MemoryQueue`] (embedded, one process).
//!
//! This file owns the trait, the shared data types and the error type.
//! [`keys`] owns key naming. The conformance suite in `conformance.rs` runs
//! the same behaviour tests against both backends.
//!
//! # The effectively-once invariant
//!
//! A step consumes one input entry and produces zero or more output entries.
//! [`Queue::complete`] does, in ONE atomic step: publish every output, XACK
//! the input, and record the step's *inbox key* (with a TTL). If the inbox key
//! already exists, the step was already completed (e.g. by a predecessor that
//! crashed after completing but before it learned so, or whose entry was
//! reclaimed by another consumer), so `complete` only acks and publishes
//! nothing. Hence, for as long as the inbox key lives, outputs of a step are
//! published at most once, and an input is never acked without its outputs
//! being published. Together with redelivery of un-acked entries
//! ([`Queue::autoclaim`]) this gives effectively-once processing.

pub mod keys;
pub mod memory;
pub mod redis;

#[cfg(test)]
mod conformance;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use keys::Keys;

/// Field/value pairs of one stream entry (a Redis stream entry's payload).
pub type Fields = Vec<(String, Bytes)>;

/// Boxed future returned by [`Queue`] methods (keeps the trait object-safe,
/// so the engine can hold an `Arc<dyn Queue>`).
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

/// Messages from a pub/sub subscription. The stream ends when the underlying
/// connection is lost (Redis) — the caller resubscribes.
pub type Subscription = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// One stream entry as read from a stream or a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// Entry id, `<ms>-<seq>`.
    pub id: String,
    /// The entry's fields, in insertion order.
    pub fields: Fields,
    /// How many times the entry has been delivered to a consumer of the
    /// group (1 on first delivery, incremented on every claim). 0 for entries
    /// read with `range`/`rev_range`, which are not group reads.
    pub delivery_count: u64,
}

impl StreamEntry {
    /// First value of `name`, if present.
    pub fn field(&self, name: &str) -> Option<&Bytes> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Result of [`Queue::autoclaim`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Entries now owned by the claiming consumer, with their (incremented)
    /// delivery counts.
    pub entries: Vec<StreamEntry>,
    /// Ids that were pending but whose entries no longer exist (trimmed or
    /// deleted); they have been removed from the pending list. Exactly one
    /// claimer is told of each, so it must account for it (dead-letter it).
    pub deleted: Vec<String>,
    /// Where the next call should start scanning the pending list (`0-0`
    /// once the scan reached its end: start again from the beginning).
    pub next: String,
}

/// Result of [`Queue::pending_summary`] (XPENDING summary form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    /// Number of delivered but un-acked entries.
    pub count: u64,
    /// Smallest pending id.
    pub min_id: Option<String>,
    /// Largest pending id.
    pub max_id: Option<String>,
    /// Pending count per consumer, sorted by consumer name.
    pub consumers: Vec<(String, u64)>,
}

/// Result of [`Queue::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Outputs published (their new entry ids, in order), input acked, inbox
    /// key recorded.
    Published { output_ids: Vec<String> },
    /// The inbox key already existed: the input was acked, nothing published.
    AlreadyDone,
    /// The entry is no longer pending for this consumer (acked, dead-lettered
    /// or claimed by another engine meanwhile): nothing was written.
    NotPending,
    /// `only_if_done` and the inbox key does not exist (any more): nothing
    /// was written; the step must be done for real.
    NotDone,
    /// An output stream's backlog is at its limit: nothing was written, the
    /// entry stays pending (backpressure; retry later).
    Full { stream: String },
}

/// Result of [`Queue::submit_idempotent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The task id bound to the idempotency key.
    pub task_id: String,
    /// `Some(entry id)` if this call created the stream entry, `None` if the
    /// key was already bound (duplicate submission).
    pub entry_id: Option<String>,
}

impl Submitted {
    /// Whether this call was the one that created the task.
    pub fn created(&self) -> bool {
        self.entry_id.is_some()
    }
}

/// One entry of [`Queue::complete_batch`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completing {
    /// The input entry to acknowledge.
    pub entry_id: String,
    /// Only acknowledge, and only if the inbox key exists (a redelivered
    /// entry whose step another engine finished): the check and the ack are
    /// one step, so a key that expires in between cannot ack the entry
    /// without its outputs.
    pub only_if_done: bool,
    /// The step's inbox key (set with the batch's TTL).
    pub inbox_key: String,
    /// `(stream, fields)` to publish.
    pub outputs: Vec<(String, Fields)>,
    /// Output streams that expire with the inbox key: their TTL is set to
    /// the inbox TTL in the same step (a task's saga log, which is garbage
    /// once the step can no longer be redone).
    pub expire: Vec<String>,
    /// Outputs that are parts of a join, recorded in the same step (see
    /// [`JoinPart`]).
    pub joins: Vec<JoinPart>,
}

/// One task's join at one joining agent: a hash holding the parts that
/// arrived (`p:<stream>` → output), `joined` once the joined task was
/// written, `failed:<step>` per failed branch and their count `nfailed`;
/// and the agent's sorted set of open joins by deadline.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinRef {
    /// The join's hash ([`Keys::join`]).
    pub hash: String,
    /// The joining agent's open joins by deadline ([`Keys::join_due`]).
    pub due: String,
    /// The task (member of `due`).
    pub task_id: String,
    /// TTL of the hash, renewed on every write to it.
    pub ttl: Duration,
}

impl JoinRef {
    /// `task_id`'s join at the joining agent `agent`: its hash and its agent's due set, as
    /// [`Keys`] names them.
    pub fn new(keys: &Keys, agent: &str, task_id: &str, ttl: Duration) -> Self {
        Self {
            hash: keys.join(agent, task_id),
            due: keys.join_due(agent),
            task_id: task_id.to_owned(),
            ttl,
        }
    }
}

/// A branch's output recorded into a join by the completion of the step
/// that produced it ([`Completing::joins`]).
///
/// In the completion's atomic step: the part is stored unless it is there
/// already; if the join is open (neither joined nor failed) and this part
/// was the last one missing, the joined task is added to `target` — its
/// `fields` with the value of `payload_field` replaced by the JSON object
/// `{"<part>": <output>, …}` in the order of `parts` — the join is marked
/// `joined` and leaves the due set; if it is open and still missing
/// parts, it is scheduled at `deadline_ms` (the first part sets it). So a
/// crash at any instant neither loses a part nor joins twice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinPart {
    pub join: JoinRef,
    /// This branch's stream name (the part's key in the joined payload).
    pub part: String,
    /// The branch's output (JSON text).
    pub value: Bytes,
    /// Every part of the join, in the joined payload's order.
    pub parts: Vec<String>,
    /// Stream key the joined task is written to (backlog-limited like any
    /// output).
    pub target: String,
    /// The joined task's fields.
    pub fields: Fields,
    /// The field of `fields` whose value becomes the joined JSON.
    pub payload_field: String,
    /// Wall-clock ms at which the join times out, if this is its first part.
    pub deadline_ms: u64,
}

/// Result of [`Queue::expire_join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinExpiry {
    /// The join timed out: marked failed, its record written (the DLQ id).
    DeadLettered(String),
    /// Nothing to do: the join completed, failed, or is not due (any more).
    Settled,
    /// The parts changed since they were read: read them again.
    Changed,
}

/// One task of [`Queue::submit_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// Bind this key to the task; `None`: no deduplication.
    pub idem_key: Option<String>,
    /// Digest of the payload, stored with the key: a later submission with
    /// the same key and another digest is a conflict (Stripe's rule).
    pub fingerprint: Option<String>,
    /// The task's id if this submission creates it (the caller's fresh id).
    pub task_id: String,
    /// The entry's fields after the leading `task_id`.
    pub fields: Fields,
}

/// One dead-lettering ([`Queue::dead_letter`]): everything that must happen
/// together when a task leaves its work stream for the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadLetter {
    /// The input entry to acknowledge; the move happens only if this
    /// acknowledgement finds it pending (so a completion and a
    /// dead-lettering can never both happen).
    pub entry_id: String,
    /// The DLQ stream and the record to add to it.
    pub dlq: String,
    pub record: Fields,
    /// Entries added in the same step (a saga's first compensation).
    pub also: Vec<(String, Fields)>,
    /// A string key set in the same step with `marker_ttl` (the task's DLQ
    /// marker), `None`: none.
    pub marker: Option<(String, Bytes)>,
    pub marker_ttl: Duration,
    /// Sorted set and score (due time, ms) under which the new record's id
    /// is scheduled for the repair role; `None`: not scheduled.
    pub schedule: Option<(String, u64)>,
    /// Joins downstream of the failed step, each failed by this step (the
    /// `String`) in the same step: a join that has not completed is marked
    /// failed and leaves its due set, so the other branches' parts never
    /// complete it.
    pub fail_joins: Vec<(JoinRef, String)>,
}

/// One atomic move of a record between streams ([`Queue::transfer`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transfer {
    pub from: String,
    pub id: String,
    pub to: String,
    pub fields: Fields,
    /// Backlog limit of `to` (`None`: none).
    pub limit: Option<u64>,
    /// Entries added in the same step (a saga's first compensation).
    pub also: Vec<(String, Fields)>,
    /// Keys deleted in the same step (the task's DLQ marker on replay).
    pub del: Vec<String>,
    /// `(sorted set, member)` removed in the same step (the repair schedule).
    pub unschedule: Option<(String, String)>,
    /// Joins failed by the replayed step (the `String`), reopened in the
    /// same step: the step's failure mark is removed and, when it was the
    /// last, the join is scheduled again at the given deadline (ms).
    pub reopen_joins: Vec<(JoinRef, String, u64)>,
}

/// Errors from the queue layer.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A Redis error (I/O, server error reply, ...).
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A network operation did not finish within its deadline.
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// The consumer group (or its stream) does not exist.
    #[error("no consumer group {group:?} on stream {stream:?}")]
    NoGroup { stream: String, group: String },
    /// The key holds a value of another type.
    #[error("key {0:?} holds the wrong kind of value")]
    WrongType(String),
    /// A reply did not have the expected shape.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// A caller-supplied argument is invalid (e.g. a malformed entry id).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A call made on behalf of several callers (a group commit) failed;
    /// each of them gets this copy of the error.
    #[error("{0}")]
    Shared(String),
    /// Backpressure: the stream's backlog (entries not yet acknowledged by
    /// every consumer group) is at its limit; nothing was written.
    #[error("stream {stream:?} is full: backlog {backlog} at limit {limit}")]
    Full {
        stream: String,
        backlog: u64,
        limit: u64,
    },
    /// Submission `index` of a batch reuses an idempotency key bound to task
    /// `task_id` with a different payload; nothing was written.
    #[error("idempotency key of task {index} was used for another payload (task {task_id})")]
    Conflict { index: usize, task_id: String },
}

/// Redis Streams semantics plus the few KV / pub-sub helpers the engine needs.
///
/// Conventions: `block == Duration::ZERO` means "do not block" (unlike Redis'
/// `BLOCK 0`, which waits forever — the engine never wants that). Range bounds
/// accept `-`, `+`, `<ms>` and `<ms>-<seq>`.
///
/// # Backlog limits, never trimming of unacknowledged entries
///
/// A `limit` on a write to a work stream (a stream some consumer group
/// reads) is a **backpressure** limit, not a trim length: the backlog of a
/// stream is the number of its entries after removing those that every
/// group has read and acknowledged; a write that would take the backlog
/// past the limit writes nothing and fails with [`QueueError::Full`] (or,
/// inside a completion, [`Completion::Full`]). An entry some group has not
/// read, or read and not acked, is never removed by the queue. A stream no
/// group reads (the end of a graph) is capped at the limit by dropping its
/// oldest entries — so the engine creates the groups of every agent before
/// anything is written (`engine::consumer::ensure_groups`). Without a
/// limit nothing is checked on a write; the engines consuming a stream trim
/// what every group acknowledged now and then ([`Queue::trim_acked`]).
pub trait Queue: Send + Sync {
    /// XADD, refusing with [`QueueError::Full`] past `limit` (see the trait
    /// docs; `None`: no limit). Returns the entry id.
    fn add<'a>(
        &'a self,
        stream: &'a str,
        fields: Fields,
        limit: Option<u64>,
    ) -> QueueFuture<'a, String>;

    /// Create `group` on `stream` reading from the beginning (`0`), creating
    /// the stream if missing. An existing group is left as it is.
    fn ensure_group<'a>(&'a self, stream: &'a str, group: &'a str) -> QueueFuture<'a, ()>;

    /// XREADGROUP `>`: up to `count` (0: no limit) never-delivered entries for `consumer`,
    /// waiting up to `block` for some to arrive. Delivery count is 1.
    fn read_group<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        count: usize,
        block: Duration,
    ) -> QueueFuture<'a, Vec<StreamEntry>>;

    /// XACK. Returns how many of `ids` were pending and are now acked.
    fn ack<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, u64>;

    /// XAUTOCLAIM from `start` (`0-0`: the beginning): take over up to
    /// `count` (0: 100, Redis' default) entries pending for at least
    /// `min_idle` (left by a dead or slow consumer), incrementing their
    /// delivery counts. At most `10 * count` pending entries are scanned per
    /// call (as Redis does); the caller keeps [`Claimed::next`] and passes
    /// it as the next `start`, so entries behind many live pending ones are
    /// reached too.
    fn autoclaim<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        min_idle: Duration,
        count: usize,
        start: &'a str,
    ) -> QueueFuture<'a, Claimed>;

    /// XCLAIM by id with min-idle 0: take over those of `ids` that are still
    /// pending in `group` (whoever owns them), resetting their idle time and
    /// incrementing their delivery counts, which are returned. Ids no longer
    /// pending (acked) or whose entries were deleted are skipped (deleted ones
    /// leave the pending list). The engine uses this to re-deliver an entry it
    /// keeps for a retry after a backoff: the claim both proves the entry is
    /// still ours to work on and counts the delivery in Redis, so the count
    /// survives a crash.
    fn claim<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, Vec<StreamEntry>>;

    /// Remove the entries of `stream` that every consumer group has read
    /// and acknowledged (never one some group has not); returns how many.
    /// The engines consuming a stream call it now and then, so a stream
    /// without a backlog limit does not grow with what is done.
    fn trim_acked<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64>;

    /// Keep entries this consumer holds: those of `ids` still pending for
    /// `consumer` get their idle time reset, WITHOUT counting a delivery
    /// (XCLAIM JUSTID), so no peer claims them while we wait for our own
    /// agent or for room downstream. Returns the ids that are still ours.
    fn touch<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, Vec<String>>;

    /// Atomic move between streams: if entry `t.id` still exists in
    /// `t.from`, in one step XADD `t.fields` to `t.to` (refused with
    /// [`QueueError::Full`] past `t.limit`), XADD every `t.also`, DEL every
    /// `t.del`, ZREM `t.unschedule` and XDEL the entry from `t.from`,
    /// returning the new entry id; if it no longer exists, change nothing
    /// and return `None`. Two concurrent movers of the same entry therefore
    /// move it once (DLQ replay and poison quarantine), and what goes with
    /// the move (a saga's compensation, the task's DLQ marker) happens
    /// exactly when the move does.
    fn transfer(&self, t: Transfer) -> QueueFuture<'_, Option<String>>;

    /// XPENDING summary of `group`.
    fn pending_summary<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, PendingSummary>;

    /// XLEN (0 for a missing stream).
    fn len<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64>;

    /// XRANGE `start..=end`, at most `count` (0: no limit) entries, oldest first.
    fn range<'a>(
        &'a self,
        stream: &'a str,
        start: &'a str,
        end: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>>;

    /// XREVRANGE `end..=start` (note the order), at most `count`, newest first.
    fn rev_range<'a>(
        &'a self,
        stream: &'a str,
        end: &'a str,
        start: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>>;

    /// XDEL. Returns how many entries existed and were deleted.
    fn delete<'a>(&'a self, stream: &'a str, ids: &'a [String]) -> QueueFuture<'a, u64>;

    /// Atomic completion (see the module docs for the invariant), a batch
    /// of one (see [`Queue::complete_batch`]).
    #[allow(clippy::too_many_arguments)]
    fn complete<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        entry_id: &'a str,
        inbox_key: &'a str,
        inbox_ttl: Duration,
        outputs: Vec<(String, Fields)>,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Completion> {
        Box::pin(async move {
            let one = Completing {
                entry_id: entry_id.to_owned(),
                inbox_key: inbox_key.to_owned(),
                outputs,
                ..Completing::default()
            };
            let mut done = self
                .complete_batch(stream, group, vec![one], inbox_ttl, limit)
                .await?;
            done.pop()
                .ok_or_else(|| QueueError::Protocol("empty complete reply".into()))
        })
    }

    /// Group commit: complete several entries of one consumer group in ONE
    /// atomic step. For each entry, in order:
    /// 1. if its inbox key exists (even one set by an earlier entry of the
    ///    batch) → XACK only: [`Completion::AlreadyDone`], or
    ///    [`Completion::NotPending`] if it was acked already;
    /// 2. if `only_if_done` → [`Completion::NotDone`], nothing written;
    /// 3. if an output work stream (every output not in `expire`) would go
    ///    past `limit` → [`Completion::Full`], nothing written;
    /// 4. XACK; if it finds the entry acked already (completed or
    ///    dead-lettered by another engine meanwhile) →
    ///    [`Completion::NotPending`], nothing written — the XACK is the one
    ///    arbiter, so a completion and a dead-lettering of one entry exclude
    ///    each other, and a slow engine whose entry was finished elsewhere
    ///    writes nothing;
    /// 5. XADD every output, PEXPIRE the `expire` keys, SET the inbox key
    ///    with `inbox_ttl` → [`Completion::Published`].
    ///
    /// Either every entry is applied or none is: every output key is
    /// type-checked before the first write. Results are in order. All keys
    /// must be of one workflow (same hash tag, see [`Keys`]).
    fn complete_batch<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        items: Vec<Completing>,
        inbox_ttl: Duration,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Vec<Completion>>;

    /// Atomic dead-letter, in one step: XACK `d.entry_id`; only if that
    /// found it pending, XADD `d.record` to `d.dlq`, XADD every `d.also`,
    /// SET `d.marker` and ZADD `d.schedule`. Returns the DLQ entry id, or
    /// `None` if the entry was acked already (nothing written: it completed
    /// or was dead-lettered by someone else — a resend whose reply was lost
    /// writes no second record). The DLQ has no backlog limit.
    fn dead_letter<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        d: DeadLetter,
    ) -> QueueFuture<'a, Option<String>>;

    /// Time out a join, ONE atomic step: only if `j.task_id` is in `j.due`
    /// with a deadline at most `now_ms`, the join neither completed nor
    /// failed, and it holds exactly `parts_seen` parts (what the caller read
    /// to build `d.record`): mark it failed (`failed:timeout`), remove it
    /// from `j.due`, XADD `d.record` to `d.dlq`, XADD every `d.also` and SET
    /// `d.marker` (`d.entry_id`, `d.schedule` and `d.fail_joins` are not
    /// used). So a join either completes or times out, once.
    fn expire_join(
        &self,
        j: JoinRef,
        now_ms: u64,
        parts_seen: u64,
        d: DeadLetter,
    ) -> QueueFuture<'_, JoinExpiry>;

    /// Idempotent intake: if `idem_key` is bound, return its task id and add
    /// nothing; otherwise, atomically, XADD `fields` to `stream` with a
    /// leading `task_id` field holding a fresh UUID, and bind `idem_key` to
    /// that id for `ttl`. (A batch of one, see [`Queue::submit_batch`].)
    fn submit_idempotent<'a>(
        &'a self,
        idem_key: &'a str,
        ttl: Duration,
        stream: &'a str,
        fields: Fields,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Submitted> {
        Box::pin(async move {
            let one = Submission {
                idem_key: Some(idem_key.to_owned()),
                fingerprint: None,
                task_id: uuid::Uuid::new_v4().to_string(),
                fields,
            };
            let mut done = self.submit_batch(stream, ttl, vec![one], limit).await?;
            done.pop()
                .ok_or_else(|| QueueError::Protocol("empty submit reply".into()))
        })
    }

    /// Batch intake, ONE atomic step for the whole batch. For each
    /// submission in order: if its `idem_key` is bound (before the batch or
    /// by an earlier submission of it), the result is the bound task id and
    /// nothing is added; otherwise XADD a leading `task_id` field and
    /// `fields` to `stream` and, if it has a key, bind the key to `task_id`
    /// (and its fingerprint) for `ttl`.
    ///
    /// Invariant: either every submission is applied or none is. Every key
    /// is type-checked, every bound key's fingerprint compared
    /// ([`QueueError::Conflict`]) and the backlog limit checked for the
    /// submissions that would be new ([`QueueError::Full`]) before the first
    /// write. A client whose batch failed (or whose answer was lost) can
    /// therefore resend it: keyed tasks are not duplicated, and a failed
    /// batch left no half behind. Results are in submission order. All keys
    /// must be of one workflow (same hash tag).
    fn submit_batch<'a>(
        &'a self,
        stream: &'a str,
        ttl: Duration,
        items: Vec<Submission>,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Vec<Submitted>>;

    /// GET a string key.
    fn get<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Option<Bytes>>;

    /// SET a string key, with an optional TTL (`None`: no expiry).
    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Option<Duration>) -> QueueFuture<'a, ()>;

    /// DEL. Returns how many keys existed.
    fn del<'a>(&'a self, keys: &'a [String]) -> QueueFuture<'a, u64>;

    /// INCRBY; returns the new value.
    fn incr<'a>(&'a self, key: &'a str, by: i64) -> QueueFuture<'a, i64>;

    /// HSET several fields of a hash.
    fn hset<'a>(&'a self, key: &'a str, fields: Fields) -> QueueFuture<'a, ()>;

    /// HGETALL, sorted by field name (empty for a missing key).
    fn hgetall<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Fields>;

    /// All keys starting with `prefix` (SCAN MATCH on Redis; glob characters
    /// in `prefix` are escaped), sorted.
    fn scan_prefix<'a>(&'a self, prefix: &'a str) -> QueueFuture<'a, Vec<String>>;

    /// PUBLISH; returns the number of receivers.
    fn publish<'a>(&'a self, channel: &'a str, message: Bytes) -> QueueFuture<'a, u64>;

    /// SUBSCRIBE. Messages published after this returns are delivered.
    fn subscribe<'a>(&'a self, channel: &'a str) -> QueueFuture<'a, Subscription>;

    /// XTRIM MINID: remove the entries of `stream` older than `min_ms`
    /// (wall-clock ms in their ids). For streams no group reads (the DLQ and
    /// poison streams, trimmed by retention). Returns how many went.
    fn trim_older<'a>(&'a self, stream: &'a str, min_ms: u64) -> QueueFuture<'a, u64>;

    /// Members of sorted set `key` with a score at most `max_score`, lowest
    /// first, at most `count`.
    fn due<'a>(
        &'a self,
        key: &'a str,
        max_score: u64,
        count: usize,
    ) -> QueueFuture<'a, Vec<String>>;

    /// ZADD (`member` at `score`, replacing its score).
    fn schedule<'a>(&'a self, key: &'a str, member: &'a str, score: u64) -> QueueFuture<'a, ()>;

    /// ZREM.
    fn unschedule<'a>(&'a self, key: &'a str, member: &'a str) -> QueueFuture<'a, ()>;

    /// Consumers of `group` with their pending counts and idle times.
    fn consumers<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, Vec<ConsumerInfo>>;

    /// XGROUP DELCONSUMER, but only if `consumer` has no pending entry (one
    /// atomic step: its entries are never dropped with it). Returns whether
    /// it was removed.
    fn remove_consumer<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> QueueFuture<'a, bool>;

    /// Versioned hash write, in ONE atomic step: INCR `counter`, HSET
    /// `fields` plus `version` = the new counter value into `hash`, PUBLISH
    /// that value on `channel`; returns it. (The kill switch's state.)
    ///
    /// Invariant: the hash's `version` never goes backwards — it is only
    /// written inside the step, with a counter value no earlier step had —
    /// and a reader that sees version v sees every write up to v and none
    /// after it, so "state v" names one state. Both keys are type-checked
    /// before the first write. `hash` and `counter` must share a hash tag.
    fn hset_versioned<'a>(
        &'a self,
        hash: &'a str,
        counter: &'a str,
        channel: &'a str,
        fields: Fields,
    ) -> QueueFuture<'a, u64>;

    /// HDEL. Returns how many of `fields` existed.
    fn hdel<'a>(&'a self, key: &'a str, fields: &'a [String]) -> QueueFuture<'a, u64>;
}

/// One consumer of a group ([`Queue::consumers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    /// Time since its last read or claim.
    pub idle: Duration,
}

/// An entry needs at least one field (Redis refuses an empty XADD).
pub(crate) fn check_fields(fields: &Fields) -> Result<(), QueueError> {
    if fields.is_empty() {
        return Err(QueueError::Invalid(
            "a stream entry needs at least one field".into(),
        ));
    }
    Ok(())
}

/// A join part both backends can apply: the joined task has fields, one of
/// them the payload; the part is one of the parts; part names are stream
/// names (DNS labels — they are written into JSON unescaped) and the value
/// is not empty.
pub(crate) fn check_join(j: &JoinPart) -> Result<(), QueueError> {
    check_fields(&j.fields)?;
    let label = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !j.fields.iter().any(|(k, _)| *k == j.payload_field) {
        return Err(QueueError::Invalid(format!(
            "the joined task has no field {:?}",
            j.payload_field
        )));
    }
    if !j.parts.contains(&j.part) || !j.parts.iter().all(|p| label(p)) {
        return Err(QueueError::Invalid(format!(
            "join part {:?} must be one of the parts {:?}, all stream names",
            j.part, j.parts
        )));
    }
    if j.value.is_empty() {
        return Err(QueueError::Invalid("an empty join part".into()));
    }
    Ok(())
}

/// Helper: build [`Fields`] from string pairs.
pub fn fields<K: Into<String>, V: Into<Bytes>>(pairs: impl IntoIterator<Item = (K, V)>) -> Fields {
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// A parsed `<ms>-<seq>` stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub const MIN: EntryId = EntryId { ms: 0, seq: 0 };
    pub const MAX: EntryId = EntryId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// Parse `<ms>-<seq>`.
    pub fn parse(s: &str) -> Result<Self, QueueError> {
        let bad = || QueueError::Invalid(format!("bad stream id {s:?}"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }

    /// Parse a range bound: `-`, `+`, `<ms>` (seq 0 as a start, max as an
    /// end), `<ms>-<seq>`, or either form after `(` for an exclusive bound
    /// (Redis 6.2+), which is how callers page through a stream.
    pub fn parse_bound(s: &str, is_start: bool) -> Result<Self, QueueError> {
        if let Some(rest) = s.strip_prefix('(') {
            let id = Self::parse_bound(rest, is_start)?;
            let next = if is_start {
                id.successor()
            } else {
                id.predecessor()
            };
            return next
                .ok_or_else(|| QueueError::Invalid(format!("empty exclusive range at {s:?}")));
        }
        match s {
            "-" => Ok(Self::MIN),
            "+" => Ok(Self::MAX),
            _ if s.contains('-') => Self::parse(s),
            _ => {
                let ms = s
                    .parse()
                    .map_err(|_| QueueError::Invalid(format!("bad range bound {s:?}")))?;
                Ok(Self {
                    ms,
                    seq: if is_start { 0 } else { u64::MAX },
                })
            }
        }
    }
}

impl EntryId {
    fn successor(self) -> Option<Self> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(Self { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| Self { ms, seq: 0 }),
        }
    }

    fn predecessor(self) -> Option<Self> {
        match self.seq.checked_sub(1) {
            Some(seq) => Some(Self { ms: self.ms, seq }),
            None => self.ms.checked_sub(1).map(|ms| Self { ms, seq: u64::MAX }),
        }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}
