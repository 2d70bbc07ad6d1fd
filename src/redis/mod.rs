//! Redis backends: one Redis shared by many gateway replicas, so they behave as one.
//!
//! [`RedisBackend::connect`] opens one multiplexed connection (reconnected in the background),
//! [`RedisBackend::connect_cluster`] a cluster connection (one per node, routed by hash slot),
//! and either hands out the three stores, each implementing the same trait as its in-memory sibling:
//!
//! | store | trait | per request |
//! |---|---|---|
//! | [`RedisLimiter`] | [`Limiter`](crate::ratelimit::Limiter) | one script (GCRA, every limit all-or-nothing) |
//! | [`RedisLedger`] | [`Ledger`](crate::credits::Ledger) | one script to reserve, one to settle (with the rate limits in the same scripts, see below) |
//! | [`RedisKeyStore`] | [`KeyStore`](crate::auth::KeyStore) | none when the local cache is warm |
//!
//! With [`CreditsLayer::rate_limit`](crate::credits::CreditsLayer::rate_limit), a
//! [`RedisLedger`] and a [`RedisLimiter`] of the same backend charge the rate limits and place the
//! hold in **one script** (one round trip before the call), and settle the hold with the tokens
//! correction in one more: two round trips per request in all, the key lookup aside. Buckets
//! outside the account's `{acct:ID}` hash slot (keyed by API key, or a global limit) cannot join
//! the ledger's script on Redis Cluster; such requests take the limiter's script and the
//! ledger's in turn.
//!
//! Scripts are loaded once and called by SHA (`EVALSHA`, reloaded on `NOSCRIPT`); time is
//! always the Redis server's (`TIME` inside the scripts), never a replica's clock. Every call has
//! a deadline, and a circuit breaker stops calling a Redis that keeps failing, letting one probe
//! through per cooldown until it answers again. When Redis cannot answer, credits fail closed
//! (503 `backend_unavailable` with `Retry-After`) and rate limits fail open or closed as
//! configured ([`FailMode`]).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tollgate::redis::{FailMode, RedisBackend, RedisOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate::BackendError> {
//! let backend = RedisBackend::connect_with(
//!     "redis://127.0.0.1:6379/",
//!     RedisOptions::new()
//!         .response_timeout(Duration::from_millis(250))
//!         .rate_limit_fail(FailMode::Open),
//! )
//! .await?;
//! let (limiter, ledger) = (backend.limiter(), backend.ledger());
//! let keys = backend.key_store();
//! # let _ = (limiter, ledger, keys);
//! # Ok(())
//! # }
//! ```

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::BackendError;

mod admission;
mod conn;
mod function;
mod keystore;
mod ledger;
mod limiter;
#[cfg(feature = "postgres")]
mod record;

pub use admission::RedisAdmission;
pub use keystore::RedisKeyStore;
pub use ledger::{RedisLedger, RedisPromoter, MAX_BALANCE};
pub use limiter::RedisLimiter;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub use crate::backend::FailMode;

/// Timeouts, circuit breaker, TTLs and key names of a [`RedisBackend`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::redis::RedisOptions;
///
/// let options = RedisOptions::new()
///     .prefix("gateway-eu")
///     .hold_ttl(Duration::from_secs(600))
///     .key_cache_ttl(Duration::from_secs(2));
/// assert_eq!(options.hold_ttl_value(), Duration::from_secs(600));
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisOptions {
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    hold_ttl: Duration,
    idempotency_window: Duration,
    key_cache_ttl: Duration,
    key_cache_capacity: usize,
    rate_limit_fail: FailMode,
    pub(crate) journal_limit: usize,
    #[cfg(feature = "postgres")]
    pub(crate) record: Option<record::Record>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "tollgate".to_owned(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(500),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            hold_ttl: crate::credits::defaults::DEFAULT_HOLD_TTL,
            idempotency_window: crate::credits::defaults::DEFAULT_IDEMPOTENCY_WINDOW,
            key_cache_ttl: Duration::from_secs(5),
            key_cache_capacity: 10_000,
            rate_limit_fail: FailMode::Open,
            journal_limit: 0,
            #[cfg(feature = "postgres")]
            record: None,
        }
    }
}

impl RedisOptions {
    /// The defaults: prefix `tollgate`, connect timeout 1 s, response timeout 500 ms, breaker
    /// open after 5 consecutive failures for 1 s, hold TTL 15 min, idempotency window 24 h, key
    /// cache 5 s × 10 000 entries, rate limits fail open.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first part of every key name (several gateways may share one Redis with different
    /// prefixes).
    ///
    /// # Panics
    ///
    /// When `prefix` contains `{` or `}`: braces in it would become the hash tag of every key
    /// name instead of `{acct:ID}`, and the scripts would cross slots on Redis Cluster.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        assert!(
            !prefix.contains(['{', '}']),
            "the Redis key prefix {prefix:?} must not contain braces"
        );
        self.prefix = prefix;
        self
    }

    /// How long connecting may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long any one call may take before it fails (and counts against the breaker).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Open the circuit breaker after `failures` consecutive failed calls, for `cooldown`.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = failures;
        self.breaker_cooldown = cooldown;
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

    /// The configured hold TTL.
    pub fn hold_ttl_value(&self) -> Duration {
        self.hold_ttl
    }

    /// Keep only the latest `entries` journal entries per account (0, the default: all of
    /// them), as [`MemoryLedgerBuilder::journal_limit`](crate::credits::ledger::MemoryLedgerBuilder::journal_limit)
    /// does: the list is trimmed in the same script that appends to it, so Redis memory per
    /// account stays flat (about 120 bytes an entry, two entries per billed request). Balances
    /// never depend on the journal: trimming changes none.
    ///
    /// ```
    /// use tollgate::redis::RedisOptions;
    ///
    /// let options = RedisOptions::new().journal_limit(10_000);
    /// # let _ = options;
    /// ```
    pub fn journal_limit(mut self, entries: usize) -> Self {
        self.journal_limit = entries;
        self
    }

    /// Whether a durable record drains the journal (its undrained entries are never trimmed).
    pub(crate) fn has_record(&self) -> bool {
        #[cfg(feature = "postgres")]
        return self.record.is_some();
        #[cfg(not(feature = "postgres"))]
        false
    }

    /// Keep the durable record of the journal in PostgreSQL (features `redis` and `postgres`):
    /// every second, a background task of the replica holding the drain lease (one per fleet,
    /// taken over by another replica 3 s after its holder stops) moves the new journal entries
    /// of every account into the table `redis_journal` of `schema` (migration 5 of
    /// [`PostgresBackend::migrate`](crate::postgres::PostgresBackend::migrate), applied by the
    /// task), keyed by (account, seq) so that each entry is recorded exactly once however many
    /// replicas drain, then advances the account's drained cursor in Redis. The
    /// [`journal_limit`](Self::journal_limit) never trims an entry the record does not hold
    /// yet: while PostgreSQL is down the journal in Redis grows, and shrinks back once it is
    /// drained. [`LedgerAdmin::journal`](crate::credits::LedgerAdmin::journal) then reads the
    /// record, followed by the entries not drained yet. Redis stays the hot path: no request
    /// waits for PostgreSQL.
    ///
    /// ```no_run
    /// use tollgate::redis::{RedisBackend, RedisOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1/postgres")?;
    /// let backend = RedisBackend::connect_with(
    ///     "redis://127.0.0.1/",
    ///     RedisOptions::new().journal_limit(10_000).record(pool, "tollgate"),
    /// )
    /// .await?;
    /// backend.drain_record().await?; // what the task does every second
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// When `schema` is not a valid schema name (as
    /// [`PostgresOptions::schema`](crate::postgres::PostgresOptions::schema)).
    #[cfg(feature = "postgres")]
    pub fn record(mut self, pool: sqlx::PgPool, schema: &str) -> Self {
        // Validated as the PostgreSQL backend validates it.
        let _ = crate::postgres::PostgresOptions::new().schema(schema);
        self.record = Some(record::Record {
            pool,
            schema: schema.to_owned(),
            migrated: Arc::default(),
        });
        self
    }

    /// How long an `Idempotency-Key` is remembered.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// How long a replica trusts its cached key lookups when an invalidation message is lost
    /// (the worst case for a revocation to reach every replica).
    pub fn key_cache_ttl(mut self, ttl: Duration) -> Self {
        self.key_cache_ttl = ttl;
        self
    }

    /// How many key lookups each replica caches.
    pub fn key_cache_capacity(mut self, capacity: usize) -> Self {
        self.key_cache_capacity = capacity;
        self
    }

    /// What the rate limiter does when Redis cannot answer (default [`FailMode::Open`]).
    pub fn rate_limit_fail(mut self, mode: FailMode) -> Self {
        self.rate_limit_fail = mode;
        self
    }
}

/// What the stores of one backend share: the connection, the options, the clients (for the
/// key store's pub/sub connection: the server, or each seed node of a cluster in turn).
pub(crate) struct Shared {
    conn: conn::Conn,
    clients: Vec<redis::Client>,
    options: RedisOptions,
}

/// `FUNCTION LOAD REPLACE` of the tollgate library at connect (on a cluster: every primary).
async fn load_library(link: &mut conn::Link, options: &RedisOptions) -> Result<(), BackendError> {
    tokio::time::timeout(options.connect_timeout * 4, function::LIBRARY.load(link))
        .await
        .map_err(|_| BackendError::new("redis connect: loading the library timed out"))?
        .map_err(|e| BackendError::new(format!("redis connect: loading the library: {e}")))
}

/// A connection to the Redis that every replica shares, and the stores built on it.
///
/// Cloning shares the connection.
///
/// # Example
///
/// ```no_run
/// use tollgate::redis::RedisBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tollgate::BackendError> {
/// let backend = RedisBackend::connect("redis://127.0.0.1/").await?;
/// let ledger = backend.ledger();
/// # let _ = ledger;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    shared: Arc<Shared>,
}

impl RedisBackend {
    /// Connect with the default [`RedisOptions`].
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        Self::connect_with(url, RedisOptions::new()).await
    }

    /// Connect. Fails when the URL is invalid or Redis does not answer within the connect
    /// timeout; once connected, a lost connection is re-established in the background.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, BackendError> {
        let client =
            redis::Client::open(url).map_err(|e| BackendError::new(format!("redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            // Reconnection attempts, not command retries: the manager never re-sends a command.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = tokio::time::timeout(
            options.connect_timeout * 4,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| BackendError::new("redis connect: timed out"))?
        .map_err(|e| BackendError::new(format!("redis connect: {e}")))?;
        let mut link = conn::Link::Single(manager);
        load_library(&mut link, &options).await?;
        Ok(Self::with_link(link, vec![client], options))
    }

    /// Connect to a Redis Cluster through redis-rs's cluster-async client, given one or more
    /// of its nodes (`redis://host:port`; the others are discovered). Fails when a URL is
    /// invalid or no node answers within the connect timeout.
    ///
    /// Every script runs on the keys of one hash slot: an account's keys share the slot of
    /// `{acct:ID}`, the key store's that of `{keys}`. A limiter check whose buckets live in
    /// several slots (a per-key or global limit beside the account's) is checked slot by slot,
    /// giving back the tokens taken when a later slot refuses
    /// ([`RedisLimiter`]); a top-up that promotes a plan runs the promotion as a
    /// second script in the `{keys}` slot ([`RedisPromoter`]).
    ///
    /// Commands are sent again only on answers that prove they did not run (`MOVED`,
    /// `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY`, a refused connection),
    /// within the response timeout; never after a timeout or a connection lost after the send,
    /// so nothing is charged twice. While a failed master's slots move to its replica, the
    /// calls on them fail and credits fail closed (503 `backend_unavailable`). The circuit
    /// breaker is the backend's, not a node's: failures on one master's slots can open it for
    /// every account.
    ///
    /// The key store's invalidation listener subscribes on one node (`PUBLISH` reaches every
    /// node of a cluster) and, when that node goes away, on the next of `urls`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tollgate::redis::{RedisBackend, RedisOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tollgate::BackendError> {
    /// let backend = RedisBackend::connect_cluster(
    ///     &["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"],
    ///     RedisOptions::new(),
    /// )
    /// .await?;
    /// let (ledger, keys) = (backend.ledger(), backend.key_store());
    /// # let _ = (ledger, keys);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster<S: AsRef<str>>(
        urls: &[S],
        options: RedisOptions,
    ) -> Result<Self, BackendError> {
        if urls.is_empty() {
            return Err(BackendError::new("redis cluster: no node URL given"));
        }
        let clients = urls
            .iter()
            .map(|url| redis::Client::open(url.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackendError::new(format!("redis url: {e}")))?;
        let client = redis::cluster::ClusterClient::builder(urls.iter().map(|u| u.as_ref()))
            // redis-rs re-sends on a lost connection too: off, `Link` re-sends what did not run.
            .retries(0)
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.response_timeout)
            .build()
            .map_err(|e| BackendError::new(format!("redis cluster: {e}")))?;
        let connection =
            tokio::time::timeout(options.connect_timeout * 4, client.get_async_connection())
                .await
                .map_err(|_| BackendError::new("redis cluster connect: timed out"))?
                .map_err(|e| BackendError::new(format!("redis cluster connect: {e}")))?;
        let mut link = conn::Link::Cluster(connection);
        load_library(&mut link, &options).await?;
        Ok(Self::with_link(link, clients, options))
    }

    /// The name of the Lua library (Redis Functions) this build loads and calls
    /// (`tollgate_<version>_<hash of its code>`; its functions are `<name>_reserve`, ...).
    pub fn library_name() -> &'static str {
        function::LIBRARY.name()
    }

    fn with_link(link: conn::Link, clients: Vec<redis::Client>, options: RedisOptions) -> Self {
        let breaker = conn::Breaker::new(options.breaker_threshold, options.breaker_cooldown);
        let backend = RedisBackend {
            shared: Arc::new(Shared {
                conn: conn::Conn::new(link, breaker, options.response_timeout),
                clients,
                options,
            }),
        };
        #[cfg(feature = "postgres")]
        if let Some(record) = backend.shared.options.record.clone() {
            record::spawn(Arc::downgrade(&backend.shared), record);
        }
        backend
    }

    /// Drain the journal into the durable record now (what the background task of
    /// [`RedisOptions::record`] does every second on the replica holding the drain lease;
    /// this call does not need the lease): every entry not recorded yet is inserted (exactly
    /// once, whichever replica drains), then the accounts' drained cursors advance. Only the
    /// journals of accounts whose cursors show entries not recorded are read.
    /// Returns the entries moved; without a record, 0.
    #[cfg(feature = "postgres")]
    pub async fn drain_record(&self) -> Result<u64, BackendError> {
        match &self.shared.options.record {
            Some(record) => record::drain(&self.ledger(), record).await,
            None => Ok(0),
        }
    }

    /// The rate limiter.
    pub fn limiter(&self) -> RedisLimiter {
        RedisLimiter::new(Arc::clone(&self.shared))
    }

    /// The credit ledger.
    pub fn ledger(&self) -> RedisLedger {
        RedisLedger::new(Arc::clone(&self.shared))
    }

    /// The rate limits and the credit hold of a request in one script, one round trip (and the
    /// settlement with the token correction in one more), for
    /// [`CreditsLayer::rate_limit_with`](crate::credits::CreditsLayer::rate_limit_with): this
    /// backend's [`limiter`](Self::limiter) and [`ledger`](Self::ledger) together.
    pub fn admission(&self) -> RedisAdmission {
        RedisAdmission::new(self.ledger(), self.limiter())
    }

    /// The key store, with its local cache and its invalidation listener (a task on the current
    /// Tokio runtime, ended when the store and its clones are dropped).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn key_store(&self) -> RedisKeyStore {
        RedisKeyStore::new(Arc::clone(&self.shared))
    }

    /// Whether the circuit breaker is open or probing (Redis is failing).
    pub fn is_degraded(&self) -> bool {
        self.shared.conn.is_open()
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.shared.options
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[path = "../../tests/support/redis_server.rs"]
mod test_server;

#[cfg(test)]
#[path = "../../tests/support/redis_cluster.rs"]
mod test_cluster;
