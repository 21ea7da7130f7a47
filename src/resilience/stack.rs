//! Builds the composed resilience stack for one target from a
//! [`PolicyConfig`].
//!
//! Order, outermost first, and why:
//!
//! 1. **fallback**: sees every failure below, including local rejections,
//!    so an open breaker can still be answered from cache;
//! 2. **bulkhead**: caps concurrency before any work or waiting is done;
//! 3. **adaptive throttle**: rejects locally in proportion to backend
//!    rejections, before the breaker sees the call;
//! 4. **breaker**: judges logical calls (after retries), so one flaky attempt
//!    that a retry fixed does not count as a failure;
//! 5. **overall timeout**: bounds the call including retries and backoff;
//! 6. **retry + budget**;
//! 7. **hedge**: each retry attempt may itself be hedged;
//! 8. **per-attempt timeout**: bounds each single request (hedged copies too);
//! 9. the inner service.
//!
//! Every stage is boxed into a [`PolicyService`]; the extra allocation per
//! layer is negligible next to a network call and keeps the optional stages
//! simple. Switched-off mechanisms add no layer at all.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::JoinHandle;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use super::breaker::{Breaker, BreakerLayer, BreakerState};
use super::bulkhead::BulkheadLayer;
use super::classify::{Outcome, outcome_of};
use super::fallback::FallbackLayer;
use super::hedge::HedgeLayer;
use super::retry::RetryLayer;
use super::throttle::ThrottleLayer;
use super::timeout::TimeoutLayer;
use super::{
    BoxError, BoxFut, PolicyConfig, PolicyRequest, PolicyResponse, ResilienceError,
    SharedBreakerStore, Telemetry,
};

/// The composed, cloneable service the engine calls.
pub type PolicyService<Req, Resp> = BoxCloneService<Req, Resp, ResilienceError>;

/// A built stack plus the handles the engine may need.
pub struct Stack<Req, Resp> {
    pub service: PolicyService<Req, Resp>,
    /// The breaker, if configured (state, listeners, shared store).
    pub breaker: Option<Breaker>,
    pub telemetry: Telemetry,
}

impl<Req, Resp> Stack<Req, Resp> {
    /// Share this target's breaker state through Redis (opt-in). Returns the
    /// sync task, or `None` when no breaker is configured.
    pub async fn share_breaker(
        &self,
        store: &SharedBreakerStore,
        poll_interval: Duration,
    ) -> redis::RedisResult<Option<JoinHandle<()>>> {
        match &self.breaker {
            Some(b) => Ok(Some(store.attach(b, poll_interval).await?)),
            None => Ok(None),
        }
    }
}

fn boxed<L, Req, Resp>(layer: L, svc: PolicyService<Req, Resp>) -> PolicyService<Req, Resp>
where
    L: Layer<PolicyService<Req, Resp>>,
    L::Service: Service<Req, Response = Resp, Error = ResilienceError> + Clone + Send + 'static,
    <L::Service as Service<Req>>::Future: Send + 'static,
    Req: 'static,
{
    BoxCloneService::new(layer.layer(svc))
}

/// Derive distinct, reproducible seeds for each random stage.
fn seed(cfg: &PolicyConfig, n: u64) -> Option<u64> {
    cfg.seed
        .map(|s| s.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// Build the stack for one target around `inner`.
pub fn build_stack<S, Req, Resp>(
    cfg: &PolicyConfig,
    inner: S,
    telemetry: Telemetry,
) -> Stack<Req, Resp>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Req: PolicyRequest,
    Resp: PolicyResponse + Sync,
{
    let mut svc: PolicyService<Req, Resp> =
        BoxCloneService::new(inner.map_err(ResilienceError::from_inner));

    let timeouts = cfg.timeout.clone().unwrap_or_default();
    if let Some(d) = timeouts.per_attempt {
        svc = boxed(TimeoutLayer::new(d), svc);
    }
    if let Some(h) = cfg.hedge.clone().filter(|h| h.enabled) {
        svc = boxed(HedgeLayer::new(h, telemetry.clone()), svc);
    }
    if let Some(r) = cfg.retry.clone().filter(|r| r.max_attempts > 1) {
        svc = boxed(RetryLayer::new(r, seed(cfg, 1), telemetry.clone()), svc);
    }
    if let Some(d) = timeouts.overall {
        svc = boxed(TimeoutLayer::new(d), svc);
    }
    let breaker = cfg
        .circuit_breaker
        .clone()
        .map(|b| Breaker::new(b, telemetry.clone()));
    if let Some(b) = &breaker {
        svc = boxed(BreakerLayer::new(b.clone()), svc);
    }
    if let Some(t) = cfg.throttle.as_ref().filter(|t| t.enabled) {
        let throttle = ThrottleLayer::new(t, seed(cfg, 2), telemetry.clone());
        // The breaker closing after successful probes ends an outage: the
        // throttle must not keep rejecting on the outage's history.
        if let Some(b) = &breaker {
            let forget = throttle.clone();
            b.on_transition(move |t| {
                if t.from == BreakerState::HalfOpen && t.to == BreakerState::Closed {
                    forget.forget();
                }
            });
        }
        svc = boxed(throttle, svc);
    }
    if let Some(b) = &cfg.bulkhead {
        svc = boxed(BulkheadLayer::new(b.max_concurrent, telemetry.clone()), svc);
    }
    if let Some(f) = cfg
        .fallback
        .as_ref()
        .and_then(|f| FallbackLayer::new(f, telemetry.clone()))
    {
        svc = boxed(f, svc);
    }
    svc = BoxCloneService::new(Instrument {
        inner: svc,
        telemetry: telemetry.clone(),
    });
    Stack {
        service: svc,
        breaker,
        telemetry,
    }
}

/// Outermost: counts logical calls by outcome.
#[derive(Clone)]
struct Instrument<S> {
    inner: S,
    telemetry: Telemetry,
}

impl<S, Req> Service<Req> for Instrument<S>
where
    S: Service<Req, Error = ResilienceError> + Clone + Send + 'static,
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
        let telemetry = self.telemetry.clone();
        Box::pin(async move {
            let res = inner.oneshot(req).await;
            match (&res, outcome_of(&res)) {
                (Ok(r), _) if r.is_fallback() => telemetry.call("fallback", false),
                (_, Outcome::Success) => telemetry.call("success", false),
                (Err(e), _) => telemetry.call(e.metric_label(), true),
                (Ok(_), Outcome::Failure(c)) => telemetry.call(c.label(), true),
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::config::*;
    use crate::resilience::testutil::*;
    use crate::resilience::{BreakerState, HttpRequest, HttpResponse, Metrics};

    fn full_config() -> PolicyConfig {
        PolicyConfig {
            timeout: Some(TimeoutConfig {
                per_attempt: Some(Duration::from_millis(200)),
                overall: Some(Duration::from_secs(2)),
            }),
            retry: Some(RetryConfig {
                max_attempts: 3,
                backoff: BackoffConfig {
                    initial: Duration::from_millis(10),
                    max: Duration::from_millis(100),
                    multiplier: 2.0,
                    jitter: Jitter::Full,
                },
                budget: Some(BudgetConfig::default()),
                retry_on: [RetryOn::Timeout, RetryOn::Status5xx].into_iter().collect(),
            }),
            hedge: Some(HedgeConfig::default()),
            circuit_breaker: Some(BreakerConfig {
                window: BreakerWindow::Count(10),
                minimum_calls: 5,
                open_duration: Duration::from_secs(5),
                half_open_calls: 1,
                ..Default::default()
            }),
            bulkhead: Some(BulkheadConfig { max_concurrent: 8 }),
            throttle: None,
            fallback: Some(FallbackConfig::Cache {
                ttl: Duration::from_secs(300),
            }),
            seed: Some(9),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn default_config_is_pass_through() {
        let inner = Scripted::new(vec![status(503)], ok(0));
        let stack: Stack<HttpRequest, HttpResponse> = build_stack(
            &PolicyConfig::default(),
            inner.clone(),
            Telemetry::noop("t"),
        );
        let r = stack.service.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(inner.calls(), 1);
        assert!(stack.breaker.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn full_stack_retries_times_out_opens_and_falls_back() {
        let reg = prometheus::Registry::new();
        let tel = Telemetry::new("tool", Some(Metrics::register(&reg).unwrap()));
        // 1: hangs (per-attempt timeout) then retried OK; then an outage.
        let mut steps = vec![ok(10_000), ok(5)];
        steps.extend(std::iter::repeat_n(status(503), 100));
        let inner = Scripted::new(steps, ok(5));
        let stack: Stack<HttpRequest, HttpResponse> =
            build_stack(&full_config(), inner.clone(), tel.clone());
        let svc = stack.service.clone();

        let r = svc.clone().oneshot(HttpRequest::get("/s")).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.is_fallback());
        assert_eq!(tel.snapshot().retries, 1);

        // Outage: failures open the breaker; every answer is the cached one.
        for _ in 0..20 {
            let r = svc.clone().oneshot(HttpRequest::get("/s")).await.unwrap();
            assert!(r.is_fallback());
        }
        let b = stack.breaker.as_ref().unwrap();
        assert_eq!(b.state(), BreakerState::Open);
        let snap = tel.snapshot();
        assert_eq!(snap.calls, 21);
        assert_eq!(snap.fallbacks, 20);
        assert_eq!(snap.breaker_trips, 1);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .unwrap();
        assert!(text.contains("r4_breaker_transitions_total{target=\"tool\",to=\"open\"} 1"));
        assert!(text.contains("r4_policy_calls_total{outcome=\"fallback\",target=\"tool\"} 20"));
        // An uncached key gets the real failure.
        let e = svc.oneshot(HttpRequest::get("/other")).await.unwrap_err();
        assert!(matches!(e, ResilienceError::BreakerOpen));
    }
}
