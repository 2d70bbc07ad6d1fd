//! Plan promotion on a top-up; see [`TopUpPromoter`].

use std::{collections::HashMap, fmt, future::Future, sync::Arc};

use super::ledger::{LedgerAdmin, TopUp, TopUpError};
use crate::auth::{KeyAdmin, KeyAdminError};

/// Which plan an account moves to when a top-up is applied to it.
///
/// # Example
///
/// ```
/// use tollgate::credits::promote::Promotions;
///
/// let promotions = Promotions::new().after_top_up("free", "trusted");
/// assert_eq!(promotions.target("free"), Some("trusted"));
/// assert_eq!(promotions.target("trusted"), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Promotions {
    rules: HashMap<Arc<str>, Arc<str>>,
}

impl Promotions {
    /// No promotion.
    pub fn new() -> Self {
        Promotions::default()
    }

    /// An account on plan `from` moves to plan `to` when a top-up is applied to it.
    #[must_use]
    pub fn after_top_up(mut self, from: impl Into<Arc<str>>, to: impl Into<Arc<str>>) -> Self {
        self.rules.insert(from.into(), to.into());
        self
    }

    /// The plan an account on `plan` moves to, if any.
    pub fn target(&self, plan: &str) -> Option<&str> {
        self.rules.get(plan).map(|to| to.as_ref())
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule, `(from, to)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules
            .iter()
            .map(|(from, to)| (from.as_ref(), to.as_ref()))
    }
}

/// An account's move from one plan to another.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanChange {
    /// The plan it was on.
    pub from: Arc<str>,
    /// The plan it is on now.
    pub to: Arc<str>,
}

impl PlanChange {
    /// A plan change as a backend reports it.
    pub fn new(from: impl Into<Arc<str>>, to: impl Into<Arc<str>>) -> Self {
        PlanChange {
            from: from.into(),
            to: to.into(),
        }
    }
}

/// The result of [`TopUpPromoter::top_up_and_promote`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Promoted {
    /// The top-up, as [`LedgerAdmin::top_up`] reports it.
    pub top_up: TopUp,
    /// The promotion it triggered, if any.
    pub plan_change: Option<PlanChange>,
}

impl Promoted {
    /// A result as a backend reports it.
    pub fn new(top_up: TopUp, plan_change: Option<PlanChange>) -> Self {
        Promoted {
            top_up,
            plan_change,
        }
    }
}

/// Applies a top-up and the plan promotion it triggers: an account on plan `free` moves to plan
/// `trusted` when a top-up is applied to it (the *Trusted Tier* unlocked by a first payment).
///
/// [`Promotions`] says which plan leads to which; a [`TopUpPromoter`] applies a top-up and the
/// promotion it triggers together. Only a top-up that adds credits promotes: an idempotent replay
/// (the same `Idempotency-Key` again) changes nothing, so an account an operator moved back stays
/// where it was put. The account's very next request authenticates with the new plan (its
/// limits and models).
///
/// | backend | implementation | atomic with the top-up |
/// |---|---|---|
/// | memory | [`Promote`] over a [`MemoryLedger`](super::MemoryLedger) and a [`MemoryKeyStore`](crate::auth::MemoryKeyStore) | both are applied before the call returns, in process |
/// | Redis | `RedisPromoter` (feature `redis`) | yes: one script changes the balance, the journal and the plan |
/// | any other [`LedgerAdmin`] + [`KeyAdmin`] | [`Promote`] | no: the top-up, then the plan, one at a time per process (a failure in between is reported as an error and the top-up stays applied; a replay of it then promotes nothing) |
///
/// A backend where keys and balances live in one database (SQLite, PostgreSQL) implements
/// [`TopUpPromoter`] in one transaction: insert the top-up (by its idempotency key), and only
/// when it was new, `UPDATE accounts SET plan = to WHERE id = ? AND plan = from` for the rule of
/// the account's current plan; then report the [`PlanChange`].
///
/// # Example
///
/// ```
/// use tollgate::auth::{AccountRecord, KeyAdmin, MemoryKeyStore};
/// use tollgate::credits::{MemoryLedger, promote::{Promote, Promotions, TopUpPromoter}};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
/// let promoter = Promote::new(
///     MemoryLedger::new(),
///     store.clone(),
///     Promotions::new().after_top_up("free", "trusted"),
/// );
///
/// let first = promoter.top_up_and_promote("acct_1", 500, "invoice-1").await.unwrap();
/// assert_eq!(first.plan_change.unwrap().to.as_ref(), "trusted");
/// assert_eq!(store.account("acct_1").await.unwrap().unwrap().plan.as_ref(), "trusted");
///
/// // A replay adds nothing and promotes nothing.
/// let replay = promoter.top_up_and_promote("acct_1", 500, "invoice-1").await.unwrap();
/// assert!(!replay.top_up.applied && replay.plan_change.is_none());
/// # }
/// ```
///
/// # Contract
///
/// For implementations: the promotion happens only when the top-up was applied (not on
/// an idempotent replay), only when the account's current plan has a rule, and it is visible to
/// the account's next authentication once the future resolves.
pub trait TopUpPromoter: Send + Sync + 'static {
    /// Add `amount` credits to `account` (idempotent per `idempotency_key`, as
    /// [`LedgerAdmin::top_up`]) and promote the account's plan when the top-up was applied.
    fn top_up_and_promote(
        &self,
        account: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<Promoted, TopUpError>> + Send;
}

/// A [`TopUpPromoter`] over any [`LedgerAdmin`] and [`KeyAdmin`]: the top-up, then the plan.
///
/// An account the key store does not know (a ledger account without keys) is topped up and not
/// promoted. See [`TopUpPromoter`] for an example.
#[derive(Clone)]
pub struct Promote<L, K> {
    ledger: L,
    store: K,
    promotions: Arc<Promotions>,
    /// One top-up and its promotion at a time in this process, so concurrent top-ups of one
    /// account report its plan change once.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<L, K> fmt::Debug for Promote<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Promote")
            .field("promotions", &self.promotions)
            .finish_non_exhaustive()
    }
}

impl<L, K> Promote<L, K> {
    /// Top-ups go to `ledger`, plans are changed in `store`.
    pub fn new(ledger: L, store: K, promotions: Promotions) -> Self {
        Promote {
            ledger,
            store,
            promotions: Arc::new(promotions),
            lock: Arc::default(),
        }
    }

    /// The rules.
    pub fn promotions(&self) -> &Promotions {
        &self.promotions
    }
}

impl<L: LedgerAdmin, K: KeyAdmin> TopUpPromoter for Promote<L, K> {
    fn top_up_and_promote(
        &self,
        account: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<Promoted, TopUpError>> + Send {
        let top_up = self.ledger.top_up(account, amount, idempotency_key);
        let account: Arc<str> = account.into();
        async move {
            let _one_at_a_time = self.lock.lock().await;
            let top_up = top_up.await?;
            if !top_up.applied || self.promotions.is_empty() {
                return Ok(Promoted::new(top_up, None));
            }
            let record = self.store.account(&account).await.map_err(admin_error)?;
            let Some(record) = record else {
                return Ok(Promoted::new(top_up, None));
            };
            let Some(to) = self.promotions.target(&record.plan) else {
                return Ok(Promoted::new(top_up, None));
            };
            match self.store.set_account_plan(&account, to).await {
                Ok(()) => Ok(Promoted::new(
                    top_up,
                    Some(PlanChange::new(record.plan.clone(), to)),
                )),
                Err(KeyAdminError::UnknownAccount(_)) => Ok(Promoted::new(top_up, None)),
                Err(e) => Err(admin_error(e)),
            }
        }
    }
}

fn admin_error(error: KeyAdminError) -> TopUpError {
    match error {
        KeyAdminError::Backend(e) => TopUpError::Backend(e),
        other => TopUpError::Backend(crate::BackendError::new(other.to_string())),
    }
}
