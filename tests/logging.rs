//! The engine's log as an operator reads it: the real `r4 engine` binary with
//! `R4_LOG_FORMAT=json` against a real redis-server. Every decision that changes a task's fate
//! is one JSON line naming the task, the step and the reason.

mod engine_common;
use engine_common::{Engine, free_port, serve_app};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use r4::queue::redis::RedisQueue;
use r4::queue::{Keys, Queue, fields};
use serde_json::Value;

/// Lines the engine wrote to standard error so far, collected by a reader thread.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// The JSON events with `message == "dead-lettered"` logged so far.
fn dead_letter_events(lines: &Mutex<Vec<String>>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "dead-lettered")
        .collect()
}

#[tokio::test]
async fn fate_decisions_are_json_lines_with_task_step_and_reason() {
    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    // The agent refuses every task permanently (400): the engine dead-letters it at once.
    let app = Router::new().route(
        "/tasks",
        post(|| async { (StatusCode::BAD_REQUEST, "{\"error\":\"no\"}") }),
    );
    let agent = serve_app(app).await;

    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        format!(
            r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: logs}}
spec:
  queue: {{redis: {{url: "{url}"}}}}
  agents:
    - {{name: a, image: i, consumes: in}}
"#,
            url = redis.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(["engine", "--role", "agent", "--agent", "a"])
        .args(["--redis", &redis.url(), "--namespace", "team"])
        .arg("--workflow-file")
        .arg(&wf)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--agent-url", &format!("http://{agent}/tasks")])
        .env("R4_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start r4 engine");
    let lines = collect_stderr(&mut child);
    let _engine = Engine(child);

    let q = RedisQueue::connect(&redis.url()).await.unwrap();
    let keys = Keys::new("team", "logs");
    // A task the agent refuses, and an entry that is not a task at all (payload not JSON).
    q.add(
        &keys.stream("in"),
        fields([("task_id", "t-refused"), ("payload", "{}")]),
        None,
    )
    .await
    .unwrap();
    q.add(
        &keys.stream("in"),
        fields([("task_id", "t-garbled"), ("payload", "{nope")]),
        None,
    )
    .await
    .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = dead_letter_events(&lines);
        if events.len() >= 2 {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no two dead-lettered events within 30 s; the engine logged:\n{}",
            lines.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for e in &events {
        assert_eq!(e["level"], "WARN", "{e}");
        assert_eq!(e["step"], "a", "the step is named: {e}");
        assert!(e["task"].is_string(), "the task is named: {e}");
        assert!(
            e["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "the reason is named: {e}"
        );
        assert!(e["timestamp"].is_string(), "{e}");
    }
    let refused = events
        .iter()
        .find(|e| e["task"] == "t-refused")
        .unwrap_or_else(|| panic!("no event for t-refused: {events:?}"));
    assert_eq!(refused["reason"], "permanent", "{refused}");
    assert!(
        events.iter().any(|e| e["reason"] == "malformed"),
        "the garbled entry is dead-lettered as malformed: {events:?}"
    );
    // Nothing but JSON on standard error: a log pipeline can read every line.
    for l in lines.lock().unwrap().iter() {
        assert!(
            serde_json::from_str::<Value>(l).is_ok(),
            "not a JSON line: {l}"
        );
    }
}
