//! The engine: what runs in every managed pod — and, unchanged, in-process
//! under `r4 run`.
//!
//! Roles, each a struct with `run(shutdown)` over an `Arc<dyn Queue>`:
//! - [`consumer::AgentRole`]: consume an agent's input stream and deliver
//!   each task through a [`delivery::Delivery`] (HTTP to the agent container,
//!   or a simulated agent), effectively once;
//! - [`intake::Intake`]: the Task Intake API (`POST /v1/tasks`);
//! - [`repair::RepairRole`]: replay DLQ entries once their dependency is
//!   healthy, quarantine poison.
//!
//! Shared concepts, one module each: [`commit`] (group commit of
//! completions), [`config`] (the workflow resolved to
//! numbers), [`task`] (the envelope), [`dlq`], [`saga`], [`killswitch`],
//! [`breakers`] (published breaker states), [`policies`] (the CircuitPolicies published
//! for live reload), [`degraded`], [`stats`], [`slo`] (the SLO and incident cost model the
//! run's report and the controller share),
//! [`http`] (health and metrics endpoints, the server every role runs), [`limits`] (the
//! timeouts and size limits of every HTTP edge), [`auth`] (the intake's bearer tokens),
//! [`tools`] (the tool proxy that applies each tool's policy stack; the mechanisms
//! themselves live in `resilience`), [`hedge`] (agent-level hedging: when to hand a slow
//! delivery to a shadow replica).

pub mod auth;
pub mod breakers;
pub mod commit;
pub mod config;
pub mod consumer;
pub mod degraded;
pub mod delivery;
pub mod dlq;
pub mod drill;
pub mod faults;
pub(crate) mod follow;
pub mod hedge;
pub mod http;
pub mod intake;
pub mod killswitch;
pub mod limits;
pub mod policies;
pub mod repair;
pub mod saga;
pub mod slo;
pub mod stats;
pub mod task;
pub mod tools;

pub use config::WorkflowConfig;
pub use consumer::{AgentOptions, AgentRole};
pub use delivery::{Delivery, DeliveryError, DeliveryRequest, HttpDelivery, Outputs};
pub use intake::Intake;
pub use repair::RepairRole;
pub use stats::Stats;

use crate::queue::QueueError;

/// Errors of the engine roles.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

/// A fresh engine id: `<name>-<8 hex>` (also the consumer name).
pub fn engine_id(name: &str) -> String {
    format!(
        "{name}-{}",
        &delivery::random_uuid().simple().to_string()[..8]
    )
}
