//! Hedging benchmark after "The Tail at Scale" (Dean & Barroso).
//!
//! An in-process tool answers most requests in ~10 ms, but a small fraction
//! (1.5% by default) takes 1-2 s. The same seeded call sequence goes through
//! three setups:
//!
//! * `none`: the tool directly,
//! * `tower`: `tower::hedge::Hedge` (same percentile, `min_data_points`,
//!   rotation period), shared through a `Buffer` since it is not `Clone`,
//! * `r4`: r4's hedge layer (plus its `max_extra_load` cap).
//!
//! Latencies are real `tokio::time::sleep`s of the tool on the real clock
//! (no paused time), so timer granularity (~1 ms) is part of the numbers.
//! Call `i` always gets the same primary latency, and its hedged copy the
//! same second latency, in every setup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::resilience::hedge::HedgeLayer;
use crate::resilience::{
    BoxError, HedgeConfig, HedgeDelay, HttpRequest, HttpResponse, ResilienceError, Telemetry,
};

#[derive(Clone, Debug)]
pub struct HedgeBenchOpts {
    pub calls: usize,
    /// Calls sent before measuring, so that tower's and r4's histograms are
    /// warm; their latencies and requests are not counted.
    pub warmup_calls: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// Fraction of requests that take 1-2 s.
    pub slow_fraction: f64,
    /// Hedge after this percentile (0-100) of observed latency.
    pub percentile: f64,
    /// r4's cap on extra requests.
    pub max_extra_load: f64,
    pub min_samples: u64,
    /// Histogram rotation period, for both tower and r4.
    pub period: Duration,
}

impl Default for HedgeBenchOpts {
    fn default() -> Self {
        HedgeBenchOpts {
            calls: 5000,
            warmup_calls: 2000,
            concurrency: 32,
            seed: 7,
            slow_fraction: 0.015,
            percentile: 95.0,
            max_extra_load: 0.05,
            min_samples: 100,
            period: Duration::from_millis(500),
        }
    }
}

const CALL_HEADER: &str = "x-call";

/// The heavy-tailed tool.
#[derive(Clone)]
struct TailTool {
    /// (first request, second request) latency of each call.
    latencies: Arc<Vec<(Duration, Duration)>>,
    seen: Arc<Vec<AtomicU8>>,
    requests: Arc<AtomicU64>,
}

impl TailTool {
    fn new(opts: &HedgeBenchOpts) -> Self {
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let draw = |rng: &mut SmallRng| {
            if rng.random_bool(opts.slow_fraction) {
                Duration::from_millis(rng.random_range(1000..2000))
            } else {
                Duration::from_micros(rng.random_range(8_000..12_000))
            }
        };
        let total = opts.warmup_calls + opts.calls;
        let latencies = (0..total)
            .map(|_| (draw(&mut rng), draw(&mut rng)))
            .collect();
        TailTool {
            latencies: Arc::new(latencies),
            seen: Arc::new((0..total).map(|_| AtomicU8::new(0)).collect()),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Service<HttpRequest> for TailTool {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<HttpResponse, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let idx = req
            .header(CALL_HEADER)
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|i| *i < self.latencies.len());
        let Some(idx) = idx else {
            return Box::pin(async { Err::<HttpResponse, BoxError>("missing call index".into()) });
        };
        let nth = self.seen[idx].fetch_add(1, Ordering::Relaxed);
        let (first, second) = self.latencies[idx];
        let latency = if nth == 0 { first } else { second };
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(HttpResponse::new(200, "ok"))
        })
    }
}

#[derive(Clone)]
struct TowerPolicy;

impl tower::hedge::Policy<HttpRequest> for TowerPolicy {
    fn clone_request(&self, req: &HttpRequest) -> Option<HttpRequest> {
        Some(req.clone())
    }
    fn can_retry(&self, _: &HttpRequest) -> bool {
        true
    }
}

/// Drive every call of the sequence through `svc` with `opts.concurrency`
/// workers, as one continuous stream; the first `opts.warmup_calls` calls
/// warm the hedging histograms and are left out of the numbers.
async fn measure<S>(svc: S, tool: &TailTool, opts: &HedgeBenchOpts) -> Value
where
    S: Service<HttpRequest, Response = HttpResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let warmup = opts.warmup_calls as u64;
    let total = warmup + opts.calls as u64;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let svc = svc.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let mut req = HttpRequest::get("/tool");
                req.headers.push((CALL_HEADER.into(), i.to_string()));
                let start = Instant::now();
                let ok = svc.clone().oneshot(req).await.is_ok();
                if i >= warmup {
                    lat.push(start.elapsed());
                    errors += u64::from(!ok);
                }
            }
            (lat, errors)
        }));
    }
    // 1 µs .. 1 h, 3 significant figures: constant, valid bounds.
    let mut h =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    let mut errors = 0;
    for w in workers {
        if let Ok((lat, e)) = w.await {
            errors += e;
            for l in lat {
                h.saturating_record(l.as_micros() as u64);
            }
        }
    }
    if errors > 0 {
        tracing::warn!(errors, "hedge bench calls failed");
    }
    // Requests the tool received for the measured calls only.
    let requests: u64 = tool.seen[warmup as usize..]
        .iter()
        .map(|n| u64::from(n.load(Ordering::Relaxed)))
        .sum();
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0;
    json!({
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "calls": h.len(),
        "requests": requests,
    })
}

pub async fn run(opts: HedgeBenchOpts) -> Value {
    let none = {
        let tool = TailTool::new(&opts);
        measure(tool.clone(), &tool, &opts).await
    };
    let tower = {
        let tool = TailTool::new(&opts);
        let hedge = tower::hedge::Hedge::new(
            tool.clone(),
            TowerPolicy,
            opts.min_samples,
            (opts.percentile / 100.0) as f32,
            opts.period,
        );
        let svc = tower::buffer::Buffer::new(hedge, 1024);
        measure(svc, &tool, &opts).await
    };
    let r4 = {
        let tool = TailTool::new(&opts);
        let cfg = HedgeConfig {
            enabled: true,
            delay: HedgeDelay::Percentile(opts.percentile),
            max_extra_load: opts.max_extra_load,
            only_idempotent: true,
            min_samples: opts.min_samples,
            window: opts.period,
        };
        let svc = tower::Layer::layer(
            &HedgeLayer::new(cfg, Telemetry::noop("bench")),
            tool.clone().map_err(ResilienceError::from_inner),
        );
        measure(svc, &tool, &opts).await
    };
    json!({ "none": none, "tower": tower, "r4": r4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench on tokio's paused clock (auto-advance), smaller: the goals
    /// become assertions.
    #[tokio::test(start_paused = true)]
    async fn hedge_bench_meets_goals() {
        let opts = HedgeBenchOpts {
            calls: 3000,
            warmup_calls: 1000,
            ..Default::default()
        };
        let out = run(opts).await;
        let f = |s: &str, k: &str| out[s][k].as_f64().unwrap();
        assert!(f("r4", "p999_ms") * 10.0 <= f("none", "p999_ms"), "{out}");
        assert!(f("r4", "requests") <= f("r4", "calls") * 1.05, "{out}");
        assert!(f("r4", "p999_ms") <= f("tower", "p999_ms") * 1.05, "{out}");
        assert_eq!(f("none", "requests"), 3000.0);
    }
}
