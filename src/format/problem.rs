use http::HeaderValue;
use serde_json::{Map, Value};

use super::{json_body, ErrorFormat, RenderContext, Rendered};
use crate::{rejection::ceil_secs, Rejection};

/// RFC 9457 problem details (`application/problem+json`).
///
/// ```json
/// {"type":"urn:tollgate:error:insufficient_quota","title":"Payment Required","status":402,
///  "detail":"Insufficient balance: ...","instance":"/v1/chat/completions",
///  "code":"insufficient_quota","details":{"required":30,"available":10}}
/// ```
///
/// Extension members: `code` (the stable code), `param`, `details`, `retry_after` (seconds) and
/// `request_id` when known. An [`ErrorCatalog`](super::ErrorCatalog) entry's `type` replaces the
/// `type` URI as given, its `code` the `code` member, its status `status` and `title`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Problem;

/// The prefix of a problem's `type` URI; the stable code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:tollgate:error:";

impl ErrorFormat for Problem {
    fn render(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Rendered {
        let entry = cx.get_error_override();
        let status = cx.status_override().unwrap_or(rejection.status());
        let mut body = Map::new();
        body.insert(
            "type".into(),
            match entry.and_then(|e| e.get_error_type()) {
                Some(uri) => uri.into(),
                None => format!("{PROBLEM_TYPE_PREFIX}{}", rejection.code()).into(),
            },
        );
        body.insert(
            "title".into(),
            status.canonical_reason().unwrap_or("Error").into(),
        );
        body.insert("status".into(), status.as_u16().into());
        body.insert("detail".into(), rejection.message().into());
        if let Some(path) = cx.get_path() {
            body.insert("instance".into(), path.into());
        }
        body.insert(
            "code".into(),
            entry
                .and_then(|e| e.get_code())
                .map_or_else(|| rejection.code().into(), |c| c.to_json()),
        );
        if let Some(param) = rejection.param() {
            body.insert("param".into(), param.into());
        }
        if let Some(details) = rejection.details() {
            body.insert("details".into(), Value::Object(details.clone()));
        }
        if let Some(wait) = rejection.retry_after() {
            body.insert("retry_after".into(), ceil_secs(wait).into());
        }
        if let Some(id) = cx.get_request_id() {
            body.insert("request_id".into(), id.into());
        }
        Rendered {
            status,
            content_type: HeaderValue::from_static("application/problem+json"),
            body: json_body(&Value::Object(body)),
        }
    }

    fn recognizes(&self, content_type: Option<&str>, _body: &[u8]) -> bool {
        content_type.is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/problem+json")
        })
    }
}
