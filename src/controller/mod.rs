//! The operator: reconcilers of `AgentWorkflow` and `CircuitPolicy` (and, later, `ChaosDrill`),
//! the pure functions they decide with, and what keeps the controller operable.
//!
//! A reconcile reads like a story (validate → render → apply → observe → decide → write
//! status); each arrow is one function:
//! - rendering the children of a workflow is pure ([`render`]): spec in, objects out;
//! - revisions and the rollout / rollback decision are pure ([`revision`], [`rollout`]), and
//!   so is judging a revision from engine statistics ([`analysis`]) and keeping conditions
//!   ([`conditions`]);
//! - kill switches through the API ([`killswitch`]): the spec made true in Redis, the
//!   acknowledgements counted (pure, with the one I/O step that writes Redis);
//! - the reconcilers ([`workflow`], [`policy`]) do the I/O: the Kubernetes API through a kube
//!   `Client` only (a cluster's, or `r4 dev`'s — never a shortcut into the dev cluster), and
//!   the workflow's Redis through the engine's modules (kill switches, stats, policies);
//!   [`context`] is what they share, [`cache`] what they read of the cluster from watches
//!   instead of a list per reconcile;
//! - operating it: [`run`] (the controllers, until shutdown), [`leader`] (election on a
//!   Lease), [`backoff`] (per-object error backoff), [`metrics`] and [`http`] (`/metrics`,
//!   `/healthz`, `/readyz`), [`rbac`] (every API call it makes, the Role generated from them).
//!
//! The controller sits beside `r4 run` (`crate::local`) above the engine: it uses the engine's
//! modules and never reimplements them.

pub mod analysis;
pub mod backoff;
pub mod cache;
pub mod conditions;
pub mod context;
pub mod drill;
#[cfg(test)]
mod fixtures;
pub mod http;
pub mod killswitch;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod rbac;
pub mod render;
pub mod revision;
pub mod rollout;
pub mod run;
pub mod workflow;

/// The field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "r4";

/// Label naming the workflow a child belongs to (`app.kubernetes.io/instance` holds it too).
pub const WORKFLOW_LABEL: &str = "r4.dev/workflow";
/// Label naming the revision a child was rendered from.
pub const REVISION_LABEL: &str = "r4.dev/revision";
/// Label naming the component of a child: `agent`, `intake`, `repair`, `engine-config`.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label naming the agent of an agent Deployment and its pods.
pub const AGENT_LABEL: &str = "r4.dev/agent";
