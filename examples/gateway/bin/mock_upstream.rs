//! The gateway's mock model server on its own, for `scripts/bench_proxy.sh`: the one upstream
//! that the gateway (`upstream = "http://..."`) and the bare proxy both forward to.
//!
//! ```sh
//! cargo run --release -p tollgate-gateway --bin mock_upstream -- 127.0.0.1:18300
//! ```

use std::{net::SocketAddr, process::ExitCode};

#[tokio::main]
async fn main() -> ExitCode {
    let Some(listen) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("usage: mock_upstream ADDR (e.g. 127.0.0.1:18300)");
        return ExitCode::from(2);
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::from(1);
        }
    };
    println!("mock upstream listening on http://{listen}");
    let app = tollgate_gateway::upstream::mock(vec!["mock-small".into(), "mock-large".into()]);
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}
