//! Coalescing of the hot-path statements ([`PostgresOptions::coalesce`](super::PostgresOptions::coalesce)):
//! at most one statement on the books in flight per pool; the calls (reserves and closes) that
//! arrive meanwhile wait and go together, up to [`MAX_BATCH`], in one statement (`book_many`,
//! migration 10), so that one commit serves them all.
//!
//! - A call that finds nothing in flight is sent at once, alone, with the single statement it
//!   would have had without coalescing (the same retries, the same answer): a caller sees one
//!   round trip per call either way.
//! - A batch is sorted by account (concurrent batches, of this pool or of other replicas, lock the
//!   accounts' rows in the same order), an account's calls in the order they came. Each call runs in a subtransaction of its own: one that
//!   fails fails alone, and the others keep their exact answers.
//! - A call of a batch that waited on a lock more than 100 ms (`lock_timeout`, set for the batch
//!   only) was rolled back; it is sent again alone, and so are the batch's later calls of the same
//!   account, at once, without waiting again (migration 7): a batch waits at most 100 ms per
//!   account locked elsewhere. The calls sent again alone run beside the drive, which goes on
//!   with the next batch.
//! - A caller waits at most one deadline ([`Shared::deadline`], and [`SLACK`]) from its submit,
//!   however long the statement in flight and its own batch take; a call whose caller gave up
//!   before its batch was sent is left out of it.
//! - A batch that failed as a whole (a lost connection, a timeout) answers that error to each of
//!   its calls; it is never [`unsent`](crate::BackendError::unsent) unless the batch certainly
//!   never reached the server (no connection from the pool), so each caller undoes what its call
//!   may have done, as it would after a lost answer of its own.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::oneshot;

use super::{BoxFuture, Shared};
use crate::BackendError;

/// The most calls in one statement.
pub(super) const MAX_BATCH: usize = 64;

/// What a caller may wait beyond one deadline (the time to hand its call to the drive).
pub(super) const SLACK: Duration = Duration::from_millis(100);

/// One call alone: its own statement.
pub(super) type One<C, A> = fn(&Arc<Shared>, C) -> BoxFuture<Result<A, BackendError>>;

/// The answer of a batch: per call (in the order given), its answer, or `None` when it must be
/// sent again alone (it waited on a lock too long and was rolled back).
pub(super) type Answers<A> = Result<Vec<Option<Result<A, BackendError>>>, BackendError>;

/// Several calls in one statement.
pub(super) type Many<C, A> = fn(&Arc<Shared>, Vec<C>) -> BoxFuture<Answers<A>>;

type Waiting<C, A> = (C, oneshot::Sender<Result<A, BackendError>>);

struct Queue<C, A> {
    in_flight: bool,
    waiting: VecDeque<Waiting<C, A>>,
}

/// The calls of one kind on one pool: the one in flight and those waiting for it.
pub(super) struct Coalescer<C, A> {
    one: One<C, A>,
    many: Many<C, A>,
    account: fn(&C) -> &str,
    queue: Mutex<Queue<C, A>>,
}

impl<C, A> Coalescer<C, A>
where
    C: Clone + Send + 'static,
    A: Send + 'static,
{
    pub(super) fn new(one: One<C, A>, many: Many<C, A>, account: fn(&C) -> &str) -> Self {
        Coalescer {
            one,
            many,
            account,
            queue: Mutex::new(Queue {
                in_flight: false,
                waiting: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<C, A>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which coalescer of a [`Shared`] a call goes through.
pub(super) type Pick<C, A> = fn(&Shared) -> &Coalescer<C, A>;

/// Run `call` through the coalescer `pick` of `shared`: alone at once when nothing of its kind is
/// in flight, else with the others that wait. Answers within one deadline of the call
/// ([`Shared::deadline`], plus [`SLACK`]) counted from now, whether it waited for the statement
/// in flight or not; past it, the call may still be sent (or be running), so the error is not
/// [`unsent`](BackendError::unsent).
pub(super) async fn submit<C, A>(
    shared: Arc<Shared>,
    pick: Pick<C, A>,
    call: C,
) -> Result<A, BackendError>
where
    C: Clone + Send + 'static,
    A: Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return (pick(&shared).one)(&shared, call).await;
    };
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut queue = pick(&shared).lock();
        queue.waiting.push_back((call, tx));
        !std::mem::replace(&mut queue.in_flight, true)
    };
    let deadline = shared.deadline() + SLACK;
    if start {
        runtime.spawn(drive(shared, pick));
    }
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(BackendError::new(
            "postgres: a coalesced statement was abandoned",
        )),
        Err(_) => Err(BackendError::new(format!(
            "postgres: no answer within {deadline:?} (coalesced)"
        ))),
    }
}

/// Ends the drive: nothing is in flight any more (also when the drive panicked or its runtime
/// shut down; the calls still waiting then fail, their senders dropped).
struct Done<'a, C, A>(&'a Coalescer<C, A>);

impl<C, A> Drop for Done<'_, C, A> {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.in_flight {
            queue.in_flight = false;
            queue.waiting.clear();
        }
    }
}

/// Send the waiting calls, one statement at a time, until none waits.
async fn drive<C, A>(shared: Arc<Shared>, pick: Pick<C, A>)
where
    C: Clone + Send + 'static,
    A: Send + 'static,
{
    let coalescer = pick(&shared);
    let done = Done(coalescer);
    loop {
        let mut batch: Vec<Waiting<C, A>> = {
            let mut queue = coalescer.lock();
            if queue.waiting.is_empty() {
                queue.in_flight = false;
                // Another drive may start as soon as the lock is released: this one must not
                // touch the queue again.
                std::mem::forget(done);
                return;
            }
            // A caller that gave up (its deadline passed while it waited) is not sent: it has
            // answered an error already, and undoes whatever its call may have done.
            queue.waiting.retain(|(_, tx)| !tx.is_closed());
            let n = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..n).collect()
        };
        if batch.is_empty() {
            continue;
        }
        if batch.len() == 1 {
            let (call, tx) = batch.pop().expect("one call");
            let _ = tx.send((coalescer.one)(&shared, call).await);
            continue;
        }
        batch.sort_by(|a, b| (coalescer.account)(&a.0).cmp((coalescer.account)(&b.0)));
        let calls: Vec<C> = batch.iter().map(|(call, _)| call.clone()).collect();
        match (coalescer.many)(&shared, calls).await {
            Ok(answers) if answers.len() == batch.len() => {
                let mut again = Vec::new();
                for ((call, tx), answer) in batch.into_iter().zip(answers) {
                    match answer {
                        Some(answer) => {
                            let _ = tx.send(answer);
                        }
                        None => again.push((call, tx)),
                    }
                }
                // Rolled back for a lock held too long: each alone, as without coalescing, beside
                // the drive (the next batch does not wait for them).
                for (call, tx) in again {
                    let one = (coalescer.one)(&shared, call);
                    tokio::spawn(async move {
                        let _ = tx.send(one.await);
                    });
                }
            }
            Ok(_) => {
                let error =
                    BackendError::new("postgres: unexpected reply to a coalesced statement");
                for (_, tx) in batch {
                    let _ = tx.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for (_, tx) in batch {
                    let _ = tx.send(Err(error.clone()));
                }
            }
        }
    }
}
