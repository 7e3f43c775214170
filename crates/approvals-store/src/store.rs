use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use approvals_domain::{
    ChangeRequest, Comment, DomainError, Event, EventDraft, EventKind, Principal, RequestFilter,
    State, Timestamp,
};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, QueryResult, SqlErr, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
    sea_query::{Alias, Expr, ExprTrait, Func, LockType, Order, Query, SelectStatement},
    sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous},
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, MutexGuard, Notify, watch};

use crate::{
    error::StoreError,
    migration::Migrator,
    redact::redact_url,
    schema::{CHANGE_REQUESTS, EVENTS, RESOURCES, cr, ev, res},
};

/// `total_size` is exact up to this many matching requests and an estimate beyond (AIP-158).
/// Counting is proportional to the matches: at 10,000 a broad filter's list took 11 ms at p99
/// over 1,000,000 requests (approvals-bench), at 1,000 it takes a few.
pub const TOTAL_SIZE_EXACT_LIMIT: i64 = 1_000;

/// How long a planner estimate of a list's total is reused, and how many are kept.
const ESTIMATE_TTL: Duration = Duration::from_secs(60);
const ESTIMATES_KEPT: usize = 4096;

/// PostgreSQL LISTEN/NOTIFY channel on which replicas announce commits.
const COMMIT_CHANNEL: &str = "approvals_events";

/// Key of the PostgreSQL advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK_KEY: i64 = 0x6170_7072_6f76_616c; // "approval"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: String,
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before failing with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// PostgreSQL `statement_timeout` for every statement.
    pub statement_timeout: Duration,
}

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

/// Filters of `ListChangeRequests`: the domain's [`RequestFilter`], under its old name until
/// the server uses that one.
pub type ListFilter = RequestFilter;

/// A page of a snapshot at a revision (see [`Store::requests_at_page`]).
#[derive(Debug)]
pub struct SnapshotPage {
    /// The page's requests as they stood at the revision, newest id first.
    pub change_requests: Vec<ChangeRequest>,
    /// The id to read the next page below; `None` after the last page.
    pub next_before: Option<String>,
}

#[derive(Debug)]
pub struct ListPage {
    pub change_requests: Vec<ChangeRequest>,
    /// The id to continue after, when there are more results.
    pub next_after: Option<String>,
    pub total_size: i64,
}

/// The store: one connection pool, and the use cases as transactions.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: DatabaseConnection,
    pub(crate) backend: Backend,
    /// SQLite takes one writer at a time; queueing writers here, in order, is fairer and cheaper
    /// than letting them spin on the busy timeout. Unused on PostgreSQL.
    sqlite_writer: Arc<Mutex<()>>,
    /// Counts this process's commits, so the log reader wakes at once after a local write.
    commits: Arc<watch::Sender<u64>>,
    /// The highest revision this process has appended to the log (committed or not).
    written: Arc<AtomicI64>,
    /// Estimates of list totals beyond the exact limit, by statement, reused for a minute:
    /// PostgreSQL's planner estimate changes only with the table's statistics (ANALYZE); on
    /// SQLite it is a count, a minute old at most.
    estimates: Arc<std::sync::Mutex<HashMap<String, (Instant, i64)>>>,
    url: Arc<str>,
}

impl Store {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let backend = if settings.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if settings.url.starts_with("postgres://")
            || settings.url.starts_with("postgresql://")
        {
            Backend::Postgres
        } else {
            return Err(StoreError::Unavailable(format!(
                "unsupported database url {:?}: expected sqlite://PATH or postgres://...",
                redact_url(&settings.url)
            )));
        };
        let mut options = ConnectOptions::new(settings.url.clone());
        options
            .max_connections(Ord::max(settings.max_connections, 1))
            .min_connections(0)
            .acquire_timeout(settings.acquire_timeout)
            .connect_timeout(settings.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            // Ping only connections idle for a while (those a restart, proxy or firewall may
            // have dropped), not every checkout: a ping per checkout is one more round trip on
            // every call (approvals-bench, PostgreSQL, 64 in flight: see the README figures).
            .test_before_acquire_if_idle_for(Duration::from_secs(1))
            .sqlx_logging(false);
        match backend {
            Backend::Sqlite => {
                options.map_sqlx_sqlite_opts(|o| {
                    o.create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        // FULL: an acknowledged write survives a power cut, not only a crash.
                        .synchronous(SqliteSynchronous::Full)
                        .busy_timeout(Duration::from_secs(5))
                });
            }
            Backend::Postgres => {
                let timeout_ms = settings.statement_timeout.as_millis().to_string();
                options.map_sqlx_postgres_opts(move |o| {
                    o.options([("statement_timeout", timeout_ms.as_str())])
                        .application_name("approvals")
                });
            }
        }
        let db = Database::connect(options).await.map_err(|err| {
            StoreError::Unavailable(format!(
                "cannot connect to {}: {err}",
                redact_url(&settings.url)
            ))
        })?;
        Ok(Self {
            db,
            backend,
            sqlite_writer: Arc::new(Mutex::new(())),
            commits: Arc::new(watch::channel(0).0),
            written: Arc::new(AtomicI64::new(0)),
            estimates: Arc::default(),
            url: settings.url.as_str().into(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The highest revision this process has appended to the event log, from the moment it is
    /// appended (before its commit): a reader that has applied the log up to it has seen every
    /// write this process made.
    pub fn written_head(&self) -> i64 {
        self.written.load(Ordering::Acquire)
    }

    fn note_written(&self, revision: i64) {
        self.written.fetch_max(revision, Ordering::AcqRel);
    }

    /// Changes after every commit this process makes.
    pub fn local_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    async fn commit(&self, txn: DatabaseTransaction) -> Result<(), StoreError> {
        txn.commit().await?;
        self.note_committed();
        Ok(())
    }

    /// Wakes this process's log reader: something was just committed.
    fn note_committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// PostgreSQL: relays commits between replicas (LISTEN/NOTIFY on `approvals_events`): a
    /// NOTIFY after local commits (coalesced, outside the write transactions, so writers never
    /// queue on the notification lock), and `wake` notified when any replica commits. Other
    /// backends have one process and need nothing. The tasks reconnect on their own.
    pub fn spawn_commit_relay(&self, wake: Arc<Notify>) -> Vec<tokio::task::JoinHandle<()>> {
        if self.backend != Backend::Postgres {
            return Vec::new();
        }
        let url = self.url.clone();
        let listener = tokio::spawn(async move {
            use sea_orm::sqlx::postgres::PgListener;
            loop {
                match PgListener::connect(&url).await {
                    Ok(mut listener) => {
                        if let Err(err) = listener.listen(COMMIT_CHANNEL).await {
                            tracing::warn!(error = %err, "LISTEN failed");
                        } else {
                            // A reconnect may have missed notifications: wake the reader once.
                            wake.notify_one();
                            while listener.recv().await.is_ok() {
                                wake.notify_one();
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot connect to LISTEN for commits")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let store = self.clone();
        let notifier = tokio::spawn(async move {
            let mut commits = store.local_commits();
            while commits.changed().await.is_ok() {
                let notify = Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT pg_notify('{COMMIT_CHANNEL}', '')"),
                );
                if let Err(err) = store.db.execute_raw(notify).await {
                    tracing::debug!(error = %err, "NOTIFY failed");
                }
                // Coalesce: one notification covers the commits of the next few milliseconds.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        vec![listener, notifier]
    }

    fn db_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Applies pending migrations. On PostgreSQL under an advisory lock, so replicas starting
    /// together apply them once; on SQLite in one immediate (write-locked) transaction.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (_writer, txn) = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK_KEY.into()],
            ))
            .await?;
        }
        match Migrator::up(&txn, None).await {
            Ok(()) => Ok(txn.commit().await?),
            Err(err) => {
                rollback(txn).await;
                Err(err.into())
            }
        }
    }

    /// The pool's open connections and how many of them are idle, for metrics.
    pub fn pool_usage(&self) -> (u32, usize) {
        match self.backend {
            Backend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            Backend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
        }
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .query_one_raw(Statement::from_string(self.db_backend(), "SELECT 1"))
            .await?;
        Ok(())
    }

    pub(crate) async fn begin_write(
        &self,
    ) -> Result<(Option<MutexGuard<'_, ()>>, DatabaseTransaction), StoreError> {
        let guard = match self.backend {
            Backend::Sqlite => Some(self.sqlite_writer.lock().await),
            Backend::Postgres => None,
        };
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok((guard, txn))
    }

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
        let (writer, txn) = self.begin_write().await?;
        let result = async {
            let revision = self.append_event(&txn, request, event).await?;
            request.revision = revision;
            let (columns, mut values) = request_values(request, key)?;
            values.push(revision.into());
            let insert = Query::insert()
                .into_table(CHANGE_REQUESTS)
                .columns(columns.iter().copied().chain([cr::REVISION]))
                .values_panic(values.into_iter().map(Expr::val))
                .to_owned();
            txn.execute(&insert).await?;
            self.insert_resources(&txn, request).await?;
            Ok::<_, DbErrOr>(())
        }
        .await;
        match result {
            Ok(()) => Ok(self.commit(txn).await?),
            Err(err) => {
                rollback(txn).await;
                drop(writer);
                Err(err)
            }
        }
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
        let (_writer, txn) = self.begin_write().await?;
        let result = async {
            let mut request = self.lock_request(&txn, id).await?;
            let before = resource_keys(&request);
            let event = command(&mut request)?;
            self.write_request(&txn, &mut request, Some(&event), &before)
                .await?;
            Ok(request)
        }
        .await;
        self.finish(txn, result).await
    }

    /// Commits on success, rolls back on error.
    pub(crate) async fn finish<T>(
        &self,
        txn: DatabaseTransaction,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                self.commit(txn).await?;
                Ok(value)
            }
            Err(err) => {
                rollback(txn).await;
                Err(err)
            }
        }
    }

    /// Reads one request inside `txn`, locking its row (PostgreSQL; SQLite's write
    /// transaction already excludes other writers).
    pub(crate) async fn lock_request(
        &self,
        txn: &DatabaseTransaction,
        id: &str,
    ) -> Result<ChangeRequest, StoreError> {
        let mut query = select_request(id);
        if self.backend == Backend::Postgres {
            query.lock(LockType::Update);
        }
        let row = txn
            .query_one(&query)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        decode_request(&row)
    }

    /// Writes a locked request back: with an event (a new revision), or without one for the
    /// service's own bookkeeping (leases, attempts), which keeps the revision.
    pub(crate) async fn write_request(
        &self,
        txn: &DatabaseTransaction,
        request: &mut ChangeRequest,
        event: Option<&EventDraft>,
        resources_before: &BTreeSet<(String, String)>,
    ) -> Result<(), StoreError> {
        let previous_revision = request.revision;
        if let Some(event) = event {
            request.revision = self.append_event(txn, request, event).await?;
        }
        let update = Query::update()
            .table(CHANGE_REQUESTS)
            .value(cr::STATE, request.state.as_str())
            .value(cr::UPDATE_TIME, request.update_time.as_micros())
            .value(
                cr::EXPIRE_TIME,
                request.expire_time.map(Timestamp::as_micros),
            )
            .value(
                cr::DUE_TIME,
                request.next_due_time().map(Timestamp::as_micros),
            )
            .value(cr::REVISION, request.revision)
            .value(cr::BODY, serde_json::to_string(&request)?)
            .and_where(Expr::col(cr::ID).eq(request.id.as_str()))
            .and_where(Expr::col(cr::REVISION).eq(previous_revision))
            .to_owned();
        let updated = txn.execute(&update).await?;
        if updated.rows_affected() != 1 {
            // Unreachable while the row lock holds; refuse rather than lose an update.
            return Err(StoreError::Internal(format!(
                "change request {} changed during the transaction",
                request.id
            )));
        }
        if &resource_keys(request) != resources_before {
            let delete = Query::delete()
                .from_table(RESOURCES)
                .and_where(Expr::col(res::CHANGE_REQUEST_ID).eq(request.id.as_str()))
                .to_owned();
            txn.execute(&delete).await?;
            self.insert_resources(txn, request).await?;
        }
        Ok(())
    }

    async fn append_event(
        &self,
        txn: &DatabaseTransaction,
        request: &mut ChangeRequest,
        event: &EventDraft,
    ) -> Result<i64, StoreError> {
        let insert = Query::insert()
            .into_table(EVENTS)
            // Every column but the revision, which the identity column assigns.
            .columns(EVENT_COLUMNS[1..].iter().copied())
            .values_panic(event_values(request, event)?.into_iter().map(Expr::val))
            .returning_col(ev::REVISION)
            .to_owned();
        let row = txn
            .query_one(&insert)
            .await?
            .ok_or_else(|| StoreError::Internal("event insert returned no revision".into()))?;
        let revision = row.try_get("", ev::REVISION)?;
        self.note_written(revision);
        Ok(revision)
    }

    async fn insert_resources(
        &self,
        txn: &DatabaseTransaction,
        request: &ChangeRequest,
    ) -> Result<(), StoreError> {
        let keys = resource_keys(request);
        if keys.is_empty() {
            return Ok(());
        }
        let mut insert = Query::insert();
        insert.into_table(RESOURCES).columns([
            res::CHANGE_REQUEST_ID,
            res::PROJECT,
            res::RESOURCE_TYPE,
            res::RESOURCE_ID,
        ]);
        for (resource_type, resource_id) in keys {
            insert.values_panic([
                request.id.clone().into(),
                request.project.clone().into(),
                resource_type.into(),
                resource_id.into(),
            ]);
        }
        txn.execute(&insert).await?;
        Ok(())
    }

    /// Up to `limit` requests matching `filter`, newest first, after the id `after`.
    /// Up to `limit` requests matching `filter`, newest first, after the id `after`; with
    /// `count`, each row also carries the number of matching requests, capped at
    /// `TOTAL_SIZE_EXACT_LIMIT + 1` (one round trip for the page and its total).
    async fn list_rows(
        &self,
        filter: &RequestFilter,
        after: Option<&str>,
        limit: u64,
        count: Option<&SelectStatement>,
    ) -> Result<(Vec<ChangeRequest>, Option<i64>), StoreError> {
        let mut query = Query::select();
        query
            .columns([cr::ID, cr::REVISION, cr::BODY])
            .from(CHANGE_REQUESTS);
        if let Some(count) = count {
            query.expr_as(count_of(count), Alias::new("total_size"));
        }
        apply_filter(&mut query, filter);
        if let Some(after) = after {
            query.and_where(Expr::col(cr::ID).lt(after));
        }
        query.order_by(cr::ID, Order::Desc).limit(limit);
        let rows = self.db.query_all(&query).await?;
        let total = match (count, rows.first()) {
            (Some(_), Some(row)) => Some(row.try_get("", "total_size")?),
            _ => None,
        };
        let requests = rows.iter().map(decode_request).collect::<Result<_, _>>()?;
        Ok((requests, total))
    }

    /// One page of requests matching `filter`, newest first, after the id `after`.
    #[tracing::instrument(level = "info", skip_all, err(level = "debug"))]
    pub async fn list(
        &self,
        filter: &RequestFilter,
        after: Option<&str>,
        page_size: u64,
    ) -> Result<ListPage, StoreError> {
        // The matching requests, at most one more than the exact limit.
        let mut count_query = Query::select();
        count_query.from(CHANGE_REQUESTS);
        apply_filter(&mut count_query, filter);
        count_query
            .expr(Expr::val(1))
            .limit(TOTAL_SIZE_EXACT_LIMIT as u64 + 1);
        let (mut change_requests, counted) = self
            .list_rows(filter, after, page_size + 1, Some(&count_query))
            .await?;
        let next_after = if change_requests.len() as u64 > page_size {
            change_requests.truncate(page_size as usize);
            change_requests.last().map(|r| r.id.clone())
        } else {
            None
        };
        let mut total_size = match counted {
            Some(n) => n,
            // The first page is empty: nothing matches.
            None if after.is_none() => 0,
            // Past the last page: count on its own.
            None => match self.db.query_one(&count_of(&count_query)).await? {
                Some(row) => row.try_get("", "n")?,
                None => 0,
            },
        };
        if total_size > TOTAL_SIZE_EXACT_LIMIT {
            total_size = Ord::max(self.estimate_count(count_query).await?, total_size);
        }
        Ok(ListPage {
            change_requests,
            next_after,
            total_size,
        })
    }

    /// An estimate of `key`'s total made less than `ESTIMATE_TTL` ago.
    fn cached_estimate(&self, key: &str) -> Option<i64> {
        let estimates = self.estimates.lock().unwrap_or_else(|e| e.into_inner());
        estimates
            .get(key)
            .filter(|(at, _)| at.elapsed() < ESTIMATE_TTL)
            .map(|(_, estimate)| *estimate)
    }

    fn remember_estimate(&self, key: String, estimate: i64) {
        let mut estimates = self.estimates.lock().unwrap_or_else(|e| e.into_inner());
        if estimates.len() >= ESTIMATES_KEPT {
            estimates.retain(|_, (at, _)| at.elapsed() < ESTIMATE_TTL);
            if estimates.len() >= ESTIMATES_KEPT {
                estimates.clear();
            }
        }
        estimates.insert(key, (Instant::now(), estimate));
    }

    /// Beyond the exact limit: PostgreSQL's planner estimate (no scan of a million rows), or an
    /// exact count on SQLite, whose planner gives no row estimate; either reused for a minute.
    async fn estimate_count(&self, mut matching: SelectStatement) -> Result<i64, StoreError> {
        matching.reset_limit();
        let (sql, values) = matching.build(sea_orm::sea_query::PostgresQueryBuilder);
        let key = format!("{sql} {values:?}");
        if let Some(estimate) = self.cached_estimate(&key) {
            return Ok(estimate);
        }
        let estimate = match self.backend {
            Backend::Postgres => {
                let stmt = Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!("EXPLAIN (FORMAT JSON) {sql}"),
                    values,
                );
                let row = self.db.query_one_raw(stmt).await?;
                let plan: Option<serde_json::Value> = match row {
                    Some(row) => row.try_get_by_index::<serde_json::Value>(0).ok(),
                    None => None,
                };
                plan.and_then(|p| {
                    p.pointer("/0/Plan/Plan Rows")
                        .and_then(serde_json::Value::as_f64)
                })
                .map(|rows| rows as i64)
                .unwrap_or(TOTAL_SIZE_EXACT_LIMIT + 1)
            }
            Backend::Sqlite => {
                // No planner estimate: an exact count, reused as an estimate like PostgreSQL's.
                match self.db.query_one(&count_of(&matching)).await? {
                    Some(row) => row.try_get("", "n")?,
                    None => 0,
                }
            }
        };
        self.remember_estimate(key, estimate);
        Ok(estimate)
    }

    /// One page of the requests matching `filter` as they stood at `revision`, which must be
    /// settled (every event at or below it committed or rolled back), ids below `before` (every
    /// id when `None`), newest id first: at most `limit` that match now and `limit` changed
    /// since `revision`, so at most twice `limit`. Reading the pages from
    /// `None` to the last (`next_before` is `None`) gives every such request exactly once, each
    /// page read when it is asked for, so memory holds a page whatever the number of matches.
    ///
    /// A page covers one range of ids. In it, a request whose row is still at or below
    /// `revision` stands as it did then, and matches now as it did; one changed since comes
    /// from the event log's snapshot at or below `revision` (leaving out requests created after
    /// it), matched in memory, since it may match then and not now. The changed ones are read
    /// from the log's tail after the rows, so a row read as changed is among them, and a row
    /// read unchanged and changed since is taken from the row (it was read as it stood).
    pub async fn requests_at_page(
        &self,
        filter: &RequestFilter,
        revision: i64,
        before: Option<&str>,
        limit: u64,
    ) -> Result<SnapshotPage, StoreError> {
        let limit = Ord::max(limit, 1);
        // The rows that match now, as ListChangeRequests finds them (with its indexes).
        let (current, _) = self.list_rows(filter, before, limit, None).await?;
        // The page's range is [floor, before): bounded below when there may be more.
        let mut floor = (current.len() as u64 == limit)
            .then(|| current.last().map(|r| r.id.clone()))
            .flatten();
        // Requests of the project changed after `revision`, in that range: the log's tail.
        let mut changed = Query::select();
        changed
            .distinct()
            .column(ev::CHANGE_REQUEST_ID)
            .from(EVENTS)
            .and_where(Expr::col(ev::REVISION).gt(revision))
            .and_where(Expr::col(ev::PROJECT).eq(filter.project.as_str()));
        if let Some(id) = &filter.id {
            changed.and_where(Expr::col(ev::CHANGE_REQUEST_ID).eq(id.as_str()));
        }
        if let Some(before) = before {
            changed.and_where(Expr::col(ev::CHANGE_REQUEST_ID).lt(before));
        }
        if let Some(floor) = &floor {
            changed.and_where(Expr::col(ev::CHANGE_REQUEST_ID).gte(floor.as_str()));
        }
        changed
            .order_by(ev::CHANGE_REQUEST_ID, Order::Desc)
            .limit(limit);
        let changed_ids = self
            .db
            .query_all(&changed)
            .await?
            .iter()
            .map(|row| row.try_get::<String>("", ev::CHANGE_REQUEST_ID))
            .collect::<Result<Vec<_>, _>>()?;
        if changed_ids.len() as u64 == limit {
            // As many changed as a page holds: the range ends at the last of them (each is
            // at or above the floor already).
            floor = changed_ids.last().cloned();
        }
        let in_range = |id: &str| floor.as_deref().is_none_or(|floor| id >= floor);

        let mut found = Vec::new();
        let mut settled = std::collections::HashSet::new();
        let mut lookup = BTreeSet::new();
        for request in current {
            if !in_range(&request.id) {
                continue;
            }
            if request.revision <= revision {
                settled.insert(request.id.clone());
                found.push(request);
            } else {
                lookup.insert(request.id);
            }
        }
        lookup.extend(
            changed_ids
                .into_iter()
                .filter(|id| in_range(id) && !settled.contains(id)),
        );
        if !lookup.is_empty() {
            // The latest event at or below `revision` of each: the request as it stood.
            let latest = Query::select()
                .column(ev::CHANGE_REQUEST_ID)
                .expr_as(Func::max(Expr::col(ev::REVISION)), Alias::new("at"))
                .from(EVENTS)
                .and_where(
                    Expr::col(ev::CHANGE_REQUEST_ID).is_in(lookup.iter().map(String::as_str)),
                )
                .and_where(Expr::col(ev::REVISION).lte(revision))
                .group_by_col(ev::CHANGE_REQUEST_ID)
                .to_owned();
            let revisions = self
                .db
                .query_all(&latest)
                .await?
                .iter()
                .map(|row| row.try_get::<i64>("", "at"))
                .collect::<Result<Vec<_>, _>>()?;
            if !revisions.is_empty() {
                let events = Query::select()
                    .columns(EVENT_COLUMNS)
                    .from(EVENTS)
                    .and_where(Expr::col(ev::REVISION).is_in(revisions))
                    .to_owned();
                let rows = self
                    .db
                    .query_all(&events)
                    .await?
                    .iter()
                    .map(|row| decode_event(row, true))
                    .collect::<Result<Vec<_>, _>>()?;
                for event in with_comments(&self.db, rows).await? {
                    if let Some(request) = event.change_request
                        && filter.matches(&request)
                    {
                        found.push(request);
                    }
                }
            }
        }
        found.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(SnapshotPage {
            change_requests: found,
            next_before: floor,
        })
    }

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

pub(crate) const EVENT_COLUMNS: [&str; 13] = [
    ev::REVISION,
    ev::CHANGE_REQUEST_ID,
    ev::PROJECT,
    ev::ENVIRONMENT,
    ev::KIND,
    ev::ACTOR,
    ev::ACTING_PRINCIPAL,
    ev::FROM_STATE,
    ev::TO_STATE,
    ev::EVENT_TIME,
    ev::DETAIL,
    ev::SNAPSHOT,
    ev::COMMENT_COUNT,
];

/// `SELECT COUNT(*) AS n` of the rows `matching` selects.
fn count_of(matching: &SelectStatement) -> SelectStatement {
    Query::select()
        .expr_as(Expr::cust("COUNT(*)"), Alias::new("n"))
        .from_subquery(matching.clone(), Alias::new("matching"))
        .to_owned()
}

/// The values of an event row, in the order of `EVENT_COLUMNS[1..]` (all but the revision).
/// The snapshot is the request without its comments, and the number of comments beside it (see
/// [`ev::COMMENT_COUNT`]); `request` is as it was when this returns.
fn event_values(
    request: &mut ChangeRequest,
    event: &EventDraft,
) -> Result<Vec<sea_orm::Value>, StoreError> {
    let comments = std::mem::take(&mut request.comments);
    let snapshot = serde_json::to_string(&*request);
    request.comments = comments;
    let comment_count = i64::try_from(request.comments.len())
        .map_err(|_| StoreError::Internal("too many comments to count".into()))?;
    Ok(vec![
        request.id.clone().into(),
        request.project.clone().into(),
        request.environment.clone().into(),
        event.kind.as_str().into(),
        event.actor.as_str().into(),
        event
            .acting_principal
            .as_ref()
            .map(|p| p.as_str().to_owned())
            .into(),
        event.from_state.as_str().into(),
        event.to_state.as_str().into(),
        event.time.as_micros().into(),
        event.detail.clone().into(),
        snapshot?.into(),
        comment_count.into(),
    ])
}

/// The columns and values of a new request's row, all but the revision (which the event
/// assigns; the stored body's revision is never read, the column's is).
fn request_values(
    request: &ChangeRequest,
    key: Option<&IdempotencyKey>,
) -> Result<([&'static str; 13], Vec<sea_orm::Value>), StoreError> {
    let columns = [
        cr::ID,
        cr::PROJECT,
        cr::ENVIRONMENT,
        cr::ACTION_KEY,
        cr::STATE,
        cr::CREATED_BY,
        cr::CREATE_TIME,
        cr::UPDATE_TIME,
        cr::EXPIRE_TIME,
        cr::DUE_TIME,
        cr::REQUEST_ID,
        cr::REQUEST_FINGERPRINT,
        cr::BODY,
    ];
    let values = vec![
        request.id.clone().into(),
        request.project.clone().into(),
        request.environment.clone().into(),
        request.action_key.clone().into(),
        request.state.as_str().into(),
        request.created_by.as_str().into(),
        request.create_time.as_micros().into(),
        request.update_time.as_micros().into(),
        request.expire_time.map(Timestamp::as_micros).into(),
        request.next_due_time().map(Timestamp::as_micros).into(),
        key.map(|k| k.request_id.clone()).into(),
        key.map(|k| k.fingerprint.clone()).into(),
        serde_json::to_string(request)?.into(),
    ];
    Ok((columns, values))
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

pub(crate) async fn rollback(txn: DatabaseTransaction) {
    if let Err(err) = txn.rollback().await {
        tracing::warn!(error = %err, "rollback failed");
    }
}

pub(crate) fn select_request(id: &str) -> SelectStatement {
    Query::select()
        .columns([cr::ID, cr::REVISION, cr::BODY])
        .from(CHANGE_REQUESTS)
        .and_where(Expr::col(cr::ID).eq(id))
        .to_owned()
}

pub(crate) fn apply_filter(query: &mut SelectStatement, filter: &RequestFilter) {
    query.and_where(Expr::col(cr::PROJECT).eq(filter.project.as_str()));
    if let Some(environment) = &filter.environment {
        query.and_where(Expr::col(cr::ENVIRONMENT).eq(environment.as_str()));
    }
    if let Some(action_key) = &filter.action_key {
        query.and_where(Expr::col(cr::ACTION_KEY).eq(action_key.as_str()));
    }
    if let Some(requester) = &filter.requester {
        query.and_where(Expr::col(cr::CREATED_BY).eq(requester.as_str()));
    }
    if let Some(id) = &filter.id {
        query.and_where(Expr::col(cr::ID).eq(id.as_str()));
    }
    if !filter.states.is_empty() {
        query.and_where(Expr::col(cr::STATE).is_in(filter.states.iter().map(|s| s.as_str())));
    }
    if filter.resource_type.is_some() || filter.resource_id.is_some() {
        let mut touching = Query::select();
        touching
            .column(res::CHANGE_REQUEST_ID)
            .from(RESOURCES)
            .and_where(Expr::col(res::PROJECT).eq(filter.project.as_str()));
        if let Some(resource_type) = &filter.resource_type {
            touching.and_where(Expr::col(res::RESOURCE_TYPE).eq(resource_type.as_str()));
        }
        if let Some(resource_id) = &filter.resource_id {
            touching.and_where(Expr::col(res::RESOURCE_ID).eq(resource_id.as_str()));
        }
        query.and_where(Expr::col(cr::ID).in_subquery(touching));
    }
}

pub(crate) fn resource_keys(request: &ChangeRequest) -> BTreeSet<(String, String)> {
    request
        .changes
        .iter()
        .map(|c| (c.resource_type.clone(), c.resource_id.clone()))
        .collect()
}

pub(crate) fn decode_request(row: &QueryResult) -> Result<ChangeRequest, StoreError> {
    let body: String = row.try_get("", cr::BODY)?;
    let mut request: ChangeRequest = serde_json::from_str(&body)?;
    request.revision = row.try_get("", cr::REVISION)?;
    Ok(request)
}

pub(crate) fn decode_request_row(row: &QueryResult) -> Result<ChangeRequest, StoreError> {
    decode_request(row)
}

/// An event row as read, before its snapshot got its comments back (see [`with_comments`]).
pub(crate) struct EventRow {
    event: Event,
    /// The snapshot left out the request's first `n` comments (None: it holds its comments).
    comments_apart: Option<usize>,
}

pub(crate) fn decode_event(row: &QueryResult, with_snapshot: bool) -> Result<EventRow, StoreError> {
    let revision: i64 = row.try_get("", ev::REVISION)?;
    let kind: String = row.try_get("", ev::KIND)?;
    let from: String = row.try_get("", ev::FROM_STATE)?;
    let to: String = row.try_get("", ev::TO_STATE)?;
    let actor: String = row.try_get("", ev::ACTOR)?;
    let acting: Option<String> = row.try_get("", ev::ACTING_PRINCIPAL)?;
    let corrupt =
        |what: &str| StoreError::Internal(format!("event {revision} has an unknown {what}"));
    let (change_request, comments_apart) = if with_snapshot {
        let snapshot: String = row.try_get("", ev::SNAPSHOT)?;
        let mut request: ChangeRequest = serde_json::from_str(&snapshot)?;
        request.revision = revision;
        let count: Option<i64> = row.try_get("", ev::COMMENT_COUNT)?;
        let count = count
            .map(|n| usize::try_from(n).map_err(|_| corrupt("comment count")))
            .transpose()?;
        (Some(request), count)
    } else {
        (None, None)
    };
    let event = Event {
        revision,
        change_request_id: row.try_get("", ev::CHANGE_REQUEST_ID)?,
        project: row.try_get("", ev::PROJECT)?,
        environment: row.try_get("", ev::ENVIRONMENT)?,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        actor: Principal::parse(&actor).map_err(|_| corrupt("actor"))?,
        acting_principal: acting
            .map(|p| Principal::parse(&p).map_err(|_| corrupt("acting principal")))
            .transpose()?,
        from_state: State::parse(&from).ok_or_else(|| corrupt("from_state"))?,
        to_state: State::parse(&to).ok_or_else(|| corrupt("to_state"))?,
        time: Timestamp::from_micros(row.try_get("", ev::EVENT_TIME)?),
        detail: row.try_get("", ev::DETAIL)?,
        change_request,
    };
    Ok(EventRow {
        event,
        comments_apart,
    })
}

/// The comments of a stored request, read without the rest of it.
#[derive(serde::Deserialize)]
struct CommentsOnly {
    #[serde(default)]
    comments: Vec<Comment>,
}

/// The events of `rows`, each snapshot with its comments: the first `comment_count` comments of
/// the request as it is now (one read of the request rows that need it). Exact, because
/// comments are only ever appended, in order, in the same transaction as their event, and a
/// request row is never deleted: the row read here, at least as new as the events, holds every
/// comment each of them had, first.
pub(crate) async fn with_comments(
    db: &impl ConnectionTrait,
    rows: Vec<EventRow>,
) -> Result<Vec<Event>, StoreError> {
    let wanted: BTreeSet<String> = rows
        .iter()
        .filter(|row| row.event.change_request.is_some() && row.comments_apart.unwrap_or(0) > 0)
        .map(|row| row.event.change_request_id.clone())
        .collect();
    let mut comments: HashMap<String, Vec<Comment>> = HashMap::new();
    if !wanted.is_empty() {
        let query = Query::select()
            .columns([cr::ID, cr::BODY])
            .from(CHANGE_REQUESTS)
            .and_where(Expr::col(cr::ID).is_in(wanted))
            .to_owned();
        for row in db.query_all(&query).await? {
            let id: String = row.try_get("", cr::ID)?;
            let body: String = row.try_get("", cr::BODY)?;
            let only: CommentsOnly = serde_json::from_str(&body)?;
            comments.insert(id, only.comments);
        }
    }
    rows.into_iter()
        .map(|row| {
            let mut event = row.event;
            if let (Some(count), Some(request)) =
                (row.comments_apart, event.change_request.as_mut())
                && count > 0
            {
                let prefix = comments
                    .get(&event.change_request_id)
                    .and_then(|all| all.get(..count))
                    .ok_or_else(|| {
                        StoreError::Internal(format!(
                            "event {} counts {count} comments that change request {} does not hold",
                            event.revision, event.change_request_id
                        ))
                    })?;
                request.comments = prefix.to_vec();
            }
            Ok(event)
        })
        .collect()
}
