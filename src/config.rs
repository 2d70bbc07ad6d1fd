//! A whole gateway described in TOML: server, admin key, backend, plans, models, accounts, keys.
//!
//! [`GatewayConfig::from_toml`] parses and validates; every error names the field and the line
//! (unknown fields, wrong types, a plan or account that does not exist, a bad CIDR or date).
//! The gateway example (`examples/gateway.toml`) is documented field by field in the README.
//!
//! # Example
//!
//! ```
//! use tollgate::config::GatewayConfig;
//!
//! let config = GatewayConfig::from_toml(r#"
//!     [server]
//!     listen = "127.0.0.1:8080"
//!
//!     [[plans]]
//!     name = "free"
//!     requests_per_minute = 20
//!
//!     [[accounts]]
//!     id = "acct_1"
//!     plan = "free"
//!     balance = 1000
//!
//!     [[keys]]
//!     id = "key_1"
//!     account = "acct_1"
//!     key = "sk-demo-0123456789abcdef"
//! "#).unwrap();
//! assert_eq!(config.accounts[0].balance, 1000);
//!
//! let error = GatewayConfig::from_toml(r#"
//!     [[accounts]]
//!     id = "acct_1"
//!     plan = "gold"
//! "#).unwrap_err();
//! assert_eq!(error.to_string(), "line 4: accounts[0].plan: no plan named `gold` (add a [[plans]] entry)");
//! ```

use std::{collections::HashSet, fmt, net::SocketAddr, path::Path, time::SystemTime};

use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use crate::{format::Format, ip::IpSet};

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[admin]`: the admin routes exist only when a key is set.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[backend]`.
    #[serde(default)]
    pub backend: BackendConfig,
    /// `[[plans]]`.
    #[serde(default)]
    pub plans: Vec<PlanConfig>,
    /// `[[models]]`.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[[accounts]]`.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
    /// `[[keys]]`.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The listen address (`--listen` overrides it). Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `openai` (default), `envelope` or `problem`.
    #[serde(default, deserialize_with = "de_format")]
    pub error_format: Format,
    /// CIDRs of proxies whose forwarding headers are believed.
    #[serde(default, deserialize_with = "de_ip_set")]
    pub trusted_proxies: IpSet,
    /// CIDRs allowed for every key (empty: all).
    #[serde(default, deserialize_with = "de_ip_set")]
    pub ip_allow: IpSet,
    /// CIDRs refused for every key; deny wins over allow.
    #[serde(default, deserialize_with = "de_ip_set")]
    pub ip_deny: IpSet,
    /// `mock` (default: the built-in model server) or `http://host:port`.
    #[serde(default)]
    pub upstream: Upstream,
    /// The Bearer key sent to a real upstream.
    #[serde(default)]
    pub upstream_key: Option<String>,
    /// Seconds an upstream call may take before a 504. Default 60.
    #[serde(default = "default_timeout")]
    pub upstream_timeout_secs: u64,
    /// Seconds after which an unsettled hold is settled at its amount. Default 600.
    #[serde(default = "default_hold_ttl")]
    pub hold_ttl_secs: u64,
    /// The largest request body read to price a call, in bytes. Default 1 MiB.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// With the in-memory backend, the journal entries kept per account (the latest). Default
    /// 10000; balances never depend on it.
    #[serde(default = "default_journal_limit")]
    pub journal_limit: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            error_format: Format::OpenAi,
            trusted_proxies: IpSet::new(),
            ip_allow: IpSet::new(),
            ip_deny: IpSet::new(),
            upstream: Upstream::Mock,
            upstream_key: None,
            upstream_timeout_secs: default_timeout(),
            hold_ttl_secs: default_hold_ttl(),
            max_body_bytes: default_body_limit(),
            journal_limit: default_journal_limit(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_timeout() -> u64 {
    60
}
fn default_hold_ttl() -> u64 {
    600
}
fn default_journal_limit() -> usize {
    10_000
}
fn default_body_limit() -> usize {
    crate::inspect::DEFAULT_BODY_LIMIT
}

/// Where requests go after the chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Upstream {
    /// The built-in mock model server.
    #[default]
    Mock,
    /// A real OpenAI-compatible server, `http://host:port`.
    Url(String),
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "mock" {
            return Ok(Upstream::Mock);
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|_| de::Error::custom(format!("`{s}` is not `mock` or a URL")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(de::Error::custom(format!(
                "`{s}` must be `mock` or an http://host:port URL"
            )));
        }
        Ok(Upstream::Url(s))
    }
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminConfig {
    /// The Bearer key of the admin routes under `/admin`; none, no admin routes.
    pub key: Option<String>,
}

/// `[backend]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackendConfig {
    /// `memory` (default), `redis` or `postgres`.
    #[serde(default)]
    pub kind: BackendKind,
    /// The Redis URL, with `kind = "redis"`; the PostgreSQL URL
    /// (`postgres://user@host:port/db`), with `kind = "postgres"`.
    pub url: Option<String>,
    /// With PostgreSQL: the schema of the tables (default `tollgate`), created and migrated at
    /// startup.
    pub schema: Option<String>,
    /// With Redis: refuse (`closed`) or allow (`open`, default) requests when the rate limiter's
    /// store is unreachable. Credits always fail closed.
    #[serde(default)]
    pub rate_limit_fail: FailMode,
}

/// Which store backs keys, limits and balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// In this process.
    #[default]
    Memory,
    /// Redis, shared by replicas.
    Redis,
    /// PostgreSQL, shared by replicas: durable books.
    Postgres,
}

/// What a limiter does when its store is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Let requests through.
    #[default]
    Open,
    /// Refuse with 503 `backend_unavailable`.
    Closed,
}

/// `[[plans]]`: a tier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PlanConfig {
    /// The plan's name.
    pub name: Spanned<String>,
    /// Requests per minute (none: no request limit).
    pub requests_per_minute: Option<u32>,
    /// Requests allowed at once (default: the per-minute quota).
    pub burst: Option<u32>,
    /// Tokens per minute (none: no token limit).
    pub tokens_per_minute: Option<u32>,
    /// The models the plan may use (omitted: all).
    pub models: Option<Vec<String>>,
}

/// `[[models]]`: a model and its price.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ModelConfig {
    /// The model id.
    pub id: Spanned<String>,
    /// Credits per call.
    #[serde(default)]
    pub credits_per_request: u64,
    /// Credits per 1000 tokens (prompt and completion), rounded up per call.
    #[serde(default)]
    pub credits_per_1k_tokens: u64,
}

/// `[[accounts]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AccountConfig {
    /// The account id.
    pub id: Spanned<String>,
    /// The plan.
    pub plan: Spanned<String>,
    /// The starting balance in credits (applied once per backend: an idempotent top-up).
    #[serde(default)]
    pub balance: u64,
    /// Whether the account is frozen.
    #[serde(default)]
    pub frozen: bool,
}

/// `[[keys]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyConfig {
    /// The key id (shown in logs and the journal, never the key).
    pub id: Spanned<String>,
    /// The account.
    pub account: Spanned<String>,
    /// The plaintext key (for demos).
    pub key: Option<Spanned<String>>,
    /// The SHA-256 digest of the key, hex.
    #[serde(default, deserialize_with = "de_digest")]
    pub sha256: Option<[u8; 32]>,
    /// `active` (default), `disabled` or `revoked`.
    #[serde(default)]
    pub status: KeyStatusConfig,
    /// When the key expires (RFC 3339).
    #[serde(default, deserialize_with = "de_time")]
    pub expires_at: Option<SystemTime>,
    /// CIDRs the key may be used from (omitted: anywhere).
    #[serde(default, deserialize_with = "de_opt_ip_set")]
    pub ip_allowlist: Option<IpSet>,
    /// A plan that overrides the account's.
    pub plan: Option<Spanned<String>>,
}

/// A key's status in the config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatusConfig {
    /// Usable.
    #[default]
    Active,
    /// Disabled by an operator.
    Disabled,
    /// Revoked.
    Revoked,
}

fn de_format<'de, D: Deserializer<'de>>(d: D) -> Result<Format, D::Error> {
    String::deserialize(d)?.parse().map_err(de::Error::custom)
}

fn de_ip_set<'de, D: Deserializer<'de>>(d: D) -> Result<IpSet, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    IpSet::parse(&list).map_err(de::Error::custom)
}

fn de_opt_ip_set<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpSet>, D::Error> {
    de_ip_set(d).map(Some)
}

fn de_digest<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
    let s = String::deserialize(d)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| de::Error::custom("expected 64 hexadecimal characters (a SHA-256 digest)"))?;
    Ok(Some(out))
}

fn de_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_rfc3339_weak(&s).map(Some).map_err(|_| {
        de::Error::custom(format!(
            "`{s}` is not an RFC 3339 time such as 2027-01-01T00:00:00Z"
        ))
    })
}

/// A configuration error, naming the field and the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    line: Option<usize>,
    message: String,
}

impl ConfigError {
    /// The 1-based line, when known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl GatewayConfig {
    /// Read and validate a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_toml(&text).map_err(|e| ConfigError {
            line: e.line,
            message: match e.line {
                Some(_) => e.message,
                None => format!("{}: {}", path.display(), e.message),
            },
        })
    }

    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: GatewayConfig = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start);
            let message = e.message().trim();
            ConfigError {
                line: start.map(|s| line_of(text, s)),
                message: match start.and_then(|s| field_at(text, s)) {
                    Some(field) if !message.contains(&format!("`{field}`")) => {
                        format!("{field}: {message}")
                    }
                    _ => message.to_owned(),
                },
            }
        })?;
        config.validate(text)?;
        Ok(config)
    }

    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let at = |span: std::ops::Range<usize>, message: String| ConfigError {
            line: Some(line_of(text, span.start)),
            message,
        };
        let mut plans = HashSet::new();
        for (i, plan) in self.plans.iter().enumerate() {
            if !plans.insert(plan.name.get_ref().as_str()) {
                return Err(at(
                    plan.name.span(),
                    format!("plans[{i}].name: duplicate plan `{}`", plan.name.get_ref()),
                ));
            }
            if plan.requests_per_minute == Some(0)
                || plan.tokens_per_minute == Some(0)
                || plan.burst == Some(0)
            {
                return Err(at(
                    plan.name.span(),
                    format!("plans[{i}]: limits must be at least 1 (omit a limit to have none)"),
                ));
            }
        }
        let mut models = HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            if !models.insert(model.id.get_ref().as_str()) {
                return Err(at(
                    model.id.span(),
                    format!("models[{i}].id: duplicate model `{}`", model.id.get_ref()),
                ));
            }
        }
        let mut accounts = HashSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            if !accounts.insert(account.id.get_ref().as_str()) {
                return Err(at(
                    account.id.span(),
                    format!(
                        "accounts[{i}].id: duplicate account `{}`",
                        account.id.get_ref()
                    ),
                ));
            }
            if !plans.contains(account.plan.get_ref().as_str()) {
                return Err(at(
                    account.plan.span(),
                    format!(
                        "accounts[{i}].plan: no plan named `{}` (add a [[plans]] entry)",
                        account.plan.get_ref()
                    ),
                ));
            }
        }
        let mut keys = HashSet::new();
        let mut digests = HashSet::new();
        for (i, key) in self.keys.iter().enumerate() {
            if !keys.insert(key.id.get_ref().as_str()) {
                return Err(at(
                    key.id.span(),
                    format!("keys[{i}].id: duplicate key id `{}`", key.id.get_ref()),
                ));
            }
            if !accounts.contains(key.account.get_ref().as_str()) {
                return Err(at(
                    key.account.span(),
                    format!(
                        "keys[{i}].account: no account `{}` (add an [[accounts]] entry)",
                        key.account.get_ref()
                    ),
                ));
            }
            if let Some(plan) = &key.plan {
                if !plans.contains(plan.get_ref().as_str()) {
                    return Err(at(
                        plan.span(),
                        format!("keys[{i}].plan: no plan named `{}`", plan.get_ref()),
                    ));
                }
            }
            // `[]` would read as "no IP" on a key but "every IP" for `[server] ip_allow`.
            if key.ip_allowlist.as_ref().is_some_and(IpSet::is_empty) {
                return Err(at(
                    key.id.span(),
                    format!("keys[{i}].ip_allowlist: name at least one network (omit it to allow every IP, or set `status = \"disabled\"` to allow none)"),
                ));
            }
            let digest = match (&key.key, key.sha256) {
                (Some(plain), None) => {
                    let k = plain.get_ref();
                    if k.len() < 16 || k.trim() != k || !k.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(at(plain.span(), format!("keys[{i}].key: a key is at least 16 visible ASCII characters with no spaces")));
                    }
                    <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(k.as_bytes()))
                }
                (None, Some(digest)) => digest,
                _ => {
                    return Err(at(
                        key.id.span(),
                        format!("keys[{i}]: give exactly one of `key` and `sha256`"),
                    ))
                }
            };
            if !digests.insert(digest) {
                return Err(at(
                    key.id.span(),
                    format!("keys[{i}]: the same key is configured twice"),
                ));
            }
        }
        if self.backend.kind == BackendKind::Redis && self.backend.url.is_none() {
            return Err(ConfigError {
                line: None,
                message:
                    "backend.url: `kind = \"redis\"` needs a url such as redis://127.0.0.1:6379"
                        .into(),
            });
        }
        if self.backend.kind == BackendKind::Postgres && self.backend.url.is_none() {
            return Err(ConfigError {
                line: None,
                message: "backend.url: `kind = \"postgres\"` needs a url such as postgres://user@127.0.0.1:5432/db"
                    .into(),
            });
        }
        if let Some(schema) = &self.backend.schema {
            if self.backend.kind != BackendKind::Postgres {
                return Err(ConfigError {
                    line: None,
                    message: "backend.schema: only with `kind = \"postgres\"`".into(),
                });
            }
            let valid = !schema.is_empty()
                && schema.len() <= 63
                && !schema.starts_with(|c: char| c.is_ascii_digit())
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(ConfigError {
                    line: None,
                    message: format!(
                        "backend.schema: {schema:?} must be 1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
                    ),
                });
            }
        }
        if let Some(key) = &self.admin.key {
            if key.len() < 16 {
                return Err(ConfigError {
                    line: None,
                    message: "admin.key: use at least 16 characters".into(),
                });
            }
        }
        Ok(())
    }
}

/// The field being set on the line of `offset` (`key = value`), if the line is an assignment.
fn field_at(text: &str, offset: usize) -> Option<&str> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let (field, _) = text[start..end].split_once('=')?;
    let field = field.trim();
    (!field.is_empty() && !field.starts_with('[')).then_some(field)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        GatewayConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_line() {
        assert_eq!(
            err("[server]\nlisten = \"127.0.0.1:8080\"\nerror_format = \"xml\"\n"),
            "line 3: error_format: unknown error format `xml`: expected `openai`, `envelope` or `problem`"
        );
        assert_eq!(
            err("[[plans]]\nname = \"free\"\nrequests_per_minute = \"ten\"\n"),
            "line 3: requests_per_minute: invalid type: string \"ten\", expected u32"
        );
        assert!(err("[server]\nlisten = \"x\"\n").starts_with("line 2: listen: "));
        assert!(
            err("[server]\nlistn = \"127.0.0.1:1\"\n").starts_with("line 2: unknown field `listn`")
        );
        assert!(err("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n")
            .starts_with("line 2: trusted_proxies: `10.0.0.0/33` is not a CIDR"));
        assert_eq!(
            err("[[plans]]\nname = \"p\"\n[[accounts]]\nid = \"a\"\nplan = \"p\"\n[[keys]]\nid = \"k\"\naccount = \"b\"\nkey = \"sk-demo-0123456789\"\n"),
            "line 8: keys[0].account: no account `b` (add an [[accounts]] entry)"
        );
        assert_eq!(
            err("[[plans]]\nname = \"p\"\n[[accounts]]\nid = \"a\"\nplan = \"p\"\n[[keys]]\nid = \"k\"\naccount = \"a\"\n"),
            "line 7: keys[0]: give exactly one of `key` and `sha256`"
        );
        assert!(
            err("[[keys]]\nid = \"k\"\naccount = \"a\"\nexpires_at = \"tomorrow\"\n")
                .starts_with("line 4: expires_at: `tomorrow` is not an RFC 3339 time")
        );
        assert!(err("[server]\nupstream = \"ftp://x\"\n").starts_with("line 2: upstream: "));
        assert!(err("[server\n").starts_with("line 1: "));
    }

    #[test]
    fn an_empty_key_allowlist_is_refused() {
        assert_eq!(
            err("[[plans]]\nname = \"p\"\n[[accounts]]\nid = \"a\"\nplan = \"p\"\n[[keys]]\nid = \"k\"\naccount = \"a\"\nkey = \"sk-demo-0123456789\"\nip_allowlist = []\n"),
            "line 7: keys[0].ip_allowlist: name at least one network (omit it to allow every IP, or set `status = \"disabled\"` to allow none)"
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let config = GatewayConfig::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/gateway.toml"
        ))
        .unwrap();
        assert!(!config.keys.is_empty());
    }
}
