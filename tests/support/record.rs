//! Load for the durable record's tests: spending that writes the journal, and drains racing it.

#![cfg(all(feature = "redis", feature = "postgres"))]
#![allow(dead_code)]

use std::time::Duration;

use tollgate::{
    credits::{ledger::ReserveRequest, Ledger},
    redis::RedisBackend,
};

/// `rounds` reserves of 5 on `account` (request ids `req-0`, ...): every third released, the
/// others settled at 3: two journal entries a round.
pub async fn spend(ledger: &impl Ledger, account: &str, rounds: usize) {
    for i in 0..rounds {
        let hold = ledger
            .reserve(ReserveRequest::new(account, 5).request_id(Some(format!("req-{i}").into())))
            .await
            .unwrap()
            .into_hold()
            .unwrap();
        if i % 3 == 0 {
            ledger.release(&hold).await.unwrap();
        } else {
            ledger.settle(&hold, 3).await.unwrap();
        }
    }
}

/// A task that drains `backend`'s journal into the record `times` times, `pause` apart (racing
/// the spending, the background task and the other drainers).
pub fn drain_repeatedly(
    backend: &RedisBackend,
    times: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let backend = backend.clone();
    tokio::spawn(async move {
        for _ in 0..times {
            backend.drain_record().await.unwrap();
            tokio::time::sleep(pause).await;
        }
    })
}
