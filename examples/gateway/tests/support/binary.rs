//! The gateway's binary, as `cargo test` builds it, for the tests that drive the real process
//! (raw sockets, `kill -9`, exit codes).

use std::path::PathBuf;

/// The `gateway` binary of this package: cargo builds it before the integration tests run and
/// names it in `CARGO_BIN_EXE_gateway`.
pub fn example_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
}
