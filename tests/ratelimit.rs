//! The rate-limit layer, black-box: requests in, statuses, bodies and headers out, on a fake clock.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use governor::{clock::FakeRelativeClock, Quota};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use serde_json::{json, Value};
use tollgate::{
    inspect::InspectedBody,
    ip::ClientIp,
    ratelimit::{
        conformance, BucketKey, Charge, Correction, Decision, KeyBy, Limiter, MemoryLimiter, Plan,
        Plans, RateLimitLayer, Subject,
    },
    BackendError, Caller, LimitKind,
};
use tower::{service_fn, util::BoxCloneService, Layer, ServiceExt};

// ---------------------------------------------------------------------------------------------
// A counting allocator, per thread, to measure the memory of tracked buckets.

struct Counting;

thread_local! {
    static COUNT: Cell<bool> = const { Cell::new(false) };
}
static NET: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNT.try_with(Cell::get).unwrap_or(false) {
            NET.fetch_add(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNT.try_with(Cell::get).unwrap_or(false) {
            NET.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// The service under test.

type Svc = BoxCloneService<
    Request<Full<Bytes>>,
    Response<tollgate::ratelimit::RateLimitBody<BoxBody<Bytes, Infallible>>>,
    Infallible,
>;

/// An upstream that reports `x-total-tokens` as its usage, as JSON or (with `x-stream`) as SSE.
async fn upstream(
    req: Request<InspectedBody<Full<Bytes>>>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let total: Option<u64> = req
        .headers()
        .get("x-total-tokens")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    // The body still arrives whole after inspection.
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let usage = total.map_or(
        Value::Null,
        |t| json!({"prompt_tokens": 1, "completion_tokens": t - 1, "total_tokens": t}),
    );
    let body = if body.starts_with(b"{\"stream\":true") {
        let chunks = vec![
            Bytes::from(
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            ),
            Bytes::from(format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\n")),
            Bytes::from("data: [DONE]\n\n"),
        ];
        let stream = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))));
        BodyExt::boxed(StreamBody::new(stream))
    } else {
        BodyExt::boxed(Full::new(Bytes::from(
            json!({"ok": true, "usage": usage}).to_string(),
        )))
    };
    Ok(Response::new(body))
}

fn service<L: Limiter>(layer: RateLimitLayer<L>) -> Svc {
    BoxCloneService::new(layer.layer(service_fn(upstream)))
}

fn free_and_trusted() -> Plans {
    Plans::new(Plan::new().requests_per_minute(2))
        .with_plan("trusted", Plan::new().requests_per_minute(100))
}

fn caller(key: &str, account: &str, plan: &str) -> Caller {
    Caller::builder(key, account).plan(plan).build()
}

fn get(caller: Option<Caller>) -> Request<Full<Bytes>> {
    let mut req = Request::get("/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    if let Some(caller) = caller {
        req.extensions_mut().insert(caller);
    }
    req
}

fn chat(caller: Caller, body: Value, total_tokens: Option<u64>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/chat/completions").header("content-type", "application/json");
    if let Some(t) = total_tokens {
        req = req.header("x-total-tokens", t);
    }
    let mut req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    req.extensions_mut().insert(caller);
    req
}

async fn send(svc: &Svc, req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Value) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, value)
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

fn fake() -> (FakeRelativeClock, MemoryLimiter<FakeRelativeClock>) {
    let clock = FakeRelativeClock::default();
    (clock.clone(), MemoryLimiter::with_clock(clock))
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_limiter_passes_the_conformance_vectors() {
    let (clock, limiter) = fake();
    conformance::run(&limiter, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn burst_then_refusal() {
    let (_clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(limiter, free_and_trusted()));
    let who = || Some(caller("key_1", "acct_1", "free"));

    let (status, headers, _) = send(&svc, get(who())).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "30s");
    assert_eq!(
        header(&headers, "ratelimit-policy"),
        "\"requests\";q=2;w=60"
    );
    assert_eq!(header(&headers, "ratelimit"), "\"requests\";r=1;t=30");
    assert!(headers.get("x-ratelimit-limit-tokens").is_none());

    let (status, headers, _) = send(&svc, get(who())).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "1m0s");

    let (status, headers, body) = send(&svc, get(who())).await;
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
    assert_eq!(header(&headers, "ratelimit"), "\"requests\";r=0;t=60");
}

#[tokio::test]
async fn refill_timing_and_retry_after_exactness() {
    // 001's Trusted Tier: 100 requests per minute, one every 600 ms.
    let (clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(limiter, free_and_trusted()));
    let who = || Some(caller("key_1", "acct_1", "trusted"));
    for _ in 0..100 {
        assert_eq!(send(&svc, get(who())).await.0, 200);
    }
    let (status, headers, body) = send(&svc, get(who())).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "1");
    assert_eq!(header(&headers, "retry-after-ms"), "600");
    assert_eq!(
        body["error"]["message"],
        "Rate limit exceeded for requests. Please try again in 1 second."
    );

    // One millisecond early is still early, and says so exactly.
    clock.advance(Duration::from_millis(599));
    let (status, headers, _) = send(&svc, get(who())).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), "1");
    assert_eq!(header(&headers, "retry-after-ms"), "1");

    clock.advance(Duration::from_millis(1));
    let (status, headers, _) = send(&svc, get(who())).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "1m0s");

    // A full refill after a minute.
    clock.advance(Duration::from_secs(60));
    let (_, headers, _) = send(&svc, get(who())).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "99");
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "600ms");
}

#[tokio::test]
async fn retry_after_in_the_envelope_format() {
    let (_clock, limiter) = fake();
    let layers = tower::ServiceBuilder::new()
        .layer(
            tollgate::normalize::NormalizeLayer::new().format(tollgate::format::Format::Envelope),
        )
        .layer(RateLimitLayer::new(limiter, free_and_trusted()));
    let svc = layers.service(service_fn(upstream));
    let who = || get(Some(caller("key_1", "acct_1", "free")));
    svc.clone().oneshot(who()).await.unwrap();
    svc.clone().oneshot(who()).await.unwrap();
    let res = svc.oneshot(who()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "30");
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(body["error"]["retryAfter"], 30);
}

#[tokio::test]
async fn tier_change_applies_on_the_next_request() {
    let (_clock, limiter) = fake();
    let plans = free_and_trusted();
    let svc = service(RateLimitLayer::new(limiter, plans.clone()));
    for _ in 0..2 {
        assert_eq!(
            send(&svc, get(Some(caller("key_1", "acct_1", "free"))))
                .await
                .0,
            200
        );
    }
    assert_eq!(
        send(&svc, get(Some(caller("key_1", "acct_1", "free"))))
            .await
            .0,
        429
    );

    // The account completes its first transaction: the authentication layer now reports the
    // trusted plan (001), and the next request gets 100 requests per minute.
    let (status, headers, _) = send(&svc, get(Some(caller("key_1", "acct_1", "trusted")))).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "100");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "99");

    // An operator raises the free plan at runtime: free callers see it on their next request.
    plans.set_plan("default", Plan::new().requests_per_minute(10));
    let (status, headers, _) = send(&svc, get(Some(caller("key_2", "acct_2", "free")))).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "10");
}

#[tokio::test]
async fn token_limits_are_settled_from_usage() {
    let (clock, limiter) = fake();
    let plans = Plans::new(Plan::new().tokens_per_minute(1_000));
    let svc = service(RateLimitLayer::new(limiter, plans));
    let who = || caller("key_1", "acct_1", "default");
    // Estimate: 8 prompt characters → 2 tokens, plus max_tokens 500 = 502.
    let body = json!({"model": "small", "max_tokens": 500, "messages": [{"role": "user", "content": "12345678"}]});

    let (status, headers, reply) = send(&svc, chat(who(), body.clone(), Some(100))).await;
    assert_eq!(status, 200);
    assert_eq!(reply["usage"]["total_tokens"], 100);
    assert_eq!(header(&headers, "x-ratelimit-limit-tokens"), "1000");
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "498");
    assert!(headers.get("x-ratelimit-limit-requests").is_none());

    // The response used 100, not 502: 402 came back when the body ended.
    let (_, headers, _) = send(&svc, get(Some(who()))).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "900");
    assert_eq!(header(&headers, "x-ratelimit-reset-tokens"), "6s");

    // A streamed (SSE) answer that used more than estimated: 700 on a 502 estimate.
    let stream = json!({"stream": true, "max_tokens": 500, "messages": [{"role": "user", "content": "12345678"}]});
    let (status, headers, _) = send(&svc, chat(who(), stream, Some(700))).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "398");
    let (_, headers, _) = send(&svc, get(Some(who()))).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "200");

    // Now a 502 estimate does not fit: refused by tokens, retry exactly when 302 more are back.
    let (status, headers, body_) = send(&svc, chat(who(), body.clone(), Some(1))).await;
    assert_eq!(status, 429);
    assert_eq!(
        body_["error"]["message"],
        "Rate limit exceeded for tokens. Please try again in 19 seconds."
    );
    assert_eq!(header(&headers, "retry-after-ms"), "18120");
    clock.advance(Duration::from_millis(18_120));
    assert_eq!(send(&svc, chat(who(), body, Some(1))).await.0, 200);
}

#[tokio::test]
async fn a_body_dropped_early_settles_with_what_it_saw() {
    let (_clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(
        limiter,
        Plans::new(Plan::new().tokens_per_minute(1_000)),
    ));
    let who = || caller("key_1", "acct_1", "default");
    let req = chat(who(), json!({"max_tokens": 300}), Some(50));
    let res = svc.clone().oneshot(req).await.unwrap();
    // Without reading: the estimate stands.
    drop(res);
    let (_, headers, _) = send(&svc, get(Some(who()))).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "700");
}

#[tokio::test]
async fn a_request_larger_than_the_bucket_can_never_pass() {
    let (_clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(
        limiter,
        Plans::new(Plan::new().tokens_per_minute(1_000)),
    ));
    let (status, headers, body) = send(
        &svc,
        chat(
            caller("k", "a", "default"),
            json!({"max_tokens": 5_000}),
            None,
        ),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(
        body["error"]["message"],
        "Request too large for the tokens limit: it needs 5000 and the limit is 1000. Reduce the prompt or max_tokens."
    );
    assert!(headers.get("retry-after").is_none());
    // Waiting cannot help: the OpenAI SDK must not retry it.
    assert_eq!(header(&headers, "x-should-retry"), "false");
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "1000");
}

#[tokio::test]
async fn two_limits_are_all_or_nothing() {
    let (_clock, limiter) = fake();
    let plans = Plans::new(Plan::new().requests_per_minute(10).tokens_per_minute(1_000));
    let svc = service(RateLimitLayer::new(limiter, plans));
    let who = || caller("key_1", "acct_1", "default");

    let (status, headers, _) = send(&svc, chat(who(), json!({"max_tokens": 800}), None)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "9");
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "200");
    assert_eq!(
        header(&headers, "ratelimit-policy"),
        "\"requests\";q=10;w=60, \"tokens\";q=1000;w=60"
    );
    assert_eq!(
        header(&headers, "ratelimit"),
        "\"requests\";r=9;t=6, \"tokens\";r=200;t=48"
    );

    // The tokens limit refuses: the request is not counted against the requests limit.
    let (status, headers, body) = send(&svc, chat(who(), json!({"max_tokens": 300}), None)).await;
    assert_eq!(status, 429);
    assert_eq!(
        body["error"]["message"],
        "Rate limit exceeded for tokens. Please try again in 6 seconds."
    );
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "9");

    let (status, headers, _) = send(&svc, chat(who(), json!({"max_tokens": 200}), None)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "8");
    assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "0");
}

#[tokio::test]
async fn keys_accounts_and_ips_have_their_own_buckets() {
    let (_clock, limiter) = fake();
    let plans = Plans::new(Plan::new().requests_per_minute(1));
    let by_account = service(RateLimitLayer::new(limiter.clone(), plans.clone()));
    assert_eq!(
        send(&by_account, get(Some(caller("k1", "acct", "x"))))
            .await
            .0,
        200
    );
    // Another key of the same account shares the account's bucket.
    assert_eq!(
        send(&by_account, get(Some(caller("k2", "acct", "x"))))
            .await
            .0,
        429
    );

    let (_clock, limiter) = fake();
    let by_key = service(RateLimitLayer::new(limiter, plans.clone()).key_by(KeyBy::Key));
    assert_eq!(
        send(&by_key, get(Some(caller("k1", "acct", "x")))).await.0,
        200
    );
    assert_eq!(
        send(&by_key, get(Some(caller("k2", "acct", "x")))).await.0,
        200
    );
    assert_eq!(
        send(&by_key, get(Some(caller("k2", "acct", "x")))).await.0,
        429
    );

    // Without a Caller: by client IP, on the "anonymous" plan when there is one.
    let (_clock, limiter) = fake();
    let plans = plans.with_plan("anonymous", Plan::new().requests_per_minute(3));
    let svc = service(RateLimitLayer::new(limiter, plans));
    let from = |ip: [u8; 4]| {
        let mut req = get(None);
        req.extensions_mut()
            .insert(ClientIp(IpAddr::V4(Ipv4Addr::from(ip))));
        req
    };
    let (status, headers, _) = send(&svc, from([10, 0, 0, 1])).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "2");
    let (_, headers, _) = send(&svc, from([10, 0, 0, 2])).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "2");
    // No Caller and no IP: one shared anonymous bucket.
    let (_, headers, _) = send(&svc, get(None)).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "2");
    let (_, headers, _) = send(&svc, get(None)).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "1");
}

#[tokio::test]
async fn global_limit_routes_and_headers_off() {
    let (_clock, limiter) = fake();
    let layer = RateLimitLayer::new(limiter, Plans::new(Plan::new().requests_per_minute(100)))
        .global(Plan::new().requests_per_minute(3))
        .route_exact("/health", Plan::unlimited())
        .route_prefix("/v1/images", Plan::new().requests_per_minute(1));
    let svc = service(layer.clone());
    let at = |path: &str, key: &str| {
        let mut req = Request::get(path).body(Full::new(Bytes::new())).unwrap();
        req.extensions_mut().insert(caller(key, key, "default"));
        req
    };
    // The route override has its own per-caller buckets, and the global limit still counts.
    let (status, headers, _) = send(&svc, at("/v1/images/edits", "a")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "1");
    assert_eq!(send(&svc, at("/v1/images", "a")).await.0, 429);
    assert_eq!(send(&svc, at("/v1/imagesx", "a")).await.0, 200);
    // The global limit (3 in all) is the tightest now: shown, and it refuses caller b.
    let (status, headers, _) = send(&svc, at("/v1/models", "b")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(send(&svc, at("/v1/models", "c")).await.0, 429);
    // An exempt route: no limit, no headers.
    let (status, headers, _) = send(&svc, at("/health", "c")).await;
    assert_eq!(status, 200);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());

    let (_clock, limiter) = fake();
    let quiet = service(RateLimitLayer::new(limiter, free_and_trusted()).headers(false));
    let (_, headers, _) = send(&quiet, get(Some(caller("k", "a", "free")))).await;
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    assert!(headers.get("ratelimit").is_none());
}

#[tokio::test]
async fn idle_buckets_are_evicted_without_changing_decisions() {
    let (clock, limiter) = fake();
    let plans = Plans::new(Plan::new().requests_per_minute(2).tokens_per_minute(1_000));
    let svc = service(RateLimitLayer::new(limiter.clone(), plans));
    for i in 0..10 {
        send(
            &svc,
            chat(
                caller(&format!("k{i}"), &format!("a{i}"), "default"),
                json!({"max_tokens": 10}),
                None,
            ),
        )
        .await;
    }
    assert_eq!(limiter.len(), 20);
    // The token buckets (10 of 1000 per minute) are full again after 600 ms: forgotten.
    clock.advance(Duration::from_millis(599));
    assert_eq!(limiter.evict_idle(), 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(limiter.evict_idle(), 10);
    assert_eq!(limiter.len(), 10);
    // The requests buckets (one of 2 per minute) after 30 s.
    clock.advance(Duration::from_millis(29_399));
    assert_eq!(limiter.evict_idle(), 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(limiter.evict_idle(), 10);
    assert!(limiter.is_empty());
    let (_, headers, _) = send(&svc, get(Some(caller("k0", "a0", "default")))).await;
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "1");
}

#[tokio::test(start_paused = true)]
async fn the_evictor_task_runs_on_a_schedule() {
    let (clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(limiter.clone(), free_and_trusted()));
    let task = limiter.spawn_evictor(Duration::from_secs(10));
    send(&svc, get(Some(caller("k", "a", "free")))).await;
    assert_eq!(limiter.len(), 1);
    clock.advance(Duration::from_secs(30));
    // Tokio's paused clock jumps ahead: no real waiting.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(limiter.len(), 0);
    drop((svc, limiter));
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(task.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_of_many_concurrent_requests_pass() {
    const N: u32 = 25;
    let (_clock, limiter) = fake();
    let svc = service(RateLimitLayer::new(
        limiter,
        Plans::new(Plan::new().requests_per_minute(N)),
    ));
    let passed = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = svc.clone();
            let passed = Arc::clone(&passed);
            tokio::spawn(async move {
                let res = svc
                    .oneshot(get(Some(caller("k", "a", "default"))))
                    .await
                    .unwrap();
                if res.status() == 200 {
                    passed.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(passed.load(Ordering::SeqCst), N as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_two_limit_checks_never_overspend() {
    // 40 tasks each ask 1 request + 100 tokens of a 10-request, 1000-token plan, across keys of
    // one account: exactly 10 pass, and both buckets are exactly empty.
    let (_clock, limiter) = fake();
    let quota_r = Quota::per_minute(NonZeroU32::new(10).unwrap());
    let quota_t = Quota::per_minute(NonZeroU32::new(1000).unwrap());
    let subject = Subject::Account("acct".into());
    let charges = Arc::new(vec![
        Charge {
            key: BucketKey::new(subject.clone(), "p", 0),
            kind: LimitKind::Requests,
            quota: quota_r,
            cost: 1,
        },
        Charge {
            key: BucketKey::new(subject.clone(), "p", 1),
            kind: LimitKind::Tokens,
            quota: quota_t,
            cost: 100,
        },
    ]);
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (limiter, charges) = (limiter.clone(), Arc::clone(&charges));
            tokio::spawn(async move { limiter.check(&charges).await.unwrap().is_allowed() })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += usize::from(task.await.unwrap());
    }
    assert_eq!(passed, 10);
    let probe = [
        Charge {
            cost: 0,
            ..charges[0].clone()
        },
        Charge {
            cost: 0,
            ..charges[1].clone()
        },
    ];
    let decision = limiter.check(&probe).await.unwrap();
    assert_eq!(decision.status(LimitKind::Requests).unwrap().remaining, 0);
    assert_eq!(decision.status(LimitKind::Tokens).unwrap().remaining, 0);
}

/// A backend that is down.
#[derive(Clone, Debug)]
struct Down;

impl Limiter for Down {
    type Future = std::future::Ready<Result<Decision, BackendError>>;
    type SettleFuture = std::future::Ready<Result<(), BackendError>>;
    fn check(&self, _: &[Charge]) -> Self::Future {
        std::future::ready(Err(
            BackendError::new("redis: connection refused").with_retry_after(Duration::from_secs(2))
        ))
    }
    fn settle(&self, _: &[Correction]) -> Self::SettleFuture {
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failing_backend_is_a_503() {
    let svc = service(RateLimitLayer::new(Down, free_and_trusted()));
    let (status, headers, body) = send(&svc, get(Some(caller("k", "a", "free")))).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert!(!body["error"]["message"].as_str().unwrap().contains("redis"));
    assert_eq!(header(&headers, "retry-after"), "2");
}

#[test]
fn memory_per_bucket() {
    // Measured with a counting allocator on this thread: the net heap growth of a limiter
    // tracking 100 000 buckets (one requests limit per account), divided by 100 000. The account
    // ids are owned by the map (their `Caller`s are gone), as in a long-running server.
    const KEYS: usize = 100_000;
    let (_clock, limiter) = fake();
    let quota = Quota::per_minute(NonZeroU32::new(10).unwrap());
    let ids: Vec<Arc<str>> = (0..KEYS)
        .map(|i| Arc::from(format!("acct_{i:08}")))
        .collect();
    // The plan's name is shared by all its buckets, as the layer does.
    let policy: Arc<str> = Arc::from("plan:free");
    COUNT.with(|c| c.set(true));
    let before = NET.load(Ordering::Relaxed);
    for id in &ids {
        let charges = [Charge {
            key: BucketKey::new(Subject::Account(Arc::clone(id)), Arc::clone(&policy), 0),
            kind: LimitKind::Requests,
            quota,
            cost: 1,
        }];
        assert!(
            futures_util::FutureExt::now_or_never(limiter.check(&charges))
                .unwrap()
                .unwrap()
                .is_allowed()
        );
    }
    let table = NET.load(Ordering::Relaxed) - before;
    COUNT.with(|c| c.set(false));
    assert_eq!(limiter.len(), KEYS);
    // The id strings: 16 bytes of Arc counts + 13 bytes of text each.
    let ids_bytes = KEYS * (16 + 13);
    let per_bucket = table / KEYS;
    println!(
        "memory per tracked bucket: {per_bucket} bytes in the table (+ {} bytes for an id string the map alone owns)",
        ids_bytes / KEYS
    );
    assert!(
        (57..=135).contains(&per_bucket),
        "{per_bucket} bytes per bucket"
    );
    drop(ids);
}
