use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{
    body::Meter,
    gate::{Charges, Gate, RequestLimits},
    Decision, Limiter, RateLimitBody,
};
use crate::{inspect::InspectedBody, Rejection};

type Inspection<B> =
    Pin<Box<dyn Future<Output = Result<Request<InspectedBody<B>>, Rejection>> + Send>>;

/// What the future needs until the inner service is called.
pub(super) struct Pending<S, L> {
    pub(super) inner: S,
    pub(super) limiter: L,
    pub(super) gate: Gate,
    pub(super) limits: RequestLimits,
    pub(super) grpc: bool,
}

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, L, B>
    where
        S: Service<Request<InspectedBody<B>>>,
        L: Limiter,
    {
        #[pin]
        kind: Kind<S, L, B>,
    }
}

pin_project! {
    #[project = KindProj]
    pub(super) enum Kind<S, L, B>
    where
        S: Service<Request<InspectedBody<B>>>,
        L: Limiter,
    {
        // Reading the body to estimate tokens (boxed: `inspect` is an async fn; only requests
        // on a tokens-limited route with a JSON body not inspected yet take this path).
        Inspecting {
            fut: Inspection<B>,
            pending: Option<Pending<S, L>>,
        },
        Checking {
            #[pin]
            fut: L::Future,
            request: Option<Request<InspectedBody<B>>>,
            pending: Option<(Pending<S, L>, Charges)>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            decision: Option<(Decision, Gate)>,
            meter: Option<Meter>,
        },
    }
}

impl<S, L, B> ResponseFuture<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    pub(super) fn new(kind: Kind<S, L, B>) -> Self {
        ResponseFuture { kind }
    }

    pub(super) fn passthrough(fut: S::Future) -> Self {
        Self::new(Kind::Calling {
            fut,
            decision: None,
            meter: None,
        })
    }

    pub(super) fn check(pending: Pending<S, L>, request: Request<InspectedBody<B>>) -> Self {
        Self::new(checking(pending, request))
    }
}

fn checking<S, L, B>(pending: Pending<S, L>, request: Request<InspectedBody<B>>) -> Kind<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    let charges = pending.gate.charges(&pending.limits, &request);
    Kind::Checking {
        fut: pending.limiter.check(charges.as_slice()),
        request: Some(request),
        pending: Some((pending, charges)),
    }
}

/// A refusal before the limits were decided (a body too large, a failing backend).
fn refusal<ResB>(rejection: &Rejection, grpc: bool) -> Response<RateLimitBody<ResB>> {
    crate::refusal(rejection, grpc).map(RateLimitBody::full)
}

impl<S, L, B, ResB> Future for ResponseFuture<S, L, B>
where
    S: Service<Request<InspectedBody<B>>, Response = Response<ResB>>,
    L: Limiter,
    ResB: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<RateLimitBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.kind.as_mut().project() {
                KindProj::Inspecting { fut, pending } => {
                    let inspected = ready!(fut.as_mut().poll(cx));
                    let pending = pending.take().expect("polled after completion");
                    match inspected {
                        Ok(request) => this.kind.set(checking(pending, request)),
                        Err(rejection) => {
                            return Poll::Ready(Ok(refusal(&rejection, pending.grpc)))
                        }
                    }
                }
                KindProj::Checking {
                    fut,
                    request,
                    pending,
                } => {
                    let decided = ready!(fut.poll(cx));
                    let request = request.take().expect("polled after completion");
                    let (mut pending, charges) = pending.take().expect("polled after completion");
                    let decision = match decided {
                        Ok(decision) => decision,
                        Err(error) => {
                            let rejection = Rejection::from(error);
                            return Poll::Ready(Ok(refusal(&rejection, pending.grpc)));
                        }
                    };
                    if !decision.is_allowed() {
                        let response = pending.gate.refusal(&decision, pending.grpc);
                        return Poll::Ready(Ok(response.map(RateLimitBody::full)));
                    }
                    let meter = charges.meter(pending.limiter.clone());
                    let fut = pending.inner.call(request);
                    this.kind.set(Kind::Calling {
                        fut,
                        decision: Some((decision, pending.gate)),
                        meter,
                    });
                }
                KindProj::Calling {
                    fut,
                    decision,
                    meter,
                } => {
                    let response = ready!(fut.poll(cx))?;
                    let mut response = response.map(|body| RateLimitBody::new(body, meter.take()));
                    if let Some((decision, gate)) = decision.take() {
                        gate.headers(response.headers_mut(), &decision);
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

impl<S, L, B> fmt::Debug for ResponseFuture<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Inspecting { .. } => "ResponseFuture::Inspecting",
            Kind::Checking { .. } => "ResponseFuture::Checking",
            Kind::Calling { .. } => "ResponseFuture::Calling",
        })
    }
}
