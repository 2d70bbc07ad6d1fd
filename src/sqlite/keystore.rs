//! The SQLite key store: every change committed to the file, then applied to an in-memory
//! index that answers lookups.

use std::{fmt, future::Future, sync::Arc};

use sqlx::{Row, SqliteConnection};

use super::{
    backend_error,
    schema::{from_millis, millis},
    OpenErrorKind, Shared,
};
use crate::{
    auth::stored::{
        account_status, json_list, json_map, key_status, parse_account_status, parse_key_status,
        parse_list, parse_map,
    },
    auth::{
        AccountRecord, AccountStatus, KeyAdmin, KeyAdminError, KeyRecord, KeyStatus, KeyStore,
        MemoryKeyStore,
    },
    ip::IpSet,
    keys::KeyDigest,
    BackendError,
};

/// A [`KeyStore`] and [`KeyAdmin`] in a SQLite file.
///
/// Keys are stored by their SHA-256 digest (never the key's text). Every [`KeyAdmin`] change is
/// committed to the file (fsynced) before its future completes, then applied to an in-memory
/// [`MemoryKeyStore`] that answers [`lookup`](KeyStore::lookup) (one process owns the file, so
/// the index is never stale): authenticating costs what it costs in memory.
///
/// Get one from [`SqliteBackend::key_store`](super::SqliteBackend::key_store). Cloning shares
/// it.
///
/// # Example
///
/// ```
/// use tollgate::auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStatus, KeyStore};
/// use tollgate::sqlite::SqliteBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("tollgate-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("keys.db");
/// # let _ = std::fs::remove_file(&path);
/// let keys = SqliteBackend::open(&path).await?.key_store();
/// keys.put_account(AccountRecord::new("acct_1", "free")).await?;
/// let key = keys.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await?;
/// keys.revoke_key("key_1").await?; // on disk before this returns
/// let found = keys.lookup(&key.digest()).await?.unwrap();
/// assert_eq!(found.status, KeyStatus::Revoked);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteKeyStore {
    shared: Arc<Shared>,
    memory: MemoryKeyStore,
}

impl fmt::Debug for SqliteKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteKeyStore")
            .field("path", &self.shared.path)
            .field("keys", &self.memory.len())
            .finish_non_exhaustive()
    }
}

impl SqliteKeyStore {
    /// Read plans, accounts and keys into memory.
    pub(super) async fn load(shared: Arc<Shared>) -> Result<SqliteKeyStore, OpenErrorKind> {
        let memory = MemoryKeyStore::new();
        {
            let mut guard = shared.conn.lock().await;
            let conn = guard
                .as_mut()
                .ok_or_else(|| OpenErrorKind::Other("closed".into()))?;
            read_all(conn, &memory).await?;
        }
        Ok(SqliteKeyStore { shared, memory })
    }

    /// Run `write` on the connection (one statement or a transaction: committed and fsynced
    /// when it returns), then `apply` to the in-memory index. The connection's lock serializes
    /// admin changes, so what `check` saw still holds when `apply` runs.
    async fn change<C, W, A, T>(&self, check: C, write: W, apply: A) -> Result<T, KeyAdminError>
    where
        C: FnOnce(&MemoryKeyStore) -> Result<(), KeyAdminError>,
        W: for<'c> FnOnce(
            &'c mut SqliteConnection,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>,
        >,
        A: FnOnce(&MemoryKeyStore) -> Result<T, KeyAdminError>,
    {
        let mut guard = self.shared.conn.lock().await;
        let conn = guard
            .as_mut()
            .ok_or_else(|| BackendError::new("sqlite: the database is closed"))?;
        check(&self.memory)?;
        // Fsynced before it is acknowledged.
        sqlx::raw_sql("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await
            .map_err(|e| backend_error("key store", &e))?;
        let written = write(&mut *conn).await;
        let normal = sqlx::raw_sql("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await;
        written.map_err(|e| backend_error("key store", &e))?;
        normal.map_err(|e| backend_error("key store", &e))?;
        apply(&self.memory)
    }
}

/// `Ready`'s value (the memory store answers at once).
fn now<T>(future: impl Future<Output = T>) -> T {
    use std::task::{Context, Poll, Waker};
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("the memory key store answers at once"),
    }
}

fn exists_account(memory: &MemoryKeyStore, id: &str) -> Result<(), KeyAdminError> {
    match now(memory.account(id))? {
        Some(_) => Ok(()),
        None => Err(KeyAdminError::UnknownAccount(id.into())),
    }
}

fn exists_key(memory: &MemoryKeyStore, id: &str) -> Result<KeyRecord, KeyAdminError> {
    now(memory.key(id))?.ok_or_else(|| KeyAdminError::UnknownKey(id.into()))
}

fn digest_free(
    memory: &MemoryKeyStore,
    digest: &KeyDigest,
    id: &Arc<str>,
) -> Result<(), KeyAdminError> {
    match now(memory.lookup(digest)) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(KeyAdminError::DuplicateKey(id.clone())),
        Err(e) => Err(e.into()),
    }
}

impl KeyStore for SqliteKeyStore {
    type Future = <MemoryKeyStore as KeyStore>::Future;

    #[inline]
    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        self.memory.lookup(digest)
    }
}

impl KeyAdmin for SqliteKeyStore {
    async fn put_account(&self, account: AccountRecord) -> Result<(), KeyAdminError> {
        let row = account.clone();
        self.change(
            |_| Ok(()),
            move |conn| {
                Box::pin(async move {
                    let (status, reason) = account_status(&row.status);
                    sqlx::query(
                        "INSERT INTO key_accounts (id, plan, status, blocked_reason) VALUES (?, ?, ?, ?) \
                         ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, \
                         status = excluded.status, blocked_reason = excluded.blocked_reason",
                    )
                    .bind(&*row.id)
                    .bind(&*row.plan)
                    .bind(status)
                    .bind(reason)
                    .execute(conn)
                    .await
                    .map(drop)
                })
            },
            |memory| now(memory.put_account(account)),
        )
        .await
    }

    async fn account(&self, id: &str) -> Result<Option<AccountRecord>, KeyAdminError> {
        now(self.memory.account(id))
    }

    async fn set_account_plan(&self, id: &str, plan: &str) -> Result<(), KeyAdminError> {
        let (row_id, row_plan) = (id.to_owned(), plan.to_owned());
        self.change(
            |memory| exists_account(memory, id),
            move |conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE key_accounts SET plan = ? WHERE id = ?")
                        .bind(row_plan)
                        .bind(row_id)
                        .execute(conn)
                        .await
                        .map(drop)
                })
            },
            |memory| now(memory.set_account_plan(id, plan)),
        )
        .await
    }

    async fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
    ) -> Result<(), KeyAdminError> {
        let row_id = id.to_owned();
        let (row_status, reason) = account_status(&status);
        let reason = reason.map(str::to_owned);
        self.change(
            |memory| exists_account(memory, id),
            move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE key_accounts SET status = ?, blocked_reason = ? WHERE id = ?",
                    )
                    .bind(row_status)
                    .bind(reason)
                    .bind(row_id)
                    .execute(conn)
                    .await
                    .map(drop)
                })
            },
            |memory| now(memory.set_account_status(id, status)),
        )
        .await
    }

    async fn set_plan_models(
        &self,
        plan: &str,
        models: Option<Vec<String>>,
    ) -> Result<(), KeyAdminError> {
        let row_plan = plan.to_owned();
        let row_models = models.as_deref().map(json_list);
        self.change(
            |_| Ok(()),
            move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO key_plans (plan, models) VALUES (?, ?) \
                         ON CONFLICT (plan) DO UPDATE SET models = excluded.models",
                    )
                    .bind(row_plan)
                    .bind(row_models)
                    .execute(conn)
                    .await
                    .map(drop)
                })
            },
            |memory| now(memory.set_plan_models(plan, models)),
        )
        .await
    }

    async fn insert_key(&self, digest: KeyDigest, record: KeyRecord) -> Result<(), KeyAdminError> {
        let row = record.clone();
        let (id, account) = (record.id.clone(), record.account_id.clone());
        self.change(
            |memory| {
                if now(memory.key(&id))?.is_some() {
                    return Err(KeyAdminError::DuplicateKey(id.clone()));
                }
                digest_free(memory, &digest, &id)?;
                exists_account(memory, &account)
            },
            move |conn| {
                Box::pin(async move {
                    let fields = KeyFields::of(&row);
                    sqlx::query(
                        "INSERT INTO key_keys (id, digest, account_id, status, expires_at_ms, \
                         plan, models, scopes, ip_allowlist, metadata) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&*row.id)
                    .bind(digest.as_bytes().to_vec())
                    .bind(&*row.account_id)
                    .bind(fields.status)
                    .bind(fields.expires_at_ms)
                    .bind(fields.plan)
                    .bind(fields.models)
                    .bind(fields.scopes)
                    .bind(fields.ip_allowlist)
                    .bind(fields.metadata)
                    .execute(conn)
                    .await
                    .map(drop)
                })
            },
            |memory| now(memory.insert_key(digest, record)),
        )
        .await
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, KeyAdminError> {
        now(self.memory.key(id))
    }

    async fn update_key(&self, record: KeyRecord) -> Result<(), KeyAdminError> {
        let row = record.clone();
        let (id, account, status) = (record.id.clone(), record.account_id.clone(), record.status);
        self.change(
            |memory| {
                let current = exists_key(memory, &id)?;
                revocation_is_final(&current, status)?;
                exists_account(memory, &account)
            },
            move |conn| {
                Box::pin(async move {
                    let fields = KeyFields::of(&row);
                    sqlx::query(
                        "UPDATE key_keys SET account_id = ?, status = ?, expires_at_ms = ?, \
                         plan = ?, models = ?, scopes = ?, ip_allowlist = ?, metadata = ? \
                         WHERE id = ?",
                    )
                    .bind(&*row.account_id)
                    .bind(fields.status)
                    .bind(fields.expires_at_ms)
                    .bind(fields.plan)
                    .bind(fields.models)
                    .bind(fields.scopes)
                    .bind(fields.ip_allowlist)
                    .bind(fields.metadata)
                    .bind(&*row.id)
                    .execute(conn)
                    .await
                    .map(drop)
                })
            },
            |memory| now(memory.update_key(record)),
        )
        .await
    }

    async fn set_key_status(&self, id: &str, status: KeyStatus) -> Result<(), KeyAdminError> {
        let row_id = id.to_owned();
        self.change(
            |memory| revocation_is_final(&exists_key(memory, id)?, status),
            move |conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE key_keys SET status = ? WHERE id = ?")
                        .bind(key_status(status))
                        .bind(row_id)
                        .execute(conn)
                        .await
                        .map(drop)
                })
            },
            |memory| now(memory.set_key_status(id, status)),
        )
        .await
    }

    async fn rotate_key(&self, id: &str, new_digest: KeyDigest) -> Result<(), KeyAdminError> {
        let row_id = id.to_owned();
        self.change(
            |memory| {
                let record = exists_key(memory, id)?;
                digest_free(memory, &new_digest, &record.id)
            },
            move |conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE key_keys SET digest = ? WHERE id = ?")
                        .bind(new_digest.as_bytes().to_vec())
                        .bind(row_id)
                        .execute(conn)
                        .await
                        .map(drop)
                })
            },
            |memory| now(memory.rotate_key(id, new_digest)),
        )
        .await
    }
}

/// A key record's columns besides its id, digest and account.
struct KeyFields {
    status: &'static str,
    expires_at_ms: Option<i64>,
    plan: Option<String>,
    models: Option<String>,
    scopes: String,
    ip_allowlist: Option<String>,
    metadata: String,
}

impl KeyFields {
    fn of(record: &KeyRecord) -> Self {
        KeyFields {
            status: key_status(record.status),
            expires_at_ms: record.expires_at.map(millis),
            plan: record.plan.as_deref().map(str::to_owned),
            models: record.models.as_deref().map(json_list),
            scopes: json_list(&record.scopes),
            // `10.0.0.0/8, 2001:db8::/32`: what `IpSet`'s `FromStr` parses back.
            ip_allowlist: record.ip_allowlist.as_ref().map(IpSet::to_string),
            metadata: json_map(&record.metadata),
        }
    }
}

async fn read_all(
    conn: &mut SqliteConnection,
    memory: &MemoryKeyStore,
) -> Result<(), OpenErrorKind> {
    let sql = |e: sqlx::Error| OpenErrorKind::Other(format!("reading the key store: {e}"));
    let corrupt = |what: &str, id: &str| OpenErrorKind::Corrupt(format!("{what} of `{id}`"));
    let list = |text: &str| parse_list(text.as_bytes()).ok_or(());
    for row in sqlx::query("SELECT plan, models FROM key_plans")
        .fetch_all(&mut *conn)
        .await
        .map_err(sql)?
    {
        let plan: String = row.try_get(0).map_err(sql)?;
        let models = match row.try_get::<Option<String>, _>(1).map_err(sql)? {
            Some(text) => Some(list(&text).map_err(|_| corrupt("the models", &plan))?),
            None => None,
        };
        now(memory.set_plan_models(&plan, models))
            .map_err(|e| OpenErrorKind::Other(e.to_string()))?;
    }
    for row in sqlx::query("SELECT id, plan, status, blocked_reason FROM key_accounts")
        .fetch_all(&mut *conn)
        .await
        .map_err(sql)?
    {
        let id: String = row.try_get(0).map_err(sql)?;
        let plan: String = row.try_get(1).map_err(sql)?;
        let reason = row.try_get::<Option<String>, _>(3).map_err(sql)?;
        let status = parse_account_status(row.try_get(2).map_err(sql)?, || {
            reason.unwrap_or_default().into()
        });
        now(memory.put_account(AccountRecord::new(id, plan).status(status)))
            .map_err(|e| OpenErrorKind::Other(e.to_string()))?;
    }
    for row in sqlx::query(
        "SELECT id, digest, account_id, status, expires_at_ms, plan, models, scopes, \
         ip_allowlist, metadata FROM key_keys",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(sql)?
    {
        let id: String = row.try_get(0).map_err(sql)?;
        let digest: Vec<u8> = row.try_get(1).map_err(sql)?;
        let digest: [u8; 32] = digest.try_into().map_err(|_| corrupt("the digest", &id))?;
        let mut record = KeyRecord::new(id.as_str(), row.try_get::<String, _>(2).map_err(sql)?);
        record.status = parse_key_status(row.try_get(3).map_err(sql)?);
        record.expires_at = row
            .try_get::<Option<i64>, _>(4)
            .map_err(sql)?
            .map(from_millis);
        record.plan = row
            .try_get::<Option<String>, _>(5)
            .map_err(sql)?
            .map(Arc::from);
        if let Some(text) = row.try_get::<Option<String>, _>(6).map_err(sql)? {
            record.models = Some(list(&text).map_err(|_| corrupt("the models", &id))?.into());
        }
        record.scopes =
            list(row.try_get(7).map_err(sql)?).map_err(|_| corrupt("the scopes", &id))?;
        if let Some(text) = row.try_get::<Option<String>, _>(8).map_err(sql)? {
            record.ip_allowlist = Some(
                text.parse::<IpSet>()
                    .map_err(|_| corrupt("the IP allowlist", &id))?,
            );
        }
        record.metadata =
            parse_map(row.try_get(9).map_err(sql)?).ok_or_else(|| corrupt("the metadata", &id))?;
        now(memory.insert_key(KeyDigest::from_bytes(digest), record))
            .map_err(|e| OpenErrorKind::Corrupt(e.to_string()))?;
    }
    Ok(())
}

#[allow(dead_code)]
fn _assert_send(
    store: &SqliteKeyStore,
) -> impl Future<Output = Result<(), KeyAdminError>> + Send + '_ {
    store.revoke_key("k")
}

/// A revoked key stays revoked (checked before anything is written).
fn revocation_is_final(current: &KeyRecord, status: KeyStatus) -> Result<(), KeyAdminError> {
    if current.status == KeyStatus::Revoked && status != KeyStatus::Revoked {
        return Err(KeyAdminError::Revoked(current.id.clone()));
    }
    Ok(())
}
