//! A JSON client of a gateway on a loopback address, for the tests that drive the gateway (in
//! process, or the binary as a child process that may die: a failed connection is `None`, not a
//! panic).

// Each test file uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::Value;

/// Requests to `http://addr`, each with a JSON body or none.
#[derive(Clone)]
pub struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http::with(addr, false)
    }

    /// Over HTTP/2 (prior knowledge) when `http2`, else HTTP/1.1.
    pub fn with(addr: SocketAddr, http2: bool) -> Self {
        Http {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .http2_only(http2)
            .build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// One request with exactly these headers (plus `content-type: application/json` with a
    /// body): the status, the response headers and the body (JSON, or the text as a JSON string);
    /// `None` when the connection failed (the gateway was killed).
    pub async fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Value>,
    ) -> Option<(u16, http::HeaderMap, Value)> {
        use http_body_util::BodyExt;
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let res = self
            .client
            .request(req.body(http_body_util::Full::new(body.into())).unwrap())
            .await
            .ok()?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.ok()?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Some((status, headers, value))
    }

    /// [`exchange`](Self::exchange) with a gateway that must answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Value>,
    ) -> (u16, http::HeaderMap, Value) {
        self.exchange(method, path, headers, body)
            .await
            .expect("the gateway answers")
    }

    /// The status and the body of a request with a Bearer key; `None` when the connection
    /// failed (the gateway was killed).
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        bearer: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let mut all = vec![("authorization", format!("Bearer {bearer}"))];
        all.extend(
            headers
                .iter()
                .map(|(name, value)| (*name, (*value).to_owned())),
        );
        let (status, _, body) = self.exchange(method, path, &all, body).await?;
        Some((status, body))
    }

    /// [`try_send`](Self::try_send) to a gateway that must answer.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.try_send(method, path, bearer, &[], body)
            .await
            .expect("the gateway answers")
    }

    /// An account's whole journal through the admin API (`admin` key), in pages of `page`.
    pub async fn journal(&self, account: &str, admin: &str, page: usize) -> Vec<Value> {
        let mut entries = Vec::new();
        loop {
            let after = entries.len();
            let (status, body) = self
                .send(
                    "GET",
                    &format!("/admin/accounts/{account}/journal?after={after}&limit={page}"),
                    admin,
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let rows = body["entries"].as_array().unwrap().clone();
            if rows.is_empty() {
                return entries;
            }
            entries.extend(rows);
        }
    }
}
