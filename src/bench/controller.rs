//! `r4 bench controller`: time and memory to reconcile N AgentWorkflows on `r4 dev`'s API.
//!
//! Owns the setup and the measurement; the controller is the `r4 controller` command unchanged
//! and the API is `r4 dev` unchanged. Design, so the figures are the controller's:
//! - three processes: the API server (`r4 dev --no-controller --no-kubelet`), the controller
//!   (`r4 controller --redis …`, pointed at the API by `KUBECONFIG`), and this one, which
//!   creates the workflows and watches their statuses. The peak RSS is the controller
//!   process's own `VmHWM` (`/proc/<pid>/status`), read after the last reconcile and a
//!   `/metrics` scrape — nothing of the bench's objects, watch or client is in it. No kubelet:
//!   with 1,000 workflows its pods and simulated engines would be what is measured;
//!   Deployments get no pods, so every workflow stays `Progressing` (rolled out, not yet
//!   available), which is the load a controller carries while a fleet rolls out;
//! - the writes are counted at the wire by the controller itself: `r4 controller` counts every
//!   request of its kube client by (verb, group, resource) with the RBAC audit's recording
//!   layer and exports them as `r4_controller_api_requests_total` on its `/metrics`, read at
//!   the end with its reconciles (`r4_controller_reconciles_total`);
//! - the queue is a private `redis-server` given to the controller with `--redis` (the queue
//!   wiring of every workflow — streams, groups, kill-switch state — is real Redis work); its
//!   memory is Redis's, not the controller's;
//! - workflows are small but real (2 agents, a CircuitPolicy), created through the API with a
//!   few concurrent creates; the clock starts when the first create is sent and stops when
//!   every workflow has `status.observedGeneration == metadata.generation`,
//!   `status.currentRevision == 1` and its 2 Deployments (listed by label `r4.dev/workflow`).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::{mib, rss_of};
use crate::api::policy::CircuitPolicy;
use crate::api::workflow::AgentWorkflow;
use crate::controller::WORKFLOW_LABEL;
use crate::controller::rbac::RecordedCall;
use crate::testutil::RedisServer;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ControllerBenchOpts {
    /// AgentWorkflows created and reconciled.
    pub workflows: usize,
    /// Creates in flight at once.
    pub concurrency: usize,
    /// Give up after this long.
    pub deadline: Duration,
}

impl Default for ControllerBenchOpts {
    fn default() -> Self {
        Self {
            workflows: 1_000,
            concurrency: 8,
            deadline: Duration::from_secs(300),
        }
    }
}

/// Agent Deployments every bench workflow renders (no intake, no repair).
const DEPLOYMENTS_PER_WORKFLOW: usize = 2;

/// Writes among `counts`: create, update, patch, delete, deletecollection.
pub fn writes(counts: &BTreeMap<RecordedCall, u64>) -> u64 {
    counts
        .iter()
        .filter(|((verb, _, _), _)| is_write(verb))
        .map(|(_, n)| n)
        .sum()
}

/// Status writes of AgentWorkflows among `counts`.
pub fn status_writes(counts: &BTreeMap<RecordedCall, u64>) -> u64 {
    counts
        .iter()
        .filter(|((verb, group, resource), _)| {
            is_write(verb) && group == "r4.dev" && resource == "agentworkflows/status"
        })
        .map(|(_, n)| n)
        .sum()
}

fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// `r4 dev --no-controller --no-kubelet` as a child process (killed when dropped).
pub struct DevChild {
    child: tokio::process::Child,
    pub url: String,
    /// The kubeconfig it wrote (for a child client such as `r4 controller`).
    pub kubeconfig: std::path::PathBuf,
}

impl DevChild {
    /// Start `exe dev` on a free loopback port and wait (up to 30 s) for it to say its URL.
    pub async fn start(exe: &std::path::Path) -> Result<Self, String> {
        // The kubeconfig the child writes (read by the controller child); removed when it stops.
        let kubeconfig = std::env::temp_dir().join(format!(
            "r4-bench-controller-{}.kubeconfig",
            std::process::id()
        ));
        let mut child = tokio::process::Command::new(exe)
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--no-controller",
                "--no-kubelet",
            ])
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {} dev: {e}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| "r4 dev: no standard output".to_string())?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let find = async {
            while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                    return Ok(url.to_owned());
                }
            }
            Err("r4 dev ended before saying its address".to_string())
        };
        let url = tokio::time::timeout(Duration::from_secs(30), find)
            .await
            .map_err(|_| "r4 dev did not say its address within 30 s".to_string())??;
        // Keep reading its standard output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(DevChild {
            child,
            url,
            kubeconfig,
        })
    }

    /// Stop the child (SIGKILL: it holds nothing worth keeping) and reap it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Register the r4 CRDs on a fresh API.
pub async fn create_crds(client: &Client) -> Result<(), String> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        tokio::time::timeout(
            Duration::from_secs(10),
            crds.create(&PostParams::default(), &crd),
        )
        .await
        .map_err(|_| "create CRD: no answer within 10 s".to_string())?
        .map_err(|e| format!("create CRD {}: {e}", crd.name_any()))?;
    }
    Ok(())
}

const POLICY: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: bench-policy}
spec:
  timeout: {perAttempt: 2s}
  deadLetter: {maxDeliveries: 3}
"#;

fn workflow(name: &str) -> Result<AgentWorkflow, String> {
    let yaml = format!(
        r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: {name}}}
spec:
  queue: {{redis: {{url: "redis://unused.invalid:6379/0"}}}}
  policyRef: bench-policy
  agents:
    - {{name: sorter, image: "ghcr.io/acme/sorter:1.0", consumes: tickets, produces: [sorted]}}
    - {{name: solver, image: "ghcr.io/acme/solver:1.0", consumes: sorted}}
"#
    );
    serde_yaml::from_str(&yaml).map_err(|e| format!("bench workflow {name}: {e}"))
}

/// Whether the status says this generation is reconciled at revision 1.
fn reconciled(wf: &AgentWorkflow) -> bool {
    wf.status.as_ref().is_some_and(|s| {
        s.observed_generation.is_some()
            && s.observed_generation == wf.metadata.generation
            && s.current_revision == Some(1)
    })
}

/// Run the benchmark with the API server and the controller started from `exe` (the `r4`
/// binary); the JSON report, or a one-line error.
pub async fn run(exe: &std::path::Path, opts: ControllerBenchOpts) -> Result<Value, String> {
    let n = opts.workflows;
    let redis = RedisServer::start()
        .await
        .map_err(|e| format!("redis-server for the controller's queues: {e}"))?;
    let dev = DevChild::start(exe).await?;
    let result = measure(exe, &dev, &redis.url(), &opts).await;
    dev.stop().await;
    drop(redis);
    let m = result?;
    let total = writes(&m.counts);
    let status = status_writes(&m.counts);
    let per = |x: u64| {
        if n == 0 {
            0.0
        } else {
            (x as f64 / n as f64 * 100.0).round() / 100.0
        }
    };
    let breakdown: BTreeMap<String, u64> = m
        .counts
        .iter()
        .filter(|((verb, _, _), _)| is_write(verb))
        .map(|((verb, group, resource), n)| {
            let g = if group.is_empty() { "core" } else { group };
            (format!("{verb} {g}/{resource}"), *n)
        })
        .collect();
    let requests: u64 = m.counts.values().sum();
    let reconciles = m.reconciles;
    Ok(json!({
        "bench": "controller",
        "workflows": n,
        "reconcile_seconds": (m.took.as_secs_f64() * 1000.0).round() / 1000.0,
        "peak_rss_mb": mib(m.peak),
        "rss_mb_before_workflows": mib(m.before),
        "rss_mb_at_end": mib(m.end),
        "writes_per_workflow": per(total),
        "status_writes_per_workflow": per(status),
        "writes": breakdown,
        "requests_per_workflow": per(requests),
        "reconciles_per_workflow": per(reconciles),
        "deployments_per_workflow": DEPLOYMENTS_PER_WORKFLOW,
        "concurrent_creates": opts.concurrency,
        "measured": "the `r4 controller` process alone (its VmHWM after the last reconcile and a /metrics scrape); the API server is a child `r4 dev --no-controller --no-kubelet`; no kubelet, so no pods or engines; queue: a private redis-server (--redis)",
        "goal": {"reconcile_seconds": 10, "peak_rss_mb": 128},
        "within_goal": m.took < Duration::from_secs(10) && m.peak < 128 * 1024 * 1024,
    }))
}

struct Measured {
    took: Duration,
    /// The controller's RSS once it watches, before the first workflow.
    before: u64,
    /// Its peak over the whole run.
    peak: u64,
    /// Its RSS at the end.
    end: u64,
    counts: BTreeMap<RecordedCall, u64>,
    reconciles: u64,
}

/// AgentWorkflow reconciles in the controller's `/metrics` text.
pub fn workflow_reconciles(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with("r4_controller_reconciles_total{kind=\"AgentWorkflow\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The API requests in the controller's `/metrics` text
/// (`r4_controller_api_requests_total{group,resource,verb}`), by (verb, group, resource).
pub fn api_requests(metrics: &str) -> BTreeMap<RecordedCall, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("r4_controller_api_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(n) = value.trim().parse::<f64>() else {
            continue;
        };
        // Label values are Kubernetes names (no quotes or commas in them).
        let get = |k: &str| {
            labels.split(',').find_map(|kv| {
                let (key, v) = kv.split_once('=')?;
                (key == k).then(|| v.trim_matches('"').to_owned())
            })
        };
        if let (Some(verb), Some(group), Some(resource)) =
            (get("verb"), get("group"), get("resource"))
        {
            out.insert((verb, group, resource), n as u64);
        }
    }
    out
}

/// A free loopback address for the controller's metrics endpoint.
fn free_addr() -> Result<std::net::SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port for the controller's metrics: {e}"))
}

/// The controller's `/metrics` text at `addr`.
async fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    let url = format!("http://{addr}/metrics");
    tokio::time::timeout(Duration::from_secs(10), async {
        reqwest::get(&url).await?.text().await
    })
    .await
    .map_err(|_| format!("GET {url}: no answer within 10 s"))?
    .map_err(|e| format!("GET {url}: {}", e.without_url()))
}

/// `r4 controller` as a child process on the API of `dev` (killed when dropped).
struct ControllerChild {
    child: tokio::process::Child,
    pid: u32,
    metrics: std::net::SocketAddr,
}

impl ControllerChild {
    async fn start(exe: &std::path::Path, dev: &DevChild, redis: &str) -> Result<Self, String> {
        let metrics = free_addr()?;
        let child = tokio::process::Command::new(exe)
            .arg("controller")
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(["--identity", "r4-bench"])
            .arg("--redis")
            .arg(redis)
            .env("KUBECONFIG", &dev.kubeconfig)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {} controller: {e}", exe.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| "r4 controller ended at once".to_string())?;
        Ok(ControllerChild {
            child,
            pid,
            metrics,
        })
    }

    /// Its RSS now and at its peak, in bytes.
    fn rss(&self) -> (u64, u64) {
        rss_of(self.pid)
    }

    /// Wait (up to 30 s) until it watches AgentWorkflows, by its own request count.
    async fn watching(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let watch = (
            "watch".to_string(),
            "r4.dev".to_string(),
            "agentworkflows".to_string(),
        );
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("r4 controller ended ({status}) before watching"));
            }
            if let Ok(text) = scrape(self.metrics).await
                && api_requests(&text).get(&watch).is_some_and(|n| *n > 0)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the controller did not watch AgentWorkflows within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop it (SIGKILL: the figures are read) and reap it.
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

async fn measure(
    exe: &std::path::Path,
    dev: &DevChild,
    redis: &str,
    opts: &ControllerBenchOpts,
) -> Result<Measured, String> {
    let n = opts.workflows;
    let client = crate::devcluster::client(&dev.url).map_err(|e| format!("kube client: {e}"))?;
    create_crds(&client).await?;
    let policies: Api<CircuitPolicy> = Api::namespaced(client.clone(), "default");
    let policy: CircuitPolicy = serde_yaml::from_str(POLICY).map_err(|e| format!("policy: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        policies.create(&PostParams::default(), &policy),
    )
    .await
    .map_err(|_| "create the CircuitPolicy: no answer within 10 s".to_string())?
    .map_err(|e| format!("create the CircuitPolicy: {e}"))?;
    let workflows: Vec<AgentWorkflow> = (0..n)
        .map(|i| workflow(&format!("bench-{i}")))
        .collect::<Result<_, _>>()?;

    let mut controller = ControllerChild::start(exe, dev, redis).await?;
    let result = async {
        // The controller is watching workflows before the first one is created.
        controller.watching().await?;
        let (before, _) = controller.rss();

        // A watch of the workflows' statuses, from before the first create.
        let wf_api: Api<AgentWorkflow> = Api::namespaced(client.clone(), "default");
        // The workflows seen reconciled, and when the last of them was.
        let done = Arc::new(Mutex::new((HashSet::<String>::new(), None::<Instant>)));
        let (watch_ready_tx, watch_ready_rx) = tokio::sync::oneshot::channel::<()>();
        let watch = {
            let (done, api) = (done.clone(), wf_api.clone());
            tokio::spawn(async move {
                let mut ready = Some(watch_ready_tx);
                let mut stream = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(ev) = stream.next().await {
                    let Ok(ev) = ev else { continue };
                    let objs: Vec<AgentWorkflow> = match ev {
                        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                        watcher::Event::InitDone => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    for o in objs.iter().filter(|o| reconciled(o)) {
                        let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                        if d.0.insert(o.name_any()) {
                            d.1 = Some(Instant::now());
                        }
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(30), watch_ready_rx)
            .await
            .map_err(|_| "the bench's watch of AgentWorkflows did not start within 30 s")?
            .map_err(|_| "the bench's watch of AgentWorkflows ended")?;

        let started = Instant::now();
        let deadline = started + opts.deadline;
        futures::stream::iter(workflows)
            .map(|wf| {
                let api = wf_api.clone();
                async move {
                    let name = wf.name_any();
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        api.create(&PostParams::default(), &wf),
                    )
                    .await
                    .map_err(|_| format!("create workflow {name}: no answer within 30 s"))?
                    .map(|_| ())
                    .map_err(|e| format!("create workflow {name}: {e}"))
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        eprintln!(
            "r4 bench controller: {n} workflows created in {:.2} s",
            started.elapsed().as_secs_f64()
        );

        // Every status reconciled (seen by the watch), then every workflow's Deployments listed.
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let mut next_report = Instant::now() + Duration::from_secs(2);
        let took = loop {
            let (statuses, last) = {
                let d = done.lock().unwrap_or_else(|p| p.into_inner());
                (d.0.len(), d.1)
            };
            if statuses >= n {
                let mut per: BTreeMap<String, usize> = BTreeMap::new();
                let mut token: Option<String> = None;
                loop {
                    let mut lp = ListParams::default().labels(WORKFLOW_LABEL).limit(200);
                    if let Some(t) = &token {
                        lp = lp.continue_token(t);
                    }
                    let page =
                        tokio::time::timeout(Duration::from_secs(30), deploys.list_metadata(&lp))
                            .await
                            .map_err(|_| "list Deployments: no answer within 30 s".to_string())?
                            .map_err(|e| format!("list Deployments: {e}"))?;
                    for d in &page.items {
                        if let Some(w) = d
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(WORKFLOW_LABEL))
                        {
                            *per.entry(w.clone()).or_default() += 1;
                        }
                    }
                    token = page.metadata.continue_.filter(|t| !t.is_empty());
                    if token.is_none() {
                        break;
                    }
                }
                let complete = per
                    .values()
                    .filter(|c| **c >= DEPLOYMENTS_PER_WORKFLOW)
                    .count();
                if complete >= n {
                    // The status of a generation is written after its children are applied,
                    // so the last status seen is when the last workflow was complete.
                    break last
                        .unwrap_or_else(Instant::now)
                        .saturating_duration_since(started);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "only {statuses} of {n} workflows reconciled within {:?}",
                    opts.deadline
                ));
            }
            if now >= next_report {
                eprintln!(
                    "r4 bench controller: {statuses}/{n} reconciled after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                next_report = now + Duration::from_secs(2);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        watch.abort();
        // One scrape, as Prometheus would make: its cost is in the peak.
        let text = scrape(controller.metrics).await?;
        let (end, peak) = controller.rss();
        Ok(Measured {
            took,
            before,
            peak,
            end,
            counts: api_requests(&text),
            reconciles: workflow_reconciles(&text).unwrap_or(0),
        })
    }
    .await;
    controller.stop().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_by_verb_and_status_apart() {
        let mut c = BTreeMap::new();
        let k = |v: &str, g: &str, r: &str| (v.to_owned(), g.to_owned(), r.to_owned());
        c.insert(k("patch", "r4.dev", "agentworkflows/status"), 3);
        c.insert(k("patch", "apps", "deployments"), 4);
        c.insert(k("create", "events.k8s.io", "events"), 1);
        c.insert(k("list", "apps", "deployments"), 9);
        c.insert(k("watch", "r4.dev", "agentworkflows"), 2);
        c.insert(k("get", "r4.dev", "circuitpolicies"), 5);
        assert_eq!(writes(&c), 8);
        assert_eq!(status_writes(&c), 3);
    }

    #[test]
    fn reconciles_are_read_from_the_metrics_text() {
        let text = "# TYPE r4_controller_reconciles_total counter\n\
            r4_controller_reconciles_total{kind=\"AgentWorkflow\"} 4210\n\
            r4_controller_reconciles_total{kind=\"CircuitPolicy\"} 7\n";
        assert_eq!(workflow_reconciles(text), Some(4210));
        assert_eq!(workflow_reconciles("r4_controller_leader 1\n"), None);
    }

    #[test]
    fn a_workflow_is_reconciled_only_at_its_generation_and_revision_one() {
        let mut wf = workflow("w").expect("workflow");
        assert!(!reconciled(&wf));
        wf.metadata.generation = Some(2);
        wf.status = Some(crate::api::workflow::AgentWorkflowStatus {
            observed_generation: Some(1),
            current_revision: Some(1),
            ..Default::default()
        });
        assert!(!reconciled(&wf));
        if let Some(s) = wf.status.as_mut() {
            s.observed_generation = Some(2);
        }
        assert!(reconciled(&wf));
        if let Some(s) = wf.status.as_mut() {
            s.current_revision = Some(2);
        }
        assert!(!reconciled(&wf));
    }

    /// What the controller counts at the wire reaches the bench unchanged: requests made
    /// through the recording layer, exported on `/metrics`, parsed back.
    #[tokio::test]
    async fn api_requests_round_trip_through_the_controllers_metrics() {
        use tower::{Layer, Service, ServiceExt};
        let (layer, recorder) = crate::controller::rbac::RecordingLayer::new();
        let mut svc = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(())
        }));
        for (method, uri) in [
            (
                "PATCH",
                "/apis/r4.dev/v1alpha1/namespaces/default/agentworkflows/w/status",
            ),
            (
                "PATCH",
                "/apis/r4.dev/v1alpha1/namespaces/default/agentworkflows/w/status",
            ),
            ("GET", "/apis/r4.dev/v1alpha1/agentworkflows?watch=true"),
            ("POST", "/api/v1/namespaces/default/events"),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .expect("request");
            svc.ready().await.expect("ready");
            svc.call(req).await.expect("call");
        }
        let metrics = crate::controller::metrics::ControllerMetrics::new();
        assert!(
            api_requests(&metrics.render()).is_empty(),
            "no recorder, no series"
        );
        metrics.count_requests(recorder.clone());
        let counted = api_requests(&metrics.render());
        assert_eq!(counted, recorder.counts());
        assert_eq!(status_writes(&counted), 2);
        assert_eq!(writes(&counted), 3);
        assert_eq!(
            counted.get(&("watch".into(), "r4.dev".into(), "agentworkflows".into())),
            Some(&1)
        );
    }
}
