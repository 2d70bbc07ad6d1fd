use std::{
    fmt,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{future::ResponseFuture, ClientIp, ClientIpResolver, IpSet};
use crate::{body::ResponseBody, Caller, Reason, Rejection};

/// The request's client IP: the [`ClientIp`] an earlier layer resolved, else resolved now (and
/// recorded for the layers after).
fn client_ip<B>(
    resolver: &ClientIpResolver,
    request: &mut Request<B>,
) -> Result<IpAddr, Rejection> {
    if let Some(ClientIp(ip)) = request.extensions().get::<ClientIp>() {
        return Ok(*ip);
    }
    let ip = resolver.resolve(request)?;
    request.extensions_mut().insert(ClientIp(ip));
    Ok(ip)
}

/// Resolves the client IP of every request and puts it into the extensions as [`ClientIp`], for
/// the layers after it (authentication's brute-force shield, rate limits, IP allowlists).
///
/// A request without a peer address is refused with 403 `ip_not_allowed`.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tollgate::ip::{ClientIp, ClientIpLayer, ClientIpResolver, PeerAddr};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let service = ServiceBuilder::new()
///     .layer(ClientIpLayer::new(
///         ClientIpResolver::new().trust_proxies("10.0.0.0/8".parse().unwrap()),
///     ))
///     .service(service_fn(|request: Request<()>| async move {
///         let ClientIp(ip) = request.extensions().get::<ClientIp>().copied().unwrap();
///         Ok::<_, Infallible>(Response::new(ip.to_string()))
///     }));
///
/// let mut request = Request::builder()
///     .header("x-forwarded-for", "2001:db8::7")
///     .body(())
///     .unwrap();
/// request.extensions_mut().insert(PeerAddr("10.1.2.3:443".parse().unwrap()));
/// let response = service.oneshot(request).await.unwrap();
/// use http_body_util::BodyExt;
/// let body = response.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(body, "2001:db8::7");
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct ClientIpLayer {
    resolver: Arc<ClientIpResolver>,
}

impl ClientIpLayer {
    /// Resolve client IPs with `resolver`.
    pub fn new(resolver: ClientIpResolver) -> Self {
        ClientIpLayer {
            resolver: Arc::new(resolver),
        }
    }
}

impl<S> Layer<S> for ClientIpLayer {
    type Service = ClientIpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientIpService {
            inner,
            resolver: self.resolver.clone(),
        }
    }
}

/// The service of [`ClientIpLayer`].
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tollgate::ip::{ClientIp, ClientIpLayer, ClientIpResolver, PeerAddr};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let service = ClientIpLayer::new(ClientIpResolver::new()).layer(service_fn(|req: Request<()>| async move {
///     let ip = req.extensions().get::<ClientIp>().unwrap().0;
///     Ok::<_, Infallible>(Response::new(ip.to_string()))
/// }));
/// let mut request = Request::new(());
/// request.extensions_mut().insert(PeerAddr("192.0.2.9:5000".parse().unwrap()));
/// let response = service.oneshot(request).await.unwrap();
/// use http_body_util::BodyExt;
/// let body = response.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(body, "192.0.2.9");
/// # }
/// ```
pub struct ClientIpService<S> {
    inner: S,
    resolver: Arc<ClientIpResolver>,
}

impl<S: Clone> Clone for ClientIpService<S> {
    fn clone(&self) -> Self {
        ClientIpService {
            inner: self.inner.clone(),
            resolver: self.resolver.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ClientIpService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIpService")
            .field("inner", &self.inner)
            .field("resolver", &self.resolver)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ClientIpService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        match client_ip(&self.resolver, &mut request) {
            Ok(_) => ResponseFuture::inner(self.inner.call(request)),
            Err(rejection) => ResponseFuture::refused(crate::refuse(&request, &rejection)),
        }
    }
}

/// Refuses requests whose client IP is denied, outside the global allowlist, or outside the
/// allowlist of the caller's key: 403 `ip_not_allowed`, the message naming the IP.
///
/// Deny wins over allow. An empty allowlist allows every address; the key's allowlist (from the
/// [`Caller`] the authentication layer put in the request) applies when it has one, so place
/// this layer after authentication. The client IP is the [`ClientIp`] an earlier
/// [`ClientIpLayer`] resolved, else this layer resolves it with its own resolver and records it.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tollgate::ip::{IpAllowLayer, PeerAddr};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let service = ServiceBuilder::new()
///     .layer(IpAllowLayer::new().deny("192.0.2.0/24".parse().unwrap()))
///     .service(service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) }));
///
/// let mut request = Request::new(());
/// request.extensions_mut().insert(PeerAddr("192.0.2.7:5000".parse().unwrap()));
/// let response = service.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), StatusCode::FORBIDDEN);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct IpAllowLayer {
    config: Arc<AllowConfig>,
}

#[derive(Clone, Debug, Default)]
struct AllowConfig {
    allow: IpSet,
    deny: IpSet,
    ignore_key_allowlists: bool,
    resolver: ClientIpResolver,
}

impl AllowConfig {
    fn check(&self, ip: IpAddr, caller: Option<&Caller>) -> Result<(), Rejection> {
        let refused = || {
            Rejection::new(Reason::IpNotAllowed)
                .with_message(format!("IP address {ip} is not allowed to use this API."))
                .with_detail("ip", ip.to_string())
        };
        if self.deny.contains(ip) {
            return Err(refused());
        }
        if !self.allow.is_empty() && !self.allow.contains(ip) {
            return Err(refused());
        }
        if !self.ignore_key_allowlists {
            if let Some(allowlist) = caller.and_then(Caller::ip_allowlist) {
                if !allowlist.contains(ip) {
                    return Err(Rejection::ip_not_allowed(ip));
                }
            }
        }
        Ok(())
    }
}

impl IpAllowLayer {
    /// Allow every address, apply keys' allowlists, trust no proxy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allow only these networks (besides any key's own allowlist).
    pub fn allow(mut self, networks: IpSet) -> Self {
        Arc::make_mut(&mut self.config).allow = networks;
        self
    }

    /// Refuse these networks, whatever the allowlists say.
    pub fn deny(mut self, networks: IpSet) -> Self {
        Arc::make_mut(&mut self.config).deny = networks;
        self
    }

    /// How to find the client IP when no earlier layer did (default: the peer address).
    pub fn resolver(mut self, resolver: ClientIpResolver) -> Self {
        Arc::make_mut(&mut self.config).resolver = resolver;
        self
    }

    /// Do not apply the allowlists of keys (on by default).
    pub fn ignore_key_allowlists(mut self) -> Self {
        Arc::make_mut(&mut self.config).ignore_key_allowlists = true;
        self
    }
}

impl<S> Layer<S> for IpAllowLayer {
    type Service = IpAllow<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IpAllow {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`IpAllowLayer`].
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tollgate::ip::{IpAllowLayer, PeerAddr};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let service = IpAllowLayer::new()
///     .deny("192.0.2.0/24".parse().unwrap())
///     .layer(service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) }));
/// let mut request = Request::new(());
/// request.extensions_mut().insert(PeerAddr("192.0.2.9:5000".parse().unwrap()));
/// assert_eq!(service.oneshot(request).await.unwrap().status(), StatusCode::FORBIDDEN);
/// # }
/// ```
pub struct IpAllow<S> {
    inner: S,
    config: Arc<AllowConfig>,
}

impl<S: Clone> Clone for IpAllow<S> {
    fn clone(&self) -> Self {
        IpAllow {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for IpAllow<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpAllow")
            .field("inner", &self.inner)
            .field("allow", &self.config.allow.len())
            .field("deny", &self.config.deny.len())
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for IpAllow<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        let checked = client_ip(&self.config.resolver, &mut request)
            .and_then(|ip| self.config.check(ip, request.extensions().get::<Caller>()));
        match checked {
            Ok(()) => ResponseFuture::inner(self.inner.call(request)),
            Err(rejection) => ResponseFuture::refused(crate::refuse(&request, &rejection)),
        }
    }
}
