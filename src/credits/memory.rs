//! The in-memory ledger.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    future::{ready, Ready},
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, SystemTime},
};

use super::{
    clock::{Clock, SystemClock},
    ledger::MAX_CREDITS,
    ledger::{
        Balance, EntryKind, Expired, Fingerprint, Hold, JournalEntry, JournalQuery, Ledger,
        LedgerAdmin, Reservation, ReserveError, ReserveRequest, Settlement, TopUp, TopUpError,
    },
};
use crate::BackendError;

/// The default time after which a hold never settled is settled at its held amount: 15 minutes.
pub const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(15 * 60);

/// The default window in which an `Idempotency-Key` is remembered: 24 hours (as Stripe).
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// A [`Ledger`] in this process's memory: exact, fast, and gone when the process exits.
///
/// Accounts are spread over shards, each behind its own mutex; every operation on an account is
/// one short critical section, so it is exact under any concurrency. Every future it returns is
/// [`std::future::Ready`]. Cloning shares the ledger (keep a clone for top-ups and the admin
/// router).
///
/// The journal is kept in full for the process's lifetime (it is append-only) unless
/// [`MemoryLedgerBuilder::journal_limit`] bounds it: a long-running process under load adds two
/// entries per request, so bound it there. An operator who needs durable accounting uses a remote
/// ledger.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tollgate::credits::{Ledger, LedgerAdmin, ManualClock, MemoryLedger, ledger::ReserveRequest};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
/// let ledger = MemoryLedger::builder()
///     .hold_ttl(Duration::from_secs(60))
///     .clock(clock.clone())
///     .build();
/// ledger.top_up("acct_1", 50, "invoice-1").await.unwrap();
///
/// // A hold nobody settles...
/// let _leaked = ledger.reserve(ReserveRequest::new("acct_1", 20)).await.unwrap();
/// clock.advance(Duration::from_secs(61));
/// // ...is settled at its held amount once it expires.
/// let expired = ledger.expire_holds(clock.now()).await.unwrap();
/// assert_eq!(expired.charged, 20);
/// let balance = ledger.balance("acct_1").await.unwrap();
/// assert_eq!((balance.balance, balance.held), (30, 0));
/// # }
/// # use tollgate::credits::ledger::Clock;
/// ```
#[derive(Clone)]
pub struct MemoryLedger {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    next_hold: AtomicU64,
    hold_ttl: Duration,
    idempotency_window: Duration,
    clock: Arc<dyn Clock>,
    journal_limit: usize,
    /// Where a durable backend built on this ledger gets every movement (crate-internal).
    sink: Option<Arc<dyn Sink>>,
    /// The largest balance an account may reach.
    max_balance: u64,
}

/// One movement, as a durable backend built on the memory ledger persists it: the journal
/// entry, plus what a reserve leaves behind (the hold's expiry, the idempotency record).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) struct Movement {
    pub(crate) account: Arc<str>,
    pub(crate) entry: JournalEntry,
    /// A reserve: when its hold expires.
    pub(crate) hold_expires_at: Option<SystemTime>,
    /// A reserve with an idempotency key: the request's fingerprint and when the key is
    /// forgotten.
    pub(crate) key: Option<(Fingerprint, SystemTime)>,
}

/// Receives every movement of a [`MemoryLedger`], in each account's order, inside the
/// account's critical section (so it must not block).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) trait Sink: Send + Sync + 'static {
    fn record(&self, movement: Movement);
}

/// An account as a durable backend restores it at startup.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) struct RestoredAccount {
    pub(crate) name: Arc<str>,
    pub(crate) balance: u64,
    /// The sequence number of the account's last journal entry.
    pub(crate) last_seq: u64,
    pub(crate) holds: Vec<RestoredHold>,
    pub(crate) keys: Vec<RestoredKey>,
    pub(crate) top_ups: Vec<(Arc<str>, u64)>,
}

/// An open hold, restored.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) struct RestoredHold {
    pub(crate) id: u64,
    pub(crate) amount: u64,
    pub(crate) expires_at: SystemTime,
    pub(crate) request_id: Option<Arc<str>>,
    pub(crate) key_id: Option<Arc<str>>,
    pub(crate) idempotency_key: Option<Arc<str>>,
}

/// An idempotency record, restored.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) struct RestoredKey {
    pub(crate) key: Arc<str>,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) expires_at: SystemTime,
    pub(crate) hold_id: u64,
    pub(crate) charged: bool,
}

/// foldhash: several times faster than SipHash on these small keys, and seeded per process so
/// placement cannot be predicted from outside.
type RandomState = foldhash::fast::RandomState;
type Map<K, V> = HashMap<K, V, RandomState>;

#[derive(Default)]
struct Shard {
    accounts: Map<Arc<str>, Account>,
}

#[derive(Default)]
struct Account {
    balance: u64,
    held: u64,
    holds: Map<u64, OpenHold>,
    keys: Map<Arc<str>, KeyRecord>,
    top_ups: Map<Arc<str>, u64>,
    journal: VecDeque<JournalEntry>,
    /// Entries dropped from the front by the journal limit: `journal[0].seq == dropped + 1`.
    dropped: u64,
    /// The most entries kept (0: all).
    journal_limit: usize,
    /// The account's name and the sink of a durable backend, if any.
    name: Arc<str>,
    sink: Option<Arc<dyn Sink>>,
}

struct OpenHold {
    amount: u64,
    expires_at: SystemTime,
    request_id: Option<Arc<str>>,
    key_id: Option<Arc<str>>,
    idempotency_key: Option<Arc<str>>,
}

struct KeyRecord {
    fingerprint: Fingerprint,
    expires_at: SystemTime,
    hold_id: u64,
    charged: bool,
}

#[derive(Clone, Copy)]
enum Close {
    Settle(u64),
    Release,
    Expire,
}

impl Account {
    fn balance(&self) -> Balance {
        Balance::new(self.balance, self.held, self.holds.len() as u64)
    }

    fn push(
        &mut self,
        at: SystemTime,
        kind: EntryKind,
        amount: u64,
        hold: Option<(u64, &OpenHold)>,
        top_up_key: Option<&Arc<str>>,
    ) {
        let seq = self.dropped + self.journal.len() as u64 + 1;
        let mut entry = JournalEntry::new(
            seq,
            at,
            kind,
            amount,
            hold.map_or(0, |(_, h)| h.amount),
            hold.map(|(id, _)| id),
            self.balance,
            self.held,
        );
        if let Some((_, h)) = hold {
            entry.request_id = h.request_id.clone();
            entry.key_id = h.key_id.clone();
            entry.idempotency_key = h.idempotency_key.clone();
        }
        if kind == EntryKind::TopUp {
            entry.idempotency_key = top_up_key.cloned();
        }
        if let Some(sink) = &self.sink {
            let (hold_expires_at, key) = match (kind, hold) {
                (EntryKind::Reserve, Some((id, h))) => (
                    Some(h.expires_at),
                    h.idempotency_key
                        .as_ref()
                        .and_then(|k| self.keys.get(k))
                        .filter(|r| r.hold_id == id)
                        .map(|r| (r.fingerprint, r.expires_at)),
                ),
                _ => (None, None),
            };
            sink.record(Movement {
                account: self.name.clone(),
                entry: entry.clone(),
                hold_expires_at,
                key,
            });
        }
        self.journal.push_back(entry);
        if self.journal_limit > 0 && self.journal.len() > self.journal_limit {
            self.journal.pop_front();
            self.dropped += 1;
        }
    }

    /// Close an open hold; `None` when it is not open.
    fn close(&mut self, id: u64, how: Close, now: SystemTime) -> Option<u64> {
        let open = self.holds.remove(&id)?;
        self.held -= open.amount;
        // Invariant: balance >= held + open.amount, so a charge up to the hold always fits and
        // anything beyond it takes at most what others have not reserved.
        let (kind, charged) = match how {
            Close::Settle(actual) => (EntryKind::Settle, actual.min(self.balance - self.held)),
            Close::Release => (EntryKind::Release, 0),
            Close::Expire => (EntryKind::Expire, open.amount),
        };
        self.balance -= charged;
        if let Some(key) = &open.idempotency_key {
            if let Some(record) = self.keys.get_mut(key).filter(|r| r.hold_id == id) {
                match how {
                    // Not charged: the key may be used again (the retry is processed afresh).
                    Close::Release => {
                        self.keys.remove(key);
                    }
                    Close::Settle(_) | Close::Expire => record.charged = true,
                }
            }
        }
        let amount = if matches!(how, Close::Release) {
            0
        } else {
            charged
        };
        self.push(now, kind, amount, Some((id, &open)), None);
        Some(charged)
    }
}

impl MemoryLedger {
    /// A ledger with the default hold TTL ([`DEFAULT_HOLD_TTL`]), idempotency window
    /// ([`DEFAULT_IDEMPOTENCY_WINDOW`]) and the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configure a ledger.
    pub fn builder() -> MemoryLedgerBuilder {
        MemoryLedgerBuilder {
            hold_ttl: DEFAULT_HOLD_TTL,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            clock: Arc::new(SystemClock),
            shards: 32,
            journal_limit: 0,
            sink: None,
            max_balance: u64::MAX,
        }
    }

    /// Expire holds every `every` on a tokio task (using the ledger's clock), until the ledger
    /// is dropped or the task aborted. Must be called inside a tokio runtime.
    pub fn spawn_expiry(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let ledger = MemoryLedger { inner };
                let now = ledger.inner.clock.now();
                let expired = ledger.expire_now(now);
                if expired.holds > 0 {
                    tracing::info!(
                        holds = expired.holds,
                        charged = expired.charged,
                        "expired credit holds"
                    );
                }
            }
        })
    }

    fn shard(&self, account: &str) -> MutexGuard<'_, Shard> {
        let index = self.inner.hasher.hash_one(account) as usize % self.inner.shards.len();
        // A panic inside a critical section leaves the numbers consistent (every mutation is
        // checked before it is applied), so a poisoned lock is still usable.
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn reserve_at_once(&self, request: ReserveRequest) -> Result<Reservation, ReserveError> {
        let now = self.inner.clock.now();
        let mut shard = self.shard(&request.account);
        let account = match shard.accounts.get_mut(&request.account) {
            Some(account) => account,
            None if request.amount == 0 => shard
                .accounts
                .entry(request.account.clone())
                .or_insert_with(|| self.inner.new_account(request.account.clone())),
            None => {
                return Err(ReserveError::Insufficient {
                    required: request.amount,
                    available: 0,
                })
            }
        };
        if let Some((key, fingerprint)) = &request.idempotency {
            if let Some(record) = account.keys.get(key).filter(|r| r.expires_at > now) {
                return if record.fingerprint != *fingerprint {
                    Err(ReserveError::KeyReused)
                } else if record.charged {
                    Ok(Reservation::Replayed)
                } else {
                    Err(ReserveError::KeyInUse)
                };
            }
        }
        let available = account.balance - account.held;
        if request.amount > available {
            return Err(ReserveError::Insufficient {
                required: request.amount,
                available,
            });
        }
        let id = self.inner.next_hold.fetch_add(1, Ordering::Relaxed) + 1;
        let idempotency_key = request.idempotency.as_ref().map(|(k, _)| k.clone());
        if let Some((key, fingerprint)) = request.idempotency {
            account.keys.insert(
                key,
                KeyRecord {
                    fingerprint,
                    expires_at: now + self.inner.idempotency_window,
                    hold_id: id,
                    charged: false,
                },
            );
        }
        let request_id = request.request_id.clone();
        let open = OpenHold {
            amount: request.amount,
            expires_at: now + self.inner.hold_ttl,
            request_id: request.request_id,
            key_id: request.key_id,
            idempotency_key,
        };
        account.held += request.amount;
        account.push(
            now,
            EntryKind::Reserve,
            request.amount,
            Some((id, &open)),
            None,
        );
        account.holds.insert(id, open);
        Ok(Reservation::Held(
            Hold::new(
                id,
                request.account,
                request.amount,
                available - request.amount,
            )
            .with_request_id(request_id)
            .with_ttl(Some(self.inner.hold_ttl)),
        ))
    }

    fn extend_now(&self, hold: &Hold) -> bool {
        let now = self.inner.clock.now();
        let mut shard = self.shard(hold.account());
        let open = shard
            .accounts
            .get_mut(hold.account())
            .and_then(|account| account.holds.get_mut(&hold.id()));
        match open {
            Some(open) => {
                open.expires_at = open.expires_at.max(now + self.inner.hold_ttl);
                true
            }
            None => false,
        }
    }

    fn close_now(&self, hold: &Hold, how: Close) -> Settlement {
        let now = self.inner.clock.now();
        let mut shard = self.shard(hold.account());
        let Some(account) = shard.accounts.get_mut(hold.account()) else {
            return Settlement::new(0, 0, false);
        };
        match account.close(hold.id(), how, now) {
            Some(charged) => Settlement::new(charged, account.balance, true),
            None => Settlement::new(0, account.balance, false),
        }
    }

    fn top_up_now(&self, account: &str, amount: u64, key: &str) -> Result<TopUp, TopUpError> {
        let now = self.inner.clock.now();
        let mut shard = self.shard(account);
        let account = match shard.accounts.get_mut(account) {
            Some(a) => a,
            None => {
                let name: Arc<str> = Arc::from(account);
                shard
                    .accounts
                    .entry(name.clone())
                    .or_insert_with(|| self.inner.new_account(name))
            }
        };
        if let Some(&previous) = account.top_ups.get(key) {
            return if previous == amount {
                Ok(TopUp::new(false, account.balance()))
            } else {
                Err(TopUpError::KeyReused { amount: previous })
            };
        }
        account.balance = account
            .balance
            .checked_add(amount)
            .filter(|b| *b <= self.inner.max_balance.min(MAX_CREDITS))
            .ok_or(TopUpError::Overflow)?;
        let key: Arc<str> = Arc::from(key);
        account.top_ups.insert(key.clone(), amount);
        account.push(now, EntryKind::TopUp, amount, None, Some(&key));
        Ok(TopUp::new(true, account.balance()))
    }

    fn expire_now(&self, now: SystemTime) -> Expired {
        self.expire_where(now, |hold| hold.expires_at <= now)
    }

    /// Settle every open hold at its held amount, whatever its expiry: the holds a dead process
    /// left (a durable backend calls it once at startup, after [`restore`](Self::restore)).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn expire_all(&self) -> Expired {
        self.expire_where(self.inner.clock.now(), |_| true)
    }

    /// A ledger that sends every movement to `sink` and caps balances at `max_balance`.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn with_sink(
        mut builder: MemoryLedgerBuilder,
        sink: Arc<dyn Sink>,
        max_balance: u64,
    ) -> Self {
        builder.sink = Some(sink);
        builder.max_balance = max_balance;
        builder.build()
    }

    /// Put back an account as a durable backend stored it. Call before any other operation.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn restore(&self, restored: RestoredAccount) {
        let mut shard = self.shard(&restored.name);
        let mut account = self.inner.new_account(restored.name.clone());
        account.balance = restored.balance;
        account.dropped = restored.last_seq;
        for hold in restored.holds {
            account.held += hold.amount;
            let id = hold.id;
            self.inner.next_hold.fetch_max(id, Ordering::Relaxed);
            account.holds.insert(
                id,
                OpenHold {
                    amount: hold.amount,
                    expires_at: hold.expires_at,
                    request_id: hold.request_id,
                    key_id: hold.key_id,
                    idempotency_key: hold.idempotency_key,
                },
            );
        }
        for key in restored.keys {
            account.keys.insert(
                key.key,
                KeyRecord {
                    fingerprint: key.fingerprint,
                    expires_at: key.expires_at,
                    hold_id: key.hold_id,
                    charged: key.charged,
                },
            );
        }
        account.top_ups.extend(restored.top_ups);
        shard.accounts.insert(restored.name, account);
    }

    /// Hold ids go on after `last` (a durable backend's highest id so far).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn set_last_hold_id(&self, last: u64) {
        self.inner.next_hold.fetch_max(last, Ordering::Relaxed);
    }

    fn expire_where(&self, now: SystemTime, due: impl Fn(&OpenHold) -> bool) -> Expired {
        let mut expired = Expired::default();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for account in shard.accounts.values_mut() {
                let due: Vec<u64> = account
                    .holds
                    .iter()
                    .filter(|(_, h)| due(h))
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    if let Some(charged) = account.close(id, Close::Expire, now) {
                        expired.holds += 1;
                        expired.charged += charged;
                    }
                }
                account.keys.retain(|_, r| r.expires_at > now || !r.charged);
            }
        }
        expired
    }
}

impl Inner {
    fn new_account(&self, name: Arc<str>) -> Account {
        Account {
            journal_limit: self.journal_limit,
            name,
            sink: self.sink.clone(),
            ..Account::default()
        }
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("hold_ttl", &self.inner.hold_ttl)
            .field("idempotency_window", &self.inner.idempotency_window)
            .finish_non_exhaustive()
    }
}

impl Ledger for MemoryLedger {
    type ReserveFuture = Ready<Result<Reservation, ReserveError>>;
    type SettleFuture = Ready<Result<Settlement, BackendError>>;
    type ReleaseFuture = Ready<Result<Settlement, BackendError>>;
    type ExtendFuture = Ready<Result<bool, BackendError>>;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        ready(self.reserve_at_once(request))
    }

    #[inline]
    fn reserve_now(
        &self,
        request: ReserveRequest,
    ) -> Result<Result<Reservation, ReserveError>, ReserveRequest> {
        Ok(self.reserve_at_once(request))
    }

    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        ready(Ok(self.close_now(hold, Close::Settle(actual))))
    }

    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        ready(Ok(self.close_now(hold, Close::Release)))
    }

    fn extend(&self, hold: &Hold) -> Self::ExtendFuture {
        ready(Ok(self.extend_now(hold)))
    }

    fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }
}

impl LedgerAdmin for MemoryLedger {
    type TopUpFuture = Ready<Result<TopUp, TopUpError>>;
    type BalanceFuture = Ready<Result<Balance, BackendError>>;
    type JournalFuture = Ready<Result<Vec<JournalEntry>, BackendError>>;
    type ExpireFuture = Ready<Result<Expired, BackendError>>;

    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture {
        ready(self.top_up_now(account, amount, idempotency_key))
    }

    fn balance(&self, account: &str) -> Self::BalanceFuture {
        let shard = self.shard(account);
        ready(Ok(shard
            .accounts
            .get(account)
            .map(Account::balance)
            .unwrap_or_default()))
    }

    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture {
        let shard = self.shard(account);
        let entries = shard.accounts.get(account).map_or(Vec::new(), |a| {
            let start = query
                .after
                .map_or(0, |after| {
                    usize::try_from(after.saturating_sub(a.dropped)).unwrap_or(usize::MAX)
                })
                .min(a.journal.len());
            a.journal
                .range(start..)
                .take(query.limit)
                .cloned()
                .collect()
        });
        ready(Ok(entries))
    }

    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture {
        ready(Ok(self.expire_now(now)))
    }
}

/// Configures a [`MemoryLedger`]; see [`MemoryLedger::builder`].
#[must_use]
pub struct MemoryLedgerBuilder {
    hold_ttl: Duration,
    idempotency_window: Duration,
    clock: Arc<dyn Clock>,
    shards: usize,
    journal_limit: usize,
    sink: Option<Arc<dyn Sink>>,
    max_balance: u64,
}

impl MemoryLedgerBuilder {
    /// How long a hold may stay idle before [`LedgerAdmin::expire_holds`] settles it at its held
    /// amount (default [`DEFAULT_HOLD_TTL`]): from the reserve, and from each
    /// [`extend`](Ledger::extend) (a streaming response extends its hold while it streams, so
    /// only a response idle for this long is charged its hold).
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl = ttl;
        self
    }

    /// How long an `Idempotency-Key` is remembered after its first use (default
    /// [`DEFAULT_IDEMPOTENCY_WINDOW`]).
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// The clock (default [`SystemClock`]); tests pass a [`ManualClock`](super::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The clock, shared (for a backend built on this ledger).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn clock_arc(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The number of shards (independently locked groups of accounts), default 32.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Keep at most the last `entries` journal entries of each account (default: all). The
    /// balances are unaffected, and so are sequence numbers (they go on from where they were);
    /// every entry carries the balance and holds after it, so the books still check from the
    /// first entry kept. At least 1.
    pub fn journal_limit(mut self, entries: usize) -> Self {
        self.journal_limit = entries.max(1);
        self
    }

    /// The ledger.
    pub fn build(self) -> MemoryLedger {
        MemoryLedger {
            inner: Arc::new(Inner {
                shards: (0..self.shards).map(|_| Mutex::default()).collect(),
                hasher: RandomState::default(),
                next_hold: AtomicU64::new(0),
                hold_ttl: self.hold_ttl,
                idempotency_window: self.idempotency_window,
                clock: self.clock,
                journal_limit: self.journal_limit,
                sink: self.sink,
                max_balance: self.max_balance,
            }),
        }
    }
}

impl fmt::Debug for MemoryLedgerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedgerBuilder")
            .field("hold_ttl", &self.hold_ttl)
            .field("idempotency_window", &self.idempotency_window)
            .field("shards", &self.shards)
            .field("journal_limit", &self.journal_limit)
            .finish_non_exhaustive()
    }
}
