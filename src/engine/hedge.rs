//! Agent-level hedging (the seed's "shadow agent"): the *decision* half.
//!
//! A delivery to an agent that has not answered after a delay (a percentile of this
//! engine's recent delivery latencies to that agent, in a [`RotatingHistogram`] as for tool
//! hedging, or a fixed delay) is also handed to ANOTHER engine of the same agent — another
//! replica, so another agent container — which delivers the same task with the same
//! `Idempotency-Key` to its own agent. The first answer completes the step through the normal
//! atomic completion; the other finds the inbox key (or the entry acked) and is dropped.
//!
//! This module owns when to hedge and whom to ask: [`AgentHedge`] keeps the latency
//! histogram, the extra-load cap (a conservative [`SlidingCounter`]: hedges ≤ `maxExtraLoad`
//! × deliveries at every instant), the agent's overload guard (hedging pauses while most
//! recent deliveries fail — the agent's own breaker view — or while the role is paused by a
//! kill switch, degraded mode or its agent being down), the peers that may shadow
//! (engines that said within [`PRESENCE_FRESH`] that they take hedges, in the agent's peers
//! hash, [`crate::queue::Keys::hedge_peers`]; cached briefly), the waiters for notes from
//! peers and the notes' wire format. The delivery and completion of the shadow's copy are the
//! agent role's (`consumer::shadow`), so a shadow delivery goes through the same faults,
//! kill switches and completion as a primary one.
//!
//! # Why correctness does not depend on the notes
//! Notes (a hedge request, "done") travel on Redis pub/sub
//! (`r4:{ns/wf}:hedge:<agent>:<engine>`, [`crate::queue::Keys::hedge_channel`]) and may be
//! lost. A lost request is a hedge not made (the primary delivery goes on); a lost "done" is a
//! loser that works to the end and then finds its completion refused by the queue (the
//! completion is group-wide, one atomic step, arbitrated by XACK and the inbox key). So an
//! entry is completed once, whatever happens to the notes or to either engine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::workflow::AgentHedgeSpec;
use crate::resilience::config::HedgeDelay;
use crate::resilience::hedge::RotatingHistogram;
use crate::resilience::lock;
use crate::resilience::window::SlidingCounter;

use super::EngineError;

/// Default `maxExtraLoad`.
pub const DEFAULT_MAX_EXTRA_LOAD: f64 = 0.05;
/// Default `minSamples`.
pub const DEFAULT_MIN_SAMPLES: u64 = 100;
/// Rotation period of the histogram and window of the load cap and the overload guard.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Hedging pauses while at least this share of the deliveries in the window failed…
pub const OVERLOAD_FAILURE_RATE: f64 = 0.5;
/// …out of at least this many.
pub const OVERLOAD_MIN_CALLS: u64 = 20;
/// How long the list of peers is trusted before it is read again.
pub const PEERS_TTL: Duration = Duration::from_secs(1);
/// How often an engine that takes hedges says so (in the agent's peers hash)…
pub const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// …and for how long after its last word it counts as a peer.
pub const PRESENCE_FRESH: Duration = Duration::from_secs(3);
/// A peer silent for this long is removed from the hash (an engine that died).
pub const PRESENCE_FORGET: Duration = Duration::from_secs(60);

/// An agent's `hedge`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentHedgeConfig {
    pub delay: HedgeDelay,
    pub max_extra_load: f64,
    pub min_samples: u64,
}

impl AgentHedgeConfig {
    /// Resolve `spec` (of agent `agent`, for error messages).
    pub fn from_spec(agent: &str, spec: &AgentHedgeSpec) -> Result<Self, EngineError> {
        let delay = match (&spec.delay.percentile, &spec.delay.fixed) {
            (Some(p), None) => HedgeDelay::Percentile(*p),
            (None, Some(f)) => HedgeDelay::Fixed(f.parse().map_err(|e| {
                EngineError::Config(format!("agents.{agent}.hedge.delay.fixed: {e}"))
            })?),
            _ => {
                return Err(EngineError::Config(format!(
                    "agents.{agent}.hedge.delay: exactly one of percentile and fixed must be set"
                )));
            }
        };
        Ok(Self {
            delay,
            max_extra_load: spec.max_extra_load.unwrap_or(DEFAULT_MAX_EXTRA_LOAD),
            min_samples: spec
                .min_samples
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(DEFAULT_MIN_SAMPLES)
                .max(1),
        })
    }
}

/// Why a delivery was not hedged once its delay passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The role is paused (kill switch, degraded mode Pause) or its agent is down.
    Paused,
    /// Most recent deliveries failed: hedging would add load to an overloaded agent.
    Overloaded,
    /// `maxExtraLoad` reached.
    Capped,
}

struct State {
    histogram: RotatingHistogram,
    /// deposits = deliveries, withdrawals = hedges.
    load: SlidingCounter,
    /// deposits = answered deliveries, withdrawals = failed ones.
    failures: SlidingCounter,
    peers: Vec<String>,
    peers_read: Option<Instant>,
    next_peer: usize,
}

/// One engine's agent hedging: decisions, peers and waiters.
pub struct AgentHedge {
    cfg: AgentHedgeConfig,
    state: Mutex<State>,
    paused: AtomicBool,
    /// Deliveries waiting for a "done" note, by entry id.
    waiters: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Hedges this engine sent (as primary).
    pub sent: AtomicU64,
    /// Shadow deliveries this engine made for peers.
    pub shadow_deliveries: AtomicU64,
    /// Shadow deliveries that completed the step (the shadow won).
    pub shadow_wins: AtomicU64,
}

impl AgentHedge {
    pub fn new(cfg: AgentHedgeConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State {
                histogram: RotatingHistogram::new(WINDOW),
                load: SlidingCounter::new(WINDOW),
                failures: SlidingCounter::new(WINDOW),
                peers: Vec::new(),
                peers_read: None,
                next_peer: 0,
            }),
            paused: AtomicBool::new(false),
            waiters: Mutex::default(),
            sent: AtomicU64::new(0),
            shadow_deliveries: AtomicU64::new(0),
            shadow_wins: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &AgentHedgeConfig {
        &self.cfg
    }

    /// A primary delivery starts: it counts toward the cap's base.
    pub fn deposit(&self) {
        lock(&self.state).load.deposit();
    }

    /// A delivery answered after `latency` (`ok`: successfully). Cancelled deliveries record
    /// nothing, as in tool hedging.
    pub fn record(&self, latency: Duration, ok: bool) {
        let mut st = lock(&self.state);
        st.histogram.record(latency);
        st.failures.deposit();
        if !ok {
            st.failures.withdraw();
        }
    }

    /// How long a delivery waits before it is hedged: `None` while a percentile delay has too
    /// few samples.
    pub fn delay(&self) -> Option<Duration> {
        match self.cfg.delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Percentile(p) => lock(&self.state)
                .histogram
                .quantile(p / 100.0, self.cfg.min_samples),
        }
    }

    /// Set by the role's loop: paused by a kill switch or degraded mode, or its agent down.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The delay passed: may this delivery be hedged now? Takes a hedge from the cap when it
    /// may (one no peer takes still counts: the cap errs on the safe side).
    pub fn decide(&self) -> Result<(), Refusal> {
        if self.paused() {
            return Err(Refusal::Paused);
        }
        let mut st = lock(&self.state);
        let (answered, failed) = st.failures.counts();
        if answered >= OVERLOAD_MIN_CALLS
            && failed as f64 >= OVERLOAD_FAILURE_RATE * answered as f64
        {
            return Err(Refusal::Overloaded);
        }
        if !st.load.try_withdraw(self.cfg.max_extra_load, 0.0) {
            return Err(Refusal::Capped);
        }
        Ok(())
    }

    /// The peers to ask, in turn (round robin), if the list is fresh; `None` when it must be
    /// read again ([`AgentHedge::set_peers`]).
    pub fn peers(&self) -> Option<Vec<String>> {
        let mut st = lock(&self.state);
        if st.peers_read.is_none_or(|t| t.elapsed() >= PEERS_TTL) {
            return None;
        }
        Some(rotate(&mut st))
    }

    /// The live peers just read (this engine excluded); returns them in turn.
    pub fn set_peers(&self, peers: Vec<String>) -> Vec<String> {
        let mut st = lock(&self.state);
        st.peers = peers;
        st.peers_read = Some(Instant::now());
        rotate(&mut st)
    }

    /// Wait for a "done" note on `entry_id` (register BEFORE the note can be sent).
    pub fn wait_done(&self, entry_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(entry_id.to_owned(), tx);
        rx
    }

    /// No longer waiting on `entry_id`.
    pub fn forget(&self, entry_id: &str) {
        lock(&self.waiters).remove(entry_id);
    }

    /// A "done" note arrived for `entry_id`: wake its waiter, if any.
    pub fn done(&self, entry_id: &str) {
        if let Some(tx) = lock(&self.waiters).remove(entry_id) {
            let _ = tx.send(());
        }
    }
}

/// Which fields of the peers hash (engine id → last word, ms) are live peers of `me` at
/// `now_ms`, sorted, and which are stale enough to remove.
pub fn live_peers(
    fields: &[(String, bytes::Bytes)],
    me: &str,
    now_ms: u64,
) -> (Vec<String>, Vec<String>) {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (mut live, mut stale) = (Vec::new(), Vec::new());
    for (engine, v) in fields {
        let at = std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let age = now_ms.saturating_sub(at);
        if age >= ms(PRESENCE_FORGET) {
            stale.push(engine.clone());
        } else if engine != me && age < ms(PRESENCE_FRESH) {
            live.push(engine.clone());
        }
    }
    live.sort();
    (live, stale)
}

fn rotate(st: &mut State) -> Vec<String> {
    let n = st.peers.len();
    if n == 0 {
        return Vec::new();
    }
    let start = st.next_peer % n;
    st.next_peer = st.next_peer.wrapping_add(1);
    st.peers[start..]
        .iter()
        .chain(st.peers[..start].iter())
        .cloned()
        .collect()
}

/// A note between two engines of one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Note {
    /// "Deliver entry `entry` too, and complete it if you answer first" — from `from`.
    Hedge {
        entry: String,
        from: String,
        attempt: u64,
    },
    /// "Entry `entry` is answered here: stop working on it."
    Done { entry: String },
}

impl Note {
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// `None` for anything that is not a note (never trusted further than that).
    pub fn decode(b: &[u8]) -> Option<Self> {
        serde_json::from_slice(b).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hedge(delay: HedgeDelay, cap: f64, min: u64) -> AgentHedge {
        AgentHedge::new(AgentHedgeConfig {
            delay,
            max_extra_load: cap,
            min_samples: min,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn percentile_delay_needs_samples_then_follows_the_latencies() {
        let h = hedge(HedgeDelay::Percentile(97.0), 0.05, 100);
        assert_eq!(h.delay(), None);
        for i in 0..100u64 {
            // 97 fast deliveries (10 ms), 3 slow ones (2 s).
            let ms = if i < 97 { 10 } else { 2000 };
            h.record(Duration::from_millis(ms), true);
        }
        let d = h.delay().unwrap();
        assert!(
            d >= Duration::from_millis(9) && d <= Duration::from_millis(11),
            "{d:?}"
        );
        // The histogram rotates: after two windows without samples nothing is known again.
        tokio::time::advance(WINDOW * 2 + Duration::from_millis(1)).await;
        assert_eq!(h.delay(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_are_capped_at_max_extra_load_of_the_deliveries() {
        let h = hedge(HedgeDelay::Fixed(Duration::from_millis(5)), 0.05, 1);
        for _ in 0..1000 {
            h.deposit();
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        let mut allowed = 0;
        for _ in 0..200 {
            if h.decide().is_ok() {
                allowed += 1;
            }
        }
        // 1,000 deliveries in the window (minus the conservative slot): at most 50 hedges.
        assert!(allowed > 0 && allowed <= 50, "{allowed}");
        assert_eq!(h.decide(), Err(Refusal::Capped));
        // Past the window the deliveries are forgotten: no base, no hedge.
        tokio::time::advance(WINDOW * 2).await;
        assert_eq!(h.decide(), Err(Refusal::Capped));
    }

    #[tokio::test(start_paused = true)]
    async fn hedging_pauses_while_paused_or_overloaded() {
        let h = hedge(HedgeDelay::Fixed(Duration::from_millis(5)), 1.0, 1);
        for _ in 0..100 {
            h.deposit();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        h.set_paused(true);
        assert_eq!(h.decide(), Err(Refusal::Paused));
        h.set_paused(false);
        assert!(h.decide().is_ok());
        // Most deliveries fail: the agent is overloaded, no hedge.
        for i in 0..40 {
            h.record(Duration::from_millis(5), i % 4 == 0);
        }
        assert_eq!(h.decide(), Err(Refusal::Overloaded));
        // Once those failures leave the window, hedging resumes.
        tokio::time::advance(WINDOW * 2).await;
        for _ in 0..100 {
            h.deposit();
            h.record(Duration::from_millis(5), true);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(h.decide().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn peers_rotate_and_expire() {
        let h = hedge(HedgeDelay::Fixed(Duration::from_millis(5)), 1.0, 1);
        assert_eq!(h.peers(), None);
        assert_eq!(h.set_peers(vec!["a".into(), "b".into()]), vec!["a", "b"]);
        assert_eq!(h.peers().unwrap(), vec!["b", "a"]);
        assert_eq!(h.peers().unwrap(), vec!["a", "b"]);
        tokio::time::advance(PEERS_TTL).await;
        assert_eq!(h.peers(), None);
        assert_eq!(h.set_peers(vec![]), Vec::<String>::new());
    }

    #[test]
    fn live_peers_are_fresh_others() {
        let f = |e: &str, at: u64| (e.to_string(), bytes::Bytes::from(at.to_string()));
        let fields = vec![
            f("me", 10_000),
            f("b", 9_000),
            f("a", 8_000),
            f("quiet", 6_000),
            f("dead", 0),
            ("junk".to_string(), bytes::Bytes::from_static(b"x")),
        ];
        let (live, stale) = live_peers(&fields, "me", 70_000);
        assert!(live.is_empty());
        assert_eq!(stale.len(), 6);
        let (live, stale) = live_peers(&fields, "me", 10_500);
        assert_eq!(live, vec!["a", "b"]);
        assert!(stale.is_empty(), "{stale:?}");
    }

    #[tokio::test]
    async fn a_done_note_wakes_its_waiter_once() {
        let h = hedge(HedgeDelay::Fixed(Duration::from_millis(5)), 1.0, 1);
        let rx = h.wait_done("1-0");
        h.done("2-0");
        h.done("1-0");
        assert!(rx.await.is_ok());
        let rx = h.wait_done("3-0");
        h.forget("3-0");
        assert!(rx.await.is_err());
    }

    #[test]
    fn notes_round_trip_and_garbage_is_no_note() {
        for n in [
            Note::Hedge {
                entry: "1-0".into(),
                from: "e1".into(),
                attempt: 2,
            },
            Note::Done {
                entry: "1-0".into(),
            },
        ] {
            assert_eq!(Note::decode(&n.encode()), Some(n));
        }
        assert_eq!(Note::decode(b"{\"t\":\"nope\"}"), None);
        assert_eq!(Note::decode(b"\xff"), None);
    }

    #[test]
    fn config_resolves_the_spec() {
        let spec: AgentHedgeSpec =
            serde_json::from_value(serde_json::json!({"delay": {"fixed": "800ms"}})).unwrap();
        let c = AgentHedgeConfig::from_spec("a", &spec).unwrap();
        assert_eq!(c.delay, HedgeDelay::Fixed(Duration::from_millis(800)));
        assert_eq!(c.max_extra_load, DEFAULT_MAX_EXTRA_LOAD);
        let both: AgentHedgeSpec = serde_json::from_value(
            serde_json::json!({"delay": {"fixed": "800ms", "percentile": 97}}),
        )
        .unwrap();
        let e = AgentHedgeConfig::from_spec("a", &both)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agents.a.hedge.delay"), "{e}");
    }
}
