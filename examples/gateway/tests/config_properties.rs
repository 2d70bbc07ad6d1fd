//! Property tests of the gateway's TOML parser: mutations of the shipped config and arbitrary
//! text get an error naming a line in the text, never a panic; the `config` fuzz target's seeds
//! pass its assertions (the library's targets run in the library's `tests/properties.rs`).

use proptest::prelude::*;

// The fuzz target's body, shared with cargo-fuzz (`fuzz/fuzz_targets/config.rs`).
#[path = "../../../fuzz/config_target.rs"]
mod config_target;

/// The shipped example config (the seed of the mutation test).
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml");

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of the example config (bytes deleted, inserted, replaced): an error naming a
    /// line in the text, never a panic.
    #[test]
    fn config_mutations_never_panic(at in any::<usize>(), len in 0..20usize, insert in proptest::collection::vec(any::<u8>(), 0..12)) {
        let mut text = std::fs::read(EXAMPLE).unwrap();
        let at = at % (text.len() + 1);
        let end = (at + len).min(text.len());
        text.splice(at..end, insert);
        config_target::config(&text);
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in "(\\[\\[?[a-z]{0,8}\\]\\]?\n|[a-z_]{1,12} = (\"[^\"\n]{0,12}\"|[0-9]{1,22}|\\[[^\n]{0,20}\\]|true)\n){0,12}") {
        config_target::config(text.as_bytes());
    }
}

/// The example config parses (the seeds of the mutation test start from a valid file).
#[test]
fn example_config_parses() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    tollgate_gateway::config::GatewayConfig::from_toml(&text).unwrap();
}

/// Every seed of the `config` fuzz target passes the target's assertions: the corpus cargo-fuzz
/// starts from, checked on stable in CI.
#[test]
fn config_fuzz_seeds_pass() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/config");
    let mut seeds = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| config_target::config(&data));
        assert!(result.is_ok(), "config: seed {} fails", path.display());
        seeds += 1;
    }
    assert!(seeds >= 5, "config has {seeds} seeds");
}
