//! The gateway example against a hostile client: only the configured routes reach the upstream
//! (issue 13 item 2), slow clients are cut off and connections are capped (item 6), one
//! documented header limit answered in format, metrics on their own listener, no secret key in
//! the banner (item 10).

#[path = "support/binary.rs"]
mod binary;
#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/http.rs"]
mod http_client;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use http_body_util::BodyExt;
use http_client::Http;
use serde_json::{json, Value};

const KEY: &str = "sk-test-hardening-000000000000";
const ADMIN: &str = "admin-test-key-0123456789";
const UPSTREAM_KEY: &str = "sk-upstream-operator-secret-0000";

const CONFIG: &str = r#"
[admin]
key = "admin-test-key-0123456789"

[[plans]]
name = "std"
requests_per_minute = 6000
burst = 1000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1000

[[accounts]]
id = "acct_1"
plan = "std"
balance = 1000

[[keys]]
id = "key_1"
account = "acct_1"
key = "sk-test-hardening-000000000000"
"#;

/// What reached the stand-in upstream: method, path and query, `Authorization`.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A real HTTP server standing in for the upstream: records every request and answers like an
/// OpenAI-compatible server (a chat completion with usage; a JSON object for anything else).
async fn recording_upstream() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let record = record.clone();
        async move {
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            let path = request.uri().path_and_query().unwrap().as_str().to_owned();
            record
                .lock()
                .unwrap()
                .push((request.method().to_string(), path.clone(), auth));
            if path == "/v1/chat/completions" {
                axum::Json(json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
            } else {
                axum::Json(json!({"object": "list", "data": [], "upstream_saw": path}))
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

impl Http {
    async fn as_customer(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, http::HeaderMap, Value) {
        self.request(
            method,
            path,
            &[("authorization", format!("Bearer {KEY}"))],
            body,
        )
        .await
    }

    async fn account(&self) -> Value {
        let (status, _, body) = self
            .request(
                "GET",
                "/admin/accounts/acct_1",
                &[("authorization", format!("Bearer {ADMIN}"))],
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn journal_kinds(&self) -> Vec<String> {
        let (_, _, journal) = self
            .request(
                "GET",
                "/admin/accounts/acct_1/journal",
                &[("authorization", format!("Bearer {ADMIN}"))],
                None,
            )
            .await;
        journal["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn openai_error(message: &str, kind: &str, param: Value, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn not_found() -> Value {
    openai_error(
        "The requested endpoint does not exist. Check the base URL and the path.",
        "not_found_error",
        Value::Null,
        "not_found",
    )
}

// ---------------------------------------------------------------------------------------------
// Item 2: only the configured routes reach the upstream.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_routes_reach_the_upstream_with_the_operator_key() {
    let (upstream, seen) = recording_upstream().await;
    let running = gateway::start(&format!(
        "[server]\nupstream = \"http://{upstream}\"\nupstream_key = \"{UPSTREAM_KEY}\"\n{CONFIG}"
    ))
    .await;
    let http = Http::new(running.addr);

    // The five requests of the issue, from a customer key: refused by the gateway itself.
    for (method, path) in [
        ("GET", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/organization/users"),
        ("PUT", "/anything"),
    ] {
        let body = (method != "GET").then(|| json!({"model": "mock-small"}));
        let (status, headers, body) = http.as_customer(method, path, body).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(body, not_found(), "{method} {path}");
        assert!(headers.contains_key("x-request-id"), "{method} {path}");
    }
    let (status, headers, body) = http.as_customer("DELETE", "/v1/models/x", None).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(headers["allow"], "GET");
    assert_eq!(
        body,
        openai_error(
            "This endpoint does not support the request method.",
            "invalid_request_error",
            Value::Null,
            "method_not_allowed"
        )
    );
    // GET does not imply HEAD; a listed path with another method lists what it allows.
    let (status, headers, _) = http.as_customer("HEAD", "/v1/models", None).await;
    assert_eq!((status, &headers["allow"]), (405, &"GET".parse().unwrap()));
    let (status, headers, _) = http.as_customer("GET", "/v1/chat/completions", None).await;
    assert_eq!((status, &headers["allow"]), (405, &"POST".parse().unwrap()));
    // Paths an upstream could read as another one never match a route.
    for path in [
        "/v1/models/..%2Ffiles",
        "/v1/models/%2e%2e",
        "/v1/models/..",
        "/v1/models/",
        "/v1//models",
        "/v1/models/a/b",
        "/v1/chat/completions/",
    ] {
        let (status, _, body) = http.as_customer("GET", path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body, not_found(), "{path}");
    }
    // Without a key too: nothing is forwarded, nothing is charged.
    let (status, _, _) = http.request("GET", "/v1/files", &[], None).await;
    assert_eq!(status, 404);
    assert_eq!(*seen.lock().unwrap(), []);
    assert_eq!(http.journal_kinds().await, ["top_up"]);

    // A listed route is forwarded with the operator's key, never the customer's.
    let (status, _, body) = http
        .as_customer(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "mock-small", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http
        .as_customer("GET", "/v1/models/mock-small?x=1", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let upstream_auth = Some(format!("Bearer {UPSTREAM_KEY}"));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (
                "POST".to_owned(),
                "/v1/chat/completions".to_owned(),
                upstream_auth.clone()
            ),
            (
                "GET".to_owned(),
                "/v1/models/mock-small?x=1".to_owned(),
                upstream_auth
            ),
        ]
    );
    // 1 per request + 5 tokens at 1 credit each; the model listing is free.
    let account = http.account().await;
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(994), json!(0))
    );
    assert_eq!(
        http.journal_kinds().await,
        ["top_up", "reserve", "settle", "reserve", "settle"]
    );

    // A route billed by model: a body naming no model is refused before the upstream.
    let (status, _, body) = http
        .as_customer(
            "POST",
            "/v1/chat/completions",
            Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body,
        openai_error(
            "This endpoint is billed by model: the JSON body must name a `model`.",
            "invalid_request_error",
            json!("model"),
            "bad_request"
        )
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(http.account().await["balance"], 994);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_routes_replace_the_defaults_and_carry_their_price() {
    let (upstream, seen) = recording_upstream().await;
    let running = gateway::start(&format!(
        r#"[server]
upstream = "http://{upstream}"
error_format = "problem"
{CONFIG}
[[routes]]
method = "POST"
path = "/v1/audio/speech"
credits_per_request = 7

[[routes]]
method = "GET"
path = "/v1/models"
price = "free"
"#
    ))
    .await;
    let http = Http::new(running.addr);

    // Not listed any more: a default route is refused, in the configured format.
    let (status, headers, body) = http
        .as_customer(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "mock-small"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["status"], 404);
    let (status, headers, body) = http.as_customer("POST", "/v1/models", None).await;
    assert_eq!((status, &headers["allow"]), (405, &"GET".parse().unwrap()));
    assert_eq!(body["code"], "method_not_allowed");

    // The priced route costs its price, the free one nothing.
    let (status, _, _) = http
        .as_customer("POST", "/v1/audio/speech", Some(json!({"input": "hello"})))
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = http.as_customer("GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(paths, ["/v1/audio/speech", "/v1/models"]);
    assert_eq!(http.account().await["balance"], 1000 - 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_upstream_serves_every_default_route_and_nothing_else() {
    // An embeddings request names no max_tokens: its hold assumes the default 4096 tokens.
    let running = gateway::start(&CONFIG.replace("balance = 1000", "balance = 10000")).await;
    let http = Http::new(running.addr);
    let (status, _, body) = http
        .as_customer(
            "POST",
            "/v1/embeddings",
            Some(json!({"model": "mock-small", "input": "twelve chars"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let (status, _, body) = http
        .as_customer(
            "POST",
            "/v1/completions",
            Some(json!({"model": "mock-small", "prompt": "Say hi", "max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["total_tokens"], 4);
    let (status, _, body) = http.as_customer("GET", "/v1/models/mock-small", None).await;
    assert_eq!((status, body["id"].clone()), (200, json!("mock-small")));
    let (status, _, body) = http.as_customer("GET", "/v1/files", None).await;
    assert_eq!((status, body), (404, not_found()));
    // 1 + 3 tokens, then 1 + 4 tokens (1 credit per token).
    assert_eq!(http.account().await["balance"], 10000 - 4 - 5);
}

// ---------------------------------------------------------------------------------------------
// Item 10: one header limit, answered in format; metrics on their own listener.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_header_limit_for_http1_and_http2_answered_in_format() {
    let running = gateway::start(CONFIG).await;
    for http2 in [false, true] {
        let http = Http::with(running.addr, http2);
        let auth = ("authorization", format!("Bearer {KEY}"));
        // Just under 64 KiB: served on both protocols (HTTP/2 refused 16 KiB before).
        let big = ("x-big", "b".repeat(60_000));
        let (status, _, body) = http
            .request("GET", "/v1/models", &[auth.clone(), big], None)
            .await;
        assert_eq!(status, 200, "http2={http2}: {body}");

        // Over it: a 431 in format, with a request id.
        let huge = ("x-big", "b".repeat(70_000));
        let (status, headers, body) = http
            .request("GET", "/v1/models", &[auth.clone(), huge], None)
            .await;
        assert_eq!(status, 431, "http2={http2}: {body}");
        assert!(headers.contains_key("x-request-id"), "http2={http2}");
        assert_eq!(body["error"]["code"], "bad_request", "http2={http2}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("The request's header section is ")
                && message.ends_with(" bytes; at most 65536 are accepted (the request target, and per field its name, its value and 32)."),
            "{message}"
        );

        // Too many fields: a 431 in format.
        let many: Vec<(&str, String)> = (0..120)
            .map(|i| {
                (
                    ["x-a", "x-b", "x-c", "x-d", "x-e", "x-f"][i % 6],
                    i.to_string(),
                )
            })
            .chain([auth.clone()])
            .collect();
        let (status, headers, body) = http.request("GET", "/v1/models", &many, None).await;
        assert_eq!(status, 431, "http2={http2}: {body}");
        assert!(headers.contains_key("x-request-id"));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("The request has 12")
                && message.ends_with(" header fields; at most 100 are accepted."),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_only_on_their_own_listener() {
    let running = gateway::start(&format!(
        "[server]\nmetrics_listen = \"127.0.0.1:0\"\n{CONFIG}"
    ))
    .await;
    let http = Http::new(running.addr);
    let (status, _, body) = http.request("GET", "/metrics", &[], None).await;
    assert_eq!((status, body), (404, not_found()));
    let (status, _, body) = http.as_customer("GET", "/metrics", None).await;
    assert_eq!((status, body), (404, not_found()));

    let metrics = Http::new(running.metrics_addr.expect("metrics_listen is set"));
    let (status, headers, body) = metrics.request("GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        body.as_str().unwrap().contains("tollgate_holds_open"),
        "{body}"
    );
    // Nothing else there.
    let (status, _, _) = metrics.as_customer("GET", "/v1/models", None).await;
    assert_eq!(status, 404);

    // Without metrics_listen: no metrics anywhere.
    let plain = gateway::start(CONFIG).await;
    assert!(plain.metrics_addr.is_none());
    let (status, _, _) = Http::new(plain.addr)
        .request("GET", "/metrics", &[], None)
        .await;
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------------
// The binary: the banner, slow clients, the connection cap.
// ---------------------------------------------------------------------------------------------

/// The gateway binary on a config; stopped (SIGKILL) when dropped.
struct Binary {
    child: Child,
    addr: SocketAddr,
    stdout: Vec<String>,
}

impl Binary {
    fn start(name: &str, toml: &str) -> Binary {
        let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(binary::example_binary())
            // A relative storage path (the shipped config's `tollgate.db`) lands here, not in
            // the repository.
            .current_dir(&dir)
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let addr = loop {
            let line = lines.next().expect("the gateway starts").unwrap();
            stdout.push(line.clone());
            if let Some(addr) = line.strip_prefix("tollgate gateway listening on http://") {
                break addr.parse().unwrap();
            }
        };
        // The banner is the next line; the rest is drained so that a write never fails.
        stdout.push(lines.next().unwrap().unwrap());
        std::thread::spawn(move || lines.for_each(drop));
        Binary {
            child,
            addr,
            stdout,
        }
    }

    /// The sockets the process has open.
    #[cfg(target_os = "linux")]
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_banner_prints_a_key_id_never_a_secret_key() {
    let binary = Binary::start("banner", CONFIG);
    assert_eq!(
        binary.stdout,
        [
            format!("tollgate gateway listening on http://{}", binary.addr),
            "first active key: key_1 (keys are never printed)".to_owned(),
        ]
    );
    drop(binary);
    // The shipped demo config's key is public: it is printed (tests/gateway.rs checks the lines).
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml")).unwrap();
    let demo = Binary::start("banner-demo", &shipped);
    assert_eq!(
        demo.stdout[1],
        "demo key: sk-demo-tollgate-0123456789abcdef"
    );
}

const SLOW: &str =
    "[server]\nheader_read_timeout_secs = 1\nbody_read_timeout_secs = 1\nmax_connections = 4\n";

/// Read until the server closes the connection or `limit` passes: what was read, and when.
fn read_until_closed(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> (String, Option<Duration>) {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(started.elapsed()),
                )
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(started.elapsed()),
                )
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), None)
}

#[test]
fn a_header_sent_a_byte_at_a_time_is_cut_at_the_bound() {
    let binary = Binary::start("slow-header", &format!("{SLOW}{CONFIG}"));
    let addr = binary.addr;
    // A slowloris: a header byte every 100 ms, forever (40 bytes take 4 s).
    let trickler = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        let request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa";
        for byte in request {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    });
    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let (text, closed) = read_until_closed(&mut silent, started, Duration::from_secs(5));
    let closed = closed.expect("a silent connection is closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    assert_eq!(text, "");
    // The trickler's writes fail once the server has closed (well before its 4 s).
    let wrote_for = trickler.join().unwrap();
    assert!(
        wrote_for < Duration::from_millis(3000),
        "wrote for {wrote_for:?}"
    );

    // A normal client is served.
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n").unwrap();
    let (text, _) = read_until_closed(&mut stream, Instant::now(), Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
}

#[test]
fn a_stalled_or_trickling_body_is_a_408_in_format_and_nothing_is_held() {
    let binary = Binary::start("slow-body", &format!("{SLOW}{CONFIG}"));
    let addr = binary.addr;
    let body = json!({"model": "mock-small", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}).to_string();
    for trickle in [false, true] {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let started = Instant::now();
        stream.write_all(&body.as_bytes()[..10]).unwrap();
        if trickle {
            // One byte every 150 ms: the whole body would take 10 s.
            let mut writer = stream.try_clone().unwrap();
            let rest = body.as_bytes()[10..].to_vec();
            std::thread::spawn(move || {
                for byte in rest {
                    if writer.write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(150));
                }
            });
        }
        let (text, closed) = read_until_closed(&mut stream, started, Duration::from_secs(5));
        let closed = closed.expect("the connection is closed after the 408");
        assert!(
            closed >= Duration::from_millis(900) && closed < Duration::from_millis(2500),
            "trickle={trickle}: {closed:?}"
        );
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 Request Timeout"), "{text}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("\r\nx-request-id: req_"), "{text}");
        assert!(head.contains("\r\nconnection: close"), "{text}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            openai_error(
                "The request body was not received within 1 s.",
                "invalid_request_error",
                Value::Null,
                "bad_request"
            )
        );
    }
    // Nothing was held or charged.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let account = runtime.block_on(Http::new(addr).account());
    assert_eq!(
        (
            account["balance"].clone(),
            account["held"].clone(),
            account["holds"].clone()
        ),
        (json!(1000), json!(0), json!(0))
    );
}

#[test]
#[cfg(target_os = "linux")] // counts the process's sockets in /proc
fn the_connection_cap_holds_and_other_clients_are_still_served() {
    let binary = Binary::start("cap", &format!("{SLOW}{CONFIG}"));
    let addr = binary.addr;
    let baseline = binary.sockets();
    // A client inside a request (its headers sent, its body stalled): never evicted, it gets
    // its 408.
    let mut busy = TcpStream::connect(addr).unwrap();
    write!(busy, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Twelve clients that never send a byte: three times the cap.
    let silent: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut most = binary.sockets();
    // A real client behind them: it takes the slot of the oldest connection that has not sent
    // a request, well before the 1 s header bound would free one.
    let client = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        write!(stream, "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n").unwrap();
        let (text, _) = read_until_closed(&mut stream, started, Duration::from_secs(10));
        (text, started.elapsed())
    });
    while !client.is_finished() {
        most = most.max(binary.sockets());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (text, took) = client.join().unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(took < Duration::from_millis(800), "served after {took:?}");
    // The cap, plus at most the one connection being admitted.
    assert!(
        most <= baseline + 4 + 1,
        "{most} sockets open with a cap of 4 (baseline {baseline})"
    );
    let (text, _) = read_until_closed(&mut busy, Instant::now(), Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 408 Request Timeout"), "{text}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_body_is_a_408_in_format_too() {
    let running = gateway::start(&format!("[server]\nbody_read_timeout_secs = 1\n{CONFIG}")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Ten bytes of the body, then nothing (the stream never ends).
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
        http_body::Frame::data(bytes::Bytes::from_static(b"{\"model\":\"")),
    )])
    .chain(futures_util::stream::pending());
    let request = http::Request::post(format!("http://{}/v1/chat/completions", running.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(frames))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 408);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        body,
        openai_error(
            "The request body was not received within 1 s.",
            "invalid_request_error",
            Value::Null,
            "bad_request"
        )
    );
    let account = Http::new(running.addr).account().await;
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(1000), json!(0))
    );
}

#[test]
#[cfg(unix)]
fn a_connection_cap_above_the_file_limit_stops_startup() {
    let dir = std::env::temp_dir().join(format!("tollgate-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, format!("[server]\nmax_connections = 5000\n{CONFIG}")).unwrap();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n 1024 && exec '{}' --config '{}' --listen 127.0.0.1:0",
            binary::example_binary().display(),
            path.display()
        ))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: server.max_connections = 5000 is not below the open-file limit (1024 less 64 for listeners, logs and backends): lower it or raise `ulimit -n`\n"
    );
    assert!(output.stdout.is_empty());
}
