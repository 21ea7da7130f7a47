//! Retries with exponential backoff, jitter, a budget and idempotency rules.
//!
//! A failed attempt is retried only if all hold:
//! * attempts so far < `max_attempts` (which counts the first attempt),
//! * its failure class is in `retry_on`,
//! * the request is idempotent, *or* the failure was a connect error (the
//!   request provably never reached the server, so sending it again cannot
//!   duplicate a side effect),
//! * the retry budget grants a token.
//!
//! Backoff is `initial * multiplier^(n-1)` capped at `max`, with Full, Equal
//! or Decorrelated jitter (AWS "Exponential Backoff And Jitter"), drawn from a
//! seedable RNG. A 429 carrying `Retry-After` waits at least that long — but
//! never longer than the backoff cap `max`: a 429 asking for more is not
//! retried here (the caller gets it at once, rather than a call parked past
//! what its policy allows), and the wait it asks for counts against the
//! retry budget like any retry.
//! [`backoff_delay`] is r4's one backoff formula: tool retries here and the
//! engine's redeliveries of a task both use it.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::{Layer, Service, ServiceExt};

use super::budget::RetryBudget;
use super::classify::{FailureClass, Outcome, outcome_of};
use super::config::{BackoffConfig, Jitter, RetryConfig, RetryOn};
use super::{BoxFut, PolicyRequest, PolicyResponse, ResilienceError, Telemetry, lock};

pub(crate) fn new_rng(seed: Option<u64>) -> SmallRng {
    match seed {
        Some(s) => SmallRng::seed_from_u64(s),
        None => SmallRng::from_os_rng(),
    }
}

/// Backoff state of one logical call.
#[derive(Debug)]
pub struct Backoff {
    cfg: BackoffConfig,
    /// Previous sleep, for decorrelated jitter.
    prev: Duration,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        let prev = cfg.initial;
        Backoff { cfg, prev }
    }

    /// Delay before retry number `retry` (1 = first retry).
    pub fn next_delay(&mut self, retry: u32, rng: &mut impl Rng) -> Duration {
        let d = backoff_delay(&self.cfg, retry, self.prev, rng.random::<f64>());
        self.prev = d;
        d
    }
}

/// The backoff before retry number `retry` (1 = first retry): `initial *
/// multiplier^(retry-1)` capped at `max`, jittered with the draw `unit` in
/// `[0, 1)` — Full: `base * unit`; Equal: `base/2 + base/2 * unit`;
/// Decorrelated: between `initial` and `3 * prev` (the previous delay),
/// capped at `max`; None: `base`. Pure, so callers choose their RNG (and a
/// seeded run repeats itself).
pub fn backoff_delay(cfg: &BackoffConfig, retry: u32, prev: Duration, unit: f64) -> Duration {
    let initial = cfg.initial.as_secs_f64();
    let max = cfg.max.as_secs_f64().max(initial);
    let exp = cfg
        .multiplier
        .max(1.0)
        .powi(i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX));
    let base = (initial * exp).min(max);
    let unit = unit.clamp(0.0, 1.0);
    let secs = match cfg.jitter {
        Jitter::None => base,
        Jitter::Full => base * unit,
        Jitter::Equal => base / 2.0 + base / 2.0 * unit,
        Jitter::Decorrelated => {
            let hi = (prev.as_secs_f64() * 3.0).max(initial);
            (initial + (hi - initial) * unit).min(max)
        }
    };
    Duration::from_secs_f64(secs.max(0.0))
}

fn retry_on(class: &FailureClass) -> Option<RetryOn> {
    match class {
        FailureClass::Timeout => Some(RetryOn::Timeout),
        FailureClass::ConnectError => Some(RetryOn::ConnectError),
        FailureClass::Status5xx => Some(RetryOn::Status5xx),
        FailureClass::Status429 { .. } => Some(RetryOn::Status429),
        FailureClass::Other => None,
    }
}

#[derive(Clone, Debug)]
pub struct RetryLayer {
    cfg: Arc<RetryConfig>,
    budget: Option<RetryBudget>,
    rng: Arc<Mutex<SmallRng>>,
    telemetry: Telemetry,
}

impl RetryLayer {
    pub fn new(cfg: RetryConfig, seed: Option<u64>, telemetry: Telemetry) -> Self {
        let budget = cfg.budget.as_ref().map(RetryBudget::new);
        RetryLayer {
            cfg: Arc::new(cfg),
            budget,
            rng: Arc::new(Mutex::new(new_rng(seed))),
            telemetry,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S, Req> Service<Req> for Retry<S>
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
            if let Some(b) = &layer.budget {
                b.deposit();
            }
            let mut backoff = Backoff::new(layer.cfg.backoff);
            let mut attempt = 1u32;
            loop {
                let res = inner
                    .clone()
                    .oneshot(req.clone())
                    .await
                    .map_err(ResilienceError::from_inner);
                let Outcome::Failure(class) = outcome_of(&res) else {
                    return res;
                };
                if attempt >= layer.cfg.max_attempts {
                    return res;
                }
                let Some(kind) = retry_on(&class) else {
                    return res;
                };
                if !layer.cfg.retry_on.contains(&kind) {
                    return res;
                }
                if !req.idempotent() && class != FailureClass::ConnectError {
                    return res;
                }
                let asked = match class {
                    FailureClass::Status429 { retry_after } => retry_after,
                    _ => None,
                };
                if asked.is_some_and(|ra| ra > layer.cfg.backoff.max) {
                    // The tool wants more time than this policy waits between attempts.
                    return res;
                }
                if let Some(b) = &layer.budget
                    && !b.try_withdraw()
                {
                    layer.telemetry.budget_rejection();
                    // Keep the real failure visible; only wrap errors, since a
                    // 5xx/429 response is still the caller's best answer.
                    return res.map_err(|e| ResilienceError::BudgetExhausted(Box::new(e)));
                }
                let mut delay = backoff.next_delay(attempt, &mut *lock(&layer.rng));
                if let Some(ra) = asked {
                    delay = delay.max(ra);
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
                layer.telemetry.retry();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::config::BudgetConfig;
    use crate::resilience::testutil::*;
    use crate::resilience::{HttpRequest, HttpResponse};
    use tokio::time::Instant;

    fn cfg(max: u32) -> RetryConfig {
        RetryConfig {
            max_attempts: max,
            backoff: BackoffConfig {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
                multiplier: 2.0,
                jitter: Jitter::None,
            },
            budget: None,
            retry_on: [
                RetryOn::Timeout,
                RetryOn::ConnectError,
                RetryOn::Status5xx,
                RetryOn::Status429,
            ]
            .into_iter()
            .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_5xx_with_exponential_backoff() {
        let inner = Scripted::new(vec![status(503), status(503)], ok(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(inner.clone());
        let start = Instant::now();
        let res = svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(inner.calls(), 3);
        // 100ms + 200ms of backoff, no jitter.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_includes_first() {
        let inner = Scripted::new(vec![], status(500));
        let svc = RetryLayer::new(cfg(2), Some(1), Telemetry::noop("t")).layer(inner.clone());
        let res = svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(res.status, 500);
        assert_eq!(inner.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_only_retried_on_connect_error() {
        let inner = Scripted::new(vec![status(503)], ok(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(inner.clone());
        let res = svc
            .clone()
            .oneshot(HttpRequest::post("/", vec![]))
            .await
            .unwrap();
        assert_eq!(res.status, 503);
        assert_eq!(inner.calls(), 1);

        let inner = Scripted::new(vec![Step::ConnectErr], ok(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(inner.clone());
        let res = svc.oneshot(HttpRequest::post("/", vec![])).await.unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(inner.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_and_unlisted_classes_are_not_retried() {
        let inner = Scripted::new(vec![Step::Err(Duration::ZERO)], ok(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(inner.clone());
        assert!(svc.oneshot(HttpRequest::get("/")).await.is_err());
        assert_eq!(inner.calls(), 1);

        let mut c = cfg(3);
        c.retry_on.remove(&RetryOn::Status429);
        let inner = Scripted::new(vec![status(429)], ok(0));
        let svc = RetryLayer::new(c, Some(1), Telemetry::noop("t")).layer(inner.clone());
        assert_eq!(
            svc.oneshot(HttpRequest::get("/")).await.unwrap().status,
            429
        );
    }

    #[derive(Clone)]
    /// Answers 429 (asking for `.1` ms) to the first `.2` calls, then 200.
    struct RetryAfter(Arc<Mutex<u32>>, &'static str, u32);
    impl Service<HttpRequest> for RetryAfter {
        type Response = HttpResponse;
        type Error = ResilienceError;
        type Future = BoxFut<HttpResponse>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ResilienceError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: HttpRequest) -> Self::Future {
            let mut n = lock(&self.0);
            *n += 1;
            let mut r = HttpResponse::new(if *n <= self.2 { 429 } else { 200 }, "");
            r.headers.push(("retry-after-ms".into(), self.1.into()));
            Box::pin(async move { Ok(r) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn honours_retry_after_up_to_the_backoff_cap() {
        // Backoff would wait 100 ms; the tool asks for 700 ms (cap 1 s): 700 ms it is.
        let calls = Arc::new(Mutex::new(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(RetryAfter(
            calls.clone(),
            "700",
            1,
        ));
        let start = Instant::now();
        assert_eq!(
            svc.oneshot(HttpRequest::get("/")).await.unwrap().status,
            200
        );
        assert_eq!(start.elapsed(), Duration::from_millis(700));
        assert_eq!(*lock(&calls), 2);
        // 7 s is past the 1 s cap: the 429 comes back at once, not retried.
        let calls = Arc::new(Mutex::new(0));
        let svc = RetryLayer::new(cfg(3), Some(1), Telemetry::noop("t")).layer(RetryAfter(
            calls.clone(),
            "7000",
            1,
        ));
        let start = Instant::now();
        let r = svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(*lock(&calls), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_retries_spend_the_budget() {
        let mut c = cfg(5);
        c.budget = Some(BudgetConfig {
            ratio: 0.1,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let tel = Telemetry::noop("t");
        let calls = Arc::new(Mutex::new(0));
        let svc = RetryLayer::new(c, Some(1), tel.clone()).layer(RetryAfter(
            calls.clone(),
            "200",
            u32::MAX,
        ));
        let start = Instant::now();
        for _ in 0..100 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
        }
        let calls = *lock(&calls);
        assert!(calls <= 110, "{calls} calls");
        assert!(tel.snapshot().budget_rejections > 0);
        // Every retry that was granted waited the 200 ms asked for.
        let retries = calls - 100;
        assert!(retries > 0);
        assert!(
            start.elapsed() >= Duration::from_millis(200) * retries,
            "{:?} for {retries} retries",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_stops_retry_storm() {
        let mut c = cfg(5);
        c.budget = Some(BudgetConfig {
            ratio: 0.1,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let tel = Telemetry::noop("t");
        let inner = Scripted::new(vec![], status(503));
        let svc = RetryLayer::new(c, Some(1), tel.clone()).layer(inner.clone());
        for _ in 0..100 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
        }
        // 100 calls, at most 10% retries, instead of 400 without a budget.
        assert!(inner.calls() <= 110, "{} calls", inner.calls());
        assert!(tel.snapshot().budget_rejections > 0);
    }

    #[test]
    fn jitter_bounds() {
        let mut rng = SmallRng::seed_from_u64(7);
        let bc = |j| BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: j,
        };
        for n in 1..10 {
            let base = (100.0 * 2f64.powi(n as i32 - 1)).min(2000.0);
            let full = Backoff::new(bc(Jitter::Full)).next_delay(n, &mut rng);
            assert!(full.as_secs_f64() * 1000.0 <= base + 1e-6);
            let eq = Backoff::new(bc(Jitter::Equal)).next_delay(n, &mut rng);
            assert!(eq.as_secs_f64() * 1000.0 >= base / 2.0 - 1e-6);
        }
        let mut d = Backoff::new(bc(Jitter::Decorrelated));
        for n in 1..50 {
            let x = d.next_delay(n, &mut rng);
            assert!(x >= Duration::from_millis(100) && x <= Duration::from_secs(2));
        }
        // Same seed, same sequence.
        let seq = |s| {
            let mut r = SmallRng::seed_from_u64(s);
            let mut b = Backoff::new(bc(Jitter::Full));
            (1..5).map(|n| b.next_delay(n, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(seq(3), seq(3));
    }
}
