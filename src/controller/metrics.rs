//! The controller's Prometheus metrics: what it reconciled, how long that took, what failed,
//! what it wrote, and whether it leads — and, while it leads, the state of every workflow and
//! drill as their statuses say. [`super::http`] serves them on `/metrics`.
//!
//! Two sources:
//! - **events of this process** (reconciles, errors, applies, status writes, the lease, the
//!   drill runs it recorded): counters and gauges in a registry; and, when the controller's
//!   client counts them ([`ControllerMetrics::count_requests`]), its API requests by (verb,
//!   group, resource). Label sets are small and
//!   static: `kind` is one of the three kinds (`AgentWorkflow`, `CircuitPolicy`, `ChaosDrill`),
//!   `error` a reconcile error's `metric_label()` (a fixed word per error variant, never a
//!   message). The drill-run counter is labelled per drill and pruned with it.
//! - **the objects' statuses** (`r4_workflow_*`, `r4_drill_*`): written afresh as text at
//!   every scrape from the reflector stores of the current term of leadership
//!   ([`ControllerMetrics::observe`]), like kube-state-metrics — straight into the answer, so a
//!   scrape costs the text and no registry of short-lived gauges. What the reconcilers computed for `status` (queue and DLQ depths,
//!   the SLO, the incident cost, kill switches, drill verdicts) is exported exactly as written,
//!   so `/metrics`, `kubectl get` and `r4 status` cannot disagree; a deleted object's series
//!   disappear with it from the next scrape (no gauge outlives its object), and a standby —
//!   which keeps no stores — exports none, so two replicas never export the same workflow twice.
//!   Labels: `namespace`, `workflow`, `drill`, `agent`, `switch` (bounded by the objects that
//!   exist; never a task id). A Prometheus that scrapes the controller should keep these labels
//!   as exported (`honorLabels: true`): its own `namespace` target label is the controller's.
//!
//! Not exported: the age distribution of what is in a DLQ. A Redis stream has no count by id
//! range, so counting entries by age means reading every entry, payload included, at every
//! reconcile — unbounded work; depth and the oldest entry's age are exact and cheap (one XLEN,
//! one XRANGE COUNT 1). The repair role's `r4_engine_dlq_age_at_exit_seconds` gives the ages
//! of what leaves it.

use std::collections::BTreeSet;
use std::sync::RwLock;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::api::drill::{ChaosDrill, DrillPhase};
use crate::api::workflow::AgentWorkflow;

use super::rbac::Recorder;

/// Buckets of the reconcile duration, in seconds: a reconcile is a few API calls (ms) up to
/// a slow Redis read under a deadline (seconds).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The kinds the controller reconciles (the `kind` label of the reconcile series).
pub const KINDS: [&str; 3] = ["AgentWorkflow", "CircuitPolicy", "ChaosDrill"];

/// Every metric the controller exports, in its own registry.
pub struct ControllerMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    status_writes: IntCounterVec,
    applies: IntCounterVec,
    leader: IntGauge,
    drill_runs: IntCounterVec,
    /// The stores of the current term of leadership, read at each scrape.
    objects: RwLock<Option<Objects>>,
    /// The API requests of the controller's client, when it counts them.
    requests: RwLock<Option<Recorder>>,
}

/// The reflector stores the status series are read from.
#[derive(Clone)]
pub struct Objects {
    pub workflows: Store<AgentWorkflow>,
    pub drills: Store<ChaosDrill>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "r4_controller_reconciles_total",
                "Reconciles finished (successfully or not), by kind.",
            ),
            &["kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let errors = IntCounterVec::new(
            Opts::new(
                "r4_controller_reconcile_errors_total",
                "Reconciles that failed, by kind and error class.",
            ),
            &["kind", "error"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "r4_controller_reconcile_duration_seconds",
                "Time one reconcile took, by kind.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let status_writes = IntCounterVec::new(
            Opts::new(
                "r4_controller_status_writes_total",
                "Status subresource writes, by kind (unchanged statuses are not written).",
            ),
            &["kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let applies = IntCounterVec::new(
            Opts::new(
                "r4_controller_apply_total",
                "Server-side apply calls for children, by the child's kind.",
            ),
            &["kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let leader = IntGauge::new(
            "r4_controller_leader",
            "1 while this replica holds the leader lease, else 0.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let drill_runs = IntCounterVec::new(
            Opts::new(
                "r4_drill_runs_total",
                "ChaosDrill runs this controller recorded, by drill and verdict (Passed, Failed, Aborted).",
            ),
            &["namespace", "drill", "verdict"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));

        let registry = Registry::new();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(status_writes.clone()),
            Box::new(applies.clone()),
            Box::new(leader.clone()),
            Box::new(drill_runs.clone()),
        ] {
            // Distinct names in a fresh registry: registration cannot fail.
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("fresh registry: {e}"));
        }
        // Every kind's reconcile and error series exist at 0 from the start: a rate over a
        // counter that appears with its first increment misses that increment, and an error
        // ratio needs its numerator before the first error.
        for kind in KINDS {
            reconciles.with_label_values(&[kind]);
            duration.with_label_values(&[kind]);
            for error in super::context::Error::METRIC_LABELS {
                errors.with_label_values(&[kind, error]);
            }
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            status_writes,
            applies,
            leader,
            drill_runs,
            objects: RwLock::new(None),
            requests: RwLock::new(None),
        }
    }

    /// Export the API requests `recorder` counts (the controller's kube client's) as
    /// `r4_controller_api_requests_total{verb,group,resource}`.
    pub fn count_requests(&self, recorder: Recorder) {
        *self.requests.write().unwrap_or_else(|p| p.into_inner()) = Some(recorder);
    }

    /// A term of leadership starts (`Some`: export the objects of these stores) or ends.
    pub fn observe(&self, objects: Option<Objects>) {
        *self.objects.write().unwrap_or_else(|p| p.into_inner()) = objects;
    }

    /// A run of drill `namespace/drill` was recorded with `verdict`.
    pub fn drill_run(&self, namespace: &str, drill: &str, verdict: &str) {
        self.drill_runs
            .with_label_values(&[namespace, drill, verdict])
            .inc();
    }

    /// Drop the run counters of drills gone from the store.
    fn prune_drill_runs(&self, drills: &Store<ChaosDrill>) {
        let live: BTreeSet<(String, String)> = drills
            .state()
            .iter()
            .map(|d| (d.namespace().unwrap_or_default(), d.name_any()))
            .collect();
        let fams = {
            let r = Registry::new();
            if r.register(Box::new(self.drill_runs.clone())).is_err() {
                return;
            }
            r.gather()
        };
        for f in fams {
            for m in f.get_metric() {
                let get = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let (ns, drill, verdict) = (get("namespace"), get("drill"), get("verdict"));
                if !live.contains(&(ns.clone(), drill.clone())) {
                    let _ = self
                        .drill_runs
                        .remove_label_values(&[&ns, &drill, &verdict]);
                }
            }
        }
    }

    /// One reconcile of `kind` finished after `took` (call it for failures too).
    pub fn reconciled(&self, kind: &str, took: Duration) {
        self.reconciles.with_label_values(&[kind]).inc();
        self.duration
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
    }

    /// One reconcile of `kind` failed with the error class `error`.
    pub fn error(&self, kind: &str, error: &str) {
        self.errors.with_label_values(&[kind, error]).inc();
    }

    /// A status of `kind` was written.
    pub fn status_written(&self, kind: &str) {
        self.status_writes.with_label_values(&[kind]).inc();
    }

    /// A server-side apply of a `kind` object was made.
    pub fn applied(&self, kind: &str) {
        self.applies.with_label_values(&[kind]).inc();
    }

    /// This replica gained (`true`) or lost the leader lease.
    pub fn set_leader(&self, on: bool) {
        self.leader.set(i64::from(on));
    }

    /// The registry, to gather these metrics with others.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition format: this process's counters (and, with a recorder, its
    /// API requests), then — while it leads — the objects' status series.
    pub fn render(&self) -> String {
        let objects = self
            .objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(o) = &objects {
            self.prune_drill_runs(&o.drills);
        }
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec only fails on invalid metric data, which the
        // static definitions above rule out; the status series are still worth answering.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut out = String::from_utf8_lossy(&buf).into_owned();
        if let Some(r) = &*self.requests.read().unwrap_or_else(|p| p.into_inner()) {
            write_requests(r, &mut out);
        }
        if let Some(o) = &objects {
            write_status_series(o, &mut out);
        }
        out
    }
}

/// One gauge family of the status series, written in the text exposition format: `# HELP`
/// and `# TYPE` once, then a sample per [`Gauge::sample`]. Nothing is written for a family
/// with no sample (as a registry omits an empty vector).
struct Gauge<'a> {
    out: &'a mut String,
    name: &'static str,
    help: &'static str,
    started: bool,
}

impl<'a> Gauge<'a> {
    fn new(out: &'a mut String, name: &'static str, help: &'static str) -> Self {
        Gauge {
            out,
            name,
            help,
            started: false,
        }
    }

    /// One sample; `labels` are (name, value) pairs in the order written (sorted by name, as
    /// the prometheus crate writes its own).
    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        use std::fmt::Write;
        if !self.started {
            self.started = true;
            let _ = writeln!(self.out, "# HELP {} {}", self.name, escape_help(self.help));
            let _ = writeln!(self.out, "# TYPE {} gauge", self.name);
        }
        self.out.push_str(self.name);
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_value(v, self.out);
            self.out.push('"');
        }
        self.out.push_str("} ");
        write_value(value, self.out);
        self.out.push('\n');
    }
}

/// A label value in the text format: `\`, `"` and newline escaped.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A HELP text in the text format: `\` and newline escaped.
fn escape_help(h: &str) -> String {
    h.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as the text format spells it (`+Inf`, `-Inf`, `NaN`, else the shortest
/// decimal that reads back the same).
fn write_value(v: f64, out: &mut String) {
    use std::fmt::Write;
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// The series one scrape exports from the objects' statuses, appended to `out` in the text
/// format. Written straight from the stores, family by family: a scrape of 1,000 workflows
/// costs the text it answers (about 1 MiB) and nothing else — building them as registry
/// families first (a fresh `GaugeVec` per family, then `MetricFamily` protobufs, then the
/// text) cost ~25 MiB of short-lived allocations per scrape at that size, which the allocator
/// kept, and was most of the controller's peak memory (`r4 bench controller`). An object gone
/// from the store leaves no series behind, since nothing is kept between scrapes.
fn write_status_series(o: &Objects, out: &mut String) {
    // Each workflow with its namespace and name, read once for every family.
    let workflows: Vec<_> = o
        .workflows
        .state()
        .into_iter()
        .map(|w| {
            let ns = w.namespace().unwrap_or_else(|| "default".into());
            let name = w.name_any();
            (w, ns, name)
        })
        .collect();
    // The per-workflow families: one value (or none) per workflow.
    type PerWorkflow = fn(&AgentWorkflow) -> Option<f64>;
    let per_workflow: [(&'static str, &'static str, PerWorkflow); 11] = [
        (
            "r4_workflow_current_revision",
            "Revision the workflow runs (status.currentRevision).",
            |w| w.status.as_ref()?.current_revision.map(|r| r as f64),
        ),
        (
            "r4_workflow_dlq_depth",
            "Entries in the workflow's dead-letter stream (status.queue.dlqDepth).",
            |w| Some(w.status.as_ref()?.queue.as_ref()?.dlq_depth as f64),
        ),
        (
            "r4_workflow_dlq_oldest_age_seconds",
            "Age of the oldest dead-letter entry, 0 when the DLQ is empty (status.queue.oldestDlqAgeSeconds).",
            |w| Some(w.status.as_ref()?.queue.as_ref()?.oldest_dlq_age_seconds as f64),
        ),
        (
            "r4_workflow_error_budget_remaining",
            "Fraction of the error budget left: 1 untouched, 0 or less spent (status.slo.errorBudgetRemaining).",
            |w| Some(w.status.as_ref()?.slo.as_ref()?.error_budget_remaining),
        ),
        (
            "r4_workflow_failure_rate",
            "Failure rate of the incident cost model (status.incidentCost.failureRate).",
            |w| Some(w.status.as_ref()?.incident_cost.as_ref()?.failure_rate),
        ),
        (
            "r4_workflow_incident_cost_daily",
            "Daily cost of failures at the measured rate, in the economics' currency (status.incidentCost.dailyCost).",
            |w| Some(w.status.as_ref()?.incident_cost.as_ref()?.daily_cost),
        ),
        (
            "r4_workflow_latency_p95_seconds",
            "Measured p95 task latency (status.slo.p95LatencyMs).",
            |w| Some(w.status.as_ref()?.slo.as_ref()?.p95_latency_ms / 1000.0),
        ),
        (
            "r4_workflow_queue_depth",
            "Entries in the workflow's agent input streams (status.queue.depth).",
            |w| Some(w.status.as_ref()?.queue.as_ref()?.depth as f64),
        ),
        (
            "r4_workflow_queue_pending",
            "Entries delivered to an engine and not yet acknowledged (status.queue.pending).",
            |w| Some(w.status.as_ref()?.queue.as_ref()?.pending as f64),
        ),
        (
            "r4_workflow_slo_success_rate",
            "Measured task success rate of the workflow's live engines (status.slo.successRate).",
            |w| Some(w.status.as_ref()?.slo.as_ref()?.success_rate),
        ),
        (
            "r4_workflow_slo_target",
            "The SLO's task success rate objective (spec.slo.successRate; 0.999 when unset).",
            |w| {
                Some(
                    w.spec
                        .slo
                        .as_ref()
                        .map_or(crate::engine::slo::DEFAULT_SUCCESS_RATE, |s| s.success_rate),
                )
            },
        ),
    ];
    for (name, help, value) in per_workflow {
        let mut g = Gauge::new(out, name, help);
        for (w, ns, wf) in &workflows {
            if let Some(v) = value(w) {
                g.sample(&[("namespace", ns), ("workflow", wf)], v);
            }
        }
    }

    // Per agent of each workflow's status.
    type PerAgent = fn(&AgentWorkflow, &crate::api::workflow::AgentStatus) -> f64;
    let per_agent: [(&'static str, &'static str, PerAgent); 2] = [
        (
            "r4_workflow_agent_desired_replicas",
            "Pods the running revision asks for an agent (its replicas, 1 when unset).",
            |w, a| {
                f64::from(
                    w.spec
                        .agents
                        .iter()
                        .find(|x| x.name == a.name)
                        .and_then(|x| x.replicas)
                        .unwrap_or(1),
                )
            },
        ),
        (
            "r4_workflow_agent_ready_replicas",
            "Ready pods of an agent (status.agents[].readyReplicas).",
            |_, a| f64::from(a.ready_replicas),
        ),
    ];
    for (name, help, value) in per_agent {
        let mut g = Gauge::new(out, name, help);
        for (w, ns, wf) in &workflows {
            let Some(s) = &w.status else { continue };
            for a in &s.agents {
                g.sample(
                    &[("agent", &a.name), ("namespace", ns), ("workflow", wf)],
                    value(w, a),
                );
            }
        }
    }

    // Per kill switch in each workflow's status.
    type PerSwitch = fn(&crate::api::workflow::KillSwitchStatus) -> Option<f64>;
    let per_switch: [(&'static str, &'static str, PerSwitch); 4] = [
        (
            "r4_workflow_kill_switch_acknowledged",
            "Engines that acknowledged a kill switch's current state.",
            |k| Some(f64::from(k.acknowledged)),
        ),
        (
            "r4_workflow_kill_switch_engaged",
            "1 while a kill switch (all, an agent, a tool) is engaged, else 0 (status.killSwitches).",
            |k| Some(if k.engaged { 1.0 } else { 0.0 }),
        ),
        (
            "r4_workflow_kill_switch_engaged_since_timestamp_seconds",
            "When an engaged kill switch was engaged, Unix time (absent while released).",
            |k| {
                if k.engaged {
                    k.since.as_deref().and_then(unix_seconds)
                } else {
                    None
                }
            },
        ),
        (
            "r4_workflow_kill_switch_expected",
            "Engines expected to acknowledge a kill switch's current state.",
            |k| Some(f64::from(k.expected)),
        ),
    ];
    for (name, help, value) in per_switch {
        let mut g = Gauge::new(out, name, help);
        for (w, ns, wf) in &workflows {
            let Some(s) = &w.status else { continue };
            for (n, k) in &s.kill_switches {
                if let Some(v) = value(k) {
                    g.sample(&[("namespace", ns), ("switch", n), ("workflow", wf)], v);
                }
            }
        }
    }
    drop(workflows);

    // Per drill: its last finished run, and whether it runs now.
    let drills = o.drills.state();
    type PerDrill = fn(&crate::api::drill::ChaosDrillStatus) -> Option<f64>;
    fn last_run(s: &crate::api::drill::ChaosDrillStatus) -> Option<&crate::api::drill::DrillRun> {
        s.runs.iter().rev().find(|r| r.verdict.is_some())
    }
    let per_drill: [(&'static str, &'static str, PerDrill); 4] = [
        (
            "r4_drill_last_passed",
            "1 if the drill's last finished run passed, 0 if it failed or was aborted (absent before a first run).",
            |s| {
                last_run(s).map(|r| {
                    if r.verdict.as_deref() == Some("Passed") {
                        1.0
                    } else {
                        0.0
                    }
                })
            },
        ),
        (
            "r4_drill_last_run_timestamp_seconds",
            "When the drill's last finished run ended, Unix time.",
            |s| last_run(s)?.finished_at.as_deref().and_then(unix_seconds),
        ),
        (
            "r4_drill_last_score",
            "Resilience score (0-100) of the drill's last finished run (absent when it has none).",
            |s| last_run(s)?.score,
        ),
        (
            "r4_drill_running",
            "1 while the drill's faults are active (phase Running), else 0.",
            |s| {
                Some(if s.phase == Some(DrillPhase::Running) {
                    1.0
                } else {
                    0.0
                })
            },
        ),
    ];
    let none = crate::api::drill::ChaosDrillStatus::default();
    for (name, help, value) in per_drill {
        let mut g = Gauge::new(out, name, help);
        for d in &drills {
            let ns = d.namespace().unwrap_or_else(|| "default".into());
            let name = d.name_any();
            if let Some(v) = value(d.status.as_ref().unwrap_or(&none)) {
                g.sample(
                    &[
                        ("drill", &name),
                        ("namespace", &ns),
                        ("workflow", &d.spec.workflow_ref),
                    ],
                    v,
                );
            }
        }
    }
}

/// The counter of the controller's API requests, by the RBAC audit's (verb, group, resource)
/// (`group` empty for the core group; a subresource as `resource/sub`).
fn write_requests(r: &Recorder, out: &mut String) {
    use std::fmt::Write;
    const NAME: &str = "r4_controller_api_requests_total";
    let _ = writeln!(
        out,
        "# HELP {NAME} Requests the controller made to the Kubernetes API, by verb, API group and resource."
    );
    let _ = writeln!(out, "# TYPE {NAME} counter");
    for ((verb, group, resource), n) in r.counts() {
        out.push_str(NAME);
        out.push_str("{group=\"");
        escape_label_value(&group, out);
        out.push_str("\",resource=\"");
        escape_label_value(&resource, out);
        out.push_str("\",verb=\"");
        escape_label_value(&verb, out);
        let _ = writeln!(out, "\"}} {n}");
    }
}

/// An RFC 3339 time as Unix seconds.
fn unix_seconds(s: &str) -> Option<f64> {
    s.parse::<Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn counts_and_renders_every_metric() {
        let m = ControllerMetrics::new();
        m.reconciled("AgentWorkflow", Duration::from_millis(30));
        m.reconciled("AgentWorkflow", Duration::from_millis(3));
        m.error("AgentWorkflow", "kube");
        m.status_written("AgentWorkflow");
        m.applied("Deployment");
        m.applied("Deployment");
        m.set_leader(true);
        let t = m.render();
        assert_eq!(
            line(&t, "r4_controller_reconciles_total{kind=\"AgentWorkflow\"}"),
            Some("r4_controller_reconciles_total{kind=\"AgentWorkflow\"} 2")
        );
        assert_eq!(
            line(
                &t,
                "r4_controller_reconcile_errors_total{error=\"kube\",kind=\"AgentWorkflow\"}"
            ),
            Some("r4_controller_reconcile_errors_total{error=\"kube\",kind=\"AgentWorkflow\"} 1")
        );
        assert_eq!(
            line(
                &t,
                "r4_controller_reconcile_duration_seconds_count{kind=\"AgentWorkflow\"}"
            ),
            Some("r4_controller_reconcile_duration_seconds_count{kind=\"AgentWorkflow\"} 2")
        );
        assert_eq!(
            line(
                &t,
                "r4_controller_reconcile_duration_seconds_bucket{kind=\"AgentWorkflow\",le=\"0.005\"}"
            ),
            Some(
                "r4_controller_reconcile_duration_seconds_bucket{kind=\"AgentWorkflow\",le=\"0.005\"} 1"
            )
        );
        assert!(t.contains("r4_controller_status_writes_total{kind=\"AgentWorkflow\"} 1"));
        assert!(t.contains("r4_controller_apply_total{kind=\"Deployment\"} 2"));
        assert!(t.contains("r4_controller_leader 1"));
        assert!(t.contains("# TYPE r4_controller_reconcile_duration_seconds histogram"));
        m.set_leader(false);
        assert!(m.render().contains("r4_controller_leader 0"));
    }

    fn workflow() -> AgentWorkflow {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "r4.dev/v1alpha1", "kind": "AgentWorkflow",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "queue": {"redis": {"url": "redis://r:6379"}},
                "agents": [{"name": "a", "image": "i", "consumes": "in", "replicas": 3}],
                "slo": {"successRate": 0.99}
            },
            "status": {
                "agents": [{"name": "a", "readyReplicas": 2, "killSwitch": {"engaged": true}}],
                "killSwitches": {
                    "a": {"engaged": true, "since": "2026-01-01T00:00:10Z", "acknowledged": 2, "expected": 3},
                    "all": {"engaged": false, "acknowledged": 3, "expected": 3}
                },
                "queue": {"depth": 12, "pending": 3, "dlqDepth": 4, "oldestDlqAgeSeconds": 90},
                "slo": {"successRate": 0.995, "p95LatencyMs": 250.0, "errorBudgetRemaining": 0.5},
                "incidentCost": {"failureRate": 0.005, "dailyCost": 42.5}
            }
        }))
        .expect("test workflow")
    }

    fn drill(verdict: &str) -> ChaosDrill {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "r4.dev/v1alpha1", "kind": "ChaosDrill",
            "metadata": {"name": "outage", "namespace": "shop"},
            "spec": {"workflowRef": "orders", "duration": "1m", "faults": [{"type": "ToolOutage", "tool": "bank"}]},
            "status": {"phase": "Failed", "runs": [
                {"startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z", "verdict": "Passed", "score": 90.0},
                {"startedAt": "2026-01-02T00:00:00Z", "finishedAt": "2026-01-02T00:01:40Z", "verdict": verdict, "score": 35.5}
            ]}
        }))
        .expect("test drill")
    }

    /// The status series are what the stores hold now: an object's series appear with it, carry
    /// its status, and are gone from the scrape after it is deleted — drill-run counters too.
    #[test]
    fn status_series_follow_the_objects_in_the_stores() {
        use kube::runtime::reflector::store::Writer;
        use kube::runtime::watcher::Event;
        let m = ControllerMetrics::new();
        let mut wfs: Writer<AgentWorkflow> = Writer::default();
        let mut drills: Writer<ChaosDrill> = Writer::default();
        let (w, d) = (workflow(), drill("Failed"));
        wfs.apply_watcher_event(&Event::Apply(w.clone()));
        drills.apply_watcher_event(&Event::Apply(d.clone()));
        assert!(
            !m.render().contains("r4_workflow_"),
            "no store, no status series (a standby)"
        );
        m.observe(Some(Objects {
            workflows: wfs.as_reader(),
            drills: drills.as_reader(),
        }));
        m.drill_run("shop", "outage", "Failed");
        let t = m.render();
        let wf = "namespace=\"shop\",workflow=\"orders\"";
        for want in [
            format!("r4_workflow_queue_depth{{{wf}}} 12"),
            format!("r4_workflow_queue_pending{{{wf}}} 3"),
            format!("r4_workflow_dlq_depth{{{wf}}} 4"),
            format!("r4_workflow_dlq_oldest_age_seconds{{{wf}}} 90"),
            format!("r4_workflow_slo_target{{{wf}}} 0.99"),
            format!("r4_workflow_slo_success_rate{{{wf}}} 0.995"),
            format!("r4_workflow_error_budget_remaining{{{wf}}} 0.5"),
            format!("r4_workflow_latency_p95_seconds{{{wf}}} 0.25"),
            format!("r4_workflow_incident_cost_daily{{{wf}}} 42.5"),
            format!("r4_workflow_failure_rate{{{wf}}} 0.005"),
            "r4_workflow_agent_ready_replicas{agent=\"a\",namespace=\"shop\",workflow=\"orders\"} 2".into(),
            "r4_workflow_agent_desired_replicas{agent=\"a\",namespace=\"shop\",workflow=\"orders\"} 3".into(),
            "r4_workflow_kill_switch_engaged{namespace=\"shop\",switch=\"a\",workflow=\"orders\"} 1".into(),
            "r4_workflow_kill_switch_engaged{namespace=\"shop\",switch=\"all\",workflow=\"orders\"} 0".into(),
            "r4_workflow_kill_switch_engaged_since_timestamp_seconds{namespace=\"shop\",switch=\"a\",workflow=\"orders\"} 1767225610".into(),
            "r4_workflow_kill_switch_acknowledged{namespace=\"shop\",switch=\"a\",workflow=\"orders\"} 2".into(),
            "r4_drill_last_passed{drill=\"outage\",namespace=\"shop\",workflow=\"orders\"} 0".into(),
            "r4_drill_last_score{drill=\"outage\",namespace=\"shop\",workflow=\"orders\"} 35.5".into(),
            "r4_drill_last_run_timestamp_seconds{drill=\"outage\",namespace=\"shop\",workflow=\"orders\"} 1767312100".into(),
            "r4_drill_running{drill=\"outage\",namespace=\"shop\",workflow=\"orders\"} 0".into(),
            "r4_drill_runs_total{drill=\"outage\",namespace=\"shop\",verdict=\"Failed\"} 1".into(),
        ] {
            assert!(t.lines().any(|l| l == want), "missing {want:?} in\n{t}");
        }
        assert!(
            !t.contains("r4_workflow_kill_switch_engaged_since_timestamp_seconds{namespace=\"shop\",switch=\"all\""),
            "a released switch has no engaged-since: {t}"
        );
        // A passing run flips the gauge.
        drills.apply_watcher_event(&Event::Apply(drill("Passed")));
        assert!(m.render().contains(
            "r4_drill_last_passed{drill=\"outage\",namespace=\"shop\",workflow=\"orders\"} 1"
        ));
        // Deleted: nothing of either object is left.
        wfs.apply_watcher_event(&Event::Delete(w));
        drills.apply_watcher_event(&Event::Delete(d));
        let t = m.render();
        assert!(!t.contains("orders"), "{t}");
        assert!(!t.contains("outage"), "{t}");
        // The term ends: the status series go, the process's own stay.
        m.observe(None);
        assert!(m.render().contains("r4_controller_leader"));
    }

    #[test]
    fn every_kind_and_error_class_is_exported_at_zero() {
        let t = ControllerMetrics::new().render();
        for kind in KINDS {
            assert!(
                t.contains(&format!(
                    "r4_controller_reconciles_total{{kind=\"{kind}\"}} 0"
                )),
                "{t}"
            );
            for e in crate::controller::context::Error::METRIC_LABELS {
                assert!(t.contains(&format!(
                    "r4_controller_reconcile_errors_total{{error=\"{e}\",kind=\"{kind}\"}} 0"
                )));
            }
        }
    }

    #[test]
    fn leader_gauge_is_exported_before_any_reconcile() {
        let t = ControllerMetrics::new().render();
        assert!(t.contains("r4_controller_leader 0"), "{t}");
    }
}
