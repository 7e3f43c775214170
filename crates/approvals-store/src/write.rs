//! Write transactions, and the statements they run on a request: lock it, write it back,
//! append its event.

use std::collections::BTreeSet;

use approvals_domain::{ChangeRequest, EventDraft, Timestamp};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
    sea_query::{Expr, ExprTrait, LockType, Query},
};
use tokio::sync::MutexGuard;

use crate::{
    codec::{EVENT_COLUMNS, decode_request, event_values, resource_keys, select_request},
    connect::{Backend, Store},
    error::StoreError,
    schema::{CHANGE_REQUESTS, EVENTS, RESOURCES, cr, ev, res},
};

impl Store {
    pub(crate) async fn commit(&self, txn: DatabaseTransaction) -> Result<(), StoreError> {
        txn.commit().await?;
        self.note_committed();
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

    pub(crate) async fn append_event(
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

    pub(crate) async fn insert_resources(
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
}

pub(crate) async fn rollback(txn: DatabaseTransaction) {
    if let Err(err) = txn.rollback().await {
        tracing::warn!(error = %err, "rollback failed");
    }
}
