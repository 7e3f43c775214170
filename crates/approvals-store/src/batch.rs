//! PostgreSQL group commit: the writes in flight together written by one statement. Each
//! write's rows go on a queue; one task takes everything queued while the previous statement
//! was running and hands it to the job's [`Job::write`]: one statement, one commit, one round
//! trip for the whole batch, and the same prepared statement whatever its size (the rows travel
//! as arrays). A write alone is written at once: the task waits for nothing but a free slot, so
//! batches form only while an earlier one is in flight ([`IN_FLIGHT`]).
//!
//! Two jobs use it, each with a queue of its own: creates ([`crate::create_batch`]) and
//! transitions of existing requests ([`crate::transitions`]).

use std::sync::Arc;

use sea_orm::{DbErr, RuntimeErr, sqlx::PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{DbErrOr, StoreError};

/// How many batch statements of one queue run at once. One: while it runs (and commits), the
/// next batch fills. Two or three at once only split the queue into smaller batches, each
/// paying its own statement and commit: `approvals-bench --only create` at 64 in flight
/// measured 3,097 creates/s with one, 2,754 with two and 2,674 with three (see the README).
const IN_FLIGHT: usize = 1;

/// The most writes one statement carries (the arrays' length).
const MAX_BATCH: usize = 256;

/// The most bytes of rows one statement carries (a write may be up to a message's size): a
/// batch stops growing past this, and a write larger than it is a batch of its own.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// What a queue writes: one write's rows, and how a batch of them is written.
pub(crate) trait Job: Send + Sized + 'static {
    /// What each writer is told once its batch is done.
    type Written: Send + 'static;

    /// About how many bytes the rows carry (their strings and bytes).
    fn size(&self) -> usize;

    /// Writes `batch` and answers each of its writers.
    fn write(pool: PgPool, batch: Vec<Pending<Self>>) -> impl Future<Output = ()> + Send;
}

/// One write waiting for its batch.
pub(crate) struct Pending<J: Job> {
    pub(crate) rows: J,
    pub(crate) answer: oneshot::Sender<Result<J::Written, DbErrOr>>,
}

/// A queue of writes (see the module docs); cloned with the store.
pub(crate) struct Queue<J: Job> {
    sender: mpsc::UnboundedSender<Pending<J>>,
}

impl<J: Job> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<J: Job> Queue<J> {
    /// Starts the task that writes the batches on `pool`; it ends when the last clone of the
    /// queue is dropped.
    pub(crate) fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(pool, receiver));
        Self { sender }
    }

    /// Writes `rows` in the next batch; returns once its statement has committed (or failed).
    pub(crate) async fn write(&self, rows: J) -> Result<J::Written, DbErrOr> {
        let (answer, answered) = oneshot::channel();
        self.sender
            .send(Pending { rows, answer })
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?;
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Internal("the write batch ended without an answer".into()).into())
        })
    }
}

async fn write_batches<J: Job>(pool: PgPool, mut queue: mpsc::UnboundedReceiver<Pending<J>>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Everything queued while the slots were taken joins this batch.
        let mut bytes = first.rows.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.rows.size();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            J::write(pool, batch).await;
            drop(slot);
        });
    }
}

/// Tells every writer of a failed batch why: the statement's error, each its own copy.
pub(crate) fn fail_all<J: Job>(batch: Vec<Pending<J>>, err: &DbErrOr) {
    for pending in batch {
        let copy = match err {
            DbErrOr::Db(db) => DbErrOr::Db(db.clone()),
            DbErrOr::Store(StoreError::Unavailable(message)) => {
                StoreError::Unavailable(message.clone()).into()
            }
            DbErrOr::Store(other) => StoreError::Internal(other.to_string()).into(),
        };
        let _ = pending.answer.send(Err(copy));
    }
}

/// The SQLSTATE of a database's refusal, if `err` is one.
fn sqlstate(err: &DbErrOr) -> Option<String> {
    match err {
        DbErrOr::Db(DbErr::Query(RuntimeErr::SqlxError(sqlx)))
        | DbErrOr::Db(DbErr::Exec(RuntimeErr::SqlxError(sqlx))) => sqlx
            .as_database_error()
            .and_then(|db| db.code())
            .map(|code| code.into_owned()),
        _ => None,
    }
}

/// An integrity constraint refused the statement (SQLSTATE class 23: a unique index, say).
pub(crate) fn is_constraint_violation(err: &DbErrOr) -> bool {
    sqlstate(err).is_some_and(|code| code.starts_with("23"))
}

/// The database aborted the statement to break a deadlock (40P01) or a serialization
/// conflict (40001): running it again, or its writes one by one, can succeed.
pub(crate) fn is_retryable(err: &DbErrOr) -> bool {
    sqlstate(err).is_some_and(|code| code.starts_with("40"))
}
