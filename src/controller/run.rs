//! Running the controller: the workflow, policy and drill controllers (kube-runtime `Controller`s on
//! the kube `Client`), behind leader election when asked, with the metrics and health
//! endpoints, until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::context::{Context, Options};
use super::leader::{self, LeaderOptions};
use super::metrics::ControllerMetrics;
use super::{drill, policy, workflow};
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
    let wf_ctl = Controller::new(Api::<AgentWorkflow>::all(client.clone()), all.clone())
        .with_config(config.clone());
    let store = wf_ctl.store();
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
    let drill_ctl = Controller::new(Api::<ChaosDrill>::all(client.clone()), all.clone())
        .with_config(config.clone());
    let drill_store = drill_ctl.store();
    ctx.drills.begin(drill_store.clone());
    let (records, drill_workflow_specs) = (drill::RecordChanges::default(), Generations::default());
    let workflows = wf_ctl
        .owns(Api::<Deployment>::all(client.clone()), managed.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed.clone())
        .owns(Api::<ServiceAccount>::all(client.clone()), managed)
        // Only a policy's spec matters to a workflow: its status (usedBy, breakers) changes
        // with every workflow that comes and goes, and reconciling every user of the policy
        // on each of those would cost N reconciles per workflow created.
        .watches(
            Api::<CircuitPolicy>::all(client.clone()),
            all.clone(),
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
    ctx.drills.end();
    let _ = ready.send(false);
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
