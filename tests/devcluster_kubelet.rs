//! The local kubelet against the real dev API server, through kube clients only (as on a
//! cluster): a Deployment gets its pods and an available status, a deleted pod is replaced, a
//! template change rolls the pods over, an image that cannot be pulled ends in
//! `ProgressDeadlineExceeded`, and deleting the Deployment garbage-collects its pods.

mod support;

use support::eventually;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use r4::devcluster::kubelet::{self, KubeletOptions};
use r4::devcluster::{Handle, Options, start};
use serde_json::json;

async fn cluster() -> (Handle, Client, tokio::sync::watch::Sender<bool>) {
    let handle = start("127.0.0.1:0".parse().expect("addr"), Options::default())
        .await
        .expect("start the dev API");
    let client = r4::devcluster::client(&handle.url()).expect("client");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let opts = KubeletOptions {
        ready_delay: Duration::from_millis(100),
        ..KubeletOptions::default()
    };
    tokio::spawn(kubelet::run(client.clone(), opts, stopped));
    (handle, client, stop)
}

fn deployment(name: &str, image: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": 3,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image}]},
            },
        },
    }))
    .expect("deployment")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn pods_of(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_get_pods_status_rollouts_and_gc() {
    let (_h, client, stop) = cluster().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("web", "nginx:1.27", 2))
        .await
        .expect("create");

    // Pods, owned and named as a ReplicaSet would name them, become ready; the Deployment's
    // status says so.
    let first = eventually(20, "2 ready pods", || async {
        let p = pods_of(&pods, "web").await;
        (p.len() == 2 && p.iter().all(ready)).then_some(p)
    })
    .await;
    for p in &first {
        let name = p.metadata.name.clone().unwrap_or_default();
        let hash = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .cloned()
            .unwrap_or_default();
        assert!(
            !hash.is_empty() && name.starts_with(&format!("web-{hash}-")),
            "{name}"
        );
        let owner = &p.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Deployment", "web")
        );
    }
    eventually(20, "deployment available", || async {
        let d = deploys.get("web").await.ok()?;
        let s = d.status?;
        let available = s.conditions.unwrap_or_default().iter().any(|c| {
            c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
        });
        (s.available_replicas == Some(2)
            && s.ready_replicas == Some(2)
            && s.observed_generation == d.metadata.generation
            && available)
            .then_some(())
    })
    .await;

    // A deleted pod is replaced.
    let victim = first[0].metadata.name.clone().unwrap_or_default();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete pod");
    eventually(20, "the deleted pod replaced", || async {
        let p = pods_of(&pods, "web").await;
        (p.len() == 2
            && p.iter().all(ready)
            && p.iter()
                .all(|p| p.metadata.name.as_deref() != Some(victim.as_str())))
        .then_some(())
    })
    .await;

    // A new template rolls the pods over to a new hash.
    let old_hash = first[0]
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .cloned()
        .unwrap_or_default();
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.28"}]}}}});
    deploys
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("patch template");
    eventually(30, "pods of the new template only", || async {
        let p = pods_of(&pods, "web").await;
        let new = p.iter().all(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .is_some_and(|h| *h != old_hash)
        });
        (p.len() == 2 && new && p.iter().all(ready)).then_some(())
    })
    .await;
    eventually(20, "updated replicas counted", || async {
        let s = deploys.get("web").await.ok()?.status?;
        (s.updated_replicas == Some(2) && s.available_replicas == Some(2)).then_some(())
    })
    .await;

    // An image that cannot be pulled: never ready, and the rollout misses its deadline.
    deploys
        .create(
            &PostParams::default(),
            &deployment("broken", "example.com/cannot-pull:1", 1),
        )
        .await
        .expect("create broken");
    let reason = eventually(30, "ProgressDeadlineExceeded", || async {
        let s = deploys.get("broken").await.ok()?.status?;
        s.conditions?
            .into_iter()
            .find(|c| {
                c.type_.as_deref() == Some("Progressing") && c.status.as_deref() == Some("False")
            })
            .and_then(|c| c.reason)
    })
    .await;
    assert_eq!(reason, "ProgressDeadlineExceeded");
    assert!(pods_of(&pods, "broken").await.iter().all(|p| !ready(p)));

    // Deleting the Deployment removes its pods (garbage collection by owner).
    deploys
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete deployment");
    eventually(20, "pods garbage-collected", || async {
        pods_of(&pods, "web").await.is_empty().then_some(())
    })
    .await;
    let _ = stop.send(true);
}

/// What a new user does (the README's "Trying the operator without a cluster"): `r4 dev` in one
/// terminal; in another, `kubectl apply -f crds/ -f config/samples/`, a Deployment rolled out
/// (`kubectl rollout status` is kubectl's own judgement of the status the kubelet writes), and
/// `kubectl get aw,cp,drill,deploy,pods`.
#[test]
fn a_new_user_runs_r4_dev_and_kubectl() {
    match std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        _ if std::env::var_os("CI").is_some() => panic!("kubectl is required under CI"),
        _ => {
            eprintln!("skipping: kubectl not found on PATH");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut dev = std::process::Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn r4 dev");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // It says where its kubeconfig is, then serves.
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = dev.stdout.take().expect("stdout");
        let mut out = std::io::BufReader::new(out);
        while !line.contains("export KUBECONFIG=") {
            line.clear();
            assert!(out.read_line(&mut line).expect("read") > 0, "r4 dev ended");
        }
    }
    let _dev = Kill(dev);
    assert!(
        line.trim_end().ends_with(&kubeconfig.display().to_string()),
        "{line}"
    );
    let repo = env!("CARGO_MANIFEST_DIR");
    let kubectl = |args: &[&str]| {
        let o = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .current_dir(repo)
            .output()
            .expect("kubectl");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "kubectl {args:?}: {err}\n{out}");
        out
    };
    kubectl(&["apply", "-f", "crds/"]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/agentworkflows.r4.dev",
        "--timeout=20s",
    ]);
    kubectl(&["apply", "-f", "config/samples/"]);
    // (`kubectl create deployment` sends protobuf, which the dev API decodes for a few core
    // kinds only; a manifest goes as JSON.)
    let web = dir.path().join("web.yaml");
    std::fs::write(
        &web,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: main, image: \"nginx:1.27\"}]}\n",
    )
    .expect("write web.yaml");
    kubectl(&["apply", "-f", &web.display().to_string()]);
    let rolled = kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let got = kubectl(&["get", "aw,cp,drill,deploy,pods"]);
    for want in [
        "agentworkflow.r4.dev/payment-disputes",
        "agentworkflow.r4.dev/chargeback-triage",
        "circuitpolicy.r4.dev/bank-policy",
        "chaosdrill.r4.dev/bank-outage",
        "deployment.apps/web",
        "2/2",
        "Running",
    ] {
        assert!(got.contains(want), "no {want:?} in:\n{got}");
    }
}

const WORKFLOW: &str = "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: pay}\nspec:\n  queue: {redis: {url: \"redis://x\"}}\n  tools:\n    - {name: bank, url: \"http://bank/mcp\", idempotent: true, simulate: {latency: {medianMs: 5}}}\n  agents:\n    - {name: a, image: ghcr.io/acme/agent:1, consumes: in, tools: [bank], simulate: {latency: {medianMs: 5}, calls: [bank]}}\n";

/// A pod with an `r4 engine` container runs that engine role in process, against the dev API
/// (its workflow read from the mounted ConfigMap through the API): the pod is ready when the
/// engine is, and the engine works a task put on the queue the kubelet shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_pod_runs_its_role_and_works_the_queue() {
    let handle = start("127.0.0.1:0".parse().expect("addr"), Options::default())
        .await
        .expect("start the dev API");
    let client = r4::devcluster::client(&handle.url()).expect("client");
    let queue: std::sync::Arc<dyn r4::queue::Queue> =
        std::sync::Arc::new(r4::queue::memory::MemoryQueue::new());
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
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "default");
    let cm = serde_json::from_value(json!({
        "metadata": {"name": "pay-r4"},
        "data": {"workflow.yaml": WORKFLOW},
    }))
    .expect("configmap");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("configmap");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "pay-a"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "pay-a"}},
            "template": {
                "metadata": {"labels": {"app": "pay-a"}},
                "spec": {
                    "containers": [
                        {"name": "agent", "image": "ghcr.io/acme/agent:1"},
                        {"name": "engine", "image": "ghcr.io/acme/r4:dev",
                         "args": ["engine", "--role", "agent", "--agent", "a", "--namespace", "default",
                                  "--workflow-file", "/etc/r4/workflow.yaml"],
                         "volumeMounts": [{"name": "workflow", "mountPath": "/etc/r4"}]},
                    ],
                    "volumes": [{"name": "workflow", "configMap": {"name": "pay-r4"}}],
                },
            },
        },
    }))
    .expect("deployment");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &d)
        .await
        .expect("create");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = eventually(30, "the engine pod ready", || async {
        pods_of(&pods, "pay-a").await.into_iter().find(ready)
    })
    .await;
    let ready_containers: Vec<String> = pod
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.ready)
        .map(|c| c.name)
        .collect();
    assert_eq!(ready_containers.len(), 2, "{ready_containers:?}");
    // A task on the engine's input is delivered to the simulated agent and completed (its
    // inbox key written in the completion step).
    let keys = r4::queue::Keys::new("default", "pay");
    let task = r4::engine::task::Task::new("t-1", json!({"n": 1}));
    queue
        .add(&keys.stream("in"), task.encode(), None)
        .await
        .expect("add");
    eventually(30, "the task completed by the pod's engine", || async {
        queue
            .get(&keys.inbox("t-1", "a"))
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;
    let _ = stop.send(true);
}
