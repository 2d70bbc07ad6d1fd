//! The gateway example with `[backend] kind = "postgres"`: two replicas share keys, limits and
//! balances through one PostgreSQL (started by the test on a free port), and the books survive a
//! restart of the gateway.
#![cfg(feature = "postgres")]

#[path = "support/binary.rs"]
mod binary;
#[path = "support/gateway.rs"]
mod gateway;
#[path = "../../../tests/support/pg_server.rs"]
mod pg_server;

use serde_json::{json, Value};

fn config(url: &str, schema: &str) -> String {
    format!(
        r#"
[backend]
kind = "postgres"
url = "{url}"
schema = "{schema}"

[admin]
key = "admin-test-key-0123456789"

[[plans]]
name = "std"
requests_per_minute = 6000
burst = 1000

[[models]]
id = "mock-small"
credits_per_request = 10

[[accounts]]
id = "acct_p"
plan = "std"
balance = 100

[[keys]]
id = "key_p"
account = "acct_p"
key = "sk-test-postgres-000000000000"
"#
    )
}

async fn call(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> (u16, Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let method = if body.is_some() { "POST" } else { "GET" };
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {bearer}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::<bytes::Bytes>::new(
            body.map(|b| b.to_string()).unwrap_or_default().into(),
        ))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The account once no hold is open (a settlement runs after its response's body has ended).
async fn settled(addr: std::net::SocketAddr) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, account) = call(addr, "/admin/accounts/acct_p", ADMIN, None).await;
        if account["holds"] == json!(0) || std::time::Instant::now() > deadline {
            return account;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

const KEY: &str = "sk-test-postgres-000000000000";
const ADMIN: &str = "admin-test-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_balance_and_revocations_and_the_books_outlive_them() {
    let server = pg_server::PgServer::shared();
    let schema = pg_server::PgServer::schema("gateway");
    let a = gateway::start(&config(&server.url(), &schema)).await;
    // The second replica loads the same config: the starting balance is not added twice.
    let b = gateway::start(&config(&server.url(), &schema)).await;
    let chat = json!({"model": "mock-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});

    // 100 credits at 10 per call: exactly 10 calls pass across both replicas.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let chat = chat.clone();
        tasks.push(tokio::spawn(async move {
            call(addr, "/v1/chat/completions", KEY, Some(chat)).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        if status == 402 {
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 402).count(),
        20,
        "{statuses:?}"
    );
    let account = settled(b.addr).await;
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(0), json!(0)),
        "{account}"
    );

    // A top-up on one replica, spent on the other.
    let (status, _) = call(
        a.addr,
        "/admin/accounts/acct_p/top-up",
        ADMIN,
        Some(json!({"amount": 20})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        call(b.addr, "/v1/chat/completions", KEY, Some(chat.clone()))
            .await
            .0,
        200
    );

    // Revoked on one replica: refused by the other within a second.
    let (status, _) = call(a.addr, "/admin/keys/key_p/revoke", ADMIN, Some(json!({}))).await;
    assert_eq!(status, 200);
    let revoked_at = std::time::Instant::now();
    loop {
        let (status, body) = call(b.addr, "/v1/chat/completions", KEY, Some(chat.clone())).await;
        if status == 403 {
            assert_eq!(body["error"]["code"], "api_key_revoked", "{body}");
            break;
        }
        assert!(
            revoked_at.elapsed() < std::time::Duration::from_secs(1),
            "{status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // (A call that reached replica B before the notification did was charged: 10 or 0 left.)
    let last = settled(b.addr).await["balance"].as_u64().unwrap();
    assert!(last == 10 || last == 0, "{last}");

    // Both replicas gone, a new one on the same database: the books are there, unchanged.
    drop((a, b));
    let c = gateway::start(&config(&server.url(), &schema)).await;
    let (_, account) = call(c.addr, "/admin/accounts/acct_p", ADMIN, None).await;
    assert_eq!(account["balance"], json!(last), "{account}");
    let (_, journal) = call(
        c.addr,
        "/admin/accounts/acct_p/journal?limit=1000",
        ADMIN,
        None,
    )
    .await;
    let entries = journal["entries"].as_array().unwrap();
    let sum = |kind: &str| -> u64 {
        entries
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["amount"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        sum("top_up") - sum("settle") - sum("expire"),
        last,
        "balance = Σ top-ups − Σ charges"
    );
    assert_eq!(entries.iter().filter(|e| e["kind"] == "top_up").count(), 2);
    let (status, _) = call(c.addr, "/v1/chat/completions", KEY, Some(chat)).await;
    assert_eq!(status, 403, "the revocation is durable too");
}

#[test]
fn the_config_names_what_a_postgres_backend_lacks() {
    use tollgate_gateway::config::GatewayConfig;
    let error = GatewayConfig::from_toml("[backend]\nkind = \"postgres\"\n").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("`kind = \"postgres\"` needs a url"),
        "{error}"
    );
    let error = GatewayConfig::from_toml(
        "[backend]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\nschema = \"Bad-Name\"\n",
    )
    .unwrap_err();
    assert!(error.to_string().contains("backend.schema"), "{error}");
    let error = GatewayConfig::from_toml(
        "[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/\"\nschema = \"billing\"\n",
    )
    .unwrap_err();
    assert!(error.to_string().contains("only with"), "{error}");
}

/// PostgreSQL stopped under the gateway: 503 `backend_unavailable` with `Retry-After`, quickly;
/// back by itself when the server is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_fails_closed_while_postgres_is_down_and_recovers() {
    use http_body_util::BodyExt;
    let server = pg_server::PgServer::start();
    let gateway = gateway::start(&config(&server.url(), "tollgate")).await;
    let chat = json!({"model": "mock-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        call(
            gateway.addr,
            "/v1/chat/completions",
            KEY,
            Some(chat.clone())
        )
        .await
        .0,
        200
    );

    server.stop();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    // A lookup cached before the stop gets the request as far as the credits, which refuse.
    let started = std::time::Instant::now();
    let res = client
        .request(
            http::Request::post(format!("http://{}/v1/chat/completions", gateway.addr))
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::<bytes::Bytes>::new(
                    chat.to_string().into(),
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "backend_unavailable", "{body}");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no host in a response: {body}"
    );

    server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _) = call(
            gateway.addr,
            "/v1/chat/completions",
            KEY,
            Some(chat.clone()),
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let account = settled(gateway.addr).await;
    assert_eq!(
        account["balance"],
        json!(80),
        "two calls charged, the refused one not: {account}"
    );
}

/// A replica killed with `kill -9` while its calls are at the upstream: its holds stay, locked,
/// and are settled at their held amount once they expire; the books add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_a_replica_killed_mid_call_expire_at_their_held_amount() {
    use std::io::{BufRead, BufReader};
    use tollgate::{
        credits::{
            ledger::{EntryKind, JournalQuery},
            LedgerAdmin,
        },
        postgres::{PostgresBackend, PostgresOptions},
    };

    // An upstream that answers only after 30 s: the calls are in flight when the replica dies.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            "late"
        });
        axum::serve(upstream, app).await.unwrap();
    });

    let server = pg_server::PgServer::shared();
    let schema = pg_server::PgServer::schema("killed");
    let dir = std::env::temp_dir().join(format!("tollgate-killed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    let text = config(&server.url(), &schema).replace(
        "[backend]",
        &format!("[server]\nupstream = \"http://{upstream_addr}\"\nhold_ttl_secs = 1\n\n[backend]"),
    );
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(binary::example_binary())
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr: std::net::SocketAddr = first
        .strip_prefix("tollgate gateway listening on http://")
        .expect(&first)
        .parse()
        .unwrap();

    let chat = json!({"model": "mock-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let chat = chat.clone();
            tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<http_body_util::Full<bytes::Bytes>>();
                let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("content-type", "application/json")
                    .body(chat.to_string().into())
                    .unwrap();
                client.request(request).await.map(|r| r.status().as_u16())
            })
        })
        .collect();

    let ledger = {
        let backend = PostgresBackend::connect_with(
            &server.url(),
            PostgresOptions::new().schema(schema.as_str()),
        )
        .await
        .unwrap();
        backend.ledger()
    };
    // Wait until the three holds are placed, then kill the replica.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ledger.balance("acct_p").await.unwrap().holds < 3 {
        assert!(std::time::Instant::now() < deadline, "holds never placed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    for call in calls {
        assert!(
            call.await.unwrap().is_err(),
            "the connection died with the replica"
        );
    }
    let balance = ledger.balance("acct_p").await.unwrap();
    assert_eq!(
        (balance.balance, balance.held, balance.available),
        (100, 30, 70),
        "locked, not lost"
    );

    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let expired = ledger
        .expire_holds(std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(
        (expired.holds, expired.charged),
        (3, 30),
        "settled at their held amount"
    );
    let balance = ledger.balance("acct_p").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (70, 0, 0));
    let journal = ledger.journal("acct_p", JournalQuery::new()).await.unwrap();
    let count = |kind: EntryKind| journal.iter().filter(|e| e.kind == kind).count();
    assert_eq!(
        (count(EntryKind::Reserve), count(EntryKind::Expire)),
        (3, 3)
    );
    assert!(journal
        .iter()
        .all(|e| e.kind != EntryKind::Reserve || e.key_id.as_deref() == Some("key_p")));
    let _ = std::fs::remove_dir_all(&dir);
}
