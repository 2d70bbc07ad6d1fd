//! The rate-limit response headers: OpenAI's `x-ratelimit-*` and the IETF `RateLimit` fields.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Decision, LimitStatus};
use crate::{
    rejection::{ceil_millis, ceil_secs},
    LimitKind,
};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

const NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// A small stack buffer for header values: no `fmt` machinery, no heap until the value is made.
struct Buf<const N: usize = 160> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Buf<N> {
    fn new() -> Self {
        Buf {
            bytes: [0; N],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let end = (self.len + s.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&s[..end - self.len]);
        self.len = end;
    }

    fn push_u64(&mut self, n: u64) {
        // itoa writes two digits per step from a table: about half the instructions of a
        // digit-by-digit loop for the 10-digit counts a large quota shows.
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).expect("ascii")
    }
}

/// The per-request values of one response (remaining, reset, the `RateLimit` field) are written
/// into one buffer and handed out as slices of it: one allocation for all of them. 256 bytes
/// hold the longest (two kinds, every number 20 digits).
type Arena = Buf<256>;

/// Values that depend only on a plan's quotas (the limits and the `RateLimit-Policy` field),
/// made once per thread and quota and then shared: cloning a `HeaderValue` is a reference count.
#[derive(Default)]
struct Constants {
    limits: Vec<((u64, u64), HeaderValue)>,
    policies: Vec<([(u64, u64); 2], HeaderValue)>,
}

thread_local! {
    static CONSTANTS: std::cell::RefCell<Constants> = std::cell::RefCell::new(Constants::default());
}

/// The most entries kept per thread (plans × kinds); past it, values are made per request.
const MAX_CONSTANTS: usize = 64;

fn cached<K: PartialEq + Copy>(
    list: &mut Vec<(K, HeaderValue)>,
    key: K,
    make: impl FnOnce() -> HeaderValue,
) -> HeaderValue {
    if let Some((_, value)) = list.iter().find(|(k, _)| *k == key) {
        return value.clone();
    }
    let value = make();
    if list.len() < MAX_CONSTANTS {
        list.push((key, value.clone()));
    }
    value
}

/// Add the headers of a decision.
pub(crate) fn insert(headers: &mut HeaderMap, decision: &Decision) {
    let statuses = [
        decision.status(LimitKind::Requests),
        decision.status(LimitKind::Tokens),
    ];
    let kinds = statuses.iter().filter(|s| s.is_some()).count();
    if kinds == 0 {
        return;
    }
    headers.reserve(3 * kinds + 2);
    // Pass 1: the remaining and reset values of each kind, then the `RateLimit` field, all in
    // one arena; their ranges are kept to slice it afterwards.
    let mut arena = Arena::new();
    let mut ranges = [[(0usize, 0usize); 2]; 2];
    let mut policy_key = [(0u64, 0u64); 2];
    for (i, status) in statuses.iter().enumerate() {
        let Some(LimitStatus {
            limit,
            window,
            remaining,
            reset,
        }) = *status
        else {
            continue;
        };
        policy_key[i] = (limit, ceil_secs(window).max(1));
        let start = arena.len;
        arena.push_u64(remaining);
        ranges[i][0] = (start, arena.len);
        let start = arena.len;
        write_go_duration(&mut arena, reset);
        ranges[i][1] = (start, arena.len);
    }
    let state_start = arena.len;
    for (status, kind) in statuses
        .iter()
        .zip([LimitKind::Requests, LimitKind::Tokens])
    {
        let Some(status) = status else { continue };
        if arena.len > state_start {
            arena.push(b", ");
        }
        arena.push(b"\"");
        arena.push(kind.as_str().as_bytes());
        arena.push(b"\";r=");
        arena.push_u64(status.remaining);
        arena.push(b";t=");
        arena.push_u64(ceil_secs(status.reset));
    }
    let state_end = arena.len;
    // Only the bytes written are copied out (one small allocation), not the whole arena.
    let shared = bytes::Bytes::copy_from_slice(arena.as_bytes());
    let slice = |(start, end): (usize, usize)| {
        HeaderValue::from_maybe_shared(shared.slice(start..end)).expect("ascii")
    };
    CONSTANTS.with(|constants| {
        let mut constants = constants.borrow_mut();
        for (i, status) in statuses.iter().enumerate() {
            let Some(status) = status else { continue };
            let [limit_name, remaining_name, reset_name] = &NAMES[i];
            let limit = status.limit;
            let limit_value = cached(&mut constants.limits, (limit, 0), || {
                let mut b = Buf::<160>::new();
                b.push_u64(limit);
                b.value()
            });
            headers.insert(limit_name, limit_value);
            headers.insert(remaining_name, slice(ranges[i][0]));
            headers.insert(reset_name, slice(ranges[i][1]));
        }
        let policy = cached(&mut constants.policies, policy_key, || {
            let mut b = Buf::<160>::new();
            for (i, kind) in [LimitKind::Requests, LimitKind::Tokens]
                .into_iter()
                .enumerate()
            {
                let (limit, window) = policy_key[i];
                if limit == 0 && window == 0 {
                    continue;
                }
                if b.len > 0 {
                    b.push(b", ");
                }
                b.push(b"\"");
                b.push(kind.as_str().as_bytes());
                b.push(b"\";q=");
                b.push_u64(limit);
                b.push(b";w=");
                b.push_u64(window);
            }
            b.value()
        });
        headers.insert(RATELIMIT_POLICY, policy);
    });
    headers.insert(RATELIMIT, slice((state_start, state_end)));
}

/// A duration as OpenAI's `x-ratelimit-reset-*` show it (Go's `time.Duration` format), rounded
/// up to the millisecond: `0s`, `600ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
///
/// ```
/// use std::time::Duration;
/// use tollgate::ratelimit::go_duration;
///
/// assert_eq!(go_duration(Duration::from_micros(599_001)), "600ms");
/// assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
/// assert_eq!(go_duration(Duration::from_millis(61_250)), "1m1.25s");
/// ```
pub fn go_duration(d: Duration) -> String {
    let mut b = Buf::<160>::new();
    write_go_duration(&mut b, d);
    String::from_utf8(b.as_bytes().to_vec()).expect("ascii")
}

fn write_go_duration<const N: usize>(b: &mut Buf<N>, d: Duration) {
    let ms = ceil_millis(d);
    if ms == 0 {
        b.push(b"0s");
        return;
    }
    if ms < 1000 {
        b.push_u64(ms);
        b.push(b"ms");
        return;
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    if h > 0 {
        b.push_u64(h);
        b.push(b"h");
    }
    if h > 0 || m > 0 {
        b.push_u64(m);
        b.push(b"m");
    }
    b.push_u64(s);
    if frac > 0 {
        let digits = [
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let keep = if digits[2] != b'0' {
            3
        } else if digits[1] != b'0' {
            2
        } else {
            1
        };
        b.push(b".");
        b.push(&digits[..keep]);
    }
    b.push(b"s");
}

#[cfg(test)]
mod tests {
    use super::Buf;

    #[test]
    fn numbers_are_written_in_plain_decimal() {
        for n in [0, 7, 10, 99, 100, 4_294_967_295, u64::MAX] {
            let mut b = Buf::<32>::new();
            b.push(b"r=");
            b.push_u64(n);
            assert_eq!(b.as_bytes(), format!("r={n}").as_bytes());
        }
    }
}
