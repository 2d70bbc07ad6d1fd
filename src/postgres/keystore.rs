//! The PostgreSQL [`KeyStore`]: records in tables, a small cache per replica, `LISTEN`/`NOTIFY`
//! invalidation.

use std::{
    fmt,
    future::Future,
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    postgres::{PgListener, PgRow},
    Row, SqlStr,
};

use super::{BoxFuture, Shared};
use crate::{
    auth::stored::{
        account_status, json_list, json_map, key_status, named, parse_account_status,
        parse_key_status, parse_list, parse_map,
    },
    auth::{
        cache::{KeyCache, ALL},
        AccountRecord, AccountStatus, KeyAdmin, KeyAdminError, KeyLookup, KeyRecord, KeyStatus,
        KeyStore,
    },
    ip::IpSet,
    keys::KeyDigest,
    BackendError,
};

/// The columns of a key record, in the order [`decode_key`] reads them from `offset`.
const KEY_COLUMNS: &str =
    "k.id, k.account, k.status, (extract(epoch FROM k.expires_at) * 1000)::bigint, \
     k.plan, k.models::text, k.scopes::text, k.ip_allowlist, k.metadata::text";

/// A [`KeyStore`] and [`KeyAdmin`] in PostgreSQL, with a small cache on each replica.
///
/// A key is found by its SHA-256 digest (the key's text never reaches the database) with one
/// query that joins the key, its account and its plan. Answers, found or not, are cached for
/// [`key_cache_ttl`](super::PostgresOptions::key_cache_ttl). Every change made through
/// [`KeyAdmin`] on any replica sends a `NOTIFY` on the channel `{schema}_keys` in the same
/// statement (delivered when it commits), and every replica's listener (`LISTEN` on a connection
/// of its own) drops the affected entries as soon as it arrives, in milliseconds: a revoked key is
/// refused everywhere within one second — at worst, if notifications are lost, within the cache
/// TTL. A listener that loses its connection empties its cache, since it may have missed some.
///
/// # Example
///
/// ```no_run
/// use tollgate::auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStore};
/// use tollgate::postgres::PostgresBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = PostgresBackend::connect("postgres://postgres@127.0.0.1/billing").await?;
/// backend.migrate().await?;
/// let keys = backend.key_store();
/// keys.put_account(AccountRecord::new("acct_1", "free")).await?;
/// let key = keys.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await?;
/// let found = keys.lookup(&key.digest()).await?.unwrap();
/// assert_eq!(found.caller.account_id(), "acct_1");
/// keys.revoke_key("key_1").await?; // every replica refuses it within a second
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresKeyStore {
    shared: Arc<Shared>,
    cache: Arc<KeyCache>,
    sql: Arc<Statements>,
}

struct Statements {
    channel: String,
    lookup: SqlStr,
    key: SqlStr,
    account: SqlStr,
    put_account: SqlStr,
    set_account_plan: SqlStr,
    set_account_status: SqlStr,
    put_plan: SqlStr,
    delete_plan: SqlStr,
    insert_key: SqlStr,
    update_key: SqlStr,
    set_key_status: SqlStr,
    rotate_key: SqlStr,
}

impl Statements {
    fn new(shared: &Shared) -> Self {
        // The values of a key record, `$2..$10` after the id or digest in `$1`.
        let key_values = "$3, $4, CASE WHEN $5::bigint IS NULL THEN NULL ELSE to_timestamp($5::float8 / 1000) END, \
             $6, $7::jsonb, $8::jsonb, $9, $10::jsonb";
        Statements {
            channel: format!("{}_keys", shared.options.schema),
            lookup: shared.sql(&format!(
                "SELECT {KEY_COLUMNS}, a.plan, a.status, a.reason, p.models::text \
                 FROM @schema@.api_keys k JOIN @schema@.accounts a ON a.id = k.account \
                 LEFT JOIN @schema@.plans p ON p.name = coalesce(k.plan, a.plan) \
                 WHERE k.digest = $1"
            )),
            key: shared.sql(&format!(
                "SELECT {KEY_COLUMNS} FROM @schema@.api_keys k WHERE k.id = $1"
            )),
            account: shared.sql("SELECT plan, status, reason FROM @schema@.accounts WHERE id = $1"),
            put_account: shared.sql(
                "WITH u AS (INSERT INTO @schema@.accounts (id, plan, status, reason) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE \
                 SET plan = excluded.plan, status = excluded.status, reason = excluded.reason \
                 RETURNING 1) SELECT '*'::text, pg_notify($5, '*') FROM u",
            ),
            set_account_plan: shared.sql(
                "WITH u AS (UPDATE @schema@.accounts SET plan = $2 WHERE id = $1 RETURNING 1) \
                 SELECT '*'::text, pg_notify($3, '*') FROM u",
            ),
            set_account_status: shared.sql(
                "WITH u AS (UPDATE @schema@.accounts SET status = $2, reason = $3 WHERE id = $1 \
                 RETURNING 1) SELECT '*'::text, pg_notify($4, '*') FROM u",
            ),
            put_plan: shared.sql(
                "WITH u AS (INSERT INTO @schema@.plans (name, models) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (name) DO UPDATE SET models = excluded.models RETURNING 1) \
                 SELECT '*'::text, pg_notify($3, '*') FROM u",
            ),
            delete_plan: shared.sql(
                "WITH u AS (DELETE FROM @schema@.plans WHERE name = $1 RETURNING 1) \
                 SELECT '*'::text, pg_notify($2, '*')",
            ),
            insert_key: shared.sql(&format!(
                "WITH u AS (INSERT INTO @schema@.api_keys \
                 (digest, id, account, status, expires_at, plan, models, scopes, ip_allowlist, metadata) \
                 VALUES ($1, $2, {key_values}) RETURNING digest) \
                 SELECT encode(digest, 'hex'), pg_notify($11, encode(digest, 'hex')) FROM u"
            )),
            update_key: shared.sql(&format!(
                "WITH u AS (UPDATE @schema@.api_keys SET \
                 (account, status, expires_at, plan, models, scopes, ip_allowlist, metadata) = \
                 ({key_values}) WHERE id = $2 AND $1::bytea IS NULL RETURNING digest) \
                 SELECT encode(digest, 'hex'), pg_notify($11, encode(digest, 'hex')) FROM u"
            )),
            set_key_status: shared.sql(
                "WITH u AS (UPDATE @schema@.api_keys SET status = $2 WHERE id = $1 RETURNING digest) \
                 SELECT encode(digest, 'hex'), pg_notify($3, encode(digest, 'hex')) FROM u",
            ),
            rotate_key: shared.sql(
                "WITH old AS (SELECT id, digest FROM @schema@.api_keys WHERE id = $1 FOR UPDATE), \
                 u AS (UPDATE @schema@.api_keys k SET digest = $2 FROM old WHERE k.id = old.id \
                 RETURNING old.digest AS old_digest) \
                 SELECT v.m, pg_notify($3, v.m) FROM u, \
                 LATERAL (VALUES (encode(u.old_digest, 'hex')), (encode($2::bytea, 'hex'))) AS v(m)",
            ),
        }
    }
}

impl PostgresKeyStore {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let cache = Arc::new(KeyCache::new(
            shared.options.key_cache_ttl,
            shared.options.key_cache_capacity,
        ));
        let sql = Arc::new(Statements::new(&shared));
        let store = PostgresKeyStore { shared, cache, sql };
        store.spawn_listener();
        store
    }

    /// Cached entries (found and not found).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Empty this replica's cache.
    pub fn clear_cache(&self) {
        self.cache.invalidate(ALL);
    }

    fn spawn_listener(&self) {
        let pool = self.shared.pool.clone();
        let channel = self.sql.channel.clone();
        let weak: Weak<KeyCache> = Arc::downgrade(&self.cache);
        let timeout = self.shared.deadline();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                let listening = tokio::time::timeout(timeout, async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(&channel).await?;
                    Ok::<_, sqlx::Error>(listener)
                })
                .await;
                let Ok(Ok(mut listener)) = listening else {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                    continue;
                };
                delay = Duration::from_millis(50);
                // Notifications may have been missed while we were not listening.
                match weak.upgrade() {
                    Some(cache) => cache.invalidate(ALL),
                    None => return,
                }
                loop {
                    match tokio::time::timeout(Duration::from_secs(1), listener.try_recv()).await {
                        Ok(Ok(Some(notification))) => {
                            let Some(cache) = weak.upgrade() else { return };
                            cache.invalidate(notification.payload());
                        }
                        // The connection was lost (`None`) or failed: listen anew.
                        Ok(Ok(None)) | Ok(Err(_)) => break,
                        Err(_) if weak.strong_count() == 0 => return,
                        Err(_) => {}
                    }
                }
                if let Some(cache) = weak.upgrade() {
                    cache.invalidate(ALL);
                }
                tracing::debug!("key invalidation listener disconnected; reconnecting");
            }
        });
    }

    /// Run an admin statement that notifies, each row a message it sent (column 0); answers how
    /// many rows it returned (0: nothing matched), after this replica's own cache applied them.
    fn admin<F, Fut>(
        &self,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<usize, KeyAdminError>> + Send + 'static
    where
        F: FnOnce(sqlx::PgPool, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<PgRow>, sqlx::Error>> + Send + 'static,
    {
        let channel = self.sql.channel.clone();
        let pool = self.shared.pool.clone();
        let deadline = self.shared.deadline();
        let cache = Arc::clone(&self.cache);
        async move {
            let result = tokio::time::timeout(deadline, f(pool, channel)).await;
            let rows = match result {
                Ok(Ok(rows)) => rows,
                Ok(Err(error)) => return Err(admin_error(what, &error)),
                Err(_) => {
                    return Err(BackendError::new(format!(
                        "postgres {what}: no answer within {deadline:?}"
                    ))
                    .into())
                }
            };
            // Each row is a message that was notified: apply it here at once.
            for row in &rows {
                if let Ok(message) = row.try_get::<&str, _>(0) {
                    cache.invalidate(message);
                }
            }
            Ok(rows.len())
        }
    }

    fn set_account_fields(
        &self,
        id: &str,
        sql: SqlStr,
        values: Vec<String>,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send + 'static {
        let account = id.to_owned();
        let call = self.admin("account", move |pool, channel| async move {
            let mut query = sqlx::query(sql).bind(account);
            for value in values {
                query = query.bind(value);
            }
            query.bind(channel).fetch_all(&pool).await
        });
        let id: Arc<str> = id.into();
        async move {
            match call.await? {
                0 => Err(KeyAdminError::UnknownAccount(id)),
                _ => Ok(()),
            }
        }
    }

    fn write_key(
        &self,
        sql: SqlStr,
        digest: Option<KeyDigest>,
        record: KeyRecord,
    ) -> impl Future<Output = Result<usize, KeyAdminError>> + Send + 'static {
        let id = record.id.clone();
        let account = record.account_id.clone();
        let call = self.admin("key", move |pool, channel| async move {
            sqlx::query(sql)
                .bind(digest.map(|d| d.as_bytes().to_vec()))
                .bind(record.id.to_string())
                .bind(record.account_id.to_string())
                .bind(key_status(record.status))
                .bind(record.expires_at.map(millis))
                .bind(record.plan.as_deref().map(str::to_owned))
                .bind(record.models.as_deref().map(json_list))
                .bind(json_list(&record.scopes))
                .bind(record.ip_allowlist.as_ref().map(ToString::to_string))
                .bind(json_map(&record.metadata))
                .bind(channel)
                .fetch_all(&pool)
                .await
        });
        async move { call.await.map_err(|e| named(e, &id, &account)) }
    }
}

impl KeyStore for PostgresKeyStore {
    type Future = BoxFuture<Result<Option<KeyLookup>, BackendError>>;

    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        if let Some(cached) = self.cache.get(digest) {
            return Box::pin(std::future::ready(Ok(cached)));
        }
        let generation = self.cache.generation();
        let sql = self.sql.lookup.clone();
        let bytes = digest.as_bytes().to_vec();
        let call = self.shared.call_retrying("key lookup", move |pool, _| {
            let query = sqlx::query(sql.clone()).bind(bytes.clone());
            async move {
                let row = query.fetch_optional(&pool).await?;
                row.map(|row| decode_lookup(&row)).transpose()
            }
        });
        let cache = Arc::clone(&self.cache);
        let digest = *digest;
        Box::pin(async move {
            let lookup = call.await?;
            cache.put(digest, lookup.clone(), generation);
            Ok(lookup)
        })
    }
}

impl KeyAdmin for PostgresKeyStore {
    fn put_account(
        &self,
        account: AccountRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let (status, reason) = account_status(&account.status);
        let reason = reason.unwrap_or_default().to_owned();
        let values = vec![account.plan.to_string(), status.to_owned(), reason];
        self.set_account_fields(&account.id, self.sql.put_account.clone(), values)
    }

    fn account(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<AccountRecord>, KeyAdminError>> + Send {
        let sql = self.sql.account.clone();
        let id: Arc<str> = id.into();
        let call = self.shared.call("account", {
            let id = id.clone();
            move |pool| async move {
                let row = sqlx::query(sql)
                    .bind(id.to_string())
                    .fetch_optional(&pool)
                    .await?;
                row.map(|row| decode_account(id, &row, 0)).transpose()
            }
        });
        async move { Ok(call.await?) }
    }

    fn set_account_plan(
        &self,
        id: &str,
        plan: &str,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.set_account_fields(id, self.sql.set_account_plan.clone(), vec![plan.to_owned()])
    }

    fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let (status, reason) = account_status(&status);
        let reason = reason.unwrap_or_default().to_owned();
        self.set_account_fields(
            id,
            self.sql.set_account_status.clone(),
            vec![status.to_owned(), reason],
        )
    }

    fn set_plan_models(
        &self,
        plan: &str,
        models: Option<Vec<String>>,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let plan = plan.to_owned();
        let (put, delete) = (self.sql.put_plan.clone(), self.sql.delete_plan.clone());
        let call = self.admin("plan", move |pool, channel| async move {
            match models {
                Some(models) => {
                    sqlx::query(put)
                        .bind(plan)
                        .bind(json_list(&models))
                        .bind(channel)
                        .fetch_all(&pool)
                        .await
                }
                None => {
                    sqlx::query(delete)
                        .bind(plan)
                        .bind(channel)
                        .fetch_all(&pool)
                        .await
                }
            }
        });
        async move { call.await.map(drop) }
    }

    fn insert_key(
        &self,
        digest: KeyDigest,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let call = self.write_key(self.sql.insert_key.clone(), Some(digest), record);
        async move { call.await.map(drop) }
    }

    fn key(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<KeyRecord>, KeyAdminError>> + Send {
        let sql = self.sql.key.clone();
        let id = id.to_owned();
        let call = self.shared.call("key", move |pool| async move {
            let row = sqlx::query(sql).bind(id).fetch_optional(&pool).await?;
            row.map(|row| decode_key(&row)).transpose()
        });
        async move { Ok(call.await?) }
    }

    fn update_key(
        &self,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let id = record.id.clone();
        let call = self.write_key(self.sql.update_key.clone(), None, record);
        async move {
            match call.await? {
                0 => Err(KeyAdminError::UnknownKey(id)),
                _ => Ok(()),
            }
        }
    }

    fn set_key_status(
        &self,
        id: &str,
        status: KeyStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let sql = self.sql.set_key_status.clone();
        let id: Arc<str> = id.into();
        let key = id.to_string();
        let call = self.admin("key", move |pool, channel| async move {
            sqlx::query(sql)
                .bind(key)
                .bind(key_status(status))
                .bind(channel)
                .fetch_all(&pool)
                .await
        });
        async move {
            match call.await.map_err(|e| named(e, &id, &id))? {
                0 => Err(KeyAdminError::UnknownKey(id)),
                _ => Ok(()),
            }
        }
    }

    fn rotate_key(
        &self,
        id: &str,
        new_digest: KeyDigest,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let sql = self.sql.rotate_key.clone();
        let id: Arc<str> = id.into();
        let key = id.to_string();
        let call = self.admin("key", move |pool, channel| async move {
            sqlx::query(sql)
                .bind(key)
                .bind(new_digest.as_bytes().to_vec())
                .bind(channel)
                .fetch_all(&pool)
                .await
        });
        async move {
            match call.await.map_err(|e| named(e, &id, &id))? {
                0 => Err(KeyAdminError::UnknownKey(id)),
                _ => Ok(()),
            }
        }
    }
}

impl fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("schema", &self.shared.options.schema)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

/// A unique violation is a duplicate key, a foreign-key violation an unknown account.
fn admin_error(what: &str, error: &sqlx::Error) -> KeyAdminError {
    if let sqlx::Error::Database(db) = error {
        match db.code().as_deref() {
            Some("23505") => return KeyAdminError::DuplicateKey("".into()),
            Some("23503") => return KeyAdminError::UnknownAccount("".into()),
            // Raised by the `revocation_is_final` trigger.
            Some("TGRVK") => return KeyAdminError::Revoked("".into()),
            _ => {}
        }
    }
    super::backend_error(what, error).into()
}

fn millis(at: SystemTime) -> i64 {
    i64::try_from(
        at.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

fn corrupt(what: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("postgres key store: corrupt {what}"))
}

/// A key record from the columns of [`KEY_COLUMNS`].
fn decode_key(row: &PgRow) -> Result<KeyRecord, sqlx::Error> {
    let id: &str = row.try_get(0)?;
    let account: &str = row.try_get(1)?;
    let mut record = KeyRecord::new(id, account);
    record.status = parse_key_status(row.try_get(2)?);
    if let Some(ms) = row.try_get::<Option<i64>, _>(3)? {
        record.expires_at =
            Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    }
    record.plan = row.try_get::<Option<&str>, _>(4)?.map(Arc::from);
    if let Some(models) = row.try_get::<Option<&str>, _>(5)? {
        record.models = Some(
            parse_list(models.as_bytes())
                .ok_or_else(|| corrupt("key models"))?
                .into(),
        );
    }
    record.scopes =
        parse_list(row.try_get::<&str, _>(6)?.as_bytes()).ok_or_else(|| corrupt("key scopes"))?;
    if let Some(ips) = row.try_get::<Option<&str>, _>(7)? {
        record.ip_allowlist = Some(ips.parse::<IpSet>().map_err(|_| corrupt("key allowlist"))?);
    }
    record.metadata = parse_map(row.try_get(8)?).ok_or_else(|| corrupt("key metadata"))?;
    Ok(record)
}

/// An account record from three columns from `offset`: plan, status, reason.
fn decode_account(id: Arc<str>, row: &PgRow, offset: usize) -> Result<AccountRecord, sqlx::Error> {
    let plan: &str = row.try_get(offset)?;
    let reason: &str = row.try_get(offset + 2)?;
    let status = parse_account_status(row.try_get(offset + 1)?, || reason.into());
    Ok(AccountRecord::new(id, plan).status(status))
}

fn decode_lookup(row: &PgRow) -> Result<KeyLookup, sqlx::Error> {
    let key = decode_key(row)?;
    let account = decode_account(key.account_id.clone(), row, 9)?;
    let models = match row.try_get::<Option<&str>, _>(12)? {
        Some(text) => Some(parse_list(text.as_bytes()).ok_or_else(|| corrupt("plan models"))?),
        None => None,
    };
    Ok(KeyLookup::from_records(&key, &account, models.as_deref()))
}
