//! The `Limiter` trait: the one thing a rate-limit backend implements.

use std::{fmt, future::Future, net::IpAddr, sync::Arc, time::Duration};

use governor::Quota;

use crate::{BackendError, LimitKind};

/// Who a bucket counts for.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Subject {
    /// One API key (its id, never the key).
    Key(Arc<str>),
    /// One account, all its keys together.
    Account(Arc<str>),
    /// A request without a [`Caller`](crate::Caller), by client IP.
    Ip(IpAddr),
    /// A request with neither a `Caller` nor a known client IP: all such requests share one bucket.
    Anonymous,
    /// All callers together (the global limit).
    Global,
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Key(id) => write!(f, "key:{id}"),
            Subject::Account(id) => write!(f, "account:{id}"),
            Subject::Ip(ip) => write!(f, "ip:{ip}"),
            Subject::Anonymous => f.write_str("anonymous"),
            Subject::Global => f.write_str("global"),
        }
    }
}

/// The identity of one token bucket: a subject, the policy (plan, route override or global
/// limit) and the limit's position in it.
///
/// Its [`Display`](fmt::Display) form, `{policy}|{index}|{subject}`, is a stable name a
/// distributed backend can use as a storage key.
///
/// ```
/// use tollgate::ratelimit::{BucketKey, Subject};
///
/// let key = BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0);
/// assert_eq!(key.to_string(), "plan:free|0|account:acct_1");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    subject: Subject,
    policy: Arc<str>,
    index: u8,
}

impl BucketKey {
    /// The bucket of `subject` for limit number `index` of `policy`.
    pub fn new(subject: Subject, policy: impl Into<Arc<str>>, index: u8) -> Self {
        BucketKey {
            subject,
            policy: policy.into(),
            index,
        }
    }

    /// Who the bucket counts for.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The policy: `plan:{name}`, `route:{path}` or `global`.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The limit's position in its policy.
    pub fn index(&self) -> u8 {
        self.index
    }
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}|{}", self.policy, self.index, self.subject)
    }
}

impl fmt::Debug for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BucketKey({self})")
    }
}

/// One bucket to charge in a [`Limiter::check`]: its key, its quota and the cost.
///
/// A request charges one cell to each requests limit and its estimated tokens to each tokens
/// limit. A cost of zero always conforms and consumes nothing (its status is still reported).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The bucket.
    pub key: BucketKey,
    /// What the bucket counts.
    pub kind: LimitKind,
    /// Its quota (GCRA: one cell per `replenish_interval`, at most `burst_size` at once).
    pub quota: Quota,
    /// Cells to take.
    pub cost: u64,
}

/// A correction of a bucket after the fact, see [`Limiter::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Correction {
    /// The bucket.
    pub key: BucketKey,
    /// Its quota.
    pub quota: Quota,
    /// Cells to take (positive) or give back (negative).
    pub delta: i64,
}

/// The state of the most restrictive limit of one kind, as the headers show it.
///
/// ```
/// use std::time::Duration;
/// use tollgate::ratelimit::LimitStatus;
///
/// // 100 requests per minute, 99 left, full again in 600 ms.
/// let status = LimitStatus { limit: 100, window: Duration::from_secs(60), remaining: 99, reset: Duration::from_millis(600) };
/// assert_eq!(status.window.as_secs(), 60);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    /// Cells a full bucket holds (the quota's burst size).
    pub limit: u64,
    /// The time a full bucket takes to refill from empty (`limit` × replenish interval).
    pub window: Duration,
    /// Cells that could be taken now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl LimitStatus {
    /// Whether `self` is tighter than `other`: fewer cells left, or (as many) a longer reset.
    fn tighter_than(&self, other: &LimitStatus) -> bool {
        (self.remaining, std::cmp::Reverse(self.reset))
            < (other.remaining, std::cmp::Reverse(other.reset))
    }
}

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every bucket was charged.
    Allowed,
    /// No bucket was charged: `limit` refuses for `retry_after` (the longest wait of all the
    /// refusing buckets, so a retry then conforms if nothing else was charged meanwhile).
    Refused {
        /// The kind of the bucket with the longest wait.
        limit: LimitKind,
        /// Exactly when the refused charge would conform.
        retry_after: Duration,
    },
    /// No bucket was charged: the cost is more than a full bucket of `limit` holds, so the
    /// request can never pass.
    TooLarge {
        /// The bucket's kind.
        limit: LimitKind,
        /// The cost asked.
        requested: u64,
        /// What a full bucket holds.
        capacity: u64,
    },
}

/// The answer of [`Limiter::check`]: the outcome and, per kind, the most restrictive bucket.
///
/// ```
/// use std::time::Duration;
/// use tollgate::ratelimit::{Decision, LimitStatus, Outcome};
/// use tollgate::LimitKind;
///
/// let mut decision = Decision::new(Outcome::Allowed);
/// let status = |remaining| LimitStatus { limit: 10, window: Duration::from_secs(1), remaining, reset: Duration::ZERO };
/// decision.observe(LimitKind::Requests, status(7));
/// decision.observe(LimitKind::Requests, status(3));
/// assert_eq!(decision.status(LimitKind::Requests).unwrap().remaining, 3);
/// assert!(decision.is_allowed());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    outcome: Outcome,
    requests: Option<LimitStatus>,
    tokens: Option<LimitStatus>,
}

impl Decision {
    /// A decision with no bucket observed yet.
    pub fn new(outcome: Outcome) -> Self {
        Decision {
            outcome,
            requests: None,
            tokens: None,
        }
    }

    /// Record a bucket's state (after the charge when allowed, unchanged when refused); the
    /// tightest one of each kind is kept.
    pub fn observe(&mut self, kind: LimitKind, status: LimitStatus) {
        let slot = match kind {
            LimitKind::Requests => &mut self.requests,
            LimitKind::Tokens => &mut self.tokens,
        };
        if slot.is_none_or(|current| status.tighter_than(&current)) {
            *slot = Some(status);
        }
    }

    /// The outcome.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Whether every bucket was charged.
    pub fn is_allowed(&self) -> bool {
        matches!(self.outcome, Outcome::Allowed)
    }

    /// The most restrictive bucket of `kind`, if the check had one.
    pub fn status(&self, kind: LimitKind) -> Option<LimitStatus> {
        match kind {
            LimitKind::Requests => self.requests,
            LimitKind::Tokens => self.tokens,
        }
    }
}

/// A rate-limit backend: GCRA token buckets, checked all-or-nothing.
///
/// The in-memory [`MemoryLimiter`](super::MemoryLimiter) is the default; a distributed backend
/// (Redis, one Lua script per call) implements the same two calls and passes the same
/// [conformance vectors](super::conformance).
///
/// # Semantics
///
/// Every bucket is a GCRA (generic cell rate algorithm) state: a theoretical arrival time `tat`.
/// With `t` the quota's replenish interval and `tau = t × (burst − 1)`, a charge of `n ≥ 1` cells
/// at `now` conforms when `n ≤ burst` and `now ≥ tat + t × (n − 1) − tau`, and then sets
/// `tat = max(tat, now) + t × n`; an untracked bucket has `tat = now`. These are governor's
/// semantics exactly.
///
/// - [`check`](Limiter::check) is **all-or-nothing**: either every charge conforms and all are
///   applied, or none is applied and the outcome is refused with the longest wait of the refusing
///   buckets (or `TooLarge` when a cost exceeds a full bucket). Concurrent checks on the same
///   buckets are linearizable.
/// - [`settle`](Limiter::settle) applies corrections without refusing: a positive delta sets
///   `tat = min(max(tat, now) + t × delta, now + 2 × t × burst)` (the bucket may go into debt,
///   which delays later requests, by at most one window: an absurd reported usage cannot lock a
///   subject out for longer), a negative one sets `tat = max(tat − t × |delta|, now)` (a refund, never beyond a
///   full bucket). A refund exactly undoes a charge made in the same window.
/// - A bucket with `tat ≤ now` is full and indistinguishable from an untracked one, so a backend
///   may forget it (the memory backend evicts it, Redis lets the key expire at `tat`).
///
/// # Example
///
/// ```
/// use std::num::NonZeroU32;
/// use governor::Quota;
/// use tollgate::ratelimit::{BucketKey, Charge, Limiter, MemoryLimiter, Subject};
/// use tollgate::LimitKind;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = MemoryLimiter::new();
/// let charge = Charge {
///     key: BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0),
///     kind: LimitKind::Requests,
///     quota: Quota::per_minute(NonZeroU32::new(2).unwrap()),
///     cost: 1,
/// };
/// let charges = [charge];
/// assert!(limiter.check(&charges).await.unwrap().is_allowed());
/// assert!(limiter.check(&charges).await.unwrap().is_allowed());
/// assert!(!limiter.check(&charges).await.unwrap().is_allowed());
/// # }
/// ```
pub trait Limiter: Clone + Send + Sync + 'static {
    /// The future of a check. The memory backend answers with [`std::future::Ready`].
    type Future: Future<Output = Result<Decision, BackendError>> + Send + 'static;

    /// The future of a settlement. Polled once where the correction is made (the end or drop of
    /// a response body) and spawned on the current Tokio runtime if not ready then.
    type SettleFuture: Future<Output = Result<(), BackendError>> + Send + Unpin + 'static;

    /// Charge every bucket or none. See the [semantics](Limiter#semantics).
    fn check(&self, charges: &[Charge]) -> Self::Future;

    /// The answer of [`check`](Limiter::check) at once, for a backend that decides without
    /// waiting (the in-memory one); `None` (the default) when the check must be awaited.
    ///
    /// When it answers, the rate-limit layer calls the inner service directly instead of
    /// keeping it in its response future: no clone of the inner service, a smaller future. A
    /// backend that answers here has made the check (charged the buckets), exactly as
    /// [`check`](Limiter::check) would.
    #[inline]
    fn check_now(&self, charges: &[Charge]) -> Option<Result<Decision, BackendError>> {
        let _ = charges;
        None
    }

    /// Correct buckets after the fact (token usage known from the response).
    fn settle(&self, corrections: &[Correction]) -> Self::SettleFuture;
}
