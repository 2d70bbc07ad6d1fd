//! A backend's credits and rate limits in one layer in front of a model that reports usage, and
//! a chat request through it: the one-step admission tests of every shared backend.

#![allow(dead_code)]

use tollgate::{
    credits::{Admission, CreditsLayer, Ledger, MeteredBody, Pricing},
    ratelimit::{KeyBy, Plan, Plans, RateLimitLayer},
};

/// The usage every response of [`one_step`]'s upstream reports: 50 tokens.
pub const USAGE: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":40,"total_tokens":50}}"#;

type Upstream = http::Request<tollgate::inspect::InspectedBody<axum::body::Body>>;

/// A shared backend's three parts for [`one_step`]: its ledger, its limiter and its fused
/// admission (both in one round trip).
pub trait Backend {
    /// The backend's ledger.
    type Ledger: Ledger + Clone;
    /// The backend's fused admission.
    type Admission: Admission;
    /// The ledger, the limiter and the admission.
    fn parts(
        &self,
    ) -> (
        Self::Ledger,
        <Self::Admission as Admission>::Limiter,
        Self::Admission,
    );
}

#[cfg(feature = "redis")]
impl Backend for tollgate::redis::RedisBackend {
    type Ledger = tollgate::redis::RedisLedger;
    type Admission = tollgate::redis::RedisAdmission;
    fn parts(&self) -> (Self::Ledger, tollgate::redis::RedisLimiter, Self::Admission) {
        (self.ledger(), self.limiter(), self.admission())
    }
}

#[cfg(feature = "postgres")]
impl Backend for tollgate::postgres::PostgresBackend {
    type Ledger = tollgate::postgres::PostgresLedger;
    type Admission = tollgate::postgres::PostgresAdmission;
    fn parts(
        &self,
    ) -> (
        Self::Ledger,
        tollgate::postgres::PostgresLimiter,
        Self::Admission,
    ) {
        (self.ledger(), self.limiter(), self.admission())
    }
}

/// `backend`'s credits and rate limits in one layer (`CreditsLayer::rate_limit_with` and its
/// fused admission) in front of an upstream that reports [`USAGE`].
pub fn one_step<B: Backend>(
    backend: &B,
    plan: Plan,
    key_by: KeyBy,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<MeteredBody<axum::body::Body, B::Ledger>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync {
    let (ledger, limiter, admission) = backend.parts();
    use tower::Layer;
    let upstream = tower::service_fn(|_: Upstream| async {
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::from(USAGE))
                .unwrap(),
        )
    });
    CreditsLayer::new(ledger, Pricing::flat(1))
        .rate_limit_with(
            RateLimitLayer::new(limiter, Plans::new(plan)).key_by(key_by),
            admission,
        )
        .layer(upstream)
}

/// A chat completion (max_tokens 100) from key `key_1` of account `acct_1`.
pub fn chat_request() -> http::Request<axum::body::Body> {
    let mut request = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
    request
        .extensions_mut()
        .insert(tollgate::Caller::builder("key_1", "acct_1").build());
    request
}

/// Sends one [`chat_request`], reads its body to the end, and returns the status, headers and
/// body.
pub async fn send_one<S, B>(service: &S) -> (u16, http::HeaderMap, String)
where
    S: tower::Service<
            http::Request<axum::body::Body>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = service.clone().oneshot(chat_request()).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
