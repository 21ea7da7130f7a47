//! CircuitPolicies reload without a restart: the real `r4 engine --role agent` process, a
//! loopback tool, the controller's `policies::publish` on a real Redis. The same process
//! (same pid, same engine id) fails a call under the old policy and makes it under the new
//! one; a tool whose policy did not change keeps its breaker; the engine's published
//! snapshot and `/metrics` carry the version it runs. And an agent role running in process
//! takes the published dead-letter settings for its next task.

mod engine_common;
use engine_common::{Engine, eventually, free_port, serve_app};

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use r4::api::policy::CircuitPolicySpec;
use r4::engine::policies;
use r4::queue::{Keys, Queue};

const FAST: &str = "timeout: {perAttempt: 100ms}\nretry: {maxAttempts: 1}";
const PATIENT: &str = "timeout: {perAttempt: 2s}\nretry: {maxAttempts: 1}";
const BREAKER: &str = "retry: {maxAttempts: 1}\ncircuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 4}, minimumCalls: 4, openDuration: 1h}";

fn policy(yaml: &str) -> CircuitPolicySpec {
    serde_yaml::from_str(yaml).unwrap()
}

async fn call(client: &reqwest::Client, proxy: &str, tool: &str) -> (u16, String) {
    let r = client
        .post(format!("{proxy}/tools/{tool}"))
        .header("Idempotency-Key", "t1:a")
        .body("{}")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let reason = r
        .headers()
        .get("r4-degraded")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (r.status().as_u16(), reason)
}

async fn snapshot_version(q: &dyn Queue, keys: &Keys, engine: &str) -> Option<u64> {
    let stats = r4::engine::stats::read_workflow(q, keys).await.ok()?;
    stats
        .engines
        .iter()
        .find(|s| s.engine_id == engine)
        .map(|s| s.policy_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_engine_takes_a_published_policy_without_a_restart() {
    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    // `slow` answers after 300 ms; `flaky` always fails.
    let tool = serve_app(
        Router::new()
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "{\"ok\":true}"
                }),
            )
            .route(
                "/flaky",
                post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "{}") }),
            ),
    )
    .await;
    let namespace = format!("reload-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let keys = Keys::new(&namespace, "wf");
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
  tools:
    - {{name: slow, url: "http://{tool}/slow", policyRef: fast}}
    - {{name: flaky, url: "http://{tool}/flaky", policyRef: brk}}
  agents:
    - {{name: a, image: i, consumes: in, tools: [slow, flaky]}}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: fast}}
spec:
{fast}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: brk}}
spec:
{brk}
"#,
            url = redis.url(),
            fast = indent(FAST),
            brk = indent(BREAKER),
        ),
    )
    .unwrap();
    let (http_port, tools_port) = (free_port(), free_port());
    let mut engine = Engine(
        Command::new(env!("CARGO_BIN_EXE_r4"))
            .args(["engine", "--role", "agent", "--agent", "a"])
            .args(["--redis", &redis.url(), "--namespace", &namespace])
            .args(["--engine-id", "e-reload"])
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
    let pid = engine.0.id();
    let client = reqwest::Client::new();
    let proxy = format!("http://127.0.0.1:{tools_port}");
    let q: Arc<dyn Queue> = Arc::new(
        r4::queue::redis::RedisQueue::connect(&redis.url())
            .await
            .unwrap(),
    );

    // Under the file's policy: the 300 ms tool fails the 100 ms deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let up = client
            .post(format!("{proxy}/tools/slow"))
            .body("{}")
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match up {
            // Until the engine has read its kill switches, every call is refused.
            Ok(r)
                if r.headers().get("r4-degraded").and_then(|v| v.to_str().ok())
                    == Some("slow; reason=killswitch-unknown")
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
    assert_eq!(first.status(), 504);
    assert_eq!(first.headers()["r4-degraded"], "slow; reason=timeout");
    // Open the unchanged tool's breaker.
    for _ in 0..4 {
        call(&client, &proxy, "flaky").await;
    }
    assert_eq!(
        call(&client, &proxy, "flaky").await,
        (503, "flaky; reason=breaker-open".into())
    );
    eventually(
        "the file's policies in the snapshot",
        Duration::from_secs(10),
        || {
            let q = q.clone();
            let keys = keys.clone();
            async move { snapshot_version(q.as_ref(), &keys, "e-reload").await == Some(0) }
        },
    )
    .await;

    // The controller publishes the patient policy (the same breaker policy).
    let set = BTreeMap::from([
        ("fast".to_string(), policy(PATIENT)),
        ("brk".to_string(), policy(BREAKER)),
    ]);
    let v = policies::publish(q.as_ref(), &keys, &set).await.unwrap();
    assert_eq!(
        policies::publish(q.as_ref(), &keys, &set).await.unwrap(),
        v,
        "republishing the same set is no new version"
    );
    // The next call after the reload succeeds: polled, since the reload reaches the engine
    // within a re-read period at most.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, reason) = call(&client, &proxy, "slow").await;
        if status == 200 {
            break;
        }
        assert_eq!((status, reason.as_str()), (504, "slow; reason=timeout"));
        assert!(
            tokio::time::Instant::now() < deadline,
            "the published policy never reached the engine"
        );
    }
    assert_eq!(call(&client, &proxy, "slow").await.0, 200);
    // The tool whose policy did not change kept its open breaker.
    assert_eq!(
        call(&client, &proxy, "flaky").await,
        (503, "flaky; reason=breaker-open".into())
    );
    // The same engine, never restarted, says which policies it runs.
    eventually(
        "the new version in the snapshot",
        Duration::from_secs(10),
        || {
            let q = q.clone();
            let keys = keys.clone();
            async move { snapshot_version(q.as_ref(), &keys, "e-reload").await == Some(v) }
        },
    )
    .await;
    let metrics = client
        .get(format!("http://127.0.0.1:{http_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "r4_engine_policy_version{{namespace=\"{namespace}\",workflow=\"wf\"}} {v}"
        )),
        "{metrics}"
    );
    assert!(
        engine.0.try_wait().unwrap().is_none(),
        "the engine kept running"
    );
    assert_eq!(engine.0.id(), pid);

    // A published set the engine cannot run (`flaky`'s policy is missing) is refused by every
    // part of it; it keeps what it runs. (Nothing to wait for: give it a few re-read periods
    // to do what it must not.)
    let bad = BTreeMap::from([("fast".to_string(), policy(FAST))]);
    let v_bad = policies::publish(q.as_ref(), &keys, &bad).await.unwrap();
    assert!(v_bad > v);
    tokio::time::sleep(policies::REREAD * 4).await;
    assert_eq!(
        snapshot_version(q.as_ref(), &keys, "e-reload").await,
        Some(v)
    );
    assert_eq!(call(&client, &proxy, "slow").await.0, 200);
    assert_eq!(
        call(&client, &proxy, "flaky").await,
        (503, "flaky; reason=breaker-open".into())
    );
}

fn indent(yaml: &str) -> String {
    yaml.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent role takes the published dead-letter settings for the next task it handles:
/// under the file's `maxDeliveries: 3` a failing task is delivered three times; after a set
/// with `maxDeliveries: 1` is published, the same running engine dead-letters the next one
/// after one delivery, and reports the version it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_role_takes_published_dead_letter_settings() {
    use engine_common::{ScriptedAgent, add_task, dlq, queue, start_agents, workflow};
    use r4::engine::DeliveryError;
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "reload-dl",
        "    - {name: a, image: x, consumes: in}",
        "",
    ));
    let agent = ScriptedAgent::new(|_, _| Err(DeliveryError::retryable("busy")));
    let run = start_agents(&cfg, &q, &agent);
    let deliveries = |task: &str| agent.calls().iter().filter(|c| c.task_id == task).count();
    let dead = |task: &'static str| {
        let (q, cfg) = (q.clone(), cfg.clone());
        move || {
            let (q, cfg) = (q.clone(), cfg.clone());
            async move { dlq(&q, &cfg).await.iter().any(|r| r.task_id == task) }
        }
    };
    add_task(&q, &cfg, "in", "t-before", serde_json::json!({})).await;
    eventually(
        "t-before dead-lettered",
        Duration::from_secs(20),
        dead("t-before"),
    )
    .await;
    assert_eq!(deliveries("t-before"), 3, "the file's maxDeliveries");

    let mut set = cfg.policies.clone();
    let fast = set.get_mut("fast").unwrap();
    fast.dead_letter.as_mut().unwrap().max_deliveries = 1;
    let v = policies::publish(q.as_ref(), &cfg.keys, &set)
        .await
        .unwrap();
    let stats = run.stats[0].clone();
    eventually(
        "the role runs the published set",
        Duration::from_secs(10),
        || {
            let stats = stats.clone();
            async move { stats.policy_version() == v }
        },
    )
    .await;
    add_task(&q, &cfg, "in", "t-after", serde_json::json!({})).await;
    eventually(
        "t-after dead-lettered",
        Duration::from_secs(20),
        dead("t-after"),
    )
    .await;
    assert_eq!(deliveries("t-after"), 1, "the published maxDeliveries");
    let rec = dlq(&q, &cfg)
        .await
        .into_iter()
        .find(|r| r.task_id == "t-after")
        .unwrap();
    assert_eq!(rec.deliveries, 1);
    run.stop().await;
}
