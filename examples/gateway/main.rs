//! The tollgate gateway: the whole chain (normalize, request id, authenticate, IP allowlist,
//! rate limit, credits) in front of an OpenAI-compatible upstream.
//!
//! ```sh
//! cargo run --release -p tollgate-gateway -- --config examples/gateway.toml [--listen 127.0.0.1:9000]
//! ```
//!
//! The upstream is a built-in mock model server (`upstream = "mock"`) or a real one
//! (`upstream = "http://host:port"`); only the `[[routes]]` of the config (default: chat
//! completions, completions, embeddings, models) are forwarded. Admin routes live under `/admin`
//! (Bearer `[admin] key`), Prometheus metrics under `/metrics` on `[server] metrics_listen` only.
//! Ctrl-C or SIGTERM stops accepting connections and lets in-flight requests finish and settle.

use std::{net::SocketAddr, process::ExitCode};

use clap::{Arg, Command};
use tollgate_gateway::{app, config::GatewayConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Command::new("gateway")
        .about(
            "tollgate's gateway example: the whole chain in front of an OpenAI-compatible upstream",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .default_value("examples/gateway.toml")
                .help("The TOML config file (see the README for every field)"),
        )
        .arg(
            Arg::new("listen")
                .long("listen")
                .value_name("ADDR")
                .help("The listen address, overriding [server] listen (e.g. 127.0.0.1:9000)"),
        )
        .get_matches();

    app::init_logging();

    let path = matches.get_one::<String>("config").expect("has a default");
    let mut config = match GatewayConfig::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {path}: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = matches.get_one::<String>("listen") {
        match listen.parse::<SocketAddr>() {
            Ok(addr) => config.server.listen = addr,
            Err(_) => {
                eprintln!("error: --listen `{listen}` is not an address such as 127.0.0.1:8080");
                return ExitCode::from(2);
            }
        }
    }
    let listen = config.server.listen;
    let gateway = match app::Gateway::build(config).await {
        Ok(gateway) => gateway,
        Err(error) => {
            eprintln!("error: {error}");
            // Storage that cannot be used is a configuration error, as a bad config is.
            return ExitCode::from(if error.storage { 2 } else { 1 });
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    // One shutdown signal for both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut metrics_server = None;
    if let Some((metrics_addr, metrics_app)) = gateway.metrics() {
        let metrics_listener = match tokio::net::TcpListener::bind(metrics_addr).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!(
                    "error: cannot listen on {metrics_addr} (server.metrics_listen): {error}"
                );
                return ExitCode::from(1);
            }
        };
        let bound = metrics_listener.local_addr().unwrap_or(metrics_addr);
        println!("metrics on http://{bound}/metrics");
        metrics_server = Some(tokio::spawn(app::serve(
            metrics_app,
            metrics_listener,
            gateway.limits(),
            wait(stopped.clone()),
        )));
    }
    println!("tollgate gateway listening on http://{addr}");
    match (gateway.demo_key(), gateway.first_key_id()) {
        // The shipped demo config's key is public: print it and a command to try.
        (Some(key), _) => {
            println!("demo key: {key}");
            println!(
                "try: curl -s http://{addr}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
                gateway.demo_model()
            );
        }
        // Any other key is a secret: only its id.
        (None, Some(id)) => println!("first active key: {id} (keys are never printed)"),
        (None, None) => println!("no active key configured"),
    }
    println!("{}", gateway.storage());
    let served = gateway.serve(listener, async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let result = served.await;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    // Every request has ended: its settlement finishes, then the storage is closed.
    let left = tollgate::credits::finish_settlements(std::time::Duration::from_secs(10)).await;
    if left > 0 {
        tracing::warn!(
            left,
            "settlements still running at exit; their holds will expire"
        );
    }
    let result = match result {
        Ok(()) => gateway.close().await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => {
            println!("tollgate gateway stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
