//! The gateway's upstream: a built-in mock OpenAI-compatible model server, or a real one proxied
//! with hyper-util's client.

use std::convert::Infallible;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};

/// The reply of the mock model.
const REPLY: &str = "Hello! I am a mock model behind tollgate.";

/// A mock OpenAI-compatible model server: `POST /v1/chat/completions` (JSON, or SSE with
/// `stream: true`; usage in the final chunk with `stream_options.include_usage`, as OpenAI does),
/// `POST /v1/completions`, `POST /v1/embeddings`, `GET /v1/models` and `GET /v1/models/{id}`:
/// the gateway's default routes.
pub fn mock(models: Vec<String>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(one_model))
        .with_state(std::sync::Arc::new(models))
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "tollgate-mock"})
}

async fn one_model(
    State(models): State<std::sync::Arc<Vec<String>>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if models.contains(&id) {
        return Json(model_json(&id)).into_response();
    }
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": format!("The model '{id}' does not exist"), "type": "invalid_request_error", "param": null, "code": "model_not_found"}})),
    )
        .into_response()
}

fn invalid_json() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": "invalid_json"}})),
    )
        .into_response()
}

/// Tokens of a string or an array of strings: one per four characters, at least one.
fn text_tokens(value: &Value) -> u64 {
    let chars: usize = match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(|i| i.as_str().map_or(0, str::len)).sum(),
        _ => 0,
    };
    (chars as u64).div_ceil(4).max(1)
}

async fn completions(body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return invalid_json();
    };
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    let max = body["max_tokens"].as_u64().unwrap_or(16).max(1);
    let words = &words[..words.len().min(max as usize)];
    let prompt = text_tokens(&body["prompt"]);
    let completion = words.len() as u64;
    Json(json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": body["model"].as_str().unwrap_or("mock"),
        "choices": [{"index": 0, "text": words.concat(), "logprobs": null, "finish_reason": if completion < max { "stop" } else { "length" }}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }))
    .into_response()
}

async fn embeddings(body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return invalid_json();
    };
    let inputs = match &body["input"] {
        Value::Array(items) => items.len().max(1),
        _ => 1,
    };
    let prompt = text_tokens(&body["input"]);
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.5, 0.25]}))
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": body["model"].as_str().unwrap_or("mock"),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
    .into_response()
}

async fn list_models(State(models): State<std::sync::Arc<Vec<String>>>) -> Json<Value> {
    let data: Vec<Value> = models.iter().map(|id| model_json(id)).collect();
    Json(json!({"object": "list", "data": data}))
}

fn prompt_tokens(body: &Value) -> u64 {
    let chars: usize = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["content"].as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    (chars as u64).div_ceil(4).max(1)
}

async fn chat(body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": "invalid_json"}})),
        )
            .into_response();
    };
    if !body["messages"].is_array() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "'messages' is a required property", "type": "invalid_request_error", "param": "messages", "code": null}})),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or("mock").to_owned();
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    let max = body["max_tokens"]
        .as_u64()
        .or(body["max_completion_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    let words = &words[..words.len().min(max.max(1) as usize)];
    let prompt = prompt_tokens(&body);
    let completion = words.len() as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if body["stream"].as_bool() == Some(true) {
        let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
        let mut events = Vec::new();
        for (i, word) in words.iter().enumerate() {
            let chunk = json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": if i == 0 { json!({"role": "assistant", "content": word}) } else { json!({"content": word}) }, "finish_reason": null}],
                "usage": null,
            });
            events.push(format!("data: {chunk}\n\n"));
        }
        let last = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": if (words.len() as u64) < max { "stop" } else { "length" }}],
            "usage": null,
        });
        events.push(format!("data: {last}\n\n"));
        if include_usage {
            let usage_chunk = json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage,
            });
            events.push(format!("data: {usage_chunk}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        // One event per frame, as a real server streams them.
        let stream = futures_util::stream::iter(
            events
                .into_iter()
                .map(|e| Ok::<_, Infallible>(Bytes::from(e))),
        );
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .expect("valid response");
    }
    Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

/// A proxy to a real upstream: requests and streamed responses pass through untouched except for
/// hop-by-hop headers and the caller's credentials (the upstream gets `upstream_key` if set).
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    base: axum::http::Uri,
    upstream_key: Option<HeaderValue>,
}

impl Proxy {
    /// A proxy to `base` (`http://host:port`).
    pub fn new(base: &str, upstream_key: Option<&str>) -> Result<Self, String> {
        let base: axum::http::Uri = base
            .parse()
            .map_err(|e| format!("upstream `{base}` is not a URL: {e}"))?;
        if base.scheme_str() != Some("http") || base.authority().is_none() {
            return Err(format!(
                "upstream `{base}` must be `mock` or an http://host:port URL"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        connector.set_nodelay(true);
        let upstream_key = upstream_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .map_err(|_| "upstream_key is not a valid header value".to_owned())?;
        Ok(Proxy {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base,
            upstream_key,
        })
    }

    /// Forward one request.
    pub async fn forward(&self, mut request: Request) -> Response {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut parts = self.base.clone().into_parts();
        let base_path = parts
            .path_and_query
            .as_ref()
            .map_or("", |p| p.path().trim_end_matches('/'));
        parts.path_and_query = format!("{base_path}{path}").parse().ok();
        let Ok(uri) = axum::http::Uri::from_parts(parts) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        for name in HOP_BY_HOP {
            headers.remove(*name);
        }
        headers.remove(header::AUTHORIZATION);
        headers.remove("x-api-key");
        headers.remove(header::HOST);
        if let Some(key) = &self.upstream_key {
            headers.insert(header::AUTHORIZATION, key.clone());
        }
        let result = self.client.request(request).await;
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                for name in HOP_BY_HOP {
                    parts.headers.remove(*name);
                }
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => {
                tracing::warn!(error = %error, "upstream request failed");
                // An empty 502: Normalize renders it as `bad_gateway` in the configured format.
                StatusCode::BAD_GATEWAY.into_response()
            }
        }
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
