//! Retry budget (Google SRE book, ch. 22: "retry budget" of ~10%).
//!
//! Every logical call deposits one token; every retry withdraws one. A retry
//! is allowed while retries in the window stay within
//! `ratio * calls + min_per_second * window`, so when a dependency fails
//! completely the retry traffic adds at most `ratio` load instead of
//! multiplying it by `max_attempts`.
//!
//! The window is a [`SlidingCounter`], which keeps deposits and withdrawals in
//! separate series and reads them conservatively; that avoids the
//! over-allocation of tower's `TpsBudget` (tower issue #857), see the module
//! docs of `window`.

use std::sync::{Arc, Mutex};

use super::config::BudgetConfig;
use super::lock;
use super::window::SlidingCounter;

#[derive(Clone, Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor: f64,
    window: Arc<Mutex<SlidingCounter>>,
}

impl RetryBudget {
    pub fn new(cfg: &BudgetConfig) -> Self {
        RetryBudget {
            ratio: cfg.ratio,
            floor: f64::from(cfg.min_per_second) * cfg.window.as_secs_f64(),
            window: Arc::new(Mutex::new(SlidingCounter::new(cfg.window))),
        }
    }

    /// Record one logical call.
    pub fn deposit(&self) {
        lock(&self.window).deposit();
    }

    /// Take permission for one retry; `false` means "do not retry".
    pub fn try_withdraw(&self) -> bool {
        lock(&self.window).try_withdraw(self.ratio, self.floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::collections::VecDeque;
    use std::time::Duration;
    use tokio::time::{Instant, advance};

    /// Property-style: random bursts of calls and retry attempts over a paused
    /// clock; at every granted retry, the exact (unbucketed) counts of the
    /// trailing window must respect the budget.
    #[tokio::test(start_paused = true)]
    async fn never_exceeds_budget_under_random_patterns() {
        for seed in 0..20u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let window = Duration::from_secs(rng.random_range(1..=10));
            let cfg = BudgetConfig {
                ratio: rng.random_range(0.0..0.5),
                min_per_second: rng.random_range(0..3),
                window,
            };
            let budget = RetryBudget::new(&cfg);
            let floor = f64::from(cfg.min_per_second) * window.as_secs_f64();
            let mut calls: VecDeque<Instant> = VecDeque::new();
            let mut retries: VecDeque<Instant> = VecDeque::new();
            let mut granted = 0u32;
            for _ in 0..3000 {
                // Bursty time steps: sometimes idle for more than a window.
                let step = match rng.random_range(0..10) {
                    0 => rng.random_range(0..window.as_millis() as u64 * 2),
                    _ => rng.random_range(0..50),
                };
                advance(Duration::from_millis(step)).await;
                let now = Instant::now();
                for _ in 0..rng.random_range(0..5) {
                    budget.deposit();
                    calls.push_back(now);
                }
                for _ in 0..rng.random_range(0..8) {
                    if budget.try_withdraw() {
                        granted += 1;
                        retries.push_back(now);
                        let since = now - window;
                        while calls.front().is_some_and(|t| *t <= since) {
                            calls.pop_front();
                        }
                        while retries.front().is_some_and(|t| *t < since) {
                            retries.pop_front();
                        }
                        let allowed = cfg.ratio * calls.len() as f64 + floor;
                        assert!(
                            retries.len() as f64 <= allowed + 1e-9,
                            "seed {seed}: {} retries > {allowed} allowed",
                            retries.len()
                        );
                    }
                }
            }
            assert!(granted > 0, "seed {seed}: budget never granted anything");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ten_percent_rule() {
        let budget = RetryBudget::new(&BudgetConfig {
            ratio: 0.1,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 10);
    }
}
