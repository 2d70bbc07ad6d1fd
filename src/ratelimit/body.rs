use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{gate::Charges, Limiter};
use crate::{
    body::ResponseBody,
    usage::{Usage, UsageScanner},
};

pin_project! {
    /// The response body of [`RateLimit`](super::RateLimit): the inner body, streamed through
    /// untouched, or a refusal.
    ///
    /// On a tokens-limited request it also watches the stream for the `usage` object (JSON or
    /// SSE, without buffering) and, when the body ends or is dropped, settles the tokens limits
    /// with the difference between the reported `total_tokens` and the estimate charged before
    /// the call. Without a reported usage the estimate stands.
    pub struct RateLimitBody<B> {
        #[pin]
        inner: ResponseBody<B>,
        meter: Option<Meter>,
    }
}

impl<B> RateLimitBody<B> {
    pub(crate) fn new(body: B, meter: Option<Meter>) -> Self {
        RateLimitBody {
            inner: ResponseBody::new(body),
            meter,
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        RateLimitBody {
            inner: ResponseBody::full(data),
            meter: None,
        }
    }
}

type Settle = Box<dyn FnOnce(Option<Usage>) + Send + Sync>;

/// Watches a response for its usage and settles the tokens limits once.
pub(crate) struct Meter {
    // Boxed: the scanner is large, and a meter is moved with its response body through every
    // layer on the way out (most responses have none: `Option<Meter>` stays small).
    scanner: Box<UsageScanner>,
    settle: Option<Settle>,
}

impl Meter {
    /// Correct the tokens `charges` on `limiter` from the usage the response reports.
    pub(super) fn new<L: Limiter>(limiter: L, charges: Charges) -> Meter {
        let settle = move |usage: Option<Usage>| {
            let Some(usage) = usage else { return };
            let corrections = charges.corrections(&usage);
            if !corrections.is_empty() {
                drive_settlement(limiter.settle(&corrections));
            }
        };
        Meter {
            scanner: Box::new(UsageScanner::new()),
            settle: Some(Box::new(settle)),
        }
    }

    /// Watch one frame of the response: its data for the usage, its end to settle.
    pub(crate) fn observe<E>(&mut self, frame: &Option<Result<Frame<Bytes>, E>>) {
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.scanner.feed(data);
                }
            }
            None => self.finish(),
            Some(Err(_)) => {}
        }
    }

    fn finish(&mut self) {
        if let Some(settle) = self.settle.take() {
            settle(self.scanner.usage());
        }
    }
}

/// Poll a settlement once; spawn the rest on the current runtime if it is not done.
fn drive_settlement<F>(mut fut: F)
where
    F: Future<Output = Result<(), crate::BackendError>> + Send + Unpin + 'static,
{
    let report = |result: Result<(), crate::BackendError>| {
        if let Err(error) = result {
            tracing::warn!(%error, "rate-limit settlement failed");
        }
    };
    match Pin::new(&mut fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => report(result),
        Poll::Pending => match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { report(fut.await) });
            }
            Err(_) => tracing::warn!("rate-limit settlement dropped: no Tokio runtime"),
        },
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("usage", &self.scanner.usage())
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl<B> Body for RateLimitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(meter) = this.meter {
            meter.observe(&frame);
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for RateLimitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBody")
            .field("inner", &self.inner)
            .field("meter", &self.meter)
            .finish()
    }
}
