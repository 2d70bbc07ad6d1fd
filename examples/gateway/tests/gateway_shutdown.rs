//! SIGTERM with SSE streams in flight, on every durable backend: the gateway lets the streams
//! end (within `[server] shutdown_timeout_secs`), settles each at its reported usage, and exits
//! only after the settlements; streams still open at the timeout are cut and settled as a client
//! disconnect. No hold is left to expire at its held amount. The books are read back by a second
//! gateway started on the same storage.
#![cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]

#[path = "support/binary.rs"]
mod binary;
#[cfg(feature = "postgres")]
#[path = "../../../tests/support/pg_server.rs"]
mod pg_server;
#[path = "support/process.rs"]
mod process;
#[cfg(feature = "redis")]
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;
#[path = "../../../tests/support/temp_dir.rs"]
mod temp_dir;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use process::Process;
use serde_json::{json, Value};
use temp_dir::TempDir;

const ADMIN: &str = "admin-test-key-0123456789";
const KEY: &str = "sk-test-shutdown-000000000000";
const STREAMS: usize = 10;
const BALANCE: u64 = 1_000_000;
/// What each complete stream reports: 10 prompt + 20 completion tokens.
const PROMPT_TOKENS: u64 = 10;
const COMPLETION_TOKENS: u64 = 20;
/// 1 per request + 1 per token (1000 per 1k).
const COST: u64 = 1 + PROMPT_TOKENS + COMPLETION_TOKENS;

fn config(backend: &str, upstream: SocketAddr, shutdown_timeout_secs: u64) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
upstream = "http://{upstream}"
shutdown_timeout_secs = {shutdown_timeout_secs}

[admin]
key = "{ADMIN}"

{backend}

[[plans]]
name = "std"
requests_per_minute = 600000
burst = 10000
tokens_per_minute = 1000000000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1000

[[accounts]]
id = "acct_s"
plan = "std"
balance = {BALANCE}

[[keys]]
id = "key_s"
account = "acct_s"
key = "{KEY}"
"#
    )
}

/// A slow OpenAI-style upstream: every chat completion streams its first chunk at once, then
/// one chunk per `interval`, 20 in all, then the usage event and `[DONE]`.
async fn slow_upstream(interval: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let chunk = |content: &str| {
                    let event = json!({"id": "chatcmpl-slow", "object": "chat.completion.chunk",
                        "model": "mock-small",
                        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
                    Bytes::from(format!("data: {event}\n\n"))
                };
                let first = futures_util::stream::once(async move { chunk("a") });
                let rest = futures_util::stream::unfold(1u64, move |i| async move {
                    if i > COMPLETION_TOKENS {
                        return None;
                    }
                    tokio::time::sleep(interval).await;
                    let frame = if i < COMPLETION_TOKENS {
                        chunk("b")
                    } else {
                        let usage = json!({"id": "chatcmpl-slow", "object": "chat.completion.chunk",
                            "model": "mock-small", "choices": [],
                            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}});
                        Bytes::from(format!("data: {usage}\n\ndata: [DONE]\n\n"))
                    };
                    Some((frame, i + 1))
                });
                use futures_util::StreamExt;
                let body = axum::body::Body::from_stream(
                    first.chain(rest).map(Ok::<_, Infallible>),
                );
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, started)
}

fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn get(addr: SocketAddr, path: &str) -> Value {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let res = client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// One streamed chat completion: waits for its first event, then hands the rest of the body
/// to a task that returns everything the client received.
async fn open_stream(addr: SocketAddr) -> tokio::task::JoinHandle<String> {
    let body = json!({"model": "mock-small", "stream": true, "max_tokens": 100,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hello there"}]});
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut received = String::new();
    // The first frame: the stream is in flight.
    while received.is_empty() {
        let frame = body.frame().await.expect("a first event").unwrap();
        if let Ok(data) = frame.into_data() {
            received.push_str(&String::from_utf8_lossy(&data));
        }
    }
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                received.push_str(&String::from_utf8_lossy(&data));
            }
        }
        received
    })
}

/// The account and its journal, read through a second gateway on the same storage;
/// asserts `balance = Σ top-ups − Σ charges`, nothing held, every hold closed once and none
/// expired. Returns the settlements' amounts.
async fn settled_books(dir: &Path, config: &str) -> Vec<u64> {
    let reader = Process::start(dir, config);
    let account = get(reader.addr, "/admin/accounts/acct_s").await;
    let journal = get(reader.addr, "/admin/accounts/acct_s/journal?limit=1000").await;
    let entries = journal["entries"].as_array().unwrap();
    let of = |kind: &str| -> Vec<&Value> { entries.iter().filter(|e| e["kind"] == kind).collect() };
    let amount = |e: &&Value| e["amount"].as_u64().unwrap();
    let top_ups: u64 = of("top_up").iter().map(amount).sum();
    let settles: Vec<u64> = of("settle").iter().map(amount).collect();
    assert_eq!(top_ups, BALANCE, "{journal}");
    assert_eq!(of("reserve").len(), STREAMS, "{journal}");
    assert_eq!(settles.len(), STREAMS, "every hold settled once: {journal}");
    assert!(of("expire").is_empty(), "no hold left to expire: {journal}");
    assert!(of("release").is_empty(), "{journal}");
    assert_eq!(account["held"], 0, "{account}");
    assert_eq!(account["holds"], 0, "{account}");
    assert_eq!(
        account["balance"].as_u64().unwrap(),
        top_ups - settles.iter().sum::<u64>(),
        "balance = Σ top-ups − Σ charges: {account} {journal}"
    );
    settles
}

/// Ten streams in flight at SIGTERM run to their end: each client gets its whole answer and
/// each stream is charged its reported usage, before the process exits.
async fn streams_in_flight_finish_and_settle(dir: &Path, backend: &str) {
    let (upstream, started) = slow_upstream(Duration::from_millis(50)).await;
    let config = config(backend, upstream, 30);
    let gateway = Process::start(dir, &config);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(open_stream(gateway.addr).await);
    }
    assert_eq!(started.load(Ordering::SeqCst), STREAMS);
    let (status, stopped) = gateway.terminate().await;
    assert!(status.success(), "{status}");
    assert!(stopped, "the gateway says it stopped");
    for stream in streams {
        let received = stream.await.unwrap();
        assert!(received.ends_with("data: [DONE]\n\n"), "{received}");
        assert!(received.contains("\"completion_tokens\":20"), "{received}");
    }
    assert_eq!(settled_books(dir, &config).await, vec![COST; STREAMS]);
}

/// Streams still open at `shutdown_timeout_secs` are cut: each is settled at once as a client
/// disconnect (at most its hold, the usage streamed so far), never left to expire.
async fn streams_past_the_shutdown_timeout_are_cut_and_settled(dir: &Path, backend: &str) {
    // 20 chunks at 2 s each: far longer than the 1 s shutdown timeout.
    let (upstream, _) = slow_upstream(Duration::from_secs(2)).await;
    let config = config(backend, upstream, 1);
    let gateway = Process::start(dir, &config);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(open_stream(gateway.addr).await);
    }
    let (status, stopped) = gateway.terminate().await;
    assert!(status.success(), "{status}");
    assert!(stopped, "the gateway says it stopped");
    for stream in streams {
        let received = stream.await.unwrap();
        assert!(
            !received.contains("[DONE]"),
            "cut before its end: {received}"
        );
    }
    let settles = settled_books(dir, &config).await;
    // Usage so far: the prompt estimate and one streamed event, well under the hold
    // (1 + prompt estimate + max_tokens 100).
    for charge in settles {
        assert!((1..COST + 100).contains(&charge), "{charge}");
    }
}

#[cfg(feature = "sqlite")]
const SQLITE: &str = "[backend]\nkind = \"sqlite\"\npath = \"books.db\"";

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_streams_in_flight_settles_them_on_sqlite() {
    let dir = TempDir::new("gateway-shutdown-sqlite");
    streams_in_flight_finish_and_settle(dir.path(), SQLITE).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_shutdown_timeout_cuts_and_settles_on_sqlite() {
    let dir = TempDir::new("gateway-shutdown-sqlite-cut");
    streams_past_the_shutdown_timeout_are_cut_and_settled(dir.path(), SQLITE).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_streams_in_flight_settles_them_on_redis() {
    let redis = redis_server::RedisServer::start();
    let dir = TempDir::new("gateway-shutdown-redis");
    let backend = format!("[backend]\nkind = \"redis\"\nurl = \"{}\"", redis.url());
    streams_in_flight_finish_and_settle(dir.path(), &backend).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_shutdown_timeout_cuts_and_settles_on_redis() {
    let redis = redis_server::RedisServer::start();
    let dir = TempDir::new("gateway-shutdown-redis-cut");
    let backend = format!("[backend]\nkind = \"redis\"\nurl = \"{}\"", redis.url());
    streams_past_the_shutdown_timeout_are_cut_and_settled(dir.path(), &backend).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_streams_in_flight_settles_them_on_postgres() {
    let server = pg_server::PgServer::shared();
    let schema = pg_server::PgServer::schema("shutdown");
    let dir = TempDir::new("gateway-shutdown-postgres");
    let backend = format!(
        "[backend]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"",
        server.url()
    );
    streams_in_flight_finish_and_settle(dir.path(), &backend).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_shutdown_timeout_cuts_and_settles_on_postgres() {
    let server = pg_server::PgServer::shared();
    let schema = pg_server::PgServer::schema("shutdown_cut");
    let dir = TempDir::new("gateway-shutdown-postgres-cut");
    let backend = format!(
        "[backend]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"",
        server.url()
    );
    streams_past_the_shutdown_timeout_are_cut_and_settled(dir.path(), &backend).await;
}
