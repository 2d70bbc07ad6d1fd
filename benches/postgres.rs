//! The per-request cost of the PostgreSQL-backed chain beside the in-memory one.
//!
//! - `limit+reserve+settle`: the backends alone. Two layers make three round trips (rate-limit
//!   check, reserve, settle); the backend's fused `Admission` (`admit` + `settle`) makes two (one
//!   statement charges the limits and places the hold, one settles).
//! - `chain`: the whole chain through the layers (normalize → auth → rate limit → credits → an
//!   axum handler), in memory and on PostgreSQL, with `CreditsLayer::rate_limit` (one step) and
//!   with the two layers; the statements per request (`pg_stat_statements`) are printed.
//!
//! Starts its own PostgreSQL (`initdb` + `pg_ctl`, see `tests/support/pg_server.rs`):
//! `cargo bench --bench postgres --features postgres`.

#[path = "../tests/support/pg_server.rs"]
mod pg_server;

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

async fn backend(
    server: &pg_server::PgServer,
    schema: &str,
) -> tollgate::postgres::PostgresBackend {
    let backend = tollgate::postgres::PostgresBackend::connect_with(
        &server.url(),
        tollgate::postgres::PostgresOptions::new().schema(schema),
    )
    .await
    .unwrap();
    backend.migrate().await.unwrap();
    backend
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

    let server = pg_server::PgServer::start();
    let backend = runtime.block_on(backend(&server, "bench_backends"));
    let (limiter, ledger) = (backend.limiter(), backend.ledger());
    let admission = backend.admission();
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("postgres (3 round trips)", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });
    group.bench_function("postgres (2 round trips, one step)", |b| {
        b.iter(|| runtime.block_on(request_one_step(&admission)))
    });
    group.finish();
}

/// The whole chain (normalize → auth → rate limit → credits → an axum handler) through the layers,
/// with in-memory backends and with PostgreSQL ones; prints the statements per request.
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

    const KEY: &str = "sk-bench-postgres-0123456789abcdef";
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

    let server = pg_server::PgServer::start();
    let backend = runtime.block_on(backend(&server, "bench_chain"));
    // The key store's invalidation listener is a task on this runtime.
    let _entered = runtime.enter();
    let (keys, ledger) = (backend.key_store(), backend.ledger());
    runtime.block_on(seed(&keys, &ledger));
    // Settlements run on spawned tasks: let them finish before the counters are read.
    let drain = |runtime: &tokio::runtime::Runtime| {
        runtime.block_on(tokio::time::sleep(std::time::Duration::from_millis(100)))
    };
    // Per request (key cache warm): the statements the server ran, each one round trip.
    let measure = |name: &str, svc: &mut dyn FnMut()| {
        svc();
        drain(&runtime);
        let before = server.statements("bench_chain");
        const N: u64 = 200;
        for _ in 0..N {
            svc();
        }
        drain(&runtime);
        let after = server.statements("bench_chain");
        println!(
            "chain/{name}: {:.2} round trips (statements) per request",
            (after - before) as f64 / N as f64,
        );
    };
    let mut postgres = stack(
        keys.clone(),
        ledger.clone(),
        backend.limiter(),
        backend.admission(),
    );
    let mut layered = two_layers(keys, ledger, backend.limiter());
    measure("postgres", &mut || runtime.block_on(call(&mut postgres)));
    measure("postgres_two_layers", &mut || {
        runtime.block_on(call(&mut layered))
    });
    group.bench_function("postgres", |b| {
        b.iter(|| runtime.block_on(call(&mut postgres)))
    });
    group.bench_function("postgres_two_layers", |b| {
        b.iter(|| runtime.block_on(call(&mut layered)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short: the machine is shared.
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = chain, layered
}
criterion_main!(benches);
