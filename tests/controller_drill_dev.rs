//! The drill controller end to end on `r4 dev`'s API, as a user meets it: kubectl 1.32 applies a
//! workflow and a short ChaosDrill (a ToolOutage and a PodKill), the local kubelet runs the
//! engines on a real redis-server, the controller reaches the API only through a kube `Client`.
//!
//! One scenario, in steps (each run takes seconds; one setup keeps the suite short): the drill
//! goes Running → Succeeded/Failed with its figures in `status.runs[0]`, Events at start and end,
//! the killed pod replaced by the kubelet (a new pod uid for the Deployment), the workflow's
//! `status.drills`; `r4 drill run --wait` and `r4 drill history`; `r4 drill abort` and
//! `suspend: true` mid-run abort it with the faults gone from Redis at once; a controller
//! stopped mid-run and started again records the run Aborted ("controller restarted") and
//! clears its faults. A drill against a workflow of another namespace is `Valid=False`.

mod support;

use support::{eventually, kubectl_present};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use r4::api::drill::{ChaosDrill, DrillPhase};
use r4::api::workflow::AgentWorkflow;
use r4::controller::context::{Options, QueueSource};
use r4::controller::run::{RunOptions, run};
use r4::devcluster::kubelet::{self, KubeletOptions};
use r4::devcluster::{Handle, Options as DevOptions, kubeconfig, start};
use r4::queue::redis::RedisQueue;
use r4::queue::{Keys, Queue};
use r4::testutil::RedisServer;
use tokio::sync::watch;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

struct Dev {
    _handle: Handle,
    _redis: RedisServer,
    url: String,
    client: Client,
    queue: Arc<dyn Queue>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
    controller_stop: watch::Sender<bool>,
    controller: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.controller_stop.send(true);
    }
}

fn controller_options(queue: Arc<dyn Queue>) -> RunOptions {
    RunOptions {
        controller: Options {
            queue: QueueSource::Shared(queue),
            stats_interval: Duration::from_secs(1),
            ..Options::default()
        },
        metrics_listen: None,
        leader: None,
    }
}

async fn dev() -> Dev {
    let redis = RedisServer::start().await.expect("redis-server");
    let handle = start("127.0.0.1:0".parse().expect("addr"), DevOptions::default())
        .await
        .expect("start the dev API");
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    kubeconfig::write(&kc, handle.addr).expect("kubeconfig");
    let client = r4::devcluster::client(&handle.url()).expect("client");
    let queue: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&redis.url()).await.expect("redis"));
    let (stop, stopped) = watch::channel(false);
    let kopts = KubeletOptions {
        ready_delay: Duration::from_millis(100),
        ..KubeletOptions::default()
    };
    tokio::spawn(kubelet::run_on(
        client.clone(),
        kopts,
        queue.clone(),
        stopped,
    ));
    let (controller_stop, controller_stopped) = watch::channel(false);
    let controller = tokio::spawn(run(
        client.clone(),
        controller_options(queue.clone()),
        controller_stopped,
    ));
    let d = Dev {
        url: redis.url(),
        _handle: handle,
        _redis: redis,
        client,
        queue,
        kubeconfig: kc,
        _dir: dir,
        stop,
        controller_stop,
        controller: Some(controller),
    };
    d.kubectl(&["apply", "-f", "crds/"], None);
    d
}

impl Dev {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        support::kubectl(&self.kubeconfig, args, stdin)
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    fn patch_drill(&self, name: &str, patch: &str) {
        self.kubectl(
            &["patch", "drill", name, "--type", "merge", "-p", patch],
            None,
        );
    }

    /// `r4 ARGS` in a blocking thread (the runtime keeps serving the API meanwhile).
    async fn r4(&self, args: &[&str]) -> std::process::Output {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let kc = self.kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_r4"))
                .args(&args)
                .env("KUBECONFIG", kc)
                .current_dir(REPO)
                .output()
                .expect("r4")
        })
        .await
        .expect("r4 thread")
    }

    fn drills(&self) -> Api<ChaosDrill> {
        Api::namespaced(self.client.clone(), "default")
    }

    async fn drill(&self, name: &str) -> ChaosDrill {
        self.drills().get(name).await.expect("drill")
    }

    /// Stop the controller and start another (a restart, the kubelet and engines untouched).
    async fn restart_controller(&mut self) {
        let _ = self.controller_stop.send(true);
        if let Some(c) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), c).await;
        }
        let (controller_stop, stopped) = watch::channel(false);
        self.controller_stop = controller_stop;
        self.controller = Some(tokio::spawn(run(
            self.client.clone(),
            controller_options(self.queue.clone()),
            stopped,
        )));
    }
}

/// The controller fixture with a simulated tool the solver calls, its Redis URL the test's.
fn workflow(redis_url: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join("tests/fixtures/controller-triage.yaml"))
        .expect("fixture")
        .replace("redis://127.0.0.1:6379/0", redis_url)
        .replace(
            "  policyRef: triage-policy\n",
            "  policyRef: triage-policy\n  tools:\n    - name: kb\n      url: http://kb.tools:8080/\n      simulate: {latency: {medianMs: 2, p99Ms: 5}}\n",
        )
        .replace(
            "      consumes: sorted\n",
            "      consumes: sorted\n      tools: [kb]\n",
        )
        .replace(
            "      simulate:\n        latency: {medianMs: 2, p99Ms: 5}\n  rollout:",
            "      simulate:\n        latency: {medianMs: 2, p99Ms: 5}\n        calls: [kb]\n  rollout:",
        )
}

/// A short drill: 2 s of baseline, 8 s of faults (the tool down throughout, one solver pod
/// killed 2 s in), recovery expected within 20 s.
const DRILL: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: ChaosDrill
metadata:
  name: kb-outage
spec:
  workflowRef: triage
  baseline: 2s
  duration: 8s
  faults:
    - {type: ToolOutage, tool: kb}
    - {type: PodKill, agent: solver, after: 2s, count: 1}
  expect: {maxRecoverySeconds: 20, maxLostTasks: 0, maxDuplicateEffects: 0}
"#;

fn describe(d: &ChaosDrill) -> String {
    serde_json::to_string(&d.status).unwrap_or_default()
}

fn phase(d: &ChaosDrill) -> Option<DrillPhase> {
    d.status.as_ref().and_then(|s| s.phase)
}

fn runs(d: &ChaosDrill) -> usize {
    d.status.as_ref().map_or(0, |s| s.runs.len())
}

/// Wait until the drill has `n` runs recorded and is no longer Running.
async fn until_runs(dev: &Dev, name: &str, n: usize, secs: u64) -> ChaosDrill {
    eventually(secs, &format!("{name}: {n} runs recorded"), || async {
        let d = dev.drills().get(name).await.map_err(|e| e.to_string())?;
        if runs(&d) >= n && phase(&d) != Some(DrillPhase::Running) {
            Ok(d)
        } else {
            Err(describe(&d))
        }
    })
    .await
}

async fn until_running(dev: &Dev, name: &str) {
    eventually(20, &format!("{name} Running"), || async {
        let d = dev.drills().get(name).await.map_err(|e| e.to_string())?;
        if phase(&d) == Some(DrillPhase::Running) {
            Ok(())
        } else {
            Err(describe(&d))
        }
    })
    .await;
}

async fn until_faults(dev: &Dev, keys: &Keys, present: bool, secs: u64) -> Duration {
    let started = Instant::now();
    eventually(secs, &format!("faults present={present}"), || async {
        let active = r4::engine::faults::active(dev.queue.as_ref(), keys)
            .await
            .map_err(|e| e.to_string())?;
        if active.is_empty() != present {
            Ok(())
        } else {
            Err(format!("{active:?}"))
        }
    })
    .await;
    started.elapsed()
}

async fn solver_pods(client: &Client) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut uids: Vec<String> = pods
        .list(&ListParams::default().labels("r4.dev/workflow=triage,r4.dev/agent=solver"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.uid)
        .collect();
    uids.sort();
    uids
}

async fn events(client: &Client, reason: &str) -> Vec<String> {
    let ev: Api<Event> = Api::namespaced(client.clone(), "default");
    ev.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.message.unwrap_or_default())
        .collect()
}

/// Tasks on the workflow's entry stream, `per_sec` a second, until `stop`.
fn feed(q: Arc<dyn Queue>, keys: Keys, per_sec: u64, stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut n = 0u64;
        let every = Duration::from_millis(1000 / per_sec.max(1));
        while !*stop.borrow() {
            n += 1;
            let t = r4::engine::task::Task::new(format!("t-{n}"), serde_json::json!({"n": n}));
            let _ = q.add(&keys.stream("tickets"), t.encode(), None).await;
            tokio::time::sleep(every).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drill_runs_kills_a_pod_records_its_figures_and_aborts_on_request_suspend_and_restart() {
    if !kubectl_present() {
        return;
    }
    let mut dev = dev().await;
    dev.apply(&workflow(&dev.url));
    let wfs: Api<AgentWorkflow> = Api::namespaced(dev.client.clone(), "default");
    eventually(60, "triage Ready", || async {
        let wf = wfs.get("triage").await.map_err(|e| e.to_string())?;
        let ready = wf.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            Ok(())
        } else {
            Err(serde_json::to_string(&wf.status).unwrap_or_default())
        }
    })
    .await;
    let keys = Keys::new("default", "triage");
    let (stop_feed, feeding) = watch::channel(false);
    feed(dev.queue.clone(), keys.clone(), 20, feeding);
    let pods_before = solver_pods(&dev.client).await;
    assert_eq!(pods_before.len(), 1, "{pods_before:?}");

    // 1. One run: Running, then a verdict with the figures.
    let started = Instant::now();
    dev.apply(DRILL);
    until_running(&dev, "kb-outage").await;
    let d = until_runs(&dev, "kb-outage", 1, 90).await;
    eprintln!(
        "run 1 recorded {:.1}s after the apply: {}",
        started.elapsed().as_secs_f64(),
        describe(&d)
    );
    let status = d.status.clone().expect("status");
    let run = &status.runs[0];
    let verdict = run.verdict.clone().expect("verdict");
    assert!(
        verdict == "Passed" || verdict == "Failed",
        "{}",
        describe(&d)
    );
    assert!(run.finished_at.is_some());
    assert!(run.tasks_processed > 0, "{}", describe(&d));
    assert_eq!(run.tasks_lost, 0, "{}", describe(&d));
    assert_eq!(run.duplicate_effects, 0, "{}", describe(&d));
    assert!(run.score.is_some_and(|s| (0.0..=100.0).contains(&s)));
    assert_eq!(status.last_verdict.as_deref(), Some(verdict.as_str()));
    assert_eq!(
        status.phase,
        Some(if verdict == "Passed" {
            DrillPhase::Succeeded
        } else {
            DrillPhase::Failed
        })
    );
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "LastRunPassed")
        .expect("LastRunPassed condition");
    assert_eq!(cond.reason, verdict);
    assert!(cond.message.contains("lost"), "{}", cond.message);
    // The killed pod was replaced by the kubelet.
    let pods_after = eventually(20, "a new solver pod", || async {
        let now = solver_pods(&dev.client).await;
        if now.len() == 1 && now != pods_before {
            Ok(now)
        } else {
            Err(format!("{now:?} (before: {pods_before:?})"))
        }
    })
    .await;
    eprintln!("solver pod {pods_before:?} replaced by {pods_after:?}");
    assert_eq!(events(&dev.client, "DrillStarted").await.len(), 1);
    let ended = events(&dev.client, &format!("Drill{verdict}")).await;
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert!(ended[0].contains("0 lost"), "{ended:?}");
    // The workflow's drill record.
    let record = eventually(20, "the workflow's drill record", || async {
        let wf = wfs.get("triage").await.map_err(|e| e.to_string())?;
        match wf.status.and_then(|s| s.drills) {
            Some(r) if r.last_verdict.is_some() => Ok(r),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(record.last_verdict.as_deref(), Some(verdict.as_str()));
    assert_eq!(record.last_drill.as_deref(), Some("kb-outage"));
    assert_eq!(record.failure_modes_90d, 2);
    // A one-shot drill does not run again by itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs(&dev.drill("kb-outage").await), 1);

    // 2. `r4 drill run --wait`, then `r4 drill history`.
    let out = dev.r4(&["drill", "run", "kb-outage", "--wait=90s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "r4 drill run --wait:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("run of chaosdrill default/kb-outage requested"));
    assert!(stdout.contains("lost"), "{stdout}");
    assert_eq!(runs(&dev.drill("kb-outage").await), 2);
    let out = dev.r4(&["drill", "history", "kb-outage"]).await;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("r4 drill history:\n{table}");
    assert!(out.status.success());
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.starts_with("STARTED"));
    let out = dev.r4(&["drill", "history", "kb-outage", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history --json");
    assert_eq!(json.as_array().map(Vec::len), Some(2));

    // 3. `r4 drill abort` mid-run: Aborted "aborted by request", faults gone at once.
    let out = dev.r4(&["drill", "run", "kb-outage"]).await;
    assert!(out.status.success(), "{out:?}");
    until_running(&dev, "kb-outage").await;
    until_faults(&dev, &keys, true, 10).await;
    let out = dev.r4(&["drill", "run", "kb-outage"]).await;
    assert_eq!(out.status.code(), Some(2), "a second run is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a run is in progress"));
    let out = dev.r4(&["drill", "abort", "kb-outage"]).await;
    assert!(out.status.success(), "{out:?}");
    let gone = until_faults(&dev, &keys, false, 3).await;
    eprintln!(
        "abort: faults gone {} ms after the request",
        gone.as_millis()
    );
    let d = until_runs(&dev, "kb-outage", 3, 20).await;
    let last = d.status.as_ref().and_then(|s| s.runs.last()).expect("run");
    assert_eq!(last.verdict.as_deref(), Some("Aborted"), "{}", describe(&d));
    assert_eq!(phase(&d), Some(DrillPhase::Aborted));
    assert!(
        last.aborted_because
            .as_deref()
            .is_some_and(|r| r.contains("aborted by request")),
        "{}",
        describe(&d)
    );

    // 4. A controller stopped mid-run: the next one records the run interrupted and clears
    //    its faults (before their TTL).
    dev.r4(&["drill", "run", "kb-outage"]).await;
    until_running(&dev, "kb-outage").await;
    until_faults(&dev, &keys, true, 10).await;
    dev.restart_controller().await;
    let d = until_runs(&dev, "kb-outage", 4, 30).await;
    let last = d.status.as_ref().and_then(|s| s.runs.last()).expect("run");
    assert_eq!(
        last.aborted_because.as_deref(),
        Some("controller restarted"),
        "{}",
        describe(&d)
    );
    until_faults(&dev, &keys, false, 3).await;

    // 5. `suspend: true` mid-run: Aborted at once, faults gone; nothing starts while suspended.
    dev.r4(&["drill", "run", "kb-outage"]).await;
    until_running(&dev, "kb-outage").await;
    until_faults(&dev, &keys, true, 10).await;
    dev.patch_drill("kb-outage", r#"{"spec":{"suspend":true}}"#);
    let gone = until_faults(&dev, &keys, false, 3).await;
    eprintln!(
        "suspend: faults gone {} ms after the patch",
        gone.as_millis()
    );
    let d = until_runs(&dev, "kb-outage", 5, 20).await;
    let last = d.status.as_ref().and_then(|s| s.runs.last()).expect("run");
    assert_eq!(
        last.aborted_because.as_deref(),
        Some("suspended"),
        "{}",
        describe(&d)
    );
    assert!(events(&dev.client, "DrillAborted").await.len() >= 2);
    let out = dev.r4(&["drill", "run", "kb-outage"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("suspended"));
    let _ = stop_feed.send(true);

    // 6. A drill can only target its own namespace.
    dev.kubectl(&["create", "namespace", "other"], None);
    dev.kubectl(
        &["apply", "-n", "other", "-f", "-"],
        Some(&DRILL.replace("kb-outage", "elsewhere")),
    );
    let other: Api<ChaosDrill> = Api::namespaced(dev.client.clone(), "other");
    eventually(20, "Valid=False naming spec.workflowRef", || async {
        let d = other.get("elsewhere").await.map_err(|e| e.to_string())?;
        let c = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Valid").cloned());
        match c {
            Some(c) if c.status == "False" && c.message.starts_with("spec.workflowRef") => Ok(()),
            _ => Err(describe(&d)),
        }
    })
    .await;
    assert_eq!(runs(&other.get("elsewhere").await.expect("drill")), 0);
}
