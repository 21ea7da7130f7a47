//! Judging a revision from what its engines measured: the rollout analysis (success rate and
//! p95 latency over `analysis.windowSeconds`, Argo Rollouts' AnalysisRun in miniature).
//!
//! Owns how readings of the engines' published snapshots ([`crate::engine::stats`]) become a
//! [`Window`] of what happened between two readings, how many readings are kept
//! ([`Samples`]), and the verdict against the thresholds ([`judge`]). Reading Redis and
//! deciding what a verdict does to the rollout are the reconciler's and [`super::rollout`]'s.
//!
//! What counts, per step an engine settles (a task crossing three agents counts three times,
//! which leaves the ratio meaningful):
//! - a success is a completion (`completed`);
//! - a failure is a dead-lettering (`dead_lettered`): the task gave up at that step;
//! - a task routed by degraded mode is neither (the workflow did what it was told to do
//!   while a tool is down; the tool's outage is not the revision's fault), nor is a duplicate
//!   (already counted) or a retry (it has not settled yet).
//!
//! Latency is the engines' task latency (read to completion, completions only).

use std::collections::VecDeque;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::workflow::{AnalysisSpec, EconomicsSpec, SloSpec};
use crate::engine::slo::{self, CostReport, SloReport};
use crate::engine::stats::{self, Snapshot};

/// Window judged when `analysis.windowSeconds` is not set.
pub const DEFAULT_WINDOW_SECONDS: i32 = 60;
/// The longest window the schema allows (`analysis.windowSeconds` ≤ 3600): what [`Samples`]
/// keeps by default.
pub const MAX_WINDOW_SECONDS: u64 = 3600;
/// When the window has passed but no reading of the engines exists yet (Redis unreachable, no
/// engine published): look again after this long. No verdict is the safe side: the revision
/// neither passes nor fails on missing data.
pub const RETRY_WITHOUT_STATS: Duration = Duration::from_secs(10);
/// At most this many readings are kept, whatever the horizon (a controller reading far more
/// often than expected must not grow without bound).
const MAX_READINGS: usize = 4096;

/// What the engines of a workflow did over `seconds`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// Steps settled: `succeeded + failed`.
    pub tasks: u64,
    /// Completions.
    pub succeeded: u64,
    /// Dead-letterings.
    pub failed: u64,
    /// `succeeded / tasks`; 1 when no task settled (nothing failed).
    pub success_rate: f64,
    /// p95 of the task latency of the completions in the window, in ms (0 when none).
    pub p95_ms: f64,
    /// Length of the window.
    pub seconds: f64,
}

impl Window {
    /// The SLO attainment over the window (the engine's model: completions among settled
    /// steps, the window's p95).
    pub fn slo(&self, spec: Option<&SloSpec>) -> SloReport {
        slo::slo(self.succeeded, self.tasks, self.p95_ms, spec)
    }

    /// The incident cost of the window's failure rate, at the window's rate of settled steps
    /// unless `economics.tasksPerMinute` says otherwise.
    pub fn incident_cost(&self, economics: Option<&EconomicsSpec>) -> CostReport {
        let rate = if self.seconds > 0.0 {
            self.tasks as f64 / self.seconds
        } else {
            0.0
        };
        slo::incident_cost(self.failed, self.tasks, rate, economics)
    }
}

/// What happened between two readings of the workflow's engine snapshots (the deltas are
/// [`stats::delta`]'s: engines coming, going and restarting never make counts go backwards).
pub fn window(old: &[Snapshot], new: &[Snapshot], seconds: f64) -> Window {
    let d = stats::delta(old, new);
    let (succeeded, failed) = (d.counters.completed, d.counters.dead_lettered);
    let tasks = succeeded + failed;
    Window {
        tasks,
        succeeded,
        failed,
        success_rate: if tasks == 0 {
            1.0
        } else {
            succeeded as f64 / tasks as f64
        },
        p95_ms: d.p95_ms().unwrap_or(0.0),
        seconds,
    }
}

/// Readings of one workflow's engines over time, oldest first. Bounded: it keeps the readings
/// of the last `horizon` plus the newest one older than that (the base of a window as long as
/// the horizon).
#[derive(Clone, Debug)]
pub struct Samples {
    readings: VecDeque<(Timestamp, Vec<Snapshot>)>,
    horizon: Duration,
}

impl Default for Samples {
    fn default() -> Self {
        Self::new()
    }
}

impl Samples {
    /// Readings for windows up to the longest the schema allows ([`MAX_WINDOW_SECONDS`]).
    pub fn new() -> Self {
        Self::with_horizon(Duration::from_secs(MAX_WINDOW_SECONDS))
    }

    /// Readings for windows up to `horizon` (the workflow's `analysis.windowSeconds`, so a
    /// controller of many workflows keeps little).
    pub fn with_horizon(horizon: Duration) -> Self {
        Samples {
            readings: VecDeque::new(),
            horizon,
        }
    }

    /// Record a reading taken at `at`. A reading older than the newest one is dropped (time
    /// does not go backwards; a late reading would make counts do so).
    pub fn push(&mut self, at: Timestamp, engines: Vec<Snapshot>) {
        if self.readings.back().is_some_and(|(last, _)| at < *last) {
            return;
        }
        self.readings.push_back((at, engines));
        let cutoff = at
            .checked_sub(signed(self.horizon))
            .unwrap_or(Timestamp::MIN);
        // Drop the oldest while the next one is still old enough to be a window's base.
        while self.readings.len() > 1 && self.readings[1].0 <= cutoff {
            self.readings.pop_front();
        }
        while self.readings.len() > MAX_READINGS {
            self.readings.pop_front();
        }
    }

    /// What happened from `from` to the newest reading: based on the newest reading at or
    /// before `from`, else the oldest one (the window is then shorter; its `seconds` says how
    /// long). `None` with fewer than two readings or none before the newest.
    pub fn since(&self, from: Timestamp) -> Option<Window> {
        let (newest_at, newest) = self.readings.back()?;
        let base = self
            .readings
            .iter()
            .rev()
            .find(|(at, _)| *at <= from)
            .or_else(|| self.readings.front())?;
        if base.0 >= *newest_at {
            return None;
        }
        let seconds = newest_at.duration_since(base.0).as_secs_f64();
        Some(window(&base.1, newest, seconds))
    }

    /// What happened over the last `seconds` before the newest reading.
    pub fn last(&self, seconds: f64) -> Option<Window> {
        let (newest_at, _) = self.readings.back()?;
        let span = k8s_openapi::jiff::SignedDuration::try_from_secs_f64(seconds.max(0.0))
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        let from = newest_at.checked_sub(span).unwrap_or(Timestamp::MIN);
        self.since(from)
    }

    /// Readings held.
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }
}

fn signed(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// The outcome of an analysis.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The window has not passed yet (or nothing was measured yet): look again after
    /// `remaining`.
    Pending { remaining: Duration },
    /// The thresholds were met (or no task settled: nothing to judge).
    Pass(Window),
    /// A threshold was broken; `reason` names the measured value and the threshold.
    Breach { reason: String, window: Window },
}

/// Judge a revision available for `available_for` against the analysis thresholds:
/// - Pending until `windowSeconds` (default 60) have passed since it became available (the
///   caller measures that, e.g. from its Deployments' `Available` condition), and after that
///   while no window could be measured (`window` is `None`: look again after
///   [`RETRY_WITHOUT_STATS`]);
/// - then Breach if the success rate is below `minSuccessRate` or the p95 above
///   `maxP95LatencyMs` (the reason names both figures, the window and its task count, e.g.
///   "success rate 0.412 < 0.98 over 60s (17 tasks)"; both when both are broken);
/// - else Pass. With no task settled in the window: Pass with 0 tasks — nothing to judge, and
///   a revision is not failed for being idle. A threshold not set is not checked.
pub fn judge(spec: &AnalysisSpec, available_for: Duration, window: Option<&Window>) -> Verdict {
    let length = Duration::from_secs(
        u64::try_from(spec.window_seconds.unwrap_or(DEFAULT_WINDOW_SECONDS)).unwrap_or(0),
    );
    if available_for < length {
        return Verdict::Pending {
            remaining: length - available_for,
        };
    }
    let Some(w) = window else {
        return Verdict::Pending {
            remaining: RETRY_WITHOUT_STATS,
        };
    };
    if w.tasks == 0 {
        return Verdict::Pass(w.clone());
    }
    let over = format!("over {:.0}s ({} tasks)", w.seconds, w.tasks);
    let mut broken = Vec::new();
    if let Some(min) = spec.min_success_rate
        && w.success_rate < min
    {
        broken.push(format!("success rate {:.3} < {min}", w.success_rate));
    }
    if let Some(max) = spec.max_p95_latency_ms
        && w.p95_ms > max as f64
    {
        broken.push(format!("p95 latency {:.0}ms > {max}ms", w.p95_ms));
    }
    if broken.is_empty() {
        Verdict::Pass(w.clone())
    } else {
        Verdict::Breach {
            reason: format!("{} {over}", broken.join(" and ")),
            window: w.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stats::{Outcome, Stats};

    /// An engine that completed `ok` tasks taking `ms` each and dead-lettered `dead`.
    fn engine(id: &str, ok: u64, ms: u64, dead: u64) -> Stats {
        let s = Stats::new(id, "agent", Some("a"));
        more(&s, ok, ms, dead);
        s
    }

    fn more(s: &Stats, ok: u64, ms: u64, dead: u64) {
        for _ in 0..ok {
            s.record(
                Outcome::Completed,
                Duration::from_millis(ms),
                Duration::ZERO,
            );
        }
        for _ in 0..dead {
            s.record(
                Outcome::DeadLettered,
                Duration::from_millis(1),
                Duration::ZERO,
            );
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn window_counts_deltas_of_engines_in_both_readings() {
        let a = engine("a", 10, 5, 1);
        let old = vec![a.snapshot()];
        more(&a, 4, 500, 2);
        let w = window(&old, &[a.snapshot()], 30.0);
        assert_eq!((w.tasks, w.succeeded, w.failed), (6, 4, 2));
        assert!((w.success_rate - 4.0 / 6.0).abs() < 1e-9);
        // Only the window's completions are in the p95: all took 500ms, none 5ms.
        assert!((w.p95_ms - 500.0).abs() < 1.0, "{}", w.p95_ms);
        assert_eq!(w.seconds, 30.0);
        // Routed and duplicates are neither success nor failure.
        a.record(Outcome::Routed, Duration::from_millis(1), Duration::ZERO);
        a.record(Outcome::Duplicate, Duration::from_millis(1), Duration::ZERO);
        let w2 = window(&[a.snapshot()], &[a.snapshot()], 1.0);
        assert_eq!(
            w2,
            Window {
                success_rate: 1.0,
                seconds: 1.0,
                ..Window::default()
            }
        );
    }

    #[test]
    fn window_survives_engines_coming_and_going() {
        let a = engine("a", 10, 5, 0);
        let b = engine("b", 7, 5, 3);
        let old = vec![a.snapshot(), b.snapshot()];
        // b's pod went away (its snapshot expired), c started and did 2 + 1.
        more(&a, 1, 5, 0);
        let c = engine("c", 2, 100, 1);
        let w = window(&old, &[a.snapshot(), c.snapshot()], 10.0);
        assert_eq!(
            (w.succeeded, w.failed),
            (3, 1),
            "b's history is not subtracted"
        );
        // a restarted under the same id (counters back to zero, then 2 done): counted whole.
        let a2 = engine("a", 2, 5, 0);
        let w = window(&[a.snapshot()], &[a2.snapshot()], 10.0);
        assert_eq!((w.succeeded, w.failed), (2, 0));
        // Nothing read at all.
        let w = window(&[], &[], 5.0);
        assert_eq!((w.tasks, w.success_rate, w.p95_ms), (0, 1.0, 0.0));
        // A garbage histogram does not poison the counts.
        let mut bad = c.snapshot();
        bad.latency_us = "zz".into();
        let w = window(&[], &[bad], 5.0);
        assert_eq!((w.succeeded, w.p95_ms), (2, 0.0));
    }

    #[test]
    fn samples_measure_since_a_time_and_stay_bounded() {
        let a = Stats::new("a", "agent", Some("a"));
        let mut s = Samples::with_horizon(Duration::from_secs(60));
        assert!(s.is_empty() && s.last(60.0).is_none());
        for i in 0..20 {
            more(&a, 1, 5, u64::from(i % 5 == 0));
            s.push(at(i * 10), vec![a.snapshot()]);
        }
        // Readings every 10s, horizon 60s: those of the last 60s (140..190) and the base of a
        // 60s window (130).
        assert_eq!(s.len(), 7);
        assert_eq!(
            s.since(at(0)).unwrap().seconds,
            60.0,
            "older than kept: the oldest is the base"
        );
        let w = s.last(60.0).unwrap();
        assert_eq!(w.seconds, 60.0);
        assert_eq!(
            (w.succeeded, w.failed),
            (6, 1),
            "readings 14..19: one of them dead-lettered"
        );
        let w = s.since(at(175)).unwrap();
        assert_eq!(
            (w.seconds, w.succeeded),
            (20.0, 2),
            "base: newest at or before"
        );
        assert!(
            s.since(at(190)).is_none(),
            "no time between base and newest"
        );
        // A late reading is ignored.
        s.push(at(5), vec![]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.last(10.0).unwrap().succeeded, 1);
        // Off the beat: at 195 the cutoff is 135, so 130 stays as the base of a full window.
        more(&a, 1, 5, 0);
        s.push(at(195), vec![a.snapshot()]);
        assert_eq!(s.len(), 8);
        let w = s.last(60.0).unwrap();
        assert_eq!((w.seconds, w.succeeded), (65.0, 7));
        let one = {
            let mut s = Samples::new();
            s.push(at(0), vec![a.snapshot()]);
            s
        };
        assert!(one.last(60.0).is_none(), "one reading is no window");
    }

    fn spec(min: Option<f64>, p95: Option<i64>, secs: Option<i32>) -> AnalysisSpec {
        AnalysisSpec {
            min_success_rate: min,
            max_p95_latency_ms: p95,
            window_seconds: secs,
        }
    }

    fn w(succeeded: u64, failed: u64, p95_ms: f64) -> Window {
        let tasks = succeeded + failed;
        Window {
            tasks,
            succeeded,
            failed,
            success_rate: if tasks == 0 {
                1.0
            } else {
                succeeded as f64 / tasks as f64
            },
            p95_ms,
            seconds: 60.0,
        }
    }

    #[test]
    fn judge_waits_for_the_window() {
        let s = spec(Some(0.98), Some(2000), None);
        let bad = w(7, 10, 50.0);
        assert_eq!(
            judge(&s, Duration::from_secs(0), Some(&bad)),
            Verdict::Pending {
                remaining: Duration::from_secs(60)
            }
        );
        assert_eq!(
            judge(&s, Duration::from_millis(59_500), Some(&bad)),
            Verdict::Pending {
                remaining: Duration::from_millis(500)
            }
        );
        assert!(matches!(
            judge(&s, Duration::from_secs(60), Some(&bad)),
            Verdict::Breach { .. }
        ));
        let s30 = spec(Some(0.98), None, Some(30));
        assert!(matches!(
            judge(&s30, Duration::from_secs(30), Some(&bad)),
            Verdict::Breach { .. }
        ));
        // Past the window with nothing measured: no verdict, look again soon.
        assert_eq!(
            judge(&s, Duration::from_secs(600), None),
            Verdict::Pending {
                remaining: RETRY_WITHOUT_STATS
            }
        );
    }

    #[test]
    fn judge_at_each_threshold() {
        let s = spec(Some(0.98), Some(2000), None);
        let d = Duration::from_secs(60);
        // Exactly at the thresholds passes; just past breaks.
        assert!(matches!(
            judge(&s, d, Some(&w(98, 2, 2000.0))),
            Verdict::Pass(_)
        ));
        match judge(&s, d, Some(&w(7, 10, 50.0))) {
            Verdict::Breach { reason, window } => {
                assert_eq!(reason, "success rate 0.412 < 0.98 over 60s (17 tasks)");
                assert_eq!(window.tasks, 17);
            }
            v => panic!("{v:?}"),
        }
        match judge(&s, d, Some(&w(100, 0, 2001.0))) {
            Verdict::Breach { reason, .. } => {
                assert_eq!(reason, "p95 latency 2001ms > 2000ms over 60s (100 tasks)")
            }
            v => panic!("{v:?}"),
        }
        match judge(&s, d, Some(&w(97, 3, 2500.0))) {
            Verdict::Breach { reason, .. } => assert_eq!(
                reason,
                "success rate 0.970 < 0.98 and p95 latency 2500ms > 2000ms over 60s (100 tasks)"
            ),
            v => panic!("{v:?}"),
        }
        // An idle revision passes with 0 tasks; unset thresholds are not checked.
        assert_eq!(
            judge(&s, d, Some(&w(0, 0, 0.0))),
            Verdict::Pass(w(0, 0, 0.0))
        );
        assert!(matches!(
            judge(&spec(None, None, None), d, Some(&w(0, 9, 9e6))),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn window_feeds_the_engines_slo_and_cost_model() {
        let win = Window {
            seconds: 10.0,
            ..w(990, 10, 100.0)
        };
        let slo = win.slo(None);
        assert!((slo.success_rate - 0.99).abs() < 1e-9);
        assert_eq!(slo.p95_latency_ms, 100.0);
        let e = EconomicsSpec {
            margin_per_task: 1.0,
            remediation_cost_per_failure: 0.0,
            tasks_per_minute: None,
        };
        // 1% of 100 steps/s over a day, $1 each.
        assert!((win.incident_cost(Some(&e)).daily_cost - 0.01 * 100.0 * 86_400.0).abs() < 1e-6);
        assert_eq!(Window::default().incident_cost(Some(&e)).daily_cost, 0.0);
    }
}
