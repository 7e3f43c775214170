//! `approvals.v1.ChangeRequests`: each handler identifies the caller, converts the request,
//! runs the domain command through the store, and converts the result back.

use futures::StreamExt;
use std::sync::Arc;

use approvals_domain::{
    ApplyWiring, ChangeRequest, ChangeRequestPatch, Decision, DomainError, NewChangeRequest,
    PolicySnapshot, Principal, State,
    validation::{self, Violations},
};
use approvals_store::{IdempotencyKey, ListFilter, Step, Store};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    api::page_token,
    apply::{ApplyEngine, new_id, now},
    auth::{self as identity, Caller, Scope},
    convert,
    error::ApiError,
    pb::{self, change_requests_server::ChangeRequests},
    watch::{self, EventFilter, Hub, Start},
};

const LIST_DEFAULT_PAGE_SIZE: u64 = 50;
const LIST_MAX_PAGE_SIZE: u64 = 1000;
const EVENTS_DEFAULT_PAGE_SIZE: u64 = 100;
const EVENTS_MAX_PAGE_SIZE: u64 = 1000;

#[derive(Clone)]
pub struct ChangeRequestsService {
    store: Store,
    hub: Arc<Hub>,
    engine: Arc<ApplyEngine>,
    min_approvals: u32,
}

/// The filter fields List and Watch share: a project (required) and optional names.
fn filter_violations(
    project: &str,
    environment: &str,
    action_key: &str,
    resource_type: &str,
    resource_id: &str,
) -> Violations {
    let mut violations = Violations::default();
    violations.required_name("project", project);
    for (field, value) in [
        ("environment", environment),
        ("action_key", action_key),
        ("resource_type", resource_type),
        ("resource_id", resource_id),
    ] {
        violations.optional_name(field, value);
    }
    violations
}

impl ChangeRequestsService {
    /// WatchChangeRequests: checks the request and opens the stream.
    pub async fn open_watch(
        &self,
        request: Request<pb::WatchChangeRequestsRequest>,
    ) -> Result<Response<watch::WatchStream>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let mut violations = filter_violations(
            &req.project,
            &req.environment,
            &req.action_key,
            &req.resource_type,
            &req.resource_id,
        );
        if req.start_revision < 0 {
            violations.add("start_revision", "must not be negative (0 means from now)");
        }
        if req.start_revision > 0 && req.include_initial {
            violations.add(
                "include_initial",
                "cannot be combined with start_revision: a snapshot starts at the current revision",
            );
        }
        violations.into_result().map_err(ApiError::from)?;
        // A watcher sees only the projects its credentials allow; the filter holds it to one.
        caller
            .ensure_project(&req.project)
            .map_err(ApiError::from)?;
        let id = if req.id.is_empty() {
            None
        } else {
            Some(parse_id("id", &req.id)?)
        };
        let states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::from_state(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        let filter = EventFilter {
            project: req.project,
            environment: optional(&req.environment),
            action_key: optional(&req.action_key),
            resource_type: optional(&req.resource_type),
            resource_id: optional(&req.resource_id),
            states,
            id,
        };
        let start = if req.include_initial {
            Start::Initial
        } else if req.start_revision > 0 {
            Start::Revision(req.start_revision)
        } else {
            Start::Now
        };
        let stream = watch::open(self.hub.clone(), filter, start, &caller).await?;
        Ok(Response::new(stream))
    }

    pub fn new(store: Store, hub: Arc<Hub>, engine: Arc<ApplyEngine>, min_approvals: u32) -> Self {
        Self {
            store,
            hub,
            engine,
            min_approvals,
        }
    }
}

/// A change request id from a request: required, a UUID, normalised to lower-case hyphenated.
fn parse_id(field: &str, id: &str) -> Result<String, ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| {
            ApiError::invalid(field, format!("{id:?} is not a change request id (a UUID)"))
        })
}

/// Refuses a command from a caller after which the request, as served, would be larger than
/// [`validation::MAX_DOCUMENT_BYTES`]. The domain holds the stored JSON to the same limit; the
/// message can be the larger of the two (a payload's small numbers take 2 bytes of JSON and 11
/// of protobuf), and it is what has to fit a client's 4 MiB.
fn fits_a_message(request: &ChangeRequest) -> Result<(), DomainError> {
    validation::check_document_size(convert::change_request(request, None).encoded_len())
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn ok(request: &ChangeRequest, caller: &Caller) -> Result<Response<pb::ChangeRequest>, Status> {
    Ok(Response::new(view(request, caller)))
}

/// The request with the fields computed for the caller: reviewing and cancelling need
/// `approvals:write` besides what the request's rules allow.
fn view(request: &ChangeRequest, caller: &Caller) -> pb::ChangeRequest {
    let mut out = convert::change_request(request, Some(&caller.actor()));
    if !caller.has(Scope::Write) {
        out.can_approve = false;
        out.can_cancel = false;
    }
    out
}

/// `pending_for_me`: in review, approvable by the caller now, and not yet reviewed by them.
fn pending_for(request: &ChangeRequest, caller: &Caller) -> bool {
    let flags = request.viewer_flags(&caller.actor());
    request.state == State::InReview
        && caller.has(Scope::Write)
        && flags.can_approve
        && flags.user_decision.is_none()
}

fn idempotency_key(
    request: &pb::CreateChangeRequestRequest,
) -> Result<Option<IdempotencyKey>, ApiError> {
    if request.request_id.is_empty() {
        return Ok(None);
    }
    if request.request_id.chars().count() > validation::MAX_REQUEST_ID_CHARS
        || request.request_id.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "request_id",
            format!(
                "must be at most {} printable characters",
                validation::MAX_REQUEST_ID_CHARS
            ),
        ));
    }
    // The body without its request_id: a retry must send the same body to get the same answer.
    let body = pb::CreateChangeRequestRequest {
        request_id: String::new(),
        ..request.clone()
    };
    let digest = Sha256::digest(body.encode_to_vec());
    Ok(Some(IdempotencyKey {
        request_id: request.request_id.clone(),
        fingerprint: digest.iter().map(|b| format!("{b:02x}")).collect(),
    }))
}

#[tonic::async_trait]
impl ChangeRequests for ChangeRequestsService {
    type WatchChangeRequestsStream = watch::WatchMessages;

    async fn apply_change_request(
        &self,
        request: Request<pb::ApplyChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let bypass = if req.bypass_justification.is_empty() {
            None
        } else if req.bypass_justification.trim().is_empty() {
            return Err(ApiError::invalid(
                "bypass_justification",
                "must say why (it is only whitespace)",
            )
            .into());
        } else {
            let mut v = Violations::default();
            v.text(
                "bypass_justification",
                &req.bypass_justification,
                validation::MAX_TEXT_BYTES,
            );
            v.into_result().map_err(ApiError::from)?;
            Some(req.bypass_justification.clone())
        };
        let needed = if bypass.is_some() {
            Scope::Bypass
        } else {
            Scope::Write
        };
        if !caller.has(needed) {
            return Err(ApiError::MissingScope {
                scope: needed.as_str(),
                method: "ApplyChangeRequest".to_owned(),
            }
            .into());
        }
        let (_, wiring) = self.with_wiring(&caller, &id).await?;
        let actor = caller.actor();
        let now = now();
        let key = new_id();
        let replica = self.engine.replica().to_owned();
        let lease = self.engine.lease_micros();
        let started = self
            .store
            .step(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(Some(&req.etag))?;
                r.start_manual_apply(&actor, &wiring, bypass, key, &replica, lease, now)
                    .map(Step::Event)
            })
            .await
            .map_err(ApiError::from)?;
        let after = self
            .engine
            .run_and_wait(started)
            .await
            .map_err(ApiError::from)?;
        ok(&after, &caller)
    }

    async fn schedule_change_request(
        &self,
        request: Request<pb::ScheduleChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let Some(apply_time) = req.apply_time.as_ref() else {
            return Err(ApiError::invalid("apply_time", "is required").into());
        };
        let apply_time = convert::from_timestamp("apply_time", apply_time)?;
        let (_, wiring) = self.with_wiring(&caller, &id).await?;
        let actor = caller.actor();
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                r.check_etag(Some(&req.etag))?;
                r.schedule(&actor, &wiring, apply_time, now)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn unschedule_change_request(
        &self,
        request: Request<pb::UnscheduleChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let (_, wiring) = self.with_wiring(&caller, &id).await?;
        let actor = caller.actor();
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                r.check_etag(Some(&req.etag))?;
                r.unschedule(&actor, &wiring, now)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn complete_change_request(
        &self,
        request: Request<pb::CompleteChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let mut v = Violations::default();
        v.text("error", &req.error, validation::MAX_TEXT_BYTES);
        let result_data = req
            .result_data
            .as_ref()
            .map(|s| convert::from_struct("result_data", s, &mut v));
        if let Some(data) = &result_data {
            v.json_strings("result_data", data);
        }
        v.into_result().map_err(ApiError::from)?;
        let (_, wiring) = self.with_wiring(&caller, &id).await?;
        let actor = caller.actor();
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                r.complete(&actor, &wiring, req.success, result_data, req.error, now)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    /// Served by `watch_route::WatchRoute`, which sends the frames as they are; this form (plain
    /// messages) is what the generated trait asks for.
    async fn watch_change_requests(
        &self,
        request: Request<pb::WatchChangeRequestsRequest>,
    ) -> Result<Response<Self::WatchChangeRequestsStream>, Status> {
        let stream = self.open_watch(request).await?.into_inner();
        Ok(Response::new(Box::pin(
            stream.map(|frame| frame.map(watch::WatchFrame::into_message)),
        )))
    }

    async fn create_change_request(
        &self,
        request: Request<pb::CreateChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let actor = caller.actor();
        let req = request.into_inner();
        if !req.project.is_empty() {
            caller
                .ensure_project(&req.project)
                .map_err(ApiError::from)?;
        }
        let key = idempotency_key(&req)?;
        let now = now();
        let mut violations = Violations::default();
        let changes = convert::change_inputs("changes", &req.changes, &mut violations);
        let expire_time = req
            .expire_time
            .as_ref()
            .map(|t| convert::from_timestamp("expire_time", t))
            .transpose()?;
        let apply_time = req
            .apply_time
            .as_ref()
            .map(|t| convert::from_timestamp("apply_time", t))
            .transpose()?;
        violations.into_result().map_err(ApiError::from)?;
        // A project the domain refuses (empty, or with a NUL that PostgreSQL cannot compare) is
        // never looked up: the create below names it, with every other bad field.
        let mut project = Violations::default();
        project.required_name("project", &req.project);
        let policies = if project.is_empty() {
            self.store
                .project_policies(&req.project)
                .await
                .map_err(ApiError::from)?
        } else {
            Vec::new()
        };
        let policy = PolicySnapshot::select(
            &policies,
            &req.project,
            &req.environment,
            &req.action_key,
            self.min_approvals,
        );
        let new = NewChangeRequest {
            project: req.project,
            environment: req.environment,
            action_key: req.action_key,
            action_version: req.action_version,
            title: req.title,
            description: req.description,
            changes,
            intent_display: req.intent_display,
            expire_time,
            draft: req.draft,
            apply_time,
        };
        let (change_request, event) =
            ChangeRequest::create(new_id(), new, &actor, policy, now, &mut new_id)
                .map_err(ApiError::from)?;
        fits_a_message(&change_request).map_err(ApiError::from)?;
        let created = self
            .store
            .create(change_request, event, key)
            .await
            .map_err(ApiError::from)?;
        ok(&created.change_request, &caller)
    }

    async fn get_change_request(
        &self,
        request: Request<pb::GetChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let id = parse_id("id", &request.get_ref().id)?;
        let cache = self.hub.cache();
        let change_request = match cache.get(&id, self.store.written_head()) {
            Some(cached) => cached,
            None => {
                let mark = cache.mark();
                let read = self.store.get(&id).await.map_err(ApiError::from)?;
                cache.offer(mark, &read);
                Arc::new(read)
            }
        };
        caller
            .ensure_sees(&change_request)
            .map_err(ApiError::from)?;
        ok(&change_request, &caller)
    }

    async fn list_change_requests(
        &self,
        request: Request<pb::ListChangeRequestsRequest>,
    ) -> Result<Response<pb::ListChangeRequestsResponse>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let mut violations = filter_violations(
            &req.project,
            &req.environment,
            &req.action_key,
            &req.resource_type,
            &req.resource_id,
        );
        if !req.requester.is_empty()
            && let Err(message) = Principal::parse(&req.requester)
        {
            violations.add("requester", message);
        }
        violations.into_result().map_err(ApiError::from)?;
        caller
            .ensure_project(&req.project)
            .map_err(ApiError::from)?;
        let mut states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::from_state(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.as_str());
        states.dedup();
        let page_size =
            page_token::page_size(req.page_size, LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)?;
        let state_names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let states_key = state_names.join(",");
        let digest = page_token::query_digest(&[
            "list",
            &req.project,
            &req.environment,
            &req.action_key,
            &req.resource_type,
            &req.resource_id,
            &req.requester,
            &states_key,
            if req.pending_for_me { "pending" } else { "" },
        ]);
        let after = page_token::decode(&req.page_token, &digest)?;
        let filter = ListFilter {
            project: req.project,
            environment: optional(&req.environment),
            action_key: optional(&req.action_key),
            resource_type: optional(&req.resource_type),
            resource_id: optional(&req.resource_id),
            requester: optional(&req.requester),
            states,
            id: None,
        };
        let page = if req.pending_for_me {
            let mut filter = filter;
            if filter.states.is_empty() || filter.states.contains(&State::InReview) {
                filter.states = vec![State::InReview];
            }
            self.store
                .list_matching(
                    &filter,
                    |r| pending_for(r, &caller),
                    after.as_deref(),
                    page_size,
                )
                .await
        } else {
            self.store.list(&filter, after.as_deref(), page_size).await
        }
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListChangeRequestsResponse {
            change_requests: page
                .change_requests
                .iter()
                .map(|r| view(r, &caller))
                .collect(),
            next_page_token: page
                .next_after
                .map(|after| page_token::encode(&after, &digest))
                .unwrap_or_default(),
            total_size: i32::try_from(page.total_size).unwrap_or(i32::MAX),
        }))
    }

    async fn update_change_request(
        &self,
        request: Request<pb::UpdateChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let actor = caller.actor();
        let req = request.into_inner();
        let Some(body) = req.change_request else {
            return Err(ApiError::invalid("change_request", "is required").into());
        };
        let id = parse_id("change_request.id", &body.id)?;
        let Some(mask) = req.update_mask else {
            return Err(
                ApiError::invalid("update_mask", "is required: name the fields to update").into(),
            );
        };
        let now = now();
        let mut violations = Violations::default();
        let mut patch = ChangeRequestPatch::default();
        for (i, path) in mask.paths.iter().enumerate() {
            match path.as_str() {
                "title" => patch.title = Some(body.title.clone()),
                "description" => patch.description = Some(body.description.clone()),
                "intent_display" => patch.intent_display = Some(body.intent_display.clone()),
                "changes" => {
                    patch.changes =
                        Some(convert::change_inputs("change_request.changes", &body.changes, &mut violations))
                }
                "expire_time" => {
                    patch.expire_time = Some(
                        body.expire_time
                            .as_ref()
                            .map(|t| convert::from_timestamp("change_request.expire_time", t))
                            .transpose()?,
                    )
                }
                other => violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!(
                        "{other:?} cannot be updated; updatable: title, description, changes, intent_display, expire_time"
                    ),
                ),
            }
        }
        violations.into_result().map_err(ApiError::from)?;
        let etag = optional(&body.etag);
        // The latest applied versions decide which changes are (still) in conflict.
        let current = self.store.get(&id).await.map_err(ApiError::from)?;
        let versions = self
            .store
            .latest_versions(&current)
            .await
            .map_err(ApiError::from)?;
        let updated = self
            .store
            .mutate(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(etag.as_deref())?;
                let event =
                    r.update_with_versions(&actor, patch, now, &mut new_id, &|kind, id| {
                        versions.get(&(kind.to_owned(), id.to_owned())).cloned()
                    })?;
                fits_a_message(r)?;
                Ok(event)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn submit_change_request(
        &self,
        request: Request<pb::SubmitChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let actor = caller.actor();
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(Some(&req.etag))?;
                r.submit(&actor, now)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn approve_change_request(
        &self,
        request: Request<pb::ApproveChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        self.review(&caller, &req.id, Decision::Approve, req.comment, &req.etag)
            .await
    }

    async fn reject_change_request(
        &self,
        request: Request<pb::RejectChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        self.review(&caller, &req.id, Decision::Reject, req.comment, &req.etag)
            .await
    }

    async fn cancel_change_request(
        &self,
        request: Request<pb::CancelChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let actor = caller.actor();
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(Some(&req.etag))?;
                r.cancel(&actor, req.reason, now)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn add_comment(
        &self,
        request: Request<pb::AddCommentRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let caller = identity::caller(&request)?;
        let actor = caller.actor();
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                caller.ensure_sees(r)?;
                let event = r.add_comment(&actor, new_id(), req.text, now)?;
                fits_a_message(r)?;
                Ok(event)
            })
            .await
            .map_err(ApiError::from)?;
        ok(&updated, &caller)
    }

    async fn list_change_request_events(
        &self,
        request: Request<pb::ListChangeRequestEventsRequest>,
    ) -> Result<Response<pb::ListChangeRequestEventsResponse>, Status> {
        let caller = identity::caller(&request)?;
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        let page_size = page_token::page_size(
            req.page_size,
            EVENTS_DEFAULT_PAGE_SIZE,
            EVENTS_MAX_PAGE_SIZE,
        )?;
        let digest = page_token::query_digest(&["events", &id]);
        let after = match page_token::decode(&req.page_token, &digest)? {
            Some(position) => position.parse::<i64>().map_err(|_| {
                ApiError::invalid("page_token", "is not a token this service issued")
            })?,
            None => 0,
        };
        let mut events = self
            .store
            .events(&id, after, page_size + 1, req.include_change_request)
            .await
            .map_err(ApiError::from)?;
        if events.is_empty() && after == 0 {
            // Every request has at least its CREATED event: none means no such request.
            return Err(ApiError::from(approvals_store::StoreError::NotFound(id)).into());
        }
        if let Some(first) = events.first()
            && !caller.may_act_in(&first.project)
        {
            // Another project's request: answered as an unknown id.
            return Err(ApiError::from(approvals_store::StoreError::NotFound(id)).into());
        }
        let next_page_token = if events.len() as u64 > page_size {
            events.truncate(page_size as usize);
            events
                .last()
                .map(|e| page_token::encode(&e.revision.to_string(), &digest))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListChangeRequestEventsResponse {
            events: events.iter().map(convert::event).collect(),
            next_page_token,
        }))
    }
}

impl ChangeRequestsService {
    async fn review(
        &self,
        caller: &Caller,
        id: &str,
        decision: Decision,
        comment: String,
        etag: &str,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let id = parse_id("id", id)?;
        let actor = caller.actor();
        let now = now();
        let updated = self
            .store
            .mutate(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(Some(etag))?;
                let event = r.review(&actor, decision, comment, now)?;
                fits_a_message(r)?;
                Ok(event)
            })
            .await
            .map_err(ApiError::from)?;
        // AUTO: the approval that reached quorum starts the apply; wait for it a while.
        if updated.state == State::Approved
            && updated.apply_mode() == approvals_domain::ApplyMode::Auto
        {
            let started = self
                .engine
                .start_automatic(&updated)
                .await
                .map_err(ApiError::from)?;
            let after = if started.runs_under(self.engine.replica()) {
                self.engine
                    .run_and_wait(started)
                    .await
                    .map_err(ApiError::from)?
            } else {
                started
            };
            return ok(&after, caller);
        }
        ok(&updated, caller)
    }

    /// Loads a request the caller may act on, with its apply wiring.
    async fn with_wiring(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(ChangeRequest, ApplyWiring), ApiError> {
        let request = self.store.get(id).await?;
        caller.ensure_sees(&request)?;
        let wiring = self.engine.wiring(&request).await?;
        Ok((request, wiring))
    }
}
