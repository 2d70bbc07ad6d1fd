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
//! | `GET /accounts/{id}/journal?after=&limit=` | | `{"entries":[..]}` |
//! | `POST /keys` | `{"account","id"?,"prefix"?,"plan"?,"models"?,"ip_allowlist"?,"expires_at"?}` | 201, `{"id","account","key"}`: the key, the only time it is shown |
//! | `POST /keys/{id}/revoke` | | `{"id","status":"revoked"}` |
//! | `POST /keys/{id}/disable` | | `{"id","status":"disabled"}` |
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

use std::{collections::HashSet, fmt, sync::Arc, time::UNIX_EPOCH};

use axum::{
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    auth::{AccountRecord, AccountStatus, KeyAdmin, KeyRecord, KeyStatus},
    credits::{JournalQuery, Ledger, Promoted, TopUpError, TopUpPromoter},
    ip::IpSet,
    keys::{self, KeyDigest},
    Reason, Rejection,
};

/// Builds the admin router; see [`router`].
#[must_use]
pub struct AdminBuilder<K, L> {
    store: K,
    ledger: L,
    admin_key: KeyDigest,
    plans: Option<HashSet<String>>,
    key_prefix: String,
    promoter: Option<Arc<dyn DynPromoter>>,
}

impl<K, L> fmt::Debug for AdminBuilder<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("plans", &self.plans)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

/// The admin API over a key store and a ledger, guarded by `admin_key` (compared as a SHA-256
/// digest, in constant time). See the [module docs](self).
pub fn router<K, L>(store: K, ledger: L, admin_key: &str) -> AdminBuilder<K, L>
where
    K: KeyAdmin + Clone,
    L: Ledger + Clone,
{
    AdminBuilder {
        store,
        ledger,
        admin_key: keys::digest(admin_key),
        plans: None,
        key_prefix: "sk-live-".to_owned(),
        promoter: None,
    }
}

impl<K, L> AdminBuilder<K, L>
where
    K: KeyAdmin + Clone,
    L: Ledger + Clone,
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

    /// Apply top-ups through `promoter`, so an applied top-up also promotes the account's plan
    /// (see [`credits::Promotions`](crate::credits::Promotions)); the answer then carries
    /// `"plan"` and, when it moved, `"promoted_from"`.
    ///
    /// ```
    /// use tollgate::{admin, auth::{AccountRecord, MemoryKeyStore}};
    /// use tollgate::credits::{MemoryLedger, Promote, Promotions};
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
        let admin_key = Arc::new(self.admin_key);
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
            .with_state(state)
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                let admin_key = admin_key.clone();
                async move { guard(&admin_key, req, next).await }
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

async fn guard(admin_key: &KeyDigest, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Rejection::new(Reason::MissingApiKey)
            .with_message("The admin API needs `Authorization: Bearer <admin key>`.")
            .into_response(),
        Some(key) if keys::digest(key) == *admin_key => next.run(req).await,
        Some(_) => Rejection::new(Reason::InvalidApiKey)
            .with_message("Incorrect admin key.")
            .into_response(),
    }
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

async fn account_json<K: KeyAdmin, L: Ledger>(
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

async fn load_account<K: KeyAdmin, L: Ledger>(
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

async fn create_account<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Json(body): Json<NewAccount>,
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

async fn get_account<K: KeyAdmin, L: Ledger>(
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

async fn patch_account<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    Json(patch): Json<AccountPatch>,
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

async fn top_up<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<TopUpBody>,
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
    after: Option<u64>,
    limit: Option<usize>,
}

async fn journal<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Path(id): Path<String>,
    Query(params): Query<JournalParams>,
) -> Result<Json<Value>, Rejection> {
    load_account(&state, &id).await?;
    let mut query = JournalQuery::new();
    query.after = params.after;
    query.limit = params.limit.unwrap_or(1000).min(10_000);
    let entries = state.ledger.journal(&id, query).await?;
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
    Ok(Json(json!({"account": id, "entries": entries})))
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

async fn create_key<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Json(body): Json<NewKey>,
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
        record = record.models(models);
    }
    if let Some(list) = body.ip_allowlist {
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

async fn set_status<K: KeyAdmin, L: Ledger>(
    state: &AdminState<K, L>,
    id: &str,
    status: KeyStatus,
    name: &str,
) -> Result<Json<Value>, Rejection> {
    if state.store.key(id).await?.is_none() {
        return Err(not_found("key", id));
    }
    state.store.set_key_status(id, status).await?;
    Ok(Json(json!({"id": id, "status": name})))
}

async fn revoke_key<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    set_status(&state, &id, KeyStatus::Revoked, "revoked").await
}

async fn disable_key<K: KeyAdmin, L: Ledger>(
    State(state): St<K, L>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Rejection> {
    set_status(&state, &id, KeyStatus::Disabled, "disabled").await
}
