//! Circuit-breaker benchmark: a dependency goes down, then recovers.
//!
//! Workers call a tool through an r4 stack with only a breaker configured.
//! The tool fails fast with 503 during `[outage_start, outage_end)` and
//! answers 200 otherwise. At every request it receives, the tool reads the
//! breaker state, so requests arriving while the breaker is open
//! (`calls_during_open`, must be 0) are told apart from half-open probes
//! (`probe_calls`). Real clock, real sleeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::resilience::{
    BoxError, Breaker, BreakerConfig, BreakerState, BreakerWindow, HttpRequest, HttpResponse,
    PolicyConfig, Stack, Telemetry, build_stack,
};

#[derive(Clone, Debug)]
pub struct BreakerBenchOpts {
    pub outage_start: Duration,
    pub outage_end: Duration,
    pub total: Duration,
    pub concurrency: usize,
    pub breaker: BreakerConfig,
}

impl Default for BreakerBenchOpts {
    fn default() -> Self {
        BreakerBenchOpts {
            outage_start: Duration::from_millis(500),
            outage_end: Duration::from_millis(2500),
            total: Duration::from_millis(3500),
            concurrency: 4,
            breaker: BreakerConfig {
                failure_rate_threshold: 0.5,
                slow_call_rate_threshold: 1.0,
                slow_call_duration: Duration::from_secs(5),
                window: BreakerWindow::Count(20),
                minimum_calls: 10,
                open_duration: Duration::from_millis(300),
                half_open_calls: 3,
            },
        }
    }
}

#[derive(Clone)]
struct FlakyTool {
    start: Instant,
    outage: (Duration, Duration),
    breaker: Arc<Mutex<Option<Breaker>>>,
    during_open: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl Service<HttpRequest> for FlakyTool {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<HttpResponse, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: HttpRequest) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let state = crate::resilience::lock(&self.breaker)
            .as_ref()
            .map(|b| b.state());
        match state {
            Some(BreakerState::Open) => {
                self.during_open.fetch_add(1, Ordering::Relaxed);
            }
            Some(BreakerState::HalfOpen) => {
                self.probes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let t = self.start.elapsed();
        let down = t >= self.outage.0 && t < self.outage.1;
        Box::pin(async move {
            if down {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(HttpResponse::new(503, "down"))
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(HttpResponse::new(200, "ok"))
            }
        })
    }
}

pub async fn run(opts: BreakerBenchOpts) -> Value {
    let start = Instant::now();
    let tool = FlakyTool {
        start,
        outage: (opts.outage_start, opts.outage_end),
        breaker: Arc::new(Mutex::new(None)),
        during_open: Arc::new(AtomicU64::new(0)),
        probes: Arc::new(AtomicU64::new(0)),
        requests: Arc::new(AtomicU64::new(0)),
    };
    let cfg = PolicyConfig {
        circuit_breaker: Some(opts.breaker.clone()),
        ..Default::default()
    };
    let stack: Stack<HttpRequest, HttpResponse> =
        build_stack(&cfg, tool.clone(), Telemetry::noop("bench"));
    let transitions: Arc<Mutex<Vec<(Duration, BreakerState)>>> = Arc::default();
    if let Some(b) = &stack.breaker {
        *crate::resilience::lock(&tool.breaker) = Some(b.clone());
        let log = transitions.clone();
        b.on_transition(move |t| {
            crate::resilience::lock(&log).push((t.at.saturating_duration_since(start), t.to));
        });
    }
    let calls = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let svc = stack.service.clone();
        let calls = calls.clone();
        let rejected = rejected.clone();
        let total = opts.total;
        workers.push(tokio::spawn(async move {
            while start.elapsed() < total {
                calls.fetch_add(1, Ordering::Relaxed);
                if svc.clone().oneshot(HttpRequest::get("/dep")).await.is_err() {
                    rejected.fetch_add(1, Ordering::Relaxed);
                }
                // Pace callers so rejected calls do not spin.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let log = crate::resilience::lock(&transitions).clone();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let open_after = log
        .iter()
        .find(|(t, s)| *s == BreakerState::Open && *t >= opts.outage_start)
        .map(|(t, _)| ms(*t - opts.outage_start).round());
    let close_after = log
        .iter()
        .find(|(t, s)| *s == BreakerState::Closed && *t >= opts.outage_end)
        .map(|(t, _)| ms(*t - opts.outage_end).round());
    let opens = log.iter().filter(|(_, s)| *s == BreakerState::Open).count();
    json!({
        "open_after_ms": open_after,
        "calls_during_open": tool.during_open.load(Ordering::Relaxed),
        "probe_calls": tool.probes.load(Ordering::Relaxed),
        "close_after_recovery_ms": close_after,
        "times_opened": opens,
        "calls": calls.load(Ordering::Relaxed),
        "rejected_calls": rejected.load(Ordering::Relaxed),
        "tool_requests": tool.requests.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench on tokio's paused clock (auto-advance): same code, no wall
    /// time, and its goals become assertions.
    #[tokio::test(start_paused = true)]
    async fn breaker_bench_meets_goals() {
        let out = run(BreakerBenchOpts::default()).await;
        assert_eq!(out["calls_during_open"], 0, "{out}");
        let open_after = out["open_after_ms"].as_f64().unwrap();
        assert!(open_after < 1000.0, "{out}");
        assert!(out["probe_calls"].as_u64().unwrap() > 0, "{out}");
        assert!(out["close_after_recovery_ms"].as_f64().is_some(), "{out}");
    }
}
