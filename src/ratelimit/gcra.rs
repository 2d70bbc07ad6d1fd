//! The GCRA arithmetic, on nanoseconds since the limiter's start.
//!
//! Bit for bit the algorithm of `governor` 0.10 (`gcra.rs`): a cell costs `t` (the quota's
//! replenish interval), the tolerance is `tau = t * (burst - 1)`, `n` cells conform at `now` when
//! `now >= tat + t * (n - 1) - tau`, and then `tat = max(tat, now) + t * n`. A differential test
//! below runs random sequences against `governor::RateLimiter` and asserts the same decisions and
//! wait times. A distributed backend (a Redis Lua script) implements the same few lines.

use governor::Quota;

use super::LimitStatus;

/// A quota as GCRA parameters, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// The emission interval: the cost of one cell.
    pub(crate) t: u64,
    /// The burst size.
    pub(crate) burst: u64,
}

/// What one bucket says about `n` cells at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// They conform; the new theoretical arrival time.
    Conform { tat: u64 },
    /// They do not conform before `wait` nanoseconds have passed.
    Wait { wait: u64 },
    /// More cells than the bucket can ever hold.
    TooLarge,
}

impl Gcra {
    pub(crate) fn new(quota: Quota) -> Gcra {
        let t = u64::try_from(quota.replenish_interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Gcra {
            t,
            burst: u64::from(quota.burst_size().get()),
        }
    }

    /// The tolerance: what a full bucket holds beyond one cell.
    pub(crate) fn tau(self) -> u64 {
        self.t.saturating_mul(self.burst - 1)
    }

    /// Test `n` cells against the state `tat` (`None`: a fresh bucket).
    pub(crate) fn test(self, tat: Option<u64>, now: u64, n: u64) -> Verdict {
        if n == 0 {
            return Verdict::Conform {
                tat: tat.unwrap_or(now),
            };
        }
        if n > self.burst {
            return Verdict::TooLarge;
        }
        let tat = tat.unwrap_or(now);
        let additional = self.t.saturating_mul(n - 1);
        let earliest = tat.saturating_add(additional).saturating_sub(self.tau());
        if now < earliest {
            Verdict::Wait {
                wait: earliest - now,
            }
        } else {
            Verdict::Conform {
                tat: tat.max(now).saturating_add(self.t.saturating_mul(n)),
            }
        }
    }

    /// The most a bucket can owe: one window beyond empty (`tat − now ≤ 2 × t × burst`), so
    /// that one absurd correction refuses the subject for at most one window.
    pub(crate) fn max_debt(self) -> u64 {
        self.t.saturating_mul(self.burst).saturating_mul(2)
    }

    /// Apply a correction of `delta` cells after the fact: more cells are consumed
    /// unconditionally (the work is done), at most [`max_debt`](Self::max_debt) ahead of `now`;
    /// fewer are given back, never beyond a full bucket.
    pub(crate) fn correct(self, tat: Option<u64>, now: u64, delta: i64) -> Option<u64> {
        let cells = self.t.saturating_mul(delta.unsigned_abs());
        match (tat, delta >= 0) {
            (tat, true) => Some(
                tat.unwrap_or(now)
                    .max(now)
                    .saturating_add(cells)
                    .min(now.saturating_add(self.max_debt())),
            ),
            // A bucket that is not tracked is full: nothing to give back.
            (None, false) => None,
            (Some(tat), false) => Some(tat.saturating_sub(cells).max(now)),
        }
    }

    /// What the headers say about a bucket in state `tat` at `now`.
    pub(crate) fn status(self, tat: Option<u64>, now: u64) -> LimitStatus {
        let tat = tat.unwrap_or(now);
        let capacity = now
            .saturating_add(self.tau())
            .saturating_add(self.t)
            .saturating_sub(tat);
        LimitStatus {
            limit: self.burst,
            window: std::time::Duration::from_nanos(self.t.saturating_mul(self.burst)),
            remaining: (capacity / self.t).min(self.burst),
            reset: std::time::Duration::from_nanos(tat.saturating_sub(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use governor::{clock::FakeRelativeClock, RateLimiter};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The same decisions and wait times as governor's own limiter.
        #[test]
        fn same_decisions_as_governor(
            burst in 1u32..20,
            period_ms in 1u64..2_000,
            steps in prop::collection::vec((0u64..1_500, 1u32..25), 1..60),
        ) {
            let quota = Quota::with_period(Duration::from_millis(period_ms))
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let clock = FakeRelativeClock::default();
            let governor = RateLimiter::direct_with_clock(quota, clock.clone());
            let gcra = Gcra::new(quota);
            let mut tat = None;
            let mut now = 0u64;
            for (advance_ms, n) in steps {
                clock.advance(Duration::from_millis(advance_ms));
                now += advance_ms * 1_000_000;
                let theirs = governor.check_n(NonZeroU32::new(n).unwrap());
                let ours = gcra.test(tat, now, u64::from(n));
                match (theirs, ours) {
                    (Err(_), Verdict::TooLarge) => {}
                    (Ok(Ok(())), Verdict::Conform { tat: next }) => tat = Some(next),
                    (Ok(Err(not_until)), Verdict::Wait { wait }) => {
                        let from = governor::clock::Clock::now(&clock);
                        prop_assert_eq!(not_until.wait_time_from(from), Duration::from_nanos(wait));
                    }
                    (theirs, ours) => prop_assert!(false, "governor {:?}, ours {:?}", theirs, ours),
                }
            }
        }
    }

    #[test]
    fn refund_is_exact_and_never_beyond_full() {
        let g = Gcra::new(Quota::per_second(NonZeroU32::new(10).unwrap()));
        let Verdict::Conform { tat } = g.test(None, 0, 8) else {
            panic!()
        };
        // Used 3 of the 8: the state is as if 3 had been taken.
        let corrected = g.correct(Some(tat), 0, -5);
        let Verdict::Conform { tat: three } = g.test(None, 0, 3) else {
            panic!()
        };
        assert_eq!(corrected, Some(three));
        // Giving back more than was taken leaves a full bucket, not a fuller one.
        assert_eq!(g.correct(Some(three), 0, -100), Some(0));
        assert_eq!(g.status(Some(0), 0).remaining, 10);
    }
}
