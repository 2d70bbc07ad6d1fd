use bytes::Bytes;
use http::HeaderValue;
use serde_json::{json, Value};

use super::{is_json, json_body, ErrorFormat, RenderContext, Rendered};
use crate::Rejection;

/// The OpenAI-compatible body, the default format.
///
/// ```json
/// {"error":{"message":"Insufficient balance. ...","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}
/// ```
///
/// `code` is always a string (the rejection's stable code), `param` is `null` when absent. The
/// status is the rejection's: 402 for an empty wallet, 403 for a disabled or revoked key.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAi;

impl ErrorFormat for OpenAi {
    fn render(&self, rejection: &Rejection, _cx: &RenderContext<'_>) -> Rendered {
        Rendered {
            status: rejection.status(),
            content_type: HeaderValue::from_static("application/json"),
            body: render(rejection),
        }
    }

    fn recognizes(&self, content_type: Option<&str>, body: &[u8]) -> bool {
        if !is_json(content_type) {
            return false;
        }
        let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        matches!(top.get("error"), Some(Value::Object(e)) if e.get("message").is_some_and(Value::is_string))
    }
}

pub(crate) fn render(rejection: &Rejection) -> Bytes {
    json_body(&json!({
        "error": {
            "message": rejection.message(),
            "type": rejection.reason().error_type(),
            "param": rejection.param(),
            "code": rejection.code(),
        }
    }))
}
