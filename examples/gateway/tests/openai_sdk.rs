//! The gateway example driven by the official OpenAI Python SDK (`pip install openai`).
//!
//! Each refusal must raise the SDK's matching exception with `code`, `type`, `param` and
//! `request_id` filled; plain and streamed completions must work; the SDK's retry on 429 must
//! wait as the headers say. The test provisions the SDK itself (`support/python.rs`).

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/python.rs"]
mod python;

use serde_json::Value;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[[plans]]
name = "std"
requests_per_minute = 6000
burst = 100

[[plans]]
name = "free"
requests_per_minute = 6000
burst = 100
models = ["mock-small"]

[[plans]]
name = "slow"
requests_per_minute = 60
burst = 1

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 2

[[models]]
id = "mock-large"
credits_per_request = 5
credits_per_1k_tokens = 10

[[accounts]]
id = "acct_good"
plan = "std"
balance = 100000

[[accounts]]
id = "acct_free"
plan = "free"
balance = 1000

[[accounts]]
id = "acct_broke"
plan = "std"
balance = 0

[[accounts]]
id = "acct_slow"
plan = "slow"
balance = 1000

[[keys]]
id = "key_good"
account = "acct_good"
key = "sk-test-good-000000000000000000"

[[keys]]
id = "key_revoked"
account = "acct_good"
key = "sk-test-revoked-000000000000000"
status = "revoked"

[[keys]]
id = "key_free"
account = "acct_free"
key = "sk-test-free-000000000000000000"

[[keys]]
id = "key_broke"
account = "acct_broke"
key = "sk-test-broke-00000000000000000"

[[keys]]
id = "key_slow"
account = "acct_slow"
key = "sk-test-slow-000000000000000000"
"#;

fn assert_raised(
    out: &Value,
    case: &str,
    class: &str,
    status: u64,
    code: &str,
    ty: &str,
    param: Value,
) {
    let r = &out[case];
    assert_eq!(r["raised"], class, "{case}: {r}");
    assert_eq!(r["status"], status, "{case}: {r}");
    assert_eq!(r["code"], code, "{case}: {r}");
    assert_eq!(r["type"], ty, "{case}: {r}");
    assert_eq!(r["param"], param, "{case}: {r}");
    let id = r["request_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_"), "{case}: request_id {id:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_sees_every_refusal_as_its_exception() {
    let running = gateway::start(CONFIG).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_cases.py");
    let output = tokio::process::Command::new(python::python_with_openai())
        .arg(script)
        .arg(format!("http://{}", running.addr))
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the SDK script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();

    let reply = "Hello! I am a mock model behind tollgate.";
    // "Hello there" is 11 characters: 3 prompt tokens; the reply is 8 words.
    assert_eq!(out["ok"]["content"], reply);
    assert_eq!(out["ok"]["total_tokens"], 11);
    assert_eq!(out["stream"]["content"], reply);
    assert_eq!(out["stream"]["total_tokens"], 11);

    let null = Value::Null;
    assert_raised(
        &out,
        "bad_key",
        "AuthenticationError",
        401,
        "invalid_api_key",
        "authentication_error",
        null.clone(),
    );
    assert_raised(
        &out,
        "revoked",
        "PermissionDeniedError",
        403,
        "api_key_revoked",
        "permission_error",
        null.clone(),
    );
    assert_raised(
        &out,
        "unknown_model",
        "NotFoundError",
        404,
        "model_not_found",
        "not_found_error",
        "model".into(),
    );
    assert_raised(
        &out,
        "plan_model",
        "PermissionDeniedError",
        403,
        "model_not_allowed",
        "permission_error",
        "model".into(),
    );
    assert_raised(
        &out,
        "broke",
        "APIStatusError",
        402,
        "insufficient_quota",
        "insufficient_quota",
        null.clone(),
    );
    assert_raised(
        &out,
        "bad_request",
        "BadRequestError",
        400,
        "bad_request",
        "invalid_request_error",
        "max_tokens".into(),
    );
    assert_raised(
        &out,
        "not_found",
        "NotFoundError",
        404,
        "not_found",
        "not_found_error",
        null.clone(),
    );
    assert_raised(
        &out,
        "rate_limited",
        "RateLimitError",
        429,
        "rate_limit_exceeded",
        "rate_limit_error",
        null,
    );
    assert!(
        out["rate_limited"]["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit exceeded for requests"),
        "{}",
        out["rate_limited"]
    );

    // One request per second, burst 1: the SDK waited about the second the headers gave it.
    let waited = out["retried_after"].as_f64().unwrap();
    assert!(
        (0.5..5.0).contains(&waited),
        "the SDK retried after {waited} s"
    );
}
