//! `r4 sim-agent`, the real binary: the agent protocol as the engine speaks it, its tool calls
//! through a proxy (their answers, keys and deadline), its graceful stop, and a real engine on
//! a real Redis delivering to it — every task completes; with `--error-rate 1` every task ends
//! in the DLQ after `maxDeliveries`; with `--call bank` the bank sees one request per task,
//! carrying the task's key.

mod engine_common;
use engine_common::{eventually, serve_app};

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use r4::engine::{AgentRole, HttpDelivery, WorkflowConfig};
use r4::queue::Queue;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// A running `r4 sim-agent`, killed on drop.
struct SimAgent {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`, as the binary printed it.
    url: String,
}

impl SimAgent {
    /// Start `r4 sim-agent --listen 127.0.0.1:0 ARGS…` and read the address it prints.
    async fn start(args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_r4"))
            .args(["sim-agent", "--listen", "127.0.0.1:0"])
            .args(args)
            // The image's configuration comes from the environment; none of it here.
            .env_remove("R4_AGENT_PORT")
            .env_remove("R4_TOOLS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start r4 sim-agent");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("r4 sim-agent printed nothing within 20 s")
            .expect("read stdout")
            .expect("r4 sim-agent exited before printing its address");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        assert!(line.starts_with("r4 sim-agent: "), "{line}");
        Self { child, url }
    }

    /// The exit status, once the process has exited (within `within`).
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("r4 sim-agent still running after {within:?}"))
            .expect("wait")
    }
}

/// `POST /tasks` as the engine sends it.
async fn deliver(
    url: &str,
    key: Option<&str>,
    deadline_ms: Option<u64>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/tasks"))
        .timeout(Duration::from_secs(20))
        .header("traceparent", TRACEPARENT)
        .json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    if let Some(ms) = deadline_ms {
        req = req.header("X-R4-Deadline-Ms", ms);
    }
    let resp = req.send().await.expect("sim agent answers");
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let body: Value = resp.json().await.expect("a JSON answer");
    (status, body)
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn task(id: &str, payload: Value) -> Value {
    json!({"task_id": id, "step": "investigation", "kind": "task", "payload": payload, "attempt": 1})
}

#[tokio::test]
async fn the_binary_answers_the_protocol_and_refuses_what_it_does_not_allow() {
    let agent = SimAgent::start(&["--name", "sim-1", "--latency", "5ms"]).await;
    let url = agent.url.as_str();
    let (status, body) = deliver(
        url,
        Some("t1:investigation"),
        Some(2000),
        &task("t1", json!({"ticket": 1001, "amount": 129.9})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"output": {"ticket": 1001, "amount": 129.9,
            "r4_sim": {"agent": "sim-1", "step": "investigation", "attempt": 1}}})
    );
    // A bad body, a missing key, a payload that is not an object: 400 with one line naming it.
    for (key, body, want) in [
        (Some("k"), json!({"task_id": "t2"}), "body: missing field"),
        (None, task("t2", json!({})), "Idempotency-Key: missing"),
        (
            Some("k"),
            task("t2", json!("text")),
            "payload: must be a JSON object",
        ),
    ] {
        let (status, answer) = deliver(url, key, None, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(want),
            "{answer}"
        );
    }
    let raw = reqwest::Client::new()
        .post(format!("{url}/tasks"))
        .header("Idempotency-Key", "k")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    for (path, want) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let r = reqwest::get(format!("{url}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), want);
    }
}

/// Bad flag values: one line naming the flag (or the variable), exit 2, nothing served.
#[test]
fn bad_flags_are_one_line_naming_the_flag() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_r4"));
        c.arg("sim-agent").args(args).env_remove("R4_AGENT_PORT");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run r4");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, env, want) in [
        (
            &["--error-rate", "1.5"][..],
            &[][..],
            "'--error-rate <FRACTION>'",
        ),
        (
            &["--fail-permanently-rate", "-1"][..],
            &[][..],
            "'--fail-permanently-rate <FRACTION>'",
        ),
        (&["--latency", "1s,10ms"][..], &[][..], "below its median"),
        (
            &["--call", "bank//x"][..],
            &[][..],
            "'--call <TOOL[/PATH]>'",
        ),
        (
            &["--tools-url", "localhost:8082"][..],
            &[][..],
            "'--tools-url <URL>'",
        ),
        (
            &[][..],
            &[("R4_SIM_ERROR_RATE", "lots")][..],
            "'--error-rate <FRACTION>'",
        ),
        (
            &[][..],
            &[("R4_AGENT_PORT", "http")][..],
            "R4_AGENT_PORT: expected a port",
        ),
    ] {
        let (code, err) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

/// The sim agent reads the variables the controller sets in an agent container.
#[test]
fn it_reads_the_variables_the_controller_sets() {
    use r4::controller::render;
    use r4::local::simagent_server as sim;
    assert_eq!(sim::AGENT_PORT_ENV, render::AGENT_PORT_ENV);
    assert_eq!(
        i32::from(sim::DEFAULT_AGENT_PORT),
        render::DEFAULT_AGENT_PORT
    );
    assert_eq!(sim::TOOLS_URL_ENV, render::TOOLS_URL_ENV);
    assert_eq!(
        sim::DEFAULT_TOOLS_URL,
        format!("http://127.0.0.1:{}", render::TOOLS_PORT)
    );
}

/// What a fake tool proxy saw: path, idempotency key, traceparent.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A stand-in for the engine's tool proxy: `/tools/ok…` 200, `/tools/cached` 200 from a
/// fallback, `/tools/down` 503 (breaker open), `/tools/refused` 403, `/tools/throttled` 429,
/// `/tools/slow` and `/tools/hold` answer once `release` is notified (`/tools/hold` first says
/// it arrived on `arrived`).
async fn fake_proxy(
    release: Arc<tokio::sync::Notify>,
    arrived: Arc<tokio::sync::Notify>,
) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let app = Router::new().route(
        "/tools/{*rest}",
        post(
            move |axum::extract::Path(rest): axum::extract::Path<String>, h: HeaderMap| {
                let (seen, release, arrived) = (s2.clone(), release.clone(), arrived.clone());
                async move {
                    let header = |n: &str| {
                        h.get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    seen.lock().unwrap().push((
                        rest.clone(),
                        header("idempotency-key"),
                        header("traceparent"),
                    ));
                    let tool = rest.split('/').next().unwrap_or("").to_string();
                    let degraded = |status: u16, reason: &str| {
                        (
                            StatusCode::from_u16(status).unwrap(),
                            [("r4-degraded", format!("{tool}; reason={reason}"))],
                            "{}",
                        )
                    };
                    match tool.as_str() {
                        "cached" => degraded(200, "fallback"),
                        "down" => degraded(503, "breaker-open"),
                        "refused" => degraded(403, "not-allowed"),
                        "throttled" => degraded(429, "throttled"),
                        "slow" | "hold" => {
                            if tool == "hold" {
                                arrived.notify_one();
                            }
                            release.notified().await;
                            degraded(200, "none")
                        }
                        _ => (StatusCode::OK, [("x-tool", tool.clone())], "{}"),
                    }
                }
            },
        ),
    );
    (format!("http://{}", serve_app(app).await), seen)
}

#[tokio::test]
async fn tool_answers_decide_the_delivery_within_its_deadline() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (proxy, seen) = fake_proxy(release.clone(), Arc::default()).await;
    let start = |calls: &'static str| {
        let proxy = proxy.clone();
        async move {
            SimAgent::start(&["--latency", "0ms", "--tools-url", &proxy, "--call", calls]).await
        }
    };

    // Two calls in order, the second answered by a fallback: passed on, marked degraded.
    let ok = start("ok/statements/latest,cached").await;
    let (status, body) = deliver(&ok.url, Some("t1:a"), Some(5000), &task("t1", json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let record = &body["output"]["r4_sim"];
    assert_eq!(
        record["calls"],
        json!([{"tool": "ok", "status": 200}, {"tool": "cached", "status": 200}])
    );
    assert_eq!(record["degraded"], json!(["cached; reason=fallback"]));
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [
            (
                "ok/statements/latest".to_string(),
                "t1:a".to_string(),
                TRACEPARENT.to_string()
            ),
            (
                "cached".to_string(),
                "t1:a".to_string(),
                TRACEPARENT.to_string()
            ),
        ],
        "each call carries the delivery's key and trace, in the order given"
    );

    // A failed tool: retryable, naming the tool; a refusal: permanent; 429: retryable.
    for (calls, want, reason) in [
        ("down", StatusCode::SERVICE_UNAVAILABLE, "breaker-open"),
        ("refused", StatusCode::UNPROCESSABLE_ENTITY, "not-allowed"),
        ("throttled", StatusCode::SERVICE_UNAVAILABLE, "throttled"),
    ] {
        let agent = start(calls).await;
        let (status, body) =
            deliver(&agent.url, Some("t2:a"), Some(5000), &task("t2", json!({}))).await;
        assert_eq!(status, want, "{calls}: {body}");
        assert_eq!(body["tool"], calls, "{body}");
        assert!(body["error"].as_str().unwrap().contains(reason), "{body}");
    }

    // A tool that does not answer: the delivery answers 504 when the task's deadline is up,
    // not when the tool would have.
    let slow = start("slow").await;
    let t0 = Instant::now();
    let (status, body) = deliver(&slow.url, Some("t3:a"), Some(300), &task("t3", json!({}))).await;
    let took = t0.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["tool"], "slow", "{body}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "answered after {took:?} for a 300 ms deadline"
    );

    // The proxy is not there at all: retryable, naming the tool.
    let gone = SimAgent::start(&["--tools-url", "http://127.0.0.1:9", "--call", "bank"]).await;
    let (status, body) = deliver(&gone.url, Some("t4:a"), Some(5000), &task("t4", json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["tool"], "bank", "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.starts_with("tool bank: cannot reach the tool proxy at http://127.0.0.1:9: "),
        "{e}"
    );
}

/// SIGTERM while a delivery is in flight (held at its tool call): the delivery still gets its
/// answer, then the process exits 0 and the port is closed.
#[tokio::test]
async fn sigterm_finishes_the_delivery_in_flight_then_exits() {
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (proxy, _seen) = fake_proxy(release.clone(), arrived.clone()).await;
    let mut agent =
        SimAgent::start(&["--latency", "0ms", "--tools-url", &proxy, "--call", "hold"]).await;
    let url = agent.url.clone();
    let in_flight = tokio::spawn(async move {
        deliver(
            &url,
            Some("t1:a"),
            Some(10_000),
            &task("t1", json!({"n": 1})),
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), arrived.notified())
        .await
        .expect("the delivery reached its tool call");
    let pid = agent.child.id().expect("running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    // Stopping: new connections are refused once the listener is closed.
    eventually("the listener closed", Duration::from_secs(10), || async {
        reqwest::Client::new()
            .get(format!("{}/healthz", agent.url))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_err()
    })
    .await;
    release.notify_one();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["output"]["n"], 1);
    let exit = agent.exited(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
}

/// An engine role of agent `agent` of `cfg`, delivering to `url` (the sim agent's `/tasks`).
fn engine(
    cfg: &Arc<WorkflowConfig>,
    q: &Arc<dyn Queue>,
    agent: &str,
    url: &str,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> (Arc<r4::engine::Stats>, tokio::task::JoinHandle<()>) {
    let role = AgentRole::new(
        cfg.clone(),
        agent,
        q.clone(),
        Arc::new(HttpDelivery::new(format!("{url}/tasks")).unwrap()),
        &r4::engine::engine_id(agent),
    )
    .unwrap()
    .with_options(engine_common::fast_opts());
    let stats = role.stats();
    let stop = stop.clone();
    (
        stats,
        tokio::spawn(async move { role.run(stop).await.unwrap() }),
    )
}

async fn redis() -> (r4::testutil::RedisServer, Arc<dyn Queue>) {
    let server = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    let q = r4::queue::redis::RedisQueue::connect(&server.url())
        .await
        .expect("connect");
    (server, Arc::new(q))
}

/// The payloads in `stream`.
async fn payloads(q: &Arc<dyn Queue>, cfg: &WorkflowConfig, stream: &str) -> Vec<Value> {
    q.range(&cfg.keys.stream(stream), "-", "+", 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            r4::engine::task::Task::decode(&e.fields, 1 << 20)
                .unwrap()
                .payload
        })
        .collect()
}

#[tokio::test]
async fn an_engine_completes_every_task_through_the_sim_agent() {
    let (_server, q) = redis().await;
    let cfg = Arc::new(engine_common::workflow(
        "sim",
        r#"    - {name: a, image: x, consumes: in, produces: [ab]}
    - {name: b, image: x, consumes: ab, produces: [done]}"#,
        "",
    ));
    let agent = SimAgent::start(&["--name", "sim-e2e", "--latency", "2ms,20ms"]).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (a, ha) = engine(&cfg, &q, "a", &agent.url, &stopped);
    let (b, hb) = engine(&cfg, &q, "b", &agent.url, &stopped);
    let n = 30;
    for i in 0..n {
        engine_common::add_task(&q, &cfg, "in", &format!("task-{i}"), json!({"n": i})).await;
    }
    eventually(
        "every task through a and b",
        Duration::from_secs(60),
        || async { b.counters().completed >= n },
    )
    .await;
    let done = payloads(&q, &cfg, "done").await;
    assert_eq!(done.len() as u64, n);
    let ns: BTreeSet<u64> = done.iter().map(|p| p["n"].as_u64().unwrap()).collect();
    assert_eq!(
        ns,
        (0..n).collect(),
        "each task once, its payload passed on"
    );
    assert!(
        done.iter()
            .all(|p| p["r4_sim"]["agent"] == "sim-e2e" && p["r4_sim"]["step"] == "b"),
        "{done:?}"
    );
    assert_eq!(a.counters().completed, n);
    assert!(engine_common::dlq(&q, &cfg).await.is_empty());
    stop.send(true).unwrap();
    for h in [ha, hb] {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
}

#[tokio::test]
async fn with_error_rate_1_every_task_ends_in_the_dlq_after_max_deliveries() {
    let (_server, q) = redis().await;
    let cfg = Arc::new(engine_common::workflow(
        "sim-fail",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let agent = SimAgent::start(&["--latency", "0ms", "--error-rate", "1"]).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (a, h) = engine(&cfg, &q, "a", &agent.url, &stopped);
    let n = 5;
    for i in 0..n {
        engine_common::add_task(&q, &cfg, "in", &format!("task-{i}"), json!({"n": i})).await;
    }
    eventually(
        "every task dead-lettered",
        Duration::from_secs(60),
        || async { engine_common::dlq(&q, &cfg).await.len() as u64 >= n },
    )
    .await;
    let dlq = engine_common::dlq(&q, &cfg).await;
    assert_eq!(dlq.len() as u64, n);
    for r in &dlq {
        // FAST_POLICY: deadLetter.maxDeliveries 3.
        assert_eq!(r.deliveries, 3, "{r:?}");
        assert!(r.error.contains("503"), "{r:?}");
        assert!(r.error.contains("simulated failure"), "{r:?}");
    }
    assert_eq!(a.counters().completed, 0);
    assert!(payloads(&q, &cfg, "done").await.is_empty());
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
}

#[tokio::test]
async fn with_call_bank_the_bank_sees_one_request_per_task_with_its_key() {
    let (_server, q) = redis().await;
    // The bank: records the path and key of every request it gets.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s2 = seen.clone();
    let bank = serve_app(Router::new().route(
        "/{*path}",
        post(
            move |axum::extract::Path(path): axum::extract::Path<String>, h: HeaderMap| {
                let seen = s2.clone();
                async move {
                    let key = h
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push((path, key));
                    "{\"statement\": 42}"
                }
            },
        ),
    ))
    .await;
    let cfg = Arc::new(engine_common::workflow(
        "sim-tools",
        "    - {name: a, image: x, consumes: in, produces: [done], tools: [bank]}",
        &format!("  tools:\n    - {{name: bank, url: \"http://{bank}/api\", idempotent: true}}"),
    ));
    // The engine's tool proxy, served on loopback as in a pod (kill switches known: none).
    let client = reqwest::Client::new();
    let proxy = Arc::new(
        cfg.tool_proxy(
            &|_| r4::engine::tools::http_transport(client.clone()),
            None,
            None,
        )
        .unwrap(),
    );
    proxy.set_killed(BTreeSet::new());
    let tools = serve_app(r4::engine::tools::http::router(proxy, vec!["bank".into()])).await;
    let agent = SimAgent::start(&[
        "--latency",
        "1ms",
        "--tools-url",
        &format!("http://{tools}"),
        "--call",
        "bank/statements",
    ])
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (a, h) = engine(&cfg, &q, "a", &agent.url, &stopped);
    let n = 20;
    for i in 0..n {
        engine_common::add_task(&q, &cfg, "in", &format!("task-{i}"), json!({"n": i})).await;
    }
    eventually("every task completed", Duration::from_secs(60), || async {
        a.counters().completed >= n
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, n, "one bank request per task: {seen:?}");
    let keys: BTreeSet<String> = seen.iter().map(|(_, k)| k.clone()).collect();
    let want: BTreeSet<String> = (0..n).map(|i| format!("task-{i}:a")).collect();
    assert_eq!(keys, want, "each carries its task's Idempotency-Key");
    assert!(seen.iter().all(|(p, _)| p == "api/statements"), "{seen:?}");
    let done = payloads(&q, &cfg, "done").await;
    assert_eq!(done.len() as u64, n);
    assert!(
        done.iter()
            .all(|p| p["r4_sim"]["calls"] == json!([{"tool": "bank", "status": 200}])),
        "{done:?}"
    );
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
}
