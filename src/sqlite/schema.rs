//! Opening the file: checks, pragmas and the versioned migrations.
//!
//! The migrations are SQL files under `migrations/`, embedded with `include_str!` and applied in
//! order, each in one transaction with its row in `tollgate_schema`. A small table of our own
//! rather than sqlx's `Migrator`: no `migrate` feature (and its checksum machinery) to build, and
//! the three refusals an operator must be able to read apart (not a tollgate database, a newer
//! schema, a file that cannot be written) are decided here with their own messages.

use std::{
    path::Path,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteLockingMode, SqliteSynchronous},
    ConnectOptions, Connection, SqliteConnection,
};

use super::{OpenError, OpenErrorKind};

/// `PRAGMA application_id` of a tollgate database: `"Toll"`.
const APPLICATION_ID: i64 = 0x546f_6c6c;
const SET_APPLICATION_ID: &str = "PRAGMA application_id = 1416588396";

/// The migrations, in order: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "ledger and key store",
    include_str!("migrations/0001_initial.sql"),
)];

/// The schema version this build creates and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Open `path` (creating it), check it is ours and writable, migrate it.
pub(crate) async fn open(path: &Path) -> Result<SqliteConnection, OpenError> {
    let fail = |kind| OpenError::new(path, kind);
    if path.is_dir() {
        return Err(fail(OpenErrorKind::NotATollgateDatabase(
            "it is a directory".into(),
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(fail(OpenErrorKind::Other(format!(
                "the directory {} does not exist",
                dir.display()
            ))));
        }
    }
    let existed = path.exists();
    if existed {
        sniff(path).map_err(fail)?;
    }
    writable_dir(path).map_err(fail)?;
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| fail(OpenErrorKind::Other(e.to_string())))?
        .filename(path)
        .create_if_missing(true)
        // One process owns the file: a second one is refused instead of keeping its own books.
        .locking_mode(SqliteLockingMode::Exclusive)
        .journal_mode(SqliteJournalMode::Wal)
        // A commit is durable against a killed process once written; an fsync (FULL) makes it
        // durable against a power loss: every top-up and admin change, and the group commits
        // at least every 25 ms (see the ledger's writer).
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_millis(500))
        .foreign_keys(true)
        .statement_cache_capacity(256);
    let mut conn = options
        .connect()
        .await
        .map_err(|e| fail(classify(&e, existed)))?;
    match check_and_migrate(&mut conn).await {
        Ok(()) => Ok(conn),
        Err(kind) => {
            let _ = conn.close().await;
            Err(fail(kind))
        }
    }
}

/// A file that exists must start like a SQLite database (or be empty).
fn sniff(path: &Path) -> Result<(), OpenErrorKind> {
    use std::io::Read;
    // Opened for writing (nothing is written): a read-only file is refused here, by name,
    // rather than as SQLite's I/O error on its first lock.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => OpenErrorKind::ReadOnly(e.to_string()),
            _ => OpenErrorKind::Other(e.to_string()),
        })?;
    let mut header = [0u8; 16];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(OpenErrorKind::Other(e.to_string())),
        }
    }
    if read == 0 || header == *b"SQLite format 3\0" {
        Ok(())
    } else {
        Err(OpenErrorKind::NotATollgateDatabase(
            "not a SQLite file".into(),
        ))
    }
}

/// SQLite creates the database and its write-ahead log beside it: the directory must be
/// writable (probed with a file of our own, removed at once).
fn writable_dir(path: &Path) -> Result<(), OpenErrorKind> {
    let mut probe = path.as_os_str().to_owned();
    probe.push("-tollgate-probe");
    let probe = std::path::PathBuf::from(probe);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(OpenErrorKind::ReadOnly(
            format!("its directory is not writable, so the file and its write-ahead log cannot be created: {e}"),
        )),
        Err(e) if e.raw_os_error() == Some(30) => Err(OpenErrorKind::ReadOnly(format!(
            "read-only file system: {e}"
        ))),
        Err(e) => Err(OpenErrorKind::Other(e.to_string())),
    }
}

fn classify(error: &sqlx::Error, existed: bool) -> OpenErrorKind {
    let message = error.to_string();
    let code = match error {
        sqlx::Error::Database(e) => e.code().and_then(|c| c.parse::<i32>().ok()),
        _ => None,
    };
    // Primary result codes: the low byte of the extended code.
    match code.map(|c| c & 0xff) {
        Some(26) => OpenErrorKind::NotATollgateDatabase(message),
        Some(8) => OpenErrorKind::ReadOnly(message),
        Some(5 | 6) => OpenErrorKind::InUse,
        Some(14) if !existed => OpenErrorKind::ReadOnly(format!(
            "{message}: cannot create the file or its write-ahead log in its directory"
        )),
        Some(14) => OpenErrorKind::ReadOnly(format!(
            "{message}: cannot open the file or create its write-ahead log"
        )),
        _ => OpenErrorKind::Other(message),
    }
}

async fn check_and_migrate(conn: &mut SqliteConnection) -> Result<(), OpenErrorKind> {
    let sql = |e: sqlx::Error| classify(&e, true);
    let application_id: i64 = sqlx::query_scalar("PRAGMA application_id")
        .fetch_one(&mut *conn)
        .await
        .map_err(sql)?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut *conn)
            .await
            .map_err(sql)?;
    let current = if application_id == APPLICATION_ID {
        let version: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM tollgate_schema")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| OpenErrorKind::Corrupt(format!("no schema version table: {e}")))?;
        version.unwrap_or(0)
    } else if tables.is_empty() && application_id == 0 {
        0
    } else if application_id != 0 {
        return Err(OpenErrorKind::NotATollgateDatabase(format!(
            "a SQLite database of another application (application_id {application_id:#x})"
        )));
    } else {
        let shown: Vec<&str> = tables.iter().take(5).map(String::as_str).collect();
        return Err(OpenErrorKind::NotATollgateDatabase(format!(
            "a SQLite database with other tables: {}",
            shown.join(", ")
        )));
    };
    if current > SCHEMA_VERSION {
        return Err(OpenErrorKind::NewerSchema {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, description, migration) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let mut tx = conn.begin().await.map_err(sql)?;
        if *version == 1 {
            sqlx::raw_sql(
                "CREATE TABLE tollgate_schema (
                    version       INTEGER PRIMARY KEY,
                    description   TEXT NOT NULL,
                    applied_at_ms INTEGER NOT NULL
                )",
            )
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
            sqlx::raw_sql(SET_APPLICATION_ID)
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
        }
        sqlx::raw_sql(*migration)
            .execute(&mut *tx)
            .await
            .map_err(|e| OpenErrorKind::Other(format!("migration {version}: {e}")))?;
        sqlx::query(
            "INSERT INTO tollgate_schema (version, description, applied_at_ms) VALUES (?, ?, ?)",
        )
        .bind(version)
        .bind(description)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(sql)?;
        tx.commit().await.map_err(sql)?;
    }
    // Prove the file can be written now rather than at the first settlement.
    sqlx::query("UPDATE tollgate_meta SET value = ? WHERE name = 'opened_at_ms'")
        .bind(now_ms())
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    millis(SystemTime::now())
}

pub(crate) fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
