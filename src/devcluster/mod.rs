//! `r4 dev`: a local Kubernetes API server (store, watch, apply, garbage collection) and
//! kubelet, for running the operator and its e2e scenario without a cluster. It knows nothing
//! of r4's kinds beyond what CRDs register.
//!
//! [`patch`] and [`apply`] are the pure write semantics the API server calls: the three PATCH
//! formats, and server-side apply with managed-fields bookkeeping. How a request maps onto them:
//!
//! | request | call |
//! | --- | --- |
//! | PATCH `application/merge-patch+json` | [`patch::merge_patch`], then [`apply::record_update`] |
//! | PATCH `application/json-patch+json` | [`patch::json_patch`], then `record_update` |
//! | PATCH `application/strategic-merge-patch+json` | 415 unless [`patch::smp_supported`]; [`patch::strategic_merge_patch`], then `record_update` |
//! | PATCH `application/apply-patch+yaml` (`fieldManager` required, `force`) | [`apply::server_side_apply`]; a conflict is a 409 with [`apply::ApplyError::status_message`] |
//! | POST, PUT | `record_update` (old `None` on create) |
//!
//! The list semantics come from [`patch::builtin_list_keys`] for both. What stays the
//! server's: defaulting, resetting `status` on the main resource (and everything but
//! `status` on `/status`) before these calls, and metadata it sets itself (uid,
//! resourceVersion, generation, timestamps), which no manager owns.

pub mod apply;
pub mod patch;
