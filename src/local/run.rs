//! The run loop of `r4 run`: start every role of a workflow in this process on the real engine
//! (agent roles with simulated agents, the tool proxy with simulated tools, intake, repair),
//! feed it tasks, wait until every task is accounted for, and measure.
//!
//! Accounting is done from the outside, per task:
//! - *completed* when every terminal agent reachable from the entry stream finished it (each
//!   branch of a fan-out; [`WorkflowConfig::terminal_agents`]), at the instant the last did;
//! - else *dead-lettered* when its id sits in the DLQ or poison stream (one dead branch is
//!   enough); else *routed* when degraded mode sent it to a stream no agent consumes;
//! - else, when the run ended without it: *paused* when it waits in the stream of an agent
//!   that degraded mode paused, *in flight* when it waits (or is being worked on) anywhere
//!   else, and *lost* only when it is in no stream and no DLQ at all.
//!
//! Duplicated effects come from the simulated tools' ledger.
//!
//! The load is the workflow's own traffic ([`Load`]): an open loop at
//! `economics.tasksPerMinute / 60` tasks/s when that is set, a closed loop otherwise. A run
//! that cannot finish (a paused agent, a loop in the graph) ends within a bounded virtual time
//! ([`RunReport::unfinished_because`] says why).
//!
//! On the embedded queue the whole run happens on tokio's paused clock: simulated latencies,
//! backoffs, breaker open durations and replay delays are real timers in virtual time, so ten
//! minutes of traffic take seconds and a run is repeatable with `--seed`. On a real Redis the
//! clock is the wall clock.
//!
//! With a drill (`--drill`, [`RunOptions::drill`]) the drill's runner ([`crate::engine::drill::run`])
//! runs as a task beside this loop, on the same clock (virtual on the embedded queue, the wall
//! clock on Redis): it injects its faults into the queue, where the engines of this run follow
//! and apply them, crashes engine tasks through the [`Fleet`] for a PodKill, and asks this run's
//! own accounting for lost tasks and duplicate effects ([`super::drill::LocalTarget`]). The load
//! has to flow for the whole drill (baseline, fault timeline, recovery), so with a drill and no
//! task count the loop submits for as long as the drill runs — open loop at its rate, closed loop
//! within its window — and stops submitting when the drill has ended; with a task count it
//! submits that many, however long the drill still goes on (a count too small for the drill
//! leaves the drill without traffic to measure). Either way the run ends only after the drill
//! has ended and the tasks have settled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;

use super::drill::{LocalDrill, LocalTarget, Submitted};
use super::fleet::Fleet;
use super::report::{self, Percentiles, RunReport};
use super::sim::EffectLedger;
use super::simagent::{Finished, SimAgent};
use super::simtool::SimTool;
use crate::api::validate::{FieldError, Manifest};
use crate::api::workflow::ToolSpec;
use crate::engine::delivery::Delivery;
use crate::engine::drill::{self as drill_run, DrillEvent, Outcome, Plan};
use crate::engine::stats::Stats;
use crate::engine::tools::{self, ToolProxy};
use crate::engine::{EngineError, Intake, RepairRole, WorkflowConfig, dlq};
use crate::queue::{Queue, QueueError};
use crate::resilience::BreakerState;

/// A policy mechanism that `--disable` switches off in every policy, to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    /// Tool hedging (the policies' `hedge`).
    Hedge,
    /// Agent-level hedging (`agents[].hedge`, the shadow agent).
    AgentHedge,
    Retry,
    Breaker,
    Bulkhead,
    Throttle,
    Fallback,
}

/// How tasks are offered to the workflow.
#[derive(Clone, Debug, PartialEq)]
pub enum Load {
    /// Submit at `rate` tasks/s whatever happens downstream (traffic does not wait for an
    /// outage to end). `source` says where the rate came from, for the report.
    Open { rate: f64, source: String },
    /// Keep as many tasks unsettled as the agents together can work on; a task counts as
    /// settled when it completed, was routed or was dead-lettered for good (a DLQ entry the
    /// repair role will still replay is not settled).
    Closed { source: String },
}

impl Load {
    /// The load model as the report states it (`window`: the closed loop's bound).
    pub fn report(&self, window: u64) -> report::LoadReport {
        match self {
            Load::Open { rate, source } => report::LoadReport {
                model: "open".into(),
                tasks_per_sec: Some(*rate),
                max_in_flight: None,
                source: source.clone(),
            },
            Load::Closed { source } => report::LoadReport {
                model: "closed".into(),
                tasks_per_sec: None,
                max_in_flight: Some(window),
                source: source.clone(),
            },
        }
    }

    /// The workflow's own traffic, unless the command line says otherwise: `--rate` wins, then
    /// `--closed-loop`, then `spec.economics.tasksPerMinute`, else a closed loop.
    pub fn choose(
        cfg: &WorkflowConfig,
        rate: Option<f64>,
        closed_loop: bool,
    ) -> Result<Load, RunError> {
        if let Some(rate) = rate {
            return Ok(Load::Open {
                rate,
                source: "--rate".into(),
            });
        }
        if closed_loop {
            return Ok(Load::Closed {
                source: "--closed-loop".into(),
            });
        }
        match cfg.spec.economics.as_ref().and_then(|e| e.tasks_per_minute) {
            Some(tpm) if tpm.is_finite() && tpm > 0.0 => Ok(Load::Open {
                rate: tpm / 60.0,
                source: format!("economics.tasksPerMinute {tpm}"),
            }),
            Some(tpm) => Err(RunError::Invalid(FieldError::new(
                "spec.economics.tasksPerMinute",
                format!(
                    "must be > 0 to set r4 run's load, got {tpm} (or pass --rate or --closed-loop)"
                ),
            ))),
            None => Ok(Load::Closed {
                source: "no economics.tasksPerMinute".into(),
            }),
        }
    }
}

/// Tasks a run submits when not told (and it runs no drill).
pub const DEFAULT_TASKS: u64 = 2000;

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Tasks to submit. `None`: [`DEFAULT_TASKS`], or with a drill, as many as the load offers
    /// until the drill has ended.
    pub tasks: Option<u64>,
    /// How tasks are offered.
    pub load: Load,
    /// Seed of every random draw of the simulation.
    pub seed: u64,
    /// Draw a progress bar on standard error.
    pub progress: bool,
    /// `virtual` or `real`, for the report.
    pub clock: &'static str,
    /// A ChaosDrill to run against the workflow meanwhile.
    pub drill: Option<LocalDrill>,
}

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
}

/// Resolve the manifests for a local run: the workflow and its policies, every agent and tool
/// simulated, `disable`d mechanisms switched off. Errors name the field.
pub fn prepare(
    manifests: &[Manifest],
    workflow: Option<&str>,
    namespace: &str,
    disable: &[Mechanism],
) -> Result<WorkflowConfig, RunError> {
    let mut cfg = WorkflowConfig::from_manifests(manifests, workflow, Some(namespace))?;
    for (i, a) in cfg.spec.agents.iter().enumerate() {
        if a.simulate.is_none() {
            return Err(RunError::Invalid(FieldError::new(
                format!("spec.agents[{i}].simulate"),
                format!(
                    "required by r4 run: agent {:?} has no image to run here, describe it with a simulate block",
                    a.name
                ),
            )));
        }
    }
    for (i, t) in cfg.spec.tools.iter().enumerate() {
        if t.simulate.is_none() {
            return Err(RunError::Invalid(FieldError::new(
                format!("spec.tools[{i}].simulate"),
                format!(
                    "required by r4 run: tool {:?} is not called for real here, describe it with a simulate block",
                    t.name
                ),
            )));
        }
    }
    if let Some(ks) = &cfg.spec.kill_switches {
        let engaged = ks
            .all
            .then(|| "spec.killSwitches.all".to_string())
            .or_else(|| {
                ks.agents
                    .iter()
                    .find(|(_, on)| **on)
                    .map(|(a, _)| format!("spec.killSwitches.agents.{a}"))
            });
        if let Some(path) = engaged {
            return Err(RunError::Invalid(FieldError::new(
                path,
                "engaged: the stopped agents would take no task and the run could not finish; release it to rehearse",
            )));
        }
    }
    for (name, p) in cfg.policies.iter_mut() {
        let _ = name;
        for m in disable {
            match m {
                Mechanism::Hedge => p.hedge = None,
                Mechanism::Retry => p.retry = None,
                Mechanism::Breaker => p.circuit_breaker = None,
                Mechanism::Bulkhead => p.bulkhead = None,
                Mechanism::Throttle => p.throttle = None,
                Mechanism::Fallback | Mechanism::AgentHedge => {}
            }
        }
    }
    if disable.contains(&Mechanism::Fallback) {
        for t in &mut cfg.spec.tools {
            t.fallback = None;
        }
    }
    if disable.contains(&Mechanism::AgentHedge) {
        for a in &mut cfg.spec.agents {
            a.hedge = None;
        }
        for a in &mut cfg.agents {
            a.hedge = None;
        }
    }
    Ok(cfg)
}

pub(super) fn seed_for(seed: u64, n: u64) -> u64 {
    seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

/// Everything the run started, to read counters from and to stop.
struct Running {
    proxy: Arc<ToolProxy>,
    sims: BTreeMap<String, Arc<SimTool>>,
    /// The agents' engines (killed ones' counts included).
    fleet: Arc<Fleet>,
    repair_stats: Option<Arc<Stats>>,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn sum(&self, f: impl Fn(&crate::engine::stats::Counters) -> u64) -> u64 {
        self.fleet
            .stats()
            .iter()
            .chain(self.repair_stats.iter())
            .map(|s| f(&s.counters()))
            .sum()
    }
}

fn start(
    cfg: &Arc<WorkflowConfig>,
    queue: &Arc<dyn Queue>,
    opts: &RunOptions,
    finished: &Arc<Finished>,
    ledger: &Arc<EffectLedger>,
) -> Result<Running, RunError> {
    let origin = Instant::now();
    let mut sims: BTreeMap<String, Arc<SimTool>> = BTreeMap::new();
    for (i, t) in cfg.spec.tools.iter().enumerate() {
        let tool = SimTool::new(
            t,
            seed_for(opts.seed, 100 + i as u64),
            origin,
            ledger.clone(),
        )
        .map_err(|e| RunError::Invalid(FieldError::new(format!("spec.tools[{i}].simulate"), e)))?;
        sims.insert(t.name.clone(), Arc::new(tool));
    }
    let transport = |t: &ToolSpec| match sims.get(&t.name) {
        Some(s) => s.transport(),
        // Unreachable after prepare(); a refusing transport keeps it a tool failure, not a panic.
        None => {
            let name = t.name.clone();
            tower::util::BoxCloneService::new(tower::service_fn(move |_| {
                let name = name.clone();
                async move {
                    Err::<crate::resilience::HttpResponse, _>(
                        format!("tool {name} is not simulated").into(),
                    )
                }
            }))
        }
    };
    let proxy = Arc::new(cfg.tool_proxy(&transport, None, Some(opts.seed))?);
    let (stop, stop_rx) = watch::channel(false);
    let mut handles = Vec::new();
    handles.push(tokio::spawn(tools::supervise(
        proxy.clone(),
        queue.clone(),
        cfg.clone(),
        "r4-run".into(),
        stop_rx.clone(),
    )));
    let terminal: BTreeSet<&str> = cfg
        .terminal_agents()
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    let mut deliveries: BTreeMap<String, Arc<dyn Delivery>> = BTreeMap::new();
    for (i, a) in cfg.spec.agents.iter().enumerate() {
        let terminal = terminal.contains(a.name.as_str());
        let sim = SimAgent::new(
            a,
            seed_for(opts.seed, i as u64),
            proxy.clone(),
            finished.clone(),
            ledger.clone(),
        )
        .map_err(|e| RunError::Invalid(FieldError::new(format!("spec.agents[{i}].simulate"), e)))?
        .terminal(terminal);
        deliveries.insert(a.name.clone(), Arc::new(sim));
    }
    let fleet = Fleet::new(cfg.clone(), queue.clone(), opts.seed, deliveries);
    fleet.start_all()?;
    let repair_stats = if cfg.spec.repair.as_ref().is_some_and(|r| r.enabled) {
        let role = RepairRole::new(cfg.clone(), queue.clone(), "repair-0");
        let stats = role.stats();
        let rx = stop_rx.clone();
        handles.push(tokio::spawn(async move {
            if let Err(e) = role.run(rx).await {
                tracing::error!(error = %e, "repair role stopped");
            }
        }));
        Some(stats)
    } else {
        None
    };
    Ok(Running {
        proxy,
        sims,
        fleet,
        repair_stats,
        stop,
        handles,
    })
}

/// What the streams say about the submitted tasks.
#[derive(Default)]
struct Accounting {
    dead: BTreeSet<String>,
    routed: BTreeSet<String>,
    /// DLQ entries the repair role will still replay automatically.
    awaiting_replay: usize,
    /// DLQ and poison entries that stay where they are (no automatic replay due).
    for_good: usize,
}

/// The DLQ and poison streams: which tasks are dead, and how many DLQ entries the repair role
/// will still replay.
async fn account_dead(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
    repair: bool,
    acc: &mut Accounting,
) -> Result<(), QueueError> {
    let keys = &cfg.keys;
    let replay = &cfg.policy.replay;
    for (stream, is_dlq) in [(keys.dlq(), true), (keys.poison(), false)] {
        for e in &read_all(q, &stream).await? {
            let rec = dlq::DlqRecord::decode(e);
            if is_dlq
                && repair
                && replay.automatic
                && rec.replayable
                && rec.replays < replay.max_replays
            {
                acc.awaiting_replay += 1;
            } else {
                acc.for_good += 1;
            }
            if !rec.task_id.is_empty() {
                acc.dead.insert(rec.task_id);
            }
        }
    }
    Ok(())
}

async fn account(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
    repair: bool,
) -> Result<Accounting, QueueError> {
    let mut acc = Accounting::default();
    account_dead(cfg, q, repair, &mut acc).await?;
    let consumed: BTreeSet<&str> = cfg.agents.iter().map(|a| a.consumes.as_str()).collect();
    let sinks: BTreeSet<&str> = cfg
        .agents
        .iter()
        .filter_map(|a| a.degraded.as_ref().and_then(|d| d.to.as_deref()))
        .filter(|s| !consumed.contains(s))
        .collect();
    for s in sinks {
        for e in &read_all(q, &keys_stream(cfg, s)).await? {
            if let Some(id) = task_id_of(e) {
                acc.routed.insert(id.to_string());
            }
        }
    }
    Ok(acc)
}

fn keys_stream(cfg: &WorkflowConfig, stream: &str) -> String {
    cfg.keys.stream(stream)
}

fn task_id_of(e: &crate::queue::StreamEntry) -> Option<&str> {
    e.field(crate::engine::task::TASK_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Every entry of `stream`, paged with exclusive bounds so no page is too large.
async fn read_all(
    q: &dyn Queue,
    stream: &str,
) -> Result<Vec<crate::queue::StreamEntry>, QueueError> {
    let mut out = Vec::new();
    let mut from = "-".to_string();
    loop {
        let page = q.range(stream, &from, "+", 1000).await?;
        let Some(last) = page.last() else { break };
        from = format!("({}", last.id);
        out.extend(page);
    }
    Ok(out)
}

/// Where the tasks that did not settle wait: for each, the agents whose input stream holds it
/// and which have not finished their step of it (no inbox key).
async fn waiting_at(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
    unsettled: &BTreeSet<&str>,
) -> Result<BTreeMap<String, BTreeSet<String>>, QueueError> {
    let mut at: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if unsettled.is_empty() {
        return Ok(at);
    }
    for a in &cfg.agents {
        for e in &read_all(q, &keys_stream(cfg, &a.consumes)).await? {
            let Some(id) = task_id_of(e) else { continue };
            if !unsettled.contains(id) || at.get(id).is_some_and(|s| s.contains(&a.name)) {
                continue;
            }
            if q.get(&cfg.keys.inbox(id, &a.name)).await?.is_none() {
                at.entry(id.to_string()).or_default().insert(a.name.clone());
            }
        }
    }
    Ok(at)
}

/// How many of `ids` are nowhere now: not completed, not in the DLQ, poison or a routing
/// sink, and waiting in no agent's stream — counted while the run goes on (a drill's
/// accounting). Tasks move between streams while they are read, so what one pass misses is
/// looked for again: a task is lost only if [`LOST_PASSES`] passes in a row find it nowhere.
pub(super) async fn lost_now(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
    finished: &Finished,
    ids: &[String],
    repair: bool,
) -> Result<u64, QueueError> {
    let mut missing: BTreeSet<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| finished.finished_at(id).is_none())
        .collect();
    for _ in 0..LOST_PASSES {
        if missing.is_empty() {
            break;
        }
        let exact = account(cfg, q, repair).await?;
        missing.retain(|id| {
            finished.finished_at(id).is_none()
                && !exact.dead.contains(*id)
                && !exact.routed.contains(*id)
        });
        let waits = waiting_at(cfg, q, &missing).await?;
        missing.retain(|id| !waits.contains_key(*id));
    }
    Ok(missing.len() as u64)
}

/// Passes of [`lost_now`]: a task in transit is found by the next pass at the latest.
const LOST_PASSES: usize = 3;

/// Agents degraded mode has paused now, each with the reason (`degraded mode Pause (…)`).
async fn paused_agents(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
) -> Result<BTreeMap<String, String>, QueueError> {
    let mut out = BTreeMap::new();
    for a in &cfg.agents {
        if let Some(d) = crate::engine::degraded::current(q, &cfg.keys, &a.name).await?
            && d.action == crate::api::workflow::DegradedAction::Pause
        {
            out.insert(
                a.name.clone(),
                format!("degraded mode Pause, {} down", d.tools.join(", ")),
            );
        }
    }
    Ok(out)
}

/// The live view's arithmetic: `done` counts settled tasks, never goes backwards, never
/// reaches the total before the run has ended (so the bar stays below 100% while replays are
/// due), and the rate is the current one (over the last second), not the average since start.
#[derive(Debug)]
pub struct ProgressMeter {
    total: u64,
    done: u64,
    /// (elapsed, completed) over the last second or so.
    recent: std::collections::VecDeque<(Duration, u64)>,
}

impl ProgressMeter {
    /// Over what span the current rate is measured.
    pub const RATE_WINDOW: Duration = Duration::from_secs(1);

    pub fn new(total: u64) -> Self {
        Self {
            total,
            done: 0,
            recent: Default::default(),
        }
    }

    /// A new sample at `at`: `settled` tasks are done for good (completed, routed, or
    /// dead-lettered with no replay due), `completed` of them completed. Returns
    /// (done, completions per second over the last [`Self::RATE_WINDOW`]).
    pub fn observe(&mut self, at: Duration, settled: u64, completed: u64) -> (u64, f64) {
        self.done = self.done.max(settled.min(self.total.saturating_sub(1)));
        self.recent.push_back((at, completed));
        while self
            .recent
            .get(1)
            .is_some_and(|(t, _)| at.saturating_sub(*t) >= Self::RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let rate = match self.recent.front() {
            Some((t, c)) if at > *t => {
                completed.saturating_sub(*c) as f64 / (at - *t).as_secs_f64()
            }
            _ => 0.0,
        };
        (self.done, rate)
    }
}

/// One tick's view of the run, kept for the timeline.
#[derive(Clone, Debug)]
struct Sample {
    at: Duration,
    /// Dead-letterings and routings so far (events, a replayed task may count again).
    dead_lettered: u64,
    routed: u64,
    /// Tasks in the DLQ or poison stream now.
    dlq_depth: u64,
    breakers: BTreeMap<String, BreakerState>,
}

/// Run the workflow: submit the tasks (all of `opts.tasks`, or with a drill and no count, for
/// as long as the drill runs), wait until each is completed, dead-lettered or routed (and no
/// automatic replay is still due) and the drill has ended — or until the run cannot get further
/// within its bound — stop every role, and report.
pub async fn run(
    cfg: WorkflowConfig,
    queue: Arc<dyn Queue>,
    opts: &RunOptions,
    mut on_progress: impl FnMut(&Progress),
) -> Result<RunReport, RunError> {
    let cfg = Arc::new(cfg);
    let ledger = Arc::new(EffectLedger::new());
    let terminal: Vec<String> = cfg
        .terminal_agents()
        .iter()
        .map(|a| a.name.clone())
        .collect();
    let finished = Arc::new(Finished::new(terminal));
    let plan = match &opts.drill {
        Some(d) => {
            let id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_millis() as u64);
            Some(drill_run::plan(&d.name, &d.spec, id).map_err(RunError::Invalid)?)
        }
        None => None,
    };
    // The task count, if any: without a drill the default; with one, none unless given.
    let limit = match (opts.tasks, &plan) {
        (Some(n), _) => Some(n),
        (None, None) => Some(DEFAULT_TASKS),
        (None, Some(_)) => None,
    };
    let mut running = start(&cfg, &queue, opts, &finished, &ledger)?;
    let intake = Intake::new(cfg.clone(), queue.clone(), "intake-0");
    let repair = running.repair_stats.is_some();

    let t0 = Instant::now();
    let shared_ids: Submitted = Arc::default();
    let mut drill = plan.map(|plan| {
        let target = LocalTarget {
            fleet: running.fleet.clone(),
            cfg: cfg.clone(),
            queue: queue.clone(),
            finished: finished.clone(),
            ledger: ledger.clone(),
            submitted: shared_ids.clone(),
            repair,
        };
        DrillTask::spawn(plan, target, queue.clone(), cfg.keys.clone())
    });
    // Closed loop: as many tasks in flight as the agents together can work on, so the pipeline
    // stays busy without queueing (queueing would show up as latency that is not the agents').
    let window = cfg
        .spec
        .agents
        .iter()
        .map(|a| a.replicas.unwrap_or(1).max(1) as u64 * a.concurrency.unwrap_or(16).max(1) as u64)
        .sum::<u64>()
        .max(1);
    let capacity = limit.unwrap_or(0) as usize;
    let mut submitted: HashMap<String, Instant> = HashMap::with_capacity(capacity);
    let mut order: Vec<String> = Vec::with_capacity(capacity);
    let replay = &cfg.policy.replay;
    // How long the run waits for tasks to settle once nothing more is submitted (every replay
    // of a DLQ entry, two visibility timeouts of redelivery, a minute of slack), and how long a
    // closed loop waits for a task to settle before it offers the rest of the tasks at once.
    let horizon = replay
        .backoff
        .saturating_mul((1u32 << replay.max_replays.min(16)).saturating_sub(1))
        + cfg.visibility_timeout * 2
        + Duration::from_secs(60);
    let wall = std::time::Instant::now();
    // A drill adds its own length (a real clock runs it in real time).
    let wall_limit = Duration::from_secs(600) + drill.as_ref().map_or(Duration::ZERO, |d| d.span);
    let mut submit_done_at: Option<Instant> = None;
    // Backpressure (`queue.maxLen`) refusing every submission since…
    let mut full_since: Option<Instant> = None;
    let mut flood = false;
    let (mut last_settled, mut last_change) = (0u64, Instant::now());
    let mut dead_view = Accounting::default();
    let mut dead_read_at: Option<Instant> = None;
    let mut meter = ProgressMeter::new(limit.unwrap_or(u64::MAX));
    let mut samples: Vec<Sample> = Vec::new();
    let mut wall_out = false;
    let tick = Duration::from_millis(100);
    loop {
        // The drill's end: submissions without a count stop, settling begins.
        let drill_over = match &mut drill {
            Some(d) => d.poll_end().await?,
            None => true,
        };
        // What has settled, as far as cheap counters tell (the exact count reads the streams).
        let completed_now = finished.len() as u64;
        let dead_events = running.sum(|c| c.dead_lettered);
        let dead_now = dead_events.saturating_sub(running.sum(|c| c.replays));
        let routed_now = running.sum(|c| c.routed);
        if dead_now == 0 {
            dead_view = Accounting::default();
        } else if dead_read_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            dead_view = Accounting::default();
            account_dead(&cfg, queue.as_ref(), repair, &mut dead_view).await?;
            dead_read_at = Some(Instant::now());
        }
        // Dead-lettered since the last read: not settled until a read says no replay is due.
        let dead_for_good = dead_now.min(dead_view.for_good as u64);
        let settled = (completed_now + routed_now + dead_for_good).min(order.len() as u64);
        if settled != last_settled {
            (last_settled, last_change) = (settled, Instant::now());
        }

        // Submit what is due: open loop at `rate`, or closed loop within `window` — up to the
        // count, or without one until the drill has ended.
        let may_submit = |n: u64| match limit {
            Some(l) => n < l,
            None => !drill_over,
        };
        while may_submit(order.len() as u64) {
            let n = order.len() as u64;
            let due = match &opts.load {
                Load::Open { rate, .. } => t0.elapsed().as_secs_f64() * rate >= n as f64,
                Load::Closed { .. } => flood || n.saturating_sub(settled) < window,
            };
            if !due {
                break;
            }
            let key = format!("r4-run-{}-{n}", opts.seed);
            let payload = serde_json::json!({"n": n, "dispute": format!("D-{n:06}")});
            let (task_id, _) = match intake.submit(payload, Some(&key), None).await {
                Ok(t) => t,
                // Backpressure (`queue.maxLen`): submit again on a later tick.
                Err(QueueError::Full { .. }) => {
                    full_since.get_or_insert_with(Instant::now);
                    break;
                }
                Err(e) => {
                    return Err(RunError::Engine(EngineError::Io(format!(
                        "intake refused task {n}: {e}"
                    ))));
                }
            };
            full_since = None;
            last_change = Instant::now();
            if let std::collections::hash_map::Entry::Vacant(v) = submitted.entry(task_id.clone()) {
                v.insert(Instant::now());
                if drill.is_some() {
                    crate::resilience::lock(&shared_ids).push(task_id.clone());
                }
                order.push(task_id);
            }
        }
        // A closed loop whose tasks stopped settling (a paused agent, a loop) offers the rest
        // at once: every task is submitted, and the report says where each one waits. (Without
        // a count there is no rest to offer.)
        if matches!(opts.load, Load::Closed { .. })
            && limit.is_some()
            && last_change.elapsed() > horizon
        {
            flood = true;
        }
        let refused_too_long = full_since.is_some_and(|t| t.elapsed() > horizon);
        if submit_done_at.is_none() && (!may_submit(order.len() as u64) || refused_too_long) {
            submit_done_at = Some(Instant::now());
        }
        if let Some(d) = &mut drill {
            let applied = running.proxy.faults_applied() + running.sum(|c| c.faults_applied);
            if d.applied.last().is_none_or(|(_, n)| *n != applied) {
                d.applied.push((t0.elapsed(), applied));
            }
        }
        let breakers = running.proxy.breaker_states();
        samples.push(Sample {
            at: t0.elapsed(),
            dead_lettered: dead_events,
            routed: routed_now,
            dlq_depth: dead_now,
            breakers: breakers.clone(),
        });
        let (done, tasks_per_sec) = meter.observe(t0.elapsed(), settled, completed_now);
        on_progress(&Progress {
            submitted: order.len() as u64,
            total: limit.unwrap_or(order.len() as u64),
            done: done.min(order.len() as u64),
            completed: completed_now,
            dead_lettered: dead_now,
            replays_due: dead_view.awaiting_replay as u64,
            tasks_per_sec,
            elapsed: t0.elapsed(),
            breakers,
            drill: drill.as_ref().and_then(|d| d.last_event()),
        });
        // Settling counts from the later of the last submission and the drill's end.
        if let Some(done_at) = submit_done_at.filter(|_| drill_over) {
            let done_at = drill
                .as_ref()
                .and_then(|d| d.ended_at)
                .map_or(done_at, |e| e.max(done_at));
            let over = done_at.elapsed() > horizon;
            if settled >= order.len() as u64 || over {
                let exact = account(&cfg, queue.as_ref(), repair).await?;
                let all = order.iter().all(|id| {
                    finished.finished_at(id).is_some()
                        || exact.dead.contains(id)
                        || exact.routed.contains(id)
                });
                // Every task is accounted for; automatic replays still due are waited for up to
                // the horizon in virtual time, but at most 30 s of a real clock.
                let replays_due = exact.awaiting_replay > 0;
                let waited_enough =
                    opts.clock == "real" && done_at.elapsed() > Duration::from_secs(30);
                if (all && (!replays_due || waited_enough)) || over {
                    break;
                }
            }
        }
        if wall.elapsed() > wall_limit {
            wall_out = true;
            break;
        }
        tokio::time::sleep(tick).await;
    }
    // A drill still going (the wall-clock bound) is aborted: its faults are cleared now.
    let drill_report = match drill.take() {
        Some(d) => Some(d.finish(t0, &running.fleet).await?),
        None => None,
    };
    let elapsed = t0.elapsed();
    // Read before the roles stop: a stopping role may clear its degraded state.
    let paused = paused_agents(&cfg, queue.as_ref()).await?;

    // Safe stop, as a pod would: stop taking tasks, let in-flight work finish.
    let _ = running.stop.send(true);
    let mut handles = std::mem::take(&mut running.handles);
    handles.extend(running.fleet.stop());
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
    }
    let exact = account(&cfg, queue.as_ref(), repair).await?;

    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| RunError::Engine(EngineError::Config(format!("histogram: {e}"))))?;
    let slo = cfg.spec.slo.as_ref();
    let deadline = slo
        .and_then(|s| s.p95_latency_ms)
        .map(|ms| Duration::from_millis(ms.max(0) as u64));
    let (mut completed, mut late, mut last_finish) = (0u64, 0u64, Duration::ZERO);
    let (mut dead, mut routed) = (0u64, 0u64);
    // (completion instant since t0, late?) of each completed task, for the timeline.
    let mut completions: Vec<(Duration, bool)> = Vec::with_capacity(order.len());
    let mut unsettled: BTreeSet<&str> = BTreeSet::new();
    for id in &order {
        if let (Some(at), Some(sub)) = (finished.finished_at(id), submitted.get(id)) {
            completed += 1;
            let e2e = at.saturating_duration_since(*sub);
            let _ = hist.record((e2e.as_micros() as u64).max(1));
            let is_late = deadline.is_some_and(|d| e2e > d);
            if is_late {
                late += 1;
            }
            let since = at.saturating_duration_since(t0);
            completions.push((since, is_late));
            last_finish = last_finish.max(since);
        } else if exact.dead.contains(id) {
            dead += 1;
        } else if exact.routed.contains(id) {
            routed += 1;
        } else {
            unsettled.insert(id.as_str());
        }
    }
    let waits = waiting_at(&cfg, queue.as_ref(), &unsettled).await?;
    let (mut n_paused, mut n_in_flight, mut lost) = (0u64, 0u64, 0u64);
    let mut paused_by: BTreeMap<&str, u64> = BTreeMap::new();
    for id in &unsettled {
        match waits.get(*id) {
            None => lost += 1,
            Some(agents) => match agents.iter().find(|a| paused.contains_key(*a)) {
                Some(a) => {
                    n_paused += 1;
                    *paused_by.entry(a.as_str()).or_default() += 1;
                }
                None => n_in_flight += 1,
            },
        }
    }
    let submitted_n = order.len() as u64;
    let not_submitted = limit.map_or(0, |l| l.saturating_sub(submitted_n));
    let ms = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let latency = Percentiles {
        p50: ms(0.5),
        p95: ms(0.95),
        p99: ms(0.99),
        p999: ms(0.999),
    };
    let busy = if last_finish.is_zero() {
        elapsed
    } else {
        last_finish
    };
    let tasks_per_sec = if busy.is_zero() {
        0.0
    } else {
        completed as f64 / busy.as_secs_f64()
    };

    // Why the run ended without settling everything, in one line.
    let unfinished_because = {
        let mut parts = Vec::new();
        if n_paused > 0 {
            let who: Vec<String> = paused_by
                .keys()
                .map(|a| format!("agent {a}: {}", paused.get(*a).cloned().unwrap_or_default()))
                .collect();
            parts.push(format!("{n_paused} paused ({})", who.join("; ")));
        }
        if n_in_flight > 0 {
            let why = if cfg.terminal_agents().is_empty() {
                " (the graph has no end: every agent's output is read by another agent)"
            } else {
                ""
            };
            parts.push(format!("{n_in_flight} in flight{why}"));
        }
        if not_submitted > 0 {
            parts.push(format!(
                "{not_submitted} not submitted (the intake refused them: queue.maxLen backpressure)"
            ));
        }
        let stuck = n_paused + n_in_flight + not_submitted;
        (stuck > 0).then(|| {
            let within = if wall_out {
                format!("{} of wall-clock time", fmt_duration(wall.elapsed()))
            } else {
                format!(
                    "{} of {} time",
                    fmt_duration(elapsed),
                    clock_word(opts.clock)
                )
            };
            format!(
                "{stuck} tasks did not finish within {within}: {}",
                parts.join(", ")
            )
        })
    };

    let policy = running.proxy.counters();
    let tools: BTreeMap<String, report::ToolFigures> = policy
        .iter()
        .map(|(name, c)| {
            let requests = running.sims.get(name).map_or(0, |s| s.requests());
            (
                name.clone(),
                report::ToolFigures::from_counters(c, requests),
            )
        })
        .collect();
    let mut agents: BTreeMap<String, report::AgentFigures> = cfg
        .agents
        .iter()
        .map(|a| (a.name.clone(), report::AgentFigures::default()))
        .collect();
    for s in &running.fleet.stats() {
        let Some(name) = &s.agent else { continue };
        let c = s.counters();
        let f = agents.entry(name.clone()).or_default();
        // The engine counts every delivery the agent answered; `retries` are the failed ones
        // delivered again.
        f.deliveries += c.deliveries;
        f.redeliveries += c.retries;
        f.completed += c.completed;
        f.dead_lettered += c.dead_lettered;
        f.routed += c.routed;
    }
    for (name, h) in running.fleet.hedges() {
        let f = agents.entry(name).or_default();
        let hedging = f.hedging.get_or_insert_with(Default::default);
        hedging.hedges += h.sent.load(std::sync::atomic::Ordering::Relaxed);
        hedging.shadow_deliveries += h
            .shadow_deliveries
            .load(std::sync::atomic::Ordering::Relaxed);
        hedging.shadow_wins += h.shadow_wins.load(std::sync::atomic::Ordering::Relaxed);
    }
    for f in agents.values_mut() {
        let deliveries = f.deliveries;
        if let Some(h) = &mut f.hedging {
            h.extra_work = if deliveries == 0 {
                0.0
            } else {
                h.shadow_deliveries as f64 / deliveries as f64
            };
        }
    }
    let timeline = timeline(&samples, &completions, elapsed);
    // Every submitted task that did not complete within the SLO latency failed, whatever became
    // of it (dead-lettered, routed, late, paused, in flight or lost): the SLO line and the cost
    // model use this one rule, so they cannot disagree.
    let in_time = completed.saturating_sub(late);
    let failed = (submitted_n + not_submitted).saturating_sub(in_time);
    let report = RunReport {
        submitted: submitted_n,
        completed,
        dead_lettered: dead,
        lost,
        duplicate_effects: ledger.duplicate_effects(),
        tasks_per_sec,
        slo: report::slo(in_time, submitted_n + not_submitted, latency.p95, slo),
        latency_ms: latency,
        retries: tools.values().map(|t| t.retries).sum(),
        redeliveries: agents.values().map(|a| a.redeliveries).sum(),
        hedges: tools.values().map(|t| t.hedges).sum(),
        breaker_trips: policy.values().map(|c| c.breaker_trips).sum(),
        replays: running.sum(|c| c.replays),
        incident_cost: report::incident_cost(
            failed,
            submitted_n + not_submitted,
            tasks_per_sec,
            cfg.spec.economics.as_ref(),
        ),
        drill: drill_report,
        routed,
        paused: n_paused,
        in_flight: n_in_flight,
        not_submitted,
        unfinished_because,
        late,
        fallbacks: tools.values().map(|t| t.fallbacks).sum(),
        effects: ledger.effects(),
        load: opts.load.report(window),
        tools,
        agents,
        timeline,
        elapsed_seconds: elapsed.as_secs_f64(),
        wall_seconds: wall.elapsed().as_secs_f64(),
        clock: opts.clock.to_string(),
    };
    Ok(report)
}

fn clock_word(clock: &str) -> &'static str {
    if clock == "real" { "real" } else { "virtual" }
}

/// `1h2m3s`, `10m0s`, `42s`, `1.5s` (Go's style, as people read durations in logs).
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else if d.subsec_millis() > 0 && secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{s}s")
    }
}

/// The run in ten slices of its virtual duration: completions per second, the share of
/// outcomes that were failures (late completions, dead-letterings, routings), the worst
/// breaker state per tool, and the DLQ depth at the end of the slice.
fn timeline(
    samples: &[Sample],
    completions: &[(Duration, bool)],
    elapsed: Duration,
) -> Vec<report::TimelineSlice> {
    const SLICES: u32 = 10;
    if elapsed.is_zero() {
        return Vec::new();
    }
    let width = elapsed / SLICES;
    let mut out = Vec::with_capacity(SLICES as usize);
    let (mut prev_dead, mut prev_routed, mut prev_depth) = (0u64, 0u64, 0u64);
    let mut carried: BTreeMap<String, BreakerState> = BTreeMap::new();
    for i in 0..SLICES {
        let from = width * i;
        let to = if i + 1 == SLICES {
            elapsed
        } else {
            width * (i + 1)
        };
        let inside = |t: Duration| t >= from && (t < to || (i + 1 == SLICES && t <= to));
        let (mut done, mut late) = (0u64, 0u64);
        for (t, is_late) in completions {
            if inside(*t) {
                done += 1;
                late += u64::from(*is_late);
            }
        }
        let here: Vec<&Sample> = samples.iter().filter(|s| inside(s.at)).collect();
        let (dead, routed, depth) = here
            .last()
            .map_or((prev_dead, prev_routed, prev_depth), |s| {
                (s.dead_lettered, s.routed, s.dlq_depth)
            });
        let dead_delta = dead.saturating_sub(prev_dead);
        let routed_delta = routed.saturating_sub(prev_routed);
        (prev_dead, prev_routed, prev_depth) = (dead, routed, depth);
        let mut breakers: BTreeMap<String, BreakerState> = BTreeMap::new();
        for s in &here {
            for (tool, st) in &s.breakers {
                let worst = breakers.entry(tool.clone()).or_insert(*st);
                if severity(*st) > severity(*worst) {
                    *worst = *st;
                }
            }
        }
        match here.last() {
            // No sample in a slice (a very short run): the state the last one ended in.
            None => breakers = carried.clone(),
            Some(last) => carried = last.breakers.clone(),
        }
        let outcomes = done + dead_delta + routed_delta;
        let failures = late + dead_delta + routed_delta;
        let secs = to.saturating_sub(from).as_secs_f64();
        out.push(report::TimelineSlice {
            from_seconds: from.as_secs_f64(),
            to_seconds: to.as_secs_f64(),
            tasks_per_sec: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            failure_rate: (outcomes > 0).then(|| failures as f64 / outcomes as f64),
            dlq_depth: depth,
            breakers: breakers
                .into_iter()
                .map(|(t, s)| (t, s.label().to_string()))
                .collect(),
        });
    }
    out
}

fn severity(s: BreakerState) -> u8 {
    match s {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// A progress sample, for the live view.
#[derive(Clone, Debug)]
pub struct Progress {
    pub submitted: u64,
    pub total: u64,
    /// Tasks settled for good (completed, routed, or dead-lettered with no replay due); never
    /// goes backwards, stays below `total` while the run goes on.
    pub done: u64,
    /// Tasks every terminal agent finished.
    pub completed: u64,
    /// Tasks in the DLQ or poison stream now.
    pub dead_lettered: u64,
    /// DLQ entries the repair role will still replay.
    pub replays_due: u64,
    /// Completions per second over the last second.
    pub tasks_per_sec: f64,
    pub elapsed: Duration,
    pub breakers: BTreeMap<String, BreakerState>,
    /// The drill's latest moment (`30.0 s fault started: ToolOutage bank-api`), with a drill.
    pub drill: Option<String>,
}

/// The drill's runner as a task beside the run loop, and what it has said so far.
struct DrillTask {
    plan: Plan,
    /// How long the drill may take ([`Plan::longest`]).
    span: Duration,
    handle: Option<tokio::task::JoinHandle<Outcome>>,
    outcome: Option<Outcome>,
    /// When the runner returned.
    ended_at: Option<Instant>,
    events: Arc<std::sync::Mutex<Vec<(Duration, DrillEvent)>>>,
    abort: watch::Sender<Option<String>>,
    /// How many times the engines had applied a fault, from the start of the run, at each
    /// change seen by the run loop (the proxy's and the agent roles' counts together).
    applied: Vec<(Duration, u64)>,
}

impl DrillTask {
    fn spawn(plan: Plan, target: LocalTarget, q: Arc<dyn Queue>, keys: crate::queue::Keys) -> Self {
        let span = plan.longest();
        let (abort, abort_rx) = watch::channel(None);
        let events: Arc<std::sync::Mutex<Vec<(Duration, DrillEvent)>>> = Arc::default();
        let seen = events.clone();
        let p = plan.clone();
        let handle = tokio::spawn(async move {
            let mut on_event = move |at: Duration, e: &DrillEvent| {
                crate::resilience::lock(&seen).push((at, e.clone()));
            };
            drill_run::run(q, keys, p, &target, abort_rx, &mut on_event).await
        });
        Self {
            plan,
            span,
            handle: Some(handle),
            outcome: None,
            ended_at: None,
            events,
            abort,
            applied: vec![(Duration::ZERO, 0)],
        }
    }

    /// Whether the runner has returned (its outcome taken if it just did).
    async fn poll_end(&mut self) -> Result<bool, RunError> {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            self.take().await?;
        }
        Ok(self.outcome.is_some())
    }

    async fn take(&mut self) -> Result<(), RunError> {
        if let Some(h) = self.handle.take() {
            let outcome = h.await.map_err(|e| {
                RunError::Engine(EngineError::Io(format!("the drill's runner failed: {e}")))
            })?;
            self.outcome = Some(outcome);
            self.ended_at = Some(Instant::now());
        }
        Ok(())
    }

    /// `30.0 s fault started: ToolOutage bank-api`.
    fn last_event(&self) -> Option<String> {
        let events = crate::resilience::lock(&self.events);
        let (at, e) = events.last()?;
        let what = match e {
            DrillEvent::BaselineStarted => "baseline".to_string(),
            DrillEvent::FaultStarted { index } => {
                format!(
                    "fault started: {}",
                    super::drill::describe(&self.plan, *index)
                )
            }
            DrillEvent::FaultEnded { index } => {
                format!(
                    "fault ended: {}",
                    super::drill::describe(&self.plan, *index)
                )
            }
            DrillEvent::PodsKilled { agent, killed, .. } => format!("{killed} {agent} killed"),
            DrillEvent::Aborted { reason } => format!("aborted: {reason}"),
            DrillEvent::Recovered => "recovered".into(),
            DrillEvent::Finished { verdict } => verdict.as_str().to_string(),
        };
        Some(format!("{:.1} s {what}", at.as_secs_f64()))
    }

    /// The drill's report; a runner still going is aborted first (its faults cleared).
    async fn finish(mut self, t0: Instant, fleet: &Fleet) -> Result<report::DrillReport, RunError> {
        if self.handle.is_some() {
            let _ = self
                .abort
                .send(Some("r4 run reached its wall-clock limit".into()));
            let h = self
                .handle
                .as_mut()
                .map(|h| tokio::time::timeout(DRILL_ABORT_WAIT, h));
            if let Some(waited) = h
                && waited.await.is_err()
            {
                if let Some(h) = self.handle.take() {
                    h.abort();
                }
                return Err(RunError::Engine(EngineError::Io(format!(
                    "the drill did not end within {} of its abort",
                    fmt_duration(DRILL_ABORT_WAIT)
                ))));
            }
            self.take().await?;
        }
        let Some(outcome) = &self.outcome else {
            return Err(RunError::Engine(EngineError::Io(
                "the drill's runner gave no outcome".into(),
            )));
        };
        let kills: Vec<(Duration, super::fleet::FleetEvent)> = fleet
            .log()
            .into_iter()
            .map(|(at, e)| (at.saturating_duration_since(t0), e))
            .collect();
        Ok(super::drill::report(
            &self.plan,
            outcome,
            &kills,
            &self.applied,
        ))
    }
}

/// How long an aborted drill may take to clear its faults and return.
const DRILL_ABORT_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn progress_counts_tasks_and_never_goes_backwards_or_past_the_total() {
        let mut m = ProgressMeter::new(100);
        assert_eq!(m.observe(secs(1.0), 40, 30).0, 40);
        // A replay took a DLQ entry back: fewer settled now, the bar stays where it was.
        assert_eq!(m.observe(secs(2.0), 35, 32).0, 40);
        // Double counting (a task routed on one branch, dead on another) never passes the
        // total, and the bar stays below 100% until the run has ended.
        assert_eq!(m.observe(secs(3.0), 130, 90).0, 99);
    }

    #[test]
    fn progress_rate_is_the_current_one() {
        let mut m = ProgressMeter::new(10_000);
        let mut rate = 0.0;
        // 1,000 tasks/s for 10 s …
        for i in 1..=100u64 {
            rate = m.observe(secs(i as f64 / 10.0), i * 100, i * 100).1;
        }
        assert!((rate - 1000.0).abs() < 1e-6, "{rate}");
        // … then nothing for 2 s: the current rate is 0, not the average since start.
        for i in 101..=120u64 {
            rate = m.observe(secs(i as f64 / 10.0), 10_000, 10_000).1;
        }
        assert_eq!(rate, 0.0);
        rate = m.observe(secs(12.1), 10_050, 10_050).1;
        assert!((rate - 50.0).abs() < 1e-6, "{rate}");
    }

    fn sample(at: f64, dead: u64, depth: u64, bank: BreakerState) -> Sample {
        Sample {
            at: secs(at),
            dead_lettered: dead,
            routed: 0,
            dlq_depth: depth,
            breakers: [("bank".to_string(), bank)].into(),
        }
    }

    #[test]
    fn the_timeline_shows_an_outage_as_a_shape() {
        // 100 s of run; completions at 10/s except 40..60 s, where the bank is down, tasks are
        // dead-lettered and the breaker is open.
        let mut samples = Vec::new();
        let mut completions = Vec::new();
        let mut dead = 0;
        for tenth in 0..1000u64 {
            let t = tenth as f64 / 10.0;
            let outage = (40.0..60.0).contains(&t);
            if outage {
                dead += 1;
            } else {
                completions.push((secs(t), false));
            }
            let state = if outage {
                BreakerState::Open
            } else {
                BreakerState::Closed
            };
            samples.push(sample(t, dead, if outage { dead } else { 0 }, state));
        }
        let tl = timeline(&samples, &completions, secs(100.0));
        assert_eq!(tl.len(), 10);
        for (i, s) in tl.iter().enumerate() {
            let outage = i == 4 || i == 5;
            assert_eq!(
                s.breakers["bank"],
                if outage { "open" } else { "closed" },
                "{i}"
            );
            assert_eq!(s.failure_rate, Some(if outage { 1.0 } else { 0.0 }), "{i}");
            assert_eq!(s.tasks_per_sec, if outage { 0.0 } else { 10.0 }, "{i}");
        }
        assert_eq!(tl[4].dlq_depth, 100);
        assert_eq!(tl[6].dlq_depth, 0);
    }

    fn cfg(economics: &str) -> WorkflowConfig {
        let text = format!(
            "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {{name: g}}\nspec:\n  queue: {{redis: {{url: \"redis://x\"}}}}\n  agents:\n    - {{name: a, image: i, consumes: in}}\n{economics}"
        );
        WorkflowConfig::from_yaml("s", &text, None, None).unwrap()
    }

    #[test]
    fn the_default_load_is_the_workflows_own_traffic() {
        let tpm = cfg(
            "  economics: {marginPerTask: 0.1, remediationCostPerFailure: 1, tasksPerMinute: 2000}\n",
        );
        let Load::Open { rate, source } = Load::choose(&tpm, None, false).unwrap() else {
            panic!("open loop expected");
        };
        assert!((rate - 2000.0 / 60.0).abs() < 1e-9);
        assert_eq!(source, "economics.tasksPerMinute 2000");
        assert!(
            matches!(Load::choose(&tpm, Some(5.0), false), Ok(Load::Open { rate, .. }) if rate == 5.0)
        );
        assert!(matches!(
            Load::choose(&tpm, None, true),
            Ok(Load::Closed { .. })
        ));
        assert!(matches!(
            Load::choose(&cfg(""), None, false),
            Ok(Load::Closed { .. })
        ));
        let zero = cfg(
            "  economics: {marginPerTask: 0.1, remediationCostPerFailure: 1, tasksPerMinute: 0}\n",
        );
        let err = Load::choose(&zero, None, false).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.economics.tasksPerMinute: must be > 0"),
            "{err}"
        );
    }

    #[test]
    fn durations_read_like_go() {
        assert_eq!(fmt_duration(secs(600.0)), "10m0s");
        assert_eq!(fmt_duration(secs(3725.0)), "1h2m5s");
        assert_eq!(fmt_duration(secs(42.0)), "42s");
        assert_eq!(fmt_duration(secs(1.5)), "1.5s");
    }
}
