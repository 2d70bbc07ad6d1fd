//! The rate-limit response headers: OpenAI's `x-ratelimit-*` and the IETF `RateLimit` fields.

use std::{fmt::Write, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Decision, LimitStatus};
use crate::{rejection::ceil_secs, LimitKind};

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

/// Add the headers of a decision.
pub(crate) fn insert(headers: &mut HeaderMap, decision: &Decision) {
    let mut policy = String::new();
    let mut state = String::new();
    for (i, kind) in [LimitKind::Requests, LimitKind::Tokens]
        .into_iter()
        .enumerate()
    {
        let Some(LimitStatus {
            limit,
            window,
            remaining,
            reset,
        }) = decision.status(kind)
        else {
            continue;
        };
        let [limit_name, remaining_name, reset_name] = &NAMES[i];
        headers.insert(limit_name, HeaderValue::from(limit));
        headers.insert(remaining_name, HeaderValue::from(remaining));
        headers.insert(
            reset_name,
            HeaderValue::try_from(go_duration(reset)).expect("ascii"),
        );
        let sep = if policy.is_empty() { "" } else { ", " };
        let _ = write!(
            policy,
            "{sep}\"{}\";q={limit};w={}",
            kind.as_str(),
            ceil_secs(window).max(1)
        );
        let _ = write!(
            state,
            "{sep}\"{}\";r={remaining};t={}",
            kind.as_str(),
            ceil_secs(reset)
        );
    }
    if !policy.is_empty() {
        headers.insert(
            RATELIMIT_POLICY,
            HeaderValue::try_from(policy).expect("ascii"),
        );
        headers.insert(RATELIMIT, HeaderValue::try_from(state).expect("ascii"));
    }
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
    let ms = d.as_millis() + u128::from(d.as_nanos() % 1_000_000 != 0);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if h > 0 || m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{s}");
    if frac > 0 {
        let frac = format!("{frac:03}");
        let _ = write!(out, ".{}", frac.trim_end_matches('0'));
    }
    out.push('s');
    out
}
