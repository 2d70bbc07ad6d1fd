//! The Redis backends on a real local Redis Cluster (3 masters, 3 replicas, started on free
//! ports by `support/redis_cluster.rs`, killed on drop): the ledger conformance scenarios,
//! exactness across two backend instances ("two gateway replicas"), a rate-limit burst over
//! several hash slots, key revocation (also after the subscribed node is killed), `kill -9`
//! of a master under load, and (with `postgres`) the journal drained into the durable record.
#![cfg(feature = "redis")]

#[path = "support/books.rs"]
mod books;
#[cfg(feature = "postgres")]
#[path = "support/pg_server.rs"]
mod pg_server;
#[cfg(feature = "postgres")]
#[path = "support/record.rs"]
mod record;
#[path = "support/redis_cluster.rs"]
mod redis_cluster;

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use books::{checked_journal, patiently};
use governor::Quota;
use redis_cluster::RedisCluster;
use tollgate::{
    auth::{AccountRecord, KeyAdmin, KeyRecord, KeyStatus, KeyStore},
    credits::{
        conformance,
        ledger::{EntryKind, ReserveError, ReserveRequest},
        Ledger, LedgerAdmin,
    },
    ratelimit::{BucketKey, Charge, Limiter, Subject},
    redis::{FailMode, RedisBackend, RedisLedger, RedisOptions},
    LimitKind,
};

async fn replica(cluster: &RedisCluster, options: RedisOptions) -> RedisBackend {
    RedisBackend::connect_cluster(&cluster.urls(), options)
        .await
        .expect("connect to the cluster")
}

/// The accounts' hashes live on each of the 3 masters.
fn assert_on_every_master(cluster: &RedisCluster, accounts: &[String]) {
    let mut masters: Vec<u16> = accounts
        .iter()
        .map(|a| cluster.master_of(&format!("tollgate:{{acct:{a}}}")))
        .collect();
    masters.sort_unstable();
    masters.dedup();
    assert_eq!(masters.len(), 3, "the accounts live on every master");
}

/// Exactness, not time-outs, is tested here (a loaded 2-core machine running 6 servers).
fn patient() -> RedisOptions {
    RedisOptions::new().response_timeout(Duration::from_secs(10))
}

/// The conformance scenarios of every ledger, on the cluster (a fresh prefix per scenario).
struct Cluster {
    cluster: RedisCluster,
    scenarios: AtomicU32,
}

impl conformance::Fixture for Cluster {
    type Ledger = RedisLedger;

    async fn ledger(&self, hold_ttl: Duration) -> RedisLedger {
        let n = self.scenarios.fetch_add(1, Ordering::Relaxed);
        replica(
            &self.cluster,
            patient()
                .prefix(format!("conformance-{n}"))
                .hold_ttl(hold_ttl),
        )
        .await
        .ledger()
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_passes_the_conformance_scenarios_on_a_cluster() {
    let fixture = Cluster {
        cluster: RedisCluster::start(),
        scenarios: AtomicU32::new(0),
    };
    conformance::run(&fixture).await;
}

/// 24 accounts (spread over the 3 masters' slots), two backend instances, concurrent reserves
/// and settlements: every account spends exactly its balance, the journal accounts for every
/// credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_across_two_replicas_with_24_accounts() {
    let cluster = RedisCluster::start();
    let replicas = [
        replica(&cluster, patient()).await,
        replica(&cluster, patient()).await,
    ];
    let admin = replicas[0].ledger();
    let accounts: Vec<String> = (0..24).map(|i| format!("acct_{i}")).collect();
    let (k, price) = (40u64, 3u64);
    for account in &accounts {
        admin.top_up(account, k * price, "invoice-1").await.unwrap();
    }
    assert_on_every_master(&cluster, &accounts);

    let tasks: Vec<_> = (0..accounts.len() * 60)
        .map(|i| {
            let ledger = replicas[i % 2].ledger();
            let account = accounts[i % accounts.len()].clone();
            tokio::spawn(async move {
                match ledger.reserve(ReserveRequest::new(&*account, price)).await {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().unwrap();
                        let settled = ledger.settle(&hold, price).await.unwrap();
                        assert!(settled.was_open);
                        (account, 1u64)
                    }
                    Err(ReserveError::Insufficient { .. }) => (account, 0),
                    Err(other) => panic!("{other}"),
                }
            })
        })
        .collect();
    let mut succeeded: HashMap<String, u64> = HashMap::new();
    for task in tasks {
        let (account, ok) = task.await.unwrap();
        *succeeded.entry(account).or_default() += ok;
    }
    for account in &accounts {
        assert_eq!(succeeded[account], k, "{account}");
        let balance = admin.balance(account).await.unwrap();
        assert_eq!((balance.balance, balance.held), (0, 0), "{account}");
        let journal = checked_journal(&admin, account).await;
        let reserves = journal
            .iter()
            .filter(|e| e.kind == EntryKind::Reserve)
            .count() as u64;
        assert_eq!(reserves, k, "{account}");
    }
}

/// A limit of `per_day` requests a day: nothing refills during the test.
fn charge(subject: Subject, per_day: u32) -> Charge {
    let per_day = NonZeroU32::new(per_day).unwrap();
    Charge {
        key: BucketKey::new(subject, "plan:test", 0),
        kind: LimitKind::Requests,
        quota: Quota::with_period(Duration::from_secs(86_400) / per_day.get())
            .unwrap()
            .allow_burst(per_day),
        cost: 1,
    }
}

/// A plan whose limits live in three hash slots (the account's, the key's, a global one),
/// checked slot by slot: a burst across two replicas lets exactly the tightest limit through,
/// and the tokens a refused check took in an earlier slot are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_slot_burst_lets_exactly_n_through_and_gives_back_the_rest() {
    let cluster = RedisCluster::start();
    let replicas = [
        replica(&cluster, patient().rate_limit_fail(FailMode::Closed)).await,
        replica(&cluster, patient().rate_limit_fail(FailMode::Closed)).await,
    ];
    let charges = || {
        vec![
            charge(Subject::Account("acct_1".into()), 1000),
            charge(Subject::Key("key_1".into()), 30),
            charge(Subject::Global, 1000),
        ]
    };
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let limiter = replicas[i % 2].limiter();
            let charges = charges();
            tokio::spawn(async move { limiter.check(&charges).await.unwrap().is_allowed() })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += u32::from(task.await.unwrap());
    }
    assert_eq!(
        allowed, 30,
        "the tightest limit (30 a day) lets exactly 30 through"
    );
    // Refused checks gave back what the account's bucket took: 30 charged, so 970 of 1000
    // remain (the give-backs run in the background: wait for them).
    let limiter = replicas[0].limiter();
    let only_account = [charge(Subject::Account("acct_1".into()), 1000)];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A zero-cost check reads the bucket without charging it.
        let mut peek = only_account.clone();
        peek[0].cost = 0;
        let decision = limiter.check(&peek).await.unwrap();
        let remaining = decision.status(LimitKind::Requests).unwrap().remaining;
        if remaining == 970 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the account's bucket shows {remaining} remaining, not 970"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A top-up that promotes a plan on a cluster: the top-up in the account's slot, then the
/// promotion as its own script in the `{keys}` slot; the other replica sees the new plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoting_top_up_moves_the_plan_on_a_cluster() {
    use tollgate::credits::promote::{Promotions, TopUpPromoter};
    let cluster = RedisCluster::start();
    let a = replica(&cluster, patient().key_cache_ttl(Duration::from_secs(60))).await;
    let b = replica(&cluster, patient().key_cache_ttl(Duration::from_secs(60))).await;
    let keys = a.key_store();
    keys.put_account(AccountRecord::new("acct_1", "free"))
        .await
        .unwrap();
    let key = keys
        .create_key("sk-test-", KeyRecord::new("key_1", "acct_1"))
        .await
        .unwrap();
    let other = b.key_store();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the listeners subscribe
    assert_eq!(
        other
            .lookup(&key.digest())
            .await
            .unwrap()
            .unwrap()
            .caller
            .plan(),
        "free"
    );
    let promoter = tollgate::redis::RedisPromoter::new(
        a.ledger(),
        keys.clone(),
        Promotions::new().after_top_up("free", "trusted"),
    );
    let promoted = promoter
        .top_up_and_promote("acct_1", 500, "invoice-1")
        .await
        .unwrap();
    assert!(promoted.top_up.applied);
    let change = promoted.plan_change.expect("promoted");
    assert_eq!((&*change.from, &*change.to), ("free", "trusted"));
    let start = Instant::now();
    while other
        .lookup(&key.digest())
        .await
        .unwrap()
        .unwrap()
        .caller
        .plan()
        != "trusted"
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the other replica sees the new plan"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A repeated top-up is a duplicate: it promotes nothing.
    let again = promoter
        .top_up_and_promote("acct_1", 500, "invoice-1")
        .await
        .unwrap();
    assert!(!again.top_up.applied && again.plan_change.is_none());
    assert_eq!(a.ledger().balance("acct_1").await.unwrap().balance, 500);

    // A top-up whose promotion was lost (applied, the plan left as it was: here a top-up made
    // without the promoter) is repaired by retrying it: a duplicate, no credit twice, promoted.
    keys.put_account(AccountRecord::new("acct_2", "free"))
        .await
        .unwrap();
    let applied = a.ledger().top_up("acct_2", 300, "invoice-2").await.unwrap();
    assert!(applied.applied);
    let retried = promoter
        .top_up_and_promote("acct_2", 300, "invoice-2")
        .await
        .unwrap();
    assert!(!retried.top_up.applied, "a duplicate");
    let change = retried.plan_change.expect("promoted on the retry");
    assert_eq!((&*change.from, &*change.to), ("free", "trusted"));
    assert_eq!(a.ledger().balance("acct_2").await.unwrap().balance, 300);
    assert_eq!(
        &*keys.account("acct_2").await.unwrap().unwrap().plan,
        "trusted"
    );
}

/// Revocation on one replica reaches the other within a second on a cluster, and still does
/// after the node its invalidation listener subscribed on is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_other_replica_within_a_second_even_after_its_node_dies() {
    let mut cluster = RedisCluster::start();
    // A long cache TTL: only the invalidation message makes the second replica see it.
    let options = || patient().key_cache_ttl(Duration::from_secs(60));
    let a = replica(&cluster, options()).await.key_store();
    let b = replica(&cluster, options()).await.key_store();
    a.put_account(AccountRecord::new("acct_1", "free"))
        .await
        .unwrap();
    let first = a
        .create_key("sk-test-", KeyRecord::new("key_1", "acct_1"))
        .await
        .unwrap();
    let second = a
        .create_key("sk-test-", KeyRecord::new("key_2", "acct_1"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // let both listeners subscribe

    let revoked_within = |digest: tollgate::keys::KeyDigest| {
        let b = b.clone();
        async move {
            let start = Instant::now();
            loop {
                let lookup = b.lookup(&digest).await.unwrap().unwrap();
                if lookup.status == KeyStatus::Revoked {
                    return start.elapsed();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(1),
                    "still active on the other replica after a second"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for key in [&first, &second] {
        let found = b.lookup(&key.digest()).await.unwrap().expect("found");
        assert_eq!(found.status, KeyStatus::Active);
    }
    assert_eq!(b.cached(), 2, "both cached on the second replica");
    a.revoke_key("key_1").await.unwrap();
    revoked_within(first.digest()).await;

    // The listeners subscribe on the first seed node: kill it (a master, whose replica takes
    // over its slots), and revocation still reaches the other replica within a second.
    let seed = cluster.live_ports()[0];
    let keys_master = cluster.master_of("tollgate:{keys}:x");
    cluster.kill(seed);
    if keys_master == seed {
        cluster.wait_promoted(seed, Duration::from_secs(20));
    }
    let moved_at = Instant::now();
    assert!(patiently(|| b.lookup(&second.digest())).await.is_some());
    println!(
        "key lookups answered again {:?} after the kill",
        moved_at.elapsed()
    );
    // The cached entry stays until a message says otherwise (the TTL is a minute).
    let revoked_at = Instant::now();
    patiently(|| {
        let a = a.clone();
        async move {
            a.revoke_key("key_2")
                .await
                .map_err(|e| tollgate::BackendError::new(e.to_string()))
        }
    })
    .await;
    let took = revoked_within(second.digest()).await;
    println!(
        "revocation after the subscribed node died: seen in {took:?} ({:?} including the admin call)",
        revoked_at.elapsed()
    );
}

/// Per account, the settlements acknowledged to clients: (hold id, charged).
type Acked = HashMap<String, Vec<(u64, u64)>>;

/// `kill -9` of a master while two replicas bill 24 accounts: credits on the moving slots fail
/// closed (a backend error, never a hold placed unanswered), service resumes once the replica
/// is promoted, nothing is charged twice and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_load_charges_nothing_twice_and_loses_nothing() {
    let mut cluster = RedisCluster::start();
    let options = || {
        RedisOptions::new()
            .response_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(300))
            .circuit_breaker(5, Duration::from_millis(200))
            .hold_ttl(Duration::from_secs(2))
    };
    let replicas = [
        replica(&cluster, options()).await,
        replica(&cluster, options()).await,
    ];
    let admin = replicas[0].ledger();
    let accounts: Vec<String> = (0..24).map(|i| format!("acct_{i}")).collect();
    for account in &accounts {
        admin.top_up(account, 1_000_000, "invoice-1").await.unwrap();
    }
    let victim = cluster.master_of("tollgate:{acct:acct_0}");
    cluster.wait_replicas_in_sync(Duration::from_secs(10));
    // The library was loaded on every primary at connect and replicated: a promoted replica
    // has it (no `Function not found` after the failover).
    for port in cluster.live_ports() {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(tollgate::redis::RedisBackend::library_name())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(libraries.len(), 1, "the library on node {port}");
    }

    // What clients were told: per account, the settlements acknowledged (hold id, charged).
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let refused = Arc::new(AtomicU32::new(0));
    let other_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let served_after = Arc::new(Mutex::new(None::<Instant>));
    let killed_at = Arc::new(Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let ledger = replicas[w % 2].ledger();
            let accounts = accounts.clone();
            let (acked, refused, other_errors, served_after, killed_at, stop) = (
                acked.clone(),
                refused.clone(),
                other_errors.clone(),
                served_after.clone(),
                killed_at.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let account = &accounts[i % accounts.len()];
                    i += 8;
                    match ledger.reserve(ReserveRequest::new(&**account, 5)).await {
                        Ok(reservation) => {
                            let hold = reservation.into_hold().unwrap();
                            if let Ok(settled) = ledger.settle(&hold, 3).await {
                                assert!(settled.was_open, "a hold closed once");
                                acked
                                    .lock()
                                    .unwrap()
                                    .entry(account.clone())
                                    .or_default()
                                    .push((hold.id(), settled.charged));
                                let killed = *killed_at.lock().unwrap();
                                if killed.is_some() && account == "acct_0" {
                                    served_after.lock().unwrap().get_or_insert(Instant::now());
                                }
                            }
                        }
                        Err(ReserveError::Backend(_)) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(other) => other_errors.lock().unwrap().push(other.to_string()),
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = refused.load(Ordering::Relaxed);
    let kill_time = Instant::now();
    cluster.kill(victim);
    *killed_at.lock().unwrap() = Some(kill_time);
    let promoted =
        tokio::task::block_in_place(|| cluster.wait_promoted(victim, Duration::from_secs(30)));
    // Service resumes on the moved slot.
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_after.lock().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "acct_0 not served again after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = served_after.lock().unwrap().unwrap() - kill_time;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let refused_total = refused.load(Ordering::Relaxed);
    println!(
        "failover: {} reserves refused (503) after the kill, replica promoted in {promoted:?}, acct_0 served again after {resumed:?}",
        refused_total - before
    );
    assert_eq!(before, 0, "nothing refused before the kill");
    assert!(
        refused_total > before,
        "credits failed closed while the slot moved"
    );
    assert!(
        other_errors.lock().unwrap().is_empty(),
        "{:?}",
        other_errors.lock().unwrap()
    );

    // Holds whose settlement was not answered expire (at their amount) after the hold TTL.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    patiently(|| admin.expire_holds(SystemTime::now())).await;
    let acked = acked.lock().unwrap().clone();
    for account in &accounts {
        let journal = checked_journal(&admin, account).await;
        let balance = patiently(|| admin.balance(account)).await;
        assert_eq!(balance.held, 0, "{account}: no hold left open");
        let settled: HashMap<u64, u64> = journal
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .filter_map(|e| Some((e.hold_id?, e.amount)))
            .collect();
        for (id, charged) in acked.get(account).into_iter().flatten() {
            assert_eq!(
                settled.get(id),
                Some(charged),
                "{account}: an acknowledged settlement of hold {id} is in the journal"
            );
        }
    }
}

/// The durable record on a cluster: two replicas spend on accounts spread over every master
/// (journal limit 5) while both drain; every entry is recorded exactly once, and the journal
/// paged from the other replica (the record, then what Redis has not drained) is the whole
/// history and adds up to the balance.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_drains_into_the_record_exactly_once_on_a_cluster() {
    use pg_server::PgServer;

    let cluster = RedisCluster::start();
    let pg = PgServer::shared();
    let schema = PgServer::schema("cluster_record");
    let recorded = || {
        patient().journal_limit(5).record(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy(&pg.url())
                .unwrap(),
            &schema,
        )
    };
    let replicas = [
        replica(&cluster, recorded()).await,
        replica(&cluster, recorded()).await,
    ];
    let accounts: Vec<String> = (0..12).map(|i| format!("acct_{i}")).collect();
    assert_on_every_master(&cluster, &accounts);
    for account in &accounts {
        replicas[0]
            .ledger()
            .top_up(account, 1_000, "invoice-1")
            .await
            .unwrap();
    }
    let mut work = Vec::new();
    for backend in &replicas {
        for account in &accounts {
            let (ledger, account) = (backend.ledger(), account.clone());
            work.push(tokio::spawn(async move {
                record::spend(&ledger, &account, 15).await
            }));
        }
        work.push(record::drain_repeatedly(
            backend,
            5,
            Duration::from_millis(50),
        ));
    }
    for task in work {
        task.await.unwrap();
    }
    for backend in &replicas {
        backend.drain_record().await.unwrap();
    }
    for account in &accounts {
        let journal = checked_journal(&replicas[1].ledger(), account).await;
        assert_eq!(
            journal.len(),
            1 + 2 * 30,
            "{account}: a top-up, 30 reserves and their closes"
        );
        let balance = replicas[1].ledger().balance(account).await.unwrap();
        assert_eq!(balance.balance, 1_000 - 3 * 20, "{account}");
        let rows = pg.psql(&format!(
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM {schema}.redis_journal \
             WHERE account = '{account}'"
        ));
        assert_eq!(rows, "61 61", "{account}: every entry recorded, each once");
    }
}
