//! Telemetry of the `r4` process: what it tells operators (logs today; metrics live with what
//! they measure, e.g. [`crate::resilience::Metrics`] and the engine's stats) and what it must
//! never tell them ([`redact`]).
//!
//! Owns installing the one `tracing` subscriber of the process ([`logging::init`]) and the
//! redaction of secrets in URLs; the events themselves are emitted where the decisions are
//! taken (the consumer, the repair role, …).

pub mod logging;
pub mod redact;

pub use logging::{Format, init};
