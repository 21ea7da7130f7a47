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
        metrics.contains("r4_policy_calls_total{namespace=\"default\",outcome=\"success\",target=\"bank\",workflow=\"wf\"} 1"),
        "{metrics}"
    );
}

/// The seed's order (issue 10): breakers trip, cached statements answer, and only what the
/// cache cannot serve is rerouted. An agent engine on a real Redis delivers to a loopback
/// agent that asks a loopback bank for a statement through the engine's tool proxy (over
/// HTTP, with its idempotency key in the header and in the body). While the bank's breaker is
/// open, a task whose statement was cached before the outage completes from the cache; only
/// the tasks asking for a statement never seen are routed to manual review.
#[tokio::test]
async fn during_an_outage_cached_statements_complete_and_only_misses_are_routed() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use axum::Json;
    use axum::http::StatusCode;
    use r4::engine::{AgentRole, HttpDelivery, WorkflowConfig};
    use r4::queue::Queue;

    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    let q: Arc<dyn Queue> = Arc::new(
        r4::queue::redis::RedisQueue::connect(&redis.url())
            .await
            .unwrap(),
    );

    // The bank: the statement of the account asked for, or 503 while down.
    let down = Arc::new(AtomicBool::new(false));
    let bank_requests = Arc::new(AtomicU64::new(0));
    let (d2, n2) = (down.clone(), bank_requests.clone());
    let bank = serve_app(Router::new().route(
        "/{*path}",
        post(move |Json(body): Json<serde_json::Value>| {
            let (down, n) = (d2.clone(), n2.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if down.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, "{}".to_string());
                }
                let acct = body["account"].as_u64().unwrap_or(u64::MAX);
                (StatusCode::OK, format!("{{\"statement\":{acct}}}"))
            }
        }),
    ))
    .await;

    let yaml = format!(
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: disputes}}
spec:
  queue: {{redis: {{url: "{url}"}}, visibilityTimeout: 5s}}
  policyRef: wf-policy
  tools:
    - {{name: bank, url: "http://{bank}/statements", policyRef: bank-policy, readOnly: true, idempotent: true, fallback: {{cache: {{ttl: 10m}}}}}}
  agents:
    - name: investigation
      image: i
      concurrency: 8
      consumes: in
      tools: [bank]
      degradedMode: {{whenToolsDown: [bank], action: Route, to: manual}}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: wf-policy}}
spec:
  timeout: {{perAttempt: 5s, overall: 10s}}
  retry: {{maxAttempts: 3, backoff: {{initial: 50ms, max: 200ms, jitter: None}}}}
  deadLetter: {{maxDeliveries: 5, replay: {{automatic: false}}}}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: bank-policy}}
spec:
  timeout: {{perAttempt: 2s, overall: 5s}}
  retry: {{maxAttempts: 1}}
  circuitBreaker: {{failureRateThreshold: 0.5, window: {{type: Count, size: 10}}, minimumCalls: 5, openDuration: 1h}}
"#,
        url = redis.url()
    );
    let cfg = Arc::new(
        WorkflowConfig::from_yaml(
            "wf.yaml",
            &yaml,
            None,
            Some(&format!(
                "fb-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )),
        )
        .unwrap(),
    );

    // The engine's tool proxy, served on loopback as in a pod, kept in step with Redis.
    let client = reqwest::Client::new();
    let proxy = Arc::new(
        cfg.tool_proxy(
            &|_| r4::engine::tools::http_transport(client.clone()),
            None,
            None,
        )
        .unwrap(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(r4::engine::tools::supervise(
        proxy.clone(),
        q.clone(),
        cfg.clone(),
        "e1".into(),
        stop_rx.clone(),
    ));
    let tools = serve_app(r4::engine::tools::http::router(
        proxy.clone(),
        vec!["bank".into()],
    ))
    .await;

    // The agent: asks the bank (through the proxy) for the statement of its task's account,
    // sending the idempotency key it was given in the header and in the body.
    let completed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let c2 = completed.clone();
    let agent = serve_app(Router::new().route(
        "/",
        post(move |h: HeaderMap, Json(req): Json<serde_json::Value>| {
            let completed = c2.clone();
            let client = reqwest::Client::new();
            async move {
                let key = h["idempotency-key"].to_str().unwrap().to_string();
                let acct = req["payload"]["account"].as_u64().unwrap();
                let r = client
                    .post(format!("http://{tools}/tools/bank"))
                    .header("Idempotency-Key", &key)
                    .json(&serde_json::json!({"account": acct, "idempotency_key": key}))
                    .send()
                    .await
                    .unwrap();
                if r.status().is_success() {
                    completed.lock().unwrap().push(acct);
                    (StatusCode::OK, "{}".to_string())
                } else {
                    let why = format!("bank answered {}", r.status());
                    let body = serde_json::json!({"error": why, "tool": "bank"});
                    (StatusCode::SERVICE_UNAVAILABLE, body.to_string())
                }
            }
        }),
    ))
    .await;
    let role = AgentRole::new(
        cfg.clone(),
        "investigation",
        q.clone(),
        Arc::new(HttpDelivery::new(format!("http://{agent}/")).unwrap()),
        "e1",
    )
    .unwrap()
    .with_options(r4::engine::AgentOptions {
        read_block: Duration::from_millis(50),
        ..Default::default()
    });
    let stats = role.stats();
    let engine = tokio::spawn(role.run(stop_rx));

    let input = cfg.keys.stream("in");
    let mut n = 0;
    let mut submit = |accounts: Vec<u64>| {
        let q = q.clone();
        let input = input.clone();
        let first = n;
        n += accounts.len();
        async move {
            for (i, acct) in accounts.into_iter().enumerate() {
                let t = r4::engine::task::Task::new(
                    format!("task-{}", first + i),
                    serde_json::json!({"account": acct}),
                );
                q.add(&input, t.encode(), None).await.unwrap();
            }
        }
    };
    let routed = || async {
        q.range(&cfg.keys.stream("manual"), "-", "+", 1000)
            .await
            .unwrap()
            .iter()
            .map(|e| {
                let t = r4::engine::task::Task::decode(&e.fields, 1 << 20).unwrap();
                t.payload["account"].as_u64().unwrap()
            })
            .collect::<Vec<u64>>()
    };
    let wait = |what: &'static str, done: usize| {
        let completed = completed.clone();
        let stats = stats.clone();
        async move {
            engine_common::eventually(what, Duration::from_secs(30), || {
                let c = completed.lock().unwrap().len() as u64;
                let s = stats.counters();
                async move { c + s.routed + s.dead_lettered >= done as u64 }
            })
            .await
        }
    };

    // Before the outage: accounts 0..9 are asked for (twice each), so their statements are cached.
    submit((0..20).map(|i| i % 10).collect()).await;
    wait("the warm-up tasks", 20).await;
    assert_eq!(stats.counters().routed, 0);

    // The bank goes down. Tasks for cached accounts still complete (from the cache) while
    // the failures the breaker sees open it, and the downgrade is broadcast.
    down.store(true, Ordering::SeqCst);
    submit((0..10).collect()).await;
    wait("the tasks that trip the breaker", 30).await;
    engine_common::eventually("the downgrade", Duration::from_secs(10), || async {
        r4::engine::degraded::current(q.as_ref(), &cfg.keys, "investigation")
            .await
            .unwrap()
            .is_some_and(|d| d.fallback == ["bank"])
    })
    .await;
    assert_eq!(completed.lock().unwrap().len(), 30);
    assert_eq!(stats.counters().routed, 0);

    // The measured outage: 30 tasks over accounts 0..14. 20 ask for a cached statement, 10
    // (accounts 10..14) for one never seen.
    let sent = bank_requests.load(Ordering::SeqCst);
    submit((0..30).map(|i| i % 15).collect()).await;
    wait("the outage tasks", 60).await;
    let during: Vec<u64> = completed.lock().unwrap()[30..].to_vec();
    let mut routed_accounts = routed().await;
    routed_accounts.sort();
    assert_eq!(
        (during.len(), routed_accounts.len()),
        (20, 10),
        "of 30 tasks during the outage, the 20 cached complete and the 10 misses are routed"
    );
    assert!(during.iter().all(|a| *a < 10), "{during:?}");
    assert_eq!(routed_accounts, [10, 10, 11, 11, 12, 12, 13, 13, 14, 14]);
    let c = stats.counters();
    assert_eq!((c.routed, c.dead_lettered), (10, 0), "{c:?}");
    assert_eq!(
        bank_requests.load(Ordering::SeqCst),
        sent,
        "the open breaker kept every call away from the bank"
    );
    assert!(proxy.counters()["bank"].fallbacks >= 30);

    stop_tx.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), engine).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), supervisor).await;
}
