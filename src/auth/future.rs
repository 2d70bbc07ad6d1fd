use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::service::AuthConfig;
use crate::{
    body::ResponseBody,
    inspect::{has_unreadable_body, inspect, wants_inspection, InspectedBody, LlmRequest},
    BackendError, BoxError, Caller, Reason, Rejection,
};

use super::KeyLookup;

type Inspection<B> =
    Pin<Box<dyn Future<Output = Result<Request<InspectedBody<B>>, Rejection>> + Send>>;

pin_project! {
    /// The response future of [`Auth`](super::Auth).
    pub struct ResponseFuture<S, B, L>
    where
        S: Service<Request<InspectedBody<B>>>,
    {
        #[pin]
        kind: Kind<S, B, L>,
    }
}

pin_project! {
    #[project = KindProj]
    pub(super) enum Kind<S, B, L>
    where
        S: Service<Request<InspectedBody<B>>>,
    {
        Refused { rejection: Option<Rejection>, grpc: bool },
        // Cold (a store that must be awaited, a model to check): boxed, so the future of the
        // common path is no larger than the inner service's.
        Lookup { #[pin] lookup: L, pending: Option<Box<Pending<S, B>>> },
        Inspecting { inspection: Inspection<B>, inner: Option<Box<S>>, grpc: bool },
        Call { #[pin] future: S::Future },
    }
}

struct Pending<S, B> {
    inner: S,
    request: Request<B>,
    config: Arc<AuthConfig>,
    ip: Option<IpAddr>,
}

impl<S, B, L> ResponseFuture<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
{
    pub(super) fn refused<ReqB>(request: &Request<ReqB>, rejection: Rejection) -> Self {
        tracing::debug!(code = rejection.code(), "authentication refused");
        ResponseFuture {
            kind: Kind::Refused {
                rejection: Some(rejection),
                grpc: crate::normalize::is_grpc(request),
            },
        }
    }

    pub(super) fn new(kind: Kind<S, B, L>) -> Self {
        ResponseFuture { kind }
    }

    pub(super) fn lookup(
        lookup: L,
        inner: S,
        request: Request<B>,
        config: Arc<AuthConfig>,
        ip: Option<IpAddr>,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Lookup {
                lookup,
                pending: Some(Box::new(Pending {
                    inner,
                    request,
                    config,
                    ip,
                })),
            },
        }
    }
}

/// A refusal response for a request that is gone (read by the inspection).
fn refusal<RB>(grpc: bool, rejection: &Rejection) -> Response<ResponseBody<RB>> {
    crate::refusal(rejection, grpc).map(ResponseBody::full)
}

impl<S, B, L, RB> Future for ResponseFuture<S, B, L>
where
    S: Service<Request<InspectedBody<B>>, Response = Response<RB>>,
    L: Future<Output = Result<Option<KeyLookup>, BackendError>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<RB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().kind.project() {
                KindProj::Call { future } => {
                    return future
                        .poll(cx)
                        .map(|result| result.map(|response| response.map(ResponseBody::new)))
                }
                KindProj::Refused { rejection, grpc } => {
                    let rejection = rejection
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(refusal(*grpc, &rejection)));
                }
                KindProj::Lookup { lookup, pending } => {
                    let found = ready!(lookup.poll(cx));
                    let pending = *pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let Pending {
                        mut inner,
                        request,
                        config,
                        ip,
                    } = pending;
                    let grpc = crate::normalize::is_grpc(&request);
                    match admit(&config, found, ip, request) {
                        Admit::Refuse(rejection) => refused(rejection, grpc),
                        Admit::Call(request) => Kind::Call {
                            future: inner.call(request),
                        },
                        Admit::Inspect(request, caller) => {
                            inspecting(request, caller, config, inner, grpc)
                        }
                    }
                }
                KindProj::Inspecting {
                    inspection,
                    inner,
                    grpc,
                } => match ready!(inspection.as_mut().poll(cx)) {
                    Ok(request) => Kind::Call {
                        future: inner
                            .take()
                            .expect("ResponseFuture polled after completion")
                            .call(request),
                    },
                    Err(rejection) => refused(rejection, *grpc),
                },
            };
            self.as_mut().project().kind.set(next);
        }
    }
}

/// What a request becomes once its key is looked up.
pub(super) enum Admit<B> {
    /// Refused.
    Refuse(Rejection),
    /// Let through: call the inner service with it.
    Call(Request<InspectedBody<B>>),
    /// Its body must be read to check the model first.
    Inspect(Request<B>, Caller),
}

/// Decide a looked-up request: refuse it, let it through (with its [`Caller`] in the
/// extensions), or read its body to check the model.
pub(super) fn admit<B: Body>(
    config: &AuthConfig,
    found: Result<Option<KeyLookup>, BackendError>,
    ip: Option<IpAddr>,
    mut request: Request<B>,
) -> Admit<B> {
    match config.decide(found, ip) {
        Err(rejection) => Admit::Refuse(rejection),
        Ok(caller) if config.checks_models(&caller) => {
            if wants_inspection(&request) {
                request.extensions_mut().insert(caller.clone());
                Admit::Inspect(request, caller)
            } else if has_unreadable_body(&request) {
                // The model cannot be read, so it cannot be checked: refuse rather than let a
                // model outside the plan through.
                Admit::Refuse(Rejection::new(Reason::UnsupportedMediaType))
            } else if let Err(rejection) =
                config.check_model(&caller, request.extensions().get::<LlmRequest>())
            {
                Admit::Refuse(rejection)
            } else {
                request.extensions_mut().insert(caller);
                Admit::Call(request.map(InspectedBody::new))
            }
        }
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            Admit::Call(request.map(InspectedBody::new))
        }
    }
}

/// Read the body of `request` to check its model, then call `inner`.
pub(super) fn inspecting<S, B, L>(
    request: Request<B>,
    caller: Caller,
    config: Arc<AuthConfig>,
    inner: S,
    grpc: bool,
) -> Kind<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limit = config.body_limit();
    let inspection = Box::pin(async move {
        let request = inspect(request, limit).await?;
        config.check_model(&caller, request.extensions().get::<LlmRequest>())?;
        Ok(request)
    });
    Kind::Inspecting {
        inspection,
        inner: Some(Box::new(inner)),
        grpc,
    }
}

pub(super) fn refused<S, B, L>(rejection: Rejection, grpc: bool) -> Kind<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
{
    tracing::debug!(code = rejection.code(), "authentication refused");
    Kind::Refused {
        rejection: Some(rejection),
        grpc,
    }
}

impl<S, B, L> std::fmt::Debug for ResponseFuture<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Refused { .. } => "ResponseFuture::Refused",
            Kind::Lookup { .. } => "ResponseFuture::Lookup",
            Kind::Inspecting { .. } => "ResponseFuture::Inspecting",
            Kind::Call { .. } => "ResponseFuture::Call",
        })
    }
}
