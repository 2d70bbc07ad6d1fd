//! Tower middleware that turns any hyper, axum or tonic service into a metered, protected API.
//!
//! tollgate is a set of composable [Tower](https://docs.rs/tower) layers, each usable alone and
//! all of them together, outermost first:
//!
//! | layer | what it does |
//! |---|---|
//! | [`normalize`] | renders every refusal and upstream error in one format; `x-request-id` |
//! | [`auth`] | API keys (Bearer or `x-api-key`), stored as SHA-256 digests → a [`Caller`] |
//! | [`ip`] | client-IP resolution behind trusted proxies; CIDR allow and deny lists |
//! | [`ratelimit`] | token buckets per key or account, per plan; request and token limits |
//! | [`credits`] | prepaid balances: reserve, settle on real usage, never negative |
//!
//! A layer that refuses never calls the inner service: it answers with a response carrying a
//! [`Rejection`], the one error model, rendered by [`normalize`] in the chosen
//! [`Format`](format::Format) (OpenAI-compatible by default).
//!
//! # Example: the whole chain in front of an axum app
//!
//! ```
//! use axum::{extract::ConnectInfo, routing::post, Router};
//! use http::{Request, StatusCode};
//! use std::net::SocketAddr;
//! use tollgate::{
//!     auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, MemoryKeyStore},
//!     credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Price, Pricing},
//!     format::Format,
//!     ip::{ClientIpLayer, ClientIpResolver, IpAllowLayer},
//!     normalize::NormalizeLayer,
//!     ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer},
//!     Caller,
//! };
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Who may call: an account on the "free" plan, and its key (shown once, stored as a digest).
//! let keys = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
//! let key = keys.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await.unwrap();
//! // How often: 60 requests a minute on the free plan.
//! let plans = Plans::new(Plan::new()).with_plan("free", Plan::new().requests_per_minute(60));
//! // What it costs: 2 credits a call, from a prepaid balance of 5.
//! let ledger = MemoryLedger::new();
//! ledger.top_up("acct_1", 5, "invoice-1").await.unwrap();
//!
//! let resolver = ClientIpResolver::new(); // no trusted proxies: the peer address
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|caller: Caller| async move { caller.account_id().to_owned() }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(NormalizeLayer::new().format(Format::OpenAi)) // outermost
//!             .layer(ClientIpLayer::new(resolver.clone()))
//!             .layer(AuthLayer::new(keys.clone()))
//!             .layer(IpAllowLayer::new().resolver(resolver))
//!             .layer(RateLimitLayer::new(MemoryLimiter::new(), plans))
//!             .layer(CreditsLayer::new(ledger.clone(), Pricing::flat(2))),
//!     );
//!
//! let call = |bearer: &str| {
//!     Request::post("/v1/chat/completions")
//!         .header("authorization", format!("Bearer {bearer}"))
//!         .extension(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 50000))))
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//! // Allowed twice (2 + 2 credits), then the balance of 1 does not cover a call: 402.
//! for expected in [StatusCode::OK, StatusCode::OK, StatusCode::PAYMENT_REQUIRED] {
//!     let response = app.clone().oneshot(call(key.as_str())).await.unwrap();
//!     assert_eq!(response.status(), expected);
//!     assert!(response.headers().contains_key("x-request-id"));
//! }
//! assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 1);
//!
//! // A wrong key: 401 in the OpenAI format, the key never echoed.
//! let response = app.oneshot(call("sk-live-wrong")).await.unwrap();
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
//! let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(body["error"]["code"], "invalid_api_key");
//! # }
//! ```
//!
//! # Building a chain
//!
//! The layers' own constructors are the API (as above): the crate reads no configuration file.
//! The runnable gateway built on it, with its TOML schema, is a crate of its own in the
//! repository's workspace, `tollgate-gateway` in `examples/gateway/`:
//! `cargo run --release -p tollgate-gateway -- --config examples/gateway.toml`.
#![deny(unreachable_pub, unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod auth;
pub mod backend;
pub mod body;
pub mod credits;
pub mod format;
pub mod inspect;
pub mod ip;
pub mod keys;
pub mod normalize;
pub mod ratelimit;
pub mod rejection;
pub mod usage;

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(feature = "axum")]
mod axum_integration;

pub use auth::Caller;
pub use backend::BackendError;
pub use rejection::{LimitKind, Reason, Rejection};

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response a layer answers a refusal with, in the default format (OpenAI, or a gRPC status
/// for gRPC requests), with the rejection in its extensions for [`normalize`] to re-render.
#[allow(dead_code)] // used by the layers
pub(crate) fn refuse<ReqB, B>(
    request: &http::Request<ReqB>,
    rejection: &Rejection,
) -> http::Response<body::ResponseBody<B>> {
    refusal(rejection, normalize::is_grpc(request)).map(body::ResponseBody::full)
}

/// [`refuse`] once the request is gone (read by an inspection): the layer kept whether it was
/// a gRPC call. Each layer wraps the bytes in its own body type.
pub(crate) fn refusal(rejection: &Rejection, grpc: bool) -> http::Response<bytes::Bytes> {
    format::Format::OpenAi.response(rejection, &format::RenderContext::new().grpc(grpc))
}
