//! `approvals.v1.Policies`: CRUD of approval policies. The layer checks the scopes (read to
//! read, admin to write); each handler checks the caller's projects.

use std::{collections::HashSet, sync::Arc};

use approvals_domain::{DomainError, Policy, governance, validation::Violations};
use approvals_store::PolicyFilter;
use tonic::Request;

use super::{Answer, Context, answer, called, page_token};
use crate::{
    auth::Caller,
    convert::policy::{self, WRITABLE_PATHS},
    error::ApiError,
    pb::{self, policies_server::Policies},
};

const DEFAULT_PAGE_SIZE: u64 = 50;
const MAX_PAGE_SIZE: u64 = 1000;

pub struct PoliciesService {
    context: Arc<Context>,
}

impl PoliciesService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    /// Refuses an `applier_endpoint` the server may not call (an empty one is no endpoint).
    fn check_applier_endpoint(&self, policy: &Policy, violations: &mut Violations) {
        let endpoint = &policy.rules.applier_endpoint;
        // An empty one is no endpoint; one with a control character the domain refuses.
        if endpoint.is_empty() || endpoint.chars().any(char::is_control) {
            return;
        }
        if let Err(refusal) = self.context.allowed_endpoints.check(endpoint) {
            violations.add("policy.applier_endpoint", format!("{endpoint:?} {refusal}"));
        }
    }
}

/// A policy name to look up: required, and without NUL (which PostgreSQL cannot compare; no
/// stored name has one).
fn required_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    let mut v = Violations::default();
    v.no_nul(field, name);
    Ok(v.into_result()?)
}

/// Every bad field at once: those found converting the message, then the policy's own checks.
pub(super) fn validate_into(
    policy: &Policy,
    mut violations: Violations,
) -> Result<(), DomainError> {
    match policy.validate("policy.") {
        Err(DomainError::InvalidArgument(list)) => {
            for violation in list {
                violations.add(violation.field, violation.description);
            }
        }
        Err(other) => return Err(other),
        Ok(()) => {}
    }
    violations.into_result()
}

impl PoliciesService {
    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreatePolicyRequest,
    ) -> Result<pb::Policy, ApiError> {
        let Some(body) = req.policy else {
            return Err(ApiError::invalid("policy", "is required"));
        };
        let clock = &self.context.clock;
        let mut violations = Violations::default();
        let new = policy::new_policy(&body, clock.new_id(), clock.now(), &mut violations);
        self.check_applier_endpoint(&new, &mut violations);
        validate_into(&new, violations)?;
        caller.ensure_project(&new.project)?;
        let created = self.context.store.create_policy(new).await?;
        Ok(policy::policy(&created))
    }

    async fn get(&self, caller: &Caller, name: &str) -> Result<pb::Policy, ApiError> {
        required_name("name", name)?;
        let found = self.context.store.get_policy(name).await?;
        caller.ensure_sees_policy(&found)?;
        Ok(policy::policy(&found))
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListPoliciesRequest,
    ) -> Result<pb::ListPoliciesResponse, ApiError> {
        let mut v = Violations::default();
        v.no_nul("project", &req.project);
        v.into_result()?;
        if !req.project.is_empty() {
            caller.ensure_project(&req.project)?;
        }
        let page_size = page_token::page_size(req.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let digest = page_token::query_digest(&["policies", &req.project]);
        let after = page_token::decode(&req.page_token, &digest)?;
        let filter = PolicyFilter {
            project: (!req.project.is_empty()).then(|| req.project.clone()),
            projects: caller.projects.clone(),
        };
        let (policies, next) = self
            .context
            .store
            .list_policies(&filter, after.as_deref(), page_size)
            .await?;
        Ok(pb::ListPoliciesResponse {
            policies: policies.iter().map(policy::policy).collect(),
            next_page_token: next
                .map(|name| page_token::encode(&name, &digest))
                .unwrap_or_default(),
        })
    }

    async fn update(
        &self,
        caller: &Caller,
        req: pb::UpdatePolicyRequest,
    ) -> Result<pb::Policy, ApiError> {
        let Some(body) = req.policy else {
            return Err(ApiError::invalid("policy", "is required"));
        };
        required_name("policy.name", &body.name)?;
        let Some(mask) = req.update_mask else {
            return Err(ApiError::invalid(
                "update_mask",
                "is required: name the fields to update",
            ));
        };
        let paths = mask_paths(&mask.paths)?;
        let now = self.context.clock.now();
        let etag = body.etag.clone();
        let updated = self
            .context
            .store
            .update_policy(&body.name, |current| {
                caller.ensure_sees_policy(current)?;
                current.check_etag(Some(&etag))?;
                // Protecting is allowed directly; every change of a protected one is four eyes.
                governance::check_direct_change(current)?;
                let mut v = Violations::default();
                for path in WRITABLE_PATHS.iter().filter(|p| paths.contains(*p)) {
                    policy::set_field(current, &body, path, &mut v);
                }
                // Checked when written: an endpoint stored earlier is checked again before
                // each applier call.
                if paths.contains("applier_endpoint") {
                    self.check_applier_endpoint(current, &mut v);
                }
                validate_into(current, v)?;
                // Moving a policy to another project needs that project too.
                caller.ensure_project(&current.project)?;
                current.update_time = now;
                Ok::<(), DomainError>(())
            })
            .await?;
        Ok(policy::policy(&updated))
    }

    async fn delete(&self, caller: &Caller, req: pb::DeletePolicyRequest) -> Result<(), ApiError> {
        required_name("name", &req.name)?;
        self.context
            .store
            .delete_policy(&req.name, |current| {
                caller.ensure_sees_policy(current)?;
                current.check_etag(Some(&req.etag))?;
                governance::check_direct_change(current)
            })
            .await?;
        Ok(())
    }
}

/// An update mask's paths: each writable, or `*` for all of them.
fn mask_paths(mask: &[String]) -> Result<HashSet<&'static str>, ApiError> {
    let mut paths: Vec<&'static str> = Vec::new();
    let mut violations = Violations::default();
    for (i, path) in mask.iter().enumerate() {
        match path.as_str() {
            "*" => paths.extend(WRITABLE_PATHS),
            p => match WRITABLE_PATHS.iter().find(|w| **w == p) {
                Some(writable) => paths.push(writable),
                None => violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!(
                        "{p:?} cannot be updated; updatable: {}, or *",
                        WRITABLE_PATHS.join(", ")
                    ),
                ),
            },
        }
    }
    if paths.is_empty() && violations.is_empty() {
        violations.add("update_mask", "names no field to update");
    }
    violations.into_result()?;
    Ok(paths.into_iter().collect())
}

#[tonic::async_trait]
impl Policies for PoliciesService {
    async fn create_policy(&self, request: Request<pb::CreatePolicyRequest>) -> Answer<pb::Policy> {
        let (caller, req) = called(request)?;
        answer(self.create(&caller, req).await)
    }

    async fn get_policy(&self, request: Request<pb::GetPolicyRequest>) -> Answer<pb::Policy> {
        let (caller, req) = called(request)?;
        answer(self.get(&caller, &req.name).await)
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Answer<pb::ListPoliciesResponse> {
        let (caller, req) = called(request)?;
        answer(self.list(&caller, req).await)
    }

    async fn update_policy(&self, request: Request<pb::UpdatePolicyRequest>) -> Answer<pb::Policy> {
        let (caller, req) = called(request)?;
        answer(self.update(&caller, req).await)
    }

    async fn delete_policy(&self, request: Request<pb::DeletePolicyRequest>) -> Answer<()> {
        let (caller, req) = called(request)?;
        answer(self.delete(&caller, req).await)
    }
}
