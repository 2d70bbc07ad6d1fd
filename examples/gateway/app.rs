//! The gateway's assembly: config → stores → the whole chain → an axum app.
//!
//! Shared by `main.rs` and the tests (which include this file with `#[path]`).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    body::Body,
    error_handling::HandleErrorLayer,
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures_util::FutureExt;
use governor::Quota;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate::{
    admin,
    auth::{
        AccountRecord, AccountStatus, AuthLayer, KeyAdmin, KeyRecord, KeyStatus, KeyStore,
        MemoryKeyStore,
    },
    credits::promote::{Promote, TopUpPromoter},
    credits::{
        ledger::{Balance, Hold},
        Admission, TwoStep, Verdict,
    },
    credits::{
        ledger::{
            Expired, JournalEntry, JournalQuery, Reservation, ReserveError, ReserveRequest,
            Settlement, TopUp, TopUpError,
        },
        CreditsLayer, Ledger, LedgerAdmin, MemoryLedger, ModelPricing, Price, Pricing,
    },
    inspect::LlmRequest,
    ip::{ClientIpLayer, ClientIpResolver, IpAllowLayer},
    keys::{self, KeyDigest},
    normalize::{classify, NormalizeLayer},
    ratelimit::{Charge, Correction, MemoryLimiter, Plan, Plans, RateLimitLayer},
    BackendError, Caller, Reason, Rejection,
};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};

use crate::config::{BackendKind, GatewayConfig, KeyStatusConfig, Route, RoutePrice, Upstream};
use crate::upstream;

/// The key of the shipped demo config (`examples/gateway.toml`): public, so the banner may
/// print it. Any other key is a secret and only its id is printed.
pub const SHIPPED_DEMO_KEY: &str = "sk-demo-tollgate-0123456789abcdef";

/// Why the gateway could not be built: the message, and whether its storage is at fault (the
/// binary then exits with code 2, as for a bad config).
#[derive(Debug)]
pub struct BuildError {
    /// What went wrong, naming the field (and the path).
    pub message: String,
    /// The storage (`[backend] path`) cannot be used: not a tollgate database, read-only, a
    /// newer schema, in use.
    pub storage: bool,
}

impl From<String> for BuildError {
    fn from(message: String) -> Self {
        BuildError {
            message,
            storage: false,
        }
    }
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A built gateway: the app, the metrics app, the server limits and what the banner shows.
pub struct Gateway {
    router: Router,
    metrics: Option<(SocketAddr, Router)>,
    limits: Limits,
    storage: String,
    #[cfg(feature = "sqlite")]
    sqlite: Option<tollgate::sqlite::SqliteBackend>,
    demo_key: Option<String>,
    first_key_id: Option<String>,
    demo_model: String,
}

/// What bounds a client connection (`[server]`): see `serve`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The whole header section of a request within this.
    pub header_read_timeout: Duration,
    /// The whole body of a request within this, from the end of its headers.
    pub body_read_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight requests before closing their
    /// connections.
    pub shutdown_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// The header section's size (the request target plus name + value + 32 per field).
    pub max_header_bytes: usize,
    /// Header fields per request.
    pub max_headers: usize,
}

impl Gateway {
    /// Build the stores and the chain from a validated config.
    pub async fn build(config: GatewayConfig) -> Result<Gateway, BuildError> {
        let first_active = config
            .keys
            .iter()
            .find(|k| k.status == KeyStatusConfig::Active);
        let demo_key = first_active
            .and_then(|k| k.key.as_ref())
            .map(|k| k.get_ref().clone())
            .filter(|k| k == SHIPPED_DEMO_KEY);
        let first_key_id = first_active.map(|k| k.id.get_ref().clone());
        let demo_model = config
            .models
            .first()
            .map_or_else(|| "mock-small".to_owned(), |m| m.id.get_ref().clone());
        let limits = Limits {
            header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(config.server.body_read_timeout_secs),
            shutdown_timeout: Duration::from_secs(config.server.shutdown_timeout_secs),
            max_connections: connection_cap(config.server.max_connections)?,
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
        };
        #[cfg(feature = "sqlite")]
        let mut sqlite = None;
        let storage;
        let (router, metrics) = match config.backend.kind {
            BackendKind::Memory => {
                storage = "storage: memory (keeps nothing across restarts: balances, top-ups, \
                           the journal and admin-made keys are lost when the process stops)"
                    .to_owned();
                let store = MemoryKeyStore::new();
                let ledger = MemoryLedger::builder()
                    .hold_ttl(Duration::from_secs(config.server.hold_ttl_secs))
                    // Bounded memory: the last entries of each account's journal.
                    .journal_limit(config.server.journal_limit)
                    .build();
                let limiter = MemoryLimiter::new();
                limiter.spawn_evictor(Duration::from_secs(60));
                let admission = TwoStep::new(ledger.clone(), limiter.clone());
                assemble(&config, limits, store, ledger, limiter, admission).await?
            }
            BackendKind::Redis => {
                storage = "storage: redis (shared by replicas)".to_owned();
                redis_backend(&config, limits).await?
            }
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite => {
                let (apps, backend) = sqlite_backend(&config, limits).await?;
                storage = format!(
                    "storage: sqlite {} (durable: top-ups and admin changes before their answer, \
                     settlements within {} ms)",
                    backend.path().display(),
                    tollgate::sqlite::DURABILITY_WINDOW.as_millis()
                );
                sqlite = Some(backend);
                apps
            }
            #[cfg(not(feature = "sqlite"))]
            BackendKind::Sqlite => {
                return Err("backend.kind = \"sqlite\" needs the `sqlite` feature: cargo run --release -p tollgate-gateway -- ...".to_owned().into());
            }
            BackendKind::Postgres => {
                storage = "storage: postgres (shared by replicas, durable)".to_owned();
                postgres_backend(&config, limits).await?
            }
        };
        Ok(Gateway {
            router,
            metrics: config.server.metrics_listen.map(|addr| (addr, metrics)),
            limits,
            storage,
            #[cfg(feature = "sqlite")]
            sqlite,
            demo_key,
            first_key_id,
            demo_model,
        })
    }

    /// The whole app (for tests: drive it with `tower::ServiceExt::oneshot` or serve it).
    #[allow(dead_code)] // used by the tests that include this file
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The plaintext key to show at startup: only the shipped demo config's key, which is public.
    pub fn demo_key(&self) -> Option<&str> {
        self.demo_key.as_deref()
    }

    /// The id of the first active key, shown at startup instead of a key that is a secret.
    pub fn first_key_id(&self) -> Option<&str> {
        self.first_key_id.as_deref()
    }

    /// What keeps the books, and whether they survive a restart (the startup banner's line).
    pub fn storage(&self) -> &str {
        &self.storage
    }

    /// A model to use in the startup example.
    pub fn demo_model(&self) -> &str {
        &self.demo_model
    }

    /// The server limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// `[server] metrics_listen` and the app serving `GET /metrics` there.
    pub fn metrics(&self) -> Option<(SocketAddr, Router)> {
        self.metrics.clone()
    }

    /// Serve until `shutdown` completes, then let in-flight requests finish (and settle).
    pub fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        serve(self.router.clone(), listener, self.limits, shutdown)
    }

    /// After `serve` returned (in-flight requests settled): write what is queued and release
    /// the storage.
    pub async fn close(self) -> std::io::Result<()> {
        #[cfg(feature = "sqlite")]
        if let Some(backend) = self.sqlite {
            let durability = backend.ledger().durability();
            tracing::info!(
                target: "tollgate::durability",
                commits = durability.commits,
                movements = durability.movements,
                late_commits = durability.late_commits,
                max_lag_ms = durability.max_lag.as_secs_f64() * 1e3,
                "sqlite group commit: the longest a movement waited to be durable"
            );
            backend.close().await.map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// `[server] max_connections`, or half the open-file limit less 64; never at or above the limit.
fn connection_cap(configured: Option<usize>) -> Result<usize, String> {
    let limit = open_file_limit();
    let reserve = 64;
    let most = limit.map_or(usize::MAX, |l| l.saturating_sub(reserve));
    match configured {
        Some(n) if n > most => Err(format!(
            "server.max_connections = {n} is not below the open-file limit ({} less {reserve} for listeners, logs and backends): lower it or raise `ulimit -n`",
            limit.unwrap_or_default()
        )),
        Some(n) => Ok(n),
        None => Ok(limit.map_or(4096, |l| (l.saturating_sub(reserve) / 2).max(1))),
    }
}

/// The soft `RLIMIT_NOFILE` of this process.
#[cfg(unix)]
fn open_file_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer to it.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as usize)
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<usize> {
    None
}

/// Serve `app` on `listener` with hyper-util's server: HTTP/1.1 and HTTP/2, at most
/// `max_connections` at once (at the cap, a new connection closes the oldest one that has not
/// sent a request yet, or waits for a slot with the rest in the listen backlog), each request's
/// header section
/// within `header_read_timeout` (a connection that has not sent a whole one by then is closed,
/// kept-alive ones included), hyper's own header limits at twice the documented ones (the
/// documented ones are answered in format by `guard`). On `shutdown`: stop accepting, let every
/// connection finish its in-flight requests for at most `shutdown_timeout`, close those still
/// open past it (their metered bodies settle as on a client disconnect), then return.
pub async fn serve(
    app: Router,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers.saturating_mul(2))
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        );
    let builder = Arc::new(builder);
    // Shutdown waits for all the permits at once (a u32).
    let cap = limits
        .max_connections
        .min(tokio::sync::Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Past `shutdown_timeout`, the connections still open are closed.
    let (force, forced) = tokio::sync::watch::channel(false);
    let waiting = Waiting::default();
    let shutdown = shutdown;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or a connection reset before accept: wait a bit
                    // rather than spin.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // At the cap, the oldest connection that has not sent a request yet makes room: a
        // client that is slow to send its headers never keeps a ready one waiting.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                waiting.evict_oldest();
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, mut stopped, mut forced) = (
            app.clone(),
            builder.clone(),
            stopped.clone(),
            forced.clone(),
        );
        let header_read_timeout = limits.header_read_timeout;
        let state = waiting.push();
        tokio::spawn(async move {
            let _permit = permit;
            let service = {
                let state = state.clone();
                hyper::service::service_fn(
                    move |mut request: http::Request<hyper::body::Incoming>| {
                        state.seen.store(true, Ordering::Relaxed);
                        request.extensions_mut().insert(ConnectInfo(peer));
                        app.clone().oneshot(request.map(Body::new))
                    },
                )
            };
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            // HTTP/1.1's header timeout is hyper's; this one also bounds the wait for the
            // protocol preface and an HTTP/2 connection's first request.
            let first_request = async {
                tokio::time::sleep(header_read_timeout).await;
                if state.seen.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::pin!(first_request);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(error = %error, "connection ended with an error");
                        }
                        break;
                    }
                    () = &mut first_request => {
                        tracing::debug!(peer = %peer, "no request within the header read timeout: closed");
                        break;
                    }
                    () = state.evict.notified() => {
                        if !state.seen.load(Ordering::Relaxed) {
                            tracing::debug!(peer = %peer, "no request yet and the connection cap is reached: closed");
                            break;
                        }
                    }
                    _ = stopped.wait_for(|stop| *stop), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    // Dropping the connection drops its in-flight responses: a metered body
                    // settles as on any client disconnect.
                    _ = forced.wait_for(|force| *force) => {
                        tracing::debug!(peer = %peer, "still open at the shutdown timeout: closed");
                        break;
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection has ended when every permit is back.
    let all_ended = permits.acquire_many(cap as u32);
    if tokio::time::timeout(limits.shutdown_timeout, all_ended)
        .await
        .is_err()
    {
        let open = cap - permits.available_permits();
        tracing::warn!(
            open,
            timeout = ?limits.shutdown_timeout,
            "connections still open at the shutdown timeout: closing them"
        );
        let _ = force.send(true);
        let _ = permits.acquire_many(cap as u32).await;
    }
    Ok(())
}

/// Connections in accept order, to find the oldest one that has not sent a request yet.
#[derive(Default)]
struct Waiting(std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<ConnectionState>>>);

/// What the accept loop knows of a connection.
#[derive(Default)]
struct ConnectionState {
    /// A request head has arrived.
    seen: AtomicBool,
    /// Close if no request head has arrived.
    evict: tokio::sync::Notify,
}

impl Waiting {
    /// A new connection, oldest last; drops the front entries of connections that are gone or
    /// have sent a request.
    fn push(&self) -> Arc<ConnectionState> {
        let state = Arc::new(ConnectionState::default());
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while queue.front().is_some_and(|front| {
            front
                .upgrade()
                .is_none_or(|s| s.seen.load(Ordering::Relaxed))
        }) {
            queue.pop_front();
        }
        queue.push_back(Arc::downgrade(&state));
        state
    }

    /// Ask the oldest connection without a request to close.
    fn evict_oldest(&self) {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = queue.pop_front() {
            if let Some(state) = entry.upgrade() {
                if !state.seen.load(Ordering::Relaxed) {
                    state.evict.notify_one();
                    return;
                }
            }
        }
    }
}

/// The body of a request that must arrive before a deadline.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    fired: Arc<AtomicBool>,
}

/// The error a request body ends with when it is not received in time.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body was not received in time")
    }
}

impl std::error::Error for BodyTimedOut {}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        if self.fired.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.fired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A refusal of the request as sent (431, 408): in format, and the connection closes after it.
fn refuse_request(status: StatusCode, message: String) -> Response {
    let mut response = Rejection::new(Reason::BadRequest)
        .with_status(status)
        .with_message(message)
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The documented request limits, answered in the configured format with `x-request-id`:
/// header fields and header bytes (431), and the body's deadline (408).
async fn guard(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let fields = request.headers().len();
    if fields > limits.max_headers {
        return refuse_request(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "The request has {fields} header fields; at most {} are accepted.",
                limits.max_headers
            ),
        );
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    let size = target
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum::<usize>();
    if size > limits.max_header_bytes {
        return refuse_request(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "The request's header section is {size} bytes; at most {} are accepted (the request target, and per field its name, its value and 32).",
                limits.max_header_bytes
            ),
        );
    }
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let fired = Arc::new(AtomicBool::new(false));
    let deadline = Box::pin(tokio::time::sleep(limits.body_read_timeout));
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline,
            fired: fired.clone(),
        })
    });
    let response = next.run(request).await;
    if fired.load(Ordering::Relaxed) {
        // Whatever the reader made of the cut body (a 400, a 502 from the proxy), the client
        // was too slow: say so.
        return refuse_request(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "The request body was not received within {} s.",
                limits.body_read_timeout.as_secs()
            ),
        );
    }
    response
}

/// The public app and the metrics app.
type Apps = (Router, Router);

#[cfg(feature = "sqlite")]
async fn sqlite_backend(
    config: &GatewayConfig,
    limits: Limits,
) -> Result<(Apps, tollgate::sqlite::SqliteBackend), BuildError> {
    use tollgate::sqlite::{SqliteBackend, SqliteOptions};
    let path = config
        .backend
        .path
        .clone()
        .unwrap_or_else(|| "tollgate.db".into());
    let options = SqliteOptions::new().hold_ttl(Duration::from_secs(config.server.hold_ttl_secs));
    let backend = SqliteBackend::open_with(&path, options)
        .await
        .map_err(|e| BuildError {
            message: format!("backend.path: {e}"),
            storage: true,
        })?;
    // Rate limits stay in this process: a restart refilling the buckets is harmless.
    let limiter = MemoryLimiter::new();
    limiter.spawn_evictor(Duration::from_secs(60));
    let admission = TwoStep::new(backend.ledger(), limiter.clone());
    let apps = assemble(
        config,
        limits,
        backend.key_store(),
        backend.ledger(),
        limiter,
        admission,
    )
    .await?;
    Ok((apps, backend))
}

#[cfg(feature = "redis")]
async fn redis_backend(config: &GatewayConfig, limits: Limits) -> Result<Apps, String> {
    use crate::config::FailMode;
    use tollgate::redis;
    let url = config.backend.url.as_deref().unwrap_or_default();
    #[allow(unused_mut)]
    let mut options = redis::RedisOptions::new()
        .hold_ttl(Duration::from_secs(config.server.hold_ttl_secs))
        // Bounded Redis memory: the latest entries of each account's journal, as in memory.
        .journal_limit(config.server.journal_limit)
        .rate_limit_fail(match config.backend.rate_limit_fail {
            FailMode::Open => redis::FailMode::Open,
            FailMode::Closed => redis::FailMode::Closed,
        });
    if let Some(record) = &config.backend.record {
        #[cfg(feature = "postgres")]
        {
            // The record's pool; its migrations are applied by the backend's drain task.
            let pg = tollgate::postgres::PostgresBackend::connect(record)
                .await
                .map_err(|e| {
                    format!(
                        "backend.record: cannot connect to PostgreSQL: {}",
                        e.message()
                    )
                })?;
            let schema = config.backend.schema.as_deref().unwrap_or("tollgate");
            options = options.record(pg.pool().clone(), schema);
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = record;
            return Err("backend.record needs the `postgres` feature too: cargo run --release -p tollgate-gateway --features redis,postgres -- ...".into());
        }
    }
    let backend = match &config.backend.cluster {
        Some(nodes) => redis::RedisBackend::connect_cluster(nodes, options)
            .await
            .map_err(|e| {
                format!(
                    "backend.cluster: cannot connect to the Redis Cluster: {}",
                    e.message()
                )
            })?,
        None => redis::RedisBackend::connect_with(url, options)
            .await
            .map_err(|e| format!("backend.url: cannot connect to Redis: {}", e.message()))?,
    };
    let key_store = backend.key_store();
    // Plan promotion in the top-up's own script: balance, journal and plan together.
    let promoter =
        redis::RedisPromoter::new(backend.ledger(), key_store.clone(), config.promotions());
    // The limits and the hold in one script (and the settlement with the tokens in one more).
    assemble_promoting(
        config,
        limits,
        key_store,
        backend.ledger(),
        backend.limiter(),
        backend.admission(),
        promoter,
    )
    .await
}

#[cfg(not(feature = "redis"))]
async fn redis_backend(_config: &GatewayConfig, _limits: Limits) -> Result<Apps, String> {
    Err("backend.kind = \"redis\" needs the `redis` feature: cargo run --release -p tollgate-gateway --features redis -- ...".into())
}

#[cfg(feature = "postgres")]
async fn postgres_backend(config: &GatewayConfig, limits: Limits) -> Result<Apps, String> {
    use crate::config::FailMode;
    use tollgate::postgres;
    let url = config.backend.url.as_deref().unwrap_or_default();
    let mut options = postgres::PostgresOptions::new()
        .hold_ttl(Duration::from_secs(config.server.hold_ttl_secs))
        .rate_limit_fail(match config.backend.rate_limit_fail {
            FailMode::Open => postgres::FailMode::Open,
            FailMode::Closed => postgres::FailMode::Closed,
        });
    if let Some(schema) = &config.backend.schema {
        options = options.schema(schema.as_str()); // validated with the config
    }
    let backend = postgres::PostgresBackend::connect_with(url, options)
        .await
        .map_err(|e| format!("backend.url: cannot connect to PostgreSQL: {}", e.message()))?;
    backend
        .migrate()
        .await
        .map_err(|e| format!("backend: PostgreSQL migrations failed: {}", e.message()))?;
    // Plan promotion: the top-up, then the plan change (both idempotent on a retry).
    assemble(
        config,
        limits,
        backend.key_store(),
        backend.ledger(),
        backend.limiter(),
        backend.admission(),
    )
    .await
}

#[cfg(not(feature = "postgres"))]
async fn postgres_backend(_config: &GatewayConfig, _limits: Limits) -> Result<Apps, String> {
    Err("backend.kind = \"postgres\" needs the `postgres` feature: cargo run --release -p tollgate-gateway --features postgres -- ...".into())
}

/// Load the config into the stores and build the chain; plan promotions (`after_top_up`) are
/// applied by the top-up, then the plan change.
async fn assemble<K, L, A>(
    config: &GatewayConfig,
    limits: Limits,
    store: K,
    ledger: L,
    limiter: A::Limiter,
    admission: A,
) -> Result<Apps, String>
where
    K: KeyStore + KeyAdmin + Clone,
    L: LedgerAdmin + Clone,
    A: Admission,
{
    let promoter = Promote::new(ledger.clone(), store.clone(), config.promotions());
    assemble_promoting(config, limits, store, ledger, limiter, admission, promoter).await
}

/// [`assemble`] with the backend's own top-up promoter (atomic where the backend allows).
#[allow(clippy::too_many_arguments)]
async fn assemble_promoting<K, L, A, P>(
    config: &GatewayConfig,
    limits: Limits,
    store: K,
    ledger: L,
    limiter: A::Limiter,
    admission: A,
    promoter: P,
) -> Result<Apps, String>
where
    K: KeyStore + KeyAdmin + Clone,
    L: LedgerAdmin + Clone,
    A: Admission,
    P: TopUpPromoter,
{
    let server = &config.server;
    // Plans: models for the key store, quotas for the limiter.
    let plans = Plans::new(Plan::unlimited());
    for plan in &config.plans {
        let name = plan.name.get_ref();
        let mut quotas = Plan::new();
        if let Some(rpm) = plan.requests_per_minute {
            let quota = per_minute(rpm, plan.burst.unwrap_or(rpm));
            quotas = quotas.requests(quota);
        }
        if let Some(tpm) = plan.tokens_per_minute {
            quotas = quotas.tokens(per_minute(tpm, tpm));
        }
        plans.set_plan(name, quotas);
        store
            .set_plan_models(name, plan.models.clone())
            .await
            .map_err(|e| format!("plans: {e}"))?;
    }
    for account in &config.accounts {
        let status = if account.frozen {
            AccountStatus::Frozen
        } else {
            AccountStatus::Active
        };
        // Config seeds a shared backend: an account an operator already changed (plan, freeze)
        // through the admin API is left as it is.
        let exists = store
            .account(account.id.get_ref())
            .await
            .map_err(|e| format!("accounts: {e}"))?
            .is_some();
        if !exists {
            store
                .put_account(
                    AccountRecord::new(
                        account.id.get_ref().as_str(),
                        account.plan.get_ref().as_str(),
                    )
                    .status(status),
                )
                .await
                .map_err(|e| format!("accounts: {e}"))?;
        }
        if account.balance > 0 {
            // Idempotent: a restart (or another replica) does not add the starting balance twice.
            ledger
                .top_up(
                    account.id.get_ref(),
                    account.balance,
                    &format!("config:initial:{}", account.id.get_ref()),
                )
                .await
                .map_err(|e| {
                    format!(
                        "accounts: starting balance of `{}`: {e}",
                        account.id.get_ref()
                    )
                })?;
        }
    }
    for key in &config.keys {
        let digest: KeyDigest = match (&key.key, key.sha256) {
            (Some(plain), _) => keys::digest(plain.get_ref()),
            (None, Some(hex)) => KeyDigest::from_bytes(hex),
            (None, None) => unreachable!("validated"),
        };
        let mut record = KeyRecord::new(key.id.get_ref().as_str(), key.account.get_ref().as_str())
            .status(match key.status {
                KeyStatusConfig::Active => KeyStatus::Active,
                KeyStatusConfig::Disabled => KeyStatus::Disabled,
                KeyStatusConfig::Revoked => KeyStatus::Revoked,
            });
        if let Some(at) = key.expires_at {
            record = record.expires_at(at);
        }
        if let Some(list) = &key.ip_allowlist {
            record = record.ip_allowlist(list.clone());
        }
        if let Some(plan) = &key.plan {
            record = record.plan(plan.get_ref().as_str());
        }
        // Seed only: a key that exists (another replica, a restart on Redis) keeps what the admin
        // API made of it (revoked, rotated, ...).
        let exists = store
            .key(key.id.get_ref())
            .await
            .map_err(|e| format!("keys: {e}"))?
            .is_some();
        if !exists {
            store
                .insert_key(digest, record)
                .await
                .map_err(|e| format!("keys: {e}"))?;
        }
    }

    let model_ids: Vec<String> = config
        .models
        .iter()
        .map(|m| m.id.get_ref().clone())
        .collect();
    let mut pricing = Pricing::new().models(
        &config
            .models
            .iter()
            .map(|m| {
                ModelPricing::new(
                    m.id.get_ref().as_str(),
                    m.credits_per_request,
                    m.credits_per_1k_tokens,
                )
            })
            .collect::<Vec<_>>(),
    );
    // Route prices are per exact path (validated: no `{param}` in a route-priced path).
    let routes = RouteTable::new(config.routes());
    for route in routes.routes.iter() {
        if let RoutePrice::Flat {
            per_request,
            per_1k_tokens,
        } = route.price
        {
            pricing = pricing.route(
                route.path.as_str(),
                Price::flat(per_request).per_1k_tokens(per_1k_tokens),
            );
        }
    }

    let holds_open = Arc::new(AtomicI64::new(0));
    let ledger = MeteredLedger {
        inner: ledger,
        holds_open: holds_open.clone(),
    };
    // The metrics wrap the admission too; its type (fused or not) is kept.
    let admission = MeteredLedger {
        inner: admission,
        holds_open: holds_open.clone(),
    };
    spawn_expiry(ledger.clone());

    let resolver = ClientIpResolver::new().trust_proxies(server.trusted_proxies.clone());
    let mut auth = AuthLayer::new(store.clone()).body_limit(server.max_body_bytes);
    if !model_ids.is_empty() {
        auth = auth.known_models(model_ids.clone());
    }
    let mut ip_allow = IpAllowLayer::new().resolver(resolver.clone());
    if !server.ip_allow.is_empty() {
        ip_allow = ip_allow.allow(server.ip_allow.clone());
    }
    if !server.ip_deny.is_empty() {
        ip_allow = ip_allow.deny(server.ip_deny.clone());
    }

    let upstream_app: Router = match &server.upstream {
        Upstream::Mock => upstream::mock(if model_ids.is_empty() {
            vec!["mock-small".into()]
        } else {
            model_ids
        }),
        Upstream::Url(url) => {
            let proxy = upstream::Proxy::new(url, server.upstream_key.as_deref())?;
            Router::new().fallback(move |req: Request| {
                let proxy = proxy.clone();
                async move { proxy.forward(req).await }
            })
        }
    }
    .layer(middleware::from_fn(time_upstream));

    // Auth → (tag the caller for the log) → IP allowlist → rate limit and credits (one step: with
    // Redis one script reserves both) → timeout → upstream.
    let api = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(handle_error))
        .layer(auth)
        .layer(TagCallerLayer)
        .layer(RequireModelLayer)
        .layer(ip_allow)
        .layer(
            CreditsLayer::new(ledger.clone(), pricing)
                .body_limit(server.max_body_bytes)
                .rate_limit_with(
                    RateLimitLayer::new(limiter, plans.clone()).body_limit(server.max_body_bytes),
                    admission,
                ),
        )
        // Inside Credits: a timeout releases the hold (outside it would count as a disconnect).
        .timeout(Duration::from_secs(server.upstream_timeout_secs))
        .service(upstream_app);

    let metrics = install_metrics();
    let metrics_app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let holds = holds_open.load(Ordering::Relaxed);
            async move {
                metrics::gauge!("tollgate_holds_open").set(holds as f64);
                match metrics {
                    Some(handle) => handle.render().into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    );
    let mut app = Router::new();
    if let Some(admin_key) = &config.admin.key {
        let plan_names: Vec<String> = config
            .plans
            .iter()
            .map(|p| p.name.get_ref().clone())
            .collect();
        let mut admin = admin::router(store, ledger, admin_key).plans(plan_names);
        if !config.promotions().is_empty() {
            admin = admin.promote_on_top_up(promoter);
        }
        app = app.nest("/admin", admin.build());
    }
    // Only the configured routes reach the chain and the upstream: anything else is answered
    // here, before authentication, and never forwarded.
    let app = app
        .fallback(move |mut request: Request| {
            let api = api.clone();
            let matched = routes.find(request.method(), request.uri().path());
            async move {
                match matched {
                    Matched::Route(price) => {
                        request.extensions_mut().insert(price);
                        api.oneshot(request).await.into_response()
                    }
                    Matched::WrongMethod(allow) => {
                        let mut response = Rejection::new(Reason::MethodNotAllowed).into_response();
                        if let Ok(allow) = HeaderValue::from_str(&allow) {
                            response.headers_mut().insert(header::ALLOW, allow);
                        }
                        response
                    }
                    Matched::NotFound => Rejection::new(Reason::NotFound).into_response(),
                }
            }
        })
        .layer(middleware::from_fn_with_state(limits, guard))
        .layer(ClientIpLayer::new(resolver))
        .layer(middleware::from_fn(observe))
        .layer(
            NormalizeLayer::new()
                .format(server.error_format.clone())
                .catalog(config.error_catalog()),
        );
    // Scrapes are not API requests: not counted, not logged.
    let metrics_app = metrics_app.layer(NormalizeLayer::new().format(server.error_format.clone()));
    Ok((app, metrics_app))
}

/// The configured routes, matched on method and path.
#[derive(Clone)]
struct RouteTable {
    routes: Arc<[Route]>,
}

/// What the route table says about a request.
enum Matched {
    /// Forward it; this is how it is billed.
    Route(RoutePrice),
    /// A listed path, not with this method: the `Allow` header value.
    WrongMethod(String),
    /// Not a listed path.
    NotFound,
}

impl RouteTable {
    fn new(routes: Vec<Route>) -> Self {
        RouteTable {
            routes: routes.into(),
        }
    }

    /// The route for `method` and `path`; a literal segment wins over a `{param}`.
    fn find(&self, method: &Method, path: &str) -> Matched {
        if !is_clean(path) {
            return Matched::NotFound;
        }
        let mut best: Option<(usize, RoutePrice)> = None;
        let mut allow: Vec<&str> = Vec::new();
        for route in self.routes.iter() {
            let Some(literals) = matches(&route.path, path) else {
                continue;
            };
            if route.method == *method {
                if best.is_none_or(|(most, _)| literals > most) {
                    best = Some((literals, route.price));
                }
            } else if !allow.contains(&route.method.as_str()) {
                allow.push(route.method.as_str());
            }
        }
        match best {
            Some((_, price)) => Matched::Route(price),
            None if allow.is_empty() => Matched::NotFound,
            None => Matched::WrongMethod(allow.join(", ")),
        }
    }
}

/// The number of literal segments of `pattern` if `path` matches it.
fn matches(pattern: &str, path: &str) -> Option<usize> {
    let mut pattern_segments = pattern.split('/');
    let mut path_segments = path.split('/');
    let mut literals = 0;
    loop {
        match (pattern_segments.next(), path_segments.next()) {
            (None, None) => return Some(literals),
            (Some(p), Some(s)) if p.starts_with('{') && !s.is_empty() => {}
            (Some(p), Some(s)) if p == s => literals += 1,
            _ => return None,
        }
    }
}

/// A path the upstream cannot read as another one: no empty, `.` or `..` segment, no
/// percent-encoded `.`, `/` or `\`, no backslash.
fn is_clean(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let encoded_separator = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                [w[1], w[2].to_ascii_lowercase()],
                [b'2', b'e' | b'f'] | [b'5', b'c']
            )
    });
    if encoded_separator || path.contains('\\') {
        return false;
    }
    path.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
    })
}

/// On a route priced by model, a request that names no model is refused (it would otherwise
/// be priced at nothing).
#[derive(Clone, Copy)]
struct RequireModelLayer;

impl<S> Layer<S> for RequireModelLayer {
    type Service = RequireModel<S>;
    fn layer(&self, inner: S) -> RequireModel<S> {
        RequireModel(inner)
    }
}

#[derive(Clone)]
struct RequireModel<S>(S);

impl<S, B> Service<http::Request<B>> for RequireModel<S>
where
    S: Service<http::Request<B>, Error = BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let by_model = request.extensions().get::<RoutePrice>() == Some(&RoutePrice::Model);
        let named = request
            .extensions()
            .get::<LlmRequest>()
            .is_some_and(|llm| llm.model.is_some());
        if by_model && !named {
            let rejection = Rejection::new(Reason::BadRequest)
                .with_param("model")
                .with_message(
                    "This endpoint is billed by model: the JSON body must name a `model`.",
                );
            return Box::pin(std::future::ready(Err(rejection.into())));
        }
        Box::pin(self.0.call(request))
    }
}

async fn handle_error(error: BoxError) -> Rejection {
    classify(error)
}

fn per_minute(n: u32, burst: u32) -> Quota {
    let n = std::num::NonZeroU32::new(n.max(1)).expect("at least 1");
    Quota::per_minute(n).allow_burst(std::num::NonZeroU32::new(burst.max(1)).expect("at least 1"))
}

/// The process-wide Prometheus recorder (installed once; tests build several gateways).
///
/// Histogram samples accumulate until the exporter's upkeep drains them: a task runs it every
/// five seconds, so memory stays flat even when nobody scrapes `/metrics`.
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok()?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .clone()
}

/// Structured logs with tracing to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// One log line and the request metrics per request. Never logs headers: the key stays out.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    // Refusals carry a Rejection; other errors are named by their status (Normalize, outside
    // this middleware, renders them).
    let code = match response.extensions().get::<Rejection>() {
        Some(rejection) => Some(rejection.code()),
        None if status >= 400 => Some(tollgate::Reason::from_status(response.status()).code()),
        None => None,
    };
    let key_id = response
        .extensions()
        .get::<Caller>()
        .map(|c| c.key_id().to_owned());
    let held = response
        .headers()
        .get("x-credits-held")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match code {
        Some(code) => {
            metrics::counter!("tollgate_requests_total", "outcome" => "refused", "code" => code)
                .increment(1)
        }
        None => metrics::counter!("tollgate_requests_total", "outcome" => "allowed", "code" => "")
            .increment(1),
    }
    tracing::info!(
        request_id = %request_id,
        method = %method,
        path = %path,
        status,
        key_id = key_id.as_deref().unwrap_or("-"),
        code = code.unwrap_or("-"),
        credits_held = held.unwrap_or(0),
        latency_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

async fn time_upstream(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!("tollgate_upstream_seconds").record(started.elapsed().as_secs_f64());
    response
}

/// Copies the `Caller` onto the response, so the log line names the key even when a later
/// layer refuses.
#[derive(Clone, Copy)]
struct TagCallerLayer;

impl<S> Layer<S> for TagCallerLayer {
    type Service = TagCaller<S>;
    fn layer(&self, inner: S) -> TagCaller<S> {
        TagCaller(inner)
    }
}

#[derive(Clone)]
struct TagCaller<S>(S);

impl<S, B, ResB> Service<http::Request<B>> for TagCaller<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let caller = request.extensions().get::<Caller>().cloned();
        Box::pin(self.0.call(request).map(move |result| {
            result.map(|mut response| {
                if let Some(caller) = caller {
                    response.extensions_mut().insert(caller);
                }
                response
            })
        }))
    }
}

/// Settles expired holds every 10 seconds.
fn spawn_expiry<L: LedgerAdmin>(ledger: L) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            every.tick().await;
            if let Err(error) = ledger.expire_holds(SystemTime::now()).await {
                tracing::warn!(error = %error, "expiring holds failed");
            }
        }
    });
}

/// A ledger that counts credits charged and holds open for `/metrics`.
#[derive(Clone)]
struct MeteredLedger<L> {
    inner: L,
    holds_open: Arc<AtomicI64>,
}

/// Observes a ledger answer on its way out.
type Observer<T> = Box<dyn FnOnce(T) -> T + Send>;
type Observed<F, T> = futures_util::future::Map<F, Observer<T>>;

impl<L> MeteredLedger<L> {
    /// Counts a closed hold and logs what the request finally cost.
    fn closed(&self, hold: &Hold) -> Observer<Result<Settlement, BackendError>> {
        let holds = self.holds_open.clone();
        let request_id: Option<Arc<str>> = hold.request_id().map(Arc::from);
        let (account, held) = (hold.account_arc().clone(), hold.amount());
        Box::new(move |result| {
            if let Ok(settlement) = &result {
                if settlement.was_open {
                    holds.fetch_sub(1, Ordering::Relaxed);
                    tracing::info!(
                        request_id = %request_id.as_deref().unwrap_or("-"),
                        account = %account,
                        credits_held = held,
                        cost = settlement.charged,
                        balance = settlement.balance,
                        "settled"
                    );
                }
                metrics::counter!("tollgate_credits_charged_total").increment(settlement.charged);
            }
            result
        })
    }
}

impl<L: Ledger + Clone> Ledger for MeteredLedger<L> {
    type ReserveFuture = Observed<L::ReserveFuture, Result<Reservation, ReserveError>>;
    type SettleFuture = Observed<L::SettleFuture, Result<Settlement, BackendError>>;
    type ReleaseFuture = Observed<L::ReleaseFuture, Result<Settlement, BackendError>>;
    type ExtendFuture = L::ExtendFuture;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        let holds = self.holds_open.clone();
        self.inner.reserve(request).map(Box::new(move |result| {
            if let Ok(Reservation::Held(_)) = &result {
                holds.fetch_add(1, Ordering::Relaxed);
            }
            result
        }))
    }
    /// Forwarded, so that wrapping a ledger for metrics keeps its immediate path (the memory
    /// ledger's): without it the default answers "await", and every request pays a future.
    fn reserve_now(
        &self,
        request: ReserveRequest,
    ) -> Result<Result<Reservation, ReserveError>, ReserveRequest> {
        let answer = self.inner.reserve_now(request)?;
        if let Ok(Reservation::Held(_)) = &answer {
            self.holds_open.fetch_add(1, Ordering::Relaxed);
        }
        Ok(answer)
    }
    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        self.inner.settle(hold, actual).map(self.closed(hold))
    }
    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        self.inner.release(hold).map(self.closed(hold))
    }
    fn extend(&self, hold: &Hold) -> Self::ExtendFuture {
        self.inner.extend(hold)
    }
    fn now(&self) -> SystemTime {
        self.inner.now()
    }
}

impl<L: LedgerAdmin + Clone> LedgerAdmin for MeteredLedger<L> {
    type TopUpFuture = L::TopUpFuture;
    type BalanceFuture = L::BalanceFuture;
    type JournalFuture = L::JournalFuture;
    type ExpireFuture = Observed<L::ExpireFuture, Result<Expired, BackendError>>;
    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture {
        self.inner.top_up(account, amount, idempotency_key)
    }
    fn balance(&self, account: &str) -> Self::BalanceFuture {
        self.inner.balance(account)
    }
    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture {
        self.inner.journal(account, query)
    }
    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture {
        let holds = self.holds_open.clone();
        self.inner.expire_holds(now).map(Box::new(move |result| {
            if let Ok(expired) = &result {
                holds.fetch_sub(expired.holds as i64, Ordering::Relaxed);
            }
            result
        }))
    }
}

/// The admission counted the same way: a wrapper that forwards both calls, so a fused admission
/// stays fused.
impl<A: Admission> Admission for MeteredLedger<A> {
    type Limiter = A::Limiter;
    type AdmitFuture = futures_util::future::Map<A::AdmitFuture, Observer<Verdict>>;
    type SettleFuture = Observed<A::SettleFuture, Result<Settlement, BackendError>>;

    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> Self::AdmitFuture {
        let holds = self.holds_open.clone();
        self.inner
            .admit(charges, request)
            .map(Box::new(move |verdict| {
                if let Verdict::Admitted {
                    reservation: Reservation::Held(_),
                    ..
                } = &verdict
                {
                    holds.fetch_add(1, Ordering::Relaxed);
                }
                verdict
            }))
    }
    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> Self::SettleFuture {
        self.inner
            .settle(hold, actual, corrections)
            .map(self.closed(hold))
    }
}

#[allow(dead_code)]
fn _assert_types(_: Balance, _: TopUp, _: TopUpError, _: JournalEntry, _: Body) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger wrapper for metrics must not turn the memory ledger's immediate path off: the
    /// wrapped ledger still answers `reserve_now` (the hold placed at once, counted open), and
    /// settling it closes it (counted closed).
    #[tokio::test]
    async fn metered_memory_ledger_keeps_the_immediate_path() {
        let memory = MemoryLedger::new();
        assert!(
            memory
                .top_up("acct_1", 100, "invoice-1")
                .await
                .unwrap()
                .applied
        );
        let holds_open = Arc::new(AtomicI64::new(0));
        let ledger = MeteredLedger {
            inner: memory.clone(),
            holds_open: holds_open.clone(),
        };
        let answer = ledger.reserve_now(ReserveRequest::new("acct_1", 30));
        let Ok(Ok(Reservation::Held(hold))) = answer else {
            panic!("the wrapped memory ledger must answer at once, got {answer:?}");
        };
        assert_eq!(hold.amount(), 30);
        assert_eq!(holds_open.load(Ordering::Relaxed), 1);
        assert_eq!(memory.balance("acct_1").await.unwrap().available, 70);
        let settlement = ledger.settle(&hold, 12).await.unwrap();
        assert_eq!(settlement.charged, 12);
        assert_eq!(holds_open.load(Ordering::Relaxed), 0);
        assert_eq!(memory.balance("acct_1").await.unwrap().balance, 88);
        // A refusal is answered at once too, and opens nothing.
        let refused = ledger.reserve_now(ReserveRequest::new("acct_1", 1_000));
        assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
        assert_eq!(holds_open.load(Ordering::Relaxed), 0);
    }
}
