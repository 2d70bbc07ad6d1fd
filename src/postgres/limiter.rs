//! The PostgreSQL [`Limiter`]: GCRA in one statement per check, every limit all-or-nothing.

use std::{fmt, sync::Arc, time::Duration};

use sqlx::{Row, SqlStr};

use super::{to_i64, BoxFuture, FailMode, Shared};
use crate::{
    ratelimit::{BucketKey, Charge, Correction, Decision, LimitStatus, Limiter, Outcome},
    BackendError, LimitKind,
};

/// A [`Limiter`] in PostgreSQL: every replica draws from the same buckets.
///
/// One statement per [`check`](Limiter::check), however many limits it charges: a function
/// locks the buckets (transaction advisory locks, always in the same order), reads the
/// database's clock, tests every bucket with governor's GCRA arithmetic and writes all of them or
/// none, so concurrent checks from any number of replicas are linearizable and a burst of N
/// across replicas lets exactly N through. Decisions are the in-memory
/// [`MemoryLimiter`](crate::ratelimit::MemoryLimiter)'s: both pass the same
/// [conformance vectors](crate::ratelimit::conformance). Buckets live in the `rate_buckets`
/// table (unlogged: rate-limit state is not money); a full bucket's row is deleted.
///
/// When PostgreSQL cannot answer, [`FailMode::Open`] (the default) allows the request without
/// limit headers and [`FailMode::Closed`] answers with the [`BackendError`] (503
/// `backend_unavailable`).
///
/// # Example
///
/// ```no_run
/// use std::num::NonZeroU32;
/// use governor::Quota;
/// use tollgate::postgres::PostgresBackend;
/// use tollgate::ratelimit::{BucketKey, Charge, Limiter, Subject};
/// use tollgate::LimitKind;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tollgate::BackendError> {
/// let backend = PostgresBackend::connect("postgres://postgres@127.0.0.1/billing").await?;
/// backend.migrate().await?;
/// let charges = [Charge {
///     key: BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0),
///     kind: LimitKind::Requests,
///     quota: Quota::per_minute(NonZeroU32::new(2).unwrap()),
///     cost: 1,
/// }];
/// assert!(backend.limiter().check(&charges).await?.is_allowed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresLimiter {
    shared: Arc<Shared>,
    fail: FailMode,
    check_sql: SqlStr,
    settle_sql: SqlStr,
    /// Tests only: a frozen time (since the Unix epoch) instead of the database's clock.
    #[cfg(test)]
    pub(super) frozen: Option<Arc<std::sync::Mutex<Duration>>>,
}

/// One bucket of a statement: its key, its parameters, the cost or delta.
#[derive(Clone)]
pub(super) struct Bucket {
    pub(super) key: String,
    pub(super) t: i64,
    pub(super) burst: i64,
    pub(super) amount: i64,
    /// A frozen time (tests), else `None`: the database's clock.
    pub(super) now_ns: Option<i64>,
}

impl Bucket {
    /// The statement's array arguments: keys, t, burst, cost or delta.
    pub(super) fn columns(buckets: Vec<Bucket>) -> (Vec<String>, Vec<i64>, Vec<i64>, Vec<i64>) {
        let mut columns = (
            Vec::with_capacity(buckets.len()),
            Vec::with_capacity(buckets.len()),
            Vec::with_capacity(buckets.len()),
            Vec::with_capacity(buckets.len()),
        );
        for b in buckets {
            columns.0.push(b.key);
            columns.1.push(b.t);
            columns.2.push(b.burst);
            columns.3.push(b.amount);
        }
        columns
    }
}

/// What a check's answer is read with: per bucket, its kind, parameters and cost.
pub(super) type Meta = (LimitKind, Params, u64);

/// A quota as GCRA parameters, in nanoseconds.
#[derive(Clone, Copy)]
pub(super) struct Params {
    t: u64,
    burst: u64,
}

impl Params {
    fn new(quota: governor::Quota) -> Self {
        Params {
            t: u64::try_from(quota.replenish_interval().as_nanos())
                .unwrap_or(u64::MAX)
                .clamp(1, i64::MAX as u64),
            burst: u64::from(quota.burst_size().get()),
        }
    }

    /// What the headers say about a bucket whose arrival time is `rel` ns from now (as
    /// `ratelimit::gcra`).
    fn status(self, rel: u64) -> LimitStatus {
        let tau = self.t.saturating_mul(self.burst - 1);
        let capacity = tau.saturating_add(self.t).saturating_sub(rel);
        LimitStatus {
            limit: self.burst,
            window: Duration::from_nanos(self.t.saturating_mul(self.burst)),
            remaining: (capacity / self.t).min(self.burst),
            reset: Duration::from_nanos(rel),
        }
    }
}

impl PostgresLimiter {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let fail = shared.options.rate_limit_fail;
        let check_sql = shared
            .sql("SELECT verdict, idx, wait, rels FROM @schema@.rate_limit($1, $2, $3, $4, $5)");
        let settle_sql = shared.sql("SELECT @schema@.gcra_settle($1, $2, $3, $4, $5)");
        PostgresLimiter {
            shared,
            fail,
            check_sql,
            settle_sql,
            #[cfg(test)]
            frozen: None,
        }
    }

    /// The same limiter with another [`FailMode`].
    #[must_use]
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.fail = mode;
        self
    }

    /// The frozen time of a test, in ns since the epoch; `None`: the database's clock.
    pub(super) fn frozen_ns(&self) -> Option<i64> {
        #[cfg(test)]
        if let Some(frozen) = &self.frozen {
            return Some(i64::try_from(frozen.lock().unwrap().as_nanos()).unwrap());
        }
        None
    }

    /// The statement's buckets for `charges`, and what is needed to read its answer.
    pub(super) fn buckets(&self, charges: &[Charge]) -> (Vec<Bucket>, Vec<Meta>) {
        let now_ns = self.frozen_ns();
        let buckets = charges
            .iter()
            .map(|c| {
                let params = Params::new(c.quota);
                Bucket {
                    key: key(&c.key),
                    t: to_i64(params.t),
                    burst: to_i64(params.burst),
                    amount: to_i64(c.cost),
                    now_ns,
                }
            })
            .collect();
        let meta = charges
            .iter()
            .map(|c| (c.kind, Params::new(c.quota), c.cost))
            .collect();
        (buckets, meta)
    }

    /// The statement's buckets for `corrections`.
    pub(super) fn corrections(&self, corrections: &[Correction]) -> Vec<Bucket> {
        let now_ns = self.frozen_ns();
        corrections
            .iter()
            .map(|c| {
                let params = Params::new(c.quota);
                Bucket {
                    key: key(&c.key),
                    t: to_i64(params.t),
                    burst: to_i64(params.burst),
                    amount: c.delta,
                    now_ns,
                }
            })
            .collect()
    }
}

/// A bucket's row key: `{policy}|{index}|{subject}`.
fn key(key: &BucketKey) -> String {
    key.to_string()
}

impl Limiter for PostgresLimiter {
    type Future = BoxFuture<Result<Decision, BackendError>>;
    type SettleFuture = BoxFuture<Result<(), BackendError>>;

    fn check(&self, charges: &[Charge]) -> Self::Future {
        if charges.is_empty() {
            return Box::pin(std::future::ready(Ok(Decision::new(Outcome::Allowed))));
        }
        let (buckets, meta) = self.buckets(charges);
        let now_ns = self.frozen_ns();
        let (keys, t, burst, cost) = Bucket::columns(buckets);
        let sql = self.check_sql.clone();
        let call = self.shared.call("rate limit", move |pool| async move {
            let row = sqlx::query(sql)
                .bind(keys)
                .bind(t)
                .bind(burst)
                .bind(cost)
                .bind(now_ns)
                .fetch_one(&pool)
                .await?;
            Ok((
                row.try_get::<i32, _>(0)?,
                row.try_get::<i32, _>(1)?,
                row.try_get::<i64, _>(2)?,
                row.try_get::<Vec<i64>, _>(3)?,
            ))
        });
        let fail = self.fail;
        Box::pin(async move {
            match call.await {
                Ok((verdict, idx, wait, rels)) => decision(verdict, idx, wait, &rels, &meta),
                Err(error) if fail == FailMode::Open => {
                    tracing::warn!(%error, "rate limiter unavailable: failing open");
                    Ok(Decision::new(Outcome::Allowed))
                }
                Err(error) => Err(error),
            }
        })
    }

    fn settle(&self, corrections: &[Correction]) -> Self::SettleFuture {
        if corrections.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let now_ns = self.frozen_ns();
        let (keys, t, burst, delta) = Bucket::columns(self.corrections(corrections));
        let sql = self.settle_sql.clone();
        let call = self.shared.call("rate limit", move |pool| async move {
            sqlx::query(sql)
                .bind(keys)
                .bind(t)
                .bind(burst)
                .bind(delta)
                .bind(now_ns)
                .execute(&pool)
                .await
        });
        let fail = self.fail;
        Box::pin(async move {
            match call.await {
                Ok(_) => Ok(()),
                Err(error) if fail == FailMode::Open => {
                    tracing::warn!(%error, "rate limiter unavailable: correction dropped");
                    Ok(())
                }
                Err(error) => Err(error),
            }
        })
    }
}

/// The decision of GCRA's answer (verdict, 1-based index, wait ns, rel per bucket) on the buckets
/// of `meta`.
pub(super) fn decision(
    verdict: i32,
    idx: i32,
    wait: i64,
    rels: &[i64],
    meta: &[Meta],
) -> Result<Decision, BackendError> {
    if rels.len() != meta.len() || meta.is_empty() {
        return Err(BackendError::new("postgres rate limit: unexpected reply"));
    }
    let index = usize::try_from(idx - 1).unwrap_or(0).min(meta.len() - 1);
    let outcome = match verdict {
        0 => Outcome::Allowed,
        1 => Outcome::Refused {
            limit: meta[index].0,
            retry_after: Duration::from_nanos(u64::try_from(wait).unwrap_or(0)),
        },
        _ => Outcome::TooLarge {
            limit: meta[index].0,
            requested: meta[index].2,
            capacity: meta[index].1.burst,
        },
    };
    let mut decision = Decision::new(outcome);
    for ((kind, params, _), rel) in meta.iter().zip(rels) {
        decision.observe(*kind, params.status(u64::try_from(*rel).unwrap_or(0)));
    }
    Ok(decision)
}

impl fmt::Debug for PostgresLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLimiter")
            .field("schema", &self.shared.options.schema)
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        postgres::{test_server::PgServer, PostgresBackend, PostgresOptions},
        ratelimit::conformance,
    };

    async fn backend(prefix: &str) -> PostgresBackend {
        let server = PgServer::shared();
        let backend = PostgresBackend::connect_with(
            &server.url(),
            PostgresOptions::new()
                .schema(PgServer::schema(prefix))
                .statement_timeout(Duration::from_secs(5))
                .acquire_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
        backend.migrate().await.unwrap();
        backend
    }

    /// The in-memory backend's conformance vectors, on PostgreSQL with a frozen clock.
    #[tokio::test]
    async fn passes_the_conformance_vectors() {
        let backend = backend("limiter_vectors").await;
        let clock = Arc::new(Mutex::new(Duration::from_secs(1_700_000_000)));
        let mut limiter = backend.limiter().fail_mode(FailMode::Closed);
        limiter.frozen = Some(Arc::clone(&clock));
        conformance::run(&limiter, |d| *clock.lock().unwrap() += d).await;
    }

    /// Random sequences: the same decisions and statuses as the in-memory backend.
    #[tokio::test]
    async fn same_decisions_as_memory_on_random_sequences() {
        let backend = backend("limiter_random").await;
        let frozen = Arc::new(Mutex::new(
            Duration::from_secs(1_700_000_000) + Duration::from_nanos(123_456_789),
        ));
        let mut postgres = backend.limiter().fail_mode(FailMode::Closed);
        postgres.frozen = Some(Arc::clone(&frozen));
        conformance::same_as_memory(&postgres, 25, 30, |d| {
            *frozen.lock().unwrap() += d;
        })
        .await;
    }
}
