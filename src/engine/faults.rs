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

/// Make `fault` active for `ttl` (its window's remaining length): SET the fault key with the
/// TTL, add it to the index, announce.
pub async fn inject(
    q: &dyn Queue,
    keys: &Keys,
    fault: &FaultRecord,
    ttl: Duration,
) -> Result<(), QueueError> {
    let _ = (q, keys, fault, ttl);
    todo!("helper A")
}

/// End every fault of `drill` now (its keys and index entries), announce. Returns how many
/// fault keys existed.
pub async fn clear(q: &dyn Queue, keys: &Keys, drill: &str) -> Result<u64, QueueError> {
    let _ = (q, keys, drill);
    todo!("helper A")
}

/// End every fault whose drill `keep` does not name (the controller's start-up sweep: faults
/// of drills that are no longer running), and drop index entries whose key is gone. Returns how
/// many fault keys were deleted.
pub async fn clear_except(
    q: &dyn Queue,
    keys: &Keys,
    keep: &dyn Fn(&str) -> bool,
) -> Result<u64, QueueError> {
    let _ = (q, keys, keep);
    todo!("helper A")
}

/// The faults active now (index entries whose key still exists and parses).
pub async fn active(q: &dyn Queue, keys: &Keys) -> Result<Vec<FaultRecord>, QueueError> {
    let _ = (q, keys);
    todo!("helper A")
}
