//! The children `controller::render` makes run on `r4 dev`: the worked example's children,
//! created through a kube client against the dev API server (with the AgentWorkflow as their
//! owner, as the controller applies them), get ready pods from the local kubelet, and a task
//! put on the entry stream runs through all three agents.

mod support;

use support::eventually;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use r4::api::policy::{CircuitPolicy, CircuitPolicySpec};
use r4::api::workflow::AgentWorkflow;
use r4::controller::render::{self, RenderOptions};
use r4::devcluster::kubelet::{self, KubeletOptions};
use r4::devcluster::{Options, start};
use r4::queue::Queue;
use serde_json::json;

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn sample(name: &str) -> String {
    let path = format!("{}/config/samples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).expect("sample")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_worked_example_runs_on_the_local_kubelet() {
    let handle = start("127.0.0.1:0".parse().expect("addr"), Options::default())
        .await
        .expect("start the dev API");
    let client: Client = r4::devcluster::client(&handle.url()).expect("client");
    let queue: Arc<dyn Queue> = Arc::new(r4::queue::memory::MemoryQueue::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let opts = KubeletOptions {
        ready_delay: Duration::from_millis(100),
        ..KubeletOptions::default()
    };
    tokio::spawn(kubelet::run_on(
        client.clone(),
        opts,
        queue.clone(),
        stopped,
    ));

    // The workflow itself first: its children are owned by it (and collected without it).
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in r4::api::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
    }
    let wf: AgentWorkflow = serde_yaml::from_str(&sample("payment-disputes")).expect("sample");
    let gvk = GroupVersionKind::gvk("r4.dev", "v1alpha1", "AgentWorkflow");
    let aws: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let created: DynamicObject = aws
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::to_value(&wf).expect("json")).expect("object"),
        )
        .await
        .expect("create the workflow");
    let mut wf = wf;
    wf.metadata = created.metadata.clone();
    let mut policies: BTreeMap<String, CircuitPolicySpec> = BTreeMap::new();
    for name in ["default-policy", "bank-policy"] {
        let cp: CircuitPolicy = serde_yaml::from_str(&sample(name)).expect("policy");
        policies.insert(name.into(), cp.spec);
    }
    let children = render::render(
        &wf,
        &wf.spec,
        &policies,
        &RenderOptions {
            engine_image: "ghcr.io/r4-dev/r4:0.1.0".into(),
            engine_env: Vec::new(),
            revision: 1,
            revision_hash: "h1".into(),
        },
    )
    .expect("render");

    // Applied as the controller applies them: server-side, in apply order.
    for v in children.to_values() {
        let gvk = GroupVersionKind::try_from(&kube::core::TypeMeta {
            api_version: v["apiVersion"].as_str().expect("apiVersion").into(),
            kind: v["kind"].as_str().expect("kind").into(),
        })
        .expect("gvk");
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        api.patch(
            &name,
            &PatchParams::apply(r4::controller::FIELD_MANAGER),
            &Patch::Apply(&v),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {} {name}: {e}", v["kind"]));
    }

    // Every Deployment gets its pods ready: the engines found their config and roles.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for d in &children.deployments {
        let name = d.metadata.name.clone().expect("name");
        let want = d.spec.replicas.unwrap_or(1) as usize;
        let selector = d
            .spec
            .selector
            .match_labels
            .as_ref()
            .expect("selector")
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        eventually(60, &format!("{want} ready pods of {name}"), || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            (list.items.iter().filter(|p| ready(p)).count() >= want).then_some(())
        })
        .await;
        eventually(30, &format!("{name} available"), || async {
            let s = deploys.get(&name).await.ok()?.status?;
            (s.available_replicas.unwrap_or(0) as usize >= want).then_some(())
        })
        .await;
    }

    // A task entering at `tickets` is done by the last agent.
    let keys = r4::queue::Keys::new("default", "payment-disputes");
    let task = r4::engine::task::Task::new("t-1", json!({"dispute": 1}));
    queue
        .add(&keys.stream("tickets"), task.encode(), None)
        .await
        .expect("add");
    eventually(60, "the task resolved", || async {
        queue
            .get(&keys.inbox("t-1", "resolution"))
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;
    let _ = stop.send(true);
}
