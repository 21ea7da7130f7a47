//! Runtime policy configuration.
//!
//! `PolicyConfig` mirrors `CircuitPolicy.spec` of the CRD but is plain Rust
//! (`std::time::Duration`, enums) so the layers never parse strings. Every
//! section is optional: `None` switches the mechanism off, which keeps the
//! default config a transparent pass-through. (Configs built from a spec always carry an
//! overall timeout: [`DEFAULT_OVERALL_TIMEOUT`].)

use std::collections::HashSet;
use std::time::Duration;

/// Whole policy for one target (tool, model endpoint, ...).
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    pub timeout: Option<TimeoutConfig>,
    pub retry: Option<RetryConfig>,
    pub hedge: Option<HedgeConfig>,
    pub circuit_breaker: Option<BreakerConfig>,
    pub bulkhead: Option<BulkheadConfig>,
    pub throttle: Option<ThrottleConfig>,
    pub fallback: Option<FallbackConfig>,
    /// Seed for every random choice (jitter, throttle, ...). `None` seeds from
    /// the OS; tests and benches set it so runs are reproducible.
    pub seed: Option<u64>,
}

/// Deadline of a logical tool call when its policy sets no `timeout.overall` (or there is
/// no policy): a tool that never answers fails the call after this, never hangs it.
pub const DEFAULT_OVERALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default)]
pub struct TimeoutConfig {
    /// Deadline of each single attempt (including hedged copies).
    pub per_attempt: Option<Duration>,
    /// Deadline of the logical call, across retries and backoff sleeps.
    pub overall: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct RetryConfig {
    /// Attempts including the first one; 1 means "never retry".
    pub max_attempts: u32,
    pub backoff: BackoffConfig,
    /// `None` means retries are not limited by a budget (not recommended).
    pub budget: Option<BudgetConfig>,
    pub retry_on: HashSet<RetryOn>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            backoff: BackoffConfig::default(),
            budget: Some(BudgetConfig::default()),
            retry_on: [RetryOn::Timeout, RetryOn::ConnectError, RetryOn::Status5xx]
                .into_iter()
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    Timeout,
    ConnectError,
    Status5xx,
    Status429,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }
}

/// Jitter strategies from the AWS architecture blog "Exponential Backoff And
/// Jitter"; jitter spreads synchronized retries of many clients apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    Full,
    Equal,
    Decorrelated,
    None,
}

impl From<crate::api::policy::Jitter> for Jitter {
    fn from(j: crate::api::policy::Jitter) -> Self {
        use crate::api::policy::Jitter as Spec;
        match j {
            Spec::Full => Jitter::Full,
            Spec::Equal => Jitter::Equal,
            Spec::Decorrelated => Jitter::Decorrelated,
            Spec::None => Jitter::None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BudgetConfig {
    /// Retries allowed per logical call over the window (SRE book: 0.1).
    pub ratio: f64,
    /// Retries always allowed per second, so low-traffic targets can retry.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.1,
            min_per_second: 1,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HedgeConfig {
    pub enabled: bool,
    pub delay: HedgeDelay,
    /// Hedged requests allowed per logical call over `window` (0.05 = 5%).
    pub max_extra_load: f64,
    pub only_idempotent: bool,
    /// No percentile-based hedging until this many latencies are recorded.
    pub min_samples: u64,
    /// Rotation period of the latency histogram and of the load window.
    /// Not in the CRD yet; defaults to 10 s.
    pub window: Duration,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            enabled: true,
            delay: HedgeDelay::Percentile(95.0),
            max_extra_load: 0.05,
            only_idempotent: true,
            min_samples: 100,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum HedgeDelay {
    /// Percentile in `0.0..=100.0` of recently observed attempt latencies.
    Percentile(f64),
    Fixed(Duration),
}

#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Failure rate in `0.0..=1.0` at or above which the breaker opens.
    pub failure_rate_threshold: f64,
    /// Slow-call rate in `0.0..=1.0` at or above which the breaker opens.
    pub slow_call_rate_threshold: f64,
    pub slow_call_duration: Duration,
    pub window: BreakerWindow,
    /// Rates are not evaluated before the window holds this many calls.
    pub minimum_calls: u32,
    pub open_duration: Duration,
    /// Probes let through in half-open; all must succeed to close.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(60),
            window: BreakerWindow::Count(100),
            minimum_calls: 20,
            open_duration: Duration::from_secs(30),
            half_open_calls: 5,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum BreakerWindow {
    /// The last `n` calls.
    Count(u32),
    /// Calls of the last duration.
    Time(Duration),
}

#[derive(Clone, Debug)]
pub struct BulkheadConfig {
    pub max_concurrent: usize,
}

#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    pub enabled: bool,
    /// SRE book's K: 2.0 lets through twice the accepted rate.
    pub k: f64,
    pub window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            enabled: true,
            k: 2.0,
            window: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub enum FallbackConfig {
    #[default]
    None,
    /// Serve the last good response for the same cache key if younger than `ttl`.
    Cache { ttl: Duration },
    /// Serve this value (converted by `PolicyResponse::from_static`).
    Static(serde_json::Value),
}
