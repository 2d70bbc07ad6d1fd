//! The gateway example with `[backend] kind = "redis"`: two replicas share keys, limits and
//! balances through one `redis-server` (started by the test on a free port).
#![cfg(feature = "redis")]

#[path = "support/gateway.rs"]
mod gateway;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use serde_json::{json, Value};

fn config(url: &str) -> String {
    format!(
        r#"
[backend]
kind = "redis"
url = "{url}"

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
id = "acct_r"
plan = "std"
balance = 100

[[keys]]
id = "key_r"
account = "acct_r"
key = "sk-test-redis-00000000000000"
"#
    )
}

async fn post(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_balance_and_revocations() {
    let redis = redis_server::RedisServer::start();
    let a = gateway::start(&config(&redis.url())).await;
    // The second replica loads the same config: the starting balance is not added twice.
    let b = gateway::start(&config(&redis.url())).await;
    let chat = json!({"model": "mock-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});

    // 100 credits at 10 per call: exactly 10 calls pass across both replicas.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let chat = chat.clone();
        tasks.push(tokio::spawn(async move {
            post(
                addr,
                "/v1/chat/completions",
                "sk-test-redis-00000000000000",
                Some(chat),
            )
            .await
            .0
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
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
    let (_, account) = post(
        b.addr,
        "/admin/accounts/acct_r",
        "admin-test-key-0123456789",
        None,
    )
    .await;
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(0), json!(0))
    );

    // Revoked through replica A's admin API, refused by replica B within a second.
    let (status, _) = post(
        a.addr,
        "/admin/keys/key_r/revoke",
        "admin-test-key-0123456789",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let (status, body) = post(b.addr, "/v1/models", "sk-test-redis-00000000000000", None).await;
        if status == 403 {
            assert_eq!(body["error"]["code"], "api_key_revoked");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica B still accepts the revoked key"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The issue's budget through the real gateway: one Redis round trip before the upstream call
/// (rate limits and reserve in one script) and one after it (settle with the tokens correction
/// in one script); the key lookup comes from the replica's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billed_request_costs_two_redis_round_trips() {
    let redis = redis_server::RedisServer::start();
    let toml = config(&redis.url()).replace(
        "requests_per_minute = 6000\nburst = 1000",
        "requests_per_minute = 6000\nburst = 1000\ntokens_per_minute = 1000000",
    );
    assert!(toml.contains("tokens_per_minute"));
    let gateway = gateway::start(&toml).await;
    let chat = json!({"model": "mock-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let send = || {
        post(
            gateway.addr,
            "/v1/chat/completions",
            "sk-test-redis-00000000000000",
            Some(chat.clone()),
        )
    };

    // Warm: the key cache, and each script loaded once.
    assert_eq!(send().await.0, 200);
    redis.wait_settled("acct_r").await;
    let before = redis.script_calls().await;
    for _ in 0..5 {
        assert_eq!(send().await.0, 200);
        redis.wait_settled("acct_r").await;
    }
    let used = redis.script_calls().await - before;
    // The replica's hold-expiry sweep (one script per account every 10 s) may fall inside the
    // window once.
    assert!(
        used == 10 || used == 11,
        "5 requests took {used} scripts, not 2 each"
    );
}
