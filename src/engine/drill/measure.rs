//! What a drill run measured, as pure functions over a series of [`Point`]s (one per sample
//! of the engines' published stats): the baseline, failover and recovery times, guardrails,
//! the verdict and the score. The runner ([`super::run`]) only collects the points.
//!
//! What counts, per step an engine settles (as the rollout analysis counts,
//! `controller::analysis`): a success is a completion (`completed`), a failure a
//! dead-lettering (`dead_lettered`); routed tasks, duplicates and retries are neither. Latency
//! is the engines' task latency (read to completion, completions only), each point's p95 taken
//! from the histogram deltas of its interval. An interval in which no step settled has **no
//! traffic**: it is neither good nor bad (it neither breaks nor extends a sustained run).
//!
//! # The baseline band
//!
//! The baseline is the fault-free window before the timeline: its success rate `s_b` over
//! all steps settled in it and the p95 `p95_b` of all its completions. A baseline in which no
//! step settled is stated as such (the verdict says failover and recovery could not be
//! measured), never replaced by a made-up one. An interval of `n` settled steps is
//! - **served** when its success rate ≥ `s_b − 0.05 − 3·√(f·(1 − f)/n)` with
//!   `f = max(1 − s_b, 0.01)`: five points below the baseline, and three standard errors
//!   further — the noise of a baseline-like interval of `n` steps (so a one-second interval of
//!   ten steps is not a dip for one failure, but is for two);
//! - **normal** when served and its p95 ≤ `max(1.5 · p95_b, p95_b + 50 ms)` (an interval
//!   without a completion, or a baseline without one, has no latency to judge).
//!
//! A state is **sustained** when [`SUSTAIN`] consecutive intervals with traffic are in it.
//!
//! # Failover and recovery
//!
//! - **Failover** (from the first fault's start, over the intervals that end while faults are
//!   active — up to the last fault's end): if an interval was not served (the dip), the time
//!   to the start of the first sustained run of served intervals after the dip, all of it
//!   while the faults were active; `None` if there was none (traffic never got around the
//!   fault). If no interval dipped, the time to the first interval with traffic: 0 when
//!   traffic kept flowing, how long it stalled otherwise; `None` without any traffic. Here a
//!   step degraded mode **routed** to another path (manual review) counts as served: failing
//!   over is serving the traffic some other way. (For the success rate, the guardrails and
//!   the availability term it counts as neither success nor failure.)
//! - **Recovery** (from the last fault's end, over the intervals that end after it): the time
//!   to the start of the first sustained run of normal intervals; 0 if service was normal
//!   right away; `None` if that run did not start within the recovery limit.
//!
//! # Guardrails
//!
//! Checked on every sample over the last [`GUARD_WINDOW`]: `successRateBelow` and
//! `p95LatencyMsAbove` only once at least [`GUARD_MIN_TASKS`] steps settled (completions, for
//! the p95) in that window — a handful of tasks is no evidence; `dlqDepthAbove` on the DLQ's
//! length at the sample.
//!
//! # Verdict
//!
//! `Aborted` when a guardrail or the caller ended the run. Otherwise `Passed` when the run
//! recovered within the limit (`expect.maxRecoverySeconds`, else 300 s), lost at most
//! `expect.maxLostTasks` tasks (default 0) and duplicated at most
//! `expect.maxDuplicateEffects` effects (default 0) — counted by the caller, never assumed
//! (a count that failed fails the run); `Failed` with every unmet expectation in the reason.
//!
//! # Score
//!
//! ```text
//! score = 40·A + 30·R + 30·C, in [0, 100], one decimal
//!   A (availability during the faults) = min(1, s_f / s_b), where s_f is the success rate of
//!     the steps settled while faults were active and s_b the baseline's (0 when nothing
//!     settled during the faults or the baseline had no traffic; 1 when s_b is 0)
//!   R (recovery against its budget) = max(0, 1 − recovery / limit), 0 when the run did not
//!     recover within the limit (with a limit of 0: 1 for an immediate recovery, else 0)
//!   C (correctness) = 1 when no task was lost and no effect duplicated (as counted), else 0
//! An Aborted run has R = 0 (its recovery was never observed) and scores at most 25: a
//! guardrail breach means the fault was not contained.
//! ```

use std::time::Duration;

use super::{Accounting, Verdict};
use crate::api::drill::{AbortIf, Expectations};
use crate::engine::stats::Delta;

/// Consecutive intervals with traffic that make a state sustained.
pub const SUSTAIN: usize = 3;
/// The success-rate band: this far below the baseline's rate…
pub const SUCCESS_TOLERANCE: f64 = 0.05;
/// …and this many standard errors of an interval's rate further…
pub const STANDARD_ERRORS: f64 = 3.0;
/// …computed with the baseline's failure rate, taken as at least this (a few hundred
/// successes in a row do not prove it lower).
pub const MIN_FAILURE_RATE: f64 = 0.01;
/// The latency band: an interval's p95 may be up to this factor of the baseline's…
pub const LATENCY_FACTOR: f64 = 1.5;
/// …or this many ms above it, whichever is more (a fast baseline's p95 is noisy).
pub const LATENCY_SLACK_MS: f64 = 50.0;
/// Window of the guardrails' success rate and p95.
pub const GUARD_WINDOW: Duration = Duration::from_secs(5);
/// Settled steps the guardrails need in their window before they judge a rate or a p95.
pub const GUARD_MIN_TASKS: u64 = 10;
/// Weights of the score's terms (availability, recovery, correctness); they sum to 100.
pub const SCORE_WEIGHTS: (f64, f64, f64) = (40.0, 30.0, 30.0);
/// Rounding slack of the band's comparisons.
const EPSILON: f64 = 1e-9;
/// The most an Aborted run scores.
pub const ABORTED_SCORE_CAP: f64 = 25.0;

/// What the workflow's engines did over one interval of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Point {
    /// Start of the interval (the previous reading), from the start of the run.
    pub from: Duration,
    /// End of the interval (this reading), from the start of the run.
    pub at: Duration,
    /// Steps completed.
    pub succeeded: u64,
    /// Steps dead-lettered.
    pub failed: u64,
    /// Steps degraded mode routed to another path (e.g. manual review): neither a success nor
    /// a failure for the success rate, but traffic served for [`failover`].
    pub routed: u64,
    /// p95 of the task latency of the interval's completions, ms; `None` without one.
    pub p95_ms: Option<f64>,
    /// DLQ length at `at`.
    pub dlq_depth: u64,
}

impl Point {
    /// The interval `[from, at]` measured by `delta` (between two readings of the engines'
    /// snapshots), with the DLQ's length at `at`.
    pub fn new(from: Duration, at: Duration, delta: &Delta, dlq_depth: u64) -> Self {
        Point {
            from,
            at,
            succeeded: delta.counters.completed,
            failed: delta.counters.dead_lettered,
            routed: delta.counters.routed,
            p95_ms: delta.p95_ms(),
            dlq_depth,
        }
    }

    /// Steps settled.
    pub fn tasks(&self) -> u64 {
        self.succeeded + self.failed
    }

    /// `None` without traffic.
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.tasks();
        (n > 0).then(|| self.succeeded as f64 / n as f64)
    }
}

/// The fault-free window the run is measured against.
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    /// Steps settled in it (> 0).
    pub tasks: u64,
    pub success_rate: f64,
    /// `None` when nothing completed (every step failed).
    pub p95_ms: Option<f64>,
    pub seconds: f64,
}

/// The baseline measured over `window` (one point spanning the baseline window); an error
/// saying so when no step settled in it.
pub fn baseline(window: &Point) -> Result<Baseline, String> {
    let seconds = window.at.saturating_sub(window.from).as_secs_f64();
    match window.success_rate() {
        Some(success_rate) => Ok(Baseline {
            tasks: window.tasks(),
            success_rate,
            p95_ms: window.p95_ms,
            seconds,
        }),
        None => Err(format!("no task settled during the {seconds:.0}s baseline")),
    }
}

impl Baseline {
    /// The lowest success rate of an interval of `tasks` settled steps inside the band.
    pub fn success_floor(&self, tasks: u64) -> f64 {
        let f = (1.0 - self.success_rate).max(MIN_FAILURE_RATE);
        let standard_error = (f * (1.0 - f) / tasks.max(1) as f64).sqrt();
        self.success_rate - SUCCESS_TOLERANCE - STANDARD_ERRORS * standard_error
    }

    /// The highest p95 inside the band; `None` (not judged) without a baseline p95.
    pub fn latency_ceiling_ms(&self) -> Option<f64> {
        self.p95_ms
            .map(|p| (p * LATENCY_FACTOR).max(p + LATENCY_SLACK_MS))
    }

    /// Whether `p` was served at the baseline success rate; `None` without traffic.
    pub fn serves(&self, p: &Point) -> Option<bool> {
        // At the floor is inside (EPSILON: 0.99 − 0.05 is not exactly 0.94 in binary).
        p.success_rate()
            .map(|r| r >= self.success_floor(p.tasks()) - EPSILON)
    }

    /// Whether `p` was served with the baseline's success rate and latency; `None` without
    /// traffic.
    pub fn normal(&self, p: &Point) -> Option<bool> {
        let served = self.serves(p)?;
        let fast = match (p.p95_ms, self.latency_ceiling_ms()) {
            (Some(p95), Some(ceiling)) => p95 <= ceiling + EPSILON,
            _ => true,
        };
        Some(served && fast)
    }
}

/// The first point of the first run of [`SUSTAIN`] consecutive points with traffic that
/// `judge` finds good (points without traffic, judged `None`, are skipped).
fn sustained<'a>(
    points: impl IntoIterator<Item = &'a Point>,
    judge: impl Fn(&Point) -> Option<bool>,
) -> Option<&'a Point> {
    let mut first = None;
    let mut good = 0;
    for p in points {
        match judge(p) {
            None => {}
            Some(false) => {
                first = None;
                good = 0;
            }
            Some(true) => {
                first = first.or(Some(p));
                good += 1;
                if good >= SUSTAIN {
                    return first;
                }
            }
        }
    }
    None
}

/// The points whose interval ends while faults are active: in `(first_start, last_end]`.
fn during(points: &[Point], first_start: Duration, last_end: Duration) -> Vec<&Point> {
    points
        .iter()
        .filter(|p| p.at > first_start && p.at <= last_end)
        .collect()
}

/// Failover time (see the module doc): from `first_start` (the first fault's start) to
/// traffic served again at the baseline's success rate, while the faults were active (until
/// `last_end`, the last fault's end).
pub fn failover(
    points: &[Point],
    base: &Baseline,
    first_start: Duration,
    last_end: Duration,
) -> Option<Duration> {
    // Failing over means serving the traffic by another path, too: a step degraded mode
    // routed (to manual review, a fallback agent) counts as served here.
    let during: Vec<Point> = during(points, first_start, last_end)
        .into_iter()
        .map(|p| Point {
            succeeded: p.succeeded + p.routed,
            ..*p
        })
        .collect();
    let since = |p: &Point| p.from.saturating_sub(first_start);
    match during.iter().position(|p| base.serves(p) == Some(false)) {
        None => during.iter().find(|p| p.tasks() > 0).map(since),
        Some(dip) => sustained(during[dip + 1..].iter(), |p| base.serves(p)).map(since),
    }
}

/// Recovery time (see the module doc): from `last_end` (the last fault's end) to the start of
/// sustained normal service, if that started within `limit`.
pub fn recovery(
    points: &[Point],
    base: &Baseline,
    last_end: Duration,
    limit: Duration,
) -> Option<Duration> {
    sustained(points.iter().filter(|p| p.at > last_end), |p| {
        base.normal(p)
    })
    .map(|p| p.from.saturating_sub(last_end))
    .filter(|d| *d <= limit)
}

/// The score's availability term `A`: the success rate while faults were active relative to
/// the baseline's, in [0, 1] (0 when nothing settled during the faults).
pub fn availability(
    points: &[Point],
    base: &Baseline,
    first_start: Duration,
    last_end: Duration,
) -> f64 {
    let during = during(points, first_start, last_end);
    let succeeded: u64 = during.iter().map(|p| p.succeeded).sum();
    let tasks: u64 = during.iter().map(|p| p.tasks()).sum();
    if tasks == 0 {
        return 0.0;
    }
    if base.success_rate <= 0.0 {
        return 1.0;
    }
    (succeeded as f64 / tasks as f64 / base.success_rate).clamp(0.0, 1.0)
}

/// The guardrail `window` (one point spanning the last [`GUARD_WINDOW`], with the DLQ's
/// length now) breaks, if any: one line naming the measured values and the thresholds, e.g.
/// "success rate 0.412 < 0.9 over the last 5s (17 tasks)"; several joined with " and ".
pub fn guardrail(abort_if: &AbortIf, window: &Point) -> Option<String> {
    let mut broken = Vec::new();
    if let Some(max) = abort_if.dlq_depth_above
        && i64::try_from(window.dlq_depth).unwrap_or(i64::MAX) > max
    {
        broken.push(format!("DLQ depth {} > {max}", window.dlq_depth));
    }
    let over = |n: u64| {
        format!(
            "over the last {:.0}s ({n} tasks)",
            window.at.saturating_sub(window.from).as_secs_f64()
        )
    };
    if let Some(min) = abort_if.success_rate_below
        && window.tasks() >= GUARD_MIN_TASKS
        && let Some(rate) = window.success_rate()
        && rate < min
    {
        broken.push(format!(
            "success rate {rate:.3} < {min} {}",
            over(window.tasks())
        ));
    }
    if let Some(max) = abort_if.p95_latency_ms_above
        && window.succeeded >= GUARD_MIN_TASKS
        && let Some(p95) = window.p95_ms
        && p95 > max as f64
    {
        broken.push(format!(
            "p95 latency {p95:.0}ms > {max}ms {}",
            over(window.succeeded)
        ));
    }
    (!broken.is_empty()).then(|| broken.join(" and "))
}

/// The verdict of a run and, unless Passed, why (one line; see the module doc).
/// `aborted`: why the run was aborted; `recovery`: as [`recovery`] measured it with
/// `recovery_limit`; `accounting`: the caller's count, or why it failed.
pub fn verdict(
    expect: Option<&Expectations>,
    recovery_limit: Duration,
    aborted: Option<&str>,
    baseline: Result<&Baseline, &str>,
    recovery: Option<Duration>,
    accounting: Result<&Accounting, &str>,
) -> (Verdict, Option<String>) {
    if let Some(reason) = aborted {
        return (Verdict::Aborted, Some(reason.to_owned()));
    }
    let mut unmet = Vec::new();
    match (baseline, recovery) {
        (Err(e), _) => unmet.push(format!("{e}: failover and recovery cannot be measured")),
        (Ok(_), None) => unmet.push(format!(
            "no recovery within {}s of the last fault's end",
            recovery_limit.as_secs_f64()
        )),
        (Ok(_), Some(r)) => {
            if let Some(max) = expect.and_then(|e| e.max_recovery_seconds)
                && r.as_secs_f64() > max as f64
            {
                unmet.push(format!(
                    "recovery took {}s, more than maxRecoverySeconds {max}",
                    r.as_secs_f64()
                ));
            }
        }
    }
    match accounting {
        Err(e) => unmet.push(format!("tasks could not be counted: {e}")),
        Ok(a) => {
            let allowed = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            let max_lost = allowed(expect.and_then(|e| e.max_lost_tasks));
            let max_dup = allowed(expect.and_then(|e| e.max_duplicate_effects));
            if a.tasks_lost > max_lost {
                unmet.push(format!(
                    "{} tasks lost (at most {max_lost} allowed)",
                    a.tasks_lost
                ));
            }
            if a.duplicate_effects > max_dup {
                unmet.push(format!(
                    "{} duplicate effects (at most {max_dup} allowed)",
                    a.duplicate_effects
                ));
            }
        }
    }
    if unmet.is_empty() {
        (Verdict::Passed, None)
    } else {
        (Verdict::Failed, Some(unmet.join("; ")))
    }
}

/// The resilience score (formula in the module doc). `availability`: [`availability`];
/// `recovery`: [`recovery`] against `limit`; `correct`: nothing lost or duplicated (and the
/// count succeeded).
pub fn score(
    availability: f64,
    recovery: Option<Duration>,
    limit: Duration,
    correct: bool,
    aborted: bool,
) -> f64 {
    let a = if availability.is_finite() {
        availability.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let r = match recovery {
        _ if aborted => 0.0,
        None => 0.0,
        Some(r) if limit.is_zero() => f64::from(u8::from(r.is_zero())),
        Some(r) => (1.0 - r.as_secs_f64() / limit.as_secs_f64()).clamp(0.0, 1.0),
    };
    let c = f64::from(u8::from(correct));
    let (wa, wr, wc) = SCORE_WEIGHTS;
    let mut total = wa * a + wr * r + wc * c;
    if aborted {
        total = total.min(ABORTED_SCORE_CAP);
    }
    (total.clamp(0.0, 100.0) * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A one-second interval ending at `at` s.
    fn pt(at: u64, ok: u64, bad: u64, p95: f64) -> Point {
        Point {
            from: S(at - 1),
            at: S(at),
            succeeded: ok,
            failed: bad,
            routed: 0,
            p95_ms: (ok > 0).then_some(p95),
            dlq_depth: 0,
        }
    }

    /// Baseline 99% successes, p95 100 ms.
    fn base() -> Baseline {
        baseline(&Point {
            from: S(0),
            at: S(30),
            succeeded: 297,
            failed: 3,
            routed: 0,
            p95_ms: Some(100.0),
            dlq_depth: 0,
        })
        .unwrap()
    }

    /// `n` one-second points from `start` s, each made by `f(second)`.
    fn series(from: u64, to: u64, f: impl Fn(u64) -> (u64, u64, f64)) -> Vec<Point> {
        (from + 1..=to)
            .map(|s| {
                let (ok, bad, p95) = f(s);
                pt(s, ok, bad, p95)
            })
            .collect()
    }

    #[test]
    fn baseline_is_measured_or_stated_missing() {
        let b = base();
        assert_eq!((b.tasks, b.seconds), (300, 30.0));
        assert!((b.success_rate - 0.99).abs() < 1e-9);
        assert_eq!(b.p95_ms, Some(100.0));
        let idle = Point {
            from: S(0),
            at: S(30),
            ..Point::default()
        };
        assert_eq!(
            baseline(&idle),
            Err("no task settled during the 30s baseline".into())
        );
        // Everything failed: a rate of 0, no latency to judge.
        let dead = baseline(&Point { failed: 5, ..idle }).unwrap();
        assert_eq!((dead.success_rate, dead.p95_ms), (0.0, None));
        assert_eq!(dead.latency_ceiling_ms(), None);
        assert_eq!(dead.normal(&pt(1, 0, 3, 0.0)), Some(true));
    }

    #[test]
    fn band_edges() {
        let b = base();
        // Large intervals: five points below 0.99, little more.
        assert!((b.success_floor(1_000_000) - 0.9397).abs() < 1e-4);
        // 100 steps: 0.99 − 0.05 − 3·0.00995 = 0.910.
        assert!((b.success_floor(100) - 0.91015).abs() < 1e-4);
        assert_eq!(b.serves(&pt(1, 92, 8, 1.0)), Some(true));
        assert_eq!(b.serves(&pt(1, 91, 9, 1.0)), Some(false));
        // Ten steps: 0.99 − 0.05 − 0.094 = 0.846: one failure passes, two do not.
        assert!((b.success_floor(10) - (0.94 - 3.0 * (0.99f64 * 0.01 / 10.0).sqrt())).abs() < 1e-9);
        assert_eq!(b.serves(&pt(1, 9, 1, 1.0)), Some(true));
        assert_eq!(b.serves(&pt(1, 8, 2, 1.0)), Some(false));
        // A flawless baseline is taken as failing 1%: the same band, not a zero-width one.
        let flawless = Baseline {
            success_rate: 1.0,
            ..base()
        };
        assert_eq!(flawless.serves(&pt(1, 9, 1, 1.0)), Some(true));
        assert_eq!(flawless.serves(&pt(1, 8, 2, 1.0)), Some(false));
        assert_eq!(flawless.serves(&pt(1, 93, 7, 1.0)), Some(true));
        assert_eq!(flawless.serves(&pt(1, 92, 8, 1.0)), Some(false));
        // A baseline failing often has a wide band.
        let poor = Baseline {
            success_rate: 0.8,
            ..base()
        };
        assert_eq!(poor.serves(&pt(1, 4, 6, 1.0)), Some(true));
        assert_eq!(poor.serves(&pt(1, 3, 7, 1.0)), Some(false));
        // No traffic: neither.
        assert_eq!(b.serves(&pt(1, 0, 0, 0.0)), None);
        assert_eq!(b.normal(&pt(1, 0, 0, 0.0)), None);
        // Latency: max(1.5 × 100, 100 + 50) = 150 ms.
        assert_eq!(b.latency_ceiling_ms(), Some(150.0));
        assert_eq!(b.normal(&pt(1, 10, 0, 150.0)), Some(true));
        assert_eq!(b.normal(&pt(1, 10, 0, 151.0)), Some(false));
        // A fast baseline gets the 50 ms slack.
        let fast = Baseline {
            p95_ms: Some(4.0),
            ..base()
        };
        assert_eq!(fast.latency_ceiling_ms(), Some(54.0));
        // A served but slow interval is not normal; an interval of failures only has no
        // latency but is not served.
        assert_eq!(b.normal(&pt(1, 0, 5, 0.0)), Some(false));
    }

    #[test]
    fn failover_after_a_dip_needs_sustained_service_while_faults_are_active() {
        let b = base();
        // Fault 30..90 s. Bad 31..40, good 41, bad 42 (not sustained), no traffic 43..44,
        // good from 45 (45, 46 with a gap at 47, 48: sustained from 45).
        let mut pts = series(0, 30, |_| (10, 0, 100.0));
        pts.extend(series(30, 90, |s| match s {
            31..=40 | 42 => (2, 8, 100.0),
            41 => (10, 0, 100.0),
            43 | 44 | 47 => (0, 0, 0.0),
            _ => (10, 0, 300.0),
        }));
        // Latency plays no part in failover; the run starts at 45, whose interval began at 44.
        assert_eq!(failover(&pts, &b, S(30), S(90)), Some(S(14)));
        // The same served run completing only after the faults ended is no failover.
        assert_eq!(failover(&pts, &b, S(30), S(45)), None);
        assert_eq!(failover(&pts, &b, S(30), S(47)), None);
        assert_eq!(failover(&pts, &b, S(30), S(48)), Some(S(14)));
    }

    #[test]
    fn routing_to_another_path_is_failing_over() {
        let b = base();
        // An outage from 30 s: two seconds of dead letters, then degraded mode routes every
        // task to manual review and nothing completes until the fault ends at 60 s.
        let mut points = series(30, 60, |s| if s <= 32 { (0, 10, 0.0) } else { (0, 0, 0.0) });
        for p in points.iter_mut().filter(|p| p.at > S(32)) {
            p.routed = 10;
        }
        assert_eq!(failover(&points, &b, S(30), S(60)), Some(S(2)));
        // Without the routing, traffic never got around the fault.
        for p in points.iter_mut() {
            p.routed = 0;
        }
        assert_eq!(failover(&points, &b, S(30), S(60)), None);
    }

    #[test]
    fn failover_without_a_dip_is_the_time_traffic_took_to_flow() {
        let b = base();
        // Never dipped, traffic kept flowing: 0.
        let flowing = series(0, 60, |_| (10, 0, 100.0));
        assert_eq!(failover(&flowing, &b, S(30), S(60)), Some(S(0)));
        // Never dipped, but nothing settled for 8 s after the fault started: 8.
        let stalled = series(0, 60, |s| {
            if (31..=38).contains(&s) {
                (0, 0, 0.0)
            } else {
                (10, 0, 1.0)
            }
        });
        assert_eq!(failover(&stalled, &b, S(30), S(60)), Some(S(8)));
        // No traffic at all while faults were active: not measurable.
        let idle = series(0, 60, |s| if s > 30 { (0, 0, 0.0) } else { (10, 0, 1.0) });
        assert_eq!(failover(&idle, &b, S(30), S(60)), None);
        // Never recovered while faults were active.
        let down = series(0, 60, |s| if s > 30 { (1, 9, 1.0) } else { (10, 0, 1.0) });
        assert_eq!(failover(&down, &b, S(30), S(60)), None);
        // A fault starting mid-interval: the straddling interval counts, from its start (0).
        let odd = series(0, 60, |_| (10, 0, 1.0));
        assert_eq!(
            failover(&odd, &b, Duration::from_millis(30_500), S(60)),
            Some(S(0))
        );
    }

    #[test]
    fn recovery_is_sustained_normal_service_within_the_limit() {
        let b = base();
        // Faults until 60. Slow (served, latency out of band) until 70, failing 71, no traffic
        // 72..73, normal from 74 on.
        let pts = series(0, 120, |s| match s {
            0..=60 => (1, 9, 100.0),
            61..=70 => (10, 0, 400.0),
            71 => (0, 10, 0.0),
            72 | 73 => (0, 0, 0.0),
            _ => (10, 0, 120.0),
        });
        assert_eq!(recovery(&pts, &b, S(60), S(300)), Some(S(13)));
        assert_eq!(
            recovery(&pts, &b, S(60), S(13)),
            Some(S(13)),
            "at the limit"
        );
        assert_eq!(recovery(&pts, &b, S(60), S(12)), None, "past the limit");
        // Normal right away: 0.
        let fine = series(0, 70, |_| (10, 0, 100.0));
        assert_eq!(recovery(&fine, &b, S(60), S(0)), Some(S(0)));
        // Never recovered, or observation ended before it was sustained.
        let never = series(0, 120, |s| {
            if s > 30 {
                (10, 0, 900.0)
            } else {
                (10, 0, 100.0)
            }
        });
        assert_eq!(recovery(&never, &b, S(60), S(300)), None);
        let short = series(0, 62, |_| (10, 0, 100.0));
        assert_eq!(
            recovery(&short, &b, S(60), S(300)),
            None,
            "two samples are not sustained"
        );
        // Only traffic-less intervals after the faults: nothing to judge, not recovered.
        let idle = series(
            0,
            120,
            |s| if s > 60 { (0, 0, 0.0) } else { (10, 0, 100.0) },
        );
        assert_eq!(recovery(&idle, &b, S(60), S(300)), None);
    }

    #[test]
    fn availability_relative_to_the_baseline() {
        let b = base();
        let pts = series(0, 60, |s| if s > 30 { (9, 1, 1.0) } else { (10, 0, 1.0) });
        let a = availability(&pts, &b, S(30), S(60));
        assert!((a - 0.9 / 0.99).abs() < 1e-9, "{a}");
        // Better than baseline is capped at 1; nothing during the faults is 0.
        let perfect = series(0, 60, |_| (10, 0, 1.0));
        assert_eq!(availability(&perfect, &b, S(30), S(60)), 1.0);
        let idle = series(0, 60, |s| if s > 30 { (0, 0, 0.0) } else { (10, 0, 1.0) });
        assert_eq!(availability(&idle, &b, S(30), S(60)), 0.0);
        let zero = Baseline {
            success_rate: 0.0,
            ..base()
        };
        assert_eq!(availability(&pts, &zero, S(30), S(60)), 1.0);
    }

    fn guards(rate: Option<f64>, dlq: Option<i64>, p95: Option<i64>) -> AbortIf {
        AbortIf {
            success_rate_below: rate,
            dlq_depth_above: dlq,
            p95_latency_ms_above: p95,
        }
    }

    fn window(ok: u64, bad: u64, p95: f64, dlq: u64) -> Point {
        Point {
            from: S(10),
            at: S(15),
            succeeded: ok,
            failed: bad,
            routed: 0,
            p95_ms: (ok > 0).then_some(p95),
            dlq_depth: dlq,
        }
    }

    #[test]
    fn guardrails_at_their_thresholds() {
        let g = guards(Some(0.9), Some(1000), Some(2000));
        assert_eq!(
            guardrail(&g, &window(90, 10, 2000.0, 1000)),
            None,
            "at every threshold"
        );
        assert_eq!(
            guardrail(&g, &window(7, 10, 50.0, 0)).as_deref(),
            Some("success rate 0.412 < 0.9 over the last 5s (17 tasks)")
        );
        assert_eq!(
            guardrail(&g, &window(100, 0, 2001.0, 0)).as_deref(),
            Some("p95 latency 2001ms > 2000ms over the last 5s (100 tasks)")
        );
        assert_eq!(
            guardrail(&g, &window(0, 0, 0.0, 1001)).as_deref(),
            Some("DLQ depth 1001 > 1000")
        );
        assert_eq!(
            guardrail(&g, &window(10, 10, 2500.0, 2000)).as_deref(),
            Some(
                "DLQ depth 2000 > 1000 and success rate 0.500 < 0.9 over the last 5s (20 tasks) \
                 and p95 latency 2500ms > 2000ms over the last 5s (10 tasks)"
            )
        );
        // Too little traffic to judge a rate or a p95; the DLQ is judged regardless.
        assert_eq!(guardrail(&g, &window(0, 9, 0.0, 0)), None);
        assert_eq!(guardrail(&g, &window(9, 0, 9000.0, 0)), None);
        // Unset thresholds are not checked.
        assert_eq!(
            guardrail(&guards(None, None, None), &window(0, 100, 0.0, 1 << 40)),
            None
        );
    }

    fn expect(rec: Option<i64>, lost: Option<i64>, dup: Option<i64>) -> Expectations {
        Expectations {
            max_recovery_seconds: rec,
            max_lost_tasks: lost,
            max_duplicate_effects: dup,
        }
    }

    fn acc(lost: u64, dup: u64) -> Accounting {
        Accounting {
            tasks_processed: 100,
            tasks_lost: lost,
            duplicate_effects: dup,
        }
    }

    #[test]
    fn verdict_against_expectations() {
        let b = base();
        let ok = acc(0, 0);
        let limit = S(60);
        let e = expect(Some(60), None, None);
        assert_eq!(
            verdict(Some(&e), limit, None, Ok(&b), Some(S(12)), Ok(&ok)),
            (Verdict::Passed, None)
        );
        // No expect: recovery within the default limit, nothing lost or duplicated.
        assert_eq!(
            verdict(None, S(300), None, Ok(&b), Some(S(299)), Ok(&ok)),
            (Verdict::Passed, None)
        );
        assert_eq!(
            verdict(None, S(300), None, Ok(&b), None, Ok(&acc(1, 0))),
            (
                Verdict::Failed,
                Some("no recovery within 300s of the last fault's end; 1 tasks lost (at most 0 allowed)".into())
            )
        );
        // Allowances are respected, exceeded ones named.
        let loose = expect(None, Some(2), Some(1));
        assert_eq!(
            verdict(
                Some(&loose),
                limit,
                None,
                Ok(&b),
                Some(S(0)),
                Ok(&acc(2, 1))
            )
            .0,
            Verdict::Passed
        );
        assert_eq!(
            verdict(
                Some(&loose),
                limit,
                None,
                Ok(&b),
                Some(S(0)),
                Ok(&acc(2, 2))
            ),
            (
                Verdict::Failed,
                Some("2 duplicate effects (at most 1 allowed)".into())
            )
        );
        // A recovery measured against a longer limit than expected still fails.
        assert_eq!(
            verdict(Some(&e), S(300), None, Ok(&b), Some(S(61)), Ok(&ok)),
            (
                Verdict::Failed,
                Some("recovery took 61s, more than maxRecoverySeconds 60".into())
            )
        );
        // A count that failed is never taken as zero; a missing baseline is stated.
        assert_eq!(
            verdict(None, limit, None, Err("no task settled during the 30s baseline"), None, Err("redis down")),
            (
                Verdict::Failed,
                Some("no task settled during the 30s baseline: failover and recovery cannot be measured; tasks could not be counted: redis down".into())
            )
        );
        // Aborted wins, with its reason.
        assert_eq!(
            verdict(
                Some(&e),
                limit,
                Some("DLQ depth 5 > 1"),
                Ok(&b),
                Some(S(0)),
                Ok(&ok)
            ),
            (Verdict::Aborted, Some("DLQ depth 5 > 1".into()))
        );
    }

    #[test]
    fn score_is_bounded_and_weighted() {
        let l = S(60);
        assert_eq!(score(1.0, Some(S(0)), l, true, false), 100.0);
        assert_eq!(score(0.0, None, l, false, false), 0.0);
        // 40·0.5 + 30·(1 − 15/60) + 30·1 = 72.5
        assert_eq!(score(0.5, Some(S(15)), l, true, false), 72.5);
        // Correctness is all or nothing.
        assert_eq!(score(0.5, Some(S(15)), l, false, false), 42.5);
        // Out-of-range inputs stay in bounds.
        assert_eq!(score(7.0, Some(S(0)), l, true, false), 100.0);
        assert_eq!(score(f64::NAN, Some(S(600)), l, true, false), 30.0);
        assert_eq!(score(-1.0, None, l, false, false), 0.0);
        // Limit 0: only an immediate recovery counts.
        assert_eq!(score(0.0, Some(S(0)), S(0), false, false), 30.0);
        assert_eq!(score(0.0, Some(S(1)), S(0), false, false), 0.0);
        // Aborted: no recovery term, at most 25.
        assert_eq!(score(1.0, Some(S(0)), l, true, true), 25.0);
        assert_eq!(score(0.25, None, l, false, true), 10.0);
    }
}
