//! Every rejection in every format: the exact status, headers and body.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{json, Value};
use tollgate::{
    format::{grpc_code, Format, RenderContext},
    LimitKind, Reason, Rejection,
};

/// reason, OpenAI status, OpenAI type, code, envelope code, envelope status, gRPC status.
const TABLE: &[(Reason, u16, &str, &str, &str, u16, u8)] = &[
    (
        Reason::MissingApiKey,
        401,
        "authentication_error",
        "missing_api_key",
        "INVALID_API_KEY",
        401,
        16,
    ),
    (
        Reason::MalformedApiKey,
        401,
        "authentication_error",
        "malformed_api_key",
        "INVALID_API_KEY",
        401,
        16,
    ),
    (
        Reason::ApiKeyWhitespace,
        401,
        "authentication_error",
        "api_key_whitespace",
        "INVALID_API_KEY",
        401,
        16,
    ),
    (
        Reason::InvalidApiKey,
        401,
        "authentication_error",
        "invalid_api_key",
        "INVALID_API_KEY",
        401,
        16,
    ),
    (
        Reason::ExpiredApiKey,
        401,
        "authentication_error",
        "expired_api_key",
        "INVALID_API_KEY",
        401,
        16,
    ),
    (
        Reason::DisabledApiKey,
        403,
        "permission_error",
        "api_key_disabled",
        "INVALID_API_KEY",
        401,
        7,
    ),
    (
        Reason::RevokedApiKey,
        403,
        "permission_error",
        "api_key_revoked",
        "INVALID_API_KEY",
        401,
        7,
    ),
    (
        Reason::AccountFrozen,
        403,
        "permission_error",
        "account_frozen",
        "ACCOUNT_FROZEN",
        403,
        7,
    ),
    (
        Reason::AccountBlocked,
        403,
        "permission_error",
        "account_blocked",
        "ACCOUNT_BLOCKED",
        403,
        7,
    ),
    (
        Reason::TooManyAuthFailures,
        429,
        "rate_limit_error",
        "too_many_auth_failures",
        "RATE_LIMIT_EXCEEDED",
        429,
        8,
    ),
    (
        Reason::IpNotAllowed,
        403,
        "permission_error",
        "ip_not_allowed",
        "IP_NOT_WHITELISTED",
        403,
        7,
    ),
    (
        Reason::ModelNotAllowed,
        403,
        "permission_error",
        "model_not_allowed",
        "MODEL_NOT_ALLOWED",
        403,
        7,
    ),
    (
        Reason::ModelNotFound,
        404,
        "not_found_error",
        "model_not_found",
        "MODEL_NOT_FOUND",
        404,
        5,
    ),
    (
        Reason::NotFound,
        404,
        "not_found_error",
        "not_found",
        "NOT_FOUND",
        404,
        5,
    ),
    (
        Reason::MethodNotAllowed,
        405,
        "invalid_request_error",
        "method_not_allowed",
        "METHOD_NOT_ALLOWED",
        405,
        9,
    ),
    (
        Reason::InsufficientCredits,
        402,
        "insufficient_quota",
        "insufficient_quota",
        "INSUFFICIENT_CREDITS",
        400,
        8,
    ),
    (
        Reason::RateLimited,
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "RATE_LIMIT_EXCEEDED",
        429,
        8,
    ),
    (
        Reason::BadRequest,
        400,
        "invalid_request_error",
        "bad_request",
        "INVALID_PARAMETERS",
        400,
        3,
    ),
    (
        Reason::InvalidJson,
        400,
        "invalid_request_error",
        "invalid_json",
        "INVALID_JSON",
        400,
        3,
    ),
    (
        Reason::UnsupportedMediaType,
        415,
        "invalid_request_error",
        "unsupported_media_type",
        "UNSUPPORTED_MEDIA_TYPE",
        415,
        9,
    ),
    (
        Reason::ValidationFailed,
        422,
        "invalid_request_error",
        "validation_failed",
        "VALIDATION_FAILED",
        422,
        3,
    ),
    (
        Reason::Conflict,
        409,
        "invalid_request_error",
        "conflict",
        "CONFLICT",
        409,
        10,
    ),
    (
        Reason::IdempotencyKeyReused,
        422,
        "invalid_request_error",
        "idempotency_key_reused",
        "IDEMPOTENCY_KEY_REUSED",
        422,
        3,
    ),
    (
        Reason::IdempotencyKeyInUse,
        409,
        "invalid_request_error",
        "idempotency_key_in_use",
        "IDEMPOTENCY_KEY_IN_USE",
        409,
        10,
    ),
    (
        Reason::IdempotencyReplayUnavailable,
        409,
        "invalid_request_error",
        "idempotency_replay_unavailable",
        "IDEMPOTENCY_REPLAY_UNAVAILABLE",
        409,
        10,
    ),
    (
        Reason::PayloadTooLarge,
        413,
        "invalid_request_error",
        "payload_too_large",
        "PAYLOAD_TOO_LARGE",
        413,
        9,
    ),
    (
        Reason::Unauthorized,
        401,
        "authentication_error",
        "unauthorized",
        "UNAUTHORIZED",
        401,
        16,
    ),
    (
        Reason::Forbidden,
        403,
        "permission_error",
        "permission_denied",
        "PERMISSION_DENIED",
        403,
        7,
    ),
    (
        Reason::Internal,
        500,
        "server_error",
        "internal_error",
        "INTERNAL_ERROR",
        500,
        13,
    ),
    (
        Reason::BadGateway,
        502,
        "server_error",
        "bad_gateway",
        "BAD_GATEWAY",
        502,
        13,
    ),
    (
        Reason::ServiceUnavailable,
        503,
        "service_unavailable",
        "service_unavailable",
        "SERVICE_UNAVAILABLE",
        503,
        14,
    ),
    (
        Reason::GatewayTimeout,
        504,
        "gateway_timeout",
        "gateway_timeout",
        "GATEWAY_TIMEOUT",
        504,
        4,
    ),
    (
        Reason::BackendUnavailable,
        503,
        "service_unavailable",
        "backend_unavailable",
        "BACKEND_UNAVAILABLE",
        503,
        14,
    ),
];

fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_729_764_000_000)
}

fn body(response: &http::Response<bytes::Bytes>) -> Value {
    serde_json::from_slice(response.body()).unwrap()
}

fn should_retry(status: u16) -> &'static str {
    if matches!(status, 408 | 409 | 429) || (status >= 500 && status != 501) {
        "true"
    } else {
        "false"
    }
}

#[test]
fn the_table_covers_every_reason() {
    assert_eq!(TABLE.len(), Reason::ALL.len());
    for (i, reason) in Reason::ALL.iter().enumerate() {
        assert_eq!(TABLE[i].0, *reason);
    }
}

#[test]
fn openai_format() {
    for &(reason, status, ty, code, ..) in TABLE {
        let rejection = Rejection::new(reason);
        let res = Format::OpenAi.response(&rejection, &RenderContext::new());
        assert_eq!(res.status().as_u16(), status, "{reason:?}");
        assert_eq!(res.headers()["content-type"], "application/json");
        assert_eq!(
            res.headers()["x-should-retry"],
            should_retry(status),
            "{reason:?}"
        );
        assert_eq!(
            body(&res),
            json!({"error": {
                "message": reason.default_message(),
                "type": ty,
                "param": null,
                "code": code,
            }}),
        );
        assert_eq!(res.extensions().get::<Rejection>(), Some(&rejection));
    }
}

#[test]
fn envelope_format() {
    for &(reason, _, _, code, env_code, env_status, _) in TABLE {
        let res = Format::Envelope.response(
            &Rejection::new(reason),
            &RenderContext::new().path("/api/tasks").now(at()),
        );
        assert_eq!(res.status().as_u16(), env_status, "{reason:?}");
        let mut error = json!({"code": env_code, "message": reason.default_message()});
        if env_code == "INVALID_API_KEY" && reason != Reason::InvalidApiKey {
            error["details"] = json!({"reason": code});
        }
        assert_eq!(
            body(&res),
            json!({
                "success": false,
                "statusCode": env_status,
                "error": error,
                "timestamp": "2024-10-24T10:00:00.000Z",
                "path": "/api/tasks",
            }),
            "{reason:?}"
        );
    }
}

#[test]
fn problem_format() {
    for &(reason, status, _, code, ..) in TABLE {
        let res = Format::Problem.response(
            &Rejection::new(reason),
            &RenderContext::new()
                .path("/v1/chat/completions")
                .request_id("req_1"),
        );
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(
            body(&res),
            json!({
                "type": format!("urn:tollgate:error:{code}"),
                "title": StatusCode::from_u16(status).unwrap().canonical_reason().unwrap(),
                "status": status,
                "detail": reason.default_message(),
                "instance": "/v1/chat/completions",
                "code": code,
                "request_id": "req_1",
            })
        );
    }
}

#[test]
fn grpc_status_whatever_the_format() {
    for format in [Format::OpenAi, Format::Envelope, Format::Problem] {
        for &(reason, status, _, _, _, _, grpc) in TABLE {
            assert_eq!(grpc_code(StatusCode::from_u16(status).unwrap()), grpc);
            let res = format.response(&Rejection::new(reason), &RenderContext::new().grpc(true));
            assert_eq!(res.status(), 200, "trailers-only responses are HTTP 200");
            assert_eq!(res.headers()["content-type"], "application/grpc");
            assert_eq!(res.headers()["grpc-status"], grpc.to_string().as_str());
            assert_eq!(
                res.headers()["grpc-message"],
                reason.default_message().replace('%', "%25").as_str()
            );
            assert!(res.body().is_empty());
        }
    }
}

#[test]
fn insufficient_credits_details_in_every_format() {
    let r = Rejection::insufficient_credits(30, 10);
    let res = Format::OpenAi.response(&r, &RenderContext::new());
    assert_eq!(res.status(), 402);
    assert_eq!(
        body(&res),
        json!({"error": {
            "message": "Insufficient balance: this request needs 30 credits and 10 are available. Please top up your account.",
            "type": "insufficient_quota",
            "param": null,
            "code": "insufficient_quota",
        }})
    );
    let res = Format::Envelope.response(&r, &RenderContext::new().path("/api/tasks").now(at()));
    assert_eq!(res.status(), 400);
    assert_eq!(
        body(&res)["error"]["details"],
        json!({"required": 30, "available": 10})
    );
    let res = Format::Problem.response(&r, &RenderContext::new());
    assert_eq!(
        body(&res)["details"],
        json!({"required": 30, "available": 10})
    );
}

#[test]
fn rate_limits_carry_retry_guidance() {
    let r = Rejection::rate_limited(LimitKind::Tokens, Duration::from_millis(2_500));
    let res = Format::OpenAi.response(&r, &RenderContext::new());
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "3");
    assert_eq!(res.headers()["retry-after-ms"], "2500");
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(
        body(&res)["error"]["message"],
        "Rate limit exceeded for tokens. Please try again in 3 seconds."
    );
    let res = Format::Envelope.response(&r, &RenderContext::new().path("/x").now(at()));
    assert_eq!(
        body(&res)["error"],
        json!({
            "code": "RATE_LIMIT_EXCEEDED",
            "message": "Rate limit exceeded for tokens. Please try again in 3 seconds.",
            "details": {"limit": "tokens"},
            "retryAfter": 3,
        })
    );
    let res = Format::Problem.response(&r, &RenderContext::new());
    assert_eq!(body(&res)["retry_after"], 3);
    assert_eq!(body(&res)["details"], json!({"limit": "tokens"}));
}

#[test]
fn ip_not_allowed_names_the_ip() {
    let r = Rejection::ip_not_allowed("1.2.3.4".parse().unwrap());
    let res = Format::Envelope.response(&r, &RenderContext::new().path("/api/tasks").now(at()));
    assert_eq!(res.status(), 403);
    assert_eq!(
        body(&res)["error"],
        json!({
            "code": "IP_NOT_WHITELISTED",
            "message": "IP address 1.2.3.4 is not in the allowlist for this API key.",
            "details": {"ip": "1.2.3.4"},
        })
    );
}

#[test]
fn model_refusals_name_the_model_and_param() {
    let res = Format::OpenAi.response(
        &Rejection::model_not_allowed("infe-titan"),
        &RenderContext::new(),
    );
    assert_eq!(res.status(), 403);
    assert_eq!(
        body(&res),
        json!({"error": {
            "message": "Your plan does not have access to the model `infe-titan`. Upgrade your plan to use it.",
            "type": "permission_error",
            "param": "model",
            "code": "model_not_allowed",
        }})
    );
    let res = Format::OpenAi.response(&Rejection::model_not_found("gpt-9"), &RenderContext::new());
    assert_eq!(res.status(), 404);
    assert_eq!(
        body(&res)["error"]["message"],
        "The model `gpt-9` does not exist."
    );
}

#[test]
fn status_override_for_revoked_keys() {
    let r = Rejection::new(Reason::RevokedApiKey).with_status(StatusCode::UNAUTHORIZED);
    let res = Format::OpenAi.response(&r, &RenderContext::new());
    assert_eq!(res.status(), 401);
    assert_eq!(body(&res)["error"]["code"], "api_key_revoked");
    let res = Format::OpenAi.response(&r, &RenderContext::new().grpc(true));
    assert_eq!(res.headers()["grpc-status"], "16");
}

#[test]
fn backend_unavailable_says_when_to_retry() {
    let r: Rejection = tollgate::BackendError::new("redis at 10.0.0.1:6379 refused")
        .with_retry_after(Duration::from_secs(2))
        .into();
    let res = Format::OpenAi.response(&r, &RenderContext::new());
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "2");
    assert!(!String::from_utf8_lossy(res.body()).contains("10.0.0.1"));
}

#[test]
fn format_names_parse() {
    for name in ["openai", "envelope", "problem"] {
        assert_eq!(name.parse::<Format>().unwrap().name(), name);
    }
    assert_eq!(
        "xml".parse::<Format>().unwrap_err().to_string(),
        "unknown error format `xml`: expected `openai`, `envelope` or `problem`"
    );
}

/// The README's rejection table is generated from the same facts the code uses.
#[test]
fn readme_table_matches() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for &(reason, status, ty, code, env_code, env_status, grpc) in TABLE {
        let row = format!("| `{code}` | {status} | `{ty}` | {env_status} `{env_code}` | {grpc} |");
        assert!(
            readme.contains(&row),
            "README lacks the row for {reason:?}:\n{row}"
        );
    }
}
