//! Traces across processes, as a collector sees them: an in-process OTLP/HTTP receiver, a real
//! redis-server, the real `r4 engine` processes (intake and agent, exporting by the standard
//! `OTEL_*` variables), a loopback agent that calls a loopback tool through the engine's tool
//! proxy. One task submitted through the intake API must come out as ONE trace whose spans —
//! intake, publish, deliver, agent, tool, commit — have the right parents, exported by the
//! engines' graceful shutdown at the latest; the JSON logs carry the same trace id.

mod engine_common;
use engine_common::{free_port, serve_app};

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::time::Instant;

/// One span as received.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    kind: i32,
    attrs: HashMap<String, String>,
}

/// The in-process collector: decodes OTLP/HTTP protobuf exports into [`Got`]s.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
    let sink = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return StatusCode::BAD_REQUEST;
                };
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| value(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Got {
                                service: service.clone(),
                                name: s.name,
                                trace: hex::encode(s.trace_id),
                                span: hex::encode(s.span_id),
                                parent: hex::encode(s.parent_span_id),
                                kind: s.kind,
                                attrs: s
                                    .attributes
                                    .iter()
                                    .map(|kv| {
                                        let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                                        (kv.key.clone(), value(v))
                                    })
                                    .collect(),
                            });
                        }
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let addr = serve_app(app).await;
    (format!("http://{addr}"), spans)
}

fn value(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An engine process whose stderr is kept, stopped with SIGTERM (its graceful shutdown).
struct Proc(Option<Child>);

impl Proc {
    fn start(cmd: &mut Command) -> Self {
        Self(Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start r4 engine"),
        ))
    }

    /// SIGTERM, wait for the exit (up to 30 s, then SIGKILL), return stderr.
    async fn stop(mut self) -> String {
        let mut child = self.0.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("engine did not stop within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut err = String::new();
        use std::io::Read;
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        err
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_trace_across_every_hop() {
    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    let (collector, spans) = receiver().await;

    // The tool records the traceparent it was called with.
    let tool_saw: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = tool_saw.clone();
    let tool = serve_app(Router::new().route(
        "/{*path}",
        post(move |h: HeaderMap| {
            let seen = seen.clone();
            async move {
                let tp = h.get("traceparent").and_then(|v| v.to_str().ok());
                seen.lock().unwrap().push(tp.unwrap_or("").to_owned());
                "{\"statement\":42}"
            }
        }),
    ))
    .await;

    // The agent calls the tool through the proxy, passing on its key and traceparent, as an
    // agent does; a failed tool call fails the delivery (the engine retries it).
    let tools_port = free_port();
    let agent_saw: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = agent_saw.clone();
    let client = reqwest::Client::new();
    let proxy = format!("http://127.0.0.1:{tools_port}");
    let to_proxy = (client.clone(), proxy.clone());
    let agent = serve_app(Router::new().route(
        "/",
        post(move |h: HeaderMap| {
            let seen = seen.clone();
            let (client, proxy) = to_proxy.clone();
            async move {
                let tp = h
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let key = h
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                seen.lock().unwrap().push(tp.clone());
                let r = client
                    .post(format!("{proxy}/tools/bank"))
                    .header("traceparent", tp)
                    .header("idempotency-key", key)
                    .body("{}")
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        (StatusCode::OK, "{\"output\":{\"ok\":true}}")
                    }
                    _ => (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"tool\"}"),
                }
            }
        }),
    ))
    .await;

    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        format!(
            r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: traced}}
spec:
  queue: {{redis: {{url: "{url}"}}, visibilityTimeout: 5s}}
  tools:
    - {{name: bank, url: "http://{tool}/statements", idempotent: true}}
  agents:
    - {{name: a, image: i, consumes: in, produces: [done], tools: [bank]}}
"#,
            url = redis.url()
        ),
    )
    .unwrap();
    let engine = |role: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_r4"));
        c.args(["engine", "--role", role, "--redis", &redis.url()])
            .arg("--workflow-file")
            .arg(&wf)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
            // Spans wait in the batch far longer than the test: what arrives was flushed by
            // the graceful shutdown.
            .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
            .env("R4_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,r4=info")
            .env("NO_PROXY", "127.0.0.1")
            .env_remove("OTEL_SDK_DISABLED")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_TRACES_SAMPLER")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        c
    };
    let intake_port = free_port();
    // The intake logs errors only: the log filter must not cut its spans out of the export.
    let intake = Proc::start(
        engine("intake")
            .args(["--listen", &format!("127.0.0.1:{intake_port}")])
            .env("RUST_LOG", "error"),
    );
    let agent_engine = Proc::start(
        engine("agent")
            .args(["--agent", "a"])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--tools-listen", &format!("127.0.0.1:{tools_port}")])
            .args(["--agent-url", &format!("http://{agent}/")]),
    );

    // The proxy answers once it has read the kill switches (a probe of its own trace).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .post(format!("{proxy}/tools/bank"))
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(r) => panic!("the tool proxy never answered 200: {}", r.status()),
            Err(e) => panic!("the tool proxy never came up: {e}"),
        }
    }

    // One task, with the client's own trace context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let base = format!("http://127.0.0.1:{intake_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let task_id = loop {
        let r = client
            .post(format!("{base}/v1/tasks"))
            .header("traceparent", format!("00-{trace}-{client_span}-01"))
            .json(&serde_json::json!({"q": 1}))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 202 => {
                let v: serde_json::Value = r.json().await.unwrap();
                break v["task_id"].as_str().unwrap().to_owned();
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("the intake never accepted the task: {other:?}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = client
            .get(format!("{base}/v1/tasks/{task_id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["state"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "task never completed: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        spans.lock().unwrap().iter().all(|s| s.trace != trace),
        "nothing is exported before the batch delay or the shutdown"
    );

    // Graceful shutdown flushes.
    let intake_log = intake.stop().await;
    let agent_log = agent_engine.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let need = [
        "r4.intake",
        "r4.publish",
        "r4.deliver",
        "r4.agent",
        "r4.tool",
        "r4.commit",
    ];
    let ours = loop {
        let ours: Vec<Got> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect();
        if need.iter().all(|n| ours.iter().any(|s| &s.name == n)) {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "spans of the trace missing after shutdown: {ours:#?}\n--- intake\n{intake_log}\n--- agent\n{agent_log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let one = |name: &str| {
        let v: Vec<&Got> = ours.iter().filter(|s| s.name == name).collect();
        assert_eq!(v.len(), 1, "one {name} span: {ours:#?}");
        v[0].clone()
    };
    let (intake_s, publish, deliver, commit) = (
        one("r4.intake"),
        one("r4.publish"),
        one("r4.deliver"),
        one("r4.commit"),
    );
    assert_eq!(
        intake_s.parent, client_span,
        "intake: child of the client's span"
    );
    assert_eq!(publish.parent, intake_s.span);
    assert_eq!(
        deliver.parent, publish.span,
        "the stream entry carried the publish span"
    );
    assert_eq!(commit.parent, deliver.span);
    assert_eq!(deliver.attrs.get("r4.task_id"), Some(&task_id));
    assert_eq!(
        deliver.attrs.get("trace_id").map(String::as_str),
        Some(trace)
    );
    assert_eq!(deliver.attrs.get("span_id"), Some(&deliver.span));
    assert_eq!(deliver.attrs.get("r4.step").map(String::as_str), Some("a"));
    assert_eq!(
        commit.attrs.get("r4.outcome").map(String::as_str),
        Some("committed")
    );
    for s in &ours {
        assert_eq!(s.service, "r4-engine", "{s:?}");
        let kind = match s.name.as_str() {
            "r4.intake" => 2,
            "r4.agent" | "r4.tool" => 3,
            "r4.publish" => 4,
            "r4.deliver" => 5,
            _ => 1,
        };
        assert_eq!(s.kind, kind, "{s:?}");
    }
    let agents: Vec<&Got> = ours.iter().filter(|s| s.name == "r4.agent").collect();
    let tools: Vec<&Got> = ours.iter().filter(|s| s.name == "r4.tool").collect();
    for a in &agents {
        assert_eq!(
            a.parent, deliver.span,
            "agent request: child of the delivery"
        );
    }
    for t in &tools {
        assert!(
            agents.iter().any(|a| a.span == t.parent),
            "tool call: child of an agent request: {t:?}"
        );
        assert_eq!(t.attrs.get("r4.tool").map(String::as_str), Some("bank"));
    }
    let last_agent = agents
        .iter()
        .find(|a| a.attrs.get("http.response.status_code").map(String::as_str) == Some("200"))
        .expect("a successful agent request");
    // What went over the wire names those spans.
    assert!(
        agent_saw
            .lock()
            .unwrap()
            .contains(&format!("00-{trace}-{}-01", last_agent.span)),
        "the agent received its request span's context"
    );
    let ok_tool = tools
        .iter()
        .find(|t| t.parent == last_agent.span)
        .expect("the tool call of the successful request");
    assert!(
        tool_saw
            .lock()
            .unwrap()
            .contains(&format!("00-{trace}-{}-01", ok_tool.span)),
        "the tool received its call span's context"
    );

    // The JSON logs carry the trace: the audit event of that tool call.
    let audit: Vec<serde_json::Value> = agent_log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "r4::audit" && v["trace_id"] == trace)
        .collect();
    let ok = audit
        .iter()
        .find(|v| v["span_id"] == ok_tool.span.as_str())
        .unwrap_or_else(|| panic!("the audit line of the tool call: {audit:#?}\n{agent_log}"));
    assert_eq!(ok["tool"], "bank");
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["key"], format!("{task_id}:a"));
    assert_eq!(ok["workflow"], "default/traced");
    assert_eq!(ok["agent"], "a");
    assert_eq!(ok["degraded"], false);
    assert_eq!(ok["attempts"], 1);
}

#[test]
fn a_malformed_otel_variable_is_one_line_and_export_stays_off() {
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: wf}
spec:
  queue: {redis: {url: "redis://127.0.0.1:6379"}}
  agents: [{name: a, image: i, consumes: in}]
"#,
    )
    .unwrap();
    for (var, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_r4"))
            .args(["validate", "--file"])
            .arg(&wf)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .expect("run r4");
        assert!(out.status.success(), "{var}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let named: Vec<&str> = err.lines().filter(|l| l.contains(var)).collect();
        assert_eq!(named.len(), 1, "{var}: {err}");
        assert!(named[0].contains("trace export off"), "{err}");
    }
}
