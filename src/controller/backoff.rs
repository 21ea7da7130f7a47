//! Per-object exponential error backoff for the reconcilers' error policy.
//!
//! kube-runtime requeues a failed object after a fixed delay chosen by the error policy; it
//! keeps no count of consecutive failures per object (kube-rs #1916). [`ErrorBackoff`] keeps
//! that count: the n-th consecutive failure of one key waits `base·2^(n-1)`, capped at `max`,
//! with ±10% jitter so objects that failed together do not retry in lockstep. A success
//! resets the key. What a key is (`namespace/name` of the object, usually) is the caller's;
//! when to call [`ErrorBackoff::failed`] / [`ErrorBackoff::succeeded`] is the reconciler's.
//!
//! Use: the error policy requeues with `Action::requeue(ctx.backoff.failed(&key))`; a
//! reconcile that succeeds calls `ctx.backoff.succeeded(&key)` before returning its action.
//!
//! Memory is bounded: a key not touched for [`FORGET_AFTER_FACTOR`]`·max` is forgotten (its
//! next failure starts over at `base`, which is what a long-quiet object deserves), and at
//! most [`MAX_KEYS`] keys are kept — past that the least recently touched go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Most keys remembered at once (a controller of 1,000s of objects stays far below).
pub const MAX_KEYS: usize = 100_000;

/// A key untouched for this many `max` delays is forgotten.
pub const FORGET_AFTER_FACTOR: u32 = 10;

/// Relative jitter around the nominal delay (±10%).
const JITTER: f64 = 0.1;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    touched: Instant,
}

/// Consecutive failures per object key, and the delay before each one's next retry.
/// Shared through an `Arc` by the error policy (failures) and the reconcile (successes).
#[derive(Debug)]
pub struct ErrorBackoff {
    base: Duration,
    max: Duration,
    max_keys: usize,
    entries: Mutex<HashMap<String, Entry>>,
}

impl ErrorBackoff {
    /// First retry after `base`, doubling per consecutive failure up to `max` (a `max` below
    /// `base` is raised to `base`).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self::with_max_keys(base, max, MAX_KEYS)
    }

    fn with_max_keys(base: Duration, max: Duration, max_keys: usize) -> Self {
        Self {
            base,
            max: max.max(base),
            max_keys: max_keys.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Record one more failure of `key`; the delay before its next retry (jittered ±10%).
    pub fn failed(&self, key: &str) -> Duration {
        let failures = {
            let mut entries = self.lock();
            let now = Instant::now();
            self.forget_stale(&mut entries, now);
            if !entries.contains_key(key) && entries.len() >= self.max_keys {
                evict_oldest(&mut entries);
            }
            let e = entries.entry(key.to_owned()).or_insert(Entry {
                failures: 0,
                touched: now,
            });
            if self.is_stale(e, now) {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.touched = now;
            e.failures
        };
        jitter(self.nominal(failures))
    }

    /// `key` reconciled: its next failure starts over at `base`.
    pub fn succeeded(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Consecutive failures of `key` so far (0 after a success or once forgotten).
    pub fn failures(&self, key: &str) -> u32 {
        let entries = self.lock();
        match entries.get(key) {
            Some(e) if !self.is_stale(e, Instant::now()) => e.failures,
            _ => 0,
        }
    }

    /// Keys remembered now (for tests and a gauge).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No key remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The un-jittered delay after `failures` consecutive failures.
    fn nominal(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let nanos = (self.base.as_nanos()).saturating_mul(u128::from(factor));
        let max = self.max.as_nanos();
        Duration::from_nanos(u64::try_from(nanos.min(max)).unwrap_or(u64::MAX))
    }

    fn forget_after(&self) -> Duration {
        self.max.saturating_mul(FORGET_AFTER_FACTOR)
    }

    fn is_stale(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.touched) > self.forget_after()
    }

    fn forget_stale(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        // A sweep is O(keys); doing it only when the map is at least half full keeps a failure
        // O(1) amortised while the bound still holds.
        if entries.len() * 2 >= self.max_keys {
            entries.retain(|_, e| !self.is_stale(e, now));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves counters that are still valid numbers.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn evict_oldest(entries: &mut HashMap<String, Entry>) {
    if let Some(k) = entries
        .iter()
        .min_by_key(|(_, e)| e.touched)
        .map(|(k, _)| k.clone())
    {
        entries.remove(&k);
    }
}

fn jitter(d: Duration) -> Duration {
    let f = rand::rng().random_range((1.0 - JITTER)..=(1.0 + JITTER));
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    fn within_jitter(got: Duration, nominal: Duration) -> bool {
        let lo = nominal.mul_f64(1.0 - JITTER - 1e-9);
        let hi = nominal.mul_f64(1.0 + JITTER + 1e-9);
        got >= lo && got <= hi
    }

    #[tokio::test(start_paused = true)]
    async fn doubles_per_consecutive_failure() {
        let b = ErrorBackoff::new(BASE, MAX);
        for n in 1..=7u32 {
            let d = b.failed("ns/a");
            let nominal = BASE * 2u32.pow(n - 1);
            assert!(
                within_jitter(d, nominal),
                "failure {n}: {d:?} vs {nominal:?}"
            );
            assert_eq!(b.failures("ns/a"), n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn capped_at_max_even_after_very_many_failures() {
        let b = ErrorBackoff::new(BASE, MAX);
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            last = b.failed("ns/a");
            assert!(last <= MAX.mul_f64(1.0 + JITTER + 1e-9), "{last:?}");
        }
        assert!(within_jitter(last, MAX));
        assert_eq!(b.failures("ns/a"), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_delays() {
        let b = ErrorBackoff::new(BASE, MAX);
        let delays: std::collections::BTreeSet<_> = (0..50)
            .map(|i| {
                let k = format!("k{i}");
                b.failed(&k)
            })
            .collect();
        assert!(delays.len() > 10, "jitter should vary: {delays:?}");
        assert!(delays.iter().all(|d| within_jitter(*d, BASE)));
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets() {
        let b = ErrorBackoff::new(BASE, MAX);
        for _ in 0..5 {
            b.failed("ns/a");
        }
        b.succeeded("ns/a");
        assert_eq!(b.failures("ns/a"), 0);
        assert!(within_jitter(b.failed("ns/a"), BASE));
        // A success of a key never seen is harmless.
        b.succeeded("ns/never");
        assert_eq!(b.failures("ns/never"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent() {
        let b = ErrorBackoff::new(BASE, MAX);
        for _ in 0..4 {
            b.failed("ns/a");
        }
        assert!(within_jitter(b.failed("ns/b"), BASE));
        assert_eq!((b.failures("ns/a"), b.failures("ns/b")), (4, 1));
        b.succeeded("ns/b");
        assert_eq!(b.failures("ns/a"), 4, "a success of b must not reset a");
    }

    #[tokio::test(start_paused = true)]
    async fn max_below_base_is_raised_and_zero_base_works() {
        let b = ErrorBackoff::new(Duration::from_secs(1), Duration::from_millis(1));
        assert!(within_jitter(b.failed("a"), Duration::from_secs(1)));
        assert!(within_jitter(b.failed("a"), Duration::from_secs(1)));
        let z = ErrorBackoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(z.failed("a"), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_by_key_count() {
        let b = ErrorBackoff::with_max_keys(BASE, MAX, 100);
        for i in 0..10_000 {
            b.failed(&format!("ns/obj-{i}"));
            // Distinct touch times, so "least recently touched" is well defined.
            tokio::time::advance(Duration::from_micros(1)).await;
        }
        assert!(b.len() <= 100, "{} keys kept", b.len());
        // The newest key survived, the oldest went.
        assert_eq!(b.failures("ns/obj-9999"), 1);
        assert_eq!(b.failures("ns/obj-0"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_not_seen_for_long_are_forgotten() {
        let b = ErrorBackoff::with_max_keys(BASE, MAX, 4);
        for _ in 0..6 {
            b.failed("ns/old");
        }
        b.failed("ns/x");
        tokio::time::advance(MAX * FORGET_AFTER_FACTOR + Duration::from_secs(1)).await;
        // Forgotten from the caller's point of view at once…
        assert_eq!(b.failures("ns/old"), 0);
        // …and dropped from memory by the next failure's sweep.
        b.failed("ns/new");
        assert_eq!(b.len(), 1);
        // A forgotten key starts over at base.
        assert!(within_jitter(b.failed("ns/old"), BASE));
    }

    #[tokio::test(start_paused = true)]
    async fn shared_between_tasks() {
        let b = std::sync::Arc::new(ErrorBackoff::new(BASE, MAX));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        b.failed("ns/shared");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(b.failures("ns/shared"), 80);
    }
}
