//! `r4 run --drill`: a ChaosDrill against the local run. This module owns what is local about
//! it — reading and checking the drill file against the workflow being run, the
//! [`DrillTarget`] of a local run (PodKill crashes engine tasks through the [`Fleet`]; the
//! accounting is the run's own, from the streams, the DLQ and the simulated tools' ledger), and
//! turning the run's [`Outcome`] into the report's [`DrillReport`] with its timeline.
//!
//! The run itself (plan, faults in Redis, guardrails, measurement, verdict) is
//! [`crate::engine::drill`]'s, the same code the controller runs; the engines apply the faults
//! ([`crate::engine::faults`]). How the drill and the load share the clock is
//! [`super::run`]'s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::fleet::{Fleet, FleetEvent};
use super::report::{DrillMoment, DrillReport, FaultApplied};
use super::sim::EffectLedger;
use super::simagent::Finished;
use crate::api::drill::{ChaosDrillSpec, FaultType};
use crate::api::validate::{Manifest, RefMode, check_drill, validate_texts};
use crate::engine::WorkflowConfig;
use crate::engine::drill::{Accounting, DrillEvent, DrillTarget, FaultAction, Outcome, Plan};
use crate::queue::Queue;
use crate::resilience::lock;

/// A drill to run against the local workflow.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalDrill {
    /// `metadata.name`.
    pub name: String,
    pub spec: ChaosDrillSpec,
}

/// Read the drill in `text` (from `source`) and check it against `cfg`, the workflow being run.
/// Errors are lines naming the field (`DRILL.yaml#0: ChaosDrill/x: spec.faults[0].tool: …`),
/// the first the one to show.
pub fn load(source: &str, text: &str, cfg: &WorkflowConfig) -> Result<LocalDrill, Vec<String>> {
    let report = validate_texts(&[(source.to_string(), text.to_string())], RefMode::Warn);
    if !report.errors.is_empty() {
        return Err(report.errors);
    }
    let mut drills = Vec::new();
    for (at, m) in report.manifests {
        match m {
            Manifest::Drill(d) => drills.push((at, d)),
            other => {
                return Err(vec![format!(
                    "{at}: kind: expected a ChaosDrill, got {}/{}",
                    other.kind(),
                    other.name()
                )]);
            }
        }
    }
    let (at, drill) = match drills.len() {
        1 => drills.remove(0),
        n => {
            return Err(vec![format!(
                "{source}: expected one ChaosDrill, found {n}"
            )]);
        }
    };
    let name = drill.metadata.name.clone().unwrap_or_default();
    let label = format!("{at}: ChaosDrill/{name}");
    if drill.spec.workflow_ref != cfg.name {
        return Err(vec![format!(
            "{label}: spec.workflowRef: names workflow {:?} but r4 run runs {:?}",
            drill.spec.workflow_ref, cfg.name
        )]);
    }
    let errors = check_drill(&drill.spec, Some(&cfg.spec));
    if !errors.is_empty() {
        return Err(errors.iter().map(|e| format!("{label}: {e}")).collect());
    }
    Ok(LocalDrill {
        name,
        spec: drill.spec.clone(),
    })
}

/// The task ids a run has submitted, in order (shared with its [`LocalTarget`]).
pub type Submitted = Arc<Mutex<Vec<String>>>;

/// What the drill runner asks of a local run: crash engines, count from the outside.
pub struct LocalTarget {
    pub fleet: Arc<Fleet>,
    pub cfg: Arc<WorkflowConfig>,
    pub queue: Arc<dyn Queue>,
    pub finished: Arc<Finished>,
    pub ledger: Arc<EffectLedger>,
    pub submitted: Submitted,
    /// Whether the repair role runs (a DLQ entry it will replay is not settled).
    pub repair: bool,
}

impl DrillTarget for LocalTarget {
    fn kill_pods<'a>(&'a self, agent: &'a str, count: u32) -> BoxFuture<'a, Result<u32, String>> {
        Box::pin(async move { Ok(self.fleet.kill(agent, count)) })
    }

    fn account(&self) -> BoxFuture<'_, Result<Accounting, String>> {
        Box::pin(async move {
            let ids = lock(&self.submitted).clone();
            let lost = super::run::lost_now(
                &self.cfg,
                self.queue.as_ref(),
                &self.finished,
                &ids,
                self.repair,
            )
            .await
            .map_err(|e| format!("cannot count lost tasks: {e}"))?;
            Ok(Accounting {
                tasks_processed: self.finished.len() as u64,
                tasks_lost: lost,
                duplicate_effects: self.ledger.duplicate_effects(),
            })
        })
    }
}

/// One line describing fault `index` of `plan` (`ToolOutage bank-api`, `PodKill investigation ×1`).
pub fn describe(plan: &Plan, index: usize) -> String {
    let Some(f) = plan.faults.get(index) else {
        return format!("fault {index}");
    };
    match &f.action {
        FaultAction::PodKill { agent, count } => format!("PodKill {agent} ×{count}"),
        FaultAction::Inject(r) => {
            let target = r
                .tool
                .as_deref()
                .or(r.stream.as_deref())
                .or(r.agent.as_deref())
                .unwrap_or("-");
            let mut s = format!("{:?} {target}", r.kind);
            if let Some(ms) = r.latency_ms {
                s.push_str(&format!(" +{ms} ms"));
            }
            if let Some(e) = r.error_rate {
                s.push_str(&format!(" {:.0}% errors", e * 100.0));
                if let Some(code) = r.status_code {
                    s.push_str(&format!(" ({code})"));
                }
            }
            if let Some(m) = r.max_per_second {
                s.push_str(&format!(" ≤{m}/s"));
            }
            if r.percent < 100.0 || r.kind == FaultType::MessageCorruption {
                s.push_str(&format!(" on {}%", r.percent));
            }
            s
        }
    }
}

/// The report of a finished drill run. `fleet` holds the engine kills and restarts, `applied`
/// the engines' count of applied faults at each change, both at their offsets from the start of
/// the run.
pub fn report(
    plan: &Plan,
    outcome: &Outcome,
    fleet: &[(Duration, FleetEvent)],
    applied: &[(Duration, u64)],
) -> DrillReport {
    let mut moments: Vec<DrillMoment> = Vec::new();
    // PodsKilled names no fault: the k-th kill of an agent is its k-th PodKill of the plan.
    let mut kills: Vec<(usize, &str)> = plan
        .faults
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match &f.action {
            FaultAction::PodKill { agent, .. } => Some((i, agent.as_str())),
            FaultAction::Inject(_) => None,
        })
        .collect();
    kills.sort_by_key(|(i, _)| plan.faults[*i].start);
    let secs = |d: Duration| d.as_secs_f64();
    let is_kill = |i: &usize| {
        plan.faults
            .get(*i)
            .is_some_and(|f| matches!(f.action, FaultAction::PodKill { .. }))
    };
    for (at, e) in &outcome.timeline {
        // A PodKill's start and end are one instant, and `pods_killed` says what it did.
        if let DrillEvent::FaultStarted { index } | DrillEvent::FaultEnded { index } = e
            && is_kill(index)
        {
            continue;
        }
        let (event, fault, planned, detail) = match e {
            DrillEvent::BaselineStarted => (
                "baseline_started",
                None,
                Some(Duration::ZERO),
                format!(
                    "baseline, no fault for {}",
                    super::run::fmt_duration(plan.baseline)
                ),
            ),
            DrillEvent::FaultStarted { index } => (
                "fault_started",
                Some(*index),
                plan.faults.get(*index).map(|f| f.start),
                describe(plan, *index),
            ),
            DrillEvent::FaultEnded { index } => (
                "fault_ended",
                Some(*index),
                plan.faults.get(*index).map(|f| f.end),
                describe(plan, *index),
            ),
            DrillEvent::PodsKilled {
                agent,
                requested,
                killed,
            } => {
                let fault = kills
                    .iter()
                    .position(|(_, a)| a == agent)
                    .map(|k| kills.remove(k).0);
                (
                    "pods_killed",
                    fault,
                    fault.and_then(|i| plan.faults.get(i)).map(|f| f.start),
                    format!("{killed} of {requested} requested engines of {agent} killed"),
                )
            }
            DrillEvent::Aborted { reason } => ("aborted", None, None, reason.clone()),
            DrillEvent::Recovered => (
                "recovered",
                None,
                None,
                "back inside the baseline band".into(),
            ),
            DrillEvent::Finished { verdict } => {
                ("finished", None, None, verdict.as_str().to_string())
            }
        };
        moments.push(DrillMoment {
            at_seconds: secs(*at),
            event: event.to_string(),
            fault,
            planned_seconds: planned.map(secs),
            detail,
        });
    }
    let mut restarted = 0;
    for (at, e) in fleet {
        if let FleetEvent::Restarted { agent, engine } = e {
            restarted += 1;
            moments.push(DrillMoment {
                at_seconds: secs(*at),
                event: "engine_restarted".into(),
                fault: None,
                planned_seconds: None,
                detail: format!("{engine} replaces a killed engine of {agent}"),
            });
        }
    }
    // Stable: events at one instant keep the runner's order.
    moments.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
    let pods_killed = outcome
        .timeline
        .iter()
        .map(|(_, e)| match e {
            DrillEvent::PodsKilled { killed, .. } => u64::from(*killed),
            _ => 0,
        })
        .sum();
    DrillReport {
        name: plan.drill.clone(),
        verdict: outcome.verdict.as_str().to_string(),
        score: outcome.score,
        failover_seconds: outcome.failover_seconds,
        recovery_seconds: outcome.recovery_seconds,
        dlq_growth: outcome.dlq_growth,
        dlq_replayed: outcome.dlq_replayed,
        aborted_because: outcome.aborted_because.clone(),
        reason: outcome.reason.clone(),
        tasks_processed: outcome.accounting.tasks_processed,
        tasks_lost: outcome.accounting.tasks_lost,
        duplicate_effects: outcome.accounting.duplicate_effects,
        breaker_trips: outcome.breaker_trips,
        retries: outcome.retries,
        hedges: outcome.hedges,
        pods_killed,
        engines_restarted: restarted,
        timeline: moments,
        applied: applied_windows(plan, outcome, applied),
    }
}

/// How long after its window an engine may still apply a fault: it follows the faults by
/// announcement and by re-reading every 500 ms, and an expiring key announces nothing.
const APPLIED_GRACE: Duration = Duration::from_secs(2);

/// When the engines first and last applied each injected fault whose window (from its start to
/// its end, as the runner's timeline has them) overlaps no other's.
fn applied_windows(
    plan: &Plan,
    outcome: &Outcome,
    applied: &[(Duration, u64)],
) -> Vec<FaultApplied> {
    let aborted_at = outcome
        .timeline
        .iter()
        .find_map(|(at, e)| matches!(e, DrillEvent::Aborted { .. }).then_some(*at));
    let at_of = |want: &dyn Fn(&DrillEvent) -> bool| {
        outcome
            .timeline
            .iter()
            .find_map(|(at, e)| want(e).then_some(*at))
    };
    let windows: Vec<(usize, Duration, Duration)> = plan
        .faults
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.action, FaultAction::Inject(_)))
        .filter_map(|(i, f)| {
            let start = at_of(&|e| matches!(e, DrillEvent::FaultStarted { index } if *index == i))?;
            let end = at_of(&|e| matches!(e, DrillEvent::FaultEnded { index } if *index == i))
                .or(aborted_at)
                .unwrap_or(f.end);
            Some((i, start, end.max(start)))
        })
        .collect();
    let mut out = Vec::new();
    for &(i, start, end) in &windows {
        let overlaps = windows
            .iter()
            .any(|&(j, s, e)| j != i && s < end + APPLIED_GRACE && start < e + APPLIED_GRACE);
        if overlaps {
            continue;
        }
        // Each sample after the first is a change: something was applied since the one before.
        let inside: Vec<Duration> = applied
            .iter()
            .skip(1)
            .map(|(t, _)| *t)
            .filter(|t| *t >= start && *t <= end + APPLIED_GRACE)
            .collect();
        let (Some(first), Some(last)) = (inside.first(), inside.last()) else {
            continue;
        };
        let f = &plan.faults[i];
        out.push(FaultApplied {
            fault: i,
            planned_start_seconds: f.start.as_secs_f64(),
            planned_end_seconds: f.end.as_secs_f64(),
            first_seconds: first.as_secs_f64(),
            last_seconds: last.as_secs_f64(),
        });
    }
    out
}

/// How far a run's faults were from their plan, in milliseconds (the largest |actual − planned|
/// of any fault).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScheduleError {
    /// Starts (pod kills included) and ends as the runner's timeline has them. An aborted
    /// run's early ends are not schedule errors and are left out.
    pub start_ms: f64,
    pub end_ms: f64,
    /// From the engines' applications of each fault ([`FaultApplied`]): how far the first was
    /// from the planned start, and how long after the planned end one was still applied (0
    /// when none was; applications that stop early — an open breaker sends no call to meet the
    /// fault — are no schedule error). `None` when no fault could be measured so.
    pub applied_start_ms: Option<f64>,
    pub applied_end_ms: Option<f64>,
}

/// |seconds| in milliseconds, to a tenth.
fn ms(seconds: f64) -> f64 {
    (seconds.abs() * 10_000.0).round() / 10.0
}

/// The schedule error of one run.
pub fn schedule_error(d: &DrillReport) -> ScheduleError {
    let mut e = ScheduleError::default();
    for m in &d.timeline {
        let Some(planned) = m.planned_seconds else {
            continue;
        };
        let err = ms(m.at_seconds - planned);
        match m.event.as_str() {
            "fault_started" | "pods_killed" => e.start_ms = e.start_ms.max(err),
            "fault_ended" if d.aborted_because.is_none() => e.end_ms = e.end_ms.max(err),
            _ => {}
        }
    }
    for a in &d.applied {
        let start = ms(a.first_seconds - a.planned_start_seconds);
        e.applied_start_ms = Some(e.applied_start_ms.unwrap_or(0.0).max(start));
        if d.aborted_because.is_none() {
            let end = ms((a.last_seconds - a.planned_end_seconds).max(0.0));
            e.applied_end_ms = Some(e.applied_end_ms.unwrap_or(0.0).max(end));
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkflowConfig {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/samples/payment-disputes.yaml"
        ))
        .unwrap();
        WorkflowConfig::from_yaml("s", &text, None, None).unwrap()
    }

    const DRILL: &str = "apiVersion: r4.dev/v1alpha1\nkind: ChaosDrill\nmetadata: {name: d}\nspec:\n  workflowRef: payment-disputes\n  duration: 1m\n  faults:\n";

    #[test]
    fn loads_the_sample_drill() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/samples/bank-outage-drill.yaml"
        ))
        .unwrap();
        let d = load("drill.yaml", &text, &cfg()).unwrap();
        assert_eq!(d.name, "bank-outage");
        assert_eq!(d.spec.faults.len(), 3);
    }

    #[test]
    fn bad_drills_are_refused_naming_the_field() {
        let c = cfg();
        let first = |text: &str| load("drill.yaml", text, &c).unwrap_err()[0].clone();
        let e = first(&format!(
            "{DRILL}    - {{type: ToolOutage, tool: crm, after: 10s, for: 10s}}\n"
        ));
        assert!(
            e.contains("spec.faults[0].tool") && e.contains("crm"),
            "{e}"
        );
        let e = first(&format!("{DRILL}    - {{type: ToolOutage, after: 10s}}\n"));
        assert!(e.contains("spec.faults[0]") && e.contains("tool"), "{e}");
        let e = first(
            &DRILL
                .replace("payment-disputes", "other")
                .to_string()
                .replace(
                    "faults:\n",
                    "faults:\n    - {type: PodKill, agent: intake}\n",
                ),
        );
        assert!(e.contains("spec.workflowRef") && e.contains("other"), "{e}");
        let e = first(&format!(
            "{DRILL}    - {{type: ToolOutage, tool: bank-api, after: 50s, for: 30s}}\n"
        ));
        assert!(e.contains("spec.faults[0]") && e.contains("lasts"), "{e}");
        let e = first(
            "apiVersion: r4.dev/v1alpha1\nkind: CircuitPolicy\nmetadata: {name: p}\nspec: {}\n",
        );
        assert!(e.contains("ChaosDrill"), "{e}");
    }

    fn outcome(timeline: Vec<(Duration, DrillEvent)>) -> Outcome {
        Outcome {
            verdict: crate::engine::drill::Verdict::Passed,
            score: 100.0,
            reason: None,
            aborted_because: None,
            failover_seconds: None,
            recovery_seconds: None,
            dlq_growth: 0,
            dlq_replayed: 0,
            accounting: Accounting::default(),
            breaker_trips: 0,
            hedges: 0,
            retries: 0,
            timeline,
        }
    }

    #[test]
    fn the_report_puts_faults_kills_and_restarts_on_one_timeline_and_measures_the_schedule() {
        let text = format!(
            "{DRILL}    - {{type: ToolOutage, tool: bank-api, after: 5s, for: 10s}}\n    - {{type: PodKill, agent: investigation, after: 20s, count: 2}}\n    - {{type: ToolLatency, tool: bank-api, after: 30s, for: 10s, latencyMs: 100}}\n"
        )
        .replace("duration: 1m", "duration: 1m\n  baseline: 10s");
        let d = load("d.yaml", &text, &cfg()).unwrap();
        let plan = crate::engine::drill::plan(&d.name, &d.spec, 1).unwrap();
        let s = Duration::from_secs_f64;
        let o = outcome(vec![
            (s(0.0), DrillEvent::BaselineStarted),
            (s(15.2), DrillEvent::FaultStarted { index: 0 }),
            (s(25.0), DrillEvent::FaultEnded { index: 0 }),
            (
                s(30.0),
                DrillEvent::PodsKilled {
                    agent: "investigation".into(),
                    requested: 2,
                    killed: 2,
                },
            ),
            (s(40.0), DrillEvent::FaultStarted { index: 2 }),
            (s(50.0), DrillEvent::FaultEnded { index: 2 }),
        ]);
        let fleet = vec![(
            s(35.0),
            FleetEvent::Restarted {
                agent: "investigation".into(),
                engine: "investigation-0-r1".into(),
            },
        )];
        // Applications seen at 15.3 … 20 (then the breaker opened) and 40.1 … 50.4.
        let applied = vec![
            (s(0.0), 0),
            (s(15.3), 5),
            (s(20.0), 9),
            (s(40.1), 12),
            (s(50.4), 20),
        ];
        let r = report(&plan, &o, &fleet, &applied);
        let events: Vec<&str> = r.timeline.iter().map(|m| m.event.as_str()).collect();
        assert_eq!(
            events,
            [
                "baseline_started",
                "fault_started",
                "fault_ended",
                "pods_killed",
                "engine_restarted",
                "fault_started",
                "fault_ended"
            ]
        );
        let kill = &r.timeline[3];
        assert_eq!((kill.fault, kill.planned_seconds), (Some(1), Some(30.0)));
        assert_eq!((r.pods_killed, r.engines_restarted), (2, 1));
        assert_eq!(r.applied.len(), 2);
        assert_eq!(
            (r.applied[0].first_seconds, r.applied[0].last_seconds),
            (15.3, 20.0)
        );
        let e = schedule_error(&r);
        assert_eq!(e.start_ms, 200.0, "the outage started 0.2 s late");
        assert_eq!(e.end_ms, 0.0);
        assert_eq!(e.applied_start_ms, Some(300.0));
        // Stopping early (the breaker) is no error; applying 0.4 s past the end is.
        assert_eq!(e.applied_end_ms, Some(400.0));
    }
}
