//! The CircuitPolicy reconciler: `Valid` (the shared validation), `usedBy` (the workflows of
//! its namespace that name it), and the breakers it governs, read from each using workflow's
//! Redis (what the engines publish). A policy *change* reaches the engines through the
//! workflow reconciler: the workflow controller watches policies and re-renders and
//! re-publishes every workflow that uses the changed one (see [`uses`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::Instrument;

use super::conditions;
use super::context::{Context, Error};
use super::workflow::policy_refs;
use crate::api::policy::{BreakerStatus, CircuitPolicy, CircuitPolicyStatus};
use crate::api::workflow::AgentWorkflow;
use crate::engine::breakers::{BreakerState, BreakerStates};
use crate::queue::Keys;

const KIND: &str = "CircuitPolicy";

/// Whether `wf` names the policy `policy` (same namespace).
pub fn uses(wf: &AgentWorkflow, namespace: &str, policy: &str) -> bool {
    wf.namespace().as_deref().unwrap_or("default") == namespace
        && policy_refs(&wf.spec).iter().any(|(_, p)| p == policy)
}

/// The tools of `wf` this policy governs: those naming it, and those naming none when it is
/// the workflow's default.
pub fn governed_tools(wf: &AgentWorkflow, policy: &str) -> Vec<String> {
    let default = wf.spec.policy_ref.as_deref() == Some(policy);
    wf.spec
        .tools
        .iter()
        .filter(|t| match &t.policy_ref {
            Some(p) => p == policy,
            None => default,
        })
        .map(|t| t.name.clone())
        .collect()
}

pub async fn reconcile(p: Arc<CircuitPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!("reconcile", kind = KIND, namespace = %p.namespace().unwrap_or_default(), name = %p.name_any());
    let r = reconcile_inner(&p, &ctx).instrument(span).await;
    ctx.metrics.reconciled(KIND, started.elapsed());
    if r.is_ok() {
        ctx.backoff.succeeded(&key(&p));
    }
    r
}

pub fn error_policy(p: Arc<CircuitPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(KIND, error.metric_label());
    let delay = ctx.backoff.failed(&key(&p));
    tracing::warn!(kind = KIND, namespace = %p.namespace().unwrap_or_default(), name = %p.name_any(), error = %error, "reconcile failed");
    Action::requeue(delay)
}

fn key(p: &CircuitPolicy) -> String {
    format!(
        "policy:{}/{}",
        p.namespace().unwrap_or_default(),
        p.name_any()
    )
}

async fn reconcile_inner(p: &CircuitPolicy, ctx: &Context) -> Result<Action, Error> {
    let ns = p.namespace().unwrap_or_else(|| "default".into());
    let name = p.name_any();
    let now = Timestamp::now();
    let old = p.status.clone().unwrap_or_default();
    let mut status = CircuitPolicyStatus {
        observed_generation: p.metadata.generation,
        conditions: old.conditions.clone(),
        ..CircuitPolicyStatus::default()
    };
    let errors = crate::api::validate::check_policy(&p.spec);
    if errors.is_empty() {
        conditions::set(
            &mut status.conditions,
            "Valid",
            "True",
            "Validated",
            "the policy passed the controller's checks",
            p.metadata.generation,
            now,
        );
    } else {
        let msg: Vec<String> = errors.iter().map(|e| format!("spec.{e}")).collect();
        conditions::set(
            &mut status.conditions,
            "Valid",
            "False",
            "InvalidSpec",
            &msg.join("; "),
            p.metadata.generation,
            now,
        );
    }
    // The workflows from the workflow controller's store (a list of every workflow of the
    // namespace per policy reconcile costs the API server more than any other call).
    let using: Vec<Arc<AgentWorkflow>> = match ctx.caches().await? {
        Some(c) => c
            .workflows_in(&ns)
            .into_iter()
            .filter(|w| uses(w, &ns, &name))
            .collect(),
        None => {
            let wfs: Api<AgentWorkflow> = Api::namespaced(ctx.client.clone(), &ns);
            ctx.api(wfs.list(&ListParams::default()))
                .await?
                .items
                .into_iter()
                .filter(|w| uses(w, &ns, &name))
                .map(Arc::new)
                .collect()
        }
    };
    status.used_by = using.iter().map(|w| w.name_any()).collect();
    status.used_by.sort();
    let mut breakers = Vec::new();
    for w in &using {
        let tools = governed_tools(w, &name);
        if tools.is_empty() {
            continue;
        }
        let Ok(q) = ctx.queue(&ns, &w.spec).await else {
            continue;
        };
        let keys = Keys::new(&ns, &w.name_any());
        let Ok(records) = ctx
            .redis(
                "read breakers",
                BreakerStates::new(q.as_ref(), &keys).read_all(),
            )
            .await
        else {
            continue;
        };
        let records: BTreeMap<_, _> = records.into_iter().collect();
        for t in tools {
            let (state, since, rate) = match records.get(&t) {
                Some(r) => (
                    match r.state {
                        BreakerState::Closed => "Closed",
                        BreakerState::Open => "Open",
                        BreakerState::HalfOpen => "HalfOpen",
                    },
                    Timestamp::from_millisecond(r.since_ms as i64)
                        .ok()
                        .map(|t| t.to_string()),
                    (r.failure_rate * 1000.0).round() / 1000.0,
                ),
                None => ("Closed", None, 0.0),
            };
            breakers.push(BreakerStatus {
                workflow: w.name_any(),
                tool: t,
                state: state.to_owned(),
                since,
                failure_rate: rate,
            });
        }
    }
    status.breakers = breakers;
    super::workflow::patch_status(ctx, p, &old, &status, KIND).await?;
    Ok(Action::requeue(
        ctx.opts.stats_interval.max(Duration::from_secs(1)),
    ))
}
