//! The dev API server judged by the real kubectl (v1.32): where kubectl and our server disagree,
//! our server is wrong. Skipped with a message when kubectl is missing, except under CI.

mod support;

use support::{eventually_blocking, kubectl_present, repo};

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use r4::devcluster::{Handle, Options, kubeconfig, start};

struct Cluster {
    _rt: tokio::runtime::Runtime,
    _handle: Handle,
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
        Cluster {
            _rt: rt,
            _handle: handle,
            dir,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run kubectl")
    }

    /// Run kubectl, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(o.status.success(), "kubectl {args:?} failed:\n{err}\n{out}");
        out.into_owned()
    }

    /// Run kubectl, which must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "kubectl {args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn apply_stdin(&self, yaml: &str) -> String {
        use std::io::Write;
        let mut child = self
            .cmd(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write");
        let o = child.wait_with_output().expect("kubectl");
        assert!(
            o.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn with_samples() -> Self {
        let c = Self::start();
        let crds = repo("crds");
        let out = c.ok(&["apply", "-f", crds.to_str().expect("path")]);
        assert!(
            out.contains(
                "customresourcedefinition.apiextensions.k8s.io/agentworkflows.r4.dev created"
            ),
            "{out}"
        );
        let samples = repo("config/samples");
        let out = c.ok(&["apply", "-f", samples.to_str().expect("path")]);
        assert!(
            out.contains("agentworkflow.r4.dev/payment-disputes created"),
            "{out}"
        );
        assert!(
            out.contains("circuitpolicy.r4.dev/default-policy created"),
            "{out}"
        );
        assert!(
            out.contains("chaosdrill.r4.dev/bank-outage created"),
            "{out}"
        );
        c
    }
}

#[test]
fn apply_get_explain_and_categories() {
    if !kubectl_present() {
        return;
    }
    let c = Cluster::with_samples();
    let samples = repo("config/samples");
    let rv = |n: &str| c.ok(&["get", "aw", n, "-o", "jsonpath={.metadata.resourceVersion}"]);
    let before = rv("payment-disputes");
    let again = c.ok(&["apply", "-f", samples.to_str().expect("path")]);
    assert!(
        again.contains("circuitpolicy.r4.dev/default-policy unchanged"),
        "{again}"
    );
    // The workflows' lists hold schema defaults the files do not, so kubectl's merge patch
    // resends the lists ("configured", as against a real server); the write is a no-op.
    assert_eq!(
        rv("payment-disputes"),
        before,
        "a no-op apply keeps the resourceVersion"
    );

    let table = c.ok(&["get", "aw"]);
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "READY",
        "REVISION",
        "AGENTS",
        "DLQ",
        "KILL SWITCH",
        "AGE",
    ] {
        assert!(header.contains(col), "column {col} in {header:?}");
    }
    assert!(
        table.contains("payment-disputes") && table.contains("chargeback-triage"),
        "{table}"
    );

    let yaml = c.ok(&["get", "aw,cp,drill", "-o", "yaml"]);
    for kind in [
        "kind: AgentWorkflow",
        "kind: CircuitPolicy",
        "kind: ChaosDrill",
    ] {
        assert!(yaml.contains(kind), "{kind} in get -o yaml");
    }
    let category = c.ok(&["get", "r4", "-o", "name"]);
    for name in [
        "agentworkflow.r4.dev/payment-disputes",
        "circuitpolicy.r4.dev/default-policy",
        "chaosdrill.r4.dev/bank-outage",
    ] {
        assert!(category.contains(name), "{name} in `get r4`: {category}");
    }
    let explain = c.ok(&["explain", "aw.spec.agents"]);
    assert!(
        explain.contains("KIND:") && explain.contains("AgentWorkflow"),
        "{explain}"
    );
    assert!(explain.contains("FIELD: agents"), "{explain}");
    assert!(explain.contains("concurrency"), "{explain}");

    let builtin = c.ok(&["explain", "deployment.spec.replicas"]);
    assert!(builtin.contains("FIELD: replicas <integer>"), "{builtin}");

    let resources = c.ok(&["api-resources"]);
    assert!(
        resources
            .lines()
            .any(|l| l.starts_with("agentworkflows") && l.contains("aw")),
        "{resources}"
    );
    assert!(c.ok(&["get", "ns"]).contains("default"));
    assert!(c.ok(&["version"]).contains("Server Version"));

    // A bad manifest is refused naming the field, as a real server would.
    let bad = c.fails(&[
        "patch",
        "aw",
        "payment-disputes",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"agents":[{"name":"Bad Name","consumes":"x","image":"i"}]}}"#,
    ]);
    assert!(bad.contains("spec.agents[0]"), "{bad}");
}

#[test]
fn patch_status_wait_and_finalizers() {
    if !kubectl_present() {
        return;
    }
    let c = Cluster::with_samples();
    let generation = |n: &str| c.ok(&["get", "aw", n, "-o", "jsonpath={.metadata.generation}"]);
    assert_eq!(generation("payment-disputes"), "1");
    c.ok(&[
        "patch",
        "aw",
        "payment-disputes",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"killSwitches":{"all":true}}}"#,
    ]);
    assert_eq!(generation("payment-disputes"), "2");
    assert_eq!(
        c.ok(&[
            "get",
            "aw",
            "payment-disputes",
            "-o",
            "jsonpath={.spec.killSwitches.all}"
        ]),
        "true"
    );

    let status = r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"Test","message":"set by the test","lastTransitionTime":"2026-01-01T00:00:00Z"}],"agentsReady":"3/3"}}"#;
    c.ok(&[
        "patch",
        "aw",
        "payment-disputes",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        status,
    ]);
    assert_eq!(
        generation("payment-disputes"),
        "2",
        "a status write keeps the generation"
    );
    c.ok(&[
        "wait",
        "--for=condition=Ready",
        "aw/payment-disputes",
        "--timeout=10s",
    ]);
    let row = c.ok(&["get", "aw", "payment-disputes", "--no-headers"]);
    assert!(
        row.contains("True") && row.contains("3/3"),
        "printer columns read status: {row}"
    );
    // .status on the main resource is ignored.
    c.ok(&[
        "patch",
        "aw",
        "payment-disputes",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"agentsReady":"0/3"}}"#,
    ]);
    assert_eq!(
        c.ok(&[
            "get",
            "aw",
            "payment-disputes",
            "-o",
            "jsonpath={.status.agentsReady}"
        ]),
        "3/3"
    );

    c.ok(&[
        "patch",
        "aw",
        "chargeback-triage",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["r4.dev/test"]}}"#,
    ]);
    c.ok(&["delete", "aw", "chargeback-triage", "--wait=false"]);
    let ts = c.ok(&[
        "get",
        "aw",
        "chargeback-triage",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !ts.is_empty(),
        "deletionTimestamp set while the finalizer holds"
    );
    c.ok(&[
        "patch",
        "aw",
        "chargeback-triage",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let err = c.fails(&["get", "aw", "chargeback-triage"]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn watch_and_garbage_collection() {
    if !kubectl_present() {
        return;
    }
    let c = Cluster::start();
    c.ok(&["create", "configmap", "first", "--from-literal=a=1"]);
    let mut watch = c
        .cmd(&["get", "configmaps", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl get --watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let wait_for = |needle: &str| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => break,
            Ok(_) => {}
            Err(_) => panic!("kubectl get --watch did not show {needle:?}"),
        }
    };
    wait_for("first");
    c.ok(&["create", "configmap", "watched", "--from-literal=a=1"]);
    wait_for("watched");
    let _ = watch.kill();
    let _ = watch.wait();

    let uid_of = |n: &str| c.ok(&["get", "configmap", n, "-o", "jsonpath={.metadata.uid}"]);
    let dependent = |name: &str, owner: &str, uid: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: {owner}\n    uid: {uid}\ndata:\n  a: \"1\"\n"
        )
    };
    c.ok(&["create", "configmap", "owner"]);
    c.apply_stdin(&dependent("child", "owner", &uid_of("owner")));
    c.ok(&["delete", "configmap", "owner"]);
    eventually_blocking(10, "background GC of the child", || {
        !c.run(&["get", "configmap", "child"]).status.success()
    });

    c.ok(&["create", "configmap", "owner2"]);
    c.apply_stdin(&dependent("orphan", "owner2", &uid_of("owner2")));
    c.ok(&["delete", "configmap", "owner2", "--cascade=orphan"]);
    let refs = c.ok(&[
        "get",
        "configmap",
        "orphan",
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ]);
    assert!(
        refs.trim().is_empty(),
        "orphaned dependent keeps no reference: {refs}"
    );
}

#[test]
fn server_side_apply() {
    if !kubectl_present() {
        return;
    }
    let c = Cluster::start();
    let crds = repo("crds");
    let out = c.ok(&["apply", "--server-side", "-f", crds.to_str().expect("path")]);
    assert!(out.contains("serverside-applied"), "{out}");
    let samples = repo("config/samples");
    let out = c.ok(&[
        "apply",
        "--server-side",
        "-f",
        samples.to_str().expect("path"),
    ]);
    assert!(
        out.contains("agentworkflow.r4.dev/payment-disputes serverside-applied"),
        "{out}"
    );
    // The applier owns what it applied (managedFields, operation Apply).
    let mf = c.ok(&[
        "get",
        "aw",
        "payment-disputes",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[0].manager} {.metadata.managedFields[0].operation}",
    ]);
    assert_eq!(mf.trim(), "kubectl Apply", "{mf}");
    // Another manager applying a field kubectl owns, with another value: a conflict unless
    // forced, as on a real server.
    let doc = "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: payment-disputes}\nspec:\n  queue: {redis: {url: \"redis://other:6379/0\"}}\n";
    let file = c.dir.path().join("other.yaml");
    std::fs::write(&file, doc).expect("write");
    let file = file.to_str().expect("path");
    let o = c.run(&[
        "apply",
        "--server-side",
        "--field-manager",
        "other",
        "-f",
        file,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("conflict"), "{err}");
    c.ok(&[
        "apply",
        "--server-side",
        "--field-manager",
        "other",
        "--force-conflicts",
        "-f",
        file,
    ]);
    let url = c.ok(&[
        "get",
        "aw",
        "payment-disputes",
        "-o",
        "jsonpath={.spec.queue.redis.url}",
    ]);
    assert_eq!(url.trim(), "redis://other:6379/0");
}

#[test]
fn generators_namespaces_and_one_shot_apply() {
    if !kubectl_present() {
        return;
    }
    let c = Cluster::start();
    // CRDs and their objects in one command: as against a real server, the CRDs are created
    // and the objects wait for a second apply.
    let (crds, samples) = (repo("crds"), repo("config/samples"));
    let o = c.run(&[
        "apply",
        "-f",
        crds.to_str().expect("path"),
        "-f",
        samples.to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ensure CRDs are installed first"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("agentworkflows.r4.dev created"));
    c.ok(&["apply", "-f", samples.to_str().expect("path")]);

    // The typed-client generators send protobuf.
    c.ok(&["create", "namespace", "team"]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=p=q",
        "-n",
        "team",
    ]);
    c.ok(&["create", "serviceaccount", "bot", "-n", "team"]);
    assert_eq!(
        c.ok(&[
            "get",
            "secret",
            "s1",
            "-n",
            "team",
            "-o",
            "jsonpath={.data.p}"
        ]),
        "cQ=="
    );
    let deploy = c.fails(&["create", "deployment", "web", "--image=nginx"]);
    assert!(deploy.contains("protobuf"), "{deploy}");

    // Client-side apply of a built-in kind: a strategic merge patch drops a removed key.
    let cfg = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: team\ndata: {data}\n"
        )
    };
    c.apply_stdin(&cfg("{a: \"1\", b: \"2\"}"));
    assert!(c.apply_stdin(&cfg("{a: \"5\"}")).contains("configured"));
    assert_eq!(
        c.ok(&["get", "cm", "cfg", "-n", "team", "-o", "jsonpath={.data}"]),
        r#"{"a":"5"}"#
    );

    // `kubectl scale` goes through the /scale subresource.
    c.apply_stdin(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: team\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: nginx}]\n",
    );
    c.ok(&["scale", "deployment", "web", "-n", "team", "--replicas=3"]);
    let d = c.ok(&[
        "get",
        "deploy",
        "web",
        "-n",
        "team",
        "-o",
        "jsonpath={.spec.replicas} {.metadata.generation}",
    ]);
    assert_eq!(d, "3 2");
    assert!(c.ok(&["get", "deploy", "-n", "team"]).contains("0/3"));

    // Deleting a namespace deletes what it holds.
    c.ok(&["delete", "namespace", "team"]);
    eventually_blocking(10, "namespace team to go", || {
        !c.run(&["get", "ns", "team"]).status.success()
    });
    assert!(
        c.ok(&["get", "secrets", "-A", "-o", "name"])
            .trim()
            .is_empty()
    );

    // Foreground deletion through kubectl.
    c.ok(&["create", "configmap", "fg"]);
    let uid = c.ok(&["get", "configmap", "fg", "-o", "jsonpath={.metadata.uid}"]);
    c.apply_stdin(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fg-child\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: fg, uid: {uid}, blockOwnerDeletion: true}}\n"
    ));
    c.ok(&["delete", "configmap", "fg", "--cascade=foreground"]);
    assert!(!c.run(&["get", "configmap", "fg-child"]).status.success());
    assert!(!c.run(&["get", "configmap", "fg"]).status.success());
}
