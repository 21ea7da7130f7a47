//! Running the controller: the workflow, policy and drill controllers (kube-runtime `Controller`s on
//! the kube `Client`), behind leader election when asked, with the metrics and health
//! endpoints, until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::cache::{self, Caches};
use super::context::{Context, Options};
use super::leader::{self, LeaderOptions};
use super::metrics::ControllerMetrics;
use super::{WORKFLOW_LABEL, drill, policy, workflow};
use crate::api::drill::ChaosDrill;
use crate::api::policy::CircuitPolicy;
use crate::api::workflow::AgentWorkflow;

/// Reconciles of one kind running at once.
const CONCURRENCY: u16 = 16;

/// How `r4 controller` (and the controller of `r4 dev`) runs.
#[derive(Clone)]
pub struct RunOptions {
    pub controller: Options,
    /// Serve /metrics, /healthz, /readyz here.
    pub metrics_listen: Option<SocketAddr>,
    /// Lead only while holding this Lease (two or more replicas).
    pub leader: Option<LeaderOptions>,
}

/// Run until `shutdown` turns true.
pub async fn run(
    client: kube::Client,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let metrics = Arc::new(ControllerMetrics::new());
    if let Some(r) = &opts.controller.api_requests {
        metrics.count_requests(r.clone());
    }
    let (ready_tx, ready_rx) = watch::channel(false);
    let ready_tx = Arc::new(ready_tx);
    let server = match opts.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "controller metrics and health endpoints serving");
            let (m, r, s) = (metrics.clone(), ready_rx.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = super::http::serve_on(listener, m, r, s).await {
                    tracing::error!(error = %e, "controller metrics server ended");
                }
            }))
        }
        None => None,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        opts.controller.clone(),
        metrics.clone(),
    ));
    match opts.leader {
        None => {
            metrics.set_leader(true);
            controllers(ctx, shutdown.clone(), ready_tx).await;
        }
        Some(lopts) => {
            let (is_leader_tx, mut is_leader_rx) = watch::channel(false);
            let m = metrics.clone();
            tokio::spawn(async move {
                while is_leader_rx.changed().await.is_ok() {
                    m.set_leader(*is_leader_rx.borrow());
                }
            });
            // A standby is ready: it serves as soon as it leads.
            let _ = ready_tx.send(true);
            let ctx2 = ctx.clone();
            leader::run_elected(client, lopts, shutdown.clone(), is_leader_tx, move |stop| {
                let (ctx, ready) = (ctx2.clone(), ready_tx.clone());
                async move { controllers(ctx, stop, ready).await }
            })
            .await
            .map_err(|e| format!("leader election: {e}"))?;
        }
    }
    if let Some(s) = server {
        let _ = s.await;
    }
    Ok(())
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The workflow, policy and drill controllers, until `stop`.
async fn controllers(
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    ready: Arc<watch::Sender<bool>>,
) {
    let client = ctx.client.clone();
    let all = watcher::Config::default();
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=r4");
    // A bounded number of reconciles at once: a burst (the controller starting with a thousand
    // workflows) queues instead of holding a thousand reconciles' requests in memory.
    let config = kube::runtime::controller::Config::default().concurrency(CONCURRENCY);
    // Every store keeps its objects without their managedFields (cache::slim), the workflows'
    // included: the largest part of an object as the API returns it, read by no reconcile.
    let (store, workflows_w) = reflector::store();
    let wf_ctl = Controller::for_stream(
        watcher(Api::<AgentWorkflow>::all(client.clone()), all.clone())
            .modify(cache::slim)
            .reflect(workflows_w)
            .applied_objects()
            // A change of the status alone is the controller's own write: it needs no
            // reconcile (it would find nothing to do, at the cost of one per status write).
            .predicate_filter(workflow_changed, Default::default()),
        store.clone(),
    )
    .with_config(config.clone());
    {
        let (store, ready) = (store.clone(), ready.clone());
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = ready.send(true);
            }
        });
    }
    let by_policy = store.clone();
    let policy_specs = Generations::default();
    let workflow_specs = Generations::default();
    // The watches that trigger the workflow controller fill the stores its reconciles read
    // (super::cache): one watch per kind, no list per reconcile. The revisions are only read.
    let (deployments, deployments_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (config_maps, config_maps_w) = reflector::store();
    let (service_accounts, service_accounts_w) = reflector::store();
    let (policies_r, policies_w) = reflector::store();
    let (revisions, revisions_w) = reflector::store();
    let revisions_feed = tokio::spawn(
        watcher(
            Api::<ControllerRevision>::all(client.clone()),
            watcher::Config::default().labels(WORKFLOW_LABEL),
        )
        .default_backoff()
        .modify(cache::slim)
        .reflect(revisions_w)
        .for_each(|_| async {}),
    );
    ctx.set_caches(Some(Caches {
        workflows: store.clone(),
        policies: policies_r,
        deployments,
        services,
        config_maps,
        service_accounts,
        revisions,
    }));
    let drill_ctl = Controller::new(Api::<ChaosDrill>::all(client.clone()), all.clone())
        .with_config(config.clone());
    let drill_store = drill_ctl.store();
    ctx.drills.begin(drill_store.clone());
    ctx.metrics.observe(Some(super::metrics::Objects {
        workflows: store.clone(),
        drills: drill_store.clone(),
    }));
    let (records, drill_workflow_specs) = (drill::RecordChanges::default(), Generations::default());
    let workflows = wf_ctl
        .owns_stream(
            watcher(Api::<Deployment>::all(client.clone()), managed.clone())
                .default_backoff()
                .modify(cache::slim_deployment)
                .reflect(deployments_w)
                .touched_objects(),
        )
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
                managed.clone(),
            )
            .default_backoff()
            .modify(cache::slim)
            .reflect(config_maps_w)
            .touched_objects(),
        )
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<Service>>::all(client.clone()),
                managed.clone(),
            )
            .default_backoff()
            .modify(cache::slim)
            .reflect(services_w)
            .touched_objects(),
        )
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
                managed,
            )
            .default_backoff()
            .modify(cache::slim)
            .reflect(service_accounts_w)
            .touched_objects(),
        )
        // Only a policy's spec matters to a workflow: its status (usedBy, breakers) changes
        // with every workflow that comes and goes, and reconciling every user of the policy
        // on each of those would cost N reconciles per workflow created.
        .watches_stream(
            watcher(Api::<CircuitPolicy>::all(client.clone()), all.clone())
                .default_backoff()
                .modify(cache::slim)
                .reflect(policies_w)
                .touched_objects(),
            move |p: CircuitPolicy| {
                if !policy_specs.changed(&p) {
                    return Vec::new();
                }
                let ns = p.namespace().unwrap_or_else(|| "default".into());
                let name = p.name_any();
                by_policy
                    .state()
                    .into_iter()
                    .filter(|w| policy::uses(w, &ns, &name))
                    .map(|w| ObjectRef::from_obj(&*w))
                    .collect::<Vec<_>>()
            },
        )
        // A drill's runs make the workflow's drill record.
        .watches(
            Api::<ChaosDrill>::all(client.clone()),
            all.clone(),
            move |d: ChaosDrill| records.workflow_of(&d),
        )
        .graceful_shutdown_on(wait_true(stop.clone()))
        .run(workflow::reconcile, workflow::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "workflow controller");
            }
        });
    // Drills: reconciled again when their workflow appears or its spec changes (what they
    // validate against).
    let drills = drill_ctl
        .watches(
            Api::<AgentWorkflow>::all(client.clone()),
            all.clone(),
            move |w: AgentWorkflow| {
                if !drill_workflow_specs.changed(&w) {
                    return Vec::new();
                }
                drill::drills_of(&drill_store, &w)
            },
        )
        .graceful_shutdown_on(wait_true(stop.clone()))
        .run(drill::reconcile, drill::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "drill controller");
            }
        });
    let policies = Controller::new(Api::<CircuitPolicy>::all(client.clone()), all.clone())
        .with_config(config)
        // A workflow's spec names its policies; its status changes say nothing to them.
        .watches(
            Api::<AgentWorkflow>::all(client),
            all,
            move |w: AgentWorkflow| {
                if !workflow_specs.changed(&w) {
                    return Vec::new();
                }
                let ns = w.namespace().unwrap_or_else(|| "default".into());
                workflow::policy_refs(&w.spec)
                    .into_iter()
                    .map(|(_, p)| ObjectRef::<CircuitPolicy>::new(&p).within(&ns))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(wait_true(stop))
        .run(policy::reconcile, policy::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "policy controller");
            }
        });
    tokio::join!(workflows, policies, drills);
    revisions_feed.abort();
    ctx.set_caches(None);
    ctx.metrics.observe(None);
    ctx.drills.end();
    let _ = ready.send(false);
}

/// What a workflow's reconcile depends on besides its status (which only the controller
/// writes): its identity, spec (the generation), finalizers, deletion, labels and
/// annotations. A watch event that changes none of these triggers no reconcile.
fn workflow_changed(wf: &AgentWorkflow) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = &wf.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.uid.hash(&mut h);
    m.generation.hash(&mut h);
    m.finalizers.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    Some(h.finish())
}

/// The generation last seen of each object: a change of anything but the spec (a status write)
/// keeps it, so a watch mapped through [`Generations::changed`] triggers only on spec changes
/// (and on the first sight of an object, e.g. after a restart).
#[derive(Default)]
struct Generations(std::sync::Mutex<std::collections::HashMap<String, Option<i64>>>);

impl Generations {
    fn changed<K: kube::Resource>(&self, obj: &K) -> bool {
        let key = format!(
            "{}/{}",
            obj.meta().namespace.as_deref().unwrap_or(""),
            obj.meta().name.as_deref().unwrap_or("")
        );
        let generation = obj.meta().generation;
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(key, generation) != Some(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf() -> AgentWorkflow {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "r4.dev/v1alpha1", "kind": "AgentWorkflow",
            "metadata": {"name": "w", "namespace": "default", "uid": "u-1", "generation": 1, "resourceVersion": "5"},
            "spec": {"queue": {"redis": {"url": "redis://r:6379"}},
                "agents": [{"name": "a", "image": "i:1", "consumes": "t"}]}
        }))
        .expect("test workflow")
    }

    #[test]
    fn a_status_write_triggers_no_reconcile_and_everything_else_does() {
        let base = workflow_changed(&wf());
        let mut status_only = wf();
        status_only.metadata.resource_version = Some("6".into());
        status_only.status = Some(Default::default());
        assert_eq!(workflow_changed(&status_only), base);
        let mut spec = wf();
        spec.metadata.generation = Some(2);
        assert_ne!(workflow_changed(&spec), base);
        let mut fin = wf();
        fin.metadata.finalizers = Some(vec![workflow::FINALIZER.into()]);
        assert_ne!(workflow_changed(&fin), base);
        let mut del = wf();
        del.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_ne!(workflow_changed(&del), base);
        let mut again = wf();
        again.metadata.uid = Some("u-2".into());
        assert_ne!(workflow_changed(&again), base, "deleted and created again");
    }
}
