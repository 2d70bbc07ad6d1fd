use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::Rejection;

/// The gRPC status code for an HTTP status.
///
/// 401 → `UNAUTHENTICATED` (16), 403 → `PERMISSION_DENIED` (7), 402 and 429 →
/// `RESOURCE_EXHAUSTED` (8), 404 → `NOT_FOUND` (5), 400 and 422 → `INVALID_ARGUMENT` (3),
/// 409 → `ABORTED` (10), 503 → `UNAVAILABLE` (14), 504 → `DEADLINE_EXCEEDED` (4), other 5xx →
/// `INTERNAL` (13), other 4xx → `FAILED_PRECONDITION` (9).
///
/// ```
/// use http::StatusCode;
/// assert_eq!(tollgate::format::grpc_code(StatusCode::PAYMENT_REQUIRED), 8);
/// assert_eq!(tollgate::format::grpc_code(StatusCode::UNAUTHORIZED), 16);
/// ```
pub fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 | 422 => 3,
        401 => 16,
        402 | 429 => 8,
        403 => 7,
        404 => 5,
        409 => 10,
        503 => 14,
        504 => 4,
        s if s >= 500 => 13,
        _ => 9,
    }
}

/// A trailers-only gRPC response: HTTP 200, `grpc-status` and `grpc-message` in the headers.
pub(super) fn response(rejection: &Rejection, status: StatusCode) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc_code(status))),
    );
    let message = percent_encode(rejection.message());
    if let Ok(value) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", value);
    }
    if let Some(wait) = rejection.retry_after() {
        headers.insert(
            "retry-after",
            HeaderValue::from(crate::rejection::ceil_secs(wait)),
        );
    }
    response
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encodes_non_ascii() {
        assert_eq!(super::percent_encode("100% é"), "100%25 %C3%A9");
    }
}
