//! Fallback: answer something useful when the call failed.
//!
//! * `Cache { ttl }`: every successful response is remembered under the
//!   request's cache key; when a later call with the same key fails (error,
//!   failure response, breaker open, bulkhead full ...), the last good answer
//!   is served if it is younger than `ttl` ("cached statements during an
//!   outage"). Requests without a cache key get no fallback.
//! * `Static(value)`: a fixed answer built by `PolicyResponse::from_static`.
//!
//! Fallback answers are marked (`PolicyResponse::mark_fallback`, e.g. the
//! `x-r4-fallback` header) and counted, so callers can tell and report them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::classify::{Outcome, outcome_of};
use super::config::FallbackConfig;
use super::{BoxFut, PolicyRequest, PolicyResponse, ResilienceError, Telemetry, lock};

/// Cache size bound; expired entries go first, then the oldest.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug)]
enum Mode<Resp> {
    Cache {
        ttl: Duration,
        entries: Mutex<HashMap<String, (Instant, Resp)>>,
    },
    Static(Option<Resp>),
}

#[derive(Debug)]
pub struct FallbackLayer<Resp> {
    mode: Arc<Mode<Resp>>,
    telemetry: Telemetry,
}

impl<Resp> Clone for FallbackLayer<Resp> {
    fn clone(&self) -> Self {
        FallbackLayer {
            mode: self.mode.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

impl<Resp: PolicyResponse> FallbackLayer<Resp> {
    /// `None` for `FallbackConfig::None`.
    pub fn new(cfg: &FallbackConfig, telemetry: Telemetry) -> Option<Self> {
        let mode = match cfg {
            FallbackConfig::None => return None,
            FallbackConfig::Cache { ttl } => Mode::Cache {
                ttl: *ttl,
                entries: Mutex::new(HashMap::new()),
            },
            FallbackConfig::Static(v) => {
                let resp = Resp::from_static(v);
                if resp.is_none() {
                    tracing::warn!(
                        target = telemetry.target(),
                        "static fallback value does not fit the response type; fallback disabled"
                    );
                }
                Mode::Static(resp)
            }
        };
        Some(FallbackLayer {
            mode: Arc::new(mode),
            telemetry,
        })
    }

    fn remember(&self, key: &Option<String>, resp: &Resp) {
        let (Mode::Cache { entries, .. }, Some(key)) = (&*self.mode, key) else {
            return;
        };
        let mut map = lock(entries);
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            let now = Instant::now();
            if let Mode::Cache { ttl, .. } = &*self.mode {
                map.retain(|_, (at, _)| now.saturating_duration_since(*at) < *ttl);
            }
            if map.len() >= MAX_ENTRIES
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(key.clone(), (Instant::now(), resp.clone()));
    }

    fn lookup(&self, key: &Option<String>) -> Option<Resp> {
        let mut resp = match &*self.mode {
            Mode::Static(r) => r.clone()?,
            Mode::Cache { ttl, entries } => {
                let key = key.as_ref()?;
                let map = lock(entries);
                let (at, r) = map.get(key)?;
                if Instant::now().saturating_duration_since(*at) >= *ttl {
                    return None;
                }
                r.clone()
            }
        };
        resp.mark_fallback();
        self.telemetry.fallback();
        Some(resp)
    }
}

impl<S, Resp> Layer<S> for FallbackLayer<Resp> {
    type Service = Fallback<S, Resp>;
    fn layer(&self, inner: S) -> Fallback<S, Resp> {
        Fallback {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Fallback<S, Resp> {
    inner: S,
    layer: FallbackLayer<Resp>,
}

impl<S: Clone, Resp> Clone for Fallback<S, Resp> {
    fn clone(&self) -> Self {
        Fallback {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, Req, Resp> Service<Req> for Fallback<S, Resp>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Error: Into<super::BoxError>,
    S::Future: Send,
    Resp: PolicyResponse + Sync,
    Req: PolicyRequest,
{
    type Response = Resp;
    type Error = ResilienceError;
    type Future = BoxFut<Resp>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        let key = req.cache_key();
        Box::pin(async move {
            let res = inner
                .oneshot(req)
                .await
                .map_err(ResilienceError::from_inner);
            match outcome_of(&res) {
                Outcome::Success => {
                    if let Ok(r) = &res {
                        layer.remember(&key, r);
                    }
                    res
                }
                Outcome::Failure(_) => layer.lookup(&key).map_or(res, Ok),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::testutil::*;
    use crate::resilience::{HttpRequest, HttpResponse};

    #[tokio::test(start_paused = true)]
    async fn serves_last_good_within_ttl() {
        let tel = Telemetry::noop("t");
        let layer = FallbackLayer::<HttpResponse>::new(
            &FallbackConfig::Cache {
                ttl: Duration::from_secs(60),
            },
            tel.clone(),
        )
        .unwrap();
        let inner = Scripted::new(vec![ok(0)], Step::Err(Duration::ZERO));
        let svc = layer.layer(inner);
        let first = svc.clone().oneshot(HttpRequest::get("/a")).await.unwrap();
        assert!(!first.is_fallback());
        // Outage: the cached answer comes back, marked.
        let second = svc.clone().oneshot(HttpRequest::get("/a")).await.unwrap();
        assert!(second.is_fallback());
        assert_eq!(second.body, first.body);
        assert_eq!(tel.snapshot().fallbacks, 1);
        // Other keys have nothing cached; POST has no cache key.
        assert!(svc.clone().oneshot(HttpRequest::get("/b")).await.is_err());
        assert!(
            svc.clone()
                .oneshot(HttpRequest::post("/a", vec![]))
                .await
                .is_err()
        );
        // Past the TTL the stale answer is not served.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(svc.oneshot(HttpRequest::get("/a")).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn static_answer_on_failure_response() {
        let layer = FallbackLayer::<HttpResponse>::new(
            &FallbackConfig::Static(serde_json::json!({"statement": "unavailable"})),
            Telemetry::noop("t"),
        )
        .unwrap();
        let svc = layer.layer(Scripted::new(vec![], status(503)));
        let r = svc.oneshot(HttpRequest::post("/x", vec![])).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.is_fallback());
        assert_eq!(r.body, br#"{"statement":"unavailable"}"#);
    }

    #[test]
    fn none_is_no_layer() {
        assert!(
            FallbackLayer::<HttpResponse>::new(&FallbackConfig::None, Telemetry::noop("t"))
                .is_none()
        );
    }
}
