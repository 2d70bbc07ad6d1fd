use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use http::{HeaderMap, HeaderName, Request};

use super::IpSet;
use crate::{Reason, Rejection};

/// The peer (socket) address of a connection, for servers that do not put one tollgate finds on
/// its own into the request's extensions.
///
/// The resolver reads, in order: `PeerAddr`, axum's `ConnectInfo<SocketAddr>` (feature `axum`)
/// and a plain [`SocketAddr`]. tonic puts a `TcpConnectInfo` in the extensions; map its
/// `remote_addr()` into a `PeerAddr` with a `map_request` layer in front.
///
/// # Example
///
/// ```
/// use http::Request;
/// use tollgate::ip::{peer_addr, PeerAddr};
///
/// let mut request = Request::new(());
/// request.extensions_mut().insert(PeerAddr("192.0.2.1:4711".parse().unwrap()));
/// assert_eq!(peer_addr(&request), Some("192.0.2.1".parse().unwrap()));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// The peer address of the request's connection, found in its extensions (see [`PeerAddr`]),
/// IPv4-mapped IPv6 addresses normalized to IPv4.
///
/// ```
/// use http::Request;
/// use tollgate::ip::peer_addr;
///
/// let mut request = Request::new(());
/// assert_eq!(peer_addr(&request), None);
/// request.extensions_mut().insert("[::ffff:198.51.100.7]:443".parse::<std::net::SocketAddr>().unwrap());
/// assert_eq!(peer_addr(&request), Some("198.51.100.7".parse().unwrap()));
/// ```
pub fn peer_addr<B>(request: &Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    let addr = extensions.get::<PeerAddr>().map(|p| p.0);
    #[cfg(feature = "axum")]
    let addr = addr.or_else(|| {
        extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
    });
    let addr = addr.or_else(|| extensions.get::<SocketAddr>().copied());
    addr.map(|a| a.ip().to_canonical())
}

/// Which forwarding header a trusted proxy sets.
///
/// Only one is believed: a proxy that sets `X-Forwarded-For` usually passes a client's own
/// `Forwarded` header through untouched, so believing both would let a client choose its IP.
///
/// ```
/// use http::HeaderMap;
/// use tollgate::ip::{ClientIpResolver, ForwardedHeader};
///
/// let resolver = ClientIpResolver::new()
///     .trust_proxies("10.0.0.0/8".parse().unwrap())
///     .header(ForwardedHeader::Forwarded);
/// let mut headers = HeaderMap::new();
/// headers.insert("forwarded", "for=198.51.100.7;proto=https".parse().unwrap());
/// // A client-sent X-Forwarded-For is not the header this proxy sets: ignored.
/// headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
/// assert_eq!(resolver.resolve_from("10.0.0.2".parse().unwrap(), &headers), "198.51.100.7".parse::<std::net::IpAddr>().unwrap());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"`.
    Forwarded,
    /// `X-Real-IP: client`, a single address.
    XRealIp,
}

impl ForwardedHeader {
    fn name(self) -> HeaderName {
        match self {
            ForwardedHeader::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            ForwardedHeader::Forwarded => http::header::FORWARDED,
            ForwardedHeader::XRealIp => HeaderName::from_static("x-real-ip"),
        }
    }
}

/// Finds a request's client IP: the peer address, or, when the peer is a trusted proxy, the
/// address its forwarding header names.
///
/// The forwarding header is walked from the right (the hop the nearest proxy added) to the
/// left, skipping trusted proxies; the first untrusted address is the client. Everything left of
/// it was written by the client and is ignored. A malformed entry stops the walk at the last
/// address a trusted proxy vouched for. Without trusted proxies, headers are never read.
///
/// # Example
///
/// ```
/// use http::Request;
/// use tollgate::ip::{ClientIpResolver, PeerAddr};
///
/// let resolver = ClientIpResolver::new().trust_proxies("10.0.0.0/8".parse().unwrap());
///
/// let mut request = Request::builder()
///     .header("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")
///     .body(())
///     .unwrap();
/// request.extensions_mut().insert(PeerAddr("10.0.0.1:40000".parse().unwrap()));
/// assert_eq!(resolver.resolve(&request).unwrap(), "203.0.113.9".parse::<std::net::IpAddr>().unwrap());
///
/// // From an untrusted peer the header changes nothing.
/// request.extensions_mut().insert(PeerAddr("198.51.100.1:40000".parse().unwrap()));
/// assert_eq!(resolver.resolve(&request).unwrap(), "198.51.100.1".parse::<std::net::IpAddr>().unwrap());
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientIpResolver {
    trusted: IpSet,
    header: ForwardedHeader,
}

impl ClientIpResolver {
    /// Trust no proxy: the client is the peer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The proxies whose forwarding header is believed.
    #[must_use]
    pub fn trust_proxies(mut self, proxies: IpSet) -> Self {
        self.trusted = proxies;
        self
    }

    /// The header the trusted proxies set (default `X-Forwarded-For`).
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// The trusted proxies.
    pub fn trusted_proxies(&self) -> &IpSet {
        &self.trusted
    }

    /// The request's client IP. Without a peer address in the request's extensions, a 403
    /// `ip_not_allowed` refusal (the server is not set up to give one; see [`PeerAddr`]).
    pub fn resolve<B>(&self, request: &Request<B>) -> Result<IpAddr, Rejection> {
        match peer_addr(request) {
            Some(peer) => Ok(self.resolve_from(peer, request.headers())),
            None => {
                tracing::warn!(
                    "no peer address in the request's extensions; serve with connect info \
                     (axum: into_make_service_with_connect_info) or insert tollgate::ip::PeerAddr"
                );
                Err(no_client_ip())
            }
        }
    }

    /// The client IP of a request from `peer` with these headers.
    pub fn resolve_from(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusted.contains(peer) {
            return peer;
        }
        let name = self.header.name();
        let mut values = headers.get_all(&name).iter();
        if self.header == ForwardedHeader::XRealIp {
            // One address; several headers are malformed.
            let (Some(value), None) = (values.next(), values.next()) else {
                return peer;
            };
            return value
                .to_str()
                .ok()
                .and_then(parse_node)
                .map_or(peer, |ip| ip.to_canonical());
        }
        let mut client = peer;
        for value in values.rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for element in value.rsplit(',') {
                let hop = match self.header {
                    ForwardedHeader::Forwarded => forwarded_for(element),
                    _ => parse_node(element),
                };
                let Some(hop) = hop else {
                    return client;
                };
                client = hop.to_canonical();
                if !self.trusted.contains(client) {
                    return client;
                }
            }
        }
        client
    }
}

/// The `for=` node of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        parse_node(value)
    })
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`. `unknown` and obfuscated identifiers are `None`.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

fn no_client_ip() -> Rejection {
    Rejection::new(Reason::IpNotAllowed)
        .with_message("Your IP address could not be determined, so it cannot be allowed.")
}

impl fmt::Display for ForwardedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes() {
        assert_eq!(
            parse_node(" 192.0.2.1 "),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            parse_node("192.0.2.1:80"),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            parse_node("[2001:db8::1]:80"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            parse_node("[2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_node("unknown"), None);
        assert_eq!(parse_node("_hidden"), None);
        assert_eq!(
            forwarded_for("proto=https;For=\"[2001:db8::1]:4711\""),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(forwarded_for("proto=https"), None);
    }
}
