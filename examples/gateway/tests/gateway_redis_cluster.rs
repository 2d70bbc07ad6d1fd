//! The gateway binary with `[backend] kind = "redis"` and `cluster = [...]`: two replicas bill
//! one account through a real local Redis Cluster (3 masters, 3 replicas, started by the test
//! on free ports); the balance is exact. And the config refuses `url` and `cluster` together.
#![cfg(feature = "redis")]

#[path = "support/binary.rs"]
mod binary;
#[path = "support/http.rs"]
mod http_client;
#[path = "support/process.rs"]
mod process;
#[path = "../../../tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../../../tests/support/temp_dir.rs"]
mod temp_dir;

use http_client::Http;
use process::Process;
use redis_cluster::RedisCluster;
use serde_json::{json, Value};
use temp_dir::TempDir;
use tollgate_gateway::config::GatewayConfig;

const ADMIN: &str = "admin-test-key-0123456789";
const KEY: &str = "sk-test-cluster-000000000000";

fn config(backend: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
key = "{ADMIN}"

[backend]
kind = "redis"
{backend}

[[plans]]
name = "std"
requests_per_minute = 6000
burst = 1000

[[models]]
id = "mock-small"
credits_per_request = 10

[[accounts]]
id = "acct_c"
plan = "std"
balance = 100

[[keys]]
id = "key_c"
account = "acct_c"
key = "{KEY}"
"#
    )
}

fn chat() -> Value {
    json!({"model": "mock-small", "max_tokens": 4,
           "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_replicas_bill_exactly_through_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster.urls()[..3]
        .iter()
        .map(|url| format!("{url:?}"))
        .collect();
    let config = config(&format!("cluster = [{}]", nodes.join(", ")));
    let (dir_a, dir_b) = (TempDir::new("gw-cluster-a"), TempDir::new("gw-cluster-b"));
    let a = Process::start(dir_a.path(), &config);
    // The second replica loads the same config: the starting balance is not added twice.
    let b = Process::start(dir_b.path(), &config);
    let (http_a, http_b) = (Http::new(a.addr), Http::new(b.addr));

    // A billed request works.
    let (status, body) = http_a
        .send("POST", "/v1/chat/completions", KEY, Some(chat()))
        .await;
    assert_eq!(status, 200, "{body}");
    // 90 credits left at 10 a call: exactly 9 more pass across both replicas.
    let tasks: Vec<_> = (0..27)
        .map(|i| {
            let http = if i % 2 == 0 {
                http_a.clone()
            } else {
                http_b.clone()
            };
            tokio::spawn(async move {
                http.send("POST", "/v1/chat/completions", KEY, Some(chat()))
                    .await
                    .0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 402).count(),
        18,
        "{statuses:?}"
    );
    // Settlements run after a response's body ends: wait until nothing is held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let account = loop {
        let (status, account) = http_b
            .send("GET", "/admin/accounts/acct_c", ADMIN, None)
            .await;
        assert_eq!(status, 200, "{account}");
        if account["holds"] == json!(0) || std::time::Instant::now() > deadline {
            break account;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(0), json!(0))
    );
    // The journal (through the other replica) accounts for every credit: 100 topped up,
    // 10 settlements of 10.
    let journal = http_a.journal("acct_c", ADMIN, 50).await;
    let sum = |kind: &str| -> u64 {
        journal
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["amount"].as_u64().unwrap())
            .sum()
    };
    assert_eq!((sum("top_up"), sum("settle")), (100, 100), "{journal:?}");
    drop((a, b));
}

#[test]
fn the_config_takes_url_or_cluster_not_both_nor_neither() {
    let both = GatewayConfig::from_toml(&config(
        "url = \"redis://127.0.0.1:6379\"\ncluster = [\"redis://127.0.0.1:7000\"]",
    ))
    .unwrap_err();
    assert_eq!(
        both.to_string(),
        "backend.cluster: give either `url` (one Redis) or `cluster` (the nodes of a Redis Cluster), not both"
    );
    let neither = GatewayConfig::from_toml(&config("")).unwrap_err();
    assert_eq!(
        neither.to_string(),
        "backend.url: `kind = \"redis\"` needs a url such as redis://127.0.0.1:6379 (or `cluster = [\"redis://host:port\", ...]`)"
    );
    let empty = GatewayConfig::from_toml(&config("cluster = []")).unwrap_err();
    assert_eq!(
        empty.to_string(),
        "backend.cluster: needs at least one node, such as [\"redis://127.0.0.1:7000\"]"
    );
    let parsed = GatewayConfig::from_toml(&config(
        "cluster = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]",
    ))
    .unwrap();
    assert_eq!(
        parsed.backend.cluster.as_deref(),
        Some(
            &[
                "redis://127.0.0.1:7000".to_owned(),
                "redis://127.0.0.1:7001".to_owned()
            ][..]
        )
    );
}
