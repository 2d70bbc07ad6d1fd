use std::{fmt, sync::Arc};

use tower_layer::Layer;

use super::{
    gate::Gate,
    plan::{Plan, Plans, Policy},
    MemoryLimiter, RateLimit,
};
use crate::inspect::DEFAULT_BODY_LIMIT;

/// What a [`Caller`](crate::Caller)'s buckets are keyed by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyBy {
    /// Each API key has its own buckets.
    Key,
    /// All keys of an account share the account's buckets (the default).
    #[default]
    Account,
}

/// Applies [`RateLimit`] to a service. See the [module docs](super).
///
/// ```
/// use tollgate::ratelimit::{KeyBy, Plan, Plans, RateLimitLayer};
///
/// let layer = RateLimitLayer::memory(Plans::new(Plan::new().requests_per_minute(10)))
///     .key_by(KeyBy::Key)
///     .global(Plan::new().requests_per_second(1_000))
///     .route_exact("/health", Plan::unlimited())
///     .route_prefix("/v1/images", Plan::new().requests_per_minute(5));
/// # let _ = layer;
/// ```
#[must_use]
pub struct RateLimitLayer<L> {
    limiter: L,
    gate: Gate,
}

#[derive(Clone, Debug)]
pub(super) enum RouteMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl RouteMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            RouteMatch::Exact(p) => path == &**p,
            RouteMatch::Prefix(p) => {
                path.starts_with(&**p)
                    && (p.ends_with('/')
                        || path.len() == p.len()
                        || path.as_bytes()[p.len()] == b'/')
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) plans: Plans,
    pub(super) key_by: KeyBy,
    pub(super) global: Option<Arc<Policy>>,
    pub(super) routes: Vec<(RouteMatch, Arc<Policy>)>,
    pub(super) headers: bool,
    pub(super) default_max_tokens: u64,
    pub(super) body_limit: usize,
}

impl Config {
    /// The route override for `path`, if any.
    pub(super) fn route(&self, path: &str) -> Option<&Arc<Policy>> {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(path))
            .map(|(_, p)| p)
    }
}

impl RateLimitLayer<MemoryLimiter> {
    /// A layer on a new in-memory limiter (monotonic clock).
    pub fn memory(plans: Plans) -> Self {
        RateLimitLayer::new(MemoryLimiter::new(), plans)
    }
}

impl<L> RateLimitLayer<L> {
    /// A layer on `limiter` with the plans of `plans`.
    pub fn new(limiter: L, plans: Plans) -> Self {
        RateLimitLayer {
            limiter,
            gate: Gate::new(Config {
                plans,
                key_by: KeyBy::default(),
                global: None,
                routes: Vec::new(),
                headers: true,
                default_max_tokens: 0,
                body_limit: DEFAULT_BODY_LIMIT,
            }),
        }
    }

    fn config(&mut self) -> &mut Config {
        self.gate.config_mut()
    }

    /// Key a caller's buckets by API key or by account (default: account).
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.config().key_by = key_by;
        self
    }

    /// A limit on all callers together, checked all-or-nothing with each caller's own limits
    /// (not on routes overridden with [`Plan::unlimited`]).
    pub fn global(mut self, plan: Plan) -> Self {
        self.config().global = (!plan.is_unlimited()).then(|| Policy::new("global".into(), plan));
        self
    }

    /// On exactly `path`, every caller gets `plan` (own buckets, per caller) instead of its
    /// plan. `Plan::unlimited()` exempts the route. The first matching override wins.
    pub fn route_exact(mut self, path: &str, plan: Plan) -> Self {
        let policy = Policy::new(format!("route:{path}"), plan);
        self.config()
            .routes
            .push((RouteMatch::Exact(path.into()), policy));
        self
    }

    /// Like [`route_exact`](Self::route_exact), for `prefix` and every path under it
    /// (`/v1/images` matches `/v1/images` and `/v1/images/edits`, not `/v1/imagesx`).
    pub fn route_prefix(mut self, prefix: &str, plan: Plan) -> Self {
        let policy = Policy::new(format!("route:{prefix}*"), plan);
        self.config()
            .routes
            .push((RouteMatch::Prefix(prefix.into()), policy));
        self
    }

    /// Send the rate-limit headers (default: on).
    pub fn headers(mut self, enabled: bool) -> Self {
        self.config().headers = enabled;
        self
    }

    /// The completion tokens assumed for a request without `max_tokens` (default 0: the
    /// estimate is then the prompt alone, and the reported usage settles the rest).
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.config().default_max_tokens = tokens;
        self
    }

    /// The largest request body read to estimate tokens (default 1 MiB; larger is a 413).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config().body_limit = bytes;
        self
    }

    /// The plan registry (to change plans at runtime).
    pub fn plans(&self) -> &Plans {
        self.gate.plans()
    }

    /// The limiter.
    pub fn limiter(&self) -> &L {
        &self.limiter
    }

    /// The limiter and the request-side gate, for a layer that charges the limits itself
    /// ([`CreditsLayer::rate_limit`](crate::credits::CreditsLayer::rate_limit)).
    pub(crate) fn into_parts(self) -> (L, Gate) {
        (self.limiter, self.gate)
    }
}

impl<S, L: Clone> Layer<S> for RateLimitLayer<L> {
    type Service = RateLimit<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limiter.clone(), self.gate.clone())
    }
}

impl<L: Clone> Clone for RateLimitLayer<L> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<L: fmt::Debug> fmt::Debug for RateLimitLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("plans", self.gate.plans())
            .field("key_by", &self.gate.config().key_by)
            .field("headers", &self.gate.sends_headers())
            .finish_non_exhaustive()
    }
}
