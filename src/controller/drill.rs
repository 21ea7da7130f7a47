//! The ChaosDrill reconciler: validate → decide (pure: [`decide`]) → start, abort or record a
//! run → write the status, only when it changed. A run itself is the engine's
//! ([`crate::engine::drill::run`]: plan, faults, guardrails, measurement, verdict); this module
//! owns when a run starts and ends, the run's task, what it does for the runner
//! ([`KubeTarget`]: pod kills through the API, the accounting of tasks from the streams and the
//! inbox), the drill's status and Events, and the workflow's drill record ([`workflow_record`],
//! written by the workflow reconciler, the only writer of the workflow's status).
//!
//! # The state machine ([`decide`], pure)
//!
//! - A run in progress here is aborted at once when `suspend: true` or a new
//!   `r4.dev/abort-requested` annotation arrives (the runner clears its faults); nothing else
//!   starts while it runs (never two runs of one drill).
//! - The status says `Running` but no run task is here: the run was interrupted (the controller
//!   restarted, or leadership moved). Its faults are cleared and it is recorded `Aborted`
//!   ("controller restarted"); whatever it injected had ended by its TTL anyway.
//! - Suspended: nothing starts (a run request is ignored, and marked served).
//! - A new `r4.dev/run-requested` annotation (value ≠ `status.lastRunRequest`) starts a run now;
//!   `status.lastRunRequest` records that it was served.
//! - No `schedule`: one run, when the drill has never run.
//! - A cron `schedule` (5 fields, UTC): a run at each fire time after the last run's start (or,
//!   never run, after the drill's creation). A fire time more than [`MISSED_WINDOW_GRACE`] ago
//!   (the controller was down, the previous run still running) is skipped, not queued: the
//!   drill waits for the next one.
//!
//! # Accounting (the [`crate::engine::drill::DrillTarget`] of the controller)
//!
//! A tracker reads, every [`TRACK_EVERY`] from the run's start, the new entries of every work
//! stream of the workflow (engines trim what every group acknowledged, so the streams must be
//! read while the run goes):
//! - the tasks of the run are those added to the entry stream since its start, plus those whose
//!   entry step's inbox key appeared during the run (a task added and trimmed between two
//!   reads), plus those dead-lettered or quarantined since its start;
//! - a task is *completed* when the inbox key of each terminal step exists, *dead-lettered* when
//!   a DLQ or poison record since the start names it, *in flight* when it is still in a work
//!   stream or an open join; *lost* when it is none of these;
//! - a *duplicate effect* is a second entry of one (stream, task, replay round, type) in a work
//!   stream other than the entry stream: a step's output published twice (a DLQ replay is a
//!   new round, not a duplicate). Entries written and trimmed between two reads are not seen,
//!   so this count is a lower bound.
//!
//! `tasksProcessed` is the completed tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::watch;
use tracing::Instrument;

use super::context::{Context, Error};
use super::{conditions, render};
use crate::api::drill::{ChaosDrill, ChaosDrillSpec, ChaosDrillStatus, DrillPhase, DrillRun};
use crate::api::workflow::{AgentWorkflow, AgentWorkflowSpec, WorkflowDrillStatus};
use crate::engine::drill::{self as runner, Accounting, DrillEvent, DrillTarget, Verdict};
use crate::engine::faults;
use crate::queue::{Keys, Queue, StreamEntry};

/// A fire time further in the past than this is a missed window: skipped, not run late.
pub const MISSED_WINDOW_GRACE: Duration = Duration::from_secs(60);
/// Runs kept in `status.runs` (the oldest go first).
pub const HISTORY: usize = 20;
/// Annotation asking for a run now (`r4 drill run`): an RFC 3339 time, served once.
pub const RUN_REQUESTED: &str = "r4.dev/run-requested";
/// Annotation asking to abort the run in progress (`r4 drill abort`).
pub const ABORT_REQUESTED: &str = "r4.dev/abort-requested";
/// The condition describing the last run.
pub const LAST_RUN_CONDITION: &str = "LastRunPassed";
/// How often the accounting tracker reads the work streams during a run.
pub const TRACK_EVERY: Duration = Duration::from_millis(100);
/// Failure modes of a workflow are counted over this window.
pub const FAILURE_MODES_WINDOW: Duration = Duration::from_secs(90 * 24 * 3600);
/// While a run is in progress here, how often its drill is looked at (its end is recorded by
/// the reconciler, the only writer of the status).
pub const RECORD_POLL: Duration = Duration::from_millis(500);
/// Reason of a run interrupted by a controller restart.
pub const INTERRUPTED: &str = "controller restarted";

/// The metric and log label of this kind.
const KIND: &str = "ChaosDrill";

/// What [`decide`] reads.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub spec: &'a ChaosDrillSpec,
    pub status: &'a ChaosDrillStatus,
    /// The drill's creation (the anchor of a schedule that never ran).
    pub created: Option<Timestamp>,
    pub now: Timestamp,
    /// Whether a run of this drill is in progress here.
    pub running: bool,
    /// The `r4.dev/run-requested` annotation.
    pub run_requested: Option<&'a str>,
    /// The `r4.dev/abort-requested` annotation.
    pub abort_requested: Option<&'a str>,
}

/// Why a run starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Why {
    /// No schedule, never ran.
    Once,
    /// The schedule fired at this time.
    Schedule(Timestamp),
    /// `r4 drill run`.
    Request,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    Start(Why),
    /// Abort the run in progress here.
    Abort(String),
    /// The status says Running but no run is here: clear its faults, record it Aborted.
    Interrupted,
    /// Nothing to start now; `next`: the next fire time; `missed`: a fire time skipped.
    Wait {
        next: Option<Timestamp>,
        missed: Option<Timestamp>,
    },
}

/// What became of a pending request annotation.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// None pending (absent, or already served).
    None,
    /// Acted on.
    Served,
    /// Not acted on, for this reason (and marked served all the same: a request is never
    /// queued).
    Ignored(&'static str),
}

/// The decision and what it did with the requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub act: Act,
    pub run_request: Request,
    pub abort_request: Request,
}

fn pending<'a>(annotation: Option<&'a str>, served: Option<&String>) -> Option<&'a str> {
    annotation.filter(|a| served.is_none_or(|s| s != a))
}

/// The schedule and state decision (see the module docs). An invalid schedule is an error
/// naming the field.
pub fn decide(i: &Inputs) -> Result<Decision, String> {
    let run_req = pending(i.run_requested, i.status.last_run_request.as_ref()).is_some();
    let abort_req = pending(i.abort_requested, i.status.last_abort_request.as_ref()).is_some();
    let mut d = Decision {
        act: Act::Wait {
            next: None,
            missed: None,
        },
        run_request: if run_req {
            Request::Served
        } else {
            Request::None
        },
        abort_request: if abort_req {
            Request::Served
        } else {
            Request::None
        },
    };
    if i.running {
        if run_req {
            d.run_request = Request::Ignored("a run is in progress");
        }
        if i.spec.suspend {
            d.act = Act::Abort("suspended".into());
            if abort_req {
                d.abort_request = Request::Ignored("the drill was suspended");
            }
        } else if abort_req {
            d.act = Act::Abort("aborted by request".into());
        }
        return Ok(d);
    }
    if abort_req {
        d.abort_request = Request::Ignored("no run is in progress");
    }
    if i.status.phase == Some(DrillPhase::Running) {
        d.act = Act::Interrupted;
        if run_req {
            d.run_request = Request::Ignored("the previous run was interrupted; ask again");
        }
        return Ok(d);
    }
    if i.spec.suspend {
        if run_req {
            d.run_request = Request::Ignored("the drill is suspended");
        }
        return Ok(d);
    }
    if run_req {
        d.act = Act::Start(Why::Request);
        return Ok(d);
    }
    let Some(schedule) = &i.spec.schedule else {
        if i.status.runs.is_empty() && i.status.last_run_at.is_none() {
            d.act = Act::Start(Why::Once);
        }
        return Ok(d);
    };
    let cron = croner::parser::CronParser::new()
        .parse(schedule)
        .map_err(|e| format!("spec.schedule: invalid cron expression {schedule:?}: {e}"))?;
    let last = i
        .status
        .last_run_at
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok());
    let anchor = match (last, i.created) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => i.now,
    };
    d.act = scheduled(&cron, anchor, i.now)?;
    Ok(d)
}

/// A cron schedule's decision: start for a fire time in `(anchor, now]` at most
/// [`MISSED_WINDOW_GRACE`] old; a fire time in that interval but older is missed.
fn scheduled(cron: &croner::Cron, anchor: Timestamp, now: Timestamp) -> Result<Act, String> {
    let next_after = |t: Timestamp| -> Result<Option<Timestamp>, String> {
        let whole = Timestamp::from_second(t.as_second()).unwrap_or(t);
        let Some(c) = to_chrono(whole) else {
            return Ok(None);
        };
        match cron.find_next_occurrence(&c, false) {
            Ok(n) => Ok(Timestamp::from_millisecond(n.timestamp_millis()).ok()),
            Err(e) => Err(format!("spec.schedule: {e}")),
        }
    };
    let Some(first) = next_after(anchor)? else {
        return Ok(Act::Wait {
            next: None,
            missed: None,
        });
    };
    if first > now {
        return Ok(Act::Wait {
            next: Some(first),
            missed: None,
        });
    }
    // Cron times are whole seconds: `now` within a second of a fire time matches it.
    let whole = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let latest = to_chrono(whole)
        .and_then(|c| cron.find_previous_occurrence(&c, true).ok())
        .and_then(|p| Timestamp::from_millisecond(p.timestamp_millis()).ok())
        .unwrap_or(first);
    let grace = SignedDuration::try_from(MISSED_WINDOW_GRACE).unwrap_or_default();
    if latest > anchor && now.duration_since(latest) <= grace {
        return Ok(Act::Start(Why::Schedule(latest)));
    }
    Ok(Act::Wait {
        next: next_after(now)?,
        missed: Some(latest),
    })
}

/// A time of the status: RFC 3339 to the millisecond (what `kubectl get drill` shows).
fn rfc3339(t: Timestamp) -> String {
    t.round(k8s_openapi::jiff::Unit::Millisecond)
        .unwrap_or(t)
        .to_string()
}

fn to_chrono(t: Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_millis(t.as_millisecond())
}

/// The phase a verdict leaves the drill in.
pub fn phase_of(verdict: Verdict) -> DrillPhase {
    match verdict {
        Verdict::Passed => DrillPhase::Succeeded,
        Verdict::Failed => DrillPhase::Failed,
        Verdict::Aborted => DrillPhase::Aborted,
    }
}

/// Append a finished run to the status: the bounded history, the phase, the last verdict and
/// the last run's condition.
pub fn record_run(
    status: &mut ChaosDrillStatus,
    run: DrillRun,
    verdict: Verdict,
    generation: Option<i64>,
    now: Timestamp,
) {
    let (cond, reason) = match verdict {
        Verdict::Passed => ("True", "Passed"),
        Verdict::Failed => ("False", "Failed"),
        Verdict::Aborted => ("False", "Aborted"),
    };
    let message = summary(&run);
    status.runs.push(run);
    if status.runs.len() > HISTORY {
        let extra = status.runs.len() - HISTORY;
        status.runs.drain(..extra);
    }
    status.phase = Some(phase_of(verdict));
    status.last_verdict = Some(verdict.as_str().to_owned());
    conditions::set(
        &mut status.conditions,
        LAST_RUN_CONDITION,
        cond,
        reason,
        &message,
        generation,
        now,
    );
}

/// One line with a run's figures (Events, the last run's condition).
pub fn summary(r: &DrillRun) -> String {
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.1}s"));
    let mut s = format!(
        "{}: score {}, failover {}, recovery {}, DLQ +{} ({} replayed), {} tasks, {} lost, {} duplicate effects, {} breaker trips, {} retries, {} hedges",
        r.verdict.as_deref().unwrap_or("unknown"),
        r.score.map_or("-".to_owned(), |s| format!("{s:.0}")),
        secs(r.failover_seconds),
        secs(r.recovery_seconds),
        r.dlq_growth,
        r.dlq_replayed,
        r.tasks_processed,
        r.tasks_lost,
        r.duplicate_effects,
        r.breaker_trips,
        r.retries,
        r.hedges,
    );
    if let Some(why) = r.aborted_because.as_ref().or(r.reason.as_ref()) {
        s.push_str(" — ");
        s.push_str(why);
    }
    s
}

/// The run entry of a run that ended without an outcome (interrupted, or its task failed).
pub fn aborted_run(started_at: String, finished_at: String, why: &str) -> DrillRun {
    DrillRun {
        started_at,
        finished_at: Some(finished_at),
        verdict: Some(Verdict::Aborted.as_str().to_owned()),
        score: Some(0.0),
        reason: Some(why.to_owned()),
        aborted_because: Some(why.to_owned()),
        ..DrillRun::default()
    }
}

/// The drill record of workflow `workflow` from the drills of its namespace (those that do not
/// reference it are ignored): the newest finished run's verdict, drill and end, and the
/// distinct fault types of drills with a completed run (Passed or Failed: an aborted run did
/// not go through its timeline) that finished in the last 90 days. `None` when no drill
/// references the workflow. (Fault types are read from each drill's current spec: runs do not
/// keep the faults they ran.)
pub fn workflow_record(
    workflow: &str,
    drills: &[&ChaosDrill],
    now: Timestamp,
) -> Option<WorkflowDrillStatus> {
    let mine: Vec<&&ChaosDrill> = drills
        .iter()
        .filter(|d| d.spec.workflow_ref == workflow)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let window = SignedDuration::try_from(FAILURE_MODES_WINDOW).unwrap_or_default();
    let mut record = WorkflowDrillStatus::default();
    let mut newest: Option<(Timestamp, String, String, String)> = None;
    let mut modes = BTreeSet::new();
    for d in mine {
        let Some(status) = &d.status else { continue };
        for r in &status.runs {
            let Some(end) = r.finished_at.as_deref() else {
                continue;
            };
            let Ok(at) = end.parse::<Timestamp>() else {
                continue;
            };
            let verdict = r.verdict.clone().unwrap_or_default();
            if newest.as_ref().is_none_or(|(t, ..)| at > *t) {
                newest = Some((at, verdict.clone(), d.name_any(), end.to_owned()));
            }
            let completed = verdict == "Passed" || verdict == "Failed";
            if completed && now.duration_since(at) <= window {
                for f in &d.spec.faults {
                    modes.insert(format!("{:?}", f.kind));
                }
            }
        }
    }
    if let Some((_, verdict, drill, at)) = newest {
        record.last_verdict = Some(verdict);
        record.last_drill = Some(drill);
        record.last_run_at = Some(at);
    }
    record.failure_modes_90d = i32::try_from(modes.len()).unwrap_or(i32::MAX);
    Some(record)
}

// ---------------------------------------------------------------------------------------------
// Runs in progress: kept in the controller's context.

/// A run's end, waiting to be written into the status by the reconciler (the only writer of
/// the drill's status).
#[derive(Clone, Debug)]
pub struct Finished {
    pub run: DrillRun,
    pub verdict: Verdict,
}

struct Running {
    /// `ns/workflow` and the drill's name (its faults are named after it).
    workflow: String,
    drill: String,
    abort: watch::Sender<Option<String>>,
    task: tokio::task::JoinHandle<()>,
    runner: tokio::task::AbortHandle,
}

#[derive(Default)]
struct RunsInner {
    running: HashMap<String, Running>,
    finished: HashMap<String, Finished>,
    /// Per drill uid, the start (status.lastRunAt) of the last run started here, and whether
    /// its end was recorded: a cache that shows an older status is stale, not a new state.
    started: HashMap<String, (String, bool)>,
    /// Workflows (`ns/wf`) whose stale faults this term has swept.
    swept: BTreeSet<String>,
    store: Option<Store<ChaosDrill>>,
}

/// The drill runs of this controller (kept in [`Context`]): the run tasks by drill uid, their
/// outcomes until recorded, and the drills' reflector store (read by the workflow reconciler for the drill record).
#[derive(Default)]
pub struct Runs(Mutex<RunsInner>);

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunsInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new term (controller start, leadership taken), with the drills' store.
    pub fn begin(&self, store: Store<ChaosDrill>) {
        let mut g = self.lock();
        g.store = Some(store);
        g.swept.clear();
    }

    /// End of the term: every run task here is stopped (their faults end by their TTL; the next
    /// leader records the runs as interrupted).
    pub fn end(&self) {
        let mut g = self.lock();
        for (_, r) in g.running.drain() {
            r.task.abort();
            r.runner.abort();
        }
        g.finished.clear();
        g.started.clear();
    }

    fn is_running(&self, uid: &str) -> bool {
        self.lock().running.contains_key(uid)
    }

    /// Names of the drills with a run here against workflow `ns/wf`.
    fn running_names(&self, workflow: &str) -> BTreeSet<String> {
        self.lock()
            .running
            .values()
            .filter(|r| r.workflow == workflow)
            .map(|r| r.drill.clone())
            .collect()
    }

    fn abort(&self, uid: &str, reason: &str) -> bool {
        match self.lock().running.get(uid) {
            Some(r) => {
                r.abort.send_replace(Some(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    fn finish(&self, uid: &str, f: Finished) {
        let mut g = self.lock();
        g.running.remove(uid);
        g.finished.insert(uid.to_owned(), f);
    }

    /// The drill record of a workflow, from the drills' store: `None` while the store is not
    /// there or not filled yet (nothing known: keep what the status says), `Some(None)` when no
    /// drill references the workflow.
    pub fn workflow_record(
        &self,
        ns: &str,
        workflow: &str,
        now: Timestamp,
    ) -> Option<Option<WorkflowDrillStatus>> {
        let store = self.lock().store.clone()?;
        // Not filled yet: nothing is known (an empty store would erase every record).
        store.wait_until_ready().now_or_never()?.ok()?;
        let all = store.state();
        let mine: Vec<&ChaosDrill> = all
            .iter()
            .map(|d| d.as_ref())
            .filter(|d| d.namespace().as_deref() == Some(ns))
            .collect();
        Some(workflow_record(workflow, &mine, now))
    }
}

// ---------------------------------------------------------------------------------------------
// The reconciler.

/// One reconcile of one drill.
pub async fn reconcile(d: Arc<ChaosDrill>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = d.namespace().unwrap_or_else(|| "default".into());
    let span = tracing::info_span!("reconcile", kind = KIND, namespace = %ns, name = %d.name_any());
    let result = apply(&d, &ctx, &ns).instrument(span).await;
    ctx.metrics.reconciled(KIND, started.elapsed());
    result
}

/// What a failed reconcile does: count it, log it, retry after the object's own backoff.
pub fn error_policy(d: Arc<ChaosDrill>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(KIND, error.metric_label());
    let delay = ctx.backoff.failed(&key(&d));
    tracing::warn!(kind = KIND, namespace = %d.namespace().unwrap_or_default(), name = %d.name_any(), error = %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

fn key(d: &ChaosDrill) -> String {
    format!(
        "drill:{}/{}",
        d.namespace().unwrap_or_else(|| "default".into()),
        d.name_any()
    )
}

fn annotation<'a>(d: &'a ChaosDrill, k: &str) -> Option<&'a str> {
    d.annotations().get(k).map(String::as_str)
}

async fn apply(d: &ChaosDrill, ctx: &Arc<Context>, ns: &str) -> Result<Action, Error> {
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let now = Timestamp::now();
    let generation = d.metadata.generation;
    if d.metadata.deletion_timestamp.is_some() {
        ctx.drills.abort(&uid, "the drill was deleted");
        return Ok(Action::await_change());
    }
    let old = d.status.clone().unwrap_or_default();
    let mut status = old.clone();

    // A cache older than what this controller wrote last is not a new state.
    let (started_here, finished) = {
        let g = ctx.drills.lock();
        (g.started.get(&uid).cloned(), g.finished.get(&uid).cloned())
    };
    if let Some((at, recorded)) = started_here
        && (status.last_run_at.as_deref() != Some(at.as_str())
            || (recorded && status.phase == Some(DrillPhase::Running)))
        && finished.is_none()
    {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    // A run that ended: recorded first, so everything below sees its verdict.
    if let Some(f) = &finished {
        let line = summary(&f.run);
        record_run(&mut status, f.run.clone(), f.verdict, generation, now);
        let (kind, reason) = match f.verdict {
            Verdict::Passed => (EventType::Normal, "DrillPassed"),
            Verdict::Failed => (EventType::Warning, "DrillFailed"),
            Verdict::Aborted => (EventType::Warning, "DrillAborted"),
        };
        publish(ctx, d, kind, reason, "Run", &line).await;
    }

    // validate: the workflow (this namespace only) and the spec against it
    let wfs: Api<AgentWorkflow> = Api::namespaced(ctx.client.clone(), ns);
    let wf = ctx.api(wfs.get_opt(&d.spec.workflow_ref)).await?;
    let invalid = match &wf {
        None => Some(format!(
            "spec.workflowRef: AgentWorkflow {ns}/{} not found (a drill targets a workflow of its own namespace)",
            d.spec.workflow_ref
        )),
        Some(w) => {
            let errors = crate::api::validate::check_drill(&d.spec, Some(&w.spec));
            (!errors.is_empty()).then(|| {
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        }
    };
    if let Some(message) = invalid {
        if conditions::set(
            &mut status.conditions,
            "Valid",
            "False",
            "InvalidSpec",
            &message,
            generation,
            now,
        ) {
            publish(
                ctx,
                d,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                &message,
            )
            .await;
        }
        if ctx.drills.abort(&uid, &format!("invalid spec: {message}")) {
            publish(
                ctx,
                d,
                EventType::Warning,
                "DrillAborting",
                "Abort",
                &message,
            )
            .await;
        }
        return done(
            ctx,
            d,
            &old,
            status,
            &uid,
            finished.is_some(),
            Action::await_change(),
        )
        .await;
    }
    let Some(wf) = wf else {
        return Ok(Action::await_change());
    };
    conditions::set(
        &mut status.conditions,
        "Valid",
        "True",
        "Validated",
        "the drill's targets exist in its workflow",
        generation,
        now,
    );

    let q = ctx.queue(ns, &wf.spec).await?;
    let keys = Keys::new(ns, &wf.name_any());
    sweep(ctx, q.as_ref(), &keys, ns, &wf.name_any()).await?;

    let running = ctx.drills.is_running(&uid);
    let decision = match decide(&Inputs {
        spec: &d.spec,
        status: &status,
        created: d.metadata.creation_timestamp.as_ref().map(|t| t.0),
        now,
        running,
        run_requested: annotation(d, RUN_REQUESTED),
        abort_requested: annotation(d, ABORT_REQUESTED),
    }) {
        Ok(x) => x,
        Err(message) => {
            let recorded = finished.is_some();
            return refuse(
                ctx, d, &old, status, &uid, recorded, &message, generation, now,
            )
            .await;
        }
    };
    for (req, ann, what) in [
        (&decision.run_request, RUN_REQUESTED, "run"),
        (&decision.abort_request, ABORT_REQUESTED, "abort"),
    ] {
        if let Request::Ignored(why) = req {
            publish(
                ctx,
                d,
                EventType::Normal,
                "RequestIgnored",
                "Request",
                &format!(
                    "{what} request {} ignored: {why}",
                    annotation(d, ann).unwrap_or("")
                ),
            )
            .await;
        }
    }
    if decision.run_request != Request::None {
        status.last_run_request = annotation(d, RUN_REQUESTED).map(str::to_owned);
    }
    if decision.abort_request != Request::None {
        status.last_abort_request = annotation(d, ABORT_REQUESTED).map(str::to_owned);
    }

    let mut next = Action::await_change();
    match decision.act {
        Act::Abort(reason) => {
            if ctx.drills.abort(&uid, &reason) {
                publish(
                    ctx,
                    d,
                    EventType::Warning,
                    "DrillAborting",
                    "Abort",
                    &format!("aborting the run: {reason}"),
                )
                .await;
            }
        }
        Act::Interrupted => {
            let cleared = ctx
                .redis(
                    "clear the faults of an interrupted run",
                    faults::clear(q.as_ref(), &keys, &name),
                )
                .await?;
            let started_at = status.last_run_at.clone().unwrap_or_else(|| rfc3339(now));
            let run = aborted_run(started_at.clone(), rfc3339(now), INTERRUPTED);
            let line = format!("{} ({cleared} faults cleared)", summary(&run));
            record_run(&mut status, run, Verdict::Aborted, generation, now);
            write_status(ctx, d, &old, &status).await?;
            // A cache still showing that run Running is stale, not another interruption.
            ctx.drills
                .lock()
                .started
                .insert(uid.clone(), (started_at, true));
            publish(ctx, d, EventType::Warning, "DrillAborted", "Run", &line).await;
            ctx.backoff.succeeded(&key(d));
            return Ok(Action::await_change());
        }
        Act::Start(why) => {
            let run_id = u64::try_from(now.as_millisecond()).unwrap_or(0);
            let plan = match runner::plan(&name, &d.spec, run_id) {
                Ok(p) => p,
                Err(e) => {
                    let (message, recorded) = (e.to_string(), finished.is_some());
                    return refuse(
                        ctx, d, &old, status, &uid, recorded, &message, generation, now,
                    )
                    .await;
                }
            };
            let started_at = rfc3339(now);
            status.phase = Some(DrillPhase::Running);
            status.last_run_at = Some(started_at.clone());
            // The status says Running before the run starts: a run is never without it.
            write_status(ctx, d, &old, &status).await?;
            if finished.is_some() {
                ctx.drills.lock().finished.remove(&uid);
            }
            spawn_run(ctx.clone(), d, &wf, q, keys, plan, started_at.clone());
            ctx.drills
                .lock()
                .started
                .insert(uid.clone(), (started_at, false));
            let why = match why {
                Why::Once => "run once (no schedule)".to_owned(),
                Why::Schedule(t) => format!("scheduled at {t}"),
                Why::Request => "requested".to_owned(),
            };
            let faults: Vec<String> = d
                .spec
                .faults
                .iter()
                .map(|f| format!("{:?}", f.kind))
                .collect();
            publish(
                ctx,
                d,
                EventType::Normal,
                "DrillStarted",
                "Run",
                &format!(
                    "run started ({why}) against {}: baseline {}, faults for {}: {}",
                    d.spec.workflow_ref,
                    d.spec
                        .baseline
                        .as_ref()
                        .map_or("30s".to_owned(), |b| b.to_string()),
                    d.spec.duration,
                    faults.join(", ")
                ),
            )
            .await;
            ctx.backoff.succeeded(&key(d));
            return Ok(Action::requeue(RECORD_POLL));
        }
        Act::Wait { next: at, missed } => {
            if status.phase.is_none() {
                status.phase = Some(DrillPhase::Pending);
            }
            if let Some(m) = missed {
                let message = format!(
                    "the window at {m} was missed (more than {}s late); waiting for the next",
                    MISSED_WINDOW_GRACE.as_secs()
                );
                if conditions::set(
                    &mut status.conditions,
                    "ScheduleMissed",
                    "True",
                    "WindowMissed",
                    &message,
                    generation,
                    now,
                ) {
                    publish(
                        ctx,
                        d,
                        EventType::Warning,
                        "WindowMissed",
                        "Schedule",
                        &message,
                    )
                    .await;
                }
            }
            if let Some(at) = at {
                let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
                next = Action::requeue(
                    wait.clamp(Duration::from_millis(100), Duration::from_secs(300)),
                );
            }
        }
    }
    done(ctx, d, &old, status, &uid, finished.is_some(), next).await
}

/// Write the status (if it changed); a recorded run's outcome is then forgotten.
/// A spec the controller cannot run: `Valid=False` with `message`, no run, wait for a change.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    ctx: &Context,
    d: &ChaosDrill,
    old: &ChaosDrillStatus,
    mut status: ChaosDrillStatus,
    uid: &str,
    recorded: bool,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Result<Action, Error> {
    conditions::set(
        &mut status.conditions,
        "Valid",
        "False",
        "InvalidSpec",
        message,
        generation,
        now,
    );
    done(ctx, d, old, status, uid, recorded, Action::await_change()).await
}

async fn done(
    ctx: &Context,
    d: &ChaosDrill,
    old: &ChaosDrillStatus,
    status: ChaosDrillStatus,
    uid: &str,
    recorded: bool,
    next: Action,
) -> Result<Action, Error> {
    write_status(ctx, d, old, &status).await?;
    if recorded {
        let mut g = ctx.drills.lock();
        // Counted once: the finished run leaves the store with the status write that holds it.
        if let Some(f) = g.finished.remove(uid) {
            ctx.metrics.drill_run(
                &d.namespace().unwrap_or_else(|| "default".into()),
                &d.name_any(),
                f.verdict.as_str(),
            );
        }
        if let Some(s) = g.started.get_mut(uid) {
            s.1 = true;
        }
    }
    ctx.backoff.succeeded(&key(d));
    if ctx.drills.is_running(uid) {
        return Ok(Action::requeue(RECORD_POLL));
    }
    Ok(next)
}

/// Once per term and workflow: end the faults of drills that are not running here (the
/// controller died or lost leadership mid-run; their TTLs end them anyway, this ends them now).
async fn sweep(ctx: &Context, q: &dyn Queue, keys: &Keys, ns: &str, wf: &str) -> Result<(), Error> {
    let id = format!("{ns}/{wf}");
    if ctx.drills.lock().swept.contains(&id) {
        return Ok(());
    }
    let keep = ctx.drills.running_names(&id);
    let keep_running = |drill: &str| keep.contains(drill);
    let n = ctx
        .redis(
            "clear stale faults",
            faults::clear_except(q, keys, &keep_running),
        )
        .await?;
    if n > 0 {
        tracing::info!(namespace = %ns, workflow = %wf, cleared = n, "cleared the faults of drills no longer running");
    }
    ctx.drills.lock().swept.insert(id);
    Ok(())
}

/// Start the run's task: the runner against the workflow's Redis with a [`KubeTarget`]; its
/// outcome is handed to the reconciler (a panic of the runner is an Aborted run, never a drill
/// stuck in Running).
fn spawn_run(
    ctx: Arc<Context>,
    d: &ChaosDrill,
    wf: &AgentWorkflow,
    q: Arc<dyn Queue>,
    keys: Keys,
    plan: runner::Plan,
    started_at: String,
) {
    let uid = d.uid().unwrap_or_default();
    let name = d.name_any();
    let ns = d.namespace().unwrap_or_else(|| "default".into());
    let (abort_tx, abort_rx) = watch::channel(None);
    let target = KubeTarget::new(
        ctx.client.clone(),
        &ns,
        &wf.name_any(),
        &wf.spec,
        q.clone(),
        keys.clone(),
        ctx.opts.api_timeout,
    );
    // Held until the run is in the map: a run that ends at once (an error) must find itself
    // there to be removed.
    let mut runs = ctx.drills.lock();
    let inner = tokio::spawn(async move {
        let mut on_event = |at: Duration, e: &DrillEvent| {
            tracing::info!(drill = %name, at_ms = at.as_millis() as u64, event = ?e, "drill");
        };
        let outcome = runner::run(q, keys, plan, &target, abort_rx, &mut on_event).await;
        target.stop();
        outcome
    });
    // Ending the term stops the runner too (not only the task waiting for it).
    let runner = inner.abort_handle();
    let ctx2 = Arc::clone(&ctx);
    let uid2 = uid.clone();
    let task = tokio::spawn(async move {
        let ended = inner.await;
        let finished_at = rfc3339(Timestamp::now());
        let f = match ended {
            Ok(o) => Finished {
                run: o.to_run(started_at, finished_at),
                verdict: o.verdict,
            },
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                let why = format!("the run failed: {e}");
                tracing::error!(error = %e, "drill run task failed");
                Finished {
                    run: aborted_run(started_at, finished_at, &why),
                    verdict: Verdict::Aborted,
                }
            }
        };
        ctx2.drills.finish(&uid2, f);
    });
    runs.running.insert(
        uid,
        Running {
            workflow: format!("{ns}/{}", wf.name_any()),
            drill: d.name_any(),
            abort: abort_tx,
            task,
            runner,
        },
    );
}

/// Patch the status if, and only if, it changed.
async fn write_status(
    ctx: &Context,
    d: &ChaosDrill,
    old: &ChaosDrillStatus,
    new: &ChaosDrillStatus,
) -> Result<(), Error> {
    super::workflow::patch_status(ctx, d, old, new, KIND).await?;
    Ok(())
}

/// Publish an Event about the drill; a failure is logged, never fails the reconcile.
async fn publish(
    ctx: &Context,
    d: &ChaosDrill,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    tracing::info!(kind = KIND, namespace = %d.namespace().unwrap_or_default(), name = %d.name_any(), reason, "{note}");
    let ev = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    match tokio::time::timeout(
        ctx.opts.api_timeout,
        ctx.recorder.publish(&ev, &d.object_ref(&())),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "cannot publish event"),
        Err(_) => tracing::warn!(reason, "cannot publish event: no answer in time"),
    }
}

// ---------------------------------------------------------------------------------------------
// What the controller does for the runner.

/// Pod kills through the Kubernetes API and the accounting of the run's tasks from the
/// workflow's streams and inbox (rules in the module docs).
pub struct KubeTarget {
    client: kube::Client,
    namespace: String,
    workflow: String,
    timeout: Duration,
    q: Arc<dyn Queue>,
    keys: Keys,
    shape: Shape,
    ledger: Arc<Mutex<Ledger>>,
    tracker: tokio::task::JoinHandle<()>,
    /// The run's start (unix ms): DLQ and poison records from then on are the run's.
    started_ms: u64,
}

/// The parts of the workflow's graph the accounting needs.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    pub entry: String,
    /// Agents reading the entry stream.
    pub entry_agents: Vec<String>,
    /// Agents at the ends of the graph: a task is completed when each finished its step.
    pub terminal_agents: Vec<String>,
    /// Every stream an agent reads or writes, and those degraded mode routes to (a task parked
    /// for manual review is not lost).
    pub streams: BTreeSet<String>,
    /// Joining agents (a task may wait in their join).
    pub joiners: Vec<String>,
}

impl Shape {
    pub fn of(ns: &str, wf: &str, spec: &AgentWorkflowSpec) -> Self {
        let entry = crate::api::validate::entry_stream(spec)
            .or_else(|| spec.agents.first().map(|a| a.consumes.as_str()))
            .unwrap_or("tasks")
            .to_owned();
        let terminal_agents = crate::engine::WorkflowConfig::new(ns, wf, spec, None)
            .map(|c| c.terminal_agents().iter().map(|a| a.name.clone()).collect())
            .unwrap_or_default();
        Shape {
            entry_agents: spec
                .agents
                .iter()
                .filter(|a| a.consumes == entry)
                .map(|a| a.name.clone())
                .collect(),
            terminal_agents,
            streams: spec
                .agents
                .iter()
                .flat_map(|a| {
                    let routed = a.degraded_mode.as_ref().and_then(|d| d.to.clone());
                    std::iter::once(a.consumes.clone())
                        .chain(a.produces.iter().cloned())
                        .chain(routed)
                })
                .collect(),
            joiners: spec
                .agents
                .iter()
                .filter(|a| a.join.is_some())
                .map(|a| a.name.clone())
                .collect(),
            entry,
        }
    }
}

/// What the tracker saw of the run's streams.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Tasks added to the entry stream since the run started.
    pub entered: BTreeSet<String>,
    /// (stream, task, replay round, type) → the entry ids seen.
    outputs: HashMap<(String, String, String, String), BTreeSet<String>>,
    /// Second and later entries of one output.
    pub duplicates: u64,
    /// Last entry id read per stream (exclusive start of the next read).
    cursor: BTreeMap<String, String>,
    /// The entry agents' inbox keys at the run's start.
    inbox_before: BTreeSet<String>,
}

impl Ledger {
    /// Account for one entry read from `stream` (`entry`: whether it is the entry stream).
    pub fn observe(&mut self, stream: &str, is_entry: bool, e: &StreamEntry) {
        let field = |k: &str| {
            e.field(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let task = field(crate::engine::task::TASK_ID);
        if task.is_empty() {
            return;
        }
        if is_entry {
            self.entered.insert(task);
            return;
        }
        let k = (
            stream.to_owned(),
            task,
            field(crate::engine::task::REPLAYS),
            field(crate::engine::task::TYPE),
        );
        let ids = self.outputs.entry(k).or_default();
        if ids.insert(e.id.clone()) && ids.len() > 1 {
            self.duplicates += 1;
        }
    }
}

/// Lost, from the sets of the accounting: the run's tasks that are neither completed, nor
/// dead-lettered, nor in flight.
pub fn tally(
    run: &BTreeSet<String>,
    completed: &BTreeSet<String>,
    dead: &BTreeSet<String>,
    in_flight: &BTreeSet<String>,
    duplicates: u64,
) -> Accounting {
    Accounting {
        tasks_processed: run.iter().filter(|t| completed.contains(*t)).count() as u64,
        tasks_lost: run
            .iter()
            .filter(|t| !completed.contains(*t) && !dead.contains(*t) && !in_flight.contains(*t))
            .count() as u64,
        duplicate_effects: duplicates,
    }
}

fn start_id(ms: u64) -> String {
    format!("{ms}-0")
}

impl KubeTarget {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        namespace: &str,
        workflow: &str,
        spec: &AgentWorkflowSpec,
        q: Arc<dyn Queue>,
        keys: Keys,
        timeout: Duration,
    ) -> Self {
        let shape = Shape::of(namespace, workflow, spec);
        let start_ms = crate::engine::task::now_ms();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        {
            let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
            for s in &shape.streams {
                l.cursor.insert(s.clone(), start_id(start_ms));
            }
        }
        let tracker = tokio::spawn(track(
            q.clone(),
            keys.clone(),
            shape.clone(),
            ledger.clone(),
            timeout,
        ));
        KubeTarget {
            client,
            namespace: namespace.to_owned(),
            workflow: workflow.to_owned(),
            timeout,
            q,
            keys,
            shape,
            ledger,
            tracker,
            started_ms: start_ms,
        }
    }

    /// Stop the tracker (the run is over).
    pub fn stop(&self) {
        self.tracker.abort();
    }

    async fn redis<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, crate::queue::QueueError>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| format!("{what}: no answer from Redis within {:?}", self.timeout))?
            .map_err(|e| format!("{what}: {e}"))
    }

    async fn kill(&self, agent: &str, count: u32) -> Result<u32, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = render::selector_labels(&self.workflow, "agent", Some(agent))
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let list = tokio::time::timeout(
            self.timeout,
            pods.list(&ListParams::default().labels(&selector)),
        )
        .await
        .map_err(|_| {
            format!(
                "list the pods of {agent}: no answer within {:?}",
                self.timeout
            )
        })?
        .map_err(|e| format!("list the pods of {agent}: {e}"))?;
        let mut running: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .map(|p| p.name_any())
            .collect();
        running.sort();
        let mut killed = 0;
        for p in running.iter().take(count as usize) {
            match tokio::time::timeout(self.timeout, pods.delete(p, &DeleteParams::default())).await
            {
                Ok(Ok(_)) => killed += 1,
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
                Ok(Err(e)) => return Err(format!("delete pod {p}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "delete pod {p}: no answer within {:?}",
                        self.timeout
                    ));
                }
            }
        }
        tracing::info!(namespace = %self.namespace, workflow = %self.workflow, agent, requested = count, killed, "drill killed pods");
        Ok(killed)
    }

    async fn count(&self) -> Result<Accounting, String> {
        // One last read, so what was added up to now is seen.
        read_new(
            self.q.as_ref(),
            &self.keys,
            &self.shape,
            &self.ledger,
            self.timeout,
        )
        .await?;
        let (mut run, duplicates, before) = {
            let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            (l.entered.clone(), l.duplicates, l.inbox_before.clone())
        };
        // Tasks the entry step finished during the run, even if trimmed before the tracker saw
        // them.
        for k in self.entry_inbox().await? {
            if !before.contains(&k)
                && let Some(t) = self.task_of_inbox(&k)
            {
                run.insert(t);
            }
        }
        let started_ms = self.started_ms;
        let mut dead = BTreeSet::new();
        for s in [self.keys.dlq(), self.keys.poison()] {
            for e in self.read_all(&s, &start_id(started_ms)).await? {
                let rec = crate::engine::dlq::DlqRecord::decode(&e);
                if !rec.task_id.is_empty() {
                    run.insert(rec.task_id.clone());
                    dead.insert(rec.task_id);
                }
            }
        }
        let mut in_flight = BTreeSet::new();
        for s in &self.shape.streams {
            for e in self.read_all(&self.keys.stream(s), "-").await? {
                if let Some(t) = e.field(crate::engine::task::TASK_ID) {
                    in_flight.insert(String::from_utf8_lossy(t).into_owned());
                }
            }
        }
        let mut completed = BTreeSet::new();
        for t in &run {
            if in_flight.contains(t) || dead.contains(t) {
                continue;
            }
            let mut all = !self.shape.terminal_agents.is_empty();
            for a in &self.shape.terminal_agents {
                if self
                    .redis("GET inbox", self.q.get(&self.keys.inbox(t, a)))
                    .await?
                    .is_none()
                {
                    all = false;
                    break;
                }
            }
            if all {
                completed.insert(t.clone());
                continue;
            }
            for j in &self.shape.joiners {
                if !self
                    .redis("HGETALL join", self.q.hgetall(&self.keys.join(j, t)))
                    .await?
                    .is_empty()
                {
                    in_flight.insert(t.clone());
                }
            }
        }
        Ok(tally(&run, &completed, &dead, &in_flight, duplicates))
    }

    async fn entry_inbox(&self) -> Result<Vec<String>, String> {
        entry_inbox(self.q.as_ref(), &self.keys, &self.shape, self.timeout).await
    }

    fn task_of_inbox(&self, key: &str) -> Option<String> {
        let prefix = format!("{}:inbox:", self.keys.prefix());
        let rest = key.strip_prefix(&prefix)?;
        self.shape
            .entry_agents
            .iter()
            .find_map(|a| rest.strip_suffix(&format!(":{a}")))
            .map(str::to_owned)
    }

    async fn read_all(&self, stream: &str, from: &str) -> Result<Vec<StreamEntry>, String> {
        read_from(self.q.as_ref(), stream, from, self.timeout).await
    }
}

impl Drop for KubeTarget {
    fn drop(&mut self) {
        self.tracker.abort();
    }
}

impl DrillTarget for KubeTarget {
    fn kill_pods<'a>(&'a self, agent: &'a str, count: u32) -> BoxFuture<'a, Result<u32, String>> {
        self.kill(agent, count).boxed()
    }

    fn account(&self) -> BoxFuture<'_, Result<Accounting, String>> {
        self.count().boxed()
    }
}

/// The inbox keys of the entry steps.
async fn entry_inbox(
    q: &dyn Queue,
    keys: &Keys,
    shape: &Shape,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let prefix = format!("{}:inbox:", keys.prefix());
    let all = tokio::time::timeout(timeout, q.scan_prefix(&prefix))
        .await
        .map_err(|_| format!("SCAN inbox: no answer from Redis within {timeout:?}"))?
        .map_err(|e| format!("SCAN inbox: {e}"))?;
    Ok(all
        .into_iter()
        .filter(|k| {
            shape
                .entry_agents
                .iter()
                .any(|a| k.ends_with(&format!(":{a}")))
        })
        .collect())
}

/// Entries of `stream` from `from` (inclusive id, or `-`), paged.
async fn read_from(
    q: &dyn Queue,
    stream: &str,
    from: &str,
    timeout: Duration,
) -> Result<Vec<StreamEntry>, String> {
    let mut out = Vec::new();
    let mut from = from.to_owned();
    loop {
        let page = tokio::time::timeout(timeout, q.range(stream, &from, "+", 1000))
            .await
            .map_err(|_| format!("XRANGE {stream}: no answer from Redis within {timeout:?}"))?
            .map_err(|e| format!("XRANGE {stream}: {e}"))?;
        let Some(last) = page.last() else { break };
        from = format!("({}", last.id);
        let n = page.len();
        out.extend(page);
        if n < 1000 {
            break;
        }
    }
    Ok(out)
}

/// Read what every work stream got since the last read into the ledger.
async fn read_new(
    q: &dyn Queue,
    keys: &Keys,
    shape: &Shape,
    ledger: &Mutex<Ledger>,
    timeout: Duration,
) -> Result<(), String> {
    for s in &shape.streams {
        let from = {
            let l = ledger.lock().unwrap_or_else(|p| p.into_inner());
            l.cursor.get(s).cloned().unwrap_or_else(|| "-".into())
        };
        let entries = read_from(q, &keys.stream(s), &from, timeout).await?;
        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        for e in &entries {
            l.observe(s, *s == shape.entry, e);
        }
        if let Some(last) = entries.last() {
            l.cursor.insert(s.clone(), format!("({}", last.id));
        }
    }
    Ok(())
}

/// The tracker: the entry inbox at the start, then the streams every [`TRACK_EVERY`].
async fn track(
    q: Arc<dyn Queue>,
    keys: Keys,
    shape: Shape,
    ledger: Arc<Mutex<Ledger>>,
    timeout: Duration,
) {
    match entry_inbox(q.as_ref(), &keys, &shape, timeout).await {
        Ok(before) => {
            ledger
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .inbox_before = before.into_iter().collect();
        }
        Err(e) => {
            tracing::warn!(error = %e, "drill accounting: cannot read the inbox at the start")
        }
    }
    let mut tick = tokio::time::interval(TRACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = read_new(q.as_ref(), &keys, &shape, &ledger, timeout).await {
            tracing::debug!(error = %e, "drill accounting: cannot read the streams");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watch mappings (registered in `super::run`).

/// Whether a drill's change matters to its workflow's drill record (its runs and workflow;
/// the phase flipping to Running does not), remembered per drill.
#[derive(Default)]
pub struct RecordChanges(Mutex<HashMap<String, String>>);

impl RecordChanges {
    /// The workflow to reconcile when `d` changed what its record is made of.
    pub fn workflow_of(&self, d: &ChaosDrill) -> Option<ObjectRef<AgentWorkflow>> {
        let ns = d.namespace().unwrap_or_else(|| "default".into());
        let runs = d.status.as_ref().map_or(0, |s| s.runs.len());
        let last = d
            .status
            .as_ref()
            .and_then(|s| s.runs.last())
            .and_then(|r| r.finished_at.clone())
            .unwrap_or_default();
        let sig = format!(
            "{}|{runs}|{last}|{:?}",
            d.spec.workflow_ref,
            d.metadata.deletion_timestamp.is_some()
        );
        let k = format!("{ns}/{}", d.name_any());
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(k, sig.clone()).as_deref() == Some(sig.as_str()) {
            return None;
        }
        Some(ObjectRef::new(&d.spec.workflow_ref).within(&ns))
    }
}

/// The drills of `store` that target workflow `w` (a workflow appearing or changing its spec
/// changes what its drills validate against).
pub fn drills_of(store: &Store<ChaosDrill>, w: &AgentWorkflow) -> Vec<ObjectRef<ChaosDrill>> {
    let ns = w.namespace().unwrap_or_else(|| "default".into());
    let name = w.name_any();
    store
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(ns.as_str()) && d.spec.workflow_ref == name)
        .map(|d| ObjectRef::from_obj(&**d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::DurationStr;
    use crate::api::drill::{Fault, FaultType};

    fn t(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn fault(kind: FaultType) -> Fault {
        Fault {
            kind,
            tool: Some("bank".into()),
            agent: None,
            stream: None,
            after: None,
            for_: None,
            latency_ms: None,
            percent: None,
            error_rate: None,
            status_code: None,
            retry_after_seconds: None,
            count: None,
            max_per_second: None,
        }
    }

    #[test]
    fn a_task_routed_by_degraded_mode_is_in_a_tracked_stream() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/samples/payment-disputes.yaml"
        ))
        .expect("sample");
        let aw: crate::api::AgentWorkflow = serde_yaml::from_str(&text).expect("workflow");
        let shape = Shape::of("default", "payment-disputes", &aw.spec);
        assert!(
            shape.streams.contains("manual-review"),
            "{:?}",
            shape.streams
        );
        assert!(shape.streams.contains("tickets"));
    }

    fn spec(schedule: Option<&str>) -> ChaosDrillSpec {
        ChaosDrillSpec {
            workflow_ref: "wf".into(),
            schedule: schedule.map(str::to_owned),
            duration: DurationStr("10s".into()),
            baseline: None,
            faults: vec![fault(FaultType::ToolOutage)],
            guardrails: None,
            expect: None,
            suspend: false,
        }
    }

    fn inputs<'a>(
        spec: &'a ChaosDrillSpec,
        status: &'a ChaosDrillStatus,
        now: &str,
        running: bool,
    ) -> Inputs<'a> {
        Inputs {
            spec,
            status,
            created: Some(t("2026-11-30T02:00:00Z")),
            now: t(now),
            running,
            run_requested: None,
            abort_requested: None,
        }
    }

    fn act(i: &Inputs) -> Act {
        decide(i).expect("decision").act
    }

    fn ran_at(at: &str, phase: DrillPhase) -> ChaosDrillStatus {
        ChaosDrillStatus {
            phase: Some(phase),
            last_run_at: Some(at.into()),
            runs: vec![DrillRun {
                started_at: at.into(),
                finished_at: Some(at.into()),
                verdict: Some("Passed".into()),
                ..DrillRun::default()
            }],
            ..ChaosDrillStatus::default()
        }
    }

    #[test]
    fn without_a_schedule_it_runs_once() {
        let s = spec(None);
        let never = ChaosDrillStatus::default();
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T02:00:01Z", false)),
            Act::Start(Why::Once)
        );
        // Running here: nothing else starts.
        assert!(matches!(
            act(&inputs(&s, &never, "2026-11-30T02:00:01Z", true)),
            Act::Wait { .. }
        ));
        let done = ran_at("2026-11-30T02:00:01Z", DrillPhase::Succeeded);
        assert_eq!(
            act(&inputs(&s, &done, "2026-12-30T02:00:00Z", false)),
            Act::Wait {
                next: None,
                missed: None
            }
        );
    }

    #[test]
    fn a_cron_schedule_fires_at_each_time_and_only_once() {
        // Mondays 03:00 UTC; 2026-11-30 is a Monday.
        let s = spec(Some("0 3 * * 1"));
        let never = ChaosDrillStatus::default();
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T02:59:59Z", false)),
            Act::Wait {
                next: Some(t("2026-11-30T03:00:00Z")),
                missed: None
            }
        );
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T03:00:00.500Z", false)),
            Act::Start(Why::Schedule(t("2026-11-30T03:00:00Z")))
        );
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T03:00:59Z", false)),
            Act::Start(Why::Schedule(t("2026-11-30T03:00:00Z")))
        );
        // It ran at that fire time: not again, until the next Monday.
        let ran = ran_at("2026-11-30T03:00:00.600Z", DrillPhase::Succeeded);
        assert_eq!(
            act(&inputs(&s, &ran, "2026-11-30T03:00:30Z", false)),
            Act::Wait {
                next: Some(t("2026-12-07T03:00:00Z")),
                missed: None
            }
        );
        assert_eq!(
            act(&inputs(&s, &ran, "2026-12-07T03:00:10Z", false)),
            Act::Start(Why::Schedule(t("2026-12-07T03:00:00Z")))
        );
    }

    #[test]
    fn a_drill_created_after_a_fire_time_waits_for_the_next() {
        let s = spec(Some("0 3 * * 1"));
        let never = ChaosDrillStatus::default();
        let mut i = inputs(&s, &never, "2026-11-30T03:00:10Z", false);
        i.created = Some(t("2026-11-30T03:00:05Z"));
        assert_eq!(
            act(&i),
            Act::Wait {
                next: Some(t("2026-12-07T03:00:00Z")),
                missed: None
            }
        );
    }

    #[test]
    fn a_missed_window_is_skipped_not_queued() {
        let s = spec(Some("0 3 * * 1"));
        let never = ChaosDrillStatus::default();
        // The controller was down at 03:00 and comes back 61 s late.
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T03:01:01Z", false)),
            Act::Wait {
                next: Some(t("2026-12-07T03:00:00Z")),
                missed: Some(t("2026-11-30T03:00:00Z"))
            }
        );
        // Down for three weeks: one missed window reported (the latest), none run late.
        assert_eq!(
            act(&inputs(&s, &never, "2026-12-21T05:00:00Z", false)),
            Act::Wait {
                next: Some(t("2026-12-28T03:00:00Z")),
                missed: Some(t("2026-12-21T03:00:00Z"))
            }
        );
        // The previous run was still running at the fire time: skipped as well.
        let every_5 = spec(Some("*/5 * * * *"));
        let long = ran_at("2026-11-30T03:00:00Z", DrillPhase::Running);
        assert!(matches!(
            act(&inputs(&every_5, &long, "2026-11-30T03:05:00Z", true)),
            Act::Wait { .. }
        ));
        // It ends at 03:06:30, 90 s after the 03:05 fire time.
        let ended = ran_at("2026-11-30T03:00:00Z", DrillPhase::Succeeded);
        assert_eq!(
            act(&inputs(&every_5, &ended, "2026-11-30T03:06:30Z", false)),
            Act::Wait {
                next: Some(t("2026-11-30T03:10:00Z")),
                missed: Some(t("2026-11-30T03:05:00Z"))
            }
        );
        // Ending 30 s after it, the run still starts (within the grace).
        assert_eq!(
            act(&inputs(&every_5, &ended, "2026-11-30T03:05:30Z", false)),
            Act::Start(Why::Schedule(t("2026-11-30T03:05:00Z")))
        );
    }

    #[test]
    fn suspend_aborts_a_running_run_and_starts_none() {
        let mut s = spec(None);
        s.suspend = true;
        let never = ChaosDrillStatus::default();
        assert_eq!(
            act(&inputs(&s, &never, "2026-11-30T03:00:00Z", true)),
            Act::Abort("suspended".into())
        );
        assert!(matches!(
            act(&inputs(&s, &never, "2026-11-30T03:00:00Z", false)),
            Act::Wait { .. }
        ));
        let mut cron = spec(Some("0 3 * * 1"));
        cron.suspend = true;
        assert!(matches!(
            act(&inputs(&cron, &never, "2026-11-30T03:00:01Z", false)),
            Act::Wait { .. }
        ));
    }

    #[test]
    fn requests_are_served_once() {
        let s = spec(Some("0 3 * * 1"));
        let done = ran_at("2026-11-30T03:00:00Z", DrillPhase::Succeeded);
        let mut i = inputs(&s, &done, "2026-11-30T10:00:00Z", false);
        i.run_requested = Some("2026-11-30T09:59:59Z");
        let d = decide(&i).expect("decision");
        assert_eq!(
            (d.act, d.run_request),
            (Act::Start(Why::Request), Request::Served)
        );
        // Served: the same annotation does not start another run.
        let mut served = done.clone();
        served.last_run_request = Some("2026-11-30T09:59:59Z".into());
        let mut i = inputs(&s, &served, "2026-11-30T10:05:00Z", false);
        i.run_requested = Some("2026-11-30T09:59:59Z");
        let d = decide(&i).expect("decision");
        assert_eq!(d.run_request, Request::None);
        assert!(matches!(d.act, Act::Wait { .. }));
        // While running: never a second run; the request is not queued.
        i.run_requested = Some("2026-11-30T10:04:00Z");
        i.running = true;
        let d = decide(&i).expect("decision");
        assert!(matches!(d.run_request, Request::Ignored(_)));
        assert!(matches!(d.act, Act::Wait { .. }));
        // An abort request aborts the run in progress, once.
        i.run_requested = None;
        i.abort_requested = Some("2026-11-30T10:04:30Z");
        let d = decide(&i).expect("decision");
        assert_eq!(
            (d.act, d.abort_request),
            (Act::Abort("aborted by request".into()), Request::Served)
        );
        // With nothing running it is only marked served.
        i.running = false;
        let d = decide(&i).expect("decision");
        assert!(matches!(d.abort_request, Request::Ignored(_)));
        assert!(matches!(d.act, Act::Wait { .. }));
    }

    #[test]
    fn a_run_the_status_shows_running_but_no_task_runs_was_interrupted() {
        let s = spec(None);
        let st = ran_at("2026-11-30T03:00:00Z", DrillPhase::Running);
        assert_eq!(
            act(&inputs(&s, &st, "2026-11-30T03:05:00Z", false)),
            Act::Interrupted
        );
        assert!(matches!(
            act(&inputs(&s, &st, "2026-11-30T03:05:00Z", true)),
            Act::Wait { .. }
        ));
    }

    #[test]
    fn an_invalid_schedule_names_the_field() {
        let s = spec(Some("61 * * * *"));
        let e = decide(&inputs(
            &s,
            &ChaosDrillStatus::default(),
            "2026-11-30T03:00:00Z",
            false,
        ))
        .expect_err("invalid");
        assert!(e.starts_with("spec.schedule"), "{e}");
    }

    #[test]
    fn the_history_is_bounded_and_the_last_run_sets_phase_and_condition() {
        let mut st = ChaosDrillStatus::default();
        let now = t("2026-11-30T03:00:00Z");
        for i in 0..(HISTORY + 3) {
            let run = DrillRun {
                started_at: format!("run-{i}"),
                verdict: Some("Passed".into()),
                ..DrillRun::default()
            };
            record_run(&mut st, run, Verdict::Passed, Some(1), now);
        }
        assert_eq!(st.runs.len(), HISTORY);
        assert_eq!(st.runs[0].started_at, "run-3");
        assert_eq!(st.phase, Some(DrillPhase::Succeeded));
        let run = aborted_run("a".into(), "b".into(), INTERRUPTED);
        record_run(&mut st, run, Verdict::Aborted, Some(1), now);
        assert_eq!(st.phase, Some(DrillPhase::Aborted));
        assert_eq!(st.last_verdict.as_deref(), Some("Aborted"));
        let c = conditions::get(&st.conditions, LAST_RUN_CONDITION).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Aborted"));
        assert!(c.message.contains(INTERRUPTED), "{}", c.message);
        assert_eq!(st.runs.len(), HISTORY);
    }

    fn drill(name: &str, wf: &str, kinds: &[FaultType], runs: &[(&str, &str)]) -> ChaosDrill {
        let mut s = spec(None);
        s.workflow_ref = wf.into();
        s.faults = kinds.iter().map(|k| fault(*k)).collect();
        let mut d = ChaosDrill::new(name, s);
        d.metadata.namespace = Some("ns".into());
        d.status = Some(ChaosDrillStatus {
            runs: runs
                .iter()
                .map(|(end, verdict)| DrillRun {
                    started_at: (*end).into(),
                    finished_at: Some((*end).into()),
                    verdict: Some((*verdict).into()),
                    ..DrillRun::default()
                })
                .collect(),
            ..ChaosDrillStatus::default()
        });
        d
    }

    #[test]
    fn the_workflow_record_counts_distinct_failure_modes_of_completed_runs_in_90_days() {
        use FaultType::*;
        let now = t("2026-11-30T00:00:00Z");
        let a = drill(
            "a",
            "wf",
            &[ToolOutage, PodKill],
            &[("2026-11-01T00:00:00Z", "Passed")],
        );
        let b = drill(
            "b",
            "wf",
            &[ToolOutage, QueueThrottle],
            &[("2026-11-20T00:00:00Z", "Failed")],
        );
        // Too old, aborted, or another workflow's: no failure mode counted.
        let old = drill(
            "old",
            "wf",
            &[MessageCorruption],
            &[("2026-08-01T00:00:00Z", "Passed")],
        );
        let aborted = drill(
            "ab",
            "wf",
            &[AgentSlowdown],
            &[("2026-11-29T00:00:00Z", "Aborted")],
        );
        let other = drill(
            "o",
            "other",
            &[ToolErrors],
            &[("2026-11-29T12:00:00Z", "Passed")],
        );
        let all = [&a, &b, &old, &aborted, &other];
        let r = workflow_record("wf", &all, now).expect("record");
        assert_eq!(r.failure_modes_90d, 3, "{r:?}");
        // The newest finished run, whatever its verdict.
        assert_eq!(r.last_verdict.as_deref(), Some("Aborted"));
        assert_eq!(r.last_drill.as_deref(), Some("ab"));
        assert_eq!(r.last_run_at.as_deref(), Some("2026-11-29T00:00:00Z"));
        assert_eq!(workflow_record("none", &all, now), None);
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> StreamEntry {
        StreamEntry {
            id: id.into(),
            fields: crate::queue::fields(fields.iter().map(|(k, v)| (*k, v.to_string()))),
            delivery_count: 0,
        }
    }

    #[test]
    fn a_second_output_of_one_step_is_a_duplicate_a_replay_is_not() {
        let mut l = Ledger::default();
        l.observe("tickets", true, &entry("1-0", &[("task_id", "t1")]));
        l.observe("sorted", false, &entry("2-0", &[("task_id", "t1")]));
        // The same entry read again (two reads overlapping) is not a second output.
        l.observe("sorted", false, &entry("2-0", &[("task_id", "t1")]));
        // A replay from the DLQ is a new round.
        l.observe(
            "sorted",
            false,
            &entry("3-0", &[("task_id", "t1"), ("replays", "1")]),
        );
        assert_eq!(l.duplicates, 0);
        l.observe("sorted", false, &entry("4-0", &[("task_id", "t1")]));
        assert_eq!(l.duplicates, 1);
        assert_eq!(l.entered, BTreeSet::from(["t1".to_owned()]));
    }

    #[test]
    fn lost_is_neither_completed_nor_dead_nor_in_flight() {
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let a = tally(
            &set(&["a", "b", "c", "d"]),
            &set(&["a"]),
            &set(&["b"]),
            &set(&["c"]),
            2,
        );
        assert_eq!(
            a,
            Accounting {
                tasks_processed: 1,
                tasks_lost: 1,
                duplicate_effects: 2
            }
        );
    }
}
