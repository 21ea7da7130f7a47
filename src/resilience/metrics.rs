//! Prometheus metrics and cheap in-process counters.
//!
//! One [`Metrics`] is registered per process on a given registry; each target
//! gets a [`Telemetry`] handle (target label + shared atomics) that every
//! layer of that target's stack reports into. Labels are small and static
//! (`target`, `outcome`, `to`) to keep cardinality bounded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;

use super::breaker::BreakerState;

#[derive(Clone, Debug)]
pub struct Metrics {
    calls: IntCounterVec,
    retries: IntCounterVec,
    hedges: IntCounterVec,
    budget_rejections: IntCounterVec,
    fallbacks: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let calls = counter(
            "r4_policy_calls_total",
            "Logical calls through a resilience stack, by outcome",
            &["target", "outcome"],
        )?;
        let retries = counter("r4_policy_retries_total", "Retries sent", &["target"])?;
        let hedges = counter(
            "r4_policy_hedges_total",
            "Hedged requests sent",
            &["target"],
        )?;
        let budget_rejections = counter(
            "r4_policy_budget_rejections_total",
            "Retries refused by the retry budget",
            &["target"],
        )?;
        let fallbacks = counter(
            "r4_policy_fallbacks_total",
            "Responses served by the fallback layer",
            &["target"],
        )?;
        let breaker_transitions = counter(
            "r4_breaker_transitions_total",
            "Circuit breaker transitions, by new state",
            &["target", "to"],
        )?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "r4_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ),
            &["target"],
        )?;
        registry.register(Box::new(breaker_state.clone()))?;
        Ok(Metrics {
            calls,
            retries,
            hedges,
            budget_rejections,
            fallbacks,
            breaker_state,
            breaker_transitions,
        })
    }
}

/// In-process counters of one target, readable without Prometheus.
#[derive(Debug, Default)]
pub struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    budget_rejections: AtomicU64,
    throttled: AtomicU64,
    bulkhead_rejections: AtomicU64,
    breaker_trips: AtomicU64,
    fallbacks: AtomicU64,
    /// Time the breaker spent open in spans that ended, in µs.
    breaker_open_us: AtomicU64,
    /// When the breaker last opened, while it is open.
    open_since: Mutex<Option<Instant>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub calls: u64,
    pub failures: u64,
    pub retries: u64,
    pub hedges: u64,
    pub budget_rejections: u64,
    pub throttled: u64,
    pub bulkhead_rejections: u64,
    pub breaker_trips: u64,
    pub fallbacks: u64,
    /// Time the breaker has spent open (the current span included), in µs. The breaker
    /// leaves Open lazily (the first call or state read after `openDuration` finds it
    /// half-open), so an idle open breaker counts until something looks at it.
    pub breaker_open_us: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            calls: g(&self.calls),
            failures: g(&self.failures),
            retries: g(&self.retries),
            hedges: g(&self.hedges),
            budget_rejections: g(&self.budget_rejections),
            throttled: g(&self.throttled),
            bulkhead_rejections: g(&self.bulkhead_rejections),
            breaker_trips: g(&self.breaker_trips),
            fallbacks: g(&self.fallbacks),
            breaker_open_us: g(&self.breaker_open_us).saturating_add(
                (*super::lock(&self.open_since)).map_or(0, |since| micros(since.elapsed())),
            ),
        }
    }

    /// The breaker moved to `to`: start or close an open span.
    fn breaker_open_span(&self, to: BreakerState) {
        let mut since = super::lock(&self.open_since);
        match (to, *since) {
            (BreakerState::Open, None) => *since = Some(Instant::now()),
            (BreakerState::Open, Some(_)) => {}
            (_, Some(at)) => {
                self.breaker_open_us
                    .fetch_add(micros(at.elapsed()), Ordering::Relaxed);
                *since = None;
            }
            (_, None) => {}
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Per-target reporting handle handed to every layer (cheap to clone).
#[derive(Clone, Debug)]
pub struct Telemetry {
    target: Arc<str>,
    metrics: Option<Metrics>,
    counters: Arc<Counters>,
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl Telemetry {
    pub fn new(target: &str, metrics: Option<Metrics>) -> Self {
        if let Some(m) = &metrics {
            // Every counter of the target exported at 0 from the start, so a rate over it (a
            // dashboard's, an alert's) is defined before the first retry or hedge, and a scrape
            // shows the series exist.
            m.calls.with_label_values(&[target, "success"]);
            for c in [&m.retries, &m.hedges, &m.budget_rejections, &m.fallbacks] {
                c.with_label_values(&[target]);
            }
        }
        Telemetry {
            target: target.into(),
            metrics,
            counters: Arc::new(Counters::default()),
        }
    }

    /// A breaker was built for this target: it starts closed (a policy reload that replaces an
    /// open breaker with a fresh one shows closed again). Not a transition: nothing is counted.
    pub fn breaker_created(&self) {
        if let Some(m) = &self.metrics {
            m.breaker_state
                .with_label_values(&[&*self.target])
                .set(BreakerState::Closed.gauge_value());
            for to in [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed,
            ] {
                m.breaker_transitions
                    .with_label_values(&[&*self.target, to.label()]);
            }
        }
    }

    /// Counters only, no Prometheus (tests, benches).
    pub fn noop(target: &str) -> Self {
        Self::new(target, None)
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    pub fn call(&self, outcome: &str, failed: bool) {
        inc(&self.counters.calls);
        if failed {
            inc(&self.counters.failures);
        }
        if let Some(m) = &self.metrics {
            m.calls.with_label_values(&[&*self.target, outcome]).inc();
        }
    }

    pub fn retry(&self) {
        inc(&self.counters.retries);
        if let Some(m) = &self.metrics {
            m.retries.with_label_values(&[&*self.target]).inc();
        }
    }

    pub fn hedge(&self) {
        inc(&self.counters.hedges);
        if let Some(m) = &self.metrics {
            m.hedges.with_label_values(&[&*self.target]).inc();
        }
    }

    pub fn budget_rejection(&self) {
        inc(&self.counters.budget_rejections);
        if let Some(m) = &self.metrics {
            m.budget_rejections
                .with_label_values(&[&*self.target])
                .inc();
        }
    }

    pub fn throttled(&self) {
        inc(&self.counters.throttled);
    }

    pub fn bulkhead_rejection(&self) {
        inc(&self.counters.bulkhead_rejections);
    }

    pub fn fallback(&self) {
        inc(&self.counters.fallbacks);
        if let Some(m) = &self.metrics {
            m.fallbacks.with_label_values(&[&*self.target]).inc();
        }
    }

    pub fn breaker_transition(&self, to: BreakerState) {
        if to == BreakerState::Open {
            inc(&self.counters.breaker_trips);
        }
        self.counters.breaker_open_span(to);
        if let Some(m) = &self.metrics {
            m.breaker_state
                .with_label_values(&[&*self.target])
                .set(to.gauge_value());
            m.breaker_transitions
                .with_label_values(&[&*self.target, to.label()])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_counts() {
        let reg = Registry::new();
        let m = Metrics::register(&reg).unwrap();
        let t = Telemetry::new("tool-a", Some(m.clone()));
        t.call("success", false);
        t.retry();
        t.breaker_transition(BreakerState::Open);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .unwrap();
        assert!(text.contains("r4_policy_calls_total{outcome=\"success\",target=\"tool-a\"} 1"));
        assert!(text.contains("r4_breaker_state{target=\"tool-a\"} 1"));
        assert_eq!(t.snapshot().breaker_trips, 1);
        // The target's other counters exist at 0 before anything happened to them.
        assert!(
            text.contains("r4_policy_hedges_total{target=\"tool-a\"} 0"),
            "{text}"
        );
        assert!(text.contains("r4_policy_fallbacks_total{target=\"tool-a\"} 0"));
        let fresh = Telemetry::new("tool-b", Some(m));
        let before = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .unwrap();
        assert!(
            !before.contains("r4_breaker_state{target=\"tool-b\"}"),
            "no breaker yet"
        );
        fresh.breaker_created();
        let after = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .unwrap();
        assert!(
            after.contains("r4_breaker_state{target=\"tool-b\"} 0"),
            "{after}"
        );
        assert!(
            after.contains("r4_breaker_transitions_total{target=\"tool-b\",to=\"open\"} 0"),
            "{after}"
        );
        // Registering twice on one registry is an error, not a panic.
        assert!(Metrics::register(&reg).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_open_time_adds_up_the_open_spans() {
        let t = Telemetry::noop("tool-a");
        assert_eq!(t.snapshot().breaker_open_us, 0);
        t.breaker_transition(BreakerState::Open);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        // Still open: the current span counts.
        assert_eq!(t.snapshot().breaker_open_us, 2_000_000);
        t.breaker_transition(BreakerState::HalfOpen);
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        t.breaker_transition(BreakerState::Open);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        t.breaker_transition(BreakerState::Closed);
        tokio::time::sleep(std::time::Duration::from_secs(9)).await;
        assert_eq!(
            t.snapshot().breaker_open_us,
            3_000_000,
            "half-open and closed time excluded"
        );
        assert_eq!(t.snapshot().breaker_trips, 2);
    }
}
