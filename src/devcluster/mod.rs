//! `r4 dev`: a local Kubernetes API server (store, watch, apply, garbage collection) and
//! kubelet, for running the operator and its e2e scenario without a cluster. It knows nothing
//! of r4's kinds beyond what CRDs register.
//!
//! [`patch`] and [`apply`] are the pure write semantics the API server calls: the three PATCH
//! formats, and server-side apply with managed-fields bookkeeping.

pub mod apply;
pub mod patch;
