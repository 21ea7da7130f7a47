//! `r4 bench devcluster`: how much the dev API of `r4 dev` carries, measured through a kube
//! client like any other: objects created per second (ConfigMaps, `concurrency` requests in
//! flight), watch events per second delivered to a watcher that saw every one of them, and the
//! process's peak resident memory while it holds `workflows` AgentWorkflows with the children a
//! controller renders for each (a ConfigMap, a ServiceAccount, a Service and one Deployment per
//! agent plus the intake). The figure the issue sets: 1,000 workflows in well under 128 MiB
//! of the server's own (peak RSS minus the RSS before the server started).

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{mib, rss};
use crate::devcluster::{Options, start};

/// What to measure.
#[derive(Clone, Debug)]
pub struct DevBenchOpts {
    /// ConfigMaps created (and watched).
    pub objects: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// AgentWorkflows held with their children.
    pub workflows: usize,
}

impl Default for DevBenchOpts {
    fn default() -> Self {
        Self {
            objects: 10_000,
            concurrency: 32,
            workflows: 1_000,
        }
    }
}

fn per_sec(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        (n as f64 / d.as_secs_f64()).round()
    }
}

/// Run the benchmark; the JSON report, or a one-line error.
pub async fn run(opts: DevBenchOpts) -> Result<Value, String> {
    let (before, _) = rss();
    let handle = start(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        Options::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let client = crate::devcluster::client(&handle.url()).map_err(|e| e.to_string())?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // A watcher from now on, counting ADDED events until it has seen every object.
    let rv = cms
        .list_metadata(&Default::default())
        .await
        .map_err(|e| format!("list: {e}"))?
        .metadata
        .resource_version
        .unwrap_or_default();
    let watch = cms
        .watch(&WatchParams::default().timeout(290), &rv)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    let want = opts.objects;
    let watcher = tokio::spawn(async move {
        let mut seen = 0usize;
        let mut watch = watch.boxed();
        while let Some(ev) = watch.next().await {
            if let Ok(WatchEvent::Added(_)) = ev {
                seen += 1;
                if seen == want {
                    return (seen, Instant::now());
                }
            }
        }
        (seen, Instant::now())
    });

    let t0 = Instant::now();
    futures::stream::iter(0..opts.objects)
        .map(|i| {
            let cms = cms.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": format!("bench-{i}"), "labels": {"bench": "devcluster"}},
                    "data": {"n": i.to_string()},
                }))
                .map_err(|e| e.to_string())?;
                cms.create(&PostParams::default(), &cm)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("create bench-{i}: {e}"))
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let created_in = t0.elapsed();
    let (seen, last) = tokio::time::timeout(Duration::from_secs(120), watcher)
        .await
        .map_err(|_| "the watcher did not see every object within 120 s".to_string())?
        .map_err(|e| e.to_string())?;
    let watched_in = last.saturating_duration_since(t0);

    let held = hold_workflows(&client, &opts).await?;
    let (_, peak) = rss();
    let own = peak.saturating_sub(before);
    let report = json!({
        "bench": "devcluster",
        "objects": opts.objects,
        "concurrency": opts.concurrency,
        "created_per_sec": per_sec(opts.objects, created_in),
        "watch_events": seen,
        "watch_events_per_sec": per_sec(seen, watched_in),
        "workflows": opts.workflows,
        "objects_held": held + opts.objects,
        "rss_mib_before": mib(before),
        "rss_mib_peak": mib(peak),
        "rss_mib_own": mib(own),
        "limit_mib": 128,
        "within_limit": own < 128 * 1024 * 1024,
    });
    let _ = handle.stop().await;
    Ok(report)
}

/// Register the r4 CRDs and create `workflows` AgentWorkflows (the worked example, renamed) with
/// the children a controller renders for each; returns how many objects that made.
async fn hold_workflows(client: &Client, opts: &DevBenchOpts) -> Result<usize, String> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(|e| format!("create CRD: {e}"))?;
    }
    let sample: Value =
        serde_yaml::from_str(include_str!("../../config/samples/payment-disputes.yaml"))
            .map_err(|e| format!("sample: {e}"))?;
    let gvk = GroupVersionKind::gvk("r4.dev", "v1alpha1", "AgentWorkflow");
    let aws: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let agents: Vec<String> = sample["spec"]["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|a| a["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let per = 4 + agents.len() + 1;
    futures::stream::iter(0..opts.workflows)
        .map(|i| {
            let (aws, deploys, cms, sas, svcs) = (
                aws.clone(),
                deploys.clone(),
                cms.clone(),
                sas.clone(),
                svcs.clone(),
            );
            let mut wf = sample.clone();
            let agents = agents.clone();
            async move {
                let name = format!("wf-{i}");
                wf["metadata"] = json!({"name": name});
                let wf: DynamicObject = serde_json::from_value(wf).map_err(|e| e.to_string())?;
                let e = |what: &str, e: kube::Error| format!("create {what} of {name}: {e}");
                aws.create(&PostParams::default(), &wf)
                    .await
                    .map_err(|x| e("workflow", x))?;
                let labels = json!({"app.kubernetes.io/name": "r4", "app.kubernetes.io/instance": name});
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-engine"), "labels": labels},
                    "data": {"workflow.yaml": include_str!("../../config/samples/payment-disputes.yaml")},
                }))
                .map_err(|x| x.to_string())?;
                cms.create(&PostParams::default(), &cm)
                    .await
                    .map_err(|x| e("configmap", x))?;
                let sa: ServiceAccount =
                    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                        .map_err(|x| x.to_string())?;
                sas.create(&PostParams::default(), &sa)
                    .await
                    .map_err(|x| e("serviceaccount", x))?;
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-intake"), "labels": labels},
                    "spec": {"selector": {"app.kubernetes.io/instance": name}, "ports": [{"port": 8080}]},
                }))
                .map_err(|x| x.to_string())?;
                svcs.create(&PostParams::default(), &svc)
                    .await
                    .map_err(|x| e("service", x))?;
                for a in agents.iter().map(String::as_str).chain(["r4-intake"]) {
                    let d: Deployment = serde_json::from_value(json!({
                        "metadata": {"name": format!("{name}-{a}"), "labels": labels},
                        "spec": {
                            "replicas": 2,
                            "selector": {"matchLabels": {"app.kubernetes.io/instance": name, "r4.dev/agent": a}},
                            "template": {
                                "metadata": {"labels": {"app.kubernetes.io/instance": name, "r4.dev/agent": a}},
                                "spec": {
                                    "serviceAccountName": name,
                                    "initContainers": [{"name": "engine", "image": "ghcr.io/r4/r4:dev", "restartPolicy": "Always",
                                        "args": ["engine", "--role", "agent", "--agent", a]}],
                                    "containers": [{"name": "agent", "image": format!("ghcr.io/acme/{a}:1"),
                                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
                                },
                            },
                        },
                    }))
                    .map_err(|x| x.to_string())?;
                    deploys
                        .create(&PostParams::default(), &d)
                        .await
                        .map_err(|x| e("deployment", x))?;
                }
                Ok::<(), String>(())
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(opts.workflows * per)
}
