//! The operator's admin API: an axum router for top-ups, balances, journals, keys and plans.
//!
//! [`router`] builds a [`Router`] to mount (for example under `/admin`) behind an admin key sent
//! as `Authorization: Bearer <admin key>`. JSON in and out; every error is a [`Rejection`], so
//! behind [`Normalize`](crate::normalize::Normalize) it comes in the configured format.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /accounts` | `{"id","plan"}` | 201, the account |
//! | `GET /accounts/{id}` | | `{"id","plan","frozen","status","balance","held","holds","available"}` |
//! | `PATCH /accounts/{id}` | `{"plan"?: "..", "frozen"?: bool}` | the account |
//! | `POST /accounts/{id}/top-up` | `{"amount": N}` (+ optional `Idempotency-Key` header) | `{"applied","balance",..}` (+ `"plan"`, `"promoted_from"` with [`AdminBuilder::promote_on_top_up`]) |
//! | `GET /accounts/{id}/journal?after=&limit=` | | `{"account","entries":[..],"has_more"}` |
//! | `POST /keys` | `{"account","id"?,"prefix"?,"plan"?,"models"?,"ip_allowlist"?,"expires_at"?}` | 201, `{"id","account","key"}`: the key, the only time it is shown |
//! | `POST /keys/{id}/revoke` | | `{"id","status":"revoked"}` |
//! | `POST /keys/{id}/disable` | | `{"id","status":"disabled"}` |
//! | `POST /keys/{id}/enable` | | `{"id","status":"active"}` |
//!
//! # What it refuses
//!
//! Every refusal comes before anything is applied: no top-up, no status change, no key.
//!
//! | case | status | code |
//! |---|---|---|
//! | no `Authorization: Bearer` | 401 | `missing_api_key` |
//! | a wrong admin key | 401 | `invalid_api_key` |
//! | too many wrong admin keys from one client IP ([`AuthShield`]) | 429 + `retry-after` | `too_many_auth_failures` |
//! | a body that is not a JSON object (`[7]`, `7`, `null`, empty) | 400 | `bad_request` |
//! | malformed JSON | 400 | `invalid_json` |
//! | an unknown, duplicate, missing or mistyped field | 422 | `validation_failed` |
//! | a body over [`BODY_LIMIT`], or a `Content-Type` other than JSON | 413, 415 | `payload_too_large`, `unsupported_media_type` |
//! | `expires_at` not in the future | 422 | `validation_failed` (`param: expires_at`) |
//! | `"ip_allowlist": []` or `"models": []` | 422 | `validation_failed` |
//! | `disable` or `enable` on a revoked key | 409 | `conflict` |
//! | `limit` outside 1 to [`JOURNAL_LIMIT_MAX`], or an unknown query parameter | 400 | `bad_request` |
//!
//! **The brute-force shield** is the one API keys have ([`AuthShield`], default 100 failures per
//! client IP per 5 minutes, IPv6 per /64): a client over it is refused before its key is
//! compared, the right key included, until its failures age out; other clients are not affected.
//! The client IP is the [`ClientIp`] an earlier [`ClientIpLayer`](crate::ip::ClientIpLayer)
//! resolved, else the peer address. Requests whose client IP is unknown (the router served
//! without `ConnectInfo`) share one bucket.
//!
//! **An empty allowlist is refused.** On a key, `[]` would admit no IP, while the global list of
//! [`IpAllowLayer`](crate::ip::IpAllowLayer) (and `[server] ip_allow`) is empty by default and
//! then admits every IP. So a key's `ip_allowlist` names at least one network; omit it to allow
//! every IP, disable the key to allow none.
//!
//! **Revocation is final**: the key store refuses to give a revoked key another status
//! ([`KeyAdminError::Revoked`]), so `disable` and `enable` answer 409; revoking again is a 200.
//!
//! **The journal is paged**: `limit` is 1 to [`JOURNAL_LIMIT_MAX`] (1000), by default
//! [`JOURNAL_LIMIT_DEFAULT`] (100); a larger one is a 400, not a silent clamp. `has_more` is true
//! when entries follow: ask again with `after` set to the last entry's `seq`.
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use http::Request;
//! use tollgate::{admin, auth::{AccountRecord, MemoryKeyStore}, credits::MemoryLedger};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
//! let app: Router = Router::new().nest(
//!     "/admin",
//!     admin::router(store, MemoryLedger::new(), "admin-key-0123456789").plans(["free", "pro"]).build(),
//! );
//! let response = app
//!     .oneshot(
//!         Request::post("/admin/accounts/acct_1/top-up")
//!             .header("authorization", "Bearer admin-key-0123456789")
//!             .header("content-type", "application/json")
//!             .body(axum::body::Body::from(r#"{"amount":500}"#))
//!             .unwrap(),
//!     )
//!     .await
//!     .unwrap();
//! assert_eq!(response.status(), 200);
//! let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
//! let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(body["balance"], 500);
//! # }
//! ```

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{rejection::QueryRejection, FromRequest, Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use crate::{
    auth::{
        AccountRecord, AccountStatus, AuthShield, KeyAdmin, KeyAdminError, KeyRecord, KeyStatus,
    },
    credits::{
        ledger::{JournalQuery, TopUpError},
        promote::{Promoted, TopUpPromoter},
        LedgerAdmin,
    },
    ip::{peer_addr, ClientIp, ClientIpResolver, IpSet},
    keys::{self, KeyDigest},
    Reason, Rejection,
};

/// The most journal entries one `GET /accounts/{id}/journal` returns: a larger `limit` is a 400.
pub const JOURNAL_LIMIT_MAX: usize = 1000;

/// The journal entries returned when the query names no `limit`.
pub const JOURNAL_LIMIT_DEFAULT: usize = 100;

/// The largest request body the admin routes read (64 KiB); a larger one is a 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Builds the admin router; see [`router`].
#[must_use]
pub struct AdminBuilder<K, L> {
    store: K,
    ledger: L,
    admin_key: KeyDigest,
    plans: Option<HashSet<String>>,
    key_prefix: String,
    shield: Option<AuthShield>,
    resolver: ClientIpResolver,
    promoter: Option<Arc<dyn DynPromoter>>,
}

impl<K, L> fmt::Debug for AdminBuilder<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("plans", &self.plans)
            .field("key_prefix", &self.key_prefix)
            .field("shield", &self.shield)
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

/// The admin API over a key store and a ledger, guarded by `admin_key` (compared as a SHA-256
/// digest, in constant time) and by the default [`AuthShield`]. See the [module docs](self).
pub fn router<K, L>(store: K, ledger: L, admin_key: &str) -> AdminBuilder<K, L>
where
    K: KeyAdmin + Clone,
    L: LedgerAdmin + Clone,
{
    AdminBuilder {
        store,
        ledger,
        admin_key: keys::digest(admin_key),
        plans: None,
        key_prefix: "sk-live-".to_owned(),
        shield: Some(AuthShield::default()),
        resolver: ClientIpResolver::new(),
        promoter: None,
    }
}

impl<K, L> AdminBuilder<K, L>
where
    K: KeyAdmin + Clone,
    L: LedgerAdmin + Clone,
{
    /// The plans an account may be moved to (unknown plans are a 422); any when never called.
    pub fn plans<I, S>(mut self, plans: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.plans = Some(plans.into_iter().map(Into::into).collect());
        self
    }

    /// The prefix of created keys (default `sk-live-`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Replace the brute-force shield on the admin key (default: [`AuthShield::default`], 100
    /// wrong keys per client IP per 5 minutes). Pass the shield of the API's
    /// [`AuthLayer`](crate::auth::AuthLayer) to count wrong API keys and wrong admin keys
    /// together.
    ///
    /// ```
    /// use std::time::Duration;
    /// use axum::{body::Body, extract::ConnectInfo, Router};
    /// use http::{Request, StatusCode};
    /// use tollgate::{admin, auth::{AccountRecord, AuthShield, MemoryKeyStore}, credits::MemoryLedger};
    /// use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
    /// let app: Router = admin::router(store, MemoryLedger::new(), "admin-key-0123456789")
    ///     .shield(AuthShield::new(2, Duration::from_secs(60)))
    ///     .build();
    /// let get = |key: &str| {
    ///     Request::get("/accounts/acct_1")
    ///         .header("authorization", format!("Bearer {key}"))
    ///         .extension(ConnectInfo(std::net::SocketAddr::from(([203, 0, 113, 7], 4000))))
    ///         .body(Body::empty())
    ///         .unwrap()
    /// };
    /// for expected in [401, 401, 429] {
    ///     let response = app.clone().oneshot(get("admin-key-guess-0000")).await.unwrap();
    ///     assert_eq!(response.status(), expected);
    /// }
    /// // Throttled: even the right key waits until the failures age out.
    /// let response = app.oneshot(get("admin-key-0123456789")).await.unwrap();
    /// assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # }
    /// ```
    pub fn shield(mut self, shield: AuthShield) -> Self {
        self.shield = Some(shield);
        self
    }

    /// Turn the brute-force shield off (for a router reachable only from a trusted network).
    pub fn no_shield(mut self) -> Self {
        self.shield = None;
        self
    }

    /// How the shield finds the client IP when no [`ClientIp`] is in the request (default: the
    /// peer address). Behind a proxy, put a [`ClientIpLayer`](crate::ip::ClientIpLayer) in front
    /// or pass its resolver here.
    pub fn client_ip_resolver(mut self, resolver: ClientIpResolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// Apply top-ups through `promoter`, so an applied top-up also promotes the account's plan
    /// (see [`credits::Promotions`](crate::credits::promote::Promotions)); the answer then carries
    /// `"plan"` and, when it moved, `"promoted_from"`.
    ///
    /// ```
    /// use tollgate::{admin, auth::{AccountRecord, MemoryKeyStore}};
    /// use tollgate::credits::{MemoryLedger, promote::{Promote, Promotions}};
    ///
    /// let store = MemoryKeyStore::new().with_account(AccountRecord::new("acct_1", "free"));
    /// let ledger = MemoryLedger::new();
    /// let promoter = Promote::new(ledger.clone(), store.clone(), Promotions::new().after_top_up("free", "trusted"));
    /// let router = admin::router(store, ledger, "admin-key-0123456789")
    ///     .promote_on_top_up(promoter)
    ///     .build();
    /// # let _: axum::Router = router;
    /// ```
    pub fn promote_on_top_up(mut self, promoter: impl TopUpPromoter) -> Self {
        self.promoter = Some(Arc::new(promoter));
        self
    }

    /// The router.
    pub fn build(self) -> Router {
        let guard_state = Arc::new(Guard {
            admin_key: self.admin_key,
            shield: self.shield,
            resolver: self.resolver,
        });
        let state = Arc::new(AdminState {
            store: self.store,
            ledger: self.ledger,
            plans: self.plans,
            key_prefix: self.key_prefix,
            promoter: self.promoter,
        });
        Router::new()
            .route("/accounts", post(create_account::<K, L>))
            .route(
                "/accounts/{id}",
                get(get_account::<K, L>).patch(patch_account::<K, L>),
            )
            .route("/accounts/{id}/top-up", post(top_up::<K, L>))
            .route("/accounts/{id}/journal", get(journal::<K, L>))
            .route("/keys", post(create_key::<K, L>))
            .route("/keys/{id}/revoke", post(revoke_key::<K, L>))
            .route("/keys/{id}/disable", post(disable_key::<K, L>))
            .route("/keys/{id}/enable", post(enable_key::<K, L>))
            .with_state(state)
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                let guard_state = guard_state.clone();
                async move { guard_state.check(req, next).await }
            }))
    }
}

struct AdminState<K, L> {
    store: K,
    ledger: L,
    plans: Option<HashSet<String>>,
    key_prefix: String,
    promoter: Option<Arc<dyn DynPromoter>>,
}

type BoxedPromote<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Promoted, TopUpError>> + Send + 'a>>;

/// [`TopUpPromoter`] as an object: the admin router is not generic over it.
trait DynPromoter: Send + Sync {
    fn call<'a>(&'a self, account: &'a str, amount: u64, key: &'a str) -> BoxedPromote<'a>;
}

impl<P: TopUpPromoter> DynPromoter for P {
    fn call<'a>(&'a self, account: &'a str, amount: u64, key: &'a str) -> BoxedPromote<'a> {
        Box::pin(self.top_up_and_promote(account, amount, key))
    }
}

type St<K, L> = State<Arc<AdminState<K, L>>>;

/// The admin key and the brute-force shield in front of every route.
struct Guard {
    admin_key: KeyDigest,
    shield: Option<AuthShield>,
    resolver: ClientIpResolver,
}

/// The shield's bucket for requests whose client IP is unknown: they share one, so that a
/// router served without peer addresses still throttles guessing (everyone waits, the key that
/// moves money stays safe).
const UNKNOWN_CLIENT: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl Guard {
    async fn check(&self, req: Request, next: Next) -> Response {
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else {
            return Rejection::new(Reason::MissingApiKey)
                .with_message("The admin API needs `Authorization: Bearer <admin key>`.")
                .into_response();
        };
        let Some(shield) = &self.shield else {
            return if keys::digest(presented) == self.admin_key {
                next.run(req).await
            } else {
                wrong_admin_key()
            };
        };
        let ip = req
            .extensions()
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| peer_addr(&req).map(|peer| self.resolver.resolve_from(peer, req.headers())))
            .unwrap_or(UNKNOWN_CLIENT);
        // A throttled client is refused before its key is compared, the right key included:
        // otherwise the throttle would tell a guesser when it guessed right.
        if let Err(wait) = shield.check(ip) {
            return too_many_failures(wait);
        }
        if keys::digest(presented) == self.admin_key {
            return next.run(req).await;
        }
        match shield.record_failure(ip) {
            Some(wait) => too_many_failures(wait),
            None => wrong_admin_key(),
        }
    }
}

fn wrong_admin_key() -> Response {
    Rejection::new(Reason::InvalidApiKey)
        .with_message("Incorrect admin key.")
        .into_response()
}

fn too_many_failures(wait: std::time::Duration) -> Response {
    Rejection::new(Reason::TooManyAuthFailures)
        .with_retry_after(wait)
        .into_response()
}

/// A JSON request body that must be an object with known fields: the `Json` extractor alone
/// would also take an array for a struct (`[7]` as `{"amount": 7}`).
struct JsonObject<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonObject<T> {
    type Rejection = Rejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Rejection> {
        let is_json = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|essence| {
                let essence = essence.trim().to_ascii_lowercase();
                essence == "application/json"
                    || (essence.starts_with("application/") && essence.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Rejection::new(Reason::UnsupportedMediaType));
        }
        let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|_| {
                Rejection::new(Reason::PayloadTooLarge).with_message(format!(
                    "The body is larger than {} KiB, or was cut off.",
                    BODY_LIMIT / 1024
                ))
            })?;
        parse_body(&bytes).map(JsonObject)
    }
}

fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Rejection> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(Rejection::new(Reason::BadRequest)
            .with_message("The body must be a JSON object, such as {\"amount\": 500}."));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's own words ("unknown field `x`, expected `amount`"), bounded: they may quote
        // what the client sent.
        let what: String = e.to_string().chars().take(300).collect();
        if e.is_data() {
            Rejection::new(Reason::ValidationFailed).with_message(format!("Invalid body: {what}."))
        } else {
            Rejection::new(Reason::InvalidJson)
                .with_message(format!("The body is not valid JSON: {what}."))
        }
    })
}

fn not_found(what: &str, id: &str) -> Rejection {
    Rejection::new(Reason::NotFound).with_message(format!("No {what} `{id}`."))
}

fn invalid(param: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::new(Reason::ValidationFailed)
        .with_message(message.into())
        .with_param(param)
}

fn status_name(status: &AccountStatus) -> Value {
    match status {
        AccountStatus::Active => json!("active"),
        AccountStatus::Frozen => json!("frozen"),
        AccountStatus::Blocked(why) => json!({"blocked": why.as_ref()}),
    }
}

async fn account_json<K: KeyAdmin, L: LedgerAdmin>(
    state: &AdminState<K, L>,
    account: &AccountRecord,
) -> Result<Value, Rejection> {
    let balance = state.ledger.balance(&account.id).await?;
    Ok(json!({
        "id": account.id.as_ref(),
        "plan": account.plan.as_ref(),
        "frozen": account.status == AccountStatus::Frozen,
        "status": status_name(&account.status),
        "balance": balance.balance,
        "held": balance.held,
        "holds": balance.holds,
        "available": balance.available,
    }))
}

async fn load_account<K: KeyAdmin, L: LedgerAdmin>(
    state: &AdminState<K, L>,
    id: &str,
) -> Result<AccountRecord, Rejection> {
    state
        .store
        .account(id)
        .await?
        .ok_or_else(|| not_found("account", id))
}

fn check_plan<K, L>(state: &AdminState<K, L>, plan: &str) -> Result<(), Rejection> {
    match &state.plans {
        Some(plans) if !plans.contains(plan) => Err(invalid(
            "plan",
            format!(
                "There is no plan `{}`.",
                plan.chars().take(64).collect::<String>()
            ),
        )),
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    id: String,
    plan: String,
}

async fn create_account<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    JsonObject(body): JsonObject<NewAccount>,
) -> Result<(StatusCode, Json<Value>), Rejection> {
    if body.id.is_empty() || body.id.len() > 128 {
        return Err(invalid("id", "An account id is 1 to 128 characters."));
    }
    check_plan(&state, &body.plan)?;
    if state.store.account(&body.id).await?.is_some() {
        return Err(Rejection::new(Reason::Conflict)
            .with_message(format!("The account `{}` already exists.", body.id)));
    }
    let record = AccountRecord::new(body.id.as_str(), body.plan.as_str());
    state.store.put_account(record.clone()).await?;
    Ok((
        StatusCode::CREATED,
        Json(account_json(&state, &record).await?),
    ))
}

async fn get_account<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    let account = load_account(&state, &id).await?;
    Ok(Json(account_json(&state, &account).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountPatch {
    plan: Option<String>,
    frozen: Option<bool>,
}

async fn patch_account<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    JsonObject(patch): JsonObject<AccountPatch>,
) -> Result<Json<Value>, Rejection> {
    load_account(&state, &id).await?;
    if let Some(plan) = &patch.plan {
        check_plan(&state, plan)?;
        state.store.set_account_plan(&id, plan).await?;
    }
    match patch.frozen {
        Some(true) => state.store.freeze_account(&id).await?,
        Some(false) => state.store.unfreeze_account(&id).await?,
        None => {}
    }
    let account = load_account(&state, &id).await?;
    Ok(Json(account_json(&state, &account).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    amount: u64,
}

async fn top_up<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonObject(body): JsonObject<TopUpBody>,
) -> Result<Json<Value>, Rejection> {
    load_account(&state, &id).await?;
    if body.amount == 0 {
        return Err(invalid("amount", "`amount` must be at least 1."));
    }
    let key = match headers.get("idempotency-key") {
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => k.to_owned(),
            _ => {
                return Err(Rejection::new(Reason::BadRequest).with_message(
                    "`Idempotency-Key` must be 1 to 255 printable ASCII characters.",
                ))
            }
        },
        // Without a key every call applies: a fresh random key.
        None => format!("admin-{}", keys::generate("").as_str()),
    };
    let result = match &state.promoter {
        Some(promoter) => promoter.call(&id, body.amount, &key).await,
        None => state
            .ledger
            .top_up(&id, body.amount, &key)
            .await
            .map(|top_up| Promoted::new(top_up, None)),
    };
    let promoted = result.map_err(|e| match e {
        TopUpError::KeyReused { amount } => Rejection::new(Reason::IdempotencyKeyReused)
            .with_message(format!(
                "This Idempotency-Key was already used for a top-up of {amount} credits."
            )),
        TopUpError::Overflow => invalid("amount", "The balance would overflow."),
        TopUpError::Backend(e) => e.into(),
    })?;
    let top_up = promoted.top_up;
    let mut answer = json!({
        "account": id,
        "applied": top_up.applied,
        "balance": top_up.balance.balance,
        "held": top_up.balance.held,
        "available": top_up.balance.available,
    });
    if state.promoter.is_some() {
        let plan = match &promoted.plan_change {
            Some(change) => {
                answer["promoted_from"] = change.from.as_ref().into();
                change.to.to_string()
            }
            None => load_account(&state, &id).await?.plan.to_string(),
        };
        answer["plan"] = plan.into();
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalParams {
    after: Option<String>,
    limit: Option<String>,
}

async fn journal<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    params: Result<Query<JournalParams>, QueryRejection>,
) -> Result<Json<Value>, Rejection> {
    let Query(params) = params.map_err(|_| {
        Rejection::new(Reason::BadRequest)
            .with_message("The journal takes the query parameters `after` and `limit` only.")
    })?;
    let after = match params.after.as_deref() {
        None => None,
        Some(after) => Some(after.parse::<u64>().map_err(|_| {
            Rejection::new(Reason::BadRequest)
                .with_message("`after` must be a journal sequence number (a whole number).")
                .with_param("after")
        })?),
    };
    let limit = match params.limit.as_deref() {
        None => JOURNAL_LIMIT_DEFAULT,
        Some(limit) => limit
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=JOURNAL_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                Rejection::new(Reason::BadRequest)
                    .with_message(format!(
                        "`limit` must be a whole number from 1 to {JOURNAL_LIMIT_MAX}; \
                         page with `after` for more."
                    ))
                    .with_param("limit")
            })?,
    };
    load_account(&state, &id).await?;
    let mut query = JournalQuery::new();
    query.after = after;
    // One more than asked: whether there is a next page.
    query.limit = limit + 1;
    let mut entries = state.ledger.journal(&id, query).await?;
    let has_more = entries.len() > limit;
    entries.truncate(limit);
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "at": humantime::format_rfc3339_millis(e.at).to_string(),
                "at_ms": e.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                "kind": e.kind.as_str(),
                "amount": e.amount,
                "hold": e.hold,
                "hold_id": e.hold_id,
                "balance_after": e.balance_after,
                "held_after": e.held_after,
                "request_id": e.request_id.as_deref(),
                "key_id": e.key_id.as_deref(),
                "idempotency_key": e.idempotency_key.as_deref(),
            })
        })
        .collect();
    Ok(Json(
        json!({"account": id, "entries": entries, "has_more": has_more}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    account: String,
    id: Option<String>,
    prefix: Option<String>,
    plan: Option<String>,
    models: Option<Vec<String>>,
    ip_allowlist: Option<Vec<String>>,
    expires_at: Option<String>,
}

async fn create_key<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    JsonObject(body): JsonObject<NewKey>,
) -> Result<(StatusCode, Json<Value>), Rejection> {
    load_account(&state, &body.account).await?;
    let id = match body.id {
        Some(id) if id.is_empty() || id.len() > 128 => {
            return Err(invalid("id", "A key id is 1 to 128 characters."))
        }
        Some(id) => id,
        None => format!("key_{}", &keys::generate("").as_str()[..16]),
    };
    let prefix = body.prefix.unwrap_or_else(|| state.key_prefix.clone());
    if prefix.len() > 32
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            "prefix",
            "A key prefix is at most 32 letters, digits, `-` or `_`.",
        ));
    }
    let mut record = KeyRecord::new(id.as_str(), body.account.as_str());
    if let Some(plan) = &body.plan {
        check_plan(&state, plan)?;
        record = record.plan(plan.as_str());
    }
    if let Some(models) = body.models {
        if models.is_empty() {
            return Err(invalid(
                "models",
                "`models` must name at least one model; omit it for every model of the plan.",
            ));
        }
        record = record.models(models);
    }
    if let Some(list) = body.ip_allowlist {
        // `[]` would read as "no IP" on a key but "every IP" for the global list: refused.
        if list.is_empty() {
            return Err(invalid(
                "ip_allowlist",
                "`ip_allowlist` must name at least one network; omit it to allow every IP, \
                 or disable the key to allow none.",
            ));
        }
        let set = IpSet::parse(&list).map_err(|e| invalid("ip_allowlist", e.to_string()))?;
        record = record.ip_allowlist(set);
    }
    if let Some(at) = &body.expires_at {
        let at = humantime::parse_rfc3339_weak(at).map_err(|_| {
            invalid(
                "expires_at",
                "`expires_at` must be an RFC 3339 time such as 2027-01-01T00:00:00Z.",
            )
        })?;
        if at <= SystemTime::now() {
            return Err(invalid("expires_at", "`expires_at` must be in the future."));
        }
        record = record.expires_at(at);
    }
    if state.store.key(&id).await?.is_some() {
        return Err(Rejection::new(Reason::Conflict)
            .with_message(format!("The key id `{id}` already exists.")));
    }
    let key = state.store.create_key(&prefix, record).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "account": body.account, "key": key.as_str()})),
    ))
}

async fn set_status<K: KeyAdmin, L: LedgerAdmin>(
    state: &AdminState<K, L>,
    id: &str,
    status: KeyStatus,
    name: &str,
) -> Result<Json<Value>, Rejection> {
    if state.store.key(id).await?.is_none() {
        return Err(not_found("key", id));
    }
    // The store refuses to bring a revoked key back (atomically, on every backend).
    state
        .store
        .set_key_status(id, status)
        .await
        .map_err(|e| match e {
            KeyAdminError::Revoked(_) => Rejection::new(Reason::Conflict).with_message(format!(
                "The key `{id}` is revoked, and revocation is final: it cannot be {}.",
                if status == KeyStatus::Active {
                    "enabled"
                } else {
                    "disabled"
                }
            )),
            KeyAdminError::UnknownKey(_) => not_found("key", id),
            e => e.into(),
        })?;
    Ok(Json(json!({"id": id, "status": name})))
}

async fn revoke_key<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    set_status(&state, &id, KeyStatus::Revoked, "revoked").await
}

async fn disable_key<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    set_status(&state, &id, KeyStatus::Disabled, "disabled").await
}

async fn enable_key<K: KeyAdmin, L: LedgerAdmin>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    set_status(&state, &id, KeyStatus::Active, "active").await
}
