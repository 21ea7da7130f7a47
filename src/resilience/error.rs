//! The single error type every resilience layer returns.
//!
//! Layers are stacked, so an inner layer's `ResilienceError` travels through
//! the outer layers boxed as a `BoxError`; [`ResilienceError::from_inner`]
//! unboxes it again so classification (timeout? connect error?) survives any
//! depth of stacking.

use std::time::Duration;

use super::classify::FailureClass;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ResilienceError {
    /// A per-attempt or overall deadline elapsed.
    #[error("deadline of {0:?} elapsed")]
    Timeout(Duration),
    /// The breaker is open (or half-open with all probes taken).
    #[error("circuit breaker open")]
    BreakerOpen,
    /// The bulkhead has no free slot.
    #[error("bulkhead full")]
    BulkheadFull,
    /// Retries were refused because the retry budget is spent.
    #[error("retry budget exhausted: {0}")]
    BudgetExhausted(#[source] Box<ResilienceError>),
    /// Adaptive client-side throttling rejected the call locally.
    #[error("throttled locally")]
    Throttled,
    /// The connection could not be established: the request may not have
    /// reached the server, so even a non-idempotent request may be retried.
    #[error("connect error (request did not reach the server): {0}")]
    Connect(#[source] BoxError),
    /// Any other failure of the inner service, after the request may have
    /// been sent.
    #[error("inner service error: {0}")]
    Inner(#[source] BoxError),
}

impl ResilienceError {
    /// Turn an inner service's error into a `ResilienceError`.
    ///
    /// A boxed `ResilienceError` (from a lower layer) is unboxed; an
    /// `io::Error` whose kind proves the connection never got established is
    /// a [`ResilienceError::Connect`]; anything else is `Inner`.
    pub fn from_inner(err: impl Into<BoxError>) -> Self {
        let err: BoxError = err.into();
        let err = match err.downcast::<ResilienceError>() {
            Ok(e) => return *e,
            Err(e) => e,
        };
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | AddrNotAvailable | HostUnreachable | NetworkUnreachable
            ) {
                return ResilienceError::Connect(err);
            }
        }
        ResilienceError::Inner(err)
    }

    /// Whether the request provably did not reach the server.
    pub fn is_connect(&self) -> bool {
        matches!(self, ResilienceError::Connect(_))
    }

    /// Failure class used by retry/breaker/throttle decisions.
    pub fn failure_class(&self) -> FailureClass {
        match self {
            ResilienceError::Timeout(_) => FailureClass::Timeout,
            ResilienceError::Connect(_) => FailureClass::ConnectError,
            ResilienceError::BudgetExhausted(inner) => inner.failure_class(),
            _ => FailureClass::Other,
        }
    }

    /// Small, static label for the `outcome` of `r4_policy_calls_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ResilienceError::Timeout(_) => "timeout",
            ResilienceError::BreakerOpen => "breaker_open",
            ResilienceError::BulkheadFull => "bulkhead_full",
            ResilienceError::BudgetExhausted(_) => "budget_exhausted",
            ResilienceError::Throttled => "throttled",
            ResilienceError::Connect(_) => "connect_error",
            ResilienceError::Inner(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unboxes_lower_layer_errors() {
        let boxed: BoxError = Box::new(ResilienceError::BreakerOpen);
        assert!(matches!(
            ResilienceError::from_inner(boxed),
            ResilienceError::BreakerOpen
        ));
    }

    #[test]
    fn connection_refused_is_connect() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "nope");
        let e = ResilienceError::from_inner(io);
        assert!(e.is_connect());
        assert_eq!(e.failure_class(), FailureClass::ConnectError);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!ResilienceError::from_inner(io).is_connect());
    }
}
