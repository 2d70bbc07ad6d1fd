//! Plans (tiers): named sets of limits, changeable at runtime.

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    sync::{Arc, RwLock},
};

use governor::Quota;

use crate::LimitKind;

/// One limit of a plan: what it counts and its GCRA quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Requests or tokens.
    pub kind: LimitKind,
    /// The quota: one cell per `replenish_interval`, at most `burst_size` at once.
    pub quota: Quota,
}

/// A plan (tier): the limits a caller on it gets. All of them are checked all-or-nothing.
///
/// Several limits of one kind are allowed (for example 10 per second and 100 per minute).
///
/// # Example
///
/// ```
/// use std::num::NonZeroU32;
/// use governor::Quota;
/// use tollgate::ratelimit::Plan;
///
/// // 001's Trusted Tier: 100 requests per minute, plus 40k tokens per minute.
/// let trusted = Plan::new().requests_per_minute(100).tokens_per_minute(40_000);
/// assert_eq!(trusted.limits().len(), 2);
///
/// // 10 per second on average, at most 20 at once.
/// let bursty = Plan::new().requests(Quota::per_second(NonZeroU32::new(10).unwrap()).allow_burst(NonZeroU32::new(20).unwrap()));
/// assert_eq!(bursty.limits()[0].quota.burst_size().get(), 20);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Plan {
    limits: Vec<Limit>,
}

fn nonzero(n: u32, what: &str) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or_else(|| panic!("a plan's {what} must be at least 1"))
}

impl Plan {
    /// A plan with no limit yet.
    pub fn new() -> Self {
        Plan { limits: Vec::new() }
    }

    /// A plan that limits nothing (for exempt routes).
    pub fn unlimited() -> Self {
        Plan::new()
    }

    /// Add a limit.
    ///
    /// # Panics
    ///
    /// Beyond 255 limits.
    pub fn limit(mut self, kind: LimitKind, quota: Quota) -> Self {
        assert!(self.limits.len() < 255, "a plan has at most 255 limits");
        self.limits.push(Limit { kind, quota });
        self
    }

    /// Add a requests limit.
    pub fn requests(self, quota: Quota) -> Self {
        self.limit(LimitKind::Requests, quota)
    }

    /// Add a tokens limit (cost: the request's estimated tokens, corrected from `usage`).
    pub fn tokens(self, quota: Quota) -> Self {
        self.limit(LimitKind::Tokens, quota)
    }

    /// Add `n` requests per second, all of them at once at most.
    ///
    /// # Panics
    ///
    /// When `n` is 0.
    pub fn requests_per_second(self, n: u32) -> Self {
        self.requests(Quota::per_second(nonzero(n, "requests per second")))
    }

    /// Add `n` requests per minute, all of them at once at most.
    ///
    /// # Panics
    ///
    /// When `n` is 0.
    pub fn requests_per_minute(self, n: u32) -> Self {
        self.requests(Quota::per_minute(nonzero(n, "requests per minute")))
    }

    /// Add `n` tokens per minute, all of them at once at most.
    ///
    /// # Panics
    ///
    /// When `n` is 0.
    pub fn tokens_per_minute(self, n: u32) -> Self {
        self.tokens(Quota::per_minute(nonzero(n, "tokens per minute")))
    }

    /// The limits.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Whether the plan limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.limits.is_empty()
    }

    pub(crate) fn has_tokens(&self) -> bool {
        self.limits.iter().any(|l| l.kind == LimitKind::Tokens)
    }
}

/// A plan as used by the layer: its limits and the name its buckets are stored under.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) id: Arc<str>,
    pub(crate) plan: Plan,
}

impl Policy {
    pub(crate) fn new(id: String, plan: Plan) -> Arc<Policy> {
        Arc::new(Policy {
            id: Arc::from(id),
            plan,
        })
    }
}

/// The plan registry: plan name → [`Plan`], shared and changeable at runtime.
///
/// Clones share the registry. A [`Caller`](crate::Caller) on plan `p` gets `Plans::get(p)` on
/// every request, so [`set_plan`](Plans::set_plan) (a plan's limits change) and a caller moved
/// to another plan (its `Caller::plan()` changes) both apply from the next request. Callers on a
/// plan the registry does not know get the default plan; requests without a `Caller` get the
/// plan named `"anonymous"` if there is one, else the default plan.
///
/// Buckets are stored per plan name (`plan:{name}`): a caller moved to another plan starts with
/// a full bucket of the new plan, while a plan whose limits change keeps its buckets' state
/// (the time they owe carries over to the new quota).
///
/// # Example
///
/// ```
/// use tollgate::ratelimit::{Plan, Plans};
///
/// let plans = Plans::new(Plan::new().requests_per_minute(10))
///     .with_plan("trusted", Plan::new().requests_per_minute(100));
/// assert_eq!(plans.get("trusted").limits()[0].quota.burst_size().get(), 100);
/// assert_eq!(plans.get("unknown").limits()[0].quota.burst_size().get(), 10);
///
/// let shared = plans.clone();
/// shared.set_plan("trusted", Plan::new().requests_per_minute(200));
/// assert_eq!(plans.get("trusted").limits()[0].quota.burst_size().get(), 200);
/// ```
#[derive(Clone)]
pub struct Plans {
    inner: Arc<RwLock<Registry>>,
}

struct Registry {
    default: Arc<Policy>,
    /// foldhash: the plan of every request is looked up here.
    plans: HashMap<Arc<str>, Arc<Policy>, foldhash::fast::RandomState>,
}

impl Plans {
    /// A registry whose unknown plans get `default` (stored as plan `default`).
    pub fn new(default: Plan) -> Self {
        Plans {
            inner: Arc::new(RwLock::new(Registry {
                default: Policy::new("plan:default".into(), default),
                plans: HashMap::default(),
            })),
        }
    }

    /// Add or replace a plan (builder form of [`set_plan`](Plans::set_plan)).
    #[must_use]
    pub fn with_plan(self, name: &str, plan: Plan) -> Self {
        self.set_plan(name, plan);
        self
    }

    /// Add or replace a plan; callers on it get it from their next request.
    pub fn set_plan(&self, name: &str, plan: Plan) {
        let policy = Policy::new(format!("plan:{name}"), plan);
        let mut registry = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if name == "default" {
            registry.default = policy;
        } else {
            registry.plans.insert(Arc::from(name), policy);
        }
    }

    /// Remove a plan; its callers get the default plan from their next request.
    pub fn remove_plan(&self, name: &str) -> Option<Plan> {
        let mut registry = self.inner.write().unwrap_or_else(|e| e.into_inner());
        registry.plans.remove(name).map(|p| p.plan.clone())
    }

    /// The plan a caller on `name` gets.
    pub fn get(&self, name: &str) -> Plan {
        self.policy(name).plan.clone()
    }

    /// The names of the registered plans (not `default`), sorted.
    pub fn names(&self) -> Vec<String> {
        let registry = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = registry.plans.keys().map(|k| k.to_string()).collect();
        names.sort_unstable();
        names
    }

    pub(crate) fn policy(&self, name: &str) -> Arc<Policy> {
        let registry = self.inner.read().unwrap_or_else(|e| e.into_inner());
        registry
            .plans
            .get(name)
            .unwrap_or(&registry.default)
            .clone()
    }
}

impl fmt::Debug for Plans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Plans")
            .field("default", &registry.default.plan)
            .field("plans", &registry.plans.len())
            .finish()
    }
}
