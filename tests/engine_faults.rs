//! A ChaosDrill's faults as the engine applies them (`engine::faults`), each type on the memory
//! queue under tokio's paused clock (in-process tool and agent) and against a real
//! redis-server (real clock; the tool a loopback HTTP server): the effect starts once the fault
//! is injected and stops once its TTL has passed, nobody clearing it.

mod engine_common;
use engine_common::{FAST_POLICY, ScriptedAgent, dlq, eventually, fast_opts, queue, serve_app};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use r4::api::drill::FaultType;
use r4::engine::faults::{self, FaultRecord, REREAD};
use r4::engine::tools::{self, ToolProxy};
use r4::engine::{AgentRole, WorkflowConfig};
use r4::queue::Queue;
use r4::resilience::{HttpRequest, HttpResponse};
use tokio::sync::watch;
use tokio::time::Instant;

/// The tool's policy: retries of every failure class, a backoff long enough to honour a
/// 1 s `Retry-After`, no breaker (so a fault's end is seen at once).
const TOOL_POLICY: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: tp}
spec:
  timeout: {perAttempt: 1s, overall: 10s}
  retry:
    maxAttempts: 3
    backoff: {initial: 10ms, max: 2s, multiplier: 2, jitter: None}
    retryOn: [Timeout, ConnectError, Status5xx, Status429]
"#;

/// One agent `a` (input `in`) allowed tool `bank` at `url`; `replicas` is informative only.
fn config(url: &str) -> WorkflowConfig {
    let yaml = format!(
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: wf}}
spec:
  queue:
    redis: {{url: "redis://127.0.0.1:6379/0"}}
    visibilityTimeout: 1s
  policyRef: fast
  tools:
    - {{name: bank, url: "{url}", idempotent: true, policyRef: tp}}
  agents:
    - {{name: a, image: x, consumes: in, produces: [done], tools: [bank]}}
---
{FAST_POLICY}
---
{TOOL_POLICY}"#
    );
    let ns = format!("ns-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    WorkflowConfig::from_yaml("test", &yaml, None, Some(&ns))
        .unwrap_or_else(|e| panic!("test workflow invalid: {e}"))
}

fn fault(kind: FaultType) -> FaultRecord {
    FaultRecord {
        drill: "game-day".into(),
        run: 1,
        index: 0,
        kind,
        tool: None,
        agent: None,
        stream: None,
        latency_ms: None,
        percent: 100.0,
        error_rate: None,
        status_code: None,
        retry_after_seconds: None,
        max_per_second: None,
    }
}

/// The tool proxy of `cfg` under `tools::supervise`, its tool in-process (`http` false) or a
/// loopback HTTP server; `hits` counts the requests that reached the tool.
struct ToolRig {
    proxy: Arc<ToolProxy>,
    hits: Arc<AtomicU64>,
    q: Arc<dyn Queue>,
    cfg: Arc<WorkflowConfig>,
    stop: watch::Sender<bool>,
}

async fn tool_rig(q: Arc<dyn Queue>, http: bool) -> ToolRig {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let (url, transport) = if http {
        let app = Router::new().route(
            "/{*path}",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    "{\"ok\":true}"
                }
            }),
        );
        let addr = serve_app(app).await;
        let client = tools::http_client(None).unwrap();
        (format!("http://{addr}/bank"), tools::http_transport(client))
    } else {
        let t: tools::Transport =
            tower::util::BoxCloneService::new(tower::service_fn(move |_req: HttpRequest| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, r4::resilience::BoxError>(HttpResponse::new(200, b"{}".to_vec()))
                }
            }));
        ("http://bank.test/bank".to_string(), t)
    };
    let cfg = Arc::new(config(&url));
    let proxy = Arc::new(
        cfg.tool_proxy(&|_| transport.clone(), None, Some(7))
            .unwrap(),
    );
    let (stop, rx) = watch::channel(false);
    tokio::spawn(tools::supervise(
        proxy.clone(),
        q.clone(),
        cfg.clone(),
        "eng".into(),
        rx,
    ));
    let p = proxy.clone();
    eventually(
        "the proxy reads its kill switches",
        Duration::from_secs(10),
        || {
            let ok = p.check(&["bank".to_string()], "bank").is_ok();
            async move { ok }
        },
    )
    .await;
    ToolRig {
        proxy,
        hits,
        q,
        cfg,
        stop,
    }
}

impl ToolRig {
    /// One call with its own idempotency key: status, `r4-degraded` reason, `Retry-After`,
    /// how long it took.
    async fn call(&self, key: &str) -> (u16, String, Option<String>, Duration) {
        let mut req = HttpRequest::post(String::new(), b"{}".to_vec());
        req.headers.push(("idempotency-key".into(), key.into()));
        let t = Instant::now();
        let r = self.proxy.call(&["bank".to_string()], "bank", req).await;
        let reason = r.header(tools::DEGRADED_HEADER).unwrap_or("").to_string();
        let ra = r.header("retry-after").map(str::to_owned);
        (r.status, reason, ra, t.elapsed())
    }

    async fn inject(&self, f: &FaultRecord, ttl: Duration) -> Instant {
        let at = Instant::now();
        faults::inject(self.q.as_ref(), &self.cfg.keys, f, ttl)
            .await
            .unwrap();
        at
    }

    /// Poll until calls are answered 200 again; assert that happened no earlier than the
    /// fault's end (minus the TTL's own slack) and within a re-read period and `slack` of it.
    async fn ends_on_time(&self, injected: Instant, ttl: Duration, slack: Duration) {
        let mut n = 0u64;
        let deadline = injected + ttl + REREAD + slack;
        loop {
            n += 1;
            let (status, ..) = self.call(&format!("after-{n}")).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the fault outlived its TTL: still {status} at {:?}",
                injected.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            injected.elapsed() + Duration::from_millis(50) >= ttl,
            "the fault ended early, after {:?}",
            injected.elapsed()
        );
    }

    /// The tool proxy's counters as published in the workflow's stats.
    async fn published(&self) -> r4::engine::stats::Counters {
        r4::engine::stats::read_workflow(self.q.as_ref(), &self.cfg.keys)
            .await
            .unwrap()
            .totals
    }
}

fn slack(redis: bool) -> Duration {
    // The real clock: a loaded machine, redis-server's own expiry granularity.
    if redis {
        Duration::from_millis(1500)
    } else {
        Duration::from_millis(100)
    }
}

// ---------------------------------------------------------------- ToolOutage

async fn tool_outage(redis: bool) {
    let (_b, q) = queue(redis).await;
    let rig = tool_rig(q, redis).await;
    let mut f = fault(FaultType::ToolOutage);
    f.tool = Some("bank".into());
    let ttl = Duration::from_secs(3);
    let at = rig.inject(&f, ttl).await;
    eventually(
        "calls fail as connect errors",
        Duration::from_secs(2),
        || async { rig.call("probe").await.0 == 502 },
    )
    .await;
    let before = rig.hits.load(Ordering::SeqCst);
    let (status, reason, ..) = rig.call("k1").await;
    assert_eq!(
        (status, reason.as_str()),
        (502, "bank; reason=connect-error")
    );
    assert_eq!(
        rig.hits.load(Ordering::SeqCst),
        before,
        "an outage sends nothing to the tool"
    );
    // The retry saw a connect error and retried it; the counters reach the published stats.
    eventually("retries published", Duration::from_secs(5), || async {
        let c = rig.published().await;
        c.tool_retries >= 2 && c.faults_applied >= 3
    })
    .await;
    rig.ends_on_time(at, ttl, slack(redis)).await;
    assert!(rig.hits.load(Ordering::SeqCst) > before);
    let _ = rig.stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn tool_outage_memory() {
    tool_outage(false).await;
}

#[tokio::test]
async fn tool_outage_redis() {
    tool_outage(true).await;
}

// ---------------------------------------------------------------- ToolLatency

async fn tool_latency(redis: bool) {
    let (_b, q) = queue(redis).await;
    let rig = tool_rig(q, redis).await;
    let mut f = fault(FaultType::ToolLatency);
    f.tool = Some("bank".into());
    f.latency_ms = Some(300);
    let ttl = Duration::from_secs(3);
    let at = rig.inject(&f, ttl).await;
    eventually("calls are slow", Duration::from_secs(2), || async {
        rig.call("probe").await.3 >= Duration::from_millis(300)
    })
    .await;
    let (status, _, _, took) = rig.call("k1").await;
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(1),
        "{took:?}"
    );
    // The latency runs inside the attempt's timeout (1 s): a longer one times the call out.
    let mut g = fault(FaultType::ToolLatency);
    g.index = 1;
    g.tool = Some("bank".into());
    g.latency_ms = Some(5_000);
    let g_ttl = Duration::from_secs(5);
    let at_g = rig.inject(&g, g_ttl).await;
    eventually("calls time out", Duration::from_secs(10), || async {
        let (status, reason, ..) = rig.call("slow").await;
        status == 504 && reason == "bank; reason=timeout"
    })
    .await;
    assert!(at.elapsed() < ttl + g_ttl);
    // Both end with their TTLs; calls are fast again (a call in flight at the end may take
    // its three timed-out attempts).
    rig.ends_on_time(at_g, g_ttl, slack(redis) + Duration::from_secs(3))
        .await;
    let (_, _, _, took) = rig.call("fast").await;
    assert!(took < Duration::from_millis(200), "{took:?}");
    let _ = rig.stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn tool_latency_memory() {
    tool_latency(false).await;
}

#[tokio::test]
async fn tool_latency_redis() {
    tool_latency(true).await;
}

// ---------------------------------------------------------------- ToolErrors

async fn tool_errors(redis: bool) {
    let (_b, q) = queue(redis).await;
    let rig = tool_rig(q, redis).await;
    let mut f = fault(FaultType::ToolErrors);
    f.tool = Some("bank".into());
    f.error_rate = Some(1.0);
    f.status_code = Some(429);
    f.retry_after_seconds = Some(1);
    let ttl = Duration::from_secs(6);
    let at = rig.inject(&f, ttl).await;
    eventually("calls answered 429", Duration::from_secs(5), || async {
        rig.call("probe").await.0 == 429
    })
    .await;
    let before = rig.hits.load(Ordering::SeqCst);
    let (status, reason, retry_after, took) = rig.call("k1").await;
    assert_eq!(status, 429);
    assert_eq!(
        reason, "",
        "an injected error is the tool's answer, not a refusal"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Three attempts, each retry waiting the 1 s the answer asked for.
    assert!(
        took >= Duration::from_secs(2),
        "Retry-After not honoured: {took:?}"
    );
    assert_eq!(
        rig.hits.load(Ordering::SeqCst),
        before,
        "nothing reached the tool"
    );
    rig.ends_on_time(at, ttl, slack(redis) + Duration::from_secs(2))
        .await;

    // Default status 503, at an error rate: some attempts get through, retries save others.
    let mut g = fault(FaultType::ToolErrors);
    g.index = 1;
    g.tool = Some("bank".into());
    g.error_rate = Some(0.5);
    rig.inject(&g, Duration::from_secs(30)).await;
    tokio::time::sleep(REREAD * 2).await;
    let before = rig.hits.load(Ordering::SeqCst);
    let mut ok = 0;
    for i in 0..20 {
        let (s, ..) = rig.call(&format!("rate-{i}")).await;
        assert!(s == 200 || s == 503, "{s}");
        ok += u64::from(s == 200);
    }
    let through = rig.hits.load(Ordering::SeqCst) - before;
    assert_eq!(
        through, ok,
        "a call succeeds exactly when an attempt reached the tool"
    );
    assert!(
        (10..20).contains(&ok),
        "at a 50% error rate some attempts fail and retries save most calls: {ok} of 20"
    );
    assert_eq!(
        faults::clear(rig.q.as_ref(), &rig.cfg.keys, "game-day")
            .await
            .unwrap(),
        1
    );
    let _ = rig.stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn tool_errors_memory() {
    tool_errors(false).await;
}

#[tokio::test]
async fn tool_errors_redis() {
    tool_errors(true).await;
}

// ------------------------------------------------------- the agent role's faults

/// Agent roles of `a` (`engines` of them), delivering to `agent`.
struct Agents {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    stats: Vec<Arc<r4::engine::Stats>>,
}

fn start(
    cfg: &Arc<WorkflowConfig>,
    q: &Arc<dyn Queue>,
    agent: &ScriptedAgent,
    engines: usize,
) -> Agents {
    let (stop, rx) = watch::channel(false);
    let mut handles = Vec::new();
    let mut stats = Vec::new();
    for i in 0..engines {
        let role = AgentRole::new(
            cfg.clone(),
            "a",
            q.clone(),
            Arc::new(agent.clone()),
            &format!("a-{i}"),
        )
        .unwrap()
        .with_options(fast_opts());
        stats.push(role.stats());
        let rx = rx.clone();
        handles.push(tokio::spawn(async move { role.run(rx).await.unwrap() }));
    }
    Agents {
        stop,
        handles,
        stats,
    }
}

impl Agents {
    fn completed(&self) -> u64 {
        self.stats.iter().map(|s| s.counters().completed).sum()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .expect("the role stops")
                .expect("the role did not panic");
        }
        for s in &self.stats {
            assert_eq!(s.panics(), 0);
        }
    }
}

async fn add(q: &Arc<dyn Queue>, cfg: &WorkflowConfig, id: &str) {
    engine_common::add_task(q, cfg, "in", id, serde_json::json!({"n": id})).await;
}

// ------------------------------------------------------------ MessageCorruption

async fn message_corruption(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::MessageCorruption);
    f.stream = Some("in".into());
    let ttl = Duration::from_secs(2);
    faults::inject(q.as_ref(), &cfg.keys, &f, ttl)
        .await
        .unwrap();
    let injected = Instant::now();
    let agent = ScriptedAgent::ok();
    let roles = start(&cfg, &q, &agent, 1);
    for i in 0..3 {
        add(&q, &cfg, &format!("t{i}")).await;
    }
    eventually(
        "three entries dead-lettered",
        Duration::from_secs(10),
        || async { dlq(&q, &cfg).await.len() == 3 },
    )
    .await;
    assert!(
        injected.elapsed() < ttl,
        "the test was too slow to see the fault"
    );
    let records = dlq(&q, &cfg).await;
    for r in &records {
        assert_eq!(r.reason, "malformed");
        assert!(r.error.contains("ChaosDrill game-day"), "{}", r.error);
        assert!(
            r.replayable,
            "a corrupted entry is intact: it may be replayed"
        );
        assert!(r.task_id.starts_with('t'));
    }
    assert!(
        agent.calls().is_empty(),
        "a corrupted entry is never delivered"
    );
    // Replayed while the fault lasts: a replayed task is not corrupted again, it completes.
    r4::engine::dlq::replay(
        q.as_ref(),
        &cfg.keys,
        r4::engine::dlq::Store::Dlq,
        &records[0],
        None,
    )
    .await
    .unwrap()
    .expect("replayed");
    eventually(
        "the task replayed during the fault completes",
        Duration::from_secs(5),
        || async { roles.completed() == 1 },
    )
    .await;
    assert!(
        injected.elapsed() < ttl,
        "the test was too slow to replay during the fault"
    );
    let records = &records[1..];
    // After the fault: a new task completes, and replaying the records completes them too.
    tokio::time::sleep((injected + ttl + REREAD).saturating_duration_since(Instant::now())).await;
    add(&q, &cfg, "after").await;
    eventually(
        "the task after the fault completes",
        Duration::from_secs(5) + slack(redis),
        || async { roles.completed() >= 2 },
    )
    .await;
    for r in records {
        r4::engine::dlq::replay(q.as_ref(), &cfg.keys, r4::engine::dlq::Store::Dlq, r, None)
            .await
            .unwrap()
            .expect("replayed");
    }
    eventually(
        "the replayed tasks complete",
        Duration::from_secs(10),
        || async { roles.completed() == 4 },
    )
    .await;
    let mut ids: Vec<String> = agent.calls().into_iter().map(|c| c.task_id).collect();
    ids.sort();
    assert_eq!(ids, ["after", "t0", "t1", "t2"]);
    assert!(
        roles
            .stats
            .iter()
            .map(|s| s.counters().faults_applied)
            .sum::<u64>()
            >= 3
    );
    roles.stop().await;
}

#[tokio::test(start_paused = true)]
async fn message_corruption_memory() {
    message_corruption(false).await;
}

#[tokio::test]
async fn message_corruption_redis() {
    message_corruption(true).await;
}

/// `percent` chooses tasks by a hash: some are corrupted, the rest complete, nothing else.
#[tokio::test(start_paused = true)]
async fn message_corruption_hits_a_share_of_tasks() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::MessageCorruption);
    f.stream = Some("in".into());
    f.percent = 50.0;
    faults::inject(q.as_ref(), &cfg.keys, &f, Duration::from_secs(600))
        .await
        .unwrap();
    let agent = ScriptedAgent::ok();
    let roles = start(&cfg, &q, &agent, 1);
    for i in 0..40 {
        add(&q, &cfg, &format!("t{i}")).await;
    }
    eventually("every task settled", Duration::from_secs(10), || async {
        roles.completed() + dlq(&q, &cfg).await.len() as u64 == 40
    })
    .await;
    let dead = dlq(&q, &cfg).await.len();
    assert!((8..=32).contains(&dead), "{dead} of 40 corrupted at 50%");
    roles.stop().await;
}

// ---------------------------------------------------------------- AgentSlowdown

async fn agent_slowdown(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::AgentSlowdown);
    f.agent = Some("a".into());
    f.latency_ms = Some(300);
    let ttl = Duration::from_secs(3);
    faults::inject(q.as_ref(), &cfg.keys, &f, ttl)
        .await
        .unwrap();
    let injected = Instant::now();
    let agent = ScriptedAgent::ok();
    let roles = start(&cfg, &q, &agent, 1);
    let t = Instant::now();
    add(&q, &cfg, "slow").await;
    eventually(
        "the slowed task completes",
        Duration::from_secs(5),
        || async { roles.completed() == 1 },
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Later than the attempt's deadline (visibility 1 s / 2): the attempt fails as a timeout,
    // the agent is never asked, the retries run out and the task is dead-lettered.
    let mut g = fault(FaultType::AgentSlowdown);
    g.index = 1;
    g.agent = Some("a".into());
    g.latency_ms = Some(2_000);
    faults::inject(q.as_ref(), &cfg.keys, &g, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(REREAD * 2).await;
    add(&q, &cfg, "late").await;
    eventually(
        "the late task dead-lettered",
        Duration::from_secs(20),
        || async { dlq(&q, &cfg).await.len() == 1 },
    )
    .await;
    let r = &dlq(&q, &cfg).await[0];
    assert_eq!(
        (r.task_id.as_str(), r.reason.as_str()),
        ("late", "max_deliveries")
    );
    assert!(r.error.contains("AgentSlowdown"), "{}", r.error);
    assert_eq!(
        agent.calls_for("a").len(),
        1,
        "only the first task reached the agent"
    );
    faults::clear(q.as_ref(), &cfg.keys, "game-day")
        .await
        .unwrap();
    assert!(injected.elapsed() < Duration::from_secs(30));
    // Without the faults: a task completes at once.
    tokio::time::sleep(REREAD * 2).await;
    let t = Instant::now();
    add(&q, &cfg, "fast").await;
    eventually(
        "the task after the fault completes",
        Duration::from_secs(5),
        || async { roles.completed() == 2 },
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    roles.stop().await;
}

#[tokio::test(start_paused = true)]
async fn agent_slowdown_memory() {
    agent_slowdown(false).await;
}

#[tokio::test]
async fn agent_slowdown_redis() {
    agent_slowdown(true).await;
}

/// The slowdown ends with its TTL, nobody clearing it.
#[tokio::test(start_paused = true)]
async fn agent_slowdown_ends_on_time() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::AgentSlowdown);
    f.agent = Some("a".into());
    f.latency_ms = Some(400);
    let ttl = Duration::from_secs(2);
    faults::inject(q.as_ref(), &cfg.keys, &f, ttl)
        .await
        .unwrap();
    let injected = Instant::now();
    let agent = ScriptedAgent::ok();
    let roles = start(&cfg, &q, &agent, 1);
    let mut n = 0;
    loop {
        n += 1;
        let t = Instant::now();
        add(&q, &cfg, &format!("t{n}")).await;
        let done = n;
        eventually("a task completes", Duration::from_secs(5), || async {
            roles.completed() == done
        })
        .await;
        if t.elapsed() < Duration::from_millis(400) {
            break;
        }
        assert!(
            injected.elapsed() < ttl + REREAD + Duration::from_millis(500),
            "outlived its TTL"
        );
    }
    assert!(
        injected.elapsed() >= ttl,
        "ended early: {:?}",
        injected.elapsed()
    );
    roles.stop().await;
}

// ---------------------------------------------------------------- QueueThrottle

async fn queue_throttle(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::QueueThrottle);
    f.stream = Some("in".into());
    f.max_per_second = Some(10);
    let ttl = Duration::from_secs(3);
    faults::inject(q.as_ref(), &cfg.keys, &f, ttl)
        .await
        .unwrap();
    let injected = Instant::now();
    for i in 0..200 {
        add(&q, &cfg, &format!("t{i}")).await;
    }
    let agent = ScriptedAgent::ok();
    // Two engines share the group: together they stay within the rate.
    let roles = start(&cfg, &q, &agent, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at = injected.elapsed().as_secs_f64();
    let done = agent.calls().len() as f64;
    // 10/s for `at` seconds, plus each engine's first burst (at most one entry each, and a
    // share counted before the other engine joined the group).
    assert!(done <= 10.0 * at + 12.0, "{done} reads in {at:.2}s at 10/s");
    assert!(
        done >= 10.0,
        "{done} reads in {at:.2}s: the throttle let too little through"
    );
    // Once the fault has ended, the rest goes through at full speed.
    eventually(
        "every task completes",
        ttl + REREAD + Duration::from_secs(10),
        || async { roles.completed() == 200 },
    )
    .await;
    roles.stop().await;
}

#[tokio::test(start_paused = true)]
async fn queue_throttle_memory() {
    queue_throttle(false).await;
}

#[tokio::test]
async fn queue_throttle_redis() {
    queue_throttle(true).await;
}

/// The throttle holds over a longer window on the paused clock, and ends with its TTL.
#[tokio::test(start_paused = true)]
async fn queue_throttle_rate_and_end() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(config("http://bank.test/"));
    let mut f = fault(FaultType::QueueThrottle);
    f.stream = Some("in".into());
    f.max_per_second = Some(20);
    let ttl = Duration::from_secs(10);
    faults::inject(q.as_ref(), &cfg.keys, &f, ttl)
        .await
        .unwrap();
    for i in 0..400 {
        add(&q, &cfg, &format!("t{i}")).await;
    }
    let agent = ScriptedAgent::ok();
    let roles = start(&cfg, &q, &agent, 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let first = agent.calls().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rate = (agent.calls().len() - first) as f64 / 4.0;
    assert!(
        (17.0..=22.0).contains(&rate),
        "{rate}/s under a 20/s throttle"
    );
    eventually("the rest after the TTL", Duration::from_secs(3), || async {
        roles.completed() == 400
    })
    .await;
    roles.stop().await;
}
