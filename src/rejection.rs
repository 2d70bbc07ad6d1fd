//! The one error model: every refusal a tollgate layer can make.
//!
//! A [`Rejection`] carries a [`Reason`] (the stable machine code), a human message, an optional
//! `param`, optional structured details and an optional retry hint. A layer that refuses a request
//! never calls the inner service: it answers with a response that carries the `Rejection` in its
//! extensions and a default body in the OpenAI shape. [`Normalize`](crate::normalize::Normalize)
//! renders it again in the configured [`Format`](crate::format::Format).
//!
//! # Example
//!
//! ```
//! use tollgate::{Reason, Rejection};
//! use http::StatusCode;
//!
//! let rejection = Rejection::insufficient_credits(30, 10);
//! assert_eq!(rejection.reason(), Reason::InsufficientCredits);
//! assert_eq!(rejection.status(), StatusCode::PAYMENT_REQUIRED);
//! assert_eq!(rejection.code(), "insufficient_quota");
//! assert_eq!(rejection.details().unwrap()["required"], 30);
//! ```

use std::{borrow::Cow, fmt, net::IpAddr, time::Duration};

use http::StatusCode;
use serde_json::{Map, Value};

/// Why a request was refused: the stable machine code of a [`Rejection`].
///
/// The code, HTTP status and OpenAI `type` of each reason are part of tollgate's public contract
/// and never change between versions; new reasons may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// No API key in the request.
    MissingApiKey,
    /// An `Authorization` header with the wrong scheme or a malformed value, or several of them.
    MalformedApiKey,
    /// A key with leading or trailing whitespace (usually an environment variable with a newline).
    ApiKeyWhitespace,
    /// A well-formed key that matches no known key.
    InvalidApiKey,
    /// A key past its expiry time.
    ExpiredApiKey,
    /// A key an operator disabled.
    DisabledApiKey,
    /// A key an operator revoked.
    RevokedApiKey,
    /// The key's account is frozen.
    AccountFrozen,
    /// The key's account is blocked for another reason (given in the message).
    AccountBlocked,
    /// Too many failed authentications from one client IP.
    TooManyAuthFailures,
    /// The client IP is not allowed.
    IpNotAllowed,
    /// The caller's plan may not use the requested resource or model.
    ModelNotAllowed,
    /// The requested model does not exist.
    ModelNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The prepaid balance does not cover the request.
    InsufficientCredits,
    /// A rate limit (requests or tokens) is exhausted.
    RateLimited,
    /// The request is malformed.
    BadRequest,
    /// The request body is not valid JSON.
    InvalidJson,
    /// The request body has the wrong content type.
    UnsupportedMediaType,
    /// The request is well-formed but fails validation.
    ValidationFailed,
    /// The request conflicts with the state of a resource.
    Conflict,
    /// An `Idempotency-Key` was reused with a different request.
    IdempotencyKeyReused,
    /// A request with the same `Idempotency-Key` is still in progress.
    IdempotencyKeyInUse,
    /// The request with this `Idempotency-Key` was charged, but its answer was not kept (too
    /// large, cut short, or no longer kept), so it cannot be replayed.
    IdempotencyReplayUnavailable,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The inner service refused the request as unauthenticated (its own 401).
    Unauthorized,
    /// The inner service refused the request as forbidden (its own 403).
    Forbidden,
    /// An unexpected failure inside the service.
    Internal,
    /// The upstream answered with something unusable or could not be reached.
    BadGateway,
    /// The upstream is overloaded or unavailable.
    ServiceUnavailable,
    /// The upstream did not answer in time.
    GatewayTimeout,
    /// A tollgate backend (key store, ledger or limiter store) is unavailable.
    BackendUnavailable,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: &'static [Reason] = &[
        Reason::MissingApiKey,
        Reason::MalformedApiKey,
        Reason::ApiKeyWhitespace,
        Reason::InvalidApiKey,
        Reason::ExpiredApiKey,
        Reason::DisabledApiKey,
        Reason::RevokedApiKey,
        Reason::AccountFrozen,
        Reason::AccountBlocked,
        Reason::TooManyAuthFailures,
        Reason::IpNotAllowed,
        Reason::ModelNotAllowed,
        Reason::ModelNotFound,
        Reason::NotFound,
        Reason::MethodNotAllowed,
        Reason::InsufficientCredits,
        Reason::RateLimited,
        Reason::BadRequest,
        Reason::InvalidJson,
        Reason::UnsupportedMediaType,
        Reason::ValidationFailed,
        Reason::Conflict,
        Reason::IdempotencyKeyReused,
        Reason::IdempotencyKeyInUse,
        Reason::IdempotencyReplayUnavailable,
        Reason::PayloadTooLarge,
        Reason::Unauthorized,
        Reason::Forbidden,
        Reason::Internal,
        Reason::BadGateway,
        Reason::ServiceUnavailable,
        Reason::GatewayTimeout,
        Reason::BackendUnavailable,
    ];

    /// The stable machine code (the OpenAI body's `code`).
    pub const fn code(self) -> &'static str {
        match self {
            Reason::MissingApiKey => "missing_api_key",
            Reason::MalformedApiKey => "malformed_api_key",
            Reason::ApiKeyWhitespace => "api_key_whitespace",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::ExpiredApiKey => "expired_api_key",
            Reason::DisabledApiKey => "api_key_disabled",
            Reason::RevokedApiKey => "api_key_revoked",
            Reason::AccountFrozen => "account_frozen",
            Reason::AccountBlocked => "account_blocked",
            Reason::TooManyAuthFailures => "too_many_auth_failures",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::ModelNotFound => "model_not_found",
            Reason::NotFound => "not_found",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::InsufficientCredits => "insufficient_quota",
            Reason::RateLimited => "rate_limit_exceeded",
            Reason::BadRequest => "bad_request",
            Reason::InvalidJson => "invalid_json",
            Reason::UnsupportedMediaType => "unsupported_media_type",
            Reason::ValidationFailed => "validation_failed",
            Reason::Conflict => "conflict",
            Reason::IdempotencyKeyReused => "idempotency_key_reused",
            Reason::IdempotencyKeyInUse => "idempotency_key_in_use",
            Reason::IdempotencyReplayUnavailable => "idempotency_replay_unavailable",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::Unauthorized => "unauthorized",
            Reason::Forbidden => "permission_denied",
            Reason::Internal => "internal_error",
            Reason::BadGateway => "bad_gateway",
            Reason::ServiceUnavailable => "service_unavailable",
            Reason::GatewayTimeout => "gateway_timeout",
            Reason::BackendUnavailable => "backend_unavailable",
        }
    }

    /// The reason whose [`code`](Self::code) is `code`.
    ///
    /// ```
    /// use tollgate::Reason;
    /// assert_eq!(Reason::from_code("insufficient_quota"), Some(Reason::InsufficientCredits));
    /// assert_eq!(Reason::from_code("nope"), None);
    /// ```
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// The default HTTP status (the OpenAI-compatible one).
    pub const fn status(self) -> StatusCode {
        match self {
            Reason::MissingApiKey
            | Reason::MalformedApiKey
            | Reason::ApiKeyWhitespace
            | Reason::InvalidApiKey
            | Reason::ExpiredApiKey
            | Reason::Unauthorized => StatusCode::UNAUTHORIZED,
            Reason::DisabledApiKey
            | Reason::RevokedApiKey
            | Reason::AccountFrozen
            | Reason::AccountBlocked
            | Reason::IpNotAllowed
            | Reason::ModelNotAllowed
            | Reason::Forbidden => StatusCode::FORBIDDEN,
            Reason::TooManyAuthFailures | Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::ModelNotFound | Reason::NotFound => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
            Reason::BadRequest | Reason::InvalidJson => StatusCode::BAD_REQUEST,
            Reason::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::ValidationFailed | Reason::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Reason::Conflict
            | Reason::IdempotencyKeyInUse
            | Reason::IdempotencyReplayUnavailable => StatusCode::CONFLICT,
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::BadGateway => StatusCode::BAD_GATEWAY,
            Reason::ServiceUnavailable | Reason::BackendUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OpenAI body's `type`.
    pub const fn error_type(self) -> &'static str {
        match self {
            Reason::MissingApiKey
            | Reason::MalformedApiKey
            | Reason::ApiKeyWhitespace
            | Reason::InvalidApiKey
            | Reason::ExpiredApiKey
            | Reason::Unauthorized => "authentication_error",
            Reason::DisabledApiKey
            | Reason::RevokedApiKey
            | Reason::AccountFrozen
            | Reason::AccountBlocked
            | Reason::IpNotAllowed
            | Reason::ModelNotAllowed
            | Reason::Forbidden => "permission_error",
            Reason::TooManyAuthFailures | Reason::RateLimited => "rate_limit_error",
            Reason::ModelNotFound | Reason::NotFound => "not_found_error",
            Reason::InsufficientCredits => "insufficient_quota",
            Reason::MethodNotAllowed
            | Reason::BadRequest
            | Reason::InvalidJson
            | Reason::UnsupportedMediaType
            | Reason::ValidationFailed
            | Reason::Conflict
            | Reason::IdempotencyKeyReused
            | Reason::IdempotencyKeyInUse
            | Reason::IdempotencyReplayUnavailable
            | Reason::PayloadTooLarge => "invalid_request_error",
            Reason::Internal | Reason::BadGateway => "server_error",
            Reason::ServiceUnavailable | Reason::BackendUnavailable => "service_unavailable",
            Reason::GatewayTimeout => "gateway_timeout",
        }
    }

    /// The default human message.
    pub const fn default_message(self) -> &'static str {
        match self {
            Reason::MissingApiKey => "You didn't provide an API key. Pass it in the Authorization header as `Authorization: Bearer YOUR_KEY`.",
            Reason::MalformedApiKey => "The Authorization header is malformed. Use exactly one header of the form `Authorization: Bearer YOUR_KEY`.",
            Reason::ApiKeyWhitespace => "Your API key has leading or trailing whitespace. Check the environment variable that holds it for spaces or a trailing newline.",
            Reason::InvalidApiKey => "Incorrect API key provided. Check the key you are using, or create a new one.",
            Reason::ExpiredApiKey => "Your API key has expired. Create a new key to continue.",
            Reason::DisabledApiKey => "Your API key has been disabled.",
            Reason::RevokedApiKey => "Your API key has been revoked.",
            Reason::AccountFrozen => "Your account is frozen. Contact support to unfreeze it.",
            Reason::AccountBlocked => "Your account is blocked.",
            Reason::TooManyAuthFailures => "Too many failed authentication attempts from your IP address. Try again later.",
            Reason::IpNotAllowed => "Your IP address is not allowed to use this API key.",
            Reason::ModelNotAllowed => "Your plan does not have access to the requested resource.",
            Reason::ModelNotFound => "The requested model does not exist.",
            Reason::NotFound => "The requested endpoint does not exist. Check the base URL and the path.",
            Reason::MethodNotAllowed => "This endpoint does not support the request method.",
            Reason::InsufficientCredits => "Insufficient balance. Please top up your account.",
            Reason::RateLimited => "Rate limit exceeded. Please slow down.",
            Reason::BadRequest => "The request is malformed.",
            Reason::InvalidJson => "The request body is not valid JSON.",
            Reason::UnsupportedMediaType => "The request body has an unsupported content type. Send `Content-Type: application/json`.",
            Reason::ValidationFailed => "The request failed validation.",
            Reason::Conflict => "The request conflicts with the current state of the resource.",
            Reason::IdempotencyKeyReused => "This Idempotency-Key was already used with a different request.",
            Reason::IdempotencyKeyInUse => "A request with this Idempotency-Key is still in progress. Retry later.",
            Reason::IdempotencyReplayUnavailable => "The request with this Idempotency-Key was already processed and charged; its response cannot be replayed. Use a new Idempotency-Key.",
            Reason::PayloadTooLarge => "The request body is too large.",
            Reason::Unauthorized => "The request is not authenticated.",
            Reason::Forbidden => "You do not have permission to access this resource.",
            Reason::Internal => "An unexpected error occurred. Retry the request after a brief delay.",
            Reason::BadGateway => "The gateway could not get a valid response from the upstream service.",
            Reason::ServiceUnavailable => "The service is temporarily overloaded or unavailable. Retry after a short delay.",
            Reason::GatewayTimeout => "The upstream service did not respond in time.",
            Reason::BackendUnavailable => "A backend the gateway depends on is temporarily unavailable. Retry after a short delay.",
        }
    }

    /// The reason an error response of the inner service with this status stands for.
    ///
    /// Used to rewrite upstream errors that are not in the configured format.
    pub fn from_status(status: StatusCode) -> Reason {
        match status.as_u16() {
            400 => Reason::BadRequest,
            401 => Reason::Unauthorized,
            402 => Reason::InsufficientCredits,
            403 => Reason::Forbidden,
            404 => Reason::NotFound,
            405 => Reason::MethodNotAllowed,
            409 => Reason::Conflict,
            413 => Reason::PayloadTooLarge,
            415 => Reason::UnsupportedMediaType,
            422 => Reason::ValidationFailed,
            429 => Reason::RateLimited,
            502 => Reason::BadGateway,
            503 => Reason::ServiceUnavailable,
            504 => Reason::GatewayTimeout,
            s if s >= 500 => Reason::Internal,
            _ => Reason::BadRequest,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Which rate limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// A limit on the number of requests.
    Requests,
    /// A limit on tokens (cost-weighted).
    Tokens,
}

impl LimitKind {
    /// `"requests"` or `"tokens"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }
}

/// A refusal: the one error model of tollgate.
///
/// Cheap to clone and safe to show: it never holds key text. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    reason: Reason,
    status: Option<StatusCode>,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    details: Option<Box<Map<String, Value>>>,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
}

impl Rejection {
    /// A rejection with the reason's default status and message.
    pub fn new(reason: Reason) -> Self {
        Rejection {
            reason,
            status: None,
            message: Cow::Borrowed(reason.default_message()),
            param: None,
            details: None,
            retry_after: None,
            should_retry: None,
        }
    }

    /// 403 `ip_not_allowed`; the message names the IP (as FirebirdGen's `IP_NOT_WHITELISTED`).
    pub fn ip_not_allowed(ip: IpAddr) -> Self {
        Rejection::new(Reason::IpNotAllowed)
            .with_message(format!(
                "IP address {ip} is not in the allowlist for this API key."
            ))
            .with_detail("ip", ip.to_string())
    }

    /// 402 `insufficient_quota` with `required` and `available` details.
    pub fn insufficient_credits(required: u64, available: u64) -> Self {
        Rejection::new(Reason::InsufficientCredits)
            .with_message(format!(
                "Insufficient balance: this request needs {required} credits and {available} are available. Please top up your account."
            ))
            .with_detail("required", required)
            .with_detail("available", available)
    }

    /// 429 `rate_limit_exceeded` for the given limit, retry after `retry_after`.
    pub fn rate_limited(limit: LimitKind, retry_after: Duration) -> Self {
        let secs = ceil_secs(retry_after);
        Rejection::new(Reason::RateLimited)
            .with_message(format!(
                "Rate limit exceeded for {}. Please try again in {secs} second{}.",
                limit.as_str(),
                if secs == 1 { "" } else { "s" }
            ))
            .with_detail("limit", limit.as_str())
            .with_retry_after(retry_after)
    }

    /// 403 `model_not_allowed`: the plan may not use `model` (the message names it, as infe does).
    pub fn model_not_allowed(model: &str) -> Self {
        let model = truncate(model, 128);
        Rejection::new(Reason::ModelNotAllowed)
            .with_message(format!(
                "Your plan does not have access to the model `{model}`. Upgrade your plan to use it."
            ))
            .with_param("model")
    }

    /// 404 `model_not_found` naming `model`.
    pub fn model_not_found(model: &str) -> Self {
        let model = truncate(model, 128);
        Rejection::new(Reason::ModelNotFound)
            .with_message(format!("The model `{model}` does not exist."))
            .with_param("model")
    }

    /// 403 `account_blocked` with a reason an operator gave.
    pub fn account_blocked(why: &str) -> Self {
        Rejection::new(Reason::AccountBlocked)
            .with_message(format!("Your account is blocked: {}", truncate(why, 256)))
    }

    /// An error response of the inner service with this status, described by `message`.
    pub fn from_status(status: StatusCode, message: Option<String>) -> Self {
        let reason = Reason::from_status(status);
        let mut rejection = Rejection::new(reason);
        if reason.status() != status {
            rejection.status = Some(status);
        }
        if let Some(message) = message {
            rejection.message = Cow::Owned(message);
        }
        rejection
    }

    /// Replace the message.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// Name the request parameter at fault (the OpenAI body's `param`).
    #[must_use]
    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Add a structured detail.
    #[must_use]
    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.into());
        self
    }

    /// Say when a retry can succeed.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Say whether a retry of the same request can succeed (the `x-should-retry` header),
    /// overriding what the status implies: a 429 for a request larger than the whole bucket can
    /// never pass, however long the client waits.
    #[must_use]
    pub fn with_should_retry(mut self, retry: bool) -> Self {
        self.should_retry = Some(retry);
        self
    }

    /// Override the HTTP status (for example 401 rather than 403 for a revoked key).
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// The reason.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        self.reason.code()
    }

    /// The HTTP status (the override, else the reason's default).
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or(self.reason.status())
    }

    /// Whether the status was overridden.
    pub fn status_overridden(&self) -> bool {
        self.status.is_some()
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The request parameter at fault.
    pub fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The structured details.
    pub fn details(&self) -> Option<&Map<String, Value>> {
        self.details.as_deref()
    }

    /// When a retry can succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether a client should retry this request unchanged (the `x-should-retry` header).
    pub fn should_retry(&self) -> bool {
        self.should_retry_at(self.status())
    }

    /// Whether a client should retry when the refusal is answered with `status` (an error
    /// catalog may change the status): the explicit hint, else what `status` implies.
    pub(crate) fn should_retry_at(&self, status: StatusCode) -> bool {
        self.should_retry.unwrap_or_else(|| should_retry(status))
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code(), self.status(), self.message)
    }
}

impl std::error::Error for Rejection {}

impl From<Reason> for Rejection {
    fn from(reason: Reason) -> Self {
        Rejection::new(reason)
    }
}

/// Whether a response with this status is worth retrying unchanged.
pub(crate) fn should_retry(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || (status.is_server_error() && status != 501)
}

/// Whole seconds, rounded up: a `Retry-After` never says to come back too early.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whole milliseconds, rounded up (`retry-after-ms`, `x-ratelimit-reset-*`).
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.as_nanos() % 1_000_000 != 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn long_model_names_are_cut_on_a_char_boundary() {
        let model = "é".repeat(100);
        let r = Rejection::model_not_allowed(&model);
        assert!(r.message().len() < 250);
    }
}
