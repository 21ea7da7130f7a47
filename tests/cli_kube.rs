//! `r4 kill` / `r4 resume` / `r4 rollback` / `r4 status` as a user runs them (the real binary)
//! against the local API server `r4 dev` serves, reached through a kubeconfig. Each test has
//! its own API server with the CRDs of crds/; the test plays the controller where one is
//! needed, writing the status through the status subresource.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use r4::api::workflow::AgentWorkflow;
use r4::devcluster::{Handle, Options, kubeconfig, start};
use serde_json::{Value, json};

struct Cluster {
    rt: tokio::runtime::Runtime,
    _handle: Handle,
    client: Client,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let handle = rt
            .block_on(start(
                "127.0.0.1:0".parse().expect("addr"),
                Options::default(),
            ))
            .expect("start the dev API");
        let dir = tempfile::tempdir().expect("tempdir");
        kubeconfig::write(&dir.path().join("kubeconfig"), handle.addr).expect("kubeconfig");
        let client = {
            let _guard = rt.enter();
            r4::devcluster::client(&handle.url()).expect("client")
        };
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let dir_crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for entry in std::fs::read_dir(dir_crds).expect("crds/") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
            let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD");
            rt.block_on(crds.create(&PostParams::default(), &crd))
                .expect("create CRD");
        }
        Cluster {
            rt,
            _handle: handle,
            client,
            dir,
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_r4"));
        c.args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .env_remove("R4_REDIS_URL")
            .stdin(Stdio::null());
        c
    }

    fn r4(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run r4")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn r4")
    }

    fn workflows(&self, ns: &str) -> Api<AgentWorkflow> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn create(&self, ns: &str, yaml: &str) {
        let aw: AgentWorkflow = serde_yaml::from_str(yaml).expect("workflow");
        self.rt
            .block_on(self.workflows(ns).create(&PostParams::default(), &aw))
            .expect("create workflow");
    }

    fn get(&self, ns: &str, name: &str) -> AgentWorkflow {
        self.rt
            .block_on(self.workflows(ns).get(name))
            .expect("get workflow")
    }

    fn json(&self, name: &str) -> Value {
        serde_json::to_value(self.get("default", name)).expect("json")
    }

    /// What the controller would write.
    fn set_status(&self, name: &str, status: Value) {
        self.rt
            .block_on(self.workflows("default").patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            ))
            .expect("patch status");
    }

    fn patch_spec(&self, name: &str, patch: Value) {
        self.rt
            .block_on(self.workflows("default").patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": patch })),
            ))
            .expect("patch spec");
    }

    /// Poll the workflow until `f` holds (a deadline, never a fixed sleep).
    fn until(&self, name: &str, what: &str, f: impl Fn(&AgentWorkflow) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(&self.get("default", name)) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn workflow(name: &str, redis: &str) -> String {
    format!(
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: {name}}}
spec:
  queue: {{redis: {redis}}}
  tools:
    - {{name: bank-api, url: "http://bank.tools/mcp"}}
    - {{name: ledger, url: "http://ledger.tools/v1"}}
  agents:
    - {{name: intake, image: i, replicas: 2, consumes: tickets, produces: [investigations]}}
    - {{name: investigation, image: i, replicas: 3, consumes: investigations, produces: [resolutions], tools: [bank-api]}}
    - {{name: resolution, image: i, consumes: resolutions, tools: [ledger]}}
  killSwitches: {{all: false, agents: {{resolution: true}}}}
  slo: {{successRate: 0.995, p95LatencyMs: 1500}}
"#
    )
}

const NO_REDIS: &str = r#"{url: "redis://127.0.0.1:1/0"}"#;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "should succeed: {}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Failed, and said why in one line on stderr containing each of `says`.
fn refused(o: &Output, says: &[&str]) {
    assert!(!o.status.success(), "should fail: {}", text(o));
    let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    for s in says {
        assert!(err.contains(s), "{err:?} should say {s:?}");
    }
}

fn resource_version(c: &Cluster, name: &str) -> Option<String> {
    c.get("default", name).metadata.resource_version
}

/// Wait for a child with a deadline; its output.
fn finish(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("r4 did not return within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn switches(c: &Cluster, name: &str) -> Value {
    c.json(name)["spec"]["killSwitches"].clone()
}

#[test]
fn kill_and_resume_patch_exactly_one_switch() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    let before = c.json("pay");

    let out = ok(&c.r4(&["kill", "pay/investigation"]));
    assert_eq!(
        out.trim(),
        "kill switch investigation engaged on default/pay"
    );
    let after = c.json("pay");
    assert_eq!(
        after["spec"]["killSwitches"],
        json!({"all": false, "agents": {"investigation": true, "resolution": true}})
    );
    // Nothing else of the spec moved.
    let (mut a, mut b) = (after["spec"].clone(), before["spec"].clone());
    a["killSwitches"] = Value::Null;
    b["killSwitches"] = Value::Null;
    assert_eq!(a, b);
    // The change is the CLI's, under its own field manager.
    let managers: Vec<&str> = after["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(managers.contains(&"r4-cli"), "{managers:?}");

    let kc = c.kubeconfig();
    let kc = kc.to_str().expect("path");
    let out = ok(&c.r4(&["kill", "pay/tool:ledger", "--kubeconfig", kc]));
    assert_eq!(out.trim(), "kill switch tool:ledger engaged on default/pay");
    let out = ok(&c.r4(&["resume", "pay/resolution", "--context", "r4-dev"]));
    assert_eq!(out.trim(), "kill switch resolution released on default/pay");
    let out = ok(&c.r4(&["kill", "pay", "-n", "default"]));
    assert_eq!(out.trim(), "kill switch all engaged on default/pay");
    assert_eq!(
        switches(&c, "pay"),
        json!({"all": true, "agents": {"investigation": true, "resolution": false}, "tools": {"ledger": true}})
    );

    // Already in the requested state: said, exit 0, nothing written.
    let rv = resource_version(&c, "pay");
    let out = ok(&c.r4(&["kill", "pay/investigation"]));
    assert_eq!(
        out.trim(),
        "kill switch investigation already engaged on default/pay"
    );
    let out = ok(&c.r4(&["resume", "pay/tool:bank-api"]));
    assert_eq!(
        out.trim(),
        "kill switch tool:bank-api already released on default/pay"
    );
    assert_eq!(resource_version(&c, "pay"), rv);

    // The namespace of the kubeconfig's context is the default one.
    let team = c.dir.path().join("team");
    let text = std::fs::read_to_string(c.kubeconfig())
        .expect("kubeconfig")
        .replace("namespace: default", "namespace: team");
    std::fs::write(&team, text).expect("write");
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": "team"}})).expect("namespace");
    c.rt.block_on(Api::all(c.client.clone()).create(&PostParams::default(), &ns))
        .expect("create namespace");
    c.create(
        "team",
        &workflow("pay", NO_REDIS).replace("{name: pay}", "{name: pay, namespace: team}"),
    );
    let out = ok(&c.r4(&[
        "kill",
        "pay/intake",
        "--kubeconfig",
        team.to_str().expect("path"),
    ]));
    assert_eq!(out.trim(), "kill switch intake engaged on team/pay");
    assert_eq!(
        c.get("team", "pay").spec.kill_switches.map(|k| k.agents),
        Some([("intake".to_owned(), true), ("resolution".to_owned(), true)].into())
    );
    assert_eq!(
        c.get("default", "pay")
            .spec
            .kill_switches
            .and_then(|k| k.agents.get("intake").copied()),
        None
    );
}

#[test]
fn bad_targets_missing_workflows_and_unreachable_apis_are_one_line() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    let rv = resource_version(&c, "pay");

    refused(
        &c.r4(&["kill", "pay/investigator"]),
        &[
            "unknown agent \"investigator\" in workflow default/pay (agents: intake, investigation, resolution)",
        ],
    );
    refused(
        &c.r4(&["resume", "pay/tool:vault"]),
        &["unknown tool \"vault\" in workflow default/pay (tools: bank-api, ledger)"],
    );
    refused(&c.r4(&["kill", "pay/"]), &["bad target \"pay/\""]);
    assert_eq!(resource_version(&c, "pay"), rv, "nothing written");

    for args in [
        vec!["kill", "claims"],
        vec!["status", "claims"],
        vec!["rollback", "claims"],
    ] {
        refused(
            &c.r4(&args),
            &["default/claims not found", "kubectl get aw -A"],
        );
    }
    refused(
        &c.r4(&["kill", "pay/intake", "-n", "other"]),
        &["other/pay not found"],
    );
    refused(
        &c.r4(&["kill", "pay", "-f", "pay.yaml"]),
        &["-f applies only with --redis"],
    );
    refused(
        &c.r4(&["kill", "pay", "--redis", "redis://127.0.0.1:1", "--wait"]),
        &["--wait", "--redis"],
    );
    refused(&c.r4(&["kill", "pay", "--wait=0s"]), &["--wait"]);
    refused(
        &c.r4(&["kill", "pay", "--context", "prod"]),
        &["context \"prod\" does not exist"],
    );
    refused(
        &c.r4(&["status", "pay", "--kubeconfig", "/nonexistent/kubeconfig"]),
        &["--kubeconfig /nonexistent/kubeconfig"],
    );

    // An API nobody answers: one line naming it, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let dead = c.dir.path().join("dead");
    kubeconfig::write(&dead, port).expect("kubeconfig");
    let dead = dead.to_str().expect("path");
    for cmd in ["kill", "rollback", "status"] {
        let started = Instant::now();
        refused(
            &c.r4(&[cmd, "pay", "--kubeconfig", dead]),
            &[&format!(
                "cannot reach the Kubernetes API at http://{port}/"
            )],
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Two contexts: the current one is the dead API, --context picks the live one.
    let live = std::fs::read_to_string(c.kubeconfig()).expect("kubeconfig");
    let both = live
        .replace(
            "clusters:\n",
            &format!("clusters:\n- name: dead\n  cluster:\n    server: http://{port}\n"),
        )
        .replace(
            "contexts:\n",
            "contexts:\n- name: dead\n  context:\n    cluster: dead\n    user: r4-dev\n",
        )
        .replace("current-context: r4-dev", "current-context: dead");
    let two = c.dir.path().join("two");
    std::fs::write(&two, both).expect("write");
    let two = two.to_str().expect("path");
    refused(
        &c.r4(&["status", "pay", "--kubeconfig", two]),
        &[&format!(
            "cannot reach the Kubernetes API at http://{port}/"
        )],
    );
    let out = ok(&c.r4(&["status", "pay", "--kubeconfig", two, "--context", "r4-dev"]));
    assert!(out.contains("AgentWorkflow default/pay"), "{out}");

    // No kubeconfig anywhere: r4 kill says how to go without one.
    let o = c
        .cmd(&["kill", "pay"])
        .env("KUBECONFIG", c.dir.path().join("missing"))
        .output()
        .expect("run");
    refused(&o, &["--kubeconfig", "--redis"]);

    for cmd in ["kill", "resume", "rollback", "status"] {
        let out = ok(&c.r4(&[cmd, "--help"]));
        assert!(
            out.contains("--kubeconfig") && out.contains("--namespace"),
            "{out}"
        );
    }
}

fn ack(engaged: bool, version: i64, acknowledged: i32, expected: i32) -> Value {
    json!({"engaged": engaged, "since": "2026-11-29T15:00:00Z", "stateVersion": version,
           "acknowledged": acknowledged, "expected": expected})
}

#[test]
fn wait_returns_once_every_engine_acknowledged() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    let child = c.spawn(&["kill", "pay/investigation", "--wait=20s"]);
    // The controller's part: see the patch, propagate, count the acknowledgements.
    c.until("pay", "the patch", |aw| {
        aw.spec
            .kill_switches
            .as_ref()
            .is_some_and(|k| k.agents.get("investigation") == Some(&true))
    });
    c.set_status(
        "pay",
        json!({"killSwitches": {"investigation": ack(true, 5, 1, 3)}}),
    );
    // 1 of 3 is not enough: several polls later it is still waiting.
    let mut child = child;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "returned before 3/3"
    );
    c.set_status(
        "pay",
        json!({"killSwitches": {"investigation": ack(true, 5, 3, 3)}}),
    );
    let o = finish(child, Duration::from_secs(10));
    let out = ok(&o);
    assert!(
        out.contains("kill switch investigation engaged on default/pay"),
        "{out}"
    );
    assert!(
        out.contains("kill switch investigation on default/pay acknowledged by 3/3 engines in "),
        "{out}"
    );

    // Resume: the released state, acknowledged.
    let child = c.spawn(&["resume", "pay/investigation", "--wait=20s"]);
    c.until("pay", "the release", |aw| {
        aw.spec
            .kill_switches
            .as_ref()
            .is_some_and(|k| k.agents.get("investigation") == Some(&false))
    });
    c.set_status(
        "pay",
        json!({"killSwitches": {"investigation": ack(false, 6, 3, 3)}}),
    );
    let out = ok(&finish(child, Duration::from_secs(10)));
    assert!(out.contains("acknowledged by 3/3 engines"), "{out}");
}

#[test]
fn wait_gives_up_at_the_deadline_saying_what_the_status_says() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    // No controller at all.
    let started = Instant::now();
    let o = c.r4(&["kill", "pay/investigation", "--wait=1s"]);
    let took = started.elapsed();
    refused(
        &o,
        &[
            "kill switch investigation on default/pay not acknowledged within 1s: status says no entry for it yet",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The patch itself was made, and said.
    assert!(String::from_utf8_lossy(&o.stdout).contains("engaged on default/pay"));

    // A stale status (engaged, 3/3, from before the last release) is not this change's answer.
    c.patch_spec(
        "pay",
        json!({"killSwitches": {"agents": {"investigation": false}}}),
    );
    c.set_status(
        "pay",
        json!({"killSwitches": {"investigation": ack(true, 4, 3, 3)}}),
    );
    let o = c.r4(&["kill", "pay/investigation", "--wait=1s"]);
    refused(
        &o,
        &[
            "not acknowledged within 1s",
            "engaged",
            "acknowledged by 3/3 engines (state version 4)",
        ],
    );

    // Part of the engines: still waiting at the deadline.
    c.set_status(
        "pay",
        json!({"killSwitches": {"resolution": ack(true, 7, 2, 3)}}),
    );
    let o = c.r4(&["kill", "pay/resolution", "--wait=1s"]);
    refused(&o, &["acknowledged by 2/3 engines"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("already engaged"));
}

fn revisions(current: i64, revs: &[(i64, &str)]) -> Value {
    json!({
        "currentRevision": current,
        "revisions": revs.iter().map(|(n, p)| json!({"revision": n, "phase": p})).collect::<Vec<_>>(),
    })
}

fn rollback_to(c: &Cluster, name: &str) -> Option<i64> {
    c.get("default", name).spec.rollback_to.map(|r| r.revision)
}

#[test]
fn rollback_patches_the_previous_healthy_revision() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    refused(
        &c.r4(&["rollback", "pay"]),
        &["default/pay has no revisions yet"],
    );
    c.set_status(
        "pay",
        revisions(3, &[(3, "Failed"), (2, "Healthy"), (1, "Healthy")]),
    );

    let out = ok(&c.r4(&["rollback", "pay"]));
    assert_eq!(
        out.trim(),
        "rollback of default/pay to revision 2 requested (current: 3)"
    );
    assert_eq!(rollback_to(&c, "pay"), Some(2));
    let rv = resource_version(&c, "pay");
    refused(
        &c.r4(&["rollback", "pay", "--to", "9"]),
        &[
            "revision 9 is not a revision of default/pay (revisions: 3 Failed, 2 Healthy, 1 Healthy)",
        ],
    );
    refused(&c.r4(&["rollback", "pay", "--to", "0"]), &["--to"]);
    assert_eq!(resource_version(&c, "pay"), rv);
    let out = ok(&c.r4(&["rollback", "pay", "--to", "1"]));
    assert!(
        out.contains(
            "to revision 1 requested (current: 3; replaces the pending request for revision 2)"
        ),
        "{out}"
    );
    assert_eq!(rollback_to(&c, "pay"), Some(1));
    // Back to the current revision: replaces the pending request (how a mistake is undone).
    let out = ok(&c.r4(&["rollback", "pay", "--to", "3"]));
    assert_eq!(
        out.trim(),
        "rollback of default/pay to revision 3 requested (current: 3; replaces the pending request for revision 1)"
    );
    assert_eq!(rollback_to(&c, "pay"), Some(3));
    let rv = resource_version(&c, "pay");
    let out = ok(&c.r4(&["rollback", "pay", "--to", "3"]));
    assert_eq!(out.trim(), "default/pay is already at revision 3");
    assert_eq!(resource_version(&c, "pay"), rv);

    // No Healthy revision before the current one.
    c.create("default", &workflow("solo", NO_REDIS));
    c.set_status("solo", revisions(2, &[(2, "Healthy"), (1, "Failed")]));
    refused(
        &c.r4(&["rollback", "solo"]),
        &[
            "no Healthy revision of default/solo older than the current 2 (revisions: 2 Healthy, 1 Failed)",
        ],
    );
    assert_eq!(rollback_to(&c, "solo"), None);
}

#[test]
fn rollback_waits_for_the_controller_to_apply_it() {
    let c = Cluster::start();
    c.create("default", &workflow("pay", NO_REDIS));
    c.set_status(
        "pay",
        revisions(3, &[(3, "Failed"), (2, "Healthy"), (1, "Healthy")]),
    );
    let child = c.spawn(&["rollback", "pay", "--wait"]);
    c.until("pay", "the rollback request", |aw| {
        aw.spec.rollback_to.as_ref().map(|r| r.revision) == Some(2)
    });
    // The controller applies revision 2, then drops the request.
    c.set_status("pay", json!({"currentRevision": 2}));
    c.patch_spec("pay", json!({"rollbackTo": null}));
    let out = ok(&finish(child, Duration::from_secs(10)));
    assert!(
        out.contains("default/pay rolled back to revision 2 in "),
        "{out}"
    );

    // Nobody applies it: exit 1 at the deadline, saying where it stands.
    let o = c.r4(&["rollback", "pay", "--to", "1", "--wait=1s"]);
    refused(
        &o,
        &[
            "rollback of default/pay to revision 1 not done within 1s: current revision 2, spec.rollbackTo still set",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
}

fn full_status() -> Value {
    let cond = |t: &str, s: &str, r: &str, m: &str| {
        json!({"type": t, "status": s, "reason": r, "message": m,
               "lastTransitionTime": "2026-11-29T15:00:00Z"})
    };
    json!({
        "observedGeneration": 1,
        "conditions": [
            cond("Progressing", "False", "Stable", ""),
            cond("Degraded", "True", "ToolDown", "bank-api breaker open"),
            cond("Ready", "False", "AgentsNotReady", "investigation: 1/3 ready"),
            cond("Valid", "True", "Valid", "spec is valid"),
        ],
        "currentRevision": 3,
        "revisions": [
            {"revision": 3, "hash": "c0ffee", "phase": "Healthy"},
            {"revision": 2, "phase": "Failed", "reason": "success rate 0.91 below 0.98"},
            {"revision": 1, "phase": "Healthy"},
        ],
        "agents": [
            {"name": "intake", "readyReplicas": 2, "killSwitch": {"engaged": false}},
            {"name": "investigation", "readyReplicas": 1, "killSwitch": {"engaged": false}},
            {"name": "resolution", "readyReplicas": 1, "killSwitch": {"engaged": true}},
        ],
        "killSwitches": {"resolution": {"engaged": true, "since": "2026-11-29T15:00:00Z",
                                         "stateVersion": 7, "acknowledged": 1, "expected": 1}},
        "queue": {"depth": 12, "pending": 3, "dlqDepth": 4, "oldestDlqAgeSeconds": 95},
        "slo": {"successRate": 0.9991, "p95LatencyMs": 840.0, "errorBudgetRemaining": 0.82},
        "incidentCost": {"failureRate": 0.0035, "dailyCost": 3610.0},
    })
}

#[test]
fn status_shows_the_figures_and_the_breakers() {
    use r4::engine::breakers::{BreakerRecord, BreakerState, BreakerStates};
    let c = Cluster::start();
    let redis =
        c.rt.block_on(r4::testutil::RedisServer::start())
            .expect("redis-server");
    let now = r4::engine::task::now_ms();
    c.rt.block_on(async {
        let q = r4::queue::redis::RedisQueue::connect(&redis.url())
            .await
            .expect("redis");
        let keys = r4::queue::Keys::new("default", "pay");
        let b = BreakerStates::new(&q, &keys);
        let rec = |state| BreakerRecord {
            state,
            since_ms: now - 30_000,
            updated_ms: now,
            engine: "e1".into(),
            failure_rate: 0.62,
        };
        b.publish("bank-api", &rec(BreakerState::Open))
            .await
            .expect("publish");
        b.publish("ledger", &rec(BreakerState::Closed))
            .await
            .expect("publish");
    });
    // The Redis URL comes from a Secret, as in production.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "redis"},
        "data": {"url": k8s_openapi::ByteString(redis.url().into_bytes())},
    }))
    .expect("secret");
    c.rt.block_on(
        Api::<Secret>::namespaced(c.client.clone(), "default")
            .create(&PostParams::default(), &secret),
    )
    .expect("create secret");
    c.create(
        "default",
        &workflow("pay", "{urlSecretRef: {name: redis, key: url}}"),
    );

    // Not reconciled yet: said plainly.
    let out = ok(&c.r4(&["status", "pay"]));
    assert!(
        out.contains("AgentWorkflow default/pay: not reconciled yet"),
        "{out}"
    );
    let last = ok(&c.r4(&["status", "pay", "--json"]));
    let v: Value = serde_json::from_str(last.lines().last().expect("a line")).expect("JSON");
    assert_eq!(v["reconciled"], json!(false));

    c.set_status("pay", full_status());
    let out = ok(&c.r4(&["status", "pay"]));
    for says in [
        "AgentWorkflow default/pay",
        "Ready              False  AgentsNotReady: investigation: 1/3 ready",
        "Valid              True   Valid: spec is valid",
        "Degraded           True   ToolDown: bank-api breaker open",
        "revision: 3  (revisions: 3 Healthy [current], 2 Failed (success rate 0.91 below 0.98), 1 Healthy)",
        "intake                 2/2      off",
        "investigation          1/3      off",
        "resolution             1/1      engaged",
        "resolution             engaged since 2026-11-29T15:00:00Z (",
        "acknowledged by 1/1 engines (state version 7)",
        "queue: depth 12, pending 3, DLQ 4 (oldest 1m old)",
        "breakers: bank-api OPEN for 30s (failure rate 62.0%), ledger closed",
        "SLO: success rate 99.91% (target 99.50%), p95 840 ms (target 1500 ms), error budget remaining 82.0%",
        "incident cost: failure rate 0.35%, 3610.00 per day",
    ] {
        assert!(out.contains(says), "{out}\nshould say {says:?}");
    }
    // Conditions first Ready, Valid, Degraded.
    let ready = out.find("Ready ").expect("Ready");
    let progressing = out.find("Progressing").expect("Progressing");
    assert!(ready < out.find("Valid ").expect("Valid") && ready < progressing);

    let last = ok(&c.r4(&["status", "pay", "--json"]));
    let v: Value = serde_json::from_str(last.lines().last().expect("a line")).expect("JSON");
    assert_eq!(v["reconciled"], json!(true));
    assert_eq!(v["status"]["queue"]["dlqDepth"], json!(4));
    assert_eq!(v["status"]["slo"]["errorBudgetRemaining"], json!(0.82));
    assert_eq!(v["breakers"]["bank-api"]["state"], json!("open"));
    assert_eq!(v["breakers_error"], Value::Null);
    assert_eq!(v["desired_replicas"]["investigation"], json!(3));

    // A Redis this machine cannot reach: the screen says so instead of failing.
    let started = Instant::now();
    let out = ok(&c.r4(&["status", "pay", "--redis", "redis://127.0.0.1:1/0"]));
    assert!(
        out.contains("breakers: unknown (Redis not reachable from here: redis://127.0.0.1:1/0"),
        "{out}"
    );
    assert!(out.contains("queue: depth 12"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let last = ok(&c.r4(&[
        "status",
        "pay",
        "--json",
        "--redis",
        "redis://127.0.0.1:1/0",
    ]));
    let v: Value = serde_json::from_str(last.lines().last().expect("a line")).expect("JSON");
    assert_eq!(v["breakers"], Value::Null);
    assert!(
        v["breakers_error"]
            .as_str()
            .is_some_and(|e| e.contains("not reachable"))
    );
}
