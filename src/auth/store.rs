use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::{ready, Future, Ready},
    hash::BuildHasherDefault,
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

use http::StatusCode;

use crate::{
    ip::IpSet,
    keys::{self, ApiKey, KeyDigest},
    BackendError, Caller, Reason, Rejection,
};

/// Whether a key may be used.
///
/// ```
/// use tollgate::auth::{KeyRecord, KeyStatus};
///
/// let record = KeyRecord::new("key_1", "acct_1").status(KeyStatus::Disabled);
/// assert_eq!(record.status, KeyStatus::Disabled);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyStatus {
    /// The key authenticates.
    Active,
    /// An operator disabled the key; it may be enabled again.
    Disabled,
    /// An operator revoked the key, for good.
    Revoked,
}

/// Whether an account's keys may be used.
///
/// ```
/// use tollgate::auth::{AccountRecord, AccountStatus};
///
/// let account = AccountRecord::new("acct_1", "free").status(AccountStatus::Blocked("chargeback".into()));
/// assert_eq!(account.status, AccountStatus::Blocked("chargeback".into()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccountStatus {
    /// The account's keys authenticate.
    Active,
    /// The account is frozen (403 `account_frozen`).
    Frozen,
    /// The account is blocked for the reason given (403 `account_blocked`, naming it).
    Blocked(Arc<str>),
}

/// An API key's record, as an operator manages it. The key itself is never part of it.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tollgate::auth::KeyRecord;
///
/// let record = KeyRecord::new("key_1", "acct_1")
///     .models(["small-model"])
///     .ip_allowlist("10.0.0.0/8".parse().unwrap())
///     .expires_at(SystemTime::now() + Duration::from_secs(86_400))
///     .metadata("team", "search");
/// assert_eq!(&*record.id, "key_1");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KeyRecord {
    /// The key's id (not the key).
    pub id: Arc<str>,
    /// The account it belongs to.
    pub account_id: Arc<str>,
    /// Active, disabled or revoked.
    pub status: KeyStatus,
    /// When it stops working.
    pub expires_at: Option<SystemTime>,
    /// A plan that overrides the account's.
    pub plan: Option<Arc<str>>,
    /// The models this key may use (further restricting its plan's); `None` for all.
    pub models: Option<Arc<[String]>>,
    /// Free-form scopes.
    pub scopes: Vec<String>,
    /// The client IPs the key may be used from; `None` for any. An empty set admits no address;
    /// the admin API and the gateway configuration refuse an empty list, so that `[]` never
    /// means "no IP" on a key and "every IP" on the global list.
    pub ip_allowlist: Option<IpSet>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

impl KeyRecord {
    /// An active key of an account, with no restriction.
    pub fn new(id: impl Into<Arc<str>>, account_id: impl Into<Arc<str>>) -> Self {
        KeyRecord {
            id: id.into(),
            account_id: account_id.into(),
            status: KeyStatus::Active,
            expires_at: None,
            plan: None,
            models: None,
            scopes: Vec::new(),
            ip_allowlist: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Set the status.
    #[must_use]
    pub fn status(mut self, status: KeyStatus) -> Self {
        self.status = status;
        self
    }

    /// Set the expiry time.
    #[must_use]
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Override the account's plan for this key.
    #[must_use]
    pub fn plan(mut self, plan: impl Into<Arc<str>>) -> Self {
        self.plan = Some(plan.into());
        self
    }

    /// Restrict the models this key may use.
    #[must_use]
    pub fn models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Set the scopes.
    #[must_use]
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Restrict the client IPs the key may be used from.
    #[must_use]
    pub fn ip_allowlist(mut self, allowlist: IpSet) -> Self {
        self.ip_allowlist = Some(allowlist);
        self
    }

    /// Add a metadata entry.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// An account's record: its plan and whether it is frozen or blocked.
///
/// # Example
///
/// ```
/// use tollgate::auth::{AccountRecord, AccountStatus};
///
/// let account = AccountRecord::new("acct_1", "pro");
/// assert_eq!(account.status, AccountStatus::Active);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountRecord {
    /// The account's id.
    pub id: Arc<str>,
    /// Its plan (tier).
    pub plan: Arc<str>,
    /// Active, frozen or blocked.
    pub status: AccountStatus,
}

impl AccountRecord {
    /// An active account on a plan.
    pub fn new(id: impl Into<Arc<str>>, plan: impl Into<Arc<str>>) -> Self {
        AccountRecord {
            id: id.into(),
            plan: plan.into(),
            status: AccountStatus::Active,
        }
    }

    /// Set the status.
    #[must_use]
    pub fn status(mut self, status: AccountStatus) -> Self {
        self.status = status;
        self
    }
}

/// What a [`KeyStore`] knows about a key: the [`Caller`] it stands for and what may refuse it.
///
/// The authentication layer decides: an inactive key, an expired key or an inactive account is
/// refused, otherwise the `Caller` goes into the request.
///
/// # Example
///
/// ```
/// use tollgate::{auth::{AccountRecord, KeyLookup, KeyRecord}, Caller};
///
/// let lookup = KeyLookup::from_records(
///     &KeyRecord::new("key_1", "acct_1"),
///     &AccountRecord::new("acct_1", "free"),
///     Some(&["small-model".to_owned()][..]),
/// );
/// assert_eq!(lookup.caller.plan(), "free");
/// assert!(!lookup.caller.may_use_model("large-model"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KeyLookup {
    /// Who the key authenticates.
    pub caller: Caller,
    /// The key's status.
    pub status: KeyStatus,
    /// When the key expires.
    pub expires_at: Option<SystemTime>,
    /// The account's status.
    pub account: AccountStatus,
}

impl KeyLookup {
    /// An active, non-expiring key of an active account.
    pub fn new(caller: Caller) -> Self {
        KeyLookup {
            caller,
            status: KeyStatus::Active,
            expires_at: None,
            account: AccountStatus::Active,
        }
    }

    /// Set the key's status.
    #[must_use]
    pub fn with_status(mut self, status: KeyStatus) -> Self {
        self.status = status;
        self
    }

    /// Set the key's expiry.
    #[must_use]
    pub fn with_expiry(mut self, expires_at: Option<SystemTime>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// Set the account's status.
    #[must_use]
    pub fn with_account_status(mut self, account: AccountStatus) -> Self {
        self.account = account;
        self
    }

    /// Build the lookup of a key from its records and the models its plan may use (`None`: all).
    ///
    /// The plan is the key's override, else the account's; the models the caller may use are
    /// those both the plan and the key allow.
    pub fn from_records(
        key: &KeyRecord,
        account: &AccountRecord,
        plan_models: Option<&[String]>,
    ) -> Self {
        let plan = key.plan.clone().unwrap_or_else(|| account.plan.clone());
        let models: Option<Arc<[String]>> = match (plan_models, key.models.as_deref()) {
            (None, None) => None,
            (Some(p), None) => Some(p.into()),
            (None, Some(_)) => key.models.clone(),
            (Some(p), Some(k)) => Some(k.iter().filter(|m| p.contains(m)).cloned().collect()),
        };
        let caller = Caller::builder(key.id.clone(), key.account_id.clone())
            .plan(plan)
            .models_opt(models)
            .scopes(key.scopes.iter().cloned())
            .ip_allowlist(key.ip_allowlist.clone())
            .metadata(key.metadata.clone())
            .build();
        KeyLookup {
            caller,
            status: key.status,
            expires_at: key.expires_at,
            account: account.status.clone(),
        }
    }
}

/// Where the authentication layer looks keys up, by digest.
///
/// The future is an associated type so the in-memory store answers with
/// [`std::future::Ready`] (no allocation on the hot path) while a remote store may box.
///
/// # Example
///
/// A store of one fixed key:
///
/// ```
/// use std::future::{ready, Ready};
/// use tollgate::{auth::{KeyLookup, KeyStore}, keys::{self, KeyDigest}, BackendError, Caller};
///
/// struct OneKey(KeyDigest);
///
/// impl KeyStore for OneKey {
///     type Future = Ready<Result<Option<KeyLookup>, BackendError>>;
///
///     fn lookup(&self, digest: &KeyDigest) -> Self::Future {
///         ready(Ok((*digest == self.0).then(|| KeyLookup::new(Caller::builder("k", "a").build()))))
///     }
/// }
///
/// let store = OneKey(keys::digest("sk-test-1"));
/// # let _ = store.lookup(&keys::digest("x"));
/// ```
pub trait KeyStore: Send + Sync + 'static {
    /// The answer of [`lookup`](Self::lookup).
    type Future: Future<Output = Result<Option<KeyLookup>, BackendError>> + Send + 'static;

    /// Find the key with this digest. `Ok(None)` when no key has it.
    fn lookup(&self, digest: &KeyDigest) -> Self::Future;

    /// The answer of [`lookup`](Self::lookup) at once, for a store that has it without waiting
    /// (the in-memory one); `None` (the default) when it must be awaited.
    ///
    /// When it answers, the authentication layer calls the inner service directly instead of
    /// keeping it in its response future: no clone of the inner service, a smaller future.
    /// The answer must be the one [`lookup`](Self::lookup) would give.
    #[inline]
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<KeyLookup>, BackendError>> {
        let _ = digest;
        None
    }
}

impl<T: KeyStore> KeyStore for Arc<T> {
    type Future = T::Future;

    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        (**self).lookup(digest)
    }

    #[inline]
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<KeyLookup>, BackendError>> {
        (**self).lookup_now(digest)
    }
}

/// Why an operator's change to keys, accounts or plans failed.
///
/// Each converts to the [`Rejection`] an admin API answers with:
///
/// ```
/// use tollgate::auth::{KeyAdmin, KeyAdminError, MemoryKeyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let error = MemoryKeyStore::new().revoke_key("key_9").await.unwrap_err();
/// assert!(matches!(error, KeyAdminError::UnknownKey(_)));
/// let rejection: tollgate::Rejection = error.into();
/// assert_eq!(rejection.status(), 404);
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum KeyAdminError {
    /// No key has this id.
    UnknownKey(Arc<str>),
    /// No account has this id.
    UnknownAccount(Arc<str>),
    /// A key with this id, or with the same digest, exists already.
    DuplicateKey(Arc<str>),
    /// The key is revoked, and revocation is final: it cannot be disabled or enabled again.
    Revoked(Arc<str>),
    /// The store failed.
    Backend(BackendError),
}

impl fmt::Display for KeyAdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAdminError::UnknownKey(id) => write!(f, "no key has the id `{id}`"),
            KeyAdminError::UnknownAccount(id) => write!(f, "no account has the id `{id}`"),
            KeyAdminError::DuplicateKey(id) => write!(f, "the key `{id}` exists already"),
            KeyAdminError::Revoked(id) => {
                write!(f, "the key `{id}` is revoked, and revocation is final")
            }
            KeyAdminError::Backend(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for KeyAdminError {}

impl From<BackendError> for KeyAdminError {
    fn from(error: BackendError) -> Self {
        KeyAdminError::Backend(error)
    }
}

impl From<KeyAdminError> for Rejection {
    /// 404 for an unknown key or account, 409 for a duplicate or a revoked key, 503 for a backend
    /// failure.
    fn from(error: KeyAdminError) -> Self {
        match error {
            KeyAdminError::UnknownKey(_) | KeyAdminError::UnknownAccount(_) => {
                Rejection::new(Reason::NotFound)
                    .with_message(error.to_string())
                    .with_status(StatusCode::NOT_FOUND)
            }
            KeyAdminError::DuplicateKey(_) | KeyAdminError::Revoked(_) => {
                Rejection::new(Reason::Conflict).with_message(error.to_string())
            }
            KeyAdminError::Backend(e) => e.into(),
        }
    }
}

/// The operator's side of a key store: accounts, plans and keys, changed at runtime.
///
/// Every change applies to the very next lookup. An admin router calls these; the in-memory
/// store answers at once and a remote store asynchronously.
///
/// # Example
///
/// ```
/// use tollgate::auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStatus, MemoryKeyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tollgate::auth::KeyAdminError> {
/// let store = MemoryKeyStore::new();
/// store.put_account(AccountRecord::new("acct_1", "free")).await?;
/// store.set_plan_models("free", Some(vec!["small-model".into()])).await?;
/// let key = store.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await?;
/// // Give `key.as_str()` to the customer, once.
/// store.set_account_plan("acct_1", "pro").await?;
/// store.revoke_key("key_1").await?;
/// assert_eq!(store.key("key_1").await?.unwrap().status, KeyStatus::Revoked);
/// # let _ = key;
/// # Ok(())
/// # }
/// ```
pub trait KeyAdmin: Send + Sync + 'static {
    /// Create or replace an account.
    fn put_account(
        &self,
        account: AccountRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// An account's record.
    fn account(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<AccountRecord>, KeyAdminError>> + Send;

    /// Move an account to another plan.
    fn set_account_plan(
        &self,
        id: &str,
        plan: &str,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Freeze, block or reactivate an account.
    fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Freeze an account: its keys are refused with 403 `account_frozen`.
    fn freeze_account(&self, id: &str) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.set_account_status(id, AccountStatus::Frozen)
    }

    /// Reactivate a frozen or blocked account.
    fn unfreeze_account(&self, id: &str) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.set_account_status(id, AccountStatus::Active)
    }

    /// The models a plan may use; `None` for all.
    fn set_plan_models(
        &self,
        plan: &str,
        models: Option<Vec<String>>,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Add a key, known by its digest. Its account must exist.
    fn insert_key(
        &self,
        digest: KeyDigest,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Generate a key with `prefix` (see [`keys::generate`]), add it, and return it: the only
    /// time its text is seen.
    fn create_key(
        &self,
        prefix: &str,
        record: KeyRecord,
    ) -> impl Future<Output = Result<ApiKey, KeyAdminError>> + Send {
        let key = keys::generate(prefix);
        let insert = self.insert_key(key.digest(), record);
        async move {
            insert.await?;
            Ok(key)
        }
    }

    /// A key's record.
    fn key(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<KeyRecord>, KeyAdminError>> + Send;

    /// Replace a key's record (plan override, models, allowlist, expiry, ...), keeping its digest.
    ///
    /// A revoked key stays revoked: a record with another status fails with
    /// [`KeyAdminError::Revoked`] and changes nothing.
    fn update_key(
        &self,
        record: KeyRecord,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Enable, disable or revoke a key.
    ///
    /// Revocation is final: moving a revoked key to any other status fails with
    /// [`KeyAdminError::Revoked`] and changes nothing (revoking it again succeeds).
    fn set_key_status(
        &self,
        id: &str,
        status: KeyStatus,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;

    /// Revoke a key, for good.
    fn revoke_key(&self, id: &str) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.set_key_status(id, KeyStatus::Revoked)
    }

    /// Disable a key.
    fn disable_key(&self, id: &str) -> impl Future<Output = Result<(), KeyAdminError>> + Send {
        self.set_key_status(id, KeyStatus::Disabled)
    }

    /// Give a key a new digest (a new secret); the old one stops working at once.
    fn rotate_key(
        &self,
        id: &str,
        new_digest: KeyDigest,
    ) -> impl Future<Output = Result<(), KeyAdminError>> + Send;
}

/// An in-memory [`KeyStore`] and [`KeyAdmin`]: keys by digest, accounts and plans.
///
/// It keeps a ready-built [`Caller`] per key, rebuilt whenever the key, its account or its plan
/// changes, so authenticating is one hash-map lookup (digests compare in constant time) and a
/// reference-count increment. Cloning shares the store.
///
/// # Example
///
/// ```
/// use tollgate::{auth::{AccountRecord, KeyRecord, KeyStore, MemoryKeyStore}, keys};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryKeyStore::new()
///     .with_account(AccountRecord::new("acct_1", "free"))
///     .with_key(keys::digest("sk-test-1"), KeyRecord::new("key_1", "acct_1"));
/// let found = store.lookup(&keys::digest("sk-test-1")).await.unwrap().unwrap();
/// assert_eq!(found.caller.key_id(), "key_1");
/// assert!(store.lookup(&keys::digest("sk-test-2")).await.unwrap().is_none());
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryKeyStore {
    state: Arc<RwLock<State>>,
}

#[derive(Default)]
struct State {
    lookups: HashMap<KeyDigest, KeyLookup, BuildHasherDefault<DigestHasher>>,
    keys: HashMap<Arc<str>, (KeyDigest, KeyRecord)>,
    accounts: HashMap<Arc<str>, AccountRecord>,
    plans: HashMap<Arc<str>, Arc<[String]>>,
    /// The key ids of each account, so an account change rebuilds only its own keys.
    by_account: HashMap<Arc<str>, Vec<Arc<str>>>,
}

impl State {
    fn build(&self, record: &KeyRecord) -> Option<KeyLookup> {
        let account = self.accounts.get(&record.account_id)?;
        let plan = record.plan.as_ref().unwrap_or(&account.plan);
        Some(KeyLookup::from_records(
            record,
            account,
            self.plans.get(plan).map(|m| &m[..]),
        ))
    }

    /// Rebuild the callers of the keys `affected` selects.
    fn rebuild(&mut self, affected: impl Fn(&KeyRecord, &AccountRecord) -> bool) {
        let mut rebuilt = Vec::new();
        for (digest, record) in self.keys.values() {
            if let Some(account) = self.accounts.get(&record.account_id) {
                if affected(record, account) {
                    if let Some(lookup) = self.build(record) {
                        rebuilt.push((*digest, lookup));
                    }
                }
            }
        }
        self.lookups.extend(rebuilt);
    }

    fn put_account(&mut self, account: AccountRecord) {
        let id = account.id.clone();
        self.accounts.insert(id.clone(), account);
        let Some(ids) = self.by_account.get(&id) else {
            return;
        };
        let rebuilt: Vec<_> = ids
            .iter()
            .filter_map(|key_id| self.keys.get(key_id))
            .filter_map(|(digest, record)| Some((*digest, self.build(record)?)))
            .collect();
        self.lookups.extend(rebuilt);
    }

    fn index_key(&mut self, record: &KeyRecord, previous_account: Option<&Arc<str>>) {
        if previous_account == Some(&record.account_id) {
            return;
        }
        if let Some(previous) = previous_account {
            if let Some(ids) = self.by_account.get_mut(previous) {
                ids.retain(|id| *id != record.id);
            }
        }
        self.by_account
            .entry(record.account_id.clone())
            .or_default()
            .push(record.id.clone());
    }

    fn insert_key(&mut self, digest: KeyDigest, record: KeyRecord) -> Result<(), KeyAdminError> {
        if self.keys.contains_key(&record.id) || self.lookups.contains_key(&digest) {
            return Err(KeyAdminError::DuplicateKey(record.id));
        }
        let lookup = self
            .build(&record)
            .ok_or_else(|| KeyAdminError::UnknownAccount(record.account_id.clone()))?;
        self.lookups.insert(digest, lookup);
        self.index_key(&record, None);
        self.keys.insert(record.id.clone(), (digest, record));
        Ok(())
    }

    fn update_key(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut KeyRecord),
    ) -> Result<(), KeyAdminError> {
        let (digest, record) = self
            .keys
            .get(id)
            .ok_or_else(|| KeyAdminError::UnknownKey(id.into()))?;
        let (digest, mut record) = (*digest, record.clone());
        let previous_account = record.account_id.clone();
        let was_revoked = record.status == KeyStatus::Revoked;
        f(&mut record);
        if was_revoked && record.status != KeyStatus::Revoked {
            return Err(KeyAdminError::Revoked(record.id));
        }
        let lookup = self
            .build(&record)
            .ok_or_else(|| KeyAdminError::UnknownAccount(record.account_id.clone()))?;
        self.lookups.insert(digest, lookup);
        self.index_key(&record, Some(&previous_account));
        self.keys.insert(record.id.clone(), (digest, record));
        Ok(())
    }

    fn account_mut(&mut self, id: &str) -> Result<&mut AccountRecord, KeyAdminError> {
        self.accounts
            .get_mut(id)
            .ok_or_else(|| KeyAdminError::UnknownAccount(id.into()))
    }
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an account (builder style, for setup).
    #[must_use]
    pub fn with_account(self, account: AccountRecord) -> Self {
        self.write().put_account(account);
        self
    }

    /// Set the models a plan may use (builder style, for setup).
    #[must_use]
    pub fn with_plan_models<I, S>(self, plan: &str, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.apply_plan_models(plan, Some(models.into_iter().map(Into::into).collect()));
        self
    }

    /// Add a key (builder style, for setup).
    ///
    /// # Panics
    ///
    /// If its account was not added first, or the key or its digest exists already.
    #[must_use]
    pub fn with_key(self, digest: KeyDigest, record: KeyRecord) -> Self {
        if let Err(e) = self.write().insert_key(digest, record) {
            panic!("MemoryKeyStore::with_key: {e}");
        }
        self
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.read().keys.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply_plan_models(&self, plan: &str, models: Option<Vec<String>>) {
        let mut state = self.write();
        match models {
            Some(models) => state.plans.insert(plan.into(), models.into()),
            None => state.plans.remove(plan),
        };
        state.rebuild(|key, account| key.plan.as_ref().unwrap_or(&account.plan).as_ref() == plan);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("MemoryKeyStore")
            .field("keys", &state.keys.len())
            .field("accounts", &state.accounts.len())
            .field("plans", &state.plans.len())
            .finish()
    }
}

impl KeyStore for MemoryKeyStore {
    type Future = Ready<Result<Option<KeyLookup>, BackendError>>;

    #[inline]
    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        ready(Ok(self.read().lookups.get(digest).cloned()))
    }

    #[inline]
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<KeyLookup>, BackendError>> {
        Some(Ok(self.read().lookups.get(digest).cloned()))
    }
}

type Done<T> = Ready<Result<T, KeyAdminError>>;

// The in-memory store answers at once: its futures are `Ready`, so `.into_inner()` works too.
#[allow(refining_impl_trait)]
impl KeyAdmin for MemoryKeyStore {
    fn put_account(&self, account: AccountRecord) -> Done<()> {
        self.write().put_account(account);
        ready(Ok(()))
    }

    fn account(&self, id: &str) -> Done<Option<AccountRecord>> {
        ready(Ok(self.read().accounts.get(id).cloned()))
    }

    fn set_account_plan(&self, id: &str, plan: &str) -> Done<()> {
        let mut state = self.write();
        let changed = state.account_mut(id).map(|account| {
            account.plan = plan.into();
            account.clone()
        });
        ready(changed.map(|account| state.put_account(account)))
    }

    fn set_account_status(&self, id: &str, status: AccountStatus) -> Done<()> {
        let mut state = self.write();
        let changed = state.account_mut(id).map(|account| {
            account.status = status;
            account.clone()
        });
        ready(changed.map(|account| state.put_account(account)))
    }

    fn set_plan_models(&self, plan: &str, models: Option<Vec<String>>) -> Done<()> {
        self.apply_plan_models(plan, models);
        ready(Ok(()))
    }

    fn insert_key(&self, digest: KeyDigest, record: KeyRecord) -> Done<()> {
        ready(self.write().insert_key(digest, record))
    }

    fn key(&self, id: &str) -> Done<Option<KeyRecord>> {
        ready(Ok(self.read().keys.get(id).map(|(_, r)| r.clone())))
    }

    fn update_key(&self, record: KeyRecord) -> Done<()> {
        let id = record.id.clone();
        ready(self.write().update_key(&id, |r| *r = record))
    }

    fn set_key_status(&self, id: &str, status: KeyStatus) -> Done<()> {
        ready(self.write().update_key(id, |r| r.status = status))
    }

    fn rotate_key(&self, id: &str, new_digest: KeyDigest) -> Done<()> {
        let mut state = self.write();
        let Some((old, record)) = state.keys.get(id).cloned() else {
            return ready(Err(KeyAdminError::UnknownKey(id.into())));
        };
        if state.lookups.contains_key(&new_digest) {
            return ready(Err(KeyAdminError::DuplicateKey(record.id)));
        }
        let lookup = state.lookups.remove(&old);
        if let Some(lookup) = lookup {
            state.lookups.insert(new_digest, lookup);
        }
        state.keys.insert(record.id.clone(), (new_digest, record));
        ready(Ok(()))
    }
}

/// Hashes a [`KeyDigest`] by its first eight bytes: SHA-256 output is already uniform, and a
/// client cannot choose a digest (that would take a preimage), so no keyed hash is needed.
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Digests are written whole; anything else is folded in, so the hash stays correct.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
            if bytes.len() == 32 {
                break;
            }
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
