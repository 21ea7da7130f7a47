//! Hedged requests ("The Tail at Scale", Dean & Barroso 2013).
//!
//! A call is sent once; if it has not answered after a delay (a percentile of
//! recently observed attempt latencies, or a fixed duration), ONE extra copy
//! is sent and the first *successful* answer wins. The other request is
//! dropped, which cancels it. Because the delay sits at the tail, only the
//! slow few percent of calls get a copy, and the tail collapses to roughly
//! `delay + typical latency`.
//!
//! Guards:
//! * hedges are capped at `max_extra_load` of the calls in the last `window`
//!   (a conservative [`SlidingCounter`], so the cap holds at every instant),
//!   so a slow dependency is not hit with double load;
//! * with `only_idempotent`, non-idempotent requests are never duplicated;
//! * percentile delays need `min_samples` recorded latencies first.
//!
//! Latencies live in a rotating pair of HDR histograms like tower's
//! `rotating_histogram.rs`: writes go to the current period, reads come from
//! the previous full one. Unlike tower, while the previous period has fewer
//! than `min_samples` points the current one is read, so hedging starts
//! after `min_samples` calls instead of after a whole period.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, select};
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::classify::{Outcome, outcome_of};
use super::config::{HedgeConfig, HedgeDelay};
use super::window::SlidingCounter;
use super::{BoxFut, PolicyRequest, PolicyResponse, ResilienceError, Telemetry, lock};

/// Two HDR histograms swapped every `period` (values in microseconds).
#[derive(Debug)]
pub struct RotatingHistogram {
    read: Histogram<u64>,
    write: Histogram<u64>,
    last_rotation: Instant,
    period: Duration,
}

fn new_histogram() -> Histogram<u64> {
    // Auto-resizing, 3 significant figures: a constant, valid configuration.
    Histogram::<u64>::new(3).expect("3 significant figures is a valid histogram")
}

impl RotatingHistogram {
    pub fn new(period: Duration) -> Self {
        RotatingHistogram {
            read: new_histogram(),
            write: new_histogram(),
            last_rotation: Instant::now(),
            period: period.max(Duration::from_millis(1)),
        }
    }

    fn maybe_rotate(&mut self) {
        let elapsed = Instant::now().saturating_duration_since(self.last_rotation);
        let rotations = (elapsed.as_nanos() / self.period.as_nanos()) as u32;
        if rotations >= 2 {
            self.read.clear();
            self.write.clear();
        } else if rotations == 1 {
            std::mem::swap(&mut self.read, &mut self.write);
            self.write.clear();
        }
        self.last_rotation += self.period * rotations;
    }

    pub fn record(&mut self, latency: Duration) {
        self.maybe_rotate();
        // Auto-resizing histograms only fail on u64 overflow; dropping one
        // sample is harmless.
        let _ = self.write.record(latency.as_micros().max(1) as u64);
    }

    /// Latency at `quantile` (0..=1) once `min_samples` points are known.
    pub fn quantile(&mut self, quantile: f64, min_samples: u64) -> Option<Duration> {
        self.maybe_rotate();
        let h = if self.read.len() >= min_samples {
            &self.read
        } else if self.write.len() >= min_samples {
            &self.write
        } else {
            return None;
        };
        Some(Duration::from_micros(
            h.value_at_quantile(quantile.clamp(0.0, 1.0)),
        ))
    }
}

#[derive(Debug)]
struct State {
    histogram: RotatingHistogram,
    /// deposits = calls, withdrawals = hedges.
    load: SlidingCounter,
}

#[derive(Clone, Debug)]
pub struct HedgeLayer {
    cfg: Arc<HedgeConfig>,
    state: Arc<Mutex<State>>,
    telemetry: Telemetry,
}

impl HedgeLayer {
    pub fn new(cfg: HedgeConfig, telemetry: Telemetry) -> Self {
        let state = State {
            histogram: RotatingHistogram::new(cfg.window),
            load: SlidingCounter::new(cfg.window),
        };
        HedgeLayer {
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(state)),
            telemetry,
        }
    }

    fn delay(&self) -> Option<Duration> {
        match self.cfg.delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Percentile(p) => lock(&self.state)
                .histogram
                .quantile(p / 100.0, self.cfg.min_samples),
        }
    }

    fn record(&self, latency: Duration) {
        lock(&self.state).histogram.record(latency);
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;
    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Hedge<S> {
    inner: S,
    layer: HedgeLayer,
}

impl<S, Req> Service<Req> for Hedge<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<super::BoxError>,
    S::Future: Send,
    S::Response: PolicyResponse,
    Req: PolicyRequest,
{
    type Response = S::Response;
    type Error = ResilienceError;
    type Future = BoxFut<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            lock(&layer.state).load.deposit();
            let eligible = layer.cfg.enabled && (!layer.cfg.only_idempotent || req.idempotent());
            let delay = if eligible { layer.delay() } else { None };
            // One timed attempt; its latency feeds the histogram when it
            // completes (a cancelled loser records nothing).
            let attempt = {
                let layer = layer.clone();
                move |req: Req| {
                    let svc = inner.clone();
                    let layer = layer.clone();
                    Box::pin(async move {
                        let start = Instant::now();
                        let res = svc.oneshot(req).await.map_err(ResilienceError::from_inner);
                        layer.record(start.elapsed());
                        res
                    })
                }
            };
            let Some(delay) = delay else {
                return attempt(req).await;
            };
            let mut primary = attempt(req.clone());
            let timer = Box::pin(tokio::time::sleep(delay));
            let primary = match select(primary.as_mut(), timer).await {
                Either::Left((res, _)) => return res,
                Either::Right(((), _)) => primary,
            };
            let allowed = lock(&layer.state)
                .load
                .try_withdraw(layer.cfg.max_extra_load, 0.0);
            if !allowed {
                return primary.await;
            }
            layer.telemetry.hedge();
            let hedge = attempt(req);
            match select(primary, hedge).await {
                Either::Left((first, other)) | Either::Right((first, other)) => {
                    if outcome_of(&first) == Outcome::Success {
                        // Dropping `other` cancels the losing request.
                        return first;
                    }
                    let second = other.await;
                    if outcome_of(&second) == Outcome::Success {
                        second
                    } else {
                        first
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::HttpRequest;
    use crate::resilience::testutil::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn cfg(delay: HedgeDelay, max_extra_load: f64, min_samples: u64) -> HedgeConfig {
        HedgeConfig {
            enabled: true,
            delay,
            max_extra_load,
            only_idempotent: true,
            min_samples,
            window: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_delay_hedge_wins_and_loser_is_cancelled() {
        // First request hangs 10 s, the hedge answers in 5 ms.
        let inner = Scripted::new(vec![ok(10_000), ok(5)], ok(5));
        let tel = Telemetry::noop("t");
        let layer = HedgeLayer::new(
            cfg(HedgeDelay::Fixed(Duration::from_millis(20)), 1.0, 0),
            tel.clone(),
        );
        // Give the load cap some calls to allow one hedge.
        lock(&layer.state).load.deposit();
        let svc = layer.layer(inner.clone());
        let start = Instant::now();
        let res = svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(start.elapsed(), Duration::from_millis(25));
        assert_eq!(inner.calls(), 2);
        assert_eq!(tel.snapshot().hedges, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_requests_are_not_hedged() {
        let inner = Scripted::new(vec![ok(1000)], ok(5));
        let svc = HedgeLayer::new(
            cfg(HedgeDelay::Fixed(Duration::from_millis(20)), 1.0, 0),
            Telemetry::noop("t"),
        )
        .layer(inner.clone());
        let start = Instant::now();
        svc.oneshot(HttpRequest::post("/", vec![])).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        assert_eq!(inner.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_percentile_hedging_before_min_samples() {
        // 10 calls of 100 ms, then one that would hang 5 s (its hedge: 100 ms).
        let mut steps = vec![ok(100); 10];
        steps.push(ok(5000));
        let inner = Scripted::new(steps, ok(100));
        let tel = Telemetry::noop("t");
        let svc = HedgeLayer::new(cfg(HedgeDelay::Percentile(50.0), 1.0, 10), tel.clone())
            .layer(inner.clone());
        for _ in 0..10 {
            svc.clone().oneshot(HttpRequest::get("/")).await.unwrap();
        }
        assert_eq!(tel.snapshot().hedges, 0);
        // The 11th call sees 10 samples: hedges after p50 (~100 ms).
        let start = Instant::now();
        svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(tel.snapshot().hedges, 1);
        assert!(start.elapsed() < Duration::from_millis(250));
    }

    /// Property-style: heavy-tailed latencies, concurrent calls, random
    /// arrival gaps. The number of hedges in any window never exceeds
    /// `max_extra_load` of the calls in that window, and overall the extra
    /// requests stay under the cap.
    #[tokio::test(start_paused = true)]
    async fn hedges_never_exceed_load_cap() {
        for seed in 0..5u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let steps: Vec<Step> = (0..2000)
                .map(|_| {
                    if rng.random_bool(0.2) {
                        ok(rng.random_range(200..2000))
                    } else {
                        ok(rng.random_range(5..15))
                    }
                })
                .collect();
            let inner = Scripted::new(steps, ok(10));
            let tel = Telemetry::noop("t");
            let cap = 0.05;
            let svc = HedgeLayer::new(cfg(HedgeDelay::Percentile(50.0), cap, 20), tel.clone())
                .layer(inner.clone());
            let mut tasks = Vec::new();
            let mut hedge_log: Vec<(Instant, u64)> = Vec::new();
            let mut call_times: Vec<Instant> = Vec::new();
            for _ in 0..1000 {
                call_times.push(Instant::now());
                tasks.push(tokio::spawn(svc.clone().oneshot(HttpRequest::get("/"))));
                tokio::time::advance(Duration::from_millis(rng.random_range(0..20))).await;
                hedge_log.push((Instant::now(), tel.snapshot().hedges));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let hedges = tel.snapshot().hedges;
            assert!(hedges > 0, "seed {seed}: never hedged");
            assert!(
                hedges as f64 <= cap * 1000.0,
                "seed {seed}: {hedges} hedges for 1000 calls"
            );
            assert_eq!(inner.calls() as u64, 1000 + hedges);
            // Per-window check on the sampled log (10 s window).
            for (i, (t, h)) in hedge_log.iter().enumerate() {
                let since = *t - Duration::from_secs(10);
                let calls_in = call_times[..=i].iter().filter(|c| **c > since).count();
                let h_before = hedge_log
                    .iter()
                    .rev()
                    .find(|(t2, _)| *t2 < since)
                    .map_or(0, |(_, h)| *h);
                let hedges_in = h - h_before;
                assert!(
                    hedges_in as f64 <= cap * calls_in as f64 + 1.0,
                    "seed {seed}: {hedges_in} hedges vs {calls_in} calls in window"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rotating_histogram_forgets_old_periods() {
        let mut h = RotatingHistogram::new(Duration::from_secs(1));
        for _ in 0..10 {
            h.record(Duration::from_millis(100));
        }
        assert!(h.quantile(0.5, 10).is_some());
        tokio::time::advance(Duration::from_millis(1100)).await;
        // Rotated: the old write period is now the read period.
        assert!(h.quantile(0.5, 10).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.quantile(0.5, 10).is_none());
    }
}
