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

/// What an entry costs beyond its body and key: the maps, the order queue, the headers' boxes.
const ENTRY_OVERHEAD: usize = 256;

/// One account may fill at most this share of the store (1/8): a tenant sending large answers
/// cannot evict every other tenant's.
const ACCOUNT_SHARE: usize = 8;

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
    /// Bytes kept per account.
    per_account: HashMap<Arc<str>, usize>,
    /// Insertion order, for expiry and eviction.
    order: VecDeque<(Id, Instant, u64)>,
    bytes: usize,
    seq: u64,
}

/// The bounded, in-process store of first answers (one per [`CreditsLayer`](super::CreditsLayer)).
#[derive(Clone)]
pub(crate) struct ReplayStore {
    inner: Arc<Mutex<Inner>>,
    /// Bytes buffered by answers still streaming (counted against the capacity too).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) limit: usize,
    /// The limit asked for (the store applies at most its capacity).
    pub(crate) requested_limit: usize,
    capacity: usize,
    window: Duration,
}

impl ReplayStore {
    pub(crate) fn new(limit: usize, capacity: usize, window: Duration) -> Self {
        ReplayStore {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                per_account: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                seq: 0,
            })),
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            limit: limit.min(capacity),
            requested_limit: limit,
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

    fn put(&self, id: Id, stored: Stored, body: usize, headers: usize) {
        let now = Instant::now();
        let mut bytes = body + headers + id.0.len() + id.1.len() + ENTRY_OVERHEAD;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        // At least one answer of the largest size, whatever the share.
        let share = (self.capacity / ACCOUNT_SHARE).max(self.limit + 1024);
        let used = inner.per_account.get(&id.0).copied().unwrap_or(0);
        let stored = if body > 0 && used + bytes > share {
            // Over this account's share: kept as unavailable, not at other tenants' expense.
            bytes = id.0.len() + id.1.len() + ENTRY_OVERHEAD;
            Stored::Unavailable("did not fit in this account's share of the replay store")
        } else {
            stored
        };
        inner.seq += 1;
        let seq = inner.seq;
        let account = id.0.clone();
        let entry = Entry { stored, bytes, seq };
        if let Some(old) = inner.entries.insert(id.clone(), entry) {
            inner.bytes -= old.bytes;
            forget(&mut inner.per_account, &account, old.bytes);
        }
        inner.bytes += bytes;
        *inner.per_account.entry(account).or_insert(0) += bytes;
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
                    forget(&mut inner.per_account, &id.0, entry.bytes);
                }
            }
        }
    }

    /// Reserve `bytes` of the capacity for an answer still streaming; `false` when they do not
    /// fit (the answer is then not kept).
    fn reserve_in_flight(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.in_flight.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > self.capacity {
            self.in_flight.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn release_in_flight(&self, bytes: usize) {
        self.in_flight
            .fetch_sub(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

fn forget(per_account: &mut HashMap<Arc<str>, usize>, account: &Arc<str>, bytes: usize) {
    if let Some(used) = per_account.get_mut(account) {
        *used -= bytes.min(*used);
        if *used == 0 {
            per_account.remove(account);
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
        if self.body.len() + chunk.len() > self.store.limit
            || !self.store.reserve_in_flight(chunk.len())
        {
            self.too_large = true;
            self.store.release_in_flight(self.body.len());
            self.body = BytesMut::new();
        } else {
            self.body.extend_from_slice(chunk);
        }
    }

    fn header_bytes(&self) -> usize {
        self.headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum()
    }

    /// The body ended: keep the answer (or say it was too large).
    pub(crate) fn finish(mut self) {
        let store = self.store.clone();
        let id = self.id.clone();
        if self.too_large {
            let stored = Stored::Unavailable("was larger than the replay limit");
            store.put(id, stored, 0, 0);
            return;
        }
        let (body, headers) = (self.body.len(), self.header_bytes());
        let answer = Answer {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body: std::mem::take(&mut self.body).freeze(),
        };
        store.release_in_flight(body);
        store.put(id, Stored::Answer(Arc::new(answer)), body, headers);
    }

    /// The answer was cut short (client gone, upstream error mid-stream) but charged.
    pub(crate) fn abandon(self) {
        let stored = Stored::Unavailable("was cut short before its end");
        self.store.put(self.id.clone(), stored, 0, 0);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // What is still buffered (finish took its body already).
        self.store.release_in_flight(self.body.len());
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

    /// What one entry of a 4-byte body under a 1-byte account and 2-byte key costs.
    const ENTRY: usize = 4 + 1 + 2 + ENTRY_OVERHEAD;

    #[test]
    fn the_oldest_answers_go_first_when_the_bytes_do_not_fit() {
        let store = ReplayStore::new(4, 2 * ENTRY + 10, Duration::from_secs(3600));
        answer(&store, "a", "k1", b"1111");
        answer(&store, "b", "k2", b"2222");
        assert_eq!(body(&store, "a", "k1").as_deref(), Some(&b"1111"[..]));
        answer(&store, "c", "k3", b"3333");
        assert!(store.get(&"a".into(), &"k1".into()).is_none());
        assert_eq!(body(&store, "b", "k2").as_deref(), Some(&b"2222"[..]));
        assert_eq!(body(&store, "c", "k3").as_deref(), Some(&b"3333"[..]));
        // Over the per-answer limit: kept as unavailable, never as a truncated body.
        answer(&store, "c", "k4", b"55555");
        assert!(matches!(
            store.get(&"c".into(), &"k4".into()),
            Some(Stored::Unavailable(_))
        ));
        assert!(store.get(&"b".into(), &"k3".into()).is_none());
    }

    #[test]
    fn one_account_cannot_take_the_whole_store() {
        // Share: max(16000 / 8, 1000 + 1024) = 2024 bytes: one 900-byte answer and no second.
        let store = ReplayStore::new(1000, 16_000, Duration::from_secs(3600));
        let big: &'static [u8] = &[b'x'; 900];
        answer(&store, "other", "k", b"kept");
        answer(&store, "big", "k1", big);
        answer(&store, "big", "k2", big);
        assert_eq!(body(&store, "big", "k1").map(|b| b.len()), Some(900));
        assert!(matches!(
            store.get(&"big".into(), &"k2".into()),
            Some(Stored::Unavailable(_))
        ));
        assert_eq!(body(&store, "other", "k").as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn answers_still_streaming_count_against_the_capacity() {
        let store = ReplayStore::new(100, 150, Duration::from_secs(3600));
        let mut first = Capture::new(
            store.clone(),
            "a".into(),
            "k1".into(),
            StatusCode::OK,
            &HeaderMap::new(),
        );
        let mut second = Capture::new(
            store.clone(),
            "b".into(),
            "k2".into(),
            StatusCode::OK,
            &HeaderMap::new(),
        );
        first.feed(&[b'1'; 100]);
        // 100 + 60 > 150: the second is not kept, the first still is.
        second.feed(&[b'2'; 60]);
        assert!(second.too_large);
        assert!(!first.too_large);
        drop(second);
        first.finish();
        assert_eq!(store.in_flight.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn answers_expire_with_the_window() {
        let store = ReplayStore::new(4, 8, Duration::ZERO);
        answer(&store, "a", "k1", b"1");
        assert!(store.get(&"a".into(), &"k1".into()).is_none());
    }
}
