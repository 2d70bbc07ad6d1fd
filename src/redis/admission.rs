//! The fused [`Admission`] of the Redis backend: the limits and the hold in one script.

use std::fmt;

use super::{
    ledger::{Corrections, Reserved},
    limiter::decision,
    BoxFuture, RedisLedger, RedisLimiter,
};
use crate::{
    credits::{
        ledger::{Hold, Reservation, ReserveRequest, Settlement},
        Admission, TwoStep, Verdict,
    },
    ratelimit::{Charge, Correction, Decision, Outcome},
    BackendError,
};

/// The rate limits and the credit hold in **one script, one round trip**, both or neither;
/// then the settlement and the token correction in one more. Made by
/// [`RedisBackend::admission`](super::RedisBackend::admission), for
/// [`CreditsLayer::rate_limit_with`](crate::credits::CreditsLayer::rate_limit_with).
///
/// A script stays in one hash slot (Redis Cluster), so only the account's own buckets (keyed
/// by account, in its `{acct:ID}` slot) join it: a request charged to per-key or global
/// buckets is admitted in the two calls of [`TwoStep`] instead, with the same answers.
///
/// # Example
///
/// ```no_run
/// use tollgate::credits::{CreditsLayer, Pricing};
/// use tollgate::ratelimit::{Plan, Plans, RateLimitLayer};
/// use tollgate::redis::RedisBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = RedisBackend::connect("redis://127.0.0.1/").await?;
/// let limits = RateLimitLayer::new(backend.limiter(), Plans::new(Plan::new().requests_per_minute(60)));
/// let layer = CreditsLayer::new(backend.ledger(), Pricing::flat(1))
///     .rate_limit_with(limits, backend.admission());
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisAdmission {
    ledger: RedisLedger,
    limiter: RedisLimiter,
}

impl RedisAdmission {
    pub(super) fn new(ledger: RedisLedger, limiter: RedisLimiter) -> Self {
        RedisAdmission { ledger, limiter }
    }

    fn two_step(&self) -> TwoStep<RedisLedger, RedisLimiter> {
        TwoStep::new(self.ledger.clone(), self.limiter.clone())
    }
}

impl Admission for RedisAdmission {
    type Limiter = RedisLimiter;
    type AdmitFuture = BoxFuture<Verdict>;
    type SettleFuture = BoxFuture<Result<Settlement, BackendError>>;

    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> Self::AdmitFuture {
        if !RedisLedger::in_slot(&request.account, charges.iter().map(|c| &c.key)) {
            return self.two_step().admit(charges, request);
        }
        let (buckets, meta) = self.limiter.buckets(&charges);
        let call = self.ledger.reserve_charging(request, buckets);
        Box::pin(async move {
            let decision = |limits: &[i64]| {
                if meta.is_empty() || limits.is_empty() {
                    // Nothing to charge, or the hold was already placed (a repeated id).
                    return Ok(Decision::new(Outcome::Allowed));
                }
                decision(limits, &meta)
            };
            match call.await {
                Ok(Reserved::Held(hold, limits)) => Verdict::Admitted {
                    decision: decision(&limits).unwrap_or_else(|error| {
                        tracing::warn!(%error, "rate-limit status unreadable");
                        Decision::new(Outcome::Allowed)
                    }),
                    reservation: Reservation::Held(hold),
                },
                Ok(Reserved::Replayed(limits)) => Verdict::Admitted {
                    decision: decision(&limits).unwrap_or(Decision::new(Outcome::Allowed)),
                    reservation: Reservation::Replayed,
                },
                Ok(Reserved::Limited(limits)) => match decision(&limits) {
                    Ok(decision) => Verdict::Limited(decision),
                    Err(error) => Verdict::Refused(error.into()),
                },
                Err(error) => Verdict::Refused(error),
            }
        })
    }

    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> Self::SettleFuture {
        if !RedisLedger::in_slot(hold.account(), corrections.iter().map(|c| &c.key)) {
            return self.two_step().settle(hold, actual, corrections);
        }
        self.ledger.close_correcting(
            hold.account(),
            hold.id(),
            "settle",
            actual,
            false,
            Corrections::Always(self.limiter.corrections(corrections)),
        )
    }
}

impl fmt::Debug for RedisAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAdmission")
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}
