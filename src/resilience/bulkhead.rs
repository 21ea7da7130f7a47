//! Bulkhead: a hard cap on concurrent calls to one target.
//!
//! Unlike `tower::limit::ConcurrencyLimit`, which makes callers wait for a
//! slot (an unbounded queue when callers keep coming), a full bulkhead fails
//! fast with [`ResilienceError::BulkheadFull`], so a slow dependency cannot
//! soak up every task of the engine.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFut, ResilienceError, Telemetry};

#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    permits: Arc<Semaphore>,
    telemetry: Telemetry,
}

impl BulkheadLayer {
    pub fn new(max_concurrent: usize, telemetry: Telemetry) -> Self {
        BulkheadLayer {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            telemetry,
        }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;
    fn layer(&self, inner: S) -> Bulkhead<S> {
        Bulkhead {
            inner,
            permits: self.permits.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

/// Clones share the same permits: the limit is per target, not per clone.
#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: S,
    permits: Arc<Semaphore>,
    telemetry: Telemetry,
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<super::BoxError>,
    S::Future: Send,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError;
    type Future = BoxFut<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Taken at call time, not in poll_ready: a permit reserved by a
        // caller that then never calls would leak capacity.
        let permit = self.permits.clone().try_acquire_owned();
        let inner = self.inner.clone();
        let telemetry = self.telemetry.clone();
        Box::pin(async move {
            let Ok(_permit) = permit else {
                telemetry.bulkhead_rejection();
                return Err(ResilienceError::BulkheadFull);
            };
            inner
                .oneshot(req)
                .await
                .map_err(ResilienceError::from_inner)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::HttpRequest;
    use crate::resilience::testutil::*;

    #[tokio::test(start_paused = true)]
    async fn rejects_beyond_limit_and_frees_slots() {
        let inner = Scripted::new(vec![], ok(100));
        let svc = BulkheadLayer::new(2, Telemetry::noop("t")).layer(inner.clone());
        let a = tokio::spawn(svc.clone().oneshot(HttpRequest::get("/")));
        let b = tokio::spawn(svc.clone().oneshot(HttpRequest::get("/")));
        tokio::task::yield_now().await;
        let c = svc.clone().oneshot(HttpRequest::get("/")).await;
        assert!(matches!(c, Err(ResilienceError::BulkheadFull)));
        assert!(a.await.unwrap().is_ok());
        assert!(b.await.unwrap().is_ok());
        // Slots come back when calls finish.
        assert!(svc.oneshot(HttpRequest::get("/")).await.is_ok());
        assert_eq!(inner.calls(), 3);
    }
}
