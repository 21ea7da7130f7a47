//! The engine's view of a workflow: an [`AgentWorkflow`] and its
//! [`CircuitPolicy`] resolved into plain numbers and durations, with every
//! default in one place.
//!
//! Owns: defaults, the `idempotency.ttl: auto` rule, clamping of timings that
//! would let a live consumer's entry be claimed away. Leaves the policy
//! mechanisms themselves (hedging, breakers, budgets) to `resilience`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::api::policy::{CircuitPolicySpec, Jitter};
use crate::api::validate::{Manifest, RefMode, validate_texts};
use crate::api::workflow::{AgentSpec, AgentWorkflowSpec, DegradedMode};
use crate::queue::Keys;

use super::EngineError;

/// Default `queue.visibilityTimeout`.
pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);
/// Default `intake.maxPayloadBytes` (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Default `deadLetter.maxDeliveries`.
pub const DEFAULT_MAX_DELIVERIES: u64 = 5;
/// Default per-attempt deadline of one delivery to an agent.
pub const DEFAULT_PER_ATTEMPT: Duration = Duration::from_secs(10);

/// Retry backoff (`retry.backoff`): the resilience module's, so a task's
/// redeliveries and a tool's retries follow one formula
/// ([`crate::resilience::retry::backoff_delay`]).
pub type Backoff = crate::resilience::BackoffConfig;

/// The engine's default `retry.backoff` (100 ms doubling up to 5 s, full
/// jitter).
pub fn default_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
        multiplier: 2.0,
        jitter: crate::resilience::Jitter::Full,
    }
}

/// DLQ replay policy (`deadLetter.replay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Replay {
    pub automatic: bool,
    pub max_replays: u32,
    /// Base of the exponential replay backoff: replay `n` (0-based) waits
    /// `backoff * 2^n` after the entry was dead-lettered.
    pub backoff: Duration,
}

impl Default for Replay {
    fn default() -> Self {
        Self {
            automatic: true,
            max_replays: 3,
            backoff: Duration::from_secs(60),
        }
    }
}

/// Resolved delivery policy of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_deliveries: u64,
    pub backoff: Backoff,
    pub per_attempt: Duration,
    pub replay: Replay,
    pub retention: Duration,
    /// TTL of inbox keys and intake idempotency keys.
    pub idempotency_ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        let mut p = base_policy();
        p.idempotency_ttl = auto_ttl(&p);
        p
    }
}

fn base_policy() -> Policy {
    Policy {
        max_deliveries: DEFAULT_MAX_DELIVERIES,
        backoff: default_backoff(),
        per_attempt: DEFAULT_PER_ATTEMPT,
        replay: Replay::default(),
        retention: Duration::from_secs(168 * 3600),
        idempotency_ttl: Duration::from_secs(168 * 3600),
    }
}

impl Policy {
    /// Resolve a policy spec (`None`: all defaults).
    pub fn from_spec(spec: Option<&CircuitPolicySpec>) -> Result<Self, EngineError> {
        let dur = |d: &crate::api::common::DurationStr, what: &str| {
            d.parse()
                .map_err(|e| EngineError::Config(format!("{what}: {e}")))
        };
        let Some(spec) = spec else {
            return Ok(Self::default());
        };
        let mut p = base_policy();
        if let Some(b) = spec.retry.as_ref().and_then(|r| r.backoff.as_ref()) {
            p.backoff = Backoff {
                initial: dur(&b.initial, "retry.backoff.initial")?,
                max: dur(&b.max, "retry.backoff.max")?,
                multiplier: b.multiplier.unwrap_or(2.0),
                jitter: b.jitter.unwrap_or(Jitter::Full).into(),
            };
        }
        if let Some(t) = spec.timeout.as_ref().and_then(|t| t.per_attempt.as_ref()) {
            p.per_attempt = dur(t, "timeout.perAttempt")?;
        }
        if let Some(dl) = &spec.dead_letter {
            p.max_deliveries = u64::try_from(dl.max_deliveries.max(1)).unwrap_or(1);
            if let Some(r) = &dl.retention {
                p.retention = dur(r, "deadLetter.retention")?;
            }
            if let Some(r) = &dl.replay {
                p.replay.automatic = r.automatic;
                if let Some(n) = r.max_replays {
                    p.replay.max_replays = u32::try_from(n.max(0)).unwrap_or(0);
                }
                if let Some(b) = &r.backoff {
                    p.replay.backoff = dur(b, "deadLetter.replay.backoff")?;
                }
            }
        }
        p.idempotency_ttl = match spec.idempotency.as_ref().map(|i| i.ttl.as_str()) {
            None | Some("auto") => auto_ttl(&p),
            Some(s) => crate::api::common::parse_duration(s)
                .map_err(|e| EngineError::Config(format!("idempotency.ttl: {e}")))?,
        };
        Ok(p)
    }
}

/// `idempotency.ttl: auto`: the longest time a step may still be redelivered
/// — every delivery with its backoff, every automatic replay with its
/// backoff — or the DLQ retention (a manual replay may come that late),
/// whichever is longer, plus an hour of margin; but never more than
/// [`MAX_AUTO_TTL`] beyond the retention (exponential replay backoff with
/// many replays would otherwise keep every inbox key for centuries).
pub fn auto_ttl(p: &Policy) -> Duration {
    let retry = (p.per_attempt + p.backoff.max) * u32::try_from(p.max_deliveries).unwrap_or(100);
    let mut replay = Duration::ZERO;
    for n in 0..p.replay.max_replays.min(30) {
        replay = replay.saturating_add(
            p.replay
                .backoff
                .saturating_mul(2u32.saturating_pow(n))
                .saturating_add(retry),
        );
    }
    let horizon = (retry + replay).min(p.retention.max(MAX_AUTO_TTL));
    horizon.max(p.retention) + Duration::from_secs(3600)
}

/// Longest `idempotency.ttl: auto` (unless the retention is longer).
pub const MAX_AUTO_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What to do with an agent's tasks while a tool it needs is down.
pub type Degraded = DegradedMode;

/// One agent of the workflow, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub name: String,
    /// Stream name (not key) the agent consumes.
    pub consumes: String,
    pub produces: Vec<String>,
    pub tools: Vec<String>,
    pub concurrency: usize,
    /// Name of the compensation of this step, if it is a saga step.
    pub compensate: Option<String>,
    pub degraded: Option<Degraded>,
    /// The agent's fan-in join, if it has one.
    pub join: Option<Join>,
    /// Agent-level hedging ([`super::hedge`]), if the spec asks for it.
    pub hedge: Option<super::hedge::AgentHedgeConfig>,
}

/// Default `join.timeout`.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// A joining agent's join, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    /// The joined streams (names, not keys), in the order of the spec: the
    /// joined payload's keys.
    pub streams: Vec<String>,
    /// How long after the first part the join waits for the others.
    pub timeout: Duration,
}

/// A workflow as the engine runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowConfig {
    pub namespace: String,
    pub name: String,
    pub keys: Keys,
    pub agents: Vec<Agent>,
    pub policy: Policy,
    pub max_len: Option<u64>,
    pub visibility_timeout: Duration,
    pub max_payload_bytes: usize,
    /// Tools killed in the spec (`killSwitches.tools`).
    pub killed_tools: BTreeMap<String, bool>,
    /// The workflow spec as written (the tool proxy builds its policy stacks from it).
    pub spec: AgentWorkflowSpec,
    /// CircuitPolicies available to the workflow's tools, by name.
    pub policies: BTreeMap<String, CircuitPolicySpec>,
}

impl WorkflowConfig {
    /// Resolve a workflow spec and (optionally) its policy.
    pub fn new(
        namespace: &str,
        name: &str,
        spec: &AgentWorkflowSpec,
        policy: Option<&CircuitPolicySpec>,
    ) -> Result<Self, EngineError> {
        let visibility_timeout = match &spec.queue.visibility_timeout {
            Some(v) => v
                .parse()
                .map_err(|e| EngineError::Config(format!("queue.visibilityTimeout: {e}")))?,
            None => DEFAULT_VISIBILITY,
        }
        .max(Duration::from_millis(100));
        let agents = spec
            .agents
            .iter()
            .map(|a| {
                Ok(Agent {
                    name: a.name.clone(),
                    consumes: a.consumes.clone(),
                    produces: a.produces.clone(),
                    tools: a.tools.clone(),
                    concurrency: usize::try_from(a.concurrency.unwrap_or(16).max(1)).unwrap_or(16),
                    compensate: a.saga.as_ref().map(|s| s.compensate.clone()),
                    degraded: a.degraded_mode.clone(),
                    join: match &a.join {
                        None => None,
                        Some(j) => Some(Join {
                            streams: j.streams.clone(),
                            timeout: match &j.timeout {
                                Some(t) => t.parse().map_err(|e| {
                                    EngineError::Config(format!(
                                        "agents.{}.join.timeout: {e}",
                                        a.name
                                    ))
                                })?,
                                None => DEFAULT_JOIN_TIMEOUT,
                            },
                        }),
                    },
                    hedge: a
                        .hedge
                        .as_ref()
                        .map(|h| super::hedge::AgentHedgeConfig::from_spec(&a.name, h))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            keys: Keys::new(namespace, name),
            agents,
            policy: Policy::from_spec(policy)?,
            max_len: spec.queue.max_len.and_then(|m| u64::try_from(m).ok()),
            visibility_timeout,
            max_payload_bytes: spec
                .intake
                .as_ref()
                .and_then(|i| i.max_payload_bytes)
                .and_then(|m| usize::try_from(m).ok())
                .unwrap_or(DEFAULT_MAX_PAYLOAD),
            killed_tools: spec
                .kill_switches
                .as_ref()
                .map(|k| k.tools.clone())
                .unwrap_or_default(),
            spec: spec.clone(),
            policies: spec
                .policy_ref
                .iter()
                .zip(policy)
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
        })
    }

    /// Add the CircuitPolicies that tools may name (`tools[].policyRef`).
    pub fn with_policies(
        mut self,
        policies: impl IntoIterator<Item = (String, CircuitPolicySpec)>,
    ) -> Self {
        self.policies.extend(policies);
        self
    }

    /// Tools whose kill switch is engaged in the spec (`killSwitches.tools`).
    pub fn spec_killed_tools(&self) -> BTreeSet<String> {
        self.killed_tools
            .iter()
            .filter(|(_, on)| **on)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Whether `tool`'s fallback may answer a call the tool cannot: a `static` answer always
    /// may; a `cache` only for read-only calls (a write's answer is never replayed), so not for
    /// a tool declared `readOnly: false`, nor a plain HTTP tool not declared read-only (an MCP
    /// tool's calls may be read-only by their annotations). Degraded mode delivers tasks
    /// needing such a tool while it is down, and downgrades only those the fallback could not
    /// serve.
    pub fn fallback_may_answer(&self, tool: &str) -> bool {
        let Some(t) = self.spec.tools.iter().find(|t| t.name == tool) else {
            return false;
        };
        match &t.fallback {
            Some(f) if f.static_response.is_some() => true,
            Some(f) if f.cache.is_some() => match t.read_only {
                Some(ro) => ro,
                None => super::tools::protocol_of(t) == crate::api::workflow::ToolProtocol::Mcp,
            },
            _ => false,
        }
    }

    /// Every switch engaged in the spec (`killSwitches.all`, `.agents`, `.tools`), which
    /// [`super::killswitch::watch`] merges into the state it publishes.
    pub fn spec_switches(&self) -> super::killswitch::SpecSwitches {
        super::killswitch::SpecSwitches::from_spec(self.spec.kill_switches.as_ref())
    }

    /// The tool proxy of this workflow: each tool's policy stack around `transport`.
    pub fn tool_proxy(
        &self,
        transport: &dyn Fn(&crate::api::workflow::ToolSpec) -> super::tools::Transport,
        metrics: Option<crate::resilience::Metrics>,
        seed: Option<u64>,
    ) -> Result<super::tools::ToolProxy, EngineError> {
        super::tools::ToolProxy::new(&self.spec, &self.policies, transport, metrics, seed)
            .map_err(|e| EngineError::Config(e.to_string()))
    }

    /// Resolve from validated manifests: the workflow named `workflow` (or
    /// the only one) and the CircuitPolicy its `policyRef` names.
    pub fn from_manifests(
        manifests: &[Manifest],
        workflow: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Self, EngineError> {
        let workflows: Vec<_> = manifests
            .iter()
            .filter_map(|m| match m {
                Manifest::Workflow(w) => Some(w),
                _ => None,
            })
            .filter(|w| workflow.is_none_or(|n| w.metadata.name.as_deref() == Some(n)))
            .collect();
        let names = |all: bool| -> String {
            manifests
                .iter()
                .filter_map(|m| match m {
                    Manifest::Workflow(w) => w.metadata.name.clone(),
                    _ => None,
                })
                .filter(|n| all || workflow.is_none_or(|want| want == n))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let w = match (workflows.as_slice(), workflow) {
            ([w], _) => w,
            ([], None) => {
                return Err(EngineError::Config(
                    "no AgentWorkflow in the given files".into(),
                ));
            }
            ([], Some(want)) => {
                return Err(EngineError::Config(format!(
                    "--workflow: no AgentWorkflow named {want:?} in the given files (found: {})",
                    names(true)
                )));
            }
            (_, _) => {
                return Err(EngineError::Config(format!(
                    "several AgentWorkflows in the given files ({}); choose one with --workflow NAME",
                    names(false)
                )));
            }
        };
        let name = w.metadata.name.clone().unwrap_or_default();
        let ns = namespace
            .map(str::to_owned)
            .or_else(|| w.metadata.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let policy = w.spec.policy_ref.as_ref().and_then(|p| {
            manifests.iter().find_map(|m| match m {
                Manifest::Policy(cp) if cp.metadata.name.as_deref() == Some(p) => Some(&cp.spec),
                _ => None,
            })
        });
        if let (Some(p), None) = (&w.spec.policy_ref, policy) {
            tracing::warn!(policy = %p, "policyRef not in the given file; using default policy");
        }
        let policies = manifests.iter().filter_map(|m| match m {
            Manifest::Policy(cp)
                if crate::api::validate::same_namespace(
                    cp.metadata.namespace.as_deref(),
                    w.metadata.namespace.as_deref(),
                ) =>
            {
                Some((
                    cp.metadata.name.clone().unwrap_or_default(),
                    cp.spec.clone(),
                ))
            }
            _ => None,
        });
        Ok(Self::new(&ns, &name, &w.spec, policy)?.with_policies(policies))
    }

    /// Parse multi-document YAML (workflow + policies) and resolve.
    pub fn from_yaml(
        source: &str,
        text: &str,
        workflow: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Self, EngineError> {
        let report = validate_texts(&[(source.to_owned(), text.to_owned())], RefMode::Warn);
        if let Some(first) = report.errors.first() {
            return Err(EngineError::Config(first.clone()));
        }
        let manifests: Vec<Manifest> = report.manifests.into_iter().map(|(_, m)| m).collect();
        Self::from_manifests(&manifests, workflow, namespace)
    }

    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// The HTTP delivery to `agent`'s container at `url`, reading an answer up to what the
    /// workflow's payload limit allows for the agent's outputs
    /// ([`super::limits::agent_answer_limit`]).
    pub fn agent_delivery(
        &self,
        agent: &str,
        url: impl Into<String>,
    ) -> Result<super::delivery::HttpDelivery, reqwest::Error> {
        let produces = self.agent(agent).map_or(0, |a| a.produces.len());
        Ok(super::delivery::HttpDelivery::new(url)?.with_max_answer(
            super::limits::agent_answer_limit(self.max_payload_bytes, produces),
        ))
    }

    /// The stream the intake publishes to: the first agent's input stream
    /// that no agent produces and that is not an external input
    /// (`spec.inputs`): the workflow's entry point. (The same rule as
    /// [`crate::api::validate::entry_stream`].)
    pub fn entry_stream(&self) -> &str {
        crate::api::validate::entry_stream(&self.spec)
            .or_else(|| self.agents.first().map(|a| a.consumes.as_str()))
            .unwrap_or("tasks")
    }

    /// The agents at the ends of the graph a task entering at the
    /// [`entry_stream`](Self::entry_stream) runs through: reachable from it,
    /// and none of their outputs is read by another agent (an agent may
    /// still publish to a sink stream, e.g. an archive). A task has
    /// completed when *each* of these finished its step: with a fan-out
    /// (one agent producing into two streams read by two agents), every
    /// branch has to finish. Empty when the graph has no end (a loop).
    pub fn terminal_agents(&self) -> Vec<&Agent> {
        let spec = &self.spec.agents;
        fn reads_from<'a>(
            spec: &'a [AgentSpec],
            s: &'a str,
        ) -> impl Iterator<Item = &'a AgentSpec> + 'a {
            spec.iter().filter(move |b| reads(b).any(|r| r == s))
        }
        // Reachability from the entry stream, along `produces`.
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut streams = vec![self.entry_stream()];
        while let Some(s) = streams.pop() {
            for b in reads_from(spec, s) {
                if seen.insert(b.name.as_str()) {
                    streams.extend(b.produces.iter().map(String::as_str));
                }
            }
        }
        spec.iter()
            .filter(|a| seen.contains(a.name.as_str()))
            .filter(|a| {
                !a.produces
                    .iter()
                    .any(|p| reads_from(spec, p).any(|b| b.name != a.name))
            })
            .filter_map(|a| self.agent(&a.name))
            .collect()
    }

    /// The agent whose join reads `stream`, if one does.
    pub fn joiner_of(&self, stream: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| {
            a.join
                .as_ref()
                .is_some_and(|j| j.streams.iter().any(|s| s == stream))
        })
    }

    /// Joining agents downstream of `agent` (through its outputs, other
    /// agents and other joins): the joins a task can no longer complete
    /// once `agent`'s step of it has failed.
    pub fn joins_downstream(&self, agent: &str) -> Vec<&Agent> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut joins: Vec<&Agent> = Vec::new();
        let mut stack: Vec<&str> = self
            .agent(agent)
            .map(|a| a.produces.iter().map(String::as_str).collect())
            .unwrap_or_default();
        while let Some(stream) = stack.pop() {
            if !seen.insert(stream) {
                continue;
            }
            if let Some(j) = self.joiner_of(stream) {
                if !joins.iter().any(|x| x.name == j.name) {
                    joins.push(j);
                }
                stack.push(j.consumes.as_str());
                continue;
            }
            for b in self.agents.iter().filter(|b| b.consumes == stream) {
                stack.extend(b.produces.iter().map(String::as_str));
            }
        }
        joins
    }

    /// How long a join's record lives: as long as the inbox keys of the
    /// steps that feed it (a branch can be redone, or replayed, that long),
    /// and at least twice its timeout.
    pub fn join_ttl(&self, join: &Join) -> Duration {
        self.policy.idempotency_ttl.max(join.timeout * 2)
    }

    /// Longest single hold of an entry by a live consumer (one delivery or
    /// one backoff sleep) must stay well under the visibility timeout, or a
    /// peer would claim the entry while we still work on it.
    pub fn max_hold(&self) -> Duration {
        self.visibility_timeout / 2
    }
}

/// The streams `agent` reads tasks from: the one it consumes.
///
/// The one place that knows how an agent takes input, so the graph
/// ([`WorkflowConfig::terminal_agents`]) follows every edge.
// A joining agent reads its join's streams too: a branch producing into a
// joined stream feeds the joining agent, so it is not terminal.
fn reads(agent: &AgentSpec) -> impl Iterator<Item = &str> {
    std::iter::once(agent.consumes.as_str()).chain(
        agent
            .join
            .iter()
            .flat_map(|j| j.streams.iter().map(String::as_str)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_ttl_is_capped() {
        let mut p = base_policy();
        p.replay.max_replays = 30;
        p.replay.backoff = Duration::from_secs(60);
        let ttl = auto_ttl(&p);
        assert_eq!(ttl, MAX_AUTO_TTL + Duration::from_secs(3600), "{ttl:?}");
        // A retention beyond the cap still wins.
        p.retention = MAX_AUTO_TTL * 2;
        assert_eq!(auto_ttl(&p), MAX_AUTO_TTL * 2 + Duration::from_secs(3600));
        // Small policies are unchanged: the horizon or the retention.
        let q = base_policy();
        assert!(auto_ttl(&q) <= q.retention + Duration::from_secs(3600) * 2);
    }

    #[test]
    fn backoff_grows_and_caps() {
        use crate::resilience::Jitter;
        use crate::resilience::retry::backoff_delay;
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: Jitter::None,
        };
        let ms = |r| backoff_delay(&b, r, Duration::ZERO, 0.5).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5)],
            [100, 200, 400, 800, 1000]
        );
        let full = Backoff {
            jitter: Jitter::Full,
            ..b
        };
        assert_eq!(backoff_delay(&full, 3, Duration::ZERO, 0.0), Duration::ZERO);
        assert_eq!(
            backoff_delay(&full, 3, Duration::ZERO, 0.5).as_millis(),
            200
        );
        let equal = Backoff {
            jitter: Jitter::Equal,
            ..b
        };
        assert_eq!(
            backoff_delay(&equal, 2, Duration::ZERO, 0.0).as_millis(),
            100
        );
        // Decorrelated grows from the previous delay, capped.
        let dec = Backoff {
            jitter: Jitter::Decorrelated,
            ..b
        };
        let prev = Duration::from_millis(300);
        assert_eq!(backoff_delay(&dec, 2, prev, 1.0).as_millis(), 900);
        assert_eq!(backoff_delay(&dec, 2, prev, 0.0).as_millis(), 100);
        assert_eq!(backoff_delay(&dec, 9, prev * 10, 1.0).as_millis(), 1000);
    }

    #[test]
    fn auto_ttl_covers_retention_and_replays() {
        let p = Policy::default();
        assert!(p.idempotency_ttl >= p.retention);
        let mut short = p.clone();
        short.retention = Duration::from_secs(1);
        short.replay.backoff = Duration::from_secs(3600);
        // three replays at 1h, 2h, 4h
        assert!(auto_ttl(&short) >= Duration::from_secs(7 * 3600));
    }

    #[test]
    fn resolves_the_sample() {
        let text = std::fs::read_to_string("config/samples/payment-disputes.yaml").unwrap();
        let policy = std::fs::read_to_string("config/samples/default-policy.yaml").unwrap();
        let cfg =
            WorkflowConfig::from_yaml("s", &format!("{text}\n---\n{policy}"), None, None).unwrap();
        assert!(!cfg.agents.is_empty());
        assert_eq!(cfg.entry_stream(), cfg.agents[0].consumes);
        assert!(!cfg.terminal_agents().is_empty());
    }

    fn terminal_names(agents: &str, extra: &str) -> Vec<String> {
        let text = format!(
            "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {{name: g}}\nspec:\n  queue: {{redis: {{url: \"redis://x\"}}}}\n{extra}  agents:\n{agents}"
        );
        let cfg = WorkflowConfig::from_yaml("s", &text, None, None).unwrap();
        cfg.terminal_agents()
            .iter()
            .map(|a| a.name.clone())
            .collect()
    }

    #[test]
    fn every_branch_of_a_fan_out_is_terminal() {
        // in -> a -> {left, right}; left -> l; right -> r -> archive (a sink).
        let fan = "    - {name: a, image: i, consumes: in, produces: [left, right]}
    - {name: l, image: i, consumes: left}
    - {name: r, image: i, consumes: right, produces: [archive]}
";
        assert_eq!(terminal_names(fan, ""), ["l", "r"]);
        // An agent fed from outside the workflow (`spec.inputs`) is no end of the graph a
        // task submitted through the intake runs through.
        let island = format!("{fan}    - {{name: side, image: i, consumes: elsewhere}}\n");
        assert_eq!(
            terminal_names(&island, "  inputs: [elsewhere]\n"),
            ["l", "r"]
        );
    }
}
