use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use governor::{
    clock::{Clock, FakeRelativeClock, Reference},
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::keyed::DefaultKeyedStateStore,
    Quota, RateLimiter,
};

/// The brute-force shield of the authentication layer: too many failed authentications from one
/// client IP and its requests are refused with 429 `too_many_auth_failures` before the key store
/// is asked, until the failures age out.
///
/// It counts unknown keys (the only failure a key-guessing attack produces). `max_failures` may
/// fail in a burst; after that one more is allowed every `per / max_failures`. IPv6 clients are
/// counted per /64, the block an ISP hands out. The default allows 100 failures per 5 minutes.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use governor::clock::FakeRelativeClock;
/// use tollgate::auth::{AuthLayer, AuthShield, MemoryKeyStore};
///
/// let clock = FakeRelativeClock::default();
/// let layer = AuthLayer::new(MemoryKeyStore::new())
///     .shield(AuthShield::new(5, Duration::from_secs(60)).with_clock(clock.clone()));
/// // In a test: fail five times, expect 429, then `clock.advance(Duration::from_secs(12))`.
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct AuthShield {
    inner: Arc<Inner>,
}

struct Inner {
    limiter:
        RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, ShieldClock, NoOpMiddleware<Nanos>>,
    quota: Quota,
    clock: ShieldClock,
    /// Client IPs refused until an instant; `blocked_len` lets the hot path skip the lock.
    blocked: Mutex<HashMap<IpAddr, Nanos>>,
    blocked_len: AtomicUsize,
    /// The number of tracked client IPs at which idle ones are swept next: failures spread over
    /// many IPs (each under the limit, so never blocked) must not grow the state forever.
    next_sweep: AtomicUsize,
}

/// The least number of tracked client IPs before a sweep.
const MIN_SWEEP: usize = 4096;

/// Real time, or a fake clock for tests.
#[derive(Clone, Debug)]
enum ShieldClock {
    Real(Instant),
    Fake(FakeRelativeClock),
}

impl Clock for ShieldClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            ShieldClock::Real(start) => Nanos::from(start.elapsed()),
            ShieldClock::Fake(clock) => clock.now(),
        }
    }
}

impl Default for AuthShield {
    /// 100 failures per 5 minutes.
    fn default() -> Self {
        AuthShield::new(100, Duration::from_secs(300))
    }
}

impl AuthShield {
    /// Allow `max_failures` failed authentications per client IP per `per`.
    pub fn new(max_failures: u32, per: Duration) -> Self {
        let burst = NonZeroU32::new(max_failures).unwrap_or(NonZeroU32::MIN);
        let interval = (per / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .expect("a non-zero period")
            .allow_burst(burst);
        Self::build(quota, ShieldClock::Real(Instant::now()))
    }

    /// Measure time with a fake clock (for tests: advance it instead of sleeping).
    #[must_use]
    pub fn with_clock(self, clock: FakeRelativeClock) -> Self {
        Self::build(self.inner.quota, ShieldClock::Fake(clock))
    }

    fn build(quota: Quota, clock: ShieldClock) -> Self {
        AuthShield {
            inner: Arc::new(Inner {
                limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
                quota,
                clock,
                blocked: Mutex::default(),
                blocked_len: AtomicUsize::new(0),
                next_sweep: AtomicUsize::new(MIN_SWEEP),
            }),
        }
    }

    /// `Err(wait)` while `ip` is refused.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.inner.blocked_len.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let key = bucket(ip);
        let now = self.inner.clock.now();
        let mut blocked = self.lock();
        match blocked.get(&key) {
            Some(&until) if until > now => Err(until.duration_since(now).into()),
            Some(_) => {
                blocked.remove(&key);
                self.inner
                    .blocked_len
                    .store(blocked.len(), Ordering::Release);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Count a failure; `Some(wait)` when it was one too many.
    pub(crate) fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        let key = bucket(ip);
        let limiter = &self.inner.limiter;
        if limiter.len() >= self.inner.next_sweep.load(Ordering::Relaxed) {
            // Forget IPs whose failures have all replenished; sweep again when the state has
            // doubled, so sweeping costs O(1) per failure.
            limiter.retain_recent();
            limiter.shrink_to_fit();
            let next = (limiter.len() * 2).max(MIN_SWEEP);
            self.inner.next_sweep.store(next, Ordering::Relaxed);
        }
        let not_until = limiter.check_key(&key).err()?;
        let now = self.inner.clock.now();
        let until = not_until.earliest_possible();
        let mut blocked = self.lock();
        if blocked.len() >= 4096 {
            blocked.retain(|_, until| *until > now);
            self.inner.limiter.retain_recent();
        }
        blocked.insert(key, until);
        self.inner
            .blocked_len
            .store(blocked.len(), Ordering::Release);
        Some(not_until.wait_time_from(now).max(Duration::from_millis(1)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Nanos>> {
        self.inner
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// IPv6 clients are counted per /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

impl fmt::Debug for AuthShield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthShield")
            .field("max_failures", &self.inner.quota.burst_size())
            .field("replenish_interval", &self.inner.quota.replenish_interval())
            .field("blocked", &self.inner.blocked_len.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failures from many client IPs, none of them blocked, keep a bounded state.
    #[test]
    fn failures_spread_over_many_ips_keep_bounded_state() {
        let clock = FakeRelativeClock::default();
        let shield = AuthShield::new(100, Duration::from_secs(300)).with_clock(clock.clone());
        for i in 0..200_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(shield.record_failure(ip).is_none());
            // 1000 new IPs per second: each one's single failure replenishes in 3 s.
            if i % 100 == 0 {
                clock.advance(Duration::from_millis(100));
            }
        }
        let tracked = shield.inner.limiter.len();
        assert!(tracked <= 2 * MIN_SWEEP, "{tracked} client IPs tracked");
    }
}
