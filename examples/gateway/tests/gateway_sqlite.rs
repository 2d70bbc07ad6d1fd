//! The gateway binary on its default SQLite backend: load, `kill -9` mid-load, restart, and the
//! books still add up; admin-made keys survive; storage that is not usable stops startup with
//! exit code 2.
#![cfg(feature = "sqlite")]

#[path = "support/binary.rs"]
mod binary;
#[path = "support/http.rs"]
mod http_client;
#[path = "support/process.rs"]
mod process;
#[path = "../../../tests/support/temp_dir.rs"]
mod temp_dir;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http_client::Http;
use process::Process;
use serde_json::{json, Value};
use temp_dir::TempDir;

const ADMIN: &str = "admin-test-key-0123456789";
const CONFIG_KEY: &str = "sk-test-sqlite-0000000000000";

/// The config: books in `books.db`, relative to the working directory.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[admin]
key = "admin-test-key-0123456789"

[backend]
kind = "sqlite"
path = "books.db"

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
id = "key_config"
account = "acct_1"
key = "sk-test-sqlite-0000000000000"
"#;

fn chat() -> Value {
    json!({"model": "mock-small", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello there"}]})
}

/// `balance == Σ top-ups − Σ charges`, nothing held, one close per hold; returns the journal.
async fn assert_books(http: &Http, account: &str) -> Vec<Value> {
    let journal = http.journal(account, ADMIN, 1000).await;
    let sum = |kinds: &[&str], field: &str| -> u64 {
        journal
            .iter()
            .filter(|e| kinds.contains(&e["kind"].as_str().unwrap()))
            .map(|e| e[field].as_u64().unwrap())
            .sum()
    };
    let (_, account_json) = http
        .send("GET", &format!("/admin/accounts/{account}"), ADMIN, None)
        .await;
    let balance = account_json["balance"].as_u64().unwrap();
    assert_eq!(
        balance,
        sum(&["top_up"], "amount") - sum(&["settle", "expire"], "amount"),
        "balance = Σ top-ups − Σ charges"
    );
    assert_eq!(
        account_json["held"].as_u64().unwrap(),
        sum(&["reserve"], "hold") - sum(&["settle", "release", "expire"], "hold")
    );
    for (i, entry) in journal.iter().enumerate() {
        assert_eq!(entry["seq"].as_u64().unwrap(), i as u64 + 1, "no gaps");
    }
    let mut closed: Vec<u64> = journal
        .iter()
        .filter(|e| ["settle", "release", "expire"].contains(&e["kind"].as_str().unwrap()))
        .map(|e| e["hold_id"].as_u64().unwrap())
        .collect();
    let n = closed.len();
    closed.sort_unstable();
    closed.dedup();
    assert_eq!(closed.len(), n, "no hold closed twice");
    journal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_keeps_the_books_exact() {
    let dir = TempDir::new("gateway-sqlite-kill");
    let gateway = Process::start(dir.path(), CONFIG);
    let http = Http::new(gateway.addr);

    // Admin changes: durable before their 2xx.
    let (status, created) = http
        .send(
            "POST",
            "/admin/keys",
            ADMIN,
            Some(json!({"account": "acct_1", "id": "key_admin"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let admin_key = created["key"].as_str().unwrap().to_owned();
    let (status, doomed) = http
        .send(
            "POST",
            "/admin/keys",
            ADMIN,
            Some(json!({"account": "acct_1", "id": "key_doomed"})),
        )
        .await;
    assert_eq!(status, 201, "{doomed}");
    let doomed_key = doomed["key"].as_str().unwrap().to_owned();
    let (status, body) = http
        .send("POST", "/admin/keys/key_doomed/revoke", ADMIN, None)
        .await;
    assert!((200..300).contains(&status), "{body}");

    // Load: 16 clients; top-ups alongside; kill -9 in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (http, stop, served) = (http.clone(), stop.clone(), served.clone());
            let key = if i % 2 == 0 {
                admin_key.clone()
            } else {
                CONFIG_KEY.to_owned()
            };
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match http
                        .try_send("POST", "/v1/chat/completions", &key, &[], Some(chat()))
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
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let top_ups = {
        let (http, stop, acknowledged) = (http.clone(), stop.clone(), acknowledged.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("invoice-{n}");
                match http
                    .try_send(
                        "POST",
                        "/admin/accounts/acct_1/top-up",
                        ADMIN,
                        &[("idempotency-key", &key)],
                        Some(json!({"amount": 7})),
                    )
                    .await
                {
                    Some((200, _)) => acknowledged.lock().unwrap().push(key),
                    Some((status, body)) => panic!("{status} {body}"),
                    None => return,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Everything served half a second before the kill (ten durability windows: a margin for a
    // shared machine's slow fsyncs) must be on disk.
    let served_long_before_kill = served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_before_kill = served.load(Ordering::Relaxed);
    assert!(
        served_before_kill > 100,
        "under load: {served_before_kill} served"
    );
    tokio::task::spawn_blocking(move || gateway.kill())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    top_ups.await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(!acknowledged.is_empty());

    // Restart on the same file.
    let gateway = Process::start(dir.path(), CONFIG);
    let http = Http::new(gateway.addr);
    let journal = assert_books(&http, "acct_1").await;
    let (_, account) = http
        .send("GET", "/admin/accounts/acct_1", ADMIN, None)
        .await;
    assert_eq!(
        (account["held"].as_u64(), account["holds"].as_u64()),
        (Some(0), Some(0)),
        "holds of the dead process closed at startup: {account}"
    );
    let top_up_keys: Vec<&str> = journal
        .iter()
        .filter(|e| e["kind"] == "top_up")
        .map(|e| e["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        top_up_keys
            .iter()
            .filter(|k| **k == "config:initial:acct_1")
            .count(),
        1,
        "the starting balance is applied once, not again at the restart"
    );
    for key in &acknowledged {
        assert!(
            top_up_keys.contains(&key.as_str()),
            "acknowledged top-up {key} is missing"
        );
    }
    let settles = journal.iter().filter(|e| e["kind"] == "settle").count() as u64;
    // Settlements lost with the process are at most those of the last moments.
    assert!(
        settles >= served_long_before_kill,
        "{settles} settlements on disk, {served_long_before_kill} requests served 500 ms before the kill"
    );
    let expired = journal.iter().filter(|e| e["kind"] == "expire").count();
    eprintln!(
        "served {served_before_kill} before kill -9; {settles} settles and {expired} holds closed at startup on disk; {} top-ups acknowledged",
        acknowledged.len()
    );

    // The admin-made key still works; the revoked key is still refused.
    let (status, body) = http
        .send("POST", "/v1/chat/completions", &admin_key, Some(chat()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http
        .send("POST", "/v1/chat/completions", &doomed_key, Some(chat()))
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "api_key_revoked", "{body}");
    // And the books still add up after more traffic.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_books(&http, "acct_1").await;
}

fn start_expecting_failure(dir: &Path, uid: Option<u32>) -> Output {
    if !dir.join("gateway.toml").exists() {
        std::fs::write(dir.join("gateway.toml"), CONFIG).unwrap();
    }
    let mut command = Command::new(binary::example_binary());
    command.current_dir(dir).args(["--config", "gateway.toml"]);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(uid);
    }
    command.output().unwrap()
}

fn assert_refused(output: &Output, cause: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: backend.path: books.db ") && stderr.contains(cause),
        "names the path and the cause ({cause}): {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "never a silent start"
    );
}

/// Root ignores file modes: the read-only cases run the binary as `nobody`.
fn unprivileged() -> Option<u32> {
    let root = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    root.unwrap_or(false).then_some(65_534)
}

#[test]
fn unusable_storage_stops_startup_with_exit_code_2() {
    use std::os::unix::fs::PermissionsExt;

    // Not a database at all.
    let dir = TempDir::new("gateway-sqlite-notadb");
    std::fs::write(dir.join("books.db"), "id,balance\nacct_1,100\n").unwrap();
    let output = start_expecting_failure(dir.path(), None);
    assert_refused(&output, "is not a tollgate database (not a SQLite file)");
    assert_eq!(
        std::fs::read_to_string(dir.join("books.db")).unwrap(),
        "id,balance\nacct_1,100\n"
    );

    // A database of a newer tollgate.
    let dir = TempDir::new("gateway-sqlite-newer");
    let db = dir.join("books.db");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::{ConnectOptions, Connection};
        tollgate::sqlite::SqliteBackend::open(&db)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql("INSERT INTO tollgate_schema VALUES (2, 'from the future', 0)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    });
    let output = start_expecting_failure(dir.path(), None);
    assert_refused(
        &output,
        "has schema version 2, newer than this tollgate supports (1)",
    );

    // A read-only file (a database the gateway made before).
    let dir = TempDir::new("gateway-sqlite-rofile");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let db = dir.join("books.db");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let backend = tollgate::sqlite::SqliteBackend::open(&db).await.unwrap();
        tollgate::credits::LedgerAdmin::top_up(&backend.ledger(), "acct_1", 5, "invoice-1")
            .await
            .unwrap();
        backend.close().await.unwrap();
    });
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let output = start_expecting_failure(dir.path(), unprivileged());
    assert_refused(&output, "cannot be written");

    // A read-only directory: the file cannot be created.
    let dir = TempDir::new("gateway-sqlite-rodir");
    std::fs::write(dir.join("gateway.toml"), CONFIG).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let output = start_expecting_failure(dir.path(), unprivileged());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_refused(&output, "cannot be written");
    assert!(!dir.join("books.db").exists());
}

#[test]
fn the_memory_backend_says_at_startup_that_it_keeps_nothing() {
    let dir = TempDir::new("gateway-memory-banner");
    let config = CONFIG.replace(
        "kind = \"sqlite\"\npath = \"books.db\"",
        "kind = \"memory\"",
    );
    std::fs::write(dir.join("gateway.toml"), config).unwrap();
    let mut child = Command::new(binary::example_binary())
        .current_dir(dir.path())
        .args(["--config", "gateway.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let storage = lines
        .map(Result::unwrap)
        .find(|l| l.starts_with("storage: "))
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.starts_with("tollgate gateway listening on"),
        "{first}"
    );
    assert_eq!(
        storage,
        "storage: memory (keeps nothing across restarts: balances, top-ups, the journal and \
         admin-made keys are lost when the process stops)"
    );
    assert!(
        !dir.join("books.db").exists(),
        "the memory backend writes no file"
    );
}
