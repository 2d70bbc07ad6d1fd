//! One shared connection (to one Redis, or to a Redis Cluster) with a timeout on every call and
//! a circuit breaker in front of it.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

use crate::BackendError;

/// What the calls go out on: one Redis through a `ConnectionManager` (one multiplexed
/// connection, reconnected in the background), or a Redis Cluster through redis-rs's
/// cluster-async `ClusterConnection` (one multiplexed connection per node, routed by slot).
///
/// Neither re-sends a command whose answer was lost: the cluster client is built with its
/// retries off, and [`Link`] itself sends a command again only on an answer that proves it did
/// not run (`MOVED`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY`, a
/// refused connection), within the call's deadline. A timeout or a connection broken after the
/// send is never re-sent: the script may have run, and money must not be charged twice.
#[derive(Clone)]
pub(crate) enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Whether `error` proves the command was not executed (so it may be sent again).
pub(crate) fn not_executed(error: &RedisError) -> bool {
    if error.is_connection_refusal() {
        return true;
    }
    matches!(
        error.kind(),
        redis::ErrorKind::Server(
            // Not ASK: redis-rs (its redirects off) does not follow it, and sending the same
            // command to the same node again would be redirected again until the deadline. An ASK
            // is answered as an error (the slot is migrating; the next call may find it moved).
            ServerErrorKind::Moved
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
        )
    )
}

/// The pause before sending again a command the cluster refused (its slot map is being
/// refreshed, or a replica is being promoted); the call's deadline bounds the attempts.
const RESEND_DELAY: Duration = Duration::from_millis(20);

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(manager) => manager.req_packed_command(cmd),
            Link::Cluster(cluster) => Box::pin(async move {
                loop {
                    match cluster.req_packed_command(cmd).await {
                        Err(error) if not_executed(&error) => {
                            tracing::debug!(%error, "redis cluster: not executed, sending again");
                            tokio::time::sleep(RESEND_DELAY).await;
                        }
                        answer => return answer,
                    }
                }
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            // A pipeline is never sent again: part of it may have run.
            Link::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(manager) => manager.get_db(),
            Link::Cluster(cluster) => cluster.get_db(),
        }
    }
}

/// A [`Link`], a deadline on every call and a circuit breaker (one per backend, whatever the
/// number of nodes behind the link).
///
/// A call that fails or times out returns an error and is never re-sent (see [`Link`] for the
/// answers that prove a command did not run). The only other automatic second send is redis-rs's
/// `EVALSHA` → `SCRIPT LOAD` → `EVALSHA` on `NOSCRIPT`, which is safe because `NOSCRIPT` means the
/// script did not run.
#[derive(Clone)]
pub(crate) struct Conn {
    manager: Link,
    breaker: Arc<Breaker>,
    timeout: Duration,
}

impl Conn {
    pub(crate) fn new(manager: Link, breaker: Breaker, timeout: Duration) -> Self {
        Conn {
            manager,
            breaker: Arc::new(breaker),
            timeout,
        }
    }

    /// Run `f` on the connection, unless the breaker is open; at most `timeout` long.
    pub(crate) fn call<T, F, Fut>(
        &self,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        F: FnOnce(Link) -> Fut + Send + 'static,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let breaker = Arc::clone(&self.breaker);
        let manager = self.manager.clone();
        let timeout = self.timeout;
        let work = async move {
            let permit = breaker.permit().map_err(|retry_after| {
                BackendError::new(format!("redis {what}: circuit open"))
                    .with_retry_after(retry_after)
                    .unsent()
            })?;
            match tokio::time::timeout(timeout, f(manager)).await {
                Ok(Ok(value)) => {
                    permit.success();
                    Ok(value)
                }
                Ok(Err(error)) => {
                    let retry_after = permit.failure();
                    Err(BackendError::new(format!("redis {what}: {error}"))
                        .with_retry_after(retry_after))
                }
                Err(_) => {
                    let retry_after = permit.failure();
                    Err(
                        BackendError::new(format!("redis {what}: no answer within {timeout:?}"))
                            .with_retry_after(retry_after),
                    )
                }
            }
        };
        // The call runs to its end on its own task: a caller that gives up (a client gone, a
        // dropped response) neither cancels it half-way nor counts as a Redis failure, so
        // clients dropping requests cannot open the breaker for everyone else.
        async move {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime.spawn(work).await.unwrap_or_else(|_| {
                    Err(BackendError::new(format!(
                        "redis {what}: the runtime is shutting down"
                    )))
                }),
                Err(_) => work.await,
            }
        }
    }

    /// Whether the breaker lets calls through now.
    pub(crate) fn is_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Whether the link is to a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.manager, Link::Cluster(_))
    }
}

/// A circuit breaker: after `threshold` consecutive failures it refuses every call for
/// `cooldown`, then lets one probe through; the probe's success closes it, its failure opens it
/// again.
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; others wait until it answers (or `until`, should it be lost).
    Probing {
        until: Instant,
    },
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    /// A permit to call, or how long until one may be had.
    fn permit(&self) -> Result<Permit<'_>, Duration> {
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => {}
            State::Open { until } | State::Probing { until } if now < until => {
                return Err(until - now);
            }
            State::Open { .. } | State::Probing { .. } => {
                *state = State::Probing {
                    until: now + self.cooldown,
                };
            }
        }
        Ok(Permit {
            breaker: self,
            done: false,
        })
    }

    fn record(&self, ok: bool) -> Duration {
        let mut state = self.lock();
        if ok {
            *state = State::Closed { failures: 0 };
            return Duration::from_secs(1);
        }
        let failures = match *state {
            State::Closed { failures } => failures + 1,
            State::Open { .. } | State::Probing { .. } => self.threshold,
        };
        if failures >= self.threshold {
            if !matches!(*state, State::Open { .. }) {
                tracing::warn!(cooldown = ?self.cooldown, "redis circuit breaker open");
            }
            *state = State::Open {
                until: Instant::now() + self.cooldown,
            };
        } else {
            *state = State::Closed { failures };
        }
        self.cooldown.max(Duration::from_secs(1))
    }
}

/// One call's right to go out. Calls run on their own task, so a permit is dropped without an
/// answer only when that task is cancelled (the runtime shutting down); that counts as a
/// failure, so a lost probe cannot leave the breaker half-open for ever.
struct Permit<'a> {
    breaker: &'a Breaker,
    done: bool,
}

impl Permit<'_> {
    fn success(mut self) {
        self.done = true;
        self.breaker.record(true);
    }

    fn failure(mut self) -> Duration {
        self.done = true;
        self.breaker.record(false)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let breaker = Breaker::new(2, Duration::from_millis(20));
        breaker.permit().unwrap().failure();
        let second = breaker.permit().expect("one failure keeps it closed");
        second.failure();
        assert!(breaker.permit().is_err(), "open");
        std::thread::sleep(Duration::from_millis(25));
        let probe = breaker.permit().expect("a probe after the cooldown");
        assert!(breaker.permit().is_err(), "one probe at a time");
        probe.success();
        assert!(breaker.permit().is_ok(), "closed again");
    }
}
