//! Created change requests written straight into the database, for benchmarks and fixtures
//! that need many of them fast (approvals-bench seeds a million).
//!
//! The rows are the ones [`Store::create`](crate::Store::create) writes, through the same codec
//! and the same statements (see `rows.rs`): the CREATED event first, its revision in the
//! request's row, then the resource rows. Nothing else is checked or done: no idempotency key,
//! no policy lookup, no validation. The caller brings domain values (typically copies of a
//! request the service created, with their own ids) and its own connection or transaction.
//! Written beside a running service, the events reach its log reader like another replica's:
//! at its next poll.

use approvals_domain::{ChangeRequest, EventDraft};
use sea_orm::ConnectionTrait;

use crate::{
    error::StoreError,
    rows::{self, NewRequest},
};

/// Writes `created` (each request with its CREATED event) with one multi-row statement per
/// table, in `db`: pass a transaction for them to be written together. Sets each request's
/// revision.
pub async fn insert_created(
    db: &impl ConnectionTrait,
    created: &mut [(ChangeRequest, EventDraft)],
) -> Result<(), StoreError> {
    let mut new: Vec<NewRequest<'_>> = created
        .iter_mut()
        .map(|(request, event)| NewRequest {
            request,
            event,
            key: None,
            hashed: true,
        })
        .collect();
    rows::insert(db, &mut new).await?;
    Ok(())
}

/// PostgreSQL only: writes one created request in one statement (no transaction block), the
/// way the store's create writes it there. Sets the request's revision.
pub async fn insert_created_in_one_statement(
    db: &sea_orm::DatabaseConnection,
    request: &mut ChangeRequest,
    event: &EventDraft,
) -> Result<(), StoreError> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Err(StoreError::Internal(
            "a create in one statement needs PostgreSQL".into(),
        ));
    }
    let new = NewRequest {
        request,
        event,
        key: None,
        hashed: true,
    };
    let rows = rows::CreateRows::new(new)?;
    request.revision = rows::insert_one(db.get_postgres_connection_pool(), &rows).await?;
    Ok(())
}
