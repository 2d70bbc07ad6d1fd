//! PostgreSQL backends: the books in the database every replica shares, exact and durable.
//!
//! [`PostgresBackend`] is built on a [`sqlx::PgPool`] (the one an axum service already holds,
//! [`from_pool`](PostgresBackend::from_pool)) or opens its own ([`connect`](PostgresBackend::connect)),
//! and hands out the three stores, each implementing the same trait as its in-memory sibling:
//!
//! | store | trait | per request |
//! |---|---|---|
//! | [`PostgresLedger`] | [`Ledger`](crate::credits::Ledger) | one statement to reserve, one to settle (with the rate limits in the same statements, see below) |
//! | [`PostgresLimiter`] | [`Limiter`](crate::ratelimit::Limiter) | one statement (GCRA, every limit all-or-nothing) |
//! | [`PostgresKeyStore`] | [`KeyStore`](crate::auth::KeyStore) + [`KeyAdmin`](crate::auth::KeyAdmin) | none when the local cache is warm |
//!
//! Every movement of money is one call of a PL/pgSQL function that locks the account's row, so it
//! is atomic and exact across any number of replicas, and committed (durable) before it is
//! answered. With [`CreditsLayer::rate_limit`](crate::credits::CreditsLayer::rate_limit), a
//! [`PostgresLedger`] and a [`PostgresLimiter`] of the same backend charge the rate limits and
//! place the hold in **one statement** (one round trip before the call) and settle the hold with
//! the tokens correction in one more: two round trips per billed request in all, the key lookup
//! aside. Time is always the database's (`clock_timestamp()`), never a replica's clock.
//!
//! The schema is created by versioned migrations shipped in the crate
//! ([`PostgresBackend::migrate`], run by the gateway at startup) in a schema of its own
//! ([`PostgresOptions::schema`], default `tollgate`). The tables are described in the README.
//!
//! When PostgreSQL cannot answer, every call fails within its deadline (pool acquire timeout, then
//! `statement_timeout`, and a client-side deadline on the whole call): credits fail closed (503
//! `backend_unavailable` with `Retry-After`) and rate limits fail open or closed as configured
//! ([`FailMode`]). The pool reconnects by itself when the server is back.
//!
//! # Example
//!
//! ```no_run
//! use tollgate::postgres::{PostgresBackend, PostgresOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate::BackendError> {
//! let backend = PostgresBackend::connect_with(
//!     "postgres://gateway@127.0.0.1:5432/billing",
//!     PostgresOptions::new().schema("tollgate"),
//! )
//! .await?;
//! backend.migrate().await?;
//! let (ledger, limiter, keys) = (backend.ledger(), backend.limiter(), backend.key_store());
//! # let _ = (ledger, limiter, keys);
//! # Ok(())
//! # }
//! ```

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    AssertSqlSafe, Row, SqlStr,
};

use crate::BackendError;

mod admission;
mod coalesce;
mod keystore;
mod ledger;
mod limiter;

pub use crate::backend::FailMode;
pub use admission::PostgresAdmission;
pub use keystore::PostgresKeyStore;
pub use ledger::PostgresLedger;
pub use limiter::PostgresLimiter;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The migrations, in order: version, name, SQL (with `@schema@` for the schema).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "books", include_str!("migrations/0001_books.sql")),
    (3, "extend", include_str!("migrations/0003_extend.sql")),
    (
        5,
        "redis_journal",
        include_str!("migrations/0005_redis_journal.sql"),
    ),
    (6, "fast", include_str!("migrations/0006_fast.sql")),
    (
        7,
        "batch_locks",
        include_str!("migrations/0007_batch_locks.sql"),
    ),
    (
        8,
        "batch_one_subtransaction",
        include_str!("migrations/0008_batch_one_subtransaction.sql"),
    ),
    (
        10,
        "one_batch",
        include_str!("migrations/0010_one_batch.sql"),
    ),
    (11, "inline", include_str!("migrations/0011_inline.sql")),
];

/// Schema name, timeouts, TTLs and pool size of a [`PostgresBackend`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::postgres::PostgresOptions;
///
/// let options = PostgresOptions::new()
///     .schema("billing")
///     .statement_timeout(Duration::from_millis(250))
///     .hold_ttl(Duration::from_secs(600));
/// assert_eq!(options.schema_name(), "billing");
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct PostgresOptions {
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    hold_ttl: Duration,
    idempotency_window: Duration,
    key_cache_ttl: Duration,
    key_cache_capacity: usize,
    rate_limit_fail: FailMode,
    coalesce: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "tollgate".to_owned(),
            max_connections: 16,
            acquire_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_millis(500),
            hold_ttl: crate::credits::defaults::DEFAULT_HOLD_TTL,
            idempotency_window: crate::credits::defaults::DEFAULT_IDEMPOTENCY_WINDOW,
            key_cache_ttl: Duration::from_secs(5),
            key_cache_capacity: 10_000,
            rate_limit_fail: FailMode::Open,
            coalesce: true,
        }
    }
}

impl PostgresOptions {
    /// The defaults: schema `tollgate`, 16 connections, acquire timeout 500 ms, statement timeout
    /// 500 ms, hold TTL 15 min, idempotency window 24 h, key cache 5 s × 10 000 entries, rate
    /// limits fail open, coalescing on.
    pub fn new() -> Self {
        Self::default()
    }

    /// The schema the tables and functions live in (several gateways may share one database
    /// with different schemas): 1 to 63 lowercase ASCII letters, digits and `_`, not starting with
    /// a digit.
    ///
    /// # Panics
    ///
    /// When `schema` is not such a name (see [`is_valid_schema`]).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        let schema = schema.into();
        assert!(
            is_valid_schema(&schema),
            "the PostgreSQL schema {schema:?} must be 1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
        );
        self.schema = schema;
        self
    }

    /// The configured schema.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The most connections the pool [`connect`](PostgresBackend::connect) opens may hold.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a call may wait for a pooled connection (or for a new one to connect).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long one statement may run: the server's `statement_timeout` on the connections of
    /// [`connect`](PostgresBackend::connect), and (with the acquire timeout) the client-side
    /// deadline of every call, also on a pool of your own.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long a hold may stay **idle** before it is settled at its held amount: from the
    /// reserve, and from each [`extend`](crate::credits::Ledger::extend), which a streaming
    /// response makes while its frames flow (so a stream longer than this is settled at its
    /// usage; only a response idle this long is charged its hold).
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl = ttl;
        self
    }

    /// How long an `Idempotency-Key` is remembered.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// How long a replica trusts its cached key lookups when a notification is lost (the worst
    /// case for a revocation to reach every replica).
    pub fn key_cache_ttl(mut self, ttl: Duration) -> Self {
        self.key_cache_ttl = ttl;
        self
    }

    /// How many key lookups each replica caches.
    pub fn key_cache_capacity(mut self, capacity: usize) -> Self {
        self.key_cache_capacity = capacity;
        self
    }

    /// What the rate limiter does when PostgreSQL cannot answer (default [`FailMode::Open`]).
    pub fn rate_limit_fail(mut self, mode: FailMode) -> Self {
        self.rate_limit_fail = mode;
        self
    }

    /// Whether the ledger coalesces its statements (default `true`): at most one statement on
    /// the books in flight per pool; the reserves and closes that arrive meanwhile go together (up
    /// to 64) in the next one (`book_many`), one commit for all of them, each call
    /// in a subtransaction of its own so that one failing call fails alone and the others keep
    /// their exact answers. A call that finds nothing in flight is sent at once, alone: each
    /// caller still makes one round trip per call, and waits at most one deadline (acquire
    /// timeout + statement timeout, plus 100 ms) for its answer. `false`: one statement per call.
    pub fn coalesce(mut self, on: bool) -> Self {
        self.coalesce = on;
        self
    }

    /// Whether the ledger coalesces its statements (see [`coalesce`](Self::coalesce)).
    pub fn coalesces(&self) -> bool {
        self.coalesce
    }
}

/// Whether `name` may be a [`PostgresOptions::schema`]: 1 to 63 characters of `a-z`, `0-9` and
/// `_`, not starting with a digit (so it never needs quoting rules beyond double quotes).
///
/// ```
/// use tollgate::postgres::is_valid_schema;
///
/// assert!(is_valid_schema("tollgate_eu"));
/// assert!(!is_valid_schema("Billing; DROP TABLE x"));
/// ```
pub fn is_valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// What the stores of one backend share: the pool, the options, the statements.
pub(crate) struct Shared {
    pool: PgPool,
    options: PostgresOptions,
    /// `"schema"`, quoted, for the SQL text.
    schema: String,
    /// The hot path's statements.
    hot: Hot,
    /// The reserves and closes of this pool, coalesced.
    books: coalesce::Coalescer<ledger::Book, ledger::Booked>,
}

/// The statements of the hot path, with the schema in them.
struct Hot {
    reserve: SqlStr,
    close: SqlStr,
    book_many: SqlStr,
}

impl Hot {
    fn new(schema: &str) -> Self {
        Hot {
            reserve: with_schema(
                schema,
                "SELECT status, available, verdict, idx, wait, rels FROM @schema@.reserve(\
                 $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            ),
            close: with_schema(
                schema,
                "SELECT charged, balance, was_open FROM @schema@.close(\
                 $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            ),
            book_many: with_schema(
                schema,
                "SELECT n, status, available, verdict, idx, wait, rels, charged, balance, was_open, err \
                 FROM @schema@.book_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                 $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) ORDER BY n",
            ),
        }
    }
}

/// A statement's text with the (quoted) schema in it.
fn with_schema(schema: &str, text: &str) -> SqlStr {
    AssertSqlSafe(text.replace("@schema@", schema)).into_sql_str()
}

impl Shared {
    /// A statement's text with the schema in it.
    fn sql(&self, text: &str) -> SqlStr {
        with_schema(&self.schema, text)
    }

    /// The deadline of one call: a connection, then a statement.
    fn deadline(&self) -> Duration {
        self.options.acquire_timeout + self.options.statement_timeout
    }

    /// Run `f` on the pool, at most [`deadline`](Self::deadline) long.
    fn call<T, F, Fut>(
        self: &Arc<Self>,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        F: FnOnce(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let deadline = self.deadline();
        async move {
            match tokio::time::timeout(deadline, f(pool)).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(backend_error(what, &error)),
                Err(_) => Err(BackendError::new(format!(
                    "postgres {what}: no answer within {deadline:?}"
                ))),
            }
        }
    }
}

impl Shared {
    /// [`call`](Self::call) for a statement that is safe to run twice (a read, or a ledger call
    /// that carries its hold's id): tried again, within the same deadline, when it failed on the
    /// connection (a pooled connection the server closed while it was down or restarting),
    /// up to 4 times. `f` is told the attempt (0 first).
    fn call_retrying<T, F, Fut>(
        self: &Arc<Self>,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        F: Fn(PgPool, u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let deadline = self.deadline();
        async move {
            let run = async {
                let mut attempt = 0;
                loop {
                    match f(pool.clone(), attempt).await {
                        Err(error) if attempt < 3 && is_connection_error(&error) => {
                            tracing::debug!(%error, what, "postgres connection lost: trying again");
                            attempt += 1;
                        }
                        result => return result.map_err(|error| (error, attempt)),
                    }
                }
            };
            match tokio::time::timeout(deadline, run).await {
                Ok(Ok(value)) => Ok(value),
                // An earlier attempt failed on its connection: it may have been applied.
                Ok(Err((error, 0))) => Err(backend_error(what, &error)),
                Ok(Err((error, _))) => Err(BackendError::new(format!("postgres {what}: {error}"))),
                Err(_) => Err(BackendError::new(format!(
                    "postgres {what}: no answer within {deadline:?}"
                ))),
            }
        }
    }
}

/// Whether `error` is the connection's (broken, closed by the server, the server shutting down
/// or starting), not the statement's.
fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

use sqlx::SqlSafeStr as _;

/// A sqlx error as a [`BackendError`] (its text goes to the log only). A call that got no
/// connection from the pool (every one busy past the acquire timeout, or the pool closed) never
/// reached the server: it is [`unsent`](BackendError::unsent), so nothing has to be undone.
fn backend_error(what: &str, error: &sqlx::Error) -> BackendError {
    let made = BackendError::new(format!("postgres {what}: {error}"));
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => made.unsent(),
        _ => made,
    }
}

/// A connection to the PostgreSQL database every replica shares, and the stores built on it.
///
/// Cloning shares the pool.
///
/// # Example
///
/// On the pool your service already has:
///
/// ```no_run
/// use sqlx::postgres::PgPoolOptions;
/// use tollgate::postgres::{PostgresBackend, PostgresOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPoolOptions::new()
///     // One round trip per call: no ping before each use of a pooled connection.
///     .test_before_acquire(false)
///     .connect("postgres://app@127.0.0.1/app")
///     .await?;
/// let backend = PostgresBackend::from_pool(pool, PostgresOptions::new());
/// backend.migrate().await?;
/// let ledger = backend.ledger();
/// # let _ = ledger;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBackend {
    shared: Arc<Shared>,
}

impl PostgresBackend {
    /// Connect with the default [`PostgresOptions`].
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        Self::connect_with(url, PostgresOptions::new()).await
    }

    /// Open a pool of connections to `url` (`postgres://user:password@host:port/database`). Fails
    /// when the URL is invalid or the server does not answer within the acquire timeout; once
    /// connected, lost connections are replaced as they are needed.
    ///
    /// Its connections run with `statement_timeout` set, and a pooled connection is used without
    /// a ping first (a broken one fails its call, and the next call gets a fresh one).
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, BackendError> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|e| BackendError::new(format!("postgres url: {e}")))?;
        let timeout_ms = options.statement_timeout.as_millis().max(1).to_string();
        let connect = connect
            .application_name("tollgate")
            .options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(|e| backend_error("connect", &e))?;
        Ok(Self::from_pool(pool, options))
    }

    /// The stores on a pool you already have. Set `test_before_acquire(false)` on it for one
    /// round trip per call, and a `statement_timeout` on its connections for a server-side
    /// deadline (the client-side one applies anyway).
    pub fn from_pool(pool: PgPool, options: PostgresOptions) -> Self {
        let schema = format!("\"{}\"", options.schema);

        PostgresBackend {
            shared: Arc::new(Shared {
                pool,
                options,
                hot: Hot::new(&schema),
                schema,
                books: ledger::coalescer(),
            }),
        }
    }

    /// Create or upgrade the schema: apply, in one transaction, the migrations shipped with this
    /// version of the crate that the database has not seen yet, recorded in
    /// `{schema}.schema_migrations`. Safe to run from every replica at once (they take turns on
    /// an advisory lock). Returns how many were applied.
    ///
    /// Fails when a migration already applied differs from the one shipped (its checksum), and
    /// leaves the database as it was.
    pub async fn migrate(&self) -> Result<usize, BackendError> {
        let shared = Arc::clone(&self.shared);
        let schema_name = shared.options.schema.clone();
        let lock = format!("tollgate-migrate:{schema_name}");
        let create_schema = shared.sql("CREATE SCHEMA IF NOT EXISTS @schema@");
        let create_table = shared.sql(
            "CREATE TABLE IF NOT EXISTS @schema@.schema_migrations (\
             version bigint PRIMARY KEY, name text NOT NULL, checksum bytea NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        );
        let applied_sql = shared.sql("SELECT version, checksum FROM @schema@.schema_migrations");
        let record = shared.sql(
            "INSERT INTO @schema@.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        );
        let migrations: Vec<(i64, &'static str, String)> = MIGRATIONS
            .iter()
            .map(|(version, name, text)| {
                (*version, *name, text.replace("@schema@", &shared.schema))
            })
            .collect();
        let pool = shared.pool.clone();
        let run = async move {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(&lock)
                .execute(&mut *tx)
                .await?;
            sqlx::query(create_schema).execute(&mut *tx).await?;
            sqlx::query(create_table).execute(&mut *tx).await?;
            let done: Vec<(i64, Vec<u8>)> = sqlx::query(applied_sql)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()?;
            let mut applied = 0;
            for (version, name, text) in migrations {
                let checksum = checksum(&text);
                match done.iter().find(|(v, _)| *v == version) {
                    Some((_, seen)) if *seen == checksum => continue,
                    Some(_) => {
                        return Ok(Err(format!(
                            "migration {version} ({name}) differs from the one applied to schema {schema_name}"
                        )))
                    }
                    None => {}
                }
                sqlx::raw_sql(AssertSqlSafe(text)).execute(&mut *tx).await?;
                sqlx::query(record.clone())
                    .bind(version)
                    .bind(name)
                    .bind(&checksum[..])
                    .execute(&mut *tx)
                    .await?;
                applied += 1;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(applied))
        };
        match tokio::time::timeout(Duration::from_secs(60), run).await {
            Ok(Ok(Ok(applied))) => {
                if applied > 0 {
                    tracing::info!(applied, schema = %self.shared.options.schema, "postgres migrations applied");
                }
                Ok(applied)
            }
            Ok(Ok(Err(message))) => Err(BackendError::new(format!("postgres migrate: {message}"))),
            Ok(Err(error)) => Err(backend_error("migrate", &error)),
            Err(_) => Err(BackendError::new("postgres migrate: no answer within 60 s")),
        }
    }

    /// The credit ledger.
    pub fn ledger(&self) -> PostgresLedger {
        PostgresLedger::new(Arc::clone(&self.shared))
    }

    /// The rate limiter.
    pub fn limiter(&self) -> PostgresLimiter {
        PostgresLimiter::new(Arc::clone(&self.shared))
    }

    /// The rate limits and the credit hold of a request in one statement, one round trip (and
    /// the settlement with the token correction in one more), for
    /// [`CreditsLayer::rate_limit_with`](crate::credits::CreditsLayer::rate_limit_with): this
    /// backend's [`limiter`](Self::limiter) and [`ledger`](Self::ledger) together.
    pub fn admission(&self) -> PostgresAdmission {
        PostgresAdmission::new(self.ledger(), self.limiter())
    }

    /// The key store, with its local cache and its invalidation listener (`LISTEN` on a
    /// connection of its own, a task on the current Tokio runtime, ended when the store and its
    /// clones are dropped).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn key_store(&self) -> PostgresKeyStore {
        PostgresKeyStore::new(Arc::clone(&self.shared))
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The options.
    pub fn options(&self) -> &PostgresOptions {
        &self.shared.options
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a migration's text (after the schema is put in).
fn checksum(text: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Milliseconds, saturating.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A `u64` amount as a `bigint`, saturating.
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `bigint` as a `u64` (never negative in these tables).
fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[cfg(test)]
#[path = "../../tests/support/pg_server.rs"]
mod test_server;
