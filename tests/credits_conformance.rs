//! The ledger conformance scenarios (`tollgate::credits::conformance`) on every backend: the
//! memory ledger on a fake clock, Redis (a real `redis-server`) on the server's clock.

use std::time::{Duration, SystemTime};

use tollgate::credits::{conformance, ledger::Clock, ManualClock, MemoryLedger};

/// The memory ledger on a clock the test moves.
struct Memory(ManualClock);

impl conformance::Fixture for Memory {
    type Ledger = MemoryLedger;

    async fn ledger(&self, hold_ttl: Duration) -> MemoryLedger {
        MemoryLedger::builder()
            .hold_ttl(hold_ttl)
            .clock(self.0.clone())
            .build()
    }

    async fn advance(&self, by: Duration) {
        self.0.advance(by);
    }

    fn now(&self) -> SystemTime {
        self.0.now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ledger_passes_the_conformance_scenarios() {
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    conformance::run(&Memory(clock)).await;
}

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
mod redis {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::{Duration, SystemTime},
    };

    use tollgate::{
        credits::conformance,
        redis::{RedisBackend, RedisLedger, RedisOptions},
    };

    use super::redis_server::RedisServer;

    /// Redis on its own clock: a fresh key prefix per scenario, real sleeps past a TTL.
    struct Redis {
        server: RedisServer,
        scenarios: AtomicU32,
    }

    impl conformance::Fixture for Redis {
        type Ledger = RedisLedger;

        async fn ledger(&self, hold_ttl: Duration) -> RedisLedger {
            let n = self.scenarios.fetch_add(1, Ordering::Relaxed);
            // Exactness, not time-outs, is tested: 1000 concurrent scripts on a loaded machine
            // may take longer than the default 500 ms answer time.
            let options = RedisOptions::new()
                .prefix(format!("conformance-{n}"))
                .hold_ttl(hold_ttl)
                .response_timeout(Duration::from_secs(10));
            RedisBackend::connect_with(&self.server.url(), options)
                .await
                .expect("connect")
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
    async fn redis_ledger_passes_the_conformance_scenarios() {
        let fixture = Redis {
            server: RedisServer::start(),
            scenarios: AtomicU32::new(0),
        };
        conformance::run(&fixture).await;
    }
}

#[cfg(feature = "sqlite")]
#[path = "support/temp_dir.rs"]
mod temp_dir;

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::{Duration, SystemTime},
    };

    use tollgate::{
        credits::{conformance, ledger::Clock, ManualClock},
        sqlite::{SqliteBackend, SqliteLedger, SqliteOptions},
    };

    use super::temp_dir::TempDir;

    /// SQLite: a fresh database file per scenario (journals are read back from the file), on a
    /// clock the test moves.
    struct Sqlite {
        dir: TempDir,
        clock: ManualClock,
        scenarios: AtomicU32,
    }

    impl conformance::Fixture for Sqlite {
        type Ledger = SqliteLedger;

        async fn ledger(&self, hold_ttl: Duration) -> SqliteLedger {
            let n = self.scenarios.fetch_add(1, Ordering::Relaxed);
            let options = SqliteOptions::new()
                .hold_ttl(hold_ttl)
                .clock(self.clock.clone());
            SqliteBackend::open_with(self.dir.join(&format!("scenario-{n}.db")), options)
                .await
                .expect("open")
                .ledger()
        }

        async fn advance(&self, by: Duration) {
            self.clock.advance(by);
        }

        fn now(&self) -> SystemTime {
            self.clock.now()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_ledger_passes_the_conformance_scenarios() {
        let fixture = Sqlite {
            dir: TempDir::new("conformance"),
            clock: ManualClock::new(SystemTime::now()),
            scenarios: AtomicU32::new(0),
        };
        conformance::run(&fixture).await;
    }
}

#[cfg(feature = "postgres")]
#[path = "support/pg_server.rs"]
mod pg_server;

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::{Duration, SystemTime};

    use tollgate::{
        credits::conformance,
        postgres::{PostgresBackend, PostgresLedger, PostgresOptions},
    };

    use super::pg_server::PgServer;

    /// PostgreSQL on its own clock: a fresh schema per scenario, real sleeps past a TTL.
    struct Postgres(&'static PgServer);

    impl conformance::Fixture for Postgres {
        type Ledger = PostgresLedger;

        async fn ledger(&self, hold_ttl: Duration) -> PostgresLedger {
            let options = PostgresOptions::new()
                .schema(PgServer::schema("conformance"))
                .hold_ttl(hold_ttl)
                .acquire_timeout(Duration::from_secs(5))
                .statement_timeout(Duration::from_secs(5));
            let backend = PostgresBackend::connect_with(&self.0.url(), options)
                .await
                .expect("connect");
            backend.migrate().await.expect("migrate");
            backend.ledger()
        }

        async fn advance(&self, by: Duration) {
            tokio::time::sleep(by).await;
        }

        fn now(&self) -> SystemTime {
            SystemTime::now()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_ledger_passes_the_conformance_scenarios() {
        conformance::run(&Postgres(PgServer::shared())).await;
    }
}
