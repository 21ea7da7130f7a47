//! Telemetry: what r4 tells operators (logs, metrics, traces) and what it must never tell them.

pub mod redact;
