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
//!   moment. So is the controller of a cluster install (`config/install.yaml`'s Deployment
//!   runs `r4 controller`): `r4 dev` runs its own controller, and a second one, run for
//!   real, would fight it over every workflow (and take a leader Lease); its pod becomes
//!   Ready and does nothing. The pod status (`Pending` → `Running`, conditions, container
//!   statuses, pod IP) is written through the `pods/status` subresource. Pods can be made to fail to start
//!   ([`podstatus`] says how), so rollouts can fail.
//!
//! Every API call has a deadline ([`KubeletOptions::api_timeout`]); conflicts are settled by
//! reading the object again; nothing read from the API is unwrapped.
//!
//! It talks to the API only as a cluster's controllers do, so it works against any API
//! server; against a real cluster it would compete with the cluster's own controllers and
//! kubelets, so it is meant for `r4 dev`'s API (and tests).
//!
//! Not done (a cluster does them, `r4 dev` does not need them yet): ReplicaSet objects and
//! adoption of orphan pods, Events, scheduling (`spec.nodeName` stays empty), the pod spec's
//! probes (readiness is the engine's own, or the delay of a simulated container),
//! `restartPolicy` other than `Always`, restarting a container whose image is changed in
//! place, and ports: every pod's address is 127.0.0.1 and an intake listens on a port the
//! system picks (logged).

pub mod deployment;
pub mod engine;
pub mod pod;
pub mod podstatus;
pub mod rollout;
pub mod runtime;

#[cfg(test)]
mod fixtures;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::queue::Queue;
use crate::queue::memory::MemoryQueue;

/// How the kubelet runs.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// Redis URL of the queue every engine shares; `None`: an embedded in-memory queue shared
    /// by every pod of this kubelet.
    pub redis: Option<String>,
    /// Run the engine role of `r4 engine` containers; `false` simulates them like any image.
    pub engines: bool,
    /// How long after it starts a simulated container becomes ready.
    pub ready_delay: Duration,
    /// Deadline of every API call.
    pub api_timeout: Duration,
    /// Deadline of a container's start (reading its ConfigMap, connecting).
    pub start_timeout: Duration,
    /// Seed of the simulated agents and tools.
    pub seed: u64,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        KubeletOptions {
            redis: None,
            engines: true,
            ready_delay: Duration::from_secs(1),
            api_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            seed: 0,
        }
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}: no answer from the API within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("queue: {0}")]
    Queue(String),
    #[error("{0}")]
    Invalid(String),
}

impl KubeletError {
    /// A short, static label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            KubeletError::Kube(_) => "kube",
            KubeletError::Timeout(..) => "timeout",
            KubeletError::Queue(_) => "queue",
            KubeletError::Invalid(_) => "invalid",
        }
    }
}

/// What the reconcilers share.
pub struct Context {
    pub client: Client,
    pub opts: KubeletOptions,
    /// Asked in order; the first that runs a container starts it.
    pub runtimes: Vec<Arc<dyn runtime::PodRuntime>>,
    /// The pods this kubelet runs, by uid.
    pub(crate) pods: Mutex<HashMap<String, pod::PodEntry>>,
    /// The wall clock of object timestamps (a test sets it).
    pub now: Box<dyn Fn() -> Timestamp + Send + Sync>,
    /// The status last written per object uid (see [`replace_status`]).
    written: Mutex<HashMap<String, serde_json::Value>>,
}

impl Context {
    pub fn new(
        client: Client,
        opts: KubeletOptions,
        runtimes: Vec<Arc<dyn runtime::PodRuntime>>,
    ) -> Self {
        Context {
            client,
            opts,
            runtimes,
            pods: Mutex::new(HashMap::new()),
            now: Box::new(Timestamp::now),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Now, to the second (as the API stores times), so an unchanged status compares equal.
    pub fn now(&self) -> Timestamp {
        let t = (self.now)();
        Timestamp::from_second(t.as_second()).unwrap_or(t)
    }

    /// `f` within the API deadline.
    pub async fn within<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, KubeletError> {
        tokio::time::timeout(self.opts.api_timeout, f)
            .await
            .map_err(|_| KubeletError::Timeout(what, self.opts.api_timeout))
    }
}

/// The runtimes of `r4 dev`: engine containers in process on `queue` (when
/// [`KubeletOptions::engines`]), every other container simulated.
pub fn dev_runtimes(
    client: &Client,
    queue: Arc<dyn Queue>,
    opts: &KubeletOptions,
) -> Vec<Arc<dyn runtime::PodRuntime>> {
    let mut out: Vec<Arc<dyn runtime::PodRuntime>> = Vec::new();
    if opts.engines {
        out.push(Arc::new(engine::EngineRuntime::new(
            client.clone(),
            queue,
            opts.seed,
            opts.api_timeout,
        )));
    }
    out.push(Arc::new(runtime::SimulatedRuntime {
        delay: opts.ready_delay,
    }));
    out
}

/// Run the kubelet against the API behind `client` until `shutdown` turns true, then stop
/// every container it started.
pub async fn run(
    client: Client,
    opts: KubeletOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), KubeletError> {
    let queue: Arc<dyn Queue> = match &opts.redis {
        Some(url) => {
            let q = tokio::time::timeout(
                opts.start_timeout,
                crate::queue::redis::RedisQueue::connect(url),
            )
            .await
            .map_err(|_| {
                KubeletError::Queue(format!(
                    "no answer from Redis within {:?}",
                    opts.start_timeout
                ))
            })?
            .map_err(|e| {
                KubeletError::Queue(format!(
                    "cannot connect to {}: {e}",
                    crate::telemetry::redact::redact_url(url)
                ))
            })?;
            Arc::new(q)
        }
        None => Arc::new(MemoryQueue::new()),
    };
    run_on(client, opts, queue, shutdown).await
}

/// [`run`] on a queue the caller made (`r4 dev` shares its embedded queue with the controller,
/// which reads the engines' stats from it); [`KubeletOptions::redis`] is not used.
pub async fn run_on(
    client: Client,
    opts: KubeletOptions,
    queue: Arc<dyn Queue>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), KubeletError> {
    let runtimes = dev_runtimes(&client, queue, &opts);
    run_with(Arc::new(Context::new(client, opts, runtimes)), shutdown).await
}

/// A future that resolves when `shutdown` turns true (or its sender is gone), and is `Sync` as
/// the controller's graceful shutdown wants.
fn shutdown_signal(
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|v| *v).await;
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Forget what was written for the objects of these uids (they are gone).
pub(crate) fn forget_written(ctx: &Context, gone: &[String]) {
    if let Ok(mut w) = ctx.written.lock() {
        for uid in gone {
            w.remove(uid);
        }
    }
}

/// [`run`] with the given context (its runtimes chosen by the caller).
pub async fn run_with(
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), KubeletError> {
    let client = ctx.client.clone();
    let deployments = Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
    .graceful_shutdown_on(shutdown_signal(shutdown.clone()))
    .run(deployment::reconcile, deployment::error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "deployment controller");
        }
    });
    let pod_controller = Controller::new(Api::<Pod>::all(client), watcher::Config::default());
    let store = pod_controller.store();
    let pods = pod_controller
        .graceful_shutdown_on(shutdown_signal(shutdown.clone()))
        .run(pod::reconcile, pod::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "kubelet");
            }
        });
    let reaper = pod::reap(ctx.clone(), store, shutdown);
    tokio::join!(deployments, pods, reaper);
    pod::stop_all(&ctx).await;
    Ok(())
}

/// Write `obj`'s status as `render` makes it, through the status subresource. `render` returns
/// `None` when there is nothing to write. On a conflict the object is read again and rendered
/// again (at most three times; the next event brings another try); an object gone is nothing
/// to write.
///
/// A status equal to the one last written for this object is not written again, whatever the
/// object shows: either the cache has not seen the write yet, or the API server normalised it
/// (dropped a field it does not know). Writing it again would only bring another event and
/// another write, forever.
pub(crate) async fn replace_status<K>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    obj: &K,
    render: impl Fn(&K) -> Option<K>,
) -> Result<(), KubeletError>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let status_of = |k: &K| {
        serde_json::to_value(k)
            .ok()
            .map(|v| v.get("status").cloned().unwrap_or_default())
    };
    let mut current = obj.clone();
    for _ in 0..3 {
        let Some(next) = render(&current) else {
            return Ok(());
        };
        let status = status_of(&next);
        let last = ctx.written.lock().ok().and_then(|w| w.get(&uid).cloned());
        if status.is_some() && last == status {
            return Ok(());
        }
        match ctx
            .within(
                "replace status",
                api.replace_status(name, &PostParams::default(), &next),
            )
            .await?
        {
            Ok(_) => {
                if let (Some(st), Ok(mut w)) = (status, ctx.written.lock()) {
                    w.insert(uid, st);
                }
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                match ctx.within("get", api.get_opt(name)).await?? {
                    Some(o) => current = o,
                    None => return Ok(()),
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fixtures::{FakeApi, deployment, t0};
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    fn cond(s: &Option<DeploymentStatus>, t: &str) -> Option<(String, String)> {
        s.as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_.as_deref() == Some(t))
            .map(|c| {
                (
                    c.status.clone().unwrap_or_default(),
                    c.reason.clone().unwrap_or_default(),
                )
            })
    }

    fn web(fake: &FakeApi) -> Option<Deployment> {
        fake.list::<Deployment>("deployments").into_iter().next()
    }

    /// (name, pod-template-hash, ready) of every pod.
    fn pods(fake: &FakeApi) -> Vec<(String, String, bool)> {
        fake.list::<Pod>("pods")
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(rollout::HASH_LABEL).cloned())
                        .unwrap_or_default(),
                    podstatus::is_ready(p),
                )
            })
            .collect()
    }

    fn complete(fake: &FakeApi, hash: &str, n: usize) -> bool {
        let Some(d) = web(fake) else { return false };
        let ps = pods(fake);
        ps.len() == n
            && ps.iter().all(|(_, h, ready)| h == hash && *ready)
            && d.status.as_ref().and_then(|s| s.available_replicas) == Some(n as i32)
            && cond(&d.status, "Progressing").map(|c| c.1).as_deref()
                == Some("NewReplicaSetAvailable")
            && cond(&d.status, "Available").map(|c| c.0).as_deref() == Some("True")
    }

    /// The whole loop against a small API: a Deployment gets ready pods and a complete
    /// status; a deleted pod comes back; a rollout to an image that cannot be pulled keeps the
    /// old pods and exceeds its progress deadline; a rollout to a good image replaces every
    /// pod; shutdown stops every container.
    #[tokio::test(start_paused = true)]
    async fn deployments_get_pods_roll_out_and_fail_to_roll_out_as_on_a_cluster() {
        let fake = FakeApi::new();
        let mut d = deployment("web", 2, "ghcr.io/acme/web:1");
        d.spec.progress_deadline_seconds = Some(30);
        fake.put(&d);
        let origin = tokio::time::Instant::now();
        let mut ctx = Context::new(
            fake.client(),
            KubeletOptions::default(),
            vec![Arc::new(runtime::SimulatedRuntime {
                delay: Duration::from_secs(1),
            })],
        );
        // Object times follow the paused clock, so the progress deadline passes in it.
        ctx.now = Box::new(move || {
            Timestamp::from_second(t0().as_second() + origin.elapsed().as_secs() as i64)
                .unwrap_or_else(|_| t0())
        });
        let ctx = Arc::new(ctx);
        let (stop, shutdown) = watch::channel(false);
        let kubelet = tokio::spawn(run_with(ctx.clone(), shutdown));
        let minute = Duration::from_secs(60);

        let h1 = rollout::template_hash(&d).unwrap();
        fake.wait_until("2 ready pods, deployment complete", minute, |f| {
            complete(f, &h1, 2)
        })
        .await;
        for (name, _, _) in pods(&fake) {
            assert!(
                name.starts_with(&format!("web-{h1}-"))
                    && name.len() == format!("web-{h1}-").len() + 5,
                "{name}"
            );
        }
        let s = web(&fake).unwrap().status.unwrap();
        assert_eq!(
            (
                s.replicas,
                s.updated_replicas,
                s.ready_replicas,
                s.observed_generation
            ),
            (Some(2), Some(2), Some(2), Some(1))
        );

        // A pod deleted comes back; its container is stopped.
        let (victim, _, _) = pods(&fake).remove(0);
        fake.delete("pods", "default", &victim);
        fake.wait_until("the deleted pod replaced", minute, |f| {
            complete(f, &h1, 2) && pods(f).iter().all(|(n, _, _)| *n != victim)
        })
        .await;
        // The reaper looks every 2 s (of the paused clock).
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pod::running(&ctx), 2);

        // A new template whose image cannot be pulled: one new pod, Pending; the old ones stay.
        let mut bad = d.clone();
        bad.spec.template.spec.as_mut().unwrap().containers[0].image =
            Some("ghcr.io/acme/web:cannot-pull".into());
        fake.put(&bad);
        let h2 = {
            let mut b = bad.clone();
            b.status = None;
            rollout::template_hash(&b).unwrap()
        };
        fake.wait_until(
            "the rollout exceeds its deadline",
            Duration::from_secs(120),
            |f| {
                cond(&web(f).and_then(|d| d.status), "Progressing")
                    == Some(("False".into(), "ProgressDeadlineExceeded".into()))
            },
        )
        .await;
        let ps = pods(&fake);
        assert_eq!(
            ps.iter().filter(|(_, h, r)| *h == h1 && *r).count(),
            2,
            "{ps:?}"
        );
        let new: Vec<Pod> = fake
            .list::<Pod>("pods")
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(rollout::HASH_LABEL))
                    == Some(&h2)
            })
            .collect();
        assert_eq!(new.len(), 1);
        let st = new[0].status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Pending"));
        let waiting = st.container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .waiting
            .clone()
            .unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("ImagePullBackOff"));
        let s = web(&fake).unwrap().status.unwrap();
        assert_eq!(
            (
                s.updated_replicas,
                s.available_replicas,
                s.observed_generation
            ),
            (Some(1), Some(2), Some(2))
        );
        assert_eq!(
            cond(&Some(s), "Available").map(|c| c.0).as_deref(),
            Some("True")
        );

        // A good image: every pod replaced, the rollout complete again.
        let mut good = d.clone();
        good.spec.template.spec.as_mut().unwrap().containers[0].image =
            Some("ghcr.io/acme/web:2".into());
        fake.put(&good);
        let h3 = rollout::template_hash(&good).unwrap();
        fake.wait_until(
            "the rollout to web:2 completes",
            Duration::from_secs(120),
            |f| complete(f, &h3, 2),
        )
        .await;
        assert_eq!(
            web(&fake).unwrap().status.unwrap().observed_generation,
            Some(3)
        );

        let _ = stop.send(true);
        let r = tokio::time::timeout(minute, kubelet).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "the kubelet did not stop");
        assert_eq!(pod::running(&ctx), 0);
    }

    const WORKFLOW: &str = "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: pay}\nspec:\n  queue: {redis: {url: \"redis://x\"}}\n  tools:\n    - {name: bank, url: \"http://bank/mcp\", idempotent: true, simulate: {latency: {medianMs: 5}}}\n  agents:\n    - {name: a, image: ghcr.io/acme/agent:1, consumes: in, tools: [bank], simulate: {latency: {medianMs: 5}, calls: [bank]}}\n";

    /// The pod layout the kubelet supports for an agent: the agent's container beside an
    /// `r4 engine` container that reads the workflow from a mounted ConfigMap.
    fn agent_deployment() -> Deployment {
        use k8s_openapi::api::core::v1::{ConfigMapVolumeSource, Container, Volume, VolumeMount};
        let mut d = deployment("pay-a", 1, "ghcr.io/acme/agent:1");
        let spec = d.spec.template.spec.as_mut().unwrap();
        spec.containers.push(Container {
            name: "engine".into(),
            image: Some("ghcr.io/acme/r4:dev".into()),
            args: Some(
                [
                    "engine",
                    "--role",
                    "agent",
                    "--agent",
                    "a",
                    "--workflow-file",
                    "/etc/r4/workflow.yaml",
                    "--redis",
                    "redis://redis:6379",
                ]
                .map(String::from)
                .to_vec(),
            ),
            volume_mounts: Some(vec![VolumeMount {
                name: "workflow".into(),
                mount_path: "/etc/r4".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        spec.volumes = Some(vec![Volume {
            name: "workflow".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "pay-r4".into(),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        d
    }

    /// An agent Deployment whose pods run the engine: ready when the engine is, working the
    /// tasks of the shared queue; a pod deleted is replaced by one whose engine takes over.
    #[tokio::test(start_paused = true)]
    async fn an_agent_deployment_runs_its_engine_on_the_shared_queue() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let fake = FakeApi::new();
        fake.put(&ConfigMap {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("pay-r4".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            data: Some([("workflow.yaml".to_string(), WORKFLOW.to_string())].into()),
            ..Default::default()
        });
        let d = agent_deployment();
        fake.put(&d);
        let client = fake.client();
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let opts = KubeletOptions::default();
        let engine = Arc::new(engine::EngineRuntime::new(
            client.clone(),
            queue.clone(),
            1,
            opts.api_timeout,
        ));
        let sim = Arc::new(runtime::SimulatedRuntime {
            delay: opts.ready_delay,
        });
        let ctx = Arc::new(Context::new(client, opts, vec![engine.clone(), sim]));
        let (stop, shutdown) = watch::channel(false);
        let kubelet = tokio::spawn(run_with(ctx.clone(), shutdown));
        let minute = Duration::from_secs(60);
        let hash = rollout::template_hash(&d).unwrap();
        fake.wait_until("the agent pod ready", minute, |f| complete(f, &hash, 1))
            .await;
        let p = fake.list::<Pod>("pods").remove(0);
        let names: Vec<(String, bool)> = p
            .status
            .unwrap()
            .container_statuses
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.ready))
            .collect();
        assert_eq!(
            names,
            [("pay-a".to_string(), true), ("engine".to_string(), true)]
        );

        // A task submitted on the shared queue is worked on by the pod's engine.
        let cfg =
            Arc::new(crate::engine::WorkflowConfig::from_yaml("w", WORKFLOW, None, None).unwrap());
        let intake = crate::engine::Intake::new(cfg, queue.clone(), "intake-0");
        let submit = |n: i64| {
            let intake = intake.clone();
            async move {
                intake
                    .submit(serde_json::json!({ "n": n }), None, None)
                    .await
                    .unwrap()
            }
        };
        let worked = |n: u64| {
            let engine = engine.clone();
            async move {
                let r = tokio::time::timeout(Duration::from_secs(60), async {
                    while engine.effects().0 < n {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                assert!(
                    r.is_ok(),
                    "{n} tasks not worked within 60 s of virtual time"
                );
            }
        };
        submit(1).await;
        worked(1).await;

        // The pod deleted: its engine stops, the replacement's engine works the next task.
        let name = p.metadata.name.unwrap();
        fake.delete("pods", "default", &name);
        fake.wait_until("the replacement ready", minute, |f| {
            complete(f, &hash, 1) && pods(f).iter().all(|(n, _, _)| *n != name)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pod::running(&ctx), 1);
        submit(2).await;
        worked(2).await;
        assert_eq!(engine.effects(), (2, 0));

        let _ = stop.send(true);
        let r = tokio::time::timeout(minute, kubelet).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "the kubelet did not stop");
    }
}
