//! The runner of one drill run: walks the [`Plan`]'s timeline on tokio's clock, injects and
//! withdraws faults, has the caller kill pods, samples the engines every [`SAMPLE_EVERY`] into
//! [`Point`]s, checks the guardrails on every sample, waits for recovery, and turns what it
//! saw into an [`Outcome`] through [`super::measure`].
//!
//! Owns the order of things within a run: at one instant a sample is taken before the
//! timeline's actions (so the baseline's last reading precedes the first fault); an abort
//! (guardrail or caller) withdraws every fault before anything else is awaited; the caller's
//! accounting is asked for after the faults are gone. What a fault does is the engines'
//! ([`crate::engine::faults`]); how pods die and tasks are counted is the [`DrillTarget`]'s.
//!
//! A fault is stored with a TTL equal to what is left of its window, so it ends on time with
//! nobody to end it — this future dropped, the controller dead. Its scheduled end is therefore
//! only announced ([`DrillEvent::FaultEnded`]); `faults::clear` withdraws the drill's faults at
//! an abort and on every way out.
//!
//! Readings that fail (Redis unreachable, a deadline missed) are logged and skipped: the next
//! interval is longer, nothing is invented, nothing panics.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::measure::{self, Baseline, GUARD_WINDOW, Point};
use super::{
    Accounting, DrillEvent, DrillTarget, FaultAction, Outcome, Plan, SAMPLE_EVERY, Verdict,
};
use crate::engine::faults;
use crate::engine::stats::{self, Counters, Snapshot};
use crate::queue::{Keys, Queue, QueueError};

/// Deadline of one reading of the engines' stats and the DLQ's length.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of injecting one fault and of withdrawing them all.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of the caller's pod kills and of its accounting.
const TARGET_DEADLINE: Duration = Duration::from_secs(60);

/// Run `plan` against the workflow whose keys are `keys`: baseline, faults, guardrails,
/// recovery, verdict. `abort` set to `Some(reason)` ends the run at once (faults cleared,
/// verdict Aborted). Faults are cleared on every way out; what the run injected expires on time
/// even if this future is dropped (the TTLs). `on_event` sees every event as it happens.
///
/// The run lasts until the timeline's end (`baseline + duration`) and, after it, until
/// recovery is sustained or [`Plan::longest`] has passed (the recovery limit after the last
/// fault's end, plus the samples that confirm a recovery starting at its edge).
pub async fn run(
    q: Arc<dyn Queue>,
    keys: Keys,
    plan: Plan,
    target: &dyn DrillTarget,
    abort: watch::Receiver<Option<String>>,
    on_event: &mut (dyn FnMut(Duration, &DrillEvent) + Send),
) -> Outcome {
    let first_start = plan
        .faults
        .iter()
        .map(|f| f.start)
        .min()
        .unwrap_or(plan.baseline);
    let last_end = plan.last_end();
    let mut r = Runner {
        q,
        keys,
        target,
        on_event,
        start: Instant::now(),
        first_start,
        last_end,
        plan,
        timeline: Vec::new(),
        first: None,
        base_end: None,
        last: None,
        recent: VecDeque::new(),
        points: Vec::new(),
        baseline: None,
        active: BTreeSet::new(),
        recovered: false,
    };
    let aborted = r.drive(abort).await;
    r.finish(aborted).await
}

/// One reading of the engines' snapshots and the DLQ's length.
#[derive(Clone)]
struct Reading {
    at: Duration,
    engines: Vec<Snapshot>,
    dlq: u64,
}

/// What the timeline does at an instant.
#[derive(Clone, Copy)]
enum Step {
    Start(usize),
    End(usize),
}

struct Runner<'a> {
    q: Arc<dyn Queue>,
    keys: Keys,
    plan: Plan,
    target: &'a dyn DrillTarget,
    on_event: &'a mut (dyn FnMut(Duration, &DrillEvent) + Send),
    start: Instant,
    first_start: Duration,
    last_end: Duration,
    timeline: Vec<(Duration, DrillEvent)>,
    /// The first reading that succeeded: the base of the run's totals and of the baseline.
    first: Option<Reading>,
    /// The newest reading within the baseline window.
    base_end: Option<Reading>,
    last: Option<Reading>,
    /// The readings of the last [`GUARD_WINDOW`] and the newest one older than that.
    recent: VecDeque<Reading>,
    points: Vec<Point>,
    /// Measured once the baseline window has passed.
    baseline: Option<Result<Baseline, String>>,
    /// Injected faults whose window has not ended.
    active: BTreeSet<usize>,
    recovered: bool,
}

impl Runner<'_> {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn emit(&mut self, event: DrillEvent) {
        let at = self.elapsed();
        tracing::info!(drill = %self.plan.drill, run = self.plan.run, ?at, ?event, "drill");
        (self.on_event)(at, &event);
        self.timeline.push((at, event));
    }

    /// The timeline's steps in order; at one instant, ends before starts.
    fn steps(&self) -> Vec<(Duration, Step)> {
        let mut steps = Vec::new();
        for (i, f) in self.plan.faults.iter().enumerate() {
            steps.push((f.start, Step::Start(i)));
            if matches!(f.action, FaultAction::Inject(_)) {
                steps.push((f.end, Step::End(i)));
            }
        }
        steps.sort_by_key(|(at, s)| (*at, matches!(s, Step::Start(_))));
        steps
    }

    /// Walk the timeline and observe until the run is over; `Some(reason)` if it was aborted.
    async fn drive(&mut self, mut abort: watch::Receiver<Option<String>>) -> Option<String> {
        if let Some(reason) = abort.borrow_and_update().clone() {
            return Some(reason);
        }
        self.emit(DrillEvent::BaselineStarted);
        if let Some(breach) = self.sample(Duration::ZERO).await {
            return Some(breach);
        }
        let steps = self.steps();
        let timeline_end = self.plan.baseline + self.plan.duration;
        let observe_until = self.plan.longest();
        let mut next = 0;
        let mut tick = SAMPLE_EVERY;
        let mut watching = true;
        loop {
            let now = self.elapsed();
            if next == steps.len()
                && now >= timeline_end
                && (self.recovered || now >= observe_until)
            {
                return None;
            }
            let wake = steps.get(next).map_or(tick, |(at, _)| tick.min(*at));
            tokio::select! {
                biased;
                changed = abort.changed(), if watching => match changed {
                    Ok(()) => {
                        if let Some(reason) = abort.borrow_and_update().clone() {
                            return Some(reason);
                        }
                    }
                    // Nobody can abort any more; the run goes on.
                    Err(_) => watching = false,
                },
                () = tokio::time::sleep_until(self.start + wake) => {}
            }
            let now = self.elapsed();
            if now >= tick {
                if let Some(breach) = self.sample(tick).await {
                    return Some(breach);
                }
                // A slow reading skips beats rather than bunching them.
                while tick <= self.elapsed() {
                    tick += SAMPLE_EVERY;
                }
            }
            while let Some((at, step)) = steps.get(next).copied()
                && at <= self.elapsed()
            {
                if let Err(reason) = self.act(step).await {
                    return Some(reason);
                }
                next += 1;
            }
        }
    }

    /// Read the engines and the DLQ, add a point, check the guardrails (`Some(reason)` on a
    /// breach) and, after the faults, whether the workflow recovered. `due`: when the sample
    /// was scheduled — the one due at the baseline's end belongs to the baseline, however late
    /// the clock says it was taken.
    async fn sample(&mut self, due: Duration) -> Option<String> {
        let at = self.elapsed();
        let read = async {
            let s = stats::read_workflow(self.q.as_ref(), &self.keys).await?;
            let dlq = self.q.len(&self.keys.dlq()).await?;
            Ok::<_, QueueError>((s.engines, dlq))
        };
        let (engines, dlq) = match timeout(READ_DEADLINE, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(drill = %self.plan.drill, error = %e, "cannot read the engines' stats; sample skipped");
                return None;
            }
            Err(_) => {
                tracing::warn!(drill = %self.plan.drill, deadline = ?READ_DEADLINE, "reading the engines' stats timed out; sample skipped");
                return None;
            }
        };
        let now = Reading { at, engines, dlq };
        if let Some(prev) = &self.last {
            let d = stats::delta(&prev.engines, &now.engines);
            self.points.push(Point::new(prev.at, at, &d, dlq));
        }
        if self.first.is_none() {
            self.first = Some(now.clone());
        }
        if due <= self.plan.baseline {
            self.base_end = Some(now.clone());
        } else {
            self.settle_baseline();
        }
        while self.recent.len() > 1 && self.recent[1].at + GUARD_WINDOW <= at {
            self.recent.pop_front();
        }
        let breach = self.plan.guardrails.as_ref().and_then(|g| {
            let window = match self.recent.front() {
                Some(base) => {
                    Point::new(base.at, at, &stats::delta(&base.engines, &now.engines), dlq)
                }
                None => Point {
                    from: at,
                    at,
                    dlq_depth: dlq,
                    ..Point::default()
                },
            };
            measure::guardrail(g, &window)
        });
        self.recent.push_back(now.clone());
        self.last = Some(now);
        if breach.is_none() && !self.recovered && at > self.last_end && self.recovery().is_some() {
            self.recovered = true;
            self.emit(DrillEvent::Recovered);
        }
        breach
    }

    /// Measure the baseline once its window has passed (from what was read in it).
    fn settle_baseline(&mut self) {
        if self.baseline.is_some() {
            return;
        }
        let secs = self.plan.baseline.as_secs_f64();
        self.baseline = Some(match (&self.first, &self.base_end) {
            (Some(f), Some(e)) if e.at > f.at => measure::baseline(&Point::new(
                f.at,
                e.at,
                &stats::delta(&f.engines, &e.engines),
                e.dlq,
            )),
            _ => Err(format!(
                "the engines' stats were not read twice during the {secs}s baseline"
            )),
        });
    }

    /// Recovery as measured so far (only the points after the last fault's end are looked at).
    fn recovery(&self) -> Option<Duration> {
        let Some(Ok(base)) = &self.baseline else {
            return None;
        };
        let after = self.points.partition_point(|p| p.at <= self.last_end);
        measure::recovery(
            &self.points[after..],
            base,
            self.last_end,
            self.plan.recovery_limit,
        )
    }

    /// Do one step of the timeline; `Err(reason)` aborts the run (a fault that could not be
    /// applied leaves nothing to judge).
    async fn act(&mut self, step: Step) -> Result<(), String> {
        self.settle_baseline();
        let (index, end, action) = match step {
            Step::End(i) => {
                if self.active.remove(&i) {
                    self.emit(DrillEvent::FaultEnded { index: i });
                }
                return Ok(());
            }
            Step::Start(i) => {
                let Some(f) = self.plan.faults.get(i) else {
                    return Ok(());
                };
                (i, f.end, f.action.clone())
            }
        };
        match action {
            FaultAction::Inject(record) => {
                // What is left of the window: a late start still ends on schedule.
                let ttl = end.saturating_sub(self.elapsed());
                if ttl.is_zero() {
                    tracing::warn!(drill = %self.plan.drill, index, "fault window passed before it could be injected");
                    return Ok(());
                }
                let inject = faults::inject(self.q.as_ref(), &self.keys, &record, ttl);
                match timeout(WRITE_DEADLINE, inject).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("fault {index} could not be injected: {e}")),
                    Err(_) => {
                        return Err(format!(
                            "fault {index} could not be injected: timed out after {WRITE_DEADLINE:?}"
                        ));
                    }
                }
                self.active.insert(index);
                self.emit(DrillEvent::FaultStarted { index });
            }
            FaultAction::PodKill { agent, count } => {
                self.emit(DrillEvent::FaultStarted { index });
                let killed = match timeout(TARGET_DEADLINE, self.target.kill_pods(&agent, count))
                    .await
                {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => return Err(format!("pods of {agent} could not be killed: {e}")),
                    Err(_) => {
                        return Err(format!(
                            "pods of {agent} could not be killed: timed out after {TARGET_DEADLINE:?}"
                        ));
                    }
                };
                self.emit(DrillEvent::PodsKilled {
                    agent,
                    requested: count,
                    killed,
                });
                self.emit(DrillEvent::FaultEnded { index });
            }
        }
        Ok(())
    }

    /// Withdraw the faults, count, measure, judge.
    async fn finish(mut self, aborted: Option<String>) -> Outcome {
        if let Some(reason) = &aborted {
            self.emit(DrillEvent::Aborted {
                reason: reason.clone(),
            });
        }
        // First, before anything else is awaited: nothing of this drill stays injected.
        let clear = faults::clear(self.q.as_ref(), &self.keys, &self.plan.drill);
        match timeout(WRITE_DEADLINE, clear).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(drill = %self.plan.drill, error = %e, "cannot withdraw the faults; they end with their TTL")
            }
            Err(_) => {
                tracing::warn!(drill = %self.plan.drill, "withdrawing the faults timed out; they end with their TTL")
            }
        }
        for index in std::mem::take(&mut self.active) {
            self.emit(DrillEvent::FaultEnded { index });
        }
        self.settle_baseline();
        let accounting = match timeout(TARGET_DEADLINE, self.target.account()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {TARGET_DEADLINE:?}")),
        };
        let totals = match (&self.first, &self.last) {
            (Some(f), Some(l)) => stats::delta(&f.engines, &l.engines).counters,
            _ => Counters::default(),
        };
        // Entries that entered the DLQ: its growth plus what the repair role moved out of it.
        let dlq_growth = match (&self.first, &self.last) {
            (Some(f), Some(l)) => {
                (l.dlq + totals.replays + totals.quarantined).saturating_sub(f.dlq)
            }
            _ => 0,
        };
        let base = self
            .baseline
            .clone()
            .unwrap_or_else(|| Err("the baseline was not measured".to_owned()));
        let failover = base
            .as_ref()
            .ok()
            .and_then(|b| measure::failover(&self.points, b, self.first_start, self.last_end));
        let recovery = if aborted.is_some() {
            None
        } else {
            self.recovery()
        };
        let availability = base.as_ref().map_or(0.0, |b| {
            measure::availability(&self.points, b, self.first_start, self.last_end)
        });
        let (verdict, reason) = measure::verdict(
            self.plan.expect.as_ref(),
            self.plan.recovery_limit,
            aborted.as_deref(),
            base.as_ref().map_err(String::as_str),
            recovery,
            accounting.as_ref().map_err(String::as_str),
        );
        let correct = accounting
            .as_ref()
            .is_ok_and(|a| a.tasks_lost == 0 && a.duplicate_effects == 0);
        let score = measure::score(
            availability,
            recovery,
            self.plan.recovery_limit,
            correct,
            verdict == Verdict::Aborted,
        );
        self.emit(DrillEvent::Finished { verdict });
        Outcome {
            verdict,
            score,
            reason,
            aborted_because: aborted,
            failover_seconds: failover.map(|d| d.as_secs_f64()),
            recovery_seconds: recovery.map(|d| d.as_secs_f64()),
            dlq_growth,
            dlq_replayed: totals.replays,
            accounting: accounting.unwrap_or(Accounting::default()),
            breaker_trips: totals.breaker_trips,
            hedges: totals.hedges,
            retries: totals.tool_retries,
            timeline: self.timeline,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::FutureExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::api::drill::ChaosDrillSpec;
    use crate::engine::drill::plan;
    use crate::engine::stats::{Outcome as Step, Stats};
    use crate::queue::fields;
    use crate::queue::memory::MemoryQueue;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn spec(v: serde_json::Value) -> ChaosDrillSpec {
        serde_json::from_value(v).unwrap()
    }

    /// Kills nothing for real: records when and what; counts whatever it is told to.
    struct FakeTarget {
        q: Arc<dyn Queue>,
        keys: Keys,
        start: Instant,
        kills: Mutex<Vec<(Duration, String, u32)>>,
        /// The faults active when the runner asked for the accounting.
        active_at_account: Mutex<Option<usize>>,
        accounting: Result<Accounting, String>,
    }

    impl FakeTarget {
        fn new(q: &Arc<dyn Queue>, keys: &Keys) -> Self {
            FakeTarget {
                q: q.clone(),
                keys: keys.clone(),
                start: Instant::now(),
                kills: Mutex::new(Vec::new()),
                active_at_account: Mutex::new(None),
                accounting: Ok(Accounting {
                    tasks_processed: 300,
                    tasks_lost: 0,
                    duplicate_effects: 0,
                }),
            }
        }
    }

    impl DrillTarget for FakeTarget {
        fn kill_pods<'a>(
            &'a self,
            agent: &'a str,
            count: u32,
        ) -> BoxFuture<'a, Result<u32, String>> {
            let at = self.start.elapsed();
            self.kills
                .lock()
                .unwrap()
                .push((at, agent.to_owned(), count));
            async move { Ok(count) }.boxed()
        }

        fn account(&self) -> BoxFuture<'_, Result<Accounting, String>> {
            async move {
                let n = faults::active(self.q.as_ref(), &self.keys)
                    .await
                    .unwrap()
                    .len();
                *self.active_at_account.lock().unwrap() = Some(n);
                self.accounting.clone()
            }
            .boxed()
        }
    }

    /// Where the fake engine is, as it sees the faults (it reads them like an engine does).
    #[derive(Clone, Copy, Debug)]
    enum Phase {
        Normal,
        /// Faulted for this long.
        Fault(Duration),
        /// The faults ended this long ago.
        Healed(Duration),
    }

    /// What the fake engine does in one second.
    #[derive(Default)]
    struct Second {
        ok: u64,
        bad: u64,
        ms: u64,
        tool_retries: u64,
        replays: u64,
    }

    /// An engine publishing real `Stats` snapshots every second (at x.5 s, between the
    /// runner's samples), doing what `behave` says in each phase: dead-letterings go to the
    /// DLQ, replays take them out, tool retries go to a `tools` snapshot. It has a history
    /// from before the run (100 completions, 5 tool retries, 2 DLQ entries) that the run must
    /// not count.
    async fn engine(
        q: Arc<dyn Queue>,
        keys: Keys,
        behave: impl Fn(Phase) -> Second + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let stats = Stats::new("e1", "agent", Some("a"));
        let tools = Stats::new("e1-tools", "tools", None);
        for _ in 0..100 {
            stats.record(Step::Completed, MS(1), Duration::ZERO);
        }
        let mut retries = 5;
        tools.set_tool_counters(retries, 0, 0, 0);
        let mut dlq = Vec::new();
        for _ in 0..2 {
            dlq.push(
                q.add(&keys.dlq(), fields([("reason", "old")]), None)
                    .await
                    .unwrap(),
            );
        }
        stats.publish(q.as_ref(), &keys, S(10)).await.unwrap();
        tools.publish(q.as_ref(), &keys, S(10)).await.unwrap();
        tokio::spawn(async move {
            let mut every = tokio::time::interval_at(Instant::now() + MS(500), S(1));
            let (mut faulted, mut healed) = (None::<Instant>, None::<Instant>);
            loop {
                let now = every.tick().await;
                let on = !faults::active(q.as_ref(), &keys).await.unwrap().is_empty();
                match (on, faulted) {
                    (true, None) => faulted = Some(now),
                    (false, Some(_)) => {
                        faulted = None;
                        healed = Some(now);
                    }
                    _ => {}
                }
                let phase = match (faulted, healed) {
                    (Some(f), _) => Phase::Fault(now - f),
                    (None, Some(h)) => Phase::Healed(now - h),
                    (None, None) => Phase::Normal,
                };
                let s = behave(phase);
                for _ in 0..s.ok {
                    stats.record(Step::Completed, MS(s.ms), Duration::ZERO);
                }
                for _ in 0..s.bad {
                    stats.record(Step::DeadLettered, MS(1), Duration::ZERO);
                    dlq.push(
                        q.add(&keys.dlq(), fields([("reason", "x")]), None)
                            .await
                            .unwrap(),
                    );
                }
                for _ in 0..s.replays {
                    if let Some(id) = dlq.pop() {
                        q.delete(&keys.dlq(), &[id]).await.unwrap();
                        stats.replayed();
                    }
                }
                retries += s.tool_retries;
                tools.set_tool_counters(retries, 0, 0, 0);
                stats.publish(q.as_ref(), &keys, S(10)).await.unwrap();
                tools.publish(q.as_ref(), &keys, S(10)).await.unwrap();
            }
        })
    }

    fn setup() -> (Arc<dyn Queue>, Keys) {
        (Arc::new(MemoryQueue::new()), Keys::new("ns", "wf"))
    }

    fn ok(n: u64, ms: u64) -> Second {
        Second {
            ok: n,
            ms,
            ..Second::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeline_faults_pod_kill_failover_and_recovery_from_published_stats() {
        let (q, keys) = setup();
        // Outage 15..30 s of the run (the timeline starts after the 10 s baseline), a PodKill
        // of 2 at 20 s.
        let plan = plan(
            "bank",
            &spec(serde_json::json!({
                "workflowRef": "wf", "duration": "30s", "baseline": "10s",
                "faults": [
                    {"type": "ToolOutage", "tool": "bank", "after": "5s", "for": "15s"},
                    {"type": "PodKill", "agent": "a", "count": 2, "after": "10s"},
                ],
                "expect": {"maxRecoverySeconds": 20},
            })),
            7,
        )
        .unwrap();
        // The engine fails 8 of 10 for its first 4 s under the fault, then serves through a
        // slow fallback; after the fault it is slow for 3 s more, replaying the DLQ.
        let eng = engine(q.clone(), keys.clone(), |phase| match phase {
            Phase::Normal => ok(10, 20),
            Phase::Fault(age) if age < S(4) => Second {
                ok: 2,
                bad: 8,
                ms: 20,
                tool_retries: 3,
                ..Second::default()
            },
            Phase::Fault(_) => Second {
                tool_retries: 1,
                ..ok(10, 500)
            },
            Phase::Healed(age) if age < S(3) => Second {
                replays: 1,
                ..ok(10, 500)
            },
            Phase::Healed(_) => ok(10, 20),
        })
        .await;
        let target = FakeTarget::new(&q, &keys);
        let start = Instant::now();
        // Nobody holds the sender: the run goes on to the end.
        let (_, abort) = watch::channel(None);
        let mut seen = Vec::new();
        let mut on_event = |at: Duration, e: &DrillEvent| seen.push((at, e.clone()));
        let checks = async {
            let active = || async { faults::active(q.as_ref(), &keys).await.unwrap() };
            assert!(active().await.is_empty());
            tokio::time::sleep_until(start + MS(15_100)).await;
            let a = active().await;
            assert_eq!(a.len(), 1);
            assert_eq!((a[0].drill.as_str(), a[0].run, a[0].index), ("bank", 7, 0));
            tokio::time::sleep_until(start + MS(29_900)).await;
            assert_eq!(active().await.len(), 1, "until its end");
            tokio::time::sleep_until(start + MS(30_100)).await;
            assert!(active().await.is_empty(), "ended on time by its TTL");
        };
        let (out, ()) = tokio::join!(
            run(q.clone(), keys.clone(), plan, &target, abort, &mut on_event),
            checks
        );
        eng.abort();
        let ev = |s: u64, e: DrillEvent| (S(s), e);
        let expected = vec![
            ev(0, DrillEvent::BaselineStarted),
            ev(15, DrillEvent::FaultStarted { index: 0 }),
            ev(20, DrillEvent::FaultStarted { index: 1 }),
            ev(
                20,
                DrillEvent::PodsKilled {
                    agent: "a".into(),
                    requested: 2,
                    killed: 2,
                },
            ),
            ev(20, DrillEvent::FaultEnded { index: 1 }),
            ev(30, DrillEvent::FaultEnded { index: 0 }),
            // Normal at 34, 35, 36: sustained.
            ev(36, DrillEvent::Recovered),
            ev(
                40,
                DrillEvent::Finished {
                    verdict: Verdict::Passed,
                },
            ),
        ];
        assert_eq!(out.timeline, expected);
        assert_eq!(seen, expected, "on_event saw every event as it happened");
        assert_eq!(
            *target.kills.lock().unwrap(),
            vec![(S(20), "a".to_owned(), 2)],
            "one kill, at its time, of its count"
        );
        assert_eq!(*target.active_at_account.lock().unwrap(), Some(0));
        assert_eq!(
            (out.verdict, out.reason.as_deref()),
            (Verdict::Passed, None)
        );
        // Bad intervals 16..19, served from the one ending at 20 (it began at 19): 19 − 15.
        assert_eq!(out.failover_seconds, Some(4.0));
        // Slow until 33.5; normal from the interval 33..34: 33 − 30.
        assert_eq!(out.recovery_seconds, Some(3.0));
        // 32 dead-lettered (3 of them replayed out again), none of the 2 from before.
        assert_eq!((out.dlq_growth, out.dlq_replayed), (32, 3));
        assert_eq!(
            out.retries,
            4 * 3 + 11,
            "the run's tool retries, not the 5 before"
        );
        assert_eq!(out.accounting.tasks_processed, 300);
        // A = (4·2 + 11·10) / 150 = 0.787, R = 1 − 3/20, C = 1.
        let expect = measure::score(118.0 / 150.0, Some(S(3)), S(20), true, false);
        assert_eq!(out.score, expect);
        assert_eq!(out.score, 87.0);
        assert!(out.aborted_because.is_none());
    }

    /// A drill whose fault fails everything for a minute, with or without guardrails.
    fn outage(guardrails: bool) -> Plan {
        let mut v = serde_json::json!({
            "workflowRef": "wf", "duration": "60s", "baseline": "5s",
            "faults": [{"type": "ToolOutage", "tool": "bank"}],
        });
        if guardrails {
            v["guardrails"] = serde_json::json!({"abortIf": {"successRateBelow": 0.9}});
        }
        plan("bank", &spec(v), 1).unwrap()
    }

    fn failing(phase: Phase) -> Second {
        match phase {
            Phase::Fault(_) => Second {
                bad: 10,
                ..Second::default()
            },
            _ => ok(10, 20),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn guardrail_breach_clears_the_faults_at_once_and_aborts() {
        let (q, keys) = setup();
        let eng = engine(q.clone(), keys.clone(), failing).await;
        let target = FakeTarget::new(&q, &keys);
        let (_tx, abort) = watch::channel(None);
        let out = run(
            q.clone(),
            keys.clone(),
            outage(true),
            &target,
            abort,
            &mut |_, _| {},
        )
        .await;
        eng.abort();
        // The window 1..6 s: 40 served in the baseline, the 10 of 5.5 s failed.
        let reason = "success rate 0.800 < 0.9 over the last 5s (50 tasks)";
        assert_eq!(out.verdict, Verdict::Aborted);
        assert_eq!(out.aborted_because.as_deref(), Some(reason));
        assert_eq!(out.reason.as_deref(), Some(reason));
        assert_eq!(
            out.timeline,
            vec![
                (S(0), DrillEvent::BaselineStarted),
                (S(5), DrillEvent::FaultStarted { index: 0 }),
                (
                    S(6),
                    DrillEvent::Aborted {
                        reason: reason.into()
                    }
                ),
                (S(6), DrillEvent::FaultEnded { index: 0 }),
                (
                    S(6),
                    DrillEvent::Finished {
                        verdict: Verdict::Aborted
                    }
                ),
            ]
        );
        // Withdrawn before the accounting was asked for, 59 s before its TTL would have.
        assert_eq!(*target.active_at_account.lock().unwrap(), Some(0));
        assert!(faults::active(q.as_ref(), &keys).await.unwrap().is_empty());
        assert!(out.score <= measure::ABORTED_SCORE_CAP, "{}", out.score);
        assert_eq!(out.recovery_seconds, None);
    }

    #[tokio::test(start_paused = true)]
    async fn abort_channel_ends_the_run_and_clears_the_faults() {
        let (q, keys) = setup();
        let eng = engine(q.clone(), keys.clone(), failing).await;
        let target = FakeTarget::new(&q, &keys);
        let start = Instant::now();
        let (tx, abort) = watch::channel(None);
        let suspend = async {
            tokio::time::sleep_until(start + MS(12_300)).await;
            assert_eq!(faults::active(q.as_ref(), &keys).await.unwrap().len(), 1);
            tx.send_replace(Some("suspended".to_owned()));
        };
        let mut quiet = |_: Duration, _: &DrillEvent| {};
        let (out, ()) = tokio::join!(
            run(
                q.clone(),
                keys.clone(),
                outage(false),
                &target,
                abort,
                &mut quiet
            ),
            suspend
        );
        eng.abort();
        assert_eq!(out.verdict, Verdict::Aborted);
        assert_eq!(out.aborted_because.as_deref(), Some("suspended"));
        let aborted = out
            .timeline
            .iter()
            .find(|(_, e)| matches!(e, DrillEvent::Aborted { .. }));
        assert_eq!(aborted.map(|(at, _)| *at), Some(MS(12_300)), "at once");
        assert_eq!(*target.active_at_account.lock().unwrap(), Some(0));
        assert!(faults::active(q.as_ref(), &keys).await.unwrap().is_empty());

        // Aborted before it started: nothing injected, nobody killed.
        let (_tx, abort) = watch::channel(Some("suspend: true".to_owned()));
        let out = run(
            q.clone(),
            keys.clone(),
            outage(false),
            &target,
            abort,
            &mut |_, _| {},
        )
        .await;
        assert_eq!(out.verdict, Verdict::Aborted);
        assert_eq!(
            out.timeline,
            vec![
                (
                    Duration::ZERO,
                    DrillEvent::Aborted {
                        reason: "suspend: true".into()
                    }
                ),
                (
                    Duration::ZERO,
                    DrillEvent::Finished {
                        verdict: Verdict::Aborted
                    }
                ),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_run_leaves_faults_that_end_at_their_ttl() {
        let (q, keys) = setup();
        // Outage 15..45 s; the run is dropped at 20 s (the controller died).
        let p = plan(
            "bank",
            &spec(serde_json::json!({
                "workflowRef": "wf", "duration": "60s", "baseline": "10s",
                "faults": [{"type": "ToolOutage", "tool": "bank", "after": "5s", "for": "30s"}],
            })),
            1,
        )
        .unwrap();
        let target = FakeTarget::new(&q, &keys);
        let start = Instant::now();
        let (_tx, abort) = watch::channel(None);
        let cut = tokio::time::timeout(
            S(20),
            run(q.clone(), keys.clone(), p, &target, abort, &mut |_, _| {}),
        )
        .await;
        assert!(cut.is_err(), "dropped mid-run");
        let active = || async { faults::active(q.as_ref(), &keys).await.unwrap().len() };
        assert_eq!(active().await, 1, "nobody withdrew it");
        tokio::time::sleep_until(start + MS(44_900)).await;
        assert_eq!(active().await, 1);
        tokio::time::sleep_until(start + MS(45_100)).await;
        assert_eq!(active().await, 0, "its TTL ended it on time");
    }

    #[tokio::test]
    async fn controller_death_mid_drill_on_redis_faults_still_expire_on_time() {
        let server = crate::testutil::RedisServer::start().await.unwrap();
        let q: Arc<dyn Queue> = Arc::new(
            crate::queue::redis::RedisQueue::connect(&server.url())
                .await
                .unwrap(),
        );
        let keys = Keys::new("ns", "wf");
        // Outage 200..900 ms of the run; the run is dropped at 500 ms.
        let p = plan(
            "bank",
            &spec(serde_json::json!({
                "workflowRef": "wf", "duration": "2s", "baseline": "200ms",
                "faults": [{"type": "ToolOutage", "tool": "bank", "for": "700ms"}],
            })),
            1,
        )
        .unwrap();
        let target = FakeTarget::new(&q, &keys);
        let start = Instant::now();
        let (_tx, abort) = watch::channel(None);
        let cut = tokio::time::timeout(
            MS(500),
            run(q.clone(), keys.clone(), p, &target, abort, &mut |_, _| {}),
        )
        .await;
        assert!(cut.is_err());
        assert_eq!(faults::active(q.as_ref(), &keys).await.unwrap().len(), 1);
        let deadline = start + S(5);
        let ended = loop {
            if faults::active(q.as_ref(), &keys).await.unwrap().is_empty() {
                break start.elapsed();
            }
            assert!(Instant::now() < deadline, "the fault did not expire");
            tokio::time::sleep(MS(10)).await;
        };
        // Its window ended at 900 ms (the TTL counts from the injection, a little after
        // 200 ms); it must not end early nor linger.
        assert!(ended >= MS(880), "{ended:?}");
        assert!(ended <= MS(1_900), "{ended:?}");
    }

    #[tokio::test]
    async fn unreadable_stats_skip_samples_and_the_run_goes_on() {
        let mut server = crate::testutil::RedisServer::start().await.unwrap();
        let q: Arc<dyn Queue> = Arc::new(
            crate::queue::redis::RedisQueue::connect(&server.url())
                .await
                .unwrap(),
        );
        let keys = Keys::new("ns", "wf");
        // Redis is down from 300 ms to about 1.5 s: the sample at 1 s cannot be read. The
        // fault (2..2.5 s) is injected once it is back.
        let p = plan(
            "bank",
            &spec(serde_json::json!({
                "workflowRef": "wf", "duration": "1s", "baseline": "2s",
                "faults": [{"type": "ToolOutage", "tool": "bank", "for": "500ms"}],
                "expect": {"maxRecoverySeconds": 0},
            })),
            1,
        )
        .unwrap();
        let target = FakeTarget::new(&q, &keys);
        let (_tx, abort) = watch::channel(None);
        let mut quiet = |_: Duration, _: &DrillEvent| {};
        let outage = async {
            tokio::time::sleep(MS(300)).await;
            server.kill();
            tokio::time::sleep(MS(1_200)).await;
            server.restart().await.unwrap();
        };
        let (out, ()) = tokio::join!(
            run(q.clone(), keys.clone(), p, &target, abort, &mut quiet),
            outage
        );
        let events: Vec<_> = out.timeline.iter().map(|(_, e)| e.clone()).collect();
        assert!(
            events.contains(&DrillEvent::FaultStarted { index: 0 })
                && events.contains(&DrillEvent::FaultEnded { index: 0 }),
            "{events:?}"
        );
        let started = out
            .timeline
            .iter()
            .find(|(_, e)| *e == DrillEvent::FaultStarted { index: 0 });
        assert!(
            started.is_some_and(|(at, _)| *at < MS(2_500)),
            "{started:?}"
        );
        // Nothing published, so nothing to measure against — said so, not invented ("no task
        // settled during the 2s baseline", or that it could not be read twice should the
        // reconnection be slow).
        assert_eq!(out.verdict, Verdict::Failed);
        assert!(
            out.reason
                .as_deref()
                .is_some_and(|r| r.contains("baseline: failover and recovery cannot be measured")),
            "{:?}",
            out.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_baseline_is_stated_and_a_failed_count_is_not_zero() {
        let (q, keys) = setup();
        // No engine publishes: nothing settles, ever.
        let mut target = FakeTarget::new(&q, &keys);
        target.accounting = Err("inbox unreadable".into());
        let p = plan(
            "bank",
            &spec(serde_json::json!({
                "workflowRef": "wf", "duration": "5s", "baseline": "3s",
                "faults": [{"type": "ToolOutage", "tool": "bank"}],
                "expect": {"maxRecoverySeconds": 2},
            })),
            1,
        )
        .unwrap();
        let (_tx, abort) = watch::channel(None);
        let start = Instant::now();
        let out = run(q.clone(), keys.clone(), p, &target, abort, &mut |_, _| {}).await;
        assert_eq!(out.verdict, Verdict::Failed);
        assert_eq!(
            out.reason.as_deref(),
            Some(
                "no task settled during the 3s baseline: failover and recovery cannot be \
                 measured; tasks could not be counted: inbox unreadable"
            )
        );
        assert_eq!((out.failover_seconds, out.recovery_seconds), (None, None));
        assert_eq!(out.score, 0.0);
        // It waited out the recovery limit and its confirmation, then stopped: 8 + 2 + 3.
        assert_eq!(start.elapsed(), S(13));
    }

    #[test]
    fn outcome_to_run_carries_every_figure() {
        let o = Outcome {
            verdict: Verdict::Failed,
            score: 42.5,
            reason: Some("2 tasks lost (at most 0 allowed)".into()),
            aborted_because: None,
            failover_seconds: Some(4.0),
            recovery_seconds: None,
            dlq_growth: 32,
            dlq_replayed: 3,
            accounting: Accounting {
                tasks_processed: 300,
                tasks_lost: 2,
                duplicate_effects: 1,
            },
            breaker_trips: 1,
            hedges: 9,
            retries: 23,
            timeline: vec![],
        };
        let r = o.to_run("2026-11-29T19:00:00Z".into(), "2026-11-29T19:01:00Z".into());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "startedAt": "2026-11-29T19:00:00Z", "finishedAt": "2026-11-29T19:01:00Z",
                "verdict": "Failed", "failoverSeconds": 4.0, "dlqGrowth": 32,
                "tasksProcessed": 300, "tasksLost": 2, "duplicateEffects": 1, "breakerTrips": 1,
                "hedges": 9, "retries": 23, "dlqReplayed": 3, "score": 42.5,
                "reason": "2 tasks lost (at most 0 allowed)",
            })
        );
    }

    /// The controller spawns the run: its future must be `Send`.
    #[allow(dead_code)]
    fn run_is_send(
        q: Arc<dyn Queue>,
        p: Plan,
        t: &dyn DrillTarget,
        a: watch::Receiver<Option<String>>,
    ) {
        fn send<T: Send>(_: T) {}
        let mut e = |_: Duration, _: &DrillEvent| {};
        send(run(q, Keys::new("n", "w"), p, t, a, &mut e));
    }
}
