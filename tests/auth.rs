//! The authentication layer, black-box through an axum app: the request, the status, the body.

use std::{
    future::{ready, Ready},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use axum::{body::Body, extract::ConnectInfo, routing::post, Json, Router};
use governor::clock::FakeRelativeClock;
use http::{HeaderMap, Request, StatusCode, Uri};
use serde_json::{json, Value};
use tollgate::{
    auth::{
        AccountRecord, AccountStatus, AuthLayer, AuthShield, KeyAdmin, KeyLookup, KeyRecord,
        KeyStore, MemoryKeyStore,
    },
    keys::{self, KeyDigest},
    BackendError, Caller,
};
use tower::ServiceExt;

const KEY: &str = "sk-test-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c";
const OTHER_KEY: &str = "sk-test-0000000000000000000000000000000000";

fn store() -> MemoryKeyStore {
    MemoryKeyStore::new()
        .with_account(AccountRecord::new("acct_1", "free"))
        .with_account(AccountRecord::new("acct_2", "pro"))
        .with_key(keys::digest(KEY), KeyRecord::new("key_1", "acct_1"))
}

async fn whoami(caller: Caller, headers: HeaderMap, uri: Uri, body: String) -> Json<Value> {
    Json(json!({
        "key_id": caller.key_id(),
        "account_id": caller.account_id(),
        "plan": caller.plan(),
        "authorization": headers.contains_key("authorization"),
        "x_api_key": headers.contains_key("x-api-key"),
        "uri": uri.to_string(),
        "body": body,
    }))
}

fn app(layer: AuthLayer<MemoryKeyStore>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(whoami))
        .layer(layer)
}

fn request() -> http::request::Builder {
    Request::post("/v1/chat/completions")
}

fn from(ip: &str, mut request: Request<Body>) -> Request<Body> {
    request.extensions_mut().insert(ConnectInfo(
        format!("{ip}:40000").parse::<SocketAddr>().unwrap(),
    ));
    request
}

fn bearer(key: &str) -> Request<Body> {
    from(
        "192.0.2.1",
        request()
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap(),
    )
}

fn chat(key: &str, model: &str) -> Request<Body> {
    from(
        "192.0.2.1",
        request()
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hi"}}]}}"#
            )))
            .unwrap(),
    )
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    raw: String,
    body: Value,
}

async fn send<S>(service: S, request: Request<Body>) -> Answer
where
    S: tower::Service<
        Request<Body>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
    >,
{
    let response = service.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let raw = String::from_utf8(bytes.to_vec()).unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        raw,
        body,
    }
}

fn error(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// No refusal shows any part of the key.
fn assert_no_key(answer: &Answer, key: &str) {
    let secret = &key[8..];
    assert!(
        !answer.raw.contains(secret),
        "body echoes the key: {}",
        answer.raw
    );
    for (name, value) in &answer.headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(secret),
            "header {name} echoes the key"
        );
    }
}

#[tokio::test]
async fn a_valid_key_reaches_the_service_as_a_caller_without_its_text() {
    let answer = send(app(AuthLayer::new(store())), bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["key_id"], "key_1");
    assert_eq!(answer.body["account_id"], "acct_1");
    assert_eq!(answer.body["plan"], "free");
    assert_eq!(answer.body["authorization"], false);
}

#[tokio::test]
async fn forward_key_keeps_the_header() {
    let answer = send(app(AuthLayer::new(store()).forward_key()), bearer(KEY)).await;
    assert_eq!(answer.body["authorization"], true);
}

#[tokio::test]
async fn no_key_is_401_saying_how_to_pass_one() {
    let answer = send(
        app(AuthLayer::new(store())),
        from("192.0.2.1", request().body(Body::empty()).unwrap()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.body,
        error(
            "You didn't provide an API key. Pass it in the Authorization header as `Authorization: Bearer YOUR_KEY`.",
            "authentication_error",
            "missing_api_key"
        )
    );
    assert_eq!(answer.headers["content-type"], "application/json");
}

#[tokio::test]
async fn a_wrong_scheme_is_401_malformed_without_echo() {
    for value in [
        format!("Basic {KEY}"),
        KEY.to_owned(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
    ] {
        let answer = send(
            app(AuthLayer::new(store())),
            from(
                "192.0.2.1",
                request()
                    .header("authorization", value)
                    .body(Body::empty())
                    .unwrap(),
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.body["error"]["code"], "malformed_api_key");
        assert_eq!(answer.body["error"]["type"], "authentication_error");
        assert_no_key(&answer, KEY);
    }
    let answer = send(
        app(AuthLayer::new(store())),
        from(
            "192.0.2.1",
            request()
                .header("authorization", format!("Basic {KEY}"))
                .body(Body::empty())
                .unwrap(),
        ),
    )
    .await;
    assert_eq!(
        answer.body,
        error(
            "The Authorization header must use the Bearer scheme: `Authorization: Bearer YOUR_KEY`.",
            "authentication_error",
            "malformed_api_key"
        )
    );
}

#[tokio::test]
async fn several_authorization_headers_are_refused_never_first_wins() {
    let answer = send(
        app(AuthLayer::new(store())),
        from(
            "192.0.2.1",
            request()
                .header("authorization", format!("Bearer {KEY}"))
                .header("authorization", format!("Bearer {OTHER_KEY}"))
                .body(Body::empty())
                .unwrap(),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.body,
        error(
            "The request has several Authorization headers. Send exactly one: `Authorization: Bearer YOUR_KEY`.",
            "authentication_error",
            "malformed_api_key"
        )
    );
    assert_no_key(&answer, KEY);
}

#[tokio::test]
async fn whitespace_around_the_key_is_401_pointing_at_the_environment_variable() {
    for value in [
        format!("Bearer {KEY} "),
        format!("Bearer  {KEY}"),
        format!("Bearer {KEY}\t"),
    ] {
        let answer = send(
            app(AuthLayer::new(store())),
            from(
                "192.0.2.1",
                request()
                    .header("authorization", value)
                    .body(Body::empty())
                    .unwrap(),
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            answer.body,
            error(
                "Your API key has leading or trailing whitespace. Check the environment variable that holds it for spaces or a trailing newline.",
                "authentication_error",
                "api_key_whitespace"
            )
        );
        assert_no_key(&answer, KEY);
    }
}

#[tokio::test]
async fn an_unknown_key_is_401_invalid_api_key() {
    let answer = send(app(AuthLayer::new(store())), bearer(OTHER_KEY)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.body,
        error(
            "Incorrect API key provided. Check the key you are using, or create a new one.",
            "authentication_error",
            "invalid_api_key"
        )
    );
    assert_no_key(&answer, OTHER_KEY);
}

#[tokio::test]
async fn an_expired_key_is_401() {
    let store = store().with_key(
        keys::digest(OTHER_KEY),
        KeyRecord::new("key_old", "acct_1").expires_at(SystemTime::now() - Duration::from_secs(1)),
    );
    let answer = send(app(AuthLayer::new(store)), bearer(OTHER_KEY)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.body,
        error(
            "Your API key has expired. Create a new key to continue.",
            "authentication_error",
            "expired_api_key"
        )
    );
}

#[tokio::test]
async fn disabled_and_revoked_keys_are_403_or_401_when_configured() {
    let store = store();
    let app403 = app(AuthLayer::new(store.clone()));
    let app401 = app(AuthLayer::new(store.clone()).inactive_key_status(StatusCode::UNAUTHORIZED));

    store.disable_key("key_1").await.unwrap();
    let answer = send(app403.clone(), bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.body,
        error(
            "Your API key has been disabled.",
            "permission_error",
            "api_key_disabled"
        )
    );
    assert_no_key(&answer, KEY);

    store.revoke_key("key_1").await.unwrap();
    let answer = send(app403, bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.body,
        error(
            "Your API key has been revoked.",
            "permission_error",
            "api_key_revoked"
        )
    );
    let answer = send(app401, bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["error"]["code"], "api_key_revoked");
}

#[tokio::test]
async fn frozen_and_blocked_accounts_are_403_until_unfrozen() {
    let store = store();
    let app = app(AuthLayer::new(store.clone()));

    store.freeze_account("acct_1").await.unwrap();
    let answer = send(app.clone(), bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.body,
        error(
            "Your account is frozen. Contact support to unfreeze it.",
            "permission_error",
            "account_frozen"
        )
    );

    store
        .set_account_status("acct_1", AccountStatus::Blocked("unpaid invoice".into()))
        .await
        .unwrap();
    let answer = send(app.clone(), bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.body,
        error(
            "Your account is blocked: unpaid invoice",
            "permission_error",
            "account_blocked"
        )
    );

    store.unfreeze_account("acct_1").await.unwrap();
    assert_eq!(send(app, bearer(KEY)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn rotation_and_plan_changes_apply_to_the_next_request() {
    let store = store();
    let app = app(AuthLayer::new(store.clone()));

    store.set_account_plan("acct_1", "pro").await.unwrap();
    assert_eq!(send(app.clone(), bearer(KEY)).await.body["plan"], "pro");

    store
        .rotate_key("key_1", keys::digest(OTHER_KEY))
        .await
        .unwrap();
    assert_eq!(
        send(app.clone(), bearer(KEY)).await.body["error"]["code"],
        "invalid_api_key"
    );
    let answer = send(app, bearer(OTHER_KEY)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["key_id"], "key_1");
}

#[tokio::test]
async fn x_api_key_only_when_enabled_and_it_must_agree_with_authorization() {
    let with_header = |key: &str| {
        from(
            "192.0.2.1",
            request()
                .header("x-api-key", key)
                .body(Body::empty())
                .unwrap(),
        )
    };
    let answer = send(app(AuthLayer::new(store())), with_header(KEY)).await;
    assert_eq!(answer.body["error"]["code"], "missing_api_key");

    let enabled = app(AuthLayer::new(store()).allow_x_api_key());
    let answer = send(enabled.clone(), with_header(KEY)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["x_api_key"], false);

    let answer = send(
        enabled.clone(),
        with_header(&format!("{KEY}\n").replace('\n', " ")),
    )
    .await;
    assert_eq!(answer.body["error"]["code"], "api_key_whitespace");

    let mut conflicting = bearer(KEY);
    conflicting
        .headers_mut()
        .insert("x-api-key", OTHER_KEY.parse().unwrap());
    let answer = send(enabled, conflicting).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["error"]["code"], "malformed_api_key");
    assert_no_key(&answer, KEY);
    assert_no_key(&answer, OTHER_KEY);
}

#[tokio::test]
async fn query_string_keys_only_when_enabled_and_removed_from_the_uri() {
    let with_query = || {
        from(
            "192.0.2.1",
            Request::post(format!("/v1/chat/completions?stream=1&api_key={KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
    };
    let answer = send(app(AuthLayer::new(store())), with_query()).await;
    assert_eq!(answer.body["error"]["code"], "missing_api_key");

    let answer = send(
        app(AuthLayer::new(store()).allow_query_param("api_key")),
        with_query(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["uri"], "/v1/chat/completions?stream=1");
}

#[tokio::test]
async fn plan_models_are_enforced_from_the_body_which_still_reaches_the_service() {
    let store = store().with_plan_models("free", ["small-model"]);
    let app = app(AuthLayer::new(store.clone()).known_models(["small-model", "large-model"]));

    let answer = send(app.clone(), chat(KEY, "small-model")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body["body"],
        r#"{"model":"small-model","messages":[{"role":"user","content":"Hi"}]}"#
    );

    let answer = send(app.clone(), chat(KEY, "large-model")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.body,
        json!({"error": {
            "message": "Your plan does not have access to the model `large-model`. Upgrade your plan to use it.",
            "type": "permission_error",
            "param": "model",
            "code": "model_not_allowed",
        }})
    );

    let answer = send(app.clone(), chat(KEY, "no-such-model")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.body,
        json!({"error": {
            "message": "The model `no-such-model` does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }})
    );

    // Upgrading the plan applies at once.
    store.set_account_plan("acct_1", "pro").await.unwrap();
    assert_eq!(
        send(app, chat(KEY, "large-model")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_when_the_model_matters() {
    let store = store().with_plan_models("free", ["small-model"]);
    let app = app(AuthLayer::new(store).body_limit(16));
    let answer = send(app, chat(KEY, "small-model")).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.body["error"]["code"], "payload_too_large");
}

/// A store that counts lookups, to see the shield refuse before the store is asked.
#[derive(Clone)]
struct Counting {
    inner: MemoryKeyStore,
    lookups: Arc<AtomicUsize>,
}

impl KeyStore for Counting {
    type Future = Ready<Result<Option<KeyLookup>, BackendError>>;

    fn lookup(&self, digest: &KeyDigest) -> Self::Future {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(digest)
    }
}

#[tokio::test]
async fn repeated_failures_from_one_ip_are_429_before_the_store_is_asked() {
    let clock = FakeRelativeClock::default();
    let lookups = Arc::new(AtomicUsize::new(0));
    let store = Counting {
        inner: store(),
        lookups: lookups.clone(),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(whoami))
        .layer(
            AuthLayer::new(store)
                .shield(AuthShield::new(3, Duration::from_secs(60)).with_clock(clock.clone())),
        );

    for _ in 0..3 {
        let answer = send(app.clone(), bearer(OTHER_KEY)).await;
        assert_eq!(answer.body["error"]["code"], "invalid_api_key");
    }
    // The fourth failure is one too many.
    let answer = send(app.clone(), bearer(OTHER_KEY)).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        answer.body,
        error(
            "Too many failed authentication attempts from your IP address. Try again later.",
            "rate_limit_error",
            "too_many_auth_failures"
        )
    );
    assert_eq!(answer.headers["retry-after"], "20");
    assert_no_key(&answer, OTHER_KEY);
    assert_eq!(lookups.load(Ordering::SeqCst), 4);

    // Now even a valid key is refused, without asking the store.
    let answer = send(app.clone(), bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(lookups.load(Ordering::SeqCst), 4);

    // Another IP is not affected.
    let mut elsewhere = bearer(KEY);
    elsewhere
        .extensions_mut()
        .insert(ConnectInfo("198.51.100.1:1".parse::<SocketAddr>().unwrap()));
    assert_eq!(send(app.clone(), elsewhere).await.status, StatusCode::OK);

    clock.advance(Duration::from_secs(20));
    assert_eq!(send(app, bearer(KEY)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_shield_can_be_turned_off() {
    let app = app(AuthLayer::new(store())
        .shield(
            AuthShield::new(1, Duration::from_secs(60)).with_clock(FakeRelativeClock::default()),
        )
        .no_shield());
    for _ in 0..5 {
        assert_eq!(
            send(app.clone(), bearer(OTHER_KEY)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
}

struct Down;

impl KeyStore for Down {
    type Future = Ready<Result<Option<KeyLookup>, BackendError>>;

    fn lookup(&self, _: &KeyDigest) -> Self::Future {
        ready(Err(BackendError::new(
            "redis at 10.0.0.3:6379 refused the connection",
        )))
    }
}

#[tokio::test]
async fn a_failing_store_is_503_without_its_error_text() {
    let app = Router::new()
        .route("/v1/chat/completions", post(whoami))
        .layer(AuthLayer::new(Down));
    let answer = send(app, bearer(KEY)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body["error"]["code"], "backend_unavailable");
    assert_eq!(answer.headers["retry-after"], "1");
    assert!(!answer.raw.contains("10.0.0.3"));
}

#[tokio::test]
async fn grpc_requests_are_refused_with_a_grpc_status() {
    let request = from(
        "192.0.2.1",
        request()
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap(),
    );
    let answer = send(app(AuthLayer::new(store())), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "16");
}

#[tokio::test]
async fn generated_keys_work_end_to_end_and_only_their_digest_is_stored() {
    let store = store();
    let key = store
        .create_key(
            "sk-live-",
            KeyRecord::new("key_new", "acct_2").plan("enterprise"),
        )
        .await
        .unwrap();
    assert!(key.as_str().starts_with("sk-live-"));
    assert!(!format!("{store:?}").contains(key.as_str()));
    let answer = send(app(AuthLayer::new(store)), bearer(key.as_str())).await;
    assert_eq!(answer.body["key_id"], "key_new");
    assert_eq!(answer.body["account_id"], "acct_2");
    assert_eq!(answer.body["plan"], "enterprise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_passes_after_the_revocation_returns() {
    let store = store();
    let app = app(AuthLayer::new(store.clone()).no_shield());
    let revoked = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Barrier::new(1001));
    let passes = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (app, revoked, started) = (app.clone(), revoked.clone(), started.clone());
            let passes = passes.clone();
            tokio::spawn(async move {
                started.wait().await;
                let (mut passed_before, mut refused_after) = (0, 0);
                loop {
                    let after = revoked.load(Ordering::SeqCst);
                    let status = app.clone().oneshot(bearer(KEY)).await.unwrap().status();
                    if after {
                        assert_eq!(status, StatusCode::FORBIDDEN, "passed after revocation");
                        refused_after += 1;
                        break;
                    }
                    if status == StatusCode::OK {
                        passed_before += 1;
                        passes.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                }
                (passed_before, refused_after)
            })
        })
        .collect();

    started.wait().await;
    // Revoke while requests are in full flight: once many have passed.
    while passes.load(Ordering::SeqCst) < 200 {
        tokio::task::yield_now().await;
    }
    store.revoke_key("key_1").await.unwrap();
    revoked.store(true, Ordering::SeqCst);

    let (mut passed, mut refused) = (0, 0);
    for task in tasks {
        let (p, r) = task.await.unwrap();
        passed += p;
        refused += r;
    }
    assert_eq!(refused, 1000);
    assert!(passed > 0, "some requests ran before the revocation");
}
