//! r4: a Kubernetes operator that keeps teams of autonomous agents working through failures.
//!
//! Data flows one way: [`api`] → (`resilience`, `queue`) → `engine` → ([`controller`], `local`);
//! [`telemetry`] installs the process's logging.

pub mod api;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod devcluster;
pub mod engine;
pub mod local;
pub mod queue;
pub mod resilience;
pub mod telemetry;
#[doc(hidden)]
pub mod testutil;
pub mod tls;
