//! Authentication: API keys → a [`Caller`].
//!
//! [`AuthLayer`] finds the key in `Authorization: Bearer <key>` (and, when enabled, in an
//! `x-api-key` header or a query parameter), hashes it with SHA-256 and looks the digest up in a
//! [`KeyStore`]. On success the [`Caller`] goes into the request's extensions (with the `axum`
//! feature it is an extractor) and the key leaves the request. Otherwise the request is refused,
//! never reaching the inner service:
//!
//! | case | status | code |
//! |---|---|---|
//! | no key | 401 | `missing_api_key` |
//! | wrong scheme, malformed header, several `Authorization` headers | 401 | `malformed_api_key` |
//! | leading or trailing whitespace around the key | 401 | `api_key_whitespace` |
//! | unknown key | 401 | `invalid_api_key` |
//! | expired key | 401 | `expired_api_key` |
//! | disabled or revoked key | 403 (or 401, see [`AuthLayer::inactive_key_status`]) | `api_key_disabled`, `api_key_revoked` |
//! | frozen or blocked account | 403 | `account_frozen`, `account_blocked` |
//! | too many unknown keys from one client IP ([`AuthShield`]) | 429 | `too_many_auth_failures` |
//! | a model the caller's plan may not use | 403 | `model_not_allowed` |
//! | a model not among [`AuthLayer::known_models`] | 404 | `model_not_found` |
//!
//! No refusal, log line or header ever contains the key's text. Keys are stored as digests only
//! (see [`keys`](crate::keys)); [`MemoryKeyStore`] keeps a ready-built `Caller` per key and applies
//! every change (revoke, disable, rotate, change plan, freeze) to the very next request.
//!
//! The model is read from the JSON body's `model` field only for callers whose plan or key lists
//! models (or when `known_models` is set); the body is read once, bounded, and replayed to the
//! inner service.
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Router};
//! use http::{Request, StatusCode};
//! use tollgate::{auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, MemoryKeyStore}, Caller};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryKeyStore::new()
//!     .with_account(AccountRecord::new("acct_1", "free"))
//!     .with_plan_models("free", ["small-model"]);
//! let key = store.create_key("sk-live-", KeyRecord::new("key_1", "acct_1")).await.unwrap();
//!
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|caller: Caller| async move { caller.account_id().to_owned() }))
//!     .layer(AuthLayer::new(store.clone()));
//!
//! let chat = |model: &str| {
//!     Request::post("/v1/chat/completions")
//!         .header("authorization", format!("Bearer {}", key.as_str()))
//!         .header("content-type", "application/json")
//!         .body(axum::body::Body::from(format!(r#"{{"model":"{model}","messages":[]}}"#)))
//!         .unwrap()
//! };
//! let response = app.clone().oneshot(chat("small-model")).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! // The free plan may not use the large model: 403, naming it.
//! let response = app.clone().oneshot(chat("large-model")).await.unwrap();
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//!
//! // Revocation applies to the very next request.
//! store.revoke_key("key_1").await.unwrap();
//! let response = app.oneshot(chat("small-model")).await.unwrap();
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//! let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
//! let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(body["error"]["code"], "api_key_revoked");
//! # }
//! ```

#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod cache;
mod caller;
mod extract;
mod future;
mod service;
mod shield;
mod store;
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
pub(crate) mod stored;

pub use caller::{Caller, CallerBuilder};
pub use future::ResponseFuture;
pub use service::{Auth, AuthLayer};
pub use shield::AuthShield;
pub use store::{
    AccountRecord, AccountStatus, KeyAdmin, KeyAdminError, KeyLookup, KeyRecord, KeyStatus,
    KeyStore, MemoryKeyStore,
};
