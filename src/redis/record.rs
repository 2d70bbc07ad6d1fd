//! The durable record of the Redis journal: entries drained into PostgreSQL before they are
//! trimmed, exactly once (see [`RedisOptions::record`](super::RedisOptions::record)).

use std::{
    sync::{Arc, LazyLock, Weak},
    time::{Duration, UNIX_EPOCH},
};

use redis::{AsyncCommands, Script, Value};
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::{
    ledger::{entry, RedisLedger},
    Shared,
};
use crate::{
    credits::ledger::{EntryKind, JournalEntry, JournalQuery},
    postgres::{PostgresBackend, PostgresOptions},
    BackendError,
};

/// Entries moved per account and round trip.
const BATCH: usize = 1_000;

/// Accounts whose cursors are read at once (one `HMGET` each, sent together on the multiplexed
/// connection: on a cluster each goes to its own slot's node).
const CHECK: usize = 256;

/// How long the drain lease lasts unless renewed: a replica that took it and died hands the
/// drain to another after this.
const LEASE: Duration = Duration::from_secs(3);

/// How often the background task drains.
pub(super) const INTERVAL: Duration = Duration::from_secs(1);

static READ: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/drain_read.lua")));
static ADVANCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/drain_advance.lua")));
static LEASE_TAKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/drain_lease.lua")));

/// Where the journal is recorded: a PostgreSQL pool and the schema of its `redis_journal`
/// table (migration 5).
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    /// Whether this process applied the migrations already.
    pub(crate) migrated: Arc<std::sync::atomic::AtomicBool>,
}

impl Record {
    fn sql(&self, text: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(text.replace("@schema@", &self.schema))
    }

    /// Apply the PostgreSQL migrations (the record's table among them), once per process.
    pub(crate) async fn migrate(&self) -> Result<(), BackendError> {
        use std::sync::atomic::Ordering;
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let backend = PostgresBackend::from_pool(
            self.pool.clone(),
            PostgresOptions::new().schema(self.schema.clone()),
        );
        backend.migrate().await?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Insert `entries` of `account`; those already recorded are left as they are.
    async fn insert(&self, account: &str, entries: &[JournalEntry]) -> Result<(), BackendError> {
        let mut columns = Columns::default();
        for e in entries {
            columns.push(e);
        }
        let sql = self.sql(
            "INSERT INTO @schema@.redis_journal (account, seq, at, kind, amount, hold, hold_id, \
             balance_after, held_after, request_id, key_id, idempotency_key) \
             SELECT $1, s, to_timestamp(t / 1000.0), k, a, h, id, b, held, r, key, i \
             FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], \
             $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::text[]) \
             AS u(s, t, k, a, h, id, b, held, r, key, i) \
             ON CONFLICT (account, seq) DO NOTHING",
        );
        sqlx::query(sql)
            .bind(account)
            .bind(columns.seq)
            .bind(columns.at)
            .bind(columns.kind)
            .bind(columns.amount)
            .bind(columns.hold)
            .bind(columns.hold_id)
            .bind(columns.balance)
            .bind(columns.held)
            .bind(columns.request_id)
            .bind(columns.key_id)
            .bind(columns.idempotency_key)
            .execute(&self.pool)
            .await
            .map_err(|e| BackendError::new(format!("redis record: {e}")))?;
        Ok(())
    }

    /// The recorded entries of `account` after `query.after`, at most `query.limit`.
    pub(super) async fn journal(
        &self,
        account: &str,
        query: JournalQuery,
    ) -> Result<Vec<JournalEntry>, BackendError> {
        let sql = self.sql(
            "SELECT seq, (extract(epoch FROM at) * 1000)::bigint, kind, amount, hold, hold_id, \
             balance_after, held_after, request_id, key_id, idempotency_key \
             FROM @schema@.redis_journal WHERE account = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        );
        let after = i64::try_from(query.after.unwrap_or(0)).unwrap_or(i64::MAX);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(sql)
            .bind(account)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| BackendError::new(format!("redis record: {e}")))?;
        rows.iter()
            .map(|row| {
                let n = |i: usize| -> Result<u64, sqlx::Error> {
                    Ok(u64::try_from(row.try_get::<i64, _>(i)?).unwrap_or(0))
                };
                let text = |i: usize| -> Result<Option<Arc<str>>, sqlx::Error> {
                    Ok(row.try_get::<Option<String>, _>(i)?.map(Arc::from))
                };
                // The table's CHECK admits only the five kinds; anything else is a corrupt row, never a top-up.
                let word: &str = row.try_get(2)?;
                let kind = EntryKind::parse(word).ok_or_else(|| {
                    sqlx::Error::Decode(format!("unknown journal kind `{word}`").into())
                })?;
                let hold_id = row
                    .try_get::<Option<i64>, _>(5)?
                    .and_then(|id| u64::try_from(id).ok());
                let mut entry = JournalEntry::new(
                    n(0)?,
                    UNIX_EPOCH + Duration::from_millis(n(1)?),
                    kind,
                    n(3)?,
                    n(4)?,
                    hold_id,
                    n(6)?,
                    n(7)?,
                );
                entry.request_id = text(8)?;
                entry.key_id = text(9)?;
                entry.idempotency_key = text(10)?;
                Ok(entry)
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| BackendError::new(format!("redis record: {e}")))
    }
}

#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    at: Vec<i64>,
    kind: Vec<&'static str>,
    amount: Vec<i64>,
    hold: Vec<i64>,
    hold_id: Vec<Option<i64>>,
    balance: Vec<i64>,
    held: Vec<i64>,
    request_id: Vec<Option<String>>,
    key_id: Vec<Option<String>>,
    idempotency_key: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, e: &JournalEntry) {
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let text = |t: &Option<Arc<str>>| t.as_deref().map(str::to_owned);
        self.seq.push(int(e.seq));
        self.at.push(
            e.at.duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        );
        self.kind.push(e.kind.as_str());
        self.amount.push(int(e.amount));
        self.hold.push(int(e.hold));
        self.hold_id.push(e.hold_id.map(int));
        self.balance.push(int(e.balance_after));
        self.held.push(int(e.held_after));
        self.request_id.push(text(&e.request_id));
        self.key_id.push(text(&e.key_id));
        self.idempotency_key.push(text(&e.idempotency_key));
    }
}

/// Apply the record's migrations (once per process), move every account's undrained journal
/// entries into the record, then advance each account's drained cursor. Returns the entries
/// read (some may have been recorded already, by another drainer). Safe from any number of
/// replicas at once.
pub(super) async fn drain(ledger: &RedisLedger, record: &Record) -> Result<u64, BackendError> {
    record.migrate().await?;
    let accounts_key = ledger.accounts_key();
    let accounts: Vec<String> = ledger
        .conn()
        .call("drain", move |mut conn| async move {
            conn.smembers(accounts_key).await
        })
        .await?;
    let mut moved = 0;
    for account in behind(ledger, accounts).await? {
        let hash = ledger.account_key(&account);
        let log = ledger.journal_key(&account);
        loop {
            let (read_hash, read_log) = (hash.clone(), log.clone());
            let reply: Vec<Value> = ledger
                .conn()
                .call("drain", move |mut conn| async move {
                    READ.key(read_hash)
                        .key(read_log)
                        .arg(BATCH)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let entries = reply
                .iter()
                .skip(1)
                .map(|raw| match raw {
                    Value::BulkString(bytes) => entry(bytes),
                    _ => Err(BackendError::new("redis record: unexpected reply")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            record.insert(&account, &entries).await?;
            let hash = hash.clone();
            let _: i64 = ledger
                .conn()
                .call("drain", move |mut conn| async move {
                    ADVANCE.key(hash).arg(last).invoke_async(&mut conn).await
                })
                .await?;
            moved += entries.len() as u64;
            if entries.len() < BATCH {
                break;
            }
        }
    }
    Ok(moved)
}

/// The accounts whose journal has entries after their drained cursor (`seq > drained`): only
/// those are drained, so an idle account costs one `HMGET` per drain, not a script call.
async fn behind(ledger: &RedisLedger, accounts: Vec<String>) -> Result<Vec<String>, BackendError> {
    let mut behind = Vec::new();
    for chunk in accounts.chunks(CHECK) {
        let reads = chunk.iter().map(|account| {
            let hash = ledger.account_key(account);
            ledger.conn().call("drain", move |mut conn| async move {
                redis::cmd("HMGET")
                    .arg(hash)
                    .arg("seq")
                    .arg("drained")
                    .query_async::<(Option<u64>, Option<u64>)>(&mut conn)
                    .await
            })
        });
        let cursors = futures_util::future::try_join_all(reads).await?;
        for (account, (seq, drained)) in chunk.iter().zip(cursors) {
            if seq.unwrap_or(0) > drained.unwrap_or(0) {
                behind.push(account.clone());
            }
        }
    }
    Ok(behind)
}

/// Take (or renew) the drain lease for `token` for `ms` milliseconds; with 0, give it up (only
/// if `token` still holds it, so that another replica drains at its next tick). Whether this
/// replica holds it after the call.
async fn lease(ledger: &RedisLedger, token: &str, ms: u64) -> Result<bool, BackendError> {
    let (key, token) = (ledger.drain_lease_key(), token.to_owned());
    let held: i64 = ledger
        .conn()
        .call("drain lease", move |mut conn| async move {
            LEASE_TAKE
                .key(key)
                .arg(token)
                .arg(ms)
                .invoke_async(&mut conn)
                .await
        })
        .await?;
    Ok(held == 1)
}

/// Drain every [`INTERVAL`] while the backend lives, when this replica holds the drain lease
/// (`{prefix}:ledger:drain-lease`, one drainer per tick for the whole fleet; taken over
/// [`LEASE`] after its holder stops renewing it). A failed drain gives the lease up and is
/// retried at the next tick, by whichever replica takes it; meanwhile nothing undrained is
/// trimmed.
pub(super) fn spawn(shared: Weak<Shared>, record: Record) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let token = format!(
        "{:016x}-{}",
        getrandom::u64().unwrap_or_default(),
        std::process::id()
    );
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let ledger = RedisLedger::new(shared);
            match lease(&ledger, &token, LEASE.as_millis() as u64).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(%error, "draining the Redis journal into the record: the lease is unreachable; retrying");
                    continue;
                }
            }
            if let Err(error) = drain(&ledger, &record).await {
                let _ = lease(&ledger, &token, 0).await;
                tracing::warn!(%error, "draining the Redis journal into the record failed; retrying (the journal is kept until then)");
            }
        }
    });
}
