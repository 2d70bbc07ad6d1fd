use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use http::{HeaderValue, Request};
use tower_http::request_id::RequestId;

/// Generates request ids: `req_` + a random per-process prefix + a counter.
///
/// Unique across processes (the prefix has 64 random bits from the OS) and cheap (no system
/// call per request). Plugs into tower-http's request-id middleware.
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

impl tower_http::request_id::MakeRequestId for MakeRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 4 + 16 + 16];
        buf[..4].copy_from_slice(b"req_");
        hex::encode_to_slice(self.prefix.to_be_bytes(), &mut buf[4..20]).ok()?;
        hex::encode_to_slice(n.to_be_bytes(), &mut buf[20..]).ok()?;
        // One allocation holds the id, and copying the header onto the response is a reference
        // count (bytes made from a slice would be copied again on their first clone).
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
            .ok()
            .map(RequestId::new)
    }
}

/// An incoming id is kept when it is 1 to 128 visible ASCII characters.
pub(super) fn is_valid(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}
