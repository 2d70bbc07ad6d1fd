//! The per-request cost of the Redis-backed chain beside the in-memory one: one rate-limit
//! check (one round trip), one reserve (one round trip), one settle (one round trip).
//!
//! Needs `redis-server` on `PATH`: `cargo bench --bench redis --features redis`.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::num::NonZeroU32;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::Quota;
use tollgate::{
    credits::{Ledger, MemoryLedger, ReserveRequest},
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

async fn request(limiter: &impl Limiter, ledger: &impl Ledger) {
    assert!(limiter.check(&charges()).await.unwrap().is_allowed());
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 1))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    ledger.settle(&hold, 1).await.unwrap();
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
    runtime
        .block_on(ledger.top_up("acct_1", u32::MAX.into(), "bench"))
        .unwrap();
    group.bench_function("redis (3 round trips)", |b| {
        b.iter(|| runtime.block_on(request(&limiter, &ledger)))
    });
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
