//! One run of a ChaosDrill, shared by the controller (`r4 controller`, `r4 dev`) and `r4 run
//! --drill`: the plan (when each fault starts and ends), the run itself (a baseline window,
//! faults injected through [`super::faults`] at their times, pod kills through the caller's
//! [`DrillTarget`], guardrails checked every second from the engines' published stats, the
//! wait for recovery), and the pure measurement (failover, recovery, verdict, score).
//!
//! Left to the callers: when a run starts (the cron schedule, `suspend`, one run at a time) and
//! where its outcome is written (the ChaosDrill's status, the run's report); how pods are killed
//! and how lost tasks and duplicate effects are counted (the [`DrillTarget`]).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::faults::FaultRecord;
use crate::api::drill::{AbortIf, ChaosDrillSpec, DrillRun, Expectations};
use crate::api::validate::FieldError;
use crate::queue::{Keys, Queue};

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

/// Resolve `spec` (already validated) into a plan for run `run` of drill `drill`.
pub fn plan(drill: &str, spec: &ChaosDrillSpec, run: u64) -> Result<Plan, FieldError> {
    let _ = (drill, spec, run);
    todo!("helper B")
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
    /// Resilience score in [0, 100] (formula in the README).
    pub score: f64,
    /// Why the verdict is not Passed (a guardrail, an unmet expectation), one line.
    pub reason: Option<String>,
    pub aborted_because: Option<String>,
    pub failover_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    pub dlq_growth: u64,
    /// DLQ entries the repair role replayed during the run.
    pub dlq_replayed: u64,
    pub accounting: Accounting,
    pub breaker_trips: u64,
    pub hedges: u64,
    pub retries: u64,
    /// Every event, at its offset from the start of the run.
    pub timeline: Vec<(Duration, DrillEvent)>,
}

impl Outcome {
    /// The status entry of this run.
    pub fn to_run(&self, started_at: String, finished_at: String) -> DrillRun {
        let _ = (started_at, finished_at);
        todo!("helper B")
    }
}

/// Run `plan` against the workflow whose keys are `keys`: baseline, faults, guardrails,
/// recovery, verdict. `abort` set to `Some(reason)` ends the run at once (faults cleared,
/// verdict Aborted). Faults are cleared on every way out; what the run injected expires on time
/// even if this future is dropped (the TTLs). `on_event` sees every event as it happens.
pub async fn run(
    q: Arc<dyn Queue>,
    keys: Keys,
    plan: Plan,
    target: &dyn DrillTarget,
    abort: watch::Receiver<Option<String>>,
    on_event: &mut (dyn FnMut(Duration, &DrillEvent) + Send),
) -> Outcome {
    let _ = (q, keys, plan, target, abort, on_event);
    todo!("helper B")
}
