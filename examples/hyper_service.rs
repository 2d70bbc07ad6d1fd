//! A plain hyper 1 service (no axum) behind tollgate's layers.
//!
//! The service is a `service_fn`; `tower::ServiceBuilder` puts the layers in front of it, and
//! hyper-util's `TowerToHyperService` hands the result to hyper's connection builder.
//!
//! ```sh
//! cargo run --example hyper_service                              # on 127.0.0.1:3000
//! cargo run --example hyper_service -- --listen 127.0.0.1:8080   # or LISTEN=127.0.0.1:8080
//! curl -s localhost:3000/v1/echo -H "Authorization: Bearer $KEY" -d 'hello'
//! ```

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, MemoryKeyStore},
    credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Pricing},
    ip::PeerAddr,
    normalize::NormalizeLayer,
    ratelimit::{Plan, Plans, RateLimitLayer},
    Caller,
};
use tower::{ServiceBuilder, ServiceExt};

/// The service: `POST /v1/echo` answers the body back with the caller's account; anything else
/// is a 404 (which tollgate renders as an OpenAI-style error, uncharged).
async fn handle<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // The authentication layer put the caller here; the key itself is gone from the request.
    let account = request
        .extensions()
        .get::<Caller>()
        .map(|caller| caller.account_id().to_owned())
        .unwrap_or_default();
    if request.method() != http::Method::POST || request.uri().path() != "/v1/echo" {
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            let mut response = Response::new(Full::from(error.to_string()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    let answer = serde_json::json!({
        "account": account,
        "echo": String::from_utf8_lossy(&body),
    });
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::from(answer.to_string()))
        .expect("valid response"))
}

/// Every call costs 2 credits.
pub const PRICE: u64 = 2;

/// Plans: 60 requests a minute unless the account's plan says otherwise.
pub fn plans() -> Plans {
    Plans::new(Plan::new().requests_per_minute(60))
}

/// Accept connections on `listener` and serve each with the layered service.
pub async fn serve(
    listener: tokio::net::TcpListener,
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
    plans: Plans,
) -> std::io::Result<()> {
    let service = ServiceBuilder::new()
        .layer(NormalizeLayer::new())
        .layer(AuthLayer::new(keys))
        .layer(RateLimitLayer::memory(plans))
        .layer(CreditsLayer::new(ledger, Pricing::flat(PRICE)))
        .service_fn(handle);
    loop {
        let (stream, peer) = listener.accept().await?;
        // hyper does not record the peer address: tell tollgate (for the per-IP brute-force
        // shield and any IP allowlist) with a `PeerAddr` on each request of the connection.
        let service = service.clone().map_request(move |mut request: Request<_>| {
            request.extensions_mut().insert(PeerAddr(peer));
            request
        });
        tokio::spawn(async move {
            let connection = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .await;
            if let Err(error) = connection {
                eprintln!("connection from {peer}: {error}");
            }
        });
    }
}

/// An account with `credits`, and a new key for it.
pub async fn demo_account(
    keys: &MemoryKeyStore,
    ledger: &MemoryLedger,
    account: &str,
    plan: &str,
    credits: u64,
) -> String {
    keys.put_account(AccountRecord::new(account, plan))
        .await
        .expect("in memory");
    if credits > 0 {
        ledger
            .top_up(account, credits, &format!("demo:{account}"))
            .await
            .expect("in memory");
    }
    let key = keys
        .create_key(
            "sk-demo-",
            KeyRecord::new(format!("key_{account}"), account),
        )
        .await
        .expect("the account exists");
    key.as_str().to_owned()
}

/// `--listen ADDR`, else `$LISTEN`, else 127.0.0.1:3000.
fn listen_addr() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = std::env::var("LISTEN").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().ok_or("--listen needs an address")?),
            other => return Err(format!("unknown argument `{other}` (try --listen ADDR)")),
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:3000".into());
    listen
        .parse()
        .map_err(|_| format!("`{listen}` is not an address such as 127.0.0.1:3000"))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let addr = listen_addr()?;
    let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
    let key = demo_account(&keys, &ledger, "acct_demo", "free", 100).await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("hyper service listening on http://{addr}");
    println!("demo key (account acct_demo, 100 credits): {key}");
    println!("try: curl -s http://{addr}/v1/echo -H 'Authorization: Bearer {key}' -d 'hello'");
    serve(listener, keys, ledger, plans())
        .await
        .map_err(|e| e.to_string())
}
