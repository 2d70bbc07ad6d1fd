//! Bad input against the whole gateway chain (the gateway example): thousands of generated
//! malformed requests — broken and duplicated `Authorization`, non-UTF-8 and non-ASCII header
//! bytes, huge headers, malformed forwarding headers, invalid JSON and wrong JSON types, oversized
//! bodies, wrong content types, unknown methods and paths — in each error format. Each one gets
//! the right 4xx in the configured format with an `x-request-id`; never a 5xx, never a panic;
//! the balance is untouched afterwards. A second part sends raw bytes over a real socket.

#[path = "support/gateway.rs"]
mod gateway;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
};

use axum::{body::Body, extract::ConnectInfo, Router};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    format::Envelope,
    ip::{ClientIpResolver, IpSet},
    Reason, Rejection,
};
use tower::ServiceExt;

const KEY: &str = "sk-bad-input-0123456789abcdefghij";
/// A key usable only from 198.51.100.0/24.
const KEY_IP: &str = "sk-bad-input-ip-only-0123456789ab";
const ADMIN: &str = "admin-bad-input-0123456789";
const BALANCE: u64 = 1_000;
const MAX_BODY: usize = 64 * 1024;
/// Generated requests per error format.
const CASES: usize = 1_500;

fn config(format: &str) -> String {
    format!(
        r#"
[server]
error_format = "{format}"
trusted_proxies = ["10.0.0.0/8"]
max_body_bytes = {MAX_BODY}

[admin]
key = "{ADMIN}"

[[plans]]
name = "std"
requests_per_minute = 1000000
burst = 1000000
tokens_per_minute = 1000000000
models = ["mock-small"]

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 2

[[models]]
id = "mock-large"
credits_per_request = 5
credits_per_1k_tokens = 10

[[accounts]]
id = "acct_1"
plan = "std"
balance = {BALANCE}

[[keys]]
id = "key_1"
account = "acct_1"
key = "{KEY}"

[[keys]]
id = "key_ip"
account = "acct_1"
key = "{KEY_IP}"
ip_allowlist = ["198.51.100.0/24"]
"#
    )
}

/// A small deterministic generator (xorshift64*): the same thousands of cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// Bytes a header value may hold: visible ASCII, space, tab and obs-text (0x80-0xFF).
    fn header_bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| loop {
                let b = self.next() as u8;
                if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 {
                    break b;
                }
            })
            .collect()
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// One generated request and the refusals (or success) it may get.
struct Case {
    what: &'static str,
    request: Request<Body>,
    /// `None`: a success (a free request: `GET /v1/models`).
    expected: Option<Vec<Reason>>,
}

fn valid_chat() -> Value {
    json!({"model": "mock-small", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello"}]})
}

fn with_peer(mut request: Request<Body>, peer: IpAddr) -> Request<Body> {
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(peer, 40_000)));
    request
}

/// Headers full of non-UTF-8 and non-ASCII bytes that must change nothing.
fn noise(rng: &mut Rng, mut builder: http::request::Builder) -> http::request::Builder {
    for _ in 0..rng.below(4) {
        let name = *rng.pick(&[
            "user-agent",
            "accept",
            "x-request-id",
            "x-custom",
            "accept-language",
            "openai-organization",
        ]);
        let len = rng.below(64);
        let value = HeaderValue::from_bytes(&rng.header_bytes(len)).unwrap();
        builder = builder.header(name, value);
    }
    builder
}

fn generate(rng: &mut Rng, n: usize) -> Case {
    let peer: IpAddr = format!("203.0.{}.{}", (n / 250) % 250, n % 250 + 1)
        .parse()
        .unwrap();
    let auth = format!("Bearer {KEY}");
    let chat_body = || Body::from(valid_chat().to_string());
    match n % 8 {
        // Broken, duplicated, huge, non-ASCII Authorization headers; no key.
        0 => {
            // Routes, and (checked before the key) a path that is none: 404 whatever the key.
            let (method, path) = rng
                .pick(&[
                    (Method::POST, "/v1/chat/completions"),
                    (Method::GET, "/v1/models"),
                    (Method::GET, "/v2/nothing"),
                    (Method::POST, "/v2/nothing"),
                ])
                .clone();
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json");
            let values: Vec<Vec<u8>> = match rng.below(8) {
                0 => vec![],
                1 => {
                    let len = rng.below(200);
                    vec![rng.header_bytes(len)]
                }
                2 => {
                    let len = rng.below(80);
                    vec![[b"Bearer ".as_slice(), &rng.header_bytes(len)].concat()]
                }
                3 => vec![auth.clone().into_bytes(); 2 + rng.below(2)],
                4 => vec![auth.clone().into_bytes(), b"Bearer sk-other".to_vec()],
                5 => {
                    let len = 1_025 + rng.below(60_000);
                    vec![format!("Bearer {}", "k".repeat(len)).into_bytes()]
                }
                6 => vec![rng
                    .pick(&[
                        format!("Bearer  {KEY}"),
                        format!("Bearer {KEY} "),
                        format!("Bearer\t{KEY}"),
                        format!("Basic {KEY}"),
                        format!("Token {KEY}"),
                        KEY.to_owned(),
                        "Bearer".to_owned(),
                        "Bearer ".to_owned(),
                        String::new(),
                        format!("Bearer {}é", &KEY[..10]),
                    ])
                    .clone()
                    .into_bytes()],
                _ => {
                    // The key with a non-ASCII byte in its middle.
                    let mut key = KEY.as_bytes().to_vec();
                    let at = rng.below(key.len());
                    key[at] = 0x80 + rng.below(0x80) as u8;
                    vec![[b"Bearer ".as_slice(), &key].concat()]
                }
            };
            for v in &values {
                builder = builder.header("authorization", HeaderValue::from_bytes(v).unwrap());
            }
            // The x-api-key header is not a source in this gateway: it changes nothing.
            if rng.chance(20) {
                builder = builder.header("x-api-key", KEY);
            }
            let builder = noise(rng, builder);
            Case {
                what: "bad authorization",
                request: with_peer(builder.body(chat_body()).unwrap(), peer),
                expected: Some(if path == "/v2/nothing" {
                    vec![Reason::NotFound]
                } else {
                    vec![
                        Reason::MissingApiKey,
                        Reason::MalformedApiKey,
                        Reason::ApiKeyWhitespace,
                        Reason::InvalidApiKey,
                    ]
                }),
            }
        }
        // Non-UTF-8 / non-ASCII bytes in other headers of a free, valid request: a success.
        1 => {
            let mut builder = Request::get("/v1/models").header("authorization", &auth);
            builder = noise(rng, builder);
            let len = rng.below(40);
            builder = builder.header(
                "x-request-id",
                HeaderValue::from_bytes(&rng.header_bytes(len)).unwrap(),
            );
            Case {
                what: "non-ASCII headers",
                request: with_peer(builder.body(Body::empty()).unwrap(), peer),
                expected: None,
            }
        }
        // Malformed forwarding headers, from a trusted proxy or not, for an IP-restricted key.
        2 => {
            let from_proxy = rng.chance(70);
            let peer: IpAddr = if from_proxy {
                "10.0.0.1".parse().unwrap()
            } else {
                peer
            };
            let parts = [
                "198.51.100.9",
                "10.0.0.2",
                "203.0.113.5",
                "unknown",
                "[2001:db8::1]:80",
                "for=198.51.100.9",
                "198.51.100.9:99999",
                "::ffff:198.51.100.9",
                "",
                " ",
                "999.1.1.1",
                "198.51.100",
                "\"198.51.100.9\"",
                "_hidden",
            ];
            let mut value = Vec::new();
            for i in 0..1 + rng.below(5) {
                if i > 0 {
                    value.push(*rng.pick(b",; "));
                }
                if rng.chance(15) {
                    let len = rng.below(10);
                    value.extend(rng.header_bytes(len));
                } else {
                    value.extend(rng.pick(&parts).as_bytes());
                }
            }
            let header = *rng.pick(&["x-forwarded-for", "forwarded", "x-real-ip"]);
            let mut builder =
                Request::get("/v1/models").header("authorization", format!("Bearer {KEY_IP}"));
            let value = HeaderValue::from_bytes(&value).unwrap();
            builder = builder.header(header, value.clone());
            if rng.chance(20) {
                builder = builder.header(header, "198.51.100.9");
            }
            let request = with_peer(builder.body(Body::empty()).unwrap(), peer);
            // The oracle: the resolver (property-tested on its own) with the gateway's proxies.
            let resolver = ClientIpResolver::new().trust_proxies("10.0.0.0/8".parse().unwrap());
            let client = resolver.resolve_from(peer, request.headers());
            let allowed: IpSet = "198.51.100.0/24".parse().unwrap();
            Case {
                what: "forwarding headers",
                request,
                expected: if allowed.contains(client) {
                    None
                } else {
                    Some(vec![Reason::IpNotAllowed])
                },
            }
        }
        // Invalid JSON and wrong JSON types.
        3 => {
            let full = valid_chat().to_string();
            let (body, expected) = match rng.below(6) {
                0 => {
                    let cut = rng.below(full.len());
                    (
                        full[..cut].to_owned().into_bytes(),
                        vec![Reason::InvalidJson],
                    )
                }
                1 => {
                    let len = 1 + rng.below(100);
                    (
                        rng.bytes(len),
                        vec![Reason::InvalidJson, Reason::BadRequest],
                    )
                }
                2 => {
                    let field =
                        *rng.pick(&["model", "max_tokens", "max_completion_tokens", "stream"]);
                    let wrong = match field {
                        "model" => [json!([]), json!({}), json!(-1), json!(1.5), json!(true)],
                        "stream" => [json!([]), json!({}), json!(-1), json!(1.5), json!("yes")],
                        _ => [json!([]), json!({}), json!(-1), json!(1.5), json!("many")],
                    };
                    let mut body = valid_chat();
                    body[field] = rng.pick(&wrong).clone();
                    (body.to_string().into_bytes(), vec![Reason::BadRequest])
                }
                3 => (
                    rng.pick(&["[]", "1", "\"text\"", "null", "true"])
                        .as_bytes()
                        .to_vec(),
                    vec![Reason::BadRequest],
                ),
                4 => {
                    let mut body = valid_chat();
                    let len = 1 + rng.below(20);
                    body["model"] = String::from_utf8_lossy(&rng.header_bytes(len))
                        .into_owned()
                        .into();
                    (body.to_string().into_bytes(), vec![Reason::ModelNotFound])
                }
                _ => {
                    let mut body = valid_chat();
                    body["model"] = "mock-large".into();
                    (body.to_string().into_bytes(), vec![Reason::ModelNotAllowed])
                }
            };
            let builder = Request::post("/v1/chat/completions")
                .header("authorization", &auth)
                .header(
                    "content-type",
                    *rng.pick(&["application/json", "application/json; charset=utf-8"]),
                );
            let builder = noise(rng, builder);
            Case {
                what: "bad json",
                request: with_peer(builder.body(Body::from(body)).unwrap(), peer),
                expected: Some(expected),
            }
        }
        // Oversized bodies: declared, undeclared, streamed, lying.
        4 => {
            let size = MAX_BODY + 1 + rng.below(3 * MAX_BODY);
            let mut payload =
                br#"{"model":"mock-small","messages":[{"role":"user","content":""#.to_vec();
            payload.resize(size, b'a');
            let builder = Request::post("/v1/chat/completions")
                .header("authorization", &auth)
                .header("content-type", "application/json");
            let request = match rng.below(4) {
                0 => builder
                    .header("content-length", payload.len())
                    .body(Body::from(payload)),
                1 => builder.body(Body::from(payload)),
                2 => {
                    let chunks: Vec<Result<Bytes, std::io::Error>> = payload
                        .chunks(4096)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    builder.body(Body::from_stream(futures_util::stream::iter(chunks)))
                }
                _ => builder
                    .header("content-length", u64::MAX.to_string())
                    .body(Body::from(valid_chat().to_string())),
            };
            Case {
                what: "oversized body",
                request: with_peer(request.unwrap(), peer),
                expected: Some(vec![Reason::PayloadTooLarge]),
            }
        }
        // Wrong content types: a JSON body the chain must not price or check blindly.
        5 => {
            let mut body = valid_chat();
            body["model"] = "mock-large".into();
            let content_type: Option<Vec<u8>> = match rng.below(6) {
                0 => Some(b"text/plain".to_vec()),
                1 => Some(b"application/x-www-form-urlencoded".to_vec()),
                2 => Some(b"multipart/form-data; boundary=xyz".to_vec()),
                3 => Some(b"application/xml".to_vec()),
                4 => {
                    let len = rng.below(30);
                    Some(rng.header_bytes(len))
                }
                _ => Some(b"application/jsonx".to_vec()),
            };
            let mut builder = Request::post("/v1/chat/completions").header("authorization", &auth);
            if let Some(ct) = content_type {
                builder = builder.header("content-type", HeaderValue::from_bytes(&ct).unwrap());
            }
            Case {
                what: "wrong content type",
                request: with_peer(builder.body(Body::from(body.to_string())).unwrap(), peer),
                expected: Some(vec![Reason::UnsupportedMediaType]),
            }
        }
        // Unknown paths.
        6 => {
            let path = match rng.below(5) {
                0 => "/v2/chat/completions".to_owned(),
                1 => "/v1/chat/completions/extra".to_owned(),
                2 => format!("/{}", "a/".repeat(1 + rng.below(2_000))),
                3 => format!("/v1/%{:02X}%FF%00/x", rng.below(256)),
                _ => format!("/v1/models/../../{}", rng.below(1000)),
            };
            let method = rng
                .pick(&[Method::GET, Method::DELETE, Method::POST])
                .clone();
            let builder = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", &auth)
                .header("content-type", "application/json");
            Case {
                what: "unknown path",
                request: with_peer(builder.body(chat_body()).unwrap(), peer),
                expected: Some(vec![Reason::NotFound]),
            }
        }
        // Unknown and wrong methods on known paths.
        _ => {
            let (path, method) = if rng.chance(50) {
                let m = rng.pick(&["GET", "PUT", "DELETE", "PATCH", "FOO", "PROPFIND", "TRACE"]);
                (
                    "/v1/chat/completions",
                    Method::from_bytes(m.as_bytes()).unwrap(),
                )
            } else {
                let m = rng.pick(&["POST", "PUT", "DELETE", "BREW", "CONNECTX"]);
                ("/v1/models", Method::from_bytes(m.as_bytes()).unwrap())
            };
            let builder = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", &auth)
                .header("content-type", "application/json");
            Case {
                what: "wrong method",
                request: with_peer(builder.body(chat_body()).unwrap(), peer),
                expected: Some(vec![Reason::MethodNotAllowed]),
            }
        }
    }
}

/// The machine code and the status a refusal for `reason` has in `format`.
fn rendered(format: &str, reason: Reason) -> (StatusCode, String) {
    let rejection = Rejection::new(reason);
    match format {
        "envelope" => {
            let (code, status) = Envelope::code_and_status(&rejection);
            (status, code)
        }
        _ => (rejection.status(), reason.code().to_owned()),
    }
}

/// The machine code of an error body in `format`, checking its shape on the way.
fn code_of(format: &str, status: StatusCode, content_type: &str, body: &Value) -> String {
    match format {
        "openai" => {
            assert!(
                content_type.starts_with("application/json"),
                "{content_type}"
            );
            assert!(body["error"]["message"].is_string(), "{body}");
            assert!(body["error"]["type"].is_string(), "{body}");
            body["error"]["code"]
                .as_str()
                .expect("error.code")
                .to_owned()
        }
        "envelope" => {
            assert!(
                content_type.starts_with("application/json"),
                "{content_type}"
            );
            assert_eq!(body["success"], false, "{body}");
            assert_eq!(body["statusCode"], status.as_u16(), "{body}");
            assert!(body["error"]["message"].is_string(), "{body}");
            body["error"]["code"]
                .as_str()
                .expect("error.code")
                .to_owned()
        }
        "problem" => {
            assert_eq!(content_type, "application/problem+json");
            assert_eq!(body["status"], status.as_u16(), "{body}");
            assert!(
                body["title"].is_string() && body["detail"].is_string(),
                "{body}"
            );
            assert!(body["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:tollgate:error:"));
            body["code"].as_str().expect("code").to_owned()
        }
        other => unreachable!("{other}"),
    }
}

async fn balance(app: &Router) -> Value {
    let request = Request::get("/admin/accounts/acct_1")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(Body::empty())
        .unwrap();
    let request = with_peer(request, "127.0.0.1".parse().unwrap());
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

async fn run_suite(format: &str, seed: u64) {
    let config = tollgate_gateway::config::GatewayConfig::from_toml(&config(format)).unwrap();
    let gateway = gateway::app::Gateway::build(config).await.unwrap();
    let app = gateway.router();
    let mut rng = Rng(seed);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for n in 0..CASES {
        let case = generate(&mut rng, n);
        let what = case.what;
        let method = case.request.method().clone();
        let uri = case.request.uri().clone();
        let response = app.clone().oneshot(case.request).await.unwrap();
        let status = response.status();
        let context = format!("#{n} {what}: {method} {uri} → {status}");
        assert!(!status.is_server_error(), "{context}: a 5xx");
        let id = response
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{context}: no x-request-id"));
        assert!(
            !id.is_empty() && id.as_bytes().iter().all(|b| b.is_ascii_graphic()),
            "{context}: x-request-id {id:?}"
        );
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        match case.expected {
            None => assert_eq!(status, StatusCode::OK, "{context}: {bytes:?}"),
            Some(reasons) => {
                assert!(status.is_client_error(), "{context}: {bytes:?}");
                let body: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| panic!("{context}: body is not JSON: {bytes:?}"));
                let code = code_of(format, status, &content_type, &body);
                let ok = reasons
                    .iter()
                    .any(|r| rendered(format, *r) == (status, code.clone()));
                assert!(
                    ok,
                    "{context}: code {code}, expected one of {reasons:?}: {body}"
                );
                // No key text is ever echoed.
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(&KEY[8..]),
                    "{context}: key echoed"
                );
                *seen.entry(format!("{what}: {status} {code}")).or_default() += 1;
            }
        }
    }
    // Balances untouched: every request was refused or free; no hold is left open.
    let account = balance(&app).await;
    assert_eq!(account["balance"], BALANCE, "{account}");
    assert_eq!(account["held"], 0, "{account}");
    assert_eq!(account["holds"], 0, "{account}");
    eprintln!("{format}: {CASES} cases: {seen:#?}");
}

#[tokio::test]
async fn generated_bad_input_openai_format() {
    run_suite("openai", 0x0DDB_A115_EED0).await;
}

#[tokio::test]
async fn generated_bad_input_envelope_format() {
    run_suite("envelope", 0xBAD_1DEA).await;
}

#[tokio::test]
async fn generated_bad_input_problem_format() {
    run_suite("problem", 0xC0FFEE).await;
}

// ---------------------------------------------------------------------------------------------
// Raw bytes over a real socket: what no `http::Request` can hold.
// ---------------------------------------------------------------------------------------------

/// Send raw bytes, read the whole answer (the server closes or answers `Connection: close`).
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The server may answer (and close) before it has read everything we send.
    let _ = stream.write_all(request);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bytes_over_a_socket_are_4xx_and_the_server_survives() {
    let running = gateway::start(&config("openai")).await;
    let addr = running.addr;
    tokio::task::spawn_blocking(move || {
        let head = |extra: &[u8]| {
            [
                b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".as_slice(),
                extra,
                b"\r\n",
            ]
            .concat()
        };
        // Non-UTF-8 bytes in the key: refused by the chain, in format, with a request id.
        let (status, text) = raw(addr, &head(b"Authorization: Bearer sk-\xff\xfe\x80\r\n"));
        assert_eq!(status, 401, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("x-request-id:"),
            "{text}"
        );
        assert!(text.contains("\"malformed_api_key\""), "{text}");

        // A NUL or a bare CR in a header value, a header without a colon, a request line that
        // is not HTTP, a header section over hyper's limit: hyper refuses them before any
        // service runs (400 / 431, connection closed). Never a 5xx.
        let cases: Vec<Vec<u8>> = vec![
            head(b"Authorization: Bearer sk-\x00abc\r\n"),
            head(b"X-Thing: a\rb\r\n"),
            head(b"NoColonHere\r\n"),
            b"\xff\xfe GARBAGE \x00\r\n\r\n".to_vec(),
            head(format!("X-Huge: {}\r\n", "a".repeat(1 << 20)).as_bytes()),
            head(&b"X-Many: 1\r\n".repeat(500)),
        ];
        for case in cases {
            let (status, text) = raw(addr, &case);
            assert!(
                (400..500).contains(&status),
                "{status} for {:?}: {text}",
                String::from_utf8_lossy(&case[..case.len().min(60)])
            );
        }

        // A big but legal header reaches the chain: a 401 in format.
        let (status, text) = raw(
            addr,
            &head(format!("Authorization: Bearer {}\r\n", "k".repeat(60_000)).as_bytes()),
        );
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("\"malformed_api_key\""), "{text}");

        // And the server still answers a good request.
        let (status, text) = raw(
            addr,
            &head(format!("Authorization: Bearer {KEY}\r\n").as_bytes()),
        );
        assert_eq!(status, 200, "{text}");
    })
    .await
    .unwrap();
    drop(running);
}

/// The credits layer alone: a body it cannot read is not priced at the default (free) price
/// when the price depends on the model; a route price needs no body.
#[tokio::test]
async fn credits_refuse_an_unreadable_body_they_would_have_to_price() {
    use tollgate::{
        credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Price, Pricing},
        Caller,
    };
    let ledger = MemoryLedger::new();
    ledger.top_up("acct_1", 100, "seed").await.unwrap();
    let pricing = Pricing::new()
        .model("big", Price::flat(50))
        .route("/v1/audio/transcriptions", Price::flat(3));
    let app = Router::new()
        .fallback(|| async { "served" })
        .layer(CreditsLayer::new(ledger.clone(), pricing))
        .layer(axum::Extension(Caller::builder("key_1", "acct_1").build()));
    let post = |path: &str, content_type: &str| {
        Request::post(path)
            .header("content-type", content_type)
            .body(Body::from(r#"{"model":"big"}"#))
            .unwrap()
    };
    let response = app
        .clone()
        .oneshot(post("/v1/chat/completions", "text/plain"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 100);

    // A route-priced multipart upload is priced without its body.
    let response = app
        .clone()
        .oneshot(post(
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=x",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 97);

    // The JSON request is priced by its model.
    let response = app
        .oneshot(post("/v1/chat/completions", "application/json"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    assert_eq!(ledger.balance("acct_1").await.unwrap().balance, 47);
}

/// A `MakeWriter` that keeps every log line in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// No log line, at any level, contains a key's text: valid, unknown, malformed or duplicated.
#[tokio::test(flavor = "current_thread")]
async fn no_key_text_in_any_log_line() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Global, not thread-local: callsites first hit by the other tests of this binary (on other
    // threads, without a subscriber) would otherwise stay disabled for this one.
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber of this binary");

    let config = tollgate_gateway::config::GatewayConfig::from_toml(&config("openai")).unwrap();
    let gateway = gateway::app::Gateway::build(config).await.unwrap();
    let app = gateway.router();
    let unknown = "sk-unknown-zyxwvutsrqponmlkjihgf";
    let presentations = [
        format!("Bearer {KEY}"),
        format!("Bearer {unknown}"),
        format!("Bearer  {unknown}"),
        format!("Basic {unknown}"),
        format!("Bearer {KEY_IP}"),
    ];
    for (i, value) in presentations.iter().enumerate() {
        for path in ["/v1/models", "/v1/chat/completions", "/v2/unknown"] {
            let request = Request::post(path)
                .header("authorization", value)
                .header("content-type", "application/json")
                .body(Body::from(valid_chat().to_string()))
                .unwrap();
            let request = with_peer(request, format!("203.0.113.{}", i + 1).parse().unwrap());
            let response = app.clone().oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    }
    let duplicated = Request::get("/v1/models")
        .header("authorization", format!("Bearer {KEY}"))
        .header("authorization", format!("Bearer {unknown}"))
        .body(Body::empty())
        .unwrap();
    let response = app
        .clone()
        .oneshot(with_peer(duplicated, "203.0.113.9".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!text.is_empty(), "the gateway logs its requests");
    for secret in [&KEY[3..], &KEY_IP[3..], &unknown[3..]] {
        assert!(!text.contains(secret), "a key is in the logs:\n{text}");
    }
}
