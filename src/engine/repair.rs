//! The repair role: replays dead-lettered tasks once the dependency that
//! failed them is healthy again, and quarantines the ones that keep failing.
//!
//! Owns the replay decision. A DLQ record is replayed automatically when
//! - it is `replayable` (retryable failures exhausted, or degraded `Fail`;
//!   permanent failures and malformed entries wait for an operator),
//! - `deadLetter.replay.automatic` is on,
//! - its backoff has passed: replay number `n` (0-based) waits
//!   `replay.backoff * 2^n` after the record was written,
//! - its dependency is healthy: the record names no tool, or that tool is
//!   neither killed nor has an open published breaker.
//!
//! A record that already used `maxReplays` replays is moved to the poison
//! stream with its full history instead, and its saga compensations start.
//! Replay and quarantine are [`super::dlq::replay`] / [`super::dlq::quarantine`]:
//! one atomic move each, so concurrent repairers never double-replay.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::queue::Queue;

use super::breakers::BreakerStates;
use super::config::WorkflowConfig;
use super::dlq::{self, DlqRecord};
use super::stats::Stats;
use super::{EngineError, killswitch, saga, task};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub replayed: u64,
    pub quarantined: u64,
    /// Replayable records still waiting (backoff or unhealthy dependency).
    pub waiting: u64,
}

/// The repair role.
pub struct RepairRole {
    cfg: Arc<WorkflowConfig>,
    queue: Arc<dyn Queue>,
    stats: Arc<Stats>,
    interval: Duration,
}

impl RepairRole {
    pub fn new(cfg: Arc<WorkflowConfig>, queue: Arc<dyn Queue>, engine_id: &str) -> Self {
        let interval = (cfg.policy.replay.backoff / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        Self {
            cfg,
            queue,
            stats: Arc::new(Stats::new(engine_id, "repair", None)),
            interval,
        }
    }

    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Pass after pass until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let stats_task = tokio::spawn(super::consumer::publish_stats(
            self.queue.clone(),
            self.cfg.keys.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.pass().await {
                Ok(r) if r.replayed + r.quarantined > 0 => tracing::info!(?r, "repair pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "repair pass failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => {}
            }
        }
        let _ = stats_task.await;
        Ok(())
    }

    /// One look at the whole DLQ.
    pub async fn pass(&self) -> Result<PassReport, EngineError> {
        let mut report = PassReport::default();
        let replay = self.cfg.policy.replay;
        if !replay.automatic {
            return Ok(report);
        }
        let q = self.queue.as_ref();
        let keys = &self.cfg.keys;
        let switches = killswitch::read(q, keys).await?;
        let mut down: BTreeSet<String> = switches.tools;
        down.extend(self.cfg.spec_killed_tools());
        down.extend(BreakerStates::new(q, keys).open_tools().await?);
        let now = task::now_ms();
        let mut start = "-".to_owned();
        loop {
            let page = q.range(&keys.dlq(), &start, "+", 500).await?;
            let Some(last) = page.last() else { break };
            start = format!("({}", last.id);
            let n = page.len();
            for e in &page {
                let rec = DlqRecord::decode(e);
                if !rec.replayable {
                    continue;
                }
                if rec.replays >= replay.max_replays {
                    if dlq::quarantine(q, keys, &rec).await?.is_some() {
                        self.stats.quarantined();
                        tracing::warn!(task = %rec.task_id, replays = rec.replays, "quarantined as poison");
                        if !rec.task_id.is_empty() {
                            let tp = rec
                                .original
                                .iter()
                                .find(|(k, _)| k == task::TRACEPARENT)
                                .and_then(|(_, v)| std::str::from_utf8(v).ok());
                            saga::start(q, &self.cfg, &rec.task_id, "poison", tp).await?;
                        }
                        report.quarantined += 1;
                    }
                    continue;
                }
                let wait = replay.backoff * 2u32.saturating_pow(rec.replays.min(20));
                let due = rec
                    .dead_at_ms
                    .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
                let healthy = rec.tool.as_ref().is_none_or(|t| !down.contains(t));
                if now < due || !healthy {
                    report.waiting += 1;
                    continue;
                }
                if dlq::replay(q, keys, &rec, self.cfg.max_len)
                    .await?
                    .is_some()
                {
                    self.stats.replayed();
                    report.replayed += 1;
                }
            }
            if n < 500 {
                break;
            }
        }
        Ok(report)
    }
}
