//! Deadlines.
//!
//! The same layer serves two places in the stack: right around the inner
//! service it bounds each attempt (so a hung attempt can be retried or
//! hedged), and above retry it bounds the whole logical call including
//! backoff sleeps (so retries never stretch a call past what the caller can
//! wait). Expiry drops the inner future, which cancels the attempt.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use super::{BoxFut, ResilienceError};

#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    deadline: Duration,
}

impl TimeoutLayer {
    pub fn new(deadline: Duration) -> Self {
        TimeoutLayer { deadline }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            deadline: self.deadline,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    deadline: Duration,
}

impl<S, Req> Service<Req> for Timeout<S>
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
        // Readiness of the inner service is awaited inside the future so the
        // wait for it counts against the deadline too.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let deadline = self.deadline;
        Box::pin(async move {
            match tokio::time::timeout(deadline, inner.oneshot(req)).await {
                Ok(res) => res.map_err(ResilienceError::from_inner),
                Err(_) => Err(ResilienceError::Timeout(deadline)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::HttpRequest;
    use crate::resilience::testutil::*;

    #[tokio::test(start_paused = true)]
    async fn times_out_slow_attempt() {
        let inner = Scripted::new(vec![ok(500), ok(50)], ok(0));
        let svc = TimeoutLayer::new(Duration::from_millis(100)).layer(inner);
        let start = tokio::time::Instant::now();
        let err = svc
            .clone()
            .oneshot(HttpRequest::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(err, ResilienceError::Timeout(_)));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        let res = svc.oneshot(HttpRequest::get("/")).await.unwrap();
        assert_eq!(res.status, 200);
    }
}
