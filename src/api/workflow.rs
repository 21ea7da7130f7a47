//! `AgentWorkflow`: a team of agents wired by Redis Streams, the tools they call, and how the
//! operator rolls it out, stops it and measures it. Only the shape and the schema-level rules
//! live here; the rules the schema cannot express are in [`super::validate`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DurationStr, SecretKeyRef};

/// Desired state of an AgentWorkflow.
// kube's printcolumn(...) repeats `type_ = ...` by design; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "r4.dev",
    version = "v1alpha1",
    kind = "AgentWorkflow",
    namespaced,
    status = "AgentWorkflowStatus",
    shortname = "aw",
    category = "r4",
    doc = "A team of autonomous agents wired by Redis Streams, with its tools, kill switches, rollout and SLO.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.currentRevision"),
    printcolumn(name = "Agents", type_ = "string", json_path = ".status.agentsReady"),
    printcolumn(name = "DLQ", type_ = "integer", json_path = ".status.queue.dlqDepth"),
    printcolumn(name = "Kill switch", type_ = "string", json_path = ".status.killSwitch"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.rollbackTo) || !has(self.status) || !has(self.status.revisions) || self.status.revisions.exists(r, r.revision == self.spec.rollbackTo.revision)").message("spec.rollbackTo.revision must be an existing revision (see status.revisions)").field_path(".spec.rollbackTo.revision"),
)]
#[x_kube(validation = Rule::new("self.agents.all(a, self.agents.exists_one(b, b.name == a.name))").message("agent names must be unique").field_path(".agents"))]
#[x_kube(validation = Rule::new("!has(self.tools) || self.tools.all(t, self.tools.exists_one(u, u.name == t.name))").message("tool names must be unique").field_path(".tools"))]
#[x_kube(validation = Rule::new("self.agents.all(a, !has(a.tools) || a.tools.all(t, has(self.tools) && self.tools.exists(x, x.name == t)))").message("every agent tool must name a tool declared in spec.tools").field_path(".agents"))]
#[x_kube(validation = Rule::new("self.agents.all(a, !has(a.degradedMode) || !has(a.degradedMode.whenToolsDown) || a.degradedMode.whenToolsDown.all(t, has(self.tools) && self.tools.exists(x, x.name == t)))").message("degradedMode.whenToolsDown must name tools declared in spec.tools").field_path(".agents"))]
#[x_kube(validation = Rule::new("!has(self.killSwitches) || !has(self.killSwitches.agents) || self.killSwitches.agents.all(k, self.agents.exists(a, a.name == k))").message("killSwitches.agents keys must name declared agents").field_path(".killSwitches.agents"))]
#[x_kube(validation = Rule::new("!has(self.killSwitches) || !has(self.killSwitches.tools) || self.killSwitches.tools.all(k, has(self.tools) && self.tools.exists(t, t.name == k))").message("killSwitches.tools keys must name declared tools").field_path(".killSwitches.tools"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentWorkflowSpec {
    /// The Redis Streams queue every agent of the workflow reads from and writes to.
    pub queue: QueueSpec,
    /// Name of the CircuitPolicy applied to every tool that does not name its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub policy_ref: Option<String>,
    /// Tools (MCP or plain HTTP servers) the agents call through the engine's tool proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tools: Vec<ToolSpec>,
    /// The agents, each a Deployment with an r4 engine sidecar.
    #[schemars(length(min = 1, max = 32))]
    pub agents: Vec<AgentSpec>,
    /// Streams written from outside the workflow (another system `XADD`s to them). Every stream
    /// an agent consumes must be produced by an agent, be a degraded-mode route, be the entry
    /// stream the intake feeds (the first consumed stream nothing produces and not listed here)
    /// or be listed here; otherwise its agent would wait forever and validation refuses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub inputs: Vec<StreamName>,
    /// The Task Intake API (HTTP `POST /v1/tasks`) and its Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake: Option<IntakeSpec>,
    /// The repair agent that replays dead-lettered tasks once their dependency recovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairSpec>,
    /// Kill switches: an engaged switch makes engines stop taking new tasks (safe stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_switches: Option<KillSwitchesSpec>,
    /// How a spec change is rolled out and when it is rolled back automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Roll back by hand to an earlier revision (must exist in status.revisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<RollbackTo>,
    /// Service level objective the workflow is measured against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// Money figures for the incident cost model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub economics: Option<EconomicsSpec>,
}

/// Where the workflow's streams live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueSpec {
    /// The Redis server (or cluster) holding the streams.
    pub redis: RedisSpec,
    /// Approximate maximum length of each stream (`XADD MAXLEN ~`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 100_000_000))]
    pub max_len: Option<i64>,
    /// How long a delivered task may stay unacknowledged before another engine claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<DurationStr>,
    /// What happens to the workflow's Redis data (streams, DLQ, inbox, stats) when the
    /// AgentWorkflow is deleted: `Retain` (default) keeps it, `Delete` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_policy: Option<DeletePolicy>,
}

/// What deleting an AgentWorkflow does to its Redis data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletePolicy {
    /// Keep every key of the workflow (default): deleting the resource loses no task.
    #[default]
    Retain,
    /// Delete every key of the workflow once its children are gone.
    Delete,
}

/// The Redis connection: a URL for development or a Secret reference for production.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)").message("exactly one of url and urlSecretRef must be set"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSpec {
    /// Redis URL (`redis://host:6379/0`); for development, prefer urlSecretRef in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(redis|rediss|redis\+unix|unix)://[^\s]*$"),
        length(max = 2048)
    )]
    pub url: Option<String>,
    /// A Secret key holding the Redis URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
}

/// A tool the agents may call: an MCP server or a plain HTTP endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!self.url.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@')").message("must not carry credentials (user:password@host); put them in a Secret and name it in headersFrom").field_path(".url"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolSpec {
    /// Tool name, referenced by agents, kill switches and drills.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    /// Endpoint of the tool (`http://bank-mcp.tools:8080/mcp`, `https://…` for TLS). No credentials in the URL: use headersFrom.
    #[schemars(regex(pattern = r"^https?://[^\s/$.?#][^\s]*$"), length(max = 2048))]
    pub url: String,
    /// HTTP headers sent with every call to the tool, each value taken from a Secret (credentials such as `Authorization`). The engine reads each value from the file `<tools-secrets-dir>/<tool>/<header name in lower case>` that the controller mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub headers_from: Vec<HeaderFrom>,
    /// Wire protocol: `Mcp` (JSON-RPC `tools/call`) or `Http`. Default: `Mcp` when the URL path ends in `/mcp`, else `Http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ToolProtocol>,
    /// CircuitPolicy for this tool; defaults to spec.policyRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub policy_ref: Option<String>,
    /// Calls may be repeated safely (retried after they reached the tool, hedged). Unset: taken from the MCP tool annotations (`idempotentHint`), else false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Calls have no side effects (MCP `readOnlyHint`); read-only calls may be hedged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// What to answer while the tool is failing or its breaker is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
    /// Simulated behaviour for `r4 run` (no real endpoint is called when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulate: Option<ToolSimulation>,
}

/// Headers the tool proxy sets itself (or HTTP owns); `headersFrom` may not name them.
pub const RESERVED_TOOL_HEADERS: &[&str] = &[
    "idempotency-key",
    "content-type",
    "content-length",
    "traceparent",
    "tracestate",
    "accept",
    "host",
    "connection",
    "transfer-encoding",
    "te",
    "upgrade",
];

/// One HTTP header of a tool whose value is a Secret's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderFrom {
    /// Header name (`Authorization`, `X-Api-Key`); not one the proxy sets itself (`Idempotency-Key`, `Content-Type`, `Traceparent`, `Host`, …).
    #[schemars(regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9]*$"), length(max = 64))]
    pub name: String,
    /// The Secret key holding the header's value.
    pub secret_ref: SecretKeyRef,
}

/// Wire protocol of a tool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ToolProtocol {
    /// MCP JSON-RPC (`tools/call`).
    Mcp,
    /// Plain HTTP request/response.
    Http,
}

/// The answer given when a tool is failing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.cache) != has(self.static)").message("exactly one of cache and static must be set"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackSpec {
    /// Serve the last good response for the same request, if younger than `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheFallback>,
    /// Serve this fixed JSON answer.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub static_response: Option<serde_json::Value>,
}

/// Cached last-good responses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheFallback {
    /// How long a cached response may be served.
    pub ttl: DurationStr,
}

/// One agent of the workflow.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.produces) || !self.produces.exists(p, p == self.consumes)").message("an agent must not produce the stream it consumes").field_path(".produces"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// Agent name; the Deployment is `<workflow>-<agent>`.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    /// Container image of the agent.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Number of pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Port the agent container listens on for task delivery (`POST /task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Deliveries to the agent in flight per engine at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: Option<i32>,
    /// Input stream.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub consumes: String,
    /// Output streams; a task's outputs are published atomically with its acknowledgement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub produces: Vec<StreamName>,
    /// Tools the agent may call (capability gating: any other tool is refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tools: Vec<StreamName>,
    /// What to do with this agent's tasks while tools it needs are down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_mode: Option<DegradedMode>,
    /// Fan-in: wait for one output of each of these streams per task, then receive them joined
    /// (one task whose payload carries each branch's output under its stream name) on `consumes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinSpec>,
    /// Saga step: the compensation to run if the workflow instance cannot complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga: Option<SagaSpec>,
    /// A task may be delivered to this agent more than once at the same time (its tool calls
    /// go through the proxy with the task's `Idempotency-Key`, so effects stay once). Required
    /// by `hedge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Agent-level hedging (a "shadow agent"): a delivery that has not answered by the delay
    /// is also delivered to another replica; the first answer completes the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<AgentHedgeSpec>,
    /// Simulated behaviour for `r4 run` (the image is not run when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulate: Option<AgentSimulation>,
}

/// A DNS-1123 label naming a stream or a tool.
pub type StreamName = String;

/// Agent-level hedging: when a delivery has not answered by `delay`, the same task (same
/// `Idempotency-Key`) is delivered by another engine of the agent to its own agent container;
/// the first answer completes the step, the other is dropped (and cancelled).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentHedgeSpec {
    /// When to hedge: a percentile of this agent's recent delivery latencies, or a fixed delay.
    pub delay: super::policy::HedgeDelay,
    /// Largest fraction of deliveries that may be hedged (default 0.05 = 5%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_extra_load: Option<f64>,
    /// Latency samples needed before the percentile is trusted (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_samples: Option<i64>,
}

/// Degraded mode of an agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.action != 'Route' || has(self.to)").message("action Route needs `to` (the stream to route tasks to)").field_path(".to"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DegradedMode {
    /// Tools whose outage (killed or breaker open) puts the agent in degraded mode.
    #[schemars(length(min = 1, max = 32))]
    pub when_tools_down: Vec<StreamName>,
    /// `Route` tasks to another stream, `Pause` (leave them queued) or `Fail` them to the DLQ.
    pub action: DegradedAction,
    /// Target stream for `Route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub to: Option<String>,
}

/// What degraded mode does with a task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DegradedAction {
    /// Publish the task to the stream named in `to` (for example a manual-review queue).
    #[serde(alias = "route")]
    Route,
    /// Leave tasks queued until the tools are back.
    #[serde(alias = "pause")]
    Pause,
    /// Dead-letter the task with reason `degraded`.
    #[serde(alias = "fail")]
    Fail,
}

/// A join (fan-in) of an agent: each branch's output is recorded, atomically with the
/// completion of the step that produced it, and the step that records the last missing part
/// writes the joined task to the agent's `consumes` stream.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.streams.all(s, self.streams.exists_one(t, t == s))").message("join streams must be distinct").field_path(".streams"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinSpec {
    /// The streams joined: each is produced by one agent (a branch) and read by no agent.
    #[schemars(length(min = 2, max = 8))]
    pub streams: Vec<StreamName>,
    /// How long the join waits for the missing branches after the first one arrived (default
    /// 5m); past it the task is dead-lettered with reason `join-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationStr>,
}

/// Saga step of an agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SagaSpec {
    /// Name of the compensating action, delivered to the agent as `POST /compensate/<name>`.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub compensate: String,
}

/// Task Intake API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntakeSpec {
    /// Deploy the intake role and its Service.
    pub enabled: bool,
    /// Number of intake pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Largest accepted task payload in bytes; the limit of every hop (agent outputs too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_payload_bytes: Option<i64>,
    /// Require a bearer token on the Task Intake API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<IntakeAuth>,
}

/// Bearer-token authentication of the intake.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntakeAuth {
    /// The Secret key holding the accepted tokens: one per line, or `<client>:<token>` to name the client whose idempotency-key space it opens. Requests without a valid `Authorization: Bearer <token>` are answered 401.
    pub token_secret_ref: SecretKeyRef,
}

/// DLQ repair agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepairSpec {
    /// Deploy the repair role.
    pub enabled: bool,
}

/// Kill switches, toggled by `kubectl patch` or `r4 kill` / `r4 resume`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KillSwitchesSpec {
    /// Stop the whole workflow.
    #[serde(default)]
    pub all: bool,
    /// Per-agent switches, keyed by agent name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub agents: BTreeMap<String, bool>,
    /// Per-tool switches, keyed by tool name: calls to a killed tool are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub tools: BTreeMap<String, bool>,
}

/// Rollout and automatic rollback.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// `Automatic` rolls a failed revision back by itself; `Manual` only reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<RolloutStrategy>,
    /// Seconds a revision's Deployments have to become available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub progress_deadline_seconds: Option<i32>,
    /// Measured thresholds a new revision must meet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
    /// Revisions kept as ControllerRevisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub revision_history_limit: Option<i32>,
}

/// Rollout strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    /// Roll back automatically.
    Automatic,
    /// Report only.
    Manual,
}

/// Rollout analysis thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalysisSpec {
    /// Minimum task success rate (0..1) over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_success_rate: Option<f64>,
    /// Maximum p95 task latency in milliseconds over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub max_p95_latency_ms: Option<i64>,
    /// Length of the measurement window in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub window_seconds: Option<i32>,
}

/// Manual rollback target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackTo {
    /// Revision number to apply again.
    #[schemars(range(min = 1))]
    pub revision: i64,
}

/// Service level objective.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloSpec {
    /// Target task success rate (0..1); the error budget is `1 - successRate`.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub success_rate: f64,
    /// Target p95 task latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub p95_latency_ms: Option<i64>,
    /// Target time to recover from an incident, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub recovery_seconds: Option<i64>,
}

/// Incident cost model: daily failure cost = failed tasks/day × (margin + remediation cost).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EconomicsSpec {
    /// Margin lost on every failed task.
    #[schemars(range(min = 0.0, max = 1_000_000.0))]
    pub margin_per_task: f64,
    /// Cost of remediating one failed task by hand.
    #[schemars(range(min = 0.0, max = 1_000_000.0))]
    pub remediation_cost_per_failure: f64,
    /// Production task rate used to scale to a day; default: the measured rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100_000_000.0))]
    pub tasks_per_minute: Option<f64>,
}

/// Simulated latency: log-normal from median and p99, plus an optional heavy tail.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.p99Ms) || self.p99Ms >= self.medianMs").message("p99Ms must be >= medianMs").field_path(".p99Ms"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySpec {
    /// Median latency in milliseconds.
    #[schemars(range(min = 0.0, max = 600_000.0))]
    pub median_ms: f64,
    /// 99th percentile latency in milliseconds (default: 2 × median).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 600_000.0))]
    pub p99_ms: Option<f64>,
    /// A slow mode hit with probability `probability`, taking `ms` milliseconds ("The Tail at Scale").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<TailSpec>,
}

/// Heavy tail of a simulated latency: with probability `probability` a call is slow, and
/// its latency is `ms` ±20% or drawn from a Pareto distribution (exactly one of the two).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.ms) != has(self.pareto)").message("exactly one of ms and pareto must be set"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TailSpec {
    /// Probability of a slow call.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub probability: f64,
    /// Latency of a slow call in milliseconds (jittered ±20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 600_000.0))]
    pub ms: Option<f64>,
    /// Latency of a slow call drawn from a Pareto distribution (capped at 10 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pareto: Option<ParetoSpec>,
}

/// A Pareto (power-law) distribution: `P(X > x) = (scaleMs / x)^shape` for `x >= scaleMs`.
/// The smaller the shape, the heavier the tail (shape <= 1: no finite mean).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParetoSpec {
    /// The smallest value, in milliseconds.
    #[schemars(range(min = 0.001, max = 600_000.0))]
    pub scale_ms: f64,
    /// Tail index (alpha).
    #[schemars(range(min = 0.1, max = 100.0))]
    pub shape: f64,
}

/// A window of simulated outage, relative to the start of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutageWindow {
    /// Start, from the beginning of the run.
    pub after: DurationStr,
    /// Length of the outage.
    #[serde(rename = "for")]
    pub for_: DurationStr,
}

/// A window in which a simulated agent is slower: its latency multiplied by `factor`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlowdownWindow {
    /// Start, from the beginning of the run.
    pub after: DurationStr,
    /// Length of the slow-down.
    #[serde(rename = "for")]
    pub for_: DurationStr,
    /// Latency multiplier within the window.
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub factor: f64,
}

/// Rate limiting of a simulated tool: a share of calls answered `429 Too Many Requests`
/// with `Retry-After`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThrottleSimulation {
    /// Share of calls answered 429.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub rate: f64,
    /// The wait the 429 asks for (`Retry-After`, in whole seconds rounded up, and
    /// `retry-after-ms`).
    #[schemars(range(min = 0, max = 3_600_000))]
    pub retry_after_ms: i64,
    /// Throttle only within these windows (default: the whole run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<OutageWindow>,
}

/// Simulated tool for `r4 run`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolSimulation {
    /// Latency of one call.
    pub latency: LatencySpec,
    /// Probability that a call fails with a 5xx.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_rate: f64,
    /// Windows in which every call fails to connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub outages: Vec<OutageWindow>,
    /// Calls answered 429 with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSimulation>,
    /// How many distinct questions the simulated agents ask this tool: each task's call
    /// carries one of `keySpace` keys (drawn from the task), so repeats can be answered from
    /// a fallback cache. Default: every task asks its own question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub key_space: Option<i64>,
}

/// Simulated agent for `r4 run`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSimulation {
    /// Thinking time per task, besides tool calls.
    pub latency: LatencySpec,
    /// Probability that the agent itself fails a task attempt.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_rate: f64,
    /// Tool calls made per task, in order (each must be one of the agent's tools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub calls: Vec<StreamName>,
    /// Windows in which the agent cannot be reached (connection refused): the engine pauses
    /// its reads, no task fails for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub outages: Vec<OutageWindow>,
    /// Windows in which the agent's own latency is multiplied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub slowdowns: Vec<SlowdownWindow>,
}

/// Observed state of an AgentWorkflow.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentWorkflowStatus {
    /// Generation last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, RolledBack, KillSwitchEngaged, Valid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Revision currently applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<i64>,
    /// Known revisions, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub revisions: Vec<RevisionStatus>,
    /// `ready/desired` agents, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_ready: Option<String>,
    /// Summary of engaged kill switches (`off`, `all`, or the engaged names), for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_switch: Option<String>,
    /// Per-agent state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentStatus>,
    /// Per-switch state, keyed by `all`, agent or tool name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kill_switches: BTreeMap<String, KillSwitchStatus>,
    /// Queue depths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Measured SLO attainment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloStatus>,
    /// Incident cost model output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_cost: Option<IncidentCost>,
    /// Chaos drills against this workflow, as their controller last saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drills: Option<WorkflowDrillStatus>,
}

/// Drill record of a workflow (the seed: every critical workflow drilled on at least two failure
/// modes a quarter).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowDrillStatus {
    /// Verdict of the newest finished run of any drill of this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verdict: Option<String>,
    /// The drill that run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<String>,
    /// When that run finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<String>,
    /// Distinct fault types the workflow was drilled on in the last 90 days (finished runs).
    #[serde(default)]
    pub failure_modes_90d: i32,
}

/// One revision of the spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    /// Revision number.
    pub revision: i64,
    /// Hash of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Pending, Progressing, Healthy or Failed.
    pub phase: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// State of one agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Agent name.
    pub name: String,
    /// Ready pods.
    pub ready_replicas: i32,
    /// Kill switch of the agent.
    pub kill_switch: AgentKillSwitch,
}

/// Kill switch flag of an agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentKillSwitch {
    /// Whether the agent is stopped.
    pub engaged: bool,
}

/// State of one kill switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchStatus {
    /// Whether the switch is engaged.
    pub engaged: bool,
    /// When it was engaged (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Version of the kill-switch state in Redis that set this switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_version: Option<i64>,
    /// Engines that acknowledged the current state.
    pub acknowledged: i32,
    /// Engines expected to acknowledge.
    pub expected: i32,
}

/// Queue depths.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Entries in all input streams.
    pub depth: i64,
    /// Delivered but not yet acknowledged.
    pub pending: i64,
    /// Entries in the dead-letter stream.
    pub dlq_depth: i64,
    /// Age of the oldest DLQ entry.
    pub oldest_dlq_age_seconds: i64,
}

/// Measured SLO attainment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SloStatus {
    /// Measured success rate.
    pub success_rate: f64,
    /// Measured p95 latency.
    pub p95_latency_ms: f64,
    /// Fraction of the error budget left (1 = untouched, 0 or less = spent).
    pub error_budget_remaining: f64,
}

/// Output of the incident cost model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncidentCost {
    /// Measured failure rate.
    pub failure_rate: f64,
    /// Daily cost of failures.
    pub daily_cost: f64,
}
