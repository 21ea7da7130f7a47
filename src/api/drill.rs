//! `ChaosDrill`: a game day against one workflow — which faults, when, what aborts it and what
//! counts as passing. Faults are carried out by the engines (they read them from Redis, where
//! each fault has a TTL equal to its window), so a drill ends on time even if the controller dies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::DurationStr;

/// Desired drill.
// kube's printcolumn(...) repeats `type_ = ...` by design; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "r4.dev",
    version = "v1alpha1",
    kind = "ChaosDrill",
    namespaced,
    status = "ChaosDrillStatus",
    shortname = "drill",
    category = "r4",
    doc = "A chaos game day against an AgentWorkflow: faults, guardrails and the recovery it must show.",
    printcolumn(name = "Workflow", type_ = "string", json_path = ".spec.workflowRef"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Verdict", type_ = "string", json_path = ".status.lastVerdict"),
    printcolumn(name = "Last run", type_ = "date", json_path = ".status.lastRunAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChaosDrillSpec {
    /// The AgentWorkflow (same namespace) under test.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub workflow_ref: String,
    /// Cron schedule (5 fields, UTC); absent = run once, now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,
    /// Length of one run's fault timeline (faults' `after` counts from its start).
    pub duration: DurationStr,
    /// Observation before the fault timeline starts, the baseline the failover and recovery
    /// are measured against (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<DurationStr>,
    /// Faults injected during the run.
    #[schemars(length(min = 1, max = 16))]
    pub faults: Vec<Fault>,
    /// Conditions that abort the run early (faults are withdrawn at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<Guardrails>,
    /// What the run must show to pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expectations>,
    /// Suspend scheduled runs.
    #[serde(default)]
    pub suspend: bool,
}

/// One injected fault. Which fields apply depends on `type`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!(self.type in ['ToolOutage', 'ToolLatency', 'ToolErrors']) || has(self.tool)").message("ToolOutage, ToolLatency and ToolErrors need `tool`").field_path(".tool"))]
#[x_kube(validation = Rule::new("!(self.type in ['ToolLatency', 'AgentSlowdown']) || has(self.latencyMs)").message("ToolLatency and AgentSlowdown need `latencyMs`").field_path(".latencyMs"))]
#[x_kube(validation = Rule::new("self.type != 'ToolErrors' || has(self.errorRate)").message("ToolErrors needs `errorRate`").field_path(".errorRate"))]
#[x_kube(validation = Rule::new("!(self.type in ['MessageCorruption', 'QueueThrottle']) || has(self.stream)").message("MessageCorruption and QueueThrottle need `stream`").field_path(".stream"))]
#[x_kube(validation = Rule::new("self.type != 'MessageCorruption' || has(self.percent)").message("MessageCorruption needs `percent`").field_path(".percent"))]
#[x_kube(validation = Rule::new("self.type != 'QueueThrottle' || has(self.maxPerSecond)").message("QueueThrottle needs `maxPerSecond`").field_path(".maxPerSecond"))]
#[x_kube(validation = Rule::new("!(self.type in ['PodKill', 'AgentSlowdown']) || has(self.agent)").message("PodKill and AgentSlowdown need `agent`").field_path(".agent"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Kind of fault.
    #[serde(rename = "type")]
    pub kind: FaultType,
    /// Tool affected (ToolOutage, ToolLatency, ToolErrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub tool: Option<String>,
    /// Agent affected (PodKill, AgentSlowdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub agent: Option<String>,
    /// Stream affected (MessageCorruption, QueueThrottle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub stream: Option<String>,
    /// Start of the fault, from the start of the run (default 0s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<DurationStr>,
    /// Length of the fault (default: until the end of the run).
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<DurationStr>,
    /// Added latency in milliseconds (ToolLatency, AgentSlowdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600_000))]
    pub latency_ms: Option<i64>,
    /// Share of calls, deliveries or messages affected, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: Option<f64>,
    /// Share of calls that fail, 0..1 (ToolErrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_rate: Option<f64>,
    /// HTTP status of the injected errors (ToolErrors, default 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 400, max = 599))]
    pub status_code: Option<i32>,
    /// `Retry-After` of the injected errors, in seconds (ToolErrors; none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub retry_after_seconds: Option<i64>,
    /// Pods killed (PodKill, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub count: Option<i32>,
    /// Messages per second let through (QueueThrottle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_per_second: Option<i64>,
}

/// Kind of fault.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FaultType {
    /// Every call to the tool fails to connect.
    ToolOutage,
    /// Calls to the tool are delayed.
    ToolLatency,
    /// Calls to the tool fail with 5xx at a rate.
    ToolErrors,
    /// Messages on a stream are corrupted.
    MessageCorruption,
    /// Pods of an agent are killed.
    PodKill,
    /// A stream is read at most this fast.
    QueueThrottle,
    /// The agent answers late (`latencyMs` added to this share of deliveries).
    AgentSlowdown,
}

/// Abort conditions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Guardrails {
    /// Abort when any of these hold.
    pub abort_if: AbortIf,
}

/// Abort thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortIf {
    /// Abort when the success rate falls below this (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub success_rate_below: Option<f64>,
    /// Abort when the DLQ holds more entries than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub dlq_depth_above: Option<i64>,
    /// Abort when the p95 task latency exceeds this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub p95_latency_ms_above: Option<i64>,
}

/// Pass criteria.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expectations {
    /// Longest acceptable recovery after the last fault ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86_400))]
    pub max_recovery_seconds: Option<i64>,
    /// Tasks that may be lost (normally 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_lost_tasks: Option<i64>,
    /// Side effects that may be duplicated (normally 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_duplicate_effects: Option<i64>,
}

/// Observed state of a drill.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChaosDrillStatus {
    /// Pending, Running, Succeeded, Failed or Aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DrillPhase>,
    /// Verdict of the last run, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verdict: Option<String>,
    /// Start of the last run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<String>,
    /// Runs, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<DrillRun>,
    /// The `r4.dev/run-requested` annotation the controller last acted on (so a request is
    /// served once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_request: Option<String>,
    /// The `r4.dev/abort-requested` annotation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_abort_request: Option<String>,
    /// Valid condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Phase of a drill.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DrillPhase {
    /// Waiting for its time.
    Pending,
    /// Faults are active.
    Running,
    /// Last run passed.
    Succeeded,
    /// Last run failed its expectations.
    Failed,
    /// Last run hit a guardrail.
    Aborted,
}

/// One run of a drill.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillRun {
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Passed, Failed or Aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// Seconds from the first fault to traffic flowing around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_seconds: Option<f64>,
    /// Seconds from the last fault's end to normal service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_seconds: Option<f64>,
    /// DLQ entries added during the run.
    #[serde(default)]
    pub dlq_growth: i64,
    /// Tasks completed during the run.
    #[serde(default)]
    pub tasks_processed: i64,
    /// Tasks lost.
    #[serde(default)]
    pub tasks_lost: i64,
    /// Duplicated side effects.
    #[serde(default)]
    pub duplicate_effects: i64,
    /// Breaker trips.
    #[serde(default)]
    pub breaker_trips: i64,
    /// Hedged requests.
    #[serde(default)]
    pub hedges: i64,
    /// Retries.
    #[serde(default)]
    pub retries: i64,
    /// DLQ entries the repair role replayed during the run.
    #[serde(default)]
    pub dlq_replayed: i64,
    /// Resilience score, 0-100 (formula in the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Why the verdict is not Passed, one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Guardrail that aborted the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_because: Option<String>,
}
