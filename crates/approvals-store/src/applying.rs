//! Store operations of the apply feature: bookkeeping without events (leases, attempts),
//! claiming due work across replicas, and finishing an apply together with the conflicts it
//! causes on other open requests, all in one transaction.

use std::collections::{BTreeSet, HashMap};

use approvals_domain::{ChangeRequest, DomainError, EventDraft, ResourceVersion, Timestamp};
use sea_orm::{
    ConnectionTrait,
    sea_query::{Cond, Expr, ExprTrait, LockBehavior, LockType, OnConflict, Order, Query},
};

use crate::{
    codec::{decode_request, resource_keys},
    connect::{Backend, Store},
    error::StoreError,
    schema::{CHANGE_REQUESTS, RESOURCE_VERSIONS, RESOURCES, cr, res, rv},
    write::WriteTxn,
};

/// What a step did to a request.
#[derive(Debug)]
pub enum Step {
    /// Nothing: nothing is written.
    Unchanged,
    /// Bookkeeping only (a lease, an attempt count): written without an event or new revision.
    Quiet,
    /// A state change: written with its event.
    Event(EventDraft),
}

impl WriteTxn<'_> {
    /// Locks request `id`, runs `step` on it and writes what it did.
    pub(crate) async fn step_request<F>(
        &self,
        id: &str,
        step: F,
    ) -> Result<ChangeRequest, StoreError>
    where
        F: FnOnce(&mut ChangeRequest) -> Result<Step, DomainError> + Send,
    {
        let mut request = self.lock_request(id).await?;
        let before = resource_keys(&request);
        let step = step(&mut request)?;
        self.write_step(&mut request, step, &before).await?;
        Ok(request)
    }

    /// Writes what a step did to a locked request (`before`: its resources when read).
    async fn write_step(
        &self,
        request: &mut ChangeRequest,
        step: Step,
        before: &BTreeSet<(String, String)>,
    ) -> Result<(), StoreError> {
        match step {
            Step::Unchanged => Ok(()),
            Step::Quiet => self.write_request(request, None, before).await,
            Step::Event(event) => self.write_request(request, Some(&event), before).await,
        }
    }
}

impl Store {
    /// Runs `step` on one locked request in one transaction.
    pub async fn step<F>(&self, id: &str, step: F) -> Result<ChangeRequest, StoreError>
    where
        F: FnOnce(&mut ChangeRequest) -> Result<Step, DomainError> + Send,
    {
        self.write(async |w| w.step_request(id, step).await).await
    }

    /// Claims requests whose `due_time` has come (at most `limit`) and runs `step` on each, in
    /// one transaction. On PostgreSQL rows another replica is claiming are skipped (`FOR UPDATE
    /// SKIP LOCKED`), so no two replicas act on one request. Returns the requests changed.
    pub async fn claim_due<F>(
        &self,
        now: Timestamp,
        limit: u64,
        mut step: F,
    ) -> Result<Vec<ChangeRequest>, StoreError>
    where
        F: FnMut(&mut ChangeRequest) -> Step + Send,
    {
        self.write(async |w| {
            let mut query = Query::select();
            query
                .columns([cr::ID, cr::REVISION, cr::BODY, cr::AUDIT_HEAD])
                .from(CHANGE_REQUESTS)
                .and_where(Expr::col(cr::DUE_TIME).lte(now.as_micros()))
                .order_by(cr::DUE_TIME, Order::Asc)
                .limit(limit);
            if w.backend() == Backend::Postgres {
                query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
            }
            let rows = w.txn.query_all(&query).await?;
            let mut changed = Vec::new();
            for row in &rows {
                let mut request = decode_request(row)?;
                w.remember_head(row)?;
                let before = resource_keys(&request);
                match step(&mut request) {
                    Step::Unchanged => continue,
                    step => w.write_step(&mut request, step, &before).await?,
                }
                changed.push(request);
            }
            Ok(changed)
        })
        .await
    }

    /// The latest version an applier reported for each resource the request changes.
    pub async fn latest_versions(
        &self,
        request: &ChangeRequest,
    ) -> Result<HashMap<(String, String), String>, StoreError> {
        let keys = resource_keys(request);
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let query = Query::select()
            .columns([rv::RESOURCE_TYPE, rv::RESOURCE_ID, rv::VERSION])
            .from(RESOURCE_VERSIONS)
            .and_where(Expr::col(rv::PROJECT).eq(request.project.as_str()))
            .and_where(Expr::col(rv::ENVIRONMENT).eq(request.environment.as_str()))
            .and_where(Expr::col(rv::RESOURCE_ID).is_in(keys.iter().map(|(_, id)| id.as_str())))
            .to_owned();
        let mut versions = HashMap::new();
        for row in self.connection().query_all(&query).await? {
            let key: (String, String) = (
                row.try_get("", rv::RESOURCE_TYPE)?,
                row.try_get("", rv::RESOURCE_ID)?,
            );
            if keys.contains(&key) {
                versions.insert(key, row.try_get("", rv::VERSION)?);
            }
        }
        Ok(versions)
    }

    /// Records an applier's final answer (`step` returns the request's event, or `None` when
    /// the run is no longer current) and, when the request is now APPLIED, in the same
    /// transaction: the resources' new versions, and a conflict on every other open request
    /// with a change written against an older version (each with its own event).
    pub async fn finish_apply<F>(
        &self,
        id: &str,
        versions: &[ResourceVersion],
        now: Timestamp,
        step: F,
    ) -> Result<ChangeRequest, StoreError>
    where
        F: Fn(&mut ChangeRequest) -> Option<EventDraft> + Send + Sync,
    {
        // Two applies marking each other's requests can deadlock on PostgreSQL; it aborts one,
        // which is simply run again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.finish_apply_once(id, versions, now, &step).await {
                Err(StoreError::Internal(message))
                    if message.contains("deadlock") && attempt < 5 =>
                {
                    continue;
                }
                other => return other,
            }
        }
    }

    async fn finish_apply_once<F>(
        &self,
        id: &str,
        versions: &[ResourceVersion],
        now: Timestamp,
        step: &F,
    ) -> Result<ChangeRequest, StoreError>
    where
        F: Fn(&mut ChangeRequest) -> Option<EventDraft> + Send + Sync,
    {
        self.write(async |w| {
            let mut request = w.lock_request(id).await?;
            let before = resource_keys(&request);
            let Some(event) = step(&mut request) else {
                return Ok(request);
            };
            w.write_request(&mut request, Some(&event), &before).await?;
            if request.state != approvals_domain::State::Applied || versions.is_empty() {
                return Ok(request);
            }
            let mut upsert = Query::insert();
            upsert
                .into_table(RESOURCE_VERSIONS)
                .columns([
                    rv::PROJECT,
                    rv::ENVIRONMENT,
                    rv::RESOURCE_TYPE,
                    rv::RESOURCE_ID,
                    rv::VERSION,
                    rv::CHANGE_REQUEST_ID,
                    rv::UPDATE_TIME,
                ])
                .on_conflict(
                    OnConflict::columns([
                        rv::PROJECT,
                        rv::ENVIRONMENT,
                        rv::RESOURCE_TYPE,
                        rv::RESOURCE_ID,
                    ])
                    .update_columns([rv::VERSION, rv::CHANGE_REQUEST_ID, rv::UPDATE_TIME])
                    .to_owned(),
                );
            for version in versions {
                upsert.values_panic([
                    request.project.clone().into(),
                    request.environment.clone().into(),
                    version.resource_type.clone().into(),
                    version.resource_id.clone().into(),
                    version.version.clone().into(),
                    request.id.clone().into(),
                    now.as_micros().into(),
                ]);
            }
            w.txn.execute(&upsert).await?;

            let mut touching = Cond::any();
            for version in versions {
                touching = touching.add(
                    Cond::all()
                        .add(Expr::col(res::RESOURCE_TYPE).eq(version.resource_type.as_str()))
                        .add(Expr::col(res::RESOURCE_ID).eq(version.resource_id.as_str())),
                );
            }
            let others = Query::select()
                .distinct()
                .column(res::CHANGE_REQUEST_ID)
                .from(RESOURCES)
                .and_where(Expr::col(res::PROJECT).eq(request.project.as_str()))
                .and_where(Expr::col(res::CHANGE_REQUEST_ID).ne(request.id.as_str()))
                .cond_where(touching)
                .to_owned();
            let mut ids: BTreeSet<String> = BTreeSet::new();
            for row in w.txn.query_all(&others).await? {
                ids.insert(row.try_get("", res::CHANGE_REQUEST_ID)?);
            }
            for other_id in ids {
                let mut other = w.lock_request(&other_id).await?;
                let before = resource_keys(&other);
                if let Some(event) =
                    other.mark_conflicts(&request.environment, versions, &request.id, now)
                {
                    w.write_request(&mut other, Some(&event), &before).await?;
                }
            }
            Ok(request)
        })
        .await
    }
}
