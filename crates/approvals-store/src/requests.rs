//! One change request: create (idempotent by request_id), get, mutate.

use approvals_domain::{
    ChangeRequest, Decision, DomainError, EventDraft, Principal, ReciprocalApproval, Timestamp,
};
use sea_orm::{
    ConnectionTrait, SqlErr,
    sea_query::{Expr, ExprTrait, Order, Query},
};

use crate::{
    applying::Step,
    codec::{IdempotencyKey, decode_request, select_request},
    connect::{Backend, Store},
    error::{DbErrOr, StoreError},
    rows::{self, NewRequest},
    schema::{CHANGE_REQUESTS, cr},
};

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
        let created_by = request.created_by.clone();
        let result = if self.backend == Backend::Postgres {
            self.create_in_one_statement(&mut request, &event, key.as_ref())
                .await
                .map(|()| request)
        } else {
            self.create_in_batch(request, event, key.clone()).await
        };
        match result {
            Ok(request) => Ok(Created {
                change_request: request,
                existed: false,
            }),
            Err(err) => match (err, &key) {
                (DbErrOr::Db(db), Some(key))
                    if matches!(db.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) =>
                {
                    // Another create with the same request_id won the race.
                    self.find_by_request_id(&created_by, key)
                        .await?
                        .ok_or_else(|| StoreError::Internal("request_id vanished".into()))
                }
                (err, _) => Err(err.into()),
            },
        }
    }

    /// PostgreSQL: the event, the request and its resources in one statement, shared with the
    /// creates in flight beside it (see [`crate::create_batch`]).
    async fn create_in_one_statement(
        &self,
        request: &mut ChangeRequest,
        event: &EventDraft,
        key: Option<&IdempotencyKey>,
    ) -> Result<(), DbErrOr> {
        let rows = rows::CreateRows::new(NewRequest {
            request,
            event,
            key,
            hashed: self.create_hashing,
        })?;
        let queue = self
            .creates
            .as_ref()
            .ok_or_else(|| StoreError::Internal("no create queue on this database".into()))?;
        let revision = queue.write(rows).await?;
        request.revision = revision;
        self.note_written(revision);
        self.note_committed();
        Ok(())
    }

    /// SQLite: the same rows in the writers' batch, in one round trip (see
    /// [`rows::create_in_one_trip`]).
    /// Takes the request and returns it written (with its revision): the write runs in a task
    /// of its own, which owns what it writes.
    async fn create_in_batch(
        &self,
        mut request: ChangeRequest,
        event: EventDraft,
        key: Option<IdempotencyKey>,
    ) -> Result<ChangeRequest, DbErrOr> {
        let (hashed, store) = (self.create_hashing, self.clone());
        self.write_in_task(move |txn, poisoned| {
            Box::pin(async move {
                let mut new = NewRequest {
                    request: &mut request,
                    event: &event,
                    key: key.as_ref(),
                    hashed,
                };
                // The head as this process last wrote it, read in its turn.
                let guess = store.written_head();
                let revision = rows::create_in_one_trip(txn, &mut new, guess, poisoned).await?;
                store.note_written(revision);
                Ok((request, true))
            })
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

    /// Runs a domain command on one request, atomically: apply the command to the request,
    /// store the new document and append its event. A refused command writes nothing.
    ///
    /// On PostgreSQL the command runs on the request as read, and the write joins the next
    /// transition batch, guarded by what was read (see [`crate::transitions`]); when another
    /// write of the request came first, or the command changes the request's resources, the
    /// command runs again in a transaction that locks the row, as it always does on SQLite. So
    /// `command` may run more than once: it must do the same thing each time.
    #[tracing::instrument(level = "info", skip(self, command), fields(change_request_id = %id), err(level = "debug"))]
    pub async fn mutate<F>(&self, id: &str, mut command: F) -> Result<ChangeRequest, StoreError>
    where
        F: FnMut(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send,
    {
        if self.transitions.is_some() {
            let read = self.read_request(id).await?;
            return self.mutate_read(read, command).await;
        }
        self.step(id, |request| command(request).map(Step::Event))
            .await
    }
}

/// Rows of the would-be approver's requests read when looking for a reciprocal approval.
const RECIPROCAL_SCAN_LIMIT: u64 = 500;

impl Store {
    /// Anti-collusion: the latest approval by `approver` of a request created by `requester`
    /// (in any project) made at or after `since`, if any. Reads the requester's requests
    /// updated since then, most recent first, at most [`RECIPROCAL_SCAN_LIMIT`] of them; a
    /// dismissed approval still counts (it was given).
    pub async fn reciprocal_approval(
        &self,
        approver: &Principal,
        requester: &Principal,
        since: Timestamp,
    ) -> Result<Option<ReciprocalApproval>, StoreError> {
        let query = Query::select()
            .columns([cr::ID, cr::REVISION, cr::BODY])
            .from(CHANGE_REQUESTS)
            .and_where(Expr::col(cr::CREATED_BY).eq(requester.as_str()))
            .and_where(Expr::col(cr::UPDATE_TIME).gte(since.as_micros()))
            .order_by(cr::UPDATE_TIME, Order::Desc)
            .limit(RECIPROCAL_SCAN_LIMIT)
            .to_owned();
        let mut latest: Option<ReciprocalApproval> = None;
        for row in self.db.query_all(&query).await? {
            let request = decode_request(&row)?;
            for review in request.reviews.iter().filter(|r| {
                &r.reviewer == approver && r.decision == Decision::Approve && r.create_time >= since
            }) {
                if latest
                    .as_ref()
                    .is_none_or(|l| l.approve_time < review.create_time)
                {
                    latest = Some(ReciprocalApproval {
                        change_request_id: request.id.clone(),
                        approve_time: review.create_time,
                    });
                }
            }
        }
        Ok(latest)
    }
}
