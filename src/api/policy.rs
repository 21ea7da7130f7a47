//! `CircuitPolicy`: what a call to a tool is allowed to cost and how it recovers — timeouts,
//! retries with a budget, hedging, a circuit breaker, a bulkhead, adaptive throttling, the
//! dead-letter and replay policy and idempotency. The run-time meaning is in
//! `crate::resilience`; this module owns only the shape and the schema rules.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::DurationStr;

/// Desired behaviour of calls governed by this policy.
// kube's printcolumn(...) repeats `type_ = ...` by design; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "r4.dev",
    version = "v1alpha1",
    kind = "CircuitPolicy",
    namespaced,
    status = "CircuitPolicyStatus",
    shortname = "cp",
    category = "r4",
    doc = "Resilience policy for tool calls: timeouts, retries with budget, hedging, circuit breaker, bulkhead, dead letters, idempotency.",
    printcolumn(
        name = "Failure threshold",
        type_ = "number",
        json_path = ".spec.circuitBreaker.failureRateThreshold"
    ),
    printcolumn(name = "Hedge", type_ = "boolean", json_path = ".spec.hedge.enabled"),
    printcolumn(name = "Users", type_ = "string", json_path = ".status.usedBy"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitPolicySpec {
    /// Deadlines per attempt and for the whole call including retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<TimeoutSpec>,
    /// Retries with exponential backoff, bounded by a retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Hedged requests: send one more copy when the first is slow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeSpec>,
    /// Circuit breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Concurrency limit that rejects instead of queueing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadSpec>,
    /// Adaptive client-side throttling (Google SRE book, ch. 21).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    /// Dead-letter queue and replay policy for tasks that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
    /// Idempotency keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencySpec>,
}

/// Deadlines.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.perAttempt) || !has(self.overall) || duration(self.perAttempt) <= duration(self.overall)").message("timeout.perAttempt must be <= timeout.overall").field_path(".perAttempt"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutSpec {
    /// Deadline of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_attempt: Option<DurationStr>,
    /// Deadline of the whole call, retries and hedges included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<DurationStr>,
}

/// Retry policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts including the first (1 = no retry).
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: i32,
    /// Delay between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    /// Retry budget: retries at most `ratio` of calls, plus `minPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    /// Failure classes that are retried. Non-idempotent calls are only retried when the failure proves the request never reached the tool (ConnectError).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub retry_on: Vec<RetryOn>,
}

/// A retryable failure class.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetryOn {
    /// The attempt timed out.
    Timeout,
    /// The connection could not be established (the request never left).
    ConnectError,
    /// The tool answered 5xx.
    Status5xx,
    /// The tool answered 429; `Retry-After` is honoured.
    Status429,
}

/// Exponential backoff.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("duration(self.initial) <= duration(self.max)").message("backoff.initial must be <= backoff.max").field_path(".initial"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    /// Delay before the first retry.
    pub initial: DurationStr,
    /// Largest delay.
    pub max: DurationStr,
    /// Growth factor per retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: Option<f64>,
    /// Randomisation of the delay: Full (AWS "full jitter"), Equal, Decorrelated, or None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
}

/// Jitter mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Jitter {
    /// Uniform in [0, delay].
    Full,
    /// delay/2 + uniform in [0, delay/2].
    Equal,
    /// min(max, uniform in [initial, previous × 3]).
    Decorrelated,
    /// No randomisation.
    None,
}

/// Retry budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// Retries allowed per call over the window (0.1 = 10%).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Retries per second always allowed, so a quiet client can still retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub min_per_second: Option<i32>,
    /// Sliding window over which the ratio is kept (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationStr>,
}

/// Hedging.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgeSpec {
    /// Whether hedging is on.
    pub enabled: bool,
    /// When to send the extra request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<HedgeDelay>,
    /// Largest fraction of calls that may be hedged (0.05 = 5%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_extra_load: Option<f64>,
    /// Hedge only calls to idempotent or read-only tools (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_idempotent: Option<bool>,
    /// Latency samples needed before the percentile is trusted (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_samples: Option<i64>,
}

/// Hedge delay: an observed latency percentile or a fixed delay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.percentile) != has(self.fixed)").message("exactly one of percentile and fixed must be set"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgeDelay {
    /// Percentile of recent latencies (e.g. 95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50.0, max = 99.99))]
    pub percentile: Option<f64>,
    /// Fixed delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<DurationStr>,
}

/// Circuit breaker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.window.type != 'Count' || !has(self.minimumCalls) || self.minimumCalls <= self.window.size").message("minimumCalls must be <= window.size for a Count window").field_path(".minimumCalls"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Failure rate (0..1] at or above which the breaker opens.
    #[schemars(range(min = 0.01, max = 1.0))]
    pub failure_rate_threshold: f64,
    /// Rate of slow calls (0..1] at or above which the breaker opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub slow_call_rate_threshold: Option<f64>,
    /// A call slower than this counts as slow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call_duration: Option<DurationStr>,
    /// Sliding window of recent calls.
    pub window: BreakerWindow,
    /// Calls needed in the window before the rates are acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub minimum_calls: Option<i32>,
    /// How long the breaker stays open before probing.
    pub open_duration: DurationStr,
    /// Probe calls let through while half-open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_calls: Option<i32>,
    /// Share the breaker's state across replicas through Redis (one replica opening opens all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

/// Breaker window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type != 'Count' || has(self.size)").message("a Count window needs size").field_path(".size"))]
#[x_kube(validation = Rule::new("self.type != 'Time' || has(self.seconds)").message("a Time window needs seconds").field_path(".seconds"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BreakerWindow {
    /// `Count` (last N calls) or `Time` (last N seconds).
    #[serde(rename = "type")]
    pub kind: WindowKind,
    /// Calls in a Count window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub size: Option<i32>,
    /// Seconds in a Time window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub seconds: Option<i32>,
}

/// Breaker window type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WindowKind {
    /// The last `size` calls.
    Count,
    /// The calls of the last `seconds`.
    Time,
}

/// Bulkhead.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkheadSpec {
    /// Calls in flight at once; more are rejected.
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrent: i32,
}

/// Adaptive throttling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThrottleSpec {
    /// Whether throttling is on.
    pub enabled: bool,
    /// Multiplier K of accepted requests (default 2; lower is more aggressive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub k: Option<f64>,
    /// Window of the request/accept counts (default 2m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationStr>,
}

/// Dead letters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterSpec {
    /// Deliveries of a task before it is dead-lettered.
    #[schemars(range(min = 1, max = 100))]
    pub max_deliveries: i32,
    /// How long DLQ entries are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<DurationStr>,
    /// Replay by the repair agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySpec>,
}

/// Replay policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplaySpec {
    /// Replay automatically once the failing dependency's breaker has closed.
    pub automatic: bool,
    /// Replays of one entry before it is quarantined as poison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_replays: Option<i32>,
    /// Delay before the first replay, doubled for each further replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<DurationStr>,
}

/// Idempotency keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdempotencySpec {
    /// How long an idempotency key is remembered: a duration, or `auto` (the longest retry plus replay horizon).
    #[schemars(regex(pattern = r"^(auto|([0-9]+(ms|s|m|h))+)$"), length(max = 32))]
    pub ttl: String,
}

/// Observed state of a CircuitPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitPolicyStatus {
    /// Generation last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workflows using this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// Breakers governed by this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerStatus>,
    /// Valid and Ready conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// State of one breaker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    /// Workflow.
    pub workflow: String,
    /// Tool.
    pub tool: String,
    /// Closed, Open or HalfOpen.
    pub state: String,
    /// Since when (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Failure rate in the window.
    pub failure_rate: f64,
}
