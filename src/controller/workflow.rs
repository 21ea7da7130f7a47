//! The AgentWorkflow reconciler: validate → revisions and the rollout decision → queue wiring
//! and kill switches in Redis → render and apply the children (server-side apply) → observe
//! (Deployments, engine statistics, acknowledgements, queue depths) → write the status, only
//! when it changed. Each arrow is one function below; the decisions are the pure functions of
//! [`super::rollout`], [`super::render`], [`super::killswitch`], [`super::conditions`].
//!
//! Deletion: a finalizer keeps the workflow until its Redis data is dealt with —
//! `spec.queue.deletePolicy: Retain` (default) keeps every key, `Delete` deletes the agent
//! Deployments (foreground, so no engine writes afterwards), then every key of the workflow.
//! The children go with the workflow through their owner references.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::Instrument;

use super::analysis::{self, Verdict};
use super::cache::{self, Caches, ChildKind};
use super::context::{Context, Error};
use super::revision::{self, Phase, Revision};
use super::rollout::{self, Availability, RolloutInput};
use super::{FIELD_MANAGER, WORKFLOW_LABEL, conditions, killswitch, render};
use crate::api::policy::{CircuitPolicy, CircuitPolicySpec};
use crate::api::workflow::{
    AgentKillSwitch, AgentStatus, AgentWorkflow, AgentWorkflowSpec, AgentWorkflowStatus,
    DeletePolicy, IncidentCost, QueueStatus, RevisionStatus, SloStatus,
};
use crate::engine::{self, WorkflowConfig};
use crate::queue::{Keys, Queue};

/// The finalizer that keeps a workflow until its Redis data is dealt with.
pub const FINALIZER: &str = "r4.dev/redis-data";

/// How soon a workflow is looked at again while engines have not acknowledged a kill-switch
/// change (the status must show it within a second).
const ACK_POLL: Duration = Duration::from_millis(200);

/// With `deletePolicy: Delete`, how long after the first deletion of a workflow's keys they
/// are deleted again (engines stopping with their pods write their last statistics).
const DELETE_GRACE: Duration = Duration::from_secs(5);

/// The metric and log label of this kind.
const KIND: &str = "AgentWorkflow";

/// `namespace/name`, the key of everything the controller remembers per workflow.
pub fn key(wf: &AgentWorkflow) -> String {
    format!(
        "{}/{}",
        wf.namespace().unwrap_or_else(|| "default".into()),
        wf.name_any()
    )
}

/// One reconcile of one workflow.
pub async fn reconcile(wf: Arc<AgentWorkflow>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = wf.namespace().unwrap_or_else(|| "default".into());
    // Every log line of this reconcile carries the object's kind, namespace and name.
    let span =
        tracing::info_span!("reconcile", kind = KIND, namespace = %ns, name = %wf.name_any());
    let result = finalized(&wf, &ctx, &ns).instrument(span).await;
    ctx.metrics.reconciled(KIND, started.elapsed());
    result
}

/// The finalizer around [`apply`] and [`cleanup`]. (kube-runtime's `finalizer` helper removes
/// the finalizer as soon as the cleanup returns, whatever it asks for; the cleanup of
/// `deletePolicy: Delete` takes several reconciles — Deployments gone first, then the keys —
/// so the finalizer is removed here only once [`cleanup`] says it is done.)
async fn finalized(wf: &AgentWorkflow, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let api: Api<AgentWorkflow> = Api::namespaced(ctx.client.clone(), ns);
    let name = wf.name_any();
    let has = wf.finalizers().iter().any(|f| f == FINALIZER);
    if wf.metadata.deletion_timestamp.is_some() {
        if !has {
            return Ok(Action::await_change());
        }
        if let Some(wait) = cleanup(wf, ctx).await? {
            return Ok(Action::requeue(wait));
        }
        let i = wf
            .finalizers()
            .iter()
            .position(|f| f == FINALIZER)
            .unwrap_or(0);
        // The test makes the removal refuse (and the reconcile retry) if the list moved.
        let patch = json!([
            {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
        ]);
        let patch: json_patch::Patch = serde_json::from_value(patch)
            .map_err(|e| Error::Finalizer(format!("finalizer patch: {e}")))?;
        ctx.api(api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)))
            .await?;
        return Ok(Action::await_change());
    }
    if !has {
        // Guarded by the finalizers as read (not the resourceVersion, which every status write
        // moves): another controller's finalizer added meanwhile makes it refuse and retry.
        let patch = if wf.finalizers().is_empty() {
            json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
        } else {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": wf.finalizers()},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ])
        };
        let patch: json_patch::Patch = serde_json::from_value(patch)
            .map_err(|e| Error::Finalizer(format!("finalizer patch: {e}")))?;
        let patched = ctx
            .api(api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)))
            .await?;
        // Go on with the object as patched rather than wait for its event: a workflow is
        // reconciled in one pass from its creation (the event then finds nothing to do).
        return apply(&patched, ctx).await;
    }
    apply(wf, ctx).await
}

/// What a failed reconcile does: count it, log it, retry after the object's own backoff.
pub fn error_policy(wf: Arc<AgentWorkflow>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(KIND, error.metric_label());
    let delay = ctx.backoff.failed(&key(&wf));
    tracing::warn!(
        kind = KIND,
        namespace = %wf.namespace().unwrap_or_default(),
        name = %wf.name_any(),
        error = %error,
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Everything observed in one reconcile that the status is made of.
struct Observed {
    deployments: Vec<Deployment>,
    queue: Option<QueueObserved>,
}

struct QueueObserved {
    q: Arc<dyn Queue>,
    changed: BTreeMap<String, u64>,
    version: u64,
}

async fn apply(wf: &AgentWorkflow, ctx: &Context) -> Result<Action, Error> {
    let ns = wf.namespace().unwrap_or_else(|| "default".into());
    let name = wf.name_any();
    let wf_key = key(wf);
    let now = Timestamp::now();
    let old = known_status(ctx, wf, &wf_key);
    let mut status = old.clone();
    status.observed_generation = wf.metadata.generation;
    let generation = wf.metadata.generation;

    // validate
    let policies = match validate(wf, ctx, &ns).await? {
        Ok(p) => {
            conditions::set(
                &mut status.conditions,
                "Valid",
                "True",
                "Validated",
                "the spec passed the controller's checks",
                generation,
                now,
            );
            p
        }
        Err(errors) => {
            let message = errors.join("; ");
            return refuse(
                ctx,
                wf,
                &old,
                status,
                "InvalidSpec",
                "Validate",
                &message,
                now,
            )
            .await;
        }
    };

    // revisions and the rollout decision
    let caches = ctx.caches().await?;
    let mut revisions = read_revisions(ctx, caches.as_ref(), &ns, &name, &wf_key).await?;
    let deployments = match &caches {
        Some(c) => c.deployments_of(&ns, &name),
        None => list_children::<Deployment>(ctx, &ns, &name).await?,
    };
    // What this controller applied last wins over a status the cache may not have caught up
    // with (its own write of a moment ago).
    let applied = ctx
        .memory(&wf_key, |m| m.applied)
        .or(status.current_revision);
    let availability = availability(&deployments, applied);
    if let (Some(r), Availability::Available) = (applied, &availability) {
        ctx.memory(&wf_key, |m| {
            if m.available_since.is_none_or(|(rev, _)| rev != r) {
                m.available_since = Some((r, now));
            }
        });
    } else {
        ctx.memory(&wf_key, |m| m.available_since = None);
    }
    let verdict = analysis_verdict(ctx, wf, &wf_key, now, applied, &revisions);
    let plan = match rollout::plan(&RolloutInput {
        now,
        workflow: &name,
        spec: &wf.spec,
        revisions: &revisions,
        applied,
        availability: availability.clone(),
        analysis: verdict,
    }) {
        Ok(p) => p,
        Err(e) => {
            let message = e.to_string();
            return refuse(
                ctx,
                wf,
                &old,
                status,
                "InvalidRollback",
                "Rollback",
                &message,
                now,
            )
            .await;
        }
    };
    if store_plan(ctx, wf, &ns, &plan, &mut revisions).await? {
        let written = cache::Written {
            revisions: revisions.clone(),
            at: std::time::Instant::now(),
        };
        ctx.memory(&wf_key, |m| m.written = Some(written));
    }
    let Some(target) = revisions.iter().find(|r| r.number == plan.apply).cloned() else {
        return Err(Error::Finalizer(format!(
            "the rollout decided to apply revision {} which is not stored",
            plan.apply
        )));
    };

    // queue wiring and kill switches, before any agent starts
    let queue = wire_queue(ctx, &ns, &name, wf, &target.spec, &policies).await;
    let queue = match queue {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::warn!(namespace = %ns, name = %name, error = %e, "workflow queue unreachable");
            conditions::set(
                &mut status.conditions,
                "Degraded",
                "True",
                "RedisUnreachable",
                &e.to_string(),
                generation,
                now,
            );
            None
        }
    };

    // render and apply
    let to_render = revision::spec_to_render(&target.spec, &wf.spec);
    let children = render::render(
        wf,
        &to_render,
        &policies,
        &render::RenderOptions {
            engine_image: ctx.opts.engine_image.clone(),
            engine_env: ctx.opts.engine_env.clone(),
            revision: target.number,
            revision_hash: target.hash.clone(),
        },
    )?;
    // observe: the Deployments as listed right after the applies
    let deployments = apply_children(ctx, caches.as_ref(), &ns, &name, &children).await?;
    let observed = Observed { deployments, queue };

    ctx.memory(&wf_key, |m| m.applied = Some(target.number));

    // status
    let settled = fill_status(
        ctx,
        wf,
        &mut status,
        &observed,
        &plan,
        &revisions,
        &target,
        now,
    )
    .await;
    // The drill record, from the drills' store (the drill reconciler writes only the drills).
    if let Some(record) = ctx.drills.workflow_record(&ns, &name, now) {
        status.drills = record;
    }
    if old.current_revision != Some(target.number) && old.current_revision.is_some() {
        tracing::info!(namespace = %ns, name = %name, from = ?old.current_revision, to = target.number, "applying revision");
    }
    write_status(ctx, wf, &old, &status).await?;
    ctx.backoff.succeeded(&wf_key);

    let mut next = ctx.opts.stats_interval;
    if let Some(r) = plan.requeue_after {
        next = next.min(r.max(Duration::from_millis(100)));
    }
    if !settled {
        next = next.min(ACK_POLL);
    }
    // A rollout in progress needs no polling: the Deployments it waits for are watched (their
    // changes trigger a reconcile), and the deadline and the analysis window are in
    // `plan.requeue_after`.
    Ok(Action::requeue(next))
}

/// A spec the controller cannot act on: `Valid=False` with the reason and the message naming
/// the field (an Event when the condition changes), the status written, no child touched.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    ctx: &Context,
    wf: &AgentWorkflow,
    old: &AgentWorkflowStatus,
    mut status: AgentWorkflowStatus,
    reason: &str,
    action: &str,
    message: &str,
    now: Timestamp,
) -> Result<Action, Error> {
    let generation = wf.metadata.generation;
    if conditions::set(
        &mut status.conditions,
        "Valid",
        "False",
        reason,
        message,
        generation,
        now,
    ) {
        publish(ctx, wf, EventType::Warning, reason, action, message).await;
    }
    write_status(ctx, wf, old, &status).await?;
    ctx.backoff.succeeded(&key(wf));
    Ok(Action::await_change())
}

/// The shared validation of the spec, the CircuitPolicies it names (present and valid). `Ok(Err)`
/// is an invalid spec: one message per problem, each naming its field.
async fn validate(
    wf: &AgentWorkflow,
    ctx: &Context,
    ns: &str,
) -> Result<Result<BTreeMap<String, CircuitPolicySpec>, Vec<String>>, Error> {
    let mut errors: Vec<String> = crate::api::validate::check_workflow(&wf.name_any(), &wf.spec)
        .iter()
        .map(|e| format!("spec.{e}").replace("spec.spec.", "spec."))
        .collect();
    let api: Api<CircuitPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let caches = ctx.caches().await?;
    let mut policies = BTreeMap::new();
    for (field, name) in policy_refs(&wf.spec) {
        if policies.contains_key(&name) {
            continue;
        }
        // From the store; one it does not have (yet) is asked for, so a policy created a
        // moment ago does not make the workflow invalid.
        let cached = caches
            .as_ref()
            .and_then(|c| c.policy(ns, &name))
            .map(|p| (*p).clone());
        let found = match cached {
            Some(p) => Some(p),
            None => ctx.api(api.get_opt(&name)).await?,
        };
        match found {
            None => errors.push(format!("{field}: CircuitPolicy {ns}/{name} not found")),
            Some(p) => {
                let bad = crate::api::validate::check_policy(&p.spec);
                if let Some(e) = bad.first() {
                    errors.push(format!("{field}: CircuitPolicy {name} is invalid: {e}"));
                }
                policies.insert(name, p.spec);
            }
        }
    }
    Ok(if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    })
}

/// Every CircuitPolicy the spec names, with the field that names it.
pub fn policy_refs(spec: &AgentWorkflowSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(p) = &spec.policy_ref {
        out.push(("spec.policyRef".to_owned(), p.clone()));
    }
    for (i, t) in spec.tools.iter().enumerate() {
        if let Some(p) = &t.policy_ref {
            out.push((format!("spec.tools[{i}].policyRef"), p.clone()));
        }
    }
    out
}

/// The workflow's revisions: from the store (or a list outside a term), unless what this
/// controller wrote a moment ago is not in the store yet ([`cache::reconcile_revisions`]).
async fn read_revisions(
    ctx: &Context,
    caches: Option<&Caches>,
    ns: &str,
    name: &str,
    wf_key: &str,
) -> Result<Vec<Revision>, Error> {
    let stored = match caches {
        Some(c) => parse_revisions(ns, c.revisions_of(ns, name).iter().map(|r| r.as_ref())),
        None => list_revisions(ctx, ns, name).await?,
    };
    let now = std::time::Instant::now();
    let mut revisions = ctx.memory(wf_key, |m| {
        let (revisions, keep) = cache::reconcile_revisions(m.written.as_ref(), stored, now);
        if !keep {
            m.written = None;
        }
        revisions
    });
    revisions.sort_by_key(|r| r.number);
    Ok(revisions)
}

/// The workflow's ControllerRevisions, listed (damaged ones are logged and ignored).
async fn list_revisions(ctx: &Context, ns: &str, name: &str) -> Result<Vec<Revision>, Error> {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), ns);
    let list = ctx
        .api(api.list(&ListParams::default().labels(&format!("{WORKFLOW_LABEL}={name}"))))
        .await?;
    Ok(parse_revisions(ns, list.items.iter()))
}

/// The revisions these ControllerRevisions hold, by number (damaged ones are logged and
/// ignored).
fn parse_revisions<'a>(
    ns: &str,
    crs: impl Iterator<Item = &'a ControllerRevision>,
) -> Vec<Revision> {
    let mut out = Vec::new();
    for cr in crs {
        match revision::from_controller_revision(cr) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(namespace = %ns, revision = %cr.name_any(), error = %e, "ignoring a damaged ControllerRevision")
            }
        }
    }
    out.sort_by_key(|r| r.number);
    out
}

/// The children of one kind labelled with the workflow.
async fn list_children<K>(ctx: &Context, ns: &str, name: &str) -> Result<Vec<K>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    Ok(ctx
        .api(api.list(&ListParams::default().labels(&format!("{WORKFLOW_LABEL}={name}"))))
        .await?
        .items)
}

/// Whether the Deployments of revision `applied` are all available: each carries the revision
/// label, the deployment controller has seen its latest generation, every replica is updated
/// and available.
pub fn availability(deployments: &[Deployment], applied: Option<i64>) -> Availability {
    let Some(applied) = applied else {
        return Availability::Progressing {
            detail: "nothing applied yet".into(),
        };
    };
    if deployments.is_empty() {
        return Availability::Progressing {
            detail: "no Deployment yet".into(),
        };
    }
    let want = applied.to_string();
    for d in deployments {
        let n = d.name_any();
        if d.labels().get(super::REVISION_LABEL) != Some(&want) {
            return Availability::Progressing {
                detail: format!("{n} is not at revision {applied} yet"),
            };
        }
        let desired = d.spec.replicas.unwrap_or(1);
        let Some(s) = &d.status else {
            return Availability::Progressing {
                detail: format!("{n} has no status yet"),
            };
        };
        if s.observed_generation < d.metadata.generation {
            return Availability::Progressing {
                detail: format!("{n}: the deployment controller has not seen the change yet"),
            };
        }
        let updated = s.updated_replicas.unwrap_or(0);
        let available = s.available_replicas.unwrap_or(0);
        let total = s.replicas.unwrap_or(0);
        if updated < desired || available < desired || total > desired {
            let old = (total - updated).max(0);
            let detail = if updated >= desired && total > desired {
                format!(
                    "{n}: {updated}/{desired} new pods, not all available; {old} old pod(s) still serving"
                )
            } else {
                format!("{n}: {updated}/{desired} new pods, {available}/{desired} available")
            };
            return Availability::Progressing { detail };
        }
    }
    Availability::Available
}

/// The analysis verdict of the applied revision, if it is progressing, available and analysed.
fn analysis_verdict(
    ctx: &Context,
    wf: &AgentWorkflow,
    wf_key: &str,
    now: Timestamp,
    applied: Option<i64>,
    revisions: &[Revision],
) -> Option<Verdict> {
    let spec = wf.spec.rollout.as_ref()?.analysis.as_ref()?;
    let applied = applied?;
    let rev = revisions.iter().find(|r| r.number == applied)?;
    if rev.phase != Phase::Progressing {
        return None;
    }
    ctx.memory(wf_key, |m| {
        let (r, since) = m.available_since?;
        if r != applied {
            return None;
        }
        let for_ = Duration::try_from(now.duration_since(since)).unwrap_or_default();
        let window = m.samples.since(since);
        Some(analysis::judge(spec, for_, window.as_ref()))
    })
}

/// Store what the plan decided: a new revision, phase changes (with Events), the rollback
/// (Event), `spec.rollbackTo` removed once acted on, old revisions pruned. Returns whether a
/// ControllerRevision was written (`revisions` is then what the store will show).
async fn store_plan(
    ctx: &Context,
    wf: &AgentWorkflow,
    ns: &str,
    plan: &rollout::Plan,
    revisions: &mut Vec<Revision>,
) -> Result<bool, Error> {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), ns);
    let mut wrote = false;
    if let Some(new) = &plan.create {
        wrote = true;
        let cr = revision::controller_revision(wf, new);
        match ctx.api(api.create(&PostParams::default(), &cr)).await {
            Ok(_) => {}
            // Created by an earlier reconcile whose status write was lost: it is ours.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
                ctx.api(api.patch(
                    &new.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cr),
                ))
                .await?;
            }
            Err(e) => return Err(e),
        }
        publish(
            ctx,
            wf,
            EventType::Normal,
            "RevisionCreated",
            "Rollout",
            &format!("revision {} (spec {}) is rolling out", new.number, new.hash),
        )
        .await;
        revisions.push(new.clone());
    }
    for u in &plan.updates {
        wrote = true;
        let cr = revision::controller_revision(wf, u);
        let patch = json!({"metadata": {"annotations": cr.metadata.annotations}});
        ctx.api(api.patch(&u.name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await?;
        let (kind, reason) = match u.phase {
            Phase::Healthy => (EventType::Normal, "RevisionHealthy"),
            Phase::Failed => (EventType::Warning, "RevisionFailed"),
            Phase::Progressing => (EventType::Normal, "RevisionRetried"),
        };
        let note = match &u.reason {
            Some(r) => format!("revision {}: {r}", u.number),
            None => format!("revision {} is {}", u.number, u.phase.as_str()),
        };
        publish(ctx, wf, kind, reason, "Rollout", &note).await;
        if let Some(r) = revisions.iter_mut().find(|r| r.number == u.number) {
            *r = u.clone();
        }
    }
    if let Some(rb) = &plan.rolled_back {
        let note = format!(
            "rolled back from revision {} to revision {}: {}",
            rb.from, rb.to, rb.reason
        );
        publish(ctx, wf, EventType::Warning, "RolledBack", "Rollback", &note).await;
    }
    if plan.clear_rollback_to {
        let wfs: Api<AgentWorkflow> = Api::namespaced(ctx.client.clone(), ns);
        ctx.api(wfs.patch(
            &wf.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rollbackTo": null}})),
        ))
        .await?;
    }
    let limit = rollout::history_limit(&wf.spec);
    let keep = plan.keep.clone();
    for name in revision::to_prune(revisions, limit, &keep) {
        match ctx.api(api.delete(&name, &DeleteParams::default())).await {
            Ok(_) | Err(Error::Kube(kube::Error::Api(_))) => {}
            Err(e) => return Err(e),
        }
        wrote = true;
        revisions.retain(|r| r.name != name);
    }
    Ok(wrote)
}

/// Streams and consumer groups, the kill switches and the policies in the workflow's Redis.
async fn wire_queue(
    ctx: &Context,
    ns: &str,
    name: &str,
    wf: &AgentWorkflow,
    target: &AgentWorkflowSpec,
    policies: &BTreeMap<String, CircuitPolicySpec>,
) -> Result<QueueObserved, Error> {
    let q = ctx.queue(ns, &wf.spec).await?;
    let default_policy = target.policy_ref.as_ref().and_then(|p| policies.get(p));
    let cfg = WorkflowConfig::new(ns, name, target, default_policy)
        .map_err(|e| Error::Queue(e.to_string()))?
        .with_policies(policies.clone());
    ctx.redis(
        "create consumer groups",
        engine::consumer::ensure_groups(q.as_ref(), &cfg),
    )
    .await?;
    // Switches follow the current spec, whatever revision runs.
    let (state, changed) = ctx
        .redis(
            "set kill switches",
            killswitch::sync(q.as_ref(), &cfg.keys, &wf.spec),
        )
        .await?;
    ctx.redis(
        "publish policies",
        engine::policies::publish(q.as_ref(), &cfg.keys, policies),
    )
    .await?;
    Ok(QueueObserved {
        q,
        changed,
        version: state.version,
    })
}

/// Server-side apply of every child (skipped for one that would not change:
/// [`cache::Applied`]), then deletion of the children of this workflow that are no longer
/// desired (an agent removed, the intake disabled). Returns the desired Deployments as the
/// applies returned them, or as the store has them where no apply was needed (what the
/// status is made of: no second listing).
async fn apply_children(
    ctx: &Context,
    caches: Option<&Caches>,
    ns: &str,
    name: &str,
    children: &render::Children,
) -> Result<Vec<Deployment>, Error> {
    let wf_key = format!("{ns}/{name}");
    let c = &ctx.client;
    let sa: Api<ServiceAccount> = Api::namespaced(c.clone(), ns);
    apply_child(
        ctx,
        caches,
        &wf_key,
        &sa,
        ChildKind::ServiceAccount,
        &children.service_account,
    )
    .await?;
    let cm: Api<ConfigMap> = Api::namespaced(c.clone(), ns);
    apply_child(
        ctx,
        caches,
        &wf_key,
        &cm,
        ChildKind::ConfigMap,
        &children.config_map,
    )
    .await?;
    let svc: Api<Service> = Api::namespaced(c.clone(), ns);
    for s in &children.services {
        apply_child(ctx, caches, &wf_key, &svc, ChildKind::Service, s).await?;
    }
    let dep: Api<Deployment> = Api::namespaced(c.clone(), ns);
    let mut desired = Vec::new();
    for d in &children.deployments {
        match apply_child(ctx, caches, &wf_key, &dep, ChildKind::Deployment, d).await? {
            Some(live) => desired.push(live),
            None => {
                let n = d.name_any();
                if let Some(live) =
                    caches.and_then(|c| c.deployments.get(&ObjectRef::new(&n).within(ns)))
                {
                    desired.push((*live).clone());
                }
            }
        }
    }
    // Children no longer desired.
    let want: BTreeSet<String> = children
        .deployments
        .iter()
        .map(|d| d.name_any())
        .chain(children.services.iter().map(|s| s.name_any()))
        .collect();
    let (deployments, services) = match caches {
        Some(c) => (
            c.deployments_of(ns, name)
                .iter()
                .map(|d| d.name_any())
                .collect::<Vec<_>>(),
            c.service_names_of(ns, name),
        ),
        None => {
            let deployments = list_children::<Deployment>(ctx, ns, name).await?;
            // Outside a term, the Deployments as listed after the applies are the status's.
            desired = deployments
                .iter()
                .filter(|d| want.contains(&d.name_any()))
                .cloned()
                .collect();
            (
                deployments.iter().map(|d| d.name_any()).collect(),
                list_children::<Service>(ctx, ns, name)
                    .await?
                    .iter()
                    .map(|s| s.name_any())
                    .collect(),
            )
        }
    };
    for d in deployments.iter().filter(|d| !want.contains(*d)) {
        delete_quietly(ctx, &dep, d).await?;
        ctx.memory(&wf_key, |m| m.children.forget(ChildKind::Deployment, d));
    }
    for s in services.iter().filter(|s| !want.contains(*s)) {
        delete_quietly(ctx, &svc, s).await?;
        ctx.memory(&wf_key, |m| m.children.forget(ChildKind::Service, s));
    }
    Ok(desired)
}

/// Server-side apply of one child, unless the same rendering was applied last and the live
/// object is still what that apply returned. Returns the object the apply returned, or
/// `None` when it was skipped.
async fn apply_child<K>(
    ctx: &Context,
    caches: Option<&Caches>,
    wf_key: &str,
    api: &Api<K>,
    kind: ChildKind,
    obj: &K,
) -> Result<Option<K>, Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.name_any();
    let rendered = cache::rendered_hash(obj);
    if let Some(c) = caches {
        let ns = api.namespace().unwrap_or_default();
        let live = c.live(kind, ns, &name);
        if ctx.memory(wf_key, |m| {
            m.children.unchanged(kind, &name, rendered, live)
        }) {
            return Ok(None);
        }
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let out = ctx.api(api.patch(&name, &pp, &Patch::Apply(obj))).await?;
    ctx.metrics.applied(kind.as_str());
    let returned = cache::fingerprint(kind, out.meta());
    ctx.memory(wf_key, |m| {
        m.children.record(kind, &name, rendered, returned)
    });
    Ok(Some(out))
}

async fn delete_quietly<K>(ctx: &Context, api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match ctx.api(api.delete(name, &DeleteParams::default())).await {
        Ok(_) => Ok(()),
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fill the status from what was observed. Returns whether every kill switch is acknowledged
/// by every engine it covers.
#[allow(clippy::too_many_arguments)]
async fn fill_status(
    ctx: &Context,
    wf: &AgentWorkflow,
    status: &mut AgentWorkflowStatus,
    observed: &Observed,
    plan: &rollout::Plan,
    revisions: &[Revision],
    target: &Revision,
    now: Timestamp,
) -> bool {
    let generation = wf.metadata.generation;
    let spec = &wf.spec;
    let stamp = now.to_string();

    // agents
    let by_name: BTreeMap<String, &Deployment> = observed
        .deployments
        .iter()
        .map(|d| (d.name_any(), d))
        .collect();
    let name = wf.name_any();
    let switches = crate::engine::killswitch::SpecSwitches::from_spec(spec.kill_switches.as_ref());
    let mut replicas = BTreeMap::new();
    let mut agents = Vec::new();
    let (mut ready_total, mut desired_total) = (0, 0);
    let mut not_ready = Vec::new();
    for a in &target.spec.agents {
        let d = by_name.get(&render::deployment_name(&name, &a.name));
        let desired = a.replicas.unwrap_or(1);
        let ready = d
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let pods = d
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        replicas.insert(a.name.clone(), pods);
        ready_total += ready;
        desired_total += desired;
        if ready < desired {
            not_ready.push(format!("{} {ready}/{desired}", a.name));
        }
        agents.push(AgentStatus {
            name: a.name.clone(),
            ready_replicas: ready,
            kill_switch: AgentKillSwitch {
                engaged: switches.all || switches.agents.contains(&a.name),
            },
        });
    }
    status.agents = agents;
    status.agents_ready = Some(format!("{ready_total}/{desired_total}"));
    if not_ready.is_empty() {
        conditions::set(
            &mut status.conditions,
            "Ready",
            "True",
            "AgentsReady",
            &format!("every agent is ready ({ready_total}/{desired_total} pods)"),
            generation,
            now,
        );
    } else {
        conditions::set(
            &mut status.conditions,
            "Ready",
            "False",
            "AgentsNotReady",
            &format!("not ready: {}", not_ready.join(", ")),
            generation,
            now,
        );
    }

    // revisions
    status.current_revision = Some(target.number);
    let mut revs: Vec<RevisionStatus> = revisions
        .iter()
        .map(|r| RevisionStatus {
            revision: r.number,
            hash: Some(r.hash.clone()),
            phase: r.phase.as_str().to_owned(),
            reason: r.reason.clone(),
        })
        .collect();
    revs.sort_by_key(|r| std::cmp::Reverse(r.revision));
    status.revisions = revs;
    let target_phase = target.phase;
    let spec_hash = revision::spec_hash(spec);
    let pinned = target.hash != spec_hash;
    match target_phase {
        Phase::Progressing => conditions::set(
            &mut status.conditions,
            "Progressing",
            "True",
            "RolloutInProgress",
            &plan.message,
            generation,
            now,
        ),
        Phase::Healthy => conditions::set(
            &mut status.conditions,
            "Progressing",
            "False",
            "RolloutComplete",
            &format!("revision {} is healthy", target.number),
            generation,
            now,
        ),
        Phase::Failed => conditions::set(
            &mut status.conditions,
            "Progressing",
            "False",
            "RolloutFailed",
            &plan.message,
            generation,
            now,
        ),
    };
    if let Some(rb) = &plan.rolled_back {
        conditions::set(
            &mut status.conditions,
            "RolledBack",
            "True",
            if rb.manual {
                "ManualRollback"
            } else {
                "AutomaticRollback"
            },
            &format!(
                "rolled back from revision {} to revision {}: {}",
                rb.from, rb.to, rb.reason
            ),
            generation,
            now,
        );
    } else if !pinned {
        conditions::set(
            &mut status.conditions,
            "RolledBack",
            "False",
            "RunningSpec",
            &format!("revision {} is the spec's", target.number),
            generation,
            now,
        );
    }

    // queue, stats, kill switches
    let mut settled = true;
    let mut degraded: Vec<String> = Vec::new();
    if pinned {
        degraded.push(format!(
            "running revision {} instead of the spec's: {}",
            target.number, plan.message
        ));
    } else if target_phase == Phase::Failed {
        degraded.push(plan.message.clone());
    }
    match &observed.queue {
        None => {
            degraded.push("the workflow's Redis is unreachable".into());
        }
        Some(qo) => {
            let keys = Keys::new(&wf.namespace().unwrap_or_else(|| "default".into()), &name);
            let acks = ctx
                .redis(
                    "read acknowledgements",
                    crate::engine::killswitch::acks(qo.q.as_ref(), &keys),
                )
                .await
                .unwrap_or_default();
            let ks = killswitch::status(
                spec,
                &status.kill_switches,
                &qo.changed,
                Some(qo.version),
                &acks,
                &replicas,
                &stamp,
            );
            for (n, s) in &ks {
                let before = status.kill_switches.get(n).map(|b| b.engaged);
                if before != Some(s.engaged) && (s.engaged || before == Some(true)) {
                    let (reason, verb) = if s.engaged {
                        ("KillSwitchEngaged", "engaged")
                    } else {
                        ("KillSwitchReleased", "released")
                    };
                    publish(
                        ctx,
                        wf,
                        EventType::Normal,
                        reason,
                        "KillSwitch",
                        &format!(
                            "kill switch {n} {verb} (state version {})",
                            s.state_version.unwrap_or(0)
                        ),
                    )
                    .await;
                }
            }
            settled = killswitch::settled(&ks);
            status.kill_switch = Some(killswitch::summary(&ks));
            let engaged: Vec<String> = ks
                .iter()
                .filter(|(_, s)| s.engaged)
                .map(|(n, s)| {
                    format!(
                        "{n} ({}/{} engines acknowledged)",
                        s.acknowledged, s.expected
                    )
                })
                .collect();
            if engaged.is_empty() {
                conditions::set(
                    &mut status.conditions,
                    "KillSwitchEngaged",
                    "False",
                    "NoneEngaged",
                    "no kill switch is engaged",
                    generation,
                    now,
                );
            } else {
                conditions::set(
                    &mut status.conditions,
                    "KillSwitchEngaged",
                    "True",
                    "Engaged",
                    &format!("engaged: {}", engaged.join(", ")),
                    generation,
                    now,
                );
            }
            status.kill_switches = ks;
            if let Ok(qs) = observe_queue(ctx, qo.q.as_ref(), &keys, &target.spec).await {
                status.queue = Some(qs);
            }
            if let Ok(stats) = ctx
                .redis(
                    "read engine statistics",
                    crate::engine::stats::read_workflow(qo.q.as_ref(), &keys),
                )
                .await
            {
                let wf_key = key(wf);
                let rate = ctx.memory(&wf_key, |m| {
                    m.samples.push(now, stats.engines.clone());
                    m.samples.last(60.0).map(|w| {
                        if w.seconds > 0.0 {
                            w.tasks as f64 / w.seconds
                        } else {
                            0.0
                        }
                    })
                });
                let t = &stats.totals;
                let finished = t.completed + t.dead_lettered;
                let slo = crate::engine::slo::slo(
                    t.completed,
                    finished,
                    stats.latency_ms_p95,
                    spec.slo.as_ref(),
                );
                status.slo = Some(SloStatus {
                    success_rate: round(slo.success_rate, 4),
                    p95_latency_ms: round(slo.p95_latency_ms, 0),
                    error_budget_remaining: round(slo.error_budget_remaining, 4),
                });
                let cost = crate::engine::slo::incident_cost(
                    t.dead_lettered,
                    finished,
                    rate.unwrap_or(0.0),
                    spec.economics.as_ref(),
                );
                status.incident_cost = Some(IncidentCost {
                    failure_rate: round(cost.failure_rate, 6),
                    daily_cost: round(cost.daily_cost, 2),
                });
            }
            if let Ok(open) = ctx
                .redis(
                    "read breakers",
                    crate::engine::breakers::BreakerStates::new(qo.q.as_ref(), &keys).open_tools(),
                )
                .await
                && !open.is_empty()
            {
                degraded.push(format!("breaker open: {}", open.join(", ")));
            }
        }
    }
    if degraded.is_empty() {
        conditions::set(
            &mut status.conditions,
            "Degraded",
            "False",
            "AsSpecified",
            "running the spec's revision, every dependency reachable",
            generation,
            now,
        );
    } else {
        conditions::set(
            &mut status.conditions,
            "Degraded",
            "True",
            if observed.queue.is_none() {
                "RedisUnreachable"
            } else if pinned || target_phase == Phase::Failed {
                "RevisionFailed"
            } else {
                "BreakerOpen"
            },
            &degraded.join("; "),
            generation,
            now,
        );
    }
    settled
}

fn round(v: f64, digits: i32) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Depth (entries in the agents' input streams), pending (delivered, not acknowledged), DLQ
/// depth and the age of its oldest entry.
async fn observe_queue(
    ctx: &Context,
    q: &dyn Queue,
    keys: &Keys,
    spec: &AgentWorkflowSpec,
) -> Result<QueueStatus, Error> {
    let mut s = QueueStatus::default();
    for a in &spec.agents {
        let stream = keys.stream(&a.consumes);
        s.depth += ctx.redis("XLEN", q.len(&stream)).await? as i64;
        s.pending += ctx
            .redis("XPENDING", q.pending_summary(&stream, &a.name))
            .await
            .map(|p| p.count)
            .unwrap_or(0) as i64;
    }
    let dlq = keys.dlq();
    s.dlq_depth = ctx.redis("XLEN", q.len(&dlq)).await? as i64;
    if let Some(first) = ctx
        .redis("XRANGE", q.range(&dlq, "-", "+", 1))
        .await?
        .first()
        && let Some(ms) = first
            .id
            .split('-')
            .next()
            .and_then(|m| m.parse::<u64>().ok())
    {
        let now = crate::engine::task::now_ms();
        s.oldest_dlq_age_seconds = (now.saturating_sub(ms) / 1000) as i64;
    }
    Ok(s)
}

/// The workflow's status as last known: the object's, unless this controller wrote another
/// less than [`cache::EXPECTATION_TTL`] ago that the object (from a store that lags behind
/// the write) does not show yet. Deciding from the status written keeps a reconcile that
/// follows a write from writing the same status again (with new transition times).
fn known_status(ctx: &Context, wf: &AgentWorkflow, wf_key: &str) -> AgentWorkflowStatus {
    let seen = wf.status.clone().unwrap_or_default();
    let now = std::time::Instant::now();
    ctx.memory(wf_key, |m| match &m.status_written {
        Some((s, at)) if now.duration_since(*at) < cache::EXPECTATION_TTL && *s != seen => {
            s.clone()
        }
        _ => {
            m.status_written = None;
            seen
        }
    })
}

/// Patch the status if, and only if, it changed (a steady workflow causes no writes).
async fn write_status(
    ctx: &Context,
    wf: &AgentWorkflow,
    old: &AgentWorkflowStatus,
    new: &AgentWorkflowStatus,
) -> Result<(), Error> {
    if patch_status(ctx, wf, old, new, KIND).await? {
        let written = (new.clone(), std::time::Instant::now());
        ctx.memory(&key(wf), |m| m.status_written = Some(written));
    }
    Ok(())
}

/// Patch the status subresource of `obj` from `old` to `new` with a merge patch of only what
/// differs — if, and only if, something does. Returns whether it wrote. Shared by the
/// reconcilers (one writer per status, written only on change).
pub(super) async fn patch_status<K, S>(
    ctx: &Context,
    obj: &K,
    old: &S,
    new: &S,
    kind: &str,
) -> Result<bool, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if old == new {
        return Ok(false);
    }
    let old_v = serde_json::to_value(old).unwrap_or(Value::Null);
    let new_v = serde_json::to_value(new).unwrap_or(Value::Null);
    let patch = json!({"status": merge_patch(&old_v, &new_v)});
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    ctx.api(api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    ))
    .await?;
    ctx.metrics.status_written(kind);
    Ok(true)
}

/// An RFC 7386 merge patch turning `old` into `new`: keys gone from an object become `null`.
pub fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in n {
                match o.get(k) {
                    Some(ov) if ov == v => {}
                    Some(ov) => {
                        out.insert(k.clone(), merge_patch(ov, v));
                    }
                    None => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

/// Publish an Event about the workflow; a failure is logged, never fails the reconcile.
async fn publish(
    ctx: &Context,
    wf: &AgentWorkflow,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    tracing::info!(
        kind = KIND,
        namespace = %wf.namespace().unwrap_or_default(),
        name = %wf.name_any(),
        reason,
        "{note}"
    );
    let ev = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    let r = tokio::time::timeout(
        ctx.opts.api_timeout,
        ctx.recorder.publish(&ev, &wf.object_ref(&())),
    )
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "cannot publish event"),
        Err(_) => tracing::warn!(reason, "cannot publish event: no answer in time"),
    }
}

/// Deletion: keep or delete the workflow's Redis data, as `spec.queue.deletePolicy` says.
/// Returns how long to wait before the next pass, or None once done.
async fn cleanup(wf: &AgentWorkflow, ctx: &Context) -> Result<Option<Duration>, Error> {
    let ns = wf.namespace().unwrap_or_else(|| "default".into());
    let name = wf.name_any();
    let policy = wf.spec.queue.delete_policy.unwrap_or_default();
    if policy == DeletePolicy::Delete {
        // No engine may write after the keys are gone: the Deployments go first, in the
        // foreground (each stays until its pods are gone).
        let dep: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let left = list_children::<Deployment>(ctx, &ns, &name).await?;
        if !left.is_empty() {
            for d in &left {
                if d.metadata.deletion_timestamp.is_none() {
                    match ctx
                        .api(dep.delete(&d.name_any(), &DeleteParams::foreground()))
                        .await
                    {
                        Ok(_) => {}
                        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            return Ok(Some(Duration::from_millis(500)));
        }
        // Engines whose pods are going may still write their last statistics and
        // acknowledgements: the keys are deleted again until DELETE_GRACE has passed since the
        // first pass.
        let q = ctx.queue(&ns, &wf.spec).await?;
        let keys = Keys::new(&ns, &name);
        let all = ctx.redis("SCAN", q.scan_prefix(keys.prefix())).await?;
        for chunk in all.chunks(500) {
            ctx.redis("DEL", q.del(chunk)).await?;
        }
        let wf_key = key(wf);
        let (first, total) = ctx.memory(&wf_key, |m| {
            let (first, total) = m.keys_deleted.unwrap_or((std::time::Instant::now(), 0));
            m.keys_deleted = Some((first, total + all.len()));
            (first, total + all.len())
        });
        let waited = first.elapsed();
        if waited < DELETE_GRACE {
            return Ok(Some(
                (DELETE_GRACE - waited).max(Duration::from_millis(200)),
            ));
        }
        publish(
            ctx,
            wf,
            EventType::Normal,
            "RedisDataDeleted",
            "Delete",
            &format!("deleted {total} keys of the workflow (deletePolicy: Delete)"),
        )
        .await;
    } else {
        tracing::info!(namespace = %ns, name = %name, "workflow deleted; its Redis data is kept (deletePolicy: Retain)");
    }
    ctx.forget(&key(wf));
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_nulls_what_is_gone_and_leaves_what_is_equal() {
        let old = json!({"a": 1, "b": {"x": 1, "y": 2}, "c": [1]});
        let new = json!({"a": 1, "b": {"x": 3}, "d": true});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"b": {"x": 3, "y": null}, "c": null, "d": true})
        );
        assert_eq!(merge_patch(&new, &new), json!({}));
    }

    fn deployment(name: &str, rev: i64, desired: i32, avail: i32, updated: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": name, "generation": 2, "labels": {"r4.dev/revision": rev.to_string()}},
            "spec": {"replicas": desired, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": desired, "updatedReplicas": updated, "availableReplicas": avail, "readyReplicas": avail}
        }))
        .expect("test deployment")
    }

    #[test]
    fn available_only_when_every_deployment_is_at_the_revision_and_available() {
        let ok = [deployment("a", 2, 2, 2, 2), deployment("b", 2, 1, 1, 1)];
        assert!(matches!(
            availability(&ok, Some(2)),
            Availability::Available
        ));
        assert!(matches!(
            availability(&ok, Some(3)),
            Availability::Progressing { .. }
        ));
        let slow = [deployment("a", 2, 2, 1, 2)];
        match availability(&slow, Some(2)) {
            Availability::Progressing { detail } => {
                assert!(detail.contains("1/2 available"), "{detail}")
            }
            Availability::Available => panic!("one replica is not available"),
        }
        assert!(matches!(
            availability(&[], Some(1)),
            Availability::Progressing { .. }
        ));
    }
}
