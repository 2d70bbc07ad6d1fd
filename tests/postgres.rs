//! The PostgreSQL backends against a real server (`initdb` into a temporary directory, on a free
//! port): several replicas (pools) on one database behave as one, exact and durable.
#![cfg(feature = "postgres")]

#[path = "support/books.rs"]
mod books;
#[path = "support/chain.rs"]
mod chain;
#[path = "support/pg_server.rs"]
mod pg_server;

use std::{
    num::NonZeroU32,
    time::{Duration, Instant, SystemTime},
};

use books::{assert_books, patiently};
use chain::{one_step, send_one};
use governor::Quota;
use pg_server::PgServer;
use tollgate::{
    auth::{AccountRecord, KeyAdmin, KeyAdminError, KeyRecord, KeyStatus, KeyStore},
    credits::{
        ledger::{
            EntryKind, Fingerprint, Hold, JournalQuery, Reservation, ReserveError, ReserveRequest,
            TopUpError,
        },
        Admission, Ledger, LedgerAdmin, Verdict,
    },
    keys,
    postgres::{FailMode, PostgresBackend, PostgresOptions},
    ratelimit::{BucketKey, Charge, Limiter, Subject},
    LimitKind,
};

/// Generous deadlines for the shared server (the machine is busy); the fault tests use short ones.
fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new()
        .schema(schema)
        .acquire_timeout(Duration::from_secs(5))
        .statement_timeout(Duration::from_secs(5))
}

/// A replica: a pool of its own on `server`, the schema migrated.
async fn replica(server: &PgServer, options: PostgresOptions) -> PostgresBackend {
    let backend = PostgresBackend::connect_with(&server.url(), options)
        .await
        .expect("connect");
    backend.migrate().await.expect("migrate");
    backend
}

/// Two replicas on a fresh schema of the shared server.
async fn two_replicas(prefix: &str) -> (String, [PostgresBackend; 2]) {
    let server = PgServer::shared();
    let schema = PgServer::schema(prefix);
    let a = replica(server, options(&schema)).await;
    let b = replica(server, options(&schema)).await;
    (schema, [a, b])
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
async fn migrations_apply_once_from_every_replica_at_once_in_their_own_schema() {
    let server = PgServer::shared();
    let schema = PgServer::schema("migrations");
    let backends: Vec<PostgresBackend> = {
        let mut backends = Vec::new();
        for _ in 0..3 {
            backends.push(
                PostgresBackend::connect_with(&server.url(), options(&schema))
                    .await
                    .unwrap(),
            );
        }
        backends
    };
    let runs: Vec<_> = backends
        .iter()
        .cloned()
        .map(|b| tokio::spawn(async move { b.migrate().await.unwrap() }))
        .collect();
    let mut applied = 0;
    for run in runs {
        applied += run.await.unwrap();
    }
    assert_eq!(
        applied, 8,
        "one replica applies migrations 1, 3, 5, 6, 7, 8, 10 and 11, the others see them"
    );
    assert_eq!(
        backends[0].migrate().await.unwrap(),
        0,
        "nothing left to apply"
    );
    let tables = server.psql(&format!(
        "SELECT string_agg(table_name, ',' ORDER BY table_name) /* verify */ \
         FROM information_schema.tables WHERE table_schema = '{schema}'"
    ));
    assert_eq!(
        tables,
        "accounts,api_keys,balances,fenced_holds,holds,idempotency_keys,journal,plans,\
         rate_buckets,redis_journal,schema_migrations,top_ups"
    );
    assert_eq!(
        server.psql(&format!(
            "SELECT version || ':' || name /* verify */ FROM \"{schema}\".schema_migrations"
        )),
        "1:books\n3:extend\n5:redis_journal\n6:fast\n7:batch_locks\n8:batch_one_subtransaction\n10:one_batch\n11:inline"
    );

    // Another schema on the same database keeps books of its own.
    let other = replica(server, options(&PgServer::schema("migrations_other"))).await;
    backends[0]
        .ledger()
        .top_up("acct_1", 5, "invoice-1")
        .await
        .unwrap();
    assert_eq!(other.ledger().balance("acct_1").await.unwrap().balance, 0);

    // A migration applied differently (edited by hand) is refused, and nothing changes.
    server.psql(&format!(
        "UPDATE \"{schema}\".schema_migrations SET checksum = '\\x00' /* verify */"
    ));
    let error = backends[1].migrate().await.unwrap_err();
    assert!(error.message().contains("differs"), "{}", error.message());
}

#[test]
#[should_panic(expected = "must be 1 to 63 characters")]
fn a_schema_name_that_would_need_quoting_is_refused() {
    let _ = PostgresOptions::new().schema("Billing\"; DROP TABLE x; --");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_across_replicas_spend_exactly_the_balance() {
    let (_, replicas) = two_replicas("exact").await;
    let (k, price, requests) = (150u64, 3u64, 600usize);
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
                    Ok(Reservation::Held(hold)) => {
                        let settlement = ledger.settle(&hold, price).await.unwrap();
                        assert!(settlement.was_open);
                        true
                    }
                    Err(ReserveError::Insufficient { .. }) => false,
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += u64::from(task.await.unwrap());
    }
    assert_eq!(passed, k, "exactly K of N");
    let balance = admin.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (0, 0, 0));
    assert_eq!(assert_books(&admin, "acct_1").await, (k * price, k));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_closed_once_across_replicas_and_a_settle_never_goes_negative() {
    let (_, [a, b]) = two_replicas("close_once").await;
    let (a, b) = (a.ledger(), b.ledger());
    a.top_up("acct_1", 100, "invoice-1").await.unwrap();
    for round in 0..20 {
        let hold = a
            .reserve(ReserveRequest::new("acct_1", 2))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        // The same hold closed by both replicas at once: settled by one, released by the other.
        let twin = tollgate::credits::backend::hold(
            hold.id(),
            hold.account_arc().clone(),
            hold.amount(),
            0,
            None,
            hold.ttl(),
        );
        let (settled, released) = tokio::join!(a.settle(&hold, 1), b.release(&twin));
        let (settled, released) = (settled.unwrap(), released.unwrap());
        assert!(
            settled.was_open ^ released.was_open,
            "round {round}: closed exactly once"
        );
        assert!(!b.release(&twin).await.unwrap().was_open, "closed already");
    }
    // Settling far above the hold takes what is available, never more.
    let other = b
        .reserve(ReserveRequest::new("acct_1", 30))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    let hold = a
        .reserve(ReserveRequest::new("acct_1", 5))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    let before = a.balance("acct_1").await.unwrap();
    let settlement = a.settle(&hold, 1_000_000).await.unwrap();
    assert_eq!(
        settlement.charged,
        before.available + 5,
        "up to what is available"
    );
    let after = a.balance("acct_1").await.unwrap();
    assert_eq!((after.balance, after.held, after.available), (30, 30, 0));
    assert_eq!(b.settle(&other, 30).await.unwrap().balance, 0);
    assert_books(&a, "acct_1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_honoured_across_replicas() {
    let (_, [a, b]) = two_replicas("idempotency").await;
    let (a, b) = (a.ledger(), b.ledger());
    a.top_up("acct_1", 100, "invoice-1").await.unwrap();
    let fingerprint = Fingerprint::of(&[b"POST", b"/v1/chat/completions", b"m"]);
    let request = |fp: Fingerprint| {
        ReserveRequest::new("acct_1", 10).idempotency(Some(("retry-1".into(), fp)))
    };
    let hold = a
        .reserve(request(fingerprint))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    // While the first runs on replica A, its retry on replica B is refused.
    assert!(matches!(
        b.reserve(request(fingerprint)).await,
        Err(ReserveError::KeyInUse)
    ));
    let other = Fingerprint::of(&[b"POST", b"/v1/embeddings", b"m"]);
    assert!(matches!(
        b.reserve(request(other)).await,
        Err(ReserveError::KeyReused)
    ));
    a.settle(&hold, 7).await.unwrap();
    // Charged once: every retry, on either replica, is a replay that charges nothing.
    for ledger in [&a, &b, &b] {
        assert_eq!(
            ledger.reserve(request(fingerprint)).await.unwrap(),
            Reservation::Replayed
        );
    }
    assert_eq!(b.balance("acct_1").await.unwrap().balance, 93);

    // A released (not charged) first request frees its key: the retry is processed afresh.
    let request2 =
        || ReserveRequest::new("acct_1", 10).idempotency(Some(("retry-2".into(), fingerprint)));
    let first = a.reserve(request2()).await.unwrap().into_hold().unwrap();
    a.release(&first).await.unwrap();
    let retry = b.reserve(request2()).await.unwrap().into_hold().unwrap();
    b.settle(&retry, 10).await.unwrap();
    assert_eq!(a.balance("acct_1").await.unwrap().balance, 83);
    assert_books(&a, "acct_1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_are_idempotent_across_replicas() {
    let (_, [a, b]) = two_replicas("top_ups").await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let ledger = if i % 2 == 0 { a.ledger() } else { b.ledger() };
            tokio::spawn(async move { ledger.top_up("acct_1", 250, "invoice-7").await.unwrap() })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        let top_up = task.await.unwrap();
        applied += u32::from(top_up.applied);
        assert_eq!(top_up.balance.balance, 250);
    }
    assert_eq!(applied, 1, "applied once");
    assert!(matches!(
        b.ledger().top_up("acct_1", 300, "invoice-7").await,
        Err(TopUpError::KeyReused { amount: 250 })
    ));
    assert!(matches!(
        a.ledger().top_up("acct_1", u64::MAX, "invoice-8").await,
        Err(TopUpError::Overflow)
    ));
    let journal = a
        .ledger()
        .journal("acct_1", JournalQuery::new())
        .await
        .unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].idempotency_key.as_deref(), Some("invoice-7"));
}

#[tokio::test]
async fn the_journal_is_a_table_paged_by_the_admin_api_and_old_rows_may_be_deleted() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let server = PgServer::shared();
    let schema = PgServer::schema("journal");
    let backend = replica(server, options(&schema)).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
    for i in 0..4u64 {
        let hold = ledger
            .reserve(
                ReserveRequest::new("acct_1", 10)
                    .request_id(Some(format!("req_{i}").into()))
                    .key_id(Some("key_1".into())),
            )
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        ledger.settle(&hold, i + 1).await.unwrap();
    }
    // 1 top-up + 4 × (reserve, settle) = 9 rows.
    let keys_store = backend.key_store();
    keys_store
        .put_account(AccountRecord::new("acct_1", "free"))
        .await
        .unwrap();
    let admin_key = "admin-key-0123456789";
    let app = tollgate::admin::router(keys_store, ledger.clone(), admin_key).build();
    let page = |after: &str, limit: u32| {
        let app = app.clone();
        let uri = format!("/accounts/acct_1/journal?after={after}&limit={limit}");
        async move {
            let response = app
                .oneshot(
                    http::Request::get(uri)
                        .header("authorization", format!("Bearer {admin_key}"))
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            json["entries"].as_array().unwrap().clone()
        }
    };
    let first = page("0", 4).await;
    assert_eq!(first.len(), 4);
    assert_eq!(first[0]["seq"], 1);
    assert_eq!(first[0]["kind"], "top_up");
    assert_eq!(first[1]["kind"], "reserve");
    assert_eq!(first[1]["request_id"], "req_0");
    assert_eq!(first[1]["key_id"], "key_1");
    assert_eq!(first[2]["kind"], "settle");
    assert_eq!(first[2]["amount"], 1);
    assert_eq!(first[2]["balance_after"], 99);
    let rest = page("4", 100).await;
    assert_eq!(
        rest.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [5, 6, 7, 8, 9]
    );
    assert_eq!(rest.last().unwrap()["balance_after"], 90);

    // Retention: delete old rows; no balance changes, numbering goes on.
    let before = ledger.balance("acct_1").await.unwrap();
    server.psql(&format!(
        "DELETE FROM \"{schema}\".journal WHERE seq <= 5 /* verify */"
    ));
    assert_eq!(ledger.balance("acct_1").await.unwrap(), before);
    ledger.top_up("acct_1", 5, "invoice-2").await.unwrap();
    let kept = ledger.journal("acct_1", JournalQuery::new()).await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    assert_eq!(kept.last().unwrap().balance_after, 95);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 95);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_replica_refuses_on_the_other_within_a_second() {
    let server = PgServer::shared();
    let schema = PgServer::schema("revocation");
    // A long cache TTL: only the notification can make the second replica see a change.
    let options = || options(&schema).key_cache_ttl(Duration::from_secs(60));
    let a = replica(server, options()).await.key_store();
    let b = replica(server, options()).await.key_store();
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
                .metadata("team", "search")
                .ip_allowlist("10.0.0.0/8".parse().unwrap())
                .expires_at(SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000)),
        )
        .await
        .unwrap();
    let digest = key.digest();
    tokio::time::sleep(Duration::from_millis(300)).await; // let both listeners LISTEN

    let found = b.lookup(&digest).await.unwrap().expect("found");
    assert_eq!(found.status, KeyStatus::Active);
    assert_eq!(found.caller.models(), Some(&["small".to_owned()][..]));
    assert_eq!(found.caller.metadata()["team"], "search");
    assert_eq!(
        found.expires_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000))
    );
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
    // On the replica that made the change, at once.
    assert_eq!(
        a.lookup(&digest).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );

    // Re-planning and freezing reach the other replica too.
    a.set_account_plan("acct_1", "pro").await.unwrap();
    let moved_at = Instant::now();
    while b.lookup(&digest).await.unwrap().unwrap().caller.plan() != "pro" {
        assert!(moved_at.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.freeze_account("acct_1").await.unwrap();
    let frozen_at = Instant::now();
    while b.lookup(&digest).await.unwrap().unwrap().account != tollgate::auth::AccountStatus::Frozen
    {
        assert!(frozen_at.elapsed() < Duration::from_secs(1));
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
    let record = a.key("key_1").await.unwrap().unwrap();
    assert_eq!(record.scopes, ["chat"]);
    assert_eq!(record.ip_allowlist.unwrap().to_string(), "10.0.0.0/8");

    // Revocation is final, on every path.
    assert!(matches!(
        a.set_key_status("key_1", KeyStatus::Active).await,
        Err(KeyAdminError::Revoked(id)) if &*id == "key_1"
    ));
    let mut revived = a.key("key_1").await.unwrap().unwrap();
    revived.status = KeyStatus::Disabled;
    assert!(matches!(
        a.update_key(revived).await,
        Err(KeyAdminError::Revoked(id)) if &*id == "key_1"
    ));
    assert_eq!(
        b.lookup(&new.digest()).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );

    // The admin errors: unknown, duplicate.
    assert!(matches!(
        a.revoke_key("key_9").await,
        Err(KeyAdminError::UnknownKey(id)) if &*id == "key_9"
    ));
    assert!(matches!(
        a.insert_key(keys::digest("sk-x"), KeyRecord::new("key_1", "acct_1")).await,
        Err(KeyAdminError::DuplicateKey(id)) if &*id == "key_1"
    ));
    assert!(matches!(
        a.insert_key(keys::digest("sk-y"), KeyRecord::new("key_2", "acct_9")).await,
        Err(KeyAdminError::UnknownAccount(id)) if &*id == "acct_9"
    ));
    assert!(matches!(
        a.update_key(KeyRecord::new("key_9", "acct_1")).await,
        Err(KeyAdminError::UnknownKey(_))
    ));
    assert!(matches!(
        a.set_account_plan("acct_9", "pro").await,
        Err(KeyAdminError::UnknownAccount(_))
    ));
    assert_eq!(a.account("acct_9").await.unwrap(), None);
}

#[tokio::test]
async fn a_hold_left_by_a_dead_replica_is_charged_after_its_expiry() {
    let server = PgServer::shared();
    let schema = PgServer::schema("expiry");
    let options = || options(&schema).hold_ttl(Duration::from_millis(300));
    let survivor = replica(server, options()).await.ledger();
    survivor.top_up("acct_1", 100, "invoice-1").await.unwrap();
    survivor.top_up("acct_2", 100, "invoice-1").await.unwrap();
    {
        let doomed = replica(server, options()).await;
        let ledger = doomed.ledger();
        let a = ledger
            .reserve(ReserveRequest::new("acct_1", 30))
            .await
            .unwrap();
        let b = ledger
            .reserve(ReserveRequest::new("acct_2", 20))
            .await
            .unwrap();
        doomed.pool().close().await;
        drop((a, b, ledger, doomed)); // the process dies: no settle, no release
    }
    assert_eq!(
        survivor.balance("acct_1").await.unwrap().available,
        70,
        "locked while open"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Whichever replica next moves money on the account settles it at the held amount...
    survivor.top_up("acct_1", 1, "invoice-2").await.unwrap();
    let balance = survivor.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (71, 0, 0));
    // ...and the sweep finds the others.
    let expired = survivor.expire_holds(SystemTime::now()).await.unwrap();
    assert_eq!((expired.holds, expired.charged), (1, 20));
    assert_eq!(survivor.balance("acct_2").await.unwrap().balance, 80);
    assert_books(&survivor, "acct_1").await;
    let journal = survivor
        .journal("acct_2", JournalQuery::new())
        .await
        .unwrap();
    assert_eq!(journal.last().unwrap().kind, EntryKind::Expire);
    assert_eq!(journal.last().unwrap().amount, 20);
}

/// Waits, reading with `psql` (not counted), until `account` has no credits held.
async fn wait_settled(server: &PgServer, schema: &str, account: &str) {
    for _ in 0..500 {
        let held = server.psql(&format!(
            "SELECT coalesce((SELECT held FROM \"{schema}\".balances WHERE account = '{account}'), 0) /* verify */"
        ));
        if held == "0" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("credits of {account} still held after 5 s");
}

/// The budget: one round trip for limits + reserve, one for settle (with the tokens
/// correction in it), counted by the server (`pg_stat_statements`).
#[tokio::test]
async fn limits_and_reserve_are_one_round_trip_and_settle_with_the_tokens_correction_another() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let server = PgServer::shared();
    let schema = PgServer::schema("round_trips");
    let backend = replica(server, options(&schema)).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 1_000, "invoice-1").await.unwrap();
    // 100k tokens refilled at one a day: the database's time passes, the numbers stay exact.
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
    wait_settled(server, &schema, "acct_1").await;

    let before = server.statements(&schema);
    const N: u64 = 20;
    let mut headers = http::HeaderMap::new();
    for _ in 0..N {
        let (status, last, _) = send_one(&service).await;
        assert_eq!(status, 200);
        headers = last;
        wait_settled(server, &schema, "acct_1").await;
    }
    assert_eq!(
        server.statements(&schema) - before,
        2 * N,
        "per request: reserve with the limits, settle with the tokens correction"
    );

    // The corrections were applied: every earlier request took its 50 tokens once settled, the
    // last one its estimate so far.
    let remaining: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - 50 * N - estimate);
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (1_000 - (N + 1), 0));
    assert_books(&ledger, "acct_1").await;
}

/// Two replicas, one database: 60 requests at once against 20 requests per minute and credits
/// for 15. Exactly 15 pass; the 5 cells of requests refused for their credits are not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_credits_across_replicas_are_charged_both_or_neither() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let (schema, replicas) = two_replicas("both_or_neither").await;
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
            KeyBy::Key,
        ),
    ];
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let service = services[i % 2].clone();
            tokio::spawn(async move { send_one(&service).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        if status == 402 {
            assert!(body.contains("insufficient_quota"), "{body}");
        }
        statuses.push(status);
    }
    let count = |code: u16| statuses.iter().filter(|&&s| s == code).count();
    assert_eq!(count(200), 15, "{statuses:?}");
    assert_eq!(count(402) + count(429), 45, "{statuses:?}");
    wait_settled(PgServer::shared(), &schema, "acct_1").await;
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (0, 0));
    assert_eq!(assert_books(&ledger, "acct_1").await, (15, 15));
}

/// A backend on a pool of the user's (no server-side statement timeout: the client's deadline,
/// 200 ms acquire + `statement_ms`, is all there is), migrated into a fresh schema.
async fn client_deadline_backend(prefix: &str, statement_ms: u64) -> (String, PostgresBackend) {
    let schema = PgServer::schema(prefix);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .test_before_acquire(false)
        .connect(&PgServer::shared().url())
        .await
        .unwrap();
    let backend = PostgresBackend::from_pool(
        pool,
        PostgresOptions::new()
            .schema(&schema)
            .acquire_timeout(Duration::from_millis(200))
            .statement_timeout(Duration::from_millis(statement_ms)),
    );
    backend.migrate().await.unwrap();
    (schema, backend)
}

/// The reserve's answer is lost (the account's row is locked past the client's deadline, on a
/// pool of the user's without a server-side statement timeout): whatever the statement did once
/// the lock went, nothing stays held or charged, and no rate-limit cell stays taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reserve_answer_gives_back_the_hold_and_the_limits() {
    let server = PgServer::shared();
    let (schema, backend) = client_deadline_backend("lost_answer", 200).await;
    let (ledger, limiter) = (backend.ledger(), backend.limiter());
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    let charges = vec![charge("acct_1", 1)];

    // Another client holds the account's row for 1 s.
    let lock = {
        let schema = schema.clone();
        tokio::task::spawn_blocking(move || {
            PgServer::shared().psql(&format!(
                "BEGIN; SELECT 1 FROM \"{schema}\".balances WHERE account = 'acct_1' FOR UPDATE; \
                 SELECT pg_sleep(1) /* verify */; COMMIT"
            ));
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lost = backend
        .admission()
        .admit(charges.clone(), ReserveRequest::new("acct_1", 4))
        .await;
    assert!(
        matches!(lost, Verdict::Refused(ReserveError::Backend(_))),
        "{lost:?}"
    );
    lock.await.unwrap();

    // Whichever got the lock first: the reserve (placed, then released by the compensation), or
    // the compensation (it fenced the id, and the reserve, should it run, places nothing; a
    // reserve whose client has gone is also rolled back by the server). Never charged.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
        let kinds: Vec<EntryKind> = journal.iter().map(|e| e.kind).collect();
        let fenced = server.psql(&format!(
            "SELECT count(*) /* verify */ FROM \"{schema}\".fenced_holds"
        ));
        match (&kinds[..], fenced.as_str()) {
            ([EntryKind::TopUp, EntryKind::Reserve, EntryKind::Release], _) => break,
            ([EntryKind::TopUp], "1") => break,
            ([EntryKind::TopUp], _) | ([EntryKind::TopUp, EntryKind::Reserve], _) => {}
            (other, _) => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "not compensated: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let balance = patiently(|| ledger.balance("acct_1")).await;
    assert_eq!((balance.balance, balance.held), (10, 0));
    let decision = patiently(|| limiter.check(&charges)).await;
    assert!(decision.is_allowed(), "the cell was not given back");
}

/// A reserve that got no connection (the pool busy past its acquire timeout) never reached the
/// server: its error says so, and nothing is left to undo (no compensation in the background, no
/// fence, no journal row), however many are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserves_refused_for_want_of_a_connection_leave_nothing_to_undo() {
    let server = PgServer::shared();
    let schema = PgServer::schema("no_connection");
    let backend = replica(
        server,
        PostgresOptions::new()
            .schema(&schema)
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(100))
            .statement_timeout(Duration::from_secs(5)),
    )
    .await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 100, "t-1").await.unwrap();

    let busy = backend.pool().acquire().await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..20 {
        match ledger.reserve(ReserveRequest::new("acct_1", 1)).await {
            Err(ReserveError::Backend(error)) => {
                assert!(!error.may_have_applied(), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
    let after = metrics.num_alive_tasks();
    assert!(
        after < before + 3,
        "{before} tasks before, {after} after 20 refused reserves"
    );
    drop(busy);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
    let kinds: Vec<EntryKind> = journal.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EntryKind::TopUp]);
    assert_eq!(
        server.psql(&format!(
            "SELECT count(*) /* verify */ FROM \"{schema}\".fenced_holds"
        )),
        "0"
    );
    let balance = patiently(|| ledger.balance("acct_1")).await;
    assert_eq!((balance.balance, balance.held), (100, 0));
}

/// PostgreSQL stopped mid-load: credits fail closed at once (no request waits past its
/// deadline), rate limits as configured, recovery is automatic, nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_fails_closed_for_credits_and_as_configured_for_limits_then_recovers() {
    let server = PgServer::start();
    let fast = PostgresOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_millis(300));
    let backend = replica(&server, fast).await;
    let ledger = backend.ledger();
    let open = backend.limiter().fail_mode(FailMode::Open);
    let closed = backend.limiter().fail_mode(FailMode::Closed);
    let price = 5u64;
    ledger.top_up("acct_1", 100_000, "invoice-1").await.unwrap();

    // The workers bill until the server is back, however fast or slow the machine is.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = || {
        let ledger = ledger.clone();
        let running = std::sync::Arc::clone(&running);
        tokio::spawn(async move {
            let (mut settled, mut unsettled) = (Vec::new(), Vec::new());
            let mut failed = 0u64;
            let mut slowest = Duration::ZERO;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let reserved = ledger.reserve(ReserveRequest::new("acct_1", price)).await;
                slowest = slowest.max(started.elapsed());
                match reserved {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().unwrap();
                        // A settle that fails is tried again once the server is back (below),
                        // so the worker keeps sending reserves through the outage.
                        match ledger.settle(&hold, price).await {
                            Ok(_) => settled.push(hold.id()),
                            Err(_) => unsettled.push(hold),
                        }
                    }
                    Err(ReserveError::Backend(e)) => {
                        assert!(e.retry_after() > Duration::ZERO);
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("{other}"),
                }
            }
            // Settling is safe to retry: a closed hold is not closed again.
            for hold in unsettled {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match ledger.settle(&hold, price).await {
                        Ok(_) => {
                            settled.push(hold.id());
                            break;
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            (settled, failed, slowest)
        })
    };
    let workers: Vec<_> = (0..8).map(|_| load()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    let started = Instant::now();
    match ledger.reserve(ReserveRequest::new("acct_1", price)).await {
        Err(ReserveError::Backend(error)) => {
            let rejection: tollgate::Rejection = ReserveError::Backend(error).into();
            assert_eq!(rejection.status(), 503);
            assert_eq!(rejection.code(), "backend_unavailable");
            assert!(rejection.retry_after().is_some());
        }
        other => panic!("credits must fail closed, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "no request waits past its deadline: {:?}",
        started.elapsed()
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);

    let (mut settled, mut failed, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for worker in workers {
        let (s, f, w) = worker.await.unwrap();
        settled.extend(s);
        failed += f;
        slowest = slowest.max(w);
    }
    assert!(failed > 0, "some requests met the stopped server");
    assert!(
        slowest < Duration::from_secs(2),
        "a reserve took {slowest:?}"
    );
    let charged = price * settled.len() as u64;
    // Recovery is automatic; reserves whose answers were lost are released in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let balance = patiently(|| ledger.balance("acct_1")).await;
        if balance.held == 0 {
            // Every credit is accounted for: charged exactly what clients saw charged.
            assert_eq!(balance.balance, 100_000 - charged);
            break;
        }
        assert!(Instant::now() < deadline, "holds left: {balance:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (journal_charged, _) = assert_books(&ledger, "acct_1").await;
    assert_eq!(journal_charged, charged, "nothing charged twice");
    let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
    let mut settles: Vec<u64> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .filter_map(|e| e.hold_id)
        .collect();
    settles.sort_unstable();
    settled.sort_unstable();
    assert_eq!(settles, settled, "each hold a client got settled once");
    // Acknowledged top-ups survived the crash-like stop.
    assert!(journal.iter().any(|e| e.kind == EntryKind::TopUp));
    assert!(closed
        .check(&[charge("acct_3", 1)])
        .await
        .unwrap()
        .is_allowed());
}

/// A settle that meets a stopped server is made once the server is back (the usage is charged,
/// not the hold at its expiry), and after a restart the pool's dead connections cost no request
/// an error: a call on one is tried again at once on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_lost_to_an_outage_is_made_when_the_server_is_back() {
    let server = PgServer::start();
    let fast = PostgresOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_millis(300));
    let backend = replica(&server, fast).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
    // Several pooled connections, all of which the restart will kill.
    let holds: Vec<Hold> = futures_util::future::join_all(
        (0..4).map(|_| ledger.reserve(ReserveRequest::new("acct_1", 10))),
    )
    .await
    .into_iter()
    .map(|r| r.unwrap().into_hold().unwrap())
    .collect();

    server.stop();
    assert!(
        ledger.settle(&holds[0], 3).await.is_err(),
        "the server is down"
    );
    server.restart();
    // The background settle is made once the server answers: charged 3, not the 10 held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
        if let Some(settle) = journal.iter().find(|e| e.kind == EntryKind::Settle) {
            assert_eq!((settle.amount, settle.hold_id), (3, Some(holds[0].id())));
            break;
        }
        assert!(Instant::now() < deadline, "the settle was never made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other pooled connections died with the server: every call still succeeds.
    for hold in &holds[1..] {
        let settlement = ledger
            .settle(hold, 10)
            .await
            .expect("a dead connection is replaced");
        assert!(settlement.was_open);
    }
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (100 - 3 - 30, 0));
    assert_books(&ledger, "acct_1").await;
}

/// A caller that gives up while its reserve is out (the future dropped: a client disconnected)
/// leaves no hold behind: it is released in the background, not charged at its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_dropped_in_flight_leaves_no_hold() {
    let server = PgServer::shared();
    let schema = PgServer::schema("dropped_reserve");
    let backend = replica(server, options(&schema)).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    let lock = {
        let schema = schema.clone();
        tokio::task::spawn_blocking(move || {
            PgServer::shared().psql(&format!(
                "BEGIN; SELECT 1 FROM \"{schema}\".balances WHERE account = 'acct_1' FOR UPDATE; \
                 SELECT pg_sleep(1) /* verify */; COMMIT"
            ));
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The caller gives up after 100 ms (the ledger's own deadline is 10 s).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        ledger.reserve(ReserveRequest::new("acct_1", 4)),
    )
    .await;
    assert!(gave_up.is_err(), "the reserve was waiting on the lock");
    lock.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
        let kinds: Vec<EntryKind> = journal.iter().map(|e| e.kind).collect();
        let fenced = server.psql(&format!(
            "SELECT count(*) /* verify */ FROM \"{schema}\".fenced_holds"
        ));
        match (&kinds[..], fenced.as_str()) {
            ([EntryKind::TopUp, EntryKind::Reserve, EntryKind::Release], _) => break,
            ([EntryKind::TopUp], "1") => break,
            ([EntryKind::TopUp], _) | ([EntryKind::TopUp, EntryKind::Reserve], _) => {}
            (other, _) => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the hold stayed: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (10, 0, 0));
}

/// Coalescing (on by default): 400 reserves at once against one account that can afford
/// exactly 150 go in a few batches (`book_many`), and every call keeps its exact answer:
/// exactly 150 are held, each with its own `available` after it (149 down to 0), the others are
/// refused with 0 available. One call in 20 fails inside the database while credits remain (a
/// trigger refuses its hold): it fails alone, its neighbours in the same batch are answered as if
/// it were not there (no other call fails).
/// The 150 settles go together too; the books are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_calls_keep_each_answer_exact_and_a_failing_one_fails_alone() {
    use std::sync::Arc;
    let server = PgServer::shared();
    let schema = PgServer::schema("coalesced");
    let backend = replica(server, options(&schema)).await;
    assert!(backend.options().coalesces(), "on by default");
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 150, "invoice-1").await.unwrap();
    server.psql(&format!(
        "CREATE FUNCTION \"{schema}\".poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.request_id = 'poison' THEN RAISE EXCEPTION 'poisoned hold'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER poison BEFORE INSERT ON \"{schema}\".holds \
         FOR EACH ROW EXECUTE FUNCTION \"{schema}\".poison() /* verify */"
    ));
    let before = server.statements(&schema);

    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let id: Arc<str> = if i % 20 == 7 {
                    "poison".into()
                } else {
                    format!("req-{i}").into()
                };
                let request = ReserveRequest::new("acct_1", 1).request_id(Some(id));
                (i % 20 == 7, ledger.reserve(request).await)
            })
        })
        .collect();
    let (mut holds, mut refused, mut failed) = (Vec::new(), 0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (false, Ok(Reservation::Held(hold))) => holds.push(hold),
            // A poisoned call that comes once the credits are gone is refused before its hold.
            (
                _,
                Err(ReserveError::Insufficient {
                    required: 1,
                    available: 0,
                }),
            ) => refused += 1,
            (true, Err(ReserveError::Backend(error))) => {
                assert!(error.message().contains("poisoned"), "{error}");
                failed += 1;
            }
            (poisoned, other) => panic!("poisoned {poisoned}: {other:?}"),
        }
    }
    assert_eq!(holds.len(), 150);
    assert_eq!(refused + failed, 250);
    assert!(failed >= 1, "no poisoned call reached its hold");
    let mut available: Vec<u64> = holds.iter().map(Hold::available_after).collect();
    available.sort_unstable();
    assert_eq!(
        available,
        (0..150).collect::<Vec<u64>>(),
        "each its own answer"
    );
    let reserves = server.statements(&schema) - before;
    assert!(
        reserves < 400,
        "{reserves} statements for 400 reserves: nothing was coalesced"
    );
    let batches: u64 = server
        .psql(&format!(
            "SELECT coalesce(sum(calls), 0) /* verify */ FROM pg_stat_statements \
             WHERE query LIKE '%\"{schema}\".book_many%'"
        ))
        .parse()
        .unwrap();
    assert!(batches > 0, "no batch of reserves");

    let settles: Vec<_> = holds
        .into_iter()
        .map(|hold| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.settle(&hold, 1).await.unwrap() })
        })
        .collect();
    let mut balances = Vec::new();
    for settle in settles {
        let settlement = settle.await.unwrap();
        assert_eq!(settlement.charged, 1);
        balances.push(settlement.balance);
    }
    balances.sort_unstable();
    assert_eq!(
        balances,
        (0..150).collect::<Vec<u64>>(),
        "each its own balance"
    );
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (0, 0, 0));
    assert_eq!(assert_books(&ledger, "acct_1").await, (150, 150));
}

/// Reserves and settles of several accounts that arrive together go in one statement
/// (`book_many`, one commit): 20 settles of open holds and 20 new reserves, on 4 accounts, queued
/// at once on one runtime thread, are one statement, and every call keeps its exact answer: an
/// account's calls run in the order they came, so its 5 settles (3 credits each) answer the
/// balances 97 down to 85, then its 5 reserves (10 each) the credits available 75 down to 35.
/// The books of every account are exact.
#[tokio::test(flavor = "current_thread")]
async fn reserves_and_settles_that_arrive_together_go_in_one_statement() {
    use futures_util::future::join_all;
    let server = PgServer::shared();
    let schema = PgServer::schema("one_batch");
    let backend = replica(server, options(&schema)).await;
    let ledger = backend.ledger();
    let accounts = ["acct_1", "acct_2", "acct_3", "acct_4"];
    for account in accounts {
        ledger.top_up(account, 100, "invoice-1").await.unwrap();
    }
    let reserve_all = || {
        join_all(
            accounts
                .iter()
                .flat_map(|a| std::iter::repeat_n(*a, 5))
                .map(|a| ledger.reserve(ReserveRequest::new(a, 10))),
        )
    };
    let first: Vec<Hold> = reserve_all()
        .await
        .into_iter()
        .map(|r| r.unwrap().into_hold().unwrap())
        .collect();

    let before = server.statements(&schema);
    let (settled, reserved) = tokio::join!(
        join_all(first.iter().map(|h| ledger.settle(h, 3))),
        reserve_all()
    );
    assert_eq!(
        server.statements(&schema) - before,
        1,
        "one statement for 40 calls"
    );
    for account in accounts {
        let mut balances: Vec<u64> = first
            .iter()
            .zip(&settled)
            .filter(|(h, _)| h.account() == account)
            .map(|(_, s)| {
                let s = s.as_ref().unwrap();
                assert_eq!((s.charged, s.was_open), (3, true));
                s.balance
            })
            .collect();
        balances.sort_unstable();
        assert_eq!(balances, [85, 88, 91, 94, 97], "{account}");
    }
    let second: Vec<Hold> = reserved
        .into_iter()
        .map(|r| r.unwrap().into_hold().unwrap())
        .collect();
    for account in accounts {
        let mut available: Vec<u64> = second
            .iter()
            .filter(|h| h.account() == account)
            .map(Hold::available_after)
            .collect();
        available.sort_unstable();
        assert_eq!(available, [35, 45, 55, 65, 75], "{account}");
    }
    for settled in join_all(second.iter().map(|h| ledger.settle(h, 2))).await {
        assert_eq!(settled.unwrap().charged, 2);
    }
    for account in accounts {
        let balance = ledger.balance(account).await.unwrap();
        assert_eq!((balance.balance, balance.held, balance.holds), (75, 0, 0));
        assert_eq!(assert_books(&ledger, account).await, (25, 10), "{account}");
    }
}

/// Another client's transaction holding `account`'s row in `balances` (as another replica's
/// statement does) until [`release`](RowLock::release) (or until it is dropped).
struct RowLock(sqlx::PgConnection);

impl RowLock {
    /// Locks the row, on a connection of its own.
    async fn take(server: &PgServer, schema: &str, account: &str) -> RowLock {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&server.url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; SELECT 1 FROM \"{schema}\".balances WHERE account = '{account}' \
             FOR UPDATE /* verify */"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        RowLock(conn)
    }

    /// Commits: the row is free again.
    async fn release(mut self) {
        sqlx::raw_sql("COMMIT /* verify */")
            .execute(&mut self.0)
            .await
            .unwrap();
    }
}

/// How many statements of `schema` whose text contains `function(` wait on a lock now.
async fn waiting_on_a_lock(server: &'static PgServer, schema: &str, function: &str) -> i64 {
    let text = format!(
        "SELECT count(*) /* verify */ FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%\"{schema}\".{function}(%'"
    );
    tokio::task::spawn_blocking(move || server.psql(&text))
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// One batch (`book_many`) of 30 reserves, then one of 30 settles, on one account whose row another
/// replica holds: the first call waits its 100 ms `lock_timeout` in vain, and the batch's other
/// calls of that account do not wait again (their waits would add up past the 500 ms
/// `statement_timeout` and fail the whole batch): they are sent again alone at once, and the row
/// is let go as soon as they wait on it. Every call gets its exact answer, none an error, and
/// the books are exact.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_waits_once_for_an_account_whose_row_is_held_elsewhere() {
    use futures_util::future::join_all;
    let server = PgServer::shared();
    let schema = PgServer::schema("batch_locks");
    let backend = replica(
        server,
        options(&schema).statement_timeout(Duration::from_millis(500)),
    )
    .await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 30, "invoice-1").await.unwrap();

    // Let the row go once the calls sent again alone wait on it (the batch alone never shows
    // two waiters), at the latest after 2 s (the batch would have failed by then).
    let release_when_resent = |lock: RowLock, function: &'static str| {
        let schema = schema.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(2);
            while waiting_on_a_lock(server, &schema, function).await < 2
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lock.release().await;
        }
    };

    // One runtime thread: the 30 calls are all queued before the batch is sent, so they go in one.
    let lock = RowLock::take(server, &schema, "acct_1").await;
    let (reserved, ()) = tokio::join!(
        join_all((0..30).map(|_| ledger.reserve(ReserveRequest::new("acct_1", 1)))),
        release_when_resent(lock, "reserve"),
    );
    let holds: Vec<Hold> = reserved
        .into_iter()
        .map(|r| r.expect("no call fails").into_hold().unwrap())
        .collect();
    let mut available: Vec<u64> = holds.iter().map(Hold::available_after).collect();
    available.sort_unstable();
    assert_eq!(
        available,
        (0..30).collect::<Vec<u64>>(),
        "each its own answer"
    );

    let lock = RowLock::take(server, &schema, "acct_1").await;
    let (settled, ()) = tokio::join!(
        join_all(holds.iter().map(|hold| ledger.settle(hold, 1))),
        release_when_resent(lock, "close"),
    );
    let mut balances: Vec<u64> = settled
        .into_iter()
        .map(|s| {
            let s = s.expect("no call fails");
            assert_eq!((s.charged, s.was_open), (1, true));
            s.balance
        })
        .collect();
    balances.sort_unstable();
    assert_eq!(
        balances,
        (0..30).collect::<Vec<u64>>(),
        "each its own balance"
    );

    let batches: u64 = server
        .psql(&format!(
            "SELECT coalesce(sum(calls), 0) /* verify */ FROM pg_stat_statements \
             WHERE query LIKE '%\"{schema}\".book_many(%'"
        ))
        .parse()
        .unwrap();
    assert!(batches >= 2, "{batches} batches");
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (0, 0, 0));
    assert_eq!(assert_books(&ledger, "acct_1").await, (30, 30));
}

/// "No request hangs past its deadline", with coalescing: the account's row is held elsewhere
/// for 3 s, on a pool without a server-side statement timeout (the client's deadline, 500 ms, is
/// all there is). 20 requests at once through the credits layer: the first is sent alone, the
/// others wait for it, then go in a batch; each answers 503 `backend_unavailable` within one
/// deadline (plus a little) of its start, not twice it. Nothing is charged: every hold a lost
/// answer may have placed is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_call_answers_within_one_deadline() {
    use tollgate::ratelimit::{KeyBy, Plan};
    let server = PgServer::shared();
    let (schema, backend) = client_deadline_backend("one_deadline", 300).await;
    let deadline = Duration::from_millis(500);
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
    let service = one_step(
        &backend,
        Plan::new().requests_per_minute(1_000),
        KeyBy::Account,
    );

    let lock = RowLock::take(server, &schema, "acct_1").await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let (status, _, body) = send_one(&service).await;
                (status, body, started.elapsed())
            })
        })
        .collect();
    for task in tasks {
        let (status, body, took) = task.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("backend_unavailable"), "{body}");
        assert!(
            took < deadline + Duration::from_millis(250),
            "answered after {took:?}, the deadline is {deadline:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.release().await;

    // Whatever a statement did once the row was free is undone: nothing held, nothing charged.
    // The statements that waited on the row run now, and the compensations retry in the
    // background (at most 2 s apart): the books are read once nothing of the schema runs and
    // nothing has been held for 2.5 s.
    let active = format!(
        "SELECT count(*) /* verify */ FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%\"{schema}\".%' AND pid <> pg_backend_pid()"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let balance = patiently(|| ledger.balance("acct_1")).await;
        let text = active.clone();
        let running: i64 = tokio::task::spawn_blocking(move || server.psql(&text))
            .await
            .unwrap()
            .parse()
            .unwrap();
        if balance.held == 0 && balance.holds == 0 && running == 0 {
            assert_eq!(balance.balance, 100);
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(2_500) {
                break;
            }
        } else {
            quiet_since = None;
        }
        assert!(Instant::now() < deadline, "holds left: {balance:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        assert_books(&ledger, "acct_1").await.0,
        0,
        "nothing charged"
    );
}

/// The connection of a batch of settles (`book_many`) is lost mid-statement (its backend
/// terminated by a trigger on the third settle): the batch is sent again, each call's token
/// correction only if its hold is still open, and every settle answers its exact settlement.
/// The journal has one settle per hold, the balance is exact, and the tokens bucket was
/// corrected once per request.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_of_settles_is_sent_again_on_a_lost_connection_and_applied_once() {
    use futures_util::future::join_all;
    use tollgate::ratelimit::Correction;
    let server = PgServer::shared();
    let schema = PgServer::schema("close_retry");
    let backend = replica(server, options(&schema)).await;
    let (ledger, admission, limiter) = (backend.ledger(), backend.admission(), backend.limiter());
    ledger.top_up("acct_1", 1_000, "invoice-1").await.unwrap();
    // 100k tokens refilled at one a day: the numbers stay exact.
    let daily = Quota::with_period(Duration::from_secs(86_400))
        .unwrap()
        .allow_burst(NonZeroU32::new(100_000).unwrap());
    let tokens = |cost: u64| Charge {
        key: BucketKey::new(Subject::Account("acct_1".into()), "plan:test", 1),
        kind: LimitKind::Tokens,
        quota: daily,
        cost,
    };
    const N: u64 = 30;
    let (mut holds, mut remaining) = (Vec::new(), Vec::new());
    for verdict in join_all(
        (0..N).map(|_| admission.admit(vec![tokens(10)], ReserveRequest::new("acct_1", 10))),
    )
    .await
    {
        match verdict {
            Verdict::Admitted {
                reservation: Reservation::Held(hold),
                decision,
            } => {
                holds.push(hold);
                remaining.push(decision.status(LimitKind::Tokens).unwrap().remaining);
            }
            other => panic!("{other:?}"),
        }
    }
    // The batch's answers carry each call's own bucket state.
    remaining.sort_unstable();
    let expected: Vec<u64> = (1..=N).rev().map(|i| 100_000 - 10 * i).collect();
    assert_eq!(remaining, expected);
    server.psql(&format!(
        "CREATE SEQUENCE \"{schema}\".cut_once; \
         CREATE FUNCTION \"{schema}\".cut() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.kind = 'settle' AND nextval('\"{schema}\".cut_once') = 3 THEN \
         PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER cut AFTER INSERT ON \"{schema}\".journal \
         FOR EACH ROW EXECUTE FUNCTION \"{schema}\".cut() /* verify */"
    ));

    // One runtime thread: the settles are all queued before the batch is sent, so they go in one.
    let correction = Correction {
        key: tokens(0).key,
        quota: daily,
        delta: 40,
    };
    let settled = join_all(
        holds
            .iter()
            .map(|hold| admission.settle(hold, 7, std::slice::from_ref(&correction))),
    )
    .await;
    let mut balances: Vec<u64> = settled
        .into_iter()
        .map(|s| {
            let s = s.expect("the batch is sent again");
            assert_eq!((s.charged, s.was_open), (7, true));
            s.balance
        })
        .collect();
    balances.sort_unstable();
    let expected: Vec<u64> = (0..N).map(|i| 1_000 - 7 * (i + 1)).rev().collect();
    assert_eq!(balances, expected, "each its own balance");
    assert!(
        server.psql(&format!(
            "SELECT last_value /* verify */ FROM \"{schema}\".cut_once"
        )) != "1",
        "the trigger ran"
    );

    let journal = patiently(|| ledger.journal("acct_1", JournalQuery::new())).await;
    let mut settles: Vec<u64> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .filter_map(|e| e.hold_id)
        .collect();
    settles.sort_unstable();
    let mut ids: Vec<u64> = holds.iter().map(Hold::id).collect();
    ids.sort_unstable();
    assert_eq!(settles, ids, "one settle per hold");
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held), (1_000 - 7 * N, 0));
    assert_eq!(assert_books(&ledger, "acct_1").await, (7 * N, N));
    // 10 tokens at each admission, 40 more at each settle, once: 50 per request.
    let decision = limiter.check(&[tokens(1)]).await.unwrap();
    assert_eq!(
        decision.status(LimitKind::Tokens).unwrap().remaining,
        100_000 - 50 * N - 1
    );
}
