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
#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "redis")]
pub mod redis;

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
    let cx = format::RenderContext::new().grpc(normalize::is_grpc(request));
    format::Format::OpenAi
        .response(rejection, &cx)
        .map(body::ResponseBody::full)
}
