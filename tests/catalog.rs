//! The error catalog in every format, and plan promotion on a top-up (memory and Redis).
//!
//! Formats: per tollgate code the catalog overrides the status, `type`, `code` (string or JSON
//! number), message (with placeholders) and `param`; headers follow the final status; upstream
//! failures normalized by the chain go through the same catalog. Promotion: an applied top-up
//! moves the account's plan once, a replay never does, the next lookup sees the new plan, and
//! concurrent top-ups report the promotion exactly once with every credit in the books.

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, UNIX_EPOCH};

use axum::{body::Body, routing::get, Router};
use http::{Request, StatusCode};
use serde_json::{json, Value};
use tollgate::{
    auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStore, MemoryKeyStore},
    credits::{
        ledger::{EntryKind, JournalQuery},
        promote::{PlanChange, Promote, Promotions, TopUpPromoter},
        LedgerAdmin, MemoryLedger,
    },
    format::{ErrorCatalog, ErrorOverride, Format, RenderContext},
    keys, LimitKind, Reason, Rejection,
};
use tower::ServiceExt;

fn billing() -> ErrorCatalog {
    ErrorCatalog::new().with(
        Reason::InsufficientCredits,
        ErrorOverride::new()
            .status(StatusCode::BAD_REQUEST)
            .error_type("billing_error")
            .code(402)
            .message("Need {required} credits, have {available}.")
            .param("amount"),
    )
}

fn body(response: &http::Response<bytes::Bytes>) -> Value {
    serde_json::from_slice(response.body()).unwrap()
}

fn cx() -> RenderContext<'static> {
    RenderContext::new()
        .path("/v1/chat/completions")
        .request_id("req_1")
        .now(UNIX_EPOCH + Duration::from_secs(1_729_764_000))
}

#[test]
fn openai_body_takes_every_field_of_the_entry() {
    let response = billing().response(
        &Format::OpenAi,
        &Rejection::insufficient_credits(30, 10),
        &cx(),
    );
    assert_eq!(response.status(), 400);
    assert_eq!(
        body(&response),
        json!({"error": {"message": "Need 30 credits, have 10.", "type": "billing_error", "param": "amount", "code": 402}})
    );
    assert_eq!(response.headers()["x-should-retry"], "false");
    // The rejection in the extensions keeps tollgate's own code for logs and metrics.
    let rejection = response.extensions().get::<Rejection>().unwrap();
    assert_eq!(rejection.code(), "insufficient_quota");
}

#[test]
fn envelope_takes_the_status_code_and_message() {
    let response = billing().response(
        &Format::Envelope,
        &Rejection::insufficient_credits(30, 10),
        &cx(),
    );
    assert_eq!(response.status(), 400);
    assert_eq!(
        body(&response),
        json!({
            "success": false,
            "statusCode": 400,
            "error": {
                "code": 402,
                "message": "Need 30 credits, have 10.",
                "details": {"required": 30, "available": 10, "param": "amount"}
            },
            "timestamp": "2024-10-24T10:00:00.000Z",
            "path": "/v1/chat/completions"
        })
    );
    // A status alone: the envelope's own code stays.
    let catalog = ErrorCatalog::new().with(
        Reason::InsufficientCredits,
        ErrorOverride::new().status(StatusCode::PAYMENT_REQUIRED),
    );
    let response = catalog.response(
        &Format::Envelope,
        &Rejection::insufficient_credits(30, 10),
        &cx(),
    );
    assert_eq!(response.status(), 402);
    assert_eq!(body(&response)["statusCode"], 402);
    assert_eq!(body(&response)["error"]["code"], "INSUFFICIENT_CREDITS");
}

#[test]
fn problem_details_take_the_type_uri_status_title_and_code() {
    let catalog = ErrorCatalog::new().with(
        Reason::InsufficientCredits,
        ErrorOverride::new()
            .status(StatusCode::FORBIDDEN)
            .error_type("https://example.com/probs/out-of-credit")
            .code("out_of_credit")
            .message("You do not have enough credit."),
    );
    let response = catalog.response(
        &Format::Problem,
        &Rejection::insufficient_credits(30, 10),
        &cx(),
    );
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(
        body(&response),
        json!({
            "type": "https://example.com/probs/out-of-credit",
            "title": "Forbidden",
            "status": 403,
            "detail": "You do not have enough credit.",
            "instance": "/v1/chat/completions",
            "code": "out_of_credit",
            "details": {"required": 30, "available": 10},
            "request_id": "req_1"
        })
    );
}

#[test]
fn grpc_status_maps_from_the_final_status() {
    let grpc = cx().grpc(true);
    let default = ErrorCatalog::new().response(
        &Format::OpenAi,
        &Rejection::insufficient_credits(30, 10),
        &grpc,
    );
    assert_eq!(default.headers()["grpc-status"], "8"); // 402: RESOURCE_EXHAUSTED
    let response = billing().response(
        &Format::OpenAi,
        &Rejection::insufficient_credits(30, 10),
        &grpc,
    );
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "3"); // 400: INVALID_ARGUMENT
    assert_eq!(
        response.headers()["grpc-message"],
        "Need 30 credits, have 10."
    );
}

#[test]
fn retry_headers_follow_the_final_status() {
    let limited = Rejection::rate_limited(LimitKind::Requests, Duration::from_millis(1500));
    // 429 → 400: not retryable, no Retry-After.
    let catalog = ErrorCatalog::new().with(
        Reason::RateLimited,
        ErrorOverride::new().status(StatusCode::BAD_REQUEST),
    );
    let response = catalog.response(&Format::OpenAi, &limited, &cx());
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert!(response.headers().get("retry-after").is_none());
    // 429 → 503: retryable, Retry-After kept.
    let catalog = ErrorCatalog::new().with(
        Reason::RateLimited,
        ErrorOverride::new().status(StatusCode::SERVICE_UNAVAILABLE),
    );
    let response = catalog.response(&Format::OpenAi, &limited, &cx());
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-should-retry"], "true");
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    // 402 → 500: retryable.
    let catalog = ErrorCatalog::new().with(
        Reason::InsufficientCredits,
        ErrorOverride::new().status(StatusCode::INTERNAL_SERVER_ERROR),
    );
    let response = catalog.response(
        &Format::OpenAi,
        &Rejection::insufficient_credits(1, 0),
        &cx(),
    );
    assert_eq!(response.headers()["x-should-retry"], "true");
    // An explicit "never retry" (a request larger than the whole bucket) stays.
    let never = limited.clone().with_should_retry(false);
    let response = catalog.response(&Format::OpenAi, &never, &cx());
    assert_eq!(response.headers()["x-should-retry"], "false");
}

#[tokio::test]
async fn upstream_failures_normalized_by_the_chain_go_through_the_catalog() {
    use tollgate::normalize::NormalizeLayer;
    let api_error = |message: &'static str| {
        ErrorOverride::new()
            .error_type("api_error")
            .code("api_error")
            .message(message)
    };
    let catalog = ErrorCatalog::new()
        .with(Reason::Internal, api_error("internal"))
        .with(Reason::BadGateway, api_error("bad gateway"))
        .with(
            Reason::ServiceUnavailable,
            api_error("unavailable").status(StatusCode::BAD_GATEWAY),
        )
        .with(Reason::GatewayTimeout, api_error("timeout"));
    let app = Router::new()
        .route(
            "/500",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "stack trace") }),
        )
        .route("/502", get(|| async { StatusCode::BAD_GATEWAY }))
        .route(
            "/503",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "<html>busy</html>") }),
        )
        .route("/504", get(|| async { StatusCode::GATEWAY_TIMEOUT }))
        .layer(NormalizeLayer::new().catalog(catalog));
    for (path, status, message) in [
        ("/500", 500, "internal"),
        ("/502", 502, "bad gateway"),
        ("/503", 502, "unavailable"),
        ("/504", 504, "timeout"),
    ] {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.headers()["x-should-retry"], "true", "{path}");
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": message, "type": "api_error", "param": null, "code": "api_error"}}),
            "{path}"
        );
    }
}

#[tokio::test]
async fn normalize_message_is_a_catalog_entry_and_keeps_the_default_status() {
    use tollgate::normalize::NormalizeLayer;
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        NormalizeLayer::new()
            .format(Format::Envelope)
            .message(Reason::NotFound, "Resource does not exist"),
    );
    let response = app
        .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let bytes = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    assert_eq!(body["error"]["message"], "Resource does not exist");
}

fn promotions() -> Promotions {
    Promotions::new().after_top_up("free", "trusted")
}

const KEY: &str = "sk-test-promote-000000000";

async fn seed<K: KeyAdmin>(store: &K) {
    store
        .put_account(AccountRecord::new("acct_free", "free"))
        .await
        .unwrap();
    store
        .put_account(AccountRecord::new("acct_pro", "pro"))
        .await
        .unwrap();
    store
        .insert_key(keys::digest(KEY), KeyRecord::new("key_1", "acct_free"))
        .await
        .unwrap();
}

/// Eight concurrent top-ups of one account: one promotion, every credit in the books.
async fn promotes_once<P: TopUpPromoter, K: KeyStore + KeyAdmin, L: LedgerAdmin>(
    promoter: &P,
    store: &K,
    ledger: &L,
) {
    let before = store.lookup(&keys::digest(KEY)).await.unwrap().unwrap();
    assert_eq!(before.caller.plan(), "free");

    let results = futures_util::future::join_all(
        (0..8)
            .map(|i| promoter.top_up_and_promote("acct_free", 100 + i, format!("inv-{i}").leak())),
    )
    .await;
    let changes: Vec<PlanChange> = results
        .iter()
        .map(|r| r.as_ref().unwrap())
        .inspect(|p| assert!(p.top_up.applied))
        .filter_map(|p| p.plan_change.clone())
        .collect();
    assert_eq!(changes, [PlanChange::new("free", "trusted")]);

    // The very next lookup authenticates on the new plan.
    let after = store.lookup(&keys::digest(KEY)).await.unwrap().unwrap();
    assert_eq!(after.caller.plan(), "trusted");
    assert_eq!(
        store
            .account("acct_free")
            .await
            .unwrap()
            .unwrap()
            .plan
            .as_ref(),
        "trusted"
    );

    // Books: balance = Σ top-ups, one journal entry each.
    let total: u64 = (0..8).map(|i| 100 + i).sum();
    assert_eq!(ledger.balance("acct_free").await.unwrap().balance, total);
    let journal = ledger
        .journal("acct_free", JournalQuery::new())
        .await
        .unwrap();
    assert_eq!(journal.len(), 8);
    assert!(journal.iter().all(|e| e.kind == EntryKind::TopUp));
    assert_eq!(journal.iter().map(|e| e.amount).sum::<u64>(), total);

    // An operator moves it back; a replay adds nothing and promotes nothing.
    store.set_account_plan("acct_free", "free").await.unwrap();
    let replay = promoter
        .top_up_and_promote("acct_free", 100, "inv-0")
        .await
        .unwrap();
    assert!(!replay.top_up.applied);
    assert_eq!(replay.plan_change, None);
    assert_eq!(
        store
            .account("acct_free")
            .await
            .unwrap()
            .unwrap()
            .plan
            .as_ref(),
        "free"
    );
    // A new top-up promotes again (the rule is about the plan, not the account's history).
    let again = promoter
        .top_up_and_promote("acct_free", 1, "inv-new")
        .await
        .unwrap();
    assert_eq!(again.plan_change, Some(PlanChange::new("free", "trusted")));

    // A plan without a rule stays; an account the key store does not know is topped up.
    let pro = promoter
        .top_up_and_promote("acct_pro", 5, "inv-pro")
        .await
        .unwrap();
    assert!(pro.top_up.applied && pro.plan_change.is_none());
    let stranger = promoter
        .top_up_and_promote("acct_nobody", 5, "inv-x")
        .await
        .unwrap();
    assert!(stranger.top_up.applied && stranger.plan_change.is_none());
    assert_eq!(ledger.balance("acct_nobody").await.unwrap().balance, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_promotes_on_the_first_applied_top_up() {
    let store = MemoryKeyStore::new();
    seed(&store).await;
    let ledger = MemoryLedger::new();
    let promoter = Promote::new(ledger.clone(), store.clone(), promotions());
    promotes_once(&promoter, &store, &ledger).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_promotes_in_the_top_up_script() {
    use tollgate::redis::{RedisBackend, RedisPromoter};
    let server = redis_server::RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let store = backend.key_store();
    seed(&store).await;
    let ledger = backend.ledger();
    let promoter = RedisPromoter::new(ledger.clone(), store.clone(), promotions());
    // `promotes_once` warms this replica's cache on the old plan: the promotion must drop it.
    promotes_once(&promoter, &store, &ledger).await;

    // Another replica sees the plan too (its cache is dropped by the published invalidation,
    // and the plan lives in Redis).
    let other = RedisBackend::connect(&server.url())
        .await
        .unwrap()
        .key_store();
    let found = other.lookup(&keys::digest(KEY)).await.unwrap().unwrap();
    assert_eq!(found.caller.plan(), "trusted");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_top_up_and_plan_change_are_one_script() {
    use tollgate::redis::{RedisBackend, RedisPromoter};
    let server = redis_server::RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let store = backend.key_store();
    seed(&store).await;
    let promoter = RedisPromoter::new(backend.ledger(), store.clone(), promotions());
    // Load the script (a first EVALSHA answers NOSCRIPT).
    promoter
        .top_up_and_promote("acct_pro", 1, "warm-up")
        .await
        .unwrap();
    let before = server.script_calls().await;
    let promoted = promoter
        .top_up_and_promote("acct_free", 10, "inv-1")
        .await
        .unwrap();
    assert_eq!(
        promoted.plan_change,
        Some(PlanChange::new("free", "trusted"))
    );
    // One script call moved the balance and the plan: no second step to lose.
    assert_eq!(server.script_calls().await - before, 1);
}
