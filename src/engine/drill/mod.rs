//! One run of a ChaosDrill, shared by the controller (`r4 controller`, `r4 dev`) and `r4 run
//! --drill`: the plan (when each fault starts and ends, [`plan`]), the run itself (a baseline
//! window, faults injected through [`super::faults`] at their times, pod kills through the
//! caller's [`DrillTarget`], guardrails checked every second from the engines' published stats,
//! the wait for recovery, [`run`]), and the pure measurement (failover, recovery, verdict,
//! score, [`measure`]).
//!
//! Left to the callers: when a run starts (the cron schedule, `suspend`, one run at a time) and
//! where its outcome is written (the ChaosDrill's status, the run's report); how pods are killed
//! and how lost tasks and duplicate effects are counted (the [`DrillTarget`]). How an engine
//! applies a fault is [`super::faults`]'s and the engine's.
//!
//! Times are tokio's ([`tokio::time::Instant`]), so `r4 run`'s paused clock drives a run;
//! the faults' TTLs are the stores' (Redis' clock, or the memory queue's tokio clock).

mod plan;
mod run;

pub mod measure;

pub use plan::plan;
pub use run::run;

use std::time::Duration;

use futures::future::BoxFuture;

use super::faults::FaultRecord;
use crate::api::drill::{AbortIf, DrillRun, Expectations};

/// Baseline observed before the fault timeline when `spec.baseline` is not set.
pub const DEFAULT_BASELINE: Duration = Duration::from_secs(30);
/// How often the runner reads the engines' stats (guardrails, measurement).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How long recovery is awaited after the last fault ended when `expect.maxRecoverySeconds` is
/// not set.
pub const DEFAULT_RECOVERY_LIMIT: Duration = Duration::from_secs(300);

/// A drill resolved to times, from the start of the run (the baseline's start).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub drill: String,
    /// The run's id: its start in unix ms.
    pub run: u64,
    /// Fault-free observation before the timeline: `[0, baseline)`.
    pub baseline: Duration,
    /// The fault timeline: `[baseline, baseline + duration)`.
    pub duration: Duration,
    /// How long after the last fault ended the run waits for recovery.
    pub recovery_limit: Duration,
    pub faults: Vec<PlannedFault>,
    pub guardrails: Option<AbortIf>,
    pub expect: Option<Expectations>,
}

impl Plan {
    /// When the last fault ends, from the start of the run (the baseline's end without one).
    pub fn last_end(&self) -> Duration {
        self.faults
            .iter()
            .map(|f| f.end)
            .max()
            .unwrap_or(self.baseline)
    }

    /// The longest a run of this plan lasts (the caller's load must flow that long): until the
    /// timeline's end, or the recovery limit after the last fault's end plus the
    /// [`measure::SUSTAIN`] samples that confirm a recovery starting at the limit's edge.
    pub fn longest(&self) -> Duration {
        (self.baseline + self.duration)
            .max(self.last_end() + self.recovery_limit + SAMPLE_EVERY * measure::SUSTAIN as u32)
    }
}

/// One fault of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedFault {
    /// From the start of the run (the baseline included).
    pub start: Duration,
    /// From the start of the run; for a PodKill, equal to `start`.
    pub end: Duration,
    pub action: FaultAction,
}

/// What a planned fault does.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultAction {
    /// Stored in Redis for its window; the engines apply it.
    Inject(FaultRecord),
    /// Pods (engine tasks under `r4 run`) of `agent` killed at `start`.
    PodKill { agent: String, count: u32 },
}

/// What the caller does for the runner.
pub trait DrillTarget: Send + Sync {
    /// Kill `count` pods of `agent` (never more); returns how many were killed.
    fn kill_pods<'a>(&'a self, agent: &'a str, count: u32) -> BoxFuture<'a, Result<u32, String>>;
    /// Tasks processed, lost and duplicated since the run started, counted from the outside
    /// (the streams and the inbox, or `r4 run`'s own accounting), never assumed.
    fn account(&self) -> BoxFuture<'_, Result<Accounting, String>>;
}

/// Counted by the [`DrillTarget`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    pub tasks_processed: u64,
    pub tasks_lost: u64,
    pub duplicate_effects: u64,
}

/// Something that happened during a run, for Events, logs and the report's timeline.
#[derive(Clone, Debug, PartialEq)]
pub enum DrillEvent {
    BaselineStarted,
    FaultStarted {
        index: usize,
    },
    FaultEnded {
        index: usize,
    },
    PodsKilled {
        agent: String,
        requested: u32,
        killed: u32,
    },
    Aborted {
        reason: String,
    },
    Recovered,
    Finished {
        verdict: Verdict,
    },
}

/// Verdict of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    Aborted,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "Passed",
            Verdict::Failed => "Failed",
            Verdict::Aborted => "Aborted",
        }
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Resilience score in [0, 100] (formula in the README and in [`measure`]).
    pub score: f64,
    /// Why the verdict is not Passed (a guardrail, an unmet expectation), one line.
    pub reason: Option<String>,
    /// The guardrail breach or the caller's reason that aborted the run.
    pub aborted_because: Option<String>,
    /// [`measure::failover`]; `None` when traffic never got around the faults while they were
    /// active (or nothing was measurable).
    pub failover_seconds: Option<f64>,
    /// [`measure::recovery`]; `None` when not recovered within the recovery limit.
    pub recovery_seconds: Option<f64>,
    /// Entries that entered the DLQ during the run: its length's increase plus what the repair
    /// role moved out of it meanwhile (replayed or quarantined).
    pub dlq_growth: u64,
    /// DLQ entries the repair role replayed during the run.
    pub dlq_replayed: u64,
    /// As counted by the [`DrillTarget`] (all zero, and the reason saying why, when the count
    /// failed).
    pub accounting: Accounting,
    /// Tool circuit breakers that opened, hedged tool calls and tool retries during the run
    /// (the tool proxies' published counters; agent redeliveries are not retries here).
    pub breaker_trips: u64,
    pub hedges: u64,
    pub retries: u64,
    /// Every event, at its offset from the start of the run.
    pub timeline: Vec<(Duration, DrillEvent)>,
}

impl Outcome {
    /// The status entry of this run.
    pub fn to_run(&self, started_at: String, finished_at: String) -> DrillRun {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        DrillRun {
            started_at,
            finished_at: Some(finished_at),
            verdict: Some(self.verdict.as_str().to_owned()),
            failover_seconds: self.failover_seconds,
            recovery_seconds: self.recovery_seconds,
            dlq_growth: n(self.dlq_growth),
            tasks_processed: n(self.accounting.tasks_processed),
            tasks_lost: n(self.accounting.tasks_lost),
            duplicate_effects: n(self.accounting.duplicate_effects),
            breaker_trips: n(self.breaker_trips),
            hedges: n(self.hedges),
            retries: n(self.retries),
            dlq_replayed: n(self.dlq_replayed),
            score: Some(self.score),
            reason: self.reason.clone(),
            aborted_because: self.aborted_because.clone(),
        }
    }
}
