//! The normalization layer in front of axum, tonic and plain hyper services.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tollgate::{
    format::Format,
    normalize::{NormalizeLayer, REQUEST_ID},
    LimitKind, Reason, Rejection,
};
use tower::{Layer, Service, ServiceExt};

async fn json_of<B>(response: Response<B>) -> (StatusCode, http::HeaderMap, Value)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, value)
}

fn app() -> Router {
    Router::new()
        .route("/v1/models", get(|| async { Json(json!({"data": []})) }))
        .route(
            "/v1/chat/completions",
            post(|Json(v): Json<Value>| async move { Json(v) }),
        )
        .route(
            "/html502",
            get(|| async {
                Response::builder()
                    .status(502)
                    .header("content-type", "text/html")
                    .body(Body::from("<html><body>nginx: upstream at 10.0.0.7 down</body></html>"))
                    .unwrap()
            }),
        )
        .route(
            "/formatted",
            get(|| async {
                Response::builder()
                    .status(409)
                    .header("content-type", "application/json")
                    .body(Body::from(
                        r#"{"error":{"message":"already exists","type":"invalid_request_error","param":null,"code":"conflict"}}"#,
                    ))
                    .unwrap()
            }),
        )
        .route(
            "/refuse",
            get(|| async {
                let mut res = Rejection::rate_limited(LimitKind::Requests, Duration::from_millis(1500))
                    .into_response_for_test();
                res.headers_mut().insert("x-ratelimit-limit-requests", "10".parse().unwrap());
                res
            }),
        )
}

trait IntoTestResponse {
    fn into_response_for_test(self) -> Response<Body>;
}

impl IntoTestResponse for Rejection {
    fn into_response_for_test(self) -> Response<Body> {
        axum::response::IntoResponse::into_response(self)
    }
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn unknown_route_is_a_404_in_format_with_a_request_id() {
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(get_req("/v2/models"))
        .await
        .unwrap();
    let (status, headers, body) = json_of(res).await;
    assert_eq!(status, 404);
    assert_eq!(headers["x-should-retry"], "false");
    let id = headers[&REQUEST_ID].to_str().unwrap();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert_eq!(
        body,
        json!({"error": {
            "message": "The requested endpoint does not exist. Check the base URL and the path.",
            "type": "not_found_error", "param": null, "code": "not_found"}})
    );
}

#[tokio::test]
async fn method_not_allowed_keeps_allow_header() {
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(Request::delete("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (status, headers, body) = json_of(res).await;
    assert_eq!(status, 405);
    assert!(headers["allow"].to_str().unwrap().contains("GET"));
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn axum_json_rejection_becomes_the_message() {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(req)
        .await
        .unwrap();
    let (status, _, body) = json_of(res).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Failed to parse the request body as JSON"),
        "{message}"
    );

    let req = Request::post("/v1/chat/completions")
        .body(Body::from("{}"))
        .unwrap();
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(req)
        .await
        .unwrap();
    let (status, _, body) = json_of(res).await;
    assert_eq!(status, 415);
    assert_eq!(body["error"]["code"], "unsupported_media_type");
}

#[tokio::test]
async fn upstream_html_502_is_rewritten_without_its_text() {
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(get_req("/html502"))
        .await
        .unwrap();
    let (status, headers, body) = json_of(res).await;
    assert_eq!(status, 502);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-should-retry"], "true");
    assert_eq!(
        body,
        json!({"error": {
            "message": "The gateway could not get a valid response from the upstream service.",
            "type": "server_error", "param": null, "code": "bad_gateway"}})
    );
}

#[tokio::test]
async fn bodies_already_in_format_pass_through() {
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(get_req("/formatted"))
        .await
        .unwrap();
    let (status, _, body) = json_of(res).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["message"], "already exists");
}

#[tokio::test]
async fn rejections_are_rerendered_in_the_configured_format_keeping_headers() {
    let layer = NormalizeLayer::new().format(Format::Envelope);
    let res = layer
        .layer(app())
        .oneshot(get_req("/refuse"))
        .await
        .unwrap();
    let (status, headers, body) = json_of(res).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(headers["retry-after-ms"], "1500");
    assert_eq!(headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(body["success"], false);
    assert_eq!(body["statusCode"], 429);
    assert_eq!(body["path"], "/refuse");
    assert_eq!(body["error"]["code"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(body["error"]["retryAfter"], 2);
}

#[tokio::test]
async fn messages_can_be_changed() {
    let layer = NormalizeLayer::new().message(Reason::NotFound, "Nothing here. Base URL is /v1.");
    let res = layer.layer(app()).oneshot(get_req("/nope")).await.unwrap();
    let (_, _, body) = json_of(res).await;
    assert_eq!(body["error"]["message"], "Nothing here. Base URL is /v1.");
}

#[tokio::test]
async fn request_ids_are_propagated_when_valid_and_replaced_when_not() {
    let svc = NormalizeLayer::new().layer(app());
    let req = Request::get("/v1/models")
        .header("x-request-id", "client-abc-123")
        .body(Body::empty())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "client-abc-123");

    let bad = "x".repeat(300);
    let req = Request::get("/v1/models")
        .header("x-request-id", bad.as_str())
        .body(Body::empty())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert!(res.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));

    let req = Request::get("/v1/models")
        .header("x-request-id", "a")
        .header("x-request-id", "b")
        .body(Body::empty())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert!(res.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
}

#[tokio::test]
async fn success_keeps_its_status_and_body() {
    let res = NormalizeLayer::new()
        .layer(app())
        .oneshot(get_req("/v1/models"))
        .await
        .unwrap();
    assert!(res.headers().contains_key("x-request-id"));
    let (status, _, body) = json_of(res).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"data": []}));
}

// --- inner errors and panics -------------------------------------------------------------

async fn status_and_code<S>(svc: S) -> (StatusCode, String, String)
where
    S: Service<
        Request<Body>,
        Response = Response<tollgate::body::ResponseBody<Body>>,
        Error = Infallible,
    >,
{
    let res = svc.oneshot(get_req("/")).await.unwrap();
    let (status, _, body) = json_of(res).await;
    (
        status,
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(start_paused = true)]
async fn tower_timeout_is_a_504() {
    let slow = tower::service_fn(|_req: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let svc =
        NormalizeLayer::new().layer(tower::timeout::Timeout::new(slow, Duration::from_secs(30)));
    let (status, code, _) = status_and_code(svc).await;
    assert_eq!((status.as_u16(), code.as_str()), (504, "gateway_timeout"));
}

#[tokio::test(start_paused = true)]
async fn tower_http_timeout_is_a_504() {
    let slow = tower::service_fn(|_req: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    #[allow(deprecated)]
    let timeout = tower_http::timeout::TimeoutLayer::new(Duration::from_secs(30)).layer(slow);
    let svc = NormalizeLayer::new().layer(tower::util::MapResponse::new(
        timeout,
        |r: Response<Body>| r,
    ));
    let (status, code, _) = status_and_code(svc).await;
    assert_eq!((status.as_u16(), code.as_str()), (504, "gateway_timeout"));
}

#[tokio::test]
async fn load_shed_is_a_503() {
    // A service that is never ready, shed by tower's LoadShed.
    struct NeverReady;
    impl Service<Request<Body>> for NeverReady {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Pending
        }
        fn call(&mut self, _: Request<Body>) -> Self::Future {
            unreachable!()
        }
    }
    let svc = NormalizeLayer::new().layer(tower::load_shed::LoadShed::new(NeverReady));
    let (status, code, _) = status_and_code(svc).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (503, "service_unavailable")
    );
}

#[tokio::test]
async fn io_errors_are_502_and_others_500() {
    let refused = tower::service_fn(|_req: Request<Body>| async {
        Err::<Response<Body>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connect to 10.1.1.1 refused",
        ))
    });
    let (status, code, message) = status_and_code(NormalizeLayer::new().layer(refused)).await;
    assert_eq!((status.as_u16(), code.as_str()), (502, "bad_gateway"));
    assert!(!message.contains("10.1.1.1"));

    let other = tower::service_fn(|_req: Request<Body>| async {
        Err::<Response<Body>, tollgate::BoxError>("database password is hunter2".into())
    });
    let (status, code, message) = status_and_code(NormalizeLayer::new().layer(other)).await;
    assert_eq!((status.as_u16(), code.as_str()), (500, "internal_error"));
    assert!(!message.contains("hunter2"));

    let rejection = tower::service_fn(|_req: Request<Body>| async {
        Err::<Response<Body>, tollgate::BoxError>(Box::new(Rejection::new(Reason::Conflict)))
    });
    let (status, code, _) = status_and_code(NormalizeLayer::new().layer(rejection)).await;
    assert_eq!((status.as_u16(), code.as_str()), (409, "conflict"));
}

#[tokio::test]
async fn panics_are_a_500_without_the_panic_text() {
    let in_future = tower::service_fn(|_req: Request<Body>| async {
        if true {
            panic!("secret panic text sk-live-123");
        }
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let (status, code, message) = status_and_code(NormalizeLayer::new().layer(in_future)).await;
    assert_eq!((status.as_u16(), code.as_str()), (500, "internal_error"));
    assert!(!message.contains("secret"));

    #[derive(Clone)]
    struct PanicsInCall;
    impl Service<Request<Body>> for PanicsInCall {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<Body>) -> Self::Future {
            panic!("secret in call")
        }
    }
    let (status, code, _) = status_and_code(NormalizeLayer::new().layer(PanicsInCall)).await;
    assert_eq!((status.as_u16(), code.as_str()), (500, "internal_error"));
}

// --- streaming through a real hyper server -----------------------------------------------

/// A body whose chunks are released one by one by the test.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

#[tokio::test]
async fn plain_hyper_service_streams_chunk_by_chunk() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let rx = rx.clone();
        async move {
            if req.uri().path() == "/stream" {
                let rx = rx.lock().unwrap().take().unwrap();
                Ok::<_, Infallible>(Response::new(http_body_util::Either::Left(ChannelBody(rx))))
            } else {
                let mut res = Response::new(http_body_util::Either::Right(
                    http_body_util::Full::new(Bytes::from("not here")),
                ));
                *res.status_mut() = StatusCode::NOT_FOUND;
                Ok(res)
            }
        }
    });
    let svc = NormalizeLayer::new().layer(inner);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);

    let res = sender
        .send_request(
            Request::get("/stream")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    let mut body = res.into_body();
    for chunk in ["data: one\n\n", "data: two\n\n"] {
        tx.send(Bytes::from(chunk)).await.unwrap();
        // The chunk arrives before the next one is even produced: nothing is buffered.
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), chunk);
    }
    drop(tx);
    assert!(body.frame().await.is_none());

    let res = sender
        .send_request(
            Request::get("/missing")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let (status, _, body) = json_of(res).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "not here");
}

// --- tonic -------------------------------------------------------------------------------

/// Refuses every call whose metadata has `x-deny`, as a tollgate layer would.
#[derive(Clone)]
struct DenyLayer;

impl<S> Layer<S> for DenyLayer {
    type Service = Deny<S>;
    fn layer(&self, inner: S) -> Deny<S> {
        Deny(inner)
    }
}

#[derive(Clone)]
struct Deny<S>(S);

impl<S, B> Service<Request<B>> for Deny<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(reason) = req.headers().get("x-deny") {
            let rejection = match reason.as_bytes() {
                b"credits" => Rejection::insufficient_credits(5, 1),
                b"key" => Rejection::new(Reason::InvalidApiKey),
                _ => Rejection::rate_limited(LimitKind::Requests, Duration::from_secs(1)),
            };
            // Whatever the refusing layer rendered, Normalize re-renders it as a gRPC status.
            let res = Format::OpenAi
                .response(&rejection, &tollgate::format::RenderContext::new())
                .map(|b| tonic::body::Body::new(http_body_util::Full::new(b)));
            return Box::pin(async move { Ok(res) });
        }
        Box::pin(self.0.call(req))
    }
}

#[tokio::test]
async fn tonic_clients_see_grpc_statuses() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>>().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(NormalizeLayer::new().format(Format::Envelope))
            .layer(DenyLayer)
            .add_service(health)
            .serve_with_incoming(tokio_stream_shim(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |deny: Option<&'static str>| {
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: "grpc.health.v1.Health".into(),
        });
        if let Some(d) = deny {
            req.metadata_mut().insert("x-deny", d.parse().unwrap());
        }
        req
    };
    let ok = client.check(check(None)).await.unwrap();
    assert_eq!(ok.into_inner().status, 1, "SERVING");

    let err = client.check(check(Some("credits"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(err.message(), "Insufficient balance: this request needs 5 credits and 1 are available. Please top up your account.");
    let err = client.check(check(Some("key"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client.check(check(Some("rate"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.metadata().get("x-request-id").is_some());
}

fn tokio_stream_shim(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
