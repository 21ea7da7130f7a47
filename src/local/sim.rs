//! Simulated agents and tools for `r4 run`: what the manifest's `simulate:` blocks mean.
//!
//! This module owns the behaviour models (latency, errors, outages) and the effect ledger that
//! counts side effects independently of the engine, so `lost` and `duplicate_effects` in the
//! report are measured, not assumed. How tasks reach the simulated agents is the engine's job.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use crate::api::DurationStr;
use crate::api::workflow::{LatencySpec, OutageWindow, SlowdownWindow, ThrottleSimulation};

/// A latency distribution: log-normal fitted to the median and p99, mixed with an optional
/// slow mode ("The Tail at Scale": most calls fast, a few very slow).
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyModel {
    median_ms: f64,
    sigma: f64,
    /// Probability of the slow mode, and its latency.
    tail: Option<(f64, Tail)>,
}

/// The latency of a slow call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tail {
    /// About `ms` (±20%).
    Fixed(f64),
    /// Pareto: `P(X > x) = (scale / x)^shape` for `x >= scale`.
    Pareto { scale_ms: f64, shape: f64 },
}

/// z-score of the 99th percentile of a standard normal distribution.
const Z99: f64 = 2.326_347_874;

/// The longest simulated latency (a Pareto draw can be arbitrarily large).
const MAX_LATENCY_MS: f64 = 600_000.0;

impl LatencyModel {
    pub fn new(spec: &LatencySpec) -> Self {
        let median = spec.median_ms.max(0.0);
        let p99 = spec.p99_ms.unwrap_or(median * 2.0).max(median);
        let sigma = if median > 0.0 && p99 > median {
            (p99 / median).ln() / Z99
        } else {
            0.0
        };
        // Validation makes `ms` and `pareto` exclusive; should both come, the distribution wins.
        let tail = spec.tail.as_ref().and_then(|t| {
            let slow = match (&t.pareto, t.ms) {
                (Some(p), _) => Tail::Pareto {
                    scale_ms: p.scale_ms.max(0.0),
                    shape: p.shape.max(0.01),
                },
                (None, Some(ms)) => Tail::Fixed(ms.max(0.0)),
                (None, None) => return None,
            };
            Some((t.probability.clamp(0.0, 1.0), slow))
        });
        Self {
            median_ms: median,
            sigma,
            tail,
        }
    }

    /// Draw one latency.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        if let Some((p, slow)) = self.tail
            && rng.random::<f64>() < p
        {
            let ms = match slow {
                // Jitter the slow mode ±20% so the tail is a band, not a spike.
                Tail::Fixed(ms) => ms * (0.8 + 0.4 * rng.random::<f64>()),
                // Inverse transform: U uniform in (0, 1], x = scale / U^(1/shape).
                Tail::Pareto { scale_ms, shape } => {
                    let u = 1.0 - rng.random::<f64>();
                    scale_ms / u.powf(1.0 / shape)
                }
            };
            return Duration::from_secs_f64(ms.clamp(0.0, MAX_LATENCY_MS) / 1000.0);
        }
        let z = standard_normal(rng);
        let ms = self.median_ms * (self.sigma * z).exp();
        Duration::from_secs_f64(ms.clamp(0.0, MAX_LATENCY_MS) / 1000.0)
    }
}

/// Box–Muller: one standard normal draw from two uniforms.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Windows relative to the start of the run (outages, throttling).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutageSchedule {
    windows: Vec<(Duration, Duration)>,
}

impl OutageSchedule {
    /// Windows whose durations do not parse are refused with the field's message.
    pub fn new(windows: &[OutageWindow]) -> Result<Self, String> {
        let mut out = Vec::new();
        for w in windows {
            out.push(window(&w.after, &w.for_)?);
        }
        Ok(Self { windows: out })
    }

    /// Whether `elapsed` (since the run started) falls in an outage.
    pub fn is_down(&self, elapsed: Duration) -> bool {
        self.windows
            .iter()
            .any(|(s, e)| elapsed >= *s && elapsed < *e)
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

fn window(after: &DurationStr, len: &DurationStr) -> Result<(Duration, Duration), String> {
    let start = after.parse()?;
    let len = len.parse()?;
    Ok((start, start + len))
}

/// Slow-down windows of a simulated agent: within one, latencies are multiplied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlowdownSchedule {
    windows: Vec<(Duration, Duration, f64)>,
}

impl SlowdownSchedule {
    pub fn new(windows: &[SlowdownWindow]) -> Result<Self, String> {
        let mut out = Vec::new();
        for w in windows {
            let (s, e) = window(&w.after, &w.for_)?;
            out.push((s, e, w.factor.max(0.0)));
        }
        Ok(Self { windows: out })
    }

    /// The latency multiplier at `elapsed` (overlapping windows multiply).
    pub fn factor(&self, elapsed: Duration) -> f64 {
        self.windows
            .iter()
            .filter(|(s, e, _)| elapsed >= *s && elapsed < *e)
            .map(|(_, _, f)| *f)
            .product()
    }
}

/// A simulated tool's rate limiting: a share of calls answered 429 with `Retry-After`,
/// always or within windows.
#[derive(Clone, Debug, PartialEq)]
pub struct ThrottleModel {
    rate: f64,
    retry_after: Duration,
    windows: OutageSchedule,
}

impl ThrottleModel {
    pub fn new(spec: &ThrottleSimulation) -> Result<Self, String> {
        Ok(Self {
            rate: spec.rate.clamp(0.0, 1.0),
            retry_after: Duration::from_millis(u64::try_from(spec.retry_after_ms).unwrap_or(0)),
            windows: OutageSchedule::new(&spec.windows)?,
        })
    }

    /// The wait to ask for if this call (at `elapsed`, with the uniform draw `unit`) is
    /// throttled.
    pub fn throttled(&self, elapsed: Duration, unit: f64) -> Option<Duration> {
        let active = self.windows.is_empty() || self.windows.is_down(elapsed);
        (active && unit < self.rate).then_some(self.retry_after)
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
            ms: Some(2000.0),
            pareto: None,
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
    fn a_pareto_tail_follows_its_power_law() {
        let m = LatencyModel::new(&LatencySpec {
            median_ms: 10.0,
            p99_ms: Some(20.0),
            tail: Some(TailSpec {
                probability: 0.05,
                ms: None,
                pareto: Some(crate::api::workflow::ParetoSpec {
                    scale_ms: 500.0,
                    shape: 1.5,
                }),
            }),
        });
        let mut rng = SmallRng::seed_from_u64(11);
        let n = 200_000;
        // The fast mode never reaches 400 ms (p99 20 ms), so what does is the tail.
        let slow: Vec<f64> = (0..n)
            .map(|_| m.sample(&mut rng).as_secs_f64() * 1000.0)
            .filter(|ms| *ms >= 400.0)
            .collect();
        let rate = slow.len() as f64 / n as f64;
        assert!((rate - 0.05).abs() < 0.003, "slow rate {rate}");
        assert!(
            slow.iter().all(|ms| *ms >= 500.0 - 1e-6),
            "nothing below the scale"
        );
        // P(X > x) = (scale / x)^shape: (1/2)^1.5 = 0.354 above 1 s, (1/10)^1.5 = 0.032
        // above 5 s; the median is scale * 2^(1/shape) = 794 ms.
        let above = |x: f64| slow.iter().filter(|ms| **ms > x).count() as f64 / slow.len() as f64;
        assert!((above(1000.0) - 0.354).abs() < 0.02, "{}", above(1000.0));
        assert!((above(5000.0) - 0.0316).abs() < 0.006, "{}", above(5000.0));
        let p50 = percentile(slow.clone(), 0.5);
        assert!((p50 - 793.7).abs() < 30.0, "tail median {p50}");
        // A fixed tail stays within ±20% of its value.
        let fixed = LatencyModel::new(&LatencySpec {
            median_ms: 1.0,
            p99_ms: None,
            tail: Some(TailSpec {
                probability: 1.0,
                ms: Some(1000.0),
                pareto: None,
            }),
        });
        for _ in 0..1000 {
            let ms = fixed.sample(&mut rng).as_secs_f64() * 1000.0;
            assert!((800.0..=1200.0).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn slowdowns_multiply_within_their_window() {
        let w = |after: &str, len: &str, factor: f64| SlowdownWindow {
            after: after.parse_dur(),
            for_: len.parse_dur(),
            factor,
        };
        let s = SlowdownSchedule::new(&[w("10s", "10s", 4.0), w("15s", "10s", 2.0)]).unwrap();
        assert_eq!(s.factor(Duration::from_secs(9)), 1.0);
        assert_eq!(s.factor(Duration::from_secs(10)), 4.0);
        assert_eq!(s.factor(Duration::from_secs(16)), 8.0, "overlaps multiply");
        assert_eq!(s.factor(Duration::from_secs(24)), 2.0);
        assert_eq!(s.factor(Duration::from_secs(25)), 1.0);
        assert!(SlowdownSchedule::new(&[w("soon", "1s", 2.0)]).is_err());
    }

    #[test]
    fn throttling_hits_its_rate_within_its_windows() {
        let spec = |windows: Vec<OutageWindow>| ThrottleSimulation {
            rate: 0.02,
            retry_after_ms: 500,
            windows,
        };
        let always = ThrottleModel::new(&spec(vec![])).unwrap();
        let mut rng = SmallRng::seed_from_u64(5);
        let n = 100_000;
        let hits: Vec<Duration> = (0..n)
            .filter_map(|_| always.throttled(Duration::from_secs(1), rng.random()))
            .collect();
        let rate = hits.len() as f64 / n as f64;
        assert!((rate - 0.02).abs() < 0.002, "{rate}");
        assert!(hits.iter().all(|d| *d == Duration::from_millis(500)));
        let windowed = ThrottleModel::new(&spec(vec![OutageWindow {
            after: "1m".parse_dur(),
            for_: "30s".parse_dur(),
        }]))
        .unwrap();
        assert_eq!(windowed.throttled(Duration::from_secs(59), 0.0), None);
        assert_eq!(
            windowed.throttled(Duration::from_secs(60), 0.0),
            Some(Duration::from_millis(500))
        );
        assert_eq!(windowed.throttled(Duration::from_secs(60), 0.5), None);
        assert_eq!(windowed.throttled(Duration::from_secs(90), 0.0), None);
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
