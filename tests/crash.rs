//! The crash test: several real `r4 engine` processes on one Redis with AOF,
//! a loopback agent that counts side effects, tens of thousands of tasks
//! (a backlog twenty times `queue.maxLen`, so completions also wait for
//! room downstream), engines SIGKILLed at random moments and restarted,
//! the agent container "restarted" (its port refuses connections for a
//! while), Redis crashed and restarted once — then every task is completed
//! or dead-lettered, with 0 lost, 0 duplicate effects (counted by the
//! agent) and 0 duplicate outputs (counted by a downstream consumer group),
//! not by the engine. A second run does the same to a fan-out and join
//! workflow: 0 lost, 0 duplicate joins (counted on the joined stream by a
//! consumer group of its own), and every join the decision agent receives
//! carries both branches' parts.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use r4::engine::dlq::DlqRecord;
use r4::engine::task::Task;
use r4::queue::Queue;
use r4::queue::redis::RedisQueue;
use r4::testutil::RedisServer;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

const TASKS: usize = 20_000;
const ENGINES_PER_AGENT: usize = 2;
const AGENTS: [&str; 2] = ["a", "b"];

/// Fan-out at `a`, two branches `l` and `f`, joined at `d`.
/// The policy every crash workflow runs (`policyRef: crash-policy`), added to its file by
/// [`workflow_file`].
const POLICY: &str = r#"---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: crash-policy}
spec:
  timeout: {perAttempt: 900ms}
  retry:
    maxAttempts: 3
    backoff: {initial: 10ms, max: 100ms, multiplier: 2, jitter: Full}
  deadLetter: {maxDeliveries: 8, replay: {automatic: false}}
"#;

const JOIN_WORKFLOW: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: crash}
spec:
  queue: {redis: {url: "redis://unused"}, visibilityTimeout: 2s, maxLen: 1000}
  policyRef: crash-policy
  agents:
    - {name: a, image: x, consumes: in, produces: [to-l, to-f], concurrency: 32}
    - {name: l, image: x, consumes: to-l, produces: [lookups], concurrency: 32}
    - {name: f, image: x, consumes: to-f, produces: [fraud-scores], concurrency: 32}
    - {name: d, image: x, consumes: decisions, produces: [done], concurrency: 32, join: {streams: [lookups, fraud-scores], timeout: 10m}}
"#;

const WORKFLOW: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: crash}
spec:
  queue: {redis: {url: "redis://unused"}, visibilityTimeout: 2s, maxLen: 1000}
  policyRef: crash-policy
  agents:
    - {name: a, image: x, consumes: in, produces: [ab], concurrency: 32}
    - {name: b, image: x, consumes: ab, produces: [done], concurrency: 32}
"#;

/// The loopback agent: applies an effect at most once per idempotency key
/// (answering a repeated key from its record), and counts effects per
/// logical (task, step) from the body too, so a duplicate would show even
/// under a fresh key. 2% of first calls fail with 503 (no effect).
#[derive(Default)]
struct Ledger {
    by_key: HashMap<String, u64>,
    by_logical: HashMap<(String, String), u64>,
    calls: u64,
    /// Joined payloads that did not carry both parts of their task.
    bad_joins: Vec<String>,
}

async fn agent(
    State(l): State<Arc<Mutex<Ledger>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let task = body["task_id"].as_str().unwrap_or("").to_owned();
    let step = body["step"].as_str().unwrap_or("").to_owned();
    let fail = rand::rng().random_bool(0.02);
    let mut l = l.lock().unwrap();
    l.calls += 1;
    // A joined task: both branches passed the submitted payload on.
    if body["payload"].get("lookups").is_some() || step == "d" {
        let p = &body["payload"];
        let n = p["lookups"]["n"].as_u64();
        if n.is_none()
            || p["fraud-scores"]["n"].as_u64() != n
            || format!("t{}", n.unwrap_or(u64::MAX)) != task
        {
            l.bad_joins.push(format!("{task}: {p}"));
        }
    }
    if l.by_key.contains_key(&key) {
        return (StatusCode::OK, Json(json!({})));
    }
    if fail {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "flaky"})),
        );
    }
    l.by_key.insert(key, 1);
    *l.by_logical.entry((task, step)).or_default() += 1;
    (StatusCode::OK, Json(json!({})))
}

/// A TCP front for the agent that can be "restarted": while down, its port
/// refuses connections and every open connection is cut, like a container
/// that is being replaced.
struct AgentPort {
    addr: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AgentPort {
    async fn start(backend: std::net::SocketAddr) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut p = Self {
            addr,
            backend,
            task: None,
        };
        p.task = Some(Self::serve(l, backend));
        p
    }

    fn serve(
        l: tokio::net::TcpListener,
        backend: std::net::SocketAddr,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = l.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        })
    }

    /// Down: the listener and every connection through it are gone.
    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort(); // drops the listener and the JoinSet (aborting each connection)
        }
    }

    async fn restart(&mut self) {
        let l = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(Self::serve(l, self.backend));
    }
}

/// A downstream consumer of `done`: reads it through its own consumer group
/// (which makes `done` a work stream the engines may not overfill) and
/// records each task's distinct output entries; a duplicate output would be
/// a second entry id for one task. Survives the Redis restart.
async fn check_outputs(
    q: Arc<RedisQueue>,
    done: String,
    seen: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    stop: Arc<AtomicBool>,
) {
    let mut cursor = "0-0".to_owned();
    while !stop.load(Ordering::Relaxed) {
        let mut got = match q
            .read_group(&done, "checker", "c", 1000, Duration::from_millis(100))
            .await
        {
            Ok(g) => g,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Vec::new()
            }
        };
        // Our own entries whose ack a Redis crash may have lost.
        if let Ok(c) = q
            .autoclaim(&done, "checker", "c", Duration::from_secs(1), 1000, &cursor)
            .await
        {
            got.extend(c.entries);
            cursor = c.next;
        }
        if got.is_empty() {
            continue;
        }
        {
            let mut seen = seen.lock().unwrap();
            for e in &got {
                if let Ok(t) = Task::decode(&e.fields, 1 << 20) {
                    seen.entry(t.task_id).or_default().insert(e.id.clone());
                }
            }
        }
        let ids: Vec<String> = got.into_iter().map(|e| e.id).collect();
        let _ = q.ack(&done, "checker", &ids).await;
    }
}

/// The crash workflow with [`POLICY`], resolved, and written to
/// `<tempdir>/crash.yaml` for the engine processes.
fn workflow_file(workflow: &str) -> (r4::engine::WorkflowConfig, tempfile::TempDir) {
    let yaml = format!("{workflow}{POLICY}");
    let cfg = r4::engine::WorkflowConfig::from_yaml("crash", &yaml, None, Some("crash")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("crash.yaml"), &yaml).unwrap();
    (cfg, dir)
}

struct Engine {
    agent: &'static str,
    child: Child,
}

fn spawn_engine(
    agent: &'static str,
    file: &std::path::Path,
    redis: &str,
    agent_url: &str,
) -> Engine {
    let child = Command::new(env!("CARGO_BIN_EXE_r4"))
        .args([
            "engine",
            "--role",
            "agent",
            "--agent",
            agent,
            "--redis",
            redis,
            "--namespace",
            "crash",
        ])
        .arg("--workflow-file")
        .arg(file)
        .args(["--listen", "127.0.0.1:0", "--agent-url", agent_url])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn r4 engine");
    Engine { agent, child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_zero_lost_zero_duplicates() {
    crash(WORKFLOW, &AGENTS, TASKS, ENGINES_PER_AGENT, None).await;
}

/// The same chaos with agent-level hedging on `b`: a delivery not answered within 2 ms (most
/// of them, through loopback HTTP in a debug build) is handed to the other engine of `b` as
/// well, up to 30% of deliveries — so engines are SIGKILLed mid-hedge, as primary and as
/// shadow. Still 0 lost, 0 duplicate effects, 0 duplicate outputs.
const HEDGE_WORKFLOW: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: crash}
spec:
  queue: {redis: {url: "redis://unused"}, visibilityTimeout: 2s, maxLen: 1000}
  policyRef: crash-policy
  agents:
    - {name: a, image: x, consumes: in, produces: [ab], concurrency: 32}
    - {name: b, image: x, consumes: ab, produces: [done], concurrency: 32, idempotent: true, hedge: {delay: {fixed: 2ms}, maxExtraLoad: 0.3}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_agent_hedging() {
    crash(HEDGE_WORKFLOW, &AGENTS, 6_000, ENGINES_PER_AGENT, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_fan_out_and_join() {
    crash(
        JOIN_WORKFLOW,
        &["a", "l", "f", "d"],
        4_000,
        1,
        Some("decisions"),
    )
    .await;
}

/// Run `workflow` (whose last stream is `done`) under the chaos: `tasks`
/// tasks, `per_agent` engine processes per agent, engines killed and
/// restarted, Redis restarted once, the agent's port down twice. With
/// `joined`, that stream (a join's output) is counted by a consumer group
/// of its own too: a second entry for one task would be a duplicate join.
async fn crash(
    workflow: &str,
    agents: &[&'static str],
    tasks: usize,
    per_agent: usize,
    joined: Option<&str>,
) {
    let started = Instant::now();
    let mut server = RedisServer::start_with_aof()
        .await
        .expect("redis-server with AOF");
    let url = server.url();
    let q = RedisQueue::connect(&url).await.expect("connect");
    let (cfg, dir) = workflow_file(workflow);
    let file = dir.path().join("crash.yaml");

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let app = Router::new()
        .route("/tasks", post(agent))
        .with_state(ledger.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut agent_port = AgentPort::start(backend).await;
    let agent_url = format!("http://{}/tasks", agent_port.addr);

    // Submit every task before the chaos (a submit that races a Redis crash
    // cannot know whether it landed; the intake's idempotency key covers
    // that in production, and is tested elsewhere).
    let input = cfg.keys.stream("in");
    let q = Arc::new(q);
    // The groups exist before the first entry, as the engines (and the
    // controller) make sure in production; the checker's makes `done` a
    // work stream too.
    r4::engine::consumer::ensure_groups(q.as_ref(), &cfg)
        .await
        .unwrap();
    let done = cfg.keys.stream("done");
    q.ensure_group(&done, "checker").await.unwrap();
    let seen: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
    let stop_checker = Arc::new(AtomicBool::new(false));
    let mut checkers = vec![tokio::spawn(check_outputs(
        q.clone(),
        done.clone(),
        seen.clone(),
        stop_checker.clone(),
    ))];
    let joins_seen: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
    if let Some(j) = joined {
        let j = cfg.keys.stream(j);
        q.ensure_group(&j, "checker").await.unwrap();
        checkers.push(tokio::spawn(check_outputs(
            q.clone(),
            j,
            joins_seen.clone(),
            stop_checker.clone(),
        )));
    }
    let mut subs = Vec::new();
    for p in 0..16 {
        let (q, input) = (q.clone(), input.clone());
        subs.push(tokio::spawn(async move {
            let mut i = p;
            while i < tasks {
                let t = Task::new(format!("t{i}"), json!({"n": i}));
                q.add(&input, t.encode(), None).await.expect("submit");
                i += 16;
            }
        }));
    }
    for s in subs {
        s.await.unwrap();
    }

    let mut engines: Vec<Engine> = agents
        .iter()
        .flat_map(|a| (0..per_agent).map(move |_| *a))
        .map(|a| spawn_engine(a, &file, &url, &agent_url))
        .collect();

    let mut kills = 0u32;
    let mut redis_restarted = false;
    let mut agent_restarts = 0u32;
    let deadline = Instant::now() + Duration::from_secs(150);
    let finished = |completed: &HashSet<String>, dead: &HashSet<String>| {
        completed.union(dead).count() >= tasks
    };
    let (mut completed, mut dead) = (HashSet::new(), HashSet::new());
    let mut last_scan = Instant::now() - Duration::from_secs(10);
    loop {
        // Chaos: SIGKILL a random engine every 0.05–0.3 s and start a new one.
        let pause = rand::rng().random_range(50..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let progress = seen.lock().unwrap().len();
        if progress < tasks * 9 / 10 {
            let i = rand::rng().random_range(0..engines.len());
            let agent = engines[i].agent;
            let _ = engines[i].child.kill(); // SIGKILL
            let _ = engines[i].child.wait();
            engines[i] = spawn_engine(agent, &file, &url, &agent_url);
            kills += 1;
        }
        if !redis_restarted && progress > tasks / 3 {
            server.restart().await.expect("redis restart with AOF");
            redis_restarted = true;
        }
        // The agent container restarts twice: its port refuses for 1.5 s.
        if (agent_restarts == 0 && progress > tasks / 5)
            || (agent_restarts == 1 && progress > tasks / 2)
        {
            agent_port.stop();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            agent_port.restart().await;
            agent_restarts += 1;
        }
        if last_scan.elapsed() > Duration::from_secs(2) || progress >= tasks {
            last_scan = Instant::now();
            completed = seen.lock().unwrap().keys().cloned().collect();
            if let Ok(d) = q.range(&cfg.keys.dlq(), "-", "+", 0).await {
                dead = d.iter().map(|e| DlqRecord::decode(e).task_id).collect();
            }
            if finished(&completed, &dead) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not finished in time: {} completed, {} dead-lettered of {tasks}",
            completed.len(),
            dead.len()
        );
    }
    for e in &mut engines {
        let _ = e.child.kill();
        let _ = e.child.wait();
    }
    assert!(redis_restarted, "Redis was restarted once");
    assert_eq!(agent_restarts, 2, "the agent was restarted twice");
    stop_checker.store(true, Ordering::Relaxed);
    for c in checkers {
        let _ = c.await;
    }

    // Count independently of the engines.
    let per_task: HashMap<String, u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(t, ids)| (t.clone(), ids.len() as u64))
        .collect();
    let dlq: Vec<DlqRecord> = q
        .range(&cfg.keys.dlq(), "-", "+", 0)
        .await
        .unwrap()
        .iter()
        .map(DlqRecord::decode)
        .collect();
    let dead: HashSet<String> = dlq.iter().map(|r| r.task_id.clone()).collect();
    let all: HashSet<String> = (0..tasks).map(|i| format!("t{i}")).collect();
    let lost: Vec<&String> = all
        .iter()
        .filter(|t| !per_task.contains_key(*t) && !dead.contains(*t))
        .collect();
    let duplicate_outputs: u64 = per_task.values().map(|n| n - 1).sum();
    let duplicate_joins: u64 = joins_seen
        .lock()
        .unwrap()
        .values()
        .map(|ids| ids.len() as u64 - 1)
        .sum();
    let l = ledger.lock().unwrap();
    let duplicate_effects: u64 = l.by_logical.values().map(|n| n.saturating_sub(1)).sum();
    let effects: u64 = l.by_logical.values().sum();
    let joins = joined.map_or(String::new(), |_| {
        format!(
            " joins={} duplicate_joins={duplicate_joins} bad_joins={}",
            joins_seen.lock().unwrap().len(),
            l.bad_joins.len()
        )
    });
    println!(
        "crash test ({} agents): submitted={tasks} max_len=1000 completed={} dead_lettered={} lost={} duplicates={} (effects {effects}, duplicate effects {duplicate_effects}, duplicate outputs {duplicate_outputs}){joins} agent_calls={} kills={kills} agent_restarts={agent_restarts} redis_restarts=1 elapsed={:.1}s",
        agents.len(),
        per_task.len(),
        dead.len(),
        lost.len(),
        duplicate_effects + duplicate_outputs,
        l.calls,
        started.elapsed().as_secs_f64()
    );
    if !dlq.is_empty() {
        println!(
            "dlq reasons: {:?}",
            dlq.iter()
                .map(|r| r.reason.as_str())
                .collect::<HashSet<_>>()
        );
    }
    assert!(
        lost.is_empty(),
        "lost {} tasks, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        duplicate_effects, 0,
        "an effect was applied twice for one task step"
    );
    assert_eq!(duplicate_outputs, 0, "a task reached the end twice");
    assert_eq!(duplicate_joins, 0, "a task was joined twice");
    assert!(
        l.bad_joins.is_empty(),
        "joins without both parts: {:?}",
        &l.bad_joins[..l.bad_joins.len().min(5)]
    );
    assert!(kills >= 5, "the chaos actually killed engines ({kills})");
    // Every completed task's steps each had exactly one effect.
    for t in per_task.keys() {
        for s in agents {
            assert_eq!(
                l.by_logical.get(&(t.clone(), (*s).to_owned())),
                Some(&1),
                "{t} at {s}"
            );
        }
        if joined.is_some() {
            assert!(
                joins_seen.lock().unwrap().contains_key(t),
                "{t} completed without its join being seen"
            );
        }
    }
}

/// Start `r4 engine --role intake` on `addr`.
fn spawn_intake(file: &std::path::Path, redis: &str, addr: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(["engine", "--role", "intake", "--redis", redis])
        .args(["--namespace", "crash"])
        .arg("--workflow-file")
        .arg(file)
        .args(["--listen", addr])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn r4 engine --role intake")
}

/// The batch intake under SIGKILL: submitters POST keyed batches to an
/// intake process that is killed every 80–300 ms (also in the middle of a
/// request) and restarted; a batch whose answer did not arrive is resent
/// until one does. Then every key has exactly one stream entry, carrying
/// the task id the submitter was told, and no resend ever found its batch
/// half applied (it is one atomic step: all new or all duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_intake_batches_all_or_nothing() {
    const SUBMITTERS: usize = 4;
    const BATCH: usize = 40;
    /// Submit until the intake has been killed this often.
    const KILLS: u32 = 12;
    let started = Instant::now();
    let server = RedisServer::start().await.expect("redis-server");
    let url = server.url();
    let q = RedisQueue::connect(&url).await.expect("connect");
    // No agent runs here and every batch must get in: no backlog limit.
    let (cfg, dir) = workflow_file(&WORKFLOW.replace(", maxLen: 1000", ""));
    let file = dir.path().join("crash.yaml");
    // A port of our own for every restart (tokio binds with SO_REUSEADDR).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let endpoint = format!("http://{addr}/v1/tasks:batch");
    let kills = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (file, url, addr) = (file.clone(), url.clone(), addr.clone());
        let (kills, done) = (kills.clone(), done.clone());
        std::thread::spawn(move || {
            let mut child = spawn_intake(&file, &url, &addr);
            while !done.load(Ordering::Relaxed) {
                let ms = rand::rng().random_range(80..300);
                std::thread::sleep(Duration::from_millis(ms));
                let _ = child.kill();
                let _ = child.wait();
                kills.fetch_add(1, Ordering::Relaxed);
                child = spawn_intake(&file, &url, &addr);
            }
            let _ = child.kill();
            let _ = child.wait();
        })
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut subs = Vec::new();
    for s in 0..SUBMITTERS {
        let (http, endpoint, kills) = (http.clone(), endpoint.clone(), kills.clone());
        subs.push(tokio::spawn(async move {
            let mut told: Vec<(String, String)> = Vec::new();
            let (mut resends, mut found_applied) = (0u32, 0u32);
            let mut b = 0;
            while kills.load(Ordering::Relaxed) < KILLS {
                b += 1;
                let keys: Vec<String> = (0..BATCH).map(|i| format!("s{s}-b{b}-t{i}")).collect();
                let body = json!({"tasks": keys.iter().map(|k| json!({"payload": {"key": k}, "idempotency_key": k})).collect::<Vec<_>>()});
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut first = true;
                let answer: Value = loop {
                    assert!(Instant::now() < deadline, "batch {s}/{b} never accepted");
                    if !first {
                        resends += 1;
                    }
                    first = false;
                    match http.post(&endpoint).json(&body).send().await {
                        Ok(r) if r.status() == 202 => match r.json().await {
                            Ok(v) => break v,
                            Err(_) => continue,
                        },
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let tasks = answer["tasks"].as_array().expect("tasks");
                assert_eq!(tasks.len(), BATCH);
                let dups = tasks.iter().filter(|t| t["duplicate"] == true).count();
                assert!(
                    dups == 0 || dups == BATCH,
                    "batch {s}/{b} was half applied: {dups} of {BATCH} already there"
                );
                if dups == BATCH {
                    found_applied += 1;
                }
                for (k, t) in keys.into_iter().zip(tasks) {
                    told.push((k, t["task_id"].as_str().unwrap_or_default().to_owned()));
                }
            }
            (told, resends, found_applied)
        }));
    }
    let mut told = HashMap::new();
    let (mut resends, mut found_applied) = (0, 0);
    for s in subs {
        let (t, r, f) = s.await.unwrap();
        told.extend(t);
        resends += r;
        found_applied += f;
    }
    done.store(true, Ordering::Relaxed);
    killer.join().unwrap();
    let kills = kills.load(Ordering::Relaxed);
    // One stream entry per key, with the id the submitter was told.
    let input = cfg.keys.stream("in");
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut last = "-".to_owned();
    loop {
        let page = q.range(&input, &last, "+", 1000).await.unwrap();
        let Some(tail) = page.last() else { break };
        last = format!("({}", tail.id);
        for e in &page {
            let t = Task::decode(&e.fields, 1 << 20).expect("a well-formed task");
            let key = t.payload["key"].as_str().unwrap_or_default().to_owned();
            assert_eq!(
                told.get(&key),
                Some(&t.task_id),
                "key {key}: entry and answer agree"
            );
            *seen.entry(key).or_default() += 1;
        }
    }
    let expected = told.len();
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    let lost = told.keys().filter(|k| !seen.contains_key(*k)).count();
    println!(
        "intake crash test: tasks={expected} batches={} entries={} lost={lost} duplicates={duplicates} kills={kills} resends={resends} resends_found_applied={found_applied} elapsed={:.1}s",
        expected / BATCH,
        seen.values().sum::<u32>(),
        started.elapsed().as_secs_f64()
    );
    assert!(expected > 0);
    assert_eq!((lost, duplicates), (0, 0));
}
