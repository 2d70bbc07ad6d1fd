//! Reading what an OpenAI-style JSON request asks for, without losing the body.
//!
//! Several layers need to know the `model`, the `max_tokens` or the prompt size of a request
//! before calling the inner service (plan scopes, token rate limits, credit holds). The first one
//! that needs it calls [`inspect`]: the body is read up to a bound, parsed once, described by an
//! [`LlmRequest`] in the request's extensions, and replayed to the inner service by
//! [`InspectedBody`]. Later layers find the extension and do not read again.
//!
//! # Example
//!
//! ```
//! use http::Request;
//! use tollgate::inspect::{inspect, LlmRequest};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let body = r#"{"model":"small","max_tokens":100,"messages":[{"role":"user","content":"Hello"}]}"#;
//! let request = Request::post("/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(http_body_util::Full::new(bytes::Bytes::from(body)))
//!     .unwrap();
//! let request = inspect(request, 1 << 20).await.unwrap();
//! let llm = request.extensions().get::<LlmRequest>().unwrap();
//! assert_eq!(llm.model.as_deref(), Some("small"));
//! assert_eq!(llm.max_tokens, Some(100));
//! // The inner service still gets every byte.
//! use http_body_util::BodyExt;
//! let replayed = request.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(replayed, body.as_bytes());
//! # }
//! ```

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use serde_json::Value;

use crate::{BoxError, Reason, Rejection};

/// The default bound on an inspected body: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What an OpenAI-style JSON request asks for. In the request's extensions after [`inspect`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LlmRequest {
    /// The `model` field.
    pub model: Option<Arc<str>>,
    /// `max_tokens` or `max_completion_tokens`: the larger when both are given (an upstream may
    /// read either), `None` when absent or 0 (which some servers read as "no limit").
    pub max_tokens: Option<u64>,
    /// Completions asked for: the larger of `n` and `best_of`, at least 1. A call may produce
    /// `max_tokens` tokens for each.
    pub choices: u64,
    /// Characters of prompt text (`messages[].content`, `prompt`, `input`).
    pub prompt_chars: u64,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// The body's length in bytes.
    pub body_len: u64,
}

impl LlmRequest {
    /// An estimate of the prompt's tokens: one token per four characters, rounded up.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        self.prompt_chars.div_ceil(4)
    }

    /// Parse a JSON body. Wrong types of the fields tollgate reads are a 400 naming the field.
    pub fn from_json(body: &[u8]) -> Result<LlmRequest, Rejection> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            Rejection::new(Reason::InvalidJson).with_message(format!(
                "The request body is not valid JSON: {} at line {} column {}.",
                match e.classify() {
                    serde_json::error::Category::Eof => "unexpected end of input",
                    serde_json::error::Category::Syntax => "syntax error",
                    serde_json::error::Category::Data => "invalid data",
                    serde_json::error::Category::Io => "read error",
                },
                e.line(),
                e.column()
            ))
        })?;
        let Value::Object(object) = value else {
            return Err(Rejection::new(Reason::BadRequest)
                .with_message("The request body must be a JSON object."));
        };
        let wrong = |field: &'static str, expected: &str| {
            Rejection::new(Reason::BadRequest)
                .with_message(format!("`{field}` must be {expected}."))
                .with_param(field)
        };
        let model = match object.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Arc::from(s.as_str())),
            Some(_) => return Err(wrong("model", "a string")),
        };
        let mut max_tokens: Option<u64> = None;
        for field in ["max_tokens", "max_completion_tokens"] {
            match object.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(0) => {}
                    Some(n) => max_tokens = Some(max_tokens.map_or(n, |m| m.max(n))),
                    None => return Err(wrong(field, "a non-negative integer")),
                },
            }
        }
        let mut choices = 1u64;
        for field in ["n", "best_of"] {
            match object.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) => choices = choices.max(n),
                    None => return Err(wrong(field, "a non-negative integer")),
                },
            }
        }
        let stream = match object.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(wrong("stream", "a boolean")),
        };
        let include_usage = object
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut prompt_chars = 0u64;
        if let Some(Value::Array(messages)) = object.get("messages") {
            for message in messages {
                prompt_chars += text_chars(message.get("content").unwrap_or(&Value::Null));
            }
        }
        for field in ["prompt", "input"] {
            if let Some(v) = object.get(field) {
                prompt_chars += text_chars(v);
            }
        }
        Ok(LlmRequest {
            model,
            max_tokens,
            choices,
            prompt_chars,
            stream,
            include_usage,
            body_len: body.len() as u64,
        })
    }
}

/// Characters of text in a content value: a string, an array of strings or of `{"text": ..}`.
fn text_chars(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Object(o) => o.get("text").map_or(0, text_chars),
                other => text_chars(other),
            })
            .sum(),
        _ => 0,
    }
}

/// The body bytes [`inspect`] read, in the request's extensions (a cheap, shared copy).
#[derive(Clone, Debug)]
pub(crate) struct InspectedBytes(pub(crate) Bytes);

/// Whether [`inspect`] would read this request's body: a POST, PUT or PATCH with a JSON content
/// type, not inspected yet.
pub fn wants_inspection<B>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    ) && request.extensions().get::<LlmRequest>().is_none()
        && crate::format::is_json(
            request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        )
}

/// Whether a request carries a body tollgate cannot read: a POST, PUT or PATCH whose content
/// type is not JSON (or is missing) and whose body is not known to be empty.
///
/// A layer that must read the body to decide (a model restriction, a price per model or per
/// token) refuses such a request with 415 `unsupported_media_type` rather than let it through
/// unchecked: an upstream that parses the body whatever its content type would otherwise serve a
/// model the plan does not include, or serve it unpriced.
///
/// # Example
///
/// ```
/// use http::Request;
/// use tollgate::inspect::has_unreadable_body;
///
/// let json = Request::post("/v1/chat/completions")
///     .header("content-type", "application/json")
///     .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
///     .unwrap();
/// assert!(!has_unreadable_body(&json));
/// let text = Request::post("/v1/chat/completions")
///     .header("content-type", "text/plain")
///     .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
///     .unwrap();
/// assert!(has_unreadable_body(&text));
/// ```
pub fn has_unreadable_body<B: Body>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    ) && request.extensions().get::<LlmRequest>().is_none()
        && request.body().size_hint().exact() != Some(0)
        && !crate::format::is_json(
            request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        )
}

/// Read and describe a JSON request body, bounded by `limit` bytes. See the [module docs](self).
///
/// Requests that [`wants_inspection`] refuses pass through unread. A body over the limit is a
/// 413 `payload_too_large`, invalid JSON a 400 `invalid_json`, a wrong field type a 400 naming
/// the field.
pub async fn inspect<B>(
    request: Request<B>,
    limit: usize,
) -> Result<Request<InspectedBody<B>>, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if !wants_inspection(&request) {
        return Ok(request.map(InspectedBody::new));
    }
    let too_large = || {
        Rejection::new(Reason::PayloadTooLarge)
            .with_message(format!("The request body is larger than {limit} bytes."))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let (mut parts, body) = request.into_parts();
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(Rejection::new(Reason::BadRequest)
                .with_message("The request body could not be read."))
        }
    };
    let llm = LlmRequest::from_json(&bytes)?;
    parts.extensions.insert(llm);
    // The bytes, for layers further in that wrap this body again (an idempotency fingerprint).
    parts.extensions.insert(InspectedBytes(bytes.clone()));
    Ok(Request::from_parts(parts, InspectedBody::buffered(bytes)))
}

pin_project! {
    /// A request body after [`inspect`]: the original one, or the bytes that were read.
    pub struct InspectedBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Original { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

impl<B> InspectedBody<B> {
    /// The original body, unread.
    pub fn new(body: B) -> Self {
        InspectedBody {
            kind: Kind::Original { body },
        }
    }

    /// The bytes that were read, when [`inspect`] read the body (`None`: the original body,
    /// unread, or an empty one).
    pub fn buffered_bytes(&self) -> Option<&Bytes> {
        match &self.kind {
            Kind::Buffered { data } => data.as_ref(),
            Kind::Original { .. } => None,
        }
    }

    /// Bytes that were read from the original body.
    pub fn buffered(data: Bytes) -> Self {
        InspectedBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> Body for InspectedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Original { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Original { body } => body.is_end_stream(),
            Kind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Original { body } => body.size_hint(),
            Kind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for InspectedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Original { .. } => "InspectedBody::Original",
            Kind::Buffered { .. } => "InspectedBody::Buffered",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let r = LlmRequest::from_json(br#"{"model":3}"#).unwrap_err();
        assert_eq!(r.param(), Some("model"));
        let r = LlmRequest::from_json(br#"{"max_tokens":-1}"#).unwrap_err();
        assert_eq!(r.param(), Some("max_tokens"));
        let r = LlmRequest::from_json(b"{").unwrap_err();
        assert_eq!(r.reason(), Reason::InvalidJson);
        let r = LlmRequest::from_json(b"[1]").unwrap_err();
        assert_eq!(r.reason(), Reason::BadRequest);
    }

    #[test]
    fn prompt_chars_count_text_parts() {
        let r = LlmRequest::from_json(
            br#"{"messages":[{"content":"abcd"},{"content":[{"type":"text","text":"ef"}]}],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_chars, 6);
        assert_eq!(r.estimated_prompt_tokens(), 2);
        assert!(r.stream && r.include_usage);
    }
}
