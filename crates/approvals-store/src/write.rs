//! Write transactions: [`Store::write`] runs every write of the store, and [`WriteTxn`] holds
//! the statements a transaction runs on a request (lock it, write it back, append its event).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use approvals_domain::{
    ChangeRequest, EventDraft, Timestamp,
    audit::{GENESIS, Hash},
};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait,
    sea_query::{Expr, ExprTrait, LockType, Query, SelectStatement},
};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot, watch};

use crate::{
    codec::{
        EVENT_COLUMNS, RESOURCE_COLUMNS, decode_audit_head, decode_request, event_values,
        resource_keys, resource_values, select_request,
    },
    connect::{Backend, Store},
    error::{DbErrOr, StoreError},
    rows::{EventRow, insert_sqlite_events},
    schema::{CHANGE_REQUESTS, EVENTS, RESOURCES, cr, ev, res},
};

/// One write in progress (see [`Store::write`]): a transaction of its own on PostgreSQL, a
/// savepoint in the batch's transaction on SQLite.
pub(crate) struct WriteTxn<'s> {
    store: &'s Store,
    pub(crate) txn: DatabaseTransaction,
    /// An event was appended to the log: the commit wakes the log reader.
    appended: AtomicBool,
    /// The chain head of each request this transaction read (locked) or wrote, so appending
    /// its next event needs no extra read.
    heads: std::sync::Mutex<HashMap<String, Option<Hash>>>,
}

/// SQLite: the write transaction that the writers queued together share (group commit, see
/// [`Store::write`]), and the outcome of its commit, for each of them.
pub(crate) struct SqliteBatch {
    txn: DatabaseTransaction,
    /// A writer of the batch appended an event: the commit wakes the log reader.
    appended: bool,
    /// A writer without a savepoint failed midway ([`Store::write_in_task`]): the batch may
    /// hold part of its writes, so it is rolled back whole.
    poisoned: AtomicBool,
    /// `Some` once the batch's commit has been tried.
    done: watch::Sender<Option<Result<(), CommitError>>>,
}

/// The open batch, if any: whoever holds this lock is the one writer at work.
pub(crate) type SqliteWriter = Arc<Mutex<Option<SqliteBatch>>>;

/// Why a shared commit failed, as every writer of the batch reports it.
#[derive(Clone, Debug)]
struct CommitError {
    unavailable: bool,
    message: String,
}

impl From<StoreError> for CommitError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(message) => Self {
                unavailable: true,
                message,
            },
            other => Self {
                unavailable: false,
                message: other.to_string(),
            },
        }
    }
}

impl From<CommitError> for StoreError {
    fn from(err: CommitError) -> Self {
        if err.unavailable {
            StoreError::Unavailable(err.message)
        } else {
            StoreError::Internal(format!("the shared commit failed: {}", err.message))
        }
    }
}

impl Store {
    /// Runs `body` in a write transaction, and makes it durable when `body` succeeds or undoes
    /// it when it fails: every write of the store goes through here.
    ///
    /// - SQLite (group commit): SQLite has one writer, so writers take their turn in order
    ///   (the store's queue). The first writer to find no open batch begins one (`BEGIN
    ///   IMMEDIATE`, so it holds the database's write lock from its first statement and never
    ///   fails on a lock upgrade halfway) and starts its committer, which queues behind the
    ///   writers already waiting. Each writer runs `body` in its own savepoint: released when
    ///   `body` succeeds, rolled back when it fails, so a refused write (an etag mismatch, a
    ///   request id reused, an invalid transition) undoes only itself. When the committer's
    ///   turn comes it commits the batch once, and every writer of the batch returns after that
    ///   commit (with its own error, or the commit's): one fsync for all of them, and nothing is
    ///   acknowledged before it is durable. A writer alone in its batch commits at once. A
    ///   writer dropped midway (its caller went away) loses only its savepoint; the committer is
    ///   a task of its own and still commits the others.
    /// - PostgreSQL: a plain transaction per call; `body` locks the rows it changes
    ///   ([`WriteTxn::lock`]: `SELECT ... FOR UPDATE`).
    ///
    /// A commit after an event was appended ([`WriteTxn::append_event`]) wakes this process's
    /// log reader (and, through the relay, the other replicas'); a write that appended none
    /// (bookkeeping, policies, migrations) leaves them be: there is nothing new to read. Nothing
    /// is retried here: a caller that can be aborted (a deadlock) runs `write` again.
    pub(crate) async fn write<T, E, F>(&self, body: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&WriteTxn<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        match self.backend {
            Backend::Sqlite => self.write_in_batch(body).await,
            Backend::Postgres => self.write_alone(body).await,
        }
    }

    async fn write_alone<T, E, F>(&self, body: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&WriteTxn<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let txn = self.db.begin().await.map_err(StoreError::from)?;
        let write = WriteTxn::new(self, txn);
        match body(&write).await {
            Ok(value) => {
                let appended = write.appended();
                write.txn.commit().await.map_err(StoreError::from)?;
                if appended {
                    self.note_committed();
                }
                Ok(value)
            }
            Err(err) => {
                write.rollback().await;
                Err(err)
            }
        }
    }

    async fn write_in_batch<T, E, F>(&self, body: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&WriteTxn<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let mut turn = self.sqlite_writer.clone().lock_owned().await;
        let batch = self.open_batch(&mut turn).await?;
        let mut done = batch.done.subscribe();
        let result = match batch.txn.begin().await {
            Ok(savepoint) => {
                let write = WriteTxn::new(self, savepoint);
                match body(&write).await {
                    Ok(value) => {
                        let appended = write.appended();
                        match write.txn.commit().await {
                            Ok(()) => {
                                batch.appended |= appended;
                                Ok(value)
                            }
                            Err(err) => Err(E::from(StoreError::from(err))),
                        }
                    }
                    Err(err) => {
                        write.rollback().await;
                        Err(err)
                    }
                }
            }
            Err(err) => Err(E::from(StoreError::from(err))),
        };
        // The next writer's turn, or the committer's.
        drop(turn);
        after_commit(result, &mut done).await
    }

    /// SQLite: `op` in the open batch (see [`Store::write`]), run in a task of its own so
    /// that its caller going away cannot cut it short, without the store's savepoint: `op`
    /// must leave nothing behind when it fails, or else set the batch's `poisoned` flag so the
    /// batch is rolled back whole (as [`crate::rows::create_in_one_trip`], which writes a create
    /// in one round trip instead of a savepoint's five). `op` says whether it appended an event.
    /// Returns after the batch's commit, as [`Store::write`].
    pub(crate) async fn write_in_task<T, F>(&self, op: F) -> Result<T, DbErrOr>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t DatabaseTransaction, &'t AtomicBool) -> TaskFuture<'t, T>
            + Send
            + 'static,
    {
        let mut turn = self.sqlite_writer.clone().lock_owned().await;
        let mut done = self.open_batch(&mut turn).await?.done.subscribe();
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            let result = match turn.as_mut() {
                Some(batch) => match op(&batch.txn, &batch.poisoned).await {
                    Ok((value, appended)) => {
                        batch.appended |= appended;
                        Ok(value)
                    }
                    Err(err) => Err(err),
                },
                None => Err(StoreError::Internal("no open batch".into()).into()),
            };
            // The next writer's turn, or the committer's.
            drop(turn);
            let _ = answer.send(result);
        });
        let result = answered
            .await
            .unwrap_or_else(|_| Err(StoreError::Internal("the write task ended".into()).into()));
        after_commit(result, &mut done).await
    }

    /// The open batch in `turn`, or a new one (`BEGIN IMMEDIATE`) with its committer started.
    async fn open_batch<'t>(
        &self,
        turn: &'t mut OwnedMutexGuard<Option<SqliteBatch>>,
    ) -> Result<&'t mut SqliteBatch, StoreError> {
        if turn.is_none() {
            let txn = self
                .db
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?;
            tokio::spawn(commit_batch(self.clone()));
            **turn = Some(SqliteBatch {
                txn,
                appended: false,
                poisoned: AtomicBool::new(false),
                done: watch::channel(None).0,
            });
        }
        turn.as_mut()
            .ok_or_else(|| StoreError::Internal("no open batch".into()))
    }
}

/// What [`Store::write_in_task`] runs: its value, and whether it appended an event.
pub(crate) type TaskFuture<'t, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<(T, bool), DbErrOr>> + Send + 't>>;

/// A batch writer's answer: its own result once the batch's commit is done, or the commit's
/// error.
async fn after_commit<T, E: From<StoreError>>(
    result: Result<T, E>,
    done: &mut watch::Receiver<Option<Result<(), CommitError>>>,
) -> Result<T, E> {
    let outcome = loop {
        if let Some(outcome) = done.borrow_and_update().clone() {
            break outcome;
        }
        if done.changed().await.is_err() {
            break Err(CommitError {
                unavailable: false,
                message: "the batch ended without a commit".into(),
            });
        }
    };
    match (result, outcome) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(err)) => Err(E::from(StoreError::from(err))),
        // A refused write reports its own error once the others are durable.
        (Err(err), _) => Err(err),
    }
}

/// SQLite: the committer of the batch just begun. It queues for the writer's turn behind the
/// writers waiting when the batch began, so they all join the batch; then it commits it once
/// and tells each of them.
async fn commit_batch(store: Store) {
    let mut turn = store.sqlite_writer.clone().lock_owned().await;
    let Some(batch) = turn.take() else {
        return;
    };
    let outcome = if batch.poisoned.load(Ordering::Acquire) {
        if let Err(err) = batch.txn.rollback().await {
            tracing::warn!(error = %err, "rollback of a poisoned batch failed");
        }
        Err(CommitError {
            unavailable: false,
            message: "a write of the batch failed midway; the batch was rolled back".into(),
        })
    } else {
        batch
            .txn
            .commit()
            .await
            .map_err(|err| CommitError::from(StoreError::from(err)))
    };
    if outcome.is_ok() && batch.appended {
        store.note_committed();
    }
    batch.done.send_replace(Some(outcome));
    // The turn passes on after the commit.
    drop(turn);
}

impl<'s> WriteTxn<'s> {
    fn new(store: &'s Store, txn: DatabaseTransaction) -> Self {
        Self {
            store,
            txn,
            appended: AtomicBool::new(false),
            heads: Default::default(),
        }
    }

    fn appended(&self) -> bool {
        self.appended.load(Ordering::Relaxed)
    }

    async fn rollback(self) {
        if let Err(err) = self.txn.rollback().await {
            tracing::warn!(error = %err, "rollback failed");
        }
    }
}

impl WriteTxn<'_> {
    pub(crate) fn backend(&self) -> Backend {
        self.store.backend
    }

    /// `query` locking the rows it reads until the transaction ends (PostgreSQL `FOR UPDATE`;
    /// SQLite's write transaction already excludes other writers).
    pub(crate) fn lock(&self, mut query: SelectStatement) -> SelectStatement {
        if self.backend() == Backend::Postgres {
            query.lock(LockType::Update);
        }
        query
    }

    /// Reads one request, locking its row (see [`WriteTxn::lock`]).
    pub(crate) async fn lock_request(&self, id: &str) -> Result<ChangeRequest, StoreError> {
        let row = self
            .txn
            .query_one(&self.lock(select_request(id)))
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        self.remember_head(&row)?;
        decode_request(&row)
    }

    /// Remembers the chain head of a request row read (locked) in this transaction, with
    /// [`cr::AUDIT_HEAD`] among its columns.
    pub(crate) fn remember_head(&self, row: &sea_orm::QueryResult) -> Result<(), StoreError> {
        let id: String = row.try_get("", cr::ID)?;
        let head = decode_audit_head(row)?;
        self.heads_map().insert(id, head);
        Ok(())
    }

    fn heads_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Hash>>> {
        // A poisoned map only means another statement of this transaction panicked.
        self.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chain head of a request locked in this transaction.
    async fn head_of(&self, id: &str) -> Result<Option<Hash>, StoreError> {
        if let Some(head) = self.heads_map().get(id) {
            return Ok(*head);
        }
        let row = self
            .txn
            .query_one(&select_request(id))
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        decode_audit_head(&row)
    }

    /// Writes a locked request back: with an event (a new revision), or without one for the
    /// service's own bookkeeping (leases, attempts), which keeps the revision.
    pub(crate) async fn write_request(
        &self,
        request: &mut ChangeRequest,
        event: Option<&EventDraft>,
        resources_before: &BTreeSet<(String, String)>,
    ) -> Result<(), StoreError> {
        let previous_revision = request.revision;
        let mut head = None;
        if let Some(event) = event {
            let (revision, hash) = self.append_event(request, event).await?;
            request.revision = revision;
            head = Some(hash);
        }
        let mut update = Query::update();
        if let Some(hash) = head {
            update.value(cr::AUDIT_HEAD, hash.to_vec());
        }
        let update = update
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
            .value(cr::RISK, crate::codec::risk_value(request))
            .value(cr::BODY, serde_json::to_string(&request)?)
            .and_where(Expr::col(cr::ID).eq(request.id.as_str()))
            .and_where(Expr::col(cr::REVISION).eq(previous_revision))
            .to_owned();
        let updated = self.txn.execute(&update).await?;
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
            self.txn.execute(&delete).await?;
            self.insert_resources(request).await?;
        }
        Ok(())
    }

    /// Appends `event` of `request` (locked) to the log, chained after the request's head;
    /// returns its revision and hash.
    ///
    /// PostgreSQL computes the hash in the statement that draws the revision
    /// (`sha256(prev || int8send(revision) || record)`, one round trip as before); SQLite, whose
    /// writers are serialised, inserts the row with its revision and hash computed here, also
    /// in one statement ([`insert_sqlite_events`]).
    pub(crate) async fn append_event(
        &self,
        request: &mut ChangeRequest,
        event: &EventDraft,
    ) -> Result<(i64, Hash), StoreError> {
        let prev = self.head_of(&request.id).await?.unwrap_or(GENESIS);
        let (values, record) = event_values(request, event, true)?;
        let (revision, hash) = if self.backend() == Backend::Postgres {
            let mut params = values;
            let n = params.len();
            params.push(prev.to_vec().into());
            params.push(record.into());
            let list: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
            let sql = format!(
                "INSERT INTO {EVENTS} ({rev}, {columns}, {prev_col}, {hash_col}) \
                 OVERRIDING SYSTEM VALUE SELECT s.r, {list}, ${p}, sha256(${p} || int8send(s.r) || ${rec}) \
                 FROM (SELECT nextval(pg_get_serial_sequence('{EVENTS}', '{rev}')) AS r) s \
                 RETURNING {rev}, {hash_col}",
                rev = ev::REVISION,
                columns = EVENT_COLUMNS[1..].join(", "),
                prev_col = ev::PREV_HASH,
                hash_col = ev::HASH,
                list = list.join(", "),
                p = n + 1,
                rec = n + 2,
            );
            let row = self
                .txn
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    sql,
                    params,
                ))
                .await?
                .ok_or_else(|| StoreError::Internal("event insert returned no revision".into()))?;
            let revision: i64 = row.try_get("", ev::REVISION)?;
            let bytes: Vec<u8> = row.try_get("", ev::HASH)?;
            let hash = approvals_domain::audit::hash_from_slice(&bytes)
                .ok_or_else(|| StoreError::Internal("the event hash is not 32 bytes".into()))?;
            (revision, hash)
        } else {
            let row = EventRow {
                values,
                chain: Some((prev, record)),
            };
            let written =
                insert_sqlite_events(&self.txn, &[row], Some(self.store.written_head())).await?;
            match written.first() {
                Some(&(revision, Some(hash))) => (revision, hash),
                _ => {
                    return Err(StoreError::Internal(
                        "the event insert returned no hash".into(),
                    ));
                }
            }
        };
        self.heads_map().insert(request.id.clone(), Some(hash));
        self.note_appended(revision);
        Ok((revision, hash))
    }

    /// Records that this transaction appended events up to `revision`: the store's written
    /// head moves now, and the commit will wake the log reader.
    pub(crate) fn note_appended(&self, revision: i64) {
        self.store.note_written(revision);
        self.appended.store(true, Ordering::Relaxed);
    }

    /// The rows of the resources `request`'s changes touch.
    pub(crate) async fn insert_resources(&self, request: &ChangeRequest) -> Result<(), StoreError> {
        let rows = resource_values(request);
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = Query::insert();
        insert.into_table(RESOURCES).columns(RESOURCE_COLUMNS);
        for values in rows {
            insert.values_panic(values.map(Expr::val));
        }
        self.txn.execute(&insert).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sea_orm::{ConnectionTrait, Statement};

    use crate::{DatabaseSettings, Store, StoreError};

    async fn store(dir: &std::path::Path) -> Store {
        Store::connect(&DatabaseSettings {
            url: format!("sqlite://{}", dir.join("batch.db").display()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        })
        .await
        .expect("connect")
    }

    async fn insert(store: &Store, value: &'static str) -> Result<(), StoreError> {
        store
            .write(async |w| {
                w.txn
                    .execute_unprepared(&format!("INSERT INTO t (x) VALUES ('{value}')"))
                    .await?;
                Ok::<_, StoreError>(())
            })
            .await
    }

    async fn rows(store: &Store) -> Vec<String> {
        store
            .db
            .query_all_raw(Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                "SELECT x FROM t ORDER BY x",
            ))
            .await
            .expect("select")
            .iter()
            .map(|row| row.try_get::<String>("", "x").expect("x"))
            .collect()
    }

    /// A writer whose caller goes away in the middle of its body loses its savepoint only: the
    /// batch it was in still commits the others, and the next writers are not held up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_dropped_midway_loses_only_its_own_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(dir.path()).await;
        store
            .write(async |w| {
                w.txn.execute_unprepared("CREATE TABLE t (x TEXT)").await?;
                Ok::<_, StoreError>(())
            })
            .await
            .expect("table");
        let (inserted, wrote) = tokio::sync::oneshot::channel();
        let stalled = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(async |w| {
                        w.txn
                            .execute_unprepared("INSERT INTO t (x) VALUES ('dropped')")
                            .await?;
                        let _ = inserted.send(());
                        // The caller goes away here.
                        std::future::pending::<()>().await;
                        Ok::<_, StoreError>(())
                    })
                    .await
            })
        };
        wrote.await.expect("the stalled writer inserted");
        // Queued behind it, in the same batch.
        let queued = {
            let store = store.clone();
            tokio::spawn(async move { insert(&store, "queued").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        stalled.abort();
        tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .expect("the queued writer is not held up")
            .expect("join")
            .expect("queued write");
        insert(&store, "after").await.expect("a later write");
        assert_eq!(rows(&store).await, ["after", "queued"]);
    }
}
