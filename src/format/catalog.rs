//! The error catalog: per tollgate code, the status, `type`, `code`, message and `param` a
//! provider documents.

use std::{borrow::Cow, collections::HashMap, fmt};

use http::{Response, StatusCode};
use serde_json::Value;

use super::{Format, RenderContext};
use crate::{rejection::ceil_secs, Reason, Rejection};

/// The `code` of an error body: a string (`"insufficient_quota"`) or an integer rendered as a
/// JSON number (`402`).
///
/// # Example
///
/// ```
/// use tollgate::format::ErrorCode;
///
/// assert_eq!(ErrorCode::from(402).to_json(), serde_json::json!(402));
/// assert_eq!(ErrorCode::from("insufficient_balance").to_json(), serde_json::json!("insufficient_balance"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// A string code.
    Text(Cow<'static, str>),
    /// An integer code, rendered as a JSON number.
    Number(i64),
}

impl ErrorCode {
    /// The code as a JSON value (a string or a number).
    pub fn to_json(&self) -> Value {
        match self {
            ErrorCode::Text(text) => Value::String(text.to_string()),
            ErrorCode::Number(n) => Value::from(*n),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Text(text) => f.write_str(text),
            ErrorCode::Number(n) => write!(f, "{n}"),
        }
    }
}

impl From<&'static str> for ErrorCode {
    fn from(text: &'static str) -> Self {
        ErrorCode::Text(Cow::Borrowed(text))
    }
}

impl From<String> for ErrorCode {
    fn from(text: String) -> Self {
        ErrorCode::Text(Cow::Owned(text))
    }
}

impl From<i64> for ErrorCode {
    fn from(n: i64) -> Self {
        ErrorCode::Number(n)
    }
}

impl From<i32> for ErrorCode {
    fn from(n: i32) -> Self {
        ErrorCode::Number(n.into())
    }
}

/// How one tollgate code is presented: every field left unset keeps the format's default.
///
/// The message may name values of the refusal in braces: `{retry_after}` (whole seconds,
/// rounded up), `{message}` (tollgate's own message, e.g. what is wrong with a parameter),
/// `{code}` (the tollgate code) and any of its details (`{required}`, `{available}`, `{ip}`,
/// `{limit}`, ...); a name the refusal does not carry is left as written.
///
/// # Example
///
/// ```
/// use http::StatusCode;
/// use tollgate::{format::ErrorOverride, Rejection};
///
/// let entry = ErrorOverride::new()
///     .status(StatusCode::BAD_REQUEST)
///     .message("Need {required} credits, have {available}.");
/// assert_eq!(entry.get_status(), Some(StatusCode::BAD_REQUEST));
/// assert_eq!(
///     entry.render_message(&Rejection::insufficient_credits(30, 10)),
///     "Need 30 credits, have 10."
/// );
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorOverride {
    status: Option<StatusCode>,
    error_type: Option<Cow<'static, str>>,
    code: Option<ErrorCode>,
    message: Option<Cow<'static, str>>,
    param: Option<Cow<'static, str>>,
}

impl ErrorOverride {
    /// Nothing overridden.
    pub const fn new() -> Self {
        ErrorOverride {
            status: None,
            error_type: None,
            code: None,
            message: None,
            param: None,
        }
    }

    /// The HTTP status (also the envelope's `statusCode`, the problem's `status` and the gRPC
    /// status it maps to).
    ///
    /// # Panics
    ///
    /// When `status` is not an error status (400–599).
    #[must_use]
    pub fn status(mut self, status: StatusCode) -> Self {
        assert!(
            status.is_client_error() || status.is_server_error(),
            "an error status is 400-599, not {status}"
        );
        self.status = Some(status);
        self
    }

    /// The OpenAI body's `type` (the problem's `type` URI in problem details; the envelope has
    /// no type).
    #[must_use]
    pub fn error_type(mut self, error_type: impl Into<Cow<'static, str>>) -> Self {
        self.error_type = Some(error_type.into());
        self
    }

    /// The body's `code` (OpenAI `code`, envelope `error.code`, problem `code`): a string or an
    /// integer.
    #[must_use]
    pub fn code(mut self, code: impl Into<ErrorCode>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The human message (see the type docs for `{placeholders}`).
    #[must_use]
    pub fn message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The `param` (the request field at fault).
    #[must_use]
    pub fn param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The status, if overridden.
    pub fn get_status(&self) -> Option<StatusCode> {
        self.status
    }

    /// The `type`, if overridden.
    pub fn get_error_type(&self) -> Option<&str> {
        self.error_type.as_deref()
    }

    /// The `code`, if overridden.
    pub fn get_code(&self) -> Option<&ErrorCode> {
        self.code.as_ref()
    }

    /// The message template, if overridden.
    pub fn get_message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// The `param`, if overridden.
    pub fn get_param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The message for `rejection`: the template with its `{placeholders}` filled, or the
    /// rejection's own message when none is set.
    pub fn render_message<'r>(&self, rejection: &'r Rejection) -> Cow<'r, str> {
        match &self.message {
            None => Cow::Borrowed(rejection.message()),
            Some(template) => Cow::Owned(fill(template, rejection)),
        }
    }

    /// The rejection as this entry presents it: its message and `param` replaced (what every
    /// format, custom ones included, renders).
    pub(crate) fn apply(&self, rejection: &Rejection) -> Rejection {
        let mut out = rejection.clone();
        if self.message.is_some() {
            out = out.with_message(self.render_message(rejection).into_owned());
        }
        if let Some(param) = &self.param {
            out = out.with_param(param.clone());
        }
        out
    }
}

/// `{name}` → the rejection's detail `name` or `retry_after`; anything else stays as written.
fn fill(template: &str, rejection: &Rejection) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            rest = &rest[open..];
            break;
        };
        let name = &after[..close];
        let value = match name {
            "retry_after" => rejection.retry_after().map(|d| ceil_secs(d).to_string()),
            "code" => Some(rejection.code().to_owned()),
            "message" => Some(rejection.message().to_owned()),
            _ => rejection
                .details()
                .and_then(|d| d.get(name))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
        };
        match value {
            Some(value) => out.push_str(&value),
            None => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Per tollgate code, how a refusal is presented: a provider's documented contract.
///
/// Consulted only when a refusal (or an upstream error the chain normalizes) is rendered, never
/// on the allowed path. Give it to [`NormalizeLayer::catalog`](crate::normalize::NormalizeLayer::catalog),
/// or render with [`ErrorCatalog::response`].
///
/// # Example
///
/// ```
/// use http::StatusCode;
/// use tollgate::format::{ErrorCatalog, ErrorOverride, Format, RenderContext};
/// use tollgate::{Reason, Rejection};
///
/// let catalog = ErrorCatalog::new().with(
///     Reason::InsufficientCredits,
///     ErrorOverride::new()
///         .error_type("insufficient_balance")
///         .code(402)
///         .message("Insufficient balance. Please top up your account."),
/// );
/// let response = catalog.response(
///     &Format::OpenAi,
///     &Rejection::insufficient_credits(30, 10),
///     &RenderContext::new(),
/// );
/// assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
/// let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
/// assert_eq!(body["error"]["type"], "insufficient_balance");
/// assert_eq!(body["error"]["code"], 402);
/// assert_eq!(body["error"]["message"], "Insufficient balance. Please top up your account.");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorCatalog {
    entries: HashMap<Reason, ErrorOverride>,
}

impl ErrorCatalog {
    /// An empty catalog: every code as the format renders it.
    pub fn new() -> Self {
        ErrorCatalog::default()
    }

    /// Set the entry of `reason` (replacing any).
    #[must_use]
    pub fn with(mut self, reason: Reason, entry: ErrorOverride) -> Self {
        self.set(reason, entry);
        self
    }

    /// Set the entry of `reason` (replacing any).
    pub fn set(&mut self, reason: Reason, entry: ErrorOverride) {
        self.entries.insert(reason, entry);
    }

    /// The entry of `reason`, creating an empty one.
    pub fn entry_mut(&mut self, reason: Reason) -> &mut ErrorOverride {
        self.entries.entry(reason).or_default()
    }

    /// The entry of `reason`, if any.
    pub fn get(&self, reason: Reason) -> Option<&ErrorOverride> {
        self.entries.get(&reason)
    }

    /// Whether no code is overridden.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The complete response for `rejection` in `format`, as this catalog presents it; see
    /// [`Format::response`].
    pub fn response(
        &self,
        format: &Format,
        rejection: &Rejection,
        cx: &RenderContext<'_>,
    ) -> Response<bytes::Bytes> {
        match self.get(rejection.reason()) {
            Some(entry) => format.response(&entry.apply(rejection), &cx.error_override(entry)),
            None => format.response(rejection, cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::LimitKind;

    #[test]
    fn placeholders_are_filled_from_details_and_retry_after() {
        let entry = ErrorOverride::new().message(
            "Too many requests, please try again in {retry_after} seconds ({limit}, {nope}) {",
        );
        let rejection = Rejection::rate_limited(LimitKind::Requests, Duration::from_millis(59_001));
        assert_eq!(
            entry.render_message(&rejection),
            "Too many requests, please try again in 60 seconds (requests, {nope}) {"
        );
        let ip = ErrorOverride::new().message("IP address {ip} is not in the whitelist");
        assert_eq!(
            ip.render_message(&Rejection::ip_not_allowed([1, 2, 3, 4].into())),
            "IP address 1.2.3.4 is not in the whitelist"
        );
    }

    #[test]
    #[should_panic(expected = "400-599")]
    fn a_success_status_is_refused() {
        let _ = ErrorOverride::new().status(StatusCode::OK);
    }
}
