//! Published circuit-breaker states: the small read/write API between the
//! resilience layer (which owns breakers and writes their state here) and
//! the engine roles that react to them (degraded mode, repair).
//!
//! One hash per workflow, `r4:{ns/wf}:breakers`, one field per tool, value
//! JSON [`BreakerRecord`]. Writers refresh a non-closed record at least every
//! [`REFRESH`]; readers treat records older than [`STALE`] as unknown (=
//! not open), so a dead engine cannot keep a tool "open" forever.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::queue::{Keys, Queue, QueueError};

pub const REFRESH: Duration = Duration::from_secs(10);
pub const STALE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub state: BreakerState,
    pub since_ms: u64,
    pub updated_ms: u64,
    #[serde(default)]
    pub engine: String,
    #[serde(default)]
    pub failure_rate: f64,
}

/// Read/write access to the published breaker states of one workflow.
#[derive(Clone)]
pub struct BreakerStates<'a> {
    q: &'a dyn Queue,
    keys: &'a Keys,
}

impl<'a> BreakerStates<'a> {
    pub fn new(q: &'a dyn Queue, keys: &'a Keys) -> Self {
        Self { q, keys }
    }

    /// Write (or refresh) the state of `tool`.
    pub async fn publish(&self, tool: &str, record: &BreakerRecord) -> Result<(), QueueError> {
        self.q
            .hset(
                &self.keys.breakers(),
                vec![(
                    tool.to_owned(),
                    Bytes::from(super::task::json_bytes(record)),
                )],
            )
            .await
    }

    /// Every fresh record, by tool.
    pub async fn read_all(&self) -> Result<BTreeMap<String, BreakerRecord>, QueueError> {
        let now = super::task::now_ms();
        let stale = u64::try_from(STALE.as_millis()).unwrap_or(u64::MAX);
        Ok(self
            .q
            .hgetall(&self.keys.breakers())
            .await?
            .into_iter()
            .filter_map(|(tool, v)| {
                let r: BreakerRecord = serde_json::from_slice(&v).ok()?;
                (now.saturating_sub(r.updated_ms) <= stale).then_some((tool, r))
            })
            .collect())
    }

    /// Tools whose breaker is open (half-open counts as healthy enough to
    /// try: the breaker itself limits the probes).
    pub async fn open_tools(&self) -> Result<Vec<String>, QueueError> {
        Ok(self
            .read_all()
            .await?
            .into_iter()
            .filter(|(_, r)| r.state == BreakerState::Open)
            .map(|(t, _)| t)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_records_are_ignored() {
        let q = crate::queue::memory::MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let b = BreakerStates::new(&q, &keys);
        let now = super::super::task::now_ms();
        let rec = |state, updated_ms| BreakerRecord {
            state,
            since_ms: 0,
            updated_ms,
            engine: "e".into(),
            failure_rate: 0.9,
        };
        b.publish("bank", &rec(BreakerState::Open, now))
            .await
            .unwrap();
        b.publish("ledger", &rec(BreakerState::Open, now - 60_000))
            .await
            .unwrap();
        b.publish("crm", &rec(BreakerState::Closed, now))
            .await
            .unwrap();
        assert_eq!(b.open_tools().await.unwrap(), vec!["bank".to_owned()]);
    }
}
