//! The event log's reader: events in strictly increasing revision order, none skipped, none
//! twice, while many writers commit concurrently, without serialising them.
//!
//! Revisions come from an identity column, so on PostgreSQL a transaction can commit after one
//! that holds a higher revision. A reader that simply asked for `revision > last seen` would
//! skip the late one. This reader stops at the first missing revision (a gap) until the gap is
//! settled:
//!
//! - Every write transaction has its xid before it takes a revision (`mutate` locks the row
//!   first; `create` asks for its xid first). A revision `g` missing below a visible revision
//!   `r` was taken before `r` was, so its transaction's xid was assigned before the reader's
//!   snapshot `S` was taken.
//! - When the gap is first seen, the reader takes a fresh xid `B` (`pg_current_xact_id()`),
//!   greater than every xid assigned so far, so greater than the owner of `g`. Once a later
//!   snapshot's xmin is at least `B`, no transaction below `B` is still running: `g`'s owner
//!   has finished, and `g` is either visible or a hole forever (the transaction rolled back).
//! - The snapshot's xip list alone is not enough: a transaction whose xid is above the
//!   snapshot's xmax (one past the latest *completed* xid) is in progress without being listed.
//!
//! Only the reader pays for this, and only when a gap appears; writers take no lock.
//!
//! On SQLite writers are serialised (one immediate transaction at a time), so a missing
//! revision is always a hole.

use approvals_domain::Event;
use sea_orm::{
    ConnectionTrait, DbBackend, Statement,
    sea_query::{Alias, Expr, ExprTrait, Order, Query},
};

use crate::{
    codec::{EVENT_COLUMNS, decode_event, with_comments},
    connect::{Backend, Store},
    error::StoreError,
    schema::{EVENTS, ev},
};

/// A PostgreSQL snapshot's xmin: transactions below it have finished.
fn snapshot_xmin(text: &str) -> Option<u64> {
    text.split(':').next()?.parse().ok()
}

/// A gap the reader is waiting on: settled once a snapshot's xmin reaches `bound`.
#[derive(Debug, Clone, Copy)]
struct PendingGap {
    revision: i64,
    bound: u64,
}

/// Reads the log forward from a position, one settled batch at a time.
pub struct LogReader {
    store: Store,
    after: i64,
    /// Every revision at or below this is known to be settled (for example because a reader
    /// that checked them already published past it), so gaps there are holes.
    settled_until: i64,
    pending: Option<PendingGap>,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct LogBatch {
    /// Events after the previous position, in increasing revision order, each with the change
    /// request as it stood right after it (its comments read back from the request row).
    pub events: Vec<Event>,
    /// A gap is not settled yet: read again soon.
    pub waiting: bool,
    /// The read returned as many rows as asked: more may follow at once.
    pub full: bool,
}

impl LogReader {
    pub(crate) fn new(store: Store, after: i64, settled_until: i64) -> Self {
        Self {
            store,
            after,
            settled_until,
            pending: None,
        }
    }

    /// The revision of the last event returned (or the starting position).
    pub fn position(&self) -> i64 {
        self.after
    }

    /// The next settled events, at most `limit`.
    pub async fn next_batch(&mut self, limit: u64) -> Result<LogBatch, StoreError> {
        let mut query = Query::select();
        query
            .columns(EVENT_COLUMNS)
            .from(EVENTS)
            .and_where(Expr::col(ev::REVISION).gt(self.after))
            .order_by(ev::REVISION, Order::Asc)
            .limit(limit);
        let postgres = self.store.backend() == Backend::Postgres;
        if postgres {
            // Same statement, same snapshot: the rows and the transactions in progress agree.
            query.expr_as(Expr::cust("pg_current_snapshot()::text"), "snap");
        }
        let rows = self.store.connection().query_all(&query).await?;
        let mut batch = LogBatch {
            full: rows.len() as u64 >= limit,
            ..Default::default()
        };
        // The position moves only once the whole batch is read, comments included: a failed
        // read returns nothing and is simply read again.
        let mut after = self.after;
        let mut accepted = Vec::new();
        for row in &rows {
            let revision: i64 = row.try_get("", ev::REVISION)?;
            // The first missing revision that is not known to be settled, if any.
            let gap = Ord::max(after + 1, self.settled_until + 1);
            if revision > gap && postgres {
                let text: String = row.try_get("", "snap")?;
                let xmin = snapshot_xmin(&text)
                    .ok_or_else(|| StoreError::Internal(format!("unreadable snapshot {text:?}")))?;
                let settled =
                    matches!(self.pending, Some(p) if p.revision == gap && xmin >= p.bound);
                if !settled {
                    if !matches!(self.pending, Some(p) if p.revision == gap) {
                        let bound = self.store.xid_bound().await?;
                        self.pending = Some(PendingGap {
                            revision: gap,
                            bound,
                        });
                    }
                    batch.waiting = true;
                    batch.full = false;
                    break;
                }
            }
            self.pending = None;
            accepted.push(decode_event(row, true)?);
            after = revision;
        }
        batch.events = with_comments(self.store.connection(), accepted).await?;
        self.after = after;
        Ok(batch)
    }
}

impl Store {
    /// A reader of the log after revision `after` (exclusive).
    pub fn log_reader(&self, after: i64) -> LogReader {
        LogReader::new(self.clone(), after, 0)
    }

    /// A reader after `after` that treats every revision up to `settled_until` as settled, for
    /// catching up to a head another reader has already published.
    pub fn log_reader_settled(&self, after: i64, settled_until: i64) -> LogReader {
        LogReader::new(self.clone(), after, settled_until)
    }

    /// A position from which reading the log forward misses nothing committed from now on:
    /// every revision at or below it is settled (committed or rolled back).
    ///
    /// On PostgreSQL: the head `h`, then a wait until every transaction that could own a
    /// revision at or below `h` has finished (see the module comment).
    pub async fn settled_head(&self) -> Result<i64, StoreError> {
        let head = self.head_revision().await?;
        if self.backend() == Backend::Postgres {
            let bound = self.xid_bound().await?;
            self.wait_for_xmin(bound).await?;
        }
        Ok(head)
    }

    /// An xid greater than every xid assigned before this call.
    async fn xid_bound(&self) -> Result<u64, StoreError> {
        let row = self
            .connection()
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT pg_current_xact_id()::text AS xid",
            ))
            .await?
            .ok_or_else(|| StoreError::Internal("no xid row".into()))?;
        let xid: String = row.try_get("", "xid")?;
        xid.parse()
            .map_err(|_| StoreError::Internal(format!("unreadable xid {xid:?}")))
    }

    async fn wait_for_xmin(&self, bound: u64) -> Result<(), StoreError> {
        loop {
            let row = self
                .connection()
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT pg_current_snapshot()::text AS snap",
                ))
                .await?
                .ok_or_else(|| StoreError::Internal("no snapshot row".into()))?;
            let text: String = row.try_get("", "snap")?;
            if snapshot_xmin(&text).is_some_and(|xmin| xmin >= bound) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

impl Store {
    /// Events of one request after `after_revision`, oldest first.
    pub async fn events(
        &self,
        change_request_id: &str,
        after_revision: i64,
        limit: u64,
        with_snapshot: bool,
    ) -> Result<Vec<Event>, StoreError> {
        let query = Query::select()
            .columns(EVENT_COLUMNS)
            .from(EVENTS)
            .and_where(Expr::col(ev::CHANGE_REQUEST_ID).eq(change_request_id))
            .and_where(Expr::col(ev::REVISION).gt(after_revision))
            .order_by(ev::REVISION, Order::Asc)
            .limit(limit)
            .to_owned();
        let rows = self.db.query_all(&query).await?;
        let rows = rows
            .iter()
            .map(|row| decode_event(row, with_snapshot))
            .collect::<Result<Vec<_>, _>>()?;
        with_comments(&self.db, rows).await
    }

    /// The highest revision in the log (0 when empty).
    pub async fn head_revision(&self) -> Result<i64, StoreError> {
        let query = Query::select()
            .expr_as(
                Expr::cust(format!("COALESCE(MAX({}), 0)", ev::REVISION)),
                Alias::new("head"),
            )
            .from(EVENTS)
            .to_owned();
        Ok(match self.db.query_one(&query).await? {
            Some(row) => row.try_get("", "head")?,
            None => 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_xmin_of_a_snapshot() {
        assert_eq!(snapshot_xmin("748:750:748,749"), Some(748));
        assert_eq!(snapshot_xmin("10:10:"), Some(10));
        assert_eq!(snapshot_xmin("garbage"), None);
    }
}
