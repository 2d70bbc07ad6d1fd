//! The local key cache of the shared key stores (Redis, PostgreSQL): lookups by digest, kept for a
//! TTL, emptied or narrowed by the invalidations other replicas publish.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use super::KeyLookup;
use crate::keys::KeyDigest;

/// The invalidation message that empties every replica's cache.
pub(crate) const ALL: &str = "*";

type Entries = HashMap<KeyDigest, (Instant, Option<KeyLookup>)>;

/// Lookups (a key found, or known to be unknown) by digest, each for at most `ttl`, at most
/// `capacity` of them.
pub(crate) struct KeyCache {
    ttl: Duration,
    capacity: usize,
    /// Bumped by every invalidation: a lookup that started before one does not fill the cache.
    generation: AtomicU64,
    entries: Mutex<Entries>,
}

impl KeyCache {
    /// An empty cache; a zero `ttl` or `capacity` keeps nothing.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        KeyCache {
            ttl,
            capacity,
            generation: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many lookups are kept (expired ones included until they are swept).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The cached lookup, if it is younger than the TTL.
    pub(crate) fn get(&self, digest: &KeyDigest) -> Option<Option<KeyLookup>> {
        let entries = self.lock();
        let (at, lookup) = entries.get(digest)?;
        (at.elapsed() < self.ttl).then(|| lookup.clone())
    }

    /// The generation to pass to [`put`](Self::put), read before the lookup is sent.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keep `lookup`, unless an invalidation came since `generation` was read.
    pub(crate) fn put(&self, digest: KeyDigest, lookup: Option<KeyLookup>, generation: u64) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(digest, (Instant::now(), lookup));
    }

    /// Apply an invalidation message: one digest (hex) drops that key, anything else (such as
    /// [`ALL`]) empties the cache.
    pub(crate) fn invalidate(&self, message: &str) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        match message.parse::<KeyDigest>() {
            Ok(digest) => {
                entries.remove(&digest);
            }
            Err(_) => entries.clear(),
        }
    }
}
