//! The books of an account, checked from its journal after a test's load or fault.

use std::time::{Duration, Instant};

use tollgate::credits::{
    conformance,
    ledger::{EntryKind, JournalEntry, JournalQuery},
    LedgerAdmin,
};

/// A verification read, retried for up to 10 s: after a fault injected with short deadlines the
/// backend may need a moment (a reconnect, a pool refill) before it answers.
pub async fn patiently<T, F, Fut>(read: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tollgate::BackendError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read().await {
            Ok(value) => return value,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the backend did not answer a verification read: {error}"),
        }
    }
}

/// [`conformance::assert_books`] once the backend answers again; returns the journal.
#[allow(dead_code)] // not every test file that includes this module uses every function
pub async fn checked_journal(ledger: &impl LedgerAdmin, account: &str) -> Vec<JournalEntry> {
    patiently(|| ledger.journal(account, JournalQuery::new().limit(1))).await;
    conformance::assert_books(ledger, account, account).await
}

/// [`conformance::assert_books`] once the backend answers again: balance = Σ top-ups − Σ
/// charges, held = Σ holds placed − Σ closed, no gaps, never negative, no hold closed twice.
/// Returns (charged, reserves placed).
#[allow(dead_code)] // not every test file that includes this module uses both functions
pub async fn assert_books(ledger: &impl LedgerAdmin, account: &str) -> (u64, u64) {
    let journal = checked_journal(ledger, account).await;
    let charged = journal
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Settle | EntryKind::Expire))
        .map(|e| e.amount)
        .sum();
    let reserves = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Reserve)
        .count() as u64;
    (charged, reserves)
}
