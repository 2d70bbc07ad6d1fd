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
/// `code` is the rejection's stable code, `param` is `null` when absent. The status is the
/// rejection's: 402 for an empty wallet, 403 for a disabled or revoked key. An
/// [`ErrorCatalog`](super::ErrorCatalog) entry changes the status, `type` and `code` (a string or
/// a JSON number).
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAi;

impl ErrorFormat for OpenAi {
    fn render(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Rendered {
        let entry = cx.get_error_override();
        let error_type = entry
            .and_then(|e| e.get_error_type())
            .unwrap_or(rejection.reason().error_type());
        let code = entry
            .and_then(|e| e.get_code())
            .map_or_else(|| Value::from(rejection.code()), |c| c.to_json());
        Rendered {
            status: cx.status_override().unwrap_or(rejection.status()),
            content_type: HeaderValue::from_static("application/json"),
            body: json_body(&json!({
                "error": {
                    "message": rejection.message(),
                    "type": error_type,
                    "param": rejection.param(),
                    "code": code,
                }
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
        matches!(top.get("error"), Some(Value::Object(e)) if e.get("message").is_some_and(Value::is_string))
    }
}
