//! A simulated agent as a [`Delivery`]: the `simulate:` block of an agent (its own latency and
//! error rate, and the tool calls it makes per task, through the real tool proxy). Terminal
//! agents (the ends of the graph) record each task they finish in [`Finished`], so `r4 run`
//! counts completions on the agents' side, independently of the engine's bookkeeping.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::sim::{EffectLedger, LatencyModel};
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
    calls: Vec<String>,
    latency: LatencyModel,
    error_rate: f64,
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
        Ok(Self {
            name: spec.name.clone(),
            tools: spec.tools.clone(),
            calls: sim.calls.clone(),
            latency: LatencyModel::new(&sim.latency),
            error_rate: sim.error_rate,
            terminal: false,
            proxy,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            finished,
            ledger,
        })
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
        let (delay, fails) = {
            let mut rng = crate::resilience::lock(&self.rng);
            (
                self.latency.sample(&mut *rng),
                rng.random::<f64>() < self.error_rate,
            )
        };
        tokio::time::sleep(delay).await;
        if fails {
            return Err(DeliveryError::retryable(format!(
                "agent {} failed (simulated)",
                self.name
            )));
        }
        for tool in &self.calls {
            let body = serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": {"task_id": req.task_id}},
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
    use super::*;

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
