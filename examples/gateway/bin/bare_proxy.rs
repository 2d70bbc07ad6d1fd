//! A bare hyper reverse proxy: the floor the gateway is compared with in
//! `scripts/bench_proxy.sh`.
//!
//! The same server (hyper-util's HTTP/1 + HTTP/2 server, one task per connection) and the same
//! client (hyper-util's pooled client, `TCP_NODELAY`) as the gateway's upstream proxy, and no
//! policy at all: every request is forwarded to the upstream with its hop-by-hop headers removed,
//! and the response streamed back.
//!
//! ```sh
//! cargo run --release -p tollgate-gateway --bin bare_proxy -- 127.0.0.1:18301 http://127.0.0.1:18300
//! ```

use std::{convert::Infallible, net::SocketAddr, process::ExitCode, sync::Arc};

use http::{header, HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Headers of one hop only (RFC 9110, section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

struct Proxy {
    client: Client<HttpConnector, Incoming>,
    /// `http://host:port`.
    authority: http::uri::Authority,
}

impl Proxy {
    async fn forward(&self, mut request: Request<Incoming>) -> Response<Body> {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build();
        let Ok(uri) = uri else {
            return status(StatusCode::BAD_REQUEST);
        };
        *request.uri_mut() = uri;
        strip_hop_by_hop(request.headers_mut());
        request.headers_mut().remove(header::HOST);
        match self.client.request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(_) => status(StatusCode::BAD_GATEWAY),
        }
    }
}

fn status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let listen = args.next().and_then(|a| a.parse::<SocketAddr>().ok());
    let upstream = args.next().and_then(|a| a.parse::<Uri>().ok());
    let (Some(listen), Some(authority)) = (
        listen,
        upstream
            .filter(|u| u.scheme_str() == Some("http"))
            .and_then(|u| u.authority().cloned()),
    ) else {
        eprintln!(
            "usage: bare_proxy LISTEN UPSTREAM (e.g. 127.0.0.1:18301 http://127.0.0.1:18300)"
        );
        return ExitCode::from(2);
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::from(1);
        }
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let proxy = Arc::new(Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        authority,
    });
    let server = Arc::new(auto::Builder::new(TokioExecutor::new()));
    println!("bare proxy listening on http://{listen}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (proxy, server) = (proxy.clone(), server.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.forward(request).await) }
            });
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
