//! Error formats: how a [`Rejection`] becomes a status, headers and a body.
//!
//! Three formats ship, the OpenAI-compatible one is the default:
//!
//! | format | body |
//! |---|---|
//! | [`Format::OpenAi`] | `{"error":{"message","type","param","code"}}` |
//! | [`Format::Envelope`] | `{"success":false,"statusCode","error":{"code","message","details"},"timestamp","path"}` |
//! | [`Format::Problem`] | RFC 9457 `application/problem+json` |
//!
//! Whatever the format, a request whose `content-type` is `application/grpc*` gets a gRPC status
//! (a trailers-only response with `grpc-status` and `grpc-message`), see [`grpc_code`].
//! Plug your own format by implementing [`ErrorFormat`] and passing [`Format::custom`].
//!
//! # Example
//!
//! ```
//! use tollgate::format::{Format, RenderContext};
//! use tollgate::Rejection;
//!
//! let format: Format = "envelope".parse().unwrap();
//! let response = format.response(&Rejection::insufficient_credits(30, 10), &RenderContext::new().path("/api/tasks"));
//! assert_eq!(response.status(), 400);
//! let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
//! assert_eq!(body["error"]["code"], "INSUFFICIENT_CREDITS");
//! assert_eq!(body["error"]["details"]["required"], 30);
//! ```

mod catalog;
mod envelope;
mod grpc;
mod openai;
mod problem;

use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

pub use catalog::{ErrorCatalog, ErrorCode, ErrorOverride};
pub use envelope::Envelope;
pub use grpc::grpc_code;
pub use openai::OpenAi;
pub use problem::{Problem, PROBLEM_TYPE_PREFIX};

use crate::rejection::{ceil_millis, ceil_secs, Rejection};

/// What a format needs to know about the request being refused.
#[derive(Clone, Copy, Debug)]
pub struct RenderContext<'a> {
    path: Option<&'a str>,
    request_id: Option<&'a str>,
    now: Option<SystemTime>,
    grpc: bool,
    error_override: Option<&'a ErrorOverride>,
}

impl Default for RenderContext<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> RenderContext<'a> {
    /// An empty context.
    pub const fn new() -> Self {
        RenderContext {
            path: None,
            request_id: None,
            now: None,
            grpc: false,
            error_override: None,
        }
    }

    /// The request's path (the envelope's `path`, the problem's `instance`).
    #[must_use]
    pub fn path(mut self, path: &'a str) -> Self {
        self.path = Some(path);
        self
    }

    /// The request id.
    #[must_use]
    pub fn request_id(mut self, id: &'a str) -> Self {
        self.request_id = Some(id);
        self
    }

    /// The time of the refusal (the envelope's `timestamp`); now when unset.
    #[must_use]
    pub fn now(mut self, now: SystemTime) -> Self {
        self.now = Some(now);
        self
    }

    /// Answer with a gRPC status whatever the format.
    #[must_use]
    pub fn grpc(mut self, grpc: bool) -> Self {
        self.grpc = grpc;
        self
    }

    /// Present the refusal as `entry` says (its status, `type` and `code`; see
    /// [`ErrorCatalog`], which sets it and has already applied its message and `param` to the
    /// rejection). A custom [`ErrorFormat`] reads it with
    /// [`get_error_override`](Self::get_error_override).
    #[must_use]
    pub fn error_override(mut self, entry: &'a ErrorOverride) -> Self {
        self.error_override = Some(entry);
        self
    }

    /// The catalog entry of the refusal being rendered, if any.
    pub fn get_error_override(&self) -> Option<&'a ErrorOverride> {
        self.error_override
    }

    /// The status an entry of the catalog sets, if any.
    pub fn status_override(&self) -> Option<StatusCode> {
        self.error_override.and_then(ErrorOverride::get_status)
    }

    /// The request's path, if known.
    pub fn get_path(&self) -> Option<&'a str> {
        self.path
    }

    /// The request id, if known.
    pub fn get_request_id(&self) -> Option<&'a str> {
        self.request_id
    }

    /// The time of the refusal.
    pub fn get_now(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }

    /// Whether the request is a gRPC call.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }
}

/// A rendered error: status, content type and body.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `content-type`.
    pub content_type: HeaderValue,
    /// The body.
    pub body: Bytes,
}

/// A way to render rejections; implement it to plug your own body shape.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::HeaderValue;
/// use tollgate::format::{ErrorFormat, Format, RenderContext, Rendered};
/// use tollgate::Rejection;
///
/// struct PlainText;
///
/// impl ErrorFormat for PlainText {
///     fn render(&self, rejection: &Rejection, _cx: &RenderContext<'_>) -> Rendered {
///         Rendered {
///             status: rejection.status(),
///             content_type: HeaderValue::from_static("text/plain"),
///             body: Bytes::from(format!("{}: {}", rejection.code(), rejection.message())),
///         }
///     }
///     fn recognizes(&self, content_type: Option<&str>, _body: &[u8]) -> bool {
///         content_type == Some("text/plain")
///     }
/// }
///
/// let format = Format::custom(PlainText);
/// let res = format.response(&tollgate::Reason::NotFound.into(), &RenderContext::new());
/// assert_eq!(res.status(), 404);
/// assert!(res.body().starts_with(b"not_found: "));
/// ```
pub trait ErrorFormat: Send + Sync + 'static {
    /// Render a rejection.
    fn render(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Rendered;

    /// Whether an error body the inner service produced is already in this format
    /// (then [`Normalize`](crate::normalize::Normalize) passes it through untouched).
    fn recognizes(&self, content_type: Option<&str>, body: &[u8]) -> bool;
}

/// The error format of a chain. The default is [`Format::OpenAi`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Format {
    /// The OpenAI-compatible body, see [`OpenAi`].
    #[default]
    OpenAi,
    /// The FirebirdGen-style envelope, see [`Envelope`].
    Envelope,
    /// RFC 9457 problem details, see [`Problem`].
    Problem,
    /// A format of your own.
    Custom(Arc<dyn ErrorFormat>),
}

impl Format {
    /// A format of your own.
    pub fn custom(format: impl ErrorFormat) -> Self {
        Format::Custom(Arc::new(format))
    }

    /// The name this format is parsed from (`custom` for a custom one).
    pub fn name(&self) -> &'static str {
        match self {
            Format::OpenAi => "openai",
            Format::Envelope => "envelope",
            Format::Problem => "problem",
            Format::Custom(_) => "custom",
        }
    }

    /// Whether rendering in this format uses the request's path (so it must be kept).
    pub(crate) fn uses_path(&self) -> bool {
        !matches!(self, Format::OpenAi)
    }

    fn inner(&self) -> &dyn ErrorFormat {
        match self {
            Format::OpenAi => &OpenAi,
            Format::Envelope => &Envelope,
            Format::Problem => &Problem,
            Format::Custom(f) => f.as_ref(),
        }
    }

    /// The complete response for a rejection: status, `content-type`, retry guidance
    /// (`retry-after`, `retry-after-ms`, `x-should-retry`, following the final status) and
    /// body, with the rejection in the response's extensions. A gRPC context gets a
    /// trailers-only gRPC status instead (mapped from the final status, see [`grpc_code`]).
    pub fn response(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Response<Bytes> {
        let mut response = if cx.is_grpc() {
            grpc::response(
                rejection,
                cx.status_override().unwrap_or(rejection.status()),
            )
        } else {
            let Rendered {
                status,
                content_type,
                body,
            } = self.render(rejection, cx);
            let mut response = Response::new(body);
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
            let retry = rejection.should_retry_at(status);
            response.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
            if let Some(wait) = rejection.retry_after() {
                if matches!(status.as_u16(), 429 | 503) {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
                    response
                        .headers_mut()
                        .insert("retry-after-ms", HeaderValue::from(ceil_millis(wait)));
                }
            }
            response
        };
        response.extensions_mut().insert(rejection.clone());
        response
    }
}

impl ErrorFormat for Format {
    fn render(&self, rejection: &Rejection, cx: &RenderContext<'_>) -> Rendered {
        self.inner().render(rejection, cx)
    }

    fn recognizes(&self, content_type: Option<&str>, body: &[u8]) -> bool {
        self.inner().recognizes(content_type, body)
    }
}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for an unknown format name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownFormat(String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown error format `{}`: expected `openai`, `envelope` or `problem`",
            self.0
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Format::OpenAi),
            "envelope" => Ok(Format::Envelope),
            "problem" => Ok(Format::Problem),
            other => Err(UnknownFormat(other.chars().take(64).collect())),
        }
    }
}

/// Whether a JSON content type (`application/json`, `application/problem+json`, ...).
pub(crate) fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
            || (essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case("+json"))
    })
}

fn json_body(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a serde_json::Value always serializes"))
}
