//! Rate limiting: GCRA token buckets per caller and plan, on requests and tokens.
//!
//! [`RateLimit`] charges every request to the buckets of its caller's [`Plan`] — one cell per
//! requests limit, the estimated tokens per tokens limit — all-or-nothing, before calling the
//! inner service, and corrects the tokens from the `usage` the response reports.
//!
//! - **Who**: a [`Caller`](crate::Caller)'s key or account ([`KeyBy`]); without a `Caller`, the
//!   [`ClientIp`](crate::ip::ClientIp), else a peer `SocketAddr` (or axum's `ConnectInfo`) in the
//!   extensions; without any of them, one shared anonymous bucket.
//! - **How much**: [`Plans`], a registry of named plans changeable at runtime, plus an optional
//!   global limit and per-route overrides.
//! - **Tokens**: the cost is the prompt estimate plus `max_tokens` (read with
//!   [`inspect`](crate::inspect), unless an earlier layer did), corrected when the response body
//!   ends or is dropped: more tokens are consumed, fewer are given back.
//! - **Refusal**: 429 `rate_limit_exceeded` naming the limit, with `retry-after` (whole seconds,
//!   rounded up) and `retry-after-ms`, never earlier than the bucket allows. A cost larger than a
//!   full bucket is a 429 without a retry time. A failing backend is a 503 `backend_unavailable`.
//! - **Headers** (unless [`headers(false)`](RateLimitLayer::headers)), for the most
//!   restrictive limit of each kind, on every response of a limited route:
//!
//! | header | example | meaning |
//! |---|---|---|
//! | `x-ratelimit-limit-requests` | `100` | requests a full bucket holds |
//! | `x-ratelimit-remaining-requests` | `99` | requests that would pass now |
//! | `x-ratelimit-reset-requests` | `600ms` | until the bucket is full again ([`go_duration`]) |
//! | `x-ratelimit-{limit,remaining,reset}-tokens` | `40000`, `39750`, `375ms` | the same for tokens |
//! | `RateLimit-Policy` | `"requests";q=100;w=60, "tokens";q=40000;w=60` | quota `q` per window `w` seconds |
//! | `RateLimit` | `"requests";r=99;t=1, "tokens";r=39750;t=1` | remaining `r`, seconds to full `t` (rounded up) |
//!
//! The backend is a [`Limiter`]: [`MemoryLimiter`] (governor's GCRA, in memory) by default, a
//! distributed one ([`RedisLimiter`](crate::redis::RedisLimiter), feature `redis`); both pass the
//! same [`conformance`] vectors.
//!
//! To charge the limits and a credit hold in one step (both or neither; one Redis round trip),
//! hand the layer to [`CreditsLayer::rate_limit`](crate::credits::CreditsLayer::rate_limit)
//! instead of putting it in front.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use governor::clock::FakeRelativeClock;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tollgate::ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer};
//! use tollgate::Caller;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let plans = Plans::new(Plan::new().requests_per_minute(2))
//!     .with_plan("trusted", Plan::new().requests_per_minute(100));
//! let clock = FakeRelativeClock::default();
//! let service = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(MemoryLimiter::with_clock(clock.clone()), plans.clone()))
//!     .service(service_fn(|_req| async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }));
//!
//! let request = || {
//!     let mut req = Request::new(Full::new(Bytes::new()));
//!     req.extensions_mut().insert(Caller::builder("key_1", "acct_1").build());
//!     req
//! };
//! let res = service.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["x-ratelimit-limit-requests"], "2");
//! assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "1");
//! assert_eq!(res.headers()["ratelimit-policy"], "\"requests\";q=2;w=60");
//! assert_eq!(res.headers()["ratelimit"], "\"requests\";r=1;t=30");
//!
//! service.clone().oneshot(request()).await.unwrap();
//! let res = service.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "30");
//! assert_eq!(res.headers()["retry-after-ms"], "30000");
//!
//! clock.advance(Duration::from_secs(30));
//! assert_eq!(service.oneshot(request()).await.unwrap().status(), 200);
//! # }
//! ```

mod body;
#[doc(hidden)]
pub mod conformance;
mod future;
mod gate;
mod gcra;
mod headers;
mod layer;
mod limiter;
mod memory;
mod plan;
mod service;

pub(crate) use body::Meter as TokenMeter;
pub use body::RateLimitBody;
pub use future::ResponseFuture;
pub(crate) use gate::{Charges, Gate, RequestLimits};
pub use headers::{go_duration, RATELIMIT, RATELIMIT_POLICY};
pub use layer::{KeyBy, RateLimitLayer};
pub use limiter::{
    BucketKey, Charge, Correction, Decision, LimitStatus, Limiter, Outcome, Subject,
};
pub use memory::MemoryLimiter;
pub use plan::{Limit, Plan, Plans};
pub use service::RateLimit;
