//! `approvals.v1.Policies`: CRUD of approval policies. The layer checks the scopes (read to
//! read, admin to write); each handler checks the caller's projects.

use std::{collections::HashSet, sync::Arc};

use approvals_domain::{
    DomainError, Policy,
    governance::{self, ReplayOutcome},
    validation::Violations,
};
use approvals_store::PolicyFilter;
use tonic::Request;

use super::{Answer, Context, answer, called, page_token};
use crate::{
    auth::Caller,
    convert::policy::{self, WRITABLE_PATHS},
    error::ApiError,
    pb::{self, policies_server::Policies},
};

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
        let page_size = page_token::page_size(
            req.page_size,
            page_token::DEFAULT_PAGE_SIZE,
            page_token::MAX_PAGE_SIZE,
        )?;
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

const DEFAULT_REPLAY_EVENTS: u64 = 10_000;
const MAX_REPLAY_EVENTS: u64 = 20_000;
const DEFAULT_EXAMPLES: usize = 10;
const MAX_EXAMPLES: usize = 100;
/// Events read per query while replaying.
const REPLAY_BATCH: u64 = 1_000;

fn bounded(field: &str, value: i32, default: u64, max: u64) -> Result<u64, ApiError> {
    match value {
        v if v < 0 => Err(ApiError::invalid(field, "must not be negative")),
        0 => Ok(default),
        v => Ok(u64::try_from(v).unwrap_or(max).min(max)),
    }
}

impl PoliciesService {
    /// ReplayPolicy: reads at most `max_events` of the log (read-only) and evaluates the draft
    /// on each request's latest state read.
    async fn replay(
        &self,
        caller: &Caller,
        req: pb::ReplayPolicyRequest,
    ) -> Result<pb::ReplayPolicyResponse, ApiError> {
        let Some(body) = req.policy else {
            return Err(ApiError::invalid("policy", "is required"));
        };
        let mut violations = Violations::default();
        let mut draft = policy::new_policy(
            &body,
            String::new(),
            self.context.clock.now(),
            &mut violations,
        );
        if draft.name.trim().is_empty() {
            draft.name = "draft".into();
        }
        // Replayed as enforced, whatever mode the draft names.
        draft.rules.mode = approvals_domain::PolicyMode::Enforce;
        self.check_applier_endpoint(&draft, &mut violations);
        if req.since_revision < 0 {
            violations.add("since_revision", "must not be negative");
        }
        validate_into(&draft, violations)?;
        caller.ensure_project(&draft.project)?;
        let since_time =
            super::requests::optional_timestamp("since_time", req.since_time.as_ref())?;
        let max_events = bounded(
            "max_events",
            req.max_events,
            DEFAULT_REPLAY_EVENTS,
            MAX_REPLAY_EVENTS,
        )?;
        let max_examples = usize::try_from(bounded(
            "max_examples",
            req.max_examples,
            DEFAULT_EXAMPLES as u64,
            MAX_EXAMPLES as u64,
        )?)
        .unwrap_or(MAX_EXAMPLES);

        // Every revision up to the head counts as settled: a replay reads history, and a write
        // still in flight is simply left to a later replay.
        let store = &self.context.store;
        let head = store.head_revision().await?;
        let mut reader = store.log_reader_settled(req.since_revision, head);
        let mut order: Vec<String> = Vec::new();
        let mut latest: std::collections::HashMap<String, approvals_domain::ChangeRequest> =
            std::collections::HashMap::new();
        let mut read = 0u64;
        let mut exhausted = false;
        while read < max_events {
            let batch = reader
                .next_batch(REPLAY_BATCH.min(max_events - read))
                .await?;
            read += batch.events.len() as u64;
            for event in batch.events {
                let Some(request) = event.change_request else {
                    continue;
                };
                if since_time.is_some_and(|t| event.time < t) {
                    continue;
                }
                if !latest.contains_key(&request.id) {
                    order.push(request.id.clone());
                }
                latest.insert(request.id.clone(), request);
            }
            if !batch.full {
                exhausted = true;
                break;
            }
        }
        let mut out = pb::ReplayPolicyResponse {
            next_revision: if exhausted { 0 } else { reader.position() },
            ..Default::default()
        };
        let min = self.context.min_approvals;
        for id in &order {
            let Some(request) = latest.get(id) else {
                continue;
            };
            if caller.ensure_sees(request).is_err() {
                continue;
            }
            out.evaluated += 1;
            let replayed = governance::replay(&draft, request, &[], min);
            let outcome = match replayed.outcome {
                ReplayOutcome::NotMatched => continue,
                ReplayOutcome::Unchanged => {
                    out.matched += 1;
                    out.unchanged += 1;
                    continue;
                }
                ReplayOutcome::WouldBlock => {
                    out.would_block += 1;
                    pb::ReplayOutcome::WouldBlock
                }
                ReplayOutcome::NeedsMoreApprovals => {
                    out.would_need_more_approvals += 1;
                    pb::ReplayOutcome::NeedsMoreApprovals
                }
                ReplayOutcome::WouldPass => {
                    out.would_pass += 1;
                    pb::ReplayOutcome::WouldPass
                }
            };
            out.matched += 1;
            if out.examples.len() < max_examples {
                out.examples.push(pb::ReplayExample {
                    change_request_id: request.id.clone(),
                    outcome: outcome.into(),
                    state: crate::convert::state(request.state)
                        .as_str_name()
                        .to_owned(),
                    enforced_policy: request.policy.name.clone(),
                    enforced_required_approvals: i32::try_from(replayed.enforced_required)
                        .unwrap_or(i32::MAX),
                    draft_required_approvals: i32::try_from(replayed.draft_required)
                        .unwrap_or(i32::MAX),
                });
            }
        }
        Ok(out)
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

    async fn replay_policy(
        &self,
        request: Request<pb::ReplayPolicyRequest>,
    ) -> Answer<pb::ReplayPolicyResponse> {
        let (caller, req) = called(request)?;
        answer(self.replay(&caller, req).await)
    }
}
