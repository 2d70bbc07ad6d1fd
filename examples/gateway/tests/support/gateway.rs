//! Starts the gateway example in-process on a free loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;

// Not every test uses both.
use tollgate_gateway::config::GatewayConfig;
#[allow(unused_imports)]
pub use tollgate_gateway::{app, upstream};

/// A running gateway; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served, with `[server] metrics_listen` set.
    pub metrics_addr: Option<SocketAddr>,
    pub gateway: app::Gateway,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
}

impl Running {
    /// Stop accepting connections; in-flight requests finish.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Build a gateway from TOML and serve it as the binary does (the same server, limits and
/// metrics listener) on 127.0.0.1 with an ephemeral port.
pub async fn start(toml: &str) -> Running {
    let config = GatewayConfig::from_toml(toml).expect("valid test config");
    let gateway = app::Gateway::build(config).await.expect("gateway builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut metrics_addr = None;
    if let Some((wanted, metrics)) = gateway.metrics() {
        let listener = tokio::net::TcpListener::bind(wanted).await.unwrap();
        metrics_addr = Some(listener.local_addr().unwrap());
        tokio::spawn(app::serve(
            metrics,
            listener,
            gateway.limits(),
            stopped(rx.clone()),
        ));
    }
    let server = gateway.serve(listener, stopped(rx));
    tokio::spawn(async move { server.await.unwrap() });
    Running {
        addr,
        metrics_addr,
        gateway,
        shutdown: Some(tx),
    }
}
