//! One example config per reference document (`examples/providers/*.toml`), each driven through
//! the gateway: every error the document lists that a gateway can produce comes out as
//! documented (status, body fields and their JSON types, message), with the OpenAI Python SDK
//! for the OpenAI-compatible ones (`pip install openai`) and raw HTTP for the envelope.
//!
//! The upstream is the built-in mock model server behind a small server of the test's own that
//! fails on request (models `fail-500`, `fail-502`, `fail-503`; `slow` outlasts the gateway's
//! one-second upstream timeout), so 5xx normalization goes through each catalog too.

#[path = "support/binary.rs"]
mod binary;
#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/python.rs"]
mod python;

use std::{net::SocketAddr, time::Duration};

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN: &str = "Bearer admin-demo-key-change-me";
const PAID: &str = "sk-demo-paid-0000000000000000";
const FREE: &str = "sk-demo-free-0000000000000000";

/// The mock model server, failing on request.
async fn upstream() -> SocketAddr {
    let mock = gateway::upstream::mock(vec![]);
    let chat_mock = mock.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |request: axum::extract::Request| {
                let mock = chat_mock.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                    let model = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v["model"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    match model.as_str() {
                        "fail-500" => (StatusCode::INTERNAL_SERVER_ERROR, "panic at engine.rs:42")
                            .into_response(),
                        "fail-502" => html(StatusCode::BAD_GATEWAY),
                        "fail-503" => html(StatusCode::SERVICE_UNAVAILABLE),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            StatusCode::OK.into_response()
                        }
                        _ => {
                            let request = axum::extract::Request::from_parts(
                                parts,
                                axum::body::Body::from(bytes),
                            );
                            mock.oneshot(request).await.unwrap()
                        }
                    }
                }
            }),
        )
        .fallback_service(mock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn html(status: StatusCode) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body>nginx: upstream 10.0.0.7 failed</body></html>",
    )
        .into_response()
}

/// The example config, pointed at the test upstream, with the failing models priced.
fn config(file: &str, upstream: SocketAddr) -> String {
    let path = format!("{}/../providers/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("upstream = \"mock\""))
        .expect("the example uses the mock upstream");
    let mut text = text.replacen(
        line,
        &format!("upstream = \"http://{upstream}\"\nupstream_timeout_secs = 1"),
        1,
    );
    for model in ["fail-500", "fail-502", "fail-503", "slow"] {
        text.push_str(&format!(
            "\n[[models]]\nid = \"{model}\"\ncredits_per_request = 1\n"
        ));
    }
    text
}

/// Start the gateway from `file` and run `cases` through `tests/sdk/provider_cases.py`.
async fn run(file: &str, cases: Vec<Value>) -> Value {
    let upstream = upstream().await;
    let text = config(file, upstream);
    tollgate_gateway::config::GatewayConfig::from_toml(&text).expect("the example config is valid");
    let running = gateway::start(&text).await;
    run_at(running.addr, cases).await
}

/// Run `cases` against the gateway at `addr`.
async fn run_at(addr: SocketAddr, cases: Vec<Value>) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/provider_cases.py");
    // The SDK is provisioned once (a virtualenv under target/ when python3 lacks it).
    let python = tokio::task::spawn_blocking(python::python_with_openai)
        .await
        .unwrap();
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("http://{addr}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, Value::from(cases).to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the SDK script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sdk(name: &str, key: &str, model: &str) -> Value {
    json!({"name": name, "sdk": {"key": key, "model": model}})
}

fn raw(name: &str, method: &str, path: &str, headers: Value, body: Value) -> Value {
    json!({"name": name, "raw": {"method": method, "path": path, "headers": headers, "body": body}})
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello there"}]})
}

fn chat(name: &str, key: &str, model: &str) -> Value {
    raw(
        name,
        "POST",
        "/v1/chat/completions",
        json!({"Authorization": format!("Bearer {key}"), "Content-Type": "application/json"}),
        chat_body(model),
    )
}

/// What a message must look like.
enum Msg<'a> {
    Exact(&'a str),
    Starts(&'a str),
}

/// The case answered with an OpenAI-compatible body of exactly these fields.
fn openai(out: &Value, case: &str, status: u16, ty: &str, code: Value, message: Msg<'_>) {
    let r = &out[case];
    assert_eq!(r["status"], status, "{case}: {r}");
    let body = r["body"]
        .as_object()
        .unwrap_or_else(|| panic!("{case}: {r}"));
    assert_eq!(body.keys().collect::<Vec<_>>(), ["error"], "{case}: {r}");
    let error = body["error"].as_object().unwrap();
    let mut keys: Vec<_> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{case}: {r}");
    assert_eq!(error["type"], ty, "{case}: {r}");
    assert_eq!(
        error["code"], code,
        "{case}: the code and its JSON type: {r}"
    );
    let text = error["message"].as_str().unwrap();
    match message {
        Msg::Exact(m) => assert_eq!(text, m, "{case}"),
        Msg::Starts(m) => assert!(text.starts_with(m), "{case}: {text}"),
    }
    let id = r["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_"), "{case}: x-request-id {id:?}");
}

/// The SDK raised `class` for the case.
fn raised(out: &Value, case: &str, class: &str) {
    assert_eq!(out[case]["raised"], class, "{case}: {}", out[case]);
}

fn retry(out: &Value, case: &str, retry: bool) {
    assert_eq!(
        out[case]["headers"]["x-should-retry"],
        if retry { "true" } else { "false" },
        "{case}: {}",
        out[case]
    );
}

/// The cases every OpenAI-compatible provider's test runs, in this order.
fn openai_cases(small: &str, large: &str) -> Vec<Value> {
    let key = |k: &str| json!({"Authorization": format!("Bearer {k}"), "Content-Type": "application/json"});
    vec![
        sdk("ok", PAID, small),
        raw(
            "invalid_json",
            "POST",
            "/v1/chat/completions",
            key(PAID),
            json!("{\"model\": "),
        ),
        json!({"name": "bad_param", "sdk": {"key": PAID, "model": small, "max_tokens": "many"}}),
        raw(
            "missing_key",
            "POST",
            "/v1/chat/completions",
            json!({"Content-Type": "application/json"}),
            chat_body(small),
        ),
        sdk("invalid_key", "sk-demo-wrong-000000000000000", small),
        raw(
            "whitespace_key",
            "POST",
            "/v1/chat/completions",
            json!({"Authorization": format!("Bearer  {PAID}"), "Content-Type": "application/json"}),
            chat_body(small),
        ),
        sdk("revoked", "sk-demo-revoked-0000000000000", small),
        sdk("disabled", "sk-demo-disabled-000000000000", small),
        sdk("frozen", "sk-demo-frozen-00000000000000", small),
        sdk("ip", "sk-demo-office-00000000000000", small),
        sdk("empty_wallet", "sk-demo-empty-000000000000000", small),
        sdk("plan_model", FREE, large),
        sdk("unknown_model", PAID, "no-such-model"),
        raw("wrong_path", "GET", "/v1/v1/models", key(PAID), Value::Null),
        sdk("fail_500", PAID, "fail-500"),
        sdk("fail_502", PAID, "fail-502"),
        sdk("fail_503", PAID, "fail-503"),
        sdk("slow", PAID, "slow"),
        // The Trusted Tier: the free plan's burst, a top-up, the next request on the new plan.
        json!({"name": "until_429", "until": 429, "max": 30,
               "raw": chat("", FREE, small)["raw"]}),
        sdk("free_429", FREE, small),
        raw(
            "before_top_up",
            "GET",
            "/admin/accounts/acct_free",
            json!({"Authorization": ADMIN}),
            Value::Null,
        ),
        raw(
            "top_up",
            "POST",
            "/admin/accounts/acct_free/top-up",
            json!({"Authorization": ADMIN, "Content-Type": "application/json", "Idempotency-Key": "mpesa-0001"}),
            json!({"amount": 1000}),
        ),
        chat("after_top_up", FREE, small),
        sdk("trusted_model", FREE, large),
        // An operator moves it back; replaying the same top-up promotes nothing.
        raw(
            "demote",
            "PATCH",
            "/admin/accounts/acct_free",
            json!({"Authorization": ADMIN, "Content-Type": "application/json"}),
            json!({"plan": "free"}),
        ),
        raw(
            "replay",
            "POST",
            "/admin/accounts/acct_free/top-up",
            json!({"Authorization": ADMIN, "Content-Type": "application/json", "Idempotency-Key": "mpesa-0001"}),
            json!({"amount": 1000}),
        ),
        chat("after_replay", FREE, small),
    ]
}

/// The Trusted Tier works without an operator: free plan (10 a minute) → top-up → 100.
fn assert_trusted_tier(out: &Value, large: &str) {
    let burst = &out["until_429"];
    assert_eq!(burst["status"], 429, "{burst}");
    assert_eq!(burst["sent"], 11, "the free plan's burst is 10: {burst}");
    assert_eq!(burst["headers"]["x-ratelimit-limit-requests"], "10");
    raised(out, "free_429", "RateLimitError");

    let top_up = &out["top_up"];
    assert_eq!(top_up["status"], 200, "{top_up}");
    assert_eq!(top_up["body"]["applied"], true);
    let before = out["before_top_up"]["body"]["balance"].as_u64().unwrap();
    assert!(before < 100, "the free burst was charged: {before}");
    assert_eq!(top_up["body"]["balance"], before + 1000, "{top_up}");
    assert_eq!(top_up["body"]["plan"], "trusted");
    assert_eq!(top_up["body"]["promoted_from"], "free");

    let next = &out["after_top_up"];
    assert_eq!(next["status"], 200, "the very next request: {next}");
    assert_eq!(next["headers"]["x-ratelimit-limit-requests"], "100");
    assert_eq!(next["headers"]["x-ratelimit-remaining-requests"], "99");
    assert_eq!(
        out["trusted_model"]["raised"],
        Value::Null,
        "{large} on trusted"
    );

    assert_eq!(out["demote"]["status"], 200);
    let replay = &out["replay"];
    assert_eq!(replay["status"], 200, "{replay}");
    assert_eq!(replay["body"]["applied"], false);
    assert_eq!(
        replay["body"]["plan"], "free",
        "a replay promotes nothing: {replay}"
    );
    assert!(replay["body"].get("promoted_from").is_none());
    let after = &out["after_replay"];
    assert_eq!(
        after["status"], 429,
        "still on the free plan's spent bucket: {after}"
    );
    assert_eq!(after["headers"]["x-ratelimit-limit-requests"], "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fikra_000_openai_bodies_402_with_a_numeric_code_and_the_trusted_tier() {
    let (small, large) = ("llama3-8b-8192", "llama3-70b-8192");
    let out = run("fikra.toml", openai_cases(small, large)).await;
    assert_eq!(out["ok"]["raised"], Value::Null, "{}", out["ok"]);
    // "402 - Payment Required", the payload exactly as documented: code 402 as a JSON number.
    openai(
        &out,
        "empty_wallet",
        402,
        "insufficient_quota",
        json!(402),
        Msg::Exact("Insufficient balance. Please top up your Fikra account."),
    );
    raised(&out, "empty_wallet", "APIStatusError");
    // The SDK types `e.code` as a string; the wire carries the number.
    assert_eq!(out["empty_wallet"]["code"], "402");
    assert_eq!(out["empty_wallet"]["body"]["error"]["param"], Value::Null);
    // 400: invalid JSON or a missing/unsupported parameter.
    openai(
        &out,
        "invalid_json",
        400,
        "invalid_request_error",
        json!("invalid_json"),
        Msg::Starts("The request body is not valid JSON"),
    );
    openai(
        &out,
        "bad_param",
        400,
        "invalid_request_error",
        json!("bad_request"),
        Msg::Starts(""),
    );
    raised(&out, "bad_param", "BadRequestError");
    // 401: no valid API key.
    for case in ["missing_key", "invalid_key", "whitespace_key"] {
        assert_eq!(out[case]["status"], 401, "{case}");
        assert_eq!(
            out[case]["body"]["error"]["type"], "authentication_error",
            "{case}"
        );
    }
    raised(&out, "invalid_key", "AuthenticationError");
    // 403: disabled or revoked.
    openai(
        &out,
        "revoked",
        403,
        "permission_error",
        json!("api_key_revoked"),
        Msg::Exact("Your API key has been revoked."),
    );
    openai(
        &out,
        "disabled",
        403,
        "permission_error",
        json!("api_key_disabled"),
        Msg::Exact("Your API key has been disabled."),
    );
    raised(&out, "revoked", "PermissionDeniedError");
    // 429.
    openai(
        &out,
        "free_429",
        429,
        "rate_limit_error",
        json!("rate_limit_exceeded"),
        Msg::Starts("Rate limit exceeded for requests."),
    );
    // 500, 502, 503, 504: something went wrong on our end or upstream; never the upstream's text.
    openai(
        &out,
        "fail_500",
        500,
        "server_error",
        json!("internal_error"),
        Msg::Starts("An unexpected error occurred"),
    );
    openai(
        &out,
        "fail_502",
        502,
        "server_error",
        json!("bad_gateway"),
        Msg::Starts("The gateway could not"),
    );
    openai(
        &out,
        "fail_503",
        503,
        "service_unavailable",
        json!("service_unavailable"),
        Msg::Starts("The service is temporarily"),
    );
    openai(
        &out,
        "slow",
        504,
        "gateway_timeout",
        json!("gateway_timeout"),
        Msg::Starts("The upstream service did not respond"),
    );
    for case in ["fail_500", "fail_502", "fail_503", "slow"] {
        raised(&out, case, "InternalServerError");
        let text = out[case]["body"].to_string();
        assert!(
            !text.contains("engine.rs") && !text.contains("nginx"),
            "{case}: {text}"
        );
    }
    assert_trusted_tier(&out, large);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fikra_001_one_error_object_billing_error_401_for_revoked_and_the_trusted_tier() {
    let (small, large) = ("llama3-8b-8192", "llama3-70b-8192");
    let out = run("fikra_faq.toml", openai_cases(small, large)).await;
    // 402: type billing_error, code insufficient_quota; the wallet never goes negative.
    openai(
        &out,
        "empty_wallet",
        402,
        "billing_error",
        json!("insufficient_quota"),
        Msg::Starts("Your token wallet has reached zero (0 credits available, "),
    );
    // 401: missing, malformed, revoked, trailing spaces.
    openai(
        &out,
        "missing_key",
        401,
        "authentication_error",
        json!("missing_api_key"),
        Msg::Starts("You didn't provide an API key."),
    );
    openai(
        &out,
        "invalid_key",
        401,
        "authentication_error",
        json!("invalid_api_key"),
        Msg::Starts("Incorrect API key provided."),
    );
    openai(
        &out,
        "whitespace_key",
        401,
        "authentication_error",
        json!("api_key_whitespace"),
        Msg::Starts("Your API key has leading or trailing whitespace."),
    );
    openai(
        &out,
        "revoked",
        401,
        "authentication_error",
        json!("api_key_revoked"),
        Msg::Exact("Your API key has been revoked."),
    );
    openai(
        &out,
        "disabled",
        401,
        "authentication_error",
        json!("api_key_disabled"),
        Msg::Exact("Your API key has been disabled."),
    );
    for case in ["invalid_key", "revoked", "disabled"] {
        raised(&out, case, "AuthenticationError");
    }
    // 400: invalid JSON payload or an unsupported parameter.
    openai(
        &out,
        "invalid_json",
        400,
        "invalid_request_error",
        json!("invalid_json"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "bad_param",
        400,
        "invalid_request_error",
        json!("bad_request"),
        Msg::Starts(""),
    );
    assert_eq!(
        out["bad_param"]["param"], "max_tokens",
        "param names the JSON key"
    );
    openai(
        &out,
        "unknown_model",
        404,
        "not_found_error",
        json!("model_not_found"),
        Msg::Exact("The model `no-such-model` does not exist."),
    );
    assert_eq!(out["unknown_model"]["param"], "model");
    // 404 for a wrong base path.
    openai(
        &out,
        "wrong_path",
        404,
        "not_found_error",
        json!("not_found"),
        Msg::Starts("The requested endpoint does not exist."),
    );
    // 429 per tier.
    openai(
        &out,
        "free_429",
        429,
        "rate_limit_error",
        json!("rate_limit_exceeded"),
        Msg::Starts("Rate limit exceeded"),
    );
    // 5xx: type api_error whatever failed.
    openai(
        &out,
        "fail_500",
        500,
        "api_error",
        json!("internal_error"),
        Msg::Starts("An unexpected failure occurred within the proxy engine."),
    );
    openai(
        &out,
        "fail_502",
        502,
        "api_error",
        json!("bad_gateway"),
        Msg::Exact("The proxy was unable to establish a connection to the inference cluster."),
    );
    openai(
        &out,
        "fail_503",
        503,
        "api_error",
        json!("service_unavailable"),
        Msg::Starts("Inference nodes are undergoing scheduled maintenance"),
    );
    openai(
        &out,
        "slow",
        504,
        "api_error",
        json!("gateway_timeout"),
        Msg::Starts(""),
    );
    assert_trusted_tier(&out, large);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowapi_002_its_type_per_status() {
    let (small, large) = ("gpt-4o-mini", "gpt-4o");
    let out = run("flowapi.toml", openai_cases(small, large)).await;
    // | HTTP status | Error type |
    openai(
        &out,
        "bad_param",
        400,
        "invalid_request_error",
        json!("bad_request"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "invalid_json",
        400,
        "invalid_request_error",
        json!("invalid_json"),
        Msg::Starts(""),
    );
    for case in ["missing_key", "invalid_key", "whitespace_key"] {
        openai(
            &out,
            case,
            401,
            "invalid_api_key",
            json!("invalid_api_key"),
            Msg::Starts(""),
        );
    }
    raised(&out, "invalid_key", "AuthenticationError");
    openai(
        &out,
        "plan_model",
        403,
        "permission_error",
        json!("model_not_allowed"),
        Msg::Starts("Your plan does not have access to the model"),
    );
    openai(
        &out,
        "ip",
        403,
        "permission_error",
        json!("ip_not_allowed"),
        Msg::Starts("IP address 127.0.0.1 is not in the allowlist"),
    );
    openai(
        &out,
        "empty_wallet",
        402,
        "insufficient_balance",
        json!("insufficient_balance"),
        Msg::Exact("Insufficient balance. Please top up your account."),
    );
    retry(&out, "empty_wallet", false);
    openai(
        &out,
        "unknown_model",
        404,
        "not_found_error",
        json!("model_not_found"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "wrong_path",
        404,
        "not_found_error",
        json!("not_found"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "free_429",
        429,
        "rate_limit_error",
        json!("rate_limit_exceeded"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "fail_500",
        500,
        "server_error",
        json!("internal_error"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "fail_502",
        502,
        "server_error",
        json!("bad_gateway"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "fail_503",
        503,
        "service_unavailable",
        json!("service_unavailable"),
        Msg::Starts(""),
    );
    openai(
        &out,
        "slow",
        504,
        "gateway_timeout",
        json!("gateway_timeout"),
        Msg::Starts(""),
    );
    // Transient: 429, 503, 504 say retry.
    for case in ["free_429", "fail_503", "slow"] {
        retry(&out, case, true);
    }
    assert_trusted_tier(&out, large);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infe_003_its_codes_and_which_are_retryable() {
    let (small, large) = ("infe-pulse", "infe-titan");
    let out = run("infe.toml", openai_cases(small, large)).await;
    let code = |c: &str| (c.to_owned(), json!(c));
    let (t, c) = code("invalid_request_error");
    openai(
        &out,
        "invalid_json",
        400,
        &t,
        c.clone(),
        Msg::Starts("The request body is not valid JSON"),
    );
    openai(&out, "bad_param", 400, &t, c, Msg::Starts(""));
    raised(&out, "bad_param", "BadRequestError");
    // 401 invalid_api_key: missing, malformed, disabled, revoked.
    let (t, c) = code("invalid_api_key");
    for case in ["missing_key", "invalid_key", "revoked", "disabled"] {
        openai(
            &out,
            case,
            401,
            &t,
            c.clone(),
            Msg::Exact("Invalid API key"),
        );
    }
    openai(
        &out,
        "whitespace_key",
        401,
        &t,
        c,
        Msg::Starts("Invalid API key: check for extra spaces"),
    );
    for case in ["invalid_key", "revoked", "disabled"] {
        raised(&out, case, "AuthenticationError");
    }
    let (t, c) = code("payment_required");
    openai(
        &out,
        "empty_wallet",
        402,
        &t,
        c,
        Msg::Exact("Insufficient credits"),
    );
    // 403 forbidden: "Free tier attempting to use infe-titan model".
    let (t, c) = code("forbidden");
    openai(&out, "plan_model", 403, &t, c, Msg::Exact("Your plan does not have access to the model `infe-titan`. Upgrade your plan to use it."));
    raised(&out, "plan_model", "PermissionDeniedError");
    let (t, c) = code("model_not_found");
    openai(
        &out,
        "unknown_model",
        404,
        &t,
        c,
        Msg::Exact("The model `no-such-model` does not exist."),
    );
    raised(&out, "unknown_model", "NotFoundError");
    let (t, c) = code("rate_limit_exceeded");
    openai(
        &out,
        "free_429",
        429,
        &t,
        c,
        Msg::Starts("Rate limit exceeded for requests."),
    );
    raised(&out, "free_429", "RateLimitError");
    let (t, c) = code("api_error");
    openai(
        &out,
        "fail_500",
        500,
        &t,
        c.clone(),
        Msg::Starts("An unexpected error occurred"),
    );
    openai(
        &out,
        "fail_502",
        502,
        &t,
        c.clone(),
        Msg::Exact("The upstream inference provider returned an error."),
    );
    openai(
        &out,
        "fail_503",
        502,
        &t,
        c.clone(),
        Msg::Exact("The upstream inference provider is unavailable."),
    );
    openai(
        &out,
        "slow",
        502,
        &t,
        c,
        Msg::Exact("The upstream inference provider did not respond in time."),
    );
    // | Code | Should Retry? |: 400, 401, 402, 403 no; 429, 500, 502 yes.
    for case in [
        "bad_param",
        "invalid_key",
        "revoked",
        "empty_wallet",
        "plan_model",
    ] {
        retry(&out, case, false);
    }
    for case in ["free_429", "fail_500", "fail_502", "fail_503", "slow"] {
        retry(&out, case, true);
    }
    assert_trusted_tier(&out, large);
}

/// The envelope of FirebirdGen, exactly: the top-level fields and their types, then `error`.
fn envelope(out: &Value, case: &str, status: u16, code: &str, message: Msg<'_>) -> Value {
    let r = &out[case];
    assert_eq!(r["status"], status, "{case}: {r}");
    let body = r["body"]
        .as_object()
        .unwrap_or_else(|| panic!("{case}: {r}"));
    let mut keys: Vec<_> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["error", "path", "statusCode", "success", "timestamp"],
        "{case}"
    );
    assert_eq!(body["success"], false);
    assert_eq!(body["statusCode"], status, "statusCode is a number: {case}");
    let timestamp = body["timestamp"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(timestamp).is_ok(),
        "ISO 8601: {timestamp}"
    );
    assert!(
        timestamp.ends_with('Z') && timestamp.len() == 24,
        "{timestamp}"
    );
    assert!(body["path"].as_str().unwrap().starts_with('/'));
    let error = &body["error"];
    assert_eq!(error["code"], code, "{case}: {r}");
    let text = error["message"].as_str().unwrap();
    match message {
        Msg::Exact(m) => assert_eq!(text, m, "{case}"),
        Msg::Starts(m) => assert!(text.starts_with(m), "{case}: {text}"),
    }
    error.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firebirdgen_004_the_envelope_its_codes_and_messages() {
    let model = "sora2_text_to_video";
    let headers = |k: &str| json!({"Authorization": format!("Bearer {k}"), "Content-Type": "application/json"});
    let cases = vec![
        chat("ok", PAID, model),
        chat("insufficient", "sk-demo-empty-000000000000000", model),
        chat("invalid_key", "sk-demo-wrong-000000000000000", model),
        raw(
            "missing_key",
            "POST",
            "/v1/chat/completions",
            json!({"Content-Type": "application/json"}),
            chat_body(model),
        ),
        chat("revoked", "sk-demo-revoked-0000000000000", model),
        chat("disabled", "sk-demo-disabled-000000000000", model),
        chat("frozen", "sk-demo-frozen-00000000000000", model),
        chat("ip", "sk-demo-office-00000000000000", model),
        raw(
            "invalid_parameters",
            "POST",
            "/v1/chat/completions",
            headers(PAID),
            json!({"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}),
        ),
        raw(
            "not_found",
            "GET",
            "/api/tasks/123",
            headers(PAID),
            Value::Null,
        ),
        chat("fail_500", PAID, "fail-500"),
        json!({"name": "rate_limited", "until": 429, "max": 30, "raw": chat("", FREE, model)["raw"]}),
    ];
    let out = run("firebirdgen.toml", cases).await;
    assert_eq!(out["ok"]["status"], 200, "{}", out["ok"]);

    // INSUFFICIENT_CREDITS, 400, with details.required and details.available (numbers).
    let error = envelope(
        &out,
        "insufficient",
        400,
        "INSUFFICIENT_CREDITS",
        Msg::Exact("Insufficient credits to perform this operation"),
    );
    assert!(
        error["details"]["required"].as_u64().unwrap() > 0,
        "{error}"
    );
    assert_eq!(error["details"]["available"], 0);
    // INVALID_API_KEY, 401: deleted, revoked, wrong format, missing header.
    for case in ["invalid_key", "missing_key", "revoked", "disabled"] {
        envelope(
            &out,
            case,
            401,
            "INVALID_API_KEY",
            Msg::Exact("The API key is invalid or expired"),
        );
    }
    envelope(
        &out,
        "frozen",
        403,
        "ACCOUNT_FROZEN",
        Msg::Exact("Account is frozen"),
    );
    envelope(
        &out,
        "ip",
        403,
        "IP_NOT_WHITELISTED",
        Msg::Exact("IP address 127.0.0.1 is not in the whitelist"),
    );
    envelope(
        &out,
        "invalid_parameters",
        400,
        "INVALID_PARAMETERS",
        Msg::Starts("Invalid parameters: "),
    );
    envelope(
        &out,
        "not_found",
        404,
        "NOT_FOUND",
        Msg::Exact("Resource does not exist"),
    );
    envelope(
        &out,
        "fail_500",
        500,
        "INTERNAL_ERROR",
        Msg::Exact("Internal Server Error"),
    );
    // RATE_LIMIT_EXCEEDED, 429, retryAfter in whole seconds, the message naming them.
    let r = &out["rate_limited"];
    // 10 at once (a few more pass as the bucket refills at 10 a second while the loop runs).
    let sent = r["sent"].as_u64().unwrap();
    assert!((11..=14).contains(&sent), "10 at once: {r}");
    let error = envelope(
        &out,
        "rate_limited",
        429,
        "RATE_LIMIT_EXCEEDED",
        Msg::Starts("Too many requests, please try again in "),
    );
    let wait = error["retryAfter"]
        .as_u64()
        .expect("retryAfter is a number");
    assert_eq!(
        error["message"],
        format!("Too many requests, please try again in {wait} seconds")
    );
    assert_eq!(r["headers"]["retry-after"], wait.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_config_runs_in_the_gateway_binary_as_documented() {
    use tokio::io::AsyncBufReadExt;
    // file, the empty wallet's status, type (or envelope code) and code, the revoked key's status.
    let table = [
        ("fikra.toml", 402, "insufficient_quota", json!(402), 403),
        (
            "fikra_faq.toml",
            402,
            "billing_error",
            json!("insufficient_quota"),
            401,
        ),
        (
            "flowapi.toml",
            402,
            "insufficient_balance",
            json!("insufficient_balance"),
            403,
        ),
        (
            "infe.toml",
            402,
            "payment_required",
            json!("payment_required"),
            401,
        ),
        (
            "firebirdgen.toml",
            400,
            "INSUFFICIENT_CREDITS",
            json!("INSUFFICIENT_CREDITS"),
            401,
        ),
    ];
    for (file, status, ty, code, revoked) in table {
        let path = format!("{}/../providers/{file}", env!("CARGO_MANIFEST_DIR"));
        let mut child = tokio::process::Command::new(binary::example_binary())
            .args(["--config", &path, "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the example binary starts");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        let addr: SocketAddr = first
            .strip_prefix("tollgate gateway listening on http://")
            .unwrap_or_else(|| panic!("{file}: {first}"))
            .parse()
            .unwrap();
        let model = tollgate_gateway::config::GatewayConfig::load(&path)
            .unwrap()
            .models[0]
            .id
            .get_ref()
            .clone();
        let out = run_at(
            addr,
            vec![
                chat("empty", "sk-demo-empty-000000000000000", &model),
                chat("revoked", "sk-demo-revoked-0000000000000", &model),
                chat("ok", PAID, &model),
            ],
        )
        .await;
        assert_eq!(out["ok"]["status"], 200, "{file}: {}", out["ok"]);
        assert_eq!(out["empty"]["status"], status, "{file}: {}", out["empty"]);
        let body = &out["empty"]["body"];
        if file == "firebirdgen.toml" {
            assert_eq!(body["statusCode"], status, "{file}");
            assert_eq!(body["error"]["code"], code, "{file}");
            assert_eq!(body["error"]["code"], ty, "{file}");
        } else {
            assert_eq!(body["error"]["type"], ty, "{file}: {body}");
            assert_eq!(body["error"]["code"], code, "{file}: {body}");
        }
        assert_eq!(
            out["revoked"]["status"], revoked,
            "{file}: {}",
            out["revoked"]
        );
        child.kill().await.unwrap();
    }
}

#[cfg(feature = "redis")]
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trusted_tier_on_the_redis_backend() {
    let redis = redis_server::RedisServer::start();
    let upstream = upstream().await;
    let text = config("fikra.toml", upstream).replacen(
        "kind = \"memory\"",
        &format!("kind = \"redis\"\nurl = \"{}\"", redis.url()),
        1,
    );
    let running = gateway::start(&text).await;
    let small = "llama3-8b-8192";
    let cases: Vec<Value> = openai_cases(small, "llama3-70b-8192")
        .into_iter()
        .filter(|c| {
            let name = c["name"].as_str().unwrap();
            let pos = [
                "until_429",
                "free_429",
                "before_top_up",
                "top_up",
                "after_top_up",
                "trusted_model",
                "demote",
                "replay",
                "after_replay",
            ];
            pos.contains(&name)
        })
        .collect();
    let out = run_at(running.addr, cases).await;
    assert_trusted_tier(&out, "llama3-70b-8192");
}
