//! Approval policies: one row per policy (its JSON document beside the columns that select it),
//! each use case one transaction. Policy edits never touch open change requests, which hold
//! their own snapshot; an approved change request on policies is applied with its edits in one
//! transaction ([`Store::apply_policy_edits`]).

use approvals_domain::{ChangeRequest, DomainError, EventDraft, Policy};
use sea_orm::{
    ConnectionTrait, QueryResult, SqlErr,
    sea_query::{Expr, ExprTrait, Order, Query, SelectStatement},
};

use crate::{
    Store,
    applying::Step,
    error::StoreError,
    schema::{POLICIES, pol},
    write::WriteTxn,
};

/// Filters of `ListPolicies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFilter {
    /// Only this project.
    pub project: Option<String>,
    /// Only these projects (a caller limited to some projects); `None`: every project.
    pub projects: Option<Vec<String>>,
}

const COLUMNS: [&str; 3] = [pol::NAME, pol::REVISION, pol::BODY];

fn select_policy(name: &str) -> SelectStatement {
    Query::select()
        .columns(COLUMNS)
        .from(POLICIES)
        .and_where(Expr::col(pol::NAME).eq(name))
        .to_owned()
}

fn decode_policy(row: &QueryResult) -> Result<Policy, StoreError> {
    let body: String = row.try_get("", pol::BODY)?;
    let mut policy: Policy = serde_json::from_str(&body)?;
    policy.revision = row.try_get("", pol::REVISION)?;
    Ok(policy)
}

impl Store {
    /// Stores a new policy. Its name, and its (project, environment, action_key), must be new.
    pub async fn create_policy(&self, mut policy: Policy) -> Result<Policy, StoreError> {
        policy.revision = 1;
        self.write(async |w| {
            if w.txn
                .query_one(&select_policy(&policy.name))
                .await?
                .is_some()
            {
                return Err(StoreError::PolicyNameTaken(policy.name.clone()));
            }
            ensure_scope_free(w, &policy).await?;
            let insert = Query::insert()
                .into_table(POLICIES)
                .columns([
                    pol::NAME,
                    pol::PROJECT,
                    pol::ENVIRONMENT,
                    pol::ACTION_KEY,
                    pol::REVISION,
                    pol::CREATE_TIME,
                    pol::UPDATE_TIME,
                    pol::BODY,
                ])
                .values_panic([
                    policy.name.clone().into(),
                    policy.project.clone().into(),
                    policy.environment.clone().into(),
                    policy.action_key.clone().into(),
                    policy.revision.into(),
                    policy.create_time.as_micros().into(),
                    policy.update_time.as_micros().into(),
                    serde_json::to_string(&policy)?.into(),
                ])
                .to_owned();
            w.txn.execute(&insert).await.map_err(|err| {
                // A concurrent create won the race for the name or the scope.
                conflict_or(err, StoreError::PolicyNameTaken(policy.name.clone()))
            })?;
            Ok(())
        })
        .await?;
        Ok(policy)
    }

    pub async fn get_policy(&self, name: &str) -> Result<Policy, StoreError> {
        match self.db.query_one(&select_policy(name)).await? {
            Some(row) => decode_policy(&row),
            None => Err(StoreError::PolicyNotFound(name.to_owned())),
        }
    }

    /// One page of policies ordered by name, after the name `after`.
    pub async fn list_policies(
        &self,
        filter: &PolicyFilter,
        after: Option<&str>,
        page_size: u64,
    ) -> Result<(Vec<Policy>, Option<String>), StoreError> {
        let mut query = Query::select();
        query.columns(COLUMNS).from(POLICIES);
        if let Some(project) = &filter.project {
            query.and_where(Expr::col(pol::PROJECT).eq(project.as_str()));
        }
        if let Some(projects) = &filter.projects {
            query.and_where(Expr::col(pol::PROJECT).is_in(projects.iter().map(String::as_str)));
        }
        if let Some(after) = after {
            query.and_where(Expr::col(pol::NAME).gt(after));
        }
        query.order_by(pol::NAME, Order::Asc).limit(page_size + 1);
        let rows = self.db.query_all(&query).await?;
        let mut policies = rows
            .iter()
            .map(decode_policy)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if policies.len() as u64 > page_size {
            policies.truncate(page_size as usize);
            policies.last().map(|p| p.name.clone())
        } else {
            None
        };
        Ok((policies, next))
    }

    /// Every policy of a project: the candidates when a request is created there.
    pub async fn project_policies(&self, project: &str) -> Result<Vec<Policy>, StoreError> {
        let query = Query::select()
            .columns(COLUMNS)
            .from(POLICIES)
            .and_where(Expr::col(pol::PROJECT).eq(project))
            .to_owned();
        let rows = self.db.query_all(&query).await?;
        rows.iter().map(decode_policy).collect()
    }

    /// Runs `edit` on the named policy in one transaction (row locked) and stores the result
    /// with the next revision. A refused edit writes nothing.
    pub async fn update_policy<F>(&self, name: &str, edit: F) -> Result<Policy, StoreError>
    where
        F: FnOnce(&mut Policy) -> Result<(), DomainError> + Send,
    {
        self.write(async |w| update_in(w, name, edit).await).await
    }

    /// Deletes the named policy; `check` may refuse (a stale etag) after reading it.
    pub async fn delete_policy<F>(&self, name: &str, check: F) -> Result<(), StoreError>
    where
        F: FnOnce(&Policy) -> Result<(), DomainError> + Send,
    {
        self.write(async |w| delete_in(w, name, check).await).await
    }

    /// Applies an approved change request on policies: its policy edits, in order, and then
    /// `step` on the request (its APPLIED event), all in one transaction, so that an edit
    /// refused midway (a policy deleted since the request was made, a scope another policy
    /// took) leaves every policy and the request as they were.
    pub async fn apply_policy_edits<F>(
        &self,
        request_id: &str,
        edits: Vec<PolicyEdit<'_>>,
        step: F,
    ) -> Result<ChangeRequest, StoreError>
    where
        F: FnOnce(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send,
    {
        self.write(async |w| {
            for edit in edits {
                match edit {
                    PolicyEdit::Update { name, edit } => {
                        update_in(w, &name, edit).await?;
                    }
                    PolicyEdit::Delete { name } => delete_in(w, &name, |_| Ok(())).await?,
                }
            }
            w.step_request(request_id, |r| step(r).map(Step::Event))
                .await
        })
        .await
    }
}

/// A change to a policy's document, refused with a domain error.
pub type EditPolicy<'a> = Box<dyn FnOnce(&mut Policy) -> Result<(), DomainError> + Send + 'a>;

/// One edit of [`Store::apply_policy_edits`].
pub enum PolicyEdit<'a> {
    /// The named policy, changed by `edit`.
    Update { name: String, edit: EditPolicy<'a> },
    /// The named policy, deleted.
    Delete { name: String },
}

/// Updates the named policy (locked) with `edit`, in `w`.
async fn update_in<F>(w: &WriteTxn<'_>, name: &str, edit: F) -> Result<Policy, StoreError>
where
    F: FnOnce(&mut Policy) -> Result<(), DomainError> + Send,
{
    let row = w
        .txn
        .query_one(&w.lock(select_policy(name)))
        .await?
        .ok_or_else(|| StoreError::PolicyNotFound(name.to_owned()))?;
    let mut policy = decode_policy(&row)?;
    let previous = policy.revision;
    let uid = policy.uid.clone();
    edit(&mut policy)?;
    // The name and uid say which policy this is: no edit changes them.
    policy.name = name.to_owned();
    policy.uid = uid;
    policy.revision = previous + 1;
    ensure_scope_free(w, &policy).await?;
    let update = Query::update()
        .table(POLICIES)
        .value(pol::PROJECT, policy.project.as_str())
        .value(pol::ENVIRONMENT, policy.environment.as_str())
        .value(pol::ACTION_KEY, policy.action_key.as_str())
        .value(pol::REVISION, policy.revision)
        .value(pol::UPDATE_TIME, policy.update_time.as_micros())
        .value(pol::BODY, serde_json::to_string(&policy)?)
        .and_where(Expr::col(pol::NAME).eq(name))
        .and_where(Expr::col(pol::REVISION).eq(previous))
        .to_owned();
    let updated = w
        .txn
        .execute(&update)
        .await
        .map_err(|err| conflict_or(err, scope_taken(String::new(), &policy)))?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::Internal(format!(
            "policy {name} changed during the transaction"
        )));
    }
    Ok(policy)
}

/// Deletes the named policy (locked) once `check` accepts it, in `w`.
async fn delete_in<F>(w: &WriteTxn<'_>, name: &str, check: F) -> Result<(), StoreError>
where
    F: FnOnce(&Policy) -> Result<(), DomainError> + Send,
{
    let row = w
        .txn
        .query_one(&w.lock(select_policy(name)))
        .await?
        .ok_or_else(|| StoreError::PolicyNotFound(name.to_owned()))?;
    check(&decode_policy(&row)?)?;
    let delete = Query::delete()
        .from_table(POLICIES)
        .and_where(Expr::col(pol::NAME).eq(name))
        .to_owned();
    w.txn.execute(&delete).await?;
    Ok(())
}

/// Refuses a policy whose (project, environment, action_key) another policy holds.
async fn ensure_scope_free(w: &WriteTxn<'_>, policy: &Policy) -> Result<(), StoreError> {
    let query = Query::select()
        .column(pol::NAME)
        .from(POLICIES)
        .and_where(Expr::col(pol::PROJECT).eq(policy.project.as_str()))
        .and_where(Expr::col(pol::ENVIRONMENT).eq(policy.environment.as_str()))
        .and_where(Expr::col(pol::ACTION_KEY).eq(policy.action_key.as_str()))
        .and_where(Expr::col(pol::NAME).ne(policy.name.as_str()))
        .to_owned();
    match w.txn.query_one(&query).await? {
        Some(row) => Err(scope_taken(row.try_get("", pol::NAME)?, policy)),
        None => Ok(()),
    }
}

fn scope_taken(existing: String, policy: &Policy) -> StoreError {
    StoreError::PolicyScopeTaken {
        existing,
        project: policy.project.clone(),
        environment: policy.environment.clone(),
        action_key: policy.action_key.clone(),
    }
}

/// A unique violation is a concurrent create or update that won the race: `conflict`.
fn conflict_or(err: sea_orm::DbErr, conflict: StoreError) -> StoreError {
    if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) {
        conflict
    } else {
        err.into()
    }
}
