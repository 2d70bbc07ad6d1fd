//! An existing axum app gains API keys, rate limits and prepaid credits.
//!
//! The notes app below was written without tollgate. Everything tollgate adds is marked
//! `// tollgate:`: four `.layer(...)` lines in [`app`], and a [`Caller`] argument in the
//! handlers that want to know who is calling.
//!
//! ```sh
//! cargo run --example existing_axum                              # on 127.0.0.1:3000
//! cargo run --example existing_axum -- --listen 127.0.0.1:8080   # or LISTEN=127.0.0.1:8080
//! curl -s localhost:3000/notes -H "Authorization: Bearer $KEY" -d '{"text":"hi"}' -H 'Content-Type: application/json'
//! curl -s localhost:3000/notes -H "Authorization: Bearer $KEY"
//! ```

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::State,
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate::{
    auth::{AccountRecord, AuthLayer, KeyAdmin, KeyRecord, MemoryKeyStore},
    credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Price, Pricing},
    normalize::NormalizeLayer,
    ratelimit::{Plan, Plans, RateLimitLayer},
    Caller,
};

// --- The existing app --------------------------------------------------------------------------

/// The app's own state: notes, by account.
#[derive(Clone, Default)]
pub struct AppState {
    notes: Arc<Mutex<Vec<(String, String)>>>,
}

#[derive(Deserialize)]
struct NewNote {
    text: String,
}

#[derive(Deserialize)]
struct Summarize {
    input: String,
}

/// `POST /notes {"text": ...}`: 201 and the note.
async fn add_note(
    State(state): State<AppState>,
    caller: Caller, // tollgate: who is calling
    Json(note): Json<NewNote>,
) -> (StatusCode, Json<Value>) {
    let mut notes = state.notes.lock().unwrap();
    notes.push((caller.account_id().to_owned(), note.text.clone()));
    let id = notes.len();
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "text": note.text})),
    )
}

/// `GET /notes`: the caller's notes.
async fn list_notes(
    State(state): State<AppState>,
    caller: Caller, // tollgate: who is calling
) -> Json<Value> {
    let notes = state.notes.lock().unwrap();
    let mine: Vec<&str> = notes
        .iter()
        .filter(|(account, _)| account == caller.account_id())
        .map(|(_, text)| text.as_str())
        .collect();
    Json(json!({"account": caller.account_id(), "notes": mine}))
}

/// `POST /summarize {"input": ...}`: a stand-in for a model call. It reports the tokens it used
/// in an OpenAI-style `usage` object, which is what the credits layer charges.
async fn summarize(Json(request): Json<Summarize>) -> Json<Value> {
    let summary: String = request.input.chars().take(40).collect();
    let prompt_tokens = request.input.len().div_ceil(4);
    let completion_tokens = summary.len().div_ceil(4);
    Json(json!({
        "summary": summary,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    }))
}

/// The app's routes, as they were before tollgate.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/notes", get(list_notes).post(add_note))
        .route("/summarize", post(summarize))
        .with_state(state)
}

// --- What tollgate adds ------------------------------------------------------------------------

/// What a call costs: 1 credit; `/summarize` 2 credits plus 50 per 1000 tokens, holding for at
/// most 200 completion tokens before the call and charging the `usage` it reports after.
pub fn pricing() -> Pricing {
    Pricing::flat(1)
        .route("/summarize", Price::flat(2).per_1k_tokens(50))
        .default_max_tokens(200)
}

/// The app behind tollgate: the stores are shared with whoever manages keys and balances.
pub fn app(state: AppState, keys: MemoryKeyStore, ledger: MemoryLedger, plans: Plans) -> Router {
    // `Router::layer` wraps what is above it: the last layer is the outermost.
    routes(state)
        .layer(CreditsLayer::new(ledger, pricing())) // tollgate: prepaid credits
        .layer(RateLimitLayer::memory(plans)) // tollgate: per-key limits, by plan
        .layer(AuthLayer::new(keys)) // tollgate: API key → Caller
        .layer(NormalizeLayer::new()) // tollgate: one error body (OpenAI's), x-request-id
}

/// Plans: 60 requests a minute unless the account's plan says otherwise.
pub fn plans() -> Plans {
    Plans::new(Plan::new().requests_per_minute(60))
}

/// Serve `app` on `listener` (with the peer address, for the per-IP brute-force shield).
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// An account with `credits`, and a new key for it.
pub async fn demo_account(
    keys: &MemoryKeyStore,
    ledger: &MemoryLedger,
    account: &str,
    plan: &str,
    credits: u64,
) -> String {
    keys.put_account(AccountRecord::new(account, plan))
        .await
        .expect("in memory");
    if credits > 0 {
        ledger
            .top_up(account, credits, &format!("demo:{account}"))
            .await
            .expect("in memory");
    }
    let key = keys
        .create_key(
            "sk-demo-",
            KeyRecord::new(format!("key_{account}"), account),
        )
        .await
        .expect("the account exists");
    key.as_str().to_owned()
}

/// `--listen ADDR`, else `$LISTEN`, else 127.0.0.1:3000.
fn listen_addr() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = std::env::var("LISTEN").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().ok_or("--listen needs an address")?),
            other => return Err(format!("unknown argument `{other}` (try --listen ADDR)")),
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:3000".into());
    listen
        .parse()
        .map_err(|_| format!("`{listen}` is not an address such as 127.0.0.1:3000"))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let addr = listen_addr()?;
    let (keys, ledger) = (MemoryKeyStore::new(), MemoryLedger::new());
    let key = demo_account(&keys, &ledger, "acct_demo", "free", 100).await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("notes app listening on http://{addr}");
    println!("demo key (account acct_demo, 100 credits): {key}");
    println!("try: curl -s http://{addr}/notes -H 'Authorization: Bearer {key}'");
    let app = app(AppState::default(), keys, ledger, plans());
    serve(listener, app).await.map_err(|e| e.to_string())
}
