//! The durable record of the Redis journal (`RedisOptions::record`): entries drained into
//! PostgreSQL before they are trimmed, exactly once, against a real `redis-server` and a real
//! PostgreSQL (both started by the tests on free ports).
#![cfg(all(feature = "redis", feature = "postgres"))]

#[path = "support/books.rs"]
mod books;
#[path = "support/pg_server.rs"]
mod pg_server;
#[path = "support/record.rs"]
mod record;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use books::checked_journal;
use pg_server::PgServer;
use record::{drain_repeatedly, spend};
use redis_server::RedisServer;
use tollgate::{
    credits::{
        ledger::{EntryKind, JournalEntry, JournalQuery},
        LedgerAdmin,
    },
    redis::{RedisBackend, RedisOptions},
};

fn pool(server: &PgServer) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&server.url())
        .unwrap()
}

async fn replica(redis: &RedisServer, pg: &PgServer, schema: &str, limit: usize) -> RedisBackend {
    RedisBackend::connect_with(
        &redis.url(),
        RedisOptions::new()
            .response_timeout(Duration::from_secs(10))
            .journal_limit(limit)
            .record(pool(pg), schema),
    )
    .await
    .unwrap()
}

async fn redis_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn hget(conn: &mut redis::aio::MultiplexedConnection, account: &str, field: &str) -> u64 {
    let v: Option<u64> = redis::cmd("HGET")
        .arg(format!("tollgate:{{acct:{account}}}"))
        .arg(field)
        .query_async(conn)
        .await
        .unwrap();
    v.unwrap_or(0)
}

async fn log_len(conn: &mut redis::aio::MultiplexedConnection, account: &str) -> u64 {
    redis::cmd("LLEN")
        .arg(format!("tollgate:{{acct:{account}}}:log"))
        .query_async(conn)
        .await
        .unwrap()
}

/// The record of `account`: (rows, distinct seqs, max seq, Σ top-ups − Σ charges).
fn recorded(pg: &PgServer, schema: &str, account: &str) -> (u64, u64, u64, i64) {
    let row = pg.psql(&format!(
        "SELECT count(*) || ' ' || count(DISTINCT seq) || ' ' || coalesce(max(seq), 0) || ' ' || \
         coalesce(sum(CASE kind WHEN 'top_up' THEN amount WHEN 'settle' THEN -amount \
         WHEN 'expire' THEN -amount ELSE 0 END), 0) \
         FROM {schema}.redis_journal WHERE account = '{account}'"
    ));
    let n: Vec<i64> = row.split(' ').map(|n| n.parse().unwrap()).collect();
    (n[0] as u64, n[1] as u64, n[2] as u64, n[3])
}

/// Two replicas spend on the same accounts and drain at the same time (their background tasks
/// and explicit drains racing): every entry is recorded exactly once, the journal in Redis stays
/// at its limit, and paging the journal (record, then Redis) gives the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drainers_record_every_entry_exactly_once() {
    let redis = RedisServer::start();
    let pg = PgServer::shared();
    let schema = PgServer::schema("record_two");
    let a = replica(&redis, pg, &schema, 5).await;
    let b = replica(&redis, pg, &schema, 5).await;
    let accounts = ["acct_1", "acct_2", "acct_3"];
    for account in accounts {
        a.ledger()
            .top_up(account, 10_000, &format!("initial-{account}"))
            .await
            .unwrap();
    }
    let mut work = Vec::new();
    for backend in [&a, &b] {
        for account in accounts {
            let ledger = backend.ledger();
            work.push(tokio::spawn(
                async move { spend(&ledger, account, 40).await },
            ));
        }
        for _ in 0..3 {
            work.push(drain_repeatedly(backend, 5, Duration::from_millis(30)));
        }
    }
    for task in work {
        task.await.unwrap();
    }
    let (x, y) = tokio::join!(a.drain_record(), b.drain_record());
    x.unwrap();
    y.unwrap();

    let mut conn = redis_conn(&redis).await;
    for account in accounts {
        let seq = hget(&mut conn, account, "seq").await;
        assert_eq!(seq, 1 + 2 * 80, "one top-up, 80 reserves and their closes");
        let (rows, distinct, max, books) = recorded(pg, &schema, account);
        assert_eq!((rows, distinct, max), (seq, seq, seq), "each entry once");
        let balance = hget(&mut conn, account, "balance").await;
        assert_eq!(
            books, balance as i64,
            "the record adds up to Redis's balance"
        );
        // Drained: the next append trims the list to its limit.
        a.ledger()
            .top_up(account, 1, &format!("after-{account}"))
            .await
            .unwrap();
        assert_eq!(log_len(&mut conn, account).await, 5);
        // Paging (7 at a time) reads the record, then what Redis has not drained yet.
        let mut journal = Vec::new();
        loop {
            let page = b
                .ledger()
                .journal(
                    account,
                    JournalQuery::new()
                        .after(journal.last().map(|e: &JournalEntry| e.seq))
                        .limit(7),
                )
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 7);
            journal.extend(page);
        }
        assert_eq!(journal.len() as u64, seq + 1);
        assert_eq!(journal.last().unwrap().kind, EntryKind::TopUp);
        assert!(journal[1..]
            .iter()
            .any(|e| e.request_id.as_deref() == Some("req-7")));
        let whole = checked_journal(&b.ledger(), account).await;
        assert!(
            journal
                .iter()
                .map(|e| e.seq)
                .eq(whole.iter().map(|e| e.seq)),
            "the pages are the whole journal"
        );
        assert_eq!(
            b.ledger().balance(account).await.unwrap().balance,
            balance + 1
        );
    }
}

/// The record goes down under load: the journal in Redis keeps every entry not recorded (past
/// its limit); once PostgreSQL is back, one drain records them all, nothing lost, nothing twice,
/// and the list shrinks back to its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_outage_loses_nothing_and_records_nothing_twice() {
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let schema = PgServer::schema("record_outage");
    let backend = replica(&redis, &pg, &schema, 3).await;
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 10_000, "initial").await.unwrap();
    spend(&ledger, "acct_1", 10).await;
    backend.drain_record().await.unwrap();
    let mut conn = redis_conn(&redis).await;
    assert_eq!(recorded(&pg, &schema, "acct_1").0, 21);

    pg.stop();
    spend(&ledger, "acct_1", 30).await;
    assert!(
        backend.drain_record().await.is_err(),
        "the record is down: nothing drained"
    );
    let seq = hget(&mut conn, "acct_1", "seq").await;
    assert_eq!(seq, 81);
    // Nothing trimmed past the drained cursor: the 60 new entries are all still in Redis.
    assert!(log_len(&mut conn, "acct_1").await >= 60);
    assert_eq!(hget(&mut conn, "acct_1", "drained").await, 21);

    pg.restart();
    let mut drained = false;
    for _ in 0..50 {
        if backend.drain_record().await.is_ok() {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(drained, "the record is back");
    // A second drain (another replica, or a retry after a lost answer) adds nothing.
    backend.drain_record().await.unwrap();
    let (rows, distinct, max, books) = recorded(&pg, &schema, "acct_1");
    assert_eq!((rows, distinct, max), (81, 81, 81));
    let balance = hget(&mut conn, "acct_1", "balance").await;
    assert_eq!(books, balance as i64);
    assert_eq!(balance, 10_000 - 3 * 26);
    ledger.top_up("acct_1", 1, "after").await.unwrap();
    assert_eq!(log_len(&mut conn, "acct_1").await, 3);
    let journal = checked_journal(&ledger, "acct_1").await;
    assert_eq!(journal.len(), 82);
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, balance + 1);
}

/// A drain reads only the journals with entries not recorded yet (an idle account costs one
/// `HMGET` of its cursors, no script); of several replicas only the holder of the drain lease
/// drains at each tick, and when it goes away another takes the drain over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_skip_idle_accounts_and_one_replica_drains_per_tick() {
    let redis = RedisServer::start();
    let pg = PgServer::shared();
    let schema = PgServer::schema("record_lease");
    let a = replica(&redis, pg, &schema, 5).await;
    let accounts: Vec<String> = (0..100).map(|i| format!("acct_{i}")).collect();
    for account in &accounts {
        a.ledger().top_up(account, 100, "initial").await.unwrap();
    }
    a.drain_record().await.unwrap();
    let mut conn = redis_conn(&redis).await;

    // One account of 100 spends: its journal alone is read (the drain script reads a journal
    // with one LINDEX; the background tick may drain it first, then the explicit drain reads
    // none).
    redis.reset_stats().await;
    spend(&a.ledger(), "acct_7", 2).await;
    a.drain_record().await.unwrap();
    let read = redis.calls(&["lindex"]).await;
    assert!(
        (1..=2).contains(&read),
        "journals read: {read} (one active account of 100)"
    );
    assert_eq!(recorded(pg, &schema, "acct_7").0, 5);

    // Two replicas, idle: each tick one of them checks the 100 cursors.
    let b = replica(&redis, pg, &schema, 5).await;
    redis.reset_stats().await;
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let checked = redis.calls(&["hmget"]).await;
    assert!(
        (100..=400).contains(&checked),
        "cursor reads in 3.2 s: {checked} (one drainer: at most 4 ticks × 100; two would be ≥ 600)"
    );

    // The lease holder goes away; the other replica drains once the lease lapses (3 s).
    drop(a);
    spend(&b.ledger(), "acct_9", 3).await;
    let mut rows = 0;
    for _ in 0..80 {
        rows = recorded(pg, &schema, "acct_9").0;
        if rows == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 7, "the other replica took the drain over");
    let journal = checked_journal(&b.ledger(), "acct_9").await;
    assert_eq!(journal.len(), 7);
    assert_eq!(hget(&mut conn, "acct_9", "balance").await, 100 - 3 * 2);
}
