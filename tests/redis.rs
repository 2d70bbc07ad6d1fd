//! The Redis backends against a real `redis-server` (started on a free port, killed on drop):
//! several replicas sharing one Redis behave as one.
#![cfg(feature = "redis")]

#[path = "support/books.rs"]
mod books;
#[path = "support/chain.rs"]
mod chain;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::{
    num::NonZeroU32,
    time::{Duration, Instant, SystemTime},
};

use books::{assert_books, patiently};
use chain::{one_step, send_one};
use governor::Quota;
use redis_server::RedisServer;
use tollgate::{
    auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStatus, KeyStore},
    credits::{
        ledger::{EntryKind, Fingerprint, JournalQuery, ReserveError, ReserveRequest},
        Ledger, LedgerAdmin,
    },
    keys,
    ratelimit::{BucketKey, Charge, Limiter, Subject},
    redis::{FailMode, RedisBackend, RedisOptions},
    LimitKind,
};

async fn replica(server: &RedisServer, options: RedisOptions) -> RedisBackend {
    RedisBackend::connect_with(&server.url(), options)
        .await
        .expect("connect")
}

/// For exactness under heavy concurrency (thousands of calls queued on one connection, on a
/// loaded 2-core machine): time-outs are not what these tests are about.
fn patient() -> RedisOptions {
    RedisOptions::new().response_timeout(Duration::from_secs(10))
}

fn fast() -> RedisOptions {
    RedisOptions::new()
        .response_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .circuit_breaker(3, Duration::from_millis(200))
}

fn charge(subject: &str, per_minute: u32) -> Charge {
    Charge {
        key: BucketKey::new(Subject::Account(subject.into()), "plan:test", 0),
        kind: LimitKind::Requests,
        quota: Quota::per_minute(NonZeroU32::new(per_minute).unwrap()),
        cost: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_across_replicas_spend_exactly_the_balance() {
    let server = RedisServer::start();
    let replicas = [
        replica(&server, patient()).await,
        replica(&server, patient()).await,
    ];
    let (k, price, requests) = (700u64, 3u64, 3_000usize);
    let admin = replicas[0].ledger();
    admin
        .top_up("acct_1", k * price, "invoice-1")
        .await
        .unwrap();

    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let ledger = replicas[i % 2].ledger();
            tokio::spawn(async move {
                match ledger.reserve(ReserveRequest::new("acct_1", price)).await {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().unwrap();
                        let settled = ledger.settle(&hold, price).await.unwrap();
                        assert!(settled.was_open);
                        true
                    }
                    Err(ReserveError::Insufficient { .. }) => false,
                    Err(other) => panic!("{other}"),
                }
            })
        })
        .collect();
    let mut succeeded = 0;
    for task in tasks {
        succeeded += u64::from(task.await.unwrap());
    }
    assert_eq!(succeeded, k);
    let balance = admin.balance("acct_1").await.unwrap();
    assert_eq!(
        (balance.balance, balance.held, balance.available),
        (0, 0, 0)
    );
    let (charged, reserves) = assert_books(&admin, "acct_1").await;
    assert_eq!((charged, reserves), (k * price, k));
}

#[tokio::test]
async fn settle_and_release_close_a_hold_once_and_never_go_negative() {
    let server = RedisServer::start();
    let ledger = replica(&server, RedisOptions::new()).await.ledger();
    let top_up = ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
    assert!(top_up.applied);
    // The same invoice again: not applied twice; another amount: refused.
    assert!(
        !ledger
            .top_up("acct_1", 100, "invoice-1")
            .await
            .unwrap()
            .applied
    );
    assert!(ledger.top_up("acct_1", 5, "invoice-1").await.is_err());

    let a = ledger
        .reserve(ReserveRequest::new("acct_1", 60))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    assert_eq!(a.available_after(), 40);
    let b = ledger
        .reserve(ReserveRequest::new("acct_1", 40))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    match ledger.reserve(ReserveRequest::new("acct_1", 1)).await {
        Err(ReserveError::Insufficient {
            required: 1,
            available: 0,
        }) => {}
        other => panic!("{other:?}"),
    }
    // Used more than held: charged up to what is available, never below zero.
    let settled = ledger.settle(&a, 1_000).await.unwrap();
    assert_eq!(
        (settled.charged, settled.balance, settled.was_open),
        (60, 40, true)
    );
    assert!(
        !ledger.settle(&a, 10).await.unwrap().was_open,
        "closing twice is a no-op"
    );
    let released = ledger.release(&b).await.unwrap();
    assert_eq!((released.charged, released.balance), (0, 40));
    assert_eq!(ledger.balance("acct_1").await.unwrap().available, 40);
    assert_books(&ledger, "acct_1").await;
    let page = ledger
        .journal("acct_1", JournalQuery::new().after(Some(2)).limit(2))
        .await
        .unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
}

#[tokio::test]
async fn an_idempotency_key_charges_once() {
    let server = RedisServer::start();
    let ledger = replica(&server, RedisOptions::new()).await.ledger();
    ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
    let fp = Fingerprint::of(&[b"POST", b"/v1/chat/completions"]);
    let request = || ReserveRequest::new("acct_1", 10).idempotency(Some(("retry-1".into(), fp)));
    let hold = ledger
        .reserve(request())
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    assert!(matches!(
        ledger.reserve(request()).await,
        Err(ReserveError::KeyInUse)
    ));
    ledger.settle(&hold, 7).await.unwrap();
    assert!(
        ledger
            .reserve(request())
            .await
            .unwrap()
            .into_hold()
            .is_none(),
        "replayed"
    );
    let other = ReserveRequest::new("acct_1", 10)
        .idempotency(Some(("retry-1".into(), Fingerprint::of(&[b"other"]))));
    assert!(matches!(
        ledger.reserve(other).await,
        Err(ReserveError::KeyReused)
    ));
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 93);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_replicas_lets_exactly_n_through() {
    let server = RedisServer::start();
    let replicas = [
        replica(&server, patient()).await,
        replica(&server, patient()).await,
    ];
    let n = 50;
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            let limiter = replicas[i % 2].limiter();
            tokio::spawn(async move {
                limiter
                    .check(&[charge("acct_1", n)])
                    .await
                    .unwrap()
                    .is_allowed()
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += u32::from(task.await.unwrap());
    }
    assert_eq!(allowed, n);
}

#[tokio::test]
async fn revocation_on_one_replica_refuses_on_the_other_within_a_second() {
    let server = RedisServer::start();
    // A long cache TTL: only the invalidation message can make the second replica see it.
    let options = || RedisOptions::new().key_cache_ttl(Duration::from_secs(60));
    let a = replica(&server, options()).await.key_store();
    let b = replica(&server, options()).await.key_store();
    a.put_account(AccountRecord::new("acct_1", "free"))
        .await
        .unwrap();
    a.set_plan_models("free", Some(vec!["small".into()]))
        .await
        .unwrap();
    let key = a
        .create_key(
            "sk-test-",
            KeyRecord::new("key_1", "acct_1")
                .scopes(["chat"])
                .metadata("team", "search"),
        )
        .await
        .unwrap();
    let digest = key.digest();
    tokio::time::sleep(Duration::from_millis(100)).await; // let both listeners subscribe

    let found = b.lookup(&digest).await.unwrap().expect("found");
    assert_eq!(found.status, KeyStatus::Active);
    assert_eq!(found.caller.models(), Some(&["small".to_owned()][..]));
    assert_eq!(found.caller.metadata()["team"], "search");
    assert_eq!(b.cached(), 1, "cached on the second replica");
    assert!(b
        .lookup(&keys::digest("sk-test-unknown"))
        .await
        .unwrap()
        .is_none());

    a.revoke_key("key_1").await.unwrap();
    let revoked_at = Instant::now();
    loop {
        let lookup = b.lookup(&digest).await.unwrap().unwrap();
        if lookup.status == KeyStatus::Revoked {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still active after a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Re-planning reaches the other replica too.
    a.set_account_plan("acct_1", "pro").await.unwrap();
    let moved_at = Instant::now();
    while b.lookup(&digest).await.unwrap().unwrap().caller.plan() != "pro" {
        assert!(moved_at.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Rotation: the old digest stops working, the new one works.
    let new = keys::generate("sk-test-");
    a.rotate_key("key_1", new.digest()).await.unwrap();
    let rotated_at = Instant::now();
    while b.lookup(&digest).await.unwrap().is_some() {
        assert!(rotated_at.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        b.lookup(&new.digest())
            .await
            .unwrap()
            .unwrap()
            .caller
            .key_id(),
        "key_1"
    );
    assert_eq!(a.key("key_1").await.unwrap().unwrap().scopes, ["chat"]);
}

/// Revocation is final on Redis too, checked inside the key-admin script: through the admin
/// router, a revoked key cannot be disabled or enabled (409, the exact message), and both
/// replicas still see it revoked.
#[cfg(feature = "admin")]
#[tokio::test]
async fn revocation_is_final_through_the_admin_router() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let server = RedisServer::start();
    let a = replica(&server, RedisOptions::new()).await;
    let b = replica(&server, RedisOptions::new()).await.key_store();
    let store = a.key_store();
    store
        .put_account(AccountRecord::new("acct_1", "free"))
        .await
        .unwrap();
    let app = axum::Router::new().nest(
        "/admin",
        tollgate::admin::router(store.clone(), a.ledger(), "admin-key-0123456789").build(),
    );
    let post = |path: String, body: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut req =
                http::Request::post(path).header("authorization", "Bearer admin-key-0123456789");
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            let req = req
                .body(axum::body::Body::from(body.unwrap_or_default()))
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            let status = res.status().as_u16();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (status, body)
        }
    };
    let (status, _) = post(
        "/admin/keys".into(),
        Some(r#"{"account": "acct_1", "id": "key_1"}"#),
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = post("/admin/keys/key_1/revoke".into(), None).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"id": "key_1", "status": "revoked"}))
    );
    for (route, verb) in [("disable", "disabled"), ("enable", "enabled")] {
        let (status, body) = post(format!("/admin/keys/key_1/{route}"), None).await;
        assert_eq!(status, 409);
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": format!(
                    "The key `key_1` is revoked, and revocation is final: it cannot be {verb}."
                ),
                "type": "invalid_request_error",
                "param": null,
                "code": "conflict",
            }})
        );
    }
    // The script refuses a whole-record update that would bring it back, too.
    let mut record = store.key("key_1").await.unwrap().unwrap();
    record.status = KeyStatus::Active;
    assert!(matches!(
        store.update_key(record).await,
        Err(tollgate::auth::KeyAdminError::Revoked(id)) if &*id == "key_1"
    ));
    for replica in [&store, &b] {
        assert_eq!(
            replica.key("key_1").await.unwrap().unwrap().status,
            KeyStatus::Revoked
        );
    }
}

#[tokio::test]
async fn a_hold_left_by_a_killed_replica_is_charged_after_its_expiry() {
    let server = RedisServer::start();
    let options = || RedisOptions::new().hold_ttl(Duration::from_millis(300));
    let survivor = replica(&server, options()).await.ledger();
    survivor.top_up("acct_1", 100, "invoice-1").await.unwrap();
    survivor.top_up("acct_2", 100, "invoice-1").await.unwrap();
    {
        let doomed = replica(&server, options()).await.ledger();
        let a = doomed
            .reserve(ReserveRequest::new("acct_1", 30))
            .await
            .unwrap();
        let b = doomed
            .reserve(ReserveRequest::new("acct_2", 20))
            .await
            .unwrap();
        drop((a, b, doomed)); // the process dies: no settle, no release
    }
    assert_eq!(
        survivor.balance("acct_1").await.unwrap().available,
        70,
        "locked while open"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Whichever replica touches the account next settles it at the held amount...
    let balance = survivor.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (70, 0, 0));
    // ...and the sweep finds the others.
    let expired = survivor.expire_holds(SystemTime::now()).await.unwrap();
    assert_eq!((expired.holds, expired.charged), (1, 20));
    assert_eq!(survivor.balance("acct_2").await.unwrap().balance, 80);
    assert_books(&survivor, "acct_1").await;
    let journal = survivor
        .journal("acct_1", JournalQuery::new())
        .await
        .unwrap();
    assert_eq!(journal.last().unwrap().kind, EntryKind::Expire);
}

#[tokio::test]
async fn scripts_run_again_after_script_flush() {
    let server = RedisServer::start();
    let backend = replica(&server, RedisOptions::new()).await;
    let (ledger, limiter, keys_store) = (backend.ledger(), backend.limiter(), backend.key_store());
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    assert!(limiter
        .check(&[charge("acct_1", 10)])
        .await
        .unwrap()
        .is_allowed());

    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();

    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 4))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    assert_eq!(ledger.settle(&hold, 4).await.unwrap().balance, 6);
    assert!(limiter
        .check(&[charge("acct_1", 10)])
        .await
        .unwrap()
        .is_allowed());
    assert!(keys_store
        .lookup(&keys::digest("sk-none"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_for_credits_and_as_configured_for_limits_then_recovers() {
    let mut server = RedisServer::start();
    let backend = replica(&server, fast()).await;
    let ledger = backend.ledger();
    let open = backend.limiter().fail_mode(FailMode::Open);
    let closed = backend.limiter().fail_mode(FailMode::Closed);
    let price = 5u64;
    ledger.top_up("acct_1", 10_000, "invoice-1").await.unwrap();

    // Load, with the server frozen mid-way (nothing answers, data kept).
    let load = |n: usize| {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut failed = 0u64;
            for _ in 0..n {
                match ledger.reserve(ReserveRequest::new("acct_1", price)).await {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().unwrap();
                        // Settling is safe to retry: a closed hold is not closed again.
                        let deadline = Instant::now() + Duration::from_secs(10);
                        loop {
                            match ledger.settle(&hold, price).await {
                                // An answer lost after the settle applied: the retry finds it
                                // closed (`was_open: false`) and charges nothing more.
                                Ok(_) => {
                                    held.push(hold.id());
                                    break;
                                }
                                Err(_) if Instant::now() < deadline => {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    Err(ReserveError::Backend(e)) => {
                        assert!(e.retry_after() > Duration::ZERO);
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(other) => panic!("{other}"),
                }
            }
            (held, failed)
        })
    };
    let workers: Vec<_> = (0..8).map(|_| load(150)).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.pause();
    let started = Instant::now();
    match ledger.reserve(ReserveRequest::new("acct_1", price)).await {
        Err(ReserveError::Backend(_)) => {}
        other => panic!("credits must fail closed, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no stuck request"
    );
    assert!(
        open.check(&[charge("acct_2", 1)])
            .await
            .unwrap()
            .is_allowed(),
        "fail open"
    );
    assert!(
        closed.check(&[charge("acct_2", 1)]).await.is_err(),
        "fail closed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();

    let (mut held, mut failed) = (Vec::new(), 0);
    for worker in workers {
        let (h, f) = worker.await.unwrap();
        held.extend(h);
        failed += f;
    }
    let charged = price * held.len() as u64;
    assert!(failed > 0, "some requests met the frozen server");
    // Reserves whose answers were lost are released in the background: wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let balance = patiently(|| ledger.balance("acct_1")).await;
        if balance.held == 0 {
            // Every credit is accounted for: charged exactly what clients saw charged.
            assert_eq!(balance.balance, 10_000 - charged);
            break;
        }
        assert!(Instant::now() < deadline, "holds left: {balance:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (journal_charged, _) = assert_books(&ledger, "acct_1").await;
    assert_eq!(journal_charged, charged);
    // Each hold a client got is settled once at its price; every other hold placed (a reserve
    // whose answer was lost) is released, never charged.
    let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
    let ids = |kind: EntryKind| -> Vec<u64> {
        let mut ids: Vec<u64> = journal
            .iter()
            .filter(|e| e.kind == kind)
            .filter_map(|e| e.hold_id)
            .collect();
        ids.sort_unstable();
        ids
    };
    held.sort_unstable();
    assert_eq!(ids(EntryKind::Settle), held);
    assert!(journal
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .all(|e| e.amount == price));
    assert!(ids(EntryKind::Expire).is_empty());
    let mut placed = ids(EntryKind::Reserve);
    placed.retain(|id| held.binary_search(id).is_err());
    assert_eq!(ids(EntryKind::Release), placed);

    // Killed: refused connections, the breaker opens, no call waits.
    server.stop();
    for _ in 0..10 {
        let started = Instant::now();
        assert!(ledger.balance("acct_1").await.is_err());
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert!(backend.is_degraded(), "the breaker is open");
    assert!(open
        .check(&[charge("acct_2", 1)])
        .await
        .unwrap()
        .is_allowed());

    // Back (empty: nothing was persisted): the backend recovers by itself.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ledger.top_up("acct_3", 7, "invoice-1").await.is_err() {
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ledger.balance("acct_3").await.unwrap().balance, 7);
    assert!(!backend.is_degraded());
}

/// Waits until no hold of `acct_1` is open (settlements run after the body's end).
async fn settled(ledger: &impl LedgerAdmin) -> tollgate::credits::ledger::Balance {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let balance = patiently(|| ledger.balance("acct_1")).await;
        if balance.held == 0 || Instant::now() > deadline {
            return balance;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The issue's budget: one round trip for limit + reserve, one for settle (with the tokens
/// correction in it), the key lookup aside.
#[tokio::test]
async fn limit_and_reserve_are_one_round_trip_and_settle_with_the_tokens_correction_another() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let server = RedisServer::start();
    let backend = replica(&server, RedisOptions::new()).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 1_000, "invoice-1").await.unwrap();
    // 100k tokens refilled at one a day: Redis time passes, the numbers stay exact.
    let daily = Quota::with_period(Duration::from_secs(86_400))
        .unwrap()
        .allow_burst(NonZeroU32::new(100_000).unwrap());
    let plan = Plan::new().requests_per_minute(1_000).tokens(daily);
    let service = one_step(&backend, plan, KeyBy::Account);

    let (status, headers, _) = send_one(&service).await;
    assert_eq!(status, 200);
    let estimate = 100_000
        - headers["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
    assert!(estimate > 100);
    settled(&ledger).await;

    let settled_raw = || server.wait_settled("acct_1");
    settled_raw().await;
    let before = server.script_calls().await;
    const N: u64 = 20;
    let mut headers = http::HeaderMap::new();
    for _ in 0..N {
        let (status, last, _) = send_one(&service).await;
        assert_eq!(status, 200);
        headers = last;
        settled_raw().await;
    }
    assert_eq!(
        server.script_calls().await - before,
        2 * N,
        "per request: reserve with the limits, settle with the tokens correction"
    );

    // The corrections were applied: every earlier request took its 50 tokens once settled,
    // the last one its estimate so far.
    let remaining: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - 50 * N - estimate);
    let balance = settled(&ledger).await;
    assert_eq!(balance.balance, 1_000 - (N + 1));
    assert_books(&ledger, "acct_1").await;
}

/// Two replicas, one Redis: 60 requests at once against 20 requests per minute and credits
/// for 15. Exactly 15 pass; the 5 cells of requests refused for their credits are not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_credits_across_replicas_are_charged_both_or_neither() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let server = RedisServer::start();
    let replicas = [
        replica(&server, patient()).await,
        replica(&server, patient()).await,
    ];
    let ledger = replicas[0].ledger();
    ledger.top_up("acct_1", 15, "invoice-1").await.unwrap();
    let services = [
        one_step(
            &replicas[0],
            Plan::new().requests_per_minute(20),
            KeyBy::Account,
        ),
        one_step(
            &replicas[1],
            Plan::new().requests_per_minute(20),
            KeyBy::Account,
        ),
    ];
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let service = services[i % 2].clone();
            tokio::spawn(async move { send_one(&service).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let count = |code: u16| statuses.iter().filter(|&&s| s == code).count();
    assert_eq!(count(200), 15, "{statuses:?}");
    assert_eq!(count(402) + count(429), 45, "{statuses:?}");
    let balance = settled(&ledger).await;
    assert_eq!((balance.balance, balance.held), (0, 0));
    let (charged, reserves) = assert_books(&ledger, "acct_1").await;
    assert_eq!((charged, reserves), (15, 15));

    // 5 cells are left, whichever replica asks.
    ledger.top_up("acct_1", 100, "invoice-2").await.unwrap();
    for i in 0..5 {
        assert_eq!(send_one(&services[i % 2]).await.0, 200, "request {i}");
    }
    let (status, headers, _) = send_one(&services[1]).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(settled(&ledger).await.balance, 95);
}

/// Buckets outside the account's hash slot (keyed by API key here) cannot join the ledger's
/// script on Redis Cluster: the two calls are made instead, with the same answers.
#[tokio::test]
async fn buckets_outside_the_account_slot_take_two_round_trips_with_the_same_answers() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let server = RedisServer::start();
    let backend = replica(&server, RedisOptions::new()).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 3, "invoice-1").await.unwrap();
    let service = one_step(&backend, Plan::new().requests_per_minute(5), KeyBy::Key);
    // Warm (as a replica long connected).
    assert_eq!(send_one(&service).await.0, 200);
    settled(&ledger).await;
    let before = server.script_calls().await;
    assert_eq!(send_one(&service).await.0, 200);
    server.wait_settled("acct_1").await;
    assert_eq!(
        server.script_calls().await - before,
        3,
        "check, reserve, settle"
    );
    assert_eq!(send_one(&service).await.0, 200);
    settled(&ledger).await;
    // Out of credits: 402, and the limit's cell is given back (refunded).
    assert_eq!(send_one(&service).await.0, 402);
    ledger.top_up("acct_1", 1, "invoice-2").await.unwrap();
    let (status, headers, _) = send_one(&service).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-remaining-requests"], "1");
    assert_eq!(settled(&ledger).await.balance, 0);
}

/// The fused reserve's answer is lost (Redis busy past the response timeout): the hold it placed
/// is released in the background and the rate-limit cell it charged is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reserve_answer_gives_back_the_hold_and_the_limits() {
    use tollgate::credits::{Admission, Verdict};
    let server = RedisServer::start();
    let backend = replica(&server, fast()).await;
    let (ledger, limiter) = (backend.ledger(), backend.limiter());
    let admission = backend.admission();
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    let charges = vec![charge("acct_1", 1)];
    // Warm the scripts so that the lost call is the script itself.
    let warm = admission
        .admit(vec![], ReserveRequest::new("acct_1", 1))
        .await;
    let Verdict::Admitted { reservation, .. } = warm else {
        panic!("{warm:?}")
    };
    ledger
        .release(&reservation.into_hold().unwrap())
        .await
        .unwrap();

    // Another client keeps Redis busy for 600 ms with a script (Redis runs one at a time).
    let url = server.url();
    let busy = tokio::spawn(async move {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // (This client's own answer may time out too; the script runs to its end anyway.)
        let _: Result<(), _> = redis::cmd("EVAL")
            .arg("local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; while true do local n = redis.call('TIME'); if n[1] * 1e6 + n[2] - s > 600000 then return end end")
            .arg(0)
            .query_async(&mut conn)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lost = admission
        .admit(charges.clone(), ReserveRequest::new("acct_1", 4))
        .await;
    assert!(
        matches!(lost, Verdict::Refused(ReserveError::Backend(_))),
        "{lost:?}"
    );
    busy.await.unwrap();

    // The script ran after the busy one; the compensation undoes both of its charges.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let balance = patiently(|| ledger.balance("acct_1")).await;
        if balance.held == 0 && balance.balance == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "the hold stayed: {balance:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let decision = patiently(|| limiter.check(&charges)).await;
    assert!(decision.is_allowed(), "the cell was not given back");
}

/// An absurd usage reported by an upstream cannot stop the settlement: the correction is capped.
#[tokio::test]
async fn a_huge_tokens_correction_still_settles_the_hold() {
    use tollgate::{
        credits::{Admission, Verdict},
        ratelimit::Correction,
    };
    let server = RedisServer::start();
    let backend = replica(&server, RedisOptions::new()).await;
    let (ledger, limiter) = (backend.ledger(), backend.limiter());
    let admission = backend.admission();
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    let mut tokens = charge("acct_1", 60);
    tokens.kind = LimitKind::Tokens;
    tokens.cost = 5;
    let admitted = admission
        .admit(vec![tokens.clone()], ReserveRequest::new("acct_1", 4))
        .await;
    let Verdict::Admitted { reservation, .. } = admitted else {
        panic!("{admitted:?}")
    };
    let hold = reservation.into_hold().unwrap();
    let correction = Correction {
        key: tokens.key.clone(),
        quota: tokens.quota,
        delta: i64::MAX,
    };
    let settlement = admission.settle(&hold, 3, &[correction]).await.unwrap();
    assert!(settlement.was_open);
    assert_eq!(settlement.charged, 3);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 7);
    // The bucket is deep in debt: refused, with a long wait.
    assert!(!limiter.check(&[tokens]).await.unwrap().is_allowed());
}

/// The same refusal, byte for byte, from the memory and the Redis ledger: a `max_tokens` of
/// 2^63 is held at `MAX_CREDITS` and refused with the real available balance (Redis used to say
/// 0 were available), and a top-up past `MAX_CREDITS` is refused by both.
#[tokio::test]
async fn a_huge_max_tokens_gets_the_same_answer_as_in_memory() {
    use http_body_util::BodyExt;
    use tollgate::credits::{
        ledger::{TopUpError, MAX_CREDITS},
        CreditsLayer, MemoryLedger, Price, Pricing,
    };
    use tower::{Layer, ServiceExt};

    async fn refusal<L: LedgerAdmin + Clone>(ledger: L) -> (u16, serde_json::Value) {
        ledger.top_up("acct_1", 1_000_000, "initial").await.unwrap();
        let pricing = Pricing::flat(3).model("gpt-test", Price::flat(1).per_1k_tokens(10));
        let app = CreditsLayer::new(ledger, pricing).layer(tower::service_fn(
            |_: http::Request<tollgate::inspect::InspectedBody<axum::body::Body>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
            },
        ));
        let mut request = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(format!(
                r#"{{"model":"gpt-test","max_tokens":{}}}"#,
                1u64 << 63
            )))
            .unwrap();
        request
            .extensions_mut()
            .insert(tollgate::Caller::builder("key_1", "acct_1").build());
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    let server = RedisServer::start();
    let redis = replica(&server, RedisOptions::new()).await.ledger();
    let memory = MemoryLedger::new();
    let from_memory = refusal(memory.clone()).await;
    assert_eq!(from_memory.0, 402);
    assert!(from_memory.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&format!("{MAX_CREDITS}")));
    assert_eq!(refusal(redis.clone()).await, from_memory);
    assert_eq!(redis.balance("acct_1").await.unwrap().held, 0);

    for ledger_says in [
        memory.top_up("acct_1", MAX_CREDITS, "too-much").await,
        redis.top_up("acct_1", MAX_CREDITS, "too-much").await,
    ] {
        assert!(matches!(ledger_says, Err(TopUpError::Overflow)));
    }
}

/// Callers that give up mid-call (a client gone, a load balancer's timeout) are not Redis
/// failures: the breaker stays closed for everyone else, and every hold whose caller left is
/// released at once, not left to expire at its held amount.
#[tokio::test]
async fn callers_that_give_up_neither_open_the_breaker_nor_leave_holds() {
    let server = RedisServer::start();
    // A breaker that would open after 3 failures.
    let ledger = replica(&server, fast()).await.ledger();
    ledger.top_up("acct_1", 1_000, "initial").await.unwrap();
    use futures_util::FutureExt;
    for _ in 0..200 {
        // Each caller sends its reserve and gives up at once: polled once, then dropped.
        let reserve = ledger.reserve(ReserveRequest::new("acct_1", 5));
        assert!(
            reserve.now_or_never().is_none(),
            "a network call is not ready at once"
        );
    }
    // The abandoned reserves finish on their own and are released: nothing stays held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let journal = ledger
            .journal("acct_1", JournalQuery::new().limit(10_000))
            .await
            .unwrap();
        let released = journal
            .iter()
            .filter(|e| e.kind == EntryKind::Release)
            .count();
        if released == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{released} of 200 abandoned holds released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!(
        (balance.balance, balance.held, balance.holds),
        (1_000, 0, 0)
    );
    // The breaker never opened: a new caller is served at once.
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 5))
        .await
        .expect("the breaker is closed")
        .into_hold()
        .unwrap();
    ledger.settle(&hold, 5).await.unwrap();
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (995, 0));
    // The journal: the top-up, then reserve + release pairs, and one reserve + settle.
    let journal = ledger
        .journal("acct_1", JournalQuery::new().limit(10_000))
        .await
        .unwrap();
    let count = |kind| journal.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(EntryKind::Reserve), count(EntryKind::Release) + 1);
    assert_eq!(count(EntryKind::Settle), 1);
}

/// `journal_limit`: the list keeps the latest entries only (Redis memory per account stays
/// flat under load), and no balance changes.
#[tokio::test]
async fn the_journal_is_trimmed_to_its_limit_and_balances_do_not_change() {
    let server = RedisServer::start();
    let ledger = replica(&server, RedisOptions::new().journal_limit(10))
        .await
        .ledger();
    ledger.top_up("acct_1", 1_000, "initial").await.unwrap();
    for _ in 0..50 {
        let hold = ledger
            .reserve(ReserveRequest::new("acct_1", 3))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        ledger.settle(&hold, 2).await.unwrap();
    }
    let journal = ledger
        .journal("acct_1", JournalQuery::new().limit(10_000))
        .await
        .unwrap();
    assert_eq!(journal.len(), 10);
    // The latest ten: sequence numbers 92..=101 (1 top-up + 50 × reserve and settle).
    let seqs: Vec<u64> = journal.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (92..=101).collect::<Vec<_>>());
    assert_eq!(journal.last().unwrap().balance_after, 900);
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (900, 0));
    // The list itself holds ten entries.
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let len: u64 = ::redis::cmd("LLEN")
        .arg("tollgate:{acct:acct_1}:log")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 10);
}

/// A reserve the open circuit breaker refuses never went out: nothing is left running to undo
/// it (no background release per refused request, which an outage under load would pile up by
/// the thousand and replay at Redis as it comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserves_the_open_breaker_refuses_leave_nothing_to_undo() {
    let mut server = RedisServer::start();
    let backend = replica(
        &server,
        RedisOptions::new()
            .response_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200))
            .circuit_breaker(3, Duration::from_secs(60)),
    )
    .await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 100, "t-1").await.unwrap();
    server.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.is_degraded() {
        assert!(ledger.balance("acct_1").await.is_err());
        assert!(Instant::now() < deadline, "the breaker never opened");
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..50 {
        match ledger.reserve(ReserveRequest::new("acct_1", 1)).await {
            Err(ReserveError::Backend(error)) => {
                assert!(!error.may_have_applied(), "{error}");
                assert!(error.message().contains("circuit open"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
    let after = metrics.num_alive_tasks();
    assert!(
        after < before + 5,
        "{before} tasks before, {after} after 50 refused reserves"
    );
}

/// A Redis that lost the tollgate library (restarted empty, a failover to a node without it:
/// here `FUNCTION FLUSH`) keeps working: the next call is answered `Function not found`, which
/// proves it did not run, so the library is loaded again and the call sent once more; each
/// movement is made exactly once and the books stay exact.
#[tokio::test]
async fn a_redis_that_lost_the_library_loads_it_again_and_charges_once() {
    let server = RedisServer::start();
    let backend = replica(&server, RedisOptions::new()).await;
    let ledger = backend.ledger();
    let client = redis::Client::open(server.url()).unwrap();
    let admin = client.get_multiplexed_async_connection().await.unwrap();
    let libraries = |mut admin: redis::aio::MultiplexedConnection| async move {
        let list: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(RedisBackend::library_name())
            .query_async(&mut admin)
            .await
            .unwrap();
        list.len()
    };
    assert_eq!(libraries(admin.clone()).await, 1, "loaded at connect");
    let flush = |mut admin: redis::aio::MultiplexedConnection| async move {
        let () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .unwrap();
    };

    flush(admin.clone()).await;
    assert_eq!(
        ledger
            .top_up("acct_1", 100, "invoice-1")
            .await
            .unwrap()
            .balance
            .balance,
        100
    );
    assert_eq!(libraries(admin.clone()).await, 1, "loaded again");
    flush(admin.clone()).await;
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 30))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    flush(admin.clone()).await;
    let settlement = ledger.settle(&hold, 12).await.unwrap();
    assert_eq!(settlement.balance, 88);
    assert!(settlement.was_open);
    flush(admin.clone()).await;
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (88, 0, 0));
    flush(admin.clone()).await;
    let journal = ledger.journal("acct_1", JournalQuery::new()).await.unwrap();
    let moves: Vec<(EntryKind, u64)> = journal.iter().map(|e| (e.kind, e.amount)).collect();
    assert_eq!(
        moves,
        [
            (EntryKind::TopUp, 100),
            (EntryKind::Reserve, 30),
            (EntryKind::Settle, 12)
        ],
        "each movement once"
    );
    assert_eq!(journal.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);

    // The rate limiter's function too.
    flush(admin.clone()).await;
    let limiter = backend.limiter();
    let mut allowed = 0;
    for _ in 0..3 {
        flush(admin.clone()).await;
        allowed += u32::from(
            limiter
                .check(&[charge("acct_2", 2)])
                .await
                .unwrap()
                .is_allowed(),
        );
    }
    assert_eq!(allowed, 2, "the burst, each check once");
}
