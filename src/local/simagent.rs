//! A simulated agent as a [`Delivery`]: the `simulate:` block of an agent (its own latency and
//! error rate, outage and slow-down windows, and the tool calls it makes per task, through the
//! real tool proxy, with arguments drawn from each tool's `keySpace`). Terminal agents (the ends
//! of the graph) record each task they finish in [`Finished`], so `r4 run` counts completions on
//! the agents' side, independently of the engine's bookkeeping.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::sim::{EffectLedger, LatencyModel, OutageSchedule, SlowdownSchedule};
use crate::api::workflow::AgentSpec;
use crate::engine::delivery::{
    Delivery, DeliveryError, DeliveryFuture, DeliveryRequest, Outputs, RequestKind,
};
use crate::engine::tools::{DEGRADED_HEADER, IDEMPOTENCY_HEADER, ToolProxy};
use crate::resilience::HttpRequest;

/// Tasks finished by the terminal agents, per (task, agent), with the (tokio) instant each
/// agent first finished each task. A task is complete when *every* terminal agent finished
/// it (each branch of a fan-out), at the instant its last branch did.
#[derive(Debug, Default)]
pub struct Finished {
    terminal: BTreeSet<String>,
    inner: Mutex<FinishedInner>,
}

#[derive(Debug, Default)]
struct FinishedInner {
    by_task: HashMap<String, HashMap<String, Instant>>,
    complete: usize,
}

impl Finished {
    /// A registry for a graph whose ends are `terminal` (agent names). With no terminal
    /// agent (a loop) no task can complete.
    pub fn new(terminal: impl IntoIterator<Item = String>) -> Self {
        Self {
            terminal: terminal.into_iter().collect(),
            inner: Mutex::default(),
        }
    }

    /// `agent` finished its step of `task_id` (the first time counts).
    pub fn record(&self, task_id: &str, agent: &str) {
        if !self.terminal.contains(agent) {
            return;
        }
        let mut inner = self.lock();
        let branches = inner.by_task.entry(task_id.to_string()).or_default();
        if branches.contains_key(agent) {
            return;
        }
        branches.insert(agent.to_string(), Instant::now());
        if branches.len() == self.terminal.len() {
            inner.complete += 1;
        }
    }

    /// Tasks every terminal agent finished.
    pub fn len(&self) -> usize {
        self.lock().complete
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When `task_id` completed (its last terminal branch finished), if it did.
    pub fn finished_at(&self, task_id: &str) -> Option<Instant> {
        let inner = self.lock();
        let branches = inner.by_task.get(task_id)?;
        (!self.terminal.is_empty() && branches.len() == self.terminal.len())
            .then(|| branches.values().max().copied())
            .flatten()
    }

    /// The terminal agents that finished `task_id` so far.
    pub fn branches_done(&self, task_id: &str) -> BTreeSet<String> {
        self.lock()
            .by_task
            .get(task_id)
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FinishedInner> {
        crate::resilience::lock(&self.inner)
    }
}

/// One simulated agent (every replica of it shares this).
pub struct SimAgent {
    name: String,
    tools: Vec<String>,
    /// The tool calls per task, each with the tool's `keySpace` (`None`: one key per task).
    calls: Vec<(String, Option<u64>)>,
    latency: LatencyModel,
    error_rate: f64,
    outages: OutageSchedule,
    slowdowns: SlowdownSchedule,
    /// Seeds the draw of call arguments, so a run is repeatable.
    seed: u64,
    /// When the run started (outage and slow-down windows are relative to it).
    start: Instant,
    terminal: bool,
    proxy: Arc<ToolProxy>,
    rng: Mutex<SmallRng>,
    finished: Arc<Finished>,
    ledger: Arc<EffectLedger>,
}

impl SimAgent {
    /// The agent of `spec` (which must have a `simulate:` block).
    pub fn new(
        spec: &AgentSpec,
        seed: u64,
        proxy: Arc<ToolProxy>,
        finished: Arc<Finished>,
        ledger: Arc<EffectLedger>,
    ) -> Result<Self, String> {
        let sim = spec
            .simulate
            .as_ref()
            .ok_or_else(|| format!("agent {:?} has no simulate block", spec.name))?;
        let calls = sim
            .calls
            .iter()
            .map(|t| {
                let key_space = proxy
                    .tool_spec(t)
                    .and_then(|s| s.simulate.as_ref())
                    .and_then(|s| s.key_space)
                    .and_then(|k| u64::try_from(k).ok())
                    .filter(|k| *k > 0);
                (t.clone(), key_space)
            })
            .collect();
        Ok(Self {
            name: spec.name.clone(),
            tools: spec.tools.clone(),
            calls,
            latency: LatencyModel::new(&sim.latency),
            error_rate: sim.error_rate,
            outages: OutageSchedule::new(&sim.outages)?,
            slowdowns: SlowdownSchedule::new(&sim.slowdowns)?,
            seed,
            start: Instant::now(),
            terminal: false,
            proxy,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            finished,
            ledger,
        })
    }

    /// The instant the run started, which outage and slow-down windows count from (default:
    /// when the agent was made).
    pub fn started_at(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Mark this agent as the end of the workflow: a task it finishes is complete. `r4 run`
    /// decides that from the graph (an agent none of whose outputs another agent consumes).
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    async fn work(&self, req: &DeliveryRequest) -> Result<Outputs, DeliveryError> {
        if req.kind == RequestKind::Compensate {
            // A compensation is a side effect like any other: one per key.
            let name = req.compensation.clone().unwrap_or_default();
            self.ledger.apply(
                &format!("compensate:{name}"),
                true,
                &req.idempotency_key,
                &req.task_id,
                &self.name,
            );
            return Ok(Outputs::PassThrough);
        }
        let elapsed = self.start.elapsed();
        if self.outages.is_down(elapsed) {
            // As a stopped container: nothing listens, the connection is refused.
            return Err(DeliveryError::unreachable(format!(
                "agent {}: connection refused (simulated outage)",
                self.name
            )));
        }
        let (delay, fails) = {
            let mut rng = crate::resilience::lock(&self.rng);
            (
                self.latency.sample(&mut *rng),
                rng.random::<f64>() < self.error_rate,
            )
        };
        tokio::time::sleep(delay.mul_f64(self.slowdowns.factor(elapsed))).await;
        if fails {
            return Err(DeliveryError::retryable(format!(
                "agent {} failed (simulated)",
                self.name
            )));
        }
        for (tool, key_space) in &self.calls {
            let body = serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": self.arguments(req, tool, *key_space)},
            });
            let mut call = HttpRequest::post("", body.to_string().into_bytes());
            call.headers
                .push((IDEMPOTENCY_HEADER.into(), req.idempotency_key.clone()));
            call.headers
                .push(("traceparent".into(), req.traceparent.clone()));
            let resp = self.proxy.call(&self.tools, tool, call).await;
            if resp.status >= 400 {
                let why = resp.header(DEGRADED_HEADER).unwrap_or("").to_string();
                let msg = format!("tool {tool} answered {} {why}", resp.status);
                let err = if resp.status == 403 || resp.status == 404 {
                    DeliveryError::permanent(msg)
                } else {
                    DeliveryError::retryable(msg)
                };
                return Err(err.with_tool(tool.clone()));
            }
        }
        if self.terminal {
            self.finished.record(&req.task_id, &self.name);
        }
        Ok(Outputs::PassThrough)
    }
}

impl SimAgent {
    /// The arguments of a call to `tool` for this task. With a key space, one of `key_space`
    /// keys, drawn from the task's payload (so a redelivered task asks the same question and a
    /// seeded run repeats itself); without, the task's own id (every task asks its own).
    fn arguments(
        &self,
        req: &DeliveryRequest,
        tool: &str,
        key_space: Option<u64>,
    ) -> serde_json::Value {
        match key_space {
            None => serde_json::json!({"task_id": req.task_id}),
            Some(n) => {
                let mut h = Fnv::new(self.seed);
                h.write(tool.as_bytes());
                h.write(req.payload.to_string().as_bytes());
                serde_json::json!({"key": h.finish() % n})
            }
        }
    }
}

/// FNV-1a, seeded: a stable hash (the standard library's may change between releases, and a
/// seeded run must give the same figures).
struct Fnv(u64);

impl Fnv {
    fn new(seed: u64) -> Self {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.write(&seed.to_le_bytes());
        h
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The hash, its bits mixed so that `% n` is uniform for any `n`.
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
}

impl Delivery for SimAgent {
    fn deliver<'a>(&'a self, req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
        Box::pin(async move {
            match tokio::time::timeout(req.deadline, self.work(req)).await {
                Ok(r) => r,
                Err(_) => Err(DeliveryError::retryable(format!(
                    "agent {} timed out after {:?}",
                    self.name, req.deadline
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use super::*;
    use crate::api::workflow::AgentWorkflowSpec;
    use crate::engine::tools::Transport;
    use crate::resilience::{BoxError, HttpResponse};

    /// A workflow with one agent `a` calling tool `bank` (simulated as `tool_sim`).
    fn spec(agent_sim: &str, tool_sim: &str) -> AgentWorkflowSpec {
        serde_yaml::from_str(&format!(
            "queue: {{redis: {{url: \"redis://x\"}}}}\n\
             tools:\n  - {{name: bank, url: \"http://bank/mcp\", readOnly: true, simulate: {tool_sim}}}\n\
             agents:\n  - {{name: a, image: i, consumes: in, tools: [bank], simulate: {agent_sim}}}\n"
        ))
        .unwrap()
    }

    /// The agent of `spec`, its tool answering 200 and recording the arguments it was asked.
    fn agent(spec: &AgentWorkflowSpec) -> (SimAgent, Arc<Mutex<Vec<serde_json::Value>>>) {
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let s2 = seen.clone();
        let transport: Transport =
            tower::util::BoxCloneService::new(tower::service_fn(move |r: HttpRequest| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                s2.lock().unwrap().push(body["params"]["arguments"].clone());
                async { Ok::<_, BoxError>(HttpResponse::new(200, "{}")) }
            }));
        let proxy =
            ToolProxy::new(spec, &BTreeMap::new(), &|_| transport.clone(), None, None).unwrap();
        proxy.set_killed(BTreeSet::new());
        let a = SimAgent::new(
            &spec.agents[0],
            7,
            Arc::new(proxy),
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        (a, seen)
    }

    fn task(n: u64) -> DeliveryRequest {
        DeliveryRequest {
            task_id: format!("task-{n}"),
            step: "a".into(),
            kind: RequestKind::Task,
            compensation: None,
            payload: serde_json::json!({"n": n}),
            attempt: 1,
            idempotency_key: format!("task-{n}:a"),
            traceparent: String::new(),
            deadline: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_draw_their_arguments_from_the_key_space() {
        let (a, seen) = agent(&spec(
            "{latency: {medianMs: 1}, calls: [bank]}",
            "{latency: {medianMs: 1}, keySpace: 50}",
        ));
        for n in 0..5000 {
            a.deliver(&task(n)).await.unwrap();
        }
        // The same task asks the same question again.
        a.deliver(&task(17)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[17], seen[5000]);
        let mut per_key: BTreeMap<u64, u32> = BTreeMap::new();
        for args in &seen[..5000] {
            *per_key.entry(args["key"].as_u64().unwrap()).or_default() += 1;
        }
        // 50 keys, each drawn about 100 times.
        assert_eq!(per_key.len(), 50, "{per_key:?}");
        assert!(per_key.keys().all(|k| *k < 50));
        assert!(
            per_key.values().all(|c| (55..=145).contains(c)),
            "{per_key:?}"
        );
        // Without a key space every task asks its own question.
        let (a, seen) = agent(&spec(
            "{latency: {medianMs: 1}, calls: [bank]}",
            "{latency: {medianMs: 1}}",
        ));
        a.deliver(&task(1)).await.unwrap();
        assert_eq!(
            seen.lock().unwrap()[0],
            serde_json::json!({"task_id": "task-1"})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_outage_refuses_connections_and_a_slowdown_multiplies_latency() {
        let (a, seen) = agent(&spec(
            "{latency: {medianMs: 100, p99Ms: 100}, calls: [bank], outages: [{after: 10s, for: 5s}], slowdowns: [{after: 20s, for: 5s, factor: 3}]}",
            "{latency: {medianMs: 1}}",
        ));
        let t0 = Instant::now();
        a.deliver(&task(1)).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
        tokio::time::sleep_until(t0 + Duration::from_secs(10)).await;
        let e = a.deliver(&task(2)).await.unwrap_err();
        assert!(e.unreachable && !e.permanent, "{e:?}");
        assert_eq!(seen.lock().unwrap().len(), 1, "no call made while down");
        tokio::time::sleep_until(t0 + Duration::from_secs(15)).await;
        let t = Instant::now();
        a.deliver(&task(3)).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(100));
        tokio::time::sleep_until(t0 + Duration::from_secs(20)).await;
        let t = Instant::now();
        a.deliver(&task(4)).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(300));
        tokio::time::sleep_until(t0 + Duration::from_secs(25)).await;
        let t = Instant::now();
        a.deliver(&task(5)).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_completes_when_its_last_branch_finishes() {
        let f = Finished::new(["left".to_string(), "right".to_string()]);
        let t0 = Instant::now();
        f.record("t1", "left");
        f.record("t1", "middle"); // not an end of the graph: ignored
        assert_eq!(f.len(), 0, "one branch is not the task");
        assert_eq!(f.finished_at("t1"), None);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        f.record("t1", "right");
        f.record("t1", "right"); // a duplicate finish counts once
        assert_eq!(f.len(), 1);
        assert_eq!(
            f.finished_at("t1"),
            Some(t0 + std::time::Duration::from_secs(3))
        );
        assert_eq!(f.branches_done("t1").len(), 2);
        // No end at all (a loop): nothing completes.
        let none = Finished::new(Vec::<String>::new());
        none.record("t1", "left");
        assert_eq!((none.len(), none.finished_at("t1")), (0, None));
    }
}
