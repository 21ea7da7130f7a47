//! The intake API over real HTTP on a real redis-server: idempotency, size
//! and schema limits, status, health and metrics.

mod engine_common;

use std::sync::Arc;
use std::time::Duration;

use engine_common::*;
use r4::engine::auth::Tokens;
use r4::engine::intake::IntakeOptions;
use r4::engine::limits::ServerLimits;
use r4::engine::task::{self, Task};
use r4::engine::{Intake, WorkflowConfig};
use r4::queue::Queue;
use serde_json::{Value, json};
use tokio::sync::watch;

/// A workflow with one agent, its intake on a free port over a real
/// redis-server, and an HTTP client.
struct Served {
    _redis: Backend,
    q: Arc<dyn Queue>,
    cfg: Arc<WorkflowConfig>,
    base: String,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

async fn serve_intake(name: &str) -> Served {
    serve_intake_with(
        name,
        true,
        IntakeOptions::default(),
        ServerLimits::default(),
    )
    .await
}

async fn serve_intake_with(
    name: &str,
    redis: bool,
    options: IntakeOptions,
    limits: ServerLimits,
) -> Served {
    let (redis, q) = queue(redis).await;
    let cfg = Arc::new(workflow(
        name,
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "  intake: {enabled: true, maxPayloadBytes: 1024}",
    ));
    let intake = Intake::with_options(cfg.clone(), q.clone(), &format!("{name}-intake"), options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = watch::channel(false);
    let server = tokio::spawn(r4::engine::http::serve_with(
        listener,
        intake.router(),
        rx,
        limits,
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    Served {
        _redis: redis,
        q,
        cfg,
        base,
        stop,
        server,
        http,
    }
}

#[tokio::test]
async fn intake_http_contract() {
    let Served {
        _redis,
        q,
        cfg,
        base,
        stop,
        server,
        http,
    } = serve_intake("intake").await;
    let post = |body: String, key: Option<&str>| {
        let mut r = http
            .post(format!("{base}/v1/tasks"))
            .body(body)
            .header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        r.send()
    };
    // Same key => same task id, one entry.
    let r1 = post(r#"{"ticket": 1}"#.into(), Some("k-1")).await.unwrap();
    assert_eq!(r1.status(), 202);
    let j1: Value = r1.json().await.unwrap();
    let r2 = post(r#"{"ticket": 1}"#.into(), Some("k-1")).await.unwrap();
    assert_eq!(r2.status(), 202);
    let j2: Value = r2.json().await.unwrap();
    assert_eq!(j1["task_id"], j2["task_id"]);
    assert_eq!(
        (j1["duplicate"].clone(), j2["duplicate"].clone()),
        (json!(false), json!(true))
    );
    let r3: Value = post(r#"{"ticket": 2}"#.into(), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(r3["task_id"], j1["task_id"]);
    assert_eq!(q.len(&cfg.keys.stream("in")).await.unwrap(), 2);
    // Limits: size, JSON, object.
    let big = format!(r#"{{"x": "{}"}}"#, "y".repeat(2000));
    let r = post(big, None).await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("1024"));
    let r = post("not json".into(), None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not JSON"));
    let r = post("[1, 2]".into(), None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("JSON object"));
    let r = post("{}".into(), Some(&"k".repeat(300))).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        q.len(&cfg.keys.stream("in")).await.unwrap(),
        2,
        "refused bodies add nothing"
    );
    // Status follows the task through the agent.
    let id = j1["task_id"].as_str().unwrap().to_owned();
    let st: Value = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["state"], "pending");
    let run = start_agents(&cfg, &q, &ScriptedAgent::ok());
    eventually("completed", Duration::from_secs(20), || async {
        let st: Value = http
            .get(format!("{base}/v1/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        st["state"] == "completed"
    })
    .await;
    // A malformed id, then health and metrics.
    for (path, status) in [
        ("/v1/tasks/bad%20id", 400),
        ("/healthz", 200),
        ("/readyz", 200),
    ] {
        let got = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(got, status, "GET {path}");
    }
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines().any(
            |l| l.starts_with(r#"r4_engine_tasks_total{agent="",namespace=""#)
                && l.ends_with(r#"outcome="completed",workflow="intake"} 2"#)
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"outcome="duplicate",workflow="intake"} 1"#),
        "{m}"
    );
    run.stop().await;
    let _ = stop.send(true);
    let _ = server.await;
}

#[tokio::test]
async fn intake_batch_contract() {
    let Served {
        _redis,
        q,
        cfg,
        base,
        stop,
        server,
        http,
    } = serve_intake("intake-batch").await;
    let url = format!("{base}/v1/tasks:batch");
    let post = |body: String| {
        http.post(&url)
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(body)
            .send()
    };
    let stream = cfg.keys.stream("in");
    // Keyed and unkeyed tasks, a key repeated inside the batch.
    let body = json!({"tasks": [
        {"payload": {"n": 1}, "idempotency_key": "k-1"},
        {"payload": {"n": 2}},
        {"payload": {"n": 1}, "idempotency_key": "k-1"},
        {"payload": {"n": 4}, "idempotency_key": "k-4"},
    ]});
    let r = post(body.to_string()).await.unwrap();
    assert_eq!(r.status(), 202);
    let j: Value = r.json().await.unwrap();
    let t = j["tasks"].as_array().unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(t[0]["task_id"], t[2]["task_id"]);
    let dups: Vec<_> = t.iter().map(|x| x["duplicate"].clone()).collect();
    assert_eq!(
        dups,
        [json!(false), json!(false), json!(true), json!(false)]
    );
    let entries = q.range(&stream, "-", "+", 0).await.unwrap();
    assert_eq!(entries.len(), 3, "one entry per created task");
    let payloads: Vec<_> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(e.field("payload").unwrap()).into_owned())
        .collect();
    assert_eq!(
        payloads,
        [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":4}"#],
        "stored as sent, in order"
    );
    let trace = |e: &r4::queue::StreamEntry| {
        String::from_utf8_lossy(e.field("traceparent").unwrap())[3..35].to_owned()
    };
    assert!(
        entries
            .iter()
            .all(|e| trace(e) == "0af7651916cd43dd8448eb211c80319c")
    );
    // The resent batch is deduplicated by its keys; the single API shares them.
    let again: Value =
        post(json!({"tasks": [{"payload": {"n": 4}, "idempotency_key": "k-4"}]}).to_string())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(again["tasks"][0]["task_id"], t[3]["task_id"]);
    let single: Value = http
        .post(url.replace(":batch", ""))
        .header("Idempotency-Key", "k-1")
        .body(r#"{"n": 1}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(single["task_id"], t[0]["task_id"]);
    assert_eq!(q.len(&stream).await.unwrap(), 3);
    // A key reused for another payload is refused (422), never answered
    // with another task's id; nothing is enqueued.
    let r = http
        .post(url.replace(":batch", ""))
        .header("Idempotency-Key", "k-1")
        .body(r#"{"n": 9}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("Idempotency-Key: already used for another payload"),
        "{e}"
    );
    let r = post(
        json!({"tasks": [{"payload": {"n": 5}, "idempotency_key": "k-5"},
                         {"payload": {"n": 9}, "idempotency_key": "k-4"}]})
        .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("tasks[1].idempotency_key: already used"),
        "{e}"
    );
    assert_eq!(q.len(&stream).await.unwrap(), 3);
    // Every refusal names the task and enqueues nothing of the batch.
    let big = "y".repeat(2000);
    for (body, status, says) in [
        (
            json!({"tasks": [{"payload": {}}, {"payload": [1]}]}),
            400,
            "tasks[1].payload: must be a JSON object",
        ),
        (
            json!({"tasks": [{"payload": {}}, {"payload": {"x": big}}]}),
            413,
            "tasks[1].payload: larger than 1024",
        ),
        (
            json!({"tasks": [{"payload": {}, "idempotency_key": ""}]}),
            400,
            "tasks[0].idempotency_key",
        ),
        (
            json!({"tasks": [{"payload": {}, "priority": 1}]}),
            400,
            "tasks[0]: unknown field `priority`",
        ),
        (
            json!({"tasks": [{"idempotency_key": "k"}]}),
            400,
            "tasks[0]: missing field `payload`",
        ),
        (
            json!({"tasks": []}),
            400,
            "tasks: must hold 1..=1000 tasks, got 0",
        ),
        (json!({"items": []}), 400, "body: unknown field `items`"),
        (json!([{"payload": {}}]), 400, "body:"),
    ] {
        let r = post(body.to_string()).await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(says), "{msg:?} should say {says:?}");
        assert!(!msg.contains('\n'), "one line: {msg:?}");
    }
    let r = post("{\"tasks\": [".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let too_many = json!({"tasks": vec![json!({"payload": {}}); 1001]});
    assert_eq!(post(too_many.to_string()).await.unwrap().status(), 400);
    assert_eq!(
        q.len(&stream).await.unwrap(),
        3,
        "refused batches add nothing"
    );
    // The tasks flow through the agents like single submissions.
    let run = start_agents(&cfg, &q, &ScriptedAgent::ok());
    eventually("batch completed", Duration::from_secs(20), || async {
        q.len(&cfg.keys.stream("done")).await.unwrap() == 3
    })
    .await;
    run.stop().await;
    let _ = stop.send(true);
    let _ = server.await;
}

/// Bodies the engine cannot read: the intake must refuse every one with the reason, alone
/// (`400`) and in a batch (naming `tasks[i]`, nothing enqueued), and accept their neighbours.
#[tokio::test]
async fn intake_refuses_exactly_what_the_engine_cannot_read() {
    let Served {
        _redis,
        q,
        cfg,
        base,
        stop,
        server,
        http,
    } = serve_intake("intake-parse").await;
    let deep = |d: usize| format!("{{\"a\":{}{}}}", "[".repeat(d - 1), "]".repeat(d - 1));
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"s\": \"\xff\xfe\"}".to_vec(), "invalid unicode"),
        (br#"{"s": "\ud800"}"#.to_vec(), "hex escape"),
        (br#"{"s": "\udc00"}"#.to_vec(), "surrogate"),
        (deep(task::MAX_DEPTH + 1).into_bytes(), "recursion limit"),
    ];
    let good: Vec<Vec<u8>> = vec![
        br#"{"s": "\ud83d\ude00 \u00e9"}"#.to_vec(),
        deep(task::MAX_DEPTH).into_bytes(),
    ];
    let engine_reads = |p: &[u8]| {
        let fields = vec![
            ("task_id".to_string(), bytes::Bytes::from_static(b"t")),
            ("payload".to_string(), bytes::Bytes::copy_from_slice(p)),
        ];
        Task::decode(&fields, cfg.max_payload_bytes).is_ok()
    };
    for (body, says) in &bad {
        assert!(!engine_reads(body), "the engine refuses {says}");
        let r = http
            .post(format!("{base}/v1/tasks"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{says}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains(says) && msg.starts_with("payload is not JSON"),
            "{msg}"
        );
        // In a batch, after a good task: the whole batch is refused, naming the bad one.
        let mut batch = br#"{"tasks": [{"payload": {}}, {"payload": "#.to_vec();
        batch.extend_from_slice(body);
        batch.extend_from_slice(b"}]}");
        let r = http
            .post(format!("{base}/v1/tasks:batch"))
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "batch: {says}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"].as_str().unwrap();
        assert!(msg.starts_with("tasks[1]") && msg.contains(says), "{msg}");
    }
    assert_eq!(
        q.len(&cfg.keys.stream("in")).await.unwrap(),
        0,
        "nothing enqueued"
    );
    for body in &good {
        assert!(engine_reads(body));
        let r = http
            .post(format!("{base}/v1/tasks"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", String::from_utf8_lossy(body));
    }
    // What was accepted is read by the engine as stored.
    for e in q.range(&cfg.keys.stream("in"), "-", "+", 0).await.unwrap() {
        assert!(engine_reads(e.field("payload").unwrap()));
    }
    let _ = stop.send(true);
    let _ = server.await;
}

const TOKEN_A: &str = "token-of-billing-0123456789";
const TOKEN_B: &str = "token-of-claims-0123456789";

#[tokio::test]
async fn intake_bearer_tokens_and_client_key_spaces() {
    let tokens = Tokens::parse(&format!("billing:{TOKEN_A}\n{TOKEN_B}\n")).unwrap();
    let Served {
        _redis,
        q,
        cfg,
        base,
        stop,
        server,
        http,
    } = serve_intake_with(
        "intake-auth",
        true,
        IntakeOptions {
            tokens: Some(tokens),
            ..IntakeOptions::default()
        },
        ServerLimits::default(),
    )
    .await;
    let post = |token: Option<&str>, key: &str| {
        let mut r = http
            .post(format!("{base}/v1/tasks"))
            .header("Idempotency-Key", key)
            .body(r#"{"n": 1}"#);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // No token, a wrong one, another scheme: 401 with the challenge, nothing enqueued.
    for (auth, challenge) in [
        (None, r#"Bearer realm="r4-intake""#),
        (
            Some(format!("Bearer {TOKEN_A}x")),
            r#"Bearer realm="r4-intake", error="invalid_token""#,
        ),
        (
            Some(format!("Basic {TOKEN_A}")),
            r#"Bearer realm="r4-intake""#,
        ),
    ] {
        for path in ["/v1/tasks", "/v1/tasks:batch"] {
            let mut r = http.post(format!("{base}{path}")).body("{}");
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], challenge);
        }
    }
    let r = http
        .get(format!("{base}/v1/tasks/some-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "status needs a token too");
    assert_eq!(q.len(&cfg.keys.stream("in")).await.unwrap(), 0);
    // Probes and scrapers carry no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // Each client has its own key space: the same key is two tasks for two clients, one
    // task for one client, single or batched.
    let id = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 202);
        r.json::<Value>().await.unwrap()["task_id"].clone()
    };
    let a1 = id(post(Some(TOKEN_A), "order-1").await.unwrap()).await;
    let a2 = id(post(Some(TOKEN_A), "order-1").await.unwrap()).await;
    let b1 = id(post(Some(TOKEN_B), "order-1").await.unwrap()).await;
    assert_eq!(a1, a2);
    assert_ne!(a1, b1);
    let batch: Value = http
        .post(format!("{base}/v1/tasks:batch"))
        .bearer_auth(TOKEN_B)
        .body(r#"{"tasks": [{"payload": {"n": 1}, "idempotency_key": "order-1"}]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(batch["tasks"][0]["task_id"], b1);
    assert_eq!(batch["tasks"][0]["duplicate"], true);
    assert_eq!(q.len(&cfg.keys.stream("in")).await.unwrap(), 2);
    let st = http
        .get(format!("{base}/v1/tasks/{}", a1.as_str().unwrap()))
        .bearer_auth(TOKEN_B)
        .send()
        .await
        .unwrap();
    assert_eq!(st.status(), 200);
    let _ = stop.send(true);
    let _ = server.await;
}

/// Connect, send `bytes` (one chunk every `gap`), then read until the server closes the
/// connection; what it answered and when it closed.
async fn slow_client(addr: &str, chunks: Vec<Vec<u8>>, gap: Duration) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let write = async {
        for c in chunks {
            if wr.write_all(&c).await.is_err() {
                break;
            }
            tokio::time::sleep(gap).await;
        }
        std::future::pending::<()>().await;
    };
    let mut out = Vec::new();
    let read = rd.read_to_end(&mut out);
    let deadline = Duration::from_secs(10);
    tokio::select! {
        _ = write => unreachable!(),
        r = tokio::time::timeout(deadline, read) => {
            assert!(r.is_ok(), "the server kept a slow client for {deadline:?}");
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn the_intake_cuts_slow_clients_and_sheds_load() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let Served {
        _redis,
        base,
        stop,
        server,
        http,
        ..
    } = serve_intake_with(
        "intake-slow",
        false,
        IntakeOptions {
            max_in_flight: 1,
            ..IntakeOptions::default()
        },
        limits,
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    // Slowloris: half a header, then silence; then the header a byte at a time.
    let (answer, took) = slow_client(
        &addr,
        vec![b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\n".to_vec()],
        Duration::ZERO,
    )
    .await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(!answer.contains(" 202 "), "{answer}");
    let trickle: Vec<Vec<u8>> = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
        .iter()
        .map(|b| vec![*b])
        .collect();
    let (_, took) = slow_client(&addr, trickle, Duration::from_millis(20)).await;
    assert!(
        took < Duration::from_millis(1500),
        "a trickled header is cut by the header deadline, not per byte: {took:?}"
    );
    // A body that stops halfway: 408 once the body deadline passed.
    let (answer, took) = slow_client(
        &addr,
        vec![b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":".to_vec()],
        Duration::ZERO,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // One request in flight (its body still coming): the next is shed at once with 503.
    let held = tokio::spawn({
        let addr = addr.clone();
        async move {
            slow_client(
                &addr,
                vec![
                    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{".to_vec(),
                ],
                Duration::ZERO,
            )
            .await
        }
    });
    let mut shed = None;
    for _ in 0..50 {
        let r = http
            .post(format!("{base}/v1/tasks"))
            .body("{}")
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            shed = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shed = shed.expect("a request over the in-flight limit is answered 503");
    assert_eq!(shed.headers()["retry-after"], "1");
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "health is not limited");
    let _ = held.await;
    // A fresh connection: the server closes kept-alive ones idle past its
    // (here very short) header timeout, and the pool may still hold one.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = fresh
        .post(format!("{base}/v1/tasks"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the slot is free again");
    let _ = stop.send(true);
    let _ = server.await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let Served {
        _redis,
        base,
        stop,
        server,
        ..
    } = serve_intake_with(
        "intake-conns",
        false,
        IntakeOptions::default(),
        ServerLimits {
            max_connections: 1,
            ..ServerLimits::default()
        },
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without an answer: {read:?} {}",
        String::from_utf8_lossy(&out)
    );
    drop(_first);
    let _ = stop.send(true);
    let _ = server.await;
}
