//! The body of the `config` fuzz target (the gateway's TOML parser), shared by two builds:
//!
//! - `fuzz/fuzz_targets/config.rs` (cargo-fuzz, nightly);
//! - `examples/gateway/tests/config_properties.rs` (stable, in CI): over the seeds in
//!   `fuzz/seeds/config` and generated inputs.
//!
//! The other targets, which need only the library, are in `targets.rs`.

/// The gateway configuration parser on arbitrary text.
///
/// Asserts: no panic; an error has a message and, when it names a line, a line in the text.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(error) = tollgate_gateway::config::GatewayConfig::from_toml(&text) {
        let message = error.to_string();
        assert!(!message.is_empty(), "a config error says what is wrong");
        if let Some(line) = error.line() {
            assert!(
                (1..=text.lines().count() + 1).contains(&line),
                "line {line} is not in the text ({} lines): {message}",
                text.lines().count()
            );
        }
    }
}
