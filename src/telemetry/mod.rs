//! Telemetry of the `r4` process: what it tells operators (logs, the hop spans of a task and
//! the tool proxy's audit events; metrics live with what they measure, e.g.
//! [`crate::resilience::Metrics`] and the engine's stats) and what it must never tell them
//! ([`redact`]).
//!
//! Owns installing the one `tracing` subscriber of the process ([`logging::init`]), the trace
//! context of the hops ([`trace`]), its OTLP export ([`otlp`]), the audit event of a tool call
//! ([`audit`]) and the redaction of secrets in URLs; the events themselves are emitted where
//! the decisions are taken (the consumer, the repair role, …).

pub mod audit;
pub mod logging;
pub mod otlp;
pub mod redact;
pub mod trace;

pub use logging::{Format, init, init_as};

/// End the process's telemetry: flush the spans not exported yet ([`otlp::shutdown`]). Call
/// once, after the runtime has stopped (it blocks up to the exporter's timeout).
pub fn shutdown() {
    otlp::shutdown();
}
