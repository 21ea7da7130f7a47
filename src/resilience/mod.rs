//! r4's resilience layer: tower layers for timeouts, retries with a budget,
//! hedging, adaptive throttling, circuit breaking (optionally shared through
//! Redis), bulkheads and fallbacks, composed from one [`PolicyConfig`].
//!
//! Every layer is generic over the inner `Service<Req>` and returns
//! [`ResilienceError`]; requests and responses are described by the
//! [`PolicyRequest`] / [`PolicyResponse`] traits.

pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod classify;
pub mod config;
pub mod error;
pub mod fallback;
pub mod from_spec;
pub mod hedge;
pub mod metrics;
pub mod retry;
pub mod shared_breaker;
pub mod stack;
pub mod throttle;
pub mod timeout;
pub mod window;

pub use breaker::{Breaker, BreakerState, BreakerTransition};
pub use classify::{
    FailureClass, HttpRequest, HttpResponse, Outcome, PolicyRequest, PolicyResponse,
};
pub use config::*;
pub use error::{BoxError, ResilienceError};
pub use metrics::{Counters, CountersSnapshot, Metrics, Telemetry};
pub use shared_breaker::{SharedBreakerKeys, SharedBreakerStore};
pub use stack::{PolicyService, Stack, build_stack};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

/// Boxed future every layer's service returns.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, ResilienceError>> + Send>>;

/// Lock ignoring poisoning: the protected state is counters and windows that
/// stay consistent even if a holder panicked, and a panic in one call must
/// not take every later call down with it. The engine and `r4 run` use it for their
/// counters and RNGs too.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A scripted inner service for the layer tests.

    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// One scripted answer: wait `delay`, then return `status` or an error.
    #[derive(Clone, Debug)]
    pub enum Step {
        Status(u16, Duration),
        ConnectErr,
        Err(Duration),
    }

    #[derive(Clone)]
    pub struct Scripted {
        pub script: Arc<Mutex<VecDeque<Step>>>,
        pub default: Step,
        pub calls: Arc<AtomicUsize>,
    }

    impl Scripted {
        pub fn new(steps: Vec<Step>, default: Step) -> Self {
            Scripted {
                script: Arc::new(Mutex::new(steps.into())),
                default,
                calls: Arc::new(AtomicUsize::new(0)),
            }
        }
        pub fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl tower::Service<HttpRequest> for Scripted {
        type Response = HttpResponse;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: HttpRequest) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = lock(&self.script)
                .pop_front()
                .unwrap_or_else(|| self.default.clone());
            Box::pin(async move {
                match step {
                    Step::Status(s, d) => {
                        tokio::time::sleep(d).await;
                        Ok(HttpResponse::new(s, "x"))
                    }
                    Step::ConnectErr => Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "refused",
                    )) as BoxError),
                    Step::Err(d) => {
                        tokio::time::sleep(d).await;
                        Err("boom".into())
                    }
                }
            })
        }
    }

    pub fn ok(ms: u64) -> Step {
        Step::Status(200, Duration::from_millis(ms))
    }
    pub fn status(s: u16) -> Step {
        Step::Status(s, Duration::ZERO)
    }
}
