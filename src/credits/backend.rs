//! For ledger implementors: building the values a [`Ledger`](super::Ledger) returns.
//!
//! Users of a ledger receive these values; only a backend makes them, so their constructors are
//! here rather than on the types.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use tollgate::credits::{backend, ledger::{Balance, EntryKind}};
//!
//! let ttl = Some(Duration::from_secs(600));
//! let hold = backend::hold(7, "acct_1".into(), 30, 70, Some("req_1".into()), ttl);
//! assert_eq!((hold.id(), hold.amount(), hold.request_id()), (7, 30, Some("req_1")));
//! assert_eq!(hold.ttl(), ttl);
//!
//! let settlement = backend::settlement(12, 88, true);
//! assert_eq!(settlement.charged, 12);
//!
//! let entry = backend::journal_entry(1, SystemTime::UNIX_EPOCH, EntryKind::TopUp, 100, 0, None, 100, 0);
//! assert_eq!(entry.kind, EntryKind::TopUp);
//! assert_eq!(backend::top_up(true, Balance::new(100, 0, 0)).balance.available, 100);
//! assert_eq!(backend::expired(1, 30).charged, 30);
//! ```

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::ledger::{
    Balance, EntryKind, Expired, Fingerprint, Hold, JournalEntry, Settlement, TopUp,
};

pub use super::body::pending_settlements;

/// A hold of `amount` credits on `account`, with the ledger's id `id`, leaving `available_after`
/// credits available, placed for the request `request_id` (as the
/// [`ReserveRequest`](super::ledger::ReserveRequest) gave it), expired after `ttl` of idle
/// time unless [extended](super::Ledger::extend) (`None`: never).
pub fn hold(
    id: u64,
    account: Arc<str>,
    amount: u64,
    available_after: u64,
    request_id: Option<Arc<str>>,
    ttl: Option<Duration>,
) -> Hold {
    Hold::new(id, account, amount, available_after)
        .with_request_id(request_id)
        .with_ttl(ttl)
}

/// The closing of a hold: `charged` credits taken, the account's `balance` afterwards, and
/// whether the hold `was_open` (false: it was already closed and nothing changed).
pub fn settlement(charged: u64, balance: u64, was_open: bool) -> Settlement {
    Settlement::new(charged, balance, was_open)
}

/// A top-up's answer: whether this call `applied` it, and the account afterwards.
pub fn top_up(applied: bool, balance: Balance) -> TopUp {
    TopUp::new(applied, balance)
}

/// What an expiry pass settled: `holds` holds, `charged` credits.
pub fn expired(holds: u64, charged: u64) -> Expired {
    Expired::new(holds, charged)
}

/// A journal entry (its request id, key id and idempotency key are public fields, unset here).
#[allow(clippy::too_many_arguments)]
pub fn journal_entry(
    seq: u64,
    at: SystemTime,
    kind: EntryKind,
    amount: u64,
    hold: u64,
    hold_id: Option<u64>,
    balance_after: u64,
    held_after: u64,
) -> JournalEntry {
    JournalEntry::new(
        seq,
        at,
        kind,
        amount,
        hold,
        hold_id,
        balance_after,
        held_after,
    )
}

/// A fingerprint from its bytes (as a remote ledger stores it).
pub fn fingerprint(bytes: [u8; 16]) -> Fingerprint {
    Fingerprint::from_bytes(bytes)
}
