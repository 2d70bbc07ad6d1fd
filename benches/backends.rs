//! The per-request cost of the chain on every backend, side by side: memory, SQLite, Redis,
//! PostgreSQL.
//!
//! - `limit+reserve+settle`: the backends alone. Two layers make three round trips (rate-limit
//!   check, reserve, settle); a backend's fused `Admission` (`admit` + `settle`) makes two (one
//!   script or statement charges the limits and places the hold, one settles).
//! - `chain`: the whole chain through the layers (normalize → auth → rate limit and credits → an
//!   axum handler) with `CreditsLayer::rate_limit` (one step: `memory_one_step`, `sqlite`,
//!   `redis`, `postgres`) and with the two layers (`memory`, `redis_two_layers`,
//!   `postgres_two_layers`). The round trips per request of the shared backends are counted by
//!   their servers (Redis `INFO commandstats`, PostgreSQL `pg_stat_statements`) and printed
//!   first; SQLite and memory make none (in-process).
//!
//! Starts its own `redis-server` and PostgreSQL (`initdb` + `pg_ctl`, see `tests/support/`):
//! `cargo bench --bench backends --features redis,sqlite,postgres`.

#[path = "../tests/support/pg_server.rs"]
mod pg_server;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;
#[path = "../tests/support/temp_dir.rs"]
mod temp_dir;

use std::{num::NonZeroU32, time::Duration};

use axum::{body::Body, extract::ConnectInfo, routing::get, Router};
use criterion::{criterion_group, criterion_main, Criterion};
use governor::Quota;
use http::Request;
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, KeyStore, MemoryKeyStore},
    credits::{
        ledger::{Reservation, ReserveRequest},
        Admission, CreditsLayer, LedgerAdmin, MemoryLedger, Pricing, TwoStep, Verdict,
    },
    keys,
    normalize::NormalizeLayer,
    ratelimit::{BucketKey, Charge, Limiter, MemoryLimiter, Plan, Plans, RateLimitLayer, Subject},
    LimitKind,
};
use tower::{Service, ServiceBuilder, ServiceExt};

const KEY: &str = "sk-bench-backends-0123456789abcdef";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

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

async fn postgres(
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

/// What a server counted so far: round trips (Redis scripts, PostgreSQL statements) and the
/// commands it ran (Redis: inside the scripts included; PostgreSQL: the statements).
type Counter<'a> = dyn Fn(&Runtime) -> (u64, u64) + 'a;

/// Redis scripts called (`EVALSHA` and its read-only variant), each one round trip, and every
/// command Redis ran.
fn redis_scripts(url: &str, runtime: &Runtime) -> (u64, u64) {
    runtime.block_on(async {
        let client = redis::Client::open(url).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("everything")
            .query_async(&mut con)
            .await
            .unwrap();
        let (mut scripts, mut total) = (0, 0);
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
}

/// Prints the round trips per request of `svc`, counted by `count` over 200 requests (spawned
/// settlements given 100 ms to finish).
fn round_trips(runtime: &Runtime, name: &str, count: &Counter<'_>, svc: &mut dyn FnMut()) {
    let drain = || runtime.block_on(tokio::time::sleep(Duration::from_millis(100)));
    svc();
    drain();
    let before = count(runtime);
    const N: u64 = 200;
    for _ in 0..N {
        svc();
    }
    drain();
    let after = count(runtime);
    println!(
        "{name}: {:.2} round trips and {:.1} server commands per request",
        (after.0 - before.0) as f64 / N as f64,
        (after.1 - before.1) as f64 / N as f64,
    );
}

fn backends_alone(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("limit+reserve+settle");

    let (limiter, ledger) = (MemoryLimiter::new(), MemoryLedger::new());
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("memory", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });

    let redis_server = redis_server::RedisServer::start();
    let backend = runtime
        .block_on(tollgate::redis::RedisBackend::connect(&redis_server.url()))
        .unwrap();
    let (limiter, ledger, admission) = (backend.limiter(), backend.ledger(), backend.admission());
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("redis (3 round trips)", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });
    group.bench_function("redis (2 round trips, one step)", |b| {
        b.iter(|| runtime.block_on(request_one_step(&admission)))
    });

    let pg_server = pg_server::PgServer::start();
    let backend = runtime.block_on(postgres(&pg_server, "bench_backends"));
    let (limiter, ledger, admission) = (backend.limiter(), backend.ledger(), backend.admission());
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

/// The chain with the rate limits and the credits in one step.
fn one_step<K, L, A>(
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

/// The chain with a rate-limit layer, then a credits layer.
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

fn chain(c: &mut Criterion) {
    let runtime = runtime();
    // The key stores' invalidation listeners are tasks on this runtime.
    let _entered = runtime.enter();
    let mut group = c.benchmark_group("chain");

    let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
    runtime.block_on(seed(&keys, &ledger));
    let mut memory = two_layers(keys.clone(), ledger.clone(), MemoryLimiter::new());
    group.bench_function("memory", |b| b.iter(|| runtime.block_on(call(&mut memory))));
    let limiter = MemoryLimiter::new();
    let mut memory = one_step(
        keys,
        ledger.clone(),
        limiter.clone(),
        TwoStep::new(ledger, limiter),
    );
    group.bench_function("memory_one_step", |b| {
        b.iter(|| runtime.block_on(call(&mut memory)))
    });

    let dir = temp_dir::TempDir::new("bench-backends");
    let sqlite = runtime
        .block_on(tollgate::sqlite::SqliteBackend::open(dir.join("books.db")))
        .unwrap();
    let (keys, ledger) = (sqlite.key_store(), sqlite.ledger());
    runtime.block_on(seed(&keys, &ledger));
    let limiter = MemoryLimiter::new();
    let mut sqlite_chain = one_step(
        keys,
        ledger.clone(),
        limiter.clone(),
        TwoStep::new(ledger, limiter),
    );
    group.bench_function("sqlite", |b| {
        b.iter(|| runtime.block_on(call(&mut sqlite_chain)))
    });

    let redis_server = redis_server::RedisServer::start();
    let redis_url = redis_server.url();
    let backend = runtime
        .block_on(tollgate::redis::RedisBackend::connect(&redis_url))
        .unwrap();
    let (keys, ledger) = (backend.key_store(), backend.ledger());
    runtime.block_on(seed(&keys, &ledger));
    let mut redis = one_step(
        keys.clone(),
        ledger.clone(),
        backend.limiter(),
        backend.admission(),
    );
    let mut redis_layers = two_layers(keys, ledger, backend.limiter());
    let count = |runtime: &Runtime| redis_scripts(&redis_url, runtime);
    round_trips(&runtime, "chain/redis", &count, &mut || {
        runtime.block_on(call(&mut redis))
    });
    round_trips(&runtime, "chain/redis_two_layers", &count, &mut || {
        runtime.block_on(call(&mut redis_layers))
    });

    let pg_server = pg_server::PgServer::start();
    let backend = runtime.block_on(postgres(&pg_server, "bench_chain"));
    let (keys, ledger) = (backend.key_store(), backend.ledger());
    runtime.block_on(seed(&keys, &ledger));
    let mut postgres = one_step(
        keys.clone(),
        ledger.clone(),
        backend.limiter(),
        backend.admission(),
    );
    let mut postgres_layers = two_layers(keys, ledger, backend.limiter());
    let count = |_: &Runtime| {
        let statements = pg_server.statements("bench_chain");
        (statements, statements)
    };
    round_trips(&runtime, "chain/postgres", &count, &mut || {
        runtime.block_on(call(&mut postgres))
    });
    round_trips(&runtime, "chain/postgres_two_layers", &count, &mut || {
        runtime.block_on(call(&mut postgres_layers))
    });

    group.bench_function("redis", |b| b.iter(|| runtime.block_on(call(&mut redis))));
    group.bench_function("redis_two_layers", |b| {
        b.iter(|| runtime.block_on(call(&mut redis_layers)))
    });
    group.bench_function("postgres", |b| {
        b.iter(|| runtime.block_on(call(&mut postgres)))
    });
    group.bench_function("postgres_two_layers", |b| {
        b.iter(|| runtime.block_on(call(&mut postgres_layers)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short: the machine is shared.
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = chain, backends_alone
}
criterion_main!(benches);
