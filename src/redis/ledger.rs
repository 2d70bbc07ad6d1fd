//! The Redis [`Ledger`]: one Lua script per operation, on keys hash-tagged per account.

use std::{
    fmt,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{AsyncCommands, Script, Value};

use super::{
    conn::Conn,
    function::FnCall,
    limiter::{push_buckets, Bucket},
    BoxFuture, RedisKeyStore, Shared,
};
use crate::{
    credits::{
        ledger::{
            Balance, EntryKind, Expired, Hold, JournalEntry, JournalQuery, Reservation,
            ReserveError, ReserveRequest, Settlement, TopUp, TopUpError,
        },
        promote::{PlanChange, Promoted, Promotions, TopUpPromoter},
        Ledger, LedgerAdmin,
    },
    ratelimit::{BucketKey, Subject},
    BackendError,
};

/// The largest balance the ledger keeps: Lua numbers are doubles, exact up to 2⁵³.
pub const MAX_BALANCE: u64 = crate::credits::ledger::MAX_CREDITS;

/// A plan promotion as a script of its own, in the key store's `{keys}` slot (Redis Cluster).
static PROMOTE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/promote.lua")));

/// What every ledger function's arguments end with: the per-account journal limit (0:
/// unbounded) and whether a durable record drains the journal (its undrained entries are never
/// trimmed).
#[derive(Clone, Copy)]
struct Tail(usize, bool);

impl Tail {
    fn finish(self, call: &mut FnCall) -> &mut FnCall {
        call.arg(self.0).arg(u8::from(self.1))
    }
}

/// Holds settled per account and script call by [`LedgerAdmin::expire_holds`].
const EXPIRE_BATCH: u64 = 256;

/// A [`Ledger`] in Redis, shared by every replica connected to the same server.
///
/// Each operation is one Lua script on the account's keys, so it is atomic per account and
/// exact under any concurrency from any number of processes; the balance can never go below
/// zero. Every script first settles the account's expired holds at their held amount, so a hold
/// left by a replica that died is charged by whichever replica touches the account next (and by
/// [`expire_holds`](LedgerAdmin::expire_holds)). The journal is a capped Redis list per account, appended in
/// the same script as the movement; idempotency records live in the same script with a TTL.
/// Time is the Redis server's (`TIME`), never a replica's clock.
///
/// Built by [`RedisBackend::ledger`](super::RedisBackend::ledger). Amounts are limited to
/// [`MAX_BALANCE`].
///
/// # Example
///
/// ```no_run
/// use tollgate::credits::{ledger::ReserveRequest, Ledger, LedgerAdmin};
/// use tollgate::redis::RedisBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = RedisBackend::connect("redis://127.0.0.1/").await?;
/// let ledger = backend.ledger();
/// ledger.top_up("acct_1", 100, "invoice-1").await?;
/// let hold = ledger.reserve(ReserveRequest::new("acct_1", 30)).await?.into_hold().unwrap();
/// let settlement = ledger.settle(&hold, 12).await?;
/// assert_eq!(settlement.balance, 88);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisLedger {
    shared: Arc<Shared>,
}

impl RedisLedger {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        RedisLedger { shared }
    }

    /// The two arguments every ledger function call ends with.
    fn tail(&self) -> Tail {
        Tail(
            self.shared.options.journal_limit,
            self.shared.options.has_record(),
        )
    }

    pub(super) fn conn(&self) -> &Conn {
        &self.shared.conn
    }

    /// `{prefix}:{acct:ID}`: the account's hash; its other keys extend this name.
    pub(super) fn account_key(&self, account: &str) -> String {
        format!("{}:{{acct:{account}}}", self.shared.options.prefix)
    }

    /// The account's journal: a list, oldest entry first.
    pub(super) fn journal_key(&self, account: &str) -> String {
        format!("{}:log", self.account_key(account))
    }

    pub(super) fn accounts_key(&self) -> String {
        format!("{}:ledger:accounts", self.shared.options.prefix)
    }

    /// The durable record's drain lease: the replica that holds it drains.
    #[cfg(feature = "postgres")]
    pub(super) fn drain_lease_key(&self) -> String {
        format!("{}:ledger:drain-lease", self.shared.options.prefix)
    }

    fn hold_ttl_ms(&self) -> u64 {
        millis(self.shared.options.hold_ttl)
    }

    /// The entries of the account's journal list in Redis.
    fn journal_in_redis(
        &self,
        account: &str,
        query: JournalQuery,
    ) -> BoxFuture<Result<Vec<JournalEntry>, BackendError>> {
        if query.limit == 0 {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        let key = self.journal_key(account);
        let call = self.conn().call("journal", move |mut conn| async move {
            let mut invocation = FnCall::new("journal");
            invocation
                .key(key)
                .arg(query.after.map_or(String::new(), |after| after.to_string()))
                // 0: all (a limit past any list Redis can hold is all of it).
                .arg(if query.limit > u32::MAX as usize {
                    0
                } else {
                    query.limit
                });
            invocation.invoke::<Vec<Vec<u8>>, _>(&mut conn).await
        });
        Box::pin(async move {
            let reply = call.await?;
            reply.iter().map(|raw| entry(raw)).collect()
        })
    }

    /// The top-up script; with `promote` (the key store's account hash and the rules), an
    /// applied top-up also moves the account's plan, in the same script.
    fn top_up_promoting(
        &self,
        account: &str,
        amount: u64,
        idempotency_key: &str,
        promote: Option<(String, Rules)>,
    ) -> BoxFuture<Result<(TopUp, Option<PlanChange>), TopUpError>> {
        let key = self.account_key(account);
        let accounts = self.accounts_key();
        let account = account.to_owned();
        let idempotency_key = idempotency_key.to_owned();
        let tail = self.tail();
        // On a cluster the key store's hash is in another slot: the promotion is a script of
        // its own, run after an applied top-up.
        let (promote, promote_apart) = if self.conn().is_cluster() {
            (None, promote)
        } else {
            (promote, None)
        };
        let call = self.conn().call("top-up", move |mut conn| async move {
            let mut invocation = FnCall::new("top_up");
            invocation
                .key(key)
                .arg(amount)
                .arg(idempotency_key)
                .arg(MAX_BALANCE);
            if let Some((plans_key, rules)) = &promote {
                invocation.key(plans_key);
                for (from, to) in rules.iter() {
                    invocation.arg(from).arg(to);
                }
            }
            let mut reply = tail
                .finish(&mut invocation)
                .invoke::<Vec<Value>, _>(&mut conn)
                .await?;
            if let Some((plans_key, rules)) = promote_apart {
                // Also on a duplicate: a retried top-up whose first promotion failed (or whose
                // answer was lost between the two calls) promotes now; promote.lua moves only a
                // plan that is still `from`, so repeating it is harmless.
                if matches!(
                    reply.first().map(value_str).as_deref(),
                    Some("applied" | "duplicate")
                ) {
                    let mut invocation = PROMOTE.prepare_invoke();
                    invocation.key(plans_key);
                    for (from, to) in rules.iter() {
                        invocation.arg(from).arg(to);
                    }
                    // The top-up is applied whatever happens here: a promotion that fails is
                    // logged, not an error (retrying the top-up promotes, as a duplicate).
                    match invocation.invoke_async::<Vec<Value>>(&mut conn).await {
                        Ok(moved) => reply.extend(moved),
                        Err(error) => {
                            tracing::warn!(%error, "top-up applied but its plan promotion failed");
                        }
                    }
                }
            }
            // The registry `expire_holds` walks; a set, so a repeat is harmless.
            let () = conn.sadd(accounts, account).await?;
            Ok(reply)
        });
        Box::pin(async move {
            if amount > MAX_BALANCE {
                return Err(TopUpError::Overflow);
            }
            let reply = call.await?;
            let number = |i: usize| reply.get(i).map_or(0, value_u64);
            let balance = || Balance::new(number(1), number(2), number(3));
            let change = || match (reply.get(4), reply.get(5)) {
                (Some(from), Some(to)) => Some(PlanChange::new(value_str(from), value_str(to))),
                _ => None,
            };
            match reply.first().map(value_str).as_deref() {
                Some("applied") => Ok((TopUp::new(true, balance()), change())),
                // A change here is a cluster's promotion made on the retry of a top-up whose
                // first promotion failed.
                Some("duplicate") => Ok((TopUp::new(false, balance()), change())),
                Some("reused") => Err(TopUpError::KeyReused { amount: number(1) }),
                Some("overflow") => Err(TopUpError::Overflow),
                _ => Err(BackendError::new("redis top-up: unexpected reply").into()),
            }
        })
    }

    /// A reserve whose caller went away: release its hold (and the cells charged with it).
    fn abandoned(&self, hold: &Hold, refunds: Vec<Bucket>) {
        tracing::debug!(
            hold = hold.id(),
            "reserve abandoned by its caller: released"
        );
        self.compensate(hold.account_arc().clone(), hold.id(), refunds);
    }

    /// After a reserve whose answer was lost, release the hold if it was placed (and give back
    /// the rate-limit cells charged with it, `refunds`) and forbid it from being placed later;
    /// retried in the background until the hold's TTL has passed.
    fn compensate(&self, account: Arc<str>, id: u64, refunds: Vec<Bucket>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ledger = self.clone();
        let deadline = tokio::time::Instant::now() + ledger.shared.options.hold_ttl;
        runtime.spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                let close = ledger.close_correcting(
                    &account,
                    id,
                    "release",
                    0,
                    true,
                    Corrections::IfOpen(refunds.clone()),
                );
                match close.await {
                    Ok(_) => return,
                    Err(error) if tokio::time::Instant::now() + delay < deadline => {
                        tracing::debug!(%error, "releasing a reserve whose answer was lost: retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not release a reserve whose answer was lost; it expires at its hold TTL");
                        return;
                    }
                }
            }
        });
    }

    /// Whether `buckets` can join this ledger's scripts for `account`: every one is in the
    /// account's `{acct:ID}` slot (a script must stay in one slot on Redis Cluster).
    pub(super) fn in_slot<'a>(
        account: &str,
        mut buckets: impl Iterator<Item = &'a BucketKey>,
    ) -> bool {
        buckets.all(|key| matches!(key.subject(), Subject::Account(id) if **id == *account))
    }

    /// The reserve script, charging `buckets` (in the account's slot) with the hold.
    pub(super) fn reserve_charging(
        &self,
        request: ReserveRequest,
        buckets: Vec<Bucket>,
    ) -> BoxFuture<Result<Reserved, ReserveError>> {
        let id = hold_id();
        let key = self.account_key(&request.account);
        let (idempotency_key, fingerprint) = match &request.idempotency {
            Some((key, fingerprint)) => (key.to_string(), fingerprint.to_hex()),
            None => (String::new(), String::new()),
        };
        let amount = request.amount;
        let ttl = self.hold_ttl_ms();
        let hold_ttl = self.shared.options.hold_ttl;
        let window = millis(self.shared.options.idempotency_window);
        let request_arc = request.request_id.clone();
        let request_id = request.request_id.as_deref().unwrap_or("").to_owned();
        let key_id = request.key_id.as_deref().unwrap_or("").to_owned();
        let refunds: Vec<Bucket> = buckets
            .iter()
            .filter(|bucket| bucket.amount > 0)
            .map(|bucket| Bucket {
                amount: -bucket.amount,
                ..bucket.clone()
            })
            .collect();
        let tail = self.tail();
        let call = self.conn().call("reserve", move |mut conn| async move {
            let mut invocation = FnCall::new("reserve");
            invocation
                .key(key)
                .arg(id)
                .arg(amount)
                .arg(ttl)
                .arg(window)
                .arg(idempotency_key)
                .arg(fingerprint)
                .arg(request_id)
                .arg(key_id);
            push_buckets(&mut invocation, buckets, false);
            tail.finish(&mut invocation)
                .invoke::<Vec<Value>, _>(&mut conn)
                .await
        });
        let ledger = self.clone();
        let account = request.account;
        let abandoned_refunds = refunds.clone();
        let work = async move {
            if amount > MAX_BALANCE {
                return Err(ReserveError::Insufficient {
                    required: amount,
                    available: 0,
                });
            }
            let reply = match call.await {
                Ok(reply) => reply,
                Err(error) => {
                    // The script may have run: make sure the hold does not stay. A call the
                    // breaker refused never went out: nothing to release.
                    if error.may_have_applied() {
                        ledger.compensate(account, id, refunds);
                    }
                    return Err(error.into());
                }
            };
            let number = |i: usize| reply.get(i).map_or(0, value_u64);
            // The limits' GCRA answer, after the status and a number.
            let limits = || reply.iter().skip(2).map(value_i64).collect::<Vec<i64>>();
            match reply.first().map(value_str).as_deref() {
                Some("held") => Ok(Reserved::Held(
                    Hold::new(id, account, amount, number(1))
                        .with_request_id(request_arc)
                        .with_ttl(Some(hold_ttl)),
                    limits(),
                )),
                Some("insufficient") => Err(ReserveError::Insufficient {
                    required: amount,
                    available: number(1),
                }),
                Some("replayed") => Ok(Reserved::Replayed(limits())),
                Some("limited") => Ok(Reserved::Limited(limits())),
                Some("reused") => Err(ReserveError::KeyReused),
                Some("in_use") => Err(ReserveError::KeyInUse),
                _ => Err(BackendError::new("redis reserve: unexpected reply").into()),
            }
        };
        // Finished even when the caller gives up; a hold nobody will use is released at once
        // (with the rate-limit cells charged with it), never left to expire at its held amount.
        let ledger = self.clone();
        Box::pin(async move {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return work.await;
            };
            let (answer, answered) = tokio::sync::oneshot::channel();
            let mut waiting = Waiting {
                answered,
                ledger: ledger.clone(),
                refunds: abandoned_refunds.clone(),
            };
            runtime.spawn(async move {
                let reserved = work.await;
                // Nobody waits any more: the hold is released now.
                if let Err(Ok(Reserved::Held(hold, _))) = answer.send(reserved) {
                    ledger.abandoned(&hold, abandoned_refunds);
                }
            });
            (&mut waiting.answered).await.unwrap_or_else(|_| {
                Err(BackendError::new("redis reserve: the runtime is shutting down").into())
            })
        })
    }

    fn close(
        &self,
        account: &str,
        id: u64,
        how: &'static str,
        actual: u64,
        fence: bool,
    ) -> BoxFuture<Result<Settlement, BackendError>> {
        self.close_correcting(account, id, how, actual, fence, Corrections::None)
    }

    /// Close a hold and apply rate-limit corrections to `buckets` (in the account's slot), in
    /// one script.
    pub(super) fn close_correcting(
        &self,
        account: &str,
        id: u64,
        how: &'static str,
        actual: u64,
        fence: bool,
        corrections: Corrections,
    ) -> BoxFuture<Result<Settlement, BackendError>> {
        let key = self.account_key(account);
        let (when, buckets) = match corrections {
            Corrections::None => ("always", Vec::new()),
            Corrections::Always(buckets) => ("always", buckets),
            Corrections::IfOpen(buckets) => ("if_open", buckets),
        };
        let fence = if fence { self.hold_ttl_ms() * 2 } else { 0 };
        let tail = self.tail();
        let call = self.conn().call("settle", move |mut conn| async move {
            let mut invocation = FnCall::new("close");
            invocation
                .key(key)
                .arg(id)
                .arg(how)
                .arg(actual.min(MAX_BALANCE))
                .arg(fence)
                .arg(when);
            push_buckets(&mut invocation, buckets, false);
            tail.finish(&mut invocation)
                .invoke::<Vec<i64>, _>(&mut conn)
                .await
        });
        Box::pin(async move {
            let reply = call.await?;
            match reply[..] {
                [charged, balance, open] => {
                    Ok(Settlement::new(to_u64(charged), to_u64(balance), open == 1))
                }
                _ => Err(BackendError::new("redis settle: unexpected reply")),
            }
        })
    }
}

impl Ledger for RedisLedger {
    type ReserveFuture = BoxFuture<Result<Reservation, ReserveError>>;
    type SettleFuture = BoxFuture<Result<Settlement, BackendError>>;
    type ReleaseFuture = BoxFuture<Result<Settlement, BackendError>>;
    type ExtendFuture = BoxFuture<Result<bool, BackendError>>;

    fn reserve(&self, request: ReserveRequest) -> Self::ReserveFuture {
        let call = self.reserve_charging(request, Vec::new());
        Box::pin(async move {
            match call.await? {
                Reserved::Held(hold, _) => Ok(Reservation::Held(hold)),
                Reserved::Replayed(_) => Ok(Reservation::Replayed),
                Reserved::Limited(_) => {
                    Err(BackendError::new("redis reserve: unexpected reply").into())
                }
            }
        })
    }

    fn settle(&self, hold: &Hold, actual: u64) -> Self::SettleFuture {
        self.close(hold.account(), hold.id(), "settle", actual, false)
    }

    fn release(&self, hold: &Hold) -> Self::ReleaseFuture {
        self.close(hold.account(), hold.id(), "release", 0, false)
    }

    /// One small script: the hold's expiry moves to the hold TTL from now (Redis's clock).
    fn extend(&self, hold: &Hold) -> Self::ExtendFuture {
        let key = self.account_key(hold.account());
        let (id, ttl) = (hold.id(), self.hold_ttl_ms());
        let tail = self.tail();
        let call = self.conn().call("extend", move |mut conn| async move {
            let mut invocation = FnCall::new("extend");
            invocation.key(key).arg(id).arg(ttl);
            tail.finish(&mut invocation)
                .invoke::<i64, _>(&mut conn)
                .await
        });
        Box::pin(async move { Ok(call.await? == 1) })
    }

    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

impl LedgerAdmin for RedisLedger {
    type TopUpFuture = BoxFuture<Result<TopUp, TopUpError>>;
    type BalanceFuture = BoxFuture<Result<Balance, BackendError>>;
    type JournalFuture = BoxFuture<Result<Vec<JournalEntry>, BackendError>>;
    type ExpireFuture = BoxFuture<Result<Expired, BackendError>>;

    fn top_up(&self, account: &str, amount: u64, idempotency_key: &str) -> Self::TopUpFuture {
        let call = self.top_up_promoting(account, amount, idempotency_key, None);
        Box::pin(async move { call.await.map(|(top_up, _)| top_up) })
    }

    fn balance(&self, account: &str) -> Self::BalanceFuture {
        let key = self.account_key(account);
        let tail = self.tail();
        let call = self.conn().call("balance", move |mut conn| async move {
            let mut invocation = FnCall::new("balance");
            invocation.key(key);
            tail.finish(&mut invocation)
                .invoke::<Vec<i64>, _>(&mut conn)
                .await
        });
        Box::pin(async move {
            match call.await?[..] {
                [balance, held, holds] => {
                    Ok(Balance::new(to_u64(balance), to_u64(held), to_u64(holds)))
                }
                _ => Err(BackendError::new("redis balance: unexpected reply")),
            }
        })
    }

    /// Without a durable record: the entries Redis keeps (the latest
    /// [`journal_limit`](super::RedisOptions::journal_limit)). With one
    /// ([`RedisOptions::record`](super::RedisOptions::record)): the record's entries, then those
    /// not drained yet from Redis, so paging sees the whole history.
    fn journal(&self, account: &str, query: JournalQuery) -> Self::JournalFuture {
        #[cfg(feature = "postgres")]
        if let Some(record) = self.shared.options.record.clone() {
            let ledger = self.clone();
            let account = account.to_owned();
            return Box::pin(async move {
                let mut entries = record.journal(&account, query).await?;
                if entries.len() < query.limit {
                    let after = entries.last().map(|e| e.seq).or(query.after);
                    let rest = ledger
                        .journal_in_redis(
                            &account,
                            JournalQuery::new()
                                .after(after)
                                .limit(query.limit - entries.len()),
                        )
                        .await?;
                    entries.extend(
                        rest.into_iter()
                            .filter(|e| after.is_none_or(|after| e.seq > after)),
                    );
                }
                Ok(entries)
            });
        }
        self.journal_in_redis(account, query)
    }

    fn expire_holds(&self, now: SystemTime) -> Self::ExpireFuture {
        let ledger = self.clone();
        let tail = self.tail();
        let now_ms = millis(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        Box::pin(async move {
            let accounts_key = ledger.accounts_key();
            let accounts: Vec<String> = ledger
                .conn()
                .call("expire", move |mut conn| async move {
                    conn.smembers(accounts_key).await
                })
                .await?;
            let mut expired = Expired::default();
            for account in accounts {
                loop {
                    let key = ledger.account_key(&account);
                    let reply: Vec<i64> = ledger
                        .conn()
                        .call("expire", move |mut conn| async move {
                            let mut invocation = FnCall::new("expire");
                            invocation.key(key).arg(now_ms).arg(EXPIRE_BATCH);
                            tail.finish(&mut invocation).invoke(&mut conn).await
                        })
                        .await?;
                    let (holds, charged) = match reply[..] {
                        [holds, charged] => (to_u64(holds), to_u64(charged)),
                        _ => return Err(BackendError::new("redis expire: unexpected reply")),
                    };
                    expired = Expired::new(expired.holds + holds, expired.charged + charged);
                    if holds < EXPIRE_BATCH {
                        break;
                    }
                }
            }
            Ok(expired)
        })
    }
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.shared.options.prefix)
            .field("hold_ttl", &self.shared.options.hold_ttl)
            .finish_non_exhaustive()
    }
}

/// A random hold id in `1..2⁵³` (exact as a Lua number), so a reserve carries its own id and
/// can be released by it even when its answer was lost.
fn hold_id() -> u64 {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: fall back on the clock and a counter (still unique per process).
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        nanos
            ^ COUNTER
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .rotate_left(40)
    });
    (random & MAX_BALANCE).max(1)
}

/// What the reserve script did: the hold placed or the replay, with the limits charged, or the
/// limits refused; each with the limits' GCRA answer (empty without limits).
pub(super) enum Reserved {
    Held(Hold, Vec<i64>),
    Replayed(Vec<i64>),
    Limited(Vec<i64>),
}

/// Rate-limit corrections made by the close script.
pub(super) enum Corrections {
    None,
    /// Whether or not the hold was still open (tokens reported by a response).
    Always(Vec<Bucket>),
    /// Only if this call closed the hold (the refund of a reserve whose answer was lost: the
    /// cells were charged only if the hold was placed).
    IfOpen(Vec<Bucket>),
}

fn value_i64(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => value_str(other).parse().unwrap_or(0),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn value_str(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

fn value_u64(value: &Value) -> u64 {
    match value {
        Value::Int(n) => to_u64(*n),
        other => value_str(other).parse().unwrap_or(0),
    }
}

/// A journal entry as the scripts store it: `seq t kind amount hold id balance held tail`, the
/// tail being the idempotency key, the request id and the key id, each `length:text`.
pub(super) fn entry(raw: &[u8]) -> Result<JournalEntry, BackendError> {
    let bad = || BackendError::new("redis journal: bad entry");
    let mut rest = raw;
    let mut numbers = [0u64; 8];
    let mut kind = EntryKind::TopUp;
    for (i, slot) in numbers.iter_mut().enumerate() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let word = std::str::from_utf8(&rest[..space]).map_err(|_| bad())?;
        rest = &rest[space + 1..];
        if i == 2 {
            kind = EntryKind::parse(word)
                .ok_or_else(|| BackendError::new("redis journal: unknown entry kind"))?;
        } else {
            *slot = word.parse().map_err(|_| bad())?;
        }
    }
    let mut text = || -> Result<Option<Arc<str>>, BackendError> {
        let colon = rest.iter().position(|&b| b == b':').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let value = rest.get(colon + 1..colon + 1 + len).ok_or_else(bad)?;
        rest = &rest[colon + 1 + len..];
        Ok((len > 0).then(|| Arc::from(String::from_utf8_lossy(value).as_ref())))
    };
    let (idempotency_key, request_id, key_id) = (text()?, text()?, text()?);
    let [seq, t, _, amount, hold, id, balance, held] = numbers;
    let mut entry = JournalEntry::new(
        seq,
        UNIX_EPOCH + Duration::from_millis(t),
        kind,
        amount,
        hold,
        (id != 0).then_some(id),
        balance,
        held,
    );
    entry.request_id = request_id;
    entry.key_id = key_id;
    entry.idempotency_key = idempotency_key;
    Ok(entry)
}

/// A [`TopUpPromoter`] on Redis: the top-up and the plan promotion in **one script** (balance,
/// journal entry and the key store's account plan change together, or nothing does).
///
/// The script spans the account's `{acct:ID}` slot and the key store's `{keys}` slot, which one
/// Redis server ([`RedisBackend::connect`](super::RedisBackend::connect)) allows. On a Redis
/// Cluster ([`RedisBackend::connect_cluster`](super::RedisBackend::connect_cluster)) the
/// promotion runs as a second script (`promote.lua`, in the `{keys}` slot) right after an
/// applied top-up: not atomic with it, and should that second call fail the top-up stays
/// applied without its promotion (logged; a retried top-up is a duplicate and promotes nothing). After a
/// promotion the key store's cache is invalidated here and on every replica (published), so the
/// account's next request on this replica authenticates with the new plan.
///
/// # Example
///
/// ```no_run
/// use tollgate::credits::{promote::{Promotions, TopUpPromoter}};
/// use tollgate::redis::{RedisBackend, RedisPromoter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = RedisBackend::connect("redis://127.0.0.1/").await?;
/// let keys = backend.key_store();
/// let promoter = RedisPromoter::new(
///     backend.ledger(),
///     keys.clone(),
///     Promotions::new().after_top_up("free", "trusted"),
/// );
/// let promoted = promoter.top_up_and_promote("acct_1", 500, "invoice-1").await?;
/// println!("{:?}", promoted.plan_change);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisPromoter {
    ledger: RedisLedger,
    keys: RedisKeyStore,
    rules: Rules,
}

/// Plan promotion rules as the top-up script takes them: `(from, to)` pairs.
type Rules = Arc<Vec<(String, String)>>;

impl fmt::Debug for RedisPromoter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPromoter")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl RedisPromoter {
    /// Top-ups on `ledger`, plans in `keys` (the key store whose cache must see the change; use
    /// the one that authenticates requests).
    pub fn new(ledger: RedisLedger, keys: RedisKeyStore, promotions: Promotions) -> Self {
        let mut rules: Vec<(String, String)> = promotions
            .iter()
            .map(|(from, to)| (from.to_owned(), to.to_owned()))
            .collect();
        rules.sort();
        RedisPromoter {
            ledger,
            keys,
            rules: Arc::new(rules),
        }
    }
}

impl TopUpPromoter for RedisPromoter {
    fn top_up_and_promote(
        &self,
        account: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> impl std::future::Future<Output = Result<Promoted, TopUpError>> + Send {
        let promote =
            (!self.rules.is_empty()).then(|| (self.keys.account_hash(account), self.rules.clone()));
        let call = self
            .ledger
            .top_up_promoting(account, amount, idempotency_key, promote);
        let keys = self.keys.clone();
        async move {
            let (top_up, change) = call.await?;
            if change.is_some() {
                keys.invalidate_all().await;
            }
            Ok(Promoted::new(top_up, change))
        }
    }
}

/// A caller waiting for its reserve. Dropped after the answer arrived but before it was read
/// (the caller gave up in between), it releases the hold the answer carries.
struct Waiting {
    answered: tokio::sync::oneshot::Receiver<Result<Reserved, ReserveError>>,
    ledger: RedisLedger,
    refunds: Vec<Bucket>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(Ok(Reserved::Held(hold, _))) = self.answered.try_recv() {
            self.ledger
                .abandoned(&hold, std::mem::take(&mut self.refunds));
        }
    }
}
