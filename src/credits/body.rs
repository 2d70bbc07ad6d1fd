//! The metering response body: settles the hold when the body ends or is dropped.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll, Waker},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{
    ledger::{Hold, Ledger, Settlement},
    pricing::Price,
    replay::Capture,
    service::Shared,
    MemoryLedger, OnDisconnect,
};
use crate::{
    body::ResponseBody,
    ratelimit::{Charges, TokenMeter},
    usage::{CodedScanner, Usage},
    BackendError,
};

/// What is needed to close one hold, exactly once: on the body's end, on an upstream failure, or
/// (by `Drop`) when the response or its body is abandoned.
pub(super) struct Meter<L: Ledger> {
    shared: Arc<Shared<L>>,
    hold: Option<Hold>,
    price: Price,
    prompt_estimate: u64,
    scanner: CodedScanner,
    sse: bool,
    events: EventCounter,
    /// The tokens charged to rate limits before the call, corrected from the reported usage
    /// when the hold is settled ([`CreditsLayer::rate_limit`](super::CreditsLayer::rate_limit)).
    tokens: Option<Charges>,
    /// The account and `Idempotency-Key` whose answer is kept, until the answer's head is known.
    replay_key: Option<(Arc<str>, Arc<str>)>,
    /// The answer being kept for the retries of its `Idempotency-Key`.
    replay: Option<Capture>,
    /// The request's `max_tokens`: a reported completion above it is clamped.
    max_tokens: Option<u64>,
    /// Half the hold's TTL, and when (on the ledger's clock) the hold is next extended while
    /// frames flow; `None`: the hold never expires.
    keep_alive: Option<(Duration, SystemTime)>,
}

impl<L: Ledger> Meter<L> {
    pub(super) fn new(
        shared: Arc<Shared<L>>,
        hold: Hold,
        price: Price,
        prompt_estimate: u64,
    ) -> Self {
        let keep_alive = hold.ttl().map(|ttl| {
            let every = ttl / 2;
            (every, shared.ledger.now() + every)
        });
        Meter {
            keep_alive,
            shared,
            hold: Some(hold),
            price,
            prompt_estimate,
            scanner: CodedScanner::new(None),
            sse: false,
            events: EventCounter::default(),
            tokens: None,
            replay_key: None,
            replay: None,
            max_tokens: None,
        }
    }

    /// Correct these tokens limits from the reported usage when settling.
    pub(super) fn with_tokens(mut self, tokens: Option<Charges>) -> Self {
        self.tokens = tokens;
        self
    }

    /// The request's `max_tokens`, bounding the completion it can be charged.
    pub(super) fn with_max_tokens(mut self, max_tokens: Option<u64>) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// The usage the upstream reported, bounded by what the request could have produced.
    fn usage(&self, hold: &Hold) -> Option<Usage> {
        let reported = self.scanner.usage()?;
        let (usage, clamped) = self.price.clamp_usage(reported, self.max_tokens);
        if clamped {
            tracing::warn!(
                request_id = hold.request_id().unwrap_or("-"),
                reported_prompt = reported.prompt_tokens,
                reported_completion = reported.completion_tokens,
                reported_total = reported.total_tokens,
                charged_total = usage.total_tokens,
                "usage above what the request could produce: clamped"
            );
        }
        Some(usage)
    }

    /// Keep the answer for the retries of this account's `Idempotency-Key`.
    pub(super) fn with_replay(mut self, replay: Option<(Arc<str>, Arc<str>)>) -> Self {
        self.replay_key = replay;
        self
    }

    /// The answer's head arrived (a success): read its usage through its content coding, and
    /// start keeping it when it has an `Idempotency-Key`.
    pub(super) fn response_head(&mut self, status: http::StatusCode, headers: &http::HeaderMap) {
        let encoding = headers.get(http::header::CONTENT_ENCODING);
        self.scanner = CodedScanner::new(encoding.map(http::HeaderValue::as_bytes));
        if let Some((account, key)) = self.replay_key.take() {
            let store = self.shared.replays.clone();
            self.replay = Some(Capture::new(store, account, key, status, headers));
        }
    }

    /// Settle `hold` at `charge`, with the tokens limits corrected from `usage` in the same
    /// step when there are any.
    fn settle(&mut self, hold: &Hold, charge: u64, usage: Option<Usage>) {
        let tokens = self.tokens.take();
        let limited = self.shared.limits.as_ref().zip(tokens).zip(usage);
        match limited {
            Some(((limits, tokens), usage)) => {
                let corrections = tokens.corrections(&usage);
                let future = limits.admission.settle(hold, charge, &corrections);
                drive(future, hold, "settle");
            }
            None => drive(self.shared.ledger.settle(hold, charge), hold, "settle"),
        }
    }

    pub(super) fn hold(&self) -> Option<&Hold> {
        self.hold.as_ref()
    }

    pub(super) fn set_sse(&mut self, sse: bool) {
        self.sse = sse;
    }

    /// Frames are flowing: keep the hold alive (its TTL is idle time), at most once per half
    /// TTL. A clock read and a comparison per frame; the extension itself runs off the frame's
    /// path (polled once, then on its own task for a remote ledger).
    fn keep_alive(&mut self) {
        let (Some((every, at)), Some(hold)) = (self.keep_alive.as_mut(), self.hold.as_ref()) else {
            return;
        };
        let now = self.shared.ledger.now();
        if now < *at {
            return;
        }
        *at = now + *every;
        extend(self.shared.ledger.extend(hold), hold.id());
    }

    fn feed(&mut self, chunk: &[u8]) {
        if let Some(replay) = &mut self.replay {
            replay.feed(chunk);
        }
        self.scanner.feed(chunk);
        if self.sse {
            self.events.feed(chunk);
        }
    }

    /// The body ended: charge the usage it reported, or the hold when it reported none.
    fn finish(&mut self) {
        let Some(hold) = self.hold.take() else { return };
        // Kept before the hold closes: a retry that sees the charge finds the answer.
        if let Some(replay) = self.replay.take() {
            replay.finish();
        }
        let usage = self.usage(&hold);
        let charge = match &usage {
            Some(usage) => self.price.cost(usage),
            None => hold.amount(),
        };
        self.settle(&hold, charge, usage);
    }

    /// The upstream failed: charge nothing.
    pub(super) fn release(&mut self) {
        self.replay = None;
        let Some(hold) = self.hold.take() else { return };
        drive(self.shared.ledger.release(&hold), &hold, "release");
    }

    /// The response was abandoned (client gone, body error): charge per [`OnDisconnect`].
    fn abandon(&mut self) {
        let Some(hold) = self.hold.take() else { return };
        if let Some(replay) = self.replay.take() {
            replay.abandon();
        }
        let usage = self.usage(&hold);
        let charge = match (self.shared.on_disconnect, &usage) {
            // The upstream already reported what the call used (OpenAI sends the usage event
            // last, after the whole answer): that is evidence, whatever the policy.
            (_, Some(usage)) => self.price.cost(usage),
            (OnDisconnect::ChargeHold, None) => hold.amount(),
            (OnDisconnect::UsageSoFar, None) => {
                let estimate = self
                    .price
                    .tokens_cost(self.prompt_estimate, self.events.count);
                match hold.amount() {
                    0 => 0,
                    held => estimate.clamp(1, held),
                }
            }
        };
        self.settle(&hold, charge, usage);
    }
}

impl<L: Ledger> Drop for Meter<L> {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Run a settlement to completion: poll it once in place (an in-memory ledger is done then),
/// else move it onto the current tokio runtime. Without a runtime the hold is left to expire,
/// which charges it at its held amount.
fn drive<F>(mut future: F, hold: &Hold, what: &'static str)
where
    F: Future<Output = Result<Settlement, BackendError>> + Send + Unpin + 'static,
{
    let mut cx = Context::from_waker(Waker::noop());
    let log = move |result: Result<Settlement, BackendError>| {
        if let Err(error) = result {
            tracing::warn!(%error, what, "credit hold not closed; it will expire");
        }
    };
    match Pin::new(&mut future).poll(&mut cx) {
        Poll::Ready(result) => log(result),
        Poll::Pending => match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let running = Running::start();
                handle.spawn(async move {
                    log(future.await);
                    drop(running);
                });
            }
            Err(_) => tracing::warn!(
                hold = hold.id(),
                what,
                "no tokio runtime to close a credit hold; it will expire"
            ),
        },
    }
}

/// Extend a hold without waiting: poll the extension once in place (an in-memory ledger is done
/// then), else let it finish on the current tokio runtime. A failed extension is logged; the
/// next frames try again.
fn extend<F>(mut future: F, hold: u64)
where
    F: Future<Output = Result<bool, BackendError>> + Send + Unpin + 'static,
{
    let log = move |result: Result<bool, BackendError>| {
        if let Err(error) = result {
            tracing::warn!(%error, hold, "credit hold not extended");
        }
    };
    match Pin::new(&mut future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => log(result),
        Poll::Pending => {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { log(future.await) });
            }
        }
    }
}

/// Settlements running in the background (a remote ledger's settle, release or expiry of a hold
/// whose body ended or was dropped).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// One background settlement, counted while it runs.
struct Running;

impl Running {
    fn start() -> Running {
        RUNNING.fetch_add(1, Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many settlements are still running in the background in this process.
///
/// A response body that ends (or is dropped) closes its hold at once with an in-memory ledger;
/// with a remote one (Redis, a database) the settlement is a call that runs on its own task.
pub fn pending_settlements() -> usize {
    RUNNING.load(Ordering::SeqCst)
}

/// Wait until every background settlement of this process has finished, at most `timeout`;
/// returns how many are still running (0: all done). Call it at graceful shutdown, after the
/// server stopped accepting and in-flight requests finished, so that no hold is left to expire
/// at its held amount (which would overcharge a stream that was settled as it ended).
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
///
/// // ... the server stopped ...
/// let left = tollgate::credits::finish_settlements(Duration::from_secs(10)).await;
/// assert_eq!(left, 0);
/// # }
/// ```
pub async fn finish_settlements(timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = pending_settlements();
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts SSE `data:` fields across chunk boundaries: the completion-token estimate of a stream
/// cut short (OpenAI-style streams send about one token per event).
#[derive(Default)]
struct EventCounter {
    matched: usize,
    count: u64,
}

impl EventCounter {
    const FIELD: &'static [u8] = b"data:";

    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == Self::FIELD[self.matched] {
                self.matched += 1;
                if self.matched == Self::FIELD.len() {
                    self.count += 1;
                    self.matched = 0;
                }
            } else {
                self.matched = usize::from(b == Self::FIELD[0]);
            }
        }
    }
}

pin_project! {
    /// The response body of [`Credits`](super::Credits): the inner body, streamed through
    /// untouched, while the `usage` object is looked for; the hold is settled when the body
    /// ends, or per [`OnDisconnect`] when it is dropped before its end.
    pub struct MeteredBody<B, L: Ledger = MemoryLedger> {
        #[pin]
        inner: ResponseBody<B>,
        // Boxed: the meter is large (the usage scanner, the replay capture) and the body is
        // moved through every layer on the way out.
        meter: Option<Box<Meter<L>>>,
        // Rate-limit tokens to correct without a hold (a replay, an anonymous request).
        tokens: Option<TokenMeter>,
    }
}

impl<B, L: Ledger> MeteredBody<B, L> {
    pub(super) fn new(inner: ResponseBody<B>, meter: Option<Box<Meter<L>>>) -> Self {
        MeteredBody {
            inner,
            meter,
            tokens: None,
        }
    }

    pub(super) fn with_tokens(mut self, tokens: Option<TokenMeter>) -> Self {
        self.tokens = tokens;
        self
    }
}

impl<B, L: Ledger> MeteredBody<B, L>
where
    B: Body<Data = Bytes>,
{
    /// Settle now if the body is already known to be complete.
    pub(super) fn settle_if_ended(mut self) -> Self {
        if self.inner.is_end_stream() {
            if let Some(mut meter) = self.meter.take() {
                meter.finish();
            }
        }
        self
    }
}

impl<B, L> Body for MeteredBody<B, L>
where
    B: Body<Data = Bytes>,
    L: Ledger,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(tokens) = this.tokens.as_mut() {
            tokens.observe(&frame);
        }
        match &frame {
            Some(Ok(frame)) => {
                // A gRPC call that failed reports it in the trailers: not charged.
                if frame.trailers_ref().is_some_and(grpc_failed) {
                    if let Some(mut meter) = this.meter.take() {
                        meter.release();
                    }
                }
                if let Some(meter) = this.meter.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        meter.feed(data);
                        meter.keep_alive();
                    }
                    // A server may stop polling once the body says it has ended.
                    if this.inner.is_end_stream() {
                        meter.finish();
                    }
                }
            }
            // An upstream failure mid-stream: the client got part of the answer.
            Some(Err(_)) => drop(this.meter.take()),
            None => {
                if let Some(mut meter) = this.meter.take() {
                    meter.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether headers or trailers carry a gRPC status other than OK.
pub(super) fn grpc_failed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() != b"0")
}

impl<B, L: Ledger> fmt::Debug for MeteredBody<B, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredBody")
            .field("inner", &self.inner)
            .field(
                "hold",
                &self.meter.as_ref().and_then(|m| m.hold()).map(Hold::id),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::EventCounter;

    #[test]
    fn events_are_counted_across_chunks() {
        let mut counter = EventCounter::default();
        for chunk in [&b"data: {}\n\nda"[..], b"ta: {}\n\nddata: [DONE]\n\n"] {
            counter.feed(chunk);
        }
        assert_eq!(counter.count, 3);
    }
}
