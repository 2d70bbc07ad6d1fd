//! `CreditsLayer::rate_limit`: the rate limits and the hold charged in one step, both or
//! neither, with the answers of the two layers (fake clock, in-memory backends).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::body::Body;
use bytes::Bytes;
use governor::clock::FakeRelativeClock;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    credits::{
        ledger::{Balance, EntryKind, JournalQuery},
        CreditsLayer, LedgerAdmin, MemoryLedger, Pricing,
    },
    inspect::InspectedBody,
    ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer},
    Caller,
};
use tower::{service_fn, util::BoxCloneSyncService, Layer, Service, ServiceExt};

type Upstream = Request<InspectedBody<Body>>;

const USAGE_JSON: &str = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":250,"total_tokens":350}}"#;

fn get_as(account: &str) -> Request<Body> {
    let mut request = Request::get("/v1/models").body(Body::empty()).unwrap();
    request
        .extensions_mut()
        .insert(Caller::builder("key_1", account).build());
    request
}

fn chat(body: &str) -> Request<Body> {
    let mut request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    request
        .extensions_mut()
        .insert(Caller::builder("key_1", "acct_1").build());
    request
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn send<S, B>(app: &S, request: Request<Body>) -> (StatusCode, HeaderMap, Value)
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (parts.status, parts.headers, json)
}

fn upstream(
    calls: Arc<AtomicUsize>,
    body: &'static str,
) -> BoxCloneSyncService<Upstream, Response<Body>, Infallible> {
    BoxCloneSyncService::new(service_fn(move |_: Upstream| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
        }
    }))
}

async fn ledger_with(credits: u64) -> MemoryLedger {
    let ledger = MemoryLedger::new();
    ledger.top_up("acct_1", credits, "initial").await.unwrap();
    ledger
}

fn limits(
    plan: Plan,
) -> (
    FakeRelativeClock,
    RateLimitLayer<MemoryLimiter<FakeRelativeClock>>,
) {
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::new(MemoryLimiter::with_clock(clock.clone()), Plans::new(plan));
    (clock, layer)
}

#[tokio::test]
async fn the_limits_and_the_hold_are_charged_together_with_both_layers_answers() {
    let ledger = ledger_with(100).await;
    let (clock, layer) = limits(Plan::new().requests_per_minute(2));
    let calls = Arc::new(AtomicUsize::new(0));
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(3))
        .rate_limit(layer)
        .layer(upstream(calls.clone(), "{}"));

    let (status, headers, _) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-credits-held"), "3");
    assert_eq!(header(&headers, "x-credits-balance"), "97");
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "30s");
    assert_eq!(header(&headers, "ratelimit"), "\"requests\";r=1;t=30");

    let (status, headers, _) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");

    // Refused by the limit: the RateLimit layer's 429, and no hold placed.
    let (status, headers, body) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 429);
    assert_eq!(
        body,
        json!({"error": {
            "message": "Rate limit exceeded for requests. Please try again in 30 seconds.",
            "type": "rate_limit_error",
            "param": null,
            "code": "rate_limit_exceeded",
        }})
    );
    assert_eq!(header(&headers, "retry-after"), "30");
    assert_eq!(header(&headers, "retry-after-ms"), "30000");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert!(!headers.contains_key("x-credits-held"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(94, 0, 0)
    );
    let journal = ledger.journal("acct_1", JournalQuery::new()).await.unwrap();
    let kinds: Vec<_> = journal.iter().map(|e| e.kind).collect();
    use EntryKind::*;
    assert_eq!(kinds, [TopUp, Reserve, Settle, Reserve, Settle]);

    clock.advance(Duration::from_secs(30));
    let (status, headers, _) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_request_refused_for_its_credits_does_not_use_up_its_rate_limit() {
    let ledger = ledger_with(3).await;
    let (_clock, layer) = limits(Plan::new().requests_per_minute(2));
    let calls = Arc::new(AtomicUsize::new(0));
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(3))
        .rate_limit(layer)
        .layer(upstream(calls.clone(), "{}"));

    assert_eq!(send(&app, get_as("acct_1")).await.0, 200);
    let (status, headers, body) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 402);
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(!headers.contains_key("x-ratelimit-remaining-requests"));

    // The 402 gave its cell back: one request of the two is still there.
    ledger.top_up("acct_1", 3, "second").await.unwrap();
    let (status, headers, _) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");

    // Out of both: the limits are checked first.
    let (status, _, body) = send(&app, get_as("acct_1")).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(0, 0, 0)
    );
}

#[tokio::test]
async fn tokens_are_corrected_from_the_reported_usage_when_the_hold_is_settled() {
    let ledger = ledger_with(1_000).await;
    let (_clock, layer) = limits(
        Plan::new()
            .requests_per_minute(100)
            .tokens_per_minute(10_000),
    );
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(1))
        .rate_limit(layer)
        .layer(upstream(Arc::new(AtomicUsize::new(0)), USAGE_JSON));
    let body =
        r#"{"model":"gpt-test","max_tokens":1000,"messages":[{"role":"user","content":"hello"}]}"#;

    let (status, headers, _) = send(&app, chat(body)).await;
    assert_eq!(status, 200);
    let first: u64 = header(&headers, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    let estimate = 10_000 - first;
    assert!(estimate > 1000, "max_tokens plus the prompt: {estimate}");

    // The body was read to its end: 350 tokens were used, not the estimate, and the bucket was
    // corrected with the settlement.
    let (status, headers, _) = send(&app, chat(body)).await;
    assert_eq!(status, 200);
    let second: u64 = header(&headers, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert_eq!(second, 10_000 - 350 - estimate);
    assert_eq!(
        ledger.balance("acct_1").await.unwrap().balance,
        998,
        "flat price, both settled"
    );
}

#[tokio::test]
async fn anonymous_requests_let_through_are_rate_limited_by_client_ip() {
    let ledger = ledger_with(10).await;
    let (_clock, layer) = limits(Plan::new().requests_per_minute(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(3))
        .allow_anonymous(true)
        .rate_limit(layer)
        .layer(upstream(calls.clone(), "{}"));
    let from = |ip: [u8; 4]| {
        let mut request = Request::get("/v1/models").body(Body::empty()).unwrap();
        request
            .extensions_mut()
            .insert(SocketAddr::from((ip, 40_000)));
        request
    };

    let (status, headers, _) = send(&app, from([192, 0, 2, 1])).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert!(!headers.contains_key("x-credits-held"));
    let (status, headers, _) = send(&app, from([192, 0, 2, 1])).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "60");
    assert_eq!(send(&app, from([192, 0, 2, 2])).await.0, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(10, 0, 0)
    );
}

#[tokio::test]
async fn an_exempt_route_is_charged_credits_without_limit_headers() {
    let ledger = ledger_with(10).await;
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::new(
        MemoryLimiter::with_clock(clock),
        Plans::new(Plan::new().requests_per_minute(1)),
    )
    .route_exact("/v1/models", Plan::unlimited());
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(3))
        .rate_limit(layer)
        .layer(upstream(Arc::new(AtomicUsize::new(0)), "{}"));
    for _ in 0..3 {
        let (status, headers, _) = send(&app, get_as("acct_1")).await;
        assert_eq!(status, 200);
        assert!(!headers.contains_key("x-ratelimit-remaining-requests"));
        assert_eq!(header(&headers, "x-credits-held"), "3");
    }
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 1);
}

/// 200 requests at once against a burst of 25 and a balance for 10: exactly 10 pass, and the
/// 15 cells taken by requests refused for their credits come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_charge_both_or_neither() {
    let ledger = ledger_with(10).await;
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::new(
        MemoryLimiter::with_clock(clock),
        Plans::new(Plan::new().requests(governor::Quota::per_hour(
            std::num::NonZeroU32::new(25).unwrap(),
        ))),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let app = CreditsLayer::new(ledger.clone(), Pricing::flat(1))
        .rate_limit(layer)
        .layer(upstream(calls.clone(), "{}"));

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, get_as("acct_1")).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().as_u16());
    }
    let count = |code: u16| statuses.iter().filter(|&&s| s == code).count();
    assert_eq!(count(200), 10);
    assert_eq!(count(200) + count(402) + count(429), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(0, 0, 0)
    );

    // 25 − 10 cells are left: exactly 15 more pass once credits are there.
    ledger.top_up("acct_1", 100, "more").await.unwrap();
    for i in 0..15 {
        let (status, _, _) = send(&app, get_as("acct_1")).await;
        assert_eq!(status, 200, "request {i}");
    }
    assert_eq!(send(&app, get_as("acct_1")).await.0, 429);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 85);
}

/// A limiter failing open allows without charging a bucket: a refused reserve then gives
/// nothing back (a refund would be free capacity).
#[tokio::test]
async fn nothing_is_refunded_for_a_check_that_charged_nothing() {
    use std::sync::Mutex;
    use tollgate::{
        credits::{ledger::ReserveRequest, Admission, TwoStep, Verdict},
        ratelimit::{BucketKey, Charge, Correction, Decision, Limiter, Outcome, Subject},
        BackendError, LimitKind,
    };

    #[derive(Clone, Default)]
    struct FailingOpen(Arc<Mutex<Vec<Correction>>>);
    impl Limiter for FailingOpen {
        type Future = std::future::Ready<Result<Decision, BackendError>>;
        type SettleFuture = std::future::Ready<Result<(), BackendError>>;
        fn check(&self, _: &[Charge]) -> Self::Future {
            std::future::ready(Ok(Decision::new(Outcome::Allowed)))
        }
        fn settle(&self, corrections: &[Correction]) -> Self::SettleFuture {
            self.0.lock().unwrap().extend_from_slice(corrections);
            std::future::ready(Ok(()))
        }
    }

    let (ledger, limiter) = (MemoryLedger::new(), FailingOpen::default());
    let charge = Charge {
        key: BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0),
        kind: LimitKind::Requests,
        quota: governor::Quota::per_minute(std::num::NonZeroU32::new(1).unwrap()),
        cost: 1,
    };
    let refused = TwoStep::new(ledger, limiter.clone())
        .admit(vec![charge], ReserveRequest::new("acct_1", 5))
        .await;
    assert!(matches!(refused, Verdict::Refused(_)), "{refused:?}");
    assert!(limiter.0.lock().unwrap().is_empty());
}
