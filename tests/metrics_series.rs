//! Every series the Grafana dashboard (`charts/r4/files/dashboards/r4.json`) and the
//! Prometheus rules (`charts/r4/files/rules/r4.rules.yaml`) name exists on a real `/metrics`:
//! each engine role started as `r4 engine` (agent with its tool proxy, intake, repair) on a real
//! redis-server, and the controller run against `r4 dev`'s API with its metrics endpoint on,
//! after it reconciled a workflow, ran a ChaosDrill to its verdict and acknowledged a kill
//! switch — every scrape over HTTP. A name the files use that no role exports fails the test,
//! naming each one. The recording rules the rule file defines are not scraped series.
//!
//! Also: a drill deleted takes its series with it (the controller exports objects from its
//! watch stores, never from a gauge left behind).

mod support;

use support::{free_port, kubectl, kubectl_present};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Api;
use r4::api::drill::{ChaosDrill, DrillPhase};
use r4::controller::context::{Options, QueueSource};
use r4::controller::run::{RunOptions, run};
use r4::devcluster::kubelet::{self, KubeletOptions};
use r4::devcluster::{Options as DevOptions, kubeconfig, start};
use r4::queue::Queue;
use r4::queue::redis::RedisQueue;
use r4::testutil::RedisServer;
use tokio::sync::watch;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "charts/r4/files/rules/r4.rules.yaml";
const DASHBOARD: &str = "charts/r4/files/dashboards/r4.json";

// ---------------------------------------------------------------------------------------------
// What the files reference.

/// The `r4_…` metric names in a PromQL expression (or an annotation's text): identifiers as
/// PromQL reads them (`[a-zA-Z_:][a-zA-Z0-9_:]*`), so a recording rule's `r4:…` name is one
/// identifier and never mistaken for a series; names inside quotes (label values) are skipped.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' || c == b'`' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("r4_") && !word.contains(':') {
                out.insert(word.to_owned());
            }
            continue;
        }
        i += 1;
    }
    out
}

/// Every series name the rule file uses (expressions and annotations) and the recording rules
/// it defines.
fn rules_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).expect("rule file parses");
    let mut used = BTreeSet::new();
    let mut recorded = BTreeSet::new();
    let groups = doc["groups"].as_sequence().expect("groups");
    for g in groups {
        for r in g["rules"].as_sequence().expect("rules") {
            if let Some(name) = r["record"].as_str() {
                recorded.insert(name.to_owned());
            }
            used.extend(names_in(r["expr"].as_str().expect("expr")));
            if let Some(a) = r["annotations"].as_mapping() {
                for v in a.values() {
                    // Annotations are templates: names in backquotes are meant too.
                    used.extend(names_in(&v.as_str().unwrap_or_default().replace('`', " ")));
                }
            }
        }
    }
    (used, recorded)
}

/// Every series name the dashboard's queries use (panel targets and template variables).
fn dashboard_names(text: &str) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                            out.extend(names_in(s))
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: serde_json::Value = serde_json::from_str(text).expect("dashboard parses");
    let mut out = BTreeSet::new();
    walk(&doc, &mut out);
    out
}

/// Every referenced name, with the file(s) that use it.
fn referenced() -> BTreeMap<String, Vec<&'static str>> {
    let read = |p: &str| std::fs::read_to_string(Path::new(REPO).join(p)).expect(p);
    let (rules, recorded) = rules_names(&read(RULES));
    let dashboard = dashboard_names(&read(DASHBOARD));
    let mut out: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for (names, file) in [(rules, RULES), (dashboard, DASHBOARD)] {
        for n in names.into_iter().filter(|n| !recorded.contains(n)) {
            out.entry(n).or_default().push(file);
        }
    }
    out
}

/// The sample names of a scrape (a histogram's `_bucket`, `_sum`, `_count` as they are), each
/// with at least one sample: a family announced by `# TYPE` with nothing under it does not count.
fn scraped(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The referenced names no scrape has, one line each with the files that use it.
fn missing(refs: &BTreeMap<String, Vec<&str>>, seen: &BTreeSet<String>) -> Vec<String> {
    refs.iter()
        .filter(|(n, _)| !seen.contains(*n))
        .map(|(n, files)| format!("{n} (used by {})", files.join(", ")))
        .collect()
}

#[test]
fn the_extraction_finds_series_and_skips_recording_rules_and_labels() {
    let n = names_in(
        r#"sum by (namespace) (rate(r4_engine_tasks_total{outcome="r4_not_a_metric"}[5m])) / r4:workflow_task_error_ratio:rate5m > on (namespace) r4_workflow_slo_target and histogram_quantile(0.9, rate(r4_controller_reconcile_duration_seconds_bucket[5m]))"#,
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        [
            "r4_controller_reconcile_duration_seconds_bucket",
            "r4_engine_tasks_total",
            "r4_workflow_slo_target"
        ]
    );
    let refs = referenced();
    // The files do reference the series this suite is about (a parser that found nothing
    // would make the scrape check vacuous).
    for must in [
        "r4_engine_tasks_total",
        "r4_policy_hedges_total",
        "r4_breaker_state",
        "r4_workflow_dlq_oldest_age_seconds",
        "r4_workflow_slo_target",
        "r4_workflow_kill_switch_engaged_since_timestamp_seconds",
        "r4_drill_last_passed",
        "r4_controller_reconciles_total",
    ] {
        assert!(refs.contains_key(must), "{must} not found in {refs:?}");
    }
    assert!(
        !refs.keys().any(|k| k.contains(':')),
        "recording rules are not series: {refs:?}"
    );
    // A bogus name is reported, with the file that uses it.
    let mut with_bogus = refs.clone();
    with_bogus.insert("r4_engine_bogus_total".into(), vec![RULES]);
    let seen: BTreeSet<String> = refs.keys().cloned().collect();
    assert_eq!(
        missing(&with_bogus, &seen),
        [format!("r4_engine_bogus_total (used by {RULES})")]
    );
}

// ---------------------------------------------------------------------------------------------
// The roles, started for real.

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `url` until it answers 200 with a body `done` accepts, for at most `secs`; the last
/// body (or error) otherwise.
async fn scrape_until(
    client: &reqwest::Client,
    url: &str,
    secs: u64,
    done: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last;
    loop {
        match client.get(url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status() == 200 => {
                let body = r.text().await.unwrap_or_default();
                if done(&body) {
                    return Ok(body);
                }
                last = body;
            }
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ENGINE_WORKFLOW: &str = r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: shop, namespace: team}
spec:
  queue: {redis: {url: "REDIS"}}
  policyRef: pol
  tools:
    - {name: bank, url: "http://127.0.0.1:9/statements", idempotent: true}
  agents:
    - {name: a, image: i, consumes: in, tools: [bank]}
  intake: {enabled: true}
  repair: {enabled: true}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: pol, namespace: team}
spec:
  retry: {maxAttempts: 2}
  hedge: {enabled: true, delay: {fixed: 50ms}}
  circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 10}, openDuration: 5s}
"#;

/// Start `r4 engine --role ROLE` on the workflow file and scrape its `/metrics` once it serves.
async fn engine_scrape(
    client: &reqwest::Client,
    file: &Path,
    redis: &str,
    role: &[&str],
) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_r4"));
    cmd.arg("engine")
        .args(role)
        .arg("--workflow-file")
        .arg(file)
        .args(["--redis", redis])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--tools-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--agent-url", "http://127.0.0.1:9/none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc(cmd.spawn().expect("start r4 engine"));
    let body = scrape_until(
        client,
        &format!("http://127.0.0.1:{port}/metrics"),
        30,
        |b| b.contains("r4_engine_"),
    )
    .await
    .unwrap_or_else(|last| panic!("engine {role:?} never served /metrics: {last}"));
    (proc, body)
}

/// The workflow the controller runs on `r4 dev`: the controller fixture with a simulated tool.
fn controller_workflow(redis_url: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join("tests/fixtures/controller-triage.yaml"))
        .expect("fixture")
        .replace("redis://127.0.0.1:6379/0", redis_url)
        .replace(
            "  policyRef: triage-policy\n",
            "  policyRef: triage-policy\n  slo: {successRate: 0.99}\n  economics: {marginPerTask: 0.1, remediationCostPerFailure: 2}\n  tools:\n    - name: kb\n      url: http://kb.tools:8080/\n      simulate: {latency: {medianMs: 2, p99Ms: 5}}\n",
        )
        .replace(
            "      consumes: sorted\n",
            "      consumes: sorted\n      tools: [kb]\n",
        )
}

const DRILL: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: ChaosDrill
metadata:
  name: kb-outage
spec:
  workflowRef: triage
  baseline: 1s
  duration: 3s
  faults:
    - {type: ToolOutage, tool: kb}
  expect: {maxRecoverySeconds: 20, maxLostTasks: 0, maxDuplicateEffects: 0}
"#;

/// `promtool check metrics` (Prometheus's own parser and linter) on a scrape: the text format
/// is what Prometheus reads, not only what our tests grep. Skipped without promtool unless
/// under CI (`make deps` installs it).
fn promtool_accepts(what: &str, body: &str) {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_some() => panic!("promtool is required under CI"),
        Err(_) => {
            eprintln!("skipping promtool check of {what}: promtool not found on PATH");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused the {what} scrape: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_series_the_dashboard_and_the_alerts_use_is_exported() {
    if !kubectl_present() {
        return;
    }
    let refs = referenced();
    let client = reqwest::Client::new();
    let redis = RedisServer::start().await.expect("redis-server");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = BTreeSet::new();

    // The engine roles, each its own process.
    let file: PathBuf = dir.path().join("shop.yaml");
    std::fs::write(&file, ENGINE_WORKFLOW.replace("REDIS", &redis.url())).expect("write");
    let mut engines = Vec::new();
    for role in [
        &["--role", "agent", "--agent", "a"][..],
        &["--role", "intake"][..],
        &["--role", "repair"][..],
    ] {
        let (proc, body) = engine_scrape(&client, &file, &redis.url(), role).await;
        // Every engine series names its workflow.
        for l in body
            .lines()
            .filter(|l| l.starts_with("r4_engine_tasks_total"))
        {
            assert!(
                l.contains("namespace=\"team\"") && l.contains("workflow=\"shop\""),
                "{role:?}: {l}"
            );
        }
        promtool_accepts(&format!("engine {role:?}"), &body);
        seen.extend(scraped(&body));
        engines.push(proc);
    }

    // The controller on r4 dev, its metrics endpoint on a free port.
    let handle = start("127.0.0.1:0".parse().expect("addr"), DevOptions::default())
        .await
        .expect("start the dev API");
    let kc = dir.path().join("kubeconfig");
    kubeconfig::write(&kc, handle.addr).expect("kubeconfig");
    let kube = r4::devcluster::client(&handle.url()).expect("client");
    let queue: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&redis.url()).await.expect("redis"));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(kubelet::run_on(
        kube.clone(),
        KubeletOptions {
            ready_delay: Duration::from_millis(100),
            ..KubeletOptions::default()
        },
        queue.clone(),
        stopped.clone(),
    ));
    let metrics_port = free_port();
    let controller = tokio::spawn(run(
        kube.clone(),
        RunOptions {
            controller: Options {
                queue: QueueSource::Shared(queue.clone()),
                stats_interval: Duration::from_secs(1),
                ..Options::default()
            },
            metrics_listen: Some(
                format!("127.0.0.1:{metrics_port}")
                    .parse()
                    .expect("metrics address"),
            ),
            leader: None,
        },
        stopped,
    ));
    kubectl(&kc, &["apply", "-f", "crds/"], None);
    kubectl(
        &kc,
        &["apply", "-f", "-"],
        Some(&controller_workflow(&redis.url())),
    );
    kubectl(&kc, &["apply", "-f", "-"], Some(DRILL));

    // The drill runs to its verdict.
    let drills: Api<ChaosDrill> = Api::namespaced(kube.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = drills.get("kb-outage").await.expect("drill");
        let s = d.status.clone().unwrap_or_default();
        if !s.runs.is_empty() && s.phase != Some(DrillPhase::Running) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drill never finished: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A kill switch engaged (its engaged-since series exists only then).
    kubectl(
        &kc,
        &[
            "patch",
            "agentworkflow",
            "triage",
            "--type=merge",
            "-p",
            r#"{"spec":{"killSwitches":{"agents":{"solver":true}}}}"#,
        ],
        None,
    );

    // Scrape until every referenced name is there (the status fills over a few reconciles).
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let engine_seen = seen.clone();
    let body = scrape_until(&client, &url, 60, |b| {
        let mut all = engine_seen.clone();
        all.extend(scraped(b));
        missing(&refs, &all).is_empty()
    })
    .await;
    let body = body.unwrap_or_else(|last| last);
    promtool_accepts("controller", &body);
    seen.extend(scraped(&body));
    let absent = missing(&refs, &seen);
    assert!(
        absent.is_empty(),
        "series the dashboard or the rules use that no role exports:\n  {}\n(last controller scrape:\n{body})",
        absent.join("\n  ")
    );
    // The values are the status's.
    assert!(
        body.contains("r4_workflow_slo_target{namespace=\"default\",workflow=\"triage\"} 0.99"),
        "{body}"
    );
    assert!(
        body.contains(
            "r4_workflow_kill_switch_engaged{namespace=\"default\",switch=\"solver\",workflow=\"triage\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.lines().any(|l| l
            .starts_with("r4_drill_runs_total{drill=\"kb-outage\",namespace=\"default\",verdict=")
            && l.ends_with(" 1")),
        "one run recorded once: {body}"
    );

    // A deleted drill's series go with it.
    kubectl(&kc, &["delete", "chaosdrill", "kb-outage"], None);
    let gone = scrape_until(&client, &url, 30, |b| !b.contains("drill=\"kb-outage\"")).await;
    assert!(
        gone.is_ok(),
        "the deleted drill's series are still exported:\n{}",
        gone.unwrap_or_else(|b| b)
    );

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    drop(engines);
}
