//! Per-request overhead of every tollgate layer and of the whole chain, side by side with the
//! bare service and with peer crates (tower_governor, tower-http's bearer validation).
//!
//! ```sh
//! cargo bench --bench overhead                 # both groups
//! cargo bench --bench overhead -- overhead/    # one group
//! ```
//!
//! Every case calls a ready service built once, with a request built the same way for all (a
//! GET with a Bearer key, a peer address and nothing else), and drains the response body. Heap
//! allocations per request are counted with a counting global allocator and printed first.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use axum::{body::Body, extract::ConnectInfo, routing::get, Router};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::BodyExt;
use tollgate::{
    auth::{AccountRecord, AuthLayer, AuthShield, KeyRecord, MemoryKeyStore},
    credits::{CreditsLayer, MemoryLedger, Pricing},
    ip::{IpAllowLayer, IpSet},
    keys,
    normalize::NormalizeLayer,
    ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer},
};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// --- allocation counting -------------------------------------------------------------------

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// --- the services ------------------------------------------------------------------------

const KEY: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";
const ACCOUNTS: usize = 1000;

fn key_for(i: usize) -> String {
    format!("sk-bench-{i:06}-0123456789abcdefghijklmnopqr")
}

/// The bare service: an axum Router with one handler returning a small body.
fn bare() -> Router {
    Router::new().route("/v1/models", get(|| async { "{\"data\":[]}" }))
}

fn request(key: &str) -> Request<Body> {
    let mut req = Request::get("/v1/models")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    req
}

struct Stores {
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
}

fn stores() -> Stores {
    let mut keys = MemoryKeyStore::new().with_account(AccountRecord::new("acct_bench", "bench"));
    keys = keys.with_key(keys::digest(KEY), KeyRecord::new("key_bench", "acct_bench"));
    for i in 0..ACCOUNTS {
        keys = keys
            .with_account(AccountRecord::new(format!("acct_{i}"), "bench"))
            .with_key(
                keys::digest(&key_for(i)),
                KeyRecord::new(format!("key_{i}"), format!("acct_{i}")),
            );
    }
    let ledger = MemoryLedger::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        use tollgate::credits::LedgerAdmin;
        ledger.top_up("acct_bench", 1 << 50, "bench").await.unwrap();
        for i in 0..ACCOUNTS {
            ledger
                .top_up(&format!("acct_{i}"), 1 << 50, "bench")
                .await
                .unwrap();
        }
    });
    Stores { keys, ledger }
}

fn plans() -> Plans {
    // Never refuses in the benchmark: the cost of the check, not of a refusal.
    Plans::new(Plan::new().requests_per_second(u32::MAX))
}

fn auth(stores: &Stores) -> AuthLayer<MemoryKeyStore> {
    AuthLayer::new(stores.keys.clone()).shield(AuthShield::new(u32::MAX, Duration::from_secs(1)))
}

fn ip_allow() -> IpAllowLayer {
    IpAllowLayer::new().allow("127.0.0.0/8, ::1/128".parse::<IpSet>().unwrap())
}

fn rate_limit() -> RateLimitLayer<MemoryLimiter> {
    RateLimitLayer::new(MemoryLimiter::new(), plans())
}

fn credits(stores: &Stores) -> CreditsLayer<MemoryLedger> {
    CreditsLayer::new(stores.ledger.clone(), Pricing::flat(1))
}

/// A `tower_governor` key extractor: the Bearer token, as tollgate keys per caller.
#[derive(Clone, Debug)]
struct BearerKey;

impl tower_governor::key_extractor::KeyExtractor for BearerKey {
    type Key = String;
    fn extract<T>(&self, req: &Request<T>) -> Result<String, tower_governor::GovernorError> {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

fn tower_governor_layer() -> tower_governor::GovernorLayer<
    BearerKey,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
    Body,
> {
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(BearerKey)
        .finish()
        .unwrap();
    tower_governor::GovernorLayer::new(config)
}

/// `tower_governor` with its rate-limit headers on (`x-ratelimit-limit`, `-remaining`, ...), the
/// peer closest to what `rate_limit` does.
fn tower_governor_headers_layer(
) -> tower_governor::GovernorLayer<BearerKey, governor::middleware::StateInformationMiddleware, Body>
{
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(BearerKey)
        .use_headers()
        .finish()
        .unwrap();
    tower_governor::GovernorLayer::new(config)
}

#[allow(deprecated)]
fn bearer_layer() -> tower_http::validate_request::ValidateRequestHeaderLayer<
    tower_http::auth::require_authorization::Bearer<Body>,
> {
    tower_http::validate_request::ValidateRequestHeaderLayer::bearer(KEY)
}

// --- running ------------------------------------------------------------------------------

async fn call<S, B>(svc: &mut S, req: Request<Body>) -> u16
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = res.status().as_u16();
    let mut body = std::pin::pin!(res.into_body());
    while let Some(frame) = body.as_mut().frame().await {
        black_box(frame.unwrap());
    }
    status
}

fn case<S, B>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut svc: S,
    key: &str,
    expect: u16,
) where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `TOLLGATE_PROFILE=full_stack:100000` runs that one case that many times and nothing else:
    // run it under `valgrind --tool=callgrind` twice with different counts to get the exact
    // instructions per request.
    if let Ok(profile) = std::env::var("TOLLGATE_PROFILE") {
        let (case, iters) = profile
            .split_once(':')
            .unwrap_or((profile.as_str(), "100000"));
        if case == name {
            let iters: u64 = iters.parse().expect("TOLLGATE_PROFILE=case:iterations");
            for _ in 0..iters {
                black_box(rt.block_on(call(&mut svc, request(key))));
            }
            std::process::exit(0);
        }
        return;
    }
    assert_eq!(rt.block_on(call(&mut svc, request(key))), expect, "{name}");
    if std::env::var_os("TOLLGATE_SIZES").is_some() {
        let future = rt.block_on(async { svc.ready().await.map(|s| s.call(request(key))).ok() });
        println!(
            "overhead/{name}: the response future is {} bytes",
            std::mem::size_of_val(&future)
        );
    }
    println!(
        "overhead/{name}: {:.2} allocations per request",
        allocations(&rt, &mut svc, key)
    );
    group.bench_function(name, |b| {
        b.iter(|| rt.block_on(call(&mut svc, request(key))));
    });
}

/// Heap allocations per request, after warming up.
fn allocations<S, B>(rt: &tokio::runtime::Runtime, svc: &mut S, key: &str) -> f64
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    for _ in 0..1000 {
        rt.block_on(call(svc, request(key)));
    }
    const N: u64 = 10_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        rt.block_on(call(svc, request(key)));
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
}

/// The whole chain: normalize → authenticate → IP allowlist → rate limit → credits → bare.
macro_rules! full_stack {
    ($stores:expr) => {
        ServiceBuilder::new()
            .layer(NormalizeLayer::new())
            .layer(auth($stores))
            .layer(ip_allow())
            .layer(rate_limit())
            .layer(credits($stores))
            .service(bare())
    };
}

fn overhead(c: &mut Criterion) {
    let stores = stores();

    let mut group = c.benchmark_group("overhead");
    case(&mut group, "bare", bare(), KEY, 200);
    case(
        &mut group,
        "normalize",
        NormalizeLayer::new().layer(bare()),
        KEY,
        200,
    );
    case(&mut group, "auth", auth(&stores).layer(bare()), KEY, 200);
    case(&mut group, "ip_allow", ip_allow().layer(bare()), KEY, 200);
    case(
        &mut group,
        "rate_limit",
        rate_limit().layer(bare()),
        KEY,
        200,
    );
    // Credits alone needs a caller: the auth layer of `full_stack` gives one; here a layer
    // in front inserts the same prebuilt caller.
    let caller = tollgate::Caller::builder("key_bench", "acct_bench")
        .plan("bench")
        .build();
    let with_caller = tower::util::MapRequestLayer::new(move |mut req: Request<Body>| {
        req.extensions_mut().insert(caller.clone());
        req
    });
    case(
        &mut group,
        "credits",
        with_caller.layer(credits(&stores).layer(bare())),
        KEY,
        200,
    );
    case(&mut group, "full_stack", full_stack!(&stores), KEY, 200);
    case(
        &mut group,
        "full_stack_rejected",
        full_stack!(&stores),
        "sk-bench-wrong-key-000000000000000",
        401,
    );
    case(
        &mut group,
        "tower_governor",
        tower_governor_layer().layer(bare()),
        KEY,
        200,
    );
    case(
        &mut group,
        "tower_governor_headers",
        tower_governor_headers_layer().layer(bare()),
        KEY,
        200,
    );
    case(
        &mut group,
        "tower_http_bearer",
        bearer_layer().layer(bare()),
        KEY,
        200,
    );
    case(
        &mut group,
        "peers_combined",
        ServiceBuilder::new()
            .layer(bearer_layer())
            .layer(tower_governor_layer())
            .service(bare()),
        KEY,
        200,
    );
    group.finish();

    // Two threads driving the whole chain: one hot account, or requests spread over many.
    let mut group = c.benchmark_group("contention");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    let many: Vec<String> = (0..ACCOUNTS).map(key_for).collect();
    for (name, spread) in [("hot_account", false), ("many_accounts", true)] {
        let svc = full_stack!(&stores);
        let many = &many;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(2);
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..2 {
                        let mut svc = svc.clone();
                        scope.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .unwrap();
                            for i in 0..per_thread as usize {
                                let key = if spread {
                                    many[(i * 2 + t) % ACCOUNTS].as_str()
                                } else {
                                    KEY
                                };
                                black_box(rt.block_on(call(&mut svc, request(key))));
                            }
                        });
                    }
                });
                started.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
