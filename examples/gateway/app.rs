//! The gateway's assembly: config → stores → the whole chain → an axum app.
//!
//! Shared by `main.rs` and the tests (which include this file with `#[path]`).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    body::Body,
    error_handling::HandleErrorLayer,
    extract::Request,
    http::StatusCode,
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
    config::{BackendKind, GatewayConfig, KeyStatusConfig, Upstream},
    credits::{Admission, AdmissionFuture, Balance, Hold},
    credits::{
        CreditsLayer, Expired, JournalEntry, JournalQuery, Ledger, MemoryLedger, ModelPricing,
        Pricing, Reservation, ReserveError, ReserveRequest, Settlement, TopUp, TopUpError,
    },
    ip::{ClientIpLayer, ClientIpResolver, IpAllowLayer},
    keys::{self, KeyDigest},
    normalize::{classify, NormalizeLayer},
    ratelimit::{Charge, Correction, Limiter, MemoryLimiter, Plan, Plans, RateLimitLayer},
    BackendError, Caller, Rejection,
};
use tower::{BoxError, Layer, Service, ServiceBuilder};

use super::upstream;

/// A built gateway: the app and what the startup banner shows.
pub struct Gateway {
    router: Router,
    demo_key: Option<String>,
    demo_model: String,
}

impl Gateway {
    /// Build the stores and the chain from a validated config.
    pub async fn build(config: GatewayConfig) -> Result<Gateway, String> {
        let demo_key = config
            .keys
            .iter()
            .find(|k| k.status == KeyStatusConfig::Active)
            .and_then(|k| k.key.as_ref())
            .map(|k| k.get_ref().clone());
        let demo_model = config
            .models
            .first()
            .map_or_else(|| "mock-small".to_owned(), |m| m.id.get_ref().clone());
        let router = match config.backend.kind {
            BackendKind::Memory => {
                let store = MemoryKeyStore::new();
                let ledger = MemoryLedger::builder()
                    .hold_ttl(Duration::from_secs(config.server.hold_ttl_secs))
                    // Bounded memory: the last entries of each account's journal.
                    .journal_limit(config.server.journal_limit)
                    .build();
                let limiter = MemoryLimiter::new();
                limiter.spawn_evictor(Duration::from_secs(60));
                assemble(&config, store, ledger, limiter).await?
            }
            BackendKind::Redis => redis_backend(&config).await?,
            BackendKind::Postgres => postgres_backend(&config).await?,
        };
        Ok(Gateway {
            router,
            demo_key,
            demo_model,
        })
    }

    /// The whole app (for tests: drive it with `tower::ServiceExt::oneshot` or serve it).
    #[allow(dead_code)] // used by the tests that include this file
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The first active plaintext key of the config, to show at startup.
    pub fn demo_key(&self) -> Option<&str> {
        self.demo_key.as_deref()
    }

    /// A model to use in the startup example.
    pub fn demo_model(&self) -> &str {
        &self.demo_model
    }

    /// Serve until `shutdown` completes, then let in-flight requests finish (and settle).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    }
}

#[cfg(feature = "redis")]
async fn redis_backend(config: &GatewayConfig) -> Result<Router, String> {
    use tollgate::{config::FailMode, redis};
    let url = config.backend.url.as_deref().unwrap_or_default();
    let options = redis::RedisOptions::new()
        .hold_ttl(Duration::from_secs(config.server.hold_ttl_secs))
        .rate_limit_fail(match config.backend.rate_limit_fail {
            FailMode::Open => redis::FailMode::Open,
            FailMode::Closed => redis::FailMode::Closed,
        });
    let backend = redis::RedisBackend::connect_with(url, options)
        .await
        .map_err(|e| format!("backend.url: cannot connect to Redis: {}", e.message()))?;
    assemble(
        config,
        backend.key_store(),
        backend.ledger(),
        backend.limiter(),
    )
    .await
}

#[cfg(not(feature = "redis"))]
async fn redis_backend(_config: &GatewayConfig) -> Result<Router, String> {
    Err("backend.kind = \"redis\" needs the `redis` feature: cargo run --release --features redis --example gateway -- ...".into())
}

#[cfg(feature = "postgres")]
async fn postgres_backend(config: &GatewayConfig) -> Result<Router, String> {
    use tollgate::{config::FailMode, postgres};
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
    assemble(
        config,
        backend.key_store(),
        backend.ledger(),
        backend.limiter(),
    )
    .await
}

#[cfg(not(feature = "postgres"))]
async fn postgres_backend(_config: &GatewayConfig) -> Result<Router, String> {
    Err("backend.kind = \"postgres\" needs the `postgres` feature: cargo run --release --features postgres --example gateway -- ...".into())
}

/// Load the config into the stores and build the chain.
async fn assemble<K, L, R>(
    config: &GatewayConfig,
    store: K,
    ledger: L,
    limiter: R,
) -> Result<Router, String>
where
    K: KeyStore + KeyAdmin + Clone,
    L: Ledger + Clone,
    R: Limiter,
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
    let pricing = Pricing::new().models(
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

    let holds_open = Arc::new(AtomicI64::new(0));
    let ledger = MeteredLedger {
        inner: ledger,
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
        .layer(HandleErrorLayer::new(|error: BoxError| async move {
            classify(error)
        }))
        .layer(auth)
        .layer(TagCallerLayer)
        .layer(ip_allow)
        .layer(
            CreditsLayer::new(ledger.clone(), pricing)
                .body_limit(server.max_body_bytes)
                .rate_limit(
                    RateLimitLayer::new(limiter, plans.clone()).body_limit(server.max_body_bytes),
                ),
        )
        // Inside Credits: a timeout releases the hold (outside it would count as a disconnect).
        .timeout(Duration::from_secs(server.upstream_timeout_secs))
        .service(upstream_app);

    let metrics = install_metrics();
    let mut app = Router::new().route(
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
    if let Some(admin_key) = &config.admin.key {
        let plan_names: Vec<String> = config
            .plans
            .iter()
            .map(|p| p.name.get_ref().clone())
            .collect();
        app = app.nest(
            "/admin",
            admin::router(store, ledger, admin_key)
                .plans(plan_names)
                .build(),
        );
    }
    Ok(app
        .fallback_service(api)
        .layer(ClientIpLayer::new(resolver))
        .layer(middleware::from_fn(observe))
        .layer(NormalizeLayer::new().format(server.error_format.clone())))
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
fn spawn_expiry<L: Ledger>(ledger: L) {
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

impl<L: Ledger> MeteredLedger<L> {
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
    type TopUpFuture = L::TopUpFuture;
    type BalanceFuture = L::BalanceFuture;
    type JournalFuture = L::JournalFuture;
    type ExpireFuture = Observed<L::ExpireFuture, Result<Expired, BackendError>>;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        let holds = self.holds_open.clone();
        self.inner.reserve(request).map(Box::new(move |result| {
            if let Ok(Reservation::Held(_)) = &result {
                holds.fetch_add(1, Ordering::Relaxed);
            }
            result
        }))
    }
    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        self.inner.settle(hold, actual).map(self.closed(hold))
    }
    // The two `_limited` calls go to the inner ledger, so that Redis keeps them one script each.
    fn reserve_limited<R: Limiter>(
        &self,
        limiter: &R,
        charges: Vec<Charge>,
        request: ReserveRequest,
    ) -> AdmissionFuture
    where
        Self: Clone,
    {
        let holds = self.holds_open.clone();
        Box::pin(
            self.inner
                .reserve_limited(limiter, charges, request)
                .map(move |admission| {
                    if let Admission::Admitted {
                        reservation: Reservation::Held(_),
                        ..
                    } = &admission
                    {
                        holds.fetch_add(1, Ordering::Relaxed);
                    }
                    admission
                }),
        )
    }
    fn settle_limited<R: Limiter>(
        &self,
        limiter: &R,
        hold: &Hold,
        actual: u64,
        corrections: &[Correction],
    ) -> Self::SettleFuture {
        self.inner
            .settle_limited(limiter, hold, actual, corrections)
            .map(self.closed(hold))
    }
    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        self.inner.release(hold).map(self.closed(hold))
    }
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

#[allow(dead_code)]
fn _assert_types(_: Balance, _: TopUp, _: TopUpError, _: JournalEntry, _: Body) {}
