//! Faults of the upstream and of the client, through the gateway example in front of a faulty
//! upstream on a real 127.0.0.1 socket: an upstream that hangs (504, hold released), resets the
//! connection (502, released), is not HTTP (502, released), returns garbage (settled at the hold),
//! truncates its SSE stream (settled once, not lost), is slow to send headers (served, or 504
//! past the timeout); a client that disconnects mid-stream (charged the hold, once). Plus the
//! timeout inside `Credits` under tokio's paused clock.

#[path = "support/gateway.rs"]
mod gateway;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const KEY: &str = "sk-faults-0123456789abcdefghij";
const ADMIN: &str = "admin-faults-0123456789";
const BALANCE: u64 = 1_000;
/// The hold of [`chat`]: 1 per request + (3 prompt tokens + 16 max tokens) × 1 per token.
const HOLD: u64 = 20;
/// The cost of [`USAGE`]: 1 + 3 + 5.
const USAGE_COST: u64 = 9;
const USAGE: &str = r#"{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}"#;

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[server]
upstream = "http://{upstream}"
upstream_timeout_secs = 1

[admin]
key = "{ADMIN}"

[[plans]]
name = "std"
requests_per_minute = 100000
burst = 100000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1000

[[accounts]]
id = "acct_1"
plan = "std"
balance = {BALANCE}

[[keys]]
id = "key_1"
account = "acct_1"
key = "{KEY}"
"#
    )
}

fn chat(stream: bool) -> String {
    json!({"model": "mock-small", "max_tokens": 16, "stream": stream,
           "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "Hello there"}]})
    .to_string()
}

/// What the faulty upstream does once it has read a request.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Never answers (keeps the connection open).
    Hang,
    /// Closes the connection with a TCP reset.
    Reset,
    /// Answers bytes that are not HTTP.
    NotHttp,
    /// A 200 whose body is not JSON at all.
    GarbageBody,
    /// An SSE stream cut off mid-event (no terminating chunk).
    TruncatedSse,
    /// A full JSON answer with usage, after waiting this long before the headers.
    SlowHeaders(Duration),
    /// An SSE stream of many events, one every 20 ms, usage at the end.
    SlowStream,
}

async fn read_request(socket: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = socket.read(&mut chunk).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return true;
            }
        }
    }
}

fn sse_event(data: &str) -> Vec<u8> {
    let event = format!("data: {data}\n\n");
    format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
}

async fn serve_fault(socket: &mut TcpStream, fault: Fault) {
    if !read_request(socket).await {
        return;
    }
    let sse_head =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    match fault {
        Fault::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
        Fault::Reset => {
            // SO_LINGER 0: the close sends a reset (it does not block with a zero linger).
            #[allow(deprecated)]
            socket.set_linger(Some(Duration::ZERO)).unwrap();
        }
        Fault::NotHttp => {
            let _ = socket
                .write_all(b"SSH-2.0-OpenSSH_9.0\r\n\xff\xfe garbage\r\n\r\n")
                .await;
        }
        Fault::GarbageBody => {
            let body = b"<html>\x00\xff not json {\"usage\": oops";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body).await;
        }
        Fault::TruncatedSse => {
            let _ = socket.write_all(sse_head).await;
            let _ = socket
                .write_all(&sse_event(
                    r#"{"choices":[{"delta":{"content":"Hel"}}],"usage":null}"#,
                ))
                .await;
            // Half an event, then the connection closes without the terminating chunk.
            let _ = socket
                .write_all(b"40\r\ndata: {\"choices\":[{\"delta\"")
                .await;
            let _ = socket.flush().await;
        }
        Fault::SlowHeaders(wait) => {
            tokio::time::sleep(wait).await;
            let body =
                format!(r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{USAGE}}}"#);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
        Fault::SlowStream => {
            if socket.write_all(sse_head).await.is_err() {
                return;
            }
            for _ in 0..100 {
                let event = sse_event(r#"{"choices":[{"delta":{"content":"tok"}}],"usage":null}"#);
                if socket.write_all(&event).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = socket
                .write_all(&sse_event(&format!(r#"{{"choices":[],"usage":{USAGE}}}"#)))
                .await;
            let _ = socket.write_all(b"0\r\n\r\n").await;
        }
    }
}

/// A faulty upstream on 127.0.0.1 (ephemeral port), for the life of the test.
async fn faulty_upstream(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move { serve_fault(&mut socket, fault).await });
        }
    });
    addr
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<String>,
) -> (u16, http::HeaderMap, Result<bytes::Bytes, String>) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {bearer}"));
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(http_body_util::Full::new(body.unwrap_or_default().into()))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    (status, headers, body)
}

async fn account_state(addr: SocketAddr) -> (Value, Vec<Value>) {
    let (status, _, body) = send(addr, "GET", "/admin/accounts/acct_1", ADMIN, None).await;
    assert_eq!(status, 200);
    let account: Value = serde_json::from_slice(&body.unwrap()).unwrap();
    let (_, _, body) = send(addr, "GET", "/admin/accounts/acct_1/journal", ADMIN, None).await;
    let journal: Value = serde_json::from_slice(&body.unwrap()).unwrap();
    let entries = journal["entries"].as_array().unwrap().clone();
    (account, entries)
}

/// Wait (bounded) until the account has no open hold: settlement runs when the body ends.
async fn settled(addr: SocketAddr) -> (Value, Vec<Value>) {
    for _ in 0..100 {
        let (account, journal) = account_state(addr).await;
        if account["holds"] == 0 {
            return (account, journal);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a hold is still open: {:?}", account_state(addr).await);
}

/// The closing entries (settle, release, expire) of the journal.
fn closings(journal: &[Value]) -> Vec<(String, u64)> {
    journal
        .iter()
        .filter(|e| e["kind"] != "top_up" && e["kind"] != "reserve")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["amount"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn error_code(body: &[u8]) -> String {
    let body: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned()
}

async fn gateway_in_front_of(fault: Fault) -> gateway::Running {
    let upstream = faulty_upstream(fault).await;
    gateway::start(&config(upstream)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_is_a_504_and_the_hold_is_released() {
    let gw = gateway_in_front_of(Fault::Hang).await;
    let started = std::time::Instant::now();
    let (status, headers, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(error_code(&body.unwrap()), "gateway_timeout");
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE);
    assert_eq!(closings(&journal), [("release".to_owned(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_is_a_502_and_the_hold_is_released() {
    let gw = gateway_in_front_of(Fault::Reset).await;
    let (status, headers, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    assert_eq!(status, 502);
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(error_code(&body.unwrap()), "bad_gateway");
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE);
    assert_eq!(closings(&journal), [("release".to_owned(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_not_http_is_a_502_and_the_hold_is_released() {
    let gw = gateway_in_front_of(Fault::NotHttp).await;
    let (status, _, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body.unwrap()), "bad_gateway");
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE);
    assert_eq!(closings(&journal), [("release".to_owned(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_body_streams_through_and_is_settled_at_the_hold() {
    let gw = gateway_in_front_of(Fault::GarbageBody).await;
    let (status, _, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    // Success bodies stream through untouched, garbage included.
    assert_eq!(status, 200);
    assert_eq!(&body.unwrap()[..6], b"<html>");
    // No usage reported: the hold is charged, once.
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE - HOLD);
    assert_eq!(closings(&journal), [("settle".to_owned(), HOLD)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_sse_stream_is_settled_once_not_lost() {
    let gw = gateway_in_front_of(Fault::TruncatedSse).await;
    let (status, headers, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(true)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-credits-held"], HOLD.to_string());
    // The client sees the stream break (no clean end) ...
    assert!(body.is_err(), "{body:?}");
    // ... and the hold is charged once (abandoned before a usage: the gateway charges the hold).
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE - HOLD);
    assert_eq!(closings(&journal), [("settle".to_owned(), HOLD)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_within_the_timeout_are_served_and_charged_their_usage() {
    let gw = gateway_in_front_of(Fault::SlowHeaders(Duration::from_millis(400))).await;
    let (status, _, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(body["usage"]["total_tokens"], 8);
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE - USAGE_COST);
    assert_eq!(closings(&journal), [("settle".to_owned(), USAGE_COST)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_past_the_timeout_are_a_504_and_released() {
    let gw = gateway_in_front_of(Fault::SlowHeaders(Duration::from_millis(2_500))).await;
    let (status, _, body) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        KEY,
        Some(chat(false)),
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body.unwrap()), "gateway_timeout");
    let (account, journal) = settled(gw.addr).await;
    assert_eq!(account["balance"], BALANCE);
    assert_eq!(closings(&journal), [("release".to_owned(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_is_charged_the_hold_once() {
    let gw = gateway_in_front_of(Fault::SlowStream).await;
    let addr = gw.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = chat(true);
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Read the headers and the first events, then go away.
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        stream.shutdown(std::net::Shutdown::Both).unwrap();
    })
    .await
    .unwrap();
    let (account, journal) = settled(addr).await;
    assert_eq!(account["balance"], BALANCE - HOLD, "{journal:?}");
    assert_eq!(closings(&journal), [("settle".to_owned(), HOLD)]);
    // Still exactly once a while later (nothing settles it again).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (account, journal) = account_state(addr).await;
    assert_eq!(account["balance"], BALANCE - HOLD);
    assert_eq!(closings(&journal).len(), 1);
}

/// The library chain with the timeout inside `Credits`, under tokio's paused clock: a service
/// that never answers is a 504 in format after exactly the timeout, and the hold is released.
#[tokio::test(start_paused = true)]
async fn a_timeout_inside_credits_releases_the_hold_on_the_paused_clock() {
    use axum::body::Body;
    use tollgate::{
        credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Pricing},
        format::Format,
        normalize::NormalizeLayer,
        Caller,
    };
    use tower::{ServiceBuilder, ServiceExt};

    let ledger = MemoryLedger::new();
    ledger.top_up("acct_1", 100, "seed").await.unwrap();
    let never = tower::service_fn(|_: http::Request<_>| async {
        std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>().await
    });
    let app = ServiceBuilder::new()
        .layer(NormalizeLayer::new().format(Format::Problem))
        .layer(axum::Extension(Caller::builder("key_1", "acct_1").build()))
        .layer(CreditsLayer::new(ledger.clone(), Pricing::flat(7)))
        .timeout(Duration::from_secs(60))
        .service(never);
    let started = tokio::time::Instant::now();
    let response = app
        .oneshot(
            http::Request::get("/v1/models")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert_eq!(response.status(), 504);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "gateway_timeout");
    let balance = ledger.balance("acct_1").await.unwrap();
    assert_eq!((balance.balance, balance.held, balance.holds), (100, 0, 0));
}
