//! The gateway example's binary, as `cargo test` builds it, for the tests that drive the real
//! process (raw sockets, `kill -9`, exit codes).

use std::path::PathBuf;

/// `target/<profile>/examples/gateway`, next to this test binary's `deps/`.
///
/// # Panics
///
/// When it was not built: `cargo test --all-features` builds the examples, `cargo test --test X`
/// alone does not.
pub fn example_binary() -> PathBuf {
    let mut path = std::env::current_exe().expect("the test binary's path");
    path.pop();
    path.pop();
    path.push("examples");
    path.push(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the whole `cargo test --all-features` (or `cargo build --all-features --example gateway`) first",
        path.display()
    );
    path
}
