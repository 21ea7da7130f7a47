//! The controller's Prometheus metrics: what it reconciled, how long that took, what failed,
//! what it wrote, and whether it leads. [`super::http`] serves them on `/metrics`.
//!
//! Label sets are small and static: `kind` is one of the three kinds (`AgentWorkflow`,
//! `CircuitPolicy`, `ChaosDrill`) and `error` is a reconcile error's `metric_label()` (a fixed
//! word per error variant, never a message). Callers must not pass object names or free text:
//! every distinct value is a time series kept forever.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Buckets of the reconcile duration, in seconds: a reconcile is a few API calls (ms) up to
/// a slow Redis read under a deadline (seconds).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the controller exports, in its own registry.
pub struct ControllerMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    status_writes: IntCounterVec,
    applies: IntCounterVec,
    leader: IntGauge,
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

        let registry = Registry::new();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(status_writes.clone()),
            Box::new(applies.clone()),
            Box::new(leader.clone()),
        ] {
            // Distinct names in a fresh registry: registration cannot fail.
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("fresh registry: {e}"));
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            status_writes,
            applies,
            leader,
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

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec only fails on invalid metric data, which the
        // static definitions above rule out; an empty page is the honest answer if it did.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
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

    #[test]
    fn leader_gauge_is_exported_before_any_reconcile() {
        let t = ControllerMetrics::new().render();
        assert!(t.contains("r4_controller_leader 0"), "{t}");
    }
}
