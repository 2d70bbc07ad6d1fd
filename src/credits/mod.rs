//! Credit gating: prepaid balances charged on real usage, never negative.
//!
//! [`CreditsLayer`] charges every request to the prepaid balance of its [`Caller`]'s account:
//!
//! 1. **Before the call** it prices the request ([`Pricing`]: a flat price per request, per
//!    route or per model, and per-token rates estimated from the JSON body's prompt and
//!    `max_tokens`) and places a **hold** of that amount on the [`Ledger`]. When the account's
//!    available credits do not cover it, the answer is 402 `insufficient_quota` with `required`
//!    and `available` (`INSUFFICIENT_CREDITS` in the envelope format) and the inner service is
//!    never called.
//! 2. **After the call** the response body streams through untouched while the OpenAI `usage`
//!    object is looked for (in a JSON body or the final chunk of an SSE stream). When the body
//!    ends, the hold is **settled** at the real cost: the unused part goes back, a cost above the
//!    hold is charged up to what is available, never below zero.
//! 3. An inner service error or an error status (>= 400) **releases** the hold: not charged. A
//!    body dropped before its end (client disconnected) is charged the hold, or the usage so far
//!    ([`OnDisconnect`]); never zero, never twice.
//!
//! Successful responses carry [`x-credits-held`](headers::CREDITS_HELD) and
//! [`x-credits-balance`](headers::CREDITS_BALANCE). The final charge is known only when the body ends,
//! after the headers were sent: it is in the [journal](LedgerAdmin::journal).
//!
//! # Idempotency-Key
//!
//! A retried request with the same `Idempotency-Key` header (per account, within the ledger's
//! window, [`MemoryLedgerBuilder::idempotency_window`](ledger::MemoryLedgerBuilder::idempotency_window)) is charged once and **never sent to the
//! inner service twice**, as Stripe does: the request is fingerprinted whole (method, path and
//! query, and a digest of every byte of its body; a JSON body with a key is always read). The
//! same request again after the first was charged gets the first answer, kept as it streamed
//! (status, content headers and the whole JSON or SSE body), with `idempotent-replayed: true`
//! and no charge. An answer larger than [`CreditsLayer::replay_limit`], cut short before its end,
//! or no longer kept (the store holds [`CreditsLayer::replay_capacity`] bytes, oldest out first;
//! it lives in the process, so another replica does not have it) is refused with 409
//! `idempotency_replay_unavailable`: it was charged, and a new request needs a new key. While the
//! first is still running a retry is 409 `idempotency_key_in_use`; the key with a different
//! request is 422 `idempotency_key_reused`. A first request that was released (an upstream
//! error) frees its key, so the retry is processed and charged normally.
//!
//! Requests without a [`Caller`] (no authentication layer in front) are refused with 401
//! `missing_api_key`, or let through free with [`CreditsLayer::allow_anonymous`].
//!
//! With [`CreditsLayer::rate_limit`] the same layer also rate-limits: the limits and the hold
//! are charged together, both or neither, and the tokens are corrected with the settlement, by
//! an [`Admission`]: [`TwoStep`] for any ledger and limiter, or the fused one of a backend that
//! keeps both ([`CreditsLayer::rate_limit_with`] and
//! [`RedisBackend::admission`](crate::redis::RedisBackend::admission): one script, one round
//! trip each way).
//!
//! Every backend passes the same [`conformance`] scenarios (exact K of N, never negative,
//! expiry, idempotency, journal equals books).
//!
//! # Holds live as long as their response
//!
//! A hold's TTL ([`ledger::MemoryLedgerBuilder::hold_ttl`] and each backend's `hold_ttl`) is
//! **idle time**: while a response streams, its [`MeteredBody`] keeps the hold alive with
//! [`Ledger::extend`] (at most once per half TTL: a clock read per frame, the extension itself
//! off the frame's path), so a stream longer than the TTL is settled at its usage. Holds nobody
//! closes within a TTL of their last sign of life (a crashed handler, a leaked future, an upstream
//! silent for a whole TTL) are settled at their held amount by [`LedgerAdmin::expire_holds`];
//! [`MemoryLedger::spawn_expiry`] runs it periodically. Every backend behaves the same
//! ([`conformance`]).
//!
//! # Shape
//!
//! - [`CreditsLayer`] / [`Credits`] / [`MeteredBody`]: the middleware; [`Pricing`] and [`Price`]
//!   say what a request costs.
//! - [`Ledger`]: the hot path (reserve, settle, release, extend); [`LedgerAdmin`]: the
//!   operator's calls (top-up, balance, journal, expiry); their values are in [`ledger`].
//! - [`Admission`]: the rate limits and the hold together ([`TwoStep`], or a backend's fused
//!   one, for [`CreditsLayer::rate_limit_with`]).
//! - [`backend`]: what a ledger implementation builds its answers with; [`conformance`]: the
//!   scenarios it must pass.
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Extension, Router};
//! use http::{Request, StatusCode};
//! use tollgate::{
//!     credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Price, Pricing},
//!     Caller,
//! };
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ledger = MemoryLedger::new();
//! ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
//!
//! let pricing = Pricing::new().model("small", Price::flat(1).per_1k_tokens(10));
//! let app = Router::new()
//!     .route(
//!         "/v1/chat/completions",
//!         post(|| async {
//!             axum::Json(serde_json::json!({
//!                 "choices": [],
//!                 "usage": {"prompt_tokens": 100, "completion_tokens": 200, "total_tokens": 300}
//!             }))
//!         }),
//!     )
//!     .layer(CreditsLayer::new(ledger.clone(), pricing))
//!     // Stands in for the authentication layer.
//!     .layer(Extension(Caller::builder("key_1", "acct_1").build()));
//!
//! let request = Request::post("/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(axum::body::Body::from(r#"{"model":"small","max_tokens":500}"#))
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! // Held: 1 + ceil(500 × 10 / 1000) = 6 credits.
//! assert_eq!(response.headers()["x-credits-held"], "6");
//! assert_eq!(response.headers()["x-credits-balance"], "94");
//!
//! // Reading the body to its end settles: 1 + ceil(300 × 10 / 1000) = 4 credits.
//! axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
//! assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 96);
//! # }
//! ```

mod admission;
pub mod backend;
mod body;
mod clock;
pub mod conformance;
pub mod ledger;
pub(crate) mod memory;
mod pricing;
pub mod promote;
mod replay;
mod service;

pub use admission::{Admission, TwoStep, Verdict};
pub use body::{finish_settlements, MeteredBody};
pub use clock::ManualClock;
pub use ledger::{Ledger, LedgerAdmin};
pub use memory::MemoryLedger;
pub use pricing::{ModelPricing, Price, Pricing};
pub use service::{Credits, CreditsLayer, OnDisconnect, ResponseFuture};

/// The headers the [`CreditsLayer`] reads and writes.
pub mod headers {
    pub use super::service::{CREDITS_BALANCE, CREDITS_HELD, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
}

/// The defaults of the credits layer, its pricing and the memory ledger.
pub mod defaults {
    pub use super::memory::{DEFAULT_HOLD_TTL, DEFAULT_IDEMPOTENCY_WINDOW};
    pub use super::pricing::{DEFAULT_MAX_TOKENS, DEFAULT_USAGE_CEILING};
    pub use super::replay::{DEFAULT_REPLAY_CAPACITY, DEFAULT_REPLAY_LIMIT};
}

#[allow(unused_imports)] // doc links
use crate::Caller;
