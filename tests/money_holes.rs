//! What a hostile client and an odd upstream could do to the books (issue "Money holes"), through
//! the real chain: the status, the body, the headers, the balance and the upstream calls after.

use std::{
    convert::Infallible,
    io::Write,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use axum::body::Body;
use bytes::Bytes;
use governor::clock::FakeRelativeClock;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    credits::{
        ledger::{JournalQuery, TopUpError, MAX_CREDITS},
        CreditsLayer, LedgerAdmin, MemoryLedger, Price, Pricing,
    },
    inspect::InspectedBody,
    normalize::NormalizeLayer,
    ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer},
    Caller,
};
use tower::{service_fn, util::BoxCloneSyncService, Layer, ServiceExt};

type Upstream = Request<InspectedBody<Body>>;
type App = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// gpt-test: 1 credit a call + 1 credit per token (1000 per 1k), so a charge reads as tokens + 1.
fn pricing() -> Pricing {
    Pricing::flat(3).model("gpt-test", Price::flat(1).per_1k_tokens(1000))
}

fn chat(body: &str, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, deflate");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    let mut request = builder.body(Body::from(body.to_owned())).unwrap();
    request
        .extensions_mut()
        .insert(Caller::builder("key_1", "acct_1").build());
    request
}

async fn ledger_with(credits: u64) -> MemoryLedger {
    let ledger = MemoryLedger::new();
    ledger.top_up("acct_1", credits, "initial").await.unwrap();
    ledger
}

async fn balance(ledger: &MemoryLedger) -> u64 {
    ledger.balance("acct_1").await.unwrap().balance
}

/// Every movement adds up: the balance is Σ top-ups − Σ charges, nothing left open.
async fn assert_books(ledger: &MemoryLedger) {
    let entries = ledger.journal("acct_1", JournalQuery::new()).await.unwrap();
    let b = ledger.balance("acct_1").await.unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last.balance_after, b.balance);
    assert_eq!(b.held, 0);
}

/// The chain: Normalize outermost, Credits, the upstream.
fn app<F>(ledger: &MemoryLedger, credits: impl Fn(CreditsLayer) -> CreditsLayer, upstream: F) -> App
where
    F: Fn(Upstream) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let inner = credits(CreditsLayer::new(ledger.clone(), pricing())).layer(service_fn(
        move |request: Upstream| {
            let upstream = upstream.clone();
            async move { Ok::<_, Infallible>(upstream(request)) }
        },
    ));
    BoxCloneSyncService::new(
        NormalizeLayer::new()
            .layer(inner)
            .map_response(|r: Response<_>| r.map(Body::new)),
    )
}

fn json_reply(body: String) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn send(app: &App, request: Request<Body>) -> (StatusCode, http::HeaderMap, Bytes) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn json(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// An upstream that answers a different text each call, with 1 token of usage.
fn counting_upstream(calls: Arc<AtomicUsize>) -> impl Fn(Upstream) -> Response<Body> + Clone {
    move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        json_reply(format!(
            r#"{{"id":"call-{n}","choices":[{{"message":{{"content":"answer {n}"}}}}],"usage":{{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}}}"#
        ))
    }
}

#[tokio::test]
async fn a_replay_is_the_first_answer_and_never_a_free_upstream_call() {
    // 3 credits: the hold is 3 (1 + a prompt token + max_tokens 1), the call costs 2 (1 + 1
    // token), so 1 is left: not enough for a second call.
    let ledger = ledger_with(3).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(&ledger, |c| c, counting_upstream(calls.clone()));
    let body =
        r#"{"model":"gpt-test","max_tokens":1,"messages":[{"role":"user","content":"aaaa"}]}"#;

    let (status, headers, first) = send(&app, chat(body, Some("k-1"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_eq!(json(&first)["id"], "call-1");
    assert_eq!(balance(&ledger).await, 1);

    // Nine retries: the first answer, byte for byte, uncharged, and the upstream is not called.
    for _ in 0..9 {
        let (status, headers, replay) = send(&app, chat(body, Some("k-1"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers.contains_key("x-request-id"));
        assert_eq!(replay, first);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another prompt of the same length under the used key: refused, not forwarded.
    let other = body.replace("aaaa", "bbbb");
    assert_eq!(other.len(), body.len());
    let (status, _, refusal) = send(&app, chat(&other, Some("k-1"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json(&refusal)["error"]["code"], "idempotency_key_reused");
    // A new key: a new request, which the empty balance refuses.
    let (status, _, refusal) = send(&app, chat(&other, Some("k-2"))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(json(&refusal)["error"]["code"], "insufficient_quota");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(balance(&ledger).await, 1);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn a_streamed_answer_is_replayed_whole() {
    let ledger = ledger_with(10_000).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = app(
        &ledger,
        |c| c,
        move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            let events = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            "data: [DONE]\n\n",
        ];
            let stream = futures_util::stream::iter(
                events.map(|e| Ok::<_, Infallible>(Bytes::from_static(e.as_bytes()))),
            );
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        },
    );
    let body = r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (_, _, first) = send(&app, chat(body, Some("s-1"))).await;
    assert_eq!(balance(&ledger).await, 10_000 - 8);
    let (status, headers, replay) = send(&app, chat(body, Some("s-1"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replay, first);
    assert!(replay.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(balance(&ledger).await, 10_000 - 8);
}

#[tokio::test]
async fn a_replay_whose_answer_was_not_kept_is_refused_with_a_clear_code() {
    let ledger = ledger_with(100).await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Answers over 64 bytes are not kept.
    let app = app(
        &ledger,
        |c| c.replay_limit(64),
        counting_upstream(calls.clone()),
    );
    let body = r#"{"model":"gpt-test","max_tokens":1}"#;
    let (status, _, _) = send(&app, chat(body, Some("big"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, refusal) = send(&app, chat(body, Some("big"))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(
        json(&refusal),
        json!({"error": {
            "message": "The request with this Idempotency-Key was already processed and charged, but its response was larger than the replay limit, so it cannot be replayed. A new request needs a new Idempotency-Key and is charged again.",
            "type": "invalid_request_error",
            "param": null,
            "code": "idempotency_replay_unavailable",
        }})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(balance(&ledger).await, 98);
}

#[tokio::test]
async fn a_replay_of_an_answer_cut_short_is_refused() {
    let ledger = ledger_with(100).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = app(
        &ledger,
        |c| c,
        move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            let stream = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(
                b"data: {\"choices\":[]}\n\n",
            ))])
            .chain(futures_util::stream::pending());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        },
    );
    let body = r#"{"model":"gpt-test","max_tokens":10,"stream":true}"#;
    let response = app.clone().oneshot(chat(body, Some("cut"))).await.unwrap();
    let mut body_stream = response.into_body();
    let _first_event = body_stream.frame().await.unwrap().unwrap();
    drop(body_stream); // the client goes away: charged the hold
    assert_eq!(balance(&ledger).await, 100 - 11);
    let (status, _, refusal) = send(&app, chat(body, Some("cut"))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(json(&refusal)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("was cut short before its end"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

use futures_util::StreamExt;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

const USAGE_1: &str =
    r#"{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}"#;

#[tokio::test]
async fn a_metered_request_asks_for_identity_and_a_gzipped_usage_is_still_read() {
    let ledger = ledger_with(100).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    // An upstream that compresses whatever it is asked.
    let app = app(
        &ledger,
        |c| c,
        move |request: Upstream| {
            recorded.lock().unwrap().push(
                request
                    .headers()
                    .get("accept-encoding")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(Body::from(gzip(USAGE_1.as_bytes())))
                .unwrap()
        },
    );
    let body = r#"{"model":"gpt-test","max_tokens":9}"#;
    let (status, headers, reply) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), vec![Some("identity".to_owned())]);
    // The client gets the bytes as they came, and they are valid gzip of the JSON.
    assert_eq!(headers["content-encoding"], "gzip");
    let mut decoded = Vec::new();
    flate2::write::GzDecoder::new(&mut decoded)
        .write_all(&reply)
        .unwrap();
    assert_eq!(decoded, USAGE_1.as_bytes());
    // Charged the usage (1 + 1 token), not the hold (1 + 9 + prompt).
    assert_eq!(headers["x-credits-held"], "10");
    assert_eq!(balance(&ledger).await, 98);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn usage_is_read_only_at_the_top_level_and_an_empty_usage_is_no_evidence() {
    let ledger = ledger_with(1000).await;
    let reply = Arc::new(Mutex::new(String::new()));
    let current = reply.clone();
    let app = app(
        &ledger,
        |c| c,
        move |_| json_reply(current.lock().unwrap().clone()),
    );
    let body = r#"{"model":"gpt-test","max_tokens":9}"#; // hold 1 + ceil((0 + 9) × 1) = 10

    // `"usage": {}` says nothing: the hold is charged, not 1.
    *reply.lock().unwrap() = r#"{"choices":[],"usage":{}}"#.into();
    send(&app, chat(body, None)).await;
    assert_eq!(balance(&ledger).await, 1000 - 10);

    // A nested usage after the top-level one does not win: 2, not 21.
    *reply.lock().unwrap() = r#"{"usage":{"prompt_tokens":1,"completion_tokens":0},"provider_extra":{"usage":{"prompt_tokens":10,"completion_tokens":10}}}"#.into();
    send(&app, chat(body, None)).await;
    assert_eq!(balance(&ledger).await, 1000 - 10 - 2);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn a_stream_cut_after_its_usage_event_is_charged_that_usage() {
    let ledger = ledger_with(100).await;
    let app = app(
        &ledger,
        |c| c,
        |_| {
            let stream = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
        ))])
        .chain(futures_util::stream::pending());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        },
    );
    let body = r#"{"model":"gpt-test","max_tokens":50,"stream":true}"#;
    let response = app.clone().oneshot(chat(body, None)).await.unwrap();
    assert_eq!(response.headers()["x-credits-held"], "51");
    let mut stream = response.into_body();
    stream.frame().await.unwrap().unwrap();
    drop(stream); // before `[DONE]`
    assert_eq!(balance(&ledger).await, 100 - 4);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn an_absurd_usage_is_clamped_and_cannot_lock_the_account() {
    let ledger = ledger_with(100_000).await;
    let clock = FakeRelativeClock::default();
    let limits = RateLimitLayer::new(
        MemoryLimiter::with_clock(clock.clone()),
        Plans::new(Plan::new().tokens_per_minute(10_000)),
    );
    let app = app(
        &ledger,
        |c| c.rate_limit(limits.clone()),
        |_| {
            json_reply(format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":{m},"completion_tokens":{m},"total_tokens":{m}}}}}"#,
                m = u64::MAX
            ))
        },
    );
    // max_tokens 100: at most 100 completion tokens; the prompt is bounded by the ceiling.
    let body =
        r#"{"model":"gpt-test","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, _) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::OK);
    let charged = 100_000 - balance(&ledger).await;
    // 1 + 100 completion tokens + at most the 2,000,000-token ceiling minus them: never the
    // whole balance... here the balance is smaller than the ceiling, so the reserve bounds it:
    // charged up to the available balance, which the clamp keeps finite and logged.
    assert!(charged <= 100_000);
    assert_books(&ledger).await;

    // The token bucket is at most one window in debt: the retry-after is about a minute, not
    // 18446744014 seconds.
    ledger.top_up("acct_1", 1_000_000, "more").await.unwrap();
    let (status, headers, refusal) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (60..=61).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(json(&refusal)["error"]["code"], "rate_limit_exceeded");
    // After that window the account is served again.
    clock.advance(std::time::Duration::from_secs(retry_after));
    let (status, _, _) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_usage_above_max_tokens_is_charged_at_max_tokens() {
    let ledger = ledger_with(1000).await;
    let app = app(
        &ledger,
        |c| c,
        |_| {
            json_reply(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":900000,"total_tokens":900005}}"#.into())
        },
    );
    let body = r#"{"model":"gpt-test","max_tokens":20}"#;
    let (status, _, _) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::OK);
    // 1 + 5 prompt + 20 completion (not 900,005).
    assert_eq!(balance(&ledger).await, 1000 - 26);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn a_huge_max_tokens_is_refused_for_its_price_with_exact_numbers() {
    let ledger = ledger_with(1_000_000).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(&ledger, |c| c, counting_upstream(calls.clone()));
    let body = format!(r#"{{"model":"gpt-test","max_tokens":{}}}"#, 1u64 << 63);
    let (status, _, refusal) = send(&app, chat(&body, None)).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let refusal = json(&refusal);
    assert_eq!(refusal["error"]["code"], "insufficient_quota");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&MAX_CREDITS.to_string()) && message.contains("1000000"),
        "{message}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(balance(&ledger).await, 1_000_000);
}

#[tokio::test]
async fn a_top_up_past_the_documented_maximum_is_refused() {
    let ledger = ledger_with(1).await;
    let refused = ledger.top_up("acct_1", MAX_CREDITS, "too-much").await;
    assert!(matches!(refused, Err(TopUpError::Overflow)));
    let fits = ledger
        .top_up("acct_1", MAX_CREDITS - 1, "fits")
        .await
        .unwrap();
    assert_eq!(fits.balance.balance, MAX_CREDITS);
    assert_eq!(balance(&ledger).await, MAX_CREDITS);
}

#[tokio::test]
async fn upstream_5xx_text_never_reaches_the_client_and_429s_carry_retry_guidance() {
    let ledger = ledger_with(100).await;
    let status = Arc::new(Mutex::new(500u16));
    let current = status.clone();
    let app = app(
        &ledger,
        |c| c,
        move |_| {
            let code = *current.lock().unwrap();
            Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .header("retry-after", "7")
            .body(Body::from(
                r#"{"error":{"message":"internal path /srv/secret failed","type":"server_error","param":null,"code":"oops"}}"#,
            ))
            .unwrap()
        },
    );
    let body = r#"{"model":"gpt-test","max_tokens":1}"#;
    let (code, headers, reply) = send(&app, chat(body, None)).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    let text = String::from_utf8(reply.to_vec()).unwrap();
    assert!(!text.contains("/srv/secret"), "{text}");
    assert_eq!(json(&reply)["error"]["code"], "internal_error");
    assert_eq!(headers["x-should-retry"], "true");

    *status.lock().unwrap() = 429;
    let (code, headers, _) = send(&app, chat(body, None)).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(headers["retry-after-ms"], "7000");
    assert_eq!(headers["x-should-retry"], "true");
    // Upstream errors are not charged.
    assert_eq!(balance(&ledger).await, 100);
}

#[tokio::test]
async fn several_completions_and_the_larger_cap_field_bound_the_clamp() {
    let ledger = ledger_with(10_000).await;
    let app = app(
        &ledger,
        |c| c,
        |_| {
            json_reply(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":60,"total_tokens":65}}"#.into())
        },
    );
    // n = 3 completions of up to 20 tokens: 60 completion tokens are real, charged in full.
    let (status, _, _) = send(
        &app,
        chat(r#"{"model":"gpt-test","max_tokens":20,"n":3}"#, None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(balance(&ledger).await, 10_000 - 66);
    // Both cap fields: an upstream may read either, so the larger bounds the charge.
    let body = r#"{"model":"gpt-test","max_tokens":4096,"max_completion_tokens":1}"#;
    let (status, headers, _) = send(&app, chat(body, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-credits-held"], "4097");
    assert_eq!(balance(&ledger).await, 10_000 - 66 - 66);
    assert_books(&ledger).await;
}

#[tokio::test]
async fn the_fingerprint_covers_a_body_an_earlier_layer_already_read() {
    let ledger = ledger_with(100).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let credits = CreditsLayer::new(ledger.clone(), pricing()).layer(service_fn({
        let calls = calls.clone();
        move |_: Request<InspectedBody<InspectedBody<Body>>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(json_reply(USAGE_1.into())) }
        }
    }));
    // A layer in front (auth with model scopes does this) has read the body already.
    let app = service_fn(move |request: Request<Body>| {
        let credits = credits.clone();
        async move {
            let request = tollgate::inspect::inspect(request, 1 << 20).await.unwrap();
            credits.oneshot(request).await
        }
    });
    let first =
        r#"{"model":"gpt-test","max_tokens":1,"messages":[{"role":"user","content":"aaaa"}]}"#;
    let response = app.clone().oneshot(chat(first, Some("k"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let other = first.replace("aaaa", "bbbb");
    let response = app.clone().oneshot(chat(&other, Some("k"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
