//! The rows of new change requests, written the way every create writes them: the CREATED
//! event first (its identity column gives the revision), then the request's row carrying that
//! revision, then the rows of the resources its changes touch. Either one statement per table
//! for any number of requests (SQLite's create, and the bulk seed), or, on PostgreSQL, the three
//! in one statement (a create in one round trip). [`crate::seed`] offers both to benchmarks.

use std::collections::HashMap;

use approvals_domain::{ChangeRequest, EventDraft};
use sea_orm::{
    ConnectionTrait, DbBackend, Statement,
    sea_query::{Expr, Query},
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
}

/// Writes `new` with one multi-row statement per table, in `db` (a transaction, for them to be
/// written together). Sets each request's revision; returns the highest (0 when `new` is empty).
pub(crate) async fn insert(
    db: &impl ConnectionTrait,
    new: &mut [NewRequest<'_>],
) -> Result<i64, DbErrOr> {
    if new.is_empty() {
        return Ok(0);
    }
    let mut events = Query::insert();
    events
        .into_table(EVENTS)
        // Every column but the revision, which the identity column assigns.
        .columns(EVENT_COLUMNS[1..].iter().copied())
        .returning(Query::returning().columns([ev::REVISION, ev::CHANGE_REQUEST_ID]));
    for row in new.iter_mut() {
        events.values_panic(
            event_values(row.request, row.event)?
                .into_iter()
                .map(Expr::val),
        );
    }
    let mut revisions = HashMap::with_capacity(new.len());
    for row in db.query_all(&events).await? {
        let id: String = row.try_get("", ev::CHANGE_REQUEST_ID)?;
        let revision: i64 = row.try_get("", ev::REVISION)?;
        revisions.insert(id, revision);
    }

    let mut requests = Query::insert();
    requests
        .into_table(CHANGE_REQUESTS)
        .columns(REQUEST_COLUMNS.iter().copied().chain([cr::REVISION]));
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

/// PostgreSQL: writes `new` in one statement, so a create is one round trip (it was six:
/// begin, xid, three inserts, commit); being one statement, it is atomic without a transaction
/// block. Sets the request's revision and returns it.
pub(crate) async fn insert_in_one_statement(
    db: &impl ConnectionTrait,
    new: NewRequest<'_>,
) -> Result<i64, DbErrOr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(
            StoreError::Internal("a create in one statement needs PostgreSQL".into()).into(),
        );
    }
    let NewRequest {
        request,
        event,
        key,
    } = new;
    let mut values: Vec<sea_orm::Value> = Vec::new();
    let mut placeholders = |row: Vec<sea_orm::Value>| {
        let start = values.len();
        let list: Vec<String> = (1..=row.len()).map(|i| format!("${}", start + i)).collect();
        values.extend(row);
        list.join(", ")
    };
    let event_columns = EVENT_COLUMNS[1..].join(", ");
    let event_row = placeholders(event_values(request, event)?);
    let request_row = placeholders(request_values(request, key)?);
    // The log reader relies on a writer having its xid before it takes a revision (see
    // log.rs): the materialised `xid` row is produced before the event row's identity value is
    // drawn.
    let mut sql = format!(
        "WITH xid AS MATERIALIZED (SELECT pg_current_xact_id()), \
         event AS (INSERT INTO {EVENTS} ({event_columns}) SELECT {event_row} FROM xid \
         RETURNING {revision}), \
         request AS (INSERT INTO {CHANGE_REQUESTS} ({request_columns}, {revision}) \
         SELECT {request_row}, event.{revision} FROM event)",
        revision = ev::REVISION,
        request_columns = REQUEST_COLUMNS.join(", "),
    );
    let resource_rows = resource_values(request);
    if !resource_rows.is_empty() {
        let rows: Vec<String> = resource_rows
            .into_iter()
            .map(|row| format!("({})", placeholders(row.into())))
            .collect();
        sql.push_str(&format!(
            ", resources AS (INSERT INTO {RESOURCES} ({}) VALUES {})",
            RESOURCE_COLUMNS.join(", "),
            rows.join(", ")
        ));
    }
    sql.push_str(&format!(" SELECT {} FROM event", ev::REVISION));
    let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
    let row = db
        .query_one_raw(statement)
        .await?
        .ok_or_else(|| StoreError::Internal("create returned no revision".into()))?;
    let revision: i64 = row.try_get("", ev::REVISION)?;
    request.revision = revision;
    Ok(revision)
}
