//! What a store (key store, ledger, limiter) answers when it cannot answer.

use std::{fmt, time::Duration};

use crate::{Reason, Rejection};

/// A store (key store, ledger or limiter backend) is unavailable or failed.
///
/// Rendered as 503 `backend_unavailable` with a `Retry-After`; the message given to the client
/// never includes the store's own error text (it may name hosts), which goes to the log.
#[derive(Clone, Debug)]
pub struct BackendError {
    message: String,
    retry_after: Duration,
    unsent: bool,
}

impl BackendError {
    /// A backend failure, described for the log.
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            retry_after: Duration::from_secs(1),
            unsent: false,
        }
    }

    /// Marks the call as never sent (a circuit breaker refused it, no connection could be had):
    /// nothing it asked for can have happened, so there is nothing to undo.
    ///
    /// ```
    /// use tollgate::BackendError;
    ///
    /// let refused = BackendError::new("circuit open").unsent();
    /// assert!(!refused.may_have_applied());
    /// assert!(BackendError::new("no answer within 500ms").may_have_applied());
    /// ```
    #[must_use]
    pub fn unsent(mut self) -> Self {
        self.unsent = true;
        self
    }

    /// Whether the call may have reached the store and taken effect (its answer was lost):
    /// `true` unless it is known never to have been sent. A reserve that may have applied is
    /// released in the background.
    pub fn may_have_applied(&self) -> bool {
        !self.unsent
    }

    /// When a retry may succeed (default one second).
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The description for the log.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When a retry may succeed.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend unavailable: {}", self.message)
    }
}

impl std::error::Error for BackendError {}

impl From<BackendError> for Rejection {
    fn from(error: BackendError) -> Self {
        tracing::warn!(error = %error.message, code = "backend_unavailable", "backend unavailable");
        Rejection::new(Reason::BackendUnavailable).with_retry_after(error.retry_after)
    }
}

/// What a rate limiter does when its shared store (Redis, PostgreSQL) cannot answer.
///
/// Credits always fail closed; this is only about rate limits.
///
/// ```
/// use tollgate::backend::FailMode;
///
/// assert_eq!(FailMode::default(), FailMode::Open);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Let the request through, unlimited (as Kong, Envoy and Stripe do by default).
    #[default]
    Open,
    /// Refuse it with 503 `backend_unavailable` and a `Retry-After`.
    Closed,
}
