//! PostgreSQL: transitions of existing requests (a review, a comment, a cancel...) in flight
//! together written by one statement (group commit, on a [`crate::batch`] queue), instead of a
//! transaction each (BEGIN, SELECT ... FOR UPDATE, INSERT of the event, UPDATE, COMMIT).
//!
//! Optimistic: the writer reads the request without a lock and runs its command on it in
//! memory; what it queues is guarded by what it read, the request's revision and a hash of its
//! stored body. The batch's statement draws each event's revision (after the statement's xid,
//! the log reader's rule: see `log.rs`), updates each request only where its guard still holds
//! (`UPDATE ... WHERE revision = expected AND sha256(body) = read`; under READ COMMITTED a row
//! that a concurrent transaction holds is re-checked once that one commits), and inserts the
//! events of the requests it updated, chained after the heads that were read. The body's hash
//! is part of the guard because the service's bookkeeping (an apply's lease, its attempts)
//! rewrites the body without a new revision.
//!
//! A writer whose guard failed (another write of that request came first, in this batch or
//! outside it) wrote nothing, not even an event; it runs its command again the careful way,
//! in a transaction that locks the row ([`Store::step`]). So does a transition that changes
//! the request's resources (an edit of its changes), which this statement does not write, and
//! every writer of a batch the database aborted to break a deadlock. Any other error of the
//! statement (the database unreachable, a timeout) is every writer's answer: the statement is
//! atomic, so none of them was written. A revision drawn for a writer whose guard failed is
//! never used: the log has a gap there, which its reader settles as it settles a rolled-back
//! write's.

use approvals_domain::{
    ChangeRequest, DomainError, EventDraft, Timestamp,
    audit::{GENESIS, Hash},
};
use sea_orm::{
    ConnectionTrait,
    sqlx::{self, PgPool},
};
use sha2::{Digest, Sha256};

use crate::{
    applying::Step,
    batch::{Job, Pending, Queue, fail_all, is_retryable},
    codec::{
        EVENT_COLUMNS, decode_audit_head, decode_request, event_values, resource_keys, risk_value,
        select_request,
    },
    connect::Store,
    error::{DbErrOr, StoreError},
    rows::{Column, by_ordinal, sqlx_error, value_size},
    schema::{CHANGE_REQUESTS, EVENTS, cr, ev},
};

/// The queue of transitions; cloned with the store.
pub(crate) type TransitionQueue = Queue<TransitionRows>;

/// The request columns a transition writes, beside its revision and chain head, in the order
/// of [`TransitionRows::request`] (those [`crate::write::WriteTxn::write_request`] writes).
const WRITTEN_COLUMNS: [&str; 6] = [
    cr::STATE,
    cr::UPDATE_TIME,
    cr::EXPIRE_TIME,
    cr::DUE_TIME,
    cr::RISK,
    cr::BODY,
];

/// One transition's rows, owned, and the guard they are written under.
pub(crate) struct TransitionRows {
    id: String,
    /// The revision the request had when read.
    expected: i64,
    /// The sha256 of the body the request had when read.
    read_body: Vec<u8>,
    /// The event row's values, in the order of `EVENT_COLUMNS[1..]` (all but the revision).
    event: Vec<sea_orm::Value>,
    /// The chain head when read (GENESIS for a request without one).
    prev: Vec<u8>,
    /// The bytes the event's hash covers after its revision.
    record: Vec<u8>,
    /// The request's new values, in the order of [`WRITTEN_COLUMNS`].
    request: Vec<sea_orm::Value>,
}

impl TransitionRows {
    /// The rows of `event` of `request` (as the command left it), which was read at revision
    /// `expected` with `read`.
    fn new(
        request: &mut ChangeRequest,
        event: &EventDraft,
        expected: i64,
        read: &Read,
    ) -> Result<Self, StoreError> {
        let (event, record) = event_values(request, event, true)?;
        Ok(Self {
            id: request.id.clone(),
            expected,
            read_body: read.body_hash.to_vec(),
            event,
            prev: read.head.unwrap_or(GENESIS).to_vec(),
            record,
            request: vec![
                request.state.as_str().into(),
                request.update_time.as_micros().into(),
                request.expire_time.map(Timestamp::as_micros).into(),
                request.next_due_time().map(Timestamp::as_micros).into(),
                risk_value(request).into(),
                serde_json::to_string(&request)?.into(),
            ],
        })
    }
}

impl Job for TransitionRows {
    /// The event's revision, or `None` when the guard failed and nothing was written.
    type Written = Option<i64>;

    fn size(&self) -> usize {
        let values = self.event.iter().chain(&self.request);
        values.map(value_size).sum::<usize>() + self.record.len() + self.id.len()
    }

    async fn write(pool: PgPool, batch: Vec<Pending<Self>>) {
        let rows: Vec<&TransitionRows> = batch.iter().map(|p| &p.rows).collect();
        match update_batch(&pool, &rows).await {
            Ok(revisions) => {
                for (pending, revision) in batch.into_iter().zip(revisions) {
                    let _ = pending.answer.send(Ok(revision));
                }
            }
            // Aborted to break a deadlock with a locking writer: nothing was written, and each
            // goes the careful way.
            Err(err) if is_retryable(&err) => {
                for pending in batch {
                    let _ = pending.answer.send(Ok(None));
                }
            }
            Err(err) => fail_all(batch, &err),
        }
    }
}

/// What a writer read of the request, which its write is guarded by.
struct Read {
    head: Option<Hash>,
    body_hash: [u8; 32],
}

/// A request as read for a command that follows ([`Store::mutate_read`]): a caller that reads
/// the request first anyway (to check who may act on it) hands it on, so that the write needs
/// no second read.
pub struct ReadRequest {
    pub request: ChangeRequest,
    /// What the write is guarded by (PostgreSQL only).
    read: Option<Read>,
}

impl Store {
    /// Reads request `id` for [`Store::mutate_read`].
    pub async fn read_request(&self, id: &str) -> Result<ReadRequest, StoreError> {
        let row = self
            .db
            .query_one(&select_request(id))
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let request = decode_request(&row)?;
        let read = if self.transitions.is_some() {
            let body: String = row.try_get("", cr::BODY)?;
            Some(Read {
                head: decode_audit_head(&row)?,
                body_hash: Sha256::digest(body.as_bytes()).into(),
            })
        } else {
            None
        };
        Ok(ReadRequest { request, read })
    }

    /// [`Store::mutate`] on a request already read: on PostgreSQL the command runs on it as
    /// read, and the write joins the next transition batch, guarded by what was read; on SQLite
    /// (or when the guard fails) the command runs in a transaction that locks the row, as
    /// [`Store::mutate`] says.
    #[tracing::instrument(level = "info", skip_all, fields(change_request_id = %read.request.id), err(level = "debug"))]
    pub async fn mutate_read<F>(
        &self,
        read: ReadRequest,
        mut command: F,
    ) -> Result<ChangeRequest, StoreError>
    where
        F: FnMut(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send,
    {
        let id = read.request.id.clone();
        if let Some(queue) = &self.transitions
            && let Some(written) = self.transition_in_batch(queue, read, &mut command).await?
        {
            return Ok(written);
        }
        self.step(&id, |request| command(request).map(Step::Event))
            .await
    }

    /// PostgreSQL: `command` on `read` written in the next transition batch (see the module
    /// docs). `None`: not written this way (the guard failed, the command changed the
    /// request's resources, or `read` holds no guard), for the caller to run the command again
    /// in a locking transaction. A refused command is refused as the request was read: nothing
    /// is written.
    async fn transition_in_batch<F>(
        &self,
        queue: &TransitionQueue,
        read: ReadRequest,
        command: &mut F,
    ) -> Result<Option<ChangeRequest>, StoreError>
    where
        F: FnMut(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send,
    {
        let ReadRequest {
            mut request,
            read: Some(read),
        } = read
        else {
            return Ok(None);
        };
        let (expected, resources) = (request.revision, resource_keys(&request));
        let event = command(&mut request)?;
        if resource_keys(&request) != resources {
            return Ok(None);
        }
        let rows = TransitionRows::new(&mut request, &event, expected, &read)?;
        let Some(revision) = queue.write(rows).await? else {
            return Ok(None);
        };
        request.revision = revision;
        self.note_written(revision);
        self.note_committed();
        Ok(Some(request))
    }
}

/// Writes the transitions `rows` in one statement (see the module docs); returns each one's
/// revision, `None` where its guard failed, in the order of `rows`.
async fn update_batch(
    pool: &PgPool,
    rows: &[&TransitionRows],
) -> Result<Vec<Option<i64>>, DbErrOr> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let mut columns = vec![
        Column::Text(rows.iter().map(|r| Some(r.id.clone())).collect()),
        Column::BigInt(rows.iter().map(|r| Some(r.expected)).collect()),
        Column::Bytes(rows.iter().map(|r| Some(r.read_body.clone())).collect()),
    ];
    for i in 0..first.event.len() {
        columns.push(Column::of(rows.iter().filter_map(|r| r.event.get(i)))?);
    }
    columns.push(Column::Bytes(
        rows.iter().map(|r| Some(r.prev.clone())).collect(),
    ));
    columns.push(Column::Bytes(
        rows.iter().map(|r| Some(r.record.clone())).collect(),
    ));
    for i in 0..WRITTEN_COLUMNS.len() {
        columns.push(Column::of(rows.iter().filter_map(|r| r.request.get(i)))?);
    }
    // Built from the schema's names and the columns' types only: nothing a caller sent.
    let sql = sqlx::AssertSqlSafe(update_sql(first.event.len(), &columns));
    let mut query = sqlx::query(sql);
    for column in columns {
        query = column.bind(query);
    }
    let written = query.fetch_all(pool).await.map_err(sqlx_error)?;
    let revisions = by_ordinal(&written, rows.len(), "transition")?;
    Ok(revisions)
}

/// The statement of [`update_batch`]: `$1..$3` are the guards (id, revision, body hash), then
/// the event's columns, its prev hash and record, then [`WRITTEN_COLUMNS`].
fn update_sql(events: usize, columns: &[Column]) -> String {
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| format!("${}::{}", i + 1, column.sql_type()))
        .collect();
    let event_names: Vec<String> = (0..events).map(|i| format!("e{i}")).collect();
    let request_names: Vec<String> = (0..WRITTEN_COLUMNS.len())
        .map(|i| format!("q{i}"))
        .collect();
    let set: Vec<String> = WRITTEN_COLUMNS
        .iter()
        .zip(&request_names)
        .map(|(column, name)| format!("{column} = i.{name}"))
        .collect();
    let event_values: Vec<String> = event_names.iter().map(|name| format!("i.{name}")).collect();
    // As in `rows::batch_sql`: the materialised `xid` row is produced before any revision is
    // drawn, and each event is hashed with its own revision. Where two rows of the batch are
    // one request's, the UPDATE uses one of them; the other finds its guard failed.
    format!(
        "WITH xid AS MATERIALIZED (SELECT pg_current_xact_id()), \
         input AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('{EVENTS}', '{revision}')) \
         AS r, t.* FROM xid, unnest({arrays}) WITH ORDINALITY AS t(cid, expected, read_body, \
         {event_names}, prev, record, {request_names}, o)), \
         written AS (UPDATE {CHANGE_REQUESTS} AS c SET {set}, {request_revision} = i.r, \
         {head} = sha256(i.prev || int8send(i.r) || i.record) FROM input AS i \
         WHERE c.{id} = i.cid AND c.{request_revision} = i.expected \
         AND sha256(convert_to(c.{body}, 'UTF8')) = i.read_body RETURNING i.o), \
         event AS (INSERT INTO {EVENTS} ({revision}, {event_columns}, {prev_col}, {hash_col}) \
         OVERRIDING SYSTEM VALUE SELECT i.r, {event_values}, i.prev, \
         sha256(i.prev || int8send(i.r) || i.record) FROM input AS i JOIN written AS w \
         ON w.o = i.o) \
         SELECT i.o, i.r FROM input AS i JOIN written AS w ON w.o = i.o",
        revision = ev::REVISION,
        arrays = arrays.join(", "),
        event_names = event_names.join(", "),
        request_names = request_names.join(", "),
        set = set.join(", "),
        request_revision = cr::REVISION,
        head = cr::AUDIT_HEAD,
        id = cr::ID,
        body = cr::BODY,
        event_columns = EVENT_COLUMNS[1..].join(", "),
        prev_col = ev::PREV_HASH,
        hash_col = ev::HASH,
        event_values = event_values.join(", "),
    )
}
