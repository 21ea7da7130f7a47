//! Adaptive client-side throttling (Google SRE book, ch. 21 "Handling
//! Overload").
//!
//! Each client tracks, over the last `window` (2 minutes by default):
//! *requests* it attempted and *accepts*, requests the backend answered
//! successfully. When the backend starts rejecting, the client rejects
//! locally, before sending, with probability
//!
//! `p = max(0, (requests - K * accepts) / (requests + 1))`
//!
//! so an overloaded backend sees roughly `K` times its accept rate instead of
//! the full offered load. Local rejections still count as requests (as in the
//! book), which lets `p` climb while the backend stays down and fall as soon
//! as accepts come back. Rejections made by layers below (breaker open) are
//! not backend answers and are not counted at all.
//!
//! A total outage is the breaker's business, not the throttle's: when the
//! breaker below closes again after its half-open probes succeeded, the
//! backend has just proven it answers, and the throttle forgets the outage
//! ([`ThrottleLayer::forget`], wired in `stack`). Without that, the history of
//! a long outage (thousands of requests, no accepts) lets traffic back only as
//! fast as accepts can grow from nothing — about `ln(requests)` half-windows:
//! the worked example's drill found it, a 2-minute bank outage followed by six
//! minutes of 24,515 local rejections while the bank was healthy again.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rand::Rng;
use rand::rngs::SmallRng;
use tower::{Layer, Service, ServiceExt};

use super::classify::{Outcome, outcome_of};
use super::config::ThrottleConfig;
use super::retry::new_rng;
use super::window::SlidingCounter;
use super::{BoxFut, PolicyResponse, ResilienceError, Telemetry, lock};

#[derive(Debug)]
struct State {
    /// deposits = requests, withdrawals = accepts.
    window: SlidingCounter,
    rng: SmallRng,
}

#[derive(Clone, Debug)]
pub struct ThrottleLayer {
    k: f64,
    state: Arc<Mutex<State>>,
    telemetry: Telemetry,
}

impl ThrottleLayer {
    pub fn new(cfg: &ThrottleConfig, seed: Option<u64>, telemetry: Telemetry) -> Self {
        ThrottleLayer {
            k: cfg.k,
            state: Arc::new(Mutex::new(State {
                window: SlidingCounter::new(cfg.window),
                rng: new_rng(seed),
            })),
            telemetry,
        }
    }

    /// Forget the counted requests and accepts (the backend proved healthy
    /// by other means: the breaker below closed after its probes).
    pub fn forget(&self) {
        lock(&self.state).window.clear();
    }

    /// Current local rejection probability.
    pub fn reject_probability(&self) -> f64 {
        let (requests, accepts) = lock(&self.state).window.counts();
        probability(requests, accepts, self.k)
    }
}

fn probability(requests: u64, accepts: u64, k: f64) -> f64 {
    let r = requests as f64;
    ((r - k * accepts as f64) / (r + 1.0)).max(0.0)
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;
    fn layer(&self, inner: S) -> Throttle<S> {
        Throttle {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Throttle<S> {
    inner: S,
    layer: ThrottleLayer,
}

impl<S, Req> Service<Req> for Throttle<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<super::BoxError>,
    S::Future: Send,
    S::Response: PolicyResponse,
    Req: Send + 'static,
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
            {
                let mut st = lock(&layer.state);
                let (requests, accepts) = st.window.counts();
                let p = probability(requests, accepts, layer.k);
                if p > 0.0 && st.rng.random_bool(p.min(1.0)) {
                    // A local rejection is still a request (SRE book), so
                    // `p` keeps rising while the backend accepts nothing.
                    st.window.deposit();
                    drop(st);
                    layer.telemetry.throttled();
                    return Err(ResilienceError::Throttled);
                }
            }
            let res = inner
                .oneshot(req)
                .await
                .map_err(ResilienceError::from_inner);
            let local = matches!(
                res,
                Err(ResilienceError::BreakerOpen
                    | ResilienceError::BulkheadFull
                    | ResilienceError::Throttled)
            );
            // Counted on completion so that a rejection made below us (not a
            // backend answer) is not counted at all.
            if !local {
                let mut st = lock(&layer.state);
                st.window.deposit();
                if outcome_of(&res) == Outcome::Success {
                    st.window.withdraw();
                }
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::HttpRequest;
    use crate::resilience::testutil::*;
    use std::time::Duration;

    fn layer(tel: &Telemetry) -> ThrottleLayer {
        ThrottleLayer::new(
            &ThrottleConfig {
                enabled: true,
                k: 2.0,
                window: Duration::from_secs(120),
            },
            Some(42),
            tel.clone(),
        )
    }

    #[test]
    fn formula() {
        assert_eq!(probability(0, 0, 2.0), 0.0);
        assert_eq!(probability(100, 50, 2.0), 0.0);
        assert!((probability(100, 0, 2.0) - 100.0 / 101.0).abs() < 1e-12);
        assert!((probability(100, 25, 2.0) - 50.0 / 101.0).abs() < 1e-12);
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_backend_is_never_throttled() {
        let tel = Telemetry::noop("t");
        let inner = Scripted::new(vec![], ok(1));
        let svc = layer(&tel).layer(inner.clone());
        for _ in 0..500 {
            assert!(svc.clone().oneshot(HttpRequest::get("/")).await.is_ok());
        }
        assert_eq!(tel.snapshot().throttled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_backend_is_throttled_then_recovers_after_window() {
        let tel = Telemetry::noop("t");
        let inner = Scripted::new(vec![], status(503));
        let l = layer(&tel);
        let svc = l.clone().layer(inner.clone());
        for _ in 0..1000 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // With zero accepts p -> requests/(requests+1): almost all of the
        // 1000 calls after the first few are rejected locally.
        let sent = inner.calls();
        assert!(sent < 100, "{sent} requests reached the backend");
        assert_eq!(tel.snapshot().throttled as usize, 1000 - sent);
        // After the window passes with no traffic, the history is gone.
        tokio::time::advance(Duration::from_secs(121)).await;
        assert_eq!(l.reject_probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_lets_traffic_back_at_once() {
        let tel = Telemetry::noop("t");
        let inner = Scripted::new(vec![], status(503));
        let l = layer(&tel);
        let svc = l.clone().layer(inner.clone());
        for _ in 0..1000 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(l.reject_probability() > 0.9);
        l.forget();
        assert_eq!(l.reject_probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn half_accepting_backend_with_k2_is_not_throttled() {
        // Accepting 50% of requests: requests - 2*accepts <= 0, so p = 0.
        let steps = (0..400).map(|i| if i % 2 == 0 { ok(0) } else { status(503) });
        let tel = Telemetry::noop("t");
        let inner = Scripted::new(steps.collect(), ok(0));
        let svc = layer(&tel).layer(inner.clone());
        for _ in 0..400 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
        }
        // The very first failures can tip p above zero briefly.
        assert!(tel.snapshot().throttled <= 2);
    }
}
