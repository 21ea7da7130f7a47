//! Simulated agents and tools for `r4 run`: what the manifest's `simulate:` blocks mean.
//!
//! This module owns the behaviour models (latency, errors, outages) and the effect ledger that
//! counts side effects independently of the engine, so `lost` and `duplicate_effects` in the
//! report are measured, not assumed. How tasks reach the simulated agents is the engine's job.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use crate::api::workflow::{LatencySpec, OutageWindow};

/// A latency distribution: log-normal fitted to the median and p99, mixed with an optional
/// slow mode ("The Tail at Scale": most calls fast, a few very slow).
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyModel {
    median_ms: f64,
    sigma: f64,
    tail: Option<(f64, f64)>,
}

/// z-score of the 99th percentile of a standard normal distribution.
const Z99: f64 = 2.326_347_874;

impl LatencyModel {
    pub fn new(spec: &LatencySpec) -> Self {
        let median = spec.median_ms.max(0.0);
        let p99 = spec.p99_ms.unwrap_or(median * 2.0).max(median);
        let sigma = if median > 0.0 && p99 > median {
            (p99 / median).ln() / Z99
        } else {
            0.0
        };
        Self {
            median_ms: median,
            sigma,
            tail: spec
                .tail
                .as_ref()
                .map(|t| (t.probability.clamp(0.0, 1.0), t.ms.max(0.0))),
        }
    }

    /// Draw one latency.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        if let Some((p, ms)) = self.tail
            && rng.random::<f64>() < p
        {
            // Jitter the slow mode ±20% so the tail is a band, not a spike.
            let jitter = 0.8 + 0.4 * rng.random::<f64>();
            return Duration::from_secs_f64(ms * jitter / 1000.0);
        }
        let z = standard_normal(rng);
        let ms = self.median_ms * (self.sigma * z).exp();
        Duration::from_secs_f64(ms.clamp(0.0, 600_000.0) / 1000.0)
    }
}

/// Box–Muller: one standard normal draw from two uniforms.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Outage windows relative to the start of the run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutageSchedule {
    windows: Vec<(Duration, Duration)>,
}

impl OutageSchedule {
    /// Windows whose durations do not parse are refused with the field's message.
    pub fn new(windows: &[OutageWindow]) -> Result<Self, String> {
        let mut out = Vec::new();
        for w in windows {
            let start = w.after.parse()?;
            let len = w.for_.parse()?;
            out.push((start, start + len));
        }
        Ok(Self { windows: out })
    }

    /// Whether `elapsed` (since the run started) falls in an outage.
    pub fn is_down(&self, elapsed: Duration) -> bool {
        self.windows
            .iter()
            .any(|(s, e)| elapsed >= *s && elapsed < *e)
    }
}

/// Side effects as the simulated tools saw them.
///
/// A tool that honours idempotency keys applies an effect once per key; what it cannot do is
/// notice that the same logical step (task id + step) arrived under two different keys, or
/// that a non-idempotent tool was called twice for one step. The ledger records both views,
/// so a duplicated effect is counted whatever caused it.
#[derive(Debug, Default)]
pub struct EffectLedger {
    inner: Mutex<LedgerInner>,
}

#[derive(Debug, Default)]
struct LedgerInner {
    /// Effects applied per logical step `(tool, task, step)`.
    applied: HashMap<(String, String, String), u32>,
    /// Keys already applied, per tool (what an idempotent API remembers).
    keys: HashMap<(String, String), ()>,
}

impl EffectLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a successful call of `tool` for `task`/`step` carrying `key`. If the tool is
    /// idempotent and has seen the key, nothing is applied (the API deduplicates). Returns
    /// whether an effect was applied.
    pub fn apply(&self, tool: &str, idempotent: bool, key: &str, task: &str, step: &str) -> bool {
        let mut g = crate::resilience::lock(&self.inner);
        if idempotent
            && g.keys
                .insert((tool.to_string(), key.to_string()), ())
                .is_some()
        {
            return false;
        }
        *g.applied
            .entry((tool.to_string(), task.to_string(), step.to_string()))
            .or_insert(0) += 1;
        true
    }

    /// Effects applied more than once for the same logical step.
    pub fn duplicate_effects(&self) -> u64 {
        let g = crate::resilience::lock(&self.inner);
        g.applied
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum()
    }

    /// Effects applied in all.
    pub fn effects(&self) -> u64 {
        let g = crate::resilience::lock(&self.inner);
        g.applied.values().map(|n| u64::from(*n)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workflow::TailSpec;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }

    #[test]
    fn latency_model_hits_its_median_and_p99() {
        let m = LatencyModel::new(&LatencySpec {
            median_ms: 40.0,
            p99_ms: Some(120.0),
            tail: None,
        });
        let mut rng = SmallRng::seed_from_u64(7);
        let v: Vec<f64> = (0..100_000)
            .map(|_| m.sample(&mut rng).as_secs_f64() * 1000.0)
            .collect();
        let p50 = percentile(v.clone(), 0.5);
        let p99 = percentile(v, 0.99);
        assert!((p50 - 40.0).abs() < 2.0, "p50 {p50}");
        assert!((p99 - 120.0).abs() < 8.0, "p99 {p99}");
    }

    #[test]
    fn the_tail_shows_up_at_its_probability() {
        let tail = TailSpec {
            probability: 0.02,
            ms: 2000.0,
        };
        let m = LatencyModel::new(&LatencySpec {
            median_ms: 10.0,
            p99_ms: Some(20.0),
            tail: Some(tail),
        });
        let mut rng = SmallRng::seed_from_u64(1);
        let slow = (0..50_000)
            .filter(|_| m.sample(&mut rng) > Duration::from_millis(1000))
            .count();
        let rate = slow as f64 / 50_000.0;
        assert!((rate - 0.02).abs() < 0.003, "slow rate {rate}");
    }

    #[test]
    fn outages_cover_their_window_only() {
        let w = OutageWindow {
            after: "30s".parse_dur(),
            for_: "2m".parse_dur(),
        };
        let s = OutageSchedule::new(&[w]).unwrap();
        assert!(!s.is_down(Duration::from_secs(29)));
        assert!(s.is_down(Duration::from_secs(30)));
        assert!(s.is_down(Duration::from_secs(149)));
        assert!(!s.is_down(Duration::from_secs(150)));
    }

    trait ParseDur {
        fn parse_dur(&self) -> crate::api::DurationStr;
    }
    impl ParseDur for str {
        fn parse_dur(&self) -> crate::api::DurationStr {
            crate::api::DurationStr::new(self)
        }
    }

    #[test]
    fn ledger_counts_duplicates_per_logical_step() {
        let l = EffectLedger::new();
        assert!(l.apply("bank", true, "t1:a", "t1", "a"));
        assert!(
            !l.apply("bank", true, "t1:a", "t1", "a"),
            "same key is deduplicated"
        );
        assert_eq!(l.duplicate_effects(), 0);
        assert!(
            l.apply("bank", true, "t1:a:fresh", "t1", "a"),
            "a fresh key slips past the API"
        );
        assert_eq!(l.duplicate_effects(), 1);
        assert!(l.apply("ledger", false, "t2:b", "t2", "b"));
        assert!(
            l.apply("ledger", false, "t2:b", "t2", "b"),
            "a non-idempotent tool applies twice"
        );
        assert_eq!(l.duplicate_effects(), 2);
        assert_eq!(l.effects(), 4);
    }
}

/// A fault the drill (or a test) imposes on a simulated tool, on top of its own behaviour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ToolFaults {
    /// Every call fails to connect.
    pub outage: bool,
    /// Extra latency added to this share (0..1) of calls.
    pub extra_latency: Option<(Duration, f64)>,
    /// Share (0..1) of calls answered 503.
    pub error_rate: f64,
}

/// Where a simulated tool learns which faults are active right now.
pub trait FaultSource: Send + Sync {
    fn tool_faults(&self, tool: &str) -> ToolFaults;
}

/// No faults.
pub struct NoFaults;

impl FaultSource for NoFaults {
    fn tool_faults(&self, _tool: &str) -> ToolFaults {
        ToolFaults::default()
    }
}
