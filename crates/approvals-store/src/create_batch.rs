//! PostgreSQL: the creates in flight together written by one statement (group commit for
//! creates, on a [`crate::batch`] queue): [`rows::insert_batch`] writes a batch's events,
//! requests and resources in one statement.
//!
//! A batch is one statement, so it is atomic: every create of it commits, or none. When the
//! statement is refused by a constraint (a request_id that another create just took), each
//! create of the batch is written again alone, so that only the one that collides is refused
//! and the others commit, exactly as if they had never shared a statement. Any other error
//! (the database unreachable, a timeout) is every create's answer: none of them was written.

use sea_orm::sqlx::PgPool;

use crate::{
    batch::{Job, Pending, Queue, fail_all, is_constraint_violation},
    rows::{self, CreateRows},
};

/// The queue of creates; cloned with the store.
pub(crate) type CreateQueue = Queue<CreateRows>;

impl Job for CreateRows {
    /// The CREATED event's revision.
    type Written = i64;

    fn size(&self) -> usize {
        CreateRows::size(self)
    }

    async fn write(pool: PgPool, batch: Vec<Pending<Self>>) {
        let rows: Vec<&CreateRows> = batch.iter().map(|p| &p.rows).collect();
        match rows::insert_batch(&pool, &rows).await {
            Ok(revisions) => {
                for (pending, revision) in batch.into_iter().zip(revisions) {
                    let _ = pending.answer.send(Ok(revision));
                }
            }
            Err(err) if batch.len() > 1 && is_constraint_violation(&err) => {
                // One of them collides: each alone, so that only that one is refused.
                for pending in batch {
                    let result = rows::insert_one(&pool, &pending.rows).await;
                    let _ = pending.answer.send(result);
                }
            }
            Err(err) => fail_all(batch, &err),
        }
    }
}
