//! `r4 dlq …` and `r4 kill` / `r4 resume` as a user runs them (the real
//! binary) against a real redis-server.

use std::process::{Command, Output, Stdio};

use r4::engine::dlq::{self, DlqRecord};
use r4::engine::killswitch;
use r4::queue::redis::RedisQueue;
use r4::queue::{Keys, Queue};
use r4::testutil::RedisServer;

fn r4<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run r4")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn dlq_and_kill_commands() {
    let server = RedisServer::start().await.unwrap();
    let url = server.url();
    let q = RedisQueue::connect(&url).await.unwrap();
    let keys = Keys::new("team", "wf");
    let rec = |task: &str| DlqRecord {
        id: String::new(),
        reason: "max_deliveries".into(),
        error: "agent answered 503".into(),
        task_id: task.into(),
        step: "a".into(),
        source: "in".into(),
        entry_id: "1-0".into(),
        deliveries: 5,
        replays: 0,
        replayable: true,
        tool: None,
        dead_at_ms: r4::engine::task::now_ms(),
        engine: "e".into(),
        history: vec![],
        joins: Vec::new(),
        original: vec![
            ("task_id".into(), task.to_owned().into()),
            ("payload".into(), "{}".into()),
        ],
    };
    let id1 = q.add(&keys.dlq(), rec("t1").encode(), None).await.unwrap();
    q.add(&keys.dlq(), rec("t2").encode(), None).await.unwrap();
    q.add(&keys.dlq(), rec("t3").encode(), None).await.unwrap();
    let base = ["--redis", url.as_str(), "--namespace", "team"];
    let with = |cmd: &[&str]| -> Vec<String> {
        cmd.iter()
            .chain(base.iter())
            .map(|s| s.to_string())
            .collect()
    };

    let o = r4(&with(&["dlq", "list", "wf"]));
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("max_deliveries") && t.contains("t1") && t.contains("3 entries"),
        "{t}"
    );

    let o = r4(&with(&["dlq", "show", "wf", &id1]));
    assert!(
        o.status.success() && text(&o).contains("\"history\""),
        "{}",
        text(&o)
    );
    let o = r4(&with(&["dlq", "show", "wf", "9-9"]));
    assert!(!o.status.success() && text(&o).contains("no DLQ entry"));

    let o = r4(&with(&["dlq", "replay", "wf", "--id", &id1]));
    assert!(o.status.success(), "{}", text(&o));
    let back = q.range(&keys.stream("in"), "-", "+", 0).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].field("task_id").unwrap().as_ref(), b"t1");
    assert_eq!(back[0].field("replays").unwrap().as_ref(), b"1");
    assert_eq!(
        dlq::list(&q, &keys, dlq::Store::Dlq, 0)
            .await
            .unwrap()
            .len(),
        2
    );

    // No terminal, no --yes: refuse and keep everything.
    let o = r4(&with(&["dlq", "purge", "wf"]));
    assert!(
        !o.status.success() && text(&o).contains("--yes"),
        "{}",
        text(&o)
    );
    assert_eq!(q.len(&keys.dlq()).await.unwrap(), 2);
    let o = r4(&with(&["dlq", "purge", "wf", "--yes"]));
    assert!(
        o.status.success() && text(&o).contains("purged 2"),
        "{}",
        text(&o)
    );
    assert_eq!(q.len(&keys.dlq()).await.unwrap(), 0);

    // No engine of wf has run yet: r4 kill cannot know what it is made of.
    let o = r4(&with(&["kill", "wf/a"]));
    refused(&o, "unknown workflow team/wf");
    assert!(!killswitch::read(&q, &keys).await.unwrap().stops(Some("a")));
    // What an engine writes on start.
    let topology = killswitch::Topology {
        agents: vec!["a".into(), "enricher".into()],
        tools: vec!["bank".into()],
    };
    killswitch::publish_topology(&q, &keys, &topology)
        .await
        .unwrap();

    let o = r4(&with(&["kill", "wf/a"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(killswitch::read(&q, &keys).await.unwrap().stops(Some("a")));
    let o = r4(&with(&["resume", "wf/a"]));
    assert!(o.status.success());
    assert!(!killswitch::read(&q, &keys).await.unwrap().stops(Some("a")));
    let o = r4(&with(&["kill", "wf/tool:bank"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        killswitch::read(&q, &keys)
            .await
            .unwrap()
            .tool_killed("bank")
    );

    // Typos and strangers are refused, naming what exists, and nothing is engaged.
    let before = killswitch::read(&q, &keys).await.unwrap();
    let o = r4(&with(&["kill", "wf/enrichr"]));
    refused(
        &o,
        "unknown agent \"enrichr\" in workflow team/wf (agents: a, enricher)",
    );
    let o = r4(&with(&["resume", "wf/tool:vault"]));
    refused(
        &o,
        "unknown tool \"vault\" in workflow team/wf (tools: bank)",
    );
    let o = r4(&with(&["kill", "claims"]));
    refused(&o, "unknown workflow team/claims");
    let o = r4(&[
        "kill",
        "wf/a",
        "--redis",
        url.as_str(),
        "--namespace",
        "other",
    ]);
    refused(&o, "unknown workflow other/wf");
    assert_eq!(killswitch::read(&q, &keys).await.unwrap(), before);

    // -f takes the names from the manifest: for a workflow none of whose engines ran yet.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("claims.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: claims, namespace: team}
spec:
  queue: {redis: {url: "redis://127.0.0.1:6379"}}
  agents:
    - {name: enricher, image: i, consumes: in}
"#,
    )
    .unwrap();
    let file = manifest.to_str().unwrap();
    let o = r4(&[
        "kill",
        "claims/enricher",
        "--redis",
        url.as_str(),
        "-f",
        file,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let claims = Keys::new("team", "claims");
    assert!(
        killswitch::read(&q, &claims)
            .await
            .unwrap()
            .stops(Some("enricher"))
    );
    let o = r4(&[
        "kill",
        "claims/enrichr",
        "--redis",
        url.as_str(),
        "-f",
        file,
    ]);
    refused(
        &o,
        "unknown agent \"enrichr\" in workflow team/claims (agents: enricher)",
    );
    let o = r4(&["kill", "nope", "--redis", url.as_str(), "-f", file]);
    refused(&o, "workflow \"nope\"");

    let o = r4(&["kill", "wf"]);
    assert!(
        !o.status.success() && text(&o).contains("--redis"),
        "{}",
        text(&o)
    );
}

/// Failed with exit status 1 or 2 and one line on stderr containing `says`.
fn refused(o: &Output, says: &str) {
    assert!(!o.status.success(), "should fail: {}", text(o));
    let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
    assert!(err.contains(says), "{err:?} should say {says:?}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
}

#[test]
fn bench_refusals_are_one_line_naming_the_flag() {
    for (args, says) in [
        (
            vec![
                "bench",
                "pipeline",
                "--redis",
                "redis://127.0.0.1:1",
                "--rounds",
                "1",
            ],
            "--redis redis://127.0.0.1:1",
        ),
        (
            vec!["bench", "killswitch", "--redis", "redis://127.0.0.1:1"],
            "--redis redis://127.0.0.1:1",
        ),
        (vec!["bench", "pipeline", "--batch", "0"], "--batch"),
        (vec!["bench", "pipeline", "--rounds", "21"], "--rounds"),
    ] {
        let o = r4(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
        assert!(err.contains(says), "{args:?}: {err:?} should name {says:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
    }
}

#[test]
fn an_intake_that_asks_for_tokens_does_not_start_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: wf}
spec:
  queue: {redis: {url: "redis://127.0.0.1:1"}}
  agents: [{name: a, image: i, consumes: in}]
  intake: {enabled: true, auth: {tokenSecretRef: {name: intake-token, key: token}}}
"#,
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_r4"));
        cmd.args(["engine", "--role", "intake", "--workflow-file"])
            .arg(&wf)
            .args([
                "--redis",
                "redis://:hunter2@127.0.0.1:1/",
                "--listen",
                "127.0.0.1:0",
            ])
            .env_remove("R4_INTAKE_TOKEN")
            .env_remove("R4_INTAKE_TOKEN_FILE")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run r4")
    };
    let o = run(&[]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("spec.intake.auth is set but neither R4_INTAKE_TOKEN_FILE nor R4_INTAKE_TOKEN"),
        "{t}"
    );
    // With a token it goes on to Redis (nothing listens there), naming it without the password.
    let o = run(&[("R4_INTAKE_TOKEN", "a-token-of-sixteen-chars")]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("cannot connect to redis://:***@127.0.0.1:1/"),
        "{t}"
    );
    assert!(!t.contains("hunter2"), "{t}");
    let o = run(&[("R4_INTAKE_TOKEN", "short")]);
    assert!(
        text(&o).contains("R4_INTAKE_TOKEN: line 1: a token must be"),
        "{}",
        text(&o)
    );
}

/// `r4 bench devcluster` measures through a kube client and says what it held: every object
/// created was seen by its watcher, and the memory figures are there (the timings and the
/// 128 MiB verdict are reported, not asserted).
#[test]
fn bench_devcluster_reports_its_figures() {
    let o = r4(&[
        "bench",
        "devcluster",
        "--objects",
        "300",
        "--workflows",
        "20",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("JSON last line");
    assert_eq!(v["watch_events"], 300, "{v}");
    assert_eq!(v["objects_held"], 300 + 20 * 8, "{v}");
    for k in [
        "created_per_sec",
        "watch_events_per_sec",
        "rss_mib_peak",
        "rss_mib_own",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert!(v["within_limit"].is_boolean(), "{v}");
    let o = r4(&["bench", "devcluster", "--objects", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--objects"));
}
