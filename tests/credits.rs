//! Credit gating, black-box: requests in, status, body, headers and the ledger out.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tollgate::{
    credits::{
        ledger::{Balance, Clock, EntryKind, JournalEntry, JournalQuery, ReserveRequest},
        CreditsLayer, Ledger, LedgerAdmin, ManualClock, MemoryLedger, OnDisconnect, Price, Pricing,
    },
    format::Format,
    inspect::InspectedBody,
    normalize::NormalizeLayer,
    Caller,
};
use tower::{service_fn, Layer, Service, ServiceExt};

type Upstream = Request<InspectedBody<Body>>;

const USAGE_JSON: &str = r#"{"id":"c1","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":100,"completion_tokens":250,"total_tokens":350}}"#;

/// gpt-test: 1 credit per call + 10 credits per 1k tokens; everything else 3 credits flat.
fn pricing() -> Pricing {
    Pricing::flat(3).model("gpt-test", Price::flat(1).per_1k_tokens(10))
}

fn chat(body: &str) -> Request<Body> {
    chat_as("acct_1", body)
}

fn chat_as(account: &str, body: &str) -> Request<Body> {
    let mut request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-request-id", "req_1")
        .body(Body::from(body.to_owned()))
        .unwrap();
    request
        .extensions_mut()
        .insert(Caller::builder("key_1", account).build());
    request
}

fn json_ok(body: &'static str) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn ledger_with(account: &str, credits: u64) -> MemoryLedger {
    let ledger = MemoryLedger::new();
    ledger.top_up(account, credits, "initial").await.unwrap();
    ledger
}

async fn balance(ledger: &MemoryLedger, account: &str) -> Balance {
    ledger.balance(account).await.unwrap()
}

async fn journal(ledger: &MemoryLedger, account: &str) -> Vec<JournalEntry> {
    ledger.journal(account, JournalQuery::new()).await.unwrap()
}

fn kinds(entries: &[JournalEntry]) -> Vec<EntryKind> {
    entries.iter().map(|e| e.kind).collect()
}

async fn body_json(
    response: Response<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>>,
) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Every account's journal adds up to its balance and its open holds.
async fn assert_journal_balances(ledger: &MemoryLedger, account: &str) {
    let entries = journal(ledger, account).await;
    let sum = |kinds: &[EntryKind], f: fn(&JournalEntry) -> u64| -> u64 {
        entries
            .iter()
            .filter(|e| kinds.contains(&e.kind))
            .map(f)
            .sum()
    };
    let b = balance(ledger, account).await;
    let credited = sum(&[EntryKind::TopUp], |e| e.amount);
    let charged = sum(&[EntryKind::Settle, EntryKind::Expire], |e| e.amount);
    assert_eq!(credited - charged, b.balance, "balance = top-ups - charges");
    let reserved = sum(&[EntryKind::Reserve], |e| e.hold);
    let closed = sum(
        &[EntryKind::Settle, EntryKind::Release, EntryKind::Expire],
        |e| e.hold,
    );
    assert_eq!(reserved - closed, b.held, "held = reserved - closed");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert!(e.held_after <= e.balance_after);
    }
}

#[tokio::test]
async fn json_usage_is_settled_when_the_body_ends() {
    let ledger = ledger_with("acct_1", 100).await;
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Ok::<_, Infallible>(json_ok(USAGE_JSON))
    }));

    let response = app
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":1000,"messages":[{"role":"user","content":"Hello world!"}]}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Hold: 1 + ceil((3 prompt tokens + 1000) × 10 / 1000) = 1 + 11 = 12.
    assert_eq!(response.headers()["x-credits-held"], "12");
    assert_eq!(response.headers()["x-credits-balance"], "88");
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(100, 12, 1));

    let body = body_json(response).await;
    assert_eq!(body["usage"]["total_tokens"], 350);
    // Charge: 1 + ceil(350 × 10 / 1000) = 1 + 4 = 5; the other 7 come back.
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(95, 0, 0));

    let entries = journal(&ledger, "acct_1").await;
    assert_eq!(
        kinds(&entries),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Settle]
    );
    let settle = &entries[2];
    assert_eq!(
        (settle.amount, settle.hold, settle.balance_after),
        (5, 12, 95)
    );
    assert_eq!(settle.request_id.as_deref(), Some("req_1"));
    assert_eq!(settle.key_id.as_deref(), Some("key_1"));
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn sse_usage_in_the_final_chunk_is_settled() {
    let ledger = ledger_with("acct_1", 100).await;
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        let chunks = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,",
            "\"completion_tokens\":2000,\"total_tokens\":2020}}\n\ndata: [DONE]\n\n",
        ];
        let stream =
            futures_util::stream::iter(chunks.map(|c| Ok::<_, Infallible>(Bytes::from(c))));
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap(),
        )
    }));

    let response = app
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":3000,"stream":true,"stream_options":{"include_usage":true}}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-credits-held"], "31");
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        text.ends_with(b"data: [DONE]\n\n"),
        "streamed through untouched"
    );
    // 1 + ceil(2020 × 10 / 1000) = 1 + 21 = 22.
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(78, 0, 0));
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn usage_above_the_hold_is_charged_up_to_the_available_balance_never_below_zero() {
    let ledger = ledger_with("acct_1", 15).await;
    // Hold: max_tokens 250 → 1 + ceil(250 × 10 / 1000) = 4; the usage (100 prompt tokens more
    // than estimated) costs 5; only 15 on the account.
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Ok::<_, Infallible>(json_ok(USAGE_JSON))
    }));
    let response = app
        .clone()
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":250}"#))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-credits-held"], "4");
    body_json(response).await;
    assert_eq!(balance(&ledger, "acct_1").await.balance, 10);

    // Now the upstream reports a usage worth 1 + 1001 credits (100,000 prompt tokens; the
    // completion clamped to max_tokens): everything left is taken, no more.
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Ok::<_, Infallible>(json_ok(
            r#"{"usage":{"prompt_tokens":100000,"completion_tokens":100000,"total_tokens":200000}}"#,
        ))
    }));
    let response = app
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":100}"#))
        .await
        .unwrap();
    body_json(response).await;
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(0, 0, 0));
    assert_eq!(journal(&ledger, "acct_1").await.last().unwrap().amount, 10);
    assert_journal_balances(&ledger, "acct_1").await;
}

/// An upstream that streams whatever the test sends it.
fn streaming_upstream() -> (
    mpsc::UnboundedSender<&'static str>,
    impl Service<Upstream, Response = Response<Body>, Error = Infallible, Future: Send> + Clone,
) {
    let (tx, rx) = mpsc::unbounded_channel::<&'static str>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let upstream = service_fn(move |_: Upstream| {
        let rx = rx.lock().unwrap().take().expect("one call");
        async move {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|c| (Ok::<_, Infallible>(Bytes::from(c)), rx))
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(stream))
                    .unwrap(),
            )
        }
    });
    (tx, upstream)
}

#[tokio::test]
async fn a_body_dropped_mid_stream_is_charged_the_hold_once() {
    let ledger = ledger_with("acct_1", 100).await;
    let (tx, upstream) = streaming_upstream();
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(upstream);

    let response = app
        .oneshot(chat(
            r#"{"model":"gpt-test","max_tokens":1000,"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-credits-held"], "11");
    let mut body = response.into_body();
    tx.send("data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n")
        .unwrap();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(100, 11, 1));

    // The client disconnects.
    drop(body);
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(89, 0, 0));
    let entries = journal(&ledger, "acct_1").await;
    assert_eq!(
        kinds(&entries),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Settle]
    );
    assert_eq!(entries[2].amount, 11);
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn usage_so_far_charges_the_streamed_part_but_never_zero() {
    let ledger = ledger_with("acct_1", 100).await;
    let (tx, upstream) = streaming_upstream();
    let app = CreditsLayer::new(ledger.clone(), pricing())
        .on_disconnect(OnDisconnect::UsageSoFar)
        .layer(upstream);

    let response = app
        .oneshot(chat(
            r#"{"model":"gpt-test","max_tokens":1000,"stream":true}"#,
        ))
        .await
        .unwrap();
    let mut body = response.into_body();
    for _ in 0..150 {
        tx.send("data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n")
            .unwrap();
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    // 1 + ceil(150 events × 10 / 1000) = 1 + 2 = 3 (not the hold of 11).
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(97, 0, 0));

    // Dropped before a single byte: the flat part (never zero).
    let (_tx, upstream) = streaming_upstream();
    let app = CreditsLayer::new(
        ledger.clone(),
        Pricing::new().model("gpt-test", Price::FREE.per_1k_tokens(10)),
    )
    .on_disconnect(OnDisconnect::UsageSoFar)
    .layer(upstream);
    let response = app
        .oneshot(chat(
            r#"{"model":"gpt-test","max_tokens":1000,"stream":true}"#,
        ))
        .await
        .unwrap();
    drop(response);
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(96, 0, 0));
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn upstream_500_and_upstream_errors_release_the_hold() {
    let ledger = ledger_with("acct_1", 100).await;
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(500)
                .body(Body::from("upstream exploded"))
                .unwrap(),
        )
    }));
    let response = app.oneshot(chat(r#"{"model":"gpt-test"}"#)).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!response.headers().contains_key("x-credits-held"));
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "upstream exploded");
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(100, 0, 0));

    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Err::<Response<Body>, _>(std::io::Error::other("connection refused"))
    }));
    let error = app
        .oneshot(chat(r#"{"model":"gpt-test"}"#))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "connection refused");
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(100, 0, 0));

    let entries = journal(&ledger, "acct_1").await;
    assert_eq!(
        kinds(&entries),
        [
            EntryKind::TopUp,
            EntryKind::Reserve,
            EntryKind::Release,
            EntryKind::Reserve,
            EntryKind::Release
        ]
    );
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn insufficient_balance_is_402_and_the_upstream_is_never_called() {
    let ledger = ledger_with("acct_1", 10).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(move |_: Upstream| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(json_ok(USAGE_JSON)) }
    }));

    let response = app
        .clone()
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":2000}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        body_json(response).await,
        json!({"error": {
            "message": "Insufficient balance: this request needs 21 credits and 10 are available. Please top up your account.",
            "type": "insufficient_quota",
            "param": null,
            "code": "insufficient_quota",
        }})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(10, 0, 0));

    // In the envelope format: INSUFFICIENT_CREDITS with required and available.
    let app = NormalizeLayer::new().format(Format::Envelope).layer(app);
    let response = app
        .oneshot(chat(r#"{"model":"gpt-test","max_tokens":2000}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = body_json(response).await;
    assert_eq!(body["error"]["code"], "INSUFFICIENT_CREDITS");
    assert_eq!(body["error"]["details"]["required"], 21);
    assert_eq!(body["error"]["details"]["available"], 10);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // An account that never topped up has nothing available.
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(|_: Upstream| async {
        Ok::<_, Infallible>(json_ok("{}"))
    }));
    let response = app.oneshot(chat_as("acct_new", "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        body_json(response).await["error"]["message"],
        "Insufficient balance: this request needs 3 credits and 0 are available. Please top up your account."
    );
}

#[tokio::test]
async fn requests_without_a_caller_are_refused_unless_anonymous_is_allowed() {
    let ledger = ledger_with("acct_1", 10).await;
    let upstream = service_fn(|_: Upstream| async { Ok::<_, Infallible>(json_ok("{}")) });
    let anonymous = || {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap()
    };
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(upstream);
    let response = app.clone().oneshot(anonymous()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        body_json(response).await["error"]["code"],
        "missing_api_key"
    );

    let app = CreditsLayer::new(ledger.clone(), pricing())
        .allow_anonymous(true)
        .layer(upstream);
    let response = app.oneshot(anonymous()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("x-credits-held"));
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(10, 0, 0));
}

fn with_key(mut request: Request<Body>, key: &str) -> Request<Body> {
    request
        .headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

#[tokio::test]
async fn an_idempotent_retry_is_charged_once() {
    let ledger = ledger_with("acct_1", 100).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(move |_: Upstream| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(json_ok(USAGE_JSON)) }
    }));
    let body = r#"{"model":"gpt-test","max_tokens":1000}"#;

    // The first request is running (its body not read yet): a retry now is 409.
    let first = app
        .clone()
        .oneshot(with_key(chat(body), "retry-1"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let response = app
        .clone()
        .oneshot(with_key(chat(body), "retry-1"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        body_json(response).await,
        json!({"error": {
            "message": "A request with this Idempotency-Key is still in progress. Retry later.",
            "type": "invalid_request_error",
            "param": null,
            "code": "idempotency_key_in_use",
        }})
    );
    body_json(first).await;
    assert_eq!(balance(&ledger, "acct_1").await.balance, 95);

    // Done: the same request again gets the first answer, without a second charge and
    // without a second upstream call.
    let response = app
        .clone()
        .oneshot(with_key(chat(body), "retry-1"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(!response.headers().contains_key("x-credits-held"));
    let replayed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(replayed, USAGE_JSON.as_bytes());
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(95, 0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The same key with a different request: 422.
    let response = app
        .clone()
        .oneshot(with_key(
            chat(r#"{"model":"gpt-test","max_tokens":999}"#),
            "retry-1",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body_json(response).await,
        json!({"error": {
            "message": "This Idempotency-Key was already used with a different request.",
            "type": "invalid_request_error",
            "param": null,
            "code": "idempotency_key_reused",
        }})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another account may use the same key.
    ledger.top_up("acct_2", 100, "initial").await.unwrap();
    let response = app
        .clone()
        .oneshot(with_key(chat_as("acct_2", body), "retry-1"))
        .await
        .unwrap();
    assert!(!response.headers().contains_key("idempotent-replayed"));
    body_json(response).await;
    assert_eq!(balance(&ledger, "acct_2").await.balance, 95);

    // A malformed key is a 400.
    let response = app
        .oneshot(with_key(chat(body), "has space"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_json(response).await["error"]["code"], "bad_request");
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn a_retry_after_an_upstream_failure_is_processed_and_charged() {
    let ledger = ledger_with("acct_1", 100).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn(move |_: Upstream| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            Ok::<_, Infallible>(if first {
                Response::builder().status(503).body(Body::empty()).unwrap()
            } else {
                json_ok(USAGE_JSON)
            })
        }
    }));
    let body = r#"{"model":"gpt-test","max_tokens":1000}"#;
    let response = app
        .clone()
        .oneshot(with_key(chat(body), "k"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let response = app.oneshot(with_key(chat(body), "k")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("idempotent-replayed"));
    body_json(response).await;
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(95, 0, 0));
}

#[tokio::test]
async fn a_hold_never_settled_expires_at_its_held_amount_and_is_not_charged_twice() {
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let ledger = MemoryLedger::builder()
        .hold_ttl(Duration::from_secs(300))
        .clock(clock.clone())
        .build();
    ledger.top_up("acct_1", 100, "initial").await.unwrap();
    let (tx, upstream) = streaming_upstream();
    let app = CreditsLayer::new(ledger.clone(), pricing()).layer(upstream);
    let response = app
        .oneshot(chat(
            r#"{"model":"gpt-test","max_tokens":1000,"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-credits-held"], "11");

    clock.advance(Duration::from_secs(299));
    let expired = ledger.expire_holds(clock.now()).await.unwrap();
    assert_eq!((expired.holds, expired.charged), (0, 0));
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(100, 11, 1));

    clock.advance(Duration::from_secs(1));
    let expired = ledger.expire_holds(clock.now()).await.unwrap();
    assert_eq!((expired.holds, expired.charged), (1, 11));
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(89, 0, 0));

    // The stream finally ends with its usage: the expired hold is not charged again.
    tx.send(r#"data: {"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#)
        .unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(89, 0, 0));
    let entries = journal(&ledger, "acct_1").await;
    assert_eq!(
        kinds(&entries),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Expire]
    );
    assert_eq!(
        entries[2].at,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_300)
    );
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test]
async fn top_ups_are_idempotent() {
    let ledger = MemoryLedger::new();
    let first = ledger.top_up("acct_1", 50, "invoice-7").await.unwrap();
    assert!(first.applied);
    let again = ledger.top_up("acct_1", 50, "invoice-7").await.unwrap();
    assert!(!again.applied);
    assert_eq!(again.balance, Balance::new(50, 0, 0));
    assert!(matches!(
        ledger.top_up("acct_1", 60, "invoice-7").await,
        Err(tollgate::credits::ledger::TopUpError::KeyReused { amount: 50 })
    ));
    assert_eq!(balance(&ledger, "acct_1").await.balance, 50);
    assert_eq!(journal(&ledger, "acct_1").await.len(), 1);
}

#[tokio::test]
async fn a_hold_is_closed_once() {
    let ledger = ledger_with("acct_1", 10).await;
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 4))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    assert!(ledger.settle(&hold, 3).await.unwrap().was_open);
    let again = ledger.settle(&hold, 3).await.unwrap();
    assert!(!again.was_open);
    assert_eq!(again.charged, 0);
    assert!(!ledger.release(&hold).await.unwrap().was_open);
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(7, 0, 0));
}

/// Thousands of concurrent requests against a balance that covers exactly K of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_k_of_thousands_of_concurrent_requests_succeed() {
    const N: usize = 3000;
    const K: u64 = 1234;
    const PRICE: u64 = 3;
    let ledger = ledger_with("acct_1", K * PRICE).await;
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(PRICE)).layer(service_fn(
        |_: Upstream| async {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(json_ok(r#"{"ok":true}"#))
        },
    ));

    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app.oneshot(chat("{}")).await.unwrap();
                let status = response.status();
                response.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, K);
    assert_eq!(refused, N as u64 - K);
    assert_eq!(balance(&ledger, "acct_1").await, Balance::new(0, 0, 0));
    let entries = journal(&ledger, "acct_1").await;
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count() as u64,
        K
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .map(|e| e.amount)
            .sum::<u64>(),
        K * PRICE
    );
    assert_journal_balances(&ledger, "acct_1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_ups_while_requests_run_are_all_counted() {
    let ledger = ledger_with("acct_1", 0).await;
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(2)).layer(service_fn(
        |_: Upstream| async {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(json_ok("{}"))
        },
    ));

    let requests: Vec<_> = (0..2000)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app.oneshot(chat("{}")).await.unwrap();
                let status = response.status();
                response.into_body().collect().await.unwrap();
                status == StatusCode::OK
            })
        })
        .collect();
    let top_ups: Vec<_> = (0..500)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                ledger.top_up("acct_1", 3, &format!("t{i}")).await.unwrap();
                // A retried top-up is not applied twice.
                ledger.top_up("acct_1", 3, &format!("t{i}")).await.unwrap();
            })
        })
        .collect();
    let mut ok = 0u64;
    for r in requests {
        ok += u64::from(r.await.unwrap());
    }
    for t in top_ups {
        t.await.unwrap();
    }
    let b = balance(&ledger, "acct_1").await;
    assert_eq!(b.balance, 1500 - 2 * ok);
    assert_eq!(b.held, 0);
    assert!(ok > 0);
    assert_journal_balances(&ledger, "acct_1").await;
}
