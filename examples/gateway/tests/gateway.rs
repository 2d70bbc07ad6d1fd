//! The gateway example: the binary, its config, proxying a real upstream, admin, metrics,
//! graceful shutdown.

#[path = "support/binary.rs"]
mod binary;
#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/http.rs"]
mod http_client;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use http_client::Http;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[admin]
key = "admin-test-key-0123456789"

[[plans]]
name = "std"
requests_per_minute = 6000
burst = 1000
tokens_per_minute = 1000000

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
key = "sk-test-gateway-0000000000000"
"#;

const KEY: &str = "sk-test-gateway-0000000000000";
const ADMIN: &str = "admin-test-key-0123456789";

impl Http {
    /// A request with a Bearer key, or none.
    async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (u16, http::HeaderMap, Value) {
        let auth: Vec<_> = bearer
            .map(|key| ("authorization", format!("Bearer {key}")))
            .into_iter()
            .collect();
        self.request(method, path, &auth, body).await
    }

    async fn balance(&self, account: &str) -> Value {
        self.call(
            "GET",
            &format!("/admin/accounts/{account}"),
            Some(ADMIN),
            None,
        )
        .await
        .2
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "mock-small", "stream": stream, "stream_options": {"include_usage": true}, "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello there"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_a_real_upstream_and_bills_its_usage() {
    // The "real" upstream: the mock model server on its own port.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(upstream, gateway::upstream::mock(vec!["mock-small".into()]))
            .await
            .unwrap();
    });
    let config = format!("[server]\nupstream = \"http://{upstream_addr}\"\n{CONFIG}");
    let running = gateway::start(&config).await;
    let http = Http::new(running.addr);

    // 3 prompt + 8 completion tokens at 1 credit per token, plus 1 per request: 12 credits.
    let (status, headers, body) = http
        .call("POST", "/v1/chat/completions", Some(KEY), Some(chat(false)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["total_tokens"], 11);
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(http.balance("acct_1").await["balance"], 1000 - 12);

    let (status, headers, body) = http
        .call("POST", "/v1/chat/completions", Some(KEY), Some(chat(true)))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let text = body.as_str().unwrap();
    assert!(
        text.contains("\"usage\":{\"completion_tokens\":8"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    let account = http.balance("acct_1").await;
    assert_eq!(account["balance"], 1000 - 24);
    assert_eq!(account["holds"], 0);

    let (status, _, body) = http.call("GET", "/v1/models", Some(KEY), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["id"], "mock-small");

    // The journal reconciles: top-up, then reserve + settle per call.
    let (_, _, journal) = http
        .call("GET", "/admin/accounts/acct_1/journal", Some(ADMIN), None)
        .await;
    let kinds: Vec<&str> = journal["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["top_up", "reserve", "settle", "reserve", "settle", "reserve", "settle"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_502_and_releases_the_hold() {
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!("[server]\nupstream = \"http://{closed}\"\n{CONFIG}");
    let running = gateway::start(&config).await;
    let http = Http::new(running.addr);
    let (status, headers, body) = http
        .call("POST", "/v1/chat/completions", Some(KEY), Some(chat(false)))
        .await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-should-retry"], "true");
    assert_eq!(body["error"]["code"], "bad_gateway");
    let account = http.balance("acct_1").await;
    assert_eq!(
        (account["balance"].clone(), account["holds"].clone()),
        (json!(1000), json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_and_credits() {
    let running = gateway::start(&format!(
        "[server]\nmetrics_listen = \"127.0.0.1:0\"\n{CONFIG}"
    ))
    .await;
    let http = Http::new(running.addr);
    http.call("POST", "/v1/chat/completions", Some(KEY), Some(chat(false)))
        .await;
    http.call(
        "POST",
        "/v1/chat/completions",
        Some("sk-test-nobody-000000000000"),
        Some(chat(false)),
    )
    .await;
    // On their own listener only (tests/gateway_hardening.rs).
    let metrics = Http::new(running.metrics_addr.unwrap());
    let (status, headers, body) = metrics.call("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = body.as_str().unwrap();
    for needle in [
        "tollgate_requests_total{outcome=\"allowed\",code=\"\"}",
        "tollgate_requests_total{outcome=\"refused\",code=\"invalid_api_key\"}",
        "tollgate_credits_charged_total",
        "tollgate_holds_open",
        "tollgate_upstream_seconds",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_the_demo_key_and_stops_gracefully() {
    // The shipped config keeps its books in `tollgate.db` in the working directory: a temp dir.
    let dir = std::env::temp_dir().join(format!("tollgate-binary-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(binary::example_binary())
        .current_dir(&dir)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml"),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example is built by cargo test");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("tollgate gateway listening on http://")
        .expect(&first)
        .to_owned();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "demo key: sk-demo-tollgate-0123456789abcdef"
    );
    let curl = lines.next().unwrap().unwrap();
    assert!(curl.starts_with(&format!("try: curl -s http://{addr}/v1/chat/completions -H 'Authorization: Bearer sk-demo-tollgate-0123456789abcdef'")), "{curl}");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "storage: sqlite tollgate.db (durable: top-ups and admin changes before their answer, settlements within 50 ms)"
    );
    assert!(dir.join("tollgate.db").is_file(), "created on first start");

    let http = Http::new(addr.parse().unwrap());
    let (status, _, body) = http
        .call(
            "POST",
            "/v1/chat/completions",
            Some("sk-demo-tollgate-0123456789abcdef"),
            Some(chat(false)),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // SIGTERM: the server stops and says so.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(lines.next().unwrap().unwrap(), "tollgate gateway stopped");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_config_stops_startup_naming_field_and_line() {
    let dir = std::env::temp_dir().join(format!("tollgate-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\n\n[[plans]]\nname = \"free\"\nrequests_per_minute = \"lots\"\n").unwrap();
    let output = Command::new(binary::example_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 6: requests_per_minute: invalid type: string \"lots\", expected u32"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));

    let output = Command::new(binary::example_binary())
        .args(["--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot read /nonexistent/tollgate.toml")
    );

    // From the repository's root, where the default `--config examples/gateway.toml` is.
    let output = Command::new(binary::example_binary())
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["--listen", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--listen `nowhere` is not an address")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_streams_finish_and_settle_on_shutdown() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // A slow upstream: four SSE events 50 ms apart, usage in the last one.
    let slow = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            let events = futures_util::stream::unfold(0, |i| async move {
                if i == 4 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let event = if i == 3 {
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":8,\"total_tokens\":11}}\n\ndata: [DONE]\n\n".to_owned()
                } else {
                    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n")
                };
                Some((Ok::<_, std::convert::Infallible>(bytes::Bytes::from(event)), i + 1))
            });
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(events))
                .unwrap()
        }),
    );
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(upstream, slow).await.unwrap() });
    let mut running = gateway::start(&format!(
        "[server]\nupstream = \"http://{upstream_addr}\"\n{CONFIG}"
    ))
    .await;

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(format!("http://{}/v1/chat/completions", running.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::<bytes::Bytes>::new(
            chat(true).to_string().into(),
        ))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // The stream has started; now the server is asked to stop.
    running.shutdown();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.ends_with(b"data: [DONE]\n\n"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Settled at the real usage: 1 + 11 tokens at 1 credit each.
    let admin = http::Request::get("/admin/accounts/acct_1")
        .header("authorization", format!("Bearer {ADMIN}"))
        .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            9,
        ))))
        .body(axum::body::Body::empty())
        .unwrap();
    let res = running.gateway.router().oneshot(admin).await.unwrap();
    let account: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(account["balance"], 1000 - 12);
    assert_eq!(account["holds"], 0);
}

/// A `MakeWriter` that keeps every log line.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn one_log_line_per_request_and_the_real_cost_without_the_key() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let config = tollgate_gateway::config::GatewayConfig::from_toml(CONFIG).unwrap();
    let gateway = gateway::app::Gateway::build(config).await.unwrap();
    let send = |key: &str| {
        http::Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .header("x-request-id", format!("req-log-{}", &key[8..12]))
            .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                9,
            ))))
            .body(axum::body::Body::from(chat(false).to_string()))
            .unwrap()
    };
    let res = gateway.router().oneshot(send(KEY)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    let res = gateway
        .router()
        .oneshot(send("sk-test-unknown-000000000000"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("request_id=req-log-"))
        .collect();
    // The allowed call: its request line, then what it finally cost (3 + 8 tokens + 1 per call).
    let allowed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("req-log-gate"))
        .collect();
    assert_eq!(allowed.len(), 2, "{text}");
    assert!(
        allowed.iter().any(|l| l.contains(" request ")
            && l.contains("status=200")
            && l.contains("key_id=\"key_1\"")
            && l.contains("code=\"-\"")),
        "{text}"
    );
    assert!(
        allowed
            .iter()
            .any(|l| l.contains(" settled ") && l.contains("cost=12")),
        "{text}"
    );
    // The refusal: one line, with its code.
    let refused: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("req-log-unkn"))
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    assert!(
        refused[0].contains("status=401") && refused[0].contains("code=\"invalid_api_key\""),
        "{text}"
    );
    // Never the key.
    assert!(!text.contains("sk-test-"), "{text}");
}
