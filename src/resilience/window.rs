//! Conservative sliding-window counters shared by the retry budget, the hedge
//! load cap and the adaptive throttle.
//!
//! Two series are counted per slot: *deposits* (calls) and *withdrawals*
//! (retries, hedges). tower's `TpsBudget` keeps one net balance per slot, so
//! a withdrawal made in one slot against deposits that later expire is never
//! paid back, and it can exceed the ratio (tower issue #857). Here the two
//! series are kept apart and read asymmetrically:
//!
//! * deposits count only slots lying *entirely* inside `(now - window, now]`
//!   (an under-count),
//! * withdrawals count every slot touching `[now - window, now]` (an
//!   over-count),
//!
//! so `withdrawals <= ratio * deposits + floor` checked against these counts
//! implies it holds for the exact, unbucketed counts too.

use std::time::Duration;

use tokio::time::Instant;

/// Number of slots a window is cut into; more slots = less conservatism.
const SLOTS: u64 = 20;

#[derive(Debug)]
pub struct SlidingCounter {
    origin: Instant,
    slot_width: Duration,
    /// `SLOTS + 1` slots; index = absolute slot number % len.
    slots: Vec<Slot>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Absolute slot number this entry currently holds.
    epoch: u64,
    deposits: u64,
    withdrawals: u64,
}

impl SlidingCounter {
    pub fn new(window: Duration) -> Self {
        // A zero window would divide by zero; one millisecond is "no memory".
        let window = window.max(Duration::from_millis(1));
        let slot_width = (window / SLOTS as u32).max(Duration::from_micros(50));
        SlidingCounter {
            origin: Instant::now(),
            slot_width,
            slots: vec![Slot::default(); SLOTS as usize + 1],
        }
    }

    fn current_epoch(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.origin);
        (since.as_nanos() / self.slot_width.as_nanos().max(1)) as u64
    }

    fn slot_mut(&mut self, epoch: u64) -> &mut Slot {
        let len = self.slots.len() as u64;
        let s = &mut self.slots[(epoch % len) as usize];
        if s.epoch != epoch {
            *s = Slot {
                epoch,
                deposits: 0,
                withdrawals: 0,
            };
        }
        s
    }

    /// Forget everything counted so far.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            *s = Slot::default();
        }
    }

    pub fn deposit(&mut self) {
        let e = self.current_epoch();
        self.slot_mut(e).deposits += 1;
    }

    pub fn withdraw(&mut self) {
        let e = self.current_epoch();
        self.slot_mut(e).withdrawals += 1;
    }

    /// Deposits in slots fully inside the window (under-count).
    pub fn deposits(&self) -> u64 {
        let now = self.current_epoch();
        let oldest = now.saturating_sub(SLOTS - 1);
        self.sum(oldest, now, |s| s.deposits)
    }

    /// Withdrawals in slots touching the window (over-count).
    pub fn withdrawals(&self) -> u64 {
        let now = self.current_epoch();
        let oldest = now.saturating_sub(SLOTS);
        self.sum(oldest, now, |s| s.withdrawals)
    }

    fn sum(&self, oldest: u64, newest: u64, f: impl Fn(&Slot) -> u64) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.epoch >= oldest && s.epoch <= newest)
            .map(f)
            .sum()
    }

    /// Plain `(deposits, withdrawals)` over the same, fully-inside slots, for
    /// users that want a ratio rather than a bound (adaptive throttle).
    pub fn counts(&self) -> (u64, u64) {
        let now = self.current_epoch();
        let oldest = now.saturating_sub(SLOTS - 1);
        (
            self.sum(oldest, now, |s| s.deposits),
            self.sum(oldest, now, |s| s.withdrawals),
        )
    }

    /// Withdraw one unit if `withdrawals + 1 <= ratio * deposits + floor`.
    pub fn try_withdraw(&mut self, ratio: f64, floor: f64) -> bool {
        let allowed = ratio.max(0.0) * self.deposits() as f64 + floor.max(0.0);
        if (self.withdrawals() + 1) as f64 <= allowed {
            self.withdraw();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_window() {
        let mut c = SlidingCounter::new(Duration::from_secs(10));
        for _ in 0..10 {
            c.deposit();
        }
        assert!(c.try_withdraw(0.1, 0.0));
        assert!(!c.try_withdraw(0.1, 0.0));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(c.deposits(), 0);
        assert_eq!(c.withdrawals(), 0);
    }
}
