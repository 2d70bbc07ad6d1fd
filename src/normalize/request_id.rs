use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use http::{HeaderValue, Request};
use tower_http::request_id::RequestId;

/// Generates request ids: `req_` + a random per-process prefix + a counter.
///
/// Unique across processes (the prefix has 64 random bits from the OS) and cheap (no system
/// call per request). [`NormalizeLayer`](super::NormalizeLayer) calls
/// [`generate`](Self::generate); it also plugs into tower-http's request-id middleware.
///
/// ```
/// use tollgate::normalize::MakeRequestId;
///
/// let ids = MakeRequestId::new();
/// let (a, b) = (ids.generate(), ids.generate());
/// assert!(a.to_str().unwrap().starts_with("req_"));
/// assert_eq!(a.len(), 36);
/// assert_ne!(a, b);
/// ```
#[derive(Clone, Debug)]
pub struct MakeRequestId {
    prefix: u64,
    counter: Arc<AtomicU64>,
}

impl Default for MakeRequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl MakeRequestId {
    /// A generator with a fresh random prefix.
    pub fn new() -> Self {
        let mut bytes = [0u8; 8];
        // Without OS randomness ids are still unique within the process.
        let _ = getrandom::fill(&mut bytes);
        MakeRequestId {
            prefix: u64::from_le_bytes(bytes),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl MakeRequestId {
    /// The next id: `req_`, the 16 hex digits of the prefix, the 16 of the counter.
    pub fn generate(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 4 + 16 + 16];
        buf[..4].copy_from_slice(b"req_");
        hex_u64(self.prefix, &mut buf[4..20]);
        hex_u64(n, &mut buf[20..]);
        // One allocation holds the id, and copying the header onto the response is a reference
        // count (bytes made from a slice would be copied again on their first clone).
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf)).expect("hex digits")
    }
}

/// `n` as 16 lowercase hex digits into `out`.
fn hex_u64(n: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate().take(16) {
        *byte = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
}

impl tower_http::request_id::MakeRequestId for MakeRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(self.generate()))
    }
}

/// An incoming id is kept when it is 1 to 128 visible ASCII characters.
pub(super) fn is_valid(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}
