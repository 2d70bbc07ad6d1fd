//! The admin router: top-ups, balances, journals, keys and plans, behind an admin key.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use axum::{body::Body, extract::ConnectInfo, Router};
use governor::clock::FakeRelativeClock;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    admin,
    auth::{AccountRecord, AuthLayer, AuthShield, KeyAdmin, KeyRecord, KeyStatus, MemoryKeyStore},
    credits::{ledger::JournalQuery, LedgerAdmin, MemoryLedger},
    format::Format,
    normalize::NormalizeLayer,
};
use tower::{Layer, ServiceExt};

const ADMIN: &str = "admin-key-0123456789";

fn setup() -> (MemoryKeyStore, MemoryLedger, Router) {
    let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
    let ledger = MemoryLedger::new();
    let app = Router::new().nest(
        "/admin",
        admin::router(store.clone(), ledger.clone(), ADMIN)
            .plans(["free", "trusted"])
            .build(),
    );
    (store, ledger, app)
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let svc = NormalizeLayer::new().layer(app.clone());
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn needs_the_admin_key() {
    let (_, _, app) = setup();
    let (status, body) = call(&app, "GET", "/admin/accounts/acct_1", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_api_key");
    let (status, body) = call(
        &app,
        "GET",
        "/admin/accounts/acct_1",
        None,
        Some("admin-key-wrong-000"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body.to_string().contains("admin-key-wrong"));
}

#[tokio::test]
async fn top_up_balance_and_journal() {
    let (_, ledger, app) = setup();
    let (status, body) = call(
        &app,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(json!({"amount": 250})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"account": "acct_1", "applied": true, "balance": 250, "held": 0, "available": 250})
    );

    let (status, body) = call(&app, "GET", "/admin/accounts/acct_1", None, Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"id": "acct_1", "plan": "free", "frozen": false, "status": "active",
               "balance": 250, "held": 0, "holds": 0, "available": 250})
    );
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 250);

    let (status, body) = call(
        &app,
        "GET",
        "/admin/accounts/acct_1/journal",
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["kind"], "top_up");
    assert_eq!(entries[0]["amount"], 250);
    assert_eq!(entries[0]["balance_after"], 250);
}

#[tokio::test]
async fn top_ups_are_idempotent_with_a_key() {
    let (_, _, app) = setup();
    let top_up = |amount: u64| {
        Request::post("/admin/accounts/acct_1/top-up")
            .header("authorization", format!("Bearer {ADMIN}"))
            .header("content-type", "application/json")
            .header("idempotency-key", "invoice-7")
            .body(Body::from(json!({"amount": amount}).to_string()))
            .unwrap()
    };
    for applied in [true, false] {
        let res = app.clone().oneshot(top_up(100)).await.unwrap();
        assert_eq!(res.status(), 200);
        let body: Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["applied"], applied);
        assert_eq!(body["balance"], 100);
    }
    let res = NormalizeLayer::new()
        .layer(app.clone())
        .oneshot(top_up(999))
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_in_format() {
    let (_, _, app) = setup();
    let (status, body) = call(
        &app,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(json!({"amount": -5})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = call(
        &app,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(json!({"amount": 0})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["param"], "amount");
    let (status, body) = call(
        &app,
        "POST",
        "/admin/accounts/nope/top-up",
        Some(json!({"amount": 5})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "No account `nope`.");
    let (status, body) = call(
        &app,
        "PATCH",
        "/admin/accounts/acct_1",
        Some(json!({"plan": "gold"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["message"], "There is no plan `gold`.");

    let svc = NormalizeLayer::new()
        .format(Format::Envelope)
        .layer(app.clone());
    let res = svc
        .oneshot(
            Request::post("/admin/accounts/acct_1/top-up")
                .header("authorization", format!("Bearer {ADMIN}"))
                .header("content-type", "application/json")
                .body(Body::from("{oops"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["success"], false);
    // The code the chain gives any malformed JSON body (`invalid_json`), in the envelope's case.
    assert_eq!(body["error"]["code"], "INVALID_JSON");
}

#[tokio::test]
async fn keys_created_revoked_and_plans_changed_apply_at_once() {
    let (store, ledger, app) = setup();
    ledger.top_up("acct_1", 10, "seed").await.unwrap();
    let (status, body) = call(
        &app,
        "POST",
        "/admin/keys",
        Some(json!({"account": "acct_1", "id": "key_9"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["id"], "key_9");
    let key = body["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-live-"));

    // The key works through the auth layer...
    let api = Router::new()
        .route(
            "/v1/models",
            axum::routing::get(|caller: tollgate::Caller| async move { caller.plan().to_owned() }),
        )
        .layer(AuthLayer::new(store.clone()));
    let whoami = |api: Router| {
        let key = key.clone();
        async move {
            let res = api
                .oneshot(
                    Request::get("/v1/models")
                        .header("authorization", format!("Bearer {key}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(
        whoami(api.clone()).await,
        (StatusCode::OK, "free".to_owned())
    );

    // ...a plan change applies to the next request...
    let (status, body) = call(
        &app,
        "PATCH",
        "/admin/accounts/acct_1",
        Some(json!({"plan": "trusted"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["plan"], "trusted");
    assert_eq!(
        whoami(api.clone()).await,
        (StatusCode::OK, "trusted".to_owned())
    );

    // ...so does freezing...
    let (_, body) = call(
        &app,
        "PATCH",
        "/admin/accounts/acct_1",
        Some(json!({"frozen": true})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(body["frozen"], true);
    assert_eq!(whoami(api.clone()).await.0, StatusCode::FORBIDDEN);
    call(
        &app,
        "PATCH",
        "/admin/accounts/acct_1",
        Some(json!({"frozen": false})),
        Some(ADMIN),
    )
    .await;

    // ...and revocation.
    let (status, body) = call(&app, "POST", "/admin/keys/key_9/revoke", None, Some(ADMIN)).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": "key_9", "status": "revoked"}))
    );
    assert_eq!(whoami(api.clone()).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        store.key("key_9").await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );

    // Revocation is final (the details: `revocation_is_final`).
    let (status, _) = call(&app, "POST", "/admin/keys/key_9/disable", None, Some(ADMIN)).await;
    assert_eq!(status, 409);
    let (status, _) = call(
        &app,
        "POST",
        "/admin/keys/missing/revoke",
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &app,
        "POST",
        "/admin/keys",
        Some(json!({"account": "acct_1", "id": "key_9"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn accounts_can_be_created() {
    let (_, _, app) = setup();
    let (status, body) = call(
        &app,
        "POST",
        "/admin/accounts",
        Some(json!({"id": "acct_2", "plan": "trusted"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["plan"], "trusted");
    assert_eq!(body["balance"], 0);
    let (status, _) = call(
        &app,
        "POST",
        "/admin/accounts",
        Some(json!({"id": "acct_2", "plan": "trusted"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 409);
}

/// One admin request from a client at `peer`, rendered by `Normalize` in `format`: the status,
/// the `retry-after` header and the body.
async fn call_from(
    app: &Router,
    format: Format,
    peer: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: &str,
) -> (StatusCode, Option<String>, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let mut req = req
        .body(Body::from(body.unwrap_or_default().to_owned()))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let res = NormalizeLayer::new()
        .format(format)
        .layer(app.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, retry_after, body)
}

fn openai_error(message: &str, kind: &str, param: Option<&str>, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// 300 wrong admin keys from one client: the first 100 (the default shield) are 401, the rest
/// 429 `too_many_auth_failures`, and then even the right key is refused from that client; from
/// another client the right key still works, and nothing was applied by the guesser.
#[tokio::test]
async fn wrong_admin_keys_are_throttled_per_client() {
    let (_, ledger, app) = setup();
    let attacker = "203.0.113.7:40000";
    let mut unauthorized = 0;
    let mut throttled = 0;
    for i in 0..300 {
        let (status, retry_after, body) = call_from(
            &app,
            Format::OpenAi,
            attacker,
            "POST",
            "/admin/accounts/acct_1/top-up",
            Some(r#"{"amount": 1000}"#),
            &format!("admin-key-guess-{i:04}"),
        )
        .await;
        match status {
            StatusCode::UNAUTHORIZED => {
                assert_eq!(throttled, 0, "a 401 after the throttle began");
                assert_eq!(
                    body,
                    openai_error(
                        "Incorrect admin key.",
                        "authentication_error",
                        None,
                        "invalid_api_key"
                    )
                );
                unauthorized += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(
                    body,
                    openai_error(
                        "Too many failed authentication attempts from your IP address. Try again later.",
                        "rate_limit_error",
                        None,
                        "too_many_auth_failures"
                    )
                );
                let wait: u64 = retry_after.expect("retry-after").parse().unwrap();
                assert!((1..=3).contains(&wait), "retry-after {wait}");
                throttled += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((unauthorized, throttled), (100, 200));

    // The throttled client is refused before its key is compared: the right key too.
    let (status, _, body) = call_from(
        &app,
        Format::OpenAi,
        attacker,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(r#"{"amount": 5}"#),
        ADMIN,
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "too_many_auth_failures");
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 0);

    // A client that did not fail is not affected.
    let (status, _, body) = call_from(
        &app,
        Format::OpenAi,
        "198.51.100.2:50000",
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(r#"{"amount": 5}"#),
        ADMIN,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balance"], 5);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 5);
    assert_eq!(
        ledger
            .journal("acct_1", JournalQuery::new())
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The shield's failures age out on its clock (a fake one here: no sleeping), and a router served
/// without peer addresses still throttles: such requests share one bucket.
#[tokio::test]
async fn the_admin_shield_ages_out_and_covers_unknown_clients() {
    let clock = FakeRelativeClock::default();
    let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
    let app = Router::new().nest(
        "/admin",
        admin::router(store, MemoryLedger::new(), ADMIN)
            .shield(AuthShield::new(3, Duration::from_secs(60)).with_clock(clock.clone()))
            .build(),
    );
    let get = |key: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::get("/admin/accounts/acct_1")
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap();
            let res = NormalizeLayer::new().layer(app).oneshot(req).await.unwrap();
            let retry_after = res
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (res.status(), retry_after)
        }
    };
    for _ in 0..3 {
        assert_eq!(get("admin-key-wrong-0000").await.0, 401);
    }
    assert_eq!(
        get("admin-key-wrong-0000").await,
        (StatusCode::TOO_MANY_REQUESTS, Some("20".to_owned()))
    );
    assert_eq!(get(ADMIN).await.0, 429);
    // One failure replenishes every 20 s.
    clock.advance(Duration::from_secs(20));
    assert_eq!(get(ADMIN).await, (StatusCode::OK, None));
}

/// Bodies are JSON objects with known fields: an array is not read as a struct (`[7]` was a
/// top-up of 7, `[null,true]` froze the account), an unknown field is named; nothing is applied,
/// and the refusal comes in the configured format.
#[tokio::test]
async fn bodies_must_be_objects_with_known_fields() {
    let (store, ledger, app) = setup();
    let peer = "192.0.2.1:1000";
    let not_an_object = openai_error(
        r#"The body must be a JSON object, such as {"amount": 500}."#,
        "invalid_request_error",
        None,
        "bad_request",
    );
    for body in ["[7]", " [7]", "7", "\"7\"", "null", ""] {
        let (status, _, answer) = call_from(
            &app,
            Format::OpenAi,
            peer,
            "POST",
            "/admin/accounts/acct_1/top-up",
            Some(body),
            ADMIN,
        )
        .await;
        assert_eq!(
            (status, &answer),
            (StatusCode::BAD_REQUEST, &not_an_object),
            "{body}"
        );
    }
    let (status, _, answer) = call_from(
        &app,
        Format::OpenAi,
        peer,
        "PATCH",
        "/admin/accounts/acct_1",
        Some("[null,true]"),
        ADMIN,
    )
    .await;
    assert_eq!((status, answer), (StatusCode::BAD_REQUEST, not_an_object));

    let (status, _, answer) = call_from(
        &app,
        Format::OpenAi,
        peer,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(r#"{"amount": 7, "currency": "usd"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        answer,
        openai_error(
            "Invalid body: unknown field `currency`, expected `amount` at line 1 column 24.",
            "invalid_request_error",
            None,
            "validation_failed"
        )
    );
    let (status, _, answer) = call_from(
        &app,
        Format::OpenAi,
        peer,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(r#"{"amount": 7, "amount": 8}"#),
        ADMIN,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        answer["error"]["message"],
        "Invalid body: duplicate field `amount` at line 1 column 22."
    );

    // The same refusal in another configured format: RFC 9457 problem details.
    let (status, _, answer) = call_from(
        &app,
        Format::Problem,
        peer,
        "PATCH",
        "/admin/accounts/acct_1",
        Some(r#"{"frozen": true, "blocked": true}"#),
        ADMIN,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(answer["status"], 422);
    assert_eq!(
        answer["detail"],
        "Invalid body: unknown field `blocked`, expected `plan` or `frozen` at line 1 column 26."
    );

    // Too large, or not JSON at all.
    let huge = format!(r#"{{"amount": 7, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let (status, _, answer) = call_from(
        &app,
        Format::OpenAi,
        peer,
        "POST",
        "/admin/accounts/acct_1/top-up",
        Some(&huge),
        ADMIN,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(
        answer,
        openai_error(
            "The body is larger than 64 KiB, or was cut off.",
            "invalid_request_error",
            None,
            "payload_too_large"
        )
    );
    let mut req = Request::post("/admin/accounts/acct_1/top-up")
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"amount": 7}"#))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let res = NormalizeLayer::new()
        .layer(app.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let answer: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(answer["error"]["code"], "unsupported_media_type");

    // Nothing was applied: no top-up, the account not frozen.
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (0, 0));
    assert!(ledger
        .journal("acct_1", JournalQuery::new())
        .await
        .unwrap()
        .is_empty());
    let (status, body) = call(&app, "GET", "/admin/accounts/acct_1", None, Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"id": "acct_1", "plan": "free", "frozen": false, "status": "active",
               "balance": 0, "held": 0, "holds": 0, "available": 0})
    );
    assert!(
        store.account("acct_1").await.unwrap().unwrap().status
            == tollgate::auth::AccountStatus::Active
    );
}

/// A key that would be born expired is refused; so is an empty `ip_allowlist` (on a key it would
/// mean "no IP", on the global list "every IP") and an empty `models`. No key is created.
#[tokio::test]
async fn keys_born_expired_or_with_empty_lists_are_refused() {
    let (store, _, app) = setup();
    let peer = "192.0.2.1:1000";
    let cases = [
        (
            json!({"account": "acct_1", "id": "key_old", "expires_at": "2020-01-01T00:00:00Z"}),
            openai_error(
                "`expires_at` must be in the future.",
                "invalid_request_error",
                Some("expires_at"),
                "validation_failed",
            ),
        ),
        (
            json!({"account": "acct_1", "id": "key_old", "ip_allowlist": []}),
            openai_error(
                "`ip_allowlist` must name at least one network; omit it to allow every IP, or disable the key to allow none.",
                "invalid_request_error",
                Some("ip_allowlist"),
                "validation_failed",
            ),
        ),
        (
            json!({"account": "acct_1", "id": "key_old", "models": []}),
            openai_error(
                "`models` must name at least one model; omit it for every model of the plan.",
                "invalid_request_error",
                Some("models"),
                "validation_failed",
            ),
        ),
    ];
    for (request, expected) in cases {
        let (status, _, answer) = call_from(
            &app,
            Format::OpenAi,
            peer,
            "POST",
            "/admin/keys",
            Some(&request.to_string()),
            ADMIN,
        )
        .await;
        assert_eq!(
            (status, answer),
            (StatusCode::UNPROCESSABLE_ENTITY, expected)
        );
        assert!(store.key("key_old").await.unwrap().is_none(), "{request}");
    }

    // A future expiry and a real allowlist are fine.
    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    let (status, _, answer) = call_from(
        &app,
        Format::OpenAi,
        peer,
        "POST",
        "/admin/keys",
        Some(
            &json!({"account": "acct_1", "id": "key_new", "expires_at": expires.to_string(),
                    "ip_allowlist": ["10.0.0.0/8"]})
            .to_string(),
        ),
        ADMIN,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let record = store.key("key_new").await.unwrap().unwrap();
    assert_eq!(record.status, KeyStatus::Active);
    assert!(record.expires_at.unwrap() > SystemTime::now());
    assert_eq!(record.ip_allowlist.unwrap().to_string(), "10.0.0.0/8");
}

/// A revoked key stays revoked: neither `disable` nor `enable` moves it (409 `conflict`), while a
/// disabled key can be enabled again and revoking twice is harmless.
#[tokio::test]
async fn revocation_is_final() {
    let (store, _, app) = setup();
    let peer = "192.0.2.1:1000";
    store
        .create_key("sk-live-", KeyRecord::new("key_1", "acct_1"))
        .await
        .unwrap();
    let post =
        |path: &'static str| call_from(&app, Format::OpenAi, peer, "POST", path, None, ADMIN);

    let (status, _, body) = post("/admin/keys/key_1/disable").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": "key_1", "status": "disabled"}))
    );
    let (status, _, body) = post("/admin/keys/key_1/enable").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": "key_1", "status": "active"}))
    );
    assert_eq!(
        store.key("key_1").await.unwrap().unwrap().status,
        KeyStatus::Active
    );

    for _ in 0..2 {
        let (status, _, body) = post("/admin/keys/key_1/revoke").await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!({"id": "key_1", "status": "revoked"}))
        );
    }
    for (path, verb) in [
        ("/admin/keys/key_1/disable", "disabled"),
        ("/admin/keys/key_1/enable", "enabled"),
    ] {
        let (status, _, body) = post(path).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            body,
            openai_error(
                &format!(
                    "The key `key_1` is revoked, and revocation is final: it cannot be {verb}."
                ),
                "invalid_request_error",
                None,
                "conflict"
            )
        );
        assert_eq!(
            store.key("key_1").await.unwrap().unwrap().status,
            KeyStatus::Revoked
        );
    }
    let (status, _, body) = post("/admin/keys/nope/enable").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "No key `nope`.");

    // The store itself refuses, whoever calls it.
    let error = store
        .set_key_status("key_1", KeyStatus::Active)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the key `key_1` is revoked, and revocation is final"
    );
    let mut record = store.key("key_1").await.unwrap().unwrap();
    record.status = KeyStatus::Active;
    assert!(store.update_key(record).await.is_err());
    assert_eq!(
        store.key("key_1").await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
}

/// The journal's `limit` is capped at `admin::JOURNAL_LIMIT_MAX` (1000): more is a 400 naming
/// the cap, the default page is `admin::JOURNAL_LIMIT_DEFAULT` (100), and `has_more` says
/// when to page on with `after`.
#[tokio::test]
async fn the_journal_limit_is_capped() {
    let (_, ledger, app) = setup();
    let peer = "192.0.2.1:1000";
    for i in 0..1005u64 {
        ledger
            .top_up("acct_1", 1, &format!("seed-{i}"))
            .await
            .unwrap();
    }
    let get = |query: String| {
        let app = app.clone();
        async move {
            call_from(
                &app,
                Format::OpenAi,
                peer,
                "GET",
                &format!("/admin/accounts/acct_1/journal{query}"),
                None,
                ADMIN,
            )
            .await
        }
    };
    let too_many = openai_error(
        "`limit` must be a whole number from 1 to 1000; page with `after` for more.",
        "invalid_request_error",
        Some("limit"),
        "bad_request",
    );
    for limit in ["1001", "1000000000", "1e9", "0", "-1", "ten"] {
        let (status, _, body) = get(format!("?limit={limit}")).await;
        assert_eq!(
            (status, &body),
            (StatusCode::BAD_REQUEST, &too_many),
            "{limit}"
        );
    }
    let (status, _, body) = get("?limit=10&offset=5".to_owned()).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "The journal takes the query parameters `after` and `limit` only."
    );

    let (status, _, body) = get(String::new()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["entries"].as_array().unwrap().len(),
        admin::JOURNAL_LIMIT_DEFAULT
    );
    assert_eq!(body["has_more"], true);

    let (status, _, body) = get("?limit=1000".to_owned()).await;
    assert_eq!(status, 200);
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1000);
    assert_eq!(entries[999]["seq"], 1000);
    assert_eq!(entries[999]["balance_after"], 1000);
    assert_eq!(body["has_more"], true);

    let (status, _, body) = get("?after=1000&limit=1000".to_owned()).await;
    assert_eq!(status, 200);
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[4]["balance_after"], 1005);
    assert_eq!(body["has_more"], false);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 1005);
}
