use std::{
    fmt,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{
    future::{Kind, Pending, ResponseFuture},
    gate::{Gate, RequestLimits},
    Limiter, MemoryLimiter, RateLimitBody,
};
use crate::{
    inspect::{inspect, wants_inspection, InspectedBody},
    BoxError, Rejection,
};

/// Middleware that rate-limits requests per caller and plan. See the [module docs](super).
///
/// The inner service receives the request with an [`InspectedBody`] (the original body, or the
/// bytes read to estimate tokens); its response body is wrapped in a [`RateLimitBody`].
pub struct RateLimit<S, L = MemoryLimiter> {
    inner: S,
    limiter: L,
    gate: Gate,
}

impl<S, L> RateLimit<S, L> {
    pub(super) fn new(inner: S, limiter: L, gate: Gate) -> Self {
        RateLimit {
            inner,
            limiter,
            gate,
        }
    }
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
        let Some(limits) = self.gate.limits(&request) else {
            return ResponseFuture::passthrough(self.inner.call(request.map(InspectedBody::new)));
        };
        let grpc = crate::normalize::is_grpc(&request);
        let needs_body = limits.needs_body();
        if !(needs_body && wants_inspection(&request)) {
            let request = request.map(InspectedBody::new);
            let charges = self.gate.charges(&limits, &request);
            if let Some(decided) = self.limiter.check_now(charges.as_slice()) {
                // Decided at once: the ready service is called now, no clone, no check state.
                return match decided {
                    Ok(decision) if decision.is_allowed() => ResponseFuture::new(Kind::Calling {
                        meter: charges.meter(self.limiter.clone()),
                        fut: self.inner.call(request),
                        decision: Some((decision, self.gate.clone())),
                    }),
                    Ok(decision) => ResponseFuture::refused(self.gate.refusal(&decision, grpc)),
                    Err(error) => {
                        ResponseFuture::refused(crate::refusal(&Rejection::from(error), grpc))
                    }
                };
            }
            let pending = self.pending(limits, grpc);
            return ResponseFuture::checking(pending, request, charges);
        }
        let pending = self.pending(limits, grpc);
        let limit = self.gate.body_limit();
        ResponseFuture::new(Kind::Inspecting {
            fut: Box::pin(inspect(request, limit)),
            pending: Some(Box::new(pending)),
        })
    }
}

impl<S: Clone, L: Clone> RateLimit<S, L> {
    /// What the future needs to call the inner service later: the ready service (a clone takes
    /// its place until the next `poll_ready`).
    fn pending(&mut self, limits: RequestLimits, grpc: bool) -> Pending<S, L> {
        let clone = self.inner.clone();
        Pending {
            inner: std::mem::replace(&mut self.inner, clone),
            limiter: self.limiter.clone(),
            gate: self.gate.clone(),
            limits,
            grpc,
        }
    }
}

impl<S: Clone, L: Clone> Clone for RateLimit<S, L> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S: fmt::Debug, L: fmt::Debug> fmt::Debug for RateLimit<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("plans", self.gate.plans())
            .finish_non_exhaustive()
    }
}
