//! The run loop of `r4 run`: start every role of a workflow in this process on the real engine
//! (agent roles with simulated agents, the tool proxy with simulated tools, intake, repair),
//! feed it tasks, wait until every task is accounted for, and measure.
//!
//! Accounting is done from the outside: a task is *completed* when a terminal simulated agent
//! finished it, *dead-lettered* when its id sits in the DLQ or poison stream, *routed* when
//! degraded mode sent it to a stream no agent consumes (manual review); anything else is
//! *lost*. Duplicated effects come from the simulated tools' ledger.
//!
//! On the embedded queue the whole run happens on tokio's paused clock: simulated latencies,
//! backoffs, breaker open durations and replay delays are real timers in virtual time, so ten
//! minutes of traffic take seconds and a run is repeatable with `--seed`. On a real Redis the
//! clock is the wall clock.
//!
//! Faults enter through [`FaultSource`] (what each simulated tool consults on every call), so a
//! drill can be layered onto this loop without changing it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;

use super::report::{self, Percentiles, RunReport};
use super::sim::{EffectLedger, FaultSource, NoFaults};
use super::simagent::{Finished, SimAgent};
use super::simtool::SimTool;
use crate::api::validate::{FieldError, Manifest};
use crate::api::workflow::ToolSpec;
use crate::engine::stats::Stats;
use crate::engine::tools::{self, ToolProxy};
use crate::engine::{
    AgentOptions, AgentRole, EngineError, Intake, RepairRole, WorkflowConfig, dlq,
};
use crate::queue::{Queue, QueueError};
use crate::resilience::BreakerState;

/// A policy mechanism that `--disable` switches off in every policy, to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    Hedge,
    Retry,
    Breaker,
    Bulkhead,
    Throttle,
    Fallback,
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Tasks to submit.
    pub tasks: u64,
    /// Open-loop submission rate (tasks/s); `None`: closed loop, as many in flight as the
    /// entry agent can take.
    pub rate: Option<f64>,
    /// Seed of every random draw of the simulation.
    pub seed: u64,
    /// Draw a progress bar on standard error.
    pub progress: bool,
    /// `virtual` or `real`, for the report.
    pub clock: &'static str,
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
                Mechanism::Fallback => {}
            }
        }
    }
    if disable.contains(&Mechanism::Fallback) {
        for t in &mut cfg.spec.tools {
            t.fallback = None;
        }
    }
    Ok(cfg)
}

fn seed_for(seed: u64, n: u64) -> u64 {
    seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

/// Everything the run started, to read counters from and to stop.
struct Running {
    proxy: Arc<ToolProxy>,
    agent_stats: Vec<Arc<Stats>>,
    repair_stats: Option<Arc<Stats>>,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn sum(&self, f: impl Fn(&crate::engine::stats::Counters) -> u64) -> u64 {
        self.agent_stats
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
    faults: Arc<dyn FaultSource>,
) -> Result<Running, RunError> {
    let origin = Instant::now();
    let mut sims: BTreeMap<String, Arc<SimTool>> = BTreeMap::new();
    for (i, t) in cfg.spec.tools.iter().enumerate() {
        let tool = SimTool::new(
            t,
            seed_for(opts.seed, 100 + i as u64),
            origin,
            ledger.clone(),
            faults.clone(),
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
    let mut agent_stats = Vec::new();
    let consumed: BTreeSet<&str> = cfg
        .spec
        .agents
        .iter()
        .map(|a| a.consumes.as_str())
        .collect();
    for (i, a) in cfg.spec.agents.iter().enumerate() {
        // The end of the workflow: nothing this agent produces is consumed by another agent
        // (it may still publish to a sink stream, e.g. an archive).
        let terminal = a.produces.iter().all(|s| !consumed.contains(s.as_str()));
        let sim = SimAgent::new(
            a,
            seed_for(opts.seed, i as u64),
            proxy.clone(),
            finished.clone(),
            ledger.clone(),
        )
        .map_err(|e| RunError::Invalid(FieldError::new(format!("spec.agents[{i}].simulate"), e)))?
        .terminal(terminal);
        let sim = Arc::new(sim);
        let replicas = a.replicas.unwrap_or(1).max(1) as u64;
        for r in 0..replicas {
            let options = AgentOptions {
                jitter_seed: Some(seed_for(opts.seed, 1000 + 100 * i as u64 + r)),
                ..Default::default()
            };
            let role = AgentRole::new(
                cfg.clone(),
                &a.name,
                queue.clone(),
                sim.clone(),
                &format!("{}-{r}", a.name),
            )?
            .with_options(options);
            agent_stats.push(role.stats());
            let rx = stop_rx.clone();
            handles.push(tokio::spawn(async move {
                if let Err(e) = role.run(rx).await {
                    tracing::error!(error = %e, "agent role stopped");
                }
            }));
        }
    }
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
        agent_stats,
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
}

async fn account(
    cfg: &WorkflowConfig,
    q: &dyn Queue,
    repair: bool,
) -> Result<Accounting, QueueError> {
    let mut acc = Accounting::default();
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
            }
            if !rec.task_id.is_empty() {
                acc.dead.insert(rec.task_id);
            }
        }
    }
    let consumed: BTreeSet<&str> = cfg.agents.iter().map(|a| a.consumes.as_str()).collect();
    let sinks: BTreeSet<&str> = cfg
        .agents
        .iter()
        .filter_map(|a| a.degraded.as_ref().and_then(|d| d.to.as_deref()))
        .filter(|s| !consumed.contains(s))
        .collect();
    for s in sinks {
        for e in &read_all(q, &keys.stream(s)).await? {
            if let Some(id) = e
                .field(crate::engine::task::TASK_ID)
                .and_then(|v| std::str::from_utf8(v).ok())
            {
                acc.routed.insert(id.to_string());
            }
        }
    }
    Ok(acc)
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

/// Run the workflow: submit `opts.tasks` tasks, wait until each is completed, dead-lettered or
/// routed (and no automatic replay is still due), stop every role, and report.
pub async fn run(
    cfg: WorkflowConfig,
    queue: Arc<dyn Queue>,
    opts: &RunOptions,
    mut on_progress: impl FnMut(&Progress),
) -> Result<RunReport, RunError> {
    let cfg = Arc::new(cfg);
    let ledger = Arc::new(EffectLedger::new());
    let finished = Arc::new(Finished::default());
    let faults: Arc<dyn FaultSource> = Arc::new(NoFaults);
    let mut running = start(&cfg, &queue, opts, &finished, &ledger, faults)?;
    let intake = Intake::new(cfg.clone(), queue.clone(), "intake-0");
    let repair = running.repair_stats.is_some();

    let t0 = Instant::now();
    // Closed loop: as many tasks in flight as the agents together can work on, so the pipeline
    // stays busy without queueing (queueing would show up as latency that is not the agents').
    let window = cfg
        .spec
        .agents
        .iter()
        .map(|a| a.replicas.unwrap_or(1).max(1) as u64 * a.concurrency.unwrap_or(16).max(1) as u64)
        .sum::<u64>()
        .max(1);
    let mut submitted: HashMap<String, Instant> = HashMap::with_capacity(opts.tasks as usize);
    let mut order: Vec<String> = Vec::with_capacity(opts.tasks as usize);
    let replay = &cfg.policy.replay;
    let horizon = replay
        .backoff
        .saturating_mul((1u32 << replay.max_replays.min(16)).saturating_sub(1))
        + cfg.visibility_timeout * 2
        + Duration::from_secs(60);
    let wall = std::time::Instant::now();
    let wall_limit = Duration::from_secs(600);
    let mut submit_done_at: Option<Instant> = None;
    let mut last_exact = Accounting::default();
    let tick = Duration::from_millis(100);
    loop {
        // Submit what is due: open loop at `rate`, or closed loop within `window`.
        while (submitted.len() as u64) < opts.tasks {
            let n = submitted.len() as u64;
            let due = match opts.rate {
                Some(rate) => t0.elapsed().as_secs_f64() * rate >= n as f64,
                None => {
                    let done = finished.len() as u64 + running.sum(|c| c.dead_lettered + c.routed);
                    n.saturating_sub(done) < window
                }
            };
            if !due {
                break;
            }
            let key = format!("r4-run-{}-{n}", opts.seed);
            let payload = serde_json::json!({"n": n, "dispute": format!("D-{n:06}")});
            let (task_id, _) = match intake.submit(payload, Some(&key), None).await {
                Ok(t) => t,
                // Backpressure (`queue.maxLen`): submit again on a later tick.
                Err(QueueError::Full { .. }) => break,
                Err(e) => {
                    return Err(RunError::Engine(EngineError::Io(format!(
                        "intake refused task {n}: {e}"
                    ))));
                }
            };
            submitted.entry(task_id.clone()).or_insert_with(|| {
                order.push(task_id);
                Instant::now()
            });
        }
        if submit_done_at.is_none() && submitted.len() as u64 >= opts.tasks {
            submit_done_at = Some(Instant::now());
        }
        let dlq_now = running
            .sum(|c| c.dead_lettered)
            .saturating_sub(running.sum(|c| c.replays));
        let routed_now = running.sum(|c| c.routed);
        on_progress(&Progress {
            submitted: submitted.len() as u64,
            total: opts.tasks,
            completed: finished.len() as u64,
            dead_lettered: dlq_now,
            elapsed: t0.elapsed(),
            breakers: running.proxy.breaker_states(),
        });
        if let Some(done_at) = submit_done_at {
            let approx = finished.len() as u64 + dlq_now + routed_now;
            if approx >= opts.tasks || done_at.elapsed() > horizon {
                last_exact = account(&cfg, queue.as_ref(), repair).await?;
                let accounted = order
                    .iter()
                    .filter(|id| {
                        finished.finished_at(id).is_some()
                            || last_exact.dead.contains(*id)
                            || last_exact.routed.contains(*id)
                    })
                    .count() as u64;
                // Every task is accounted for; automatic replays still due are waited for up to
                // the replay horizon in virtual time, but at most 30 s of a real clock.
                let all = accounted >= opts.tasks;
                let replays_due = last_exact.awaiting_replay > 0;
                let waited_enough =
                    opts.clock == "real" && done_at.elapsed() > Duration::from_secs(30);
                let settled = all && (!replays_due || waited_enough);
                if settled || done_at.elapsed() > horizon || wall.elapsed() > wall_limit {
                    break;
                }
            }
        }
        if wall.elapsed() > wall_limit {
            break;
        }
        tokio::time::sleep(tick).await;
    }
    let elapsed = t0.elapsed();

    // Safe stop, as a pod would: stop taking tasks, let in-flight work finish.
    let _ = running.stop.send(true);
    for h in std::mem::take(&mut running.handles) {
        let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
    }

    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| RunError::Engine(EngineError::Config(format!("histogram: {e}"))))?;
    let slo = cfg.spec.slo.as_ref();
    let deadline = slo
        .and_then(|s| s.p95_latency_ms)
        .map(|ms| Duration::from_millis(ms.max(0) as u64));
    let (mut completed, mut late, mut last_finish) = (0u64, 0u64, Duration::ZERO);
    let (mut dead, mut routed) = (0u64, 0u64);
    for id in &order {
        if let (Some(at), Some(sub)) = (finished.finished_at(id), submitted.get(id)) {
            completed += 1;
            let e2e = at.saturating_duration_since(*sub);
            let _ = hist.record((e2e.as_micros() as u64).max(1));
            if deadline.is_some_and(|d| e2e > d) {
                late += 1;
            }
            last_finish = last_finish.max(at.saturating_duration_since(t0));
        } else if last_exact.dead.contains(id) {
            dead += 1;
        } else if last_exact.routed.contains(id) {
            routed += 1;
        }
    }
    let submitted_n = order.len() as u64;
    let lost = submitted_n - completed - dead - routed;
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
    let policy = running.proxy.counters();
    let sum_policy =
        |f: fn(&crate::resilience::CountersSnapshot) -> u64| policy.values().map(f).sum::<u64>();
    let failed_for_cost = dead + routed + lost + late;
    let report = RunReport {
        submitted: submitted_n,
        completed,
        dead_lettered: dead,
        lost,
        duplicate_effects: ledger.duplicate_effects(),
        tasks_per_sec,
        // Success is the cost model's: completed within `slo.p95LatencyMs`.
        slo: report::slo(
            completed.saturating_sub(late),
            submitted_n,
            latency.p95,
            slo,
        ),
        latency_ms: latency,
        retries: running.sum(|c| c.retries) + sum_policy(|c| c.retries),
        hedges: sum_policy(|c| c.hedges),
        breaker_trips: sum_policy(|c| c.breaker_trips),
        replays: running.sum(|c| c.replays),
        incident_cost: report::incident_cost(
            failed_for_cost,
            submitted_n,
            tasks_per_sec,
            cfg.spec.economics.as_ref(),
        ),
        drill: None,
        routed,
        late,
        fallbacks: sum_policy(|c| c.fallbacks),
        effects: ledger.effects(),
        elapsed_seconds: elapsed.as_secs_f64(),
        wall_seconds: wall.elapsed().as_secs_f64(),
        clock: opts.clock.to_string(),
    };
    Ok(report)
}

/// A progress sample, for the live view.
#[derive(Clone, Debug)]
pub struct Progress {
    pub submitted: u64,
    pub total: u64,
    pub completed: u64,
    pub dead_lettered: u64,
    pub elapsed: Duration,
    pub breakers: BTreeMap<String, BreakerState>,
}
