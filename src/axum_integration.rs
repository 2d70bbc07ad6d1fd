//! axum integrations: `Caller` as an extractor, `Rejection` as a response.

use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::request::Parts;

use crate::{
    format::{Format, RenderContext},
    Caller, Reason, Rejection,
};

/// `Caller` is an extractor: a handler behind the authentication layer reads who is calling.
///
/// Without the authentication layer in front the extraction fails with a 401
/// `missing_api_key` rejection.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Rejection::new(Reason::MissingApiKey))
    }
}

/// A `Rejection` returned by a handler is rendered in the OpenAI format (and re-rendered by
/// [`Normalize`](crate::normalize::Normalize) in the configured one).
impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        Format::OpenAi
            .response(&self, &RenderContext::new())
            .map(axum::body::Body::from)
    }
}
