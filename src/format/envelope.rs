use http::{HeaderValue, StatusCode};
use serde_json::{json, Map, Value};

use super::{is_json, json_body, ErrorFormat, RenderContext, Rendered};
use crate::{rejection::ceil_secs, Reason, Rejection};

/// The envelope of FirebirdGen's API (`shared/reference/004`), with that document's codes and
/// statuses.
///
/// ```json
/// {"success":false,"statusCode":400,
///  "error":{"code":"INSUFFICIENT_CREDITS","message":"...","details":{"required":30,"available":10}},
///  "timestamp":"2024-10-24T10:00:00.000Z","path":"/api/tasks"}
/// ```
///
/// Every API-key failure is `INVALID_API_KEY` (401) as in that document, with the precise
/// tollgate code in `details.reason`; `INSUFFICIENT_CREDITS` is 400; `IP_NOT_WHITELISTED` and
/// `ACCOUNT_FROZEN` are 403; rate limits carry `error.retryAfter` in whole seconds. An
/// [`ErrorCatalog`](super::ErrorCatalog) entry's status and `code` replace these (the envelope
/// has no `type`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Envelope;

impl Envelope {
    /// The envelope's code and status for a rejection.
    pub fn code_and_status(rejection: &Rejection) -> (String, StatusCode) {
        let fixed = |code: &str, status: u16| {
            (
                code.to_owned(),
                StatusCode::from_u16(status).expect("valid status"),
            )
        };
        match rejection.reason() {
            Reason::MissingApiKey
            | Reason::MalformedApiKey
            | Reason::ApiKeyWhitespace
            | Reason::InvalidApiKey
            | Reason::ExpiredApiKey
            | Reason::DisabledApiKey
            | Reason::RevokedApiKey => fixed("INVALID_API_KEY", 401),
            Reason::AccountFrozen => fixed("ACCOUNT_FROZEN", 403),
            Reason::IpNotAllowed => fixed("IP_NOT_WHITELISTED", 403),
            Reason::InsufficientCredits => fixed("INSUFFICIENT_CREDITS", 400),
            Reason::RateLimited | Reason::TooManyAuthFailures => fixed("RATE_LIMIT_EXCEEDED", 429),
            Reason::BadRequest => ("INVALID_PARAMETERS".to_owned(), rejection.status()),
            other => (other.code().to_ascii_uppercase(), rejection.status()),
        }
    }
}

impl ErrorFormat for Envelope {
    fn render(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Rendered {
        let (code, status) = Envelope::code_and_status(rejection);
        let entry = cx.get_error_override();
        let status = cx.status_override().unwrap_or(status);
        let mut error = Map::new();
        error.insert(
            "code".into(),
            entry
                .and_then(|e| e.get_code())
                .map_or_else(|| Value::String(code.clone()), |c| c.to_json()),
        );
        error.insert("message".into(), rejection.message().into());
        let mut details = rejection.details().cloned().unwrap_or_default();
        if code == "INVALID_API_KEY" && rejection.reason() != Reason::InvalidApiKey {
            details.insert("reason".into(), rejection.code().into());
        }
        if let Some(param) = rejection.param() {
            details.insert("param".into(), param.into());
        }
        if !details.is_empty() {
            error.insert("details".into(), Value::Object(details));
        }
        if let Some(wait) = rejection.retry_after() {
            error.insert("retryAfter".into(), ceil_secs(wait).into());
        }
        let timestamp = humantime::format_rfc3339_millis(cx.get_now()).to_string();
        Rendered {
            status,
            content_type: HeaderValue::from_static("application/json"),
            body: json_body(&json!({
                "success": false,
                "statusCode": status.as_u16(),
                "error": error,
                "timestamp": timestamp,
                "path": cx.get_path().unwrap_or("/"),
            })),
        }
    }

    fn recognizes(&self, content_type: Option<&str>, body: &[u8]) -> bool {
        if !is_json(content_type) {
            return false;
        }
        let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        top.get("success") == Some(&Value::Bool(false))
            && matches!(top.get("error"), Some(Value::Object(e)) if e.get("code").is_some_and(Value::is_string))
    }
}
