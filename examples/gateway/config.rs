//! A whole gateway described in TOML: server, admin key, backend, plans, models, accounts, keys.
//!
//! [`GatewayConfig::from_toml`] parses and validates; every error names the field and the line
//! (unknown fields, wrong types, a plan or account that does not exist, a bad CIDR or date).
//! The gateway example (`examples/gateway.toml`) is documented field by field in the README.
//!
//! # Example
//!
//! ```
//! use tollgate_gateway::config::GatewayConfig;
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

use tollgate::{format::Format, ip::IpSet};

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
    /// `[[routes]]`: the only requests forwarded upstream, each with its price. Omitted: the
    /// default routes of [`RouteConfig::defaults`].
    #[serde(default)]
    pub routes: Option<Vec<RouteConfig>>,
    /// `[errors.<tollgate code>]`: the error catalog, see [`ErrorConfig`].
    #[serde(default)]
    pub errors: std::collections::BTreeMap<Spanned<String>, ErrorConfig>,
}

/// `[errors.<tollgate code>]`: how one refusal is presented (a provider's documented contract).
///
/// ```toml
/// [errors.insufficient_quota]        # one table per tollgate code
/// status = 402
/// type = "insufficient_balance"
/// code = "insufficient_balance"      # or an integer: code = 402
/// message = "Insufficient balance. Please top up your account."
/// ```
///
/// Every field is optional; see [`ErrorOverride`](tollgate::format::ErrorOverride) for the
/// `{placeholders}` a message may use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ErrorConfig {
    /// The HTTP status, 400 to 599.
    pub status: Option<Spanned<u16>>,
    /// The body's `type`.
    #[serde(rename = "type")]
    pub error_type: Option<String>,
    /// The body's `code`: a string or an integer.
    pub code: Option<CodeConfig>,
    /// The message.
    pub message: Option<String>,
    /// The `param`.
    pub param: Option<String>,
}

/// An `[errors.*] code`: a string, or an integer rendered as a JSON number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeConfig {
    /// `code = "insufficient_balance"`.
    Text(String),
    /// `code = 402`.
    Number(i64),
}

impl<'de> Deserialize<'de> for CodeConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = CodeConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CodeConfig, E> {
                Ok(CodeConfig::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CodeConfig, E> {
                Ok(CodeConfig::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CodeConfig, E> {
                i64::try_from(v)
                    .map(CodeConfig::Number)
                    .map_err(|_| E::custom("the integer is too large"))
            }
        }
        d.deserialize_any(Visitor)
    }
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
    /// With the memory and Redis backends, the journal entries kept per account (the latest).
    /// Default 10000; balances never depend on it. (SQLite keeps the whole journal.)
    #[serde(default = "default_journal_limit")]
    pub journal_limit: usize,
    /// Seconds a client has to send a whole request header section (and, on a kept-alive
    /// connection, the next one); the connection is closed past it. Default 10.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a whole request body, from the end of its headers; past it
    /// the request is a 408 and the connection is closed. Default 30.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_secs: u64,
    /// Seconds a graceful shutdown (SIGTERM, Ctrl-C) waits for in-flight requests and streams
    /// to end. Past it the connections still open are closed: each cut stream is settled at
    /// once like any client disconnect, and the process exits after the settlements (at most
    /// 10 s more). Default 30 (Kubernetes' termination grace period); 0 cuts at once.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// The most client connections served at once; more wait in the listen backlog. Default:
    /// half the open-file limit less 64 (a proxied connection can hold an upstream socket too).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The largest request header section, in bytes: the request target plus, per field, its
    /// name, its value and 32 (HTTP/2's measure), for HTTP/1.1 and HTTP/2 alike. Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// The most header fields in a request. Default 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// A separate listen address for `GET /metrics` (Prometheus); none: no metrics. The public
    /// listener never serves them.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
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
            header_read_timeout_secs: default_header_read_timeout(),
            body_read_timeout_secs: default_body_read_timeout(),
            shutdown_timeout_secs: default_shutdown_timeout(),
            max_connections: None,
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            metrics_listen: None,
        }
    }
}

fn default_header_read_timeout() -> u64 {
    10
}
fn default_body_read_timeout() -> u64 {
    30
}
fn default_shutdown_timeout() -> u64 {
    30
}
fn default_max_header_bytes() -> usize {
    65_536
}
fn default_max_headers() -> usize {
    100
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
    tollgate::inspect::DEFAULT_BODY_LIMIT
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
    /// `memory` (default), `sqlite`, `redis` or `postgres`.
    #[serde(default)]
    pub kind: BackendKind,
    /// The Redis URL, with `kind = "redis"` (or `cluster` instead); the PostgreSQL URL
    /// (`postgres://user@host:port/db`), with `kind = "postgres"`.
    pub url: Option<String>,
    /// With `kind = "redis"`, instead of `url`: some nodes of a Redis Cluster
    /// (`["redis://host:port", ...]`; the others are discovered).
    pub cluster: Option<Vec<String>>,
    /// With `kind = "sqlite"`: the database file, relative to the working directory (default
    /// `tollgate.db`), created on first start.
    pub path: Option<std::path::PathBuf>,
    /// With PostgreSQL: the schema of the tables (default `tollgate`), created and migrated at
    /// startup.
    pub schema: Option<String>,
    /// With Redis: the durable record of the journal, a PostgreSQL URL (needs the `postgres`
    /// feature too). Every second the journal entries are moved from Redis into the table
    /// `redis_journal` of `schema` (default `tollgate`), exactly once; `[server]
    /// journal_limit` never trims an entry not recorded yet, and the admin journal reads the
    /// record. None (default): Redis keeps only the latest `journal_limit` entries.
    pub record: Option<String>,
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
    /// A SQLite file, durable, for one process.
    Sqlite,
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
    /// The plan an account on this plan moves to when a top-up is applied to it.
    pub after_top_up: Option<Spanned<String>>,
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

/// `[[routes]]`: a method and a path forwarded upstream, and how requests to it are billed.
///
/// Only these requests reach the upstream (with `upstream_key`); any other path is a 404
/// `not_found` and a listed path with another method a 405 `method_not_allowed` with `Allow`,
/// both answered by the gateway. Each route gives exactly one price:
///
/// - `price = "model"`: the price of the model the JSON body names (`[[models]]`); a request
///   naming none is a 400.
/// - `price = "free"`: nothing (an explicit choice, never a default).
/// - `credits_per_request = N` (and optionally `credits_per_1k_tokens = M`): a route price, for
///   paths without `{param}` segments.
///
/// On every route a body naming a configured model pays that model's price (model first).
///
/// ```toml
/// [[routes]]
/// method = "POST"
/// path = "/v1/chat/completions"
/// price = "model"
///
/// [[routes]]
/// method = "GET"
/// path = "/v1/models/{id}"
/// price = "free"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteConfig {
    /// The HTTP method, such as `POST` (exactly this one: `GET` does not imply `HEAD`).
    pub method: Spanned<String>,
    /// The path: `/`-separated literal segments, or `{name}` for any one segment.
    pub path: Spanned<String>,
    /// `model` or `free`.
    #[serde(default)]
    pub price: Option<Spanned<String>>,
    /// Credits per call (a route price).
    #[serde(default)]
    pub credits_per_request: Option<u64>,
    /// Credits per 1000 tokens, with `credits_per_request`.
    #[serde(default)]
    pub credits_per_1k_tokens: Option<u64>,
}

/// A route the gateway forwards, resolved from `[[routes]]` or the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// The method (upper case).
    pub method: http::Method,
    /// The path pattern (`{name}` matches one segment).
    pub path: String,
    /// How requests to it are billed.
    pub price: RoutePrice,
}

/// How a route is billed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoutePrice {
    /// The price of the model the body names; a request naming none is refused.
    Model,
    /// Nothing.
    Free,
    /// Credits per call and per 1000 tokens.
    Flat {
        /// Credits per call.
        per_request: u64,
        /// Credits per 1000 tokens (prompt and completion).
        per_1k_tokens: u64,
    },
}

impl RouteConfig {
    /// The routes forwarded when the config has no `[[routes]]`: `POST /v1/chat/completions`,
    /// `POST /v1/completions` and `POST /v1/embeddings` priced by model, `GET /v1/models` and
    /// `GET /v1/models/{id}` free.
    ///
    /// ```
    /// use tollgate_gateway::config::{GatewayConfig, RouteConfig, RoutePrice};
    ///
    /// let config = GatewayConfig::from_toml("").unwrap();
    /// assert_eq!(config.routes(), RouteConfig::defaults());
    /// assert_eq!(RouteConfig::defaults()[0].path, "/v1/chat/completions");
    /// assert_eq!(RouteConfig::defaults()[4].price, RoutePrice::Free);
    /// ```
    pub fn defaults() -> Vec<Route> {
        let route = |method: http::Method, path: &str, price| Route {
            method,
            path: path.to_owned(),
            price,
        };
        vec![
            route(
                http::Method::POST,
                "/v1/chat/completions",
                RoutePrice::Model,
            ),
            route(http::Method::POST, "/v1/completions", RoutePrice::Model),
            route(http::Method::POST, "/v1/embeddings", RoutePrice::Model),
            route(http::Method::GET, "/v1/models", RoutePrice::Free),
            route(http::Method::GET, "/v1/models/{id}", RoutePrice::Free),
        ]
    }

    fn resolve(&self) -> Route {
        let price = match (
            self.price.as_ref().map(|p| p.get_ref().as_str()),
            self.credits_per_request,
        ) {
            (Some("model"), _) => RoutePrice::Model,
            (Some(_), _) => RoutePrice::Free,
            (None, per_request) => RoutePrice::Flat {
                per_request: per_request.unwrap_or(0),
                per_1k_tokens: self.credits_per_1k_tokens.unwrap_or(0),
            },
        };
        Route {
            method: self
                .method
                .get_ref()
                .to_ascii_uppercase()
                .parse()
                .expect("validated"),
            path: self.path.get_ref().clone(),
            price,
        }
    }
}

/// Why a route path is not valid, if it is not.
fn route_path_error(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("a path starts with `/`");
    }
    if path.contains(['?', '#', '%', '\\', '*']) {
        return Some("a path has no query, fragment, percent-encoding, backslash or wildcard");
    }
    if path == "/admin" || path.starts_with("/admin/") {
        return Some("`/admin` is the gateway's own");
    }
    if path == "/" {
        return None;
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Some("a path has no empty, `.` or `..` segment");
        }
        if segment.contains(['{', '}']) {
            let name = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
            if !name.is_some_and(|n| {
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            }) {
                return Some("a parameter is a whole segment such as `{id}`");
            }
        }
    }
    None
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

    /// The routes forwarded upstream: the `[[routes]]` entries, or [`RouteConfig::defaults`].
    pub fn routes(&self) -> Vec<Route> {
        match &self.routes {
            Some(routes) => routes.iter().map(RouteConfig::resolve).collect(),
            None => RouteConfig::defaults(),
        }
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
        let server = &self.server;
        for (field, value, least) in [
            (
                "header_read_timeout_secs",
                server.header_read_timeout_secs as usize,
                1,
            ),
            (
                "body_read_timeout_secs",
                server.body_read_timeout_secs as usize,
                1,
            ),
            ("max_connections", server.max_connections.unwrap_or(1), 1),
            ("max_header_bytes", server.max_header_bytes, 4096),
            ("max_headers", server.max_headers, 8),
        ] {
            if value < least {
                return Err(ConfigError {
                    line: None,
                    message: format!("server.{field}: must be at least {least}"),
                });
            }
        }
        if let Some(routes) = &self.routes {
            if routes.is_empty() {
                return Err(ConfigError {
                    line: None,
                    message:
                        "routes: an empty list forwards nothing (omit it for the default routes)"
                            .into(),
                });
            }
        }
        let mut shapes = HashSet::new();
        // A route price is per path (whatever the method): every method of such a path has it.
        let mut path_prices = std::collections::HashMap::new();
        for (i, route) in self.routes.iter().flatten().enumerate() {
            let method = route.method.get_ref();
            if method.parse::<http::Method>().is_err()
                || !method.bytes().all(|b| b.is_ascii_alphabetic())
            {
                return Err(at(
                    route.method.span(),
                    format!("routes[{i}].method: `{method}` is not an HTTP method such as POST"),
                ));
            }
            let path = route.path.get_ref();
            if let Some(why) = route_path_error(path) {
                return Err(at(
                    route.path.span(),
                    format!("routes[{i}].path: `{path}`: {why}"),
                ));
            }
            // `/v1/models/{id}` and `/v1/models/{name}` are the same route.
            let shape: Vec<&str> = path
                .split('/')
                .map(|s| if s.starts_with('{') { "{}" } else { s })
                .collect();
            if !shapes.insert((method.to_ascii_uppercase(), shape)) {
                return Err(at(
                    route.path.span(),
                    format!(
                        "routes[{i}]: {} {path} is listed twice",
                        method.to_ascii_uppercase()
                    ),
                ));
            }
            let price = route.price.as_ref();
            let line = price.map_or(route.path.span(), Spanned::span);
            let kind = price.map(|p| p.get_ref().as_str());
            let flat = route.credits_per_request.is_some() || route.credits_per_1k_tokens.is_some();
            if kind.is_some() && flat {
                return Err(at(
                    line,
                    format!("routes[{i}]: give either `price` or `credits_per_request`, not both"),
                ));
            }
            if kind.is_none() && route.credits_per_request.is_none() {
                return Err(at(line, format!("routes[{i}]: every forwarded route is priced: give price = \"model\", price = \"free\" or credits_per_request = N")));
            }
            match kind {
                Some("model") if self.models.is_empty() => {
                    return Err(at(
                        line,
                        format!(
                            "routes[{i}].price: `model` needs [[models]] entries with their prices"
                        ),
                    ));
                }
                Some("model" | "free") => {}
                Some(other) => {
                    return Err(at(line, format!("routes[{i}].price: `{other}` is not `model` or `free` (or give credits_per_request = N)")));
                }
                None if path.contains('{') => {
                    return Err(at(line, format!("routes[{i}]: a route price needs a path without `{{param}}` segments (price it `model` or `free`)")));
                }
                None => {}
            }
            let resolved = route.resolve().price;
            if let Some(other) = path_prices.insert(path.as_str(), resolved) {
                let flat = |p: &RoutePrice| matches!(p, RoutePrice::Flat { .. });
                if other != resolved && (flat(&other) || flat(&resolved)) {
                    return Err(at(
                        line,
                        format!("routes[{i}]: `{path}` has a route price, so each of its methods must have the same price"),
                    ));
                }
            }
        }
        if self.backend.kind == BackendKind::Redis {
            match (&self.backend.url, &self.backend.cluster) {
                (None, None) => {
                    return Err(ConfigError {
                        line: None,
                        message: "backend.url: `kind = \"redis\"` needs a url such as redis://127.0.0.1:6379 (or `cluster = [\"redis://host:port\", ...]`)".into(),
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError {
                        line: None,
                        message: "backend.cluster: give either `url` (one Redis) or `cluster` (the nodes of a Redis Cluster), not both".into(),
                    });
                }
                (None, Some(nodes)) if nodes.is_empty() => {
                    return Err(ConfigError {
                        line: None,
                        message: "backend.cluster: needs at least one node, such as [\"redis://127.0.0.1:7000\"]".into(),
                    });
                }
                _ => {}
            }
        } else if self.backend.cluster.is_some() {
            return Err(ConfigError {
                line: None,
                message:
                    "backend.cluster: only with `kind = \"redis\"` (the nodes of a Redis Cluster)"
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
        if self.backend.record.is_some() && self.backend.kind != BackendKind::Redis {
            return Err(ConfigError {
                line: None,
                message: "backend.record: only with `kind = \"redis\"` (the durable record of its journal)".into(),
            });
        }
        if let Some(schema) = &self.backend.schema {
            let recorded = self.backend.kind == BackendKind::Redis && self.backend.record.is_some();
            if self.backend.kind != BackendKind::Postgres && !recorded {
                return Err(ConfigError {
                    line: None,
                    message:
                        "backend.schema: only with `kind = \"postgres\"` (or a Redis `record`)"
                            .into(),
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
        for (i, plan) in self.plans.iter().enumerate() {
            if let Some(to) = &plan.after_top_up {
                if !plans.contains(to.get_ref().as_str()) {
                    return Err(at(
                        to.span(),
                        format!(
                            "plans[{i}].after_top_up: no plan named `{}` (add a [[plans]] entry)",
                            to.get_ref()
                        ),
                    ));
                }
            }
        }
        for (code, entry) in &self.errors {
            if tollgate::Reason::from_code(code.get_ref()).is_none() {
                return Err(at(
                    code.span(),
                    format!(
                        "errors.{}: no tollgate code `{}` (see the README's rejection table)",
                        code.get_ref(),
                        code.get_ref()
                    ),
                ));
            }
            if let Some(status) = &entry.status {
                if !(400..=599).contains(status.get_ref()) {
                    return Err(at(
                        status.span(),
                        format!(
                            "errors.{}.status: {} is not an error status (400 to 599)",
                            code.get_ref(),
                            status.get_ref()
                        ),
                    ));
                }
            }
        }
        if self.backend.path.is_some() && self.backend.kind != BackendKind::Sqlite {
            return Err(ConfigError {
                line: None,
                message: "backend.path: only `kind = \"sqlite\"` has a path".into(),
            });
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

impl GatewayConfig {
    /// The `[errors.*]` tables as an [`ErrorCatalog`](tollgate::format::ErrorCatalog), for
    /// [`NormalizeLayer::catalog`](tollgate::normalize::NormalizeLayer::catalog).
    ///
    /// ```
    /// use tollgate::Reason;
    /// use tollgate_gateway::config::GatewayConfig;
    ///
    /// let config = GatewayConfig::from_toml("[errors.insufficient_quota]\nstatus = 402\ncode = 402\n").unwrap();
    /// let catalog = config.error_catalog();
    /// let entry = catalog.get(Reason::InsufficientCredits).unwrap();
    /// assert_eq!(entry.get_status().unwrap(), 402);
    /// ```
    pub fn error_catalog(&self) -> tollgate::format::ErrorCatalog {
        use tollgate::format::{ErrorCode, ErrorOverride};
        let mut catalog = tollgate::format::ErrorCatalog::new();
        for (code, entry) in &self.errors {
            let Some(reason) = tollgate::Reason::from_code(code.get_ref()) else {
                continue;
            };
            let mut out = ErrorOverride::new();
            if let Some(status) = entry
                .status
                .as_ref()
                .and_then(|s| http::StatusCode::from_u16(*s.get_ref()).ok())
                .filter(|s| s.is_client_error() || s.is_server_error())
            {
                out = out.status(status);
            }
            if let Some(t) = &entry.error_type {
                out = out.error_type(t.clone());
            }
            match &entry.code {
                Some(CodeConfig::Text(t)) => out = out.code(ErrorCode::from(t.clone())),
                Some(CodeConfig::Number(n)) => out = out.code(*n),
                None => {}
            }
            if let Some(m) = &entry.message {
                out = out.message(m.clone());
            }
            if let Some(p) = &entry.param {
                out = out.param(p.clone());
            }
            catalog.set(reason, out);
        }
        catalog
    }

    /// The plans' `after_top_up` rules as [`Promotions`](tollgate::credits::promote::Promotions).
    ///
    /// ```
    /// use tollgate_gateway::config::GatewayConfig;
    ///
    /// let config = GatewayConfig::from_toml(r#"
    ///     [[plans]]
    ///     name = "free"
    ///     after_top_up = "trusted"
    ///     [[plans]]
    ///     name = "trusted"
    /// "#).unwrap();
    /// assert_eq!(config.promotions().target("free"), Some("trusted"));
    /// ```
    pub fn promotions(&self) -> tollgate::credits::promote::Promotions {
        self.plans
            .iter()
            .filter_map(|p| Some((p.name.get_ref(), p.after_top_up.as_ref()?.get_ref())))
            .fold(
                tollgate::credits::promote::Promotions::new(),
                |rules, (from, to)| rules.after_top_up(from.as_str(), to.as_str()),
            )
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
    fn routes_are_validated_and_every_route_is_priced() {
        let route = |body: &str| {
            err(&format!(
                "[[models]]\nid = \"m\"\n[[routes]]\nmethod = \"POST\"\n{body}"
            ))
        };
        assert_eq!(
            route("path = \"/v1/x\"\n"),
            "line 5: routes[0]: every forwarded route is priced: give price = \"model\", price = \"free\" or credits_per_request = N"
        );
        assert_eq!(
            route("path = \"/v1/x\"\nprice = \"cheap\"\n"),
            "line 6: routes[0].price: `cheap` is not `model` or `free` (or give credits_per_request = N)"
        );
        assert_eq!(
            route("path = \"/v1/x\"\nprice = \"free\"\ncredits_per_request = 2\n"),
            "line 6: routes[0]: give either `price` or `credits_per_request`, not both"
        );
        assert_eq!(
            route("path = \"/v1/files/{id}\"\ncredits_per_request = 2\n"),
            "line 5: routes[0]: a route price needs a path without `{param}` segments (price it `model` or `free`)"
        );
        assert!(route("path = \"v1/x\"\nprice = \"free\"\n")
            .starts_with("line 5: routes[0].path: `v1/x`: a path starts with `/`"));
        assert!(route("path = \"/v1/../x\"\nprice = \"free\"\n").contains("`..`"));
        assert!(route("path = \"/v1/%2e\"\nprice = \"free\"\n").contains("percent-encoding"));
        assert!(route("path = \"/v1/m{id}\"\nprice = \"free\"\n").contains("`{id}`"));
        assert!(route("path = \"/admin/x\"\nprice = \"free\"\n").contains("`/admin`"));
        assert_eq!(
            err("[[routes]]\nmethod = \"GE T\"\npath = \"/\"\nprice = \"free\"\n"),
            "line 2: routes[0].method: `GE T` is not an HTTP method such as POST"
        );
        assert_eq!(
            err("[[routes]]\nmethod = \"GET\"\npath = \"/v1/m/{a}\"\nprice = \"free\"\n[[routes]]\nmethod = \"get\"\npath = \"/v1/m/{b}\"\nprice = \"free\"\n"),
            "line 7: routes[1]: GET /v1/m/{b} is listed twice"
        );
        assert_eq!(
            err("[[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nprice = \"model\"\n"),
            "line 4: routes[0].price: `model` needs [[models]] entries with their prices"
        );
        assert_eq!(
            err("routes = []\n"),
            "routes: an empty list forwards nothing (omit it for the default routes)"
        );
        let config = GatewayConfig::from_toml(
            "[[routes]]\nmethod = \"post\"\npath = \"/v1/audio/speech\"\ncredits_per_request = 3\ncredits_per_1k_tokens = 1\n",
        )
        .unwrap();
        assert_eq!(
            config.routes(),
            [Route {
                method: http::Method::POST,
                path: "/v1/audio/speech".into(),
                price: RoutePrice::Flat {
                    per_request: 3,
                    per_1k_tokens: 1
                }
            }]
        );
        assert_eq!(
            err("[server]\nheader_read_timeout_secs = 0\n"),
            "server.header_read_timeout_secs: must be at least 1"
        );
    }

    #[test]
    fn an_empty_key_allowlist_is_refused() {
        assert_eq!(
            err("[[plans]]\nname = \"p\"\n[[accounts]]\nid = \"a\"\nplan = \"p\"\n[[keys]]\nid = \"k\"\naccount = \"a\"\nkey = \"sk-demo-0123456789\"\nip_allowlist = []\n"),
            "line 7: keys[0].ip_allowlist: name at least one network (omit it to allow every IP, or set `status = \"disabled\"` to allow none)"
        );
    }

    #[test]
    fn error_catalog_and_promotion_errors_name_the_field_and_line() {
        assert_eq!(
            err("[errors.insufficient_quota]\nstatus = 402\n[errors.no_such_code]\nstatus = 400\n"),
            "line 3: errors.no_such_code: no tollgate code `no_such_code` (see the README's rejection table)"
        );
        assert_eq!(
            err("[errors.insufficient_quota]\ntype = \"x\"\nstatus = 302\n"),
            "line 3: errors.insufficient_quota.status: 302 is not an error status (400 to 599)"
        );
        assert_eq!(
            err("[errors.insufficient_quota]\nstatus = \"402\"\n"),
            "line 2: status: invalid type: string \"402\", expected u16"
        );
        assert_eq!(
            err("[errors.insufficient_quota]\ncode = 4.5\n"),
            "line 2: code: invalid type: floating point `4.5`, expected a string or an integer"
        );
        assert!(err("[errors.insufficient_quota]\nstats = 402\n")
            .starts_with("line 2: unknown field `stats`"));
        assert_eq!(
            err("[[plans]]\nname = \"free\"\nafter_top_up = \"trusted\"\n"),
            "line 3: plans[0].after_top_up: no plan named `trusted` (add a [[plans]] entry)"
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let config =
            GatewayConfig::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml")).unwrap();
        assert!(!config.keys.is_empty());
        // It lists the default routes, so that the file documents them.
        assert_eq!(config.routes(), RouteConfig::defaults());
    }
}
