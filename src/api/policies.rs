//! `approvals.v1.Policies`: CRUD of approval policies. The layer checks the scopes (read to
//! read, admin to write); each handler checks the caller's projects.

use std::collections::HashSet;

use approvals_domain::{DomainError, Policy, validation::Violations};
use approvals_store::{PolicyFilter, Store};
use tonic::{Request, Response, Status};

use crate::{
    api::page_token,
    auth as identity,
    config::allowed_endpoints::AllowedEndpoints,
    convert::policy::{self, WRITABLE_PATHS},
    error::ApiError,
    pb::{self, policies_server::Policies},
};

const DEFAULT_PAGE_SIZE: u64 = 50;
const MAX_PAGE_SIZE: u64 = 1000;

pub struct PoliciesService {
    store: Store,
    /// `apply.allowed_endpoints`: the only applier endpoints a policy may name.
    allowed_endpoints: AllowedEndpoints,
}

impl PoliciesService {
    pub fn new(store: Store, allowed_endpoints: AllowedEndpoints) -> Self {
        Self {
            store,
            allowed_endpoints,
        }
    }

    /// Refuses an `applier_endpoint` the server may not call (an empty one is no endpoint).
    fn check_applier_endpoint(&self, policy: &Policy, violations: &mut Violations) {
        let endpoint = &policy.rules.applier_endpoint;
        // An empty one is no endpoint; one with a control character the domain refuses.
        if endpoint.is_empty() || endpoint.chars().any(char::is_control) {
            return;
        }
        if let Err(refusal) = self.allowed_endpoints.check(endpoint) {
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
    v.into_result().map_err(ApiError::from)
}

/// Every bad field at once: those found converting the message, then the policy's own checks.
fn validate_into(policy: &Policy, mut violations: Violations) -> Result<(), DomainError> {
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

#[tonic::async_trait]
impl Policies for PoliciesService {
    async fn create_policy(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = identity::caller(&request)?;
        let Some(body) = request.into_inner().policy else {
            return Err(ApiError::invalid("policy", "is required").into());
        };
        let mut violations = Violations::default();
        let new = policy::new_policy(
            &body,
            crate::apply::new_id(),
            crate::apply::now(),
            &mut violations,
        );
        self.check_applier_endpoint(&new, &mut violations);
        validate_into(&new, violations).map_err(ApiError::from)?;
        caller
            .ensure_project(&new.project)
            .map_err(ApiError::from)?;
        let created = self
            .store
            .create_policy(new)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(policy::policy(&created)))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = identity::caller(&request)?;
        let name = &request.get_ref().name;
        required_name("name", name)?;
        let found = self.store.get_policy(name).await.map_err(ApiError::from)?;
        caller.ensure_sees_policy(&found).map_err(ApiError::from)?;
        Ok(Response::new(policy::policy(&found)))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        v.no_nul("project", &req.project);
        v.into_result().map_err(ApiError::from)?;
        if !req.project.is_empty() {
            caller
                .ensure_project(&req.project)
                .map_err(ApiError::from)?;
        }
        let page_size = page_token::page_size(req.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let digest = page_token::query_digest(&["policies", &req.project]);
        let after = page_token::decode(&req.page_token, &digest)?;
        let filter = PolicyFilter {
            project: (!req.project.is_empty()).then(|| req.project.clone()),
            projects: caller.projects.clone(),
        };
        let (policies, next) = self
            .store
            .list_policies(&filter, after.as_deref(), page_size)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: policies.iter().map(policy::policy).collect(),
            next_page_token: next
                .map(|name| page_token::encode(&name, &digest))
                .unwrap_or_default(),
        }))
    }

    async fn update_policy(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let Some(body) = req.policy else {
            return Err(ApiError::invalid("policy", "is required").into());
        };
        required_name("policy.name", &body.name)?;
        let Some(mask) = req.update_mask else {
            return Err(
                ApiError::invalid("update_mask", "is required: name the fields to update").into(),
            );
        };
        let mut paths: Vec<&str> = Vec::new();
        let mut violations = Violations::default();
        for (i, path) in mask.paths.iter().enumerate() {
            match path.as_str() {
                "*" => paths.extend(WRITABLE_PATHS),
                p if WRITABLE_PATHS.contains(&p) => paths.push(p),
                other => violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!(
                        "{other:?} cannot be updated; updatable: {}, or *",
                        WRITABLE_PATHS.join(", ")
                    ),
                ),
            }
        }
        if paths.is_empty() && violations.is_empty() {
            violations.add("update_mask", "names no field to update");
        }
        violations.into_result().map_err(ApiError::from)?;
        let paths: HashSet<&str> = paths.into_iter().collect();
        let now = crate::apply::now();
        let etag = body.etag.clone();
        let updated = self
            .store
            .update_policy(&body.name, |current| {
                caller.ensure_sees_policy(current)?;
                current.check_etag(Some(&etag))?;
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
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(policy::policy(&updated)))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        required_name("name", &req.name)?;
        self.store
            .delete_policy(&req.name, |current| {
                caller.ensure_sees_policy(current)?;
                current.check_etag(Some(&req.etag))
            })
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(()))
    }
}
