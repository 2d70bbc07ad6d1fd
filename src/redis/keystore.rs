//! The Redis [`KeyStore`]: records in Redis hashes, a small cache per replica, pub/sub
//! invalidation.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{Arc, LazyLock, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt;
use redis::{AsyncCommands, Script, Value};

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

static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lookup.lua")));
static KEY_ADMIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/key_admin.lua")));

/// A [`KeyStore`] and [`KeyAdmin`] in Redis, with a small cache on each replica.
///
/// A key is found by its SHA-256 digest (the key's text never reaches Redis) with one read-only
/// script that returns the key's, its account's and its plan's records together. Answers, found
/// or not, are cached for [`key_cache_ttl`](super::RedisOptions::key_cache_ttl); every change made
/// through [`KeyAdmin`] on any replica is published on `{prefix}:{keys}:invalidate`, and every
/// replica's listener drops the affected entries as soon as the message arrives (in
/// milliseconds), so a revoked key is refused everywhere within one second — at worst, if
/// messages are lost, within the cache TTL. A listener that reconnects empties its cache, since
/// it may have missed messages.
///
/// # Example
///
/// ```no_run
/// use tollgate::auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStore};
/// use tollgate::redis::RedisBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let keys = RedisBackend::connect("redis://127.0.0.1/").await?.key_store();
/// keys.put_account(AccountRecord::new("acct_1", "free")).await?;
/// let key = keys.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await?;
/// let found = keys.lookup(&key.digest()).await?.unwrap();
/// assert_eq!(found.caller.account_id(), "acct_1");
/// keys.revoke_key("key_1").await?; // every replica refuses it within a second
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisKeyStore {
    shared: Arc<Shared>,
    cache: Arc<KeyCache>,
}

impl RedisKeyStore {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let cache = Arc::new(KeyCache::new(
            shared.options.key_cache_ttl,
            shared.options.key_cache_capacity,
        ));
        let store = RedisKeyStore { shared, cache };
        store.spawn_listener();
        store
    }

    /// `{prefix}:{keys}:` — every key store key shares the `{keys}` slot, so the scripts that
    /// read a key, its account and its plan together work on Redis Cluster.
    fn prefix(&self) -> String {
        format!("{}:{{keys}}:", self.shared.options.prefix)
    }

    /// The account's hash (`plan`, `status`, `reason`), for a ledger script that promotes it.
    pub(super) fn account_hash(&self, id: &str) -> String {
        format!("{}account:{id}", self.prefix())
    }

    /// Drop every cached lookup here and on every replica (an account's plan changed).
    pub(super) fn invalidate_all(&self) -> impl Future<Output = ()> + Send + 'static {
        self.publish(vec![ALL.to_owned()])
    }

    fn channel(&self) -> String {
        format!("{}invalidate", self.prefix())
    }

    /// Cached entries (found and not found).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Empty this replica's cache.
    pub fn clear_cache(&self) {
        self.cache.invalidate(ALL);
    }

    /// The invalidation listener: subscribed on one server (one node of a cluster, where
    /// `PUBLISH` reaches every node); when its connection ends it subscribes again, on the next
    /// node of the cluster's URLs, and drops the whole cache (messages may have been missed).
    fn spawn_listener(&self) {
        let clients = self.shared.clients.clone();
        let channel = self.channel();
        let weak: Weak<KeyCache> = Arc::downgrade(&self.cache);
        let connect_timeout = self.shared.options.connect_timeout;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            let mut next = 0usize;
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                let client = &clients[next % clients.len()];
                next = next.wrapping_add(1);
                let subscribed = tokio::time::timeout(connect_timeout, async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
                let Ok(Ok(pubsub)) = subscribed else {
                    // With several nodes, the next one is tried at once; a whole round failed
                    // waits (longer each round, at most 1 s).
                    if next % clients.len() == 0 {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    continue;
                };
                delay = Duration::from_millis(50);
                // Messages may have been missed while we were not listening.
                match weak.upgrade() {
                    Some(cache) => cache.invalidate(ALL),
                    None => return,
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
                        Ok(Some(message)) => {
                            let Some(cache) = weak.upgrade() else { return };
                            let payload: String = message.get_payload().unwrap_or_default();
                            cache.invalidate(&payload);
                        }
                        Ok(None) => break,
                        Err(_) if weak.strong_count() == 0 => return,
                        Err(_) => {}
                    }
                }
                // The node it listened on went away: `next` is the following one, tried at once.
                tracing::debug!("key invalidation listener disconnected; reconnecting");
            }
        });
    }

    fn publish(&self, messages: Vec<String>) -> impl Future<Output = ()> + Send + 'static {
        let channel = self.channel();
        let cache = Arc::clone(&self.cache);
        let call = self
            .shared
            .conn
            .call("publish", move |mut conn| async move {
                for message in messages.iter() {
                    cache.invalidate(message);
                    let _: i64 = conn.publish(&channel, message).await?;
                }
                Ok(())
            });
        async move {
            if let Err(error) = call.await {
                tracing::warn!(%error, "key invalidation not published; other replicas see the change within the cache TTL");
            }
        }
    }

    fn admin(
        &self,
        op: &'static str,
        args: Vec<String>,
    ) -> impl Future<Output = Result<Vec<String>, KeyAdminError>> + Send + 'static {
        let prefix = self.prefix();
        // The script's declared key (in the `{keys}` slot, where it runs on a cluster): the
        // key id's entry; the id is the second argument of an insert, the first of the others.
        let id = args
            .get(usize::from(op == "insert"))
            .cloned()
            .unwrap_or_default();
        let id_key = format!("{prefix}keyid:{id}");
        let call = self
            .shared
            .conn
            .call("key admin", move |mut conn| async move {
                let mut invocation = KEY_ADMIN.prepare_invoke();
                invocation.key(id_key).arg(prefix).arg(op);
                for arg in args {
                    invocation.arg(arg);
                }
                invocation.invoke_async::<Vec<String>>(&mut conn).await
            });
        let store = self.clone();
        async move {
            let mut reply = call.await?;
            match reply.first().map(String::as_str) {
                Some("ok") => {
                    reply.remove(0);
                    store.publish(reply.clone()).await;
                    Ok(reply)
                }
                Some("duplicate") => Err(KeyAdminError::DuplicateKey("".into())),
                Some("unknown_account") => Err(KeyAdminError::UnknownAccount("".into())),
                Some("unknown_key") => Err(KeyAdminError::UnknownKey("".into())),
                Some("revoked") => Err(KeyAdminError::Revoked("".into())),
                _ => Err(BackendError::new("redis key admin: unexpected reply").into()),
            }
        }
    }

    fn put_account_fields(
        &self,
        id: &str,
        fields: Vec<(&'static str, String)>,
        must_exist: bool,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send + 'static {
        let key = format!("{}account:{id}", self.prefix());
        let call = self
            .shared
            .conn
            .call("account", move |mut conn| async move {
                if must_exist && !conn.exists::<_, bool>(&key).await? {
                    return Ok(false);
                }
                let () = conn.hset_multiple(&key, &fields).await?;
                Ok(true)
            });
        let publish = self.publish(vec![ALL.to_owned()]);
        let id: Arc<str> = id.into();
        async move {
            if !call.await? {
                return Err(KeyAdminError::UnknownAccount(id));
            }
            publish.await;
            Ok(())
        }
    }
}

impl KeyStore for RedisKeyStore {
    type Future = BoxFuture<Result<Option<KeyLookup>, BackendError>>;

    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        if let Some(cached) = self.cache.get(digest) {
            return Box::pin(std::future::ready(Ok(cached)));
        }
        let generation = self.cache.generation();
        let prefix = self.prefix();
        let key = format!("{prefix}key:{}", digest.to_hex());
        let call = self
            .shared
            .conn
            .call("key lookup", move |mut conn| async move {
                let mut invocation = LOOKUP.prepare_invoke();
                invocation.key(key).arg(prefix);
                invocation.invoke_async::<Vec<Value>>(&mut conn).await
            });
        let cache = Arc::clone(&self.cache);
        let digest = *digest;
        Box::pin(async move {
            let reply = call.await?;
            let lookup = decode_lookup(&reply)?;
            cache.put(digest, lookup.clone(), generation);
            Ok(lookup)
        })
    }
}

impl KeyAdmin for RedisKeyStore {
    fn put_account(
        &self,
        account: AccountRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let (status, reason) = account_status(&account.status);
        let reason = reason.unwrap_or_default().to_owned();
        let fields = vec![
            ("plan", account.plan.to_string()),
            ("status", status.to_owned()),
            ("reason", reason),
        ];
        self.put_account_fields(&account.id, fields, false)
    }

    fn account(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<AccountRecord>, KeyAdminError>> + Send {
        let key = format!("{}account:{id}", self.prefix());
        let call = self
            .shared
            .conn
            .call("account", move |mut conn| async move {
                conn.hgetall::<_, HashMap<String, String>>(key).await
            });
        let id: Arc<str> = id.into();
        async move {
            let fields = call.await?;
            Ok((!fields.is_empty()).then(|| decode_account(id, &fields)))
        }
    }

    fn set_account_plan(
        &self,
        id: &str,
        plan: &str,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.put_account_fields(id, vec![("plan", plan.to_owned())], true)
    }

    fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let (status, reason) = account_status(&status);
        let reason = reason.unwrap_or_default().to_owned();
        let fields = vec![("status", status.to_owned()), ("reason", reason)];
        self.put_account_fields(id, fields, true)
    }

    fn set_plan_models(
        &self,
        plan: &str,
        models: Option<Vec<String>>,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let key = format!("{}plan:{plan}", self.prefix());
        let call = self.shared.conn.call("plan", move |mut conn| async move {
            match models {
                Some(models) => conn.set::<_, _, ()>(key, json_list(&models)).await,
                None => conn.del::<_, ()>(key).await,
            }
        });
        let publish = self.publish(vec![ALL.to_owned()]);
        async move {
            call.await?;
            publish.await;
            Ok(())
        }
    }

    fn insert_key(
        &self,
        digest: KeyDigest,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let id = record.id.clone();
        let account = record.account_id.clone();
        let mut args = vec![digest.to_hex(), id.to_string(), account.to_string()];
        args.extend(encode_key(&record));
        let call = self.admin("insert", args);
        async move { call.await.map(drop).map_err(|e| named(e, &id, &account)) }
    }

    fn key(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<KeyRecord>, KeyAdminError>> + Send {
        let prefix = self.prefix();
        let id_key = format!("{prefix}keyid:{id}");
        let call = self.shared.conn.call("key", move |mut conn| async move {
            let Some(digest) = conn.get::<_, Option<String>>(id_key).await? else {
                return Ok(None);
            };
            let fields: HashMap<String, String> =
                conn.hgetall(format!("{prefix}key:{digest}")).await?;
            Ok(Some(fields))
        });
        async move {
            match call.await? {
                Some(fields) if !fields.is_empty() => Ok(Some(decode_key(&fields)?)),
                _ => Ok(None),
            }
        }
    }

    fn update_key(
        &self,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let id = record.id.clone();
        let account = record.account_id.clone();
        let mut args = vec![id.to_string(), account.to_string()];
        args.extend(encode_key(&record));
        let call = self.admin("update", args);
        async move { call.await.map(drop).map_err(|e| named(e, &id, &account)) }
    }

    fn set_key_status(
        &self,
        id: &str,
        status: KeyStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let id: Arc<str> = id.into();
        let call = self.admin(
            "status",
            vec![id.to_string(), key_status(status).to_owned()],
        );
        async move { call.await.map(drop).map_err(|e| named(e, &id, &id)) }
    }

    fn rotate_key(
        &self,
        id: &str,
        new_digest: KeyDigest,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        let id: Arc<str> = id.into();
        let call = self.admin("rotate", vec![id.to_string(), new_digest.to_hex()]);
        async move { call.await.map(drop).map_err(|e| named(e, &id, &id)) }
    }
}

impl fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyStore")
            .field("prefix", &self.shared.options.prefix)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

fn millis(at: SystemTime) -> u64 {
    u64::try_from(
        at.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// A key record as hash fields (the digest and the key's text are not among them).
fn encode_key(record: &KeyRecord) -> Vec<String> {
    let mut fields = vec![
        ("id", record.id.to_string()),
        ("account", record.account_id.to_string()),
        ("status", key_status(record.status).to_owned()),
        ("scopes", json_list(&record.scopes)),
        ("meta", json_map(&record.metadata)),
    ];
    if let Some(at) = record.expires_at {
        fields.push(("expires", millis(at).to_string()));
    }
    if let Some(plan) = &record.plan {
        fields.push(("plan", plan.to_string()));
    }
    if let Some(models) = &record.models {
        fields.push(("models", json_list(&models[..])));
    }
    if let Some(ips) = &record.ip_allowlist {
        // `10.0.0.0/8, 2001:db8::/32`: what `IpSet`'s `FromStr` parses back.
        fields.push(("ips", ips.to_string()));
    }
    fields
        .into_iter()
        .flat_map(|(field, value)| [field.to_owned(), value])
        .collect()
}

fn corrupt(what: &str) -> BackendError {
    BackendError::new(format!("redis key store: corrupt {what}"))
}

fn decode_key(fields: &HashMap<String, String>) -> Result<KeyRecord, BackendError> {
    let get = |name: &str| fields.get(name).map(String::as_str);
    let id = get("id").ok_or_else(|| corrupt("key id"))?;
    let account = get("account").ok_or_else(|| corrupt("key account"))?;
    let mut record = KeyRecord::new(id, account);
    record.status = parse_key_status(get("status"));
    if let Some(ms) = get("expires").and_then(|s| s.parse().ok()) {
        record.expires_at = Some(UNIX_EPOCH + Duration::from_millis(ms));
    }
    record.plan = get("plan").filter(|p| !p.is_empty()).map(Arc::from);
    if let Some(models) = get("models") {
        let models = parse_list(models.as_bytes()).ok_or_else(|| corrupt("key models"))?;
        record.models = Some(models.into());
    }
    if let Some(scopes) = get("scopes") {
        record.scopes = parse_list(scopes.as_bytes()).ok_or_else(|| corrupt("key scopes"))?;
    }
    if let Some(ips) = get("ips") {
        record.ip_allowlist = Some(ips.parse::<IpSet>().map_err(|_| corrupt("key allowlist"))?);
    }
    if let Some(meta) = get("meta") {
        record.metadata = parse_map(meta).ok_or_else(|| corrupt("key metadata"))?;
    }
    Ok(record)
}

fn decode_account(id: Arc<str>, fields: &HashMap<String, String>) -> AccountRecord {
    let plan = fields.get("plan").map_or("default", String::as_str);
    let status = parse_account_status(
        fields.get("status").map_or("active", String::as_str),
        || fields.get("reason").map_or("", String::as_str).into(),
    );
    AccountRecord::new(id, plan).status(status)
}

fn pairs(value: &Value) -> HashMap<String, String> {
    let Value::Array(items) = value else {
        return HashMap::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    items
        .chunks_exact(2)
        .map(|pair| (text(&pair[0]), text(&pair[1])))
        .collect()
}

fn decode_lookup(reply: &[Value]) -> Result<Option<KeyLookup>, BackendError> {
    let [key, account, models] = reply else {
        return Ok(None);
    };
    let key = decode_key(&pairs(key))?;
    let account = pairs(account);
    if account.is_empty() {
        // A key whose account is gone authenticates no one.
        return Ok(None);
    }
    let account = decode_account(key.account_id.clone(), &account);
    let models: Option<Vec<String>> = match models {
        Value::BulkString(bytes) => Some(parse_list(bytes).ok_or_else(|| corrupt("plan models"))?),
        _ => None,
    };
    Ok(Some(KeyLookup::from_records(
        &key,
        &account,
        models.as_deref(),
    )))
}
