//! The ledger's vocabulary: the [`Ledger`] (hot path) and [`LedgerAdmin`] (operator) traits and
//! the values they take and return (holds, settlements, balances, journal entries), the clock
//! holds expire by, and the [`MemoryLedger`](super::MemoryLedger)'s builder.
//!
//! Values a backend builds (a [`Hold`], a [`Settlement`], a [`JournalEntry`], …) are made with
//! the functions of [`credits::backend`](super::backend).

use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::BackendError;

pub use super::clock::{Clock, SystemClock};
pub use super::memory::MemoryLedgerBuilder;

/// The most credits a balance, a top-up, a hold or a charge can be, on every backend:
/// 2^53 − 1 (9,007,199,254,740,991), the largest integer a double holds exactly (Redis scripts
/// and most JSON clients read numbers as doubles). A top-up past it is refused
/// ([`TopUpError::Overflow`]); a hold is never larger (a request that would need more is held
/// at this amount, and refused as any hold above the balance is).
pub const MAX_CREDITS: u64 = (1 << 53) - 1;

/// The hot path of prepaid credits: a hold placed before a call, settled on real usage after
/// it, or released. The operator's calls (top-ups, balances, the journal, expiry) are
/// [`LedgerAdmin`].
///
/// Amounts are whole **credits** (`u64`): no floats anywhere in money. A credit is whatever unit
/// the operator prices in (a cent, a thousandth of a cent); pick one small enough that every
/// price is an integer.
///
/// # Guarantees every implementation keeps
///
/// - **Never negative.** `available = balance - held` and `held <= balance` at all times: a hold
///   is placed only if it fits in `available`, and a settlement charges beyond its hold only what
///   is available.
/// - **Exact under concurrency.** Each operation is atomic per account.
/// - **Once.** A hold is closed exactly once (settled, released or expired); closing it again is a
///   no-op that reports `was_open: false`. A top-up with an idempotency key already applied is not
///   applied again.
/// - **Journaled.** Every movement appends a [`JournalEntry`], so
///   `balance == Σ top_up.amount − Σ (settle + expire).amount` and
///   `held == Σ reserve.hold − Σ (settle + release + expire).hold` for every account.
///
/// Every operation returns its own `'static` future type so that an in-memory ledger answers
/// with [`std::future::Ready`] (no boxing on the hot path) while a remote one (Redis with Lua
/// scripts) returns a real future. Every backend passes the same
/// [conformance scenarios](super::conformance).
///
/// # Example
///
/// ```
/// use tollgate::credits::{Ledger, LedgerAdmin, MemoryLedger, ledger::ReserveRequest};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ledger = MemoryLedger::new();
/// ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
///
/// let hold = ledger
///     .reserve(ReserveRequest::new("acct_1", 30))
///     .await
///     .unwrap()
///     .into_hold()
///     .unwrap();
/// assert_eq!(ledger.balance("acct_1").await.unwrap().available, 70);
///
/// // The call used 12 credits: 12 are charged, 18 go back.
/// let settlement = ledger.settle(&hold, 12).await.unwrap();
/// assert_eq!(settlement.charged, 12);
/// assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 88);
/// # }
/// ```
pub trait Ledger: Send + Sync + 'static {
    /// The future of [`reserve`](Ledger::reserve).
    type ReserveFuture: Future<Output = Result<Reservation, ReserveError>> + Send + 'static;
    /// The future of [`settle`](Ledger::settle).
    ///
    /// `Unpin` so that a settlement started in `Drop` can be polled once in place and, when it
    /// is not ready, moved onto a tokio task (a remote ledger returns a `Pin<Box<..>>`).
    type SettleFuture: Future<Output = Result<Settlement, BackendError>> + Send + Unpin + 'static;
    /// The future of [`release`](Ledger::release); `Unpin` for the same reason.
    type ReleaseFuture: Future<Output = Result<Settlement, BackendError>> + Send + Unpin + 'static;
    /// The future of [`extend`](Ledger::extend); `Unpin` for the same reason (it is started
    /// from a response body's `poll_frame`).
    type ExtendFuture: Future<Output = Result<bool, BackendError>> + Send + Unpin + 'static;

    /// Place a hold of `request.amount` on the account, if it fits in what is available.
    ///
    /// With an idempotency key, a key already used by the same account within the ledger's
    /// window answers instead: [`Reservation::Replayed`] when the earlier request (same
    /// [`Fingerprint`]) was charged, [`ReserveError::KeyInUse`] while it is still running,
    /// [`ReserveError::KeyReused`] when the fingerprint differs. A key whose request was released
    /// (not charged) is free again.
    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture;

    /// The answer of [`reserve`](Ledger::reserve) at once, for a ledger that has it without
    /// waiting (memory, SQLite): `Ok(answer)`, the hold placed (or refused) exactly as
    /// [`reserve`](Ledger::reserve) would. `Err(request)` (the default) hands the request back
    /// untouched: the reservation must be awaited.
    ///
    /// When it answers, the credits layer calls the inner service directly instead of keeping
    /// it in its response future: no clone of the inner service, a smaller future. A ledger
    /// that wraps another (for metrics, say) forwards it, or the wrapped ledger loses this path.
    #[inline]
    #[allow(clippy::result_large_err)]
    fn reserve_now(
        &self,
        request: ReserveRequest,
    ) -> Result<Result<Reservation, ReserveError>, ReserveRequest> {
        Err(request)
    }

    /// Close a hold, charging `actual` credits: the unused part of the hold is returned; more
    /// than the hold is charged up to what is available, never below zero.
    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture;

    /// Close a hold without charging anything.
    fn release(&self, hold: &Hold) -> Self::ReleaseFuture;

    /// Keep an open hold alive: it now expires no earlier than its [TTL](Hold::ttl) from now
    /// (never earlier than it would have). Answers whether the hold was still open; a closed
    /// hold is left as it is.
    ///
    /// A hold's TTL is **idle time**: [`MeteredBody`](super::MeteredBody) extends its hold while
    /// the response streams (at most once per half TTL), so a stream longer than the TTL is
    /// settled at its usage, and only a response idle for a whole TTL (a stalled upstream, a
    /// leaked body) has its hold expired at the held amount.
    fn extend(&self, hold: &Hold) -> Self::ExtendFuture;

    /// The time on the ledger's clock, the one hold TTLs are measured on: what a response body
    /// compares to a hold's TTL to know when to [`extend`](Ledger::extend) it.
    fn now(&self) -> SystemTime;
}

/// The operator's side of a [`Ledger`]: top-ups, balances, the journal and the expiry of holds
/// nobody closed (as [`KeyAdmin`](crate::auth::KeyAdmin) is to
/// [`KeyStore`](crate::auth::KeyStore)).
///
/// # Example
///
/// ```
/// use tollgate::credits::{LedgerAdmin, MemoryLedger};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ledger = MemoryLedger::new();
/// let top_up = ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
/// assert!(top_up.applied);
/// // The same invoice again is not counted twice.
/// assert!(!ledger.top_up("acct_1", 100, "invoice-1").await.unwrap().applied);
/// assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 100);
/// # }
/// ```
pub trait LedgerAdmin: Ledger {
    /// The future of [`top_up`](LedgerAdmin::top_up).
    type TopUpFuture: Future<Output = Result<TopUp, TopUpError>> + Send + 'static;
    /// The future of [`balance`](LedgerAdmin::balance).
    type BalanceFuture: Future<Output = Result<Balance, BackendError>> + Send + 'static;
    /// The future of [`journal`](LedgerAdmin::journal).
    type JournalFuture: Future<Output = Result<Vec<JournalEntry>, BackendError>> + Send + 'static;
    /// The future of [`expire_holds`](LedgerAdmin::expire_holds).
    type ExpireFuture: Future<Output = Result<Expired, BackendError>> + Send + 'static;

    /// Add `amount` credits to an account. Idempotent: a second top-up with the same
    /// `idempotency_key` for the same account is not applied again (it answers with the first
    /// one's result and `applied: false`); with a different amount it is a
    /// [`TopUpError::KeyReused`].
    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture;

    /// An account's balance, holds and available credits. An unknown account has all zeros.
    fn balance(&self, account: &str) -> Self::BalanceFuture;

    /// An account's journal entries, oldest first, as selected by `query`.
    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture;

    /// Settle, at their held amount, every hold that expired at or before `now` (a crashed
    /// handler, a leaked future), so that nothing is lost and nothing is locked forever.
    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture;
}

/// What [`Ledger::reserve`] is asked for.
///
/// # Example
///
/// ```
/// use tollgate::credits::{ledger::{Fingerprint, ReserveRequest}};
///
/// let request = ReserveRequest::new("acct_1", 30)
///     .request_id(Some("req_42".into()))
///     .key_id(Some("key_7".into()))
///     .idempotency(Some(("retry-1".into(), Fingerprint::of(&[b"POST", b"/v1/chat/completions"]))));
/// assert_eq!(request.amount, 30);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReserveRequest {
    /// The account to hold credits on.
    pub account: Arc<str>,
    /// The credits to hold.
    pub amount: u64,
    /// The request's id (`x-request-id`), for the journal.
    pub request_id: Option<Arc<str>>,
    /// The API key's id, for the journal.
    pub key_id: Option<Arc<str>>,
    /// The `Idempotency-Key` and the fingerprint of the request that carries it.
    pub idempotency: Option<(Arc<str>, Fingerprint)>,
}

impl ReserveRequest {
    /// A hold of `amount` credits on `account`.
    pub fn new(account: impl Into<Arc<str>>, amount: u64) -> Self {
        ReserveRequest {
            account: account.into(),
            amount,
            request_id: None,
            key_id: None,
            idempotency: None,
        }
    }

    /// The request id, for the journal.
    #[must_use]
    pub fn request_id(mut self, request_id: Option<Arc<str>>) -> Self {
        self.request_id = request_id;
        self
    }

    /// The key id, for the journal.
    #[must_use]
    pub fn key_id(mut self, key_id: Option<Arc<str>>) -> Self {
        self.key_id = key_id;
        self
    }

    /// The idempotency key and the request's fingerprint.
    #[must_use]
    pub fn idempotency(mut self, idempotency: Option<(Arc<str>, Fingerprint)>) -> Self {
        self.idempotency = idempotency;
        self
    }
}

/// What identifies "the same request" for an idempotency key: a SHA-256 digest (truncated to 128
/// bits) of the parts given, each length-prefixed.
///
/// # Example
///
/// ```
/// use tollgate::credits::ledger::Fingerprint;
///
/// let a = Fingerprint::of(&[b"POST", b"/v1/chat/completions", b"gpt-4o"]);
/// let b = Fingerprint::of(&[b"POST", b"/v1/chat/completions", b"gpt-4o-mini"]);
/// assert_ne!(a, b);
/// assert_eq!(a.to_hex().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint of these parts, in order.
    pub fn of(parts: &[&[u8]]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest[..16]);
        Fingerprint(bytes)
    }

    /// A fingerprint from its bytes (as a remote ledger stores it).
    pub(crate) const fn from_bytes(bytes: [u8; 16]) -> Self {
        Fingerprint(bytes)
    }

    /// Its bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// Credits held on an account for one request, until settled, released or expired.
///
/// Deliberately not `Clone`: one hold, one settlement. (Ledgers also ignore a second close.)
#[derive(Debug, PartialEq, Eq)]
pub struct Hold {
    id: u64,
    account: Arc<str>,
    amount: u64,
    available_after: u64,
    request_id: Option<Arc<str>>,
    ttl: Option<Duration>,
}

impl Hold {
    /// A hold as a ledger implementation returns it ([`backend::hold`](super::backend::hold)).
    pub(crate) fn new(id: u64, account: Arc<str>, amount: u64, available_after: u64) -> Self {
        Hold {
            id,
            account,
            amount,
            available_after,
            request_id: None,
            ttl: None,
        }
    }

    /// The idle time after which the ledger expires the hold unless it is
    /// [extended](Ledger::extend) (`None`: it never expires).
    #[must_use]
    pub(crate) fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long the hold may stay idle before the ledger expires it at its held amount:
    /// [`Ledger::extend`] starts the time again (`None`: the hold never expires).
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The request the hold was placed for (its `x-request-id`), as the ledger got it in the
    /// [`ReserveRequest`]: lets a settlement be logged against its request.
    #[must_use]
    pub(crate) fn with_request_id(mut self, request_id: Option<Arc<str>>) -> Self {
        self.request_id = request_id;
        self
    }

    /// The request the hold was placed for, if known.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The ledger's id of the hold.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The account.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The account, shared.
    pub fn account_arc(&self) -> &Arc<str> {
        &self.account
    }

    /// The credits held.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// The account's available credits right after this hold was placed.
    pub fn available_after(&self) -> u64 {
        self.available_after
    }
}

/// A successful [`Ledger::reserve`].
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Credits are held; settle or release the hold.
    Held(Hold),
    /// The idempotency key was already used by the same request, which was charged: let the
    /// retry through without charging again.
    Replayed,
}

impl Reservation {
    /// The hold, unless this was a replay.
    pub fn into_hold(self) -> Option<Hold> {
        match self {
            Reservation::Held(hold) => Some(hold),
            Reservation::Replayed => None,
        }
    }
}

/// Why [`Ledger::reserve`] placed no hold.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReserveError {
    /// The account's available credits do not cover the hold.
    Insufficient {
        /// The credits the hold needed.
        required: u64,
        /// The credits available.
        available: u64,
    },
    /// The idempotency key was used with a different request (422 `idempotency_key_reused`).
    KeyReused,
    /// A request with the idempotency key is still running (409 `idempotency_key_in_use`).
    KeyInUse,
    /// The ledger could not answer (503 `backend_unavailable`).
    Backend(BackendError),
}

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReserveError::Insufficient {
                required,
                available,
            } => write!(
                f,
                "insufficient credits: {required} required, {available} available"
            ),
            ReserveError::KeyReused => f.write_str("idempotency key reused with another request"),
            ReserveError::KeyInUse => f.write_str("idempotency key in use"),
            ReserveError::Backend(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReserveError {}

impl From<BackendError> for ReserveError {
    fn from(error: BackendError) -> Self {
        ReserveError::Backend(error)
    }
}

impl From<ReserveError> for crate::Rejection {
    fn from(error: ReserveError) -> Self {
        match error {
            ReserveError::Insufficient {
                required,
                available,
            } => crate::Rejection::insufficient_credits(required, available),
            ReserveError::KeyReused => crate::Reason::IdempotencyKeyReused.into(),
            ReserveError::KeyInUse => crate::Reason::IdempotencyKeyInUse.into(),
            ReserveError::Backend(e) => e.into(),
        }
    }
}

/// The result of closing a hold ([`Ledger::settle`], [`Ledger::release`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settlement {
    /// Credits charged (taken from the balance).
    pub charged: u64,
    /// The account's balance afterwards.
    pub balance: u64,
    /// Whether the hold was still open. `false`: it was already closed (settled, released or
    /// expired) and nothing changed.
    pub was_open: bool,
}

impl Settlement {
    /// A settlement as a ledger implementation returns it.
    pub(crate) fn new(charged: u64, balance: u64, was_open: bool) -> Self {
        Settlement {
            charged,
            balance,
            was_open,
        }
    }
}

/// An account's credits, as [`LedgerAdmin::balance`] reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Balance {
    /// Credits on the account (top-ups minus charges).
    pub balance: u64,
    /// Credits in open holds.
    pub held: u64,
    /// The number of open holds.
    pub holds: u64,
    /// `balance - held`: what a new hold may take.
    pub available: u64,
}

impl Balance {
    /// A balance of `balance` credits with `holds` open holds of `held` credits in all;
    /// `available` is computed.
    ///
    /// ```
    /// use tollgate::credits::ledger::Balance;
    ///
    /// assert_eq!(Balance::new(100, 30, 1).available, 70);
    /// ```
    pub fn new(balance: u64, held: u64, holds: u64) -> Self {
        Balance {
            balance,
            held,
            holds,
            available: balance.saturating_sub(held),
        }
    }
}

/// The result of [`LedgerAdmin::top_up`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopUp {
    /// Whether this call added the credits (`false`: the idempotency key was already applied).
    pub applied: bool,
    /// The account afterwards.
    pub balance: Balance,
}

impl TopUp {
    /// A top-up result as a ledger implementation returns it.
    pub(crate) fn new(applied: bool, balance: Balance) -> Self {
        TopUp { applied, balance }
    }
}

/// Why [`LedgerAdmin::top_up`] added nothing.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TopUpError {
    /// The idempotency key was already used for a top-up of a different amount.
    KeyReused {
        /// The amount of the top-up that used the key.
        amount: u64,
    },
    /// The balance would exceed [`MAX_CREDITS`].
    Overflow,
    /// The ledger could not answer.
    Backend(BackendError),
}

impl fmt::Display for TopUpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopUpError::KeyReused { amount } => write!(
                f,
                "idempotency key already used for a top-up of {amount} credits"
            ),
            TopUpError::Overflow => f.write_str("the balance would overflow"),
            TopUpError::Backend(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TopUpError {}

impl From<BackendError> for TopUpError {
    fn from(error: BackendError) -> Self {
        TopUpError::Backend(error)
    }
}

/// The result of [`LedgerAdmin::expire_holds`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Expired {
    /// Holds settled at their held amount.
    pub holds: u64,
    /// Credits charged by them.
    pub charged: u64,
}

impl Expired {
    /// An expiry result as a ledger implementation returns it.
    pub(crate) fn new(holds: u64, charged: u64) -> Self {
        Expired { holds, charged }
    }
}

/// Which [`JournalEntry`]s [`LedgerAdmin::journal`] returns: those with a sequence number after
/// `after`, at most `limit` of them, oldest first.
///
/// # Example
///
/// ```
/// use tollgate::credits::ledger::JournalQuery;
///
/// let first_page = JournalQuery::new().limit(100);
/// let next_page = JournalQuery::new().after(Some(100)).limit(100);
/// assert_eq!(next_page.after, Some(100));
/// # let _ = first_page;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalQuery {
    /// Only entries with `seq > after`.
    pub after: Option<u64>,
    /// At most this many entries.
    pub limit: usize,
}

impl JournalQuery {
    /// Every entry.
    pub fn new() -> Self {
        JournalQuery {
            after: None,
            limit: usize::MAX,
        }
    }

    /// Only entries after this sequence number.
    #[must_use]
    pub fn after(mut self, after: Option<u64>) -> Self {
        self.after = after;
        self
    }

    /// At most this many entries.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl Default for JournalQuery {
    fn default() -> Self {
        Self::new()
    }
}

/// What a [`JournalEntry`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EntryKind {
    /// A hold was placed: `amount` = `hold` = the credits held. The balance is unchanged.
    Reserve,
    /// A hold was settled: `amount` = credits charged; `hold` = the credits that were held.
    Settle,
    /// A hold was released: `amount` = 0 charged; `hold` = the credits that were held.
    Release,
    /// A hold expired and was settled at its held amount: `amount` = `hold`.
    Expire,
    /// Credits were added: `amount` = the credits; `hold` = 0.
    TopUp,
}

impl EntryKind {
    /// `reserve`, `settle`, `release`, `expire` or `top_up`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryKind::Reserve => "reserve",
            EntryKind::Settle => "settle",
            EntryKind::Release => "release",
            EntryKind::Expire => "expire",
            EntryKind::TopUp => "top_up",
        }
    }

    /// The kind whose [`as_str`](Self::as_str) is `word`: how the backends read their journals.
    pub(crate) fn parse(word: &str) -> Option<EntryKind> {
        [
            EntryKind::Reserve,
            EntryKind::Settle,
            EntryKind::Release,
            EntryKind::Expire,
            EntryKind::TopUp,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == word)
    }
}

/// One movement on an account, appended to its journal and never changed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalEntry {
    /// Position in the account's journal, from 1, without gaps.
    pub seq: u64,
    /// When (the ledger's clock).
    pub at: SystemTime,
    /// What happened.
    pub kind: EntryKind,
    /// Credits: held, charged or added (see [`EntryKind`]).
    pub amount: u64,
    /// The hold concerned (0 for a top-up).
    pub hold: u64,
    /// The hold's id (`None` for a top-up).
    pub hold_id: Option<u64>,
    /// The account's balance after the movement.
    pub balance_after: u64,
    /// Credits in open holds after the movement.
    pub held_after: u64,
    /// The request id (`x-request-id`) of the request that placed the hold.
    pub request_id: Option<Arc<str>>,
    /// The API key id of the request that placed the hold.
    pub key_id: Option<Arc<str>>,
    /// The idempotency key (of the request, or of the top-up).
    pub idempotency_key: Option<Arc<str>>,
}

impl JournalEntry {
    /// An entry as a ledger implementation builds it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        seq: u64,
        at: SystemTime,
        kind: EntryKind,
        amount: u64,
        hold: u64,
        hold_id: Option<u64>,
        balance_after: u64,
        held_after: u64,
    ) -> Self {
        JournalEntry {
            seq,
            at,
            kind,
            amount,
            hold,
            hold_id,
            balance_after,
            held_after,
            request_id: None,
            key_id: None,
            idempotency_key: None,
        }
    }
}
