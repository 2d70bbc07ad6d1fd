//! Client-IP resolution behind trusted proxies, and CIDR allow and deny lists.
//!
//! [`ClientIpResolver`] finds a request's client IP: the peer address, or, when the peer is a
//! trusted proxy, the address its forwarding header names (walked from the right, skipping
//! trusted hops). [`ClientIpLayer`] records it as [`ClientIp`] for the layers after it;
//! [`IpAllowLayer`] refuses addresses outside the allowlists with 403 `ip_not_allowed`. Lists are
//! [`IpSet`]s: prefix tries, as fast with ten thousand networks as with one.
//!
//! # Example
//!
//! ```
//! use axum::{extract::ConnectInfo, routing::get, Router};
//! use http::{Request, StatusCode};
//! use std::net::SocketAddr;
//! use tollgate::ip::{ClientIpResolver, IpAllowLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/v1/models", get(|| async { "[]" })).layer(
//!     IpAllowLayer::new()
//!         .allow("203.0.113.0/24, 2001:db8::/32".parse().unwrap())
//!         .resolver(ClientIpResolver::new().trust_proxies("10.0.0.0/8".parse().unwrap())),
//! );
//!
//! // Through the load balancer at 10.0.0.1, from 198.51.100.4: refused, naming the IP.
//! let mut request = Request::get("/v1/models")
//!     .header("x-forwarded-for", "203.0.113.5, 198.51.100.4")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! request.extensions_mut().insert(ConnectInfo("10.0.0.1:5000".parse::<SocketAddr>().unwrap()));
//! let response = app.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//! let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
//! let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(body["error"]["code"], "ip_not_allowed");
//! assert_eq!(body["error"]["message"], "IP address 198.51.100.4 is not allowed to use this API.");
//!
//! // From 203.0.113.5 directly: allowed.
//! let mut request = Request::get("/v1/models").body(axum::body::Body::empty()).unwrap();
//! request.extensions_mut().insert(ConnectInfo("203.0.113.5:5000".parse::<SocketAddr>().unwrap()));
//! assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

mod future;
mod resolve;
mod service;
mod set;

use std::net::IpAddr;

pub use future::ResponseFuture;
pub use resolve::{peer_addr, ClientIpResolver, ForwardedHeader, PeerAddr};
pub use service::{ClientIpLayer, ClientIpService, IpAllow, IpAllowLayer};
pub use set::{parse_network, InvalidCidr, IpSet};

/// The client's IP address as resolved by the IP layers, in the request's extensions.
///
/// Other layers (rate limits per IP, the brute-force shield) read it.
///
/// # Example
///
/// ```
/// use http::Request;
/// use tollgate::ip::ClientIp;
///
/// let mut request = Request::new(());
/// request.extensions_mut().insert(ClientIp("192.0.2.1".parse().unwrap()));
/// assert_eq!(request.extensions().get::<ClientIp>().unwrap().0.to_string(), "192.0.2.1");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);
