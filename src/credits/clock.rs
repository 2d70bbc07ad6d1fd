//! The time source of a ledger: the system clock, or a manual one for tests.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// Where a ledger reads the time: when a hold was placed, when it expires, when a journal entry
/// was written.
///
/// Wall-clock time ([`SystemTime`]) because journal entries are read by people and by other
/// processes; a remote ledger would use its server's time.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tollgate::credits::{ManualClock, ledger::Clock};
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(90));
/// ```
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; clones share the same time. For tests that must never
/// sleep.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tollgate::credits::{ManualClock, ledger::Clock};
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
/// let shared = clock.clone();
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(shared.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1));
/// ```
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock that reads `start` until advanced.
    pub fn new(start: SystemTime) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Move the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Set the clock.
    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Default for ManualClock {
    /// A clock at the Unix epoch.
    fn default() -> Self {
        ManualClock::new(SystemTime::UNIX_EPOCH)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}
