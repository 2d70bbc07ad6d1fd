//! A tonic gRPC service behind tollgate's layers: refusals arrive as gRPC statuses.
//!
//! The service is tonic-health's `grpc.health.v1.Health` (no protoc or codegen needed); yours
//! goes in `add_service` the same way. The layers go on `Server::builder().layer(...)`:
//!
//! | refusal | gRPC status |
//! |---|---|
//! | no key, unknown key | `UNAUTHENTICATED` |
//! | the key's IP allowlist excludes the caller | `PERMISSION_DENIED` |
//! | rate limit, not enough credits | `RESOURCE_EXHAUSTED` |
//!
//! Keys travel in the `authorization: Bearer <key>` metadata.
//!
//! ```sh
//! cargo run --example tonic_grpc                              # on 127.0.0.1:3000
//! cargo run --example tonic_grpc -- --listen 127.0.0.1:50051  # or LISTEN=127.0.0.1:50051
//! grpcurl -plaintext -H "authorization: Bearer $KEY" localhost:3000 grpc.health.v1.Health/Check
//! ```

use std::net::SocketAddr;

use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, MemoryKeyStore},
    credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Pricing},
    ip::{IpAllowLayer, IpSet, PeerAddr},
    normalize::NormalizeLayer,
    ratelimit::{Plan, Plans, RateLimitLayer},
};
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
use tower::util::MapRequestLayer;

/// Every call costs 1 credit.
pub const PRICE: u64 = 1;

/// Plans: 60 calls a minute unless the account's plan says otherwise.
pub fn plans() -> Plans {
    Plans::new(Plan::new().requests_per_minute(60))
}

/// tonic records the peer as `TcpConnectInfo`; tollgate's IP layers read a `PeerAddr`.
fn peer_addr(mut request: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    if let Some(addr) = request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
    {
        request.extensions_mut().insert(PeerAddr(addr));
    }
    request
}

/// Serve the health service, behind the layers, on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    keys: MemoryKeyStore,
    ledger: MemoryLedger,
    plans: Plans,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        // Outermost first.
        .layer(NormalizeLayer::new())
        .layer(MapRequestLayer::new(peer_addr))
        .layer(AuthLayer::new(keys))
        .layer(IpAllowLayer::new()) // enforces the keys' own IP allowlists
        .layer(RateLimitLayer::memory(plans))
        .layer(CreditsLayer::new(ledger, Pricing::flat(PRICE)))
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// An account with `credits`, and a new key for it, usable from `allow` only when given.
pub async fn demo_account(
    keys: &MemoryKeyStore,
    ledger: &MemoryLedger,
    account: &str,
    plan: &str,
    credits: u64,
    allow: Option<IpSet>,
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
    let mut record = KeyRecord::new(format!("key_{account}"), account);
    if let Some(allow) = allow {
        record = record.ip_allowlist(allow);
    }
    let key = keys
        .create_key("sk-demo-", record)
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
    let key = demo_account(&keys, &ledger, "acct_demo", "free", 100, None).await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("gRPC health service listening on {addr}");
    println!("demo key (account acct_demo, 100 credits): {key}");
    println!("try: grpcurl -plaintext -H 'authorization: Bearer {key}' {addr} grpc.health.v1.Health/Check");
    serve(listener, keys, ledger, plans())
        .await
        .map_err(|e| e.to_string())
}
