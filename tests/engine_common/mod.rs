//! Shared helpers of the engine integration tests: a workflow builder, a
//! scripted in-process agent, polling with a deadline, role launchers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r4::engine::delivery::{DeliveryFuture, RequestKind};
use r4::engine::{
    AgentOptions, AgentRole, Delivery, DeliveryError, DeliveryRequest, Outputs, WorkflowConfig,
};
use r4::queue::Queue;
use r4::queue::memory::MemoryQueue;
use r4::queue::redis::RedisQueue;
use r4::testutil::RedisServer;
use tokio::sync::watch;
use tokio::time::Instant;

/// A policy with short timings, for tests.
pub const FAST_POLICY: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: fast}
spec:
  timeout: {perAttempt: 2s, overall: 10s}
  retry:
    maxAttempts: 3
    backoff: {initial: 10ms, max: 40ms, multiplier: 2, jitter: None}
  deadLetter: {maxDeliveries: 3, retention: 1h, replay: {automatic: true, maxReplays: 2, backoff: 100ms}}
  idempotency: {ttl: auto}
"#;

/// Workflow `name` with the given agents block (YAML list items) and the fast policy.
pub fn workflow(name: &str, agents: &str, extra: &str) -> WorkflowConfig {
    let yaml = format!(
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: {name}}}
spec:
  queue:
    redis: {{url: "redis://127.0.0.1:6379/0"}}
    visibilityTimeout: 1s
  policyRef: fast
  agents:
{agents}
{extra}
---
{FAST_POLICY}"#
    );
    WorkflowConfig::from_yaml(
        "test",
        &yaml,
        None,
        Some(&format!(
            "ns-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    )
    .unwrap_or_else(|e| panic!("test workflow invalid: {e}\n{yaml}"))
}

/// Three agents a → b → c, c writes `done`.
pub fn three_agents(name: &str) -> WorkflowConfig {
    workflow(
        name,
        r#"    - {name: a, image: x, consumes: in, produces: [ab]}
    - {name: b, image: x, consumes: ab, produces: [bc]}
    - {name: c, image: x, consumes: bc, produces: [done]}"#,
        "",
    )
}

pub type Script = dyn Fn(&DeliveryRequest, u64) -> Result<Outputs, DeliveryError> + Send + Sync;

/// An in-process agent: answers by a script, records every request, and
/// applies "effects" at most once per idempotency key (like a well-behaved
/// agent), counting them per key and per (task, step, kind).
#[derive(Clone)]
pub struct ScriptedAgent {
    pub calls: Arc<Mutex<Vec<DeliveryRequest>>>,
    pub effects: Arc<Mutex<HashMap<String, u64>>>,
    script: Arc<Script>,
}

impl ScriptedAgent {
    /// `script(req, n)` where n = how many calls this idempotency key had before.
    pub fn new(
        script: impl Fn(&DeliveryRequest, u64) -> Result<Outputs, DeliveryError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Arc::default(),
            effects: Arc::default(),
            script: Arc::new(script),
        }
    }

    pub fn ok() -> Self {
        Self::new(|_, _| Ok(Outputs::PassThrough))
    }

    pub fn calls(&self) -> Vec<DeliveryRequest> {
        self.calls.lock().unwrap().clone()
    }

    pub fn calls_for(&self, step: &str) -> Vec<DeliveryRequest> {
        self.calls()
            .into_iter()
            .filter(|c| c.step == step)
            .collect()
    }
}

impl Delivery for ScriptedAgent {
    fn deliver<'a>(&'a self, req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
        Box::pin(async move {
            let before = {
                let mut calls = self.calls.lock().unwrap();
                let n = calls
                    .iter()
                    .filter(|c| c.idempotency_key == req.idempotency_key)
                    .count() as u64;
                calls.push(req.clone());
                n
            };
            let res = (self.script)(req, before);
            if res.is_ok() {
                let mut eff = self.effects.lock().unwrap();
                let kind = if req.kind == RequestKind::Task {
                    "task"
                } else {
                    "compensate"
                };
                eff.entry(format!("{}|{}|{kind}", req.task_id, req.step))
                    .or_insert(1);
            }
            res
        })
    }
}

/// Either backend.
pub enum Backend {
    Memory,
    Redis(RedisServer),
}

pub async fn queue(redis: bool) -> (Backend, Arc<dyn Queue>) {
    if redis {
        let server = RedisServer::start().await.expect("redis-server");
        let q = RedisQueue::connect(&server.url()).await.expect("connect");
        (Backend::Redis(server), Arc::new(q))
    } else {
        (Backend::Memory, Arc::new(MemoryQueue::new()))
    }
}

/// Poll `cond` every 20 ms until true or `within` passes (then panic with `what`).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Running roles with one shutdown switch.
pub struct Running {
    pub shutdown: watch::Sender<bool>,
    pub handles: Vec<tokio::task::JoinHandle<()>>,
    pub stats: Vec<Arc<r4::engine::Stats>>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for h in self.handles {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }

    pub fn completed(&self) -> u64 {
        self.stats.iter().map(|s| s.counters().completed).sum()
    }
}

pub fn fast_opts() -> AgentOptions {
    AgentOptions {
        read_block: Duration::from_millis(50),
        batch: 16,
        drain: Duration::from_secs(5),
        ..Default::default()
    }
}

/// Start one engine per agent of `cfg`, all delivering through `agent`.
pub fn start_agents(
    cfg: &Arc<WorkflowConfig>,
    q: &Arc<dyn Queue>,
    agent: &ScriptedAgent,
) -> Running {
    let (tx, rx) = watch::channel(false);
    let mut handles = Vec::new();
    let mut stats = Vec::new();
    for a in &cfg.agents {
        let role = AgentRole::new(
            cfg.clone(),
            &a.name,
            q.clone(),
            Arc::new(agent.clone()),
            &r4::engine::engine_id(&a.name),
        )
        .unwrap()
        .with_options(fast_opts());
        stats.push(role.stats());
        let rx = rx.clone();
        handles.push(tokio::spawn(async move {
            role.run(rx).await.unwrap();
        }));
    }
    Running {
        shutdown: tx,
        handles,
        stats,
    }
}

/// Add a well-formed task directly to `stream` (name).
pub async fn add_task(
    q: &Arc<dyn Queue>,
    cfg: &WorkflowConfig,
    stream: &str,
    id: &str,
    payload: serde_json::Value,
) -> String {
    let t = r4::engine::task::Task::new(id, payload);
    q.add(&cfg.keys.stream(stream), t.encode(), None)
        .await
        .unwrap()
}

pub async fn dlq(q: &Arc<dyn Queue>, cfg: &WorkflowConfig) -> Vec<r4::engine::dlq::DlqRecord> {
    r4::engine::dlq::list(q.as_ref(), &cfg.keys, r4::engine::dlq::Store::Dlq, 0)
        .await
        .unwrap()
}

/// A child process (an `r4 engine`) killed and reaped when dropped.
pub struct Engine(pub std::process::Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serve `app` on a free loopback port in the background (a test's agent
/// or tool); returns its address.
pub async fn serve_app(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}
