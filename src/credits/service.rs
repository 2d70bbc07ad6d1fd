//! `CreditsLayer`, the `Credits` service and its response future.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    admission::{Admission, TwoStep, Verdict},
    body::{Meter, MeteredBody},
    ledger::{Fingerprint, Hold, Ledger, Reservation, ReserveRequest, Settlement},
    memory::DEFAULT_IDEMPOTENCY_WINDOW,
    pricing::{Price, Pricing},
    replay::{Answer, ReplayStore, Stored, DEFAULT_REPLAY_CAPACITY, DEFAULT_REPLAY_LIMIT},
    MemoryLedger,
};
use crate::{
    body::ResponseBody,
    inspect::{
        has_unreadable_body, inspect, wants_inspection, InspectedBody, LlmRequest,
        DEFAULT_BODY_LIMIT,
    },
    normalize::REQUEST_ID,
    ratelimit::{
        Charge, Charges, Correction, Decision, Gate, Limiter, RateLimitLayer, RequestLimits,
        TokenMeter,
    },
    BackendError, BoxError, Caller, Reason, Rejection,
};

/// `x-credits-held`: the credits held for this request (its price or its estimate, see
/// [`Pricing`]). The final charge, known when the body ends, is at most this unless the
/// response's `usage` costs more (then it is charged up to what is available); read it in the
/// journal.
pub const CREDITS_HELD: HeaderName = HeaderName::from_static("x-credits-held");

/// `x-credits-balance`: the account's available credits right after this request's hold was
/// placed (balance minus every open hold, this one included). When the call costs less than its
/// hold the difference comes back at settlement.
pub const CREDITS_BALANCE: HeaderName = HeaderName::from_static("x-credits-balance");

/// `idempotent-replayed: true` (as Stripe): a retry with an `Idempotency-Key` whose first
/// request was already charged; this response was not charged.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request header that carries an idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// What a response abandoned before its end (client disconnected, body dropped, upstream error
/// mid-stream, response future dropped) is charged. Never zero unless the hold was zero, never
/// twice.
///
/// A timeout placed *outside* [`Credits`] drops the response future, which counts as abandoned;
/// place timeouts between `Credits` and the upstream so that they are errors (released).
///
/// # Example
///
/// ```
/// use tollgate::credits::{CreditsLayer, MemoryLedger, OnDisconnect, Pricing};
///
/// let layer = CreditsLayer::new(MemoryLedger::new(), Pricing::flat(1))
///     .on_disconnect(OnDisconnect::UsageSoFar);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnDisconnect {
    /// The whole hold (the default): the upstream may have done all the work anyway. A stream
    /// cut after its `usage` object went by is charged that usage, as under every policy.
    #[default]
    ChargeHold,
    /// The usage seen so far: the `usage` object if it already went by, else the price of the
    /// estimated prompt tokens plus one completion token per SSE `data:` event streamed, at
    /// least 1 credit and at most the hold.
    UsageSoFar,
}

pub(super) struct Shared<L: Ledger> {
    pub(super) ledger: L,
    pub(super) pricing: Pricing,
    pub(super) on_disconnect: OnDisconnect,
    pub(super) allow_anonymous: bool,
    pub(super) body_limit: usize,
    pub(super) limits: Option<Arc<Limits>>,
    pub(super) replays: ReplayStore,
}

/// The rate limits charged in the same step as the hold ([`CreditsLayer::rate_limit`]).
pub(super) struct Limits {
    gate: Gate,
    pub(super) admission: Box<dyn Admit>,
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;
type AdmitFuture = Pin<Box<dyn Future<Output = Verdict> + Send>>;
pub(super) type SettleFuture =
    Pin<Box<dyn Future<Output = Result<Settlement, BackendError>> + Send>>;

/// An [`Admission`] and its [`Limiter`] with their types erased, so that neither [`Credits`]
/// nor its body carry them.
pub(super) trait Admit: Send + Sync {
    /// The limits and the hold, both or neither.
    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> AdmitFuture;
    /// The limits alone (a request without a [`Caller`], let through uncharged).
    fn check(&self, charges: &[Charge]) -> CheckFuture;
    /// Settle a hold and correct the tokens limits.
    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> SettleFuture;
    /// Corrects the tokens limits from a response without a hold (a replay, a request without
    /// a `Caller`).
    fn meter(&self, charges: &Charges) -> Option<TokenMeter>;
}

struct Erased<A: Admission> {
    admission: A,
    limiter: A::Limiter,
}

impl<A: Admission> Admit for Erased<A> {
    fn admit(&self, charges: Vec<Charge>, request: ReserveRequest) -> AdmitFuture {
        Box::pin(self.admission.admit(charges, request))
    }

    fn check(&self, charges: &[Charge]) -> CheckFuture {
        Box::pin(self.limiter.check(charges))
    }

    fn settle(&self, hold: &Hold, actual: u64, corrections: &[Correction]) -> SettleFuture {
        Box::pin(self.admission.settle(hold, actual, corrections))
    }

    fn meter(&self, charges: &Charges) -> Option<TokenMeter> {
        charges.meter(self.limiter.clone())
    }
}

/// Charges every request to its caller's prepaid balance; see the [module docs](super).
///
/// Before the call: a hold of the request's price (or estimate) is placed on the account of the
/// [`Caller`]; if the available credits do not cover it the answer is 402 `insufficient_quota`
/// with `required` and `available`, and the inner service is never called. After the call: the
/// hold is settled on the response's `usage` when its body ends, released on an error.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tollgate::{credits::{CreditsLayer, LedgerAdmin, MemoryLedger, Pricing}, Caller};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ledger = MemoryLedger::new();
/// ledger.top_up("acct_1", 2, "invoice-1").await.unwrap();
/// let service = CreditsLayer::new(ledger.clone(), Pricing::flat(2))
///     .layer(service_fn(|_: Request<_>| async {
///         Ok::<_, Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
///     }));
///
/// let request = || {
///     let mut request = Request::get("/v1/models").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
///     request.extensions_mut().insert(Caller::builder("key_1", "acct_1").build());
///     request
/// };
/// let response = service.clone().oneshot(request()).await.unwrap();
/// assert_eq!(response.status(), StatusCode::OK);
/// assert_eq!(response.headers()["x-credits-held"], "2");
/// drop(response); // (dropping or reading the body settles)
///
/// // The balance is spent: the next one is refused before the service is called.
/// let response = service.oneshot(request()).await.unwrap();
/// assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
/// # }
/// ```
#[must_use]
pub struct CreditsLayer<L: Ledger = MemoryLedger> {
    ledger: L,
    pricing: Pricing,
    on_disconnect: OnDisconnect,
    allow_anonymous: bool,
    body_limit: usize,
    limits: Option<Arc<Limits>>,
    replays: ReplayStore,
}

impl<L: Ledger + Clone> CreditsLayer<L> {
    /// Charge requests to `ledger` at `pricing`.
    pub fn new(ledger: L, pricing: Pricing) -> Self {
        CreditsLayer {
            ledger,
            pricing,
            on_disconnect: OnDisconnect::default(),
            allow_anonymous: false,
            body_limit: DEFAULT_BODY_LIMIT,
            limits: None,
            replays: default_replays(),
        }
    }

    /// What an abandoned response is charged (default [`OnDisconnect::ChargeHold`]).
    pub fn on_disconnect(mut self, on_disconnect: OnDisconnect) -> Self {
        self.on_disconnect = on_disconnect;
        self
    }

    /// Let requests without a [`Caller`] through, free and unmetered. By default they are
    /// refused with 401 `missing_api_key`: without an account there is nobody to charge.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }

    /// The largest JSON request body read to estimate the hold (default 1 MiB); larger ones are
    /// refused with 413 `payload_too_large`.
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// The largest answer kept for the retries of an `Idempotency-Key` (default
    /// [`DEFAULT_REPLAY_LIMIT`], 1 MiB). A retry of a request whose answer was larger is refused
    /// with 409 `idempotency_replay_unavailable`, never sent upstream again. See
    /// [the module docs](super#idempotency-key).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::credits::{CreditsLayer, MemoryLedger, Pricing};
    ///
    /// let layer = CreditsLayer::new(MemoryLedger::new(), Pricing::flat(1))
    ///     .replay_limit(256 * 1024)
    ///     .replay_capacity(16 << 20);
    /// # let _ = layer;
    /// ```
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replays = ReplayStore::new(bytes, self.replays.capacity(), DEFAULT_IDEMPOTENCY_WINDOW);
        self
    }

    /// The bytes of answers kept for idempotent retries, all accounts together (default
    /// [`DEFAULT_REPLAY_CAPACITY`], 64 MiB); the oldest go first. See
    /// [`replay_limit`](Self::replay_limit).
    pub fn replay_capacity(mut self, bytes: usize) -> Self {
        self.replays = ReplayStore::new(
            self.replays.requested_limit,
            bytes,
            DEFAULT_IDEMPOTENCY_WINDOW,
        );
        self
    }

    /// Also rate-limit, charging the limits of `layer` in the same step as the hold, both or
    /// neither, in place of a [`RateLimit`](crate::ratelimit::RateLimit) layer in front.
    ///
    /// Everything `layer` was configured with applies (plans changeable at runtime, key by key
    /// or account, global limit, route overrides, headers, `default_max_tokens`; of the two
    /// body limits, the smaller), and the answers are a `RateLimit`'s: 429 with the limit named and
    /// `retry-after`, the rate-limit headers on every response of a limited route, tokens
    /// corrected from the reported usage. The differences are in the order of the two
    /// charges:
    ///
    /// - **Both or neither.** A request refused for its credits (402, 409, 422, 503) does not
    ///   use up its rate limit, and a rate-limited one places no hold. The limits are checked
    ///   first: a caller out of both gets the 429. Only the 429 carries rate-limit headers
    ///   among the refusals.
    /// - Requests without a [`Caller`] let through by [`allow_anonymous`](Self::allow_anonymous)
    ///   are rate-limited alone, as the `RateLimit` layer would (by client IP).
    ///
    /// The two charges are made by [`TwoStep`] on this layer's ledger and `layer`'s limiter
    /// (two calls before the request, and the settlement with the token correction after it).
    /// A backend that keeps both in one place does each in one step: pass its
    /// [`Admission`] to [`rate_limit_with`](Self::rate_limit_with).
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::credits::{CreditsLayer, MemoryLedger, Pricing};
    /// use tollgate::ratelimit::{Plan, Plans, RateLimitLayer};
    ///
    /// let limits = RateLimitLayer::memory(Plans::new(Plan::new().requests_per_minute(60)));
    /// let layer = CreditsLayer::new(MemoryLedger::new(), Pricing::flat(1)).rate_limit(limits);
    /// # let _ = layer;
    /// ```
    pub fn rate_limit<R: Limiter>(self, layer: RateLimitLayer<R>) -> Self {
        let admission = TwoStep::new(self.ledger.clone(), layer.limiter().clone());
        self.rate_limit_with(layer, admission)
    }

    /// [`rate_limit`](Self::rate_limit), with the limits and the hold charged by `admission`:
    /// a backend's fused one ([`RedisBackend::admission`](crate::redis::RedisBackend::admission):
    /// one script, one round trip each way), or a wrapper of one.
    ///
    /// `admission` must charge `layer`'s limiter and hold on this layer's ledger: the ledger
    /// releases the holds it places (an upstream error) and `layer`'s limiter rate-limits the
    /// requests without a [`Caller`].
    ///
    /// # Example
    ///
    /// ```
    /// use tollgate::credits::{CreditsLayer, MemoryLedger, Pricing, TwoStep};
    /// use tollgate::ratelimit::{MemoryLimiter, Plan, Plans, RateLimitLayer};
    ///
    /// let (ledger, limiter) = (MemoryLedger::new(), MemoryLimiter::new());
    /// let limits = RateLimitLayer::new(limiter.clone(), Plans::new(Plan::new().requests_per_minute(60)));
    /// let layer = CreditsLayer::new(ledger.clone(), Pricing::flat(1))
    ///     .rate_limit_with(limits, TwoStep::new(ledger, limiter));
    /// # let _ = layer;
    /// ```
    pub fn rate_limit_with<A: Admission>(
        mut self,
        layer: RateLimitLayer<A::Limiter>,
        admission: A,
    ) -> Self {
        let (limiter, gate) = layer.into_parts();
        self.limits = Some(Arc::new(Limits {
            gate,
            admission: Box::new(Erased { admission, limiter }),
        }));
        self
    }
}

impl<S, L: Ledger + Clone> Layer<S> for CreditsLayer<L> {
    type Service = Credits<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        Credits {
            inner,
            shared: Arc::new(Shared {
                ledger: self.ledger.clone(),
                pricing: self.pricing.clone(),
                on_disconnect: self.on_disconnect,
                allow_anonymous: self.allow_anonymous,
                body_limit: self.body_limit,
                limits: self.limits.clone(),
                replays: self.replays.clone(),
            }),
        }
    }
}

impl<L: Ledger + Clone> Clone for CreditsLayer<L> {
    fn clone(&self) -> Self {
        CreditsLayer {
            ledger: self.ledger.clone(),
            pricing: self.pricing.clone(),
            on_disconnect: self.on_disconnect,
            allow_anonymous: self.allow_anonymous,
            body_limit: self.body_limit,
            limits: self.limits.clone(),
            replays: self.replays.clone(),
        }
    }
}

impl<L: Ledger + fmt::Debug> fmt::Debug for CreditsLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreditsLayer")
            .field("ledger", &self.ledger)
            .field("pricing", &self.pricing)
            .field("on_disconnect", &self.on_disconnect)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("body_limit", &self.body_limit)
            .field("replays", &self.replays)
            .field("rate_limit", &self.limits.as_ref().map(|l| l.gate.plans()))
            .finish()
    }
}

/// The service of [`CreditsLayer`].
pub struct Credits<S, L: Ledger = MemoryLedger> {
    inner: S,
    shared: Arc<Shared<L>>,
}

impl<S: Clone, L: Ledger> Clone for Credits<S, L> {
    fn clone(&self) -> Self {
        Credits {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, L: Ledger + fmt::Debug> fmt::Debug for Credits<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credits")
            .field("inner", &self.inner)
            .field("ledger", &self.shared.ledger)
            .field("pricing", &self.shared.pricing)
            .finish()
    }
}

impl<S, B, ResB, L> Service<Request<B>> for Credits<S, L>
where
    S: Service<Request<InspectedBody<B>>, Response = Response<ResB>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    L: Ledger,
{
    type Response = Response<MeteredBody<ResB, L>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, L>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The ready service is called here when nothing has to be awaited first; otherwise it
        // goes into the future and a clone stays for the next call (`ReadyService::into_owned`).
        let shared = self.shared.clone();
        let grpc = crate::normalize::is_grpc(&request);
        let refused = |rejection: Rejection| ResponseFuture {
            kind: Kind::Refused {
                rejection: Some(rejection),
                grpc,
            },
            shared: shared.clone(),
        };
        let limits = shared
            .limits
            .as_ref()
            .and_then(|limits| limits.gate.limits(&request));
        let caller = request.extensions().get::<Caller>().cloned();
        if caller.is_none() && !shared.allow_anonymous {
            return refused(Rejection::new(Reason::MissingApiKey));
        }
        if caller.is_none() && limits.is_none() {
            return ResponseFuture {
                kind: Kind::Passthrough {
                    future: self.inner.call(request.map(InspectedBody::new)),
                    replayed: false,
                    decision: None,
                },
                shared,
            };
        }
        // Metered: the usage must be readable, so the answer is asked for uncompressed (the
        // client still gets a valid body; gzip and deflate are decoded for scanning anyway).
        request.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let idempotency_key = match caller.as_ref().map(|_| idempotency_key(&request)) {
            Some(Err(rejection)) => return refused(rejection),
            Some(Ok(key)) => key,
            None => None,
        };
        let priced = caller.is_some() && shared.pricing.reads_body();
        if priced
            && has_unreadable_body(&request)
            && !shared.pricing.prices_route(request.uri().path())
        {
            // Its model and size cannot be read, so it cannot be priced: refuse rather than
            // charge the default price for what may be an expensive model.
            return refused(Rejection::new(Reason::UnsupportedMediaType));
        }
        let tokens = limits.as_ref().is_some_and(RequestLimits::needs_body);
        let pending = Pending {
            caller,
            idempotency_key,
            grpc,
            limits,
        };
        // A request with an `Idempotency-Key` is read too: its whole body is fingerprinted.
        let keyed = pending.idempotency_key.is_some();
        if (priced || tokens || keyed) && wants_inspection(&request) {
            // Both bounds apply: the rate limit's (when it reads the body) and ours.
            let limit = match (&shared.limits, tokens) {
                (Some(limits), true) if priced => shared.body_limit.min(limits.gate.body_limit()),
                (Some(limits), true) => limits.gate.body_limit(),
                _ => shared.body_limit,
            };
            return ResponseFuture {
                kind: Kind::Inspecting {
                    future: Box::pin(inspect(request, limit)),
                    service: Some(ReadyService::Borrowed(&mut self.inner, take::<S>).into_owned()),
                    pending: Some(pending),
                },
                shared,
            };
        }
        let service = ReadyService::Borrowed(&mut self.inner, take::<S>);
        let kind = admit(&shared, request.map(InspectedBody::new), service, pending);
        ResponseFuture { kind, shared }
    }
}

/// The ready inner service as [`admit`] and [`call`] get it: the service's own (borrowed, in
/// `Credits::call`: called in place when nothing is awaited first) or one the future owns.
enum ReadyService<'a, S> {
    /// The service's own, and how to take it out (leaving a clone).
    Borrowed(&'a mut S, fn(&mut S) -> S),
    /// Taken already.
    Owned(S),
}

/// The ready service, a clone left in its place until the next `poll_ready`.
fn take<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}

impl<S> ReadyService<'_, S> {
    /// The service, to keep in the future while something is awaited.
    fn into_owned(self) -> S {
        match self {
            ReadyService::Borrowed(service, take) => take(service),
            ReadyService::Owned(service) => service,
        }
    }

    /// Call it.
    fn call<R>(self, request: R) -> S::Future
    where
        S: Service<R>,
    {
        match self {
            ReadyService::Borrowed(service, _) => service.call(request),
            ReadyService::Owned(mut service) => service.call(request),
        }
    }
}

/// What a hold or a rate-limit check being awaited keeps for after it (boxed: cold with the
/// in-memory ledger, which answers at once, and it keeps the future small).
struct Waiting<S, B> {
    request: Request<InspectedBody<B>>,
    service: S,
    plan: Option<Plan>,
    tokens: Option<Charges>,
    grpc: bool,
}

/// What is known about a request before its hold.
struct Pending {
    /// `None`: an anonymous request let through, only rate-limited.
    caller: Option<Caller>,
    idempotency_key: Option<Arc<str>>,
    grpc: bool,
    /// The rate limits to charge with the hold ([`CreditsLayer::rate_limit`]).
    limits: Option<RequestLimits>,
}

/// What settlement needs to know about a request.
#[derive(Clone)]
struct Plan {
    price: Price,
    prompt_estimate: u64,
    grpc: bool,
    /// The account and `Idempotency-Key` whose answer is kept for its retries.
    replay: Option<(Arc<str>, Arc<str>)>,
    /// The request's `max_tokens`.
    max_tokens: Option<u64>,
}

fn default_replays() -> ReplayStore {
    ReplayStore::new(
        DEFAULT_REPLAY_LIMIT,
        DEFAULT_REPLAY_CAPACITY,
        DEFAULT_IDEMPOTENCY_WINDOW,
    )
}

fn idempotency_key<B>(request: &Request<B>) -> Result<Option<Arc<str>>, Rejection> {
    let mut values = request.headers().get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let valid = values.next().is_none()
        && (1..=255).contains(&value.len())
        && value.as_bytes().iter().all(u8::is_ascii_graphic);
    if !valid {
        return Err(Rejection::new(Reason::BadRequest).with_message(
            "The Idempotency-Key header must be one value of 1 to 255 printable ASCII characters without spaces.",
        ));
    }
    // Checked above: printable ASCII.
    Ok(value.to_str().ok().map(Arc::from))
}

fn admit<S, B, L>(
    shared: &Arc<Shared<L>>,
    request: Request<InspectedBody<B>>,
    service: ReadyService<'_, S>,
    pending: Pending,
) -> Kind<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Ledger,
{
    let llm = request.extensions().get::<LlmRequest>();
    let limited = shared.limits.as_ref().zip(pending.limits.as_ref());
    let (charges, tokens) = match limited {
        Some((limits, request_limits)) => {
            let charges = limits.gate.charges(request_limits, &request);
            let tokens = charges.tokens();
            (Some((limits, charges)), tokens)
        }
        None => (None, None),
    };
    let Some(caller) = pending.caller else {
        // Anonymous, let through uncharged: the rate limits alone (`call` checked there are
        // some).
        let Some((limits, charges)) = charges else {
            unreachable!("an anonymous request reaches `admit` only when it is rate-limited")
        };
        return Kind::Checking {
            future: limits.admission.check(charges.as_slice()),
            waiting: Some(Box::new(Waiting {
                request,
                service: service.into_owned(),
                plan: None,
                tokens,
                grpc: pending.grpc,
            })),
        };
    };
    let model = llm.and_then(|l| l.model.as_deref());
    let price = shared.pricing.price_for(request.uri().path(), model);
    let amount = shared.pricing.hold_for(&price, llm);
    let replay = pending
        .idempotency_key
        .as_ref()
        .map(|key| (caller.account_id_arc().clone(), key.clone()));
    let idempotency = pending.idempotency_key.map(|key| {
        let target = request
            .uri()
            .path_and_query()
            .map_or(request.uri().path(), |pq| pq.as_str());
        // The whole request: method, target and every byte of the body that was read. A body
        // that is not JSON is not read: its type and declared length stand for it.
        let header = |name| {
            request
                .headers()
                .get(name)
                .map_or(&b""[..], |v: &HeaderValue| v.as_bytes())
        };
        // The bytes `inspect` read (here, or in a layer before this one).
        let read = request
            .extensions()
            .get::<crate::inspect::InspectedBytes>()
            .map(|b| &b.0)
            .or(request.body().buffered_bytes());
        let fingerprint = match read {
            Some(body) => Fingerprint::of(&[
                request.method().as_str().as_bytes(),
                target.as_bytes(),
                b"body",
                body,
            ]),
            None if request.extensions().get::<LlmRequest>().is_some() => Fingerprint::of(&[
                request.method().as_str().as_bytes(),
                target.as_bytes(),
                b"body",
                b"",
            ]),
            None => Fingerprint::of(&[
                request.method().as_str().as_bytes(),
                target.as_bytes(),
                b"unread",
                header(header::CONTENT_TYPE),
                header(header::CONTENT_LENGTH),
            ]),
        };
        (key, fingerprint)
    });
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(Arc::from);
    let plan = Plan {
        price,
        prompt_estimate: llm.map_or(0, LlmRequest::estimated_prompt_tokens),
        grpc: pending.grpc,
        replay,
        // Every completion (`n`, `best_of`) may use max_tokens.
        max_tokens: llm.and_then(|l| l.max_tokens.map(|m| m.saturating_mul(l.choices.max(1)))),
    };
    let reserve = ReserveRequest::new(caller.account_id_arc().clone(), amount)
        .request_id(request_id)
        .key_id(Some(caller.key_id_arc().clone()))
        .idempotency(idempotency);
    let grpc = plan.grpc;
    match charges {
        Some((limits, charges)) => Kind::Admitting {
            future: limits.admission.admit(charges.into_vec(), reserve),
            waiting: Some(Box::new(Waiting {
                request,
                service: service.into_owned(),
                plan: Some(plan),
                tokens,
                grpc,
            })),
        },
        None => match shared.ledger.reserve_now(reserve) {
            // Placed (or refused) at once: the ready service is called now.
            Ok(Ok(reservation)) => call(shared, service, request, reservation, plan, None, None),
            Ok(Err(error)) => Kind::Refused {
                rejection: Some(error.into()),
                grpc,
            },
            Err(reserve) => Kind::Reserving {
                future: shared.ledger.reserve(reserve),
                waiting: Some(Box::new(Waiting {
                    request,
                    service: service.into_owned(),
                    plan: Some(plan),
                    tokens: None,
                    grpc,
                })),
            },
        },
    }
}

type InspectFuture<B> =
    Pin<Box<dyn Future<Output = Result<Request<InspectedBody<B>>, Rejection>> + Send + 'static>>;

pin_project! {
    /// The response future of [`Credits`].
    pub struct ResponseFuture<S, B, L = MemoryLedger>
    where
        S: Service<Request<InspectedBody<B>>>,
        L: Ledger,
    {
        #[pin]
        kind: Kind<S, B, L>,
        shared: Arc<Shared<L>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B, L>
    where
        S: Service<Request<InspectedBody<B>>>,
        L: Ledger,
    {
        Refused {
            rejection: Option<Rejection>,
            grpc: bool,
        },
        // The kept first answer of an idempotent request.
        Replay {
            answer: Option<Arc<Answer>>,
            decision: Option<Decision>,
        },
        Passthrough {
            #[pin]
            future: S::Future,
            replayed: bool,
            // The rate limits charged (for the headers) and the tokens to correct.
            decision: Option<(Decision, Option<TokenMeter>)>,
        },
        Inspecting {
            future: InspectFuture<B>,
            service: Option<S>,
            pending: Option<Pending>,
        },
        // An anonymous request: the rate limits alone.
        Checking {
            future: CheckFuture,
            waiting: Option<Box<Waiting<S, B>>>,
        },
        Reserving {
            #[pin]
            future: L::ReserveFuture,
            waiting: Option<Box<Waiting<S, B>>>,
        },
        // The rate limits and the hold in one step.
        Admitting {
            future: AdmitFuture,
            waiting: Option<Box<Waiting<S, B>>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            // Dropped with the future before a response: closed per `OnDisconnect`.
            meter: Option<Box<Meter<L>>>,
            // The rate limits charged, for the headers.
            decision: Option<Decision>,
        },
    }
}

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

impl<S, B, ResB, L> Future for ResponseFuture<S, B, L>
where
    S: Service<Request<InspectedBody<B>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    L: Ledger,
{
    type Output = Result<Response<MeteredBody<ResB, L>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.kind.as_mut().project() {
                KindProj::Refused { rejection, grpc } => {
                    let rejection = rejection.take().expect(POLLED_AFTER_COMPLETION);
                    return Poll::Ready(Ok(render(&rejection, *grpc)));
                }
                KindProj::Replay { answer, decision } => {
                    let answer = answer.take().expect(POLLED_AFTER_COMPLETION);
                    let mut response = Response::new(MeteredBody::new(
                        ResponseBody::full(answer.body.clone()),
                        None,
                    ));
                    *response.status_mut() = answer.status;
                    *response.headers_mut() = answer.headers.clone();
                    response
                        .headers_mut()
                        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                    limit_headers(this.shared, response.headers_mut(), decision.as_ref());
                    return Poll::Ready(Ok(response));
                }
                KindProj::Passthrough {
                    future,
                    replayed,
                    decision,
                } => {
                    let mut response = ready!(future.poll(cx))?;
                    if *replayed {
                        response
                            .headers_mut()
                            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                    }
                    let (decision, tokens) = decision.take().unzip();
                    limit_headers(this.shared, response.headers_mut(), decision.as_ref());
                    return Poll::Ready(Ok(response.map(|b| {
                        MeteredBody::new(ResponseBody::new(b), None).with_tokens(tokens.flatten())
                    })));
                }
                KindProj::Inspecting {
                    future,
                    service,
                    pending,
                } => {
                    let inspected = ready!(future.as_mut().poll(cx));
                    let pending = pending.take().expect(POLLED_AFTER_COMPLETION);
                    match inspected {
                        Ok(request) => admit(
                            this.shared,
                            request,
                            ReadyService::Owned(service.take().expect(POLLED_AFTER_COMPLETION)),
                            pending,
                        ),
                        Err(rejection) => Kind::Refused {
                            rejection: Some(rejection),
                            grpc: pending.grpc,
                        },
                    }
                }
                KindProj::Checking { future, waiting } => {
                    let checked = ready!(future.as_mut().poll(cx));
                    let Waiting {
                        request,
                        mut service,
                        tokens,
                        grpc,
                        ..
                    } = *waiting.take().expect(POLLED_AFTER_COMPLETION);
                    let grpc = &grpc;
                    match checked {
                        Ok(decision) if decision.is_allowed() => {
                            let limits = this.shared.limits.as_ref();
                            let meter = tokens
                                .zip(limits)
                                .and_then(|(tokens, limits)| limits.admission.meter(&tokens));
                            Kind::Passthrough {
                                future: service.call(request),
                                replayed: false,
                                decision: Some((decision, meter)),
                            }
                        }
                        Ok(decision) => {
                            return Poll::Ready(Ok(limited(this.shared, &decision, *grpc)))
                        }
                        Err(error) => Kind::Refused {
                            rejection: Some(error.into()),
                            grpc: *grpc,
                        },
                    }
                }
                KindProj::Reserving { future, waiting } => {
                    let reserved = ready!(future.poll(cx));
                    let Waiting {
                        request,
                        service,
                        plan,
                        ..
                    } = *waiting.take().expect(POLLED_AFTER_COMPLETION);
                    let plan = plan.expect("a hold has a plan");
                    match reserved {
                        Ok(reservation) => call(
                            this.shared,
                            ReadyService::Owned(service),
                            request,
                            reservation,
                            plan,
                            None,
                            None,
                        ),
                        Err(error) => Kind::Refused {
                            rejection: Some(error.into()),
                            grpc: plan.grpc,
                        },
                    }
                }
                KindProj::Admitting { future, waiting } => {
                    let admitted = ready!(future.as_mut().poll(cx));
                    let Waiting {
                        request,
                        service,
                        plan,
                        tokens,
                        ..
                    } = *waiting.take().expect(POLLED_AFTER_COMPLETION);
                    let plan = plan.expect("a hold has a plan");
                    match admitted {
                        Verdict::Admitted {
                            decision,
                            reservation,
                        } => call(
                            this.shared,
                            ReadyService::Owned(service),
                            request,
                            reservation,
                            plan,
                            Some(decision),
                            tokens,
                        ),
                        Verdict::Limited(decision) => {
                            return Poll::Ready(Ok(limited(this.shared, &decision, plan.grpc)))
                        }
                        Verdict::Refused(error) => Kind::Refused {
                            rejection: Some(error.into()),
                            grpc: plan.grpc,
                        },
                    }
                }
                KindProj::Calling {
                    future,
                    meter,
                    decision,
                } => {
                    let result = ready!(future.poll(cx));
                    let mut meter = meter.take().expect(POLLED_AFTER_COMPLETION);
                    let mut response = match result {
                        Ok(response) => response,
                        Err(error) => {
                            meter.release();
                            return Poll::Ready(Err(error));
                        }
                    };
                    limit_headers(this.shared, response.headers_mut(), decision.as_ref());
                    // An upstream error (or a refusal further in) is not charged; nor is a gRPC
                    // error, which travels as HTTP 200 with a `grpc-status` header.
                    if response.status().as_u16() >= 400
                        || super::body::grpc_failed(response.headers())
                    {
                        meter.release();
                        return Poll::Ready(Ok(
                            response.map(|b| MeteredBody::new(ResponseBody::new(b), None))
                        ));
                    }
                    let (mut parts, body) = response.into_parts();
                    if let Some(hold) = meter.hold() {
                        let [held, balance] = credit_values(hold.amount(), hold.available_after());
                        parts.headers.insert(CREDITS_HELD, held);
                        parts.headers.insert(CREDITS_BALANCE, balance);
                    }
                    meter.response_head(parts.status, &parts.headers);
                    meter.set_sse(parts.headers.get(header::CONTENT_TYPE).is_some_and(|ct| {
                        ct.as_bytes()
                            .get(..17)
                            .is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"))
                    }));
                    let body =
                        MeteredBody::new(ResponseBody::new(body), Some(meter)).settle_if_ended();
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
            };
            this.kind.set(next);
        }
    }
}

/// Call the inner service once the hold is placed (or the request is a replay).
fn call<S, B, L>(
    shared: &Arc<Shared<L>>,
    service: ReadyService<'_, S>,
    request: Request<InspectedBody<B>>,
    reservation: Reservation,
    plan: Plan,
    decision: Option<Decision>,
    tokens: Option<Charges>,
) -> Kind<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Ledger,
{
    match reservation {
        Reservation::Held(hold) => {
            let meter = Meter::new(shared.clone(), hold, plan.price, plan.prompt_estimate)
                .with_tokens(tokens)
                .with_max_tokens(plan.max_tokens)
                .with_replay(plan.replay);
            Kind::Calling {
                future: service.call(request),
                meter: Some(Box::new(meter)),
                decision,
            }
        }
        // Already charged: the first answer again, never a new call upstream.
        Reservation::Replayed => {
            let stored = plan
                .replay
                .as_ref()
                .and_then(|(account, key)| shared.replays.get(account, key));
            match stored {
                Some(Stored::Answer(answer)) => Kind::Replay {
                    answer: Some(answer),
                    decision,
                },
                unavailable => {
                    let why = match unavailable {
                        Some(Stored::Unavailable(why)) => why,
                        _ => "is not kept by this server (it was evicted, the server restarted, or another replica answered it)",
                    };
                    Kind::Refused {
                        rejection: Some(
                            Rejection::new(Reason::IdempotencyReplayUnavailable)
                                // The same request can never be replayed: a new key is needed.
                                .with_should_retry(false)
                                .with_message(
                                format!(
                                    "The request with this Idempotency-Key was already processed and charged, but its response {why}, so it cannot be replayed. A new request needs a new Idempotency-Key and is charged again."
                                ),
                            ),
                        ),
                        grpc: plan.grpc,
                    }
                }
            }
        }
    }
}

/// The values of `x-credits-held` and `x-credits-balance`, two slices of one buffer (one
/// allocation for both).
fn credit_values(held: u64, balance: u64) -> [HeaderValue; 2] {
    let mut buf = [0u8; 40];
    let mut at = 0;
    let mut ranges = [(0, 0); 2];
    for (range, mut n) in ranges.iter_mut().zip([held, balance]) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - i;
        buf[at..at + len].copy_from_slice(&digits[i..]);
        *range = (at, at + len);
        at += len;
    }
    let shared = Bytes::from_owner(buf);
    ranges.map(|(start, end)| {
        HeaderValue::from_maybe_shared(shared.slice(start..end)).expect("digits")
    })
}

/// The rate-limit headers of a response, unless they are turned off.
fn limit_headers<L: Ledger>(
    shared: &Shared<L>,
    headers: &mut http::HeaderMap,
    decision: Option<&Decision>,
) {
    if let (Some(decision), Some(limits)) = (decision, &shared.limits) {
        limits.gate.headers(headers, decision);
    }
}

/// The 429 of a refused rate limit, with its headers.
fn limited<B, L: Ledger>(
    shared: &Shared<L>,
    decision: &Decision,
    grpc: bool,
) -> Response<MeteredBody<B, L>> {
    match &shared.limits {
        Some(limits) => limits
            .gate
            .refusal(decision, grpc)
            .map(|bytes| MeteredBody::new(ResponseBody::full(bytes), None)),
        None => render(&Rejection::new(Reason::Internal), grpc),
    }
}

fn render<B, L: Ledger>(rejection: &Rejection, grpc: bool) -> Response<MeteredBody<B, L>> {
    crate::refusal(rejection, grpc).map(|bytes| MeteredBody::new(ResponseBody::full(bytes), None))
}

impl<S, B, L> fmt::Debug for ResponseFuture<S, B, L>
where
    S: Service<Request<InspectedBody<B>>>,
    L: Ledger,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}
