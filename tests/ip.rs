//! Client-IP resolution and the IP allowlist layer: spoofing, proxies, IPv6, malformed headers.

use std::{convert::Infallible, net::SocketAddr};

use axum::{body::Body, extract::ConnectInfo, routing::get, Extension, Router};
use http::{HeaderMap, Request, StatusCode};
use serde_json::{json, Value};
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyRecord, MemoryKeyStore},
    ip::{
        ClientIp, ClientIpLayer, ClientIpResolver, ForwardedHeader, IpAllowLayer, IpSet, PeerAddr,
    },
    keys,
};
use tower::ServiceExt;

fn set(s: &str) -> IpSet {
    s.parse().unwrap()
}

async fn echo_ip(Extension(ClientIp(ip)): Extension<ClientIp>) -> String {
    ip.to_string()
}

fn app(layer: IpAllowLayer) -> Router {
    Router::new().route("/", get(echo_ip)).layer(layer)
}

fn request(peer: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get("/");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut request = builder.body(Body::empty()).unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    request
}

async fn send<S>(service: S, request: Request<Body>) -> (StatusCode, String)
where
    S: tower::Service<Request<Body>, Response = axum::response::Response, Error = Infallible>,
{
    let response = service.oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The client IP the app sees.
async fn seen(layer: IpAllowLayer, request: Request<Body>) -> String {
    let (status, body) = send(app(layer), request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn behind_proxies() -> IpAllowLayer {
    IpAllowLayer::new().resolver(ClientIpResolver::new().trust_proxies(set("10.0.0.0/8, fd00::/8")))
}

fn refusal(ip: &str, message: &str) -> Value {
    json!({"error": {"message": message.replace("{ip}", ip), "type": "permission_error", "param": null, "code": "ip_not_allowed"}})
}

#[tokio::test]
async fn the_peer_is_the_client_without_trusted_proxies() {
    let req = request("203.0.113.9:5000", &[]);
    assert_eq!(seen(IpAllowLayer::new(), req).await, "203.0.113.9");
}

#[tokio::test]
async fn no_peer_address_is_a_refusal_not_a_panic() {
    let request = Request::get("/").body(Body::empty()).unwrap();
    let (status, body) = send(app(IpAllowLayer::new()), request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": {
            "message": "Your IP address could not be determined, so it cannot be allowed.",
            "type": "permission_error",
            "param": null,
            "code": "ip_not_allowed",
        }})
    );
}

#[tokio::test]
async fn forged_headers_from_an_untrusted_peer_change_nothing() {
    for (name, value) in [
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-for", "192.0.2.1, 10.0.0.1"),
        ("forwarded", "for=10.0.0.1"),
        ("x-real-ip", "10.0.0.1"),
    ] {
        for header in [
            ForwardedHeader::XForwardedFor,
            ForwardedHeader::Forwarded,
            ForwardedHeader::XRealIp,
        ] {
            let layer = IpAllowLayer::new().allow(set("10.0.0.0/8")).resolver(
                ClientIpResolver::new()
                    .trust_proxies(set("10.0.0.0/8"))
                    .header(header),
            );
            let (status, body) =
                send(app(layer), request("198.51.100.7:5000", &[(name, value)])).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{name}: {value}");
            assert_eq!(
                serde_json::from_str::<Value>(&body).unwrap(),
                refusal(
                    "198.51.100.7",
                    "IP address {ip} is not allowed to use this API."
                )
            );
        }
    }
}

#[tokio::test]
async fn a_trusted_proxy_is_believed_walking_from_the_right() {
    // The client wrote 6.6.6.6 itself; the first proxy saw 203.0.113.9.
    let req = request(
        "10.0.0.3:5000",
        &[(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9, 10.0.0.2, 10.0.0.1",
        )],
    );
    assert_eq!(seen(behind_proxies(), req).await, "203.0.113.9");
}

#[tokio::test]
async fn several_forwarded_for_headers_are_one_list() {
    let req = request(
        "10.0.0.3:5000",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
        ],
    );
    assert_eq!(seen(behind_proxies(), req).await, "203.0.113.9");
}

#[tokio::test]
async fn when_every_hop_is_trusted_the_farthest_is_the_client() {
    let req = request(
        "10.0.0.3:5000",
        &[("x-forwarded-for", "10.9.9.9, 10.0.0.2")],
    );
    assert_eq!(seen(behind_proxies(), req).await, "10.9.9.9");
}

#[tokio::test]
async fn without_a_header_a_trusted_peer_is_the_client() {
    let req = request("10.0.0.3:5000", &[]);
    assert_eq!(seen(behind_proxies(), req).await, "10.0.0.3");
}

#[tokio::test]
async fn malformed_entries_stop_at_the_last_trusted_hop() {
    for value in [
        "203.0.113.9, garbage, 10.0.0.2",
        "203.0.113.9, unknown, 10.0.0.2",
        "203.0.113.9,, 10.0.0.2",
    ] {
        let req = request("10.0.0.3:5000", &[("x-forwarded-for", value)]);
        assert_eq!(seen(behind_proxies(), req).await, "10.0.0.2", "{value}");
    }
    // Garbage left of the client is never read.
    let req = request(
        "10.0.0.3:5000",
        &[("x-forwarded-for", "garbage, 203.0.113.9")],
    );
    assert_eq!(seen(behind_proxies(), req).await, "203.0.113.9");
    // Not UTF-8.
    let mut req = request("10.0.0.3:5000", &[]);
    req.headers_mut().insert(
        "x-forwarded-for",
        http::HeaderValue::from_bytes(b"203.0.113.9, \xff").unwrap(),
    );
    assert_eq!(seen(behind_proxies(), req).await, "10.0.0.3");
}

#[tokio::test]
async fn forwarded_with_ipv6_ports_and_quotes() {
    let layer = || {
        IpAllowLayer::new().resolver(
            ClientIpResolver::new()
                .trust_proxies(set("10.0.0.0/8, fd00::/8"))
                .header(ForwardedHeader::Forwarded),
        )
    };
    let req = request(
        "[fd00::1]:443",
        &[(
            "forwarded",
            r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.2;by=10.0.0.3"#,
        )],
    );
    assert_eq!(seen(layer(), req).await, "2001:db8:cafe::17");

    let req = request(
        "10.0.0.3:443",
        &[("forwarded", "For=192.0.2.60:8080;proto=http")],
    );
    assert_eq!(seen(layer(), req).await, "192.0.2.60");

    // With `Forwarded` chosen, `X-Forwarded-For` is not read.
    let req = request("10.0.0.3:443", &[("x-forwarded-for", "192.0.2.60")]);
    assert_eq!(seen(layer(), req).await, "10.0.0.3");

    // An obfuscated node stops the walk.
    let req = request(
        "10.0.0.3:443",
        &[("forwarded", "for=192.0.2.60, for=_hidden")],
    );
    assert_eq!(seen(layer(), req).await, "10.0.0.3");
}

#[tokio::test]
async fn x_real_ip_is_one_address() {
    let layer = || {
        IpAllowLayer::new().resolver(
            ClientIpResolver::new()
                .trust_proxies(set("10.0.0.0/8"))
                .header(ForwardedHeader::XRealIp),
        )
    };
    let req = request("10.0.0.3:443", &[("x-real-ip", "192.0.2.60")]);
    assert_eq!(seen(layer(), req).await, "192.0.2.60");
    let req = request(
        "10.0.0.3:443",
        &[("x-real-ip", "192.0.2.60"), ("x-real-ip", "192.0.2.61")],
    );
    assert_eq!(seen(layer(), req).await, "10.0.0.3");
    let req = request("10.0.0.3:443", &[("x-real-ip", "not an ip")]);
    assert_eq!(seen(layer(), req).await, "10.0.0.3");
}

#[tokio::test]
async fn ipv4_mapped_ipv6_is_normalized() {
    let layer = IpAllowLayer::new().allow(set("192.0.2.0/24"));
    let req = request("[::ffff:192.0.2.1]:443", &[]);
    assert_eq!(seen(layer, req).await, "192.0.2.1");

    let req = request(
        "[::ffff:10.0.0.3]:443",
        &[("x-forwarded-for", "::ffff:203.0.113.9")],
    );
    assert_eq!(seen(behind_proxies(), req).await, "203.0.113.9");
}

#[tokio::test]
async fn deny_wins_over_allow_and_ipv6_lists_work() {
    let layer = || {
        IpAllowLayer::new()
            .allow(set("2001:db8::/32, 192.0.2.0/24"))
            .deny(set("2001:db8:bad::/48, 192.0.2.66"))
    };
    assert_eq!(
        seen(layer(), request("[2001:db8:1::1]:1", &[])).await,
        "2001:db8:1::1"
    );
    assert_eq!(
        seen(layer(), request("192.0.2.65:1", &[])).await,
        "192.0.2.65"
    );
    for (peer, ip) in [
        ("[2001:db8:bad::1]:1", "2001:db8:bad::1"),
        ("192.0.2.66:1", "192.0.2.66"),
        ("[2001:db9::1]:1", "2001:db9::1"),
    ] {
        let (status, body) = send(app(layer()), request(peer, &[])).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            refusal(ip, "IP address {ip} is not allowed to use this API.")
        );
    }
}

#[tokio::test]
async fn the_keys_own_allowlist_applies_after_authentication() {
    const KEY: &str = "sk-test-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let store = MemoryKeyStore::new()
        .with_account(AccountRecord::new("acct_1", "free"))
        .with_key(
            keys::digest(KEY),
            KeyRecord::new("key_1", "acct_1").ip_allowlist(set("203.0.113.0/24, 2001:db8::/32")),
        );
    let app = Router::new()
        .route("/", get(echo_ip))
        .layer(IpAllowLayer::new())
        .layer(AuthLayer::new(store));
    let with_key = |peer: &str| {
        let mut req = request(peer, &[]);
        req.headers_mut()
            .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        req
    };
    assert_eq!(
        send(app.clone(), with_key("203.0.113.4:1")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(app.clone(), with_key("[2001:db8::4]:1")).await.0,
        StatusCode::OK
    );
    let (status, body) = send(app.clone(), with_key("198.51.100.4:1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        refusal(
            "198.51.100.4",
            "IP address {ip} is not in the allowlist for this API key."
        )
    );
    // Ignoring keys' allowlists is explicit.
    let app = Router::new()
        .route("/", get(echo_ip))
        .layer(IpAllowLayer::new().ignore_key_allowlists())
        .layer(AuthLayer::new(
            MemoryKeyStore::new()
                .with_account(AccountRecord::new("acct_1", "free"))
                .with_key(
                    keys::digest(KEY),
                    KeyRecord::new("key_1", "acct_1").ip_allowlist(set("203.0.113.0/24")),
                ),
        ));
    assert_eq!(
        send(app, with_key("198.51.100.4:1")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_client_ip_resolved_in_front_is_reused() {
    let app = Router::new()
        .route("/", get(echo_ip))
        .layer(IpAllowLayer::new().deny(set("10.0.0.0/8")))
        .layer(ClientIpLayer::new(
            ClientIpResolver::new().trust_proxies(set("10.0.0.0/8")),
        ));
    let (status, body) = send(
        app,
        request("10.0.0.3:1", &[("x-forwarded-for", "203.0.113.9")]),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "203.0.113.9"));
}

#[tokio::test]
async fn the_client_ip_layer_alone_refuses_a_request_without_a_peer() {
    let app = Router::new()
        .route("/", get(echo_ip))
        .layer(ClientIpLayer::new(ClientIpResolver::new()));
    let (status, _) = send(app.clone(), Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A plain `PeerAddr` (tonic, hyper) works as well as axum's `ConnectInfo`.
    let mut req = Request::get("/").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(PeerAddr("[2001:db8::9]:1".parse().unwrap()));
    assert_eq!(send(app.clone(), req).await.1, "2001:db8::9");
    let mut req = Request::get("/").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert("192.0.2.9:1".parse::<SocketAddr>().unwrap());
    assert_eq!(send(app, req).await.1, "192.0.2.9");
}

#[test]
fn resolver_on_its_own() {
    let resolver = ClientIpResolver::new().trust_proxies(set("10.0.0.0/8"));
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", "203.0.113.9, 10.1.1.1".parse().unwrap());
    assert_eq!(
        resolver.resolve_from("10.0.0.1".parse().unwrap(), &headers),
        "203.0.113.9".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        resolver.resolve_from("192.0.2.1".parse().unwrap(), &headers),
        "192.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );
}

#[tokio::test]
async fn ten_thousand_networks_match() {
    let cidrs: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .chain((0..1000u32).map(|i| format!("2001:db8:{i:x}::/48")))
        .collect();
    let allow = IpSet::parse(&cidrs).unwrap();
    assert_eq!(allow.len(), 11_000);
    let layer = || IpAllowLayer::new().allow(allow.clone());
    assert_eq!(
        seen(layer(), request("10.39.15.7:1", &[])).await,
        "10.39.15.7"
    );
    assert_eq!(
        seen(layer(), request("[2001:db8:3e7::1]:1", &[])).await,
        "2001:db8:3e7::1"
    );
    assert_eq!(
        send(app(layer()), request("10.40.0.1:1", &[])).await.0,
        StatusCode::FORBIDDEN
    );
}
