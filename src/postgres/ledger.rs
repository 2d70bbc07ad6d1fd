//! The PostgreSQL [`Ledger`]: one function call (one statement, one round trip) per operation.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{postgres::PgRow, Row, SqlStr};

use super::{
    coalesce::{self, Answers, Coalescer},
    limiter::Bucket,
    millis, to_i64, to_u64, BoxFuture, Shared,
};
use crate::{
    credits::{
        ledger::{
            Balance, EntryKind, Expired, Hold, JournalEntry, JournalQuery, Reservation,
            ReserveError, ReserveRequest, Settlement, TopUp, TopUpError, MAX_CREDITS,
        },
        Ledger, LedgerAdmin,
    },
    BackendError,
};

/// Holds settled per statement by [`LedgerAdmin::expire_holds`].
const EXPIRE_BATCH: i32 = 512;

/// The statements, with the schema in them.
pub(super) struct Statements {
    top_up: SqlStr,
    balance: SqlStr,
    journal: SqlStr,
    expire: SqlStr,
    extend: SqlStr,
}

impl Statements {
    fn new(shared: &Shared) -> Self {
        Statements {
            top_up: shared.sql(
                "SELECT status, balance, held, holds FROM @schema@.top_up($1, $2, $3, $4)",
            ),
            balance: shared.sql(
                "SELECT balance, held, holds FROM @schema@.balances WHERE account = $1",
            ),
            extend: shared.sql("SELECT @schema@.extend_hold($1, $2, $3)"),
            journal: shared.sql(
                "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint, kind, amount, hold, \
                 hold_id, balance_after, held_after, request_id, key_id, idempotency_key \
                 FROM @schema@.journal WHERE account = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            ),
            expire: shared.sql(
                "SELECT closed, charged FROM @schema@.expire(to_timestamp($1::float8 / 1000000), $2)",
            ),
        }
    }
}

/// A [`Ledger`] in PostgreSQL, shared by every replica connected to the same database.
///
/// Each operation is one call of a PL/pgSQL function that locks the account's row in
/// `balances`, so it is atomic per account and exact under any concurrency from any number of
/// processes, and committed before it answers (a top-up answered is durable). `CHECK`
/// constraints make a negative balance impossible. Every call on an account first settles its
/// expired holds at their held amount, so a hold left by a replica that died is charged by
/// whichever replica touches the account next (and by [`expire_holds`](LedgerAdmin::expire_holds)).
/// The journal is the `journal` table, one row per movement appended in the same statement;
/// time is the database's, never a replica's clock.
///
/// A reserve whose answer is lost (a timeout, a dropped connection) may have committed: the
/// ledger then releases the hold by its id in the background, and fences the id so that a
/// reserve still in flight places nothing. Amounts are limited to [`MAX_CREDITS`], as on every
/// backend.
///
/// Built by [`PostgresBackend::ledger`](super::PostgresBackend::ledger).
///
/// # Example
///
/// ```no_run
/// use tollgate::credits::{ledger::ReserveRequest, Ledger, LedgerAdmin};
/// use tollgate::postgres::PostgresBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = PostgresBackend::connect("postgres://postgres@127.0.0.1/billing").await?;
/// backend.migrate().await?;
/// let ledger = backend.ledger();
/// ledger.top_up("acct_1", 100, "invoice-1").await?;
/// let hold = ledger.reserve(ReserveRequest::new("acct_1", 30)).await?.into_hold().unwrap();
/// let settlement = ledger.settle(&hold, 12).await?;
/// assert_eq!(settlement.balance, 88);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresLedger {
    shared: Arc<Shared>,
    sql: Arc<Statements>,
}

/// What the reserve statement did: the hold placed or the replay, with the limits charged, or
/// the limits refused; each with the limits' GCRA answer.
pub(super) enum Reserved {
    Held(Hold, Limits),
    Replayed(Limits),
    Limited(Limits),
}

/// The GCRA answer of a statement: verdict, index, wait, the buckets' states (`None`: no limit
/// was looked at).
pub(super) type Limits = Option<(i32, i32, i64, Vec<i64>)>;

/// Rate-limit corrections made by the close statement.
pub(super) enum Corrections {
    None,
    /// Whether or not the hold was still open (tokens reported by a response).
    Always(Vec<Bucket>),
    /// Only if this call closed the hold (the refund of a reserve whose answer was lost).
    IfOpen(Vec<Bucket>),
}

impl PostgresLedger {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let sql = Arc::new(Statements::new(&shared));
        PostgresLedger { shared, sql }
    }

    fn hold_ttl_ms(&self) -> i64 {
        millis(self.shared.options.hold_ttl)
    }

    /// After a reserve whose answer was lost, release the hold if it was placed (and give back
    /// the rate-limit cells charged with it) and fence its id; retried in the background until
    /// the hold's TTL has passed.
    fn compensate(&self, account: Arc<str>, id: i64, refunds: Vec<Bucket>) {
        self.close_in_background(account, id, "release", 0, true, refunds);
    }

    /// Close a hold in the background, retrying until the hold's TTL has passed: after a close
    /// that failed (PostgreSQL down) or a reserve whose answer was lost. A hold is closed once,
    /// so trying again is safe; the corrections are applied only by the call that closes it.
    fn close_in_background(
        &self,
        account: Arc<str>,
        id: i64,
        how: &'static str,
        actual: u64,
        fence: bool,
        corrections: Vec<Bucket>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ledger = self.clone();
        let deadline = tokio::time::Instant::now() + ledger.shared.options.hold_ttl;
        runtime.spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                tokio::time::sleep(delay).await;
                let close = ledger.close_once(
                    &account,
                    id,
                    how,
                    actual,
                    fence,
                    Corrections::IfOpen(corrections.clone()),
                );
                match close.await {
                    Ok(_) => return,
                    Err(error) if tokio::time::Instant::now() + delay < deadline => {
                        tracing::debug!(%error, how, "closing a hold in the background: retrying");
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(error) => {
                        tracing::warn!(%error, how, "could not close a hold; it expires at its hold TTL");
                        return;
                    }
                }
            }
        });
    }

    /// The reserve statement, charging `buckets` with the hold.
    pub(super) fn reserve_charging(
        &self,
        request: ReserveRequest,
        buckets: Vec<Bucket>,
        now_ns: Option<i64>,
    ) -> BoxFuture<Result<Reserved, ReserveError>> {
        let id = hold_id();
        let amount = request.amount;
        let (ikey, fingerprint) = match &request.idempotency {
            Some((key, fp)) => (Some(key.to_string()), Some(fp.as_bytes().to_vec())),
            None => (None, None),
        };
        let refunds: Vec<Bucket> = buckets
            .iter()
            .filter(|b| b.amount > 0)
            .map(|b| Bucket {
                amount: -b.amount,
                ..b.clone()
            })
            .collect();
        let (keys, t, burst, cost) = Bucket::columns(buckets);
        let call = ReserveCall {
            account: request.account.to_string(),
            id,
            amount: to_i64(amount),
            ttl: self.hold_ttl_ms(),
            window: millis(self.shared.options.idempotency_window),
            ikey,
            fingerprint,
            request_id: request.request_id.as_deref().map(str::to_owned),
            key_id: request.key_id.as_deref().map(str::to_owned),
            keys,
            t,
            burst,
            cost,
            now_ns,
        };
        let hold_ttl = self.shared.options.hold_ttl;
        let shared = Arc::clone(&self.shared);
        let ledger = self.clone();
        let request_arc = request.request_id;
        let account = request.account;
        Box::pin(async move {
            if amount > MAX_CREDITS {
                return Err(ReserveError::Insufficient {
                    required: amount,
                    available: 0,
                });
            }
            // A caller that gives up (its future dropped) while the statement is out leaves a
            // hold nobody will close: released in the background, as a lost answer is.
            let guard = OnDrop::new({
                let (ledger, account, refunds) = (ledger.clone(), account.clone(), refunds.clone());
                move || ledger.compensate(account, id, refunds)
            });
            let answer = if shared.options.coalesce {
                coalesce::submit(shared, books, Book::Reserve(call))
                    .await
                    .and_then(Booked::reserve)
            } else {
                reserve_one(&shared, call).await
            };
            guard.disarm();
            let ReserveRow {
                status,
                available,
                limits,
            } = match answer {
                Ok(row) => row,
                Err(error) => {
                    // The statement may have committed: make sure the hold does not stay. One
                    // that never got a connection placed nothing: nothing to undo.
                    if error.may_have_applied() {
                        ledger.compensate(account, id, refunds);
                    }
                    return Err(error.into());
                }
            };
            match status.as_str() {
                "held" => Ok(Reserved::Held(
                    Hold::new(to_u64(id), account, amount, to_u64(available))
                        .with_request_id(request_arc)
                        .with_ttl(Some(hold_ttl)),
                    limits,
                )),
                "insufficient" => Err(ReserveError::Insufficient {
                    required: amount,
                    available: to_u64(available),
                }),
                "replayed" => Ok(Reserved::Replayed(limits)),
                "limited" => Ok(Reserved::Limited(limits)),
                "reused" => Err(ReserveError::KeyReused),
                "in_use" => Err(ReserveError::KeyInUse),
                _ => Err(BackendError::new("postgres reserve: unexpected reply").into()),
            }
        })
    }

    fn close(
        &self,
        account: &str,
        id: i64,
        how: &'static str,
        actual: u64,
    ) -> BoxFuture<Result<Settlement, BackendError>> {
        self.close_correcting(account, id, how, actual, false, Corrections::None)
    }

    /// Close a hold and apply rate-limit corrections to `buckets`, in one statement. When it
    /// fails, the close goes on in the background until it is made (the answer is still the
    /// error): a settle lost to an outage charges the usage, not the hold at its expiry.
    pub(super) fn close_correcting(
        &self,
        account: &str,
        id: i64,
        how: &'static str,
        actual: u64,
        fence: bool,
        corrections: Corrections,
    ) -> BoxFuture<Result<Settlement, BackendError>> {
        let buckets = match &corrections {
            Corrections::None => Vec::new(),
            Corrections::Always(buckets) | Corrections::IfOpen(buckets) => buckets.clone(),
        };
        let call = self.close_once(account, id, how, actual, fence, corrections);
        let ledger = self.clone();
        let account: Arc<str> = account.into();
        Box::pin(async move {
            // Dropped while the statement is out: the close goes on in the background.
            let guard = OnDrop::new({
                let (ledger, account, buckets) = (ledger.clone(), account.clone(), buckets.clone());
                move || ledger.close_in_background(account, id, how, actual, fence, buckets)
            });
            let result = call.await;
            guard.disarm();
            if result.is_err() {
                ledger.close_in_background(account, id, how, actual, fence, buckets);
            }
            result
        })
    }

    /// One close statement (tried again at once only on a broken connection; a retry applies the
    /// corrections only if it is the call that closes the hold).
    fn close_once(
        &self,
        account: &str,
        id: i64,
        how: &'static str,
        actual: u64,
        fence: bool,
        corrections: Corrections,
    ) -> BoxFuture<Result<Settlement, BackendError>> {
        let (when, buckets) = match corrections {
            Corrections::None => ("always", Vec::new()),
            Corrections::Always(buckets) => ("always", buckets),
            Corrections::IfOpen(buckets) => ("if_open", buckets),
        };
        let now_ns = buckets.first().and_then(|b| b.now_ns);
        let (keys, t, burst, delta) = Bucket::columns(buckets);
        let fence = if fence {
            self.hold_ttl_ms().saturating_mul(2)
        } else {
            0
        };
        let call = CloseCall {
            account: account.to_owned(),
            id,
            how,
            actual: to_i64(actual.min(MAX_CREDITS)),
            fence_ms: fence,
            when,
            keys,
            t,
            burst,
            delta,
            now_ns,
        };
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            if shared.options.coalesce {
                coalesce::submit(shared, books, Book::Close(call))
                    .await
                    .and_then(Booked::close)
            } else {
                close_one(&shared, call).await
            }
        })
    }
}

/// The arguments of one reserve statement.
#[derive(Clone)]
pub(super) struct ReserveCall {
    account: String,
    id: i64,
    amount: i64,
    ttl: i64,
    window: i64,
    ikey: Option<String>,
    fingerprint: Option<Vec<u8>>,
    request_id: Option<String>,
    key_id: Option<String>,
    keys: Vec<String>,
    t: Vec<i64>,
    burst: Vec<i64>,
    cost: Vec<i64>,
    now_ns: Option<i64>,
}

/// The answer of one reserve statement.
pub(super) struct ReserveRow {
    status: String,
    available: i64,
    limits: Limits,
}

/// A reserve's answer from `row`, its columns from `at` on: status, available, verdict, idx,
/// wait, rels.
fn reserve_row(row: &PgRow, at: usize) -> Result<ReserveRow, sqlx::Error> {
    let status: String = row.try_get(at)?;
    let available: i64 = row.try_get(at + 1)?;
    let rels: Option<Vec<i64>> = row.try_get(at + 5)?;
    let limits = match rels {
        Some(rels) => Some((
            row.try_get(at + 2)?,
            row.try_get(at + 3)?,
            row.try_get(at + 4)?,
            rels,
        )),
        None => None,
    };
    Ok(ReserveRow {
        status,
        available,
        limits,
    })
}

/// One reserve alone, tried again with the same hold id on a broken connection (a reserve that
/// did commit answers `held` again).
pub(super) fn reserve_one(
    shared: &Arc<Shared>,
    call: ReserveCall,
) -> BoxFuture<Result<ReserveRow, BackendError>> {
    let sql = shared.hot.reserve.clone();
    Box::pin(shared.call_retrying("reserve", move |pool, _| {
        let query = sqlx::query(sql.clone())
            .bind(call.account.clone())
            .bind(call.id)
            .bind(call.amount)
            .bind(call.ttl)
            .bind(call.window)
            .bind(call.ikey.clone())
            .bind(call.fingerprint.clone())
            .bind(call.request_id.clone())
            .bind(call.key_id.clone())
            .bind(call.keys.clone())
            .bind(call.t.clone())
            .bind(call.burst.clone())
            .bind(call.cost.clone())
            .bind(call.now_ns);
        async move { reserve_row(&query.fetch_one(&pool).await?, 0) }
    }))
}

/// The rate-limit buckets of a batch's calls, as `reserve_many` and `close_many` take them:
/// per call how many (`p_nkeys`), then every bucket's key, `t`, burst and amount (the cost of a
/// reserve, the correction of a close), in the calls' order.
#[derive(Clone, Default)]
struct BatchBuckets {
    nkeys: Vec<i32>,
    keys: Vec<String>,
    t: Vec<i64>,
    burst: Vec<i64>,
    amount: Vec<i64>,
}

impl BatchBuckets {
    /// The next call's buckets.
    fn push(&mut self, keys: Vec<String>, t: Vec<i64>, burst: Vec<i64>, amount: Vec<i64>) {
        self.nkeys
            .push(i32::try_from(keys.len()).unwrap_or(i32::MAX));
        self.keys.extend(keys);
        self.t.extend(t);
        self.burst.extend(burst);
        self.amount.extend(amount);
    }

    /// Binds the five columns, in that order, after the calls' own.
    fn bind(
        self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.nkeys)
            .bind(self.keys)
            .bind(self.t)
            .bind(self.burst)
            .bind(self.amount)
    }
}

/// One call's answer in a batch's row (its status in column 1): `None` to send it again alone
/// (`retry`: rolled back after a lock wait), its error (`error`, the message in column
/// `error_column`), or its answer read by `answer`.
fn batch_answer<T>(
    row: &PgRow,
    what: &str,
    error_column: usize,
    answer: impl Fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<Option<Result<T, BackendError>>, sqlx::Error> {
    let status: &str = row.try_get(1)?;
    Ok(match status {
        "retry" => None,
        "error" => Some(Err(BackendError::new(format!(
            "postgres {what}: {}",
            row.try_get::<Option<&str>, _>(error_column)?
                .unwrap_or("failed")
        )))),
        _ => Some(Ok(answer(row)?)),
    })
}

/// The arguments of one close statement.
#[derive(Clone)]
pub(super) struct CloseCall {
    account: String,
    id: i64,
    how: &'static str,
    actual: i64,
    fence_ms: i64,
    when: &'static str,
    keys: Vec<String>,
    t: Vec<i64>,
    burst: Vec<i64>,
    delta: Vec<i64>,
    now_ns: Option<i64>,
}

/// A close's answer from `row`, its columns from `at` on: charged, balance, was_open.
fn settlement(row: &PgRow, at: usize) -> Result<Settlement, sqlx::Error> {
    let (charged, balance, open): (i64, i64, bool) =
        (row.try_get(at)?, row.try_get(at + 1)?, row.try_get(at + 2)?);
    Ok(Settlement::new(to_u64(charged), to_u64(balance), open))
}

/// One close alone (tried again at once only on a broken connection; a retry applies the
/// corrections only if it is the call that closes the hold).
pub(super) fn close_one(
    shared: &Arc<Shared>,
    call: CloseCall,
) -> BoxFuture<Result<Settlement, BackendError>> {
    let sql = shared.hot.close.clone();
    Box::pin(shared.call_retrying("settle", move |pool, attempt| {
        let query = sqlx::query(sql.clone())
            .bind(call.account.clone())
            .bind(call.id)
            .bind(call.how)
            .bind(call.actual)
            .bind(call.fence_ms)
            .bind(if attempt == 0 { call.when } else { "if_open" })
            .bind(call.keys.clone())
            .bind(call.t.clone())
            .bind(call.burst.clone())
            .bind(call.delta.clone())
            .bind(call.now_ns);
        async move { settlement(&query.fetch_one(&pool).await?, 0) }
    }))
}

/// One call on the books, reserve or close, as the coalescer takes them.
#[derive(Clone)]
pub(super) enum Book {
    /// A reserve.
    Reserve(ReserveCall),
    /// A close (settle, release, expire).
    Close(CloseCall),
}

/// The answer of a [`Book`] call, of the same kind.
pub(super) enum Booked {
    /// A reserve's.
    Reserve(ReserveRow),
    /// A close's.
    Close(Settlement),
}

impl Booked {
    fn reserve(self) -> Result<ReserveRow, BackendError> {
        match self {
            Booked::Reserve(row) => Ok(row),
            Booked::Close(_) => Err(BackendError::new("postgres: a close's answer to a reserve")),
        }
    }

    fn close(self) -> Result<Settlement, BackendError> {
        match self {
            Booked::Close(settlement) => Ok(settlement),
            Booked::Reserve(_) => Err(BackendError::new("postgres: a reserve's answer to a close")),
        }
    }
}

/// The account of a call (batches are sorted by it).
fn book_account(call: &Book) -> &str {
    match call {
        Book::Reserve(call) => &call.account,
        Book::Close(call) => &call.account,
    }
}

/// The coalescer of the calls on the books.
fn books(shared: &Shared) -> &Coalescer<Book, Booked> {
    &shared.books
}

/// One call alone, its own statement (`reserve` or `close`).
fn book_one(shared: &Arc<Shared>, call: Book) -> BoxFuture<Result<Booked, BackendError>> {
    match call {
        Book::Reserve(call) => {
            let one = reserve_one(shared, call);
            Box::pin(async move { one.await.map(Booked::Reserve) })
        }
        Book::Close(call) => {
            let one = close_one(shared, call);
            Box::pin(async move { one.await.map(Booked::Close) })
        }
    }
}

/// The columns of a batch's reserves, as `book_many` takes them (`p_r_*`).
#[derive(Clone, Default)]
struct ReserveColumns {
    account: Vec<String>,
    id: Vec<i64>,
    amount: Vec<i64>,
    ttl: Vec<i64>,
    window: Vec<i64>,
    ikey: Vec<Option<String>>,
    fingerprint: Vec<Option<Vec<u8>>>,
    request_id: Vec<Option<String>>,
    key_id: Vec<Option<String>>,
    buckets: BatchBuckets,
    now_ns: Vec<Option<i64>>,
}

/// The columns of a batch's closes, as `book_many` takes them (`p_c_*`).
#[derive(Clone, Default)]
struct CloseColumns {
    account: Vec<String>,
    id: Vec<i64>,
    how: Vec<&'static str>,
    actual: Vec<i64>,
    fence_ms: Vec<i64>,
    when: Vec<&'static str>,
    buckets: BatchBuckets,
    now_ns: Vec<Option<i64>>,
}

/// Several reserves and closes in one statement (`book_many`), in the order given, one commit
/// for all. Sent again on a connection lost before the answer, as a single call is: a reserve is
/// idempotent by its hold id (one that was applied answers `held` again), closing is idempotent
/// by hold id, and on a second attempt every close's corrections are applied only if it is the
/// call that closes its hold (`if_open`), so none is applied twice. A call that waited on a lock
/// too long answers `None` (rolled back, to be sent again alone).
pub(super) fn book_many(shared: &Arc<Shared>, calls: Vec<Book>) -> BoxFuture<Answers<Booked>> {
    let sql = shared.hot.book_many.clone();
    let mut kinds = Vec::with_capacity(calls.len());
    let (mut r, mut c) = (ReserveColumns::default(), CloseColumns::default());
    for call in calls {
        match call {
            Book::Reserve(call) => {
                kinds.push("r");
                r.account.push(call.account);
                r.id.push(call.id);
                r.amount.push(call.amount);
                r.ttl.push(call.ttl);
                r.window.push(call.window);
                r.ikey.push(call.ikey);
                r.fingerprint.push(call.fingerprint);
                r.request_id.push(call.request_id);
                r.key_id.push(call.key_id);
                r.now_ns.push(call.now_ns);
                r.buckets.push(call.keys, call.t, call.burst, call.cost);
            }
            Book::Close(call) => {
                kinds.push("c");
                c.account.push(call.account);
                c.id.push(call.id);
                c.how.push(call.how);
                c.actual.push(call.actual);
                c.fence_ms.push(call.fence_ms);
                c.when.push(call.when);
                c.now_ns.push(call.now_ns);
                c.buckets.push(call.keys, call.t, call.burst, call.delta);
            }
        }
    }
    let binds = Arc::new((kinds, r, c));
    Box::pin(shared.call_retrying("book", move |pool, attempt| {
        let (kinds, r, mut c) = (*binds).clone();
        if attempt > 0 {
            // The first attempt may have closed some holds: their corrections are made.
            c.when = vec!["if_open"; c.when.len()];
        }
        let sql = sql.clone();
        async move {
            let query = sqlx::query(sql)
                .bind(&kinds)
                .bind(r.account)
                .bind(r.id)
                .bind(r.amount)
                .bind(r.ttl)
                .bind(r.window)
                .bind(r.ikey)
                .bind(r.fingerprint)
                .bind(r.request_id)
                .bind(r.key_id);
            let query = r.buckets.bind(query).bind(r.now_ns);
            let query = query
                .bind(c.account)
                .bind(c.id)
                .bind(c.how)
                .bind(c.actual)
                .bind(c.fence_ms)
                .bind(c.when);
            let rows = c
                .buckets
                .bind(query)
                .bind(c.now_ns)
                .fetch_all(&pool)
                .await?;
            if rows.len() != kinds.len() {
                return Err(sqlx::Error::Protocol(
                    "book_many answered another number of rows".into(),
                ));
            }
            rows.iter()
                .zip(&kinds)
                .map(|(row, kind)| {
                    if *kind == "r" {
                        batch_answer(row, "reserve", 10, |row| {
                            reserve_row(row, 1).map(Booked::Reserve)
                        })
                    } else {
                        batch_answer(row, "settle", 10, |row| {
                            settlement(row, 7).map(Booked::Close)
                        })
                    }
                })
                .collect()
        }
    }))
}

/// The coalescer of a pool's calls on the books.
pub(super) fn coalescer() -> Coalescer<Book, Booked> {
    Coalescer::new(book_one, book_many, book_account)
}

impl Ledger for PostgresLedger {
    type ReserveFuture = BoxFuture<Result<Reservation, ReserveError>>;
    type SettleFuture = BoxFuture<Result<Settlement, BackendError>>;
    type ReleaseFuture = BoxFuture<Result<Settlement, BackendError>>;
    type ExtendFuture = BoxFuture<Result<bool, BackendError>>;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        let call = self.reserve_charging(request, Vec::new(), None);
        Box::pin(async move {
            match call.await? {
                Reserved::Held(hold, _) => Ok(Reservation::Held(hold)),
                Reserved::Replayed(_) => Ok(Reservation::Replayed),
                Reserved::Limited(_) => {
                    Err(BackendError::new("postgres reserve: unexpected reply").into())
                }
            }
        })
    }

    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        self.close(hold.account(), to_i64(hold.id()), "settle", actual)
    }

    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        self.close(hold.account(), to_i64(hold.id()), "release", 0)
    }

    /// One statement (`extend_hold`, migration 3): the hold's expiry moves to the hold TTL from
    /// now (the database's clock).
    fn extend(&self, hold: &Hold) -> Self::ExtendFuture {
        let sql = self.sql.extend.clone();
        let account = hold.account().to_owned();
        let (id, ttl) = (to_i64(hold.id()), self.hold_ttl_ms());
        Box::pin(self.shared.call("extend", move |pool| async move {
            let row = sqlx::query(sql)
                .bind(account)
                .bind(id)
                .bind(ttl)
                .fetch_one(&pool)
                .await?;
            row.try_get::<bool, _>(0)
        }))
    }

    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

impl LedgerAdmin for PostgresLedger {
    type TopUpFuture = BoxFuture<Result<TopUp, TopUpError>>;
    type BalanceFuture = BoxFuture<Result<Balance, BackendError>>;
    type JournalFuture = BoxFuture<Result<Vec<JournalEntry>, BackendError>>;
    type ExpireFuture = BoxFuture<Result<Expired, BackendError>>;

    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture {
        let sql = self.sql.top_up.clone();
        let account = account.to_owned();
        let key = idempotency_key.to_owned();
        let call = self.shared.call("top-up", move |pool| async move {
            let row = sqlx::query(sql)
                .bind(account)
                .bind(to_i64(amount))
                .bind(key)
                .bind(to_i64(MAX_CREDITS))
                .fetch_one(&pool)
                .await?;
            let status: String = row.try_get(0)?;
            let numbers: [Option<i64>; 3] = [row.try_get(1)?, row.try_get(2)?, row.try_get(3)?];
            Ok((status, numbers.map(|n| to_u64(n.unwrap_or(0)))))
        });
        Box::pin(async move {
            if amount > MAX_CREDITS {
                return Err(TopUpError::Overflow);
            }
            let (status, [balance, held, holds]) = call.await?;
            match status.as_str() {
                "applied" => Ok(TopUp::new(true, Balance::new(balance, held, holds))),
                "duplicate" => Ok(TopUp::new(false, Balance::new(balance, held, holds))),
                "reused" => Err(TopUpError::KeyReused { amount: balance }),
                "overflow" => Err(TopUpError::Overflow),
                _ => Err(BackendError::new("postgres top-up: unexpected reply").into()),
            }
        })
    }

    fn balance(&self, account: &str) -> Self::BalanceFuture {
        let sql = self.sql.balance.clone();
        let account = account.to_owned();
        Box::pin(self.shared.call_retrying("balance", move |pool, _| {
            let query = sqlx::query(sql.clone()).bind(account.clone());
            async move {
                let row = query.fetch_optional(&pool).await?;
                let Some(row) = row else {
                    return Ok(Balance::default());
                };
                let (balance, held, holds): (i64, i64, i64) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                Ok(Balance::new(to_u64(balance), to_u64(held), to_u64(holds)))
            }
        }))
    }

    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture {
        let sql = self.sql.journal.clone();
        let account = account.to_owned();
        let after = query.after.map_or(0, to_i64);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        Box::pin(self.shared.call_retrying("journal", move |pool, _| {
            let query = sqlx::query(sql.clone())
                .bind(account.clone())
                .bind(after)
                .bind(limit);
            async move {
                let rows = query.fetch_all(&pool).await?;
                rows.iter().map(entry).collect()
            }
        }))
    }

    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture {
        let sql = self.sql.expire.clone();
        let micros = i64::try_from(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros(),
        )
        .unwrap_or(i64::MAX);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let mut expired = Expired::default();
            loop {
                let sql = sql.clone();
                let (holds, charged) = shared
                    .call("expire", move |pool| async move {
                        let row = sqlx::query(sql)
                            .bind(micros)
                            .bind(EXPIRE_BATCH)
                            .fetch_one(&pool)
                            .await?;
                        Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?))
                    })
                    .await?;
                expired = Expired::new(
                    expired.holds + to_u64(holds),
                    expired.charged + to_u64(charged),
                );
                if holds < i64::from(EXPIRE_BATCH) {
                    return Ok(expired);
                }
            }
        })
    }
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("schema", &self.shared.options.schema)
            .field("hold_ttl", &self.shared.options.hold_ttl)
            .finish_non_exhaustive()
    }
}

/// Runs `f` when dropped, unless disarmed first.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn new(f: F) -> Self {
        OnDrop(Some(f))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A random hold id in `1..2⁶³`, so a reserve carries its own id and can be released by it even
/// when its answer was lost.
fn hold_id() -> i64 {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: fall back on the clock and a counter (still unique per process).
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        nanos
            ^ COUNTER
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .rotate_left(40)
    });
    (to_i64(random >> 1)).max(1)
}

fn entry(row: &PgRow) -> Result<JournalEntry, sqlx::Error> {
    // The table's CHECK admits only the five kinds; anything else is a corrupt row, never a top-up.
    let word: &str = row.try_get(2)?;
    let kind = EntryKind::parse(word)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown journal kind `{word}`").into()))?;
    let micros: i64 = row.try_get(1)?;
    let text = |i: usize| -> Result<Option<Arc<str>>, sqlx::Error> {
        Ok(row.try_get::<Option<&str>, _>(i)?.map(Arc::from))
    };
    let mut entry = JournalEntry::new(
        to_u64(row.try_get(0)?),
        UNIX_EPOCH + Duration::from_micros(to_u64(micros)),
        kind,
        to_u64(row.try_get(3)?),
        to_u64(row.try_get(4)?),
        row.try_get::<Option<i64>, _>(5)?.map(to_u64),
        to_u64(row.try_get(6)?),
        to_u64(row.try_get(7)?),
    );
    entry.request_id = text(8)?;
    entry.key_id = text(9)?;
    entry.idempotency_key = text(10)?;
    Ok(entry)
}
