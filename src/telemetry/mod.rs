//! Telemetry of the `r4` process: logging today (metrics live with what they measure, e.g.
//! [`crate::resilience::Metrics`] and the engine's stats).
//!
//! Owns installing the one `tracing` subscriber of the process ([`logging::init`]); the events
//! themselves are emitted where the decisions are taken (the consumer, the repair role, …).

pub mod logging;

pub use logging::{Format, init};
