//! The examples, served on ephemeral ports and called like their users would: an existing axum
//! app, a tonic gRPC service and a plain hyper service, each behind auth, limits and credits.

#[allow(dead_code)] // `main` is the example's
#[path = "../examples/existing_axum.rs"]
mod existing_axum;
#[allow(dead_code)]
#[path = "../examples/hyper_service.rs"]
mod hyper_service;
#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod tonic_grpc;

use std::net::SocketAddr;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate::{
    auth::MemoryKeyStore,
    credits::{LedgerAdmin, MemoryLedger},
    ratelimit::{Plan, Plans},
};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

// --- helpers -----------------------------------------------------------------------------------

/// A plain HTTP/1 client for one server.
struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    base: String,
}

/// A response: status, headers and the body as JSON (or as a JSON string when it is not JSON).
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Http {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            base: format!("http://{addr}"),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if body.is_some_and(|b| b.starts_with('{')) {
            request = request.header("content-type", "application/json");
        }
        let body = Full::from(body.unwrap_or_default().to_owned());
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
        }
    }
}

async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn balance(ledger: &MemoryLedger, account: &str) -> u64 {
    let balance = ledger.balance(account).await.unwrap();
    assert_eq!(balance.holds, 0, "every hold is settled or released");
    balance.balance
}

/// Plans with a `tight` plan of two requests a minute.
fn plans() -> Plans {
    Plans::new(Plan::new().requests_per_minute(60))
        .with_plan("tight", Plan::new().requests_per_minute(2))
}

// --- existing_axum -----------------------------------------------------------------------------

struct Axum {
    http: Http,
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
}

impl Axum {
    async fn start() -> Axum {
        let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
        let app = existing_axum::app(
            existing_axum::AppState::default(),
            keys.clone(),
            ledger.clone(),
            plans(),
        );
        let (listener, addr) = listener().await;
        tokio::spawn(existing_axum::serve(listener, app));
        Axum {
            http: Http::new(addr),
            keys,
            ledger,
        }
    }

    async fn account(&self, account: &str, plan: &str, credits: u64) -> String {
        existing_axum::demo_account(&self.keys, &self.ledger, account, plan, credits).await
    }
}

#[tokio::test]
async fn existing_axum_handlers_see_the_caller() {
    let app = Axum::start().await;
    let alice = app.account("acct_alice", "free", 100).await;
    let bob = app.account("acct_bob", "free", 100).await;

    let res = app
        .http
        .send(
            "POST",
            "/notes",
            Some(&alice),
            Some(r#"{"text":"buy milk"}"#),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.body, json!({"id": 1, "text": "buy milk"}));
    assert!(res.headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(res.headers["x-ratelimit-limit-requests"], "60");
    assert_eq!(res.headers["x-ratelimit-remaining-requests"], "59");

    // Each caller sees its own account's notes: the handler's `Caller` is the key's.
    let res = app.http.send("GET", "/notes", Some(&alice), None).await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.body,
        json!({"account": "acct_alice", "notes": ["buy milk"]})
    );
    let res = app.http.send("GET", "/notes", Some(&bob), None).await;
    assert_eq!(res.body, json!({"account": "acct_bob", "notes": []}));
}

#[tokio::test]
async fn existing_axum_refuses_missing_and_bad_keys_in_openai_shape() {
    let app = Axum::start().await;
    app.account("acct_1", "free", 100).await;

    let res = app.http.send("GET", "/notes", None, None).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.body["error"]["code"], "missing_api_key");
    assert_eq!(res.body["error"]["type"], "authentication_error");
    assert_eq!(
        res.body["error"]["message"],
        "You didn't provide an API key. Pass it in the Authorization header as `Authorization: Bearer YOUR_KEY`."
    );
    assert!(res.headers.contains_key("x-request-id"));

    let res = app
        .http
        .send("GET", "/notes", Some("sk-demo-not-a-real-key"), None)
        .await;
    assert_eq!(res.status, 401);
    assert_eq!(res.body["error"]["code"], "invalid_api_key");
    assert!(!res.body.to_string().contains("sk-demo-not-a-real-key"));

    // Axum's own rejections get the same shape: a 404, a body that is not JSON.
    let key = app.account("acct_2", "free", 100).await;
    let res = app.http.send("GET", "/nowhere", Some(&key), None).await;
    assert_eq!(res.status, 404);
    assert_eq!(res.body["error"]["code"], "not_found");
    let res = app
        .http
        .send("POST", "/notes", Some(&key), Some(r#"{"txt":1}"#))
        .await;
    assert_eq!(res.status, 422);
    assert!(res.body["error"]["message"].is_string(), "{}", res.body);

    // Refusals and errors are not charged.
    assert_eq!(balance(&app.ledger, "acct_1").await, 100);
    assert_eq!(balance(&app.ledger, "acct_2").await, 100);
}

#[tokio::test]
async fn existing_axum_charges_credits_on_reported_usage() {
    let app = Axum::start().await;
    let key = app.account("acct_1", "free", 100).await;

    // A flat call: 1 credit.
    let res = app.http.send("GET", "/notes", Some(&key), None).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["x-credits-held"], "1");
    assert_eq!(balance(&app.ledger, "acct_1").await, 99);

    // /summarize, 400 characters: held 2 + ceil((100 prompt + 200 max completion) × 50 / 1000)
    // = 17; charged on the usage it reports, 2 + ceil((100 + 10) × 50 / 1000) = 8.
    let input = "a".repeat(400);
    let body = json!({ "input": input }).to_string();
    let res = app
        .http
        .send("POST", "/summarize", Some(&key), Some(&body))
        .await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.body["usage"]["total_tokens"], 110);
    assert_eq!(res.headers["x-credits-held"], "17");
    assert_eq!(res.headers["x-credits-balance"], "82");
    assert_eq!(balance(&app.ledger, "acct_1").await, 91);

    // Not enough for the hold: 402, nothing charged, the handler never runs.
    let poor = app.account("acct_poor", "free", 5).await;
    let res = app
        .http
        .send("POST", "/summarize", Some(&poor), Some(&body))
        .await;
    assert_eq!(res.status, 402);
    assert_eq!(res.body["error"]["code"], "insufficient_quota");
    assert_eq!(balance(&app.ledger, "acct_poor").await, 5);
}

#[tokio::test]
async fn existing_axum_rate_limits_by_plan() {
    let app = Axum::start().await;
    let key = app.account("acct_1", "tight", 100).await;
    for remaining in ["1", "0"] {
        let res = app.http.send("GET", "/notes", Some(&key), None).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.headers["x-ratelimit-remaining-requests"], remaining);
    }
    let res = app.http.send("GET", "/notes", Some(&key), None).await;
    assert_eq!(res.status, 429);
    assert_eq!(res.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(res.body["error"]["type"], "rate_limit_error");
    assert_eq!(
        res.body["error"]["message"],
        "Rate limit exceeded for requests. Please try again in 30 seconds."
    );
    assert_eq!(res.headers["retry-after"], "30");
    // The refused call is not charged.
    assert_eq!(balance(&app.ledger, "acct_1").await, 98);
}

// --- hyper_service -----------------------------------------------------------------------------

struct Hyper {
    http: Http,
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
}

impl Hyper {
    async fn start() -> Hyper {
        let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
        let (listener, addr) = listener().await;
        tokio::spawn(hyper_service::serve(
            listener,
            keys.clone(),
            ledger.clone(),
            plans(),
        ));
        Hyper {
            http: Http::new(addr),
            keys,
            ledger,
        }
    }

    async fn account(&self, account: &str, plan: &str, credits: u64) -> String {
        hyper_service::demo_account(&self.keys, &self.ledger, account, plan, credits).await
    }
}

#[tokio::test]
async fn hyper_service_answers_callers_with_a_key() {
    let svc = Hyper::start().await;
    let key = svc.account("acct_1", "free", 100).await;
    let res = svc
        .http
        .send("POST", "/v1/echo", Some(&key), Some("hello"))
        .await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.body, json!({"account": "acct_1", "echo": "hello"}));
    assert!(res.headers.contains_key("x-request-id"));
    assert_eq!(res.headers["x-ratelimit-remaining-requests"], "59");

    // A 404 of the service is rendered in the OpenAI shape, and not charged.
    let res = svc.http.send("GET", "/v1/other", Some(&key), None).await;
    assert_eq!(res.status, 404);
    assert_eq!(res.body["error"]["code"], "not_found");
    assert_eq!(
        balance(&svc.ledger, "acct_1").await,
        100 - hyper_service::PRICE
    );
}

#[tokio::test]
async fn hyper_service_refuses_missing_and_bad_keys_in_openai_shape() {
    let svc = Hyper::start().await;
    svc.account("acct_1", "free", 100).await;
    let res = svc.http.send("POST", "/v1/echo", None, Some("hello")).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.body["error"]["code"], "missing_api_key");
    assert_eq!(res.body["error"]["type"], "authentication_error");
    let res = svc
        .http
        .send("POST", "/v1/echo", Some("sk-wrong"), Some("hello"))
        .await;
    assert_eq!(res.status, 401);
    assert_eq!(res.body["error"]["code"], "invalid_api_key");
    assert_eq!(
        res.body["error"]["message"],
        "Incorrect API key provided. Check the key you are using, or create a new one."
    );
    assert_eq!(balance(&svc.ledger, "acct_1").await, 100);
}

#[tokio::test]
async fn hyper_service_charges_credits_until_they_run_out() {
    let svc = Hyper::start().await;
    let key = svc.account("acct_1", "free", 5).await;
    for left in [3, 1] {
        let res = svc
            .http
            .send("POST", "/v1/echo", Some(&key), Some("x"))
            .await;
        assert_eq!(res.status, 200);
        assert_eq!(res.headers["x-credits-held"], "2");
        assert_eq!(res.headers["x-credits-balance"], left.to_string());
        assert_eq!(balance(&svc.ledger, "acct_1").await, left);
    }
    let res = svc
        .http
        .send("POST", "/v1/echo", Some(&key), Some("x"))
        .await;
    assert_eq!(res.status, 402);
    assert_eq!(res.body["error"]["code"], "insufficient_quota");
    assert_eq!(balance(&svc.ledger, "acct_1").await, 1);
}

#[tokio::test]
async fn hyper_service_rate_limits_by_plan() {
    let svc = Hyper::start().await;
    let key = svc.account("acct_1", "tight", 100).await;
    for _ in 0..2 {
        let res = svc
            .http
            .send("POST", "/v1/echo", Some(&key), Some("x"))
            .await;
        assert_eq!(res.status, 200);
    }
    let res = svc
        .http
        .send("POST", "/v1/echo", Some(&key), Some("x"))
        .await;
    assert_eq!(res.status, 429);
    assert_eq!(res.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(res.headers["retry-after"], "30");
    assert_eq!(
        balance(&svc.ledger, "acct_1").await,
        100 - 2 * hyper_service::PRICE
    );
}

// --- tonic_grpc --------------------------------------------------------------------------------

struct Grpc {
    client: HealthClient<tonic::transport::Channel>,
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
}

impl Grpc {
    async fn start() -> Grpc {
        let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
        let (listener, addr) = listener().await;
        tokio::spawn(tonic_grpc::serve(
            listener,
            keys.clone(),
            ledger.clone(),
            plans(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Grpc {
            client: HealthClient::new(channel),
            keys,
            ledger,
        }
    }

    async fn account(&self, account: &str, plan: &str, credits: u64) -> String {
        tonic_grpc::demo_account(&self.keys, &self.ledger, account, plan, credits, None).await
    }

    /// `Health/Check` of `service` with `key` in the metadata.
    async fn check(
        &self,
        key: Option<&str>,
        service: &str,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        self.client.clone().check(request).await
    }
}

#[tokio::test]
async fn tonic_grpc_serves_callers_with_a_key() {
    let grpc = Grpc::start().await;
    let key = grpc.account("acct_1", "free", 100).await;
    let response = grpc.check(Some(&key), "").await.unwrap();
    assert_eq!(
        response.get_ref().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert!(response.metadata().get("x-request-id").is_some());
    assert_eq!(
        response
            .metadata()
            .get("x-ratelimit-remaining-requests")
            .unwrap(),
        "59"
    );
    assert_eq!(
        balance(&grpc.ledger, "acct_1").await,
        100 - tonic_grpc::PRICE
    );
}

#[tokio::test]
async fn tonic_grpc_refuses_missing_and_bad_keys_as_unauthenticated() {
    let grpc = Grpc::start().await;
    grpc.account("acct_1", "free", 100).await;
    let status = grpc.check(None, "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "You didn't provide an API key. Pass it in the Authorization header as `Authorization: Bearer YOUR_KEY`."
    );
    assert!(status.metadata().get("x-request-id").is_some());
    let status = grpc.check(Some("sk-wrong"), "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "Incorrect API key provided. Check the key you are using, or create a new one."
    );
    assert_eq!(balance(&grpc.ledger, "acct_1").await, 100);
}

#[tokio::test]
async fn tonic_grpc_charges_credits_until_they_run_out() {
    let grpc = Grpc::start().await;
    let key = grpc.account("acct_1", "free", 2).await;
    for left in [1, 0] {
        let response = grpc.check(Some(&key), "").await.unwrap();
        assert_eq!(response.metadata().get("x-credits-held").unwrap(), "1");
        assert_eq!(balance(&grpc.ledger, "acct_1").await, left);
    }
    let status = grpc.check(Some(&key), "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "Insufficient balance: this request needs 1 credits and 0 are available. Please top up your account."
    );
    assert_eq!(balance(&grpc.ledger, "acct_1").await, 0);
}

#[tokio::test]
async fn tonic_grpc_rate_limits_by_plan() {
    let grpc = Grpc::start().await;
    let key = grpc.account("acct_1", "tight", 100).await;
    grpc.check(Some(&key), "").await.unwrap();
    grpc.check(Some(&key), "").await.unwrap();
    let status = grpc.check(Some(&key), "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "Rate limit exceeded for requests. Please try again in 30 seconds."
    );
    assert_eq!(status.metadata().get("retry-after").unwrap(), "30");
    assert_eq!(balance(&grpc.ledger, "acct_1").await, 98);
}

#[tokio::test]
async fn tonic_grpc_maps_the_peer_address_for_key_allowlists() {
    let grpc = Grpc::start().await;
    let nearby = tonic_grpc::demo_account(
        &grpc.keys,
        &grpc.ledger,
        "acct_local",
        "free",
        10,
        Some("127.0.0.0/8, ::1/128".parse().unwrap()),
    )
    .await;
    let faraway = tonic_grpc::demo_account(
        &grpc.keys,
        &grpc.ledger,
        "acct_remote",
        "free",
        10,
        Some("203.0.113.0/24".parse().unwrap()),
    )
    .await;
    grpc.check(Some(&nearby), "").await.unwrap();
    let status = grpc.check(Some(&faraway), "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "IP address 127.0.0.1 is not in the allowlist for this API key."
    );
    assert_eq!(balance(&grpc.ledger, "acct_remote").await, 10);
}

/// A call the service itself fails (here `NOT_FOUND` for an unknown health service) releases its
/// hold, as an HTTP error status does, although gRPC errors travel with HTTP 200 and a
/// `grpc-status` header or trailer.
#[tokio::test]
async fn tonic_grpc_failed_calls_are_not_charged() {
    let grpc = Grpc::start().await;
    let key = grpc.account("acct_1", "free", 100).await;
    let status = grpc.check(Some(&key), "no.such.Service").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(balance(&grpc.ledger, "acct_1").await, 100);
}
