//! The first answers of idempotent requests, kept to be returned to their retries.
//!
//! A retry with the `Idempotency-Key` of a request that was already charged is never sent to the
//! inner service again: it gets the stored answer of the first request (status, content headers
//! and the whole body, JSON or SSE), marked `idempotent-replayed: true`, at no charge. An answer
//! larger than [`CreditsLayer::replay_limit`](super::CreditsLayer::replay_limit), or one cut
//! short before its end, is not kept: its retries are refused with 409
//! `idempotency_replay_unavailable` (the first request was charged; a new request needs a new
//! key). The store is bounded in bytes ([`CreditsLayer::replay_capacity`](super::CreditsLayer::replay_capacity));
//! the oldest answers go first, and their retries are refused the same way.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, StatusCode};

/// The largest answer kept for replay by default: 1 MiB.
pub const DEFAULT_REPLAY_LIMIT: usize = 1 << 20;
/// The bytes of answers kept for replay by default, all accounts together: 64 MiB.
pub const DEFAULT_REPLAY_CAPACITY: usize = 64 << 20;

/// (account, idempotency key).
type Id = (Arc<str>, Arc<str>);

/// What a retry gets.
#[derive(Clone, Debug)]
pub(crate) enum Stored {
    /// The whole first answer.
    Answer(Arc<Answer>),
    /// The first answer was not kept, and why (for the message).
    Unavailable(&'static str),
}

/// A kept answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Headers of the first answer that a replay repeats: what describes the content. Per-request
/// headers (request id, credits, rate limits, dates, cookies) are not repeated.
fn kept(name: &HeaderName) -> bool {
    name == http::header::CONTENT_TYPE
        || name == http::header::CONTENT_ENCODING
        || name == http::header::CACHE_CONTROL
        || name.as_str().starts_with("openai-")
}

struct Entry {
    stored: Stored,
    bytes: usize,
    /// Its position in `order` (an id stored again has a newer one).
    seq: u64,
}

struct Inner {
    entries: HashMap<Id, Entry>,
    /// Insertion order, for expiry and eviction.
    order: VecDeque<(Id, Instant, u64)>,
    bytes: usize,
    seq: u64,
}

/// The bounded, in-process store of first answers (one per [`CreditsLayer`](super::CreditsLayer)).
#[derive(Clone)]
pub(crate) struct ReplayStore {
    inner: Arc<Mutex<Inner>>,
    pub(crate) limit: usize,
    capacity: usize,
    window: Duration,
}

impl ReplayStore {
    pub(crate) fn new(limit: usize, capacity: usize, window: Duration) -> Self {
        ReplayStore {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                seq: 0,
            })),
            limit: limit.min(capacity),
            capacity,
            window,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn get(&self, account: &Arc<str>, key: &Arc<str>) -> Option<Stored> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entries
            .get(&(account.clone(), key.clone()))
            .map(|e| e.stored.clone())
    }

    fn put(&self, id: Id, stored: Stored, bytes: usize) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        inner.seq += 1;
        let seq = inner.seq;
        let entry = Entry { stored, bytes, seq };
        if let Some(old) = inner.entries.insert(id.clone(), entry) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        inner.order.push_back((id, now, seq));
        // Expired first, then the oldest until the bytes fit.
        while let Some((_, at, _)) = inner.order.front() {
            let expired = now.duration_since(*at) >= self.window;
            if !expired && inner.bytes <= self.capacity {
                break;
            }
            let (id, _, seq) = inner.order.pop_front().expect("front exists");
            if inner.entries.get(&id).is_some_and(|e| e.seq == seq) {
                if let Some(entry) = inner.entries.remove(&id) {
                    inner.bytes -= entry.bytes;
                }
            }
        }
    }
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayStore")
            .field("limit", &self.limit)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The first answer of one idempotent request, captured as it streams to the client.
pub(crate) struct Capture {
    store: ReplayStore,
    id: Id,
    status: StatusCode,
    headers: HeaderMap,
    body: BytesMut,
    too_large: bool,
}

impl Capture {
    pub(crate) fn new(
        store: ReplayStore,
        account: Arc<str>,
        key: Arc<str>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Self {
        let headers = headers
            .iter()
            .filter(|(name, _)| kept(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Capture {
            store,
            id: (account, key),
            status,
            headers,
            body: BytesMut::new(),
            too_large: false,
        }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.too_large {
            return;
        }
        if self.body.len() + chunk.len() > self.store.limit {
            self.too_large = true;
            self.body = BytesMut::new();
        } else {
            self.body.extend_from_slice(chunk);
        }
    }

    /// The body ended: keep the answer (or say it was too large).
    pub(crate) fn finish(self) {
        if self.too_large {
            let stored = Stored::Unavailable("was larger than the replay limit");
            self.store.put(self.id, stored, 0);
            return;
        }
        let bytes = self.body.len();
        let answer = Answer {
            status: self.status,
            headers: self.headers,
            body: self.body.freeze(),
        };
        self.store
            .put(self.id, Stored::Answer(Arc::new(answer)), bytes);
    }

    /// The answer was cut short (client gone, upstream error mid-stream) but charged.
    pub(crate) fn abandon(self) {
        let stored = Stored::Unavailable("was cut short before its end");
        self.store.put(self.id, stored, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(store: &ReplayStore, account: &str, key: &str, body: &'static [u8]) {
        let mut capture = Capture::new(
            store.clone(),
            account.into(),
            key.into(),
            StatusCode::OK,
            &HeaderMap::new(),
        );
        capture.feed(body);
        capture.finish();
    }

    fn body(store: &ReplayStore, account: &str, key: &str) -> Option<Bytes> {
        match store.get(&account.into(), &key.into())? {
            Stored::Answer(a) => Some(a.body.clone()),
            Stored::Unavailable(_) => None,
        }
    }

    #[test]
    fn the_oldest_answers_go_first_when_the_bytes_do_not_fit() {
        let store = ReplayStore::new(4, 8, Duration::from_secs(3600));
        answer(&store, "a", "k1", b"1111");
        answer(&store, "a", "k2", b"2222");
        assert_eq!(body(&store, "a", "k1").as_deref(), Some(&b"1111"[..]));
        answer(&store, "a", "k3", b"3333");
        assert!(store.get(&"a".into(), &"k1".into()).is_none());
        assert_eq!(body(&store, "a", "k3").as_deref(), Some(&b"3333"[..]));
        // Over the per-answer limit: kept as unavailable, never as a truncated body.
        answer(&store, "a", "k4", b"55555");
        assert!(matches!(
            store.get(&"a".into(), &"k4".into()),
            Some(Stored::Unavailable(_))
        ));
        assert!(store.get(&"b".into(), &"k3".into()).is_none());
    }

    #[test]
    fn answers_expire_with_the_window() {
        let store = ReplayStore::new(4, 8, Duration::ZERO);
        answer(&store, "a", "k1", b"1");
        assert!(store.get(&"a".into(), &"k1".into()).is_none());
    }
}
