//! PostgreSQL: the creates in flight together written by one statement (group commit for
//! creates). Each create's rows go on a queue; one task takes everything queued while the
//! previous statements were running and writes it with [`rows::insert_batch`]: one statement,
//! one commit, one round trip for the whole batch, and the same prepared statement whatever its
//! size (the rows travel as arrays). A create alone is written at once: the task waits for
//! nothing but a free slot, so batches form only while an earlier one is in flight
//! ([`IN_FLIGHT`]).
//!
//! A batch is one statement, so it is atomic: every create of it commits, or none. When the
//! statement is refused by a constraint (a request_id that another create just took), each
//! create of the batch is written again alone, so that only the one that collides is refused
//! and the others commit, exactly as if they had never shared a statement. Any other error
//! (the database unreachable, a timeout) is every create's answer: none of them was written.

use std::sync::Arc;

use sea_orm::{DbErr, RuntimeErr, sqlx::PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    error::{DbErrOr, StoreError},
    rows::CreateRows,
};

/// How many batch statements run at once. One: while it runs (and commits), the next batch
/// fills. Two or three at once only split the queue into smaller batches, each paying its own
/// statement and commit: `approvals-bench --only create` at 64 in flight measured 3,097
/// creates/s with one, 2,754 with two and 2,674 with three (see the README).
const IN_FLIGHT: usize = 1;

/// The most creates one statement writes (the arrays' length).
const MAX_BATCH: usize = 256;

/// The most bytes of rows one statement carries (a create may be up to a message's size): a
/// batch stops growing past this, and a create larger than it is a batch of its own.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// One create waiting for its batch.
struct Pending {
    rows: CreateRows,
    answer: oneshot::Sender<Result<i64, DbErrOr>>,
}

/// The queue of creates (see the module docs); cloned with the store.
#[derive(Clone)]
pub(crate) struct CreateQueue {
    sender: mpsc::UnboundedSender<Pending>,
}

impl CreateQueue {
    /// Starts the task that writes the batches on `pool`; it ends when the last clone of the
    /// queue is dropped.
    pub(crate) fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(pool, receiver));
        Self { sender }
    }

    /// Writes `rows` in the next batch; returns the CREATED event's revision once its
    /// statement has committed.
    pub(crate) async fn create(&self, rows: CreateRows) -> Result<i64, DbErrOr> {
        let (answer, answered) = oneshot::channel();
        self.sender
            .send(Pending { rows, answer })
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?;
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Internal("the create batch ended without an answer".into()).into())
        })
    }
}

async fn write_batches(pool: PgPool, mut queue: mpsc::UnboundedReceiver<Pending>) {
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
            write_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

async fn write_batch(pool: &PgPool, batch: Vec<Pending>) {
    let rows: Vec<&CreateRows> = batch.iter().map(|p| &p.rows).collect();
    match crate::rows::insert_batch(pool, &rows).await {
        Ok(revisions) => {
            for (pending, revision) in batch.into_iter().zip(revisions) {
                let _ = pending.answer.send(Ok(revision));
            }
        }
        Err(DbErrOr::Db(err)) if batch.len() > 1 && is_constraint_violation(&err) => {
            // One of them collides: each alone, so that only that one is refused.
            for pending in batch {
                let result = crate::rows::insert_one(pool, &pending.rows).await;
                let _ = pending.answer.send(result);
            }
        }
        Err(DbErrOr::Db(err)) => {
            for pending in batch {
                let _ = pending.answer.send(Err(DbErrOr::Db(err.clone())));
            }
        }
        Err(DbErrOr::Store(err)) => {
            for pending in batch {
                let copy = match &err {
                    StoreError::Unavailable(message) => StoreError::Unavailable(message.clone()),
                    other => StoreError::Internal(other.to_string()),
                };
                let _ = pending.answer.send(Err(copy.into()));
            }
        }
    }
}

/// An integrity constraint refused the statement (SQLSTATE class 23: a unique index, say).
fn is_constraint_violation(err: &DbErr) -> bool {
    match err {
        DbErr::Query(RuntimeErr::SqlxError(sqlx)) | DbErr::Exec(RuntimeErr::SqlxError(sqlx)) => {
            match sqlx.as_database_error() {
                Some(db) => db.code().is_some_and(|code| code.starts_with("23")),
                None => false,
            }
        }
        _ => false,
    }
}
