//! The admin router: top-ups, balances, journals, keys and plans, behind an admin key.

use axum::{body::Body, Router};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    admin,
    auth::{AccountRecord, AuthLayer, KeyAdmin, KeyStatus, MemoryKeyStore},
    credits::{Ledger, MemoryLedger},
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
    assert_eq!(body["error"]["code"], "INVALID_PARAMETERS");
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

    let (status, _) = call(&app, "POST", "/admin/keys/key_9/disable", None, Some(ADMIN)).await;
    assert_eq!(status, 200);
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
