//! An embedded, durable backend for one process: balances, journal and keys in a SQLite file.
//!
//! [`SqliteBackend::open`] opens (or creates) the database file in WAL mode, applies the
//! schema's versioned migrations (shipped in the crate), loads the books and the keys into
//! memory, closes the holds a previous process left open, and starts the writer. It hands out a
//! [`SqliteLedger`] ([`Ledger`](crate::credits::Ledger)) and a [`SqliteKeyStore`]
//! ([`KeyStore`](crate::auth::KeyStore) + [`KeyAdmin`](crate::auth::KeyAdmin)).
//!
//! The process owns the file (SQLite's exclusive locking mode): a second process opening it is
//! refused with [`OpenErrorKind::InUse`]. Decisions (is there enough credit? is this key
//! valid?) are taken in memory, exactly as [`MemoryLedger`](crate::credits::MemoryLedger) and
//! [`MemoryKeyStore`](crate::auth::MemoryKeyStore) take them, and every change is written to
//! the file. Rate limits stay in this process's memory
//! ([`MemoryLimiter`](crate::ratelimit::MemoryLimiter)): a restart refilling the buckets is
//! harmless.
//!
//! # Durability contract
//!
//! - A **top-up** and every **admin change** (account created or changed, plan models, key
//!   created, updated, revoked, disabled, rotated, account frozen) is committed (and fsynced)
//!   before its future completes: before the admin API answers 2xx.
//! - **Holds and settlements** are committed by a group commit that runs continuously: a
//!   movement is durable within [`DURABILITY_WINDOW`] (50 ms) of being made under normal
//!   operation, usually within a few milliseconds ([`SqliteLedger::durability`] reports the
//!   longest wait and the commits that took longer, as a slow or shared disk makes them). A
//!   commit is durable against a killed process once written; it is fsynced when it carries a
//!   top-up or a flush and at least every 25 ms otherwise, for a power loss. A process killed
//!   loses at most the movements of that window, never a part of one: each group commit is one
//!   transaction, so the file always holds a prefix of the ledger's history and
//!   `balance == Σ top-ups − Σ charges` holds in it.
//! - At startup, the holds a dead process left open are **settled at their held amount**, as an
//!   expired hold is (journal kind `expire`): the request they were placed for may have been
//!   served, and a hold is never more than what the caller agreed to pay.
//! - If the file cannot be written (disk full, I/O error), the ledger **fails closed**: every
//!   call answers with a [`BackendError`](crate::BackendError) (503 `backend_unavailable`) until
//!   the process is restarted.
//!
//! # Example
//!
//! ```
//! use tollgate::credits::{ledger::ReserveRequest, Ledger, LedgerAdmin};
//! use tollgate::sqlite::SqliteBackend;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("tollgate-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("mod.db");
//! # let _ = std::fs::remove_file(&path);
//! let backend = SqliteBackend::open(&path).await?;
//! let ledger = backend.ledger();
//! ledger.top_up("acct_1", 100, "invoice-1").await?; // durable once this returns
//! let hold = ledger.reserve(ReserveRequest::new("acct_1", 30)).await?.into_hold().unwrap();
//! ledger.settle(&hold, 12).await?;
//! backend.close().await?; // a graceful shutdown: writes what is queued, releases the file
//!
//! // Another process, later: the books are still there.
//! let ledger = SqliteBackend::open(&path).await?.ledger();
//! assert_eq!(ledger.balance("acct_1").await?.balance, 88);
//! # Ok(())
//! # }
//! ```

mod keystore;
mod ledger;
mod schema;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sqlx::SqliteConnection;

pub use keystore::SqliteKeyStore;
pub use ledger::{Durability, SqliteLedger};
pub use schema::SCHEMA_VERSION;

use crate::credits::{
    defaults::{DEFAULT_HOLD_TTL, DEFAULT_IDEMPOTENCY_WINDOW},
    ledger::{Clock, SystemClock},
};

/// The bound within which a hold or a settlement is durable: 50 ms.
pub const DURABILITY_WINDOW: Duration = Duration::from_millis(50);

/// An open tollgate database: hands out its [`SqliteLedger`] and [`SqliteKeyStore`].
///
/// Cloning shares it. The file stays open (and locked) until the backend, its ledger and its key
/// store are all dropped.
///
/// # Example
///
/// ```
/// use tollgate::auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStore};
/// use tollgate::sqlite::SqliteBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("tollgate-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("backend.db");
/// # let _ = std::fs::remove_file(&path);
/// let backend = SqliteBackend::open(&path).await?;
/// let keys = backend.key_store();
/// keys.put_account(AccountRecord::new("acct_1", "free")).await?;
/// let key = keys.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await?;
/// assert!(keys.lookup(&key.digest()).await?.is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
    ledger: SqliteLedger,
    keys: SqliteKeyStore,
}

/// What the ledger, the key store and the writer share: the one connection.
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    /// `None` once [`SqliteBackend::close`] closed it.
    pub(crate) conn: tokio::sync::Mutex<Option<SqliteConnection>>,
}

impl SqliteBackend {
    /// Open (or create) the database at `path` with the default [`SqliteOptions`].
    ///
    /// Must be called inside a Tokio runtime (the writer is a task).
    ///
    /// # Errors
    ///
    /// An [`OpenError`] naming the path and the cause: not a tollgate database, read-only,
    /// a newer schema, in use by another process, an I/O error.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteBackend, OpenError> {
        Self::open_with(path, SqliteOptions::new()).await
    }

    /// Open (or create) the database at `path`.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<SqliteBackend, OpenError> {
        let path = path.as_ref().to_path_buf();
        let conn = schema::open(&path).await?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            conn: tokio::sync::Mutex::new(Some(conn)),
        });
        let keys = SqliteKeyStore::load(shared.clone())
            .await
            .map_err(|e| OpenError::new(&path, e))?;
        let ledger = SqliteLedger::load(shared.clone(), &options)
            .await
            .map_err(|e| OpenError::new(&path, e))?;
        Ok(SqliteBackend {
            shared,
            ledger,
            keys,
        })
    }

    /// The ledger.
    pub fn ledger(&self) -> SqliteLedger {
        self.ledger.clone()
    }

    /// The key store.
    pub fn key_store(&self) -> SqliteKeyStore {
        self.keys.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Write what is still queued, then close the file (and release its lock), for a graceful
    /// shutdown. Afterwards the ledger and the key store answer every call with an error.
    ///
    /// # Errors
    ///
    /// When the last group commit or the close failed.
    pub async fn close(self) -> Result<(), crate::BackendError> {
        use sqlx::Connection;
        let flushed = self.ledger.flush().await;
        let conn = self.shared.conn.lock().await.take();
        if let Some(conn) = conn {
            conn.close().await.map_err(|e| backend_error("close", &e))?;
        }
        flushed
    }
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// How a [`SqliteBackend`] runs its ledger.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tollgate::sqlite::SqliteOptions;
///
/// let options = SqliteOptions::new()
///     .hold_ttl(Duration::from_secs(600))
///     .idempotency_window(Duration::from_secs(3600));
/// # let _ = options;
/// ```
#[must_use]
pub struct SqliteOptions {
    pub(crate) hold_ttl: Duration,
    pub(crate) idempotency_window: Duration,
    pub(crate) clock: Arc<dyn Clock>,
}

impl SqliteOptions {
    /// Hold TTL [`DEFAULT_HOLD_TTL`], idempotency window [`DEFAULT_IDEMPOTENCY_WINDOW`], the
    /// system clock.
    pub fn new() -> Self {
        SqliteOptions {
            hold_ttl: DEFAULT_HOLD_TTL,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            clock: Arc::new(SystemClock),
        }
    }

    /// How long a hold may stay **idle** before [`LedgerAdmin::expire_holds`] settles it at its
    /// held amount: from the reserve, and from each [`extend`](crate::credits::Ledger::extend),
    /// which a streaming response makes while its frames flow.
    ///
    /// [`LedgerAdmin::expire_holds`]: crate::credits::LedgerAdmin::expire_holds
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl = ttl;
        self
    }

    /// How long an `Idempotency-Key` is remembered after its first use.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// The ledger's clock (default: the system's); tests pass a
    /// [`ManualClock`](crate::credits::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteOptions")
            .field("hold_ttl", &self.hold_ttl)
            .field("idempotency_window", &self.idempotency_window)
            .finish_non_exhaustive()
    }
}

/// Why [`SqliteBackend::open`] failed: the path and the cause.
///
/// ```
/// use tollgate::sqlite::{OpenErrorKind, SqliteBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let path = std::env::temp_dir().join(format!("tollgate-doc-notadb-{}", std::process::id()));
/// std::fs::write(&path, "name,balance\nacct_1,100\n").unwrap();
/// let error = SqliteBackend::open(&path).await.unwrap_err();
/// assert!(matches!(error.kind(), OpenErrorKind::NotATollgateDatabase(_)));
/// assert!(error.to_string().contains("is not a tollgate database"));
/// # std::fs::remove_file(&path).unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct OpenError {
    path: PathBuf,
    kind: OpenErrorKind,
}

/// The cause of an [`OpenError`].
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenErrorKind {
    /// The file is not a tollgate database (not SQLite, or another application's), with what
    /// was found.
    NotATollgateDatabase(String),
    /// The file or its directory cannot be written.
    ReadOnly(String),
    /// The database was written by a newer tollgate.
    NewerSchema {
        /// The database's schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// Another process has the database open.
    InUse,
    /// The stored data breaks an invariant (for example a negative balance).
    Corrupt(String),
    /// Anything else SQLite or the file system reported.
    Other(String),
}

impl OpenError {
    pub(crate) fn new(path: &Path, kind: OpenErrorKind) -> Self {
        OpenError {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cause.
    pub fn kind(&self) -> &OpenErrorKind {
        &self.kind
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            OpenErrorKind::NotATollgateDatabase(what) => {
                write!(f, "{path} is not a tollgate database ({what})")
            }
            OpenErrorKind::ReadOnly(what) => {
                write!(f, "{path} cannot be written ({what})")
            }
            OpenErrorKind::NewerSchema { found, supported } => write!(
                f,
                "{path} has schema version {found}, newer than this tollgate supports ({supported}): \
                 upgrade tollgate, or restore a backup made for this version"
            ),
            OpenErrorKind::InUse => write!(
                f,
                "{path} is in use by another process (one process owns a tollgate SQLite database)"
            ),
            OpenErrorKind::Corrupt(what) => write!(f, "{path} is corrupt: {what}"),
            OpenErrorKind::Other(what) => write!(f, "cannot open {path}: {what}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// A SQLite failure as a backend error (503 `backend_unavailable`); the message never carries
/// bound values.
pub(crate) fn backend_error(what: &str, error: &sqlx::Error) -> crate::BackendError {
    crate::BackendError::new(format!("sqlite {what}: {error}"))
}
