//! The gateway on Redis with the durable record of its journal in PostgreSQL (`[backend] kind =
//! "redis"`, `record = "postgres://..."`): load, `kill -9` mid-load, restart, and the record in
//! PostgreSQL equals Redis's books (Σ top-ups − Σ charges = balance), every entry once.
#![cfg(all(feature = "redis", feature = "postgres"))]

#[path = "support/binary.rs"]
mod binary;
#[path = "support/http.rs"]
mod http_client;
#[path = "../../../tests/support/pg_server.rs"]
mod pg_server;
#[path = "support/process.rs"]
mod process;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;
#[path = "../../../tests/support/temp_dir.rs"]
mod temp_dir;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http_client::Http;
use pg_server::PgServer;
use process::Process;
use redis_server::RedisServer;
use serde_json::{json, Value};
use temp_dir::TempDir;

const ADMIN: &str = "admin-test-key-0123456789";
const KEY: &str = "sk-test-record-00000000000000";

fn config(redis: &str, pg: &str, schema: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
journal_limit = 20
hold_ttl_secs = 1

[admin]
key = "{ADMIN}"

[backend]
kind = "redis"
url = "{redis}"
record = "{pg}"
schema = "{schema}"

[[plans]]
name = "std"
requests_per_minute = 6000000
burst = 100000
tokens_per_minute = 1000000000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1000

[[accounts]]
id = "acct_1"
plan = "std"
balance = 1000000

[[keys]]
id = "key_1"
account = "acct_1"
key = "{KEY}"
"#
    )
}

fn chat() -> Value {
    json!({"model": "mock-small", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello there"}]})
}

/// An admin GET that must answer 200.
async fn admin_get(http: &Http, path: &str) -> Value {
    let (status, body) = http.send("GET", path, ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn hget(redis: &RedisServer, field: &str) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<u64> = redis::cmd("HGET")
        .arg("tollgate:{acct:acct_1}")
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap();
    v.unwrap_or(0)
}

/// (rows, distinct seqs, max seq, Σ top-ups − Σ charges) of the record.
fn recorded(pg: &PgServer, schema: &str) -> (u64, u64, u64, u64) {
    let row = pg.psql(&format!(
        "SELECT count(*) || ' ' || count(DISTINCT seq) || ' ' || coalesce(max(seq), 0) || ' ' || \
         coalesce(sum(CASE kind WHEN 'top_up' THEN amount WHEN 'settle' THEN -amount \
         WHEN 'expire' THEN -amount ELSE 0 END), 0) \
         FROM {schema}.redis_journal WHERE account = 'acct_1'"
    ));
    let n: Vec<u64> = row.split(' ').map(|n| n.parse().unwrap()).collect();
    (n[0], n[1], n[2], n[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_the_record_equals_the_books() {
    let redis = RedisServer::start();
    let pg = PgServer::shared();
    let schema = PgServer::schema("gw_record");
    let dir = TempDir::new("gateway-redis-record");
    let config = config(&redis.url(), &pg.url(), &schema);
    let gateway = Process::start(dir.path(), &config);
    let http = Http::new(gateway.addr);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (http, stop, served) = (http.clone(), stop.clone(), served.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match http
                        .try_send("POST", "/v1/chat/completions", KEY, &[], Some(chat()))
                        .await
                    {
                        Some((200, _)) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Some((status, body)) => panic!("{status} {body}"),
                        None => return, // killed
                    }
                }
            })
        })
        .collect();
    // Long enough for the drain task to run (every second) and the list to pass its limit.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let served_before_kill = served.load(Ordering::Relaxed);
    assert!(served_before_kill > 50, "under load: {served_before_kill}");
    tokio::task::spawn_blocking(move || gateway.kill())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    // Restart: the holds of the dead process expire (hold TTL 1 s) and every entry is drained.
    let gateway = Process::start(dir.path(), &config);
    let http = Http::new(gateway.addr);
    let mut last = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let account = admin_get(&http, "/admin/accounts/acct_1").await;
        let seq = hget(&redis, "seq").await;
        let rec = recorded(pg, &schema);
        if account["held"] == 0 && rec.2 == seq {
            last = Some((account, seq, rec));
            break;
        }
    }
    let (account, seq, (rows, distinct, max, books)) =
        last.expect("holds closed and the record caught up");
    assert_eq!((rows, distinct, max), (seq, seq, seq), "every entry once");
    let balance = account["balance"].as_u64().unwrap();
    assert_eq!(balance, hget(&redis, "balance").await);
    assert_eq!(
        books, balance,
        "the record: Σ top-ups − Σ charges = balance"
    );
    // Every request served before the kill is charged: settled, or (when the process died
    // between writing the reply and its settle) expired at its hold after the restart.
    let charged: u64 = pg
        .psql(&format!(
            "SELECT count(*) FROM {schema}.redis_journal WHERE kind IN ('settle', 'expire')"
        ))
        .parse()
        .unwrap();
    assert!(
        charged >= served_before_kill,
        "{charged} settles and expiries, {served_before_kill} served"
    );
    assert!(
        seq > 2 * 20,
        "the journal passed its limit of 20: {seq} entries"
    );

    // The admin journal reads the record (then Redis): the whole history, no gaps.
    let journal = http.journal("acct_1", ADMIN, 100).await;
    assert_eq!(journal.len() as u64, seq);
    for (i, entry) in journal.iter().enumerate() {
        assert_eq!(entry["seq"].as_u64().unwrap(), i as u64 + 1);
    }
    let sum = |kinds: &[&str]| -> u64 {
        journal
            .iter()
            .filter(|e| kinds.contains(&e["kind"].as_str().unwrap()))
            .map(|e| e["amount"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(balance, sum(&["top_up"]) - sum(&["settle", "expire"]));
    eprintln!(
        "served {served_before_kill} before kill -9; {seq} entries recorded, {charged} charged"
    );
}
