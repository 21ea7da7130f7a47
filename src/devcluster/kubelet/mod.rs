//! The local kubelet of `r4 dev`: what the deployment controller and the kubelets of a cluster
//! do, for any Kubernetes API reached through a kube [`Client`] (the local one of `r4 dev`, or
//! a real cluster's).
//!
//! - **Deployments → pods** ([`deployment`], decisions in [`rollout`]): a Deployment gets
//!   pods it owns, labelled and named as its ReplicaSet would make them; rolling updates (and
//!   `Recreate`) replace the pods of an old template; a deleted pod is replaced; the
//!   Deployment's status is written as the deployment controller writes it (counts,
//!   `observedGeneration`, `Available` / `Progressing` conditions, `ProgressDeadlineExceeded`).
//! - **Pods → containers** ([`pod`], status in [`podstatus`]): each long-running container
//!   is started through a [`runtime::PodRuntime`]: `r4 engine` containers run their engine
//!   role in process ([`engine`]), every other image is simulated and becomes ready after a
//!   moment. The pod status (`Pending` → `Running`, conditions, container statuses, pod IP) is
//!   written through the `pods/status` subresource. Pods can be made to fail to start
//!   ([`podstatus`] says how), so rollouts can fail.
//!
//! Every API call has a deadline ([`KubeletOptions::api_timeout`]); conflicts are settled by
//! reading the object again; nothing read from the API is unwrapped.

pub mod engine;
pub mod podstatus;
pub mod rollout;
pub mod runtime;

#[cfg(test)]
mod fixtures;
