//! The fused [`Admission`] of the PostgreSQL backend: the limits and the hold in one statement.

use std::fmt;

use super::{
    ledger::{Corrections, Limits, Reserved},
    limiter::{decision, Meta},
    to_i64, BoxFuture, PostgresLedger, PostgresLimiter,
};
use crate::{
    credits::{
        ledger::{Hold, Reservation, ReserveRequest, Settlement},
        Admission, Verdict,
    },
    ratelimit::{Charge, Correction, Decision, Outcome},
    BackendError,
};

/// The rate limits and the credit hold in **one statement, one round trip**, both or neither;
/// then the settlement and the token correction in one more. Made by
/// [`PostgresBackend::admission`](super::PostgresBackend::admission), for
/// [`CreditsLayer::rate_limit_with`](crate::credits::CreditsLayer::rate_limit_with).
///
/// # Example
///
/// ```no_run
/// use tollgate::credits::{CreditsLayer, Pricing};
/// use tollgate::postgres::PostgresBackend;
/// use tollgate::ratelimit::{Plan, Plans, RateLimitLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = PostgresBackend::connect("postgres://localhost/tollgate").await?;
/// let limits = RateLimitLayer::new(backend.limiter(), Plans::new(Plan::new().requests_per_minute(60)));
/// let layer = CreditsLayer::new(backend.ledger(), Pricing::flat(1))
///     .rate_limit_with(limits, backend.admission());
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresAdmission {
    ledger: PostgresLedger,
    limiter: PostgresLimiter,
}

impl PostgresAdmission {
    pub(super) fn new(ledger: PostgresLedger, limiter: PostgresLimiter) -> Self {
        PostgresAdmission { ledger, limiter }
    }
}

impl Admission for PostgresAdmission {
    type Limiter = PostgresLimiter;
    type AdmitFuture = BoxFuture<Verdict>;
    type SettleFuture = BoxFuture<Result<Settlement, BackendError>>;

    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> Self::AdmitFuture {
        let (buckets, meta) = self.limiter.buckets(&charges);
        let now_ns = self.limiter.frozen_ns();
        let call = self.ledger.reserve_charging(request, buckets, now_ns);
        Box::pin(async move {
            let decision = |limits: &Limits, meta: &[Meta]| match limits {
                Some((verdict, idx, wait, rels)) if !meta.is_empty() => {
                    decision(*verdict, *idx, *wait, rels, meta)
                }
                // Nothing to charge, or the hold was already placed (a repeated id).
                _ => Ok(Decision::new(Outcome::Allowed)),
            };
            match call.await {
                Ok(Reserved::Held(hold, limits)) => Verdict::Admitted {
                    decision: decision(&limits, &meta).unwrap_or_else(|error| {
                        tracing::warn!(%error, "rate-limit status unreadable");
                        Decision::new(Outcome::Allowed)
                    }),
                    reservation: Reservation::Held(hold),
                },
                Ok(Reserved::Replayed(limits)) => Verdict::Admitted {
                    decision: decision(&limits, &meta).unwrap_or(Decision::new(Outcome::Allowed)),
                    reservation: Reservation::Replayed,
                },
                Ok(Reserved::Limited(limits)) => match decision(&limits, &meta) {
                    Ok(decision) => Verdict::Limited(decision),
                    Err(error) => Verdict::Refused(error.into()),
                },
                Err(error) => Verdict::Refused(error),
            }
        })
    }

    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> Self::SettleFuture {
        self.ledger.close_correcting(
            hold.account(),
            to_i64(hold.id()),
            "settle",
            actual,
            false,
            Corrections::Always(self.limiter.corrections(corrections)),
        )
    }
}

impl fmt::Debug for PostgresAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresAdmission")
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}
