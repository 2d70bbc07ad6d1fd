use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{
    future::{Kind, Pending, ResponseFuture},
    layer::Config,
    plan::Policy,
    Charge, KeyBy, Limiter, MemoryLimiter, RateLimitBody, Subject,
};
use crate::{
    inspect::{inspect, wants_inspection, InspectedBody, LlmRequest},
    ip::ClientIp,
    BoxError, Caller, LimitKind,
};

/// Middleware that rate-limits requests per caller and plan. See the [module docs](super).
///
/// The inner service receives the request with an [`InspectedBody`] (the original body, or the
/// bytes read to estimate tokens); its response body is wrapped in a [`RateLimitBody`].
pub struct RateLimit<S, L = MemoryLimiter> {
    pub(crate) inner: S,
    pub(crate) limiter: L,
    pub(crate) config: Arc<Config>,
}

impl<S, L, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S, L>
where
    S: Service<Request<InspectedBody<ReqB>>, Response = Response<ResB>> + Clone,
    L: Limiter,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<RateLimitBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, L, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        let Some(Policies {
            subject,
            policy,
            global,
        }) = config.policies(&request)
        else {
            return ResponseFuture::passthrough(self.inner.call(request.map(InspectedBody::new)));
        };
        // The inner service was made ready; the clone takes its place until the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let tokens = has_tokens(&policy, global.as_deref());
        let pending = Pending {
            inner,
            limiter: self.limiter.clone(),
            config: Arc::clone(config),
            policy,
            global,
            subject,
            grpc: crate::normalize::is_grpc(&request),
            charges: Vec::new(),
            estimate: 0,
        };
        if tokens && wants_inspection(&request) {
            let limit = config.body_limit;
            return ResponseFuture::new(Kind::Inspecting {
                fut: Box::pin(inspect(request, limit)),
                pending: Some(pending),
            });
        }
        ResponseFuture::check(pending, request.map(InspectedBody::new))
    }
}

/// The limits a request is charged to: its subject's policy and the global one.
pub(crate) struct Policies {
    pub(crate) subject: Subject,
    pub(crate) policy: Arc<Policy>,
    pub(crate) global: Option<Arc<Policy>>,
}

impl Config {
    /// The limits of `request`, or `None` when it is not limited at all (an exempt route, or an
    /// unlimited plan without a global limit).
    pub(crate) fn policies<B>(&self, request: &Request<B>) -> Option<Policies> {
        let route = self.route(request.uri().path());
        if route.is_some_and(|p| p.plan.is_unlimited()) {
            return None;
        }
        let (subject, plan) = subject(request, self.key_by);
        let policy = match route {
            Some(policy) => Arc::clone(policy),
            None => self.plans.policy(plan.unwrap_or("anonymous")),
        };
        if policy.plan.is_unlimited() && self.global.is_none() {
            return None;
        }
        Some(Policies {
            subject,
            policy,
            global: self.global.clone(),
        })
    }
}

/// Whether a tokens limit applies (the request body is then read to estimate them).
pub(crate) fn has_tokens(policy: &Policy, global: Option<&Policy>) -> bool {
    policy.plan.has_tokens() || global.is_some_and(|g| g.plan.has_tokens())
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
pub(crate) fn charges(
    subject: &Subject,
    policy: &Policy,
    global: Option<&Policy>,
    estimate: u64,
) -> Vec<Charge> {
    let mut charges = Vec::with_capacity(
        policy.plan.limits().len() + global.map_or(0, |g| g.plan.limits().len()),
    );
    let mut add = |subject: &Subject, policy: &Policy| {
        for (index, limit) in policy.plan.limits().iter().enumerate() {
            charges.push(Charge {
                key: super::BucketKey::new(subject.clone(), Arc::clone(&policy.id), index as u8),
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
pub(crate) fn estimate(llm: Option<&LlmRequest>, default_max_tokens: u64) -> u64 {
    llm.map_or(0, |llm| {
        llm.estimated_prompt_tokens()
            .saturating_add(
                llm.max_tokens
                    .unwrap_or(default_max_tokens)
                    .saturating_mul(llm.choices.max(1)),
            )
            // Exact in every backend's arithmetic (Redis scripts use doubles).
            .min(crate::credits::MAX_CREDITS)
    })
}

impl<S: Clone, L: Clone> Clone for RateLimit<S, L> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug, L: fmt::Debug> fmt::Debug for RateLimit<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("plans", &self.config.plans)
            .finish_non_exhaustive()
    }
}
