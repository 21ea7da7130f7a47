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
//! What a drill does when (the timeline, guardrails, measurement) is [`super::drill`]'s.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}
