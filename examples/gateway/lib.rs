//! The tollgate gateway: a TOML config turned into the whole chain (normalize, request id,
//! authenticate, IP allowlist, rate limit, credits) in front of an OpenAI-compatible upstream.
//!
//! The binary (`main.rs`) parses the command line and serves [`app::Gateway`]; the tests build
//! the same [`app::Gateway`] in-process from [`config::GatewayConfig`].

pub mod app;
pub mod config;
pub mod upstream;
