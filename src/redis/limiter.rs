//! The Redis [`Limiter`]: GCRA in one Lua script per check, every limit all-or-nothing.

use std::{fmt, sync::Arc, time::Duration};

use super::{function::FnCall, BoxFuture, FailMode, Shared};
use crate::{
    ratelimit::{BucketKey, Charge, Correction, Decision, LimitStatus, Limiter, Outcome, Subject},
    BackendError, LimitKind,
};

/// A [`Limiter`] in Redis: every replica draws from the same buckets.
///
/// One `FCALL` per [`check`](Limiter::check), however many limits it charges: the function reads
/// the time from Redis (`TIME`), tests every bucket with governor's GCRA arithmetic and writes
/// all of them or none, so concurrent checks from any number of replicas are linearizable and
/// a burst of N across replicas lets exactly N through. Decisions are the in-memory
/// [`MemoryLimiter`](crate::ratelimit::MemoryLimiter)'s: both pass the same
/// [conformance vectors](crate::ratelimit::conformance). A bucket's key expires when the bucket
/// is full again, so idle callers cost nothing.
///
/// When Redis cannot answer, [`FailMode::Open`] (the default) allows the request without limit
/// headers and [`FailMode::Closed`] answers with the [`BackendError`] (503
/// `backend_unavailable`).
///
/// # Example
///
/// ```no_run
/// use std::num::NonZeroU32;
/// use governor::Quota;
/// use tollgate::ratelimit::{BucketKey, Charge, Limiter, Subject};
/// use tollgate::redis::RedisBackend;
/// use tollgate::LimitKind;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tollgate::BackendError> {
/// let limiter = RedisBackend::connect("redis://127.0.0.1/").await?.limiter();
/// let charges = [Charge {
///     key: BucketKey::new(Subject::Account("acct_1".into()), "plan:free", 0),
///     kind: LimitKind::Requests,
///     quota: Quota::per_minute(NonZeroU32::new(2).unwrap()),
///     cost: 1,
/// }];
/// assert!(limiter.check(&charges).await?.is_allowed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisLimiter {
    shared: Arc<Shared>,
    fail: FailMode,
    /// Tests only: a frozen time (seconds, nanoseconds) instead of Redis `TIME`.
    #[cfg(test)]
    frozen: Option<Arc<std::sync::Mutex<Duration>>>,
}

impl RedisLimiter {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let fail = shared.options.rate_limit_fail;
        RedisLimiter {
            shared,
            fail,
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

    /// Where a bucket lives: an account's bucket is the field `rl:{policy}|{index}` of the
    /// account's hash `{prefix}:{acct:ID}` (beside its balance, so the ledger's scripts read and
    /// write it in the same commands); any other is the string key
    /// `{prefix}:rl:{subject}:{policy}|{index}`, hash-tagged by subject (field `""`).
    pub(super) fn key(&self, key: &BucketKey) -> (String, String) {
        let prefix = &self.shared.options.prefix;
        let (policy, index) = (key.policy(), key.index());
        match key.subject() {
            Subject::Account(id) => (
                format!("{prefix}:{{acct:{id}}}"),
                format!("rl:{policy}|{index}"),
            ),
            subject => (
                format!("{prefix}:rl:{{{subject}}}:{policy}|{index}"),
                String::new(),
            ),
        }
    }

    fn frozen_time(&self) -> (String, String) {
        #[cfg(test)]
        if let Some(frozen) = &self.frozen {
            let now = *frozen.lock().unwrap();
            return (now.as_secs().to_string(), now.subsec_nanos().to_string());
        }
        (String::new(), String::new())
    }

    /// The script's buckets for `charges`, and what is needed to read its answer.
    pub(super) fn buckets(&self, charges: &[Charge]) -> (Vec<Bucket>, Vec<Meta>) {
        let buckets = charges
            .iter()
            .map(|c| {
                let (key, field) = self.key(&c.key);
                Bucket {
                    key,
                    field,
                    params: Params::new(c.quota),
                    amount: i64::try_from(c.cost).unwrap_or(i64::MAX),
                }
            })
            .collect();
        let meta = charges
            .iter()
            .map(|c| (c.kind, Params::new(c.quota), c.cost))
            .collect();
        (buckets, meta)
    }

    /// The script's buckets for `corrections`.
    pub(super) fn corrections(&self, corrections: &[Correction]) -> Vec<Bucket> {
        corrections
            .iter()
            .map(|c| {
                let (key, field) = self.key(&c.key);
                Bucket {
                    key,
                    field,
                    params: Params::new(c.quota),
                    amount: c.delta,
                }
            })
            .collect()
    }

    fn invoke(
        &self,
        mode: &'static str,
        buckets: Vec<Bucket>,
    ) -> BoxFuture<Result<Vec<i64>, BackendError>> {
        let (seconds, nanos) = self.frozen_time();
        Box::pin(
            self.shared
                .conn
                .call("rate limit", move |mut conn| async move {
                    let mut invocation = FnCall::new("gcra");
                    invocation.arg(seconds).arg(nanos).arg(mode);
                    push_buckets(&mut invocation, buckets, true);
                    invocation.invoke::<Vec<i64>, _>(&mut conn).await
                }),
        )
    }
}

/// One bucket of a script call: where it lives, its parameters, the cost or delta.
#[derive(Clone)]
pub(super) struct Bucket {
    /// The string key, or the account's hash.
    pub(super) key: String,
    /// The field of the account's hash, or `""` for a string key.
    pub(super) field: String,
    pub(super) params: Params,
    /// The cost (a check) or the delta (a correction).
    pub(super) amount: i64,
}

/// What a check's answer is read with: per bucket, its kind, parameters and cost.
pub(super) type Meta = (LimitKind, Params, u64);

/// Appends buckets to a script call: each one four arguments (field, t, burst, cost or delta),
/// as `gcra_lib.lua` reads them, and with `keys` its key (the limiter's script; the ledger's
/// scripts have the account's hash as their only key, every bucket a field of it).
pub(super) fn push_buckets(invocation: &mut FnCall, buckets: Vec<Bucket>, keys: bool) {
    for bucket in buckets {
        if keys {
            invocation.key(bucket.key);
        }
        invocation
            .arg(bucket.field)
            .arg(bucket.params.t)
            .arg(bucket.params.burst)
            .arg(bucket.amount);
    }
}

/// A quota as the script's GCRA parameters.
#[derive(Clone, Copy)]
pub(super) struct Params {
    pub(super) t: u64,
    pub(super) burst: u64,
}

impl Params {
    fn new(quota: governor::Quota) -> Self {
        Params {
            t: u64::try_from(quota.replenish_interval().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
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

/// The hash slot's tag of a key name: what is between its first `{` and the next `}` (when not
/// empty), else the whole name, as Redis Cluster hashes it. Keys with the same tag share a slot.
pub(super) fn slot_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The positions of `buckets` grouped by hash slot, in order of first appearance.
fn by_slot(buckets: &[Bucket]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, bucket) in buckets.iter().enumerate() {
        let tag = slot_tag(&bucket.key);
        match groups.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, group)) => group.push(i),
            None => groups.push((tag, vec![i])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

impl RedisLimiter {
    /// A check on a cluster whose buckets live in several hash slots: one script per slot, in
    /// turn, each all-or-nothing on its buckets. When a slot refuses, the tokens taken in the
    /// slots before it are given back (a correction of minus the cost), so a refused check
    /// charges nothing; the refused slot's bucket decides the outcome, and the headers report
    /// the slots checked (the earlier ones as they were before the check). A failed give-back
    /// leaves those tokens taken (callers are limited a little more, never less).
    fn check_slot_by_slot(
        &self,
        buckets: Vec<Bucket>,
        meta: Vec<Meta>,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        let limiter = self.clone();
        Box::pin(async move {
            let groups = by_slot(&buckets);
            let mut taken: Vec<usize> = Vec::new();
            let mut statuses: Vec<(LimitKind, LimitStatus)> = Vec::new();
            for group in groups {
                let part: Vec<Bucket> = group.iter().map(|&i| buckets[i].clone()).collect();
                let part_meta: Vec<Meta> = group.iter().map(|&i| meta[i]).collect();
                let reply = match limiter.invoke("check", part).await {
                    Ok(reply) => reply,
                    Err(error) => {
                        limiter.give_back(&buckets, &taken);
                        return Err(error);
                    }
                };
                let decision = match decision(&reply, &part_meta) {
                    Ok(decision) => decision,
                    Err(error) => {
                        limiter.give_back(&buckets, &taken);
                        return Err(error);
                    }
                };
                if decision.is_allowed() {
                    for ((kind, params, _), rel) in part_meta.iter().zip(&reply[3..]) {
                        statuses.push((*kind, params.status(u64::try_from(*rel).unwrap_or(0))));
                    }
                    taken.extend(group);
                    continue;
                }
                limiter.give_back(&buckets, &taken);
                let mut refused = decision;
                for &i in &taken {
                    // As it was before this check took its cost (`rel` after a charge is the
                    // rel before it, at least 0, plus cost × t).
                    let (kind, params, cost) = meta[i];
                    let (_, rel) = statuses.remove(0);
                    let after = rel.reset.as_nanos() as u64;
                    let before = after.saturating_sub(cost.saturating_mul(params.t));
                    refused.observe(kind, params.status(before));
                }
                return Ok(refused);
            }
            let mut allowed = Decision::new(Outcome::Allowed);
            for (kind, status) in statuses {
                allowed.observe(kind, status);
            }
            Ok(allowed)
        })
    }

    /// Give back the cost of the buckets at `taken` (a check refused in a later slot), in the
    /// background, one script per slot.
    fn give_back(&self, buckets: &[Bucket], taken: &[usize]) {
        let refunds: Vec<Bucket> = taken
            .iter()
            .map(|&i| Bucket {
                amount: -buckets[i].amount,
                ..buckets[i].clone()
            })
            .filter(|bucket| bucket.amount != 0)
            .collect();
        if refunds.is_empty() {
            return;
        }
        for group in by_slot(&refunds) {
            let part = group.iter().map(|&i| refunds[i].clone()).collect();
            let call = self.invoke("settle", part);
            tokio::spawn(async move {
                if let Err(error) = call.await {
                    tracing::warn!(%error, "rate-limit tokens of a refused check not given back");
                }
            });
        }
    }

    /// Corrections on a cluster: one script per hash slot.
    fn settle_slot_by_slot(
        &self,
        buckets: Vec<Bucket>,
    ) -> BoxFuture<Result<Vec<i64>, BackendError>> {
        let calls: Vec<_> = by_slot(&buckets)
            .into_iter()
            .map(|group| {
                let part = group.iter().map(|&i| buckets[i].clone()).collect();
                self.invoke("settle", part)
            })
            .collect();
        Box::pin(async move {
            for call in calls {
                call.await?;
            }
            Ok(Vec::new())
        })
    }

    /// Whether `buckets` span several hash slots of a cluster (then one script each).
    fn crosses_slots(&self, buckets: &[Bucket]) -> bool {
        self.shared.conn.is_cluster() && by_slot(buckets).len() > 1
    }
}

impl Limiter for RedisLimiter {
    type Future = BoxFuture<Result<Decision, BackendError>>;
    type SettleFuture = BoxFuture<Result<(), BackendError>>;

    fn check(&self, charges: &[Charge]) -> Self::Future {
        if charges.is_empty() {
            return Box::pin(std::future::ready(Ok(Decision::new(Outcome::Allowed))));
        }
        let (buckets, meta) = self.buckets(charges);
        let fail = self.fail;
        if self.crosses_slots(&buckets) {
            let call = self.check_slot_by_slot(buckets, meta);
            return Box::pin(async move {
                match call.await {
                    Err(error) if fail == FailMode::Open => {
                        tracing::warn!(%error, "rate limiter unavailable: failing open");
                        Ok(Decision::new(Outcome::Allowed))
                    }
                    other => other,
                }
            });
        }
        let call = self.invoke("check", buckets);
        Box::pin(async move {
            let reply = match call.await {
                Ok(reply) => reply,
                Err(error) if fail == FailMode::Open => {
                    tracing::warn!(%error, "rate limiter unavailable: failing open");
                    return Ok(Decision::new(Outcome::Allowed));
                }
                Err(error) => return Err(error),
            };
            decision(&reply, &meta)
        })
    }

    fn settle(&self, corrections: &[Correction]) -> Self::SettleFuture {
        if corrections.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let buckets = self.corrections(corrections);
        let call = if self.crosses_slots(&buckets) {
            self.settle_slot_by_slot(buckets)
        } else {
            self.invoke("settle", buckets)
        };
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

/// The decision of GCRA's answer `{verdict, index, wait, rel...}` on the buckets of `meta`.
pub(super) fn decision(reply: &[i64], meta: &[Meta]) -> Result<Decision, BackendError> {
    if reply.len() != 3 + meta.len() || meta.is_empty() {
        return Err(BackendError::new("redis rate limit: unexpected reply"));
    }
    let index = usize::try_from(reply[1] - 1)
        .unwrap_or(0)
        .min(meta.len() - 1);
    let outcome = match reply[0] {
        0 => Outcome::Allowed,
        1 => Outcome::Refused {
            limit: meta[index].0,
            retry_after: Duration::from_nanos(u64::try_from(reply[2]).unwrap_or(0)),
        },
        _ => Outcome::TooLarge {
            limit: meta[index].0,
            requested: meta[index].2,
            capacity: meta[index].1.burst,
        },
    };
    let mut decision = Decision::new(outcome);
    for ((kind, params, _), rel) in meta.iter().zip(&reply[3..]) {
        decision.observe(*kind, params.status(u64::try_from(*rel).unwrap_or(0)));
    }
    Ok(decision)
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.shared.options.prefix)
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        ratelimit::conformance,
        redis::{test_server::RedisServer, RedisBackend},
    };

    /// The in-memory backend's conformance vectors, on Redis with a frozen clock.
    #[tokio::test]
    async fn passes_the_conformance_vectors() {
        let server = RedisServer::start();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let clock = Arc::new(Mutex::new(Duration::from_secs(1_700_000_000)));
        let mut limiter = backend.limiter().fail_mode(FailMode::Closed);
        limiter.frozen = Some(Arc::clone(&clock));
        conformance::run(&limiter, |d| *clock.lock().unwrap() += d).await;
    }

    /// The same vectors on a Redis Cluster (3 masters, 3 replicas).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_vectors_on_a_cluster() {
        let cluster = crate::redis::test_cluster::RedisCluster::start();
        let backend =
            RedisBackend::connect_cluster(&cluster.urls(), crate::redis::RedisOptions::new())
                .await
                .unwrap();
        let clock = Arc::new(Mutex::new(Duration::from_secs(1_700_000_000)));
        let mut limiter = backend.limiter().fail_mode(FailMode::Closed);
        limiter.frozen = Some(Arc::clone(&clock));
        conformance::run(&limiter, |d| *clock.lock().unwrap() += d).await;
    }

    /// Random sequences: the same decisions and statuses as the in-memory backend.
    #[tokio::test]
    async fn same_decisions_as_memory_on_random_sequences() {
        let server = RedisServer::start();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let frozen = Arc::new(Mutex::new(
            Duration::from_secs(1_700_000_000) + Duration::from_nanos(123_456_789),
        ));
        let mut redis = backend.limiter().fail_mode(FailMode::Closed);
        redis.frozen = Some(Arc::clone(&frozen));
        conformance::same_as_memory(&redis, 40, 40, |d| {
            *frozen.lock().unwrap() += d;
        })
        .await;
    }
}
