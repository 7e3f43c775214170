//! The rows of new change requests, written the way every create writes them: the CREATED
//! event (its revision drawn by the identity column on PostgreSQL, named by the insert itself
//! on SQLite, so the row carries its hash from the start), the request's row carrying that
//! revision, and the rows of the resources its changes touch. Either one statement per table
//! for any number of requests (the bulk seed, and SQLite's careful create), or one round trip
//! per create: on PostgreSQL one statement, on SQLite one command in the writers' batch
//! ([`create_in_one_trip`]). [`crate::seed`] offers the first and PostgreSQL's to benchmarks.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use approvals_domain::{
    ChangeRequest, EventDraft,
    audit::{GENESIS, Hash, event_hash},
};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, RuntimeErr, Statement,
    TransactionTrait,
    sea_query::{Expr, ExprTrait, Query},
    sqlx::{self, PgPool, Row},
};

use crate::{
    codec::{
        EVENT_COLUMNS, IdempotencyKey, REQUEST_COLUMNS, RESOURCE_COLUMNS, event_values,
        request_values, resource_values,
    },
    error::{DbErrOr, StoreError},
    schema::{CHANGE_REQUESTS, EVENTS, RESOURCES, cr, ev},
};

/// A request to write as created, with its CREATED event and idempotency key.
pub(crate) struct NewRequest<'a> {
    pub(crate) request: &'a mut ChangeRequest,
    pub(crate) event: &'a EventDraft,
    pub(crate) key: Option<&'a IdempotencyKey>,
    /// Hash the CREATED event (always, but in the bench's comparison run: see
    /// [`Store::without_create_hashing`](crate::Store::without_create_hashing)).
    pub(crate) hashed: bool,
}

/// Writes `new` with one multi-row statement per table, in `db` (a transaction, for them to be
/// written together). Sets each request's revision; returns the highest (0 when `new` is empty).
///
/// On SQLite the events carry their hashes from the insert ([`insert_sqlite_events`], after
/// the head read in `db`); elsewhere the identity column draws the revisions and one update
/// writes the hashes.
pub(crate) async fn insert(
    db: &impl ConnectionTrait,
    new: &mut [NewRequest<'_>],
) -> Result<i64, DbErrOr> {
    if new.is_empty() {
        return Ok(0);
    }
    let (revisions, hashes) = if db.get_database_backend() == DbBackend::Sqlite {
        let mut rows = Vec::with_capacity(new.len());
        for row in new.iter_mut() {
            let (values, record) = event_values(row.request, row.event, row.hashed)?;
            rows.push(EventRow {
                values,
                chain: row.hashed.then_some((GENESIS, record)),
            });
        }
        let written = insert_sqlite_events(db, &rows, None).await?;
        let mut revisions = HashMap::with_capacity(new.len());
        let mut hashes = HashMap::with_capacity(new.len());
        for (row, (revision, hash)) in new.iter().zip(written) {
            revisions.insert(row.request.id.clone(), revision);
            if let Some(hash) = hash {
                hashes.insert(row.request.id.clone(), hash);
            }
        }
        (revisions, hashes)
    } else {
        insert_events_then_hash(db, new).await?
    };
    insert_request_rows(db, new, &revisions, &hashes).await
}

/// The CREATED events of `new` through the identity column, then their hashes by one update.
async fn insert_events_then_hash(
    db: &impl ConnectionTrait,
    new: &mut [NewRequest<'_>],
) -> Result<(HashMap<String, i64>, HashMap<String, Hash>), DbErrOr> {
    let mut events = Query::insert();
    events
        .into_table(EVENTS)
        // Every column but the revision, which the identity column assigns.
        .columns(EVENT_COLUMNS[1..].iter().copied())
        .returning(Query::returning().columns([ev::REVISION, ev::CHANGE_REQUEST_ID]));
    let mut records = HashMap::with_capacity(new.len());
    for row in new.iter_mut() {
        let (values, record) = event_values(row.request, row.event, row.hashed)?;
        events.values_panic(values.into_iter().map(Expr::val));
        records.insert(row.request.id.clone(), record);
    }
    let hashed: std::collections::HashSet<String> = new
        .iter()
        .filter(|row| row.hashed)
        .map(|row| row.request.id.clone())
        .collect();
    let mut revisions = HashMap::with_capacity(new.len());
    for row in db.query_all(&events).await? {
        let id: String = row.try_get("", ev::CHANGE_REQUEST_ID)?;
        let revision: i64 = row.try_get("", ev::REVISION)?;
        revisions.insert(id, revision);
    }
    // Each request's first event: chained after GENESIS, its hash written by one statement.
    let mut hashes = HashMap::with_capacity(new.len());
    let mut case = Expr::case(Expr::col(ev::REVISION).eq(-1), Expr::val(Vec::<u8>::new()));
    for (id, revision) in revisions.iter().filter(|(id, _)| hashed.contains(*id)) {
        let record = records.get(id).ok_or_else(|| {
            StoreError::Internal(format!("the event insert returned an unknown request {id}"))
        })?;
        let hash = event_hash(&GENESIS, *revision, record);
        case = case.case(
            Expr::col(ev::REVISION).eq(*revision),
            Expr::val(hash.to_vec()),
        );
        hashes.insert(id.clone(), hash);
    }
    let update = Query::update()
        .table(EVENTS)
        .value(ev::PREV_HASH, GENESIS.to_vec())
        .value(ev::HASH, case)
        .and_where(Expr::col(ev::REVISION).is_in(revisions.values().copied()))
        .to_owned();
    if !hashes.is_empty() {
        db.execute(&update).await?;
    }
    Ok((revisions, hashes))
}

/// The rows of `new` and of their resources, each request with its CREATED event's revision
/// and hash. Returns the highest revision.
async fn insert_request_rows(
    db: &impl ConnectionTrait,
    new: &mut [NewRequest<'_>],
    revisions: &HashMap<String, i64>,
    hashes: &HashMap<String, Hash>,
) -> Result<i64, DbErrOr> {
    let mut requests = Query::insert();
    requests.into_table(CHANGE_REQUESTS).columns(
        REQUEST_COLUMNS
            .iter()
            .copied()
            .chain([cr::REVISION, cr::AUDIT_HEAD]),
    );
    let mut resources = Query::insert();
    resources.into_table(RESOURCES).columns(RESOURCE_COLUMNS);
    let mut any_resource = false;
    let mut head = 0;
    for row in new.iter_mut() {
        let revision = revisions.get(&row.request.id).copied().ok_or_else(|| {
            StoreError::Internal(format!(
                "the event insert returned no revision for change request {}",
                row.request.id
            ))
        })?;
        row.request.revision = revision;
        head = Ord::max(head, revision);
        let mut values = request_values(row.request, row.key)?;
        values.push(revision.into());
        values.push(hashes.get(&row.request.id).map(|h| h.to_vec()).into());
        requests.values_panic(values.into_iter().map(Expr::val));
        for values in resource_values(row.request) {
            resources.values_panic(values.map(Expr::val));
            any_resource = true;
        }
    }
    db.execute(&requests).await?;
    if any_resource {
        db.execute(&resources).await?;
    }
    Ok(head)
}

/// One event row for [`insert_sqlite_events`]: its values in the order of `EVENT_COLUMNS[1..]`
/// (all but the revision), and, when it is hashed, the previous hash of its request's chain and
/// its audit record.
pub(crate) struct EventRow {
    pub(crate) values: Vec<sea_orm::Value>,
    pub(crate) chain: Option<(Hash, Vec<u8>)>,
}

/// SQLite: inserts `rows` in one statement with explicit revisions, the next ones after the
/// log's head, and each hashed row's `prev_hash` and `hash` in the row itself, so the chain
/// costs no statement of its own under SQLite's single write lock. Returns each row's revision
/// and hash, in order.
///
/// The head is `head_guess` (the highest revision this process wrote) while that is still the
/// head: the insert is guarded by `MAX(revision) = head_guess` and writes nothing otherwise
/// (another process wrote, or a transaction of this one rolled back), and then the head is read
/// and the insert made after it. The caller holds the write lock (`BEGIN IMMEDIATE`), so the
/// head does not move in between, and revisions stay gap-free and unique.
pub(crate) async fn insert_sqlite_events(
    db: &impl ConnectionTrait,
    rows: &[EventRow],
    head_guess: Option<i64>,
) -> Result<Vec<(i64, Option<Hash>)>, DbErrOr> {
    if let Some(head) = head_guess
        && let Some(written) = insert_sqlite_events_after(db, rows, head, true).await?
    {
        return Ok(written);
    }
    let head = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            format!("SELECT {} AS head", log_head()),
        ))
        .await?
        .ok_or_else(|| StoreError::Internal("the log's head query returned no row".into()))?
        .try_get::<i64>("", "head")?;
    insert_sqlite_events_after(db, rows, head, false)
        .await?
        .ok_or_else(|| StoreError::Internal("the event insert wrote no row".into()).into())
}

/// SQLite: the log's head as an SQL expression (0 for an empty log).
fn log_head() -> String {
    format!("(SELECT COALESCE(MAX({}), 0) FROM {EVENTS})", ev::REVISION)
}

/// [`insert_sqlite_events`] after `head`; `None` when `guarded` and `head` is not the head.
async fn insert_sqlite_events_after(
    db: &impl ConnectionTrait,
    rows: &[EventRow],
    head: i64,
    guarded: bool,
) -> Result<Option<Vec<(i64, Option<Hash>)>>, DbErrOr> {
    let width = EVENT_COLUMNS.len() + 2;
    let tuple = format!("({})", vec!["?"; width].join(", "));
    let mut params = Vec::with_capacity(rows.len() * width + 1);
    let mut written = Vec::with_capacity(rows.len());
    let mut revision = head;
    for row in rows {
        revision += 1;
        let hash = row
            .chain
            .as_ref()
            .map(|(prev, record)| event_hash(prev, revision, record));
        params.push(revision.into());
        params.extend(row.values.iter().cloned());
        params.push(row.chain.as_ref().map(|(prev, _)| prev.to_vec()).into());
        params.push(hash.map(|h| h.to_vec()).into());
        written.push((revision, hash));
    }
    let columns = format!(
        "{}, {}, {}",
        EVENT_COLUMNS.join(", "),
        ev::PREV_HASH,
        ev::HASH
    );
    let tuples = vec![tuple; rows.len()].join(", ");
    let sql = if guarded {
        params.push(head.into());
        format!(
            "INSERT INTO {EVENTS} ({columns}) SELECT * FROM (VALUES {tuples}) \
             WHERE {head} = ?",
            head = log_head()
        )
    } else {
        format!("INSERT INTO {EVENTS} ({columns}) VALUES {tuples}")
    };
    let inserted = execute_sqlite(db, sql, params).await?;
    Ok((inserted == rows.len() as u64).then_some(written))
}

/// Runs `sql` (one statement or several) with `params` on SQLite; returns the rows it changed.
async fn execute_sqlite(
    db: &impl ConnectionTrait,
    sql: String,
    params: Vec<sea_orm::Value>,
) -> Result<u64, DbErrOr> {
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql,
            params,
        ))
        .await?;
    Ok(result.rows_affected())
}

/// PostgreSQL: one create's rows, owned, as [`insert_batch`] writes them (built from a
/// [`NewRequest`] by [`CreateRows::new`]).
pub(crate) struct CreateRows {
    /// The event row's values, in the order of `EVENT_COLUMNS[1..]` (all but the revision).
    event: Vec<sea_orm::Value>,
    /// The chain's previous hash (GENESIS for a first event), `None` when not hashed.
    prev: Option<Vec<u8>>,
    /// The bytes the event's hash covers after its revision.
    record: Vec<u8>,
    /// The request row's values, in the order of `REQUEST_COLUMNS`.
    request: Vec<sea_orm::Value>,
    resources: Vec<[sea_orm::Value; 4]>,
}

impl CreateRows {
    pub(crate) fn new(new: NewRequest<'_>) -> Result<Self, StoreError> {
        let NewRequest {
            request,
            event,
            key,
            hashed,
        } = new;
        let (event, record) = event_values(request, event, hashed)?;
        Ok(Self {
            event,
            prev: hashed.then(|| GENESIS.to_vec()),
            record,
            request: request_values(request, key)?,
            resources: resource_values(request),
        })
    }

    /// About how many bytes the rows carry (their strings and bytes).
    pub(crate) fn size(&self) -> usize {
        let values = self.event.iter().chain(&self.request);
        let resources = self.resources.iter().flatten();
        values.chain(resources).map(value_size).sum::<usize>() + self.record.len()
    }
}

/// About how many bytes a value of a batch's row carries (its string or bytes).
pub(crate) fn value_size(value: &sea_orm::Value) -> usize {
    match value {
        sea_orm::Value::String(Some(s)) => s.len(),
        sea_orm::Value::Bytes(Some(b)) => b.len(),
        _ => 8,
    }
}

/// One column of a batch, as the array [`insert_batch`] binds for it.
pub(crate) enum Column {
    Text(Vec<Option<String>>),
    BigInt(Vec<Option<i64>>),
    Int(Vec<Option<i32>>),
    Bool(Vec<Option<bool>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    /// The column of `values` (one per row, all of one type).
    pub(crate) fn of<'v>(
        values: impl Iterator<Item = &'v sea_orm::Value>,
    ) -> Result<Self, StoreError> {
        use sea_orm::Value;
        let mut values = values.peekable();
        let mut column = match values.peek() {
            Some(Value::BigInt(_)) => Self::BigInt(Vec::new()),
            Some(Value::Int(_)) => Self::Int(Vec::new()),
            Some(Value::Bool(_)) => Self::Bool(Vec::new()),
            Some(Value::Bytes(_)) => Self::Bytes(Vec::new()),
            _ => Self::Text(Vec::new()),
        };
        for value in values {
            match (&mut column, value) {
                (Self::Text(c), Value::String(v)) => c.push(v.clone()),
                (Self::BigInt(c), Value::BigInt(v)) => c.push(*v),
                (Self::Int(c), Value::Int(v)) => c.push(*v),
                (Self::Bool(c), Value::Bool(v)) => c.push(*v),
                (Self::Bytes(c), Value::Bytes(v)) => c.push(v.clone()),
                (_, other) => {
                    return Err(StoreError::Internal(format!(
                        "a batch's column holds an unexpected value: {other:?}"
                    )));
                }
            }
        }
        Ok(column)
    }

    pub(crate) fn sql_type(&self) -> &'static str {
        match self {
            Self::Text(_) => "text[]",
            Self::BigInt(_) => "int8[]",
            Self::Int(_) => "int4[]",
            Self::Bool(_) => "bool[]",
            Self::Bytes(_) => "bytea[]",
        }
    }

    pub(crate) fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        match self {
            Self::Text(c) => query.bind(c),
            Self::BigInt(c) => query.bind(c),
            Self::Int(c) => query.bind(c),
            Self::Bool(c) => query.bind(c),
            Self::Bytes(c) => query.bind(c),
        }
    }
}

/// PostgreSQL: writes the creates `rows` in one statement (events, requests and resources in
/// data-modifying CTEs, atomic without a transaction block, so one round trip and one commit
/// for all of them); returns each one's revision, in the order of `rows`. The rows travel as
/// one array per column (`unnest`), so the statement's text, and its prepared plan, are the
/// same for one create or hundreds.
pub(crate) async fn insert_batch(pool: &PgPool, rows: &[&CreateRows]) -> Result<Vec<i64>, DbErrOr> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let mut columns = Vec::new();
    for i in 0..first.event.len() {
        columns.push(Column::of(rows.iter().filter_map(|r| r.event.get(i)))?);
    }
    columns.push(Column::Bytes(rows.iter().map(|r| r.prev.clone()).collect()));
    columns.push(Column::Bytes(
        rows.iter().map(|r| Some(r.record.clone())).collect(),
    ));
    for i in 0..first.request.len() {
        columns.push(Column::of(rows.iter().filter_map(|r| r.request.get(i)))?);
    }
    let resources: Vec<&[sea_orm::Value; 4]> =
        rows.iter().flat_map(|r| r.resources.iter()).collect();
    let mut resource_columns = Vec::new();
    for i in 0..RESOURCE_COLUMNS.len() {
        // No resources: an empty text array, the type of every resource column.
        resource_columns.push(Column::of(resources.iter().map(|r| &r[i]))?);
    }
    // Built from the schema's names and the columns' types only: nothing a caller sent.
    let sql = sqlx::AssertSqlSafe(batch_sql(first, &columns, &resource_columns));
    let mut query = sqlx::query(sql);
    for column in columns.into_iter().chain(resource_columns) {
        query = column.bind(query);
    }
    let written = query.fetch_all(pool).await.map_err(sqlx_error)?;
    let revisions: Option<Vec<i64>> = by_ordinal(&written, rows.len(), "create")?
        .into_iter()
        .collect();
    let revisions = revisions
        .filter(|_| written.len() == rows.len())
        .ok_or_else(|| {
            StoreError::Internal(format!(
                "a batch of {} creates returned {} revisions",
                rows.len(),
                written.len()
            ))
        })?;
    Ok(revisions)
}

/// PostgreSQL: writes one create alone ([`insert_batch`] of one); returns its revision.
pub(crate) async fn insert_one(pool: &PgPool, rows: &CreateRows) -> Result<i64, DbErrOr> {
    let revisions = insert_batch(pool, &[rows]).await?;
    revisions
        .first()
        .copied()
        .ok_or_else(|| StoreError::Internal("a create returned no revision".into()).into())
}

/// The revisions a batch statement returned (rows of `o`, the writer's ordinal from 1, and
/// `r`, its revision), in the writers' order: `None` for a writer without a row.
pub(crate) fn by_ordinal(
    written: &[sqlx::postgres::PgRow],
    writers: usize,
    what: &str,
) -> Result<Vec<Option<i64>>, DbErrOr> {
    let mut revisions = vec![None; writers];
    for row in written {
        let (ordinal, revision): (i64, i64) = (
            row.try_get("o").map_err(sqlx_error)?,
            row.try_get("r").map_err(sqlx_error)?,
        );
        let slot = usize::try_from(ordinal - 1)
            .ok()
            .and_then(|i| revisions.get_mut(i))
            .ok_or_else(|| {
                StoreError::Internal(format!("a {what} batch returned row {ordinal}"))
            })?;
        *slot = Some(revision);
    }
    Ok(revisions)
}

/// A sqlx error as sea-orm reports a query's, so that the store reads it the same way (a
/// unique index, the database unreachable).
pub(crate) fn sqlx_error(err: sqlx::Error) -> DbErrOr {
    DbErr::Query(RuntimeErr::SqlxError(std::sync::Arc::new(err))).into()
}

/// The statement of [`insert_batch`]: `$1..` are `columns` (the event's, its prev hash and
/// record, the request's), then `resource_columns`.
fn batch_sql(first: &CreateRows, columns: &[Column], resource_columns: &[Column]) -> String {
    let mut n = 0;
    let mut param = |column: &Column| {
        n += 1;
        format!("${n}::{}", column.sql_type())
    };
    let arrays: Vec<String> = columns.iter().map(&mut param).collect();
    let resource_arrays: Vec<String> = resource_columns.iter().map(&mut param).collect();
    let events = first.event.len();
    let event_names: Vec<String> = (0..events).map(|i| format!("e{i}")).collect();
    let request_names: Vec<String> = (0..first.request.len()).map(|i| format!("q{i}")).collect();
    // The log reader relies on a writer having its xid before it takes a revision (see
    // log.rs): the materialised `xid` row is produced before any revision is drawn. The
    // revisions are drawn explicitly so that the statement can hash each event with its own
    // (see `approvals_domain::audit`: `sha256(prev || int8send(revision) || record)`; NULL
    // when prev is NULL, unhashed).
    format!(
        "WITH xid AS MATERIALIZED (SELECT pg_current_xact_id()), \
         input AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('{EVENTS}', '{revision}')) \
         AS r, t.* FROM xid, unnest({arrays}) WITH ORDINALITY AS t({event_names}, prev, record, \
         {request_names}, o)), \
         event AS (INSERT INTO {EVENTS} ({revision}, {event_columns}, {prev_col}, {hash_col}) \
         OVERRIDING SYSTEM VALUE SELECT r, {event_names}, prev, \
         sha256(prev || int8send(r) || record) FROM input RETURNING {revision}, {hash_col}), \
         request AS (INSERT INTO {CHANGE_REQUESTS} ({request_columns}, {revision}, {head_col}) \
         SELECT {request_names}, event.{revision}, event.{hash_col} FROM input \
         JOIN event ON event.{revision} = input.r), \
         resources AS (INSERT INTO {RESOURCES} ({resource_columns}) \
         SELECT * FROM unnest({resource_arrays})) \
         SELECT o, r FROM input",
        revision = ev::REVISION,
        arrays = arrays.join(", "),
        event_names = event_names.join(", "),
        request_names = request_names.join(", "),
        event_columns = EVENT_COLUMNS[1..].join(", "),
        prev_col = ev::PREV_HASH,
        hash_col = ev::HASH,
        request_columns = REQUEST_COLUMNS.join(", "),
        head_col = cr::AUDIT_HEAD,
        resource_columns = RESOURCE_COLUMNS.join(", "),
        resource_arrays = resource_arrays.join(", "),
    )
}

/// SQLite: `new` written in one round trip to SQLite's worker thread, inside the batch's
/// transaction (see [`Store::write_in_task`](crate::Store)), without a savepoint: one command
/// inserts the request's row with the next revision and its CREATED event's hash (only while
/// `MAX(revision)` is the head it assumes, and doing nothing on a unique index: the request_id
/// or id taken), then the event's row and the resources' rows (each only when that request row
/// was written). Sets the request's revision and returns it.
///
/// When the command writes nothing (a stale head, or a unique index), the create is made again
/// the careful way, in a savepoint ([`insert`] after reading the head), which returns the unique
/// index's error. A command failing midway (not a constraint: the disk, the database) may have
/// left part of a create: it sets `poisoned`, and the batch is rolled back whole (its writers,
/// none yet answered, get the error). The caller runs this in a task that its own caller cannot
/// cancel: a command cut short (the worker stops when nobody reads its results) would leave part
/// of a create unnoticed.
pub(crate) async fn create_in_one_trip(
    db: &DatabaseTransaction,
    new: &mut NewRequest<'_>,
    head_guess: i64,
    poisoned: &AtomicBool,
) -> Result<i64, DbErrOr> {
    match create_after(db, new, head_guess).await {
        Ok(Some(revision)) => return Ok(revision),
        Ok(None) => {}
        Err(err) => {
            poisoned.store(true, Ordering::Release);
            return Err(err);
        }
    }
    let savepoint = db.begin().await?;
    match insert(&savepoint, std::slice::from_mut(new)).await {
        Ok(revision) => {
            savepoint.commit().await?;
            Ok(revision)
        }
        Err(err) => {
            savepoint.rollback().await?;
            Err(err)
        }
    }
}

/// [`create_in_one_trip`] after `head`: `None` when nothing was written.
async fn create_after(
    db: &impl ConnectionTrait,
    new: &mut NewRequest<'_>,
    head: i64,
) -> Result<Option<i64>, DbErrOr> {
    let revision = head + 1;
    let (event, record) = event_values(new.request, new.event, new.hashed)?;
    let hash = new.hashed.then(|| event_hash(&GENESIS, revision, &record));
    new.request.revision = revision;
    let mut request = request_values(new.request, new.key)?;
    request.push(revision.into());
    request.push(hash.map(|h| h.to_vec()).into());
    let resources = resource_values(new.request);

    let tuple = |n: usize| format!("({})", vec!["?"; n].join(", "));
    let written = format!(
        "WHERE EXISTS (SELECT 1 FROM {CHANGE_REQUESTS} WHERE {id} = ? AND {rev} = ?)",
        id = cr::ID,
        rev = cr::REVISION,
    );
    let mut params: Vec<sea_orm::Value> = Vec::new();
    let guard = |params: &mut Vec<sea_orm::Value>| {
        params.push(new.request.id.clone().into());
        params.push(revision.into());
    };
    let mut sql = format!(
        "INSERT INTO {CHANGE_REQUESTS} ({columns}, {rev}, {audit_head}) SELECT * FROM \
         (VALUES {values}) WHERE {head} = ? ON CONFLICT DO NOTHING; ",
        columns = REQUEST_COLUMNS.join(", "),
        rev = cr::REVISION,
        audit_head = cr::AUDIT_HEAD,
        values = tuple(REQUEST_COLUMNS.len() + 2),
        head = log_head(),
    );
    params.extend(request);
    params.push(head.into());
    sql.push_str(&format!(
        "INSERT INTO {EVENTS} ({columns}, {prev}, {hash}) SELECT * FROM (VALUES {values}) \
         {written}; ",
        columns = EVENT_COLUMNS.join(", "),
        prev = ev::PREV_HASH,
        hash = ev::HASH,
        values = tuple(EVENT_COLUMNS.len() + 2),
    ));
    params.push(revision.into());
    params.extend(event);
    params.push(hash.map(|_| GENESIS.to_vec()).into());
    params.push(hash.map(|h| h.to_vec()).into());
    guard(&mut params);
    if !resources.is_empty() {
        sql.push_str(&format!(
            "INSERT INTO {RESOURCES} ({columns}) SELECT * FROM (VALUES {values}) {written}",
            columns = RESOURCE_COLUMNS.join(", "),
            values = vec![tuple(RESOURCE_COLUMNS.len()); resources.len()].join(", "),
        ));
        for row in &resources {
            params.extend(row.iter().cloned());
        }
        guard(&mut params);
    }
    let expected = 2 + resources.len() as u64;
    match execute_sqlite(db, sql, params).await? {
        n if n == expected => Ok(Some(revision)),
        0 => Ok(None),
        // Unreachable: the event's and resources' rows are written exactly when the request's
        // row is, in the same command.
        n => Err(StoreError::Internal(format!(
            "a create wrote {n} rows where it writes {expected} or none"
        ))
        .into()),
    }
}
