//! The request side of rate limiting, in one place: which limits a request is charged to, whether
//! its body must be read, its charges, the headers and the 429.
//!
//! [`RateLimit`](super::RateLimit) and [`CreditsLayer::rate_limit`](crate::credits::CreditsLayer::rate_limit)
//! both go through a [`Gate`]: a change to how requests are limited is made once, here.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use smallvec::SmallVec;

use super::{
    body::Meter,
    headers,
    layer::Config,
    plan::{Plans, Policy},
    BucketKey, Charge, Correction, Decision, KeyBy, Limiter, Outcome, Subject,
};
use crate::{
    inspect::LlmRequest, ip::ClientIp, usage::Usage, Caller, LimitKind, Reason, Rejection,
};

/// A rate-limit configuration (plans, key, global limit, routes, headers), without its limiter:
/// what a layer in front of a limiter asks before and after the call.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    config: Arc<Config>,
}

/// The limits one request is charged to: its subject's policy and the global one.
pub(crate) struct RequestLimits {
    subject: Subject,
    policy: Arc<Policy>,
    global: Option<Arc<Policy>>,
}

/// The charges of one request, and the tokens estimate they were made with.
#[derive(Clone, Debug)]
pub(crate) struct Charges {
    /// A plan's limits plus the global ones: two or fewer in most deployments, kept inline.
    charges: SmallVec<[Charge; 2]>,
    estimate: u64,
}

impl Gate {
    pub(super) fn new(config: Config) -> Self {
        Gate {
            config: Arc::new(config),
        }
    }

    /// The configuration, to change it while the layer is built.
    pub(super) fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The configuration.
    pub(super) fn config(&self) -> &Config {
        &self.config
    }

    /// The plan registry.
    pub(crate) fn plans(&self) -> &Plans {
        &self.config.plans
    }

    /// The largest request body read to estimate tokens.
    pub(crate) fn body_limit(&self) -> usize {
        self.config.body_limit
    }

    /// The limits of `request`, or `None` when it is not limited at all (an exempt route, or an
    /// unlimited plan without a global limit).
    pub(crate) fn limits<B>(&self, request: &Request<B>) -> Option<RequestLimits> {
        let config = &*self.config;
        let route = config.route(request.uri().path());
        if route.is_some_and(|p| p.plan.is_unlimited()) {
            return None;
        }
        let (subject, plan) = subject(request, config.key_by);
        let policy = match route {
            Some(policy) => Arc::clone(policy),
            None => config.plans.policy(plan.unwrap_or("anonymous")),
        };
        if policy.plan.is_unlimited() && config.global.is_none() {
            return None;
        }
        Some(RequestLimits {
            subject,
            policy,
            global: config.global.clone(),
        })
    }

    /// The charges of a request under `limits`: one cell per requests limit, the estimated
    /// tokens (read by [`inspect`](crate::inspect) into the request's extensions) per tokens
    /// limit.
    pub(crate) fn charges<B>(&self, limits: &RequestLimits, request: &Request<B>) -> Charges {
        let estimate = estimate(
            request.extensions().get::<LlmRequest>(),
            self.config.default_max_tokens,
        );
        Charges {
            charges: charges(
                &limits.subject,
                &limits.policy,
                limits.global.as_deref(),
                estimate,
            ),
            estimate,
        }
    }

    /// Add the rate-limit headers of `decision`, unless they are turned off.
    pub(crate) fn headers(&self, headers: &mut HeaderMap, decision: &Decision) {
        if self.config.headers {
            headers::insert(headers, decision);
        }
    }

    /// Whether responses carry the rate-limit headers.
    pub(crate) fn sends_headers(&self) -> bool {
        self.config.headers
    }

    /// The 429 of a refused `decision` (with its headers), in the request's wire format.
    pub(crate) fn refusal(&self, decision: &Decision, grpc: bool) -> Response<Bytes> {
        let mut response = crate::refusal(&rejection(decision.outcome()), grpc);
        self.headers(response.headers_mut(), decision);
        response
    }
}

impl RequestLimits {
    /// Whether a tokens limit applies: the request body is then read to estimate them.
    pub(crate) fn needs_body(&self) -> bool {
        self.policy.plan.has_tokens() || self.global.as_ref().is_some_and(|g| g.plan.has_tokens())
    }
}

impl Charges {
    /// Every charge.
    pub(crate) fn as_slice(&self) -> &[Charge] {
        &self.charges
    }

    /// Every charge, owned.
    pub(crate) fn into_vec(self) -> Vec<Charge> {
        self.charges.into_vec()
    }

    /// The tokens charges to correct from the reported usage, or `None` when no tokens limit
    /// was charged an estimate.
    pub(crate) fn tokens(&self) -> Option<Charges> {
        let charged = self
            .charges
            .iter()
            .any(|c| c.kind == LimitKind::Tokens && c.cost > 0);
        charged.then(|| Charges {
            charges: self
                .charges
                .iter()
                .filter(|c| c.kind == LimitKind::Tokens)
                .cloned()
                .collect(),
            estimate: self.estimate,
        })
    }

    /// The corrections of the tokens limits once `usage` is known: the reported `total_tokens`
    /// minus the estimate charged (none when they are equal).
    pub(crate) fn corrections(&self, usage: &Usage) -> Vec<Correction> {
        let delta = i64::try_from(usage.total_tokens)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(self.estimate).unwrap_or(i64::MAX));
        if delta == 0 {
            return Vec::new();
        }
        self.charges
            .iter()
            .filter(|c| c.kind == LimitKind::Tokens)
            .map(|c| Correction {
                key: c.key.clone(),
                quota: c.quota,
                delta,
            })
            .collect()
    }

    /// A meter correcting the tokens limits on `limiter` from the response's usage, or `None`
    /// when no tokens were charged.
    pub(crate) fn meter<L: Limiter>(&self, limiter: L) -> Option<Meter> {
        self.tokens().map(|tokens| Meter::new(limiter, tokens))
    }
}

/// The rejection of a refused decision.
fn rejection(outcome: Outcome) -> Rejection {
    match outcome {
        Outcome::Refused { limit, retry_after } => Rejection::rate_limited(limit, retry_after),
        Outcome::TooLarge {
            limit,
            requested,
            capacity,
        } => Rejection::new(Reason::RateLimited)
            .with_message(format!(
                "Request too large for the {} limit: it needs {requested} and the limit is {capacity}. Reduce the prompt or max_tokens.",
                limit.as_str()
            ))
            .with_detail("limit", limit.as_str())
            .with_detail("requested", requested)
            .with_detail("capacity", capacity)
            // No wait makes it fit: the request itself must change.
            .with_should_retry(false),
        Outcome::Allowed => Rejection::new(Reason::Internal),
    }
}

/// Who the request's buckets count for, and the caller's plan.
fn subject<B>(request: &Request<B>, key_by: KeyBy) -> (Subject, Option<&str>) {
    let extensions = request.extensions();
    if let Some(caller) = extensions.get::<Caller>() {
        let subject = match key_by {
            KeyBy::Key => Subject::Key(Arc::clone(caller.key_id_arc())),
            KeyBy::Account => Subject::Account(Arc::clone(caller.account_id_arc())),
        };
        return (subject, Some(caller.plan()));
    }
    let ip = extensions
        .get::<ClientIp>()
        .map(|ip| ip.0)
        .or_else(|| extensions.get::<SocketAddr>().map(SocketAddr::ip));
    #[cfg(feature = "axum")]
    let ip = ip.or_else(|| {
        extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
    });
    (ip.map_or(Subject::Anonymous, Subject::Ip), None)
}

/// The charges of a request: one cell per requests limit, `estimate` per tokens limit.
fn charges(
    subject: &Subject,
    policy: &Policy,
    global: Option<&Policy>,
    estimate: u64,
) -> SmallVec<[Charge; 2]> {
    let mut charges = SmallVec::with_capacity(
        policy.plan.limits().len() + global.map_or(0, |g| g.plan.limits().len()),
    );
    let mut add = |subject: &Subject, policy: &Policy| {
        for (index, limit) in policy.plan.limits().iter().enumerate() {
            charges.push(Charge {
                key: BucketKey::new(subject.clone(), Arc::clone(&policy.id), index as u8),
                kind: limit.kind,
                quota: limit.quota,
                cost: match limit.kind {
                    LimitKind::Requests => 1,
                    LimitKind::Tokens => estimate,
                },
            });
        }
    };
    add(subject, policy);
    if let Some(global) = global {
        add(&Subject::Global, global);
    }
    charges
}

/// The estimated tokens of a request: its prompt estimate plus `max_tokens`.
fn estimate(llm: Option<&LlmRequest>, default_max_tokens: u64) -> u64 {
    llm.map_or(0, |llm| {
        llm.estimated_prompt_tokens()
            .saturating_add(
                llm.max_tokens
                    .unwrap_or(default_max_tokens)
                    .saturating_mul(llm.choices.max(1)),
            )
            // Exact in every backend's arithmetic (Redis scripts use doubles).
            .min(crate::credits::ledger::MAX_CREDITS)
    })
}
