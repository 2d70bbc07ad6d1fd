//! Test vectors every [`Limiter`] must pass, with a fake clock.
//!
//! They pin the GCRA semantics of [`Limiter`] (burst, refill, exact retry times, all-or-nothing,
//! settlement) so a distributed backend runs the very same scenarios: build the backend on a clock
//! the test controls and call [`run`] with a function that advances that clock.
//!
//! ```
//! use governor::clock::FakeRelativeClock;
//! use tollgate::ratelimit::{conformance, MemoryLimiter};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let clock = FakeRelativeClock::default();
//! let limiter = MemoryLimiter::with_clock(clock.clone());
//! conformance::run(&limiter, |d| clock.advance(d)).await;
//! # }
//! ```

use std::{num::NonZeroU32, time::Duration};

use governor::Quota;

use super::{BucketKey, Charge, Correction, Limiter, Outcome, Subject};
use crate::LimitKind;

/// One step of a vector.
#[derive(Clone, Debug)]
pub enum Step {
    /// Advance the clock.
    Advance(Duration),
    /// Check these costs (one per limit of the vector, in order) and expect an outcome, with the
    /// remaining requests and tokens the decision reports.
    Check {
        /// Cost per limit.
        costs: Vec<u64>,
        /// The expected outcome.
        outcome: Outcome,
        /// The expected remaining requests, if the vector has a requests limit.
        requests: Option<u64>,
        /// The expected remaining tokens, if the vector has a tokens limit.
        tokens: Option<u64>,
    },
    /// Settle every tokens limit by `delta`.
    Settle(i64),
}

/// A named scenario on a set of limits.
#[derive(Clone, Debug)]
pub struct Vector {
    /// The name (also the subject's key id, so vectors do not share buckets).
    pub name: &'static str,
    /// The limits.
    pub limits: Vec<(LimitKind, Quota)>,
    /// The steps.
    pub steps: Vec<Step>,
}

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("non-zero")
}

fn ok(costs: &[u64], requests: Option<u64>, tokens: Option<u64>) -> Step {
    Step::Check {
        costs: costs.to_vec(),
        outcome: Outcome::Allowed,
        requests,
        tokens,
    }
}

fn refused(
    costs: &[u64],
    limit: LimitKind,
    ms: u64,
    requests: Option<u64>,
    tokens: Option<u64>,
) -> Step {
    Step::Check {
        costs: costs.to_vec(),
        outcome: Outcome::Refused {
            limit,
            retry_after: Duration::from_millis(ms),
        },
        requests,
        tokens,
    }
}

fn ms(v: u64) -> Step {
    Step::Advance(Duration::from_millis(v))
}

/// Every vector.
pub fn vectors() -> Vec<Vector> {
    use LimitKind::{Requests, Tokens};
    vec![
        Vector {
            name: "burst-then-refusal",
            limits: vec![(Requests, Quota::per_minute(n(3)))],
            steps: vec![
                ok(&[1], Some(2), None),
                ok(&[1], Some(1), None),
                ok(&[1], Some(0), None),
                refused(&[1], Requests, 20_000, Some(0), None),
            ],
        },
        Vector {
            name: "refill-timing",
            limits: vec![(Requests, Quota::per_second(n(2)))],
            steps: vec![
                ok(&[1], Some(1), None),
                ok(&[1], Some(0), None),
                ms(499),
                refused(&[1], Requests, 1, Some(0), None),
                ms(1),
                ok(&[1], Some(0), None),
                ms(1_000),
                ok(&[1], Some(1), None),
            ],
        },
        Vector {
            name: "retry-after-exact-100-rpm",
            limits: vec![(Requests, Quota::per_minute(n(100)))],
            steps: {
                let mut steps: Vec<Step> = (0..100).map(|i| ok(&[1], Some(99 - i), None)).collect();
                steps.push(refused(&[1], Requests, 600, Some(0), None));
                steps.push(ms(599));
                steps.push(refused(&[1], Requests, 1, Some(0), None));
                steps.push(ms(1));
                steps.push(ok(&[1], Some(0), None));
                steps
            },
        },
        Vector {
            name: "burst-larger-than-rate",
            limits: vec![(Requests, Quota::per_second(n(1)).allow_burst(n(3)))],
            steps: vec![
                ok(&[1], Some(2), None),
                ok(&[1], Some(1), None),
                ok(&[1], Some(0), None),
                refused(&[1], Requests, 1_000, Some(0), None),
                ms(2_500),
                ok(&[1], Some(1), None),
            ],
        },
        Vector {
            name: "all-or-nothing",
            limits: vec![
                (Requests, Quota::per_minute(n(10))),
                (Tokens, Quota::per_minute(n(100))),
            ],
            steps: vec![
                ok(&[1, 80], Some(9), Some(20)),
                // Tokens refuse: the requests limit is not charged either.
                refused(&[1, 30], Tokens, 6_000, Some(9), Some(20)),
                ok(&[1, 20], Some(8), Some(0)),
            ],
        },
        Vector {
            name: "longest-wait-wins",
            limits: vec![
                (Requests, Quota::per_second(n(1))),
                (Tokens, Quota::per_second(n(10))),
            ],
            steps: vec![
                ok(&[1, 10], Some(0), Some(0)),
                refused(&[1, 10], Requests, 1_000, Some(0), Some(0)),
                ms(500),
                // Requests need 500 ms more, tokens need 500 ms more for 10: tie → requests.
                refused(&[1, 10], Requests, 500, Some(0), Some(5)),
                ms(500),
                ok(&[1, 10], Some(0), Some(0)),
            ],
        },
        Vector {
            name: "too-large",
            limits: vec![(Tokens, Quota::per_minute(n(100)))],
            steps: vec![
                Step::Check {
                    costs: vec![101],
                    outcome: Outcome::TooLarge {
                        limit: Tokens,
                        requested: 101,
                        capacity: 100,
                    },
                    requests: None,
                    tokens: Some(100),
                },
                ok(&[100], None, Some(0)),
            ],
        },
        Vector {
            name: "zero-cost-passes",
            limits: vec![(Tokens, Quota::per_minute(n(60)))],
            steps: vec![ok(&[60], None, Some(0)), ok(&[0], None, Some(0))],
        },
        Vector {
            name: "settle-refund-and-debt",
            limits: vec![(Tokens, Quota::per_minute(n(60)))],
            steps: vec![
                ok(&[50], None, Some(10)),
                // Used 10 of the 50: 40 come back.
                Step::Settle(-40),
                ok(&[0], None, Some(50)),
                // A refund never makes a bucket fuller than full.
                Step::Settle(-1_000),
                ok(&[0], None, Some(60)),
                ok(&[60], None, Some(0)),
                // Used 30 more than charged: a debt of 30 s.
                Step::Settle(30),
                refused(&[1], Tokens, 31_000, None, Some(0)),
                ms(31_000),
                ok(&[1], None, Some(0)),
            ],
        },
        Vector {
            name: "absurd-debt-is-capped-at-one-window",
            limits: vec![(Tokens, Quota::per_minute(n(60)))],
            steps: vec![
                ok(&[1], None, Some(59)),
                // An absurd reported usage: the debt stops one window past empty (120 s ahead),
                // so the next token conforms after 61 s, not after centuries.
                Step::Settle(i64::MAX),
                refused(&[1], Tokens, 61_000, None, Some(0)),
                ms(61_000),
                ok(&[1], None, Some(0)),
            ],
        },
    ]
}

/// Run every vector against `limiter`; `advance` moves the limiter's clock forward.
///
/// # Panics
///
/// On the first step whose decision differs, naming the vector and the step.
pub async fn run<L: Limiter>(limiter: &L, advance: impl Fn(Duration)) {
    for vector in vectors() {
        let subject = Subject::Key(vector.name.into());
        let keys: Vec<BucketKey> = (0..vector.limits.len())
            .map(|i| BucketKey::new(subject.clone(), "conformance", i as u8))
            .collect();
        for (i, step) in vector.steps.iter().enumerate() {
            match step {
                Step::Advance(d) => advance(*d),
                Step::Settle(delta) => {
                    let corrections: Vec<Correction> = vector
                        .limits
                        .iter()
                        .zip(&keys)
                        .filter(|((kind, _), _)| *kind == LimitKind::Tokens)
                        .map(|((_, quota), key)| Correction {
                            key: key.clone(),
                            quota: *quota,
                            delta: *delta,
                        })
                        .collect();
                    limiter
                        .settle(&corrections)
                        .await
                        .unwrap_or_else(|e| panic!("{} step {i}: {e}", vector.name));
                }
                Step::Check {
                    costs,
                    outcome,
                    requests,
                    tokens,
                } => {
                    let charges: Vec<Charge> = vector
                        .limits
                        .iter()
                        .zip(&keys)
                        .zip(costs)
                        .map(|(((kind, quota), key), cost)| Charge {
                            key: key.clone(),
                            kind: *kind,
                            quota: *quota,
                            cost: *cost,
                        })
                        .collect();
                    let decision = limiter
                        .check(&charges)
                        .await
                        .unwrap_or_else(|e| panic!("{} step {i}: {e}", vector.name));
                    let got = (
                        decision.outcome(),
                        decision.status(LimitKind::Requests).map(|s| s.remaining),
                        decision.status(LimitKind::Tokens).map(|s| s.remaining),
                    );
                    assert_eq!(
                        got,
                        (*outcome, *requests, *tokens),
                        "vector {} step {i}",
                        vector.name
                    );
                }
            }
        }
    }
}

/// Random sequences of checks, settlements and clock steps: `limiter` must decide exactly as a
/// [`MemoryLimiter`](super::MemoryLimiter) on a fake clock does, outcome and statuses alike.
///
/// Each of `rounds` rounds draws two quotas (a requests limit with a random period and burst, a
/// tokens limit per second) and runs `steps` steps on a fresh subject; the draws come from a fixed
/// seed, so a failure names a round that fails again. `advance` moves the limiter's clock forward.
///
/// ```
/// use governor::clock::FakeRelativeClock;
/// use tollgate::ratelimit::{conformance, MemoryLimiter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = FakeRelativeClock::default();
/// let limiter = MemoryLimiter::with_clock(clock.clone());
/// conformance::same_as_memory(&limiter, 10, 20, |d| clock.advance(d)).await;
/// # }
/// ```
///
/// # Panics
///
/// On the first decision that differs, naming the round.
pub async fn same_as_memory<L: Limiter>(
    limiter: &L,
    rounds: usize,
    steps: usize,
    advance: impl Fn(Duration),
) {
    let fake = governor::clock::FakeRelativeClock::default();
    let memory = super::MemoryLimiter::with_clock(fake.clone());
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    for round in 0..rounds {
        let burst = NonZeroU32::new(1 + next(10) as u32).expect("at least 1");
        let quotas = [
            Quota::with_period(Duration::from_millis(1 + next(700)))
                .expect("a period above zero")
                .allow_burst(burst),
            Quota::per_second(NonZeroU32::new(1 + next(50) as u32).expect("at least 1")),
        ];
        let subject = Subject::Key(format!("random-{round}").into());
        let keys: Vec<_> = (0..2u8)
            .map(|i| BucketKey::new(subject.clone(), "p", i))
            .collect();
        for _ in 0..steps {
            let step = Duration::from_nanos(next(400_000_000));
            fake.advance(step);
            advance(step);
            if next(5) == 0 {
                let corrections = [Correction {
                    key: keys[1].clone(),
                    quota: quotas[1],
                    delta: next(20) as i64 - 10,
                }];
                memory.settle(&corrections).await.expect("memory settles");
                limiter
                    .settle(&corrections)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                continue;
            }
            let charges: Vec<Charge> = [LimitKind::Requests, LimitKind::Tokens]
                .into_iter()
                .enumerate()
                .map(|(i, kind)| Charge {
                    key: keys[i].clone(),
                    kind,
                    quota: quotas[i],
                    cost: next(12),
                })
                .collect();
            let ours = limiter
                .check(&charges)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let theirs = memory.check(&charges).await.expect("memory checks");
            assert_eq!(ours, theirs, "round {round}");
        }
    }
}
