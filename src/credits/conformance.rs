//! Scenarios every [`Ledger`] must pass: the money invariants, run against each backend.
//!
//! [`run`] plays each scenario on a fresh ledger made by a [`Fixture`]: exactly K of N concurrent
//! holds when the balance covers K, never negative, a settlement above the hold, release, expiry
//! at the held amount, idempotent top-ups and reserves, a hold kept alive by its streaming
//! response for longer than its TTL (and expired when the response is idle), and after every
//! scenario the books:
//! `balance == Σ top-ups − Σ charges` and `held == Σ holds placed − Σ holds closed` from the
//! journal, one entry per movement, sequence numbers without gaps, no hold closed twice.
//!
//! A backend whose clock the test controls (the memory ledger on a [`ManualClock`]) advances
//! it; a backend that reads its server's clock (Redis, SQL) sleeps: [`Fixture::advance`] does
//! whichever fits, and the scenarios only use short hold TTLs ([`EXPIRY_TTL`]).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use tollgate::credits::{conformance, ManualClock, MemoryLedger, ledger::Clock};
//!
//! struct Memory(ManualClock);
//!
//! impl conformance::Fixture for Memory {
//!     type Ledger = MemoryLedger;
//!
//!     async fn ledger(&self, hold_ttl: Duration) -> MemoryLedger {
//!         MemoryLedger::builder().hold_ttl(hold_ttl).clock(self.0.clone()).build()
//!     }
//!
//!     async fn advance(&self, by: Duration) {
//!         self.0.advance(by);
//!     }
//!
//!     fn now(&self) -> SystemTime {
//!         self.0.now()
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! conformance::run(&Memory(ManualClock::default())).await;
//! # }
//! ```
//!
//! [`ManualClock`]: super::ManualClock

use std::{future::Future, time::Duration, time::SystemTime};

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower_layer::Layer;
use tower_service::Service;

use super::{CreditsLayer, Price, Pricing};
use crate::{inspect::InspectedBody, Caller};

use super::ledger::{
    Balance, EntryKind, Fingerprint, JournalEntry, JournalQuery, Ledger, LedgerAdmin, ReserveError,
    ReserveRequest, TopUpError,
};

/// The hold TTL of the expiry scenario: short, so that a backend on a server's clock sleeps
/// little.
pub const EXPIRY_TTL: Duration = Duration::from_millis(400);

/// The hold TTL of every other scenario: long enough that no hold expires while it runs.
pub const LONG_TTL: Duration = Duration::from_secs(15 * 60);

/// How a backend's test gives the scenarios their ledgers and their time.
pub trait Fixture {
    /// The ledger under test.
    type Ledger: LedgerAdmin + Clone;

    /// A fresh, empty ledger (no account of an earlier scenario visible) whose holds expire
    /// after `hold_ttl` of idle time (from the reserve, or the last
    /// [`extend`](super::Ledger::extend)).
    fn ledger(&self, hold_ttl: Duration) -> impl Future<Output = Self::Ledger>;

    /// Let at least `by` pass on the ledgers' clock: advance a fake clock, or sleep.
    fn advance(&self, by: Duration) -> impl Future<Output = ()>;

    /// The ledgers' clock now (what [`LedgerAdmin::expire_holds`] is given).
    fn now(&self) -> SystemTime;
}

/// Run every scenario, each on a fresh ledger from `fixture`.
///
/// Must run inside a Tokio runtime: the concurrency scenarios spawn tasks.
///
/// # Panics
///
/// On the first expectation a scenario does not meet, naming the scenario.
pub async fn run<F: Fixture>(fixture: &F) {
    exactly_k_of_n_concurrent_holds(&fixture.ledger(LONG_TTL).await).await;
    settle_above_the_hold_never_goes_negative(&fixture.ledger(LONG_TTL).await).await;
    release_charges_nothing_and_closes_once(&fixture.ledger(LONG_TTL).await).await;
    expired_holds_settle_at_their_held_amount(fixture).await;
    top_ups_are_idempotent(&fixture.ledger(LONG_TTL).await).await;
    top_ups_while_holds_run_are_all_counted(&fixture.ledger(LONG_TTL).await).await;
    reserves_are_idempotent(&fixture.ledger(LONG_TTL).await).await;
    journal_pages_and_unknown_accounts(&fixture.ledger(LONG_TTL).await).await;
    holds_live_as_long_as_their_response(fixture).await;
}

/// Checks the books of `account` from its journal; returns the journal.
///
/// `balance == Σ top-ups − Σ (settle + expire)`, `held == Σ reserve.hold − Σ closes.hold`, the
/// number of open holds, sequence numbers from 1 without gaps, every entry's `held_after <=
/// balance_after`, the last entry's figures equal to the balance, and no hold closed twice.
///
/// # Panics
///
/// When any of these does not hold, or the ledger fails.
pub async fn assert_books<L: LedgerAdmin>(
    ledger: &L,
    account: &str,
    scenario: &str,
) -> Vec<JournalEntry> {
    let journal = ledger
        .journal(account, JournalQuery::new())
        .await
        .unwrap_or_else(|e| panic!("{scenario}: journal: {e}"));
    let balance = ledger
        .balance(account)
        .await
        .unwrap_or_else(|e| panic!("{scenario}: balance: {e}"));
    let sum = |kinds: &[EntryKind], f: fn(&JournalEntry) -> u64| -> u64 {
        journal
            .iter()
            .filter(|e| kinds.contains(&e.kind))
            .map(f)
            .sum()
    };
    let credited = sum(&[EntryKind::TopUp], |e| e.amount);
    let charged = sum(&[EntryKind::Settle, EntryKind::Expire], |e| e.amount);
    assert_eq!(
        credited.checked_sub(charged),
        Some(balance.balance),
        "{scenario}: balance = Σ top-ups − Σ charges"
    );
    let reserved = sum(&[EntryKind::Reserve], |e| e.hold);
    let closed = sum(
        &[EntryKind::Settle, EntryKind::Release, EntryKind::Expire],
        |e| e.hold,
    );
    assert_eq!(
        reserved.checked_sub(closed),
        Some(balance.held),
        "{scenario}: held = Σ holds placed − Σ holds closed"
    );
    let placed = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Reserve)
        .count();
    let mut closes: Vec<u64> = journal
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EntryKind::Settle | EntryKind::Release | EntryKind::Expire
            )
        })
        .map(|e| {
            e.hold_id
                .unwrap_or_else(|| panic!("{scenario}: a close without a hold id"))
        })
        .collect();
    let total = closes.len();
    closes.sort_unstable();
    closes.dedup();
    assert_eq!(closes.len(), total, "{scenario}: no hold closed twice");
    assert_eq!(
        (placed - total) as u64,
        balance.holds,
        "{scenario}: open holds = placed − closed"
    );
    for (i, entry) in journal.iter().enumerate() {
        assert_eq!(entry.seq, i as u64 + 1, "{scenario}: journal without gaps");
        assert!(
            entry.held_after <= entry.balance_after,
            "{scenario}: never negative (entry {})",
            entry.seq
        );
    }
    if let Some(last) = journal.last() {
        assert_eq!(
            (last.balance_after, last.held_after),
            (balance.balance, balance.held),
            "{scenario}: the last entry shows the balance"
        );
    }
    journal
}

fn kinds(journal: &[JournalEntry]) -> Vec<EntryKind> {
    journal.iter().map(|e| e.kind).collect()
}

async fn balance<L: LedgerAdmin>(ledger: &L, account: &str) -> Balance {
    ledger.balance(account).await.expect("balance")
}

/// Exact K of N: a balance covering K holds, N > K concurrent reserve + settle.
async fn exactly_k_of_n_concurrent_holds<L: LedgerAdmin + Clone>(ledger: &L) {
    const SCENARIO: &str = "exactly-k-of-n";
    let (k, price, n) = (300u64, 3u64, 1_000usize);
    ledger
        .top_up("acct_k", k * price, "invoice-1")
        .await
        .expect("top-up");
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let request = ReserveRequest::new("acct_k", price)
                    .request_id(Some(format!("req-{i}").into()));
                match ledger.reserve(request).await {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().expect("a hold");
                        let settled = ledger.settle(&hold, price).await.expect("settle");
                        assert!(settled.was_open, "{SCENARIO}: settled once");
                        assert_eq!(settled.charged, price, "{SCENARIO}: charged the price");
                        true
                    }
                    Err(ReserveError::Insufficient { required, .. }) => {
                        assert_eq!(required, price, "{SCENARIO}: required");
                        false
                    }
                    Err(other) => panic!("{SCENARIO}: {other}"),
                }
            })
        })
        .collect();
    let mut admitted = 0u64;
    for task in tasks {
        admitted += u64::from(task.await.expect("task"));
    }
    assert_eq!(admitted, k, "{SCENARIO}: exactly K admitted");
    assert_eq!(
        balance(ledger, "acct_k").await,
        Balance::new(0, 0, 0),
        "{SCENARIO}: all spent, nothing held"
    );
    let journal = assert_books(ledger, "acct_k", SCENARIO).await;
    let settles: Vec<&JournalEntry> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .collect();
    assert_eq!(settles.len() as u64, k, "{SCENARIO}: one settle per hold");
    assert_eq!(
        journal.len() as u64,
        1 + 2 * k,
        "{SCENARIO}: one entry per movement (refusals write none)"
    );
    assert!(
        settles.iter().all(|e| e.request_id.is_some()),
        "{SCENARIO}: settles carry their request id"
    );
}

/// A settlement above its hold is charged up to what is available, never below zero.
async fn settle_above_the_hold_never_goes_negative<L: LedgerAdmin>(ledger: &L) {
    const SCENARIO: &str = "settle-above-the-hold";
    ledger
        .top_up("acct_s", 100, "invoice-1")
        .await
        .expect("top-up");
    let a = ledger
        .reserve(ReserveRequest::new("acct_s", 60))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    assert_eq!(a.available_after(), 40, "{SCENARIO}: available after");
    let b = ledger
        .reserve(ReserveRequest::new("acct_s", 40))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    match ledger.reserve(ReserveRequest::new("acct_s", 1)).await {
        Err(ReserveError::Insufficient {
            required: 1,
            available: 0,
        }) => {}
        other => panic!("{SCENARIO}: a hold beyond the balance: {other:?}"),
    }
    assert_eq!(balance(ledger, "acct_s").await, Balance::new(100, 100, 2));
    // Used far more than held while another hold takes the rest: charged only the hold.
    let settled = ledger.settle(&a, 1_000).await.expect("settle");
    assert_eq!(
        (settled.charged, settled.balance, settled.was_open),
        (60, 40, true),
        "{SCENARIO}: charged up to what is available"
    );
    // With room beyond the hold, more than the hold is charged.
    let settled = ledger.settle(&b, 45).await.expect("settle");
    assert_eq!(
        (settled.charged, settled.balance),
        (40, 0),
        "{SCENARIO}: never below zero"
    );
    ledger
        .top_up("acct_s", 50, "invoice-2")
        .await
        .expect("top-up");
    let c = ledger
        .reserve(ReserveRequest::new("acct_s", 10))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    let settled = ledger.settle(&c, 25).await.expect("settle");
    assert_eq!(
        (settled.charged, settled.balance),
        (25, 25),
        "{SCENARIO}: above the hold, within the balance"
    );
    let journal = assert_books(ledger, "acct_s", SCENARIO).await;
    assert_eq!(journal.last().map(|e| (e.amount, e.hold)), Some((25, 10)));
}

/// Release charges nothing; closing a hold again is a no-op.
async fn release_charges_nothing_and_closes_once<L: LedgerAdmin>(ledger: &L) {
    const SCENARIO: &str = "release";
    ledger
        .top_up("acct_r", 10, "invoice-1")
        .await
        .expect("top-up");
    let hold = ledger
        .reserve(ReserveRequest::new("acct_r", 4))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    assert_eq!(balance(ledger, "acct_r").await, Balance::new(10, 4, 1));
    let released = ledger.release(&hold).await.expect("release");
    assert_eq!(
        (released.charged, released.balance, released.was_open),
        (0, 10, true),
        "{SCENARIO}: nothing charged"
    );
    let again = ledger.settle(&hold, 3).await.expect("settle");
    assert_eq!(
        (again.charged, again.was_open),
        (0, false),
        "{SCENARIO}: a released hold is not settled"
    );
    assert!(!ledger.release(&hold).await.expect("release").was_open);
    let hold = ledger
        .reserve(ReserveRequest::new("acct_r", 4))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    assert!(ledger.settle(&hold, 3).await.expect("settle").was_open);
    let again = ledger.settle(&hold, 3).await.expect("settle");
    assert_eq!((again.charged, again.was_open), (0, false));
    assert!(!ledger.release(&hold).await.expect("release").was_open);
    assert_eq!(balance(ledger, "acct_r").await, Balance::new(7, 0, 0));
    let journal = assert_books(ledger, "acct_r", SCENARIO).await;
    assert_eq!(
        kinds(&journal),
        [
            EntryKind::TopUp,
            EntryKind::Reserve,
            EntryKind::Release,
            EntryKind::Reserve,
            EntryKind::Settle
        ],
        "{SCENARIO}: one entry per movement"
    );
}

/// Holds past their TTL are settled at their held amount, once.
async fn expired_holds_settle_at_their_held_amount<F: Fixture>(fixture: &F) {
    const SCENARIO: &str = "expiry";
    let ledger = fixture.ledger(EXPIRY_TTL).await;
    ledger
        .top_up("acct_e", 100, "invoice-1")
        .await
        .expect("top-up");
    ledger
        .top_up("acct_f", 100, "invoice-1")
        .await
        .expect("top-up");
    let leaked = ledger
        .reserve(ReserveRequest::new("acct_e", 30))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    let _other = ledger
        .reserve(ReserveRequest::new("acct_f", 20))
        .await
        .expect("reserve");
    let settled_in_time = ledger
        .reserve(ReserveRequest::new("acct_f", 5))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    ledger.settle(&settled_in_time, 5).await.expect("settle");
    let expired = ledger
        .expire_holds(fixture.now())
        .await
        .expect("expire_holds");
    assert_eq!(
        (expired.holds, expired.charged),
        (0, 0),
        "{SCENARIO}: nothing expires before its TTL"
    );
    assert_eq!(
        balance(&ledger, "acct_e").await,
        Balance::new(100, 30, 1),
        "{SCENARIO}: locked while open"
    );
    fixture.advance(EXPIRY_TTL + EXPIRY_TTL / 2).await;
    let expired = ledger
        .expire_holds(fixture.now())
        .await
        .expect("expire_holds");
    assert_eq!(
        (expired.holds, expired.charged),
        (2, 50),
        "{SCENARIO}: settled at their held amounts"
    );
    assert_eq!(balance(&ledger, "acct_e").await, Balance::new(70, 0, 0));
    assert_eq!(balance(&ledger, "acct_f").await, Balance::new(75, 0, 0));
    // The late settlement of an expired hold charges nothing more.
    let late = ledger.settle(&leaked, 1).await.expect("settle");
    assert_eq!(
        (late.charged, late.was_open),
        (0, false),
        "{SCENARIO}: not charged twice"
    );
    let again = ledger
        .expire_holds(fixture.now())
        .await
        .expect("expire_holds");
    assert_eq!((again.holds, again.charged), (0, 0), "{SCENARIO}: once");
    let journal = assert_books(&ledger, "acct_e", SCENARIO).await;
    assert_eq!(
        kinds(&journal),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Expire]
    );
    assert_eq!(
        (journal[2].amount, journal[2].hold, journal[2].hold_id),
        (30, 30, Some(leaked.id()))
    );
    assert_books(&ledger, "acct_f", SCENARIO).await;
}

/// A top-up's idempotency key applies it once; the key with another amount is refused.
async fn top_ups_are_idempotent<L: LedgerAdmin>(ledger: &L) {
    const SCENARIO: &str = "idempotent-top-up";
    let first = ledger
        .top_up("acct_t", 50, "invoice-7")
        .await
        .expect("top-up");
    assert!(first.applied, "{SCENARIO}: applied");
    assert_eq!(first.balance, Balance::new(50, 0, 0));
    let again = ledger
        .top_up("acct_t", 50, "invoice-7")
        .await
        .expect("top-up");
    assert!(!again.applied, "{SCENARIO}: not applied twice");
    assert_eq!(again.balance, Balance::new(50, 0, 0));
    match ledger.top_up("acct_t", 60, "invoice-7").await {
        Err(TopUpError::KeyReused { amount: 50 }) => {}
        other => panic!("{SCENARIO}: the key with another amount: {other:?}"),
    }
    // The same key on another account is another top-up.
    assert!(
        ledger
            .top_up("acct_u", 5, "invoice-7")
            .await
            .expect("top-up")
            .applied
    );
    match ledger.top_up("acct_t", u64::MAX, "invoice-8").await {
        Err(TopUpError::Overflow) => {}
        other => panic!("{SCENARIO}: an overflowing top-up: {other:?}"),
    }
    assert_eq!(balance(ledger, "acct_t").await, Balance::new(50, 0, 0));
    let journal = assert_books(ledger, "acct_t", SCENARIO).await;
    assert_eq!(kinds(&journal), [EntryKind::TopUp], "{SCENARIO}: one entry");
    assert_eq!(journal[0].idempotency_key.as_deref(), Some("invoice-7"));
    assert_books(ledger, "acct_u", SCENARIO).await;
}

/// Concurrent top-ups (each retried) and holds: every top-up counted once.
async fn top_ups_while_holds_run_are_all_counted<L: LedgerAdmin + Clone>(ledger: &L) {
    const SCENARIO: &str = "top-ups-while-holds-run";
    let holds: Vec<_> = (0..600)
        .map(|_| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                match ledger.reserve(ReserveRequest::new("acct_c", 2)).await {
                    Ok(reservation) => {
                        let hold = reservation.into_hold().expect("a hold");
                        ledger.settle(&hold, 2).await.expect("settle").charged
                    }
                    Err(ReserveError::Insufficient { .. }) => 0,
                    Err(other) => panic!("{SCENARIO}: {other}"),
                }
            })
        })
        .collect();
    let top_ups: Vec<_> = (0..200)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let key = format!("t{i}");
                assert!(
                    ledger
                        .top_up("acct_c", 3, &key)
                        .await
                        .expect("top-up")
                        .applied
                );
                assert!(
                    !ledger
                        .top_up("acct_c", 3, &key)
                        .await
                        .expect("top-up")
                        .applied
                );
            })
        })
        .collect();
    let mut charged = 0;
    for task in holds {
        charged += task.await.expect("task");
    }
    for task in top_ups {
        task.await.expect("task");
    }
    assert_eq!(
        balance(ledger, "acct_c").await,
        Balance::new(600 - charged, 0, 0),
        "{SCENARIO}: every top-up counted once"
    );
    let journal = assert_books(ledger, "acct_c", SCENARIO).await;
    assert_eq!(
        journal
            .iter()
            .filter(|e| e.kind == EntryKind::TopUp)
            .count(),
        200,
        "{SCENARIO}: one entry per top-up"
    );
}

/// An `Idempotency-Key` holds once: in use while open, replayed once charged, reused with
/// another request refused, free again after a release.
async fn reserves_are_idempotent<L: LedgerAdmin>(ledger: &L) {
    const SCENARIO: &str = "idempotent-reserve";
    ledger
        .top_up("acct_i", 100, "invoice-1")
        .await
        .expect("top-up");
    let fp = Fingerprint::of(&[b"POST", b"/v1/chat/completions"]);
    let request = |key: &str| ReserveRequest::new("acct_i", 10).idempotency(Some((key.into(), fp)));
    let hold = ledger
        .reserve(request("retry-1"))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    assert!(
        matches!(
            ledger.reserve(request("retry-1")).await,
            Err(ReserveError::KeyInUse)
        ),
        "{SCENARIO}: in use while the first runs"
    );
    ledger.settle(&hold, 7).await.expect("settle");
    assert!(
        ledger
            .reserve(request("retry-1"))
            .await
            .expect("reserve")
            .into_hold()
            .is_none(),
        "{SCENARIO}: replayed once charged"
    );
    let other = ReserveRequest::new("acct_i", 10)
        .idempotency(Some(("retry-1".into(), Fingerprint::of(&[b"other"]))));
    assert!(
        matches!(ledger.reserve(other).await, Err(ReserveError::KeyReused)),
        "{SCENARIO}: reused with another request"
    );
    // A released first attempt frees its key: the retry is held and charged.
    let first = ledger
        .reserve(request("retry-2"))
        .await
        .expect("reserve")
        .into_hold()
        .expect("a hold");
    ledger.release(&first).await.expect("release");
    let retry = ledger
        .reserve(request("retry-2"))
        .await
        .expect("reserve")
        .into_hold()
        .expect("the retry is held");
    ledger.settle(&retry, 10).await.expect("settle");
    // Another account's key of the same name is its own.
    ledger
        .top_up("acct_j", 10, "invoice-1")
        .await
        .expect("top-up");
    let theirs = ReserveRequest::new("acct_j", 10).idempotency(Some(("retry-1".into(), fp)));
    assert!(ledger
        .reserve(theirs)
        .await
        .expect("reserve")
        .into_hold()
        .is_some());
    assert_eq!(
        balance(ledger, "acct_i").await,
        Balance::new(83, 0, 0),
        "{SCENARIO}: charged once per key"
    );
    let journal = assert_books(ledger, "acct_i", SCENARIO).await;
    assert_eq!(
        kinds(&journal),
        [
            EntryKind::TopUp,
            EntryKind::Reserve,
            EntryKind::Settle,
            EntryKind::Reserve,
            EntryKind::Release,
            EntryKind::Reserve,
            EntryKind::Settle
        ],
        "{SCENARIO}: refusals and replays write nothing"
    );
    assert_eq!(journal[1].idempotency_key.as_deref(), Some("retry-1"));
}

/// Journal pages (`after`, `limit`) and an unknown account (all zeros, no entries).
async fn journal_pages_and_unknown_accounts<L: LedgerAdmin>(ledger: &L) {
    const SCENARIO: &str = "journal";
    for i in 0..5 {
        ledger
            .top_up("acct_p", 1, &format!("invoice-{i}"))
            .await
            .expect("top-up");
    }
    let page = ledger
        .journal("acct_p", JournalQuery::new().after(Some(2)).limit(2))
        .await
        .expect("journal");
    assert_eq!(
        page.iter()
            .map(|e| (e.seq, e.balance_after))
            .collect::<Vec<_>>(),
        [(3, 3), (4, 4)],
        "{SCENARIO}: a page"
    );
    let rest = ledger
        .journal("acct_p", JournalQuery::new().after(Some(4)))
        .await
        .expect("journal");
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
    assert_eq!(balance(ledger, "acct_nobody").await, Balance::new(0, 0, 0));
    assert!(ledger
        .journal("acct_nobody", JournalQuery::new())
        .await
        .expect("journal")
        .is_empty());
    match ledger.reserve(ReserveRequest::new("acct_nobody", 1)).await {
        Err(ReserveError::Insufficient {
            required: 1,
            available: 0,
        }) => {}
        other => panic!("{SCENARIO}: a hold on an unknown account: {other:?}"),
    }
    assert_books(ledger, "acct_p", SCENARIO).await;
}

/// A response body the scenario streams frame by frame.
struct Streamed(mpsc::Receiver<Bytes>);

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// An upstream answering one SSE response whose chunks the scenario sends.
#[derive(Clone)]
struct Upstream(Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>);

impl<B> Service<Request<InspectedBody<B>>> for Upstream {
    type Response = Response<Streamed>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Streamed>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<InspectedBody<B>>) -> Self::Future {
        let chunks = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("one call");
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(Streamed(chunks))
            .expect("a response");
        std::future::ready(Ok(response))
    }
}

/// A streaming chat completion of `account` through a [`CreditsLayer`] on `ledger` (one credit
/// per token): its response, and the sender of its chunks.
async fn streaming<L: LedgerAdmin + Clone>(
    ledger: &L,
    account: &str,
) -> (
    Response<super::MeteredBody<Streamed, L>>,
    mpsc::Sender<Bytes>,
) {
    let (chunks, receiver) = mpsc::channel(8);
    let pricing = Pricing::new().model("m", Price::flat(0).per_1k_tokens(1000));
    let mut service = CreditsLayer::new(ledger.clone(), pricing)
        .layer(Upstream(Arc::new(Mutex::new(Some(receiver)))));
    let mut request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .expect("a request");
    request
        .extensions_mut()
        .insert(Caller::builder("key_1", account).build());
    std::future::poll_fn(|cx| Service::<Request<Full<Bytes>>>::poll_ready(&mut service, cx))
        .await
        .expect("ready");
    let response = service.call(request).await.expect("infallible");
    assert_eq!(response.status(), 200, "{account}: admitted");
    (response, chunks)
}

/// A hold's TTL is idle time: a response that streams for several TTLs keeps its hold alive
/// (its body extends it while frames flow) and is settled at its usage, never expired; a
/// response idle for longer than the TTL has its hold expired at the held amount, and its late
/// end charges nothing more.
async fn holds_live_as_long_as_their_response<F: Fixture>(fixture: &F) {
    const SCENARIO: &str = "holds-live-as-long-as-their-response";
    let ledger = fixture.ledger(EXPIRY_TTL).await;
    for account in ["acct_s", "acct_i"] {
        ledger
            .top_up(account, 100, "invoice-1")
            .await
            .expect("top-up");
    }

    let (response, chunks) = streaming(&ledger, "acct_s").await;
    let held: u64 = response.headers()["x-credits-held"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("x-credits-held");
    let mut body = std::pin::pin!(response.into_body());
    // Four frames, each a little more than half a TTL after the last: 2.2 TTLs in all.
    for round in 0..4 {
        fixture.advance(EXPIRY_TTL * 11 / 20).await;
        chunks
            .send(Bytes::from_static(b"data: {\"choices\":[]}\n\n"))
            .await
            .expect("send");
        let frame = body.frame().await.expect("a frame").expect("data");
        assert!(frame.is_data());
        let expired = ledger
            .expire_holds(fixture.now())
            .await
            .expect("expire_holds");
        assert_eq!(
            (expired.holds, expired.charged),
            (0, 0),
            "{SCENARIO}: a streaming hold is not expired (round {round})"
        );
    }
    chunks
        .send(Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":5,\"total_tokens\":7}}\n\ndata: [DONE]\n\n",
        ))
        .await
        .expect("send");
    drop(chunks);
    while let Some(frame) = body.frame().await {
        frame.expect("data");
    }
    super::finish_settlements(Duration::from_secs(10)).await;
    assert_eq!(
        balance(&ledger, "acct_s").await,
        Balance::new(93, 0, 0),
        "{SCENARIO}: settled at its usage (7 tokens), not its hold ({held})"
    );
    let journal = assert_books(&ledger, "acct_s", SCENARIO).await;
    assert_eq!(
        kinds(&journal),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Settle],
        "{SCENARIO}: never expired"
    );
    assert_eq!((journal[2].amount, journal[2].hold), (7, held));

    // Idle past its TTL: expired at the hold.
    let (response, chunks) = streaming(&ledger, "acct_i").await;
    let held: u64 = response.headers()["x-credits-held"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("x-credits-held");
    fixture.advance(EXPIRY_TTL + EXPIRY_TTL / 2).await;
    let expired = ledger
        .expire_holds(fixture.now())
        .await
        .expect("expire_holds");
    assert_eq!(
        (expired.holds, expired.charged),
        (1, held),
        "{SCENARIO}: an idle response's hold expires at its held amount"
    );
    drop(chunks);
    drop(response);
    super::finish_settlements(Duration::from_secs(10)).await;
    assert_eq!(
        balance(&ledger, "acct_i").await,
        Balance::new(100 - held, 0, 0),
        "{SCENARIO}: the late end of an expired hold charges nothing more"
    );
    let journal = assert_books(&ledger, "acct_i", SCENARIO).await;
    assert_eq!(
        kinds(&journal),
        [EntryKind::TopUp, EntryKind::Reserve, EntryKind::Expire]
    );
}
