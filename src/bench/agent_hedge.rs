//! `r4 bench agent-hedge`: the worked example's slow-agent profile (`config/samples/
//! payment-disputes.yaml`: a bank whose statement queries sometimes hang, an investigation
//! agent that is itself sometimes slow) run three times in one process, on the virtual clock
//! with the same seed and tasks: no hedging, tool hedging only, and tool + agent hedging.
//! For each: task p99/p99.9, failure rate, the agent's hedges and shadow wins, extra agent
//! work (shadow deliveries over the agent's own deliveries) and extra bank requests (over the
//! run without hedging).
//!
//! The run and the measurement are [`crate::local::run`]'s; this module only chooses the
//! three configurations and lays the figures side by side.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::api::validate::Manifest;
use crate::local::report::RunReport;
use crate::local::run::{self, Load, Mechanism, RunOptions};
use crate::queue::Queue;

/// The hedged agent and the slow tool of the worked example.
const AGENT: &str = "investigation";
const TOOL: &str = "bank-api";

/// What to run.
#[derive(Clone, Debug)]
pub struct AgentHedgeBenchOpts {
    pub tasks: u64,
    pub seed: u64,
}

impl Default for AgentHedgeBenchOpts {
    fn default() -> Self {
        Self {
            tasks: 20_000,
            seed: 1,
        }
    }
}

/// One run of the sample with `disable` switched off.
fn one(
    manifests: &[Manifest],
    disable: &[Mechanism],
    opts: &AgentHedgeBenchOpts,
) -> Result<RunReport, String> {
    let cfg = run::prepare(manifests, None, "r4-bench-agent-hedge", disable)
        .map_err(|e| e.to_string())?;
    let load = Load::choose(&cfg, None, false).map_err(|e| e.to_string())?;
    let run_opts = RunOptions {
        tasks: Some(opts.tasks),
        load,
        seed: opts.seed,
        progress: false,
        clock: "virtual",
        drill: None,
    };
    // The virtual clock: a paused runtime of its own per run, so each starts at zero.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let q: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        run::run(cfg, q, &run_opts, |_| {}).await
    })
    .map_err(|e| e.to_string())
}

/// The figures of one configuration; `base_requests`: the bank's requests without hedging.
fn figures(r: &RunReport, base_requests: u64) -> Value {
    let bank = r.tools.get(TOOL);
    let requests = bank.map_or(0, |t| t.requests);
    let hedging = r.agents.get(AGENT).and_then(|a| a.hedging.clone());
    json!({
        "p50_ms": r.latency_ms.p50,
        "p99_ms": r.latency_ms.p99,
        "p999_ms": r.latency_ms.p999,
        "failure_rate": r.incident_cost.failure_rate,
        "daily_cost": r.incident_cost.daily_cost,
        "late": r.late,
        "completed": r.completed,
        "lost": r.lost,
        "duplicate_effects": r.duplicate_effects,
        "tool_hedges": r.hedges,
        "agent_hedges": hedging.as_ref().map_or(0, |h| h.hedges),
        "shadow_deliveries": hedging.as_ref().map_or(0, |h| h.shadow_deliveries),
        "shadow_wins": hedging.as_ref().map_or(0, |h| h.shadow_wins),
        "extra_agent_work": hedging.as_ref().map_or(0.0, |h| h.extra_work),
        "bank_requests": requests,
        "extra_bank_requests": if base_requests == 0 {
            0.0
        } else {
            requests as f64 / base_requests as f64 - 1.0
        },
    })
}

/// Run the bench: `{tasks, seed, none, tool, tool_agent}`, each with the figures above.
pub fn run(opts: AgentHedgeBenchOpts) -> Result<Value, String> {
    let manifests = crate::bench::worked_example_manifests()?;
    let wall = std::time::Instant::now();
    let none = one(
        &manifests,
        &[Mechanism::Hedge, Mechanism::AgentHedge],
        &opts,
    )?;
    let tool = one(&manifests, &[Mechanism::AgentHedge], &opts)?;
    let both = one(&manifests, &[], &opts)?;
    let base = none.tools.get(TOOL).map_or(0, |t| t.requests);
    Ok(json!({
        "tasks": opts.tasks,
        "seed": opts.seed,
        "clock": "virtual",
        "none": figures(&none, base),
        "tool": figures(&tool, base),
        "tool_agent": figures(&both, base),
        "wall_seconds": wall.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_example_hedges_its_slow_agent() {
        let m = crate::bench::worked_example_manifests().unwrap();
        let cfg = run::prepare(&m, None, "t", &[]).unwrap();
        assert!(cfg.agent(AGENT).unwrap().hedge.is_some());
        let off = run::prepare(&m, None, "t", &[Mechanism::AgentHedge]).unwrap();
        assert!(off.agent(AGENT).unwrap().hedge.is_none());
        assert!(off.spec.agents.iter().all(|a| a.hedge.is_none()));
    }

    #[test]
    fn a_small_run_of_each_configuration_loses_nothing() {
        let v = run(AgentHedgeBenchOpts {
            tasks: 300,
            seed: 1,
        })
        .unwrap();
        for k in ["none", "tool", "tool_agent"] {
            assert_eq!(v[k]["completed"], 300, "{k}: {v}");
            assert_eq!(v[k]["lost"], 0, "{k}: {v}");
            assert_eq!(v[k]["duplicate_effects"], 0, "{k}: {v}");
        }
        assert_eq!(v["none"]["tool_hedges"], 0);
        assert_eq!(v["tool"]["agent_hedges"], 0);
    }
}
