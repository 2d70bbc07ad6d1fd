use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{
    body::Meter,
    headers,
    layer::Config,
    plan::Policy,
    service::{charges, estimate},
    Charge, Decision, Limiter, Outcome, RateLimitBody, Subject,
};
use crate::{
    inspect::{InspectedBody, LlmRequest},
    Reason, Rejection,
};

type Inspection<B> =
    Pin<Box<dyn Future<Output = Result<Request<InspectedBody<B>>, Rejection>> + Send>>;

/// What the future needs until the inner service is called.
pub(crate) struct Pending<S, L> {
    pub(crate) inner: S,
    pub(crate) limiter: L,
    pub(crate) config: Arc<Config>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) global: Option<Arc<Policy>>,
    pub(crate) subject: Subject,
    pub(crate) grpc: bool,
    pub(crate) charges: Vec<Charge>,
    pub(crate) estimate: u64,
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
    pub(crate) enum Kind<S, L, B>
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
            pending: Option<Pending<S, L>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            decision: Option<Decision>,
            meter: Option<Meter>,
        },
    }
}

impl<S, L, B> ResponseFuture<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    pub(crate) fn new(kind: Kind<S, L, B>) -> Self {
        ResponseFuture { kind }
    }

    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self::new(Kind::Calling {
            fut,
            decision: None,
            meter: None,
        })
    }

    pub(crate) fn check(pending: Pending<S, L>, request: Request<InspectedBody<B>>) -> Self {
        Self::new(checking(pending, request))
    }
}

fn checking<S, L, B>(
    mut pending: Pending<S, L>,
    request: Request<InspectedBody<B>>,
) -> Kind<S, L, B>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Limiter,
{
    pending.estimate = estimate(
        request.extensions().get::<LlmRequest>(),
        pending.config.default_max_tokens,
    );
    pending.charges = charges(
        &pending.subject,
        &pending.policy,
        pending.global.as_deref(),
        pending.estimate,
    );
    Kind::Checking {
        fut: pending.limiter.check(&pending.charges),
        request: Some(request),
        pending: Some(pending),
    }
}

/// The rejection of a refused decision.
pub(crate) fn rejection(outcome: Outcome) -> Rejection {
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

fn refusal<ResB>(
    rejection: &Rejection,
    grpc: bool,
    decision: Option<&Decision>,
    headers: bool,
) -> Response<RateLimitBody<ResB>> {
    let mut response = crate::refusal(rejection, grpc).map(RateLimitBody::full);
    if let (Some(decision), true) = (decision, headers) {
        headers::insert(response.headers_mut(), decision);
    }
    response
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
                            return Poll::Ready(Ok(refusal(&rejection, pending.grpc, None, false)))
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
                    let mut pending = pending.take().expect("polled after completion");
                    let headers = pending.config.headers;
                    let decision = match decided {
                        Ok(decision) => decision,
                        Err(error) => {
                            let rejection = Rejection::from(error);
                            return Poll::Ready(Ok(refusal(&rejection, pending.grpc, None, false)));
                        }
                    };
                    if !decision.is_allowed() {
                        let rejection = rejection(decision.outcome());
                        return Poll::Ready(Ok(refusal(
                            &rejection,
                            pending.grpc,
                            Some(&decision),
                            headers,
                        )));
                    }
                    let meter = super::charges_tokens(&pending.charges).then(|| {
                        Meter::new(
                            pending.limiter.clone(),
                            std::mem::take(&mut pending.charges),
                            pending.estimate,
                        )
                    });
                    let fut = pending.inner.call(request);
                    this.kind.set(Kind::Calling {
                        fut,
                        decision: headers.then_some(decision),
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
                    if let Some(decision) = decision.take() {
                        headers::insert(response.headers_mut(), &decision);
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
