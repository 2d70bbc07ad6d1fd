//! The SQLite backend across restarts: what is acknowledged is on disk, holds a dead process
//! left are closed at startup, and storage that is not ours is refused with its path and cause.
#![cfg(feature = "sqlite")]

#[path = "support/temp_dir.rs"]
mod temp_dir;

use sqlx::{ConnectOptions, Connection};
use temp_dir::TempDir;
use tollgate::{
    auth::{AccountRecord, AccountStatus, KeyAdmin, KeyRecord, KeyStatus, KeyStore},
    credits::{
        conformance,
        ledger::{Balance, EntryKind, Fingerprint, JournalQuery, ReserveRequest},
        Ledger, LedgerAdmin,
    },
    keys,
    sqlite::{OpenErrorKind, SqliteBackend, SCHEMA_VERSION},
};

#[tokio::test]
async fn books_and_keys_survive_a_restart() {
    let dir = TempDir::new("sqlite-restart");
    let path = dir.join("tollgate.db");
    let key = {
        let backend = SqliteBackend::open(&path).await.unwrap();
        let (ledger, store) = (backend.ledger(), backend.key_store());
        store
            .put_account(AccountRecord::new("acct_1", "free"))
            .await
            .unwrap();
        store
            .put_account(AccountRecord::new("acct_2", "free"))
            .await
            .unwrap();
        store
            .set_plan_models("free", Some(vec!["small".into()]))
            .await
            .unwrap();
        let record = KeyRecord::new("key_1", "acct_1")
            .ip_allowlist("10.0.0.0/8, 2001:db8::/32".parse().unwrap())
            .scopes(["chat"])
            .metadata("team", "search");
        let key = store.create_key("sk-test-", record).await.unwrap();
        store
            .insert_key(
                keys::digest("sk-revoked"),
                KeyRecord::new("key_2", "acct_2"),
            )
            .await
            .unwrap();
        store.revoke_key("key_2").await.unwrap();
        store.freeze_account("acct_2").await.unwrap();

        ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
        let fp = Fingerprint::of(&[b"POST", b"/v1/chat/completions"]);
        let hold = ledger
            .reserve(ReserveRequest::new("acct_1", 30).idempotency(Some(("retry-1".into(), fp))))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        ledger.settle(&hold, 12).await.unwrap();
        backend.close().await.unwrap();
        key
    };

    let backend = SqliteBackend::open(&path).await.unwrap();
    let (ledger, store) = (backend.ledger(), backend.key_store());
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(88, 0, 0)
    );
    // The starting balance of a config, applied again at startup: not twice.
    assert!(
        !ledger
            .top_up("acct_1", 100, "invoice-1")
            .await
            .unwrap()
            .applied
    );
    // The idempotency key is remembered: the retry is replayed, not charged.
    let fp = Fingerprint::of(&[b"POST", b"/v1/chat/completions"]);
    let retry = ledger
        .reserve(ReserveRequest::new("acct_1", 30).idempotency(Some(("retry-1".into(), fp))))
        .await
        .unwrap();
    assert!(retry.into_hold().is_none(), "replayed after the restart");
    let journal = conformance::assert_books(&ledger, "acct_1", "restart").await;
    assert_eq!(
        journal.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Settle]
    );
    // Hold ids go on after the restart.
    let hold = ledger
        .reserve(ReserveRequest::new("acct_1", 1))
        .await
        .unwrap()
        .into_hold()
        .unwrap();
    assert!(hold.id() > journal[1].hold_id.unwrap());
    ledger.release(&hold).await.unwrap();

    let found = store.lookup(&key.digest()).await.unwrap().unwrap();
    assert_eq!(found.caller.key_id(), "key_1");
    assert!(found.caller.may_use_model("small"));
    assert!(!found.caller.may_use_model("large"));
    let record = store.key("key_1").await.unwrap().unwrap();
    assert_eq!(record.scopes, ["chat"]);
    assert_eq!(record.metadata["team"], "search");
    assert_eq!(
        record.ip_allowlist.unwrap().to_string(),
        "10.0.0.0/8, 2001:db8::/32"
    );
    let revoked = store
        .lookup(&keys::digest("sk-revoked"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, KeyStatus::Revoked);
    assert_eq!(
        store.account("acct_2").await.unwrap().unwrap().status,
        AccountStatus::Frozen
    );
}

#[tokio::test]
async fn holds_left_open_are_settled_at_their_held_amount_at_startup() {
    let dir = TempDir::new("sqlite-holds");
    let path = dir.join("tollgate.db");
    {
        let backend = SqliteBackend::open(&path).await.unwrap();
        let ledger = backend.ledger();
        ledger.top_up("acct_1", 100, "invoice-1").await.unwrap();
        let settled = ledger
            .reserve(ReserveRequest::new("acct_1", 5))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        ledger.settle(&settled, 5).await.unwrap();
        // Two holds the process never closes (it "dies" with them open).
        let _a = ledger
            .reserve(ReserveRequest::new("acct_1", 30))
            .await
            .unwrap();
        let _b = ledger
            .reserve(ReserveRequest::new("acct_1", 20))
            .await
            .unwrap();
        backend.close().await.unwrap();
    }
    let ledger = SqliteBackend::open(&path).await.unwrap().ledger();
    assert_eq!(
        ledger.balance("acct_1").await.unwrap(),
        Balance::new(45, 0, 0),
        "closed at startup, charged their held amounts"
    );
    let journal = conformance::assert_books(&ledger, "acct_1", "startup").await;
    let expired: Vec<(u64, u64)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Expire)
        .map(|e| (e.amount, e.hold))
        .collect();
    assert_eq!(expired.len(), 2);
    assert_eq!(expired.iter().map(|(a, _)| a).sum::<u64>(), 50);
    assert!(expired.iter().all(|(a, h)| a == h));
}

#[tokio::test]
async fn a_second_opener_is_refused_while_the_first_owns_the_file() {
    let dir = TempDir::new("sqlite-in-use");
    let path = dir.join("tollgate.db");
    let first = SqliteBackend::open(&path).await.unwrap();
    first.ledger().top_up("acct_1", 1, "t").await.unwrap();
    let error = SqliteBackend::open(&path).await.unwrap_err();
    assert!(matches!(error.kind(), OpenErrorKind::InUse), "{error}");
    assert!(error.to_string().contains("in use by another process"));
    assert!(error.to_string().contains(&path.display().to_string()));
    first.close().await.unwrap();
    let again = SqliteBackend::open(&path).await.unwrap();
    assert_eq!(again.ledger().balance("acct_1").await.unwrap().balance, 1);
}

#[tokio::test]
async fn storage_that_is_not_ours_is_refused_with_its_path_and_cause() {
    let dir = TempDir::new("sqlite-bad");

    let text = dir.join("notes.db");
    std::fs::write(&text, "this is not a database\n").unwrap();
    let error = SqliteBackend::open(&text).await.unwrap_err();
    assert!(matches!(
        error.kind(),
        OpenErrorKind::NotATollgateDatabase(_)
    ));
    assert_eq!(
        error.to_string(),
        format!(
            "{} is not a tollgate database (not a SQLite file)",
            text.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(&text).unwrap(),
        "this is not a database\n",
        "left untouched"
    );

    let foreign = dir.join("foreign.db");
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let error = SqliteBackend::open(&foreign).await.unwrap_err();
    assert!(
        error.to_string().ends_with(
            "is not a tollgate database (a SQLite database with other tables: invoices)"
        ),
        "{error}"
    );

    let newer = dir.join("newer.db");
    SqliteBackend::open(&newer)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&newer)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "INSERT INTO tollgate_schema (version, description, applied_at_ms) VALUES (99, 'future', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let error = SqliteBackend::open(&newer).await.unwrap_err();
    match error.kind() {
        OpenErrorKind::NewerSchema { found, supported } => {
            assert_eq!((*found, *supported), (99, SCHEMA_VERSION));
        }
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("schema version 99, newer than"));

    let error = SqliteBackend::open(dir.path()).await.unwrap_err();
    assert!(error.to_string().contains("is a directory"), "{error}");
    let error = SqliteBackend::open(dir.join("missing/tollgate.db"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("does not exist"), "{error}");
}

#[tokio::test]
async fn settlements_are_on_disk_within_the_durability_window() {
    let dir = TempDir::new("sqlite-window");
    let path = dir.join("tollgate.db");
    let backend = SqliteBackend::open(&path).await.unwrap();
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 1_000, "invoice-1").await.unwrap();
    for _ in 0..200 {
        let hold = ledger
            .reserve(ReserveRequest::new("acct_1", 3))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        ledger.settle(&hold, 2).await.unwrap();
    }
    // Not flushed: the group commit has written them within the window.
    tokio::time::sleep(tollgate::sqlite::DURABILITY_WINDOW).await;
    let durability = ledger.durability();
    assert_eq!(durability.movements, 1 + 400);
    assert!(
        durability.max_lag <= tollgate::sqlite::DURABILITY_WINDOW,
        "{durability:?}"
    );
    let journal = ledger
        .journal("acct_1", JournalQuery::new().after(Some(400)))
        .await
        .unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].balance_after, 600);
    backend.close().await.unwrap();
    let reopened = SqliteBackend::open(&path).await.unwrap().ledger();
    assert_eq!(
        reopened.balance("acct_1").await.unwrap(),
        Balance::new(600, 0, 0)
    );
}

/// Revocation is final on SQLite as on the other key stores, and stays so across a restart.
#[tokio::test]
async fn revocation_is_final_and_survives_a_restart() {
    use tollgate::auth::KeyAdminError;
    let dir = TempDir::new("sqlite-revoked");
    let path = dir.join("tollgate.db");
    {
        let backend = SqliteBackend::open(&path).await.unwrap();
        let store = backend.key_store();
        store
            .put_account(AccountRecord::new("acct_1", "free"))
            .await
            .unwrap();
        store
            .insert_key(
                keys::digest("sk-test-revoked-0000"),
                KeyRecord::new("key_1", "acct_1"),
            )
            .await
            .unwrap();
        store.revoke_key("key_1").await.unwrap();
        for status in [KeyStatus::Disabled, KeyStatus::Active] {
            let refused = store.set_key_status("key_1", status).await;
            assert!(
                matches!(refused, Err(KeyAdminError::Revoked(_))),
                "{refused:?}"
            );
        }
        let mut record = store.key("key_1").await.unwrap().unwrap();
        record.status = KeyStatus::Active;
        assert!(matches!(
            store.update_key(record).await,
            Err(KeyAdminError::Revoked(_))
        ));
        backend.close().await.unwrap();
    }
    let store = SqliteBackend::open(&path).await.unwrap().key_store();
    assert_eq!(
        store.key("key_1").await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
}

/// SQLite answers a reserve at once (`Ledger::reserve_now`, the credits layer's immediate path),
/// exactly as `reserve` would, and that hold is on disk like any other.
#[tokio::test]
async fn a_reserve_is_answered_at_once_and_reaches_the_file() {
    use tollgate::credits::ledger::{Reservation, ReserveError};
    let dir = TempDir::new("sqlite-now");
    let path = dir.join("tollgate.db");
    let backend = SqliteBackend::open(&path).await.unwrap();
    let ledger = backend.ledger();
    ledger.top_up("acct_1", 10, "invoice-1").await.unwrap();
    let Ok(Ok(Reservation::Held(hold))) = ledger.reserve_now(ReserveRequest::new("acct_1", 4))
    else {
        panic!("placed at once");
    };
    assert_eq!(hold.available_after(), 6);
    assert!(matches!(
        ledger.reserve_now(ReserveRequest::new("acct_1", 7)),
        Ok(Err(ReserveError::Insufficient { .. }))
    ));
    ledger.settle(&hold, 3).await.unwrap();
    backend.close().await.unwrap();
    let reopened = SqliteBackend::open(&path).await.unwrap().ledger();
    assert_eq!(
        reopened.balance("acct_1").await.unwrap(),
        Balance::new(7, 0, 0)
    );
    let kinds: Vec<EntryKind> = reopened
        .journal("acct_1", JournalQuery::new())
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Settle]
    );
}
