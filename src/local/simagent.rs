//! A simulated agent as a [`Delivery`]: the `simulate:` block of an agent (its own latency and
//! error rate, and the tool calls it makes per task, through the real tool proxy). Terminal
//! agents (those that produce nothing) record each task they finish, so `r4 run` counts
//! completions on the agents' side, independently of the engine's bookkeeping.

use std::collections::HashMap;
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

/// Tasks finished by terminal agents, with the (tokio) instant each first finished.
#[derive(Debug, Default)]
pub struct Finished {
    at: Mutex<HashMap<String, Instant>>,
}

impl Finished {
    pub fn record(&self, task_id: &str) {
        self.lock()
            .entry(task_id.to_string())
            .or_insert_with(Instant::now);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When `task_id` finished, if it did.
    pub fn finished_at(&self, task_id: &str) -> Option<Instant> {
        self.lock().get(task_id).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        crate::resilience::lock(&self.at)
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
            self.finished.record(&req.task_id);
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
