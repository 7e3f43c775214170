//! One change request: create (idempotent by request_id), get, mutate.

use approvals_domain::{ChangeRequest, DomainError, EventDraft, Principal};
use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, SqlErr, Statement,
    sea_query::{Expr, ExprTrait, Query},
};

use crate::{
    applying::Step,
    codec::{
        EVENT_COLUMNS, decode_request, event_values, request_values, resource_keys, select_request,
    },
    connect::{Backend, Store},
    error::StoreError,
    schema::{CHANGE_REQUESTS, EVENTS, RESOURCES, cr, ev, res},
};

/// An idempotency key (AIP-155) and a digest of the request body it was used with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub request_id: String,
    pub fingerprint: String,
}

/// The result of a create: the request, and whether it existed already (a retried request_id).
#[derive(Debug)]
pub struct Created {
    pub change_request: ChangeRequest,
    pub existed: bool,
}

impl Store {
    /// Stores a new request and its CREATED event. With an idempotency key, a key this caller
    /// used before returns the request it created then (or `RequestIdReused` when the body
    /// differs), even when two such creates race.
    #[tracing::instrument(level = "info", skip_all, fields(change_request_id = %request.id, project = %request.project), err(level = "debug"))]
    pub async fn create(
        &self,
        mut request: ChangeRequest,
        event: EventDraft,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, StoreError> {
        if let Some(key) = &key
            && let Some(existing) = self.find_by_request_id(&request.created_by, key).await?
        {
            return Ok(existing);
        }
        let result = if self.backend == Backend::Postgres {
            self.create_in_one_statement(&mut request, &event, key.as_ref())
                .await
        } else {
            self.create_in_transaction(&mut request, &event, key.as_ref())
                .await
        };
        match result {
            Ok(()) => Ok(Created {
                change_request: request,
                existed: false,
            }),
            Err(err) => match (err, &key) {
                (DbErrOr::Db(db), Some(key))
                    if matches!(db.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) =>
                {
                    // Another create with the same request_id won the race.
                    self.find_by_request_id(&request.created_by, key)
                        .await?
                        .ok_or_else(|| StoreError::Internal("request_id vanished".into()))
                }
                (err, _) => Err(err.into()),
            },
        }
    }

    /// PostgreSQL: the event, the request and its resources in one statement, so a create is
    /// one round trip (it was six: begin, xid, three inserts, commit). Being one statement, it
    /// is atomic without a transaction block.
    async fn create_in_one_statement(
        &self,
        request: &mut ChangeRequest,
        event: &EventDraft,
        key: Option<&IdempotencyKey>,
    ) -> Result<(), DbErrOr> {
        let mut values: Vec<sea_orm::Value> = Vec::new();
        let mut placeholders = |row: Vec<sea_orm::Value>| {
            let start = values.len();
            let list: Vec<String> = (1..=row.len()).map(|i| format!("${}", start + i)).collect();
            values.extend(row);
            list.join(", ")
        };
        let event_columns = EVENT_COLUMNS[1..].join(", ");
        let event_row = placeholders(event_values(request, event)?);
        let (request_columns, request_row) = request_values(request, key)?;
        let request_row = placeholders(request_row);
        // The log reader relies on a writer having its xid before it takes a revision (see
        // log.rs): the materialised `xid` row is produced before the event row's identity
        // value is drawn.
        let mut sql = format!(
            "WITH xid AS MATERIALIZED (SELECT pg_current_xact_id()), \
             event AS (INSERT INTO {EVENTS} ({event_columns}) SELECT {event_row} FROM xid \
             RETURNING {revision}), \
             request AS (INSERT INTO {CHANGE_REQUESTS} ({request_columns}, {revision}) \
             SELECT {request_row}, event.{revision} FROM event)",
            revision = ev::REVISION,
            request_columns = request_columns.join(", "),
        );
        let keys = resource_keys(request);
        if !keys.is_empty() {
            let rows: Vec<String> = keys
                .into_iter()
                .map(|(resource_type, resource_id)| {
                    format!(
                        "({})",
                        placeholders(vec![
                            request.id.clone().into(),
                            request.project.clone().into(),
                            resource_type.into(),
                            resource_id.into(),
                        ])
                    )
                })
                .collect();
            sql.push_str(&format!(
                ", resources AS (INSERT INTO {RESOURCES} ({}, {}, {}, {}) VALUES {})",
                res::CHANGE_REQUEST_ID,
                res::PROJECT,
                res::RESOURCE_TYPE,
                res::RESOURCE_ID,
                rows.join(", ")
            ));
        }
        sql.push_str(&format!(" SELECT {} FROM event", ev::REVISION));
        let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
        let row = self
            .db
            .query_one_raw(statement)
            .await?
            .ok_or_else(|| StoreError::Internal("create returned no revision".into()))?;
        let revision: i64 = row.try_get("", ev::REVISION)?;
        self.note_written(revision);
        request.revision = revision;
        self.note_committed();
        Ok(())
    }

    /// SQLite: the same rows in one write transaction.
    async fn create_in_transaction(
        &self,
        request: &mut ChangeRequest,
        event: &EventDraft,
        key: Option<&IdempotencyKey>,
    ) -> Result<(), DbErrOr> {
        self.write(async |w| {
            let revision = w.append_event(request, event).await?;
            request.revision = revision;
            let (columns, mut values) = request_values(request, key)?;
            values.push(revision.into());
            let insert = Query::insert()
                .into_table(CHANGE_REQUESTS)
                .columns(columns.iter().copied().chain([cr::REVISION]))
                .values_panic(values.into_iter().map(Expr::val))
                .to_owned();
            w.txn.execute(&insert).await?;
            w.insert_resources(request).await?;
            Ok::<_, DbErrOr>(())
        })
        .await
    }

    async fn find_by_request_id(
        &self,
        created_by: &Principal,
        key: &IdempotencyKey,
    ) -> Result<Option<Created>, StoreError> {
        let query = Query::select()
            .columns([cr::REVISION, cr::BODY, cr::REQUEST_FINGERPRINT, cr::ID])
            .from(CHANGE_REQUESTS)
            .and_where(Expr::col(cr::CREATED_BY).eq(created_by.as_str()))
            .and_where(Expr::col(cr::REQUEST_ID).eq(key.request_id.as_str()))
            .to_owned();
        let Some(row) = self.db.query_one(&query).await? else {
            return Ok(None);
        };
        let fingerprint: Option<String> = row.try_get("", cr::REQUEST_FINGERPRINT)?;
        if fingerprint.as_deref() != Some(key.fingerprint.as_str()) {
            return Err(StoreError::RequestIdReused {
                request_id: key.request_id.clone(),
                change_request_id: row.try_get("", cr::ID)?,
            });
        }
        Ok(Some(Created {
            change_request: decode_request(&row)?,
            existed: true,
        }))
    }

    #[tracing::instrument(level = "info", skip(self), fields(change_request_id = %id), err(level = "debug"))]
    pub async fn get(&self, id: &str) -> Result<ChangeRequest, StoreError> {
        let query = select_request(id);
        match self.db.query_one(&query).await? {
            Some(row) => decode_request(&row),
            None => Err(StoreError::NotFound(id.to_owned())),
        }
    }

    /// Runs a domain command on one request in one transaction: lock the row, apply the
    /// command, store the new document and append its event. A refused command writes nothing.
    #[tracing::instrument(level = "info", skip(self, command), fields(change_request_id = %id), err(level = "debug"))]
    pub async fn mutate<F>(&self, id: &str, command: F) -> Result<ChangeRequest, StoreError>
    where
        F: FnOnce(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send,
    {
        self.step(id, |request| command(request).map(Step::Event))
            .await
    }
}

/// Either a database error (kept whole, to tell unique violations apart) or a store error.
enum DbErrOr {
    Db(DbErr),
    Store(StoreError),
}

impl From<DbErr> for DbErrOr {
    fn from(err: DbErr) -> Self {
        Self::Db(err)
    }
}

impl From<StoreError> for DbErrOr {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

impl From<serde_json::Error> for DbErrOr {
    fn from(err: serde_json::Error) -> Self {
        Self::Store(err.into())
    }
}

impl From<DbErrOr> for StoreError {
    fn from(err: DbErrOr) -> Self {
        match err {
            DbErrOr::Db(db) => db.into(),
            DbErrOr::Store(store) => store,
        }
    }
}
