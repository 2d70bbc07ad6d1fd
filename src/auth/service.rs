use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    extract::{self, Sources, X_API_KEY},
    future::{self, Admit, Kind, ResponseFuture},
    AccountStatus, AuthShield, KeyLookup, KeyStatus, KeyStore,
};
use crate::{
    body::ResponseBody,
    inspect::{InspectedBody, LlmRequest, DEFAULT_BODY_LIMIT},
    ip::{peer_addr, ClientIp, ClientIpResolver},
    keys, BackendError, BoxError, Caller, Reason, Rejection,
};

/// Authenticates every request by its API key, puts the [`Caller`] into its extensions, and
/// refuses the rest. See the [module docs](super) for every refusal.
///
/// The inner service receives the request with the key removed (the `Authorization` or
/// `x-api-key` header, or the query parameter), its body wrapped in an [`InspectedBody`]: the
/// original body untouched, or, when a plan's models had to be checked, the bytes read.
///
/// # Example
///
/// ```
/// use axum::{routing::get, Router};
/// use http::{Request, StatusCode};
/// use tollgate::{auth::{AccountRecord, AuthLayer, KeyRecord, MemoryKeyStore}, keys};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryKeyStore::new()
///     .with_account(AccountRecord::new("acct_1", "free"))
///     .with_key(keys::digest("sk-test-0123456789abcdef"), KeyRecord::new("key_1", "acct_1"));
/// let app = Router::new()
///     .route("/v1/models", get(|| async { "[]" }))
///     // Also accept `x-api-key`; answer 401 rather than 403 for disabled or revoked keys.
///     .layer(AuthLayer::new(store).allow_x_api_key().inactive_key_status(StatusCode::UNAUTHORIZED));
///
/// let request = Request::get("/v1/models")
///     .header("x-api-key", "sk-test-0123456789abcdef")
///     .body(axum::body::Body::empty())
///     .unwrap();
/// assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::OK);
///
/// let request = Request::get("/v1/models").body(axum::body::Body::empty()).unwrap();
/// assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::UNAUTHORIZED);
/// # }
/// ```
#[must_use]
pub struct AuthLayer<K> {
    store: Arc<K>,
    config: Arc<AuthConfig>,
}

#[derive(Clone, Debug)]
pub(crate) struct AuthConfig {
    x_api_key: bool,
    query_param: Option<Arc<str>>,
    inactive_status: Option<StatusCode>,
    known_models: Option<Arc<HashSet<String>>>,
    body_limit: usize,
    shield: Option<AuthShield>,
    resolver: ClientIpResolver,
    forward_key: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            x_api_key: false,
            query_param: None,
            inactive_status: None,
            known_models: None,
            body_limit: DEFAULT_BODY_LIMIT,
            shield: Some(AuthShield::default()),
            resolver: ClientIpResolver::new(),
            forward_key: false,
        }
    }
}

impl<K> AuthLayer<K> {
    /// Authenticate against `store`, from `Authorization: Bearer` only, with the default
    /// brute-force shield.
    pub fn new(store: K) -> Self {
        AuthLayer {
            store: Arc::new(store),
            config: Arc::default(),
        }
    }

    fn config(&mut self) -> &mut AuthConfig {
        Arc::make_mut(&mut self.config)
    }

    /// Also accept the key in an `x-api-key` header. When both headers are sent they must agree.
    pub fn allow_x_api_key(mut self) -> Self {
        self.config().x_api_key = true;
        self
    }

    /// Also accept the key in the query parameter `name` (for clients that cannot set headers).
    ///
    /// Query strings end up in access logs and browser histories; prefer headers.
    pub fn allow_query_param(mut self, name: &str) -> Self {
        self.config().query_param = Some(name.into());
        self
    }

    /// The status of a disabled or revoked key: 403 by default, 401 for gateways that treat it as
    /// an invalid key.
    pub fn inactive_key_status(mut self, status: StatusCode) -> Self {
        self.config().inactive_status = Some(status);
        self
    }

    /// The models that exist: a request for another one is a 404 `model_not_found`.
    pub fn known_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config().known_models = Some(Arc::new(models.into_iter().map(Into::into).collect()));
        self
    }

    /// The largest JSON body read to find the requested model (default 1 MiB); larger ones are
    /// refused with 413 when the model must be checked.
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.config().body_limit = limit;
        self
    }

    /// Replace the brute-force shield.
    pub fn shield(mut self, shield: AuthShield) -> Self {
        self.config().shield = Some(shield);
        self
    }

    /// Turn the brute-force shield off.
    pub fn no_shield(mut self) -> Self {
        self.config().shield = None;
        self
    }

    /// How the shield finds the client IP when no [`ClientIp`] is in the request (default: the
    /// peer address). Behind a proxy, put a [`ClientIpLayer`](crate::ip::ClientIpLayer) in front
    /// or pass its resolver here.
    pub fn client_ip_resolver(mut self, resolver: ClientIpResolver) -> Self {
        self.config().resolver = resolver;
        self
    }

    /// Pass the key on to the inner service (it is removed by default, so that nothing after
    /// authentication sees key text).
    pub fn forward_key(mut self) -> Self {
        self.config().forward_key = true;
        self
    }
}

impl<K> Clone for AuthLayer<K> {
    fn clone(&self) -> Self {
        AuthLayer {
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<K> fmt::Debug for AuthLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, K> Layer<S> for AuthLayer<K> {
    type Service = Auth<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
///
/// Made by [`AuthLayer`]; its example shows both in use.
///
/// ```
/// use tollgate::auth::{Auth, AuthLayer, MemoryKeyStore};
/// use tower::{service_fn, Layer};
///
/// let service: Auth<_, MemoryKeyStore> = AuthLayer::new(MemoryKeyStore::new())
///     .layer(service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     }));
/// # let _ = service;
/// ```
pub struct Auth<S, K> {
    inner: S,
    store: Arc<K>,
    config: Arc<AuthConfig>,
}

impl<S: Clone, K> Clone for Auth<S, K> {
    fn clone(&self) -> Self {
        Auth {
            inner: self.inner.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Auth<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, K, B, RB> Service<Request<B>> for Auth<S, K>
where
    S: Service<Request<InspectedBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    K: KeyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, K::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let config = &self.config;
        let sources = Sources {
            x_api_key: config.x_api_key,
            query_param: config.query_param.as_deref(),
        };
        let digest = match extract::extract(&request, &sources) {
            Ok(key) => keys::digest(&key),
            Err(rejection) => return ResponseFuture::refused(&request, rejection),
        };
        let ip = request
            .extensions()
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| {
                peer_addr(&request)
                    .map(|peer| config.resolver.resolve_from(peer, request.headers()))
            });
        if let (Some(shield), Some(ip)) = (&config.shield, ip) {
            if let Err(wait) = shield.check(ip) {
                return ResponseFuture::refused(&request, too_many_failures(wait));
            }
        }
        if !config.forward_key {
            let headers = request.headers_mut();
            headers.remove(header::AUTHORIZATION);
            if config.x_api_key {
                headers.remove(X_API_KEY);
            }
            if let Some(name) = &config.query_param {
                if let Some(uri) = extract::strip_query_param(request.uri(), name) {
                    *request.uri_mut() = uri;
                }
            }
        }
        if let Some(found) = self.store.lookup_now(&digest) {
            // Answered at once: the ready service is called now, no clone, no lookup state.
            let grpc = crate::normalize::is_grpc(&request);
            let kind = match future::admit(&self.config, found, ip, request) {
                Admit::Refuse(rejection) => future::refused(rejection, grpc),
                Admit::Call(request) => Kind::Call {
                    future: self.inner.call(request),
                },
                Admit::Inspect(request, caller) => {
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    future::inspecting(request, caller, self.config.clone(), inner, grpc)
                }
            };
            return ResponseFuture::new(kind);
        }
        let lookup = self.store.lookup(&digest);
        // The ready service answers this request; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::lookup(lookup, inner, request, self.config.clone(), ip)
    }
}

fn too_many_failures(wait: std::time::Duration) -> Rejection {
    Rejection::new(Reason::TooManyAuthFailures).with_retry_after(wait)
}

impl AuthConfig {
    /// The caller a lookup stands for, or why it is refused.
    pub(crate) fn decide(
        &self,
        lookup: Result<Option<KeyLookup>, BackendError>,
        ip: Option<IpAddr>,
    ) -> Result<Caller, Rejection> {
        let lookup = match lookup {
            Ok(Some(lookup)) => lookup,
            Ok(None) => {
                if let (Some(shield), Some(ip)) = (&self.shield, ip) {
                    if let Some(wait) = shield.record_failure(ip) {
                        return Err(too_many_failures(wait));
                    }
                }
                return Err(Rejection::new(Reason::InvalidApiKey));
            }
            Err(error) => return Err(error.into()),
        };
        let inactive = |reason| {
            let rejection = Rejection::new(reason);
            match self.inactive_status {
                Some(status) => rejection.with_status(status),
                None => rejection,
            }
        };
        match lookup.status {
            KeyStatus::Active => {}
            KeyStatus::Disabled => return Err(inactive(Reason::DisabledApiKey)),
            KeyStatus::Revoked => return Err(inactive(Reason::RevokedApiKey)),
        }
        if lookup.expires_at.is_some_and(|at| at <= SystemTime::now()) {
            return Err(Rejection::new(Reason::ExpiredApiKey));
        }
        match &lookup.account {
            AccountStatus::Active => {}
            AccountStatus::Frozen => return Err(Rejection::new(Reason::AccountFrozen)),
            AccountStatus::Blocked(why) => return Err(Rejection::account_blocked(why)),
        }
        Ok(lookup.caller)
    }

    /// Whether the model of a request matters for this caller.
    pub(crate) fn checks_models(&self, caller: &Caller) -> bool {
        self.known_models.is_some() || caller.models().is_some()
    }

    pub(crate) fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// 404 for a model that does not exist, 403 for one the caller's plan may not use.
    pub(crate) fn check_model(
        &self,
        caller: &Caller,
        request: Option<&LlmRequest>,
    ) -> Result<(), Rejection> {
        let Some(model) = request.and_then(|r| r.model.as_deref()) else {
            return Ok(());
        };
        if let Some(known) = &self.known_models {
            if !known.contains(model) {
                return Err(Rejection::model_not_found(model));
            }
        }
        if !caller.may_use_model(model) {
            return Err(Rejection::model_not_allowed(model));
        }
        Ok(())
    }
}
