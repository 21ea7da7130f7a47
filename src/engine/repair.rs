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
//! The consumer schedules every replayable record, in the same atomic step
//! that writes it, in the sorted set `Keys::dlq_due` at its due time; a
//! pass reads only what is due (at most [`PASS`] records), never the whole
//! DLQ. A due record whose dependency is still down is rescheduled one
//! interval later. A record that already used `maxReplays` replays is moved
//! to the poison stream with its full history instead, and its saga
//! compensations start in the same step. Replay and quarantine are
//! [`super::dlq::replay`] / [`super::dlq::quarantine`]: one atomic move
//! each, so concurrent repairers never double-replay. Each pass also trims
//! the DLQ and the poison stream by `deadLetter.retention`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::queue::{Queue, QueueError};

use super::breakers::BreakerStates;
use super::config::{Policy, WorkflowConfig};
use super::dlq::{self, Store};
use super::stats::Stats;
use super::{EngineError, killswitch, saga, task};

/// Most due records one pass looks at.
pub const PASS: usize = 500;

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
    /// The workflow's policy as published sets change it (while [`RepairRole::run`] runs;
    /// `None`: the file's).
    policy: Option<watch::Receiver<(u64, Arc<Policy>)>>,
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
            policy: None,
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
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        // Published CircuitPolicies: each pass takes the replay and retention in force.
        let first = super::policies::initial(self.queue.as_ref(), &self.cfg).await;
        self.policy = Some(super::policies::follow(
            self.queue.clone(),
            self.cfg.clone(),
            self.stats.clone(),
            first,
        ));
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

    /// The policy in force: the last published set's, else the file's.
    fn policy(&self) -> Arc<Policy> {
        match &self.policy {
            Some(rx) => rx.borrow().1.clone(),
            None => Arc::new(self.cfg.policy.clone()),
        }
    }

    /// One look at the records that are due.
    pub async fn pass(&self) -> Result<PassReport, EngineError> {
        let mut report = PassReport::default();
        let q = self.queue.as_ref();
        let keys = &self.cfg.keys;
        let policy = self.policy();
        if let Err(e) = dlq::trim_retention(q, keys, policy.retention).await {
            tracing::warn!(error = %e, "cannot trim the DLQ by retention");
        }
        let replay = policy.replay;
        if !replay.automatic {
            return Ok(report);
        }
        let switches = killswitch::read(q, keys).await?;
        let mut down: BTreeSet<String> = switches.tools;
        down.extend(self.cfg.spec_killed_tools());
        down.extend(BreakerStates::new(q, keys).open_tools().await?);
        let now = task::now_ms();
        let later = now.saturating_add(u64::try_from(self.interval.as_millis()).unwrap_or(0));
        for id in q.due(&keys.dlq_due(), now, PASS).await? {
            let Some(rec) = dlq::show(q, keys, Store::Dlq, &id).await? else {
                // Replayed by hand, purged or trimmed by retention.
                q.unschedule(&keys.dlq_due(), &id).await?;
                continue;
            };
            if !rec.replayable {
                q.unschedule(&keys.dlq_due(), &id).await?;
                continue;
            }
            if rec.replays >= replay.max_replays {
                let tp = rec
                    .original
                    .iter()
                    .find(|(k, _)| k == task::TRACEPARENT)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok());
                let comp = if rec.task_id.is_empty() {
                    None
                } else {
                    saga::first_compensation(q, &self.cfg, &rec.task_id, "poison", tp).await?
                };
                if dlq::quarantine(q, keys, &rec, comp).await?.is_some() {
                    self.stats.quarantined();
                    self.stats.left_dlq(
                        "quarantined",
                        Duration::from_millis(task::now_ms().saturating_sub(rec.dead_at_ms)),
                    );
                    tracing::warn!(task = %rec.task_id, step = %rec.step, reason = "poison", replays = rec.replays, "quarantined as poison");
                    report.quarantined += 1;
                }
                continue;
            }
            let healthy = rec.tool.as_ref().is_none_or(|t| !down.contains(t));
            if !healthy {
                q.schedule(&keys.dlq_due(), &id, later).await?;
                report.waiting += 1;
                continue;
            }
            match dlq::replay(q, keys, Store::Dlq, &rec, self.cfg.max_len).await {
                Ok(Some(_)) => {
                    self.stats.replayed();
                    self.stats.left_dlq(
                        "replayed",
                        Duration::from_millis(task::now_ms().saturating_sub(rec.dead_at_ms)),
                    );
                    tracing::info!(task = %rec.task_id, step = %rec.step, reason = %rec.reason, replays = rec.replays + 1, "replayed from the DLQ");
                    report.replayed += 1;
                }
                Ok(None) => {}
                // The work stream is at its backlog limit: try again later.
                Err(QueueError::Full { .. }) => {
                    q.schedule(&keys.dlq_due(), &id, later).await?;
                    report.waiting += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }
}
