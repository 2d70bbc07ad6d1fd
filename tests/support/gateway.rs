//! Starts the gateway example in-process on a free loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;

use tollgate::config::GatewayConfig;

#[path = "../../examples/gateway/app.rs"]
pub mod app;
#[path = "../../examples/gateway/upstream.rs"]
pub mod upstream;

/// A running gateway; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: app::Gateway,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    /// Stop accepting connections; in-flight requests finish.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Build a gateway from TOML and serve it on 127.0.0.1 with an ephemeral port.
pub async fn start(toml: &str) -> Running {
    let config = GatewayConfig::from_toml(toml).expect("valid test config");
    let gateway = app::Gateway::build(config).await.expect("gateway builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = gateway.router();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        gateway,
        shutdown: Some(tx),
    }
}
