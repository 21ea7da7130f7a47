//! Engine statistics: counters and a latency histogram per engine,
//! published to Redis with a TTL, aggregated per workflow by a reader, and
//! served as Prometheus metrics.
//!
//! Owns the counter set, the metric names and the wire shape of a published
//! snapshot (`r4:{ns/wf}:stats:<engine-id>`, JSON, histograms as hex-encoded
//! HdrHistogram V2). `r4 status` and the controller read through
//! [`read_workflow`]; they never parse engine internals.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use serde::{Deserialize, Serialize};

use crate::queue::{Keys, Queue, QueueError};

/// What became of one task at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Already completed earlier (inbox key present): acked only.
    Duplicate,
    DeadLettered,
    /// Routed elsewhere by degraded mode.
    Routed,
    /// Not for this agent (another agent's compensation on a shared stream).
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Routed => "routed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// Counter values (also the aggregate of a workflow).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub processed: u64,
    pub completed: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub retries: u64,
    pub dead_lettered: u64,
    pub routed: u64,
    pub replays: u64,
    pub quarantined: u64,
    pub compensations: u64,
    pub in_flight: i64,
    /// Deliveries the agent answered (success or failure; an unreachable
    /// agent's are not counted), every attempt of every round.
    #[serde(default)]
    pub deliveries: u64,
    /// Tool calls retried by the tool proxy's policies (published by the proxy's own snapshot,
    /// role `tools`; see `engine::tools::supervise`).
    #[serde(default)]
    pub tool_retries: u64,
    /// Hedged tool calls sent.
    #[serde(default)]
    pub hedges: u64,
    /// Tool circuit breakers that opened.
    #[serde(default)]
    pub breaker_trips: u64,
    /// Tool calls, deliveries and reads that met a ChaosDrill's injected fault.
    #[serde(default)]
    pub faults_applied: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.processed += o.processed;
        self.completed += o.completed;
        self.duplicates += o.duplicates;
        self.failed += o.failed;
        self.retries += o.retries;
        self.dead_lettered += o.dead_lettered;
        self.routed += o.routed;
        self.replays += o.replays;
        self.quarantined += o.quarantined;
        self.compensations += o.compensations;
        self.in_flight += o.in_flight;
        self.deliveries += o.deliveries;
        self.tool_retries += o.tool_retries;
        self.hedges += o.hedges;
        self.breaker_trips += o.breaker_trips;
        self.faults_applied += o.faults_applied;
    }

    /// Increases since `old` (never negative; `in_flight`, a gauge, is taken as it is now).
    fn since(&self, old: &Counters) -> Counters {
        Counters {
            processed: self.processed.saturating_sub(old.processed),
            completed: self.completed.saturating_sub(old.completed),
            duplicates: self.duplicates.saturating_sub(old.duplicates),
            failed: self.failed.saturating_sub(old.failed),
            retries: self.retries.saturating_sub(old.retries),
            dead_lettered: self.dead_lettered.saturating_sub(old.dead_lettered),
            routed: self.routed.saturating_sub(old.routed),
            replays: self.replays.saturating_sub(old.replays),
            quarantined: self.quarantined.saturating_sub(old.quarantined),
            compensations: self.compensations.saturating_sub(old.compensations),
            in_flight: self.in_flight,
            deliveries: self.deliveries.saturating_sub(old.deliveries),
            tool_retries: self.tool_retries.saturating_sub(old.tool_retries),
            hedges: self.hedges.saturating_sub(old.hedges),
            breaker_trips: self.breaker_trips.saturating_sub(old.breaker_trips),
            faults_applied: self.faults_applied.saturating_sub(old.faults_applied),
        }
    }
}

/// One engine's published snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub engine_id: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub at_ms: u64,
    pub counters: Counters,
    /// Task latency (read to completion) in µs, hex HdrHistogram V2.
    pub latency_us: String,
    /// Engine overhead per task (latency minus agent time) in µs.
    pub overhead_us: String,
    /// Version of the published CircuitPolicies the engine runs (0: those of its file; see
    /// `engine::policies`).
    #[serde(default)]
    pub policy_version: u64,
}

/// Aggregate of every live engine of a workflow.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowStats {
    pub engines: Vec<Snapshot>,
    pub totals: Counters,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
}

/// Live statistics of one engine.
pub struct Stats {
    pub engine_id: String,
    pub role: String,
    pub agent: Option<String>,
    processed: AtomicU64,
    completed: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    routed: AtomicU64,
    replays: AtomicU64,
    quarantined: AtomicU64,
    compensations: AtomicU64,
    in_flight: AtomicI64,
    deliveries: AtomicU64,
    tool_retries: AtomicU64,
    hedges: AtomicU64,
    breaker_trips: AtomicU64,
    faults_applied: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    overhead: Mutex<Histogram<u64>>,
    registry: Registry,
    m_tasks: IntCounterVec,
    m_duration: HistogramVec,
    m_retries: IntCounterVec,
    m_in_flight: IntGaugeVec,
    m_replays: IntCounterVec,
    m_dlq_age: HistogramVec,
    /// This engine's children of the vectors above (its agent label is
    /// fixed), resolved on first use instead of hashing the labels on every
    /// task; lazily, except the agent's completed and dead-lettered counts, retries, in-flight
    /// gauge and duration histogram, which an agent engine exports at 0 from its start (see
    /// [`Stats::new`]).
    c_tasks: [OnceLock<IntCounter>; 5],
    c_duration: OnceLock<prometheus::Histogram>,
    c_retries: OnceLock<IntCounter>,
    c_in_flight: OnceLock<IntGauge>,
    /// The agent container could not be reached (its breaker is open).
    agent_down: std::sync::atomic::AtomicBool,
    /// Task handlers that panicked: the engine is not ready after one.
    panics: AtomicU64,
    m_agent_up: IntGauge,
    m_panics: IntCounter,
    m_backpressure: IntCounter,
    m_agent_hedges: IntCounterVec,
    policy_version: AtomicU64,
    m_policy_version: IntGauge,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("engine_id", &self.engine_id)
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

/// Buckets of a DLQ entry's age, in seconds: a replay after a short outage (a minute or two)
/// up to the default retention (7 days).
const DLQ_AGE_BUCKETS: &[f64] = &[
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    6.0 * 3600.0,
    86_400.0,
    3.0 * 86_400.0,
    7.0 * 86_400.0,
];

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits; the bounds are constants, so this
    // cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// What an engine did for agent-level hedging (the `event` label of
/// `r4_engine_agent_hedges_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentHedgeEvent {
    /// This engine asked a peer to shadow one of its slow deliveries (a peer took the note).
    Sent,
    /// This engine delivered a peer's task to its own agent as the shadow.
    Shadow,
    /// A shadow delivery of this engine completed the step (the primary lost).
    ShadowWon,
}

impl AgentHedgeEvent {
    pub const ALL: [AgentHedgeEvent; 3] = [Self::Sent, Self::Shadow, Self::ShadowWon];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Shadow => "shadow",
            Self::ShadowWon => "shadow_won",
        }
    }
}

impl Stats {
    pub fn new(engine_id: &str, role: &str, agent: Option<&str>) -> Self {
        let registry = Registry::new();
        let m_tasks = IntCounterVec::new(
            Opts::new(
                "r4_engine_tasks_total",
                "Tasks handled, by agent and outcome",
            ),
            &["agent", "outcome"],
        )
        .expect("static metric definition");
        let m_duration = HistogramVec::new(
            HistogramOpts::new(
                "r4_engine_task_duration_seconds",
                "Time from reading a task to its completion",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["agent"],
        )
        .expect("static metric definition");
        let m_retries = IntCounterVec::new(
            Opts::new("r4_engine_retries_total", "Delivery retries"),
            &["agent"],
        )
        .expect("static metric definition");
        let m_in_flight = IntGaugeVec::new(
            Opts::new("r4_engine_in_flight", "Tasks being delivered now"),
            &["agent"],
        )
        .expect("static metric definition");
        let m_replays = IntCounterVec::new(
            Opts::new(
                "r4_engine_replays_total",
                "DLQ entries replayed or quarantined",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let m_dlq_age = HistogramVec::new(
            HistogramOpts::new(
                "r4_engine_dlq_age_at_exit_seconds",
                "Age of DLQ entries when the repair role took them out, by outcome (replayed, quarantined)",
            )
            .buckets(DLQ_AGE_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("static metric definition");
        let m_agent_up = IntGauge::new(
            "r4_engine_agent_up",
            "1 while the agent container answers, 0 while it cannot be reached (reads paused)",
        )
        .expect("static metric definition");
        m_agent_up.set(1);
        let m_panics = IntCounter::new(
            "r4_engine_task_panics_total",
            "Task handlers that panicked (the engine reports not ready after one)",
        )
        .expect("static metric definition");
        let m_backpressure = IntCounter::new(
            "r4_engine_backpressure_total",
            "Completions held back because an output stream was at its backlog limit",
        )
        .expect("static metric definition");
        let m_agent_hedges = IntCounterVec::new(
            Opts::new(
                "r4_engine_agent_hedges_total",
                "Agent-level hedging (shadow agent), by agent and event: sent (this engine asked a peer to shadow a slow delivery), shadow (it delivered a peer's task as the shadow), shadow_won (its shadow delivery completed the step)",
            ),
            &["agent", "event"],
        )
        .expect("static metric definition");
        if let Some(a) = agent {
            // At 0 from the start: a rate over a series that appears with its first
            // increment misses that increment.
            for e in AgentHedgeEvent::ALL {
                m_agent_hedges.with_label_values(&[a, e.as_str()]);
            }
        }
        let m_policy_version = IntGauge::new(
            "r4_engine_policy_version",
            "Version of the published CircuitPolicies the engine runs (0: those of its workflow file)",
        )
        .expect("static metric definition");
        for c in [
            Box::new(m_agent_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m_policy_version.clone()),
            Box::new(m_panics.clone()),
            Box::new(m_backpressure.clone()),
            Box::new(m_agent_hedges.clone()),
            Box::new(m_tasks.clone()),
            Box::new(m_duration.clone()),
            Box::new(m_retries.clone()),
            Box::new(m_in_flight.clone()),
            Box::new(m_replays.clone()),
            Box::new(m_dlq_age.clone()),
        ] {
            // Fresh registry, distinct names: registration cannot collide.
            let _ = registry.register(c);
        }
        let stats = Self {
            engine_id: engine_id.to_owned(),
            role: role.to_owned(),
            agent: agent.map(str::to_owned),
            processed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            compensations: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            deliveries: AtomicU64::new(0),
            tool_retries: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            breaker_trips: AtomicU64::new(0),
            faults_applied: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            overhead: Mutex::new(histogram()),
            registry,
            m_tasks,
            m_duration,
            m_retries,
            m_in_flight,
            m_replays,
            m_dlq_age,
            c_tasks: Default::default(),
            c_duration: OnceLock::new(),
            c_retries: OnceLock::new(),
            c_in_flight: OnceLock::new(),
            agent_down: std::sync::atomic::AtomicBool::new(false),
            panics: AtomicU64::new(0),
            m_agent_up,
            m_panics,
            m_backpressure,
            m_agent_hedges,
            policy_version: AtomicU64::new(0),
            m_policy_version,
        };
        // The series the SLI and the dashboards divide by exist at 0 from the start (a rate
        // over a series that appears with its first increment misses that increment).
        if stats.agent.is_some() {
            stats.tasks_counter(Outcome::Completed);
            stats.tasks_counter(Outcome::DeadLettered);
            stats
                .c_retries
                .get_or_init(|| stats.m_retries.with_label_values(&[stats.agent_label()]));
            stats.in_flight_gauge();
            stats
                .c_duration
                .get_or_init(|| stats.m_duration.with_label_values(&[stats.agent_label()]));
        }
        if role == "repair" {
            for outcome in ["replayed", "quarantined"] {
                stats.m_replays.with_label_values(&[outcome]);
                stats.m_dlq_age.with_label_values(&[outcome]);
            }
        }
        stats
    }

    /// The engine now runs the published policies of `version`.
    pub fn set_policy_version(&self, version: u64) {
        self.policy_version.store(version, Ordering::Relaxed);
        self.m_policy_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Version of the published policies the engine runs (0: its file's).
    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::Relaxed)
    }

    /// The agent container's reachability changed; returns whether this
    /// call changed it (so the caller logs the transition once).
    pub fn set_agent_down(&self, down: bool) -> bool {
        let was = self.agent_down.swap(down, Ordering::Relaxed);
        self.m_agent_up.set(if down { 0 } else { 1 });
        was != down
    }

    pub fn agent_down(&self) -> bool {
        self.agent_down.load(Ordering::Relaxed)
    }

    /// A task handler panicked.
    pub fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
        self.m_panics.inc();
    }

    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// A completion waited for room in a full output stream.
    pub fn backpressure(&self) {
        self.m_backpressure.inc();
    }

    /// One agent-level hedging event of this engine's agent (`r4_engine_agent_hedges_total`).
    pub fn agent_hedge(&self, event: AgentHedgeEvent) {
        let agent = self.agent.as_deref().unwrap_or("");
        self.m_agent_hedges
            .with_label_values(&[agent, event.as_str()])
            .inc();
    }

    /// Whether the role can do its work: its agent answers and no task
    /// handler has panicked (`/readyz`).
    pub fn ready(&self) -> bool {
        !self.agent_down() && self.panics() == 0
    }

    fn agent_label(&self) -> &str {
        self.agent.as_deref().unwrap_or("")
    }

    fn tasks_counter(&self, outcome: Outcome) -> &IntCounter {
        let i = match outcome {
            Outcome::Completed => 0,
            Outcome::Duplicate => 1,
            Outcome::DeadLettered => 2,
            Outcome::Routed => 3,
            Outcome::Skipped => 4,
        };
        self.c_tasks[i].get_or_init(|| {
            self.m_tasks
                .with_label_values(&[self.agent_label(), outcome.as_str()])
        })
    }

    fn in_flight_gauge(&self) -> &IntGauge {
        self.c_in_flight
            .get_or_init(|| self.m_in_flight.with_label_values(&[self.agent_label()]))
    }

    /// A task finished at this step. `total`: read to done; `agent_time`:
    /// the part spent waiting for the agent.
    pub fn record(&self, outcome: Outcome, total: Duration, agent_time: Duration) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        let c = match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Duplicate => &self.duplicates,
            Outcome::DeadLettered => &self.dead_lettered,
            Outcome::Routed => &self.routed,
            Outcome::Skipped => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.tasks_counter(outcome).inc();
        if outcome == Outcome::Completed {
            self.c_duration
                .get_or_init(|| self.m_duration.with_label_values(&[self.agent_label()]))
                .observe(total.as_secs_f64());
            let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
            if let Ok(mut h) = self.latency.lock() {
                h.saturating_record(us(total));
            }
            if let Ok(mut h) = self.overhead.lock() {
                h.saturating_record(us(total.saturating_sub(agent_time)));
            }
        }
    }

    /// The tool proxy's totals now (its policy counters summed over its tools, and the calls
    /// that met an injected fault): they replace the previous ones.
    pub fn set_tool_counters(&self, retries: u64, hedges: u64, breaker_trips: u64, faults: u64) {
        self.tool_retries.store(retries, Ordering::Relaxed);
        self.hedges.store(hedges, Ordering::Relaxed);
        self.breaker_trips.store(breaker_trips, Ordering::Relaxed);
        self.faults_applied.store(faults, Ordering::Relaxed);
    }

    /// A delivery or a read met an injected fault.
    pub fn fault_applied(&self) {
        self.faults_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// The agent answered a delivery (whatever it answered).
    pub fn delivered(&self) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery attempt failed.
    pub fn failed_attempt(&self, will_retry: bool) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if will_retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
            self.c_retries
                .get_or_init(|| self.m_retries.with_label_values(&[self.agent_label()]))
                .inc();
        }
    }

    pub fn replayed(&self) {
        self.replays.fetch_add(1, Ordering::Relaxed);
        self.m_replays.with_label_values(&["replayed"]).inc();
    }

    pub fn quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        self.m_replays.with_label_values(&["quarantined"]).inc();
    }

    /// A DLQ entry `age` old left the DLQ, replayed or quarantined (`outcome`): the age
    /// distribution of what the repair role takes out (a stream has no cheap count by age of
    /// what stays in; the controller exports the oldest entry's age).
    pub fn left_dlq(&self, outcome: &str, age: Duration) {
        self.m_dlq_age
            .with_label_values(&[outcome])
            .observe(age.as_secs_f64());
    }

    pub fn compensated(&self) {
        self.compensations.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a task in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_gauge().inc();
        InFlight(self)
    }

    pub fn counters(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            processed: l(&self.processed),
            completed: l(&self.completed),
            duplicates: l(&self.duplicates),
            failed: l(&self.failed),
            retries: l(&self.retries),
            dead_lettered: l(&self.dead_lettered),
            routed: l(&self.routed),
            replays: l(&self.replays),
            quarantined: l(&self.quarantined),
            compensations: l(&self.compensations),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            deliveries: l(&self.deliveries),
            tool_retries: l(&self.tool_retries),
            hedges: l(&self.hedges),
            breaker_trips: l(&self.breaker_trips),
            faults_applied: l(&self.faults_applied),
        }
    }

    /// A copy of the latency histogram (µs).
    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| histogram())
    }

    /// A copy of the overhead histogram (µs).
    pub fn overhead(&self) -> Histogram<u64> {
        self.overhead
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| histogram())
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            engine_id: self.engine_id.clone(),
            role: self.role.clone(),
            agent: self.agent.clone(),
            at_ms: super::task::now_ms(),
            counters: self.counters(),
            latency_us: encode_hist(&self.latency()),
            overhead_us: encode_hist(&self.overhead()),
            policy_version: self.policy_version(),
        }
    }

    /// Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The metric families of this engine (what [`Self::render_metrics`] encodes).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Publish the snapshot under `stats:<engine-id>` with `ttl`.
    pub async fn publish(
        &self,
        q: &dyn Queue,
        keys: &Keys,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        let json = serde_json::to_vec(&self.snapshot()).unwrap_or_default();
        q.set(&keys.stats(&self.engine_id), Bytes::from(json), Some(ttl))
            .await
    }
}

/// Guard of [`Stats::in_flight`].
pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight_gauge().dec();
    }
}

fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    match V2Serializer::new().serialize(h, &mut buf) {
        Ok(_) => hex::encode(buf),
        Err(_) => String::new(),
    }
}

/// Decode a published histogram (an empty one for garbage).
pub fn decode_hist(s: &str) -> Histogram<u64> {
    hex::decode(s)
        .ok()
        .and_then(|b| Deserializer::new().deserialize(&mut b.as_slice()).ok())
        .unwrap_or_else(histogram)
}

/// What a workflow's engines did between two readings of their snapshots.
#[derive(Debug, Clone)]
pub struct Delta {
    /// Counter increases (`in_flight`: the newer reading's value, a gauge has no delta).
    pub counters: Counters,
    /// Task latency of the completions in between, µs.
    pub latency_us: Histogram<u64>,
}

impl Delta {
    /// p95 of the task latency in between, ms; `None` without a completion.
    pub fn p95_ms(&self) -> Option<f64> {
        (!self.latency_us.is_empty())
            .then(|| self.latency_us.value_at_quantile(0.95) as f64 / 1000.0)
    }
}

/// What happened between two readings of a workflow's engine snapshots, engine by engine:
/// an engine in both contributes its counter and histogram deltas, a new one all it has, a gone
/// one nothing (its snapshot expired) — so the counts never go backwards when engines come and
/// go. An engine whose counters went down between the readings restarted under the same id:
/// it counts as new. (The rollout analysis and the drill runner both measure through this.)
pub fn delta(old: &[Snapshot], new: &[Snapshot]) -> Delta {
    let mut counters = Counters::default();
    let mut latency = histogram();
    for n in new {
        let before = old
            .iter()
            .find(|o| o.engine_id == n.engine_id)
            .filter(|o| !went_back(&o.counters, &n.counters));
        let mut h = decode_hist(&n.latency_us);
        match before {
            Some(o) => {
                counters.add(&n.counters.since(&o.counters));
                // A histogram that does not contain the older one (garbage, a reset the
                // counters did not show) is taken whole rather than dropped.
                let mut d = h.clone();
                if d.subtract(decode_hist(&o.latency_us)).is_ok() {
                    h = d;
                }
            }
            None => counters.add(&n.counters),
        }
        // Both come from the engines' fixed bounds; a foreign one is skipped.
        let _ = latency.add(&h);
    }
    Delta {
        counters,
        latency_us: latency,
    }
}

fn went_back(old: &Counters, new: &Counters) -> bool {
    new.completed < old.completed || new.dead_lettered < old.dead_lettered
}

/// Read and aggregate every live engine's snapshot of a workflow.
pub async fn read_workflow(q: &dyn Queue, keys: &Keys) -> Result<WorkflowStats, QueueError> {
    let mut engines = Vec::new();
    for key in q.scan_prefix(&keys.stats_prefix()).await? {
        if let Some(raw) = q.get(&key).await?
            && let Ok(s) = serde_json::from_slice::<Snapshot>(&raw)
        {
            engines.push(s);
        }
    }
    let mut totals = Counters::default();
    let mut all = histogram();
    for e in &engines {
        totals.add(&e.counters);
        let _ = all.add(decode_hist(&e.latency_us));
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    Ok(WorkflowStats {
        latency_ms_p50: ms(0.5),
        latency_ms_p95: ms(0.95),
        latency_ms_p99: ms(0.99),
        engines,
        totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_hedge_events_are_exported_from_zero() {
        let s = Stats::new("e", "agent", Some("investigation"));
        let m = s.render_metrics();
        for e in ["sent", "shadow", "shadow_won"] {
            let line =
                format!("r4_engine_agent_hedges_total{{agent=\"investigation\",event=\"{e}\"}} 0");
            assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
        }
        s.agent_hedge(AgentHedgeEvent::Sent);
        s.agent_hedge(AgentHedgeEvent::Sent);
        s.agent_hedge(AgentHedgeEvent::ShadowWon);
        let m = s.render_metrics();
        assert!(
            m.contains("r4_engine_agent_hedges_total{agent=\"investigation\",event=\"sent\"} 2")
        );
        assert!(m.contains(
            "r4_engine_agent_hedges_total{agent=\"investigation\",event=\"shadow_won\"} 1"
        ));
        assert!(
            m.contains("r4_engine_agent_hedges_total{agent=\"investigation\",event=\"shadow\"} 0")
        );
        // A role without an agent exports no empty series.
        let r = Stats::new("r", "repair", None).render_metrics();
        assert!(!r.contains("r4_engine_agent_hedges_total{"), "{r}");
    }

    #[test]
    fn delta_counts_every_counter_per_engine() {
        let a = Stats::new("a", "agent", Some("a"));
        a.record(Outcome::Completed, Duration::from_millis(5), Duration::ZERO);
        a.failed_attempt(true);
        a.replayed();
        let old = vec![a.snapshot()];
        let _busy = a.in_flight();
        a.record(
            Outcome::Completed,
            Duration::from_millis(300),
            Duration::ZERO,
        );
        a.failed_attempt(true);
        a.failed_attempt(true);
        a.replayed();
        a.quarantined();
        let b = Stats::new("b", "repair", None);
        b.replayed();
        b.left_dlq("replayed", Duration::from_secs(120));
        let m = b.render_metrics();
        assert!(
            m.contains(
                "r4_engine_dlq_age_at_exit_seconds_bucket{outcome=\"replayed\",le=\"300\"} 1"
            ),
            "{m}"
        );
        assert!(m.contains(
            "r4_engine_dlq_age_at_exit_seconds_bucket{outcome=\"replayed\",le=\"60\"} 0"
        ));
        assert!(m.contains("r4_engine_dlq_age_at_exit_seconds_count{outcome=\"quarantined\"} 0"));
        let d = delta(&old, &[a.snapshot(), b.snapshot()]);
        let c = &d.counters;
        assert_eq!(
            (
                c.completed,
                c.retries,
                c.replays,
                c.quarantined,
                c.in_flight
            ),
            (1, 2, 2, 1, 1),
            "a's increases, all of new b, in_flight as it is now"
        );
        // Only the interval's completion is in the p95.
        assert!((d.p95_ms().unwrap() - 300.0).abs() < 1.0);
        assert_eq!(delta(&old, &old).p95_ms(), None);
    }

    #[tokio::test]
    async fn publishes_and_aggregates() {
        let q = crate::queue::memory::MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let a = Stats::new("e1", "agent", Some("a"));
        let b = Stats::new("e2", "agent", Some("b"));
        for _ in 0..10 {
            a.record(
                Outcome::Completed,
                Duration::from_millis(2),
                Duration::from_millis(1),
            );
        }
        b.record(
            Outcome::DeadLettered,
            Duration::from_millis(1),
            Duration::ZERO,
        );
        b.failed_attempt(true);
        {
            let _g = b.in_flight();
            assert_eq!(b.counters().in_flight, 1);
        }
        assert_eq!(b.counters().in_flight, 0);
        a.publish(&q, &keys, Duration::from_secs(10)).await.unwrap();
        b.publish(&q, &keys, Duration::from_secs(10)).await.unwrap();
        let w = read_workflow(&q, &keys).await.unwrap();
        assert_eq!(w.engines.len(), 2);
        assert_eq!(w.totals.completed, 10);
        assert_eq!(w.totals.dead_lettered, 1);
        assert_eq!(w.totals.retries, 1);
        assert_eq!(w.totals.processed, 11);
        assert!(
            (w.latency_ms_p50 - 2.0).abs() < 0.01,
            "{}",
            w.latency_ms_p50
        );
        let m = a.render_metrics();
        assert!(
            m.contains("r4_engine_tasks_total{agent=\"a\",outcome=\"completed\"} 10"),
            "{m}"
        );
        assert!(m.contains("r4_engine_task_duration_seconds_bucket"));
        let o = decode_hist(&a.snapshot().overhead_us);
        assert_eq!(o.len(), 10);
        assert!((o.value_at_quantile(0.5) as i64 - 1000).abs() < 5);
    }

    /// The tool proxy's snapshot (role `tools`) adds its counters to the workflow's totals and
    /// nothing else; a snapshot of an older engine, without them, still reads.
    #[tokio::test]
    async fn tool_counters_add_up() {
        let q = crate::queue::memory::MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let agent = Stats::new("e1", "agent", Some("a"));
        agent.record(Outcome::Completed, Duration::from_millis(2), Duration::ZERO);
        agent.fault_applied();
        let tools = Stats::new("e1-tools", "tools", None);
        tools.set_tool_counters(5, 2, 1, 7);
        tools.set_tool_counters(6, 3, 1, 9);
        for s in [&agent, &tools] {
            s.publish(&q, &keys, Duration::from_secs(10)).await.unwrap();
        }
        let old = serde_json::json!({
            "engine_id": "old", "role": "agent", "at_ms": 1, "latency_us": "", "overhead_us": "",
            "counters": {"processed": 1, "completed": 1, "duplicates": 0, "failed": 0,
                "retries": 0, "dead_lettered": 0, "routed": 0, "replays": 0, "quarantined": 0,
                "compensations": 0, "in_flight": 0}
        });
        q.set(&keys.stats("old"), Bytes::from(old.to_string()), None)
            .await
            .unwrap();
        let w = read_workflow(&q, &keys).await.unwrap();
        assert_eq!(w.engines.len(), 3);
        let t = &w.totals;
        assert_eq!(
            (
                t.completed,
                t.tool_retries,
                t.hedges,
                t.breaker_trips,
                t.faults_applied
            ),
            (2, 6, 3, 1, 10)
        );
    }
}
