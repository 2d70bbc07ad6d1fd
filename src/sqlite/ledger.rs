//! The SQLite ledger: decisions in memory, every movement written by one group-committing
//! writer.

use std::{
    collections::HashMap,
    fmt,
    future::{ready, Future, Ready},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, watch};

use super::{
    backend_error,
    schema::{from_millis, millis},
    OpenErrorKind, Shared, SqliteOptions,
};
use crate::{
    credits::{
        ledger::{
            Balance, EntryKind, Expired, Fingerprint, Hold, JournalEntry, JournalQuery,
            Reservation, ReserveError, ReserveRequest, Settlement, TopUp, TopUpError,
        },
        memory::{Movement, RestoredAccount, RestoredHold, RestoredKey, Sink},
        Ledger, LedgerAdmin, MemoryLedger,
    },
    BackendError,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The most movements one group commit writes.
const MAX_BATCH: usize = 8_192;

/// Rows per multi-row `INSERT` (12 columns: well under SQLite's 32 766 bound parameters).
const ROWS_PER_INSERT: usize = 512;

/// A [`Ledger`] in a SQLite file: exact and fast as the memory ledger, durable as the
/// [contract](super#durability-contract) says.
///
/// Every decision (does the hold fit? was this key used?) is taken in memory, by the same code
/// as [`MemoryLedger`]'s, so its answers are the memory ledger's; each movement then goes, in
/// order, to a writer task that commits them in groups (one transaction, one fsync per group).
/// [`top_up`](LedgerAdmin::top_up) waits for its group to be committed; reserve, settle and release
/// answer at once and are durable within [`DURABILITY_WINDOW`](super::DURABILITY_WINDOW).
/// Balances are read from memory; the journal from the file (after the writer caught up).
///
/// Get one from [`SqliteBackend::ledger`](super::SqliteBackend::ledger). Cloning shares it.
///
/// # Example
///
/// ```
/// use tollgate::credits::{ledger::ReserveRequest, Ledger, LedgerAdmin};
/// use tollgate::sqlite::SqliteBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("tollgate-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("ledger.db");
/// # let _ = std::fs::remove_file(&path);
/// let ledger = SqliteBackend::open(&path).await?.ledger();
/// ledger.top_up("acct_1", 100, "invoice-1").await?;
/// let hold = ledger.reserve(ReserveRequest::new("acct_1", 30)).await?.into_hold().unwrap();
/// let settled = ledger.settle(&hold, 12).await?;
/// assert_eq!(settled.balance, 88);
/// ledger.flush().await?; // durable now (it would be within 50 ms anyway)
/// assert!(ledger.durability().max_lag < std::time::Duration::from_secs(1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteLedger {
    memory: MemoryLedger,
    queue: Arc<Queue>,
    shared: Arc<Shared>,
}

/// What the group commit did so far, from [`SqliteLedger::durability`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Durability {
    /// Group commits (transactions) written.
    pub commits: u64,
    /// Movements written.
    pub movements: u64,
    /// The longest time a movement waited between being made and being committed.
    pub max_lag: Duration,
    /// That time for the last group commit's oldest movement.
    pub last_lag: Duration,
    /// Group commits whose oldest movement waited longer than
    /// [`DURABILITY_WINDOW`](super::DURABILITY_WINDOW) (a slow disk, a starved CPU).
    pub late_commits: u64,
}

/// The ledger's side of the writer: the channel, in order, and the number of movements sent.
struct Queue {
    sender: Mutex<Sender>,
    status: Arc<Status>,
}

struct Sender {
    issued: u64,
    tx: mpsc::UnboundedSender<(Op, Instant)>,
}

/// What the writer reports: the movements committed so far, a failure, numbers.
struct Status {
    committed: watch::Sender<u64>,
    failed: OnceLock<String>,
    commits: AtomicU64,
    movements: AtomicU64,
    late: AtomicU64,
    max_lag_us: AtomicU64,
    last_lag_us: AtomicU64,
}

enum Op {
    Move(Movement),
    /// Forget the charged idempotency keys whose window ended before this time (ms).
    Sweep(i64),
    /// Someone waits for everything before this to be durable: commit with an fsync now.
    Barrier,
}

impl Op {
    /// Whether the group commit holding this op must be fsynced before it is acknowledged.
    fn needs_fsync(&self) -> bool {
        match self {
            Op::Move(m) => m.entry.kind == EntryKind::TopUp,
            Op::Barrier => true,
            Op::Sweep(_) => false,
        }
    }
}

/// The longest a commit without fsync (durable against a killed process, not yet against a
/// power loss) waits for the next fsynced one.
const FSYNC_EVERY: Duration = Duration::from_millis(25);

impl Queue {
    fn send(&self, op: Op) {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        sender.issued += 1;
        // Sent under the lock: the writer receives them in `issued` order. A writer that
        // stopped has set `failed`, which every call checks.
        let _ = sender.tx.send((op, Instant::now()));
    }

    fn issued(&self) -> u64 {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).issued
    }
}

impl Sink for Queue {
    fn record(&self, movement: Movement) {
        self.send(Op::Move(movement));
    }
}

impl Status {
    fn check(&self) -> Result<(), BackendError> {
        match self.failed.get() {
            None => Ok(()),
            Some(error) => Err(BackendError::new(format!(
                "sqlite ledger stopped after a failed write: {error}"
            ))),
        }
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl SqliteLedger {
    /// Load the books, start the writer, close what a dead process left open.
    pub(super) async fn load(
        shared: Arc<Shared>,
        options: &SqliteOptions,
    ) -> Result<SqliteLedger, OpenErrorKind> {
        let accounts = {
            let mut guard = shared.conn.lock().await;
            let conn = guard
                .as_mut()
                .ok_or_else(|| OpenErrorKind::Other("closed".into()))?;
            read_books(conn).await?
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Status {
            committed: watch::Sender::new(0),
            failed: OnceLock::new(),
            commits: AtomicU64::new(0),
            movements: AtomicU64::new(0),
            late: AtomicU64::new(0),
            max_lag_us: AtomicU64::new(0),
            last_lag_us: AtomicU64::new(0),
        });
        let queue = Arc::new(Queue {
            sender: Mutex::new(Sender { issued: 0, tx }),
            status: status.clone(),
        });
        let builder = MemoryLedger::builder()
            .hold_ttl(options.hold_ttl)
            .idempotency_window(options.idempotency_window)
            .clock_arc(options.clock.clone())
            // The journal is read from the file: memory keeps only the last entry.
            .journal_limit(1);
        // INTEGER columns: at most 2^63 - 1 credits on an account.
        let memory = MemoryLedger::with_sink(builder, queue.clone(), i64::MAX as u64);
        let (accounts, last_hold_id) = accounts;
        for account in accounts {
            memory.restore(account);
        }
        memory.set_last_hold_id(last_hold_id);
        tokio::spawn(writer(shared.clone(), rx, status));
        let ledger = SqliteLedger {
            memory,
            queue,
            shared,
        };
        let closed = ledger.memory.expire_all();
        if closed.holds > 0 {
            tracing::warn!(
                holds = closed.holds,
                charged = closed.charged,
                "settled at their held amount the credit holds a previous process left open"
            );
        }
        ledger
            .flush()
            .await
            .map_err(|e| OpenErrorKind::ReadOnly(e.message().to_owned()))?;
        Ok(ledger)
    }

    /// Wait until every movement made so far is committed to the file.
    ///
    /// # Errors
    ///
    /// When the writer failed (the ledger then refuses every call).
    pub fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        self.queue.send(Op::Barrier);
        let ticket = self.queue.issued();
        let status = self.queue.status.clone();
        async move { wait_for(&status, ticket).await }
    }

    /// What the group commit did so far: commits, movements, the longest wait.
    pub fn durability(&self) -> Durability {
        let status = &self.queue.status;
        Durability {
            commits: status.commits.load(Ordering::Relaxed),
            movements: status.movements.load(Ordering::Relaxed),
            late_commits: status.late.load(Ordering::Relaxed),
            max_lag: Duration::from_micros(status.max_lag_us.load(Ordering::Relaxed)),
            last_lag: Duration::from_micros(status.last_lag_us.load(Ordering::Relaxed)),
        }
    }
}

async fn wait_for(status: &Status, ticket: u64) -> Result<(), BackendError> {
    let mut committed = status.committed.subscribe();
    loop {
        if *committed.borrow_and_update() >= ticket {
            return Ok(());
        }
        status.check()?;
        if committed.changed().await.is_err() {
            status.check()?;
            return Err(BackendError::new("sqlite ledger: the writer stopped"));
        }
    }
}

impl fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("path", &self.shared.path)
            .field("durability", &self.durability())
            .finish_non_exhaustive()
    }
}

impl Ledger for SqliteLedger {
    type ReserveFuture = Ready<Result<Reservation, ReserveError>>;
    type SettleFuture = Ready<Result<Settlement, BackendError>>;
    type ReleaseFuture = Ready<Result<Settlement, BackendError>>;
    type ExtendFuture = Ready<Result<bool, BackendError>>;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        if let Err(e) = self.queue.status.check() {
            return ready(Err(e.into()));
        }
        self.memory.reserve(request)
    }

    /// At once, as [`reserve`](Ledger::reserve): the hold is placed in memory (and queued for
    /// the file), so the credits layer calls the service without awaiting anything.
    fn reserve_now(
        &self,
        request: ReserveRequest,
    ) -> Result<Result<Reservation, ReserveError>, ReserveRequest> {
        if let Err(e) = self.queue.status.check() {
            return Ok(Err(e.into()));
        }
        self.memory.reserve_now(request)
    }

    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        if let Err(e) = self.queue.status.check() {
            return ready(Err(e));
        }
        self.memory.settle(hold, actual)
    }

    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        if let Err(e) = self.queue.status.check() {
            return ready(Err(e));
        }
        self.memory.release(hold)
    }

    /// In memory only: a hold's expiry lives in the process (the file keeps the one it was
    /// placed with, which is what a restart, with every stream gone, expires it by).
    fn extend(&self, hold: &Hold) -> Self::ExtendFuture {
        self.memory.extend(hold)
    }

    fn now(&self) -> SystemTime {
        self.memory.now()
    }
}

impl LedgerAdmin for SqliteLedger {
    type TopUpFuture = BoxFuture<Result<TopUp, TopUpError>>;
    type BalanceFuture = Ready<Result<Balance, BackendError>>;
    type JournalFuture = BoxFuture<Result<Vec<JournalEntry>, BackendError>>;
    type ExpireFuture = Ready<Result<Expired, BackendError>>;

    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture {
        if let Err(e) = self.queue.status.check() {
            return Box::pin(ready(Err(e.into())));
        }
        let result = self
            .memory
            .top_up(account, amount, idempotency_key)
            .into_inner();
        // Durable before it is acknowledged: a replay too waits, since the first may still be
        // on its way to the file.
        let durable = self.flush();
        Box::pin(async move {
            let result = result?;
            durable.await?;
            Ok(result)
        })
    }

    fn balance(&self, account: &str) -> Self::BalanceFuture {
        if let Err(e) = self.queue.status.check() {
            return ready(Err(e));
        }
        self.memory.balance(account)
    }

    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture {
        let durable = self.flush();
        let shared = self.shared.clone();
        let account = account.to_owned();
        Box::pin(async move {
            durable.await?;
            let mut guard = shared.conn.lock().await;
            let conn = guard
                .as_mut()
                .ok_or_else(|| BackendError::new("sqlite: the database is closed"))?;
            let rows = sqlx::query(
                "SELECT seq, at_ms, kind, amount, hold, hold_id, balance_after, held_after,
                        request_id, key_id, idempotency_key
                 FROM ledger_journal WHERE account = ? AND seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(&account)
            .bind(int(query.after.unwrap_or(0)))
            .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
            .fetch_all(conn)
            .await
            .map_err(|e| backend_error("journal", &e))?;
            rows.iter().map(journal_entry).collect()
        })
    }

    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture {
        if let Err(e) = self.queue.status.check() {
            return ready(Err(e));
        }
        let expired = self.memory.expire_holds(now);
        self.queue.send(Op::Sweep(millis(now)));
        expired
    }
}

fn journal_entry(row: &sqlx::sqlite::SqliteRow) -> Result<JournalEntry, BackendError> {
    let corrupt = |e: sqlx::Error| backend_error("journal row", &e);
    let word = row.try_get::<&str, _>("kind").map_err(corrupt)?;
    let kind = EntryKind::parse(word)
        .ok_or_else(|| BackendError::new(format!("sqlite journal: unknown kind `{word}`")))?;
    let get = |name: &str| row.try_get::<i64, _>(name).map(uint).map_err(corrupt);
    let text = |name: &str| {
        row.try_get::<Option<String>, _>(name)
            .map(|s| s.map(Arc::from))
            .map_err(corrupt)
    };
    let mut entry = JournalEntry::new(
        get("seq")?,
        from_millis(row.try_get("at_ms").map_err(corrupt)?),
        kind,
        get("amount")?,
        get("hold")?,
        row.try_get::<Option<i64>, _>("hold_id")
            .map_err(corrupt)?
            .map(uint),
        get("balance_after")?,
        get("held_after")?,
    );
    entry.request_id = text("request_id")?;
    entry.key_id = text("key_id")?;
    entry.idempotency_key = text("idempotency_key")?;
    Ok(entry)
}

/// Every account with its open holds, idempotency records and top-up keys; the last hold id.
async fn read_books(
    conn: &mut SqliteConnection,
) -> Result<(Vec<RestoredAccount>, u64), OpenErrorKind> {
    let sql = |e: sqlx::Error| OpenErrorKind::Other(format!("reading the ledger: {e}"));
    let mut accounts: HashMap<String, (RestoredAccount, u64)> = HashMap::new();
    for row in sqlx::query("SELECT account, balance, held, last_seq FROM ledger_accounts")
        .fetch_all(&mut *conn)
        .await
        .map_err(sql)?
    {
        let name: String = row.try_get(0).map_err(sql)?;
        let restored = RestoredAccount {
            name: Arc::from(name.as_str()),
            balance: uint(row.try_get(1).map_err(sql)?),
            last_seq: uint(row.try_get(3).map_err(sql)?),
            holds: Vec::new(),
            keys: Vec::new(),
            top_ups: Vec::new(),
        };
        accounts.insert(name, (restored, uint(row.try_get(2).map_err(sql)?)));
    }
    fn account<'a>(
        accounts: &'a mut HashMap<String, (RestoredAccount, u64)>,
        name: &str,
    ) -> Result<&'a mut RestoredAccount, OpenErrorKind> {
        accounts.get_mut(name).map(|(a, _)| a).ok_or_else(|| {
            OpenErrorKind::Corrupt(format!("a ledger row of an unknown account `{name}`"))
        })
    }
    for row in sqlx::query(
        "SELECT id, account, amount, expires_at_ms, request_id, key_id, idempotency_key
         FROM ledger_holds",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(sql)?
    {
        let text = |i: usize| {
            row.try_get::<Option<String>, _>(i)
                .map(|s| s.map(Arc::from))
                .map_err(sql)
        };
        let hold = RestoredHold {
            id: uint(row.try_get(0).map_err(sql)?),
            amount: uint(row.try_get(2).map_err(sql)?),
            expires_at: from_millis(row.try_get(3).map_err(sql)?),
            request_id: text(4)?,
            key_id: text(5)?,
            idempotency_key: text(6)?,
        };
        account(&mut accounts, row.try_get(1).map_err(sql)?)?
            .holds
            .push(hold);
    }
    for row in sqlx::query(
        "SELECT account, idempotency_key, fingerprint, expires_at_ms, hold_id, charged
         FROM ledger_idempotency",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(sql)?
    {
        let bytes: Vec<u8> = row.try_get(2).map_err(sql)?;
        let fingerprint: [u8; 16] = bytes
            .try_into()
            .map_err(|_| OpenErrorKind::Corrupt("an idempotency fingerprint".into()))?;
        let key = RestoredKey {
            key: Arc::from(row.try_get::<&str, _>(1).map_err(sql)?),
            fingerprint: Fingerprint::from_bytes(fingerprint),
            expires_at: from_millis(row.try_get(3).map_err(sql)?),
            hold_id: uint(row.try_get(4).map_err(sql)?),
            charged: row.try_get::<i64, _>(5).map_err(sql)? != 0,
        };
        account(&mut accounts, row.try_get(0).map_err(sql)?)?
            .keys
            .push(key);
    }
    for row in sqlx::query("SELECT account, idempotency_key, amount FROM ledger_top_ups")
        .fetch_all(&mut *conn)
        .await
        .map_err(sql)?
    {
        let key: Arc<str> = Arc::from(row.try_get::<&str, _>(1).map_err(sql)?);
        let amount = uint(row.try_get(2).map_err(sql)?);
        account(&mut accounts, row.try_get(0).map_err(sql)?)?
            .top_ups
            .push((key, amount));
    }
    let last_hold_id: i64 =
        sqlx::query_scalar("SELECT value FROM tollgate_meta WHERE name = 'last_hold_id'")
            .fetch_one(&mut *conn)
            .await
            .map_err(sql)?;
    let mut restored = Vec::with_capacity(accounts.len());
    for (name, (account, held)) in accounts {
        let open: u64 = account.holds.iter().map(|h| h.amount).sum();
        if open != held || held > account.balance {
            return Err(OpenErrorKind::Corrupt(format!(
                "account `{name}`: {held} credits held on a balance of {}, its open holds \
                 add up to {open}",
                account.balance
            )));
        }
        restored.push(account);
    }
    Ok((restored, uint(last_hold_id)))
}

/// The group commit: everything queued while the last commit ran goes in the next one.
async fn writer(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(Op, Instant)>,
    status: Arc<Status>,
) {
    let mut batch: Vec<(Op, Instant)> = Vec::with_capacity(1024);
    let mut committed = 0u64;
    // The first commit not fsynced since the last fsync.
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let mut internal = 0;
        let received = match unsynced_since {
            None => rx.recv_many(&mut batch, MAX_BATCH).await,
            // Idle with a commit not yet fsynced: wake up in time to fsync it.
            Some(since) => {
                let deadline = tokio::time::Instant::from_std(since + FSYNC_EVERY);
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, MAX_BATCH)).await {
                    Ok(n) => n,
                    Err(_) => {
                        // Our own barrier: an fsync, not a ticket of anyone.
                        internal = 1;
                        batch.push((Op::Barrier, Instant::now()));
                        1
                    }
                }
            }
        };
        if received == 0 {
            return; // every ledger handle is gone, and everything is written
        }
        let fsync = batch.iter().any(|(op, _)| op.needs_fsync())
            || unsynced_since.is_some_and(|since| since.elapsed() >= FSYNC_EVERY);
        let mut attempt = 0;
        loop {
            match write_batch(&shared, &batch, fsync).await {
                Ok(()) => break,
                Err(error) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, "sqlite ledger: group commit failed, retrying");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(error) => {
                    tracing::error!(
                        %error,
                        "sqlite ledger: group commit failed; refusing every call until restart"
                    );
                    let _ = status.failed.set(error.to_string());
                    status.committed.send_modify(|_| {});
                    return;
                }
            }
        }
        let lag = batch[0].1.elapsed();
        let lag_us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        status.last_lag_us.store(lag_us, Ordering::Relaxed);
        status.max_lag_us.fetch_max(lag_us, Ordering::Relaxed);
        status.commits.fetch_add(1, Ordering::Relaxed);
        if lag > super::DURABILITY_WINDOW {
            status.late.fetch_add(1, Ordering::Relaxed);
        }
        let moved = batch
            .iter()
            .filter(|(op, _)| matches!(op, Op::Move(_)))
            .count();
        status.movements.fetch_add(moved as u64, Ordering::Relaxed);
        committed += (batch.len() - internal) as u64;
        status.committed.send_replace(committed);
        unsynced_since = match (fsync, unsynced_since) {
            (true, _) => None,
            (false, None) => Some(batch[0].1),
            (false, since) => since,
        };
        batch.clear();
    }
}

async fn write_batch(
    shared: &Shared,
    batch: &[(Op, Instant)],
    fsync: bool,
) -> Result<(), sqlx::Error> {
    let moves: Vec<&Movement> = batch
        .iter()
        .filter_map(|(op, _)| match op {
            Op::Move(m) => Some(m),
            Op::Sweep(_) | Op::Barrier => None,
        })
        .collect();
    // Holds opened and closed within the batch never touch `ledger_holds`.
    let mut opened: HashMap<u64, &Movement> = HashMap::new();
    let mut closed: Vec<i64> = Vec::new();
    let mut accounts: HashMap<&str, (u64, u64, u64)> = HashMap::new();
    let mut last_hold_id = 0;
    for m in &moves {
        let e = &m.entry;
        accounts.insert(&m.account, (e.balance_after, e.held_after, e.seq));
        match (e.kind, e.hold_id) {
            (EntryKind::Reserve, Some(id)) => {
                opened.insert(id, m);
                last_hold_id = last_hold_id.max(id);
            }
            (EntryKind::Settle | EntryKind::Release | EntryKind::Expire, Some(id))
                if opened.remove(&id).is_none() =>
            {
                closed.push(int(id));
            }
            _ => {}
        }
    }

    let mut guard = shared.conn.lock().await;
    let conn = guard.as_mut().ok_or(sqlx::Error::PoolClosed)?;
    if fsync {
        sqlx::raw_sql("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await?;
    }
    let result = commit(
        conn,
        &moves,
        opened,
        closed,
        accounts,
        last_hold_id,
        batch,
        fsync,
    )
    .await;
    if fsync {
        sqlx::raw_sql("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await?;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn commit(
    conn: &mut SqliteConnection,
    moves: &[&Movement],
    opened: HashMap<u64, &Movement>,
    closed: Vec<i64>,
    accounts: HashMap<&str, (u64, u64, u64)>,
    last_hold_id: u64,
    batch: &[(Op, Instant)],
    fsync: bool,
) -> Result<(), sqlx::Error> {
    use sqlx::Connection;

    let mut tx = conn.begin().await?;
    if fsync {
        // A commit that writes nothing is not fsynced: this one always writes a row, so that
        // its fsync also covers the commits before it that were not fsynced.
        sqlx::query(
            "INSERT INTO tollgate_meta (name, value) VALUES ('synced_at_ms', ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(super::schema::now_ms())
        .execute(&mut *tx)
        .await?;
    }
    for chunk in moves.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger_journal (account, seq, at_ms, kind, amount, hold, hold_id, \
             balance_after, held_after, request_id, key_id, idempotency_key) ",
        );
        insert.push_values(chunk, |mut row, m| {
            let e = &m.entry;
            row.push_bind(&*m.account)
                .push_bind(int(e.seq))
                .push_bind(millis(e.at))
                .push_bind(e.kind.as_str())
                .push_bind(int(e.amount))
                .push_bind(int(e.hold))
                .push_bind(e.hold_id.map(int))
                .push_bind(int(e.balance_after))
                .push_bind(int(e.held_after))
                .push_bind(e.request_id.as_deref())
                .push_bind(e.key_id.as_deref())
                .push_bind(e.idempotency_key.as_deref());
        });
        insert.build().execute(&mut *tx).await?;
    }
    let accounts: Vec<_> = accounts.into_iter().collect();
    for chunk in accounts.chunks(ROWS_PER_INSERT) {
        let mut upsert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger_accounts (account, balance, held, last_seq) ",
        );
        upsert.push_values(chunk, |mut row, (account, (balance, held, seq))| {
            row.push_bind(*account)
                .push_bind(int(*balance))
                .push_bind(int(*held))
                .push_bind(int(*seq));
        });
        upsert.push(
            " ON CONFLICT (account) DO UPDATE SET balance = excluded.balance, \
             held = excluded.held, last_seq = excluded.last_seq",
        );
        upsert.build().execute(&mut *tx).await?;
    }
    let opened: Vec<(u64, &Movement)> = opened.into_iter().collect();
    for chunk in opened.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger_holds (id, account, amount, expires_at_ms, request_id, key_id, \
             idempotency_key) ",
        );
        insert.push_values(chunk, |mut row, (id, m)| {
            let e = &m.entry;
            row.push_bind(int(*id))
                .push_bind(&*m.account)
                .push_bind(int(e.hold))
                .push_bind(millis(m.hold_expires_at.unwrap_or(e.at)))
                .push_bind(e.request_id.as_deref())
                .push_bind(e.key_id.as_deref())
                .push_bind(e.idempotency_key.as_deref());
        });
        insert.build().execute(&mut *tx).await?;
    }
    for chunk in closed.chunks(ROWS_PER_INSERT) {
        let mut delete = QueryBuilder::<Sqlite>::new("DELETE FROM ledger_holds WHERE id IN (");
        let mut ids = delete.separated(", ");
        for id in chunk {
            ids.push_bind(*id);
        }
        delete.push(")");
        delete.build().execute(&mut *tx).await?;
    }
    if last_hold_id > 0 {
        sqlx::query("UPDATE tollgate_meta SET value = MAX(value, ?) WHERE name = 'last_hold_id'")
            .bind(int(last_hold_id))
            .execute(&mut *tx)
            .await?;
    }
    // Top-up keys and request idempotency keys, in order (rare next to holds).
    for (op, _) in batch {
        match op {
            Op::Move(m) => idempotency(&mut tx, m).await?,
            Op::Barrier => {}
            Op::Sweep(now_ms) => {
                sqlx::query(
                    "DELETE FROM ledger_idempotency WHERE charged = 1 AND expires_at_ms <= ?",
                )
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await
}

async fn idempotency(conn: &mut SqliteConnection, m: &Movement) -> Result<(), sqlx::Error> {
    let e = &m.entry;
    let (Some(key), Some(hold_id)) = (e.idempotency_key.as_deref(), e.hold_id) else {
        if let (EntryKind::TopUp, Some(key)) = (e.kind, e.idempotency_key.as_deref()) {
            sqlx::query(
                "INSERT INTO ledger_top_ups (account, idempotency_key, amount) VALUES (?, ?, ?)",
            )
            .bind(&*m.account)
            .bind(key)
            .bind(int(e.amount))
            .execute(conn)
            .await?;
        }
        return Ok(());
    };
    let query = match e.kind {
        EntryKind::Reserve => {
            let Some((fingerprint, expires_at)) = m.key else {
                return Ok(());
            };
            return sqlx::query(
                "INSERT INTO ledger_idempotency \
                 (account, idempotency_key, fingerprint, expires_at_ms, hold_id, charged) \
                 VALUES (?, ?, ?, ?, ?, 0) \
                 ON CONFLICT (account, idempotency_key) DO UPDATE SET \
                 fingerprint = excluded.fingerprint, expires_at_ms = excluded.expires_at_ms, \
                 hold_id = excluded.hold_id, charged = 0",
            )
            .bind(&*m.account)
            .bind(key)
            .bind(fingerprint.as_bytes().to_vec())
            .bind(millis(expires_at))
            .bind(int(hold_id))
            .execute(conn)
            .await
            .map(drop);
        }
        EntryKind::Release => {
            "DELETE FROM ledger_idempotency WHERE account = ? AND idempotency_key = ? AND hold_id = ?"
        }
        EntryKind::Settle | EntryKind::Expire => {
            "UPDATE ledger_idempotency SET charged = 1 \
             WHERE account = ? AND idempotency_key = ? AND hold_id = ?"
        }
        EntryKind::TopUp => return Ok(()),
    };
    sqlx::query(query)
        .bind(&*m.account)
        .bind(key)
        .bind(int(hold_id))
        .execute(conn)
        .await
        .map(drop)
}
