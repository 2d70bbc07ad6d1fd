use std::{collections::BTreeMap, fmt, sync::Arc};

use crate::ip::IpSet;

/// Who is calling: the identity the authentication layer puts into the request's extensions.
///
/// Everything after authentication reads the `Caller`; nothing after it sees key text. Cloning
/// is a reference-count increment.
///
/// # Example
///
/// ```
/// use tollgate::Caller;
///
/// let caller = Caller::builder("key_1", "acct_1")
///     .plan("free")
///     .models(["small-model"])
///     .build();
/// assert_eq!(caller.account_id(), "acct_1");
/// assert!(caller.may_use_model("small-model"));
/// assert!(!caller.may_use_model("large-model"));
/// ```
#[derive(Clone)]
pub struct Caller {
    inner: Arc<Inner>,
}

struct Inner {
    key_id: Arc<str>,
    account_id: Arc<str>,
    plan: Arc<str>,
    models: Option<Arc<[String]>>,
    scopes: Arc<[String]>,
    ip_allowlist: Option<IpSet>,
    metadata: Arc<BTreeMap<String, String>>,
}

impl Caller {
    /// Start building a caller for a key of an account.
    pub fn builder(key_id: impl Into<Arc<str>>, account_id: impl Into<Arc<str>>) -> CallerBuilder {
        CallerBuilder {
            inner: Inner {
                key_id: key_id.into(),
                account_id: account_id.into(),
                plan: Arc::from("default"),
                models: None,
                scopes: Arc::from(Vec::new()),
                ip_allowlist: None,
                metadata: Arc::default(),
            },
        }
    }

    /// The key's id (never the key itself).
    pub fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    /// The key's id, shared.
    pub fn key_id_arc(&self) -> &Arc<str> {
        &self.inner.key_id
    }

    /// The account the key belongs to.
    pub fn account_id(&self) -> &str {
        &self.inner.account_id
    }

    /// The account id, shared.
    pub fn account_id_arc(&self) -> &Arc<str> {
        &self.inner.account_id
    }

    /// The plan (tier) in force: the key's override, else the account's plan.
    pub fn plan(&self) -> &str {
        &self.inner.plan
    }

    /// The plan, shared.
    pub fn plan_arc(&self) -> &Arc<str> {
        &self.inner.plan
    }

    /// The models the caller may use; `None` means all.
    pub fn models(&self) -> Option<&[String]> {
        self.inner.models.as_deref()
    }

    /// Whether the caller may use `model`.
    pub fn may_use_model(&self, model: &str) -> bool {
        self.inner
            .models
            .as_deref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    /// The key's scopes.
    pub fn scopes(&self) -> &[String] {
        &self.inner.scopes
    }

    /// Whether the key has `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.inner.scopes.iter().any(|s| s == scope)
    }

    /// The key's IP allowlist, if it has one.
    pub fn ip_allowlist(&self) -> Option<&IpSet> {
        self.inner.ip_allowlist.as_ref()
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.inner.metadata
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("key_id", &self.inner.key_id)
            .field("account_id", &self.inner.account_id)
            .field("plan", &self.inner.plan)
            .field("models", &self.inner.models)
            .field("scopes", &self.inner.scopes)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Caller`]; see [`Caller::builder`].
///
/// ```
/// use tollgate::Caller;
///
/// let caller = Caller::builder("key_1", "acct_1").plan("pro").scopes(["chat"]).build();
/// assert_eq!(caller.plan(), "pro");
/// assert!(caller.has_scope("chat"));
/// ```
#[must_use]
pub struct CallerBuilder {
    inner: Inner,
}

impl fmt::Debug for CallerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerBuilder")
            .field("key_id", &self.inner.key_id)
            .field("account_id", &self.inner.account_id)
            .finish_non_exhaustive()
    }
}

impl CallerBuilder {
    /// The plan (tier) in force.
    pub fn plan(mut self, plan: impl Into<Arc<str>>) -> Self {
        self.inner.plan = plan.into();
        self
    }

    /// The models the caller may use (all when never called).
    pub fn models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.inner.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// The models the caller may use, `None` for all.
    pub fn models_opt(mut self, models: Option<Arc<[String]>>) -> Self {
        self.inner.models = models;
        self
    }

    /// The key's scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.inner.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// The key's IP allowlist.
    pub fn ip_allowlist(mut self, allowlist: Option<IpSet>) -> Self {
        self.inner.ip_allowlist = allowlist;
        self
    }

    /// The key's metadata.
    pub fn metadata(mut self, metadata: BTreeMap<String, String>) -> Self {
        self.inner.metadata = Arc::new(metadata);
        self
    }

    /// The caller.
    pub fn build(self) -> Caller {
        Caller {
            inner: Arc::new(self.inner),
        }
    }
}
