//! From the user's `CircuitPolicy` (strings, optional fields) to the runtime [`PolicyConfig`]
//! (durations, defaults filled in). The defaults a user gets for an omitted field are decided
//! here and documented in the README; nothing else in r4 fills them in.

use std::time::Duration;

use crate::api::policy::{self, CircuitPolicySpec, WindowKind};
use crate::api::validate::FieldError;
use crate::api::workflow::FallbackSpec;
use crate::api::{DurationStr, parse_duration};

use super::config::*;

fn d(path: &str, v: &DurationStr) -> Result<Duration, FieldError> {
    parse_duration(&v.0).map_err(|e| FieldError::new(path, e))
}

fn opt(path: &str, v: Option<&DurationStr>) -> Result<Option<Duration>, FieldError> {
    v.map(|v| d(path, v)).transpose()
}

impl PolicyConfig {
    /// The runtime policy for one tool: its `CircuitPolicy` (or none: pass-through but for
    /// the deadline) and the tool's own fallback. Errors name the field, as `r4 validate`
    /// does. The call always has an overall deadline: see [`with_default_deadline`].
    pub fn from_spec(
        spec: Option<&CircuitPolicySpec>,
        fallback: Option<&FallbackSpec>,
    ) -> Result<Self, FieldError> {
        Self::from_spec_inner(spec, fallback).map(with_default_deadline)
    }

    fn from_spec_inner(
        spec: Option<&CircuitPolicySpec>,
        fallback: Option<&FallbackSpec>,
    ) -> Result<Self, FieldError> {
        let mut cfg = PolicyConfig::default();
        if let Some(f) = fallback {
            cfg.fallback = Some(match (&f.cache, &f.static_response) {
                (Some(c), _) => FallbackConfig::Cache {
                    ttl: d("fallback.cache.ttl", &c.ttl)?,
                },
                (None, Some(v)) => FallbackConfig::Static(v.clone()),
                (None, None) => FallbackConfig::None,
            });
        }
        let Some(spec) = spec else { return Ok(cfg) };
        if let Some(t) = &spec.timeout {
            cfg.timeout = Some(TimeoutConfig {
                per_attempt: opt("spec.timeout.perAttempt", t.per_attempt.as_ref())?,
                overall: opt("spec.timeout.overall", t.overall.as_ref())?,
            });
        }
        if let Some(r) = &spec.retry {
            let mut retry = RetryConfig {
                max_attempts: r.max_attempts.max(1) as u32,
                ..Default::default()
            };
            if let Some(b) = &r.backoff {
                retry.backoff = BackoffConfig {
                    initial: d("spec.retry.backoff.initial", &b.initial)?,
                    max: d("spec.retry.backoff.max", &b.max)?,
                    multiplier: b.multiplier.unwrap_or(2.0),
                    jitter: b.jitter.unwrap_or(policy::Jitter::Full).into(),
                };
            }
            retry.budget = match &r.budget {
                Some(b) => Some(BudgetConfig {
                    ratio: b.ratio,
                    min_per_second: b.min_per_second.unwrap_or(10).max(0) as u32,
                    window: opt("spec.retry.budget.window", b.window.as_ref())?
                        .unwrap_or(Duration::from_secs(10)),
                }),
                // A retry without a budget is how retry storms start: default to the SRE book's 10%.
                None => Some(BudgetConfig {
                    ratio: 0.1,
                    min_per_second: 10,
                    window: Duration::from_secs(10),
                }),
            };
            if !r.retry_on.is_empty() {
                retry.retry_on = r
                    .retry_on
                    .iter()
                    .map(|c| match c {
                        policy::RetryOn::Timeout => RetryOn::Timeout,
                        policy::RetryOn::ConnectError => RetryOn::ConnectError,
                        policy::RetryOn::Status5xx => RetryOn::Status5xx,
                        policy::RetryOn::Status429 => RetryOn::Status429,
                    })
                    .collect();
            } else {
                retry.retry_on.insert(RetryOn::Status429);
            }
            cfg.retry = Some(retry);
        }
        if let Some(h) = &spec.hedge
            && h.enabled
        {
            let delay = match &h.delay {
                Some(policy::HedgeDelay { fixed: Some(f), .. }) => {
                    HedgeDelay::Fixed(d("spec.hedge.delay.fixed", f)?)
                }
                Some(policy::HedgeDelay {
                    percentile: Some(p),
                    ..
                }) => HedgeDelay::Percentile(*p),
                _ => HedgeDelay::Percentile(95.0),
            };
            cfg.hedge = Some(HedgeConfig {
                enabled: true,
                delay,
                max_extra_load: h.max_extra_load.unwrap_or(0.05),
                only_idempotent: h.only_idempotent.unwrap_or(true),
                min_samples: h.min_samples.unwrap_or(100).max(1) as u64,
                ..Default::default()
            });
        }
        if let Some(cb) = &spec.circuit_breaker {
            let window = match cb.window.kind {
                WindowKind::Count => {
                    BreakerWindow::Count(cb.window.size.unwrap_or(100).max(1) as u32)
                }
                WindowKind::Time => BreakerWindow::Time(Duration::from_secs(
                    cb.window.seconds.unwrap_or(30).max(1) as u64,
                )),
            };
            cfg.circuit_breaker = Some(BreakerConfig {
                failure_rate_threshold: cb.failure_rate_threshold,
                slow_call_rate_threshold: cb.slow_call_rate_threshold.unwrap_or(1.0),
                slow_call_duration: opt(
                    "spec.circuitBreaker.slowCallDuration",
                    cb.slow_call_duration.as_ref(),
                )?
                .unwrap_or(Duration::from_secs(60)),
                window,
                minimum_calls: cb.minimum_calls.unwrap_or(20).max(1) as u32,
                open_duration: d("spec.circuitBreaker.openDuration", &cb.open_duration)?,
                half_open_calls: cb.half_open_calls.unwrap_or(3).max(1) as u32,
            });
        }
        if let Some(b) = &spec.bulkhead {
            cfg.bulkhead = Some(BulkheadConfig {
                max_concurrent: b.max_concurrent.max(1) as usize,
            });
        }
        if let Some(t) = &spec.throttle
            && t.enabled
        {
            cfg.throttle = Some(ThrottleConfig {
                enabled: true,
                k: t.k.unwrap_or(2.0),
                window: opt("spec.throttle.window", t.window.as_ref())?
                    .unwrap_or(Duration::from_secs(120)),
            });
        }
        Ok(cfg)
    }
}

/// Give a policy without `timeout.overall` one: [`DEFAULT_OVERALL_TIMEOUT`], or, when
/// `perAttempt` is set, enough for every attempt (`perAttempt × maxAttempts` plus the
/// backoff ceiling between them) if that is longer.
fn with_default_deadline(mut cfg: PolicyConfig) -> PolicyConfig {
    let t = cfg.timeout.get_or_insert_with(TimeoutConfig::default);
    if t.overall.is_none() {
        let attempts = cfg.retry.as_ref().map_or(1, |r| r.max_attempts.max(1));
        let backoff = cfg.retry.as_ref().map_or(Duration::ZERO, |r| r.backoff.max);
        let all_attempts = t.per_attempt.map_or(Duration::ZERO, |p| {
            p.saturating_mul(attempts)
                .saturating_add(backoff.saturating_mul(attempts - 1))
        });
        t.overall = Some(DEFAULT_OVERALL_TIMEOUT.max(all_attempts));
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> CircuitPolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_bank_policy_maps_field_by_field() {
        let spec = policy(
            r#"
timeout: {perAttempt: 1s, overall: 5s}
retry: {maxAttempts: 3, backoff: {initial: 50ms, max: 1s, jitter: Decorrelated}, budget: {ratio: 0.2}, retryOn: [Timeout]}
hedge: {enabled: true, delay: {fixed: 150ms}, maxExtraLoad: 0.02}
circuitBreaker: {failureRateThreshold: 0.5, window: {type: Time, seconds: 10}, openDuration: 5s, halfOpenCalls: 2}
bulkhead: {maxConcurrent: 8}
throttle: {enabled: true, k: 1.5}
"#,
        );
        let cfg = PolicyConfig::from_spec(Some(&spec), None).unwrap();
        let t = cfg.timeout.unwrap();
        assert_eq!(
            (t.per_attempt, t.overall),
            (Some(Duration::from_secs(1)), Some(Duration::from_secs(5)))
        );
        let r = cfg.retry.unwrap();
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.backoff.jitter, Jitter::Decorrelated);
        assert_eq!(r.backoff.initial, Duration::from_millis(50));
        assert_eq!(r.budget.as_ref().unwrap().ratio, 0.2);
        assert_eq!(r.budget.unwrap().min_per_second, 10);
        assert_eq!(r.retry_on.len(), 1);
        let h = cfg.hedge.unwrap();
        assert_eq!(h.delay, HedgeDelay::Fixed(Duration::from_millis(150)));
        assert_eq!(h.max_extra_load, 0.02);
        assert!(h.only_idempotent);
        let b = cfg.circuit_breaker.unwrap();
        assert_eq!(b.window, BreakerWindow::Time(Duration::from_secs(10)));
        assert_eq!((b.half_open_calls, b.minimum_calls), (2, 20));
        assert_eq!(cfg.bulkhead.unwrap().max_concurrent, 8);
        assert_eq!(cfg.throttle.unwrap().k, 1.5);
    }

    #[test]
    fn disabled_hedging_and_no_policy_are_pass_through() {
        let spec = policy("hedge: {enabled: false}\n");
        let cfg = PolicyConfig::from_spec(Some(&spec), None).unwrap();
        assert!(cfg.hedge.is_none() && cfg.retry.is_none() && cfg.circuit_breaker.is_none());
        let cfg = PolicyConfig::from_spec(None, None).unwrap();
        assert!(cfg.retry.is_none() && cfg.fallback.is_none());
    }

    #[test]
    fn every_call_has_a_deadline() {
        let overall = |yaml: Option<&str>| {
            let spec = yaml.map(policy);
            PolicyConfig::from_spec(spec.as_ref(), None)
                .unwrap()
                .timeout
                .and_then(|t| t.overall)
        };
        assert_eq!(overall(None), Some(DEFAULT_OVERALL_TIMEOUT));
        assert_eq!(
            overall(Some("bulkhead: {maxConcurrent: 4}\n")),
            Some(DEFAULT_OVERALL_TIMEOUT)
        );
        assert_eq!(
            overall(Some("timeout: {overall: 90s}\n")),
            Some(Duration::from_secs(90))
        );
        // Long attempts keep their retries: 3 × 20 s + 2 × 1 s.
        assert_eq!(
            overall(Some(
                "timeout: {perAttempt: 20s}\nretry: {maxAttempts: 3, backoff: {initial: 10ms, max: 1s}}\n"
            )),
            Some(Duration::from_secs(62))
        );
    }

    #[test]
    fn retries_without_a_budget_get_the_ten_percent_rule() {
        let cfg =
            PolicyConfig::from_spec(Some(&policy("retry: {maxAttempts: 4}\n")), None).unwrap();
        let b = cfg.retry.unwrap().budget.unwrap();
        assert_eq!((b.ratio, b.min_per_second), (0.1, 10));
    }

    #[test]
    fn the_tool_fallback_is_carried() {
        let f: FallbackSpec = serde_yaml::from_str("cache: {ttl: 10m}").unwrap();
        let cfg = PolicyConfig::from_spec(None, Some(&f)).unwrap();
        assert!(
            matches!(cfg.fallback, Some(FallbackConfig::Cache { ttl }) if ttl == Duration::from_secs(600))
        );
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let mut spec = policy(
            "circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 10}, openDuration: 5s}\n",
        );
        if let Some(cb) = spec.circuit_breaker.as_mut() {
            cb.open_duration = DurationStr::new("5 seconds");
        }
        let err = PolicyConfig::from_spec(Some(&spec), None).unwrap_err();
        assert_eq!(err.path, "spec.circuitBreaker.openDuration");
    }
}
