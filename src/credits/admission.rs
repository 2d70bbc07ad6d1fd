//! `Admission`: the rate limits and the credit hold of a request, both or neither.

use std::{future::Future, pin::Pin};

use super::ledger::{Hold, Ledger, Reservation, ReserveError, ReserveRequest, Settlement};
use crate::{
    ratelimit::{Charge, Correction, Decision, Limiter},
    BackendError, LimitKind,
};

/// Charges a request's rate limits and places its credit hold, both or neither; later settles
/// the hold and corrects the tokens limits: the two steps of
/// [`CreditsLayer::rate_limit`](super::CreditsLayer::rate_limit).
///
/// Two implementations ship with the crate:
///
/// - [`TwoStep`], for any [`Ledger`] and [`Limiter`]: the limits are checked, then the hold is
///   placed; a refused hold gives the limits back. Between the two calls another request may
///   see the limits charged.
/// - a fused one that a backend keeping both in one place offers:
///   [`RedisBackend::admission`](crate::redis::RedisBackend::admission) (one script, one round
///   trip) and [`PostgresBackend::admission`](crate::postgres::PostgresBackend::admission) (one
///   statement). It is chosen by its type, so wrapping it (for metrics, say) keeps it fused.
///
/// # Example
///
/// ```
/// use std::num::NonZeroU32;
/// use governor::Quota;
/// use tollgate::credits::{Admission, LedgerAdmin, MemoryLedger, TwoStep, Verdict, ledger::ReserveRequest};
/// use tollgate::ratelimit::{BucketKey, Charge, MemoryLimiter, Subject};
/// use tollgate::LimitKind;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ledger = MemoryLedger::new();
/// ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
/// let admission = TwoStep::new(ledger.clone(), MemoryLimiter::new());
/// let charges = vec![Charge {
///     key: BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0),
///     kind: LimitKind::Requests,
///     quota: Quota::per_minute(NonZeroU32::new(1).unwrap()),
///     cost: 1,
/// }];
/// let admitted = admission.admit(charges.clone(), ReserveRequest::new("acct_1", 4)).await;
/// assert!(matches!(admitted, Verdict::Admitted { .. }));
///
/// // The bucket is empty now: refused, and nothing more is held.
/// let refused = admission.admit(charges, ReserveRequest::new("acct_1", 4)).await;
/// assert!(matches!(refused, Verdict::Limited(_)));
/// assert_eq!(ledger.balance("acct_1").await.unwrap().available, 6);
/// # }
/// ```
pub trait Admission: Clone + Send + Sync + 'static {
    /// The limiter whose buckets are charged (requests without a hold use it alone).
    type Limiter: Limiter;
    /// The future of [`admit`](Admission::admit).
    type AdmitFuture: Future<Output = Verdict> + Send + 'static;
    /// The future of [`settle`](Admission::settle); `Unpin` as
    /// [`Ledger::SettleFuture`] is.
    type SettleFuture: Future<Output = Result<Settlement, BackendError>> + Send + Unpin + 'static;

    /// Charge the rate limits `charges` and place the hold of `request`, both or neither.
    ///
    /// The limits are checked first: when they refuse, nothing is held and the answer is
    /// [`Verdict::Limited`]. When the ledger then refuses (insufficient credits, an idempotency
    /// key in use or reused, a backend error), the limits are not charged either and the answer
    /// is [`Verdict::Refused`]. An idempotent [`Reservation::Replayed`] charges the limits: the
    /// inner service is called again.
    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> Self::AdmitFuture;

    /// Close `hold` charging `actual` (as [`Ledger::settle`]) and apply `corrections` to the
    /// limits (as [`Limiter::settle`]): the tokens a response reported against the estimate
    /// charged before the call.
    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> Self::SettleFuture;
}

/// What [`Admission::admit`] decided.
#[derive(Debug)]
#[non_exhaustive]
pub enum Verdict {
    /// Every limit was charged and the ledger answered with `reservation` (a hold, or an
    /// idempotent replay).
    Admitted {
        /// The limits after the charge, for the rate-limit headers.
        decision: Decision,
        /// The hold, or [`Reservation::Replayed`].
        reservation: Reservation,
    },
    /// A limit refused: nothing was charged and nothing is held.
    Limited(Decision),
    /// The ledger refused or could not answer: nothing is held and no limit stays charged.
    Refused(ReserveError),
}

/// [`Admission`] in two calls, for any [`Ledger`] and [`Limiter`]: check the limits, reserve,
/// refund the limits when the reserve is refused; settle the hold, then correct the limits.
///
/// See [`Admission`] for an example.
#[derive(Clone, Debug)]
pub struct TwoStep<L, R> {
    ledger: L,
    limiter: R,
}

impl<L, R> TwoStep<L, R> {
    /// Admit requests on `ledger` and `limiter`.
    pub fn new(ledger: L, limiter: R) -> Self {
        TwoStep { ledger, limiter }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<L: Ledger + Clone, R: Limiter> Admission for TwoStep<L, R> {
    type Limiter = R;
    type AdmitFuture = BoxFuture<Verdict>;
    type SettleFuture = BoxFuture<Result<Settlement, BackendError>>;

    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> Self::AdmitFuture {
        let (ledger, limiter) = (self.ledger.clone(), self.limiter.clone());
        Box::pin(async move {
            let decision = match limiter.check(&charges).await {
                Ok(decision) => decision,
                Err(error) => return Verdict::Refused(ReserveError::Backend(error)),
            };
            if !decision.is_allowed() {
                return Verdict::Limited(decision);
            }
            match ledger.reserve(request).await {
                Ok(reservation) => Verdict::Admitted {
                    decision,
                    reservation,
                },
                Err(error)
                    if decision.status(LimitKind::Requests).is_none()
                        && decision.status(LimitKind::Tokens).is_none() =>
                {
                    // Allowed without charging any bucket (a limiter failing open): nothing to
                    // give back.
                    Verdict::Refused(error)
                }
                Err(error) => {
                    let refunds: Vec<Correction> = charges
                        .into_iter()
                        .filter(|c| c.cost > 0)
                        .map(|c| Correction {
                            key: c.key,
                            quota: c.quota,
                            delta: -i64::try_from(c.cost).unwrap_or(i64::MAX),
                        })
                        .collect();
                    if let Err(refund) = limiter.settle(&refunds).await {
                        tracing::warn!(error = %refund, "rate-limit refund after a refused reserve failed");
                    }
                    Verdict::Refused(error)
                }
            }
        })
    }

    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> Self::SettleFuture {
        let settled = self.ledger.settle(hold, actual);
        let corrected = (!corrections.is_empty()).then(|| self.limiter.settle(corrections));
        Box::pin(async move {
            let settled = settled.await;
            if let Some(corrected) = corrected {
                if let Err(error) = corrected.await {
                    tracing::warn!(%error, "rate-limit settlement failed");
                }
            }
            settled
        })
    }
}
