//! Fault injection: the faults a ChaosDrill imposes, kept in Redis and applied by every engine
//! of the workflow (the tool proxy, the agent role's delivery and its stream reads), so that
//! `r4 run`, `r4 dev` and a cluster inject them the same way.
//!
//! Storage (owner of these keys; names from [`crate::queue::Keys`]):
//! - one string key per active fault, `r4:{ns/wf}:fault:<drill>:<index>`, holding a JSON
//!   [`FaultRecord`], with a TTL equal to what is left of its window — so a fault ends on time
//!   even if whoever injected it died;
//! - an index, the sorted set `r4:{ns/wf}:faults` (member: the fault key, score: its end in
//!   unix ms), which is how engines find the faults without a SCAN;
//! - the channel `r4:{ns/wf}:faults:changed`, announced after every change.
//!
//! The two writes of [`inject`] need no atomic step: a key without its index entry is never
//! seen (and expires), an index entry without its key is ignored by every reader. The safe side
//! is "no fault": an engine that cannot read the faults applies none.
//!
//! Applying them: [`follow`] gives an engine a [`FaultView`] kept current from Redis (on every
//! announcement and every [`REREAD`]); the tool proxy consults it per call
//! ([`FaultView::tool`], wired in `engine::tools`), the agent role per delivered entry and per
//! read of its stream ([`FaultView::corrupted`], [`FaultView::slowdown`],
//! [`FaultView::throttle`], wired in `engine::consumer`). Both start following by themselves,
//! so `r4 engine`, the `r4 dev` kubelet and `r4 run` apply faults without any wiring of their
//! own. PodKill is not a record: the caller kills pods or engine tasks.
//!
//! What a drill does when (the timeline, guardrails, measurement) is [`super::drill`]'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::drill::FaultType;
use crate::queue::{Keys, Queue, QueueError};

use super::task::now_ms;

/// One active fault as stored in Redis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRecord {
    /// The ChaosDrill that injected it.
    pub drill: String,
    /// Its run (the run's start in unix ms: unique per drill).
    pub run: u64,
    /// Position in `spec.faults`.
    pub index: usize,
    #[serde(rename = "type")]
    pub kind: FaultType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Added latency (ToolLatency, AgentSlowdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Share of calls / deliveries / messages affected, 0..=100.
    pub percent: f64,
    /// Share of calls answered with an error (ToolErrors), 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Status of the injected error (ToolErrors; default 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// `Retry-After` of the injected error, in seconds (ToolErrors; none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Messages per second let through (QueueThrottle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_second: Option<u64>,
}

/// At most this many index entries are read at once (far more faults than a drill can hold:
/// `spec.faults` is bounded by the CRD; the rest would come from leaked drills, swept by
/// [`clear_except`]).
const INDEX_READ: usize = 1024;

/// Make `fault` active for `ttl` (its window's remaining length): SET the fault key with the
/// TTL, add it to the index, announce. Also drops index entries whose window has passed and
/// whose key is gone, so the index does not grow with every drill run.
pub async fn inject(
    q: &dyn Queue,
    keys: &Keys,
    fault: &FaultRecord,
    ttl: Duration,
) -> Result<(), QueueError> {
    let key = keys.fault(&fault.drill, fault.index);
    let body = serde_json::to_vec(fault)
        .map_err(|e| QueueError::Protocol(format!("fault record: {e}")))?;
    // A zero TTL would be "no expiry" on some paths: a fault always ends.
    let ttl = ttl.max(Duration::from_millis(1));
    let now = now_ms();
    let end = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    q.set(&key, body.into(), Some(ttl)).await?;
    q.schedule(&keys.faults(), &key, end).await?;
    for stale in q.due(&keys.faults(), now, INDEX_READ).await? {
        if stale != key && q.get(&stale).await?.is_none() {
            q.unschedule(&keys.faults(), &stale).await?;
        }
    }
    announce(q, keys).await
}

/// End every fault of `drill` now (its keys and index entries), announce. Returns how many
/// fault keys existed.
pub async fn clear(q: &dyn Queue, keys: &Keys, drill: &str) -> Result<u64, QueueError> {
    let prefix = keys.fault_prefix(drill);
    let mut doomed = q.scan_prefix(&prefix).await?;
    for member in q.due(&keys.faults(), u64::MAX, INDEX_READ).await? {
        if member.starts_with(&prefix) && !doomed.contains(&member) {
            doomed.push(member);
        }
    }
    remove(q, keys, &doomed).await
}

/// End every fault whose drill `keep` does not name (the controller's start-up sweep: faults
/// of drills that are no longer running), and drop index entries whose key is gone. Returns how
/// many fault keys were deleted.
pub async fn clear_except(
    q: &dyn Queue,
    keys: &Keys,
    keep: &dyn Fn(&str) -> bool,
) -> Result<u64, QueueError> {
    // `fault_prefix("")` is `…:fault::`; without its last `:` it starts every fault key.
    let all = keys.fault_prefix("");
    let all = all.strip_suffix(':').unwrap_or(&all);
    let mut doomed = Vec::new();
    let mut gone = Vec::new();
    let indexed = q.due(&keys.faults(), u64::MAX, INDEX_READ).await?;
    for key in q.scan_prefix(all).await? {
        if !drill_of(&key, all).is_some_and(keep) {
            doomed.push(key);
        }
    }
    for member in indexed {
        if doomed.contains(&member) {
            continue;
        }
        if !drill_of(&member, all).is_some_and(keep) || q.get(&member).await?.is_none() {
            gone.push(member);
        }
    }
    let n = remove(q, keys, &doomed).await?;
    for member in &gone {
        q.unschedule(&keys.faults(), member).await?;
    }
    if n == 0 && !gone.is_empty() {
        announce(q, keys).await?;
    }
    Ok(n)
}

/// The faults active now (index entries whose key still exists and parses), in index order
/// (earliest end first). A key that does not parse is skipped and logged: one bad record must
/// not hide the others.
pub async fn active(q: &dyn Queue, keys: &Keys) -> Result<Vec<FaultRecord>, QueueError> {
    let mut out = Vec::new();
    for key in q.due(&keys.faults(), u64::MAX, INDEX_READ).await? {
        let Some(body) = q.get(&key).await? else {
            continue;
        };
        match serde_json::from_slice::<FaultRecord>(&body) {
            Ok(f) => out.push(f),
            Err(e) => tracing::warn!(key, error = %e, "unreadable fault record, ignored"),
        }
    }
    Ok(out)
}

/// The drill named in fault key `key` (`<prefix><drill>:<index>`), if it is one.
fn drill_of<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix)?;
    let (drill, index) = rest.rsplit_once(':')?;
    index.parse::<usize>().ok().map(|_| drill)
}

/// DEL `doomed`, drop them from the index, announce. Returns how many keys existed.
async fn remove(q: &dyn Queue, keys: &Keys, doomed: &[String]) -> Result<u64, QueueError> {
    let n = if doomed.is_empty() {
        0
    } else {
        q.del(doomed).await?
    };
    for key in doomed {
        q.unschedule(&keys.faults(), key).await?;
    }
    announce(q, keys).await?;
    Ok(n)
}

async fn announce(q: &dyn Queue, keys: &Keys) -> Result<(), QueueError> {
    q.publish(&keys.faults_channel(), bytes::Bytes::from_static(b"1"))
        .await
        .map(|_| ())
}

/// How often a follower re-reads the faults when nothing is announced (an announcement lost
/// while the subscription was down is seen within this; so is a fault's TTL running out).
pub const REREAD: Duration = Duration::from_millis(500);

/// How long an engine waits for its first read of the faults before it starts work without
/// them (Redis slow or away: the safe side, no fault).
pub const FIRST_READ: Duration = Duration::from_secs(2);

/// What a tool call meets under the faults active now ([`FaultView::tool`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolFault {
    /// Added before the call is forwarded (ToolLatency; several add up).
    pub latency: Duration,
    /// How the call fails instead of being forwarded, if it does.
    pub failure: Option<ToolFailure>,
}

impl ToolFault {
    /// Nothing to apply.
    pub fn is_none(&self) -> bool {
        self.latency.is_zero() && self.failure.is_none()
    }
}

/// An injected tool failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolFailure {
    /// ToolOutage: fail as a connect error, nothing sent.
    Outage { drill: String },
    /// ToolErrors: answer `status` (with `Retry-After: retry_after_seconds` when set) without
    /// forwarding.
    Error {
        drill: String,
        status: u16,
        retry_after_seconds: Option<u64>,
    },
}

/// The active faults as one engine sees them: a cheap, synchronous read for every tool call,
/// delivery and stream read. Made by [`follow`] (kept current from Redis) or [`FaultView::none`].
/// Clones share the follower and the counters; the follower ends when the last clone is dropped.
///
/// Before the first read, and while the faults cannot be read, it holds no fault (the safe
/// side). Which calls or tasks a fault with `percent < 100` hits is decided by a stable hash of
/// (idempotency key or task id, drill, index), so a seeded `r4 run` is repeatable and a retry of
/// the same task meets the same decision; ToolErrors' `errorRate` is drawn per call (hash of the
/// key and a per-view call sequence), so a retry can get through.
#[derive(Clone, Debug)]
pub struct FaultView {
    rx: watch::Receiver<Arc<Vec<FaultRecord>>>,
    /// Whether the follower has read the faults once (or failed to).
    read: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    applied: Arc<AtomicU64>,
}

impl Default for FaultView {
    fn default() -> Self {
        Self::none()
    }
}

/// Follow the faults of the workflow of `keys`: read them now and after every announcement on
/// [`Keys::faults_channel`], every [`REREAD`] and every resubscription (`engine::follow`), in a
/// task that ends when the last clone of the returned view is dropped.
pub fn follow(q: Arc<dyn Queue>, keys: Keys) -> FaultView {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    let view = FaultView::with_receiver(rx, false);
    let read = view.read.clone();
    tokio::spawn(async move {
        let channel = keys.faults_channel();
        let (q, keys, tx, read) = (q.as_ref(), &keys, &tx, &read);
        super::follow::follow(q, &channel, REREAD, tx, |_| async move {
            let now = match active(q, keys).await {
                Ok(v) => v,
                Err(e) => {
                    if !tx.borrow().is_empty() {
                        tracing::warn!(error = %e, "cannot read the injected faults; applying none");
                    }
                    Vec::new()
                }
            };
            // The first read always notifies, so [`FaultView::first_read`] wakes.
            let first = !read.swap(true, Ordering::Release);
            tx.send_if_modified(|cur| {
                if **cur == now {
                    return first;
                }
                tracing::info!(faults = now.len(), "injected faults changed");
                *cur = Arc::new(now);
                true
            });
        })
        .await;
    });
    view
}

impl FaultView {
    /// A view without faults (and without a follower): for engines that follow none.
    pub fn none() -> Self {
        Self::fixed(Vec::new())
    }

    /// A view of exactly these faults (tests; engines use [`follow`]).
    pub fn fixed(faults: Vec<FaultRecord>) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(faults));
        Self::with_receiver(rx, true)
    }

    fn with_receiver(rx: watch::Receiver<Arc<Vec<FaultRecord>>>, read: bool) -> Self {
        Self {
            rx,
            read: Arc::new(AtomicBool::new(read)),
            calls: Arc::new(AtomicU64::new(0)),
            applied: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Wait (at most `within`) until the faults have been read once, so that an engine started
    /// during a drill applies them from its first read of work; `false` if they were not.
    pub async fn first_read(&self, within: Duration) -> bool {
        let mut rx = self.rx.clone();
        let read = self.read.clone();
        tokio::time::timeout(within, async move {
            while !read.load(Ordering::Acquire) {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }

    /// The faults active now.
    pub fn faults(&self) -> Arc<Vec<FaultRecord>> {
        self.rx.borrow().clone()
    }

    /// Wait until the view changes (tests, and callers that sleep while throttled). `false`
    /// when the follower has ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// How many times a fault was applied through this view and its clones.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.applied.fetch_add(1, Ordering::Relaxed);
    }

    /// What a call to `tool` meets now; `key` is its `Idempotency-Key` (empty if none). The
    /// first outage or error that hits wins; latencies add up.
    pub fn tool(&self, tool: &str, key: &str) -> ToolFault {
        let faults = self.rx.borrow().clone();
        let mut out = ToolFault::default();
        if faults.is_empty() {
            return out;
        }
        let seq = self.calls.fetch_add(1, Ordering::Relaxed);
        // Without a key, each call is its own draw.
        let seq_key;
        let key = if key.is_empty() {
            seq_key = format!("#{seq}");
            seq_key.as_str()
        } else {
            key
        };
        for f in faults.iter() {
            if f.tool.as_deref() != Some(tool) || !hits(f, key) {
                continue;
            }
            match f.kind {
                FaultType::ToolLatency => {
                    out.latency += Duration::from_millis(f.latency_ms.unwrap_or(0));
                }
                FaultType::ToolOutage if out.failure.is_none() => {
                    out.failure = Some(ToolFailure::Outage {
                        drill: f.drill.clone(),
                    });
                }
                FaultType::ToolErrors if out.failure.is_none() => {
                    let rate = f.error_rate.unwrap_or(1.0).clamp(0.0, 1.0);
                    let draw = unit(&[key.as_bytes(), f.drill.as_bytes()], f.index, seq);
                    if draw < rate {
                        out.failure = Some(ToolFailure::Error {
                            drill: f.drill.clone(),
                            status: f.status_code.unwrap_or(DEFAULT_ERROR_STATUS),
                            retry_after_seconds: f.retry_after_seconds,
                        });
                    }
                }
                _ => {}
            }
        }
        if !out.is_none() {
            self.count();
        }
        out
    }

    /// Whether a delivered entry of `stream` (the workflow's stream name, as agents'
    /// `consumes`) carrying `task_id` is to be treated as corrupted: the DLQ note naming the
    /// drill, if so.
    pub fn corrupted(&self, stream: &str, task_id: &str) -> Option<String> {
        let faults = self.rx.borrow().clone();
        let f = faults.iter().find(|f| {
            f.kind == FaultType::MessageCorruption
                && f.stream.as_deref() == Some(stream)
                && hits(f, task_id)
        })?;
        self.count();
        Some(format!(
            "corrupted by ChaosDrill {} (fault {}, MessageCorruption of stream {stream}); the stored entry is intact and a replay completes it",
            f.drill, f.index
        ))
    }

    /// The delay added before delivering `task_id` to `agent` (AgentSlowdown; several add up).
    pub fn slowdown(&self, agent: &str, task_id: &str) -> Option<Duration> {
        let faults = self.rx.borrow().clone();
        let ms: u64 = faults
            .iter()
            .filter(|f| {
                f.kind == FaultType::AgentSlowdown
                    && f.agent.as_deref() == Some(agent)
                    && hits(f, task_id)
            })
            .map(|f| f.latency_ms.unwrap_or(0))
            .sum();
        (ms > 0).then(|| {
            self.count();
            Duration::from_millis(ms)
        })
    }

    /// The messages per second every consumer of `stream` together may read (QueueThrottle;
    /// the lowest when several apply).
    pub fn throttle(&self, stream: &str) -> Option<u64> {
        let faults = self.rx.borrow().clone();
        faults
            .iter()
            .filter(|f| f.kind == FaultType::QueueThrottle && f.stream.as_deref() == Some(stream))
            .filter_map(|f| f.max_per_second)
            .min()
    }
}

/// Status of an injected ToolErrors answer when the drill names none.
pub const DEFAULT_ERROR_STATUS: u16 = 503;

/// Whether fault `f` hits the call or task named `key` (`percent` of them, chosen by hash).
fn hits(f: &FaultRecord, key: &str) -> bool {
    if f.percent >= 100.0 {
        return true;
    }
    unit(&[key.as_bytes(), f.drill.as_bytes()], f.index, 0) * 100.0 < f.percent
}

/// A draw in `[0, 1)` from a stable hash (FNV-1a, the same in every process and release).
fn unit(parts: &[&[u8]], index: usize, salt: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for p in parts {
        eat(p);
        eat(&[0xff]);
    }
    eat(&(index as u64).to_le_bytes());
    eat(&salt.to_le_bytes());
    // A final mix: FNV's low bits are weak for short inputs.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::queue::memory::MemoryQueue;
    use crate::queue::redis::RedisQueue;

    pub(crate) fn record(drill: &str, index: usize, kind: FaultType) -> FaultRecord {
        FaultRecord {
            drill: drill.into(),
            run: 1,
            index,
            kind,
            tool: Some("bank".into()),
            agent: None,
            stream: None,
            latency_ms: None,
            percent: 100.0,
            error_rate: None,
            status_code: None,
            retry_after_seconds: None,
            max_per_second: None,
        }
    }

    /// Inject, list, clear one drill, sweep the others — on any backend.
    async fn inject_clear_sweep(q: Arc<dyn Queue>) {
        let keys = Keys::new("ns", "wf");
        let other = Keys::new("ns", "other");
        let a0 = record("a", 0, FaultType::ToolOutage);
        let a1 = record("a", 1, FaultType::ToolLatency);
        let b0 = record("b", 0, FaultType::ToolErrors);
        let ab0 = record("ab", 0, FaultType::ToolErrors);
        let long = Duration::from_secs(600);
        let mut sub = q.subscribe(&keys.faults_channel()).await.unwrap();
        for f in [&a0, &a1, &b0, &ab0] {
            inject(q.as_ref(), &keys, f, long).await.unwrap();
        }
        inject(q.as_ref(), &other, &a0, long).await.unwrap();
        use futures::StreamExt;
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("inject announces")
            .expect("subscription open");
        let mut got = active(q.as_ref(), &keys).await.unwrap();
        got.sort_by_key(|f| (f.drill.clone(), f.index));
        assert_eq!(got, vec![a0.clone(), a1.clone(), ab0.clone(), b0.clone()]);

        // Clearing "a" leaves "ab" (a drill whose name starts with "a") and the other workflow.
        assert_eq!(clear(q.as_ref(), &keys, "a").await.unwrap(), 2);
        let mut got = active(q.as_ref(), &keys).await.unwrap();
        got.sort_by_key(|f| f.drill.clone());
        assert_eq!(got, vec![ab0.clone(), b0.clone()]);
        assert_eq!(clear(q.as_ref(), &keys, "a").await.unwrap(), 0);
        assert!(q.due(&keys.faults(), u64::MAX, 100).await.unwrap().len() == 2);

        // A key without its index entry (an inject that died between its writes) and an index
        // entry without its key are both swept.
        q.set(&keys.fault("c", 0), b"{}".to_vec().into(), Some(long))
            .await
            .unwrap();
        q.schedule(&keys.faults(), &keys.fault("d", 0), u64::MAX)
            .await
            .unwrap();
        let n = clear_except(q.as_ref(), &keys, &|d| d == "b")
            .await
            .unwrap();
        assert_eq!(n, 2, "ab:0 and c:0 deleted");
        assert_eq!(active(q.as_ref(), &keys).await.unwrap(), vec![b0.clone()]);
        assert_eq!(
            q.due(&keys.faults(), u64::MAX, 100).await.unwrap(),
            vec![keys.fault("b", 0)]
        );
        assert_eq!(active(q.as_ref(), &other).await.unwrap(), vec![a0.clone()]);
    }

    #[tokio::test]
    async fn inject_clear_sweep_memory() {
        inject_clear_sweep(Arc::new(MemoryQueue::new())).await;
    }

    #[tokio::test]
    async fn inject_clear_sweep_redis() {
        let server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (make deps)");
        inject_clear_sweep(Arc::new(RedisQueue::connect(&server.url()).await.unwrap())).await;
    }

    /// A fault ends when its TTL passes, with nobody clearing it; the next inject drops its
    /// index entry.
    #[tokio::test(start_paused = true)]
    async fn fault_ends_on_time_memory() {
        let q = MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let f = record("a", 0, FaultType::ToolOutage);
        inject(&q, &keys, &f, Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(9_990)).await;
        assert_eq!(active(&q, &keys).await.unwrap(), vec![f.clone()]);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(active(&q, &keys).await.unwrap().is_empty());
        assert!(q.get(&keys.fault("a", 0)).await.unwrap().is_none());
        let g = record("b", 0, FaultType::ToolOutage);
        inject(&q, &keys, &g, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            q.due(&keys.faults(), u64::MAX, 100).await.unwrap(),
            vec![keys.fault("b", 0)],
            "the expired entry left the index"
        );
    }

    #[tokio::test]
    async fn fault_ends_on_time_redis() {
        let server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (make deps)");
        let q = RedisQueue::connect(&server.url()).await.unwrap();
        let keys = Keys::new("ns", "wf");
        let f = record("a", 0, FaultType::ToolOutage);
        let started = tokio::time::Instant::now();
        inject(&q, &keys, &f, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(active(&q, &keys).await.unwrap(), vec![f.clone()]);
        let deadline = started + Duration::from_secs(5);
        loop {
            let gone = active(&q, &keys).await.unwrap().is_empty()
                && q.get(&keys.fault("a", 0)).await.unwrap().is_none();
            if gone {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fault outlived its TTL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "ended early"
        );
    }

    #[test]
    fn record_round_trips_in_camel_case() {
        let mut f = record("a", 2, FaultType::ToolErrors);
        f.status_code = Some(429);
        f.retry_after_seconds = Some(3);
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["type"], "ToolErrors");
        assert_eq!(json["statusCode"], 429);
        assert_eq!(json["retryAfterSeconds"], 3);
        assert_eq!(serde_json::from_value::<FaultRecord>(json).unwrap(), f);
    }

    fn view_of(faults: Vec<FaultRecord>) -> FaultView {
        FaultView::fixed(faults)
    }

    #[test]
    fn tool_faults_apply_to_their_tool_only_and_add_up() {
        let mut lat = record("d", 0, FaultType::ToolLatency);
        lat.latency_ms = Some(100);
        let mut lat2 = record("d", 1, FaultType::ToolLatency);
        lat2.latency_ms = Some(50);
        let out = record("d", 2, FaultType::ToolOutage);
        let mut err = record("d", 3, FaultType::ToolErrors);
        err.tool = Some("ledger".into());
        err.retry_after_seconds = Some(2);
        let v = view_of(vec![lat, lat2, out, err]);
        let bank = v.tool("bank", "k");
        assert_eq!(bank.latency, Duration::from_millis(150));
        assert_eq!(
            bank.failure,
            Some(ToolFailure::Outage { drill: "d".into() })
        );
        assert_eq!(
            v.tool("ledger", "k").failure,
            Some(ToolFailure::Error {
                drill: "d".into(),
                status: DEFAULT_ERROR_STATUS,
                retry_after_seconds: Some(2)
            })
        );
        assert!(v.tool("other", "k").is_none());
        assert_eq!(v.applied(), 2, "the call to `other` met nothing");
        assert!(FaultView::none().tool("bank", "k").is_none());
    }

    #[test]
    fn percent_is_a_stable_choice_per_key() {
        let mut f = record("d", 0, FaultType::ToolOutage);
        f.percent = 30.0;
        let a = view_of(vec![f.clone()]);
        let b = view_of(vec![f.clone()]);
        let keys: Vec<String> = (0..1000).map(|i| format!("task-{i}:agent")).collect();
        let hit = |v: &FaultView| -> Vec<bool> {
            keys.iter()
                .map(|k| v.tool("bank", k).failure.is_some())
                .collect()
        };
        let (ha, hb) = (hit(&a), hit(&b));
        assert_eq!(
            ha, hb,
            "the same keys are hit in every view (every engine, every run)"
        );
        assert_eq!(
            ha,
            hit(&a),
            "and on every call (a retry meets the same decision)"
        );
        let n = ha.iter().filter(|h| **h).count();
        assert!((250..=350).contains(&n), "{n} of 1000 hit at 30%");
        // Another drill (or fault index) chooses other keys.
        let mut g = f.clone();
        g.drill = "e".into();
        let hg = hit(&view_of(vec![g]));
        assert_ne!(ha, hg);
        f.percent = 0.0;
        assert_eq!(hit(&view_of(vec![f])).iter().filter(|h| **h).count(), 0);
    }

    #[test]
    fn error_rate_is_drawn_per_call() {
        let mut f = record("d", 0, FaultType::ToolErrors);
        f.error_rate = Some(0.5);
        f.status_code = Some(429);
        let v = view_of(vec![f]);
        let n = (0..1000)
            .filter(|_| v.tool("bank", "same-key").failure.is_some())
            .count();
        assert!((400..=600).contains(&n), "{n} of 1000 calls failed at 0.5");
    }

    #[test]
    fn agent_faults_match_their_stream_or_agent() {
        let mut c = record("d", 0, FaultType::MessageCorruption);
        c.stream = Some("in".into());
        let mut s = record("d", 1, FaultType::AgentSlowdown);
        s.agent = Some("a".into());
        s.latency_ms = Some(250);
        let mut t = record("d", 2, FaultType::QueueThrottle);
        t.stream = Some("in".into());
        t.max_per_second = Some(30);
        let mut t2 = t.clone();
        t2.index = 3;
        t2.max_per_second = Some(10);
        let v = view_of(vec![c, s, t, t2]);
        let note = v.corrupted("in", "t1").expect("corrupted");
        assert!(
            note.contains("ChaosDrill d") && note.contains("replay"),
            "{note}"
        );
        assert_eq!(v.corrupted("out", "t1"), None);
        assert_eq!(v.slowdown("a", "t1"), Some(Duration::from_millis(250)));
        assert_eq!(v.slowdown("b", "t1"), None);
        assert_eq!(v.throttle("in"), Some(10), "the strictest throttle wins");
        assert_eq!(v.throttle("out"), None);
    }

    /// The follower: nothing before its first read, the faults after it, a change announced,
    /// and none once Redis cannot be read (the safe side); it ends with the last view.
    #[tokio::test]
    async fn follower_reads_announcements_and_falls_back_to_none() {
        let mut server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (make deps)");
        let q: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&server.url()).await.unwrap());
        let keys = Keys::new("ns", "follow");
        let f = record("d", 0, FaultType::ToolOutage);
        inject(q.as_ref(), &keys, &f, Duration::from_secs(60))
            .await
            .unwrap();
        let mut v = follow(q.clone(), keys.clone());
        assert!(v.faults().is_empty(), "no fault before the first read");
        assert!(v.first_read(Duration::from_secs(5)).await);
        assert_eq!(*v.faults(), vec![f.clone()]);
        let g = record("d", 1, FaultType::ToolLatency);
        inject(q.as_ref(), &keys, &g, Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while v.faults().len() != 2 {
                assert!(v.changed().await);
            }
        })
        .await
        .expect("the announcement is followed");
        server.kill();
        tokio::time::timeout(Duration::from_secs(20), async {
            while !v.faults().is_empty() {
                assert!(v.changed().await);
            }
        })
        .await
        .expect("unreadable faults are no faults");
    }

    /// The follower re-reads on its own: a fault whose TTL passed is gone within a re-read
    /// period even though nothing announced it.
    #[tokio::test(start_paused = true)]
    async fn follower_sees_a_fault_expire() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let f = record("d", 0, FaultType::ToolOutage);
        inject(q.as_ref(), &keys, &f, Duration::from_secs(3))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut v = follow(q.clone(), keys.clone());
        assert!(v.first_read(Duration::from_secs(1)).await);
        assert!(v.tool("bank", "k").failure.is_some());
        while !v.faults().is_empty() {
            assert!(v.changed().await);
        }
        let ended = started.elapsed();
        assert!(
            ended >= Duration::from_secs(3) && ended <= Duration::from_secs(3) + REREAD,
            "{ended:?}"
        );
    }
}
