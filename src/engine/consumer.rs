//! The agent role: consume an agent's input stream and deliver each task to
//! the agent, effectively once.
//!
//! Owns the consume loop (consumer group per agent, bounded concurrency,
//! claiming a dead consumer's entries after the visibility timeout, safe
//! stop on a kill switch or shutdown) and the life of one entry: decode →
//! deliver → atomic completion, or retry with backoff, or dead-letter.
//!
//! # Invariants
//! - An entry is acked only by [`Queue::complete`] (with its outputs and its
//!   inbox key, one atomic step; sent through the group commit,
//!   [`super::commit`]) or by [`Queue::dead_letter`] (with its DLQ record,
//!   one atomic step), and each writes only if the entry is still pending
//!   for this engine — so completion and dead-lettering exclude each
//!   other. A crash at any instant leaves it pending, and a live engine
//!   claims it after `queue.visibilityTimeout` (scanning the pending list
//!   with a cursor, so none is starved behind live ones).
//! - At most `concurrency` deliveries run at once. A delivery slot is freed
//!   as soon as the agent answers (or the entry backs off), so the next
//!   entry is read while the completion travels; entries held (delivering,
//!   completing or backing off) stay at most twice `concurrency`.
//! - An unreachable agent is not a task failure: reads pause until it
//!   answers, and no delivery is counted meanwhile.
//! - A retried entry stays pending with us; after the backoff we re-claim it
//!   by id ([`Queue::claim`]), which counts the delivery in Redis — so
//!   `deadLetter.maxDeliveries` holds across crashes — and tells us if
//!   someone else finished it meanwhile. One delivery or one backoff sleep
//!   never exceeds half the visibility timeout, so a live engine's entry is
//!   not claimed away from it.
//! - Anything read from the stream is validated ([`super::task`]); what is
//!   not a task for us goes to the DLQ with a reason. Nothing from outside
//!   is unwrapped; every queue call has the queue's deadline and every
//!   delivery `min(timeout.perAttempt, visibility/2)`.
//!
//! # Injected faults
//! The role follows the workflow's ChaosDrill faults ([`super::faults`]) and applies those
//! aimed at it: a `MessageCorruption` of its input stream takes a delivered task down the
//! malformed path to the DLQ (reason `malformed`, the error naming the drill, replayable: the
//! stored entry is intact, and a replayed task is not corrupted again, so a replay completes it
//! and nothing is lost); an `AgentSlowdown`
//! of its agent delays each delivery by `latencyMs` inside the attempt's deadline (the agent
//! answers late; past the deadline the attempt fails as a timeout would); a `QueueThrottle` of
//! its input stream limits this engine's reads to its share of `maxPerSecond` — divided by the
//! live consumers of the group, so all engines together stay within it.
//!
//! # Agent-level hedging
//! An agent with `hedge` hands a delivery that has not answered by the delay to another engine
//! of the agent as well ([`shadow`]; the decisions are [`super::hedge`]'s). Either engine's
//! completion is the normal atomic one, so the invariants above hold for both.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::api::workflow::DegradedAction;
use crate::queue::{
    Completing, Completion, DeadLetter, Fields, JoinPart, JoinRef, Queue, QueueError, StreamEntry,
};

use super::commit::GroupCommit;
use super::config::{Agent, Join, Policy, WorkflowConfig};
use super::degraded::{self, Downgrade};
use super::delivery::{Delivery, DeliveryError, DeliveryRequest, Outputs, RequestKind};
use super::dlq::{DlqRecord, FailedJoin, reason};
use super::faults::FaultView;
use super::hedge::AgentHedge;
use super::killswitch::{self, SwitchState};
use super::stats::{Outcome, Stats};
use super::task::{self, Attempt, Kind, Task};
use super::{EngineError, policies, saga};

mod shadow;

/// Tunables of the agent role (defaults suit production; tests shorten them).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Longest XREADGROUP block; bounds how fast a kill switch is obeyed.
    pub read_block: Duration,
    /// Most entries read per call.
    pub batch: usize,
    /// How long in-flight tasks may finish on shutdown before they are left
    /// pending (checkpointed) for another engine.
    pub drain: Duration,
    /// Seed of the backoff jitter (`r4 run --seed` makes a run repeatable);
    /// `None` draws from the thread's RNG.
    pub jitter_seed: Option<u64>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            read_block: Duration::from_millis(200),
            batch: 64,
            drain: Duration::from_secs(20),
            jitter_seed: None,
        }
    }
}

/// The agent role of one engine.
pub struct AgentRole {
    cfg: Arc<WorkflowConfig>,
    agent: Agent,
    queue: Arc<dyn Queue>,
    delivery: Arc<dyn Delivery>,
    stats: Arc<Stats>,
    engine_id: String,
    opts: AgentOptions,
    /// Agent-level hedging, if the agent has a `hedge` (shared with [`Ctx`]).
    hedge: Option<Arc<AgentHedge>>,
}

/// What every task handler shares.
struct Ctx {
    cfg: Arc<WorkflowConfig>,
    agent: Agent,
    queue: Arc<dyn Queue>,
    delivery: Arc<dyn Delivery>,
    stats: Arc<Stats>,
    engine_id: String,
    stream: String,
    commit: GroupCommit,
    /// Deliveries in progress: at most the agent's `concurrency`.
    sem: Arc<Semaphore>,
    /// Entries this engine holds (delivering or completing): at most twice
    /// the concurrency, so completions in flight cannot pile up.
    held: Arc<Semaphore>,
    downgrade: watch::Receiver<Option<Downgrade>>,
    shutdown: watch::Receiver<bool>,
    jitter: Option<std::sync::Mutex<rand::rngs::SmallRng>>,
    /// The workflow's delivery policy as published sets change it ([`policies::follow`]);
    /// each task takes the one current when it needs it.
    policy: watch::Receiver<(u64, Arc<Policy>)>,
    /// The injected faults ([`super::faults::follow`]).
    faults: FaultView,
    /// Agent-level hedging ([`shadow`]), if the agent has a `hedge`.
    hedge: Option<Arc<AgentHedge>>,
}

impl Ctx {
    /// The delivery policy in force now.
    fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().1.clone()
    }

    /// A uniform draw in `[0, 1)` for backoff jitter.
    fn jitter_draw(&self) -> f64 {
        match &self.jitter {
            Some(rng) => crate::resilience::lock(rng).random::<f64>(),
            None => rand::rng().random::<f64>(),
        }
    }
}

impl AgentRole {
    pub fn new(
        cfg: Arc<WorkflowConfig>,
        agent: &str,
        queue: Arc<dyn Queue>,
        delivery: Arc<dyn Delivery>,
        engine_id: &str,
    ) -> Result<Self, EngineError> {
        let agent = cfg
            .agent(agent)
            .cloned()
            .ok_or_else(|| EngineError::Config(format!("unknown agent {agent:?}")))?;
        let stats = Arc::new(Stats::new(engine_id, "agent", Some(&agent.name)));
        let hedge = agent.hedge.clone().map(|c| Arc::new(AgentHedge::new(c)));
        Ok(Self {
            hedge,
            cfg,
            agent,
            queue,
            delivery,
            stats,
            engine_id: engine_id.to_owned(),
            opts: AgentOptions::default(),
        })
    }

    pub fn with_options(mut self, opts: AgentOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Share a stats object (e.g. one per process in `r4 run`).
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The role's agent hedging (its counters), if the agent has a `hedge`.
    pub fn hedge(&self) -> Option<Arc<AgentHedge>> {
        self.hedge.clone()
    }

    /// Run until `shutdown` turns true; then stop reading, let in-flight
    /// tasks finish for up to `drain`, and leave the rest pending.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let stream = self.cfg.keys.stream(&self.agent.consumes);
        let group = self.agent.name.clone();
        let q = self.queue.clone();
        // The groups must exist before anything else (ours and those of the
        // agents we write to); retry while Redis is away.
        loop {
            match ensure_groups(q.as_ref(), &self.cfg).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create consumer group; retrying");
                    if wait_or_shutdown(&mut shutdown, Duration::from_millis(500)).await {
                        return Ok(());
                    }
                }
            }
        }
        let mut switch =
            killswitch::watch(q.clone(), self.cfg.keys.clone(), self.cfg.spec_switches());
        let acker = killswitch::Acknowledger::start(
            q.clone(),
            self.cfg.keys.clone(),
            self.engine_id.clone(),
            Some(self.agent.name.clone()),
        );
        let (down_tx, down_rx) = watch::channel(None);
        // Published CircuitPolicies: taken by the next task (and group commit) once read.
        let first = policies::initial(q.as_ref(), &self.cfg).await;
        let mut policy = policies::follow(q.clone(), self.cfg.clone(), self.stats.clone(), first);
        let faults = super::faults::follow(q.clone(), self.cfg.keys.clone());
        // A role started mid-drill (a killed pod's replacement) applies the faults from its
        // first read of work.
        faults.first_read(super::faults::FIRST_READ).await;
        let ctx = self.context(
            &stream,
            down_rx,
            shutdown.clone(),
            policy.clone(),
            faults.clone(),
        );
        let mut throttle = Throttle::default();
        // Hedging notes from the agent's other engines; aborted with us (a killed engine's
        // shadows die with it).
        let _hedge_listener = self.hedge.clone().map(|h| {
            AbortOnDrop(tokio::spawn(shadow::listen(
                ctx.clone(),
                h,
                shutdown.clone(),
            )))
        });
        let stats_task = tokio::spawn(publish_stats(
            q.clone(),
            self.cfg.keys.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));
        let join_sweeper = self
            .agent
            .join
            .clone()
            .map(|j| tokio::spawn(sweep_joins(ctx.clone(), j, shutdown.clone())));
        let claim_every = (self.cfg.visibility_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut last_claim: Option<Instant> = None;
        let mut last_down_check: Option<Instant> = None;
        let mut last_reap = Instant::now();
        let mut last_trim = Instant::now();
        let mut cursor = String::from("0-0");
        let mut tasks: JoinSet<()> = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            while let Some(r) = tasks.try_join_next() {
                self.joined(r);
            }
            if switch.has_changed().is_err() {
                // The watcher ended (it panicked): never run blind — a new
                // one starts from "unknown", which stops us until it reads.
                tracing::error!(agent = %self.agent.name, "kill-switch watcher ended; restarting it");
                switch =
                    killswitch::watch(q.clone(), self.cfg.keys.clone(), self.cfg.spec_switches());
            }
            if policy.has_changed().unwrap_or(false) {
                let ttl = policy.borrow_and_update().1.idempotency_ttl;
                ctx.commit.set_inbox_ttl(ttl);
            }
            let state = switch.borrow_and_update().clone();
            if last_down_check.is_none_or(|t| t.elapsed() >= killswitch::REREAD) {
                last_down_check = Some(Instant::now());
                self.refresh_downgrade(&state, &down_tx).await;
            }
            // A down tool whose fallback may answer pauses nothing: its tasks are delivered.
            let paused = state.stops(Some(&self.agent.name))
                || down_tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|d| d.action == DegradedAction::Pause && d.before_delivery());
            // Neither our deliveries nor our peers' are hedged while we do not read.
            if let Some(h) = &self.hedge {
                h.set_paused(paused || self.stats.agent_down());
            }
            // Acknowledge only once we are really not reading any more
            // (we are between reads here).
            acker.set(state.version, paused);
            if paused {
                tokio::select! {
                    _ = switch.changed() => {}
                    _ = tokio::time::sleep(killswitch::REREAD) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if self.stats.agent_down() {
                // Our agent cannot be reached: the entries we hold wait for
                // it; read nothing new until it answers.
                tokio::select! {
                    _ = switch.changed() => {}
                    _ = tokio::time::sleep(AGENT_PROBE_MIN) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Wait for at least one free slot, then take what is free. (A
            // closed switch channel is seen at the top of the loop; wait a
            // little instead of spinning on it.)
            let first = tokio::select! {
                p = ctx.sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => continue,
                r = switch.changed() => { if r.is_err() { tokio::time::sleep(AGENT_PROBE_MIN).await; } continue }
            };
            let first_held = tokio::select! {
                p = ctx.held.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => continue,
                r = switch.changed() => { if r.is_err() { tokio::time::sleep(AGENT_PROBE_MIN).await; } continue }
            };
            let mut permits = vec![(first, first_held)];
            while permits.len() < self.opts.batch {
                match (
                    ctx.sem.clone().try_acquire_owned(),
                    ctx.held.clone().try_acquire_owned(),
                ) {
                    (Ok(p), Ok(h)) => permits.push((p, h)),
                    _ => break,
                }
            }
            // A QueueThrottle: read no more than this engine's share allows.
            if let Some(max) = faults.throttle(&self.agent.consumes) {
                let allowed = throttle.allowed(&self, &group, max).await;
                if allowed == 0 {
                    drop(permits);
                    let wait = throttle.wait();
                    if wait_or_shutdown(&mut shutdown, wait).await {
                        break;
                    }
                    continue;
                }
                permits.truncate(allowed);
            } else {
                throttle = Throttle::default();
            }
            let mut entries = Vec::new();
            if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                last_claim = Some(Instant::now());
                entries = self
                    .claim_round(&ctx, &stream, &mut cursor, permits.len())
                    .await;
                if cursor == "0-0" && last_trim.elapsed() >= TRIM_EVERY {
                    // What every group acknowledged goes (never anything
                    // else), so a stream without a backlog limit does not
                    // grow with what is done.
                    last_trim = Instant::now();
                    if let Err(e) = q.trim_acked(&stream).await {
                        tracing::debug!(error = %e, "cannot trim acknowledged entries");
                    }
                }
                if cursor == "0-0" && last_reap.elapsed() >= self.cfg.visibility_timeout * 4 {
                    last_reap = Instant::now();
                    self.reap_consumers(&stream, &group).await;
                }
            }
            if entries.is_empty() {
                match q
                    .read_group(
                        &stream,
                        &group,
                        &self.engine_id,
                        permits.len(),
                        self.opts.read_block,
                    )
                    .await
                {
                    Ok(e) => entries = e,
                    Err(QueueError::NoGroup { .. }) => {
                        // The stream was deleted (e.g. a Redis without AOF restarted).
                        let _ = q.ensure_group(&stream, &group).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "read failed; retrying");
                        drop(permits);
                        if wait_or_shutdown(&mut shutdown, Duration::from_millis(200)).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if throttle.take(entries.len()) {
                self.stats.fault_applied();
            }
            for entry in entries {
                let Some((permit, held)) = permits.pop() else {
                    break;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move { handle(ctx, entry, permit, held).await });
            }
        }
        // Safe stop: no more reads; let in-flight tasks finish for a while.
        let drained = tokio::time::timeout(self.opts.drain, async {
            while let Some(r) = tasks.join_next().await {
                self.joined(r);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "in-flight tasks left pending for another engine"
            );
            tasks.abort_all();
        }
        let _ = stats_task.await;
        if let Some(h) = join_sweeper {
            let _ = h.await;
        }
        let _ = self
            .stats
            .publish(q.as_ref(), &self.cfg.keys, Duration::from_secs(30))
            .await;
        Ok(())
    }

    /// What every task handler of this role shares.
    fn context(
        &self,
        stream: &str,
        downgrade: watch::Receiver<Option<Downgrade>>,
        shutdown: watch::Receiver<bool>,
        policy: watch::Receiver<(u64, Arc<Policy>)>,
        faults: FaultView,
    ) -> Arc<Ctx> {
        let inbox_ttl = policy.borrow().1.idempotency_ttl;
        Arc::new(Ctx {
            sem: Arc::new(Semaphore::new(self.agent.concurrency)),
            held: Arc::new(Semaphore::new(self.agent.concurrency.saturating_mul(2))),
            cfg: self.cfg.clone(),
            agent: self.agent.clone(),
            queue: self.queue.clone(),
            delivery: self.delivery.clone(),
            stats: self.stats.clone(),
            engine_id: self.engine_id.clone(),
            stream: stream.to_owned(),
            commit: GroupCommit::start(
                self.queue.clone(),
                stream.to_owned(),
                self.agent.name.clone(),
                inbox_ttl,
                self.cfg.max_len,
            ),
            downgrade,
            shutdown,
            jitter: self.opts.jitter_seed.map(|s| {
                std::sync::Mutex::new(<rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(
                    s,
                ))
            }),
            policy,
            faults,
            hedge: self.hedge.clone(),
        })
    }

    /// Claim entries idle past the visibility timeout (left by a dead or
    /// slow engine), going on from `cursor` where the last scan stopped so
    /// entries behind many live pending ones are reached too; a few calls
    /// at most. Entries a claim finds deleted are dead-lettered (`trimmed`).
    async fn claim_round(
        &self,
        ctx: &Ctx,
        stream: &str,
        cursor: &mut String,
        count: usize,
    ) -> Vec<StreamEntry> {
        for _ in 0..CLAIM_CALLS {
            let claimed = self
                .queue
                .autoclaim(
                    stream,
                    &self.agent.name,
                    &self.engine_id,
                    self.cfg.visibility_timeout,
                    count,
                    cursor,
                )
                .await;
            match claimed {
                Ok(c) => {
                    if !c.deleted.is_empty() {
                        dead_letter_trimmed(ctx, &c.deleted).await;
                    }
                    *cursor = c.next;
                    if !c.entries.is_empty() {
                        tracing::info!(
                            n = c.entries.len(),
                            "claimed entries of a dead or slow consumer"
                        );
                        return c.entries;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "autoclaim failed");
                    *cursor = "0-0".into();
                }
            }
            if cursor.as_str() == "0-0" {
                break;
            }
        }
        Vec::new()
    }

    /// A task handler ended: a panic is logged and counted, and the engine
    /// stops being ready (its entry stays pending for another engine).
    fn joined(&self, r: Result<(), tokio::task::JoinError>) {
        if let Err(e) = r
            && e.is_panic()
        {
            self.stats.panicked();
            tracing::error!(agent = %self.agent.name, error = %e, "task handler panicked; its entry is left pending and this engine reports not ready");
        }
    }

    /// Remove consumers of dead engines from the group: those idle for
    /// four visibility timeouts with nothing pending (their entries have
    /// been claimed), so the group does not grow one consumer per engine
    /// ever started. Only an empty consumer is removed ([`Queue::remove_consumer`]).
    async fn reap_consumers(&self, stream: &str, group: &str) {
        let idle = self.cfg.visibility_timeout * 4;
        let Ok(consumers) = self.queue.consumers(stream, group).await else {
            return;
        };
        for c in consumers {
            if c.name != self.engine_id && c.pending == 0 && c.idle >= idle {
                match self.queue.remove_consumer(stream, group, &c.name).await {
                    Ok(true) => {
                        tracing::info!(consumer = %c.name, "removed the consumer of a gone engine")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot remove a consumer"),
                }
            }
        }
    }

    async fn refresh_downgrade(&self, state: &SwitchState, tx: &watch::Sender<Option<Downgrade>>) {
        if self.agent.degraded.is_none() {
            return;
        }
        let mut down: BTreeSet<String> = state.tools.clone();
        down.extend(self.cfg.spec_killed_tools());
        let killed = down.clone();
        match super::breakers::BreakerStates::new(self.queue.as_ref(), &self.cfg.keys)
            .open_tools()
            .await
        {
            Ok(open) => down.extend(open),
            Err(e) => tracing::warn!(error = %e, "cannot read breaker states"),
        }
        // Open but not killed (the proxy refuses a killed tool before any fallback).
        let served: BTreeSet<String> = down
            .difference(&killed)
            .filter(|t| self.cfg.fallback_may_answer(t))
            .cloned()
            .collect();
        let next = degraded::decide(&self.agent, &down, &served);
        let changed = {
            let cur = tx.borrow();
            cur.as_ref().map(|d| (d.action, &d.tools, &d.fallback))
                != next.as_ref().map(|d| (d.action, &d.tools, &d.fallback))
        };
        if changed {
            tracing::warn!(agent = %self.agent.name, downgrade = ?next, "degraded mode changed");
            if let Err(e) = degraded::broadcast(
                self.queue.as_ref(),
                &self.cfg.keys,
                &self.agent.name,
                next.as_ref(),
            )
            .await
            {
                tracing::warn!(error = %e, "cannot broadcast degraded mode");
            }
            tx.send_replace(next);
        }
    }
}

/// A joining agent's engines time out its joins: every so often, the joins
/// whose deadline passed are dead-lettered (reason `join-timeout`) with the
/// parts they have and the names of those they miss, and the task's saga
/// compensations start — one atomic step each ([`Queue::expire_join`]),
/// so with several engines sweeping, and a last part arriving at the same
/// instant, a join either completes or times out, once.
async fn sweep_joins(ctx: Arc<Ctx>, join: Join, mut shutdown: watch::Receiver<bool>) {
    let every = (join.timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let due_key = ctx.cfg.keys.join_due(&ctx.agent.name);
    loop {
        if wait_or_shutdown(&mut shutdown, every).await {
            return;
        }
        let due = match ctx.queue.due(&due_key, task::now_ms(), 64).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read due joins");
                continue;
            }
        };
        for task_id in due {
            expire_join(&ctx, &join, &task_id).await;
        }
    }
}

/// Time out one join (see [`sweep_joins`]).
async fn expire_join(ctx: &Ctx, join: &Join, task_id: &str) {
    let jr = join_ref(&ctx.cfg, &ctx.agent, join, task_id);
    // The parts are read to build the record; the atomic step checks they
    // did not change meanwhile, else we read again.
    for _ in 0..3 {
        let fields = match ctx.queue.hgetall(&jr.hash).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(task = %task_id, step = %ctx.agent.name, error = %e, "cannot read a due join");
                return;
            }
        };
        let have: Fields = join
            .streams
            .iter()
            .filter_map(|s| {
                let v = fields
                    .iter()
                    .find(|(k, _)| k.strip_prefix("p:") == Some(s))?;
                Some((s.clone(), v.1.clone()))
            })
            .collect();
        let missing: Vec<&str> = join
            .streams
            .iter()
            .filter(|s| !have.iter().any(|(k, _)| k == *s))
            .map(String::as_str)
            .collect();
        let got: Vec<&str> = have.iter().map(|(k, _)| k.as_str()).collect();
        let mut rec = step_record(
            ctx,
            reason::JOIN_TIMEOUT,
            format!(
                "join of agent {} waited {:?}: has [{}], misses [{}]",
                ctx.agent.name,
                join.timeout,
                got.join(", "),
                missing.join(", ")
            ),
        );
        rec.task_id = task_id.to_owned();
        rec.original = have.clone();
        let compensation = match saga::first_compensation(
            ctx.queue.as_ref(),
            &ctx.cfg,
            task_id,
            reason::JOIN_TIMEOUT,
            None,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(task = %task_id, step = %ctx.agent.name, error = %e, "cannot read the saga log; join left due");
                return;
            }
        };
        let d = DeadLetter {
            dlq: ctx.cfg.keys.dlq(),
            record: rec.encode(),
            also: compensation.into_iter().collect(),
            marker: Some((
                ctx.cfg.keys.task_dlq(task_id),
                Bytes::from_static(reason::JOIN_TIMEOUT.as_bytes()),
            )),
            marker_ttl: ctx.policy().idempotency_ttl,
            ..DeadLetter::default()
        };
        let parts = u64::try_from(have.len()).unwrap_or(u64::MAX);
        match ctx
            .queue
            .expire_join(jr.clone(), task::now_ms(), parts, d)
            .await
        {
            Ok(crate::queue::JoinExpiry::DeadLettered(id)) => {
                tracing::warn!(task = %task_id, step = %ctx.agent.name, reason = reason::JOIN_TIMEOUT, has = %got.join(","), misses = %missing.join(","), dlq_id = %id, "dead-lettered");
                ctx.stats
                    .record(Outcome::DeadLettered, Duration::ZERO, Duration::ZERO);
                return;
            }
            Ok(crate::queue::JoinExpiry::Settled) => return,
            Ok(crate::queue::JoinExpiry::Changed) => continue,
            Err(e) => {
                tracing::warn!(task = %task_id, step = %ctx.agent.name, error = %e, "cannot time out a join");
                return;
            }
        }
    }
}

/// Create the consumer group of every agent of the workflow on its input
/// stream (from the beginning; existing groups are left as they are).
/// Every role calls this before it writes or reads anything: a work stream
/// must have its groups from the first entry on, or the queue would treat
/// it as the end of the graph and cap it instead of refusing past
/// `queue.maxLen` (see the `Queue` trait docs).
pub async fn ensure_groups(q: &dyn Queue, cfg: &WorkflowConfig) -> Result<(), QueueError> {
    for a in &cfg.agents {
        q.ensure_group(&cfg.keys.stream(&a.consumes), &a.name)
            .await?;
    }
    Ok(())
}

/// A delivery under an AgentSlowdown: `late` first, then the agent with what is left of the
/// attempt's deadline; an agent that would answer after the deadline fails the attempt as a
/// timeout (retryable), without being asked.
async fn slowed(
    ctx: &Ctx,
    req: &mut DeliveryRequest,
    late: Duration,
) -> Result<Outputs, DeliveryError> {
    let deadline = req.deadline;
    if late >= deadline {
        tokio::time::sleep(deadline).await;
        return Err(DeliveryError::retryable(format!(
            "agent {} did not answer within {deadline:?} (AgentSlowdown of {late:?} injected by a ChaosDrill)",
            ctx.agent.name
        )));
    }
    tokio::time::sleep(late).await;
    req.deadline = deadline - late;
    let res = ctx.delivery.deliver(req).await;
    req.deadline = deadline;
    res
}

/// This engine's share of a QueueThrottle: a token bucket refilled at `maxPerSecond` divided
/// by the live consumers of the group (counted again every [`THROTTLE_RECOUNT`]), holding at
/// most a tenth of a second's worth (at least one entry), so reads stay smooth.
#[derive(Default)]
struct Throttle {
    tokens: f64,
    rate: f64,
    last: Option<Instant>,
    counted: Option<(Instant, u64)>,
}

/// How often a throttled engine counts the live consumers of its group.
const THROTTLE_RECOUNT: Duration = Duration::from_secs(1);

/// A consumer idle for longer than this is not counted as live (an engine reads at least every
/// `readBlock` while it runs, and at least once a second while throttled).
const LIVE_IDLE: Duration = Duration::from_secs(10);

impl Throttle {
    /// How many entries may be read now under `max` per second for the whole group.
    async fn allowed(&mut self, role: &AgentRole, group: &str, max: u64) -> usize {
        let now = Instant::now();
        let live = match self.counted {
            Some((at, n)) if now.duration_since(at) < THROTTLE_RECOUNT => n,
            _ => {
                let stream = role.cfg.keys.stream(&role.agent.consumes);
                let n = match role.queue.consumers(&stream, group).await {
                    Ok(cs) => cs
                        .iter()
                        .filter(|c| c.name == role.engine_id || c.idle < LIVE_IDLE)
                        .count() as u64,
                    // Unknown: assume we are alone (the fault holds for this engine at least).
                    Err(_) => 1,
                };
                let n = n.max(1);
                self.counted = Some((now, n));
                n
            }
        };
        let rate = max as f64 / live as f64;
        let cap = (rate / 10.0).max(1.0);
        match self.last {
            None => self.tokens = cap,
            Some(last) => {
                self.tokens =
                    (self.tokens + now.duration_since(last).as_secs_f64() * rate).min(cap);
            }
        }
        self.rate = rate;
        self.last = Some(now);
        self.tokens.floor() as usize
    }

    /// How long until one entry may be read (between 1 ms and 1 s).
    fn wait(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::from_secs(1);
        }
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).clamp(0.001, 1.0))
    }

    /// `n` entries were read; whether the throttle counted them.
    fn take(&mut self, n: usize) -> bool {
        if self.last.is_none() || n == 0 {
            return false;
        }
        self.tokens = (self.tokens - n as f64).max(0.0);
        true
    }
}

/// How often an engine trims what every group acknowledged from its input.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Most autoclaim calls per claim round (each scans at most ten times the
/// free slots of pending entries).
const CLAIM_CALLS: usize = 8;

/// Sleep `d` unless shutdown comes first (then true).
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

pub(crate) async fn publish_stats(
    q: Arc<dyn Queue>,
    keys: crate::queue::Keys,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = stats
            .publish(q.as_ref(), &keys, Duration::from_secs(15))
            .await
        {
            tracing::debug!(error = %e, "cannot publish stats");
        }
        if wait_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// The slots an entry holds in its engine: a delivery slot (`ctx.sem`),
/// released as soon as the agent has answered (so the next entry is read
/// while this one's completion travels, and while it backs off), and its
/// place among the entries the engine holds (`ctx.held`, at most twice the
/// concurrency), kept until the entry is done or left pending.
struct Slots {
    permit: Option<OwnedSemaphorePermit>,
    _held: OwnedSemaphorePermit,
}

/// A decoded entry that is ours to deliver.
struct Step {
    task: Task,
    /// `(compensation, the rest of the chain)` for a compensation entry.
    compensation: Option<(String, Vec<task::SagaStep>)>,
    /// The step's inbox key.
    inbox: String,
}

/// The life of one entry: [`decode`] → [`gate`] → [`deliver`] → [`settle`].
async fn handle(
    ctx: Arc<Ctx>,
    entry: StreamEntry,
    permit: OwnedSemaphorePermit,
    held: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let _in_flight = ctx.stats.in_flight();
    let mut slots = Slots {
        permit: Some(permit),
        _held: held,
    };
    let Some(step) = decode(&ctx, &entry, started).await else {
        return;
    };
    let Some(round) = gate(&ctx, &entry, &step, started).await else {
        return;
    };
    // One `r4.deliver` span per delivery, a child of the entry's context: the agent calls,
    // the outputs' context and the completion are its children.
    let span = crate::telemetry::trace::delivery_span(
        &step.task.task_id,
        &ctx.agent.name,
        if step.compensation.is_some() {
            "compensate"
        } else {
            "task"
        },
        entry.delivery_count,
    );
    crate::telemetry::trace::link(&span, step.task.traceparent.as_deref());
    deliver(&ctx, entry, step, round, &mut slots, started)
        .instrument(span)
        .await;
}

/// Decode: is the entry a task, and ours?
///
/// Invariant: an entry that is not a task (malformed, oversized, unknown
/// type, a step or compensation no agent has) is dead-lettered with its
/// reason and its raw fields — never dropped, never retried; another
/// agent's entry on a shared stream is acked for our group only. `None`
/// when the entry has been settled here.
async fn decode(ctx: &Ctx, entry: &StreamEntry, started: Instant) -> Option<Step> {
    let task = match Task::decode(&entry.fields, payload_limit(ctx)) {
        Ok(t) => t,
        Err(rej) => {
            // Keep whatever task id the raw entry carries, so the DLQ and the
            // intake's status can name the task.
            let raw_id = entry
                .field(task::TASK_ID)
                .and_then(|b| std::str::from_utf8(b).ok())
                .filter(|id| task::valid_task_id(id))
                .map(str::to_owned);
            let mut rec = record(
                ctx,
                entry,
                None,
                rej.reason.as_str(),
                &rej.to_string(),
                vec![],
                None,
                false,
            );
            rec.task_id = raw_id.unwrap_or_default();
            dead_letter(ctx, entry, rec, None, started).await;
            return None;
        }
    };
    if let Some(step) = task.step.as_deref()
        && step != ctx.agent.name
    {
        if ctx.cfg.agent(step).is_some() {
            // Another agent's entry on a shared stream: not ours to handle.
            let _ = retry_queue(ctx, || {
                ctx.queue.ack(
                    &ctx.stream,
                    &ctx.agent.name,
                    std::slice::from_ref(&entry.id),
                )
            })
            .await;
            tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "other-step", "skipped");
            ctx.stats
                .record(Outcome::Skipped, started.elapsed(), Duration::ZERO);
        } else {
            let msg = format!("unknown step {step:?}");
            let rec = record(
                ctx,
                entry,
                Some(&task),
                reason::UNKNOWN_STEP,
                &msg,
                vec![],
                None,
                false,
            );
            dead_letter(ctx, entry, rec, None, started).await;
        }
        return None;
    }
    let compensation = match &task.kind {
        Kind::Task => None,
        Kind::Compensate { compensation, rest } => {
            if ctx.agent.compensate.as_deref() != Some(compensation.as_str()) {
                let msg = format!(
                    "agent {} has no compensation {compensation:?}",
                    ctx.agent.name
                );
                let rec = record(
                    ctx,
                    entry,
                    Some(&task),
                    reason::UNKNOWN_STEP,
                    &msg,
                    vec![],
                    None,
                    false,
                );
                dead_letter(ctx, entry, rec, None, started).await;
                return None;
            }
            Some((compensation.clone(), rest.clone()))
        }
    };
    // A drill's MessageCorruption: the malformed path, but replayable — the stored entry is
    // intact (the DLQ record keeps it byte for byte), and a replayed task is never corrupted
    // again, so the replay completes it even while the fault lasts: nothing is lost to poison.
    if task.replays == 0
        && let Some(note) = ctx.faults.corrupted(&ctx.agent.consumes, &task.task_id)
    {
        ctx.stats.fault_applied();
        let rec = record(
            ctx,
            entry,
            Some(&task),
            task::Reject::Malformed.as_str(),
            &note,
            vec![],
            None,
            true,
        );
        dead_letter(ctx, entry, rec, None, started).await;
        return None;
    }
    let step_key = match &compensation {
        None => ctx.agent.name.clone(),
        Some(_) => format!("compensate:{}", ctx.agent.name),
    };
    let inbox = ctx.cfg.keys.inbox(&task.task_id, &step_key);
    Some(Step {
        task,
        compensation,
        inbox,
    })
}

/// Gate: must the entry be delivered at all?
///
/// Invariant: a redelivered entry whose step another engine finished is
/// acked only if its inbox key exists at that instant (one atomic step,
/// [`Completing::only_if_done`]); degraded mode routes or fails tasks (not
/// compensations); an entry past `maxDeliveries` is dead-lettered. Returns
/// the attempts of this round made by engines that died with the entry, or
/// `None` when the entry has been settled here.
async fn gate(
    ctx: &Ctx,
    entry: &StreamEntry,
    step: &Step,
    started: Instant,
) -> Option<Vec<Attempt>> {
    let task = &step.task;
    if entry.delivery_count > 1 {
        let probe = Completing {
            entry_id: entry.id.clone(),
            inbox_key: step.inbox.clone(),
            only_if_done: true,
            ..Completing::default()
        };
        match retry_queue(ctx, || ctx.commit.complete(probe.clone())).await {
            Ok(Completion::AlreadyDone) => {
                tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "already-done", "acked");
                ctx.stats
                    .record(Outcome::Duplicate, started.elapsed(), Duration::ZERO);
                return None;
            }
            Ok(Completion::NotPending) => return None,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(task = %task.task_id, step = %ctx.agent.name, reason = "queue", error = %e, "left pending");
                return None;
            }
        }
    }
    // Degraded mode applies to tasks, not to compensations; a down tool whose
    // fallback may answer downgrades only the tasks it could not serve, after
    // delivery (see `deliver`).
    let downgrade = ctx.downgrade.borrow().clone();
    if step.compensation.is_none()
        && let Some(d) = downgrade.filter(Downgrade::before_delivery)
    {
        match d.action {
            DegradedAction::Route | DegradedAction::Fail => {
                let why = format!("required tools down: {}", d.tools.join(", "));
                let tool = d.tools.first().cloned();
                let down = Downgraded {
                    downgrade: &d,
                    why: &why,
                    tool,
                    history: vec![],
                    attempts_key: None,
                };
                downgrade_task(ctx, entry, task, &step.inbox, down, started).await;
                return None;
            }
            // Pause: the loop stopped reading; an entry already read is delivered.
            DegradedAction::Pause => {}
        }
    }
    let attempts_key = ctx.cfg.keys.attempts(&ctx.agent.name, &entry.id);
    let round: Vec<Attempt> = if entry.delivery_count > 1 {
        match ctx.queue.get(&attempts_key).await {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_default(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    if entry.delivery_count > ctx.policy().max_deliveries {
        let msg = round.last().map(|a| a.error.clone()).unwrap_or_else(|| {
            format!(
                "delivered {} times without completing (engine crashes?)",
                entry.delivery_count - 1
            )
        });
        let tool = round.last().and_then(|a| a.tool.clone());
        let mut history = task.history.clone();
        history.extend(round);
        let rec = record(
            ctx,
            entry,
            Some(task),
            reason::MAX_DELIVERIES,
            &msg,
            history,
            tool,
            true,
        );
        dead_letter(ctx, entry, rec, Some(&attempts_key), started).await;
        return None;
    }
    Some(round)
}

/// A task degraded mode takes over, and why.
struct Downgraded<'a> {
    downgrade: &'a Downgrade,
    /// The error of the DLQ record (`Fail`).
    why: &'a str,
    /// The down tool the task needed.
    tool: Option<String>,
    /// Attempts made before (for the DLQ record).
    history: Vec<Attempt>,
    /// The round's attempt history, removed once the task is settled.
    attempts_key: Option<&'a str>,
}

/// Downgrade a task (`Route` or `Fail`): route it to `to` — its outputs,
/// the ack and its inbox key in one atomic step through [`complete`],
/// counted [`Outcome::Routed`] — or dead-letter it with reason `degraded`
/// (replayable: the repair role replays it once the tool is back).
async fn downgrade_task(
    ctx: &Ctx,
    entry: &StreamEntry,
    task: &Task,
    inbox: &str,
    down: Downgraded<'_>,
    started: Instant,
) {
    let d = down.downgrade;
    if d.action == DegradedAction::Fail {
        let rec = record(
            ctx,
            entry,
            Some(task),
            reason::DEGRADED,
            down.why,
            down.history,
            down.tool,
            true,
        );
        dead_letter(ctx, entry, rec, down.attempts_key, started).await;
        return;
    }
    let to = d.to.clone().unwrap_or_default();
    let mut routed = task.clone();
    routed.step = None;
    routed.traceparent = Some(crate::telemetry::trace::current_traceparent(
        task.traceparent.as_deref(),
    ));
    let out = vec![(ctx.cfg.keys.stream(&to), routed.encode())];
    let Some(c) = complete(ctx, entry, inbox, out, vec![], vec![]).await else {
        return;
    };
    let o = match c {
        Completion::AlreadyDone => Outcome::Duplicate,
        Completion::Published { .. } => {
            tracing::info!(task = %task.task_id, step = %ctx.agent.name, reason = "degraded-route", to = %to, tool = ?down.tool, error = %down.why, "routed");
            Outcome::Routed
        }
        Completion::Full { stream } => {
            tracing::warn!(task = %task.task_id, step = %ctx.agent.name, reason = "route-target-full", stream = %stream, "left pending: the degraded-mode route is at queue.maxLen");
            return;
        }
        _ => return,
    };
    if let Some(k) = down.attempts_key {
        let _ = ctx.queue.del(&[k.to_owned()]).await;
    }
    ctx.stats.record(o, started.elapsed(), Duration::ZERO);
}

/// The downgrade that takes over a failed delivery: a retryable failure of
/// a task (not a compensation) attributed to a tool that is down now, in
/// the agent's `whenToolsDown` — its fallback could not answer the call.
fn downgraded_failure(ctx: &Ctx, err: &DeliveryError, compensating: bool) -> Option<Downgrade> {
    if err.permanent || compensating {
        return None;
    }
    let tool = err.tool.as_deref()?;
    ctx.downgrade.borrow().clone().filter(|d| d.covers(tool))
}

/// `Pause` after delivery: hold `entry` (idle time refreshed, no delivery
/// counted) while `tool` stays down. `false` on shutdown or when the entry
/// is no longer ours.
async fn wait_while_down(ctx: &Ctx, entry: &StreamEntry, tool: &str) -> bool {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        if !keep(ctx, entry).await {
            return false;
        }
        if wait_or_shutdown(&mut shutdown, hold_step(ctx).min(AGENT_PROBE_MAX)).await {
            return false;
        }
        if ctx
            .downgrade
            .borrow()
            .as_ref()
            .is_none_or(|d| !d.covers(tool))
        {
            return true;
        }
    }
}

/// Deliver: attempt after attempt until the agent answers, the failure is
/// permanent or the deliveries are spent.
///
/// Invariants: the agent being unreachable (its container restarting) is
/// not the task's failure — the engine marks its agent down (reads pause,
/// `/readyz` fails), keeps the entry (its idle time refreshed, no delivery
/// counted) and delivers again once the agent answers. A retryable failure
/// keeps the entry pending with us while it backs off (its `held` slot
/// kept, its delivery slot released) and re-claims it by id, which counts
/// the delivery in Redis, so `maxDeliveries` holds across crashes. One
/// delivery or one backoff never exceeds half the visibility timeout.
async fn deliver(
    ctx: &Ctx,
    mut entry: StreamEntry,
    step: Step,
    mut round: Vec<Attempt>,
    slots: &mut Slots,
    started: Instant,
) {
    let Step {
        mut task,
        compensation,
        inbox,
    } = step;
    let policy = &*ctx.policy();
    let hold = ctx.cfg.max_hold();
    let attempts_key = ctx.cfg.keys.attempts(&ctx.agent.name, &entry.id);
    let history_of = |task: &Task, round: &[Attempt]| {
        let mut h = task.history.clone();
        h.extend_from_slice(round);
        h
    };
    let mut agent_time = Duration::ZERO;
    let mut prev_delay = policy.backoff.initial;
    let traceparent = crate::telemetry::trace::current_traceparent(task.traceparent.as_deref());
    // Built once for every attempt of this round; the payload moves into it
    // (no copy per task) and a pass-through output takes it from there.
    let mut req = DeliveryRequest {
        task_id: task.task_id.clone(),
        step: ctx.agent.name.clone(),
        kind: if compensation.is_some() {
            RequestKind::Compensate
        } else {
            RequestKind::Task
        },
        compensation: compensation.as_ref().map(|(c, _)| c.clone()),
        payload: std::mem::take(&mut task.payload),
        attempt: entry.delivery_count,
        idempotency_key: match &compensation {
            None => format!("{}:{}", task.task_id, ctx.agent.name),
            Some(_) => format!("{}:compensate:{}", task.task_id, ctx.agent.name),
        },
        traceparent,
        deadline: policy.per_attempt.min(hold),
    };
    loop {
        req.attempt = entry.delivery_count;
        let t = Instant::now();
        let res = match shadow::primary(ctx, &entry.id, &mut req).await {
            shadow::Primary::Answer(res) => res,
            // Completed by the shadow (its completion acked the entry).
            shadow::Primary::ShadowWon => return,
        };
        agent_time += t.elapsed();
        if !matches!(&res, Err(e) if e.unreachable) {
            ctx.stats.delivered();
        }
        // The failure, and the DLQ reason should it be permanent.
        let (err, permanent_reason) = match res {
            Ok(outputs) => {
                agent_answers(ctx);
                drop(slots.permit.take());
                let out = build_outputs(
                    ctx,
                    &task,
                    &req.payload,
                    outputs,
                    compensation.as_ref().map(|(_, r)| r.as_slice()),
                    &req.traceparent,
                );
                match settle(ctx, &entry, &task, &inbox, out, &compensation).await {
                    Settled::Done(o) => {
                        if !round.is_empty() {
                            let _ = ctx.queue.del(std::slice::from_ref(&attempts_key)).await;
                        }
                        if let Some(o) = o {
                            ctx.stats.record(o, started.elapsed(), agent_time);
                        }
                        return;
                    }
                    Settled::Oversized(msg) => {
                        (DeliveryError::permanent(msg), reason::OVERSIZED_OUTPUT)
                    }
                }
            }
            Err(e) if e.unreachable => {
                if !wait_for_agent(ctx, &entry, &req, &e).await {
                    return; // shutdown or lost the entry: left pending
                }
                continue;
            }
            Err(e) => {
                agent_answers(ctx);
                // Fallback first: the task was delivered although a tool it needs
                // is down, and the fallback could not answer its call.
                if let Some(d) = downgraded_failure(ctx, &e, compensation.is_some()) {
                    let tool = e.tool.clone().unwrap_or_default();
                    if d.action == DegradedAction::Pause {
                        drop(slots.permit.take());
                        tracing::info!(task = %task.task_id, step = %ctx.agent.name, reason = "degraded-pause", tool = %tool, "held until the tool is back");
                        if !wait_while_down(ctx, &entry, &tool).await {
                            return; // left pending
                        }
                        slots.permit = match ctx.sem.clone().acquire_owned().await {
                            Ok(p) => Some(p),
                            Err(_) => return,
                        };
                        continue;
                    }
                    drop(slots.permit.take());
                    let mut whole = task.clone();
                    whole.payload = req.payload.clone();
                    let why = format!("tool {tool} down and its fallback could not answer: {e}");
                    let mut history = history_of(&task, &round);
                    history.push(Attempt {
                        attempt: entry.delivery_count,
                        round: task.replays,
                        at_ms: task::now_ms(),
                        engine: ctx.engine_id.clone(),
                        error: e.message.clone(),
                        kind: "degraded".into(),
                        tool: e.tool.clone(),
                    });
                    let down = Downgraded {
                        downgrade: &d,
                        why: &why,
                        tool: e.tool.clone(),
                        history,
                        attempts_key: (!round.is_empty()).then_some(attempts_key.as_str()),
                    };
                    downgrade_task(ctx, &entry, &whole, &inbox, down, started).await;
                    return;
                }
                (e, reason::PERMANENT)
            }
        };
        let last = err.permanent || entry.delivery_count >= policy.max_deliveries;
        ctx.stats.failed_attempt(!last);
        round.push(Attempt {
            attempt: entry.delivery_count,
            round: task.replays,
            at_ms: task::now_ms(),
            engine: ctx.engine_id.clone(),
            error: err.message.clone(),
            kind: if err.permanent {
                "permanent"
            } else {
                "retryable"
            }
            .into(),
            tool: err.tool.clone(),
        });
        if last {
            let why = if err.permanent {
                permanent_reason
            } else {
                reason::MAX_DELIVERIES
            };
            let rec = record(
                ctx,
                &entry,
                Some(&task),
                why,
                &err.to_string(),
                history_of(&task, &round),
                err.tool.clone(),
                !err.permanent,
            );
            dead_letter(ctx, &entry, rec, Some(&attempts_key), started).await;
            return;
        }
        // Keep the history where a successor can find it, then back off
        // keeping our place among the held entries.
        let _ = ctx
            .queue
            .set(
                &attempts_key,
                Bytes::from(task::json_bytes(&round)),
                Some(policy.idempotency_ttl),
            )
            .await;
        drop(slots.permit.take());
        let retry_n = u32::try_from(round.len()).unwrap_or(u32::MAX);
        let delay = crate::resilience::retry::backoff_delay(
            &policy.backoff,
            retry_n,
            prev_delay,
            ctx.jitter_draw(),
        )
        .min(hold);
        prev_delay = delay;
        tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "retry", attempt = entry.delivery_count, error = %err, delay_ms = delay.as_millis() as u64, "retrying");
        let mut shutdown = ctx.shutdown.clone();
        if wait_or_shutdown(&mut shutdown, delay).await {
            return; // left pending: checkpointed for redelivery
        }
        slots.permit = match ctx.sem.clone().acquire_owned().await {
            Ok(p) => Some(p),
            Err(_) => return,
        };
        match ctx
            .queue
            .claim(
                &ctx.stream,
                &ctx.agent.name,
                &ctx.engine_id,
                std::slice::from_ref(&entry.id),
            )
            .await
        {
            Ok(mut c) if !c.is_empty() => entry.delivery_count = c.remove(0).delivery_count,
            // Acked or taken over meanwhile: not ours any more.
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(task = %task.task_id, step = %ctx.agent.name, reason = "queue", error = %e, "cannot re-claim for retry; left pending");
                return;
            }
        }
        if entry.delivery_count > policy.max_deliveries {
            let rec = record(
                ctx,
                &entry,
                Some(&task),
                reason::MAX_DELIVERIES,
                &err.to_string(),
                history_of(&task, &round),
                err.tool.clone(),
                true,
            );
            dead_letter(ctx, &entry, rec, Some(&attempts_key), started).await;
            return;
        }
    }
}

/// The agent answered (anything at all): it is up.
fn agent_answers(ctx: &Ctx) {
    if ctx.stats.agent_down() && ctx.stats.set_agent_down(false) {
        tracing::info!(agent = %ctx.agent.name, "agent answers again; reading resumes");
    }
}

/// The agent could not be reached: mark it down (reads pause, `/readyz`
/// fails) and wait, keeping the entry (idle time refreshed, no delivery
/// counted), until it is worth trying again. `false` on shutdown or when
/// the entry is no longer ours.
async fn wait_for_agent(
    ctx: &Ctx,
    entry: &StreamEntry,
    req: &DeliveryRequest,
    err: &DeliveryError,
) -> bool {
    if ctx.stats.set_agent_down(true) {
        tracing::warn!(agent = %ctx.agent.name, task = %req.task_id, error = %err, "agent unreachable; reads paused until it answers");
    }
    let mut shutdown = ctx.shutdown.clone();
    let cap = hold_step(ctx).min(AGENT_PROBE_MAX);
    let mut wait = AGENT_PROBE_MIN.min(cap);
    let mut waited = Duration::ZERO;
    loop {
        if !keep(ctx, entry).await {
            return false;
        }
        if wait_or_shutdown(&mut shutdown, wait).await {
            return false;
        }
        waited += wait;
        // Another entry's delivery found it up meanwhile, or it is time to
        // probe again ourselves.
        if !ctx.stats.agent_down() || waited >= AGENT_PROBE_MAX {
            return true;
        }
        wait = (wait * 2).min(cap);
    }
}

/// The longest wait between two refreshes of an entry we hold while
/// waiting: a quarter of the hold limit, so the entry never looks idle to
/// a claimer (ourselves included) however loaded the machine is.
fn hold_step(ctx: &Ctx) -> Duration {
    (ctx.cfg.max_hold() / 4).max(Duration::from_millis(10))
}

/// Keep holding `entry` while we wait (for our agent, for room downstream):
/// its idle time is reset without counting a delivery, so no peer claims
/// it. `false` once it is no longer ours; a failed call says nothing and
/// counts as still ours (the next one decides).
async fn keep(ctx: &Ctx, entry: &StreamEntry) -> bool {
    !matches!(
        ctx.queue
            .touch(
                &ctx.stream,
                &ctx.agent.name,
                &ctx.engine_id,
                std::slice::from_ref(&entry.id),
            )
            .await,
        Ok(ours) if ours.is_empty()
    )
}

/// Aborts a helper task when the role's future is dropped (a killed engine).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shortest and longest wait between deliveries to an unreachable agent.
const AGENT_PROBE_MIN: Duration = Duration::from_millis(100);
const AGENT_PROBE_MAX: Duration = Duration::from_secs(1);

/// How a successful delivery ended.
enum Settled {
    /// Settled (with the outcome to count, if any).
    Done(Option<Outcome>),
    /// An output is larger than the payload limit: the step fails for good
    /// (DLQ reason `oversized`), with this message.
    Oversized(String),
}

/// Settle: the agent answered; complete the step atomically.
///
/// Invariants: an output larger than the payload limit (the limit of every
/// hop) fails the step for good (reason `oversized`), nothing is published;
/// the outputs, the ack and the inbox key are one atomic step (through the
/// group commit); while an output stream is at its backlog limit nothing is
/// written and we hold the entry and the agent's answer (idle time
/// refreshed, no delivery counted) until there is room — backpressure: the
/// engine's held slots fill, it stops reading, and its own input fills up
/// in turn, back to the intake's 429. On shutdown the entry is left pending.
async fn settle(
    ctx: &Ctx,
    entry: &StreamEntry,
    task: &Task,
    inbox: &str,
    out: Out,
    compensation: &Option<(String, Vec<task::SagaStep>)>,
) -> Settled {
    let limit = ctx.cfg.max_payload_bytes;
    if let Some(n) = out
        .outputs
        .iter()
        .filter_map(|(_, f)| f.iter().find(|(k, _)| k == task::PAYLOAD))
        .map(|(_, v)| v.len())
        .chain(out.joins.iter().map(|j| j.value.len()))
        .find(|n| *n > limit)
    {
        return Settled::Oversized(format!(
            "output larger than intake.maxPayloadBytes: {n} > {limit} bytes"
        ));
    }
    // A compensable step's saga-log record expires with its inbox key:
    // after that the step is new work anyway.
    let expire = match (&ctx.agent.compensate, compensation) {
        (Some(_), None) => vec![ctx.cfg.keys.saga(&task.task_id)],
        _ => Vec::new(),
    };
    let cap = hold_step(ctx).min(Duration::from_secs(1));
    let mut wait = Duration::from_millis(50).min(cap);
    let mut waiting = false;
    loop {
        let Some(c) = complete(
            ctx,
            entry,
            inbox,
            out.outputs.clone(),
            expire.clone(),
            out.joins.clone(),
        )
        .await
        else {
            return Settled::Done(None);
        };
        match c {
            Completion::Published { .. } => {
                if compensation.is_some() {
                    ctx.stats.compensated();
                }
                tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "completed", "completed");
                return Settled::Done(Some(Outcome::Completed));
            }
            Completion::AlreadyDone => {
                tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "already-done", "acked");
                return Settled::Done(Some(Outcome::Duplicate));
            }
            Completion::NotPending | Completion::NotDone => {
                tracing::info!(task = %task.task_id, step = %ctx.agent.name, reason = "not-ours", "completion dropped: the entry was settled elsewhere");
                return Settled::Done(None);
            }
            Completion::Full { stream } => {
                if !waiting {
                    waiting = true;
                    ctx.stats.backpressure();
                    tracing::info!(task = %task.task_id, step = %ctx.agent.name, reason = "backpressure", stream = %stream, "output stream at queue.maxLen; holding the answer until there is room");
                }
                if !keep(ctx, entry).await {
                    return Settled::Done(None); // settled elsewhere
                }
                let mut shutdown = ctx.shutdown.clone();
                if wait_or_shutdown(&mut shutdown, wait).await {
                    return Settled::Done(None); // left pending
                }
                wait = (wait * 2).min(cap);
            }
        }
    }
}

/// What a successful step writes: entries, and parts of joins.
struct Out {
    outputs: Vec<(String, Fields)>,
    joins: Vec<JoinPart>,
}

/// The output entries of a successful step: one per produced stream (a
/// part of a join for a joined stream), the saga-log record of a
/// compensable step, or the next compensation.
fn build_outputs(
    ctx: &Ctx,
    task: &Task,
    input: &serde_json::Value,
    outputs: Outputs,
    compensation_rest: Option<&[task::SagaStep]>,
    traceparent: &str,
) -> Out {
    let mut out = Out {
        outputs: Vec::new(),
        joins: Vec::new(),
    };
    if let Some(rest) = compensation_rest {
        if let Some(next) = saga::compensation_entry(
            &ctx.cfg,
            &task.task_id,
            rest,
            "compensating",
            Some(traceparent),
        ) {
            out.outputs.push(next);
        }
        return out;
    }
    for p in &ctx.agent.produces {
        let payload = match &outputs {
            Outputs::All(v) => v.clone(),
            Outputs::PassThrough => input.clone(),
            Outputs::PerStream(m) => match m.get(p) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        let mut next = Task::new(task.task_id.clone(), serde_json::Value::Null);
        next.traceparent = Some(traceparent.to_owned());
        next.submitted_ms = task.submitted_ms;
        if let Some(joiner) = ctx.cfg.joiner_of(p)
            && let Some(join) = &joiner.join
        {
            out.joins.push(JoinPart {
                join: join_ref(&ctx.cfg, joiner, join, &task.task_id),
                part: p.clone(),
                value: Bytes::from(task::json_bytes(&payload)),
                parts: join.streams.clone(),
                target: ctx.cfg.keys.stream(&joiner.consumes),
                fields: next.encode(),
                payload_field: task::PAYLOAD.into(),
                deadline_ms: task::now_ms()
                    .saturating_add(u64::try_from(join.timeout.as_millis()).unwrap_or(u64::MAX)),
            });
            continue;
        }
        next.payload = payload;
        out.outputs.push((ctx.cfg.keys.stream(p), next.encode()));
    }
    if let Some(c) = &ctx.agent.compensate {
        out.outputs.push(saga::log_output(
            &ctx.cfg,
            &task.task_id,
            &ctx.agent.name,
            c,
        ));
    }
    out
}

/// `task_id`'s join at the joining agent `joiner`.
fn join_ref(cfg: &WorkflowConfig, joiner: &Agent, join: &Join, task_id: &str) -> JoinRef {
    JoinRef::new(&cfg.keys, &joiner.name, task_id, cfg.join_ttl(join))
}

/// The joins downstream of `agent`, as a DLQ record names them.
fn failed_joins(cfg: &WorkflowConfig, agent: &str) -> Vec<FailedJoin> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    cfg.joins_downstream(agent)
        .into_iter()
        .filter_map(|j| {
            let join = j.join.as_ref()?;
            Some(FailedJoin {
                agent: j.name.clone(),
                timeout_ms: ms(join.timeout),
                ttl_ms: ms(cfg.join_ttl(join)),
            })
        })
        .collect()
}

/// The largest task payload this agent accepts: the limit of every hop,
/// times the number of parts for a joined task (each part is within the
/// limit; their join is their sum).
fn payload_limit(ctx: &Ctx) -> usize {
    let limit = ctx.cfg.max_payload_bytes;
    match &ctx.agent.join {
        Some(j) => limit
            .saturating_mul(j.streams.len())
            .saturating_add(64 * j.streams.len() + 2),
        None => limit,
    }
}

/// Retry a queue call for up to half the visibility timeout (Redis may be
/// restarting); after that the entry is left pending for redelivery.
async fn retry_queue<T, F, Fut>(ctx: &Ctx, mut op: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let give_up = Instant::now() + ctx.cfg.max_hold();
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e @ (QueueError::Invalid(_) | QueueError::WrongType(_))) => return Err(e),
            Err(e) if Instant::now() + wait >= give_up => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "queue call failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Complete `entry` through the group commit; `expire` are outputs that
/// live as long as the inbox key (the task's saga log). `None` when the
/// queue could not be reached (the entry is left pending, logged).
async fn complete(
    ctx: &Ctx,
    entry: &StreamEntry,
    inbox: &str,
    outputs: Vec<(String, Fields)>,
    expire: Vec<String>,
    joins: Vec<JoinPart>,
) -> Option<Completion> {
    let res = retry_queue(ctx, || {
        ctx.commit.complete(Completing {
            entry_id: entry.id.clone(),
            inbox_key: inbox.to_owned(),
            outputs: outputs.clone(),
            expire: expire.clone(),
            only_if_done: false,
            joins: joins.clone(),
        })
    })
    .await;
    match res {
        Ok(c) => Some(c),
        // Left pending: another engine redelivers after the visibility
        // timeout; the agent dedupes by key.
        Err(e) => {
            tracing::error!(entry = %entry.id, step = %ctx.agent.name, reason = "queue", error = %e, "cannot complete; left pending");
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &Ctx,
    entry: &StreamEntry,
    task: Option<&Task>,
    why: &str,
    error: &str,
    history: Vec<Attempt>,
    tool: Option<String>,
    replayable: bool,
) -> DlqRecord {
    DlqRecord {
        id: String::new(),
        reason: why.to_owned(),
        error: error.to_owned(),
        task_id: task.map(|t| t.task_id.clone()).unwrap_or_default(),
        step: ctx.agent.name.clone(),
        source: ctx.agent.consumes.clone(),
        entry_id: entry.id.clone(),
        deliveries: entry.delivery_count,
        replays: task.map_or(0, |t| t.replays),
        replayable,
        tool,
        dead_at_ms: task::now_ms(),
        engine: ctx.engine_id.clone(),
        history,
        joins: Vec::new(),
        original: entry.fields.clone(),
    }
}

/// Dead-letter an entry: ONE atomic step ([`Queue::dead_letter`]) that,
/// only if the entry is still pending for this engine, writes the DLQ
/// record, the task's DLQ marker, its replay schedule (a replayable record
/// with automatic replay) and — for a task that failed for a reason replay
/// cannot fix — its first saga compensation, and acks the entry. So a task
/// is either completed or dead-lettered, never both, and compensations
/// start exactly when it is dead-lettered.
async fn dead_letter(
    ctx: &Ctx,
    entry: &StreamEntry,
    rec: DlqRecord,
    attempts_key: Option<&str>,
    started: Instant,
) {
    let valid_id = task::valid_task_id(&rec.task_id);
    let compensation = if !rec.replayable && valid_id && rec.reason != reason::UNKNOWN_STEP {
        let tp = entry
            .field(task::TRACEPARENT)
            .and_then(|b| std::str::from_utf8(b).ok());
        match saga::first_compensation(ctx.queue.as_ref(), &ctx.cfg, &rec.task_id, &rec.reason, tp)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(task = %rec.task_id, step = %rec.step, reason = %rec.reason, error = %e, "cannot read the saga log; entry left pending");
                return;
            }
        }
    } else {
        None
    };
    let policy = &*ctx.policy();
    // The joins downstream of this step can no longer complete: failed in
    // the same step (a replay of this record reopens them).
    let mut rec = rec;
    if valid_id {
        rec.joins = failed_joins(&ctx.cfg, &ctx.agent.name);
    }
    let fail_joins = rec
        .joins
        .iter()
        .map(|j| {
            (
                j.join_ref(&ctx.cfg.keys, &rec.task_id),
                ctx.agent.name.clone(),
            )
        })
        .collect();
    let d = DeadLetter {
        entry_id: entry.id.clone(),
        dlq: ctx.cfg.keys.dlq(),
        record: rec.encode(),
        fail_joins,
        also: compensation.into_iter().collect(),
        marker: valid_id.then(|| {
            (
                ctx.cfg.keys.task_dlq(&rec.task_id),
                Bytes::from(rec.reason.clone()),
            )
        }),
        marker_ttl: policy.idempotency_ttl,
        schedule: (rec.replayable && policy.replay.automatic).then(|| {
            (
                ctx.cfg.keys.dlq_due(),
                super::dlq::due_at(policy.replay.backoff, rec.dead_at_ms, rec.replays),
            )
        }),
    };
    match retry_queue(ctx, || {
        ctx.queue
            .dead_letter(&ctx.stream, &ctx.agent.name, d.clone())
    })
    .await
    {
        Ok(Some(_)) => {
            tracing::warn!(task = %rec.task_id, step = %rec.step, reason = %rec.reason, error = %rec.error, entry = %entry.id, deliveries = entry.delivery_count, "dead-lettered");
            ctx.stats
                .record(Outcome::DeadLettered, started.elapsed(), Duration::ZERO);
            if let Some(k) = attempts_key {
                let _ = ctx.queue.del(&[k.to_owned()]).await;
            }
        }
        Ok(None) => {
            tracing::info!(task = %rec.task_id, step = %rec.step, reason = "not-ours", "dead-lettering dropped: the entry was settled elsewhere");
        }
        Err(e) => {
            tracing::error!(task = %rec.task_id, step = %rec.step, reason = %rec.reason, error = %e, "cannot dead-letter; entry left pending")
        }
    }
}

/// A DLQ record of this step that no delivered entry carries (a join that
/// timed out, an entry gone from its stream): not replayable, no history.
fn step_record(ctx: &Ctx, why: &str, error: String) -> DlqRecord {
    DlqRecord {
        id: String::new(),
        reason: why.to_owned(),
        error,
        task_id: String::new(),
        step: ctx.agent.name.clone(),
        source: ctx.agent.consumes.clone(),
        entry_id: String::new(),
        deliveries: 0,
        replays: 0,
        replayable: false,
        tool: None,
        dead_at_ms: task::now_ms(),
        engine: ctx.engine_id.clone(),
        history: Vec::new(),
        joins: Vec::new(),
        original: Vec::new(),
    }
}

/// Dead-letter entries a claim found gone from the stream (only their ids
/// are known): they were accepted, so they are accounted for, never
/// silently dropped. The claim already removed them from the pending list,
/// and exactly one claimer is told of each.
async fn dead_letter_trimmed(ctx: &Ctx, ids: &[String]) {
    for id in ids {
        let mut rec = step_record(
            ctx,
            reason::TRIMMED,
            format!("entry {id} was pending but is gone from its stream"),
        );
        rec.entry_id = id.clone();
        let dlq = ctx.cfg.keys.dlq();
        match retry_queue(ctx, || ctx.queue.add(&dlq, rec.encode(), None)).await {
            Ok(_) => {
                tracing::error!(entry = %id, step = %ctx.agent.name, reason = reason::TRIMMED, "dead-lettered")
            }
            Err(e) => {
                tracing::error!(entry = %id, step = %ctx.agent.name, reason = reason::TRIMMED, error = %e, "a trimmed entry could not be recorded")
            }
        }
    }
}
