//! The final report of `r4 run`: the figures of SPEC §9 (`--json`, keys binding) and the table
//! people read. The SLO arithmetic and the incident cost model are the engine's
//! ([`crate::engine::slo`], shared with the controller); this module says what the run feeds
//! them: success = tasks completed within `slo.p95LatencyMs` among the tasks the run was asked
//! to submit (a task dead-lettered, routed, late, paused, in flight or lost is a failure, the
//! cost model's rule).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::resilience::CountersSnapshot;

pub use crate::engine::slo::{CostReport, SloReport, incident_cost, slo};

/// The load model of the run (`load` in JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadReport {
    /// `open` (a fixed submission rate) or `closed` (a window of unsettled tasks).
    pub model: String,
    /// Open loop: the submission rate.
    pub tasks_per_sec: Option<f64>,
    /// Closed loop: how many tasks may be unsettled at once.
    pub max_in_flight: Option<u64>,
    /// Where the model came from (`economics.tasksPerMinute 2000`, `--rate`, …).
    pub source: String,
}

impl LoadReport {
    /// `open loop at 33.3 tasks/s (economics.tasksPerMinute 2000)`.
    pub fn describe(&self) -> String {
        match (self.tasks_per_sec, self.max_in_flight) {
            (Some(rate), _) => format!("open loop at {rate:.1} tasks/s ({})", self.source),
            (None, Some(w)) => format!(
                "closed loop, at most {w} unsettled tasks at a time ({})",
                self.source
            ),
            (None, None) => self.source.clone(),
        }
    }
}

/// Calls a tool's policy stack refused before sending, by cause.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rejected {
    pub throttle: u64,
    pub bulkhead: u64,
    pub budget: u64,
}

/// One tool's figures (`tools.<name>` in JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ToolFigures {
    /// Logical calls made through the policy stack.
    pub calls: u64,
    /// Requests the tool received (hedged copies and retries included).
    pub requests: u64,
    /// Calls that failed in the end (after retries, hedges and fallback).
    pub errors: u64,
    pub hedges: u64,
    pub retries: u64,
    pub fallbacks: u64,
    pub breaker_open_seconds: f64,
    pub rejected: Rejected,
}

impl ToolFigures {
    pub fn from_counters(c: &CountersSnapshot, requests: u64) -> Self {
        ToolFigures {
            calls: c.calls,
            requests,
            errors: c.failures,
            hedges: c.hedges,
            retries: c.retries,
            fallbacks: c.fallbacks,
            breaker_open_seconds: c.breaker_open_us as f64 / 1e6,
            rejected: Rejected {
                throttle: c.throttled,
                bulkhead: c.bulkhead_rejections,
                budget: c.budget_rejections,
            },
        }
    }
}

/// One agent's figures (`agents.<name>` in JSON), summed over its replicas.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AgentFigures {
    /// Deliveries the agent answered (success or failure).
    pub deliveries: u64,
    /// Failed deliveries that were delivered again.
    pub redeliveries: u64,
    /// Steps the agent completed.
    pub completed: u64,
    /// Tasks dead-lettered at this agent's step (a replayed task may count again).
    pub dead_lettered: u64,
    /// Tasks degraded mode routed away from this agent (before or after a delivery).
    pub routed: u64,
    /// Agent-level hedging, for an agent with `hedge` (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedging: Option<AgentHedging>,
}

/// An agent's hedging figures (`agents.<name>.hedging` in JSON), summed over its replicas.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AgentHedging {
    /// Deliveries handed to a shadow (another replica) after the hedge delay.
    pub hedges: u64,
    /// Deliveries the shadows made (a shadow may decline a hedge: busy or paused).
    pub shadow_deliveries: u64,
    /// Steps the shadow completed first (the primary's delivery cancelled).
    pub shadow_wins: u64,
    /// Extra agent work: shadow deliveries over the agent's own deliveries.
    pub extra_work: f64,
}

/// One tenth of the run (`timeline[]` in JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TimelineSlice {
    pub from_seconds: f64,
    pub to_seconds: f64,
    /// Tasks completed in the slice, per second.
    pub tasks_per_sec: f64,
    /// Failures (late completions, dead-letterings, routings) over all outcomes in the slice;
    /// `null` when no task settled in the slice.
    pub failure_rate: Option<f64>,
    /// Worst breaker state per tool in the slice (`closed`, `half_open`, `open`).
    pub breakers: BTreeMap<String, String>,
    /// Tasks in the DLQ (and poison stream) at the end of the slice.
    pub dlq_depth: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
}

/// Drill outcome (`drill` in JSON, with `--drill`): SPEC §9's `verdict`, `failover_seconds`,
/// `recovery_seconds`, `dlq_growth`, `aborted_because` (always present, `null` when not
/// measured or not aborted), then every other figure of the run and its timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DrillReport {
    /// The ChaosDrill's name.
    pub name: String,
    /// `Passed`, `Failed` or `Aborted`.
    pub verdict: String,
    /// Resilience score in [0, 100] (formula in the README).
    pub score: f64,
    pub failover_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    pub dlq_growth: u64,
    /// DLQ entries the repair role replayed during the drill.
    pub dlq_replayed: u64,
    pub aborted_because: Option<String>,
    /// Why the verdict is not Passed, one line.
    pub reason: Option<String>,
    pub tasks_processed: u64,
    /// Counted by the run (streams, DLQ), when the drill ended.
    pub tasks_lost: u64,
    /// Counted by the simulated tools' ledger, when the drill ended.
    pub duplicate_effects: u64,
    pub breaker_trips: u64,
    pub retries: u64,
    pub hedges: u64,
    /// Engines the drill's PodKill faults crashed, and how many were started in their place.
    pub pods_killed: u64,
    pub engines_restarted: u64,
    /// What happened when, from the start of the run (the baseline's start).
    pub timeline: Vec<DrillMoment>,
    /// When the engines first and last applied each injected fault, as the run saw it.
    pub applied: Vec<FaultApplied>,
}

/// When the engines applied one injected fault (`drill.applied[]` in JSON): the first and the
/// last change of the engines' fault counters within its window, to the run loop's tick
/// (100 ms). Measured only for a fault whose window overlaps no other injected fault's (the
/// counters do not say which fault they counted), and only if something met it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FaultApplied {
    pub fault: usize,
    pub planned_start_seconds: f64,
    pub planned_end_seconds: f64,
    pub first_seconds: f64,
    pub last_seconds: f64,
}

/// One moment of a drill (`drill.timeline[]` in JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DrillMoment {
    /// From the start of the run.
    pub at_seconds: f64,
    /// `baseline_started`, `fault_started`, `fault_ended`, `pods_killed`, `engine_restarted`,
    /// `aborted`, `recovered` or `finished`.
    pub event: String,
    /// The fault's position in `spec.faults`, when the moment is a fault's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<usize>,
    /// When the plan had it, for a fault's start or end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planned_seconds: Option<f64>,
    pub detail: String,
}

impl DrillReport {
    /// The drill's part of the table: the figures, then the timeline of the faults.
    fn to_table(&self) -> String {
        let secs = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1} s"));
        let mut rows: Vec<(&str, String)> = vec![
            (
                "drill verdict",
                format!(
                    "{} ({}), score {:.0}/100",
                    self.verdict, self.name, self.score
                ),
            ),
            (
                "failover / recovery",
                format!(
                    "{} / {}",
                    secs(self.failover_seconds),
                    secs(self.recovery_seconds)
                ),
            ),
            (
                "DLQ growth / replayed",
                format!("{} / {}", self.dlq_growth, self.dlq_replayed),
            ),
            ("breaker trips", self.breaker_trips.to_string()),
            (
                "tool retries / hedges",
                format!("{} / {}", self.retries, self.hedges),
            ),
            ("tasks processed", self.tasks_processed.to_string()),
            (
                "lost / duplicate effects",
                format!("{} / {}", self.tasks_lost, self.duplicate_effects),
            ),
        ];
        if self.pods_killed > 0 {
            rows.push((
                "engines killed / restarted",
                format!("{} / {}", self.pods_killed, self.engines_restarted),
            ));
        }
        rows.push((
            "aborted because",
            self.aborted_because.clone().unwrap_or_else(|| "-".into()),
        ));
        if let Some(r) = &self.reason
            && self.aborted_because.as_ref() != Some(r)
        {
            rows.push(("why not passed", r.clone()));
        }
        let mut out = String::from("  drill\n");
        for (k, v) in &rows {
            out.push_str(&format!("    {k:<26} {v}\n"));
        }
        if !self.timeline.is_empty() {
            let mut t = Table::new(&["at s", "event", "fault", "planned s", "detail"])
                .text_last()
                .left(1);
            for m in &self.timeline {
                t.row(vec![
                    format!("{:.1}", m.at_seconds),
                    m.event.replace('_', " "),
                    m.fault.map_or_else(|| "-".into(), |i| i.to_string()),
                    m.planned_seconds
                        .map_or_else(|| "-".into(), |p| format!("{p:.1}")),
                    m.detail.clone(),
                ]);
            }
            out.push_str("  drill timeline\n");
            out.push_str(&t.render());
        }
        out
    }
}

/// Everything `r4 run --json` prints, in SPEC §9's keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunReport {
    pub submitted: u64,
    pub completed: u64,
    pub dead_lettered: u64,
    pub lost: u64,
    pub duplicate_effects: u64,
    pub tasks_per_sec: f64,
    pub latency_ms: Percentiles,
    /// Tool retries (the policy stacks'), summed over the tools.
    pub retries: u64,
    /// Agent deliveries made again after a failed one, summed over the agents.
    pub redeliveries: u64,
    pub hedges: u64,
    pub breaker_trips: u64,
    pub replays: u64,
    pub slo: SloReport,
    pub incident_cost: CostReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillReport>,
    /// Tasks degraded mode routed to a stream no agent consumes (manual review).
    pub routed: u64,
    /// Tasks still waiting, when the run ended, in the stream of an agent degraded mode paused.
    pub paused: u64,
    /// Tasks still waiting or being worked on elsewhere when the run ended.
    pub in_flight: u64,
    /// Tasks the intake kept refusing (`queue.maxLen` backpressure) until the run ended.
    pub not_submitted: u64,
    /// Why the run ended with tasks unsettled (the line `r4 run` prints on standard error).
    pub unfinished_because: Option<String>,
    /// Completed tasks slower than `slo.p95LatencyMs` (each counts as a failure in the cost model).
    pub late: u64,
    /// Tool calls answered by a fallback.
    pub fallbacks: u64,
    /// Side effects the simulated tools applied.
    pub effects: u64,
    /// How tasks were offered.
    pub load: LoadReport,
    /// Per tool, by name.
    pub tools: BTreeMap<String, ToolFigures>,
    /// Per agent, by name.
    pub agents: BTreeMap<String, AgentFigures>,
    /// The run in ten slices of its duration.
    pub timeline: Vec<TimelineSlice>,
    /// Simulated (virtual clock) or real seconds the run took.
    pub elapsed_seconds: f64,
    /// Wall-clock seconds the run took.
    pub wall_seconds: f64,
    /// `virtual` (embedded queue, tokio's paused clock) or `real` (Redis).
    pub clock: String,
}

impl RunReport {
    /// One JSON object on one line (the last line `r4 run --json` prints).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode report: {e}\"}}"))
    }

    /// The report for people: the load line, the figures, per tool, per agent, the timeline.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("submitted", self.submitted.to_string()),
            ("completed", self.completed.to_string()),
            ("dead-lettered", self.dead_lettered.to_string()),
            ("routed (manual review)", self.routed.to_string()),
        ];
        if self.paused + self.in_flight + self.not_submitted > 0 {
            rows.push(("paused", self.paused.to_string()));
            rows.push(("in flight", self.in_flight.to_string()));
            if self.not_submitted > 0 {
                rows.push(("not submitted", self.not_submitted.to_string()));
            }
        }
        rows.extend([
            ("lost", self.lost.to_string()),
            (
                "duplicate effects",
                format!("{} (of {} effects)", self.duplicate_effects, self.effects),
            ),
            (
                "throughput",
                format!(
                    "{:.1} tasks/s over {:.1} s ({} clock, {:.1} s wall)",
                    self.tasks_per_sec, self.elapsed_seconds, self.clock, self.wall_seconds
                ),
            ),
            (
                "latency p50/p95/p99/p99.9",
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} ms",
                    self.latency_ms.p50,
                    self.latency_ms.p95,
                    self.latency_ms.p99,
                    self.latency_ms.p999
                ),
            ),
            (
                "tool retries / hedges",
                format!("{} / {}", self.retries, self.hedges),
            ),
            ("agent redeliveries", self.redeliveries.to_string()),
            ("fallback answers", self.fallbacks.to_string()),
            ("breaker trips", self.breaker_trips.to_string()),
            ("replays", self.replays.to_string()),
            ("slower than SLO p95", self.late.to_string()),
            (
                "SLO success rate",
                format!(
                    "{:.4}% (error budget left {:.0}%)",
                    self.slo.success_rate * 100.0,
                    self.slo.error_budget_remaining * 100.0
                ),
            ),
            (
                "incident cost",
                format!(
                    "{:.2}% failed ≈ ${:.0}/day",
                    self.incident_cost.failure_rate * 100.0,
                    self.incident_cost.daily_cost
                ),
            ),
        ]);
        let mut out = format!("  load: {}\n", self.load.describe());
        for (k, v) in &rows {
            out.push_str(&format!("  {k:<26} {v}\n"));
        }
        out.push_str(&self.tools_table());
        out.push_str(&self.agents_table());
        out.push_str(&self.timeline_table());
        if let Some(d) = &self.drill {
            out.push_str(&d.to_table());
        }
        out
    }

    fn tools_table(&self) -> String {
        if self.tools.is_empty() {
            return String::new();
        }
        let mut t = Table::new(&[
            "tool",
            "calls",
            "requests",
            "errors",
            "hedges",
            "retries",
            "fallbacks",
            "open s",
            "rejected thr/bulk/budget",
        ]);
        for (name, f) in &self.tools {
            t.row(vec![
                name.clone(),
                f.calls.to_string(),
                f.requests.to_string(),
                f.errors.to_string(),
                f.hedges.to_string(),
                f.retries.to_string(),
                f.fallbacks.to_string(),
                format!("{:.1}", f.breaker_open_seconds),
                format!(
                    "{}/{}/{}",
                    f.rejected.throttle, f.rejected.bulkhead, f.rejected.budget
                ),
            ]);
        }
        t.render()
    }

    fn agents_table(&self) -> String {
        if self.agents.is_empty() {
            return String::new();
        }
        // The hedging columns only when some agent hedges (reports without stay as they were).
        let hedging = self.agents.values().any(|f| f.hedging.is_some());
        let mut head = vec![
            "agent",
            "deliveries",
            "redeliveries",
            "completed",
            "dead-lettered",
            "routed",
        ];
        if hedging {
            head.extend(["hedges", "shadow wins", "extra work"]);
        }
        let mut t = Table::new(&head);
        for (name, f) in &self.agents {
            let mut row = vec![
                name.clone(),
                f.deliveries.to_string(),
                f.redeliveries.to_string(),
                f.completed.to_string(),
                f.dead_lettered.to_string(),
                f.routed.to_string(),
            ];
            if hedging {
                match &f.hedging {
                    Some(h) => row.extend([
                        h.hedges.to_string(),
                        h.shadow_wins.to_string(),
                        format!("{:.2}%", h.extra_work * 100.0),
                    ]),
                    None => row.extend(["-".into(), "-".into(), "-".into()]),
                }
            }
            t.row(row);
        }
        t.render()
    }

    fn timeline_table(&self) -> String {
        if self.timeline.is_empty() {
            return String::new();
        }
        let mut t = Table::new(&["from s", "tasks/s", "failed", "DLQ", "breakers"]).text_last();
        for s in &self.timeline {
            let breakers: Vec<String> = s
                .breakers
                .iter()
                .map(|(tool, st)| format!("{tool} {st}"))
                .collect();
            t.row(vec![
                format!("{:.1}", s.from_seconds),
                format!("{:.1}", s.tasks_per_sec),
                s.failure_rate
                    .map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0)),
                s.dlq_depth.to_string(),
                if breakers.is_empty() {
                    "-".into()
                } else {
                    breakers.join(", ")
                },
            ]);
        }
        format!("  timeline (tenths of the run)\n{}", t.render())
    }
}

/// A small text table: the first column left-aligned (a name), the others right-aligned
/// (figures) unless the last is free text; indented like the report.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    /// The last column is free text (left-aligned).
    text_last: bool,
    /// Other columns of text (left-aligned).
    left: Vec<usize>,
}

impl Table {
    fn new(head: &[&str]) -> Self {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            text_last: false,
            left: Vec::new(),
        }
    }

    fn left(mut self, column: usize) -> Self {
        self.left.push(column);
        self
    }

    fn text_last(mut self) -> Self {
        self.text_last = true;
        self
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let n = self.head.len();
        let mut width = vec![0usize; n];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let mut line = String::from("  ");
            for (i, c) in r.iter().enumerate().take(n) {
                let cell = if (i == 0 && !self.text_last)
                    || (i + 1 == n && self.text_last)
                    || self.left.contains(&i)
                {
                    format!("{c:<w$}", w = width[i])
                } else {
                    format!("{c:>w$}", w = width[i])
                };
                line.push_str(&cell);
                line.push_str("  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_spec_keys() {
        let v: serde_json::Value =
            serde_json::from_str(&RunReport::default().to_json_line()).unwrap();
        for k in [
            "submitted",
            "completed",
            "dead_lettered",
            "lost",
            "paused",
            "in_flight",
            "redeliveries",
            "load",
            "tools",
            "agents",
            "timeline",
            "duplicate_effects",
            "tasks_per_sec",
            "latency_ms",
            "retries",
            "hedges",
            "breaker_trips",
            "replays",
            "slo",
            "incident_cost",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["p50", "p95", "p99", "p999"] {
            assert!(v["latency_ms"].get(k).is_some());
        }
        for k in ["success_rate", "p95_latency_ms", "error_budget_remaining"] {
            assert!(v["slo"].get(k).is_some());
        }
        assert!(v["incident_cost"].get("daily_cost").is_some());
        assert!(v.get("drill").is_none());
    }

    #[test]
    fn drill_json_has_the_spec_keys_even_when_unmeasured() {
        let r = RunReport {
            drill: Some(DrillReport {
                verdict: "Aborted".into(),
                aborted_because: Some("success rate 0.5 below 0.99".into()),
                timeline: vec![DrillMoment {
                    at_seconds: 30.0,
                    event: "fault_started".into(),
                    fault: Some(0),
                    planned_seconds: Some(30.0),
                    detail: "ToolOutage bank-api".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        let d = &v["drill"];
        for k in [
            "verdict",
            "failover_seconds",
            "recovery_seconds",
            "dlq_growth",
            "aborted_because",
            "score",
            "dlq_replayed",
            "tasks_lost",
            "duplicate_effects",
            "breaker_trips",
            "timeline",
        ] {
            assert!(d.get(k).is_some(), "missing drill.{k}: {d}");
        }
        assert!(d["failover_seconds"].is_null());
        assert_eq!(d["timeline"][0]["planned_seconds"], 30.0);
        let table = r.to_table();
        assert!(
            table.contains("drill verdict") && table.contains("Aborted"),
            "{table}"
        );
        assert!(
            table.contains("fault started") && table.contains("ToolOutage bank-api"),
            "{table}"
        );
    }
}
