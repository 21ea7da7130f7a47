//! Circuit breaker.
//!
//! * **Closed**: calls pass; each outcome (failed? slower than
//!   `slow_call_duration`?) goes into a sliding window, either the last `n`
//!   calls or the calls of the last duration. Once the window holds
//!   `minimum_calls`, a failure rate or slow-call rate at or above its
//!   threshold opens the breaker.
//! * **Open**: every call fails fast with [`ResilienceError::BreakerOpen`]
//!   for `open_duration`, giving the dependency room to recover.
//! * **Half-open**: exactly `half_open_calls` probes are let through (others
//!   are rejected). Any failed probe reopens; when all probes succeed (and
//!   the slow-call rate among them is below its threshold) it closes with an
//!   empty window.
//!
//! Every transition bumps a generation number; outcomes of calls admitted
//! under an older generation are ignored, so a slow call admitted while
//! closed cannot count as a probe. A probe dropped before finishing gives its
//! slot back, so cancellation cannot wedge the breaker half-open.
//!
//! Transitions are observable through listeners ([`Breaker::on_transition`])
//! and the `r4_breaker_*` metrics. [`Breaker::force_open`] lets the Redis
//! [`SharedBreakerStore`](super::SharedBreakerStore) open this replica when
//! another one opened.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::classify::{Outcome, outcome_of};
use super::config::{BreakerConfig, BreakerWindow};
use super::{BoxFut, PolicyResponse, ResilienceError, Telemetry, lock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerTransition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub at: Instant,
    /// Opened because another replica did (shared store), not by own calls.
    pub remote: bool,
}

pub type Listener = Arc<dyn Fn(&BreakerTransition) + Send + Sync>;

#[derive(Debug)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        slow: u32,
    },
}

impl State {
    fn public(&self) -> BreakerState {
        match self {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    failed: bool,
    slow: bool,
}

#[derive(Debug)]
struct Window {
    kind: BreakerWindow,
    samples: VecDeque<Sample>,
    failed: u32,
    slow: u32,
}

impl Window {
    fn new(kind: BreakerWindow) -> Self {
        Window {
            kind,
            samples: VecDeque::new(),
            failed: 0,
            slow: 0,
        }
    }

    fn pop_front(&mut self) {
        if let Some(s) = self.samples.pop_front() {
            self.failed -= u32::from(s.failed);
            self.slow -= u32::from(s.slow);
        }
    }

    fn prune(&mut self, now: Instant) {
        match self.kind {
            BreakerWindow::Count(n) => {
                while self.samples.len() > n.max(1) as usize {
                    self.pop_front();
                }
            }
            BreakerWindow::Time(d) => {
                while self.samples.front().is_some_and(|s| now - s.at > d) {
                    self.pop_front();
                }
            }
        }
    }

    fn push(&mut self, s: Sample) {
        self.failed += u32::from(s.failed);
        self.slow += u32::from(s.slow);
        self.samples.push_back(s);
        self.prune(s.at);
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.failed = 0;
        self.slow = 0;
    }
}

struct Inner {
    state: State,
    window: Window,
    generation: u64,
}

/// Shared breaker handle; clones share one state machine.
#[derive(Clone)]
pub struct Breaker {
    cfg: Arc<BreakerConfig>,
    inner: Arc<Mutex<Inner>>,
    listeners: Arc<Mutex<Vec<Listener>>>,
    telemetry: Telemetry,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("target", &self.telemetry.target())
            .field("state", &self.state())
            .finish()
    }
}

/// Admission ticket for one call; report its outcome with [`Permit::complete`].
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, telemetry: Telemetry) -> Self {
        let window = Window::new(cfg.window.clone());
        telemetry.breaker_created();
        Breaker {
            cfg: Arc::new(cfg),
            inner: Arc::new(Mutex::new(Inner {
                state: State::Closed,
                window,
                generation: 0,
            })),
            listeners: Arc::new(Mutex::new(Vec::new())),
            telemetry,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    pub fn target(&self) -> &str {
        self.telemetry.target()
    }

    /// Register a transition listener (called outside the breaker's lock).
    pub fn on_transition(&self, f: impl Fn(&BreakerTransition) + Send + Sync + 'static) {
        lock(&self.listeners).push(Arc::new(f));
    }

    pub fn state(&self) -> BreakerState {
        let mut inner = lock(&self.inner);
        let t = self.tick(&mut inner);
        let s = inner.state.public();
        drop(inner);
        self.emit(t);
        s
    }

    /// Remaining open time, if open.
    pub fn open_remaining(&self) -> Option<Duration> {
        match lock(&self.inner).state {
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    fn set(&self, inner: &mut Inner, to: State, remote: bool) -> Option<BreakerTransition> {
        let from = inner.state.public();
        inner.state = to;
        inner.generation += 1;
        let t = BreakerTransition {
            from,
            to: inner.state.public(),
            at: Instant::now(),
            remote,
        };
        (t.from != t.to).then_some(t)
    }

    /// Lazy Open -> HalfOpen once `open_duration` has passed.
    fn tick(&self, inner: &mut Inner) -> Option<BreakerTransition> {
        match inner.state {
            State::Open { until } if Instant::now() >= until => self.set(
                inner,
                State::HalfOpen {
                    admitted: 0,
                    succeeded: 0,
                    slow: 0,
                },
                false,
            ),
            _ => None,
        }
    }

    fn emit(&self, t: Option<BreakerTransition>) {
        let Some(t) = t else { return };
        tracing::info!(target: "r4::breaker", breaker = self.target(), from = t.from.label(), to = t.to.label(), remote = t.remote, "breaker transition");
        self.telemetry.breaker_transition(t.to);
        let listeners = lock(&self.listeners).clone();
        for l in listeners {
            l(&t);
        }
    }

    /// Ask to let one call through.
    pub fn try_acquire(&self) -> Result<Permit, ResilienceError> {
        let mut inner = lock(&self.inner);
        let t = self.tick(&mut inner);
        let generation = inner.generation;
        let res = match &mut inner.state {
            State::Closed => Ok(false),
            State::Open { .. } => Err(ResilienceError::BreakerOpen),
            State::HalfOpen { admitted, .. } => {
                if *admitted < self.cfg.half_open_calls.max(1) {
                    *admitted += 1;
                    Ok(true)
                } else {
                    Err(ResilienceError::BreakerOpen)
                }
            }
        };
        drop(inner);
        self.emit(t);
        res.map(|probe| Permit {
            breaker: self.clone(),
            generation,
            probe,
            done: false,
        })
    }

    /// Open now for `duration` because another replica opened (or an
    /// operator asked). Never shortens an open period already running.
    pub fn force_open(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut inner = lock(&self.inner);
        let t = match inner.state {
            State::Open { until: cur } if cur >= until => None,
            State::Open { .. } => {
                inner.state = State::Open { until };
                None
            }
            _ => self.set(&mut inner, State::Open { until }, true),
        };
        drop(inner);
        self.emit(t);
    }

    fn open_until(&self) -> State {
        State::Open {
            until: Instant::now() + self.cfg.open_duration,
        }
    }

    fn record(&self, generation: u64, probe: bool, failed: bool, slow: bool) {
        let mut inner = lock(&self.inner);
        if inner.generation != generation {
            return;
        }
        let now = Instant::now();
        let cfg = &self.cfg;
        let t = match inner.state {
            State::Closed => {
                inner.window.push(Sample {
                    at: now,
                    failed,
                    slow,
                });
                let w = &inner.window;
                let n = w.samples.len() as f64;
                let trip = w.samples.len() >= cfg.minimum_calls.max(1) as usize
                    && (f64::from(w.failed) / n >= cfg.failure_rate_threshold
                        || f64::from(w.slow) / n >= cfg.slow_call_rate_threshold);
                if trip {
                    inner.window.clear();
                    let open = self.open_until();
                    self.set(&mut inner, open, false)
                } else {
                    None
                }
            }
            State::HalfOpen {
                ref mut succeeded,
                slow: ref mut slow_probes,
                ..
            } if probe => {
                if failed {
                    let open = self.open_until();
                    self.set(&mut inner, open, false)
                } else {
                    *succeeded += 1;
                    *slow_probes += u32::from(slow);
                    let probes = cfg.half_open_calls.max(1);
                    if *succeeded >= probes {
                        let slow_rate = f64::from(*slow_probes) / f64::from(probes);
                        if slow_rate >= cfg.slow_call_rate_threshold {
                            let open = self.open_until();
                            self.set(&mut inner, open, false)
                        } else {
                            inner.window.clear();
                            self.set(&mut inner, State::Closed, false)
                        }
                    } else {
                        None
                    }
                }
            }
            _ => None,
        };
        drop(inner);
        self.emit(t);
    }

    fn release_probe(&self, generation: u64) {
        let mut inner = lock(&self.inner);
        if inner.generation == generation
            && let State::HalfOpen { admitted, .. } = &mut inner.state
        {
            *admitted = admitted.saturating_sub(1);
        }
    }
}

impl Permit {
    pub fn complete(mut self, outcome: Outcome, elapsed: Duration) {
        self.done = true;
        let failed = outcome != Outcome::Success;
        let slow = elapsed >= self.breaker.cfg.slow_call_duration;
        self.breaker
            .record(self.generation, self.probe, failed, slow);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.release_probe(self.generation);
        }
    }
}

#[derive(Clone, Debug)]
pub struct BreakerLayer {
    breaker: Breaker,
}

impl BreakerLayer {
    pub fn new(breaker: Breaker) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
}

impl<S, Req> Service<Req> for BreakerService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<super::BoxError>,
    S::Future: Send,
    S::Response: PolicyResponse,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError;
    type Future = BoxFut<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let breaker = self.breaker.clone();
        Box::pin(async move {
            // Admission happens when the call actually starts, in the same
            // poll that sends it to the inner service.
            let permit = breaker.try_acquire()?;
            let start = Instant::now();
            let res = inner
                .oneshot(req)
                .await
                .map_err(ResilienceError::from_inner);
            permit.complete(outcome_of(&res), start.elapsed());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::HttpRequest;
    use crate::resilience::testutil::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(10),
            window: BreakerWindow::Count(10),
            minimum_calls: 5,
            open_duration: Duration::from_secs(1),
            half_open_calls: 2,
        }
    }

    fn transitions(b: &Breaker) -> Arc<Mutex<Vec<BreakerState>>> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        b.on_transition(move |t| lock(&l).push(t.to));
        log
    }

    #[tokio::test(start_paused = true)]
    async fn full_cycle_open_half_open_close() {
        let b = Breaker::new(cfg(), Telemetry::noop("t"));
        let log = transitions(&b);
        let inner = Scripted::new(vec![status(500); 5], ok(0));
        let svc = BreakerLayer::new(b.clone()).layer(inner.clone());
        for _ in 0..5 {
            let _ = svc.clone().oneshot(HttpRequest::get("/")).await;
        }
        assert_eq!(b.state(), BreakerState::Open);
        let r = svc.clone().oneshot(HttpRequest::get("/")).await;
        assert!(matches!(r, Err(ResilienceError::BreakerOpen)));
        assert_eq!(inner.calls(), 5);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Two probes, both succeed: closed.
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err(), "only half_open_calls probes");
        p1.complete(Outcome::Success, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        p2.complete(Outcome::Success, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            *lock(&log),
            vec![
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_dropped_probe_is_returned() {
        let b = Breaker::new(cfg(), Telemetry::noop("t"));
        b.force_open(Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        drop(p2); // cancelled probe gives its slot back
        let p3 = b.try_acquire().unwrap();
        p1.complete(Outcome::Success, Duration::ZERO);
        p3.complete(
            Outcome::Failure(crate::resilience::FailureClass::Status5xx),
            Duration::ZERO,
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn minimum_calls_and_slow_calls() {
        let mut c = cfg();
        c.slow_call_rate_threshold = 0.6;
        c.failure_rate_threshold = 0.9;
        c.slow_call_duration = Duration::from_millis(100);
        let b = Breaker::new(c, Telemetry::noop("t"));
        // 4 failures < minimum_calls: stays closed.
        for _ in 0..4 {
            b.try_acquire().unwrap().complete(
                Outcome::Failure(crate::resilience::FailureClass::Other),
                Duration::ZERO,
            );
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // Slow successes push the window to 10 calls with 6 slow.
        for _ in 0..6 {
            b.try_acquire()
                .unwrap()
                .complete(Outcome::Success, Duration::from_millis(150));
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_failures() {
        let mut c = cfg();
        c.window = BreakerWindow::Time(Duration::from_secs(1));
        let b = Breaker::new(c, Telemetry::noop("t"));
        let fail = Outcome::Failure(crate::resilience::FailureClass::Other);
        for _ in 0..4 {
            b.try_acquire().unwrap().complete(fail, Duration::ZERO);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..4 {
            b.try_acquire()
                .unwrap()
                .complete(Outcome::Success, Duration::ZERO);
        }
        b.try_acquire().unwrap().complete(fail, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    /// An inner service that checks the breaker's state at the moment it is
    /// called: Open must never be seen, and at most `half_open_calls` calls
    /// per half-open episode.
    #[derive(Clone)]
    struct Probe {
        breaker: Breaker,
        violations: Arc<AtomicU32>,
        probes_this_episode: Arc<AtomicU32>,
        rng: Arc<Mutex<SmallRng>>,
    }

    impl Service<HttpRequest> for Probe {
        type Response = crate::resilience::HttpResponse;
        type Error = ResilienceError;
        type Future = BoxFut<Self::Response>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ResilienceError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: HttpRequest) -> Self::Future {
            match self.breaker.state() {
                BreakerState::Open => {
                    self.violations.fetch_add(1, Ordering::SeqCst);
                }
                BreakerState::HalfOpen => {
                    let n = self.probes_this_episode.fetch_add(1, Ordering::SeqCst) + 1;
                    if n > self.breaker.config().half_open_calls {
                        self.violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
                BreakerState::Closed => {}
            }
            let (fail, ms) = {
                let mut rng = lock(&self.rng);
                (rng.random_bool(0.4), rng.random_range(0..300))
            };
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(crate::resilience::HttpResponse::new(
                    if fail { 503 } else { 200 },
                    "",
                ))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_lets_calls_through_while_open_except_probes() {
        for seed in 0..10u64 {
            let b = Breaker::new(cfg(), Telemetry::noop("t"));
            let probes = Arc::new(AtomicU32::new(0));
            let p = probes.clone();
            b.on_transition(move |t| {
                if t.to == BreakerState::HalfOpen {
                    p.store(0, Ordering::SeqCst);
                }
            });
            let probe = Probe {
                breaker: b.clone(),
                violations: Arc::new(AtomicU32::new(0)),
                probes_this_episode: probes,
                rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))),
            };
            let svc = BreakerLayer::new(b.clone()).layer(probe.clone());
            let mut rng = SmallRng::seed_from_u64(seed + 100);
            let mut tasks = Vec::new();
            let mut rejected = 0;
            for _ in 0..2000 {
                tasks.push(tokio::spawn(svc.clone().oneshot(HttpRequest::get("/"))));
                tokio::time::advance(Duration::from_millis(rng.random_range(0..30))).await;
            }
            for t in tasks {
                if let Err(ResilienceError::BreakerOpen) = t.await.unwrap() {
                    rejected += 1;
                }
            }
            assert_eq!(probe.violations.load(Ordering::SeqCst), 0, "seed {seed}");
            assert!(rejected > 0, "seed {seed}: breaker never opened");
        }
    }
}
