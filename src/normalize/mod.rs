//! The outermost layer: one error body for every refusal and every upstream error, and a
//! request id on every response.
//!
//! [`NormalizeLayer`] does four things:
//!
//! - renders every [`Rejection`] produced further in (found in the response's extensions) in the
//!   configured [`Format`], keeping the refusal's other headers (rate-limit headers, ...);
//! - rewrites error responses of the inner service (status >= 400) whose body is not already in
//!   the format: axum's plain-text extractor rejections, an empty 404 fallback, an HTML 502. The
//!   status is kept; for 4xx the original text becomes the message when it is short and safe
//!   (5xx text is replaced: it may reveal internals). Only error bodies are read, up to
//!   [`NormalizeLayer::max_error_body`]; success bodies stream through untouched;
//! - turns the inner service's `Err` into a response: a timeout → 504, load shed → 503, an I/O
//!   error (connection refused or reset) → 502, anything else → 500; a panic → 500 with no panic
//!   text in the body;
//! - makes sure every response carries `x-request-id`: a valid incoming one is propagated,
//!   otherwise one is generated ([`MakeRequestId`]) and set on the request too, so the inner
//!   service and the error bodies see it. A response that already has the header keeps its
//!   own. (The layer writes the header itself; it does not insert tower-http's `RequestId`
//!   extension into the request or the response: read the header.)
//!
//! Requests whose `content-type` is `application/grpc*` always get a gRPC status.
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use http::{Request, StatusCode};
//! use tollgate::{format::Format, normalize::NormalizeLayer};
//! use tower::ServiceExt;
//!
//! # tokio_test();
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn tokio_test() {
//! let app = Router::new()
//!     .route("/v1/models", get(|| async { "[]" }))
//!     .layer(NormalizeLayer::new().format(Format::OpenAi));
//!
//! let response = app
//!     .oneshot(Request::get("/v2/models").body(axum::body::Body::empty()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(response.status(), StatusCode::NOT_FOUND);
//! assert!(response.headers().contains_key("x-request-id"));
//! assert_eq!(response.headers()["x-should-retry"], "false");
//! let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
//! let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(body["error"]["code"], "not_found");
//! # }
//! ```

mod request_id;

use std::{
    borrow::Cow,
    convert::Infallible,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use request_id::MakeRequestId;

use crate::{
    body::ResponseBody,
    format::{ErrorCatalog, ErrorFormat, ErrorOverride, Format, RenderContext},
    BoxError, Reason, Rejection,
};

/// The header that carries the request id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The default bound on an inner error body that is read to be rewritten: 16 KiB.
pub const DEFAULT_MAX_ERROR_BODY: usize = 16 * 1024;

/// Whether a request is a gRPC call (`content-type: application/grpc*`).
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

struct Config {
    format: Format,
    catalog: ErrorCatalog,
    max_error_body: usize,
}

impl Config {
    fn render<B>(
        &self,
        rejection: &Rejection,
        cx: &RenderContext<'_>,
        mut extra: Option<http::HeaderMap>,
    ) -> Response<ResponseBody<B>> {
        // The catalog is consulted here only: on the refusal path, never on the allowed one.
        let mut response = self.catalog.response(&self.format, rejection, cx);
        if let Some(extra) = extra.take() {
            // Keep the refusal's own headers (rate-limit headers, `allow`, ...) but not the ones
            // that described the body we replaced.
            let mut last = None;
            for (name, value) in extra {
                let name = match name {
                    Some(name) => {
                        last = Some(name.clone());
                        name
                    }
                    None => last.clone().expect("first header has a name"),
                };
                if name == header::CONTENT_LENGTH
                    || name == header::CONTENT_TYPE
                    || name == header::CONTENT_ENCODING
                    || name == header::TRANSFER_ENCODING
                    || response.headers().contains_key(&name)
                {
                    continue;
                }
                response.headers_mut().append(name, value);
            }
        }
        response.map(ResponseBody::full)
    }
}

/// Applies [`Normalize`] to a service. See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct NormalizeLayer {
    config: Arc<Config>,
    make_id: MakeRequestId,
}

impl Default for NormalizeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for NormalizeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NormalizeLayer")
            .field("format", &self.config.format)
            .field("max_error_body", &self.config.max_error_body)
            .finish_non_exhaustive()
    }
}

impl NormalizeLayer {
    /// The OpenAI-compatible format, 16 KiB error bodies, generated request ids.
    pub fn new() -> Self {
        NormalizeLayer {
            config: Arc::new(Config {
                format: Format::OpenAi,
                catalog: ErrorCatalog::new(),
                max_error_body: DEFAULT_MAX_ERROR_BODY,
            }),
            make_id: MakeRequestId::new(),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("configured before use")
    }

    /// The error format.
    pub fn format(mut self, format: Format) -> Self {
        self.config_mut().format = format;
        self
    }

    /// Replace the message of every rejection with this reason (an entry of the
    /// [`catalog`](Self::catalog); `{placeholders}` as in [`ErrorOverride`]).
    pub fn message(mut self, reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        let entry = self.config_mut().catalog.entry_mut(reason);
        *entry = std::mem::take(entry).message(message);
        self
    }

    /// Present every refusal as `catalog` says: per tollgate code, the status, `type`, `code`,
    /// message and `param` of a provider's contract, in every format. Upstream failures the
    /// layer normalizes (500, 502, 503, 504, ...) go through it too. Replaces earlier
    /// [`message`](Self::message) and [`error`](Self::error) calls.
    ///
    /// ```
    /// use axum::{routing::get, Router};
    /// use http::{Request, StatusCode};
    /// use tollgate::{format::{ErrorCatalog, ErrorOverride}, normalize::NormalizeLayer, Reason};
    /// use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let catalog = ErrorCatalog::new().with(
    ///     Reason::BadGateway,
    ///     ErrorOverride::new().error_type("api_error").code("api_error"),
    /// );
    /// let app = Router::new()
    ///     .route("/v1/models", get(|| async { (StatusCode::BAD_GATEWAY, "<html>upstream down</html>") }))
    ///     .layer(NormalizeLayer::new().catalog(catalog));
    ///
    /// let response = app
    ///     .oneshot(Request::get("/v1/models").body(axum::body::Body::empty()).unwrap())
    ///     .await
    ///     .unwrap();
    /// assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    /// let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
    /// let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    /// assert_eq!(body["error"]["type"], "api_error");
    /// assert_eq!(body["error"]["code"], "api_error");
    /// # }
    /// ```
    pub fn catalog(mut self, catalog: ErrorCatalog) -> Self {
        self.config_mut().catalog = catalog;
        self
    }

    /// Present every rejection with this reason as `entry` says (one entry of the
    /// [`catalog`](Self::catalog)).
    ///
    /// ```
    /// use tollgate::{format::ErrorOverride, normalize::NormalizeLayer, Reason};
    ///
    /// let layer = NormalizeLayer::new().error(
    ///     Reason::InsufficientCredits,
    ///     ErrorOverride::new().error_type("billing_error").code(402),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn error(mut self, reason: Reason, entry: ErrorOverride) -> Self {
        self.config_mut().catalog.set(reason, entry);
        self
    }

    /// The largest inner error body read to be rewritten; a larger one is replaced whole.
    pub fn max_error_body(mut self, bytes: usize) -> Self {
        self.config_mut().max_error_body = bytes;
        self
    }

    /// How request ids are generated.
    pub fn make_request_id(mut self, make_id: MakeRequestId) -> Self {
        self.make_id = make_id;
        self
    }
}

impl<S> Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let core = NormalizeCore {
            inner,
            config: self.config.clone(),
            ready_error: None,
        };
        Normalize {
            inner: core,
            make_id: self.make_id.clone(),
        }
    }
}

/// The normalization middleware. See the [module docs](self).
pub struct Normalize<S> {
    inner: NormalizeCore<S>,
    make_id: MakeRequestId,
}

impl<S: Clone> Clone for Normalize<S> {
    fn clone(&self) -> Self {
        Normalize {
            inner: self.inner.clone(),
            make_id: self.make_id.clone(),
        }
    }
}

impl<S> fmt::Debug for Normalize<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Normalize").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Normalize<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // A forged or oversized incoming id is replaced rather than echoed.
        let mut ids = req.headers().get_all(&REQUEST_ID).iter();
        let valid = match (ids.next(), ids.next()) {
            (Some(id), None) => request_id::is_valid(id),
            (None, _) => true,
            _ => false,
        };
        let id = match req.headers().get(&REQUEST_ID) {
            Some(id) if valid => id.clone(),
            _ => {
                let id = self.make_id.generate();
                // One value: a forged pair was rejected above.
                req.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project! {
    /// Response future of [`Normalize`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        inner: CoreFuture<F, B>,
        // The request's id, for a response without one.
        id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(id) = this.id.take() {
            if let header::Entry::Vacant(entry) = response.headers_mut().entry(REQUEST_ID) {
                entry.insert(id);
            }
        }
        Poll::Ready(Ok(response))
    }
}

struct NormalizeCore<S> {
    inner: S,
    config: Arc<Config>,
    ready_error: Option<BoxError>,
}

impl<S: Clone> Clone for NormalizeCore<S> {
    fn clone(&self) -> Self {
        NormalizeCore {
            inner: self.inner.clone(),
            config: self.config.clone(),
            ready_error: None,
        }
    }
}

/// What rendering needs from the request, kept only when the format uses it.
struct RequestInfo {
    grpc: bool,
    path: Option<Box<str>>,
    request_id: Option<HeaderValue>,
}

impl RequestInfo {
    fn context(&self) -> RenderContext<'_> {
        let mut cx = RenderContext::new().grpc(self.grpc);
        if let Some(path) = &self.path {
            cx = cx.path(path);
        }
        if let Some(id) = self.request_id.as_ref().and_then(|v| v.to_str().ok()) {
            cx = cx.request_id(id);
        }
        cx
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for NormalizeCore<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Infallible;
    type Future = CoreFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_error.is_none() {
            if let Err(e) = ready!(self.inner.poll_ready(cx)) {
                // Reported on the next call as a response: this service never fails.
                self.ready_error = Some(e.into());
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let uses_path = self.config.format.uses_path();
        let info = RequestInfo {
            grpc: is_grpc(&req),
            path: uses_path.then(|| req.uri().path().into()),
            request_id: uses_path
                .then(|| req.headers().get(&REQUEST_ID).cloned())
                .flatten(),
        };
        if let Some(error) = self.ready_error.take() {
            let response = self.config.render(&classify(error), &info.context(), None);
            return CoreFuture::ready(response, self.config.clone(), info);
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => CoreFuture {
                kind: Kind::Inner { future },
                config: self.config.clone(),
                info,
            },
            Err(_) => {
                let response = self.config.render(&panicked(), &info.context(), None);
                CoreFuture::ready(response, self.config.clone(), info)
            }
        }
    }
}

type Rewrite<B> = Pin<Box<dyn Future<Output = Response<ResponseBody<B>>> + Send>>;

pin_project! {
    /// Response future of the normalization core.
    pub struct CoreFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
        config: Arc<Config>,
        info: RequestInfo,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        // Cold (an inner error or panic): boxed, so the future is no larger than the inner one.
        Ready { response: Option<Box<Response<ResponseBody<B>>>> },
        Rewrite { future: Rewrite<B> },
    }
}

impl<F, B> CoreFuture<F, B> {
    fn ready(response: Response<ResponseBody<B>>, config: Arc<Config>, info: RequestInfo) -> Self {
        CoreFuture {
            kind: Kind::Ready {
                response: Some(Box::new(response)),
            },
            config,
            info,
        }
    }
}

impl<F, B, E> Future for CoreFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let response = match this.kind.as_mut().project() {
                KindProj::Ready { response } => {
                    return Poll::Ready(Ok(*response.take().expect("polled after completion")))
                }
                KindProj::Rewrite { future } => return future.as_mut().poll(cx).map(Ok),
                KindProj::Inner { future } => {
                    match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(Ok(response))) => response,
                        Ok(Poll::Ready(Err(error))) => {
                            let rejection = classify(error.into());
                            let response =
                                this.config.render(&rejection, &this.info.context(), None);
                            this.kind.set(Kind::Ready {
                                response: Some(Box::new(response)),
                            });
                            continue;
                        }
                        Err(_) => {
                            let response =
                                this.config.render(&panicked(), &this.info.context(), None);
                            this.kind.set(Kind::Ready {
                                response: Some(Box::new(response)),
                            });
                            continue;
                        }
                    }
                }
            };
            if let Some(rejection) = response.extensions().get::<Rejection>().cloned() {
                let (parts, _refusal_body) = response.into_parts();
                let mut rendered =
                    this.config
                        .render(&rejection, &this.info.context(), Some(parts.headers));
                rendered.extensions_mut().extend(parts.extensions);
                return Poll::Ready(Ok(rendered));
            }
            if response.status().as_u16() < 400 || this.info.grpc {
                return Poll::Ready(Ok(response.map(ResponseBody::new)));
            }
            let future = rewrite(
                response,
                this.config.clone(),
                std::mem::replace(
                    this.info,
                    RequestInfo {
                        grpc: false,
                        path: None,
                        request_id: None,
                    },
                ),
            );
            this.kind.set(Kind::Rewrite { future });
        }
    }
}

/// Read an inner error body (bounded) and render it in the configured format unless it is in
/// that format already.
fn rewrite<B>(response: Response<B>, config: Arc<Config>, info: RequestInfo) -> Rewrite<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(async move {
        let (parts, body) = response.into_parts();
        let status = parts.status;
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let too_large = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len > config.max_error_body as u64);
        let bytes = if too_large {
            None
        } else {
            Limited::new(body, config.max_error_body)
                .collect()
                .await
                .ok()
                .map(|c| c.to_bytes())
        };
        // A 4xx already in the format passes (with the retry guidance every error carries); a
        // 5xx never does: its text may reveal the upstream's internals.
        if let Some(bytes) = &bytes {
            if status.is_client_error()
                && !bytes.is_empty()
                && config.format.recognizes(content_type.as_deref(), bytes)
            {
                let mut parts = parts;
                retry_guidance(&mut parts.headers, status);
                return Response::from_parts(parts, ResponseBody::full(bytes.clone()));
            }
        }
        let upstream_wait = retry_after(&parts.headers);
        let rejection = match bytes {
            // tower-http's TimeoutLayer answers 408 with an empty body: the upstream timed out.
            Some(bytes) if status == StatusCode::REQUEST_TIMEOUT && bytes.is_empty() => {
                Rejection::new(Reason::GatewayTimeout)
            }
            Some(bytes) if status.is_client_error() => {
                Rejection::from_status(status, safe_message(content_type.as_deref(), &bytes))
            }
            _ => Rejection::from_status(status, None),
        };
        let rejection = match upstream_wait {
            Some(wait) => rejection.with_retry_after(wait),
            None => rejection,
        };
        let mut rendered = config.render(&rejection, &info.context(), Some(parts.headers));
        rendered.extensions_mut().extend(parts.extensions);
        rendered
    })
}

/// The upstream's `retry-after`, in whole seconds (an HTTP date is not trusted: clocks differ).
fn retry_after(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let seconds: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A day at most: an upstream cannot park a client for longer.
    Some(std::time::Duration::from_secs(seconds.min(86_400)))
}

/// `x-should-retry` (from the status, unless the upstream said) and `retry-after-ms` beside an
/// upstream `retry-after`, as on every error the chain renders.
fn retry_guidance(headers: &mut http::HeaderMap, status: StatusCode) {
    if !headers.contains_key("x-should-retry") {
        let retry = crate::rejection::should_retry(status);
        headers.insert(
            "x-should-retry",
            http::HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    if let Some(wait) = retry_after(headers) {
        if !headers.contains_key("retry-after-ms") {
            headers.insert(
                "retry-after-ms",
                http::HeaderValue::from(crate::rejection::ceil_millis(wait)),
            );
        }
    }
}

/// The inner error text, when it is short, printable and not markup.
fn safe_message(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let text = if crate::format::is_json(content_type) || text.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        ["message", "detail", "error", "title"]
            .iter()
            .find_map(|k| value.get(k).and_then(|v| v.as_str()).map(str::to_owned))
            .or_else(|| {
                value
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })?
    } else {
        text.to_owned()
    };
    let text = text.trim();
    let printable = text.chars().all(|c| !c.is_control() || c == ' ');
    (!text.is_empty() && text.len() <= 300 && printable && !text.contains('<'))
        .then(|| text.to_owned())
}

fn panicked() -> Rejection {
    tracing::error!(code = "internal_error", "inner service panicked");
    Rejection::new(Reason::Internal)
}

/// The rejection an inner service's error stands for.
pub fn classify(error: BoxError) -> Rejection {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = source {
        if let Some(rejection) = e.downcast_ref::<Rejection>() {
            return rejection.clone();
        }
        if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
            return Rejection::new(Reason::GatewayTimeout);
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return Rejection::new(Reason::ServiceUnavailable);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::TimedOut => Rejection::new(Reason::GatewayTimeout),
                _ => Rejection::new(Reason::BadGateway),
            };
        }
        source = e.source();
    }
    tracing::error!(error = %error, code = "internal_error", "inner service failed");
    Rejection::new(Reason::Internal)
}
