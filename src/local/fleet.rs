//! The engines of a local run's agents (`r4 run`): one tokio task per replica, started, killed
//! and restarted the way a kubelet treats the pods of a Deployment — so a drill's PodKill has
//! something real to kill, and the run's counters survive the engines that made them.
//!
//! A kill is a crash, not a safe stop: the replica's task is aborted (its in-flight handlers
//! with it, nothing drained, nothing acknowledged), then its own shutdown signal ends the helper
//! tasks it had started (stats publisher, watchers), as a dead pod's would be gone. Its pending
//! entries stay with its consumer name until a live engine claims them after the visibility
//! timeout. [`RESTART_AFTER`] later a new engine, under a new name (a new pod), takes its place.
//!
//! What a role does is the engine's ([`crate::engine::AgentRole`]); when to kill, and how many,
//! is the drill's ([`super::drill`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::engine::delivery::Delivery;
use crate::engine::hedge::AgentHedge;
use crate::engine::{AgentOptions, AgentRole, EngineError, Stats, WorkflowConfig};
use crate::queue::Queue;
use crate::resilience::lock;

/// How long after a kill the replacement engine starts: a ReplicaSet's new pod being
/// scheduled and started.
pub const RESTART_AFTER: Duration = Duration::from_secs(5);

/// Every agent replica of one run.
pub struct Fleet {
    cfg: Arc<WorkflowConfig>,
    queue: Arc<dyn Queue>,
    seed: u64,
    /// Per agent (by name): its position in the spec and what answers its deliveries.
    agents: BTreeMap<String, (usize, Arc<dyn Delivery>)>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Set by [`Fleet::stop`]: no restart happens after it.
    stopping: bool,
    live: Vec<Replica>,
    /// Every engine ever started, killed ones included (their counts stay the run's).
    stats: Vec<Arc<Stats>>,
    /// The agent hedging of every engine ever started that hedges, by agent.
    hedges: Vec<(String, Arc<AgentHedge>)>,
    /// Restarts scheduled and not yet done.
    restarts: Vec<JoinHandle<()>>,
    /// Kills and restarts, for the report's timeline.
    log: Vec<(Instant, FleetEvent)>,
    generation: u64,
}

struct Replica {
    agent: String,
    slot: u64,
    engine_id: String,
    handle: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// A kill or a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    Killed { agent: String, engine: String },
    Restarted { agent: String, engine: String },
}

impl Fleet {
    /// A fleet for `cfg`'s agents (no engine running yet); `deliveries` answers each agent's
    /// tasks, by agent name.
    pub fn new(
        cfg: Arc<WorkflowConfig>,
        queue: Arc<dyn Queue>,
        seed: u64,
        deliveries: BTreeMap<String, Arc<dyn Delivery>>,
    ) -> Arc<Self> {
        let agents = cfg
            .spec
            .agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                deliveries
                    .get(&a.name)
                    .map(|d| (a.name.clone(), (i, d.clone())))
            })
            .collect();
        Arc::new(Self {
            cfg,
            queue,
            seed,
            agents,
            state: Mutex::default(),
        })
    }

    /// Start every replica of every agent (`replicas`, at least one).
    pub fn start_all(&self) -> Result<(), EngineError> {
        for a in &self.cfg.spec.agents {
            for slot in 0..a.replicas.unwrap_or(1).max(1) as u64 {
                self.spawn(&a.name, slot, 0)?;
            }
        }
        Ok(())
    }

    /// Start replica `slot` of `agent`, generation `generation` (0 at the start; each restart
    /// a new one, and a new engine name, as a new pod has). Nothing starts once stopping.
    fn spawn(&self, agent: &str, slot: u64, generation: u64) -> Result<(), EngineError> {
        let Some((index, delivery)) = self.agents.get(agent) else {
            return Err(EngineError::Config(format!("unknown agent {agent:?}")));
        };
        let engine_id = if generation == 0 {
            format!("{agent}-{slot}")
        } else {
            format!("{agent}-{slot}-r{generation}")
        };
        let options = AgentOptions {
            jitter_seed: Some(jitter_seed(self.seed, *index as u64, slot, generation)),
            ..Default::default()
        };
        let role = AgentRole::new(
            self.cfg.clone(),
            agent,
            self.queue.clone(),
            delivery.clone(),
            &engine_id,
        )?
        .with_options(options);
        let mut st = lock(&self.state);
        if st.stopping {
            return Ok(());
        }
        st.stats.push(role.stats());
        if let Some(h) = role.hedge() {
            st.hedges.push((agent.to_string(), h));
        }
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(async move {
            if let Err(e) = role.run(stop_rx).await {
                tracing::error!(error = %e, "agent role stopped");
            }
        });
        if generation > 0 {
            st.log.push((
                Instant::now(),
                FleetEvent::Restarted {
                    agent: agent.to_string(),
                    engine: engine_id.clone(),
                },
            ));
        }
        st.live.push(Replica {
            agent: agent.to_string(),
            slot,
            engine_id,
            handle,
            stop,
        });
        Ok(())
    }

    /// Crash `count` running engines of `agent` (never more than run), each replaced
    /// [`RESTART_AFTER`] later; returns how many were killed.
    pub fn kill(self: &Arc<Self>, agent: &str, count: u32) -> u32 {
        let mut st = lock(&self.state);
        if st.stopping {
            return 0;
        }
        let mut killed = 0u32;
        let mut i = 0;
        while i < st.live.len() && killed < count {
            if st.live[i].agent != agent || st.live[i].handle.is_finished() {
                i += 1;
                continue;
            }
            let r = st.live.remove(i);
            // Abort first: the role must not see its shutdown and drain like a safe stop.
            r.handle.abort();
            let _ = r.stop.send(true);
            st.log.push((
                Instant::now(),
                FleetEvent::Killed {
                    agent: r.agent.clone(),
                    engine: r.engine_id.clone(),
                },
            ));
            st.generation += 1;
            let (fleet, agent, slot, generation) =
                (Arc::clone(self), r.agent.clone(), r.slot, st.generation);
            st.restarts.push(tokio::spawn(async move {
                tokio::time::sleep(RESTART_AFTER).await;
                if let Err(e) = fleet.spawn(&agent, slot, generation) {
                    tracing::error!(error = %e, agent, "cannot restart a killed engine");
                }
            }));
            killed += 1;
        }
        killed
    }

    /// Engines of `agent` running now.
    pub fn live(&self, agent: &str) -> usize {
        lock(&self.state)
            .live
            .iter()
            .filter(|r| r.agent == agent && !r.handle.is_finished())
            .count()
    }

    /// The stats of every engine ever started (killed ones included).
    pub fn stats(&self) -> Vec<Arc<Stats>> {
        lock(&self.state).stats.clone()
    }

    /// The agent hedging counters of every engine ever started, by agent name.
    pub fn hedges(&self) -> Vec<(String, Arc<AgentHedge>)> {
        lock(&self.state).hedges.clone()
    }

    /// Kills and restarts so far, in order.
    pub fn log(&self) -> Vec<(Instant, FleetEvent)> {
        lock(&self.state).log.clone()
    }

    /// Safe stop of every live engine (they stop reading and drain); restarts not yet done are
    /// cancelled. Returns the tasks to wait for.
    pub fn stop(&self) -> Vec<JoinHandle<()>> {
        let mut st = lock(&self.state);
        st.stopping = true;
        for h in st.restarts.drain(..) {
            h.abort();
        }
        st.live
            .drain(..)
            .map(|r| {
                let _ = r.stop.send(true);
                r.handle
            })
            .collect()
    }
}

/// The jitter seed of one engine: distinct per agent, slot and generation, and the same for
/// the same run seed (the first generation's as `r4 run` always had them).
fn jitter_seed(seed: u64, agent: u64, slot: u64, generation: u64) -> u64 {
    super::run::seed_for(seed, 1000 + 100 * agent + slot + 1_000_000 * generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::delivery::{DeliveryFuture, DeliveryRequest, Outputs};
    use crate::queue::memory::MemoryQueue;

    /// An agent that answers after a second, so a kill catches tasks in flight.
    struct Slow;
    impl Delivery for Slow {
        fn deliver<'a>(&'a self, _req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(Outputs::PassThrough)
            })
        }
    }

    fn fleet() -> Arc<Fleet> {
        let text = "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: g}\nspec:\n  queue: {redis: {url: \"redis://x\"}}\n  agents:\n    - {name: a, image: i, consumes: in, produces: [other], replicas: 3}\n    - {name: b, image: i, consumes: other}\n";
        let cfg = Arc::new(WorkflowConfig::from_yaml("s", text, None, None).unwrap());
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let d: Arc<dyn Delivery> = Arc::new(Slow);
        Fleet::new(
            cfg,
            q,
            1,
            [("a".to_string(), d.clone()), ("b".to_string(), d)].into(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn kills_never_more_than_run_and_restarts_like_a_kubelet() {
        let f = fleet();
        f.start_all().unwrap();
        assert_eq!((f.live("a"), f.live("b")), (3, 1));
        assert_eq!(f.kill("a", 2), 2);
        assert_eq!(f.live("a"), 1);
        // Only one is left to kill, whatever is asked.
        assert_eq!(f.kill("a", 5), 1);
        assert_eq!(f.live("a"), 0);
        assert_eq!(f.kill("nobody", 1), 0);
        assert_eq!(f.live("b"), 1, "another agent's engines are untouched");
        tokio::time::sleep(RESTART_AFTER + Duration::from_millis(10)).await;
        assert_eq!(f.live("a"), 3, "every killed engine replaced");
        let log = f.log();
        let restarted: Vec<&str> = log
            .iter()
            .filter_map(|(_, e)| match e {
                FleetEvent::Restarted { engine, .. } => Some(engine.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(restarted.len(), 3);
        assert!(
            restarted.iter().all(|e| e.contains("-r")),
            "new engines, new names: {restarted:?}"
        );
        assert_eq!(f.stats().len(), 4 + 3, "the dead engines' counts stay");
        for h in f.stop() {
            h.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_restart_after_stop() {
        let f = fleet();
        f.start_all().unwrap();
        assert_eq!(f.kill("b", 1), 1);
        for h in f.stop() {
            h.await.unwrap();
        }
        tokio::time::sleep(RESTART_AFTER * 2).await;
        assert_eq!(f.live("b"), 0);
        assert_eq!(f.kill("a", 1), 0, "nothing is killed once stopping");
    }
}
