//! The per-request cost of the Redis-backed chain beside the in-memory one.
//!
//! - `limit+reserve+settle`: the backends alone. Two layers make three round trips (rate-limit
//!   check, reserve, settle); the backend's fused `Admission` (`admit` + `settle`) makes two (one script
//!   charges the limits and places the hold, one settles).
//! - `chain`: the whole chain through the layers (normalize → auth → rate limit → credits → an
//!   axum handler), in memory and on Redis, with `CreditsLayer::rate_limit` (one step) and with
//!   the two layers; the Redis commands per request are printed.
//!
//! Needs `redis-server` on `PATH`: `cargo bench --bench redis --features redis`.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::num::NonZeroU32;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::Quota;
use tollgate::{
    credits::{
        ledger::{Reservation, ReserveRequest},
        Admission, LedgerAdmin, MemoryLedger, Verdict,
    },
    ratelimit::{BucketKey, Charge, Limiter, MemoryLimiter, Subject},
    LimitKind,
};

fn charges() -> [Charge; 1] {
    [Charge {
        key: BucketKey::new(Subject::Account("acct_1".into()), "plan:bench", 0),
        kind: LimitKind::Requests,
        quota: Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()),
        cost: 1,
    }]
}

async fn request(limiter: &impl Limiter, ledger: &impl LedgerAdmin) {
    assert!(limiter.check(&charges()).await.unwrap().is_allowed());
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 1))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    ledger.settle(&hold, 1).await.unwrap();
}

async fn request_one_step(admission: &impl Admission) {
    let verdict = admission
        .admit(charges().to_vec(), ReserveRequest::new("acct_1", 1))
        .await;
    let Verdict::Admitted {
        reservation: Reservation::Held(hold),
        ..
    } = verdict
    else {
        panic!("refused: {verdict:?}");
    };
    admission.settle(&hold, 1, &[]).await.unwrap();
}

fn chain(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("limit+reserve+settle");

    let (limiter, ledger) = (MemoryLimiter::new(), MemoryLedger::new());
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("memory", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });

    let server = redis_server::RedisServer::start();
    let backend = runtime
        .block_on(tollgate::redis::RedisBackend::connect(&server.url()))
        .unwrap();
    let (limiter, ledger) = (backend.limiter(), backend.ledger());
    let admission = backend.admission();
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("redis (3 round trips)", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });
    group.bench_function("redis (2 round trips, one step)", |b| {
        b.iter(|| runtime.block_on(request_one_step(&admission)))
    });
    group.finish();
}

/// The whole chain (normalize → auth → rate limit → credits → an axum handler) through the layers,
/// with in-memory backends and with Redis ones; prints the Redis commands per request.
fn layered(c: &mut Criterion) {
    use axum::{body::Body, extract::ConnectInfo, routing::get, Router};
    use http::Request;
    use http_body_util::BodyExt;
    use tollgate::{
        auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, KeyStore, MemoryKeyStore},
        credits::{CreditsLayer, Pricing, TwoStep},
        keys,
        normalize::NormalizeLayer,
        ratelimit::{Plan, Plans, RateLimitLayer},
    };
    use tower::{Service, ServiceBuilder, ServiceExt};

    const KEY: &str = "sk-bench-redis-0123456789abcdef";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    async fn seed<K: KeyAdmin, L: LedgerAdmin>(keys: &K, ledger: &L) {
        keys.put_account(AccountRecord::new("acct_1", "bench"))
            .await
            .unwrap();
        if keys.key("key_1").await.unwrap().is_none() {
            keys.insert_key(keys::digest(KEY), KeyRecord::new("key_1", "acct_1"))
                .await
                .unwrap();
        }
        ledger
            .top_up("acct_1", 1 << 40, "bench-chain")
            .await
            .unwrap();
    }

    fn stack<K, L, A>(
        keys: K,
        ledger: L,
        limiter: A::Limiter,
        admission: A,
    ) -> impl Service<
        Request<Body>,
        Response = http::Response<
            impl http_body::Body<Data = bytes::Bytes, Error = impl std::fmt::Debug>,
        >,
        Error = std::convert::Infallible,
    > + Clone
    where
        K: KeyStore + Clone,
        L: LedgerAdmin + Clone,
        A: Admission,
    {
        let plans = Plans::new(Plan::new().requests_per_second(u32::MAX));
        ServiceBuilder::new()
            .layer(NormalizeLayer::new())
            .layer(AuthLayer::new(keys))
            .layer(
                CreditsLayer::new(ledger, Pricing::flat(1))
                    .rate_limit_with(RateLimitLayer::new(limiter, plans), admission),
            )
            .service(Router::new().route("/v1/models", get(|| async { "{}" })))
    }

    fn two_layers<K, L, Lim>(
        keys: K,
        ledger: L,
        limiter: Lim,
    ) -> impl Service<
        Request<Body>,
        Response = http::Response<
            impl http_body::Body<Data = bytes::Bytes, Error = impl std::fmt::Debug>,
        >,
        Error = std::convert::Infallible,
    > + Clone
    where
        K: KeyStore + Clone,
        L: LedgerAdmin + Clone,
        Lim: Limiter,
    {
        let plans = Plans::new(Plan::new().requests_per_second(u32::MAX));
        ServiceBuilder::new()
            .layer(NormalizeLayer::new())
            .layer(AuthLayer::new(keys))
            .layer(RateLimitLayer::new(limiter, plans))
            .layer(CreditsLayer::new(ledger, Pricing::flat(1)))
            .service(Router::new().route("/v1/models", get(|| async { "{}" })))
    }

    async fn call<S, B>(svc: &mut S)
    where
        S: Service<Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>,
        B: http_body::Body<Data = bytes::Bytes>,
        B::Error: std::fmt::Debug,
    {
        let mut req = Request::get("/v1/models")
            .header("authorization", format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                4000,
            ))));
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }

    let mut group = c.benchmark_group("chain");
    let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
    runtime.block_on(seed(&keys, &ledger));
    let mut memory = two_layers(keys.clone(), ledger.clone(), MemoryLimiter::new());
    group.bench_function("memory", |b| b.iter(|| runtime.block_on(call(&mut memory))));
    let limiter = MemoryLimiter::new();
    let mut memory = stack(
        keys,
        ledger.clone(),
        limiter.clone(),
        TwoStep::new(ledger, limiter),
    );
    group.bench_function("memory_one_step", |b| {
        b.iter(|| runtime.block_on(call(&mut memory)))
    });

    let server = redis_server::RedisServer::start();
    let backend = runtime
        .block_on(tollgate::redis::RedisBackend::connect(&server.url()))
        .unwrap();
    // The key store's invalidation listener is a task on this runtime.
    let _entered = runtime.enter();
    let (keys, ledger) = (backend.key_store(), backend.ledger());
    runtime.block_on(seed(&keys, &ledger));
    // Per request (cache warm): the scripts called, each one round trip (`EVALSHA` and its
    // read-only variant), and every command Redis ran, inside the scripts included.
    let stats = |runtime: &tokio::runtime::Runtime| -> (u64, u64) {
        runtime.block_on(async {
            let client = redis::Client::open(server.url()).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let info: String = redis::cmd("INFO")
                .arg("everything")
                .query_async(&mut con)
                .await
                .unwrap();
            let mut scripts = 0;
            let mut total = 0;
            for line in info.lines() {
                if let Some(v) = line.strip_prefix("total_commands_processed:") {
                    total = v.trim().parse().unwrap();
                }
                for name in [
                    "cmdstat_evalsha:",
                    "cmdstat_evalsha_ro:",
                    "cmdstat_fcall:",
                    "cmdstat_fcall_ro:",
                ] {
                    if let Some(rest) = line.strip_prefix(name) {
                        let calls = rest.split(',').next().unwrap().trim_start_matches("calls=");
                        scripts += calls.parse::<u64>().unwrap();
                    }
                }
            }
            (scripts, total)
        })
    };
    // Settlements run on spawned tasks: let them finish before the counters are read.
    let drain = |runtime: &tokio::runtime::Runtime| {
        runtime.block_on(tokio::time::sleep(std::time::Duration::from_millis(100)))
    };
    let measure = |name: &str, svc: &mut dyn FnMut()| {
        svc();
        drain(&runtime);
        let (scripts_before, total_before) = stats(&runtime);
        const N: u64 = 200;
        for _ in 0..N {
            svc();
        }
        drain(&runtime);
        let (scripts_after, total_after) = stats(&runtime);
        println!(
            "chain/{name}: {:.2} round trips (scripts) and {:.1} Redis commands per request",
            (scripts_after - scripts_before) as f64 / N as f64,
            (total_after - total_before) as f64 / N as f64,
        );
    };
    let mut redis = stack(
        keys.clone(),
        ledger.clone(),
        backend.limiter(),
        backend.admission(),
    );
    let mut layered = two_layers(keys, ledger, backend.limiter());
    measure("redis", &mut || runtime.block_on(call(&mut redis)));
    measure("redis_two_layers", &mut || {
        runtime.block_on(call(&mut layered))
    });
    group.bench_function("redis", |b| b.iter(|| runtime.block_on(call(&mut redis))));
    group.bench_function("redis_two_layers", |b| {
        b.iter(|| runtime.block_on(call(&mut layered)))
    });
    group.finish();
}

criterion_group!(benches, chain, layered);
criterion_main!(benches);
