//! A simulated tool as a [`Transport`]: the `simulate:` block of a tool (latency, error rate,
//! outage windows, rate limiting with `429` + `Retry-After`). It honours `Idempotency-Key` the
//! way a payments API does (an effect is applied once per key) and records every applied effect in
//! the [`EffectLedger`], which is how `r4 run` counts duplicated side effects without trusting
//! the engine.
//!
//! A drill's faults are not the tool's behaviour: the engine's tool proxy applies them before a
//! request reaches any transport ([`crate::engine::faults`]), so a simulated tool and a real one
//! see the same drill.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::util::BoxCloneService;

use super::sim::{EffectLedger, LatencyModel, OutageSchedule, ThrottleModel};
use crate::api::workflow::ToolSpec;
use crate::engine::tools::{IDEMPOTENCY_HEADER, Transport};
use crate::resilience::{BoxError, HttpRequest, HttpResponse, ResilienceError};

/// One simulated tool.
pub struct SimTool {
    name: String,
    latency: LatencyModel,
    error_rate: f64,
    outages: OutageSchedule,
    throttle: Option<ThrottleModel>,
    read_only: bool,
    ledger: Arc<EffectLedger>,
    start: Instant,
    rng: Mutex<SmallRng>,
    requests: AtomicU64,
}

impl SimTool {
    /// The tool of `spec` (which must have a `simulate:` block), seeded for repeatable runs.
    pub fn new(
        spec: &ToolSpec,
        seed: u64,
        start: Instant,
        ledger: Arc<EffectLedger>,
    ) -> Result<Self, String> {
        let sim = spec
            .simulate
            .as_ref()
            .ok_or_else(|| format!("tool {:?} has no simulate block", spec.name))?;
        Ok(Self {
            name: spec.name.clone(),
            latency: LatencyModel::new(&sim.latency),
            error_rate: sim.error_rate,
            outages: OutageSchedule::new(&sim.outages)?,
            throttle: sim.throttle.as_ref().map(ThrottleModel::new).transpose()?,
            read_only: spec.read_only.unwrap_or(false),
            ledger,
            start,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            requests: AtomicU64::new(0),
        })
    }

    /// Requests received (hedged copies and retries included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// This tool as the proxy's transport.
    pub fn transport(self: &Arc<Self>) -> Transport {
        let this = Arc::clone(self);
        BoxCloneService::new(tower::service_fn(move |req: HttpRequest| {
            let this = Arc::clone(&this);
            async move { this.handle(req).await }
        }))
    }

    async fn handle(&self, req: HttpRequest) -> Result<HttpResponse, BoxError> {
        if self.outages.is_down(self.start.elapsed()) {
            return Err(ResilienceError::Connect(
                format!("{}: connection refused (outage)", self.name).into(),
            )
            .into());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(th) = &self.throttle {
            // Drawn only when throttling is simulated, so other tools' runs stay as they were.
            let unit = crate::resilience::lock(&self.rng).random::<f64>();
            if let Some(wait) = th.throttled(self.start.elapsed(), unit) {
                return Ok(too_many_requests(&self.name, wait));
            }
        }
        let (delay, fail) = {
            let mut rng = crate::resilience::lock(&self.rng);
            let d = self.latency.sample(&mut *rng);
            let fail = rng.random::<f64>() < self.error_rate;
            // A third draw used to decide a drill's extra latency; kept so a seed's sequence of
            // latencies and errors (and the README's figures) stay what they were.
            let _ = rng.random::<f64>();
            (d, fail)
        };
        tokio::time::sleep(delay).await;
        if fail {
            return Ok(HttpResponse::new(
                503,
                format!("{{\"error\":\"{} failed\"}}", self.name),
            ));
        }
        if !self.read_only {
            let key = req.header(IDEMPOTENCY_HEADER).unwrap_or("");
            let (task, step) = key.split_once(':').unwrap_or((key, ""));
            self.ledger.apply(&self.name, true, key, task, step);
        }
        Ok(HttpResponse::new(
            200,
            format!("{{\"tool\":\"{}\",\"ok\":true}}", self.name),
        ))
    }
}

/// `429 Too Many Requests` asking for `wait`: `Retry-After` in whole seconds (rounded up, as
/// HTTP has it) and `retry-after-ms` for the precise value.
fn too_many_requests(tool: &str, wait: Duration) -> HttpResponse {
    let mut r = HttpResponse::new(429, format!("{{\"error\":\"{tool} rate limit\"}}"));
    let ms = wait.as_millis();
    r.headers
        .push(("retry-after".into(), ms.div_ceil(1000).to_string()));
    r.headers.push(("retry-after-ms".into(), ms.to_string()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn spec(yaml: &str) -> ToolSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn tool(yaml: &str, seed: u64) -> Arc<SimTool> {
        Arc::new(SimTool::new(&spec(yaml), seed, Instant::now(), Arc::default()).unwrap())
    }

    fn keyed(key: &str) -> HttpRequest {
        let mut r = HttpRequest::post("", b"{}".to_vec());
        r.headers.push((IDEMPOTENCY_HEADER.into(), key.into()));
        r
    }

    #[tokio::test(start_paused = true)]
    async fn applies_effects_once_per_key_and_takes_its_time() {
        let ledger = Arc::new(EffectLedger::new());
        let t = Arc::new(
            SimTool::new(
                &spec("{name: ledger, url: 'http://x', simulate: {latency: {medianMs: 100, p99Ms: 100}}}"),
                1,
                Instant::now(),
                ledger.clone(),
            )
            .unwrap(),
        );
        let before = Instant::now();
        let r = t.transport().oneshot(keyed("t1:resolution")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(before.elapsed(), Duration::from_millis(100));
        t.transport().oneshot(keyed("t1:resolution")).await.unwrap();
        assert_eq!((ledger.effects(), ledger.duplicate_effects()), (1, 0));
        assert_eq!(t.requests(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn outages_refuse_connections() {
        let y = "{name: bank, url: 'http://x', simulate: {latency: {medianMs: 1}, outages: [{after: 0s, for: 1m}]}}";
        let t = tool(y, 1);
        let e = t.transport().oneshot(keyed("a:b")).await.unwrap_err();
        assert!(ResilienceError::from_inner(e).is_connect());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            t.transport().oneshot(keyed("a:b")).await.unwrap().status,
            200
        );
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_is_honoured() {
        let y =
            "{name: bank, url: 'http://x', simulate: {latency: {medianMs: 1}, errorRate: 0.25}}";
        let t = tool(y, 9);
        let mut failed = 0;
        for i in 0..4000 {
            if t.transport()
                .oneshot(keyed(&format!("{i}:s")))
                .await
                .unwrap()
                .status
                == 503
            {
                failed += 1;
            }
        }
        let rate = failed as f64 / 4000.0;
        assert!((rate - 0.25).abs() < 0.03, "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_calls_get_429_with_retry_after() {
        let y = "{name: bank, url: 'http://x', simulate: {latency: {medianMs: 1}, throttle: {rate: 0.1, retryAfterMs: 1500}}}";
        let t = tool(y, 3);
        let mut throttled = 0;
        for i in 0..5000 {
            let r = t
                .transport()
                .oneshot(keyed(&format!("{i}:s")))
                .await
                .unwrap();
            if r.status == 429 {
                throttled += 1;
                assert_eq!(r.header("retry-after"), Some("2"));
                assert_eq!(r.retry_after(), Some(Duration::from_millis(1500)));
            } else {
                assert_eq!(r.status, 200);
            }
        }
        let rate = throttled as f64 / 5000.0;
        assert!((rate - 0.1).abs() < 0.015, "{rate}");
        // Within windows only.
        let y = "{name: bank, url: 'http://x', simulate: {latency: {medianMs: 1}, throttle: {rate: 1, retryAfterMs: 500, windows: [{after: 10s, for: 5s}]}}}";
        let t = tool(y, 3);
        assert_eq!(
            t.transport().oneshot(keyed("a:b")).await.unwrap().status,
            200
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            t.transport().oneshot(keyed("a:b")).await.unwrap().status,
            429
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            t.transport().oneshot(keyed("a:b")).await.unwrap().status,
            200
        );
    }
}
