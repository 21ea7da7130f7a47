//! The tool proxy as an agent container sees it: the real `r4 engine --role agent` process,
//! a loopback tool, calls to `localhost` — gating, key propagation and the policy metrics on
//! `/metrics`.

mod engine_common;
use engine_common::{Engine, free_port, serve_app};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;

#[tokio::test]
async fn the_agent_engine_serves_the_tool_proxy_and_its_metrics() {
    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    // A tool that records the idempotency keys it receives.
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = keys.clone();
    let app = Router::new().route(
        "/{*path}",
        post(move |h: HeaderMap| {
            let seen = seen.clone();
            async move {
                let k = h
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push(k);
                "{\"statement\":42}"
            }
        }),
    );
    let tool = serve_app(app).await;

    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        format!(
            r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: wf}}
spec:
  queue: {{redis: {{url: "{url}"}}}}
  policyRef: pol
  tools:
    - {{name: bank, url: "http://{tool}/statements", idempotent: true}}
    - {{name: ledger, url: "http://{tool}/entries"}}
  inputs: [other]
  agents:
    - {{name: a, image: i, consumes: in, tools: [bank]}}
    - {{name: b, image: i, consumes: other, tools: [ledger]}}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: pol}}
spec:
  retry: {{maxAttempts: 2}}
  circuitBreaker: {{failureRateThreshold: 0.5, window: {{type: Count, size: 10}}, openDuration: 5s}}
"#,
            url = redis.url()
        ),
    )
    .unwrap();
    let (http_port, tools_port) = (free_port(), free_port());
    let _engine = Engine(
        Command::new(env!("CARGO_BIN_EXE_r4"))
            .args([
                "engine",
                "--role",
                "agent",
                "--agent",
                "a",
                "--redis",
                &redis.url(),
            ])
            .arg("--workflow-file")
            .arg(&wf)
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .args(["--tools-listen", &format!("127.0.0.1:{tools_port}")])
            .args(["--agent-url", "http://127.0.0.1:9/none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start r4 engine"),
    );
    let client = reqwest::Client::new();
    let proxy = format!("http://127.0.0.1:{tools_port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        match client
            .post(format!("{proxy}/tools/bank"))
            .header("Idempotency-Key", "t1:a")
            .body("{}")
            .send()
            .await
        {
            // Until the engine has read its kill switches, every call is refused (fail closed).
            Ok(r)
                if r.headers().get("r4-degraded").and_then(|v| v.to_str().ok())
                    == Some("bank; reason=killswitch-unknown")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(r) => break r,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the tool proxy never came up: {e}"),
        }
    };
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.unwrap(), "{\"statement\":42}");
    assert_eq!(keys.lock().unwrap().as_slice(), ["t1:a"]);

    // Agent a may not call b's tool.
    let r = client
        .post(format!("{proxy}/tools/ledger"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["r4-degraded"], "ledger; reason=not-allowed");
    assert_eq!(
        keys.lock().unwrap().len(),
        1,
        "a refused call never reaches the tool"
    );

    let metrics = client
        .get(format!("http://127.0.0.1:{http_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("r4_policy_calls_total{outcome=\"success\",target=\"bank\"} 1"),
        "{metrics}"
    );
}
