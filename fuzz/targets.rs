//! The bodies of tollgate's fuzz targets, shared by two builds:
//!
//! - `fuzz/fuzz_targets/*.rs` (cargo-fuzz, nightly): `fuzz_target!(|data| targets::NAME(data))`;
//! - `tests/properties.rs` (stable, in CI): every target over the seed corpus in `fuzz/seeds/`
//!   and a few thousand generated inputs, so that the targets compile and their assertions hold
//!   on every `cargo test`.
//!
//! Each target asserts more than "no panic": what a user would see (a status among the expected
//! ones, a body that parses in the format) or an invariant (the same usage whatever the chunk
//! boundaries).

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyRecord, MemoryKeyStore},
    inspect::LlmRequest,
    ip::{ClientIpResolver, ForwardedHeader, IpSet, PeerAddr},
    keys,
    usage::UsageScanner,
    Caller,
};
use tower::{Layer, Service, ServiceExt};

/// The one key the auth target's store knows.
pub const KNOWN_KEY: &str = "sk-fuzz-0123456789abcdefghijklmnopqrstuvwxyz";

/// The codes a malformed, missing or unknown key may be refused with.
const AUTH_CODES: &[&str] = &[
    "missing_api_key",
    "malformed_api_key",
    "api_key_whitespace",
    "invalid_api_key",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|&b| b == b'\n')
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// Authentication with arbitrary `Authorization`, `x-api-key` and query-string bytes.
///
/// `data[0]` selects the layout: bits 0-1 the number of `Authorization` headers, bit 2 an
/// `x-api-key` header, bit 3 an `api_key` query parameter, bit 4 a `Bearer ` prefix on the first
/// `Authorization` value. The rest, split on `\n`, gives the values in order.
///
/// Asserts: 200 exactly when the only key presented is [`KNOWN_KEY`] (and the caller is its
/// key's), otherwise 401 with a JSON body whose code is one of the key refusals; never a panic.
pub fn auth_header(data: &[u8]) {
    let Some((&layout, rest)) = data.split_first() else {
        return;
    };
    let mut values = split(rest);
    let mut request = Request::post("/v1/chat/completions");
    let mut presented: Vec<Vec<u8>> = Vec::new();
    let mut parts_ok = true;
    for i in 0..(layout & 0b11) {
        let mut value = values.next().unwrap_or_default().to_vec();
        if i == 0 && layout & 0b1_0000 != 0 {
            value.splice(0..0, *b"Bearer ");
        }
        match HeaderValue::from_bytes(&value) {
            Ok(v) => {
                presented.push(value);
                request = request.header(http::header::AUTHORIZATION, v);
            }
            Err(_) => parts_ok = false,
        }
    }
    if layout & 0b100 != 0 {
        let value = values.next().unwrap_or_default();
        match HeaderValue::from_bytes(value) {
            Ok(v) => {
                presented.push([b"Bearer ".as_slice(), value].concat());
                request = request.header("x-api-key", v);
            }
            Err(_) => parts_ok = false,
        }
    }
    if layout & 0b1000 != 0 {
        let value = values.next().unwrap_or_default();
        presented.push([b"Bearer ".as_slice(), value].concat());
        request = request.uri(format!(
            "/v1/chat/completions?api_key={}",
            percent_encode(value)
        ));
    }
    if !parts_ok {
        // Bytes no HTTP parser would accept never reach a service.
        return;
    }
    let Ok(request) = request.body(Full::new(Bytes::from_static(b"{}"))) else {
        return;
    };

    let known = format!("Bearer {KNOWN_KEY}");
    let only_known = !presented.is_empty()
        && presented.iter().all(|p| {
            // The scheme is case-insensitive; only the first presented value carries it for sure.
            p.len() == known.len()
                && p[..7].eq_ignore_ascii_case(b"bearer ")
                && p[7..] == *KNOWN_KEY.as_bytes()
        })
        && (layout & 0b11) <= 1;

    let (status, body) = runtime().block_on(authenticate(request));
    if only_known {
        assert_eq!(
            status,
            StatusCode::OK,
            "the known key, presented once, is accepted"
        );
        assert_eq!(body, "key_1");
    } else {
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "anything but the known key is a 401: {presented:?}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(body.as_bytes()).expect("the refusal is JSON");
        let code = json["error"]["code"].as_str().expect("error.code");
        assert!(AUTH_CODES.contains(&code), "unexpected code {code}");
        assert!(!body.contains(KNOWN_KEY));
    }
}

async fn authenticate(request: Request<Full<Bytes>>) -> (StatusCode, String) {
    let store = MemoryKeyStore::new()
        .with_account(AccountRecord::new("acct_1", "free"))
        .with_key(keys::digest(KNOWN_KEY), KeyRecord::new("key_1", "acct_1"));
    let inner = tower::service_fn(|request: Request<_>| async move {
        let caller = request.extensions().get::<Caller>().cloned();
        let text = caller.map_or_else(String::new, |c| c.key_id().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
    });
    let mut service = AuthLayer::new(store)
        .allow_x_api_key()
        .allow_query_param("api_key")
        .no_shield()
        .layer(inner);
    let response = service
        .ready()
        .await
        .expect("infallible")
        .call(request)
        .await
        .expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The proxies the client-IP target trusts.
pub fn trusted_proxies() -> IpSet {
    "10.0.0.0/8, 127.0.0.0/8, 2001:db8::/32"
        .parse()
        .expect("valid CIDRs")
}

/// Client-IP resolution with arbitrary forwarding-header bytes.
///
/// `data[0]`: bits 0-1 the header the proxies set (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`),
/// bit 2 whether the peer is a trusted proxy, bit 3 an IPv6 peer. The rest, split on `\n`, gives
/// the header values (each one a header line of the same name, plus one of each other name).
///
/// Asserts: an untrusted peer is the client whatever the headers say; the result is canonical
/// (no IPv4-mapped IPv6); the same headers give the same answer twice.
pub fn client_ip(data: &[u8]) {
    let Some((&layout, rest)) = data.split_first() else {
        return;
    };
    let header = match layout & 0b11 {
        0 => ForwardedHeader::XForwardedFor,
        1 => ForwardedHeader::Forwarded,
        _ => ForwardedHeader::XRealIp,
    };
    let trusted_peer = layout & 0b100 != 0;
    let peer: IpAddr = match (trusted_peer, layout & 0b1000 != 0) {
        (true, false) => Ipv4Addr::new(10, 0, 0, 1).into(),
        (true, true) => "2001:db8::1".parse::<Ipv6Addr>().expect("v6").into(),
        (false, false) => Ipv4Addr::new(198, 51, 100, 7).into(),
        (false, true) => "2001:470::7".parse::<Ipv6Addr>().expect("v6").into(),
    };
    let mut headers = HeaderMap::new();
    let names = ["x-forwarded-for", "forwarded", "x-real-ip"];
    for (i, value) in split(rest).enumerate() {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = HeaderName::from_static(names[i % names.len()]);
        headers.append(name, value);
    }
    let resolver = ClientIpResolver::new()
        .trust_proxies(trusted_proxies())
        .header(header);
    let ip = resolver.resolve_from(peer, &headers);
    assert_eq!(ip, ip.to_canonical(), "the client IP is canonical");
    if !trusted_peer {
        assert_eq!(ip, peer, "an untrusted peer's headers are never believed");
    }
    assert_eq!(ip, resolver.resolve_from(peer, &headers));

    // The same through a request, as the layers see it.
    let mut request = Request::new(());
    *request.headers_mut() = headers;
    request
        .extensions_mut()
        .insert(PeerAddr(std::net::SocketAddr::new(peer, 40000)));
    assert_eq!(resolver.resolve(&request).ok(), Some(ip));
}

/// The streaming usage scanner on arbitrary bytes, in arbitrary chunks.
///
/// `data[0]` seeds the chunk sizes (1 to 8 bytes, cycling); the rest is the body.
///
/// Asserts: the usage found does not depend on the chunk boundaries (whole, in pieces, byte by
/// byte); a usage found has `total_tokens >= prompt + completion` unless they overflow.
pub fn sse_usage(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let mut whole = UsageScanner::new();
    whole.feed(body);

    let mut pieces = UsageScanner::new();
    let mut rest = body;
    let mut size = usize::from(seed % 8) + 1;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        pieces.feed(chunk);
        rest = tail;
        size = size % 8 + 1;
    }

    let mut bytes = UsageScanner::new();
    for b in body {
        bytes.feed(std::slice::from_ref(b));
    }
    assert_eq!(whole.usage(), pieces.usage(), "chunking changed the usage");
    assert_eq!(
        whole.usage(),
        bytes.usage(),
        "byte-by-byte changed the usage"
    );
}

/// The request inspector on arbitrary bodies.
///
/// Asserts: a body is either described (with its exact length) or refused with a 400 whose
/// message does not echo the body.
pub fn llm_request(data: &[u8]) {
    match LlmRequest::from_json(data) {
        Ok(request) => assert_eq!(request.body_len, data.len() as u64),
        Err(rejection) => {
            assert_eq!(rejection.status(), StatusCode::BAD_REQUEST);
            assert!(matches!(rejection.code(), "invalid_json" | "bad_request"));
        }
    }
}
