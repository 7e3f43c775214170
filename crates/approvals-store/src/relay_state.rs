//! Relays' state (`approvals.v1.RelayState`): per sink a cursor and a lease, and the sinks'
//! dead letters. Bookkeeping only: no event, no revision. Times are microseconds of the server's
//! clock, passed in.

use sea_orm::{
    ConnectionTrait, QueryResult,
    sea_query::{Expr, ExprTrait, Func, Order, Query, SelectStatement},
};

use crate::{
    Store,
    error::StoreError,
    schema::{RELAY_DEAD_LETTERS, RELAY_SINKS, dl, rs},
    write::WriteTxn,
};

/// One sink's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkState {
    pub sink: String,
    pub cursor: i64,
    pub holder: Option<String>,
    pub lease_token: Option<String>,
    pub lease_expire_time: Option<i64>,
    pub dead_letter_count: i64,
    pub retry_requested_count: i64,
    pub update_time: i64,
}

/// A lease request: who asks, for how long, and the token it holds (to renew).
#[derive(Debug, Clone)]
pub struct LeaseRequest<'a> {
    pub sink: &'a str,
    pub holder: &'a str,
    /// The current lease's token, to renew it.
    pub token: Option<&'a str>,
    /// The token a new lease gets.
    pub new_token: String,
    pub now: i64,
    pub duration_micros: i64,
}

/// An event (or gap) a relay gave up delivering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub sink: String,
    pub revision: i64,
    pub last_revision: i64,
    pub gap: bool,
    pub change_request_id: String,
    pub webhook_id: String,
    pub reason: String,
    pub attempts: i64,
    pub payload: String,
    pub content_type: String,
    pub create_time: i64,
    pub update_time: i64,
    pub retry_requested: bool,
}

/// Filters of a dead letter list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub sink: Option<String>,
    pub retry_requested: bool,
}

const SINK_COLUMNS: [&str; 6] = [
    rs::SINK,
    rs::CURSOR,
    rs::HOLDER,
    rs::LEASE_TOKEN,
    rs::LEASE_EXPIRE_TIME,
    rs::UPDATE_TIME,
];

const DEAD_LETTER_COLUMNS: [&str; 14] = [
    dl::ID,
    dl::SINK,
    dl::REVISION,
    dl::LAST_REVISION,
    dl::GAP,
    dl::CHANGE_REQUEST_ID,
    dl::WEBHOOK_ID,
    dl::REASON,
    dl::ATTEMPTS,
    dl::PAYLOAD,
    dl::CONTENT_TYPE,
    dl::CREATE_TIME,
    dl::UPDATE_TIME,
    dl::RETRY_REQUESTED,
];

fn select_sink(sink: &str) -> SelectStatement {
    Query::select()
        .columns(SINK_COLUMNS)
        .from(RELAY_SINKS)
        .and_where(Expr::col(rs::SINK).eq(sink))
        .to_owned()
}

fn decode_sink(row: &QueryResult) -> Result<SinkState, StoreError> {
    Ok(SinkState {
        sink: row.try_get("", rs::SINK)?,
        cursor: row.try_get("", rs::CURSOR)?,
        holder: row.try_get("", rs::HOLDER)?,
        lease_token: row.try_get("", rs::LEASE_TOKEN)?,
        lease_expire_time: row.try_get("", rs::LEASE_EXPIRE_TIME)?,
        update_time: row.try_get("", rs::UPDATE_TIME)?,
        ..SinkState::default()
    })
}

fn decode_dead_letter(row: &QueryResult) -> Result<DeadLetter, StoreError> {
    Ok(DeadLetter {
        id: row.try_get("", dl::ID)?,
        sink: row.try_get("", dl::SINK)?,
        revision: row.try_get("", dl::REVISION)?,
        last_revision: row.try_get("", dl::LAST_REVISION)?,
        gap: row.try_get::<i64>("", dl::GAP)? != 0,
        change_request_id: row.try_get("", dl::CHANGE_REQUEST_ID)?,
        webhook_id: row.try_get("", dl::WEBHOOK_ID)?,
        reason: row.try_get("", dl::REASON)?,
        attempts: row.try_get("", dl::ATTEMPTS)?,
        payload: row.try_get("", dl::PAYLOAD)?,
        content_type: row.try_get("", dl::CONTENT_TYPE)?,
        create_time: row.try_get("", dl::CREATE_TIME)?,
        update_time: row.try_get("", dl::UPDATE_TIME)?,
        retry_requested: row.try_get::<i64>("", dl::RETRY_REQUESTED)? != 0,
    })
}

/// The sink's row, locked, when `token` is its current unexpired lease; else SinkLeaseLost.
async fn lock_leased(
    w: &WriteTxn<'_>,
    sink: &str,
    token: &str,
    now: i64,
) -> Result<SinkState, StoreError> {
    let row = w.txn.query_one(&w.lock(select_sink(sink))).await?;
    let state = row.as_ref().map(decode_sink).transpose()?;
    match state {
        Some(state)
            if state.lease_token.as_deref() == Some(token)
                && state.lease_expire_time.is_some_and(|t| t > now) =>
        {
            Ok(state)
        }
        _ => Err(StoreError::SinkLeaseLost(sink.to_owned())),
    }
}

impl Store {
    /// Takes or renews the lease on `sink` (see `AcquireSinkLease`), creating its state on
    /// first use.
    pub async fn acquire_sink_lease(&self, req: LeaseRequest<'_>) -> Result<SinkState, StoreError> {
        let expire = req.now.saturating_add(req.duration_micros);
        let state = self
            .write(async |w| {
                let row = w.txn.query_one(&w.lock(select_sink(req.sink))).await?;
                let current = row.as_ref().map(decode_sink).transpose()?;
                let live = |s: &SinkState| s.lease_expire_time.is_some_and(|t| t > req.now);
                let token = match (&current, req.token) {
                    (Some(state), Some(token)) => {
                        if state.lease_token.as_deref() != Some(token) || !live(state) {
                            return Err(StoreError::SinkLeaseLost(req.sink.to_owned()));
                        }
                        token.to_owned()
                    }
                    (None, Some(_)) => return Err(StoreError::SinkLeaseLost(req.sink.to_owned())),
                    (Some(state), None) if live(state) => {
                        return Err(StoreError::SinkLeaseHeld {
                            sink: req.sink.to_owned(),
                            holder: state.holder.clone().unwrap_or_default(),
                            expire_time: state.lease_expire_time.unwrap_or_default(),
                        });
                    }
                    (_, None) => req.new_token.clone(),
                };
                if current.is_some() {
                    let update = Query::update()
                        .table(RELAY_SINKS)
                        .value(rs::HOLDER, req.holder)
                        .value(rs::LEASE_TOKEN, token.as_str())
                        .value(rs::LEASE_EXPIRE_TIME, expire)
                        .value(rs::UPDATE_TIME, req.now)
                        .and_where(Expr::col(rs::SINK).eq(req.sink))
                        .to_owned();
                    w.txn.execute(&update).await?;
                } else {
                    let insert = Query::insert()
                        .into_table(RELAY_SINKS)
                        .columns(SINK_COLUMNS)
                        .values_panic([
                            req.sink.into(),
                            0i64.into(),
                            req.holder.into(),
                            token.as_str().into(),
                            expire.into(),
                            req.now.into(),
                        ])
                        .to_owned();
                    w.txn.execute(&insert).await?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
        state?;
        self.sink_state(req.sink).await
    }

    /// Ends the lease held with `token`.
    pub async fn release_sink_lease(
        &self,
        sink: &str,
        token: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(async |w| {
            lock_leased(w, sink, token, now).await?;
            let update = Query::update()
                .table(RELAY_SINKS)
                .value(rs::HOLDER, Option::<String>::None)
                .value(rs::LEASE_TOKEN, Option::<String>::None)
                .value(rs::LEASE_EXPIRE_TIME, Option::<i64>::None)
                .value(rs::UPDATE_TIME, now)
                .and_where(Expr::col(rs::SINK).eq(sink))
                .to_owned();
            w.txn.execute(&update).await?;
            Ok(())
        })
        .await
    }

    /// Moves the cursor forward to `revision` under the lease `token`.
    pub async fn commit_sink_cursor(
        &self,
        sink: &str,
        token: &str,
        revision: i64,
        now: i64,
    ) -> Result<SinkState, StoreError> {
        self.write(async |w| {
            let state = lock_leased(w, sink, token, now).await?;
            if revision > state.cursor {
                let update = Query::update()
                    .table(RELAY_SINKS)
                    .value(rs::CURSOR, revision)
                    .value(rs::UPDATE_TIME, now)
                    .and_where(Expr::col(rs::SINK).eq(sink))
                    .to_owned();
                w.txn.execute(&update).await?;
            }
            Ok::<_, StoreError>(())
        })
        .await?;
        self.sink_state(sink).await
    }

    /// A sink's state with its dead letter counts.
    pub async fn sink_state(&self, sink: &str) -> Result<SinkState, StoreError> {
        let row = self
            .db
            .query_one(&select_sink(sink))
            .await?
            .ok_or_else(|| StoreError::SinkNotFound(sink.to_owned()))?;
        let mut state = decode_sink(&row)?;
        let count = |retry_only: bool| {
            let mut query = Query::select();
            query
                .expr_as(Func::count(Expr::col(dl::ID)), "n")
                .from(RELAY_DEAD_LETTERS)
                .and_where(Expr::col(dl::SINK).eq(sink));
            if retry_only {
                query.and_where(Expr::col(dl::RETRY_REQUESTED).eq(1i64));
            }
            query
        };
        for (retry_only, slot) in [
            (false, &mut state.dead_letter_count),
            (true, &mut state.retry_requested_count),
        ] {
            if let Some(row) = self.db.query_one(&count(retry_only)).await? {
                *slot = row.try_get("", "n")?;
            }
        }
        Ok(state)
    }

    /// Records a dead letter under the lease `token`; its id and times are set here.
    pub async fn add_dead_letter(
        &self,
        token: &str,
        mut letter: DeadLetter,
        id: String,
        now: i64,
    ) -> Result<DeadLetter, StoreError> {
        letter.id = id;
        letter.create_time = now;
        letter.update_time = now;
        letter.retry_requested = false;
        self.write(async |w| {
            lock_leased(w, &letter.sink, token, now).await?;
            let insert = Query::insert()
                .into_table(RELAY_DEAD_LETTERS)
                .columns(DEAD_LETTER_COLUMNS)
                .values_panic([
                    letter.id.as_str().into(),
                    letter.sink.as_str().into(),
                    letter.revision.into(),
                    letter.last_revision.into(),
                    i64::from(letter.gap).into(),
                    letter.change_request_id.as_str().into(),
                    letter.webhook_id.as_str().into(),
                    letter.reason.as_str().into(),
                    letter.attempts.into(),
                    letter.payload.as_str().into(),
                    letter.content_type.as_str().into(),
                    letter.create_time.into(),
                    letter.update_time.into(),
                    0i64.into(),
                ])
                .to_owned();
            w.txn.execute(&insert).await?;
            Ok::<_, StoreError>(())
        })
        .await?;
        Ok(letter)
    }

    /// One page of dead letters, oldest first (ids are UUIDv7), after the id `after`.
    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        page_size: u64,
    ) -> Result<(Vec<DeadLetter>, Option<String>), StoreError> {
        let mut query = Query::select();
        query.columns(DEAD_LETTER_COLUMNS).from(RELAY_DEAD_LETTERS);
        if let Some(sink) = &filter.sink {
            query.and_where(Expr::col(dl::SINK).eq(sink.as_str()));
        }
        if filter.retry_requested {
            query.and_where(Expr::col(dl::RETRY_REQUESTED).eq(1i64));
        }
        if let Some(after) = after {
            query.and_where(Expr::col(dl::ID).gt(after));
        }
        query.order_by(dl::ID, Order::Asc).limit(page_size + 1);
        let rows = self.db.query_all(&query).await?;
        let mut letters = rows
            .iter()
            .map(decode_dead_letter)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if letters.len() as u64 > page_size {
            letters.truncate(page_size as usize);
            letters.last().map(|l| l.id.clone())
        } else {
            None
        };
        Ok((letters, next))
    }

    /// Marks dead letters (not gaps) for retry: the one `id`, or every one of `sink` (every
    /// sink when `None`). Returns how many.
    pub async fn retry_dead_letters(
        &self,
        id: Option<&str>,
        sink: Option<&str>,
        now: i64,
    ) -> Result<u64, StoreError> {
        self.write(async |w| {
            if let Some(id) = id {
                let found = w
                    .txn
                    .query_one(
                        &Query::select()
                            .column(dl::ID)
                            .from(RELAY_DEAD_LETTERS)
                            .and_where(Expr::col(dl::ID).eq(id))
                            .to_owned(),
                    )
                    .await?;
                if found.is_none() {
                    return Err(StoreError::DeadLetterNotFound(id.to_owned()));
                }
            }
            let mut update = Query::update();
            update
                .table(RELAY_DEAD_LETTERS)
                .value(dl::RETRY_REQUESTED, 1i64)
                .value(dl::UPDATE_TIME, now)
                .and_where(Expr::col(dl::GAP).eq(0i64));
            if let Some(id) = id {
                update.and_where(Expr::col(dl::ID).eq(id));
            }
            if let Some(sink) = sink {
                update.and_where(Expr::col(dl::SINK).eq(sink));
            }
            Ok(w.txn.execute(&update).await?.rows_affected())
        })
        .await
    }

    pub async fn delete_dead_letter(&self, id: &str) -> Result<(), StoreError> {
        self.write(async |w| {
            let deleted = w
                .txn
                .execute(
                    &Query::delete()
                        .from_table(RELAY_DEAD_LETTERS)
                        .and_where(Expr::col(dl::ID).eq(id))
                        .to_owned(),
                )
                .await?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::DeadLetterNotFound(id.to_owned()));
            }
            Ok(())
        })
        .await
    }

    /// Records a failed retry: attempts and reason, and clears `retry_requested`.
    pub async fn update_dead_letter(
        &self,
        id: &str,
        attempts: i64,
        reason: &str,
        now: i64,
    ) -> Result<DeadLetter, StoreError> {
        self.write(async |w| {
            let updated = w
                .txn
                .execute(
                    &Query::update()
                        .table(RELAY_DEAD_LETTERS)
                        .value(dl::ATTEMPTS, attempts)
                        .value(dl::REASON, reason)
                        .value(dl::RETRY_REQUESTED, 0i64)
                        .value(dl::UPDATE_TIME, now)
                        .and_where(Expr::col(dl::ID).eq(id))
                        .to_owned(),
                )
                .await?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::DeadLetterNotFound(id.to_owned()));
            }
            let row = w
                .txn
                .query_one(
                    &Query::select()
                        .columns(DEAD_LETTER_COLUMNS)
                        .from(RELAY_DEAD_LETTERS)
                        .and_where(Expr::col(dl::ID).eq(id))
                        .to_owned(),
                )
                .await?
                .ok_or_else(|| StoreError::DeadLetterNotFound(id.to_owned()))?;
            decode_dead_letter(&row)
        })
        .await
    }
}
