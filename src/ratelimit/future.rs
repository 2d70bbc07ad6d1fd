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

/// What a check being awaited keeps for after it.
pub(super) struct Waiting<S, L, B> {
    pending: Pending<S, L>,
    request: Request<InspectedBody<B>>,
    charges: Charges,
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
        // The inner service, the request and the charges wait in a box: these states are cold
        // with a backend that answers at once (`Limiter::check_now`), and boxing them keeps the
        // future of the common path no larger than the inner service's.
        Inspecting {
            fut: Inspection<B>,
            pending: Option<Box<Pending<S, L>>>,
        },
        Checking {
            #[pin]
            fut: L::Future,
            waiting: Option<Box<Waiting<S, L, B>>>,
        },
        // A refusal decided in `call` (the body is mapped when polled).
        Refused {
            response: Option<Response<Bytes>>,
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

    /// Await the check of `charges` (made for `request`).
    pub(super) fn checking(
        pending: Pending<S, L>,
        request: Request<InspectedBody<B>>,
        charges: Charges,
    ) -> Self {
        Self::new(Kind::Checking {
            fut: pending.limiter.check(charges.as_slice()),
            waiting: Some(Box::new(Waiting {
                pending,
                request,
                charges,
            })),
        })
    }

    pub(super) fn refused(response: Response<Bytes>) -> Self {
        Self::new(Kind::Refused {
            response: Some(response),
        })
    }
}

/// The check of a request once its body was read.
fn checking<S, L, B>(pending: Pending<S, L>, request: Request<InspectedBody<B>>) -> Kind<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    let charges = pending.gate.charges(&pending.limits, &request);
    ResponseFuture::checking(pending, request, charges).kind
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
                    let pending = *pending.take().expect("polled after completion");
                    match inspected {
                        Ok(request) => this.kind.set(checking(pending, request)),
                        Err(rejection) => {
                            return Poll::Ready(Ok(refusal(&rejection, pending.grpc)))
                        }
                    }
                }
                KindProj::Refused { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(RateLimitBody::full)));
                }
                KindProj::Checking { fut, waiting } => {
                    let decided = ready!(fut.poll(cx));
                    let Waiting {
                        mut pending,
                        request,
                        charges,
                    } = *waiting.take().expect("polled after completion");
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
            Kind::Refused { .. } => "ResponseFuture::Refused",
            Kind::Calling { .. } => "ResponseFuture::Calling",
        })
    }
}
