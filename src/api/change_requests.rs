//! `approvals.v1.ChangeRequests`. A handler takes the caller, parses the message
//! (`requests.rs`), runs the domain command through the store and answers the request as
//! the caller sees it. Mutations of one request go through `ChangeRequestsService::command`.

use std::sync::Arc;

use approvals_domain::{
    Actor, ApplyMode, ApplyWiring, ChangeRequest, Decision, DomainError, EventDraft,
    PolicySnapshot, ReciprocalApproval, State, Timestamp,
    calendar::Windows,
    validation::{self, Violations},
};
use approvals_store::{ReadRequest, Step};
use futures::StreamExt;
use prost::Message;
use tonic::{Request, Response};

use super::{
    Answer, Context, answer, called, governance,
    requests::{self, Application, Completion, Creation, Edit},
};
use crate::{
    auth::{Caller, Scope},
    convert,
    error::ApiError,
    pb::{self, change_requests_server::ChangeRequests},
    watch,
};

#[derive(Clone)]
pub struct ChangeRequestsService {
    pub(super) context: Arc<Context>,
}

/// A domain command on one request: given the request, the actor and the time. It may run
/// more than once (see `Store::mutate`), so it consumes nothing it was given.
type Command<'a> = Box<
    dyn FnMut(&mut ChangeRequest, &Actor, Timestamp) -> Result<EventDraft, DomainError> + Send + 'a,
>;

impl ChangeRequestsService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    /// Runs `command` on the request `id` atomically (see `Store::mutate`), for a caller that
    /// may see it, after checking the caller's `etag` (when given), and refuses a result too
    /// large to serve.
    async fn command(
        &self,
        caller: &Caller,
        id: &str,
        etag: Option<&str>,
        command: Command<'_>,
    ) -> Result<ChangeRequest, ApiError> {
        let id = requests::id("id", id)?;
        let checked = self.checked(caller, etag, command);
        Ok(self.context.store.mutate(&id, checked).await?)
    }

    /// [`Self::command`] on a request the handler has read already (`Store::mutate_read`).
    async fn command_on(
        &self,
        caller: &Caller,
        read: ReadRequest,
        etag: Option<&str>,
        command: Command<'_>,
    ) -> Result<ChangeRequest, ApiError> {
        let checked = self.checked(caller, etag, command);
        Ok(self.context.store.mutate_read(read, checked).await?)
    }

    /// `command` with what every command checks around it: the caller sees the request, the
    /// etag (when given) is current, the result fits a message; and the attestation an
    /// approval makes due.
    fn checked<'a>(
        &'a self,
        caller: &'a Caller,
        etag: Option<&'a str>,
        mut command: Command<'a>,
    ) -> impl FnMut(&mut ChangeRequest) -> Result<EventDraft, DomainError> + Send + 'a {
        let actor = caller.actor();
        let now = self.context.clock.now();
        move |r| {
            caller.ensure_sees(r)?;
            if let Some(etag) = etag {
                r.check_etag(Some(etag))?;
            }
            let event = command(r, &actor, now)?;
            self.context.attest_if_due(r, &event, now);
            fits_a_message(r)?;
            Ok(event)
        }
    }

    /// A command that also needs the policy's current apply wiring.
    async fn wired_command(
        &self,
        caller: &Caller,
        id: &str,
        etag: Option<&str>,
        mut command: impl FnMut(
            &mut ChangeRequest,
            &Actor,
            &ApplyWiring,
            &Windows,
            Timestamp,
        ) -> Result<EventDraft, DomainError>
        + Send,
    ) -> Result<ChangeRequest, ApiError> {
        let id = requests::id("id", id)?;
        let (wiring, windows) = self.wiring(caller, &id).await?;
        self.command(
            caller,
            &id,
            etag,
            Box::new(move |r, actor, now| command(r, actor, &wiring, &windows, now)),
        )
        .await
    }

    /// Anti-collusion: under a policy with `anti_collusion`, the requester's latest approval,
    /// within the window, of a request of `actor` (the would-be approver).
    pub(super) async fn reciprocal_approval(
        &self,
        request: &ChangeRequest,
        actor: &Actor,
    ) -> Result<Option<ReciprocalApproval>, ApiError> {
        let Some(anti) = request.policy.rules.anti_collusion else {
            return Ok(None);
        };
        if actor.principal == request.created_by {
            return Ok(None);
        }
        let since = self
            .context
            .clock
            .now()
            .saturating_add_micros(anti.window_micros.saturating_neg());
        Ok(self
            .context
            .store
            .reciprocal_approval(&request.created_by, &actor.principal, since)
            .await?)
    }

    /// The apply wiring of a request the caller may see.
    /// How the request is applied, and the calendars it must wait for.
    async fn wiring(&self, caller: &Caller, id: &str) -> Result<(ApplyWiring, Windows), ApiError> {
        let request = self.context.store.get(id).await?;
        caller.ensure_sees(&request)?;
        let engine = &self.context.engine;
        Ok((
            engine.wiring(&request).await?,
            engine.windows(&request).await?,
        ))
    }

    async fn review(
        &self,
        caller: &Caller,
        id: &str,
        etag: &str,
        decision: Decision,
        comment: String,
    ) -> Result<pb::ChangeRequest, ApiError> {
        let id = requests::id("id", id)?;
        let (read, reciprocal) = if decision == Decision::Approve {
            // Read for anti-collusion, and handed on to the write, which needs no second read.
            let read = self.context.store.read_request(&id).await?;
            caller.ensure_sees(&read.request)?;
            let reciprocal = self
                .reciprocal_approval(&read.request, &caller.actor())
                .await?;
            (Some(read), reciprocal)
        } else {
            (None, None)
        };
        let review: Command<'_> = Box::new(move |r, actor, now| {
            r.review_with(actor, decision, comment.clone(), now, reciprocal.as_ref())
        });
        let reviewed = match read {
            Some(read) => self.command_on(caller, read, Some(etag), review).await?,
            None => self.command(caller, &id, Some(etag), review).await?,
        };
        if reviewed.state == State::Approved
            && approvals_domain::governance::is_policy_change(&reviewed.project)
        {
            // The service applies policy changes itself, whatever the apply mode.
            let applied = governance::apply(&self.context, &reviewed).await?;
            return Ok(view(&applied, caller));
        }
        if reviewed.state != State::Approved || reviewed.apply_mode() != ApplyMode::Auto {
            return Ok(view(&reviewed, caller));
        }
        // AUTO: the approval that reached quorum starts the apply; wait for it a while.
        let engine = &self.context.engine;
        let started = engine.start_automatic(&reviewed).await?;
        let after = if started.runs_under(engine.replica()) {
            engine.run_and_wait(started).await?
        } else {
            started
        };
        Ok(view(&after, caller))
    }

    async fn apply(
        &self,
        caller: &Caller,
        req: pb::ApplyChangeRequestRequest,
    ) -> Result<pb::ChangeRequest, ApiError> {
        let Application { id, bypass } = Application::try_from(&req)?;
        let needed = if bypass.is_some() {
            Scope::Bypass
        } else {
            Scope::Write
        };
        caller.require(needed, "ApplyChangeRequest")?;
        let (wiring, windows) = self.wiring(caller, &id).await?;
        let actor = caller.actor();
        let (now, key) = (self.context.clock.now(), self.context.clock.new_id());
        let engine = &self.context.engine;
        let (replica, lease) = (engine.replica().to_owned(), engine.lease_micros());
        let started = self
            .context
            .store
            .step(&id, |r| {
                caller.ensure_sees(r)?;
                r.check_etag(Some(&req.etag))?;
                let event = r.start_manual_apply(
                    &actor, &wiring, &windows, bypass, key, &replica, lease, now,
                )?;
                self.context.attest_if_due(r, &event, now);
                Ok(Step::Event(event))
            })
            .await?;
        let after = engine.run_and_wait(started).await?;
        Ok(view(&after, caller))
    }

    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreateChangeRequestRequest,
    ) -> Result<pb::ChangeRequest, ApiError> {
        if !req.project.is_empty() {
            caller.ensure_project(&req.project)?;
        }
        let Creation { new, key } = Creation::try_from(req)?;
        if approvals_domain::governance::is_policy_change(&new.project) {
            // Policy changes are policy administration, under four eyes.
            caller.require(Scope::Admin, "CreateChangeRequest")?;
            let named: Vec<governance::Named<'_>> = new
                .changes
                .iter()
                .map(|c| governance::Named {
                    resource_type: &c.resource_type,
                    resource_id: &c.resource_id,
                    payload: &c.payload,
                })
                .collect();
            governance::check_new(&self.context, caller, &new.action_key, &named).await?;
        }
        // A project the domain refuses (empty, or with a NUL that PostgreSQL cannot compare) is
        // never looked up: the create below names it, with every other bad field.
        let mut project = Violations::default();
        project.required_name("project", &new.project);
        let policies = if project.is_empty() {
            self.context.store.project_policies(&new.project).await?
        } else {
            Vec::new()
        };
        let actor = caller.actor();
        let facts = new.facts(&actor.principal, &actor.groups);
        let policy = PolicySnapshot::select_for(&policies, &facts, self.context.min_approvals);
        let shadow_verdicts = approvals_domain::governance::shadow_verdicts(
            &policies,
            &facts,
            self.context.min_approvals,
        );
        drop(facts);
        let clock = &self.context.clock;
        let (mut change_request, event) = ChangeRequest::create(
            clock.new_id(),
            new,
            &caller.actor(),
            policy,
            clock.now(),
            &mut || clock.new_id(),
        )?;
        change_request.shadow_verdicts = shadow_verdicts;
        fits_a_message(&change_request)?;
        let created = self
            .context
            .store
            .create(change_request, event, key)
            .await?;
        // A pre-approved standard change, or an automatic review, right away (a retried
        // request_id finds it done).
        let request = self
            .context
            .engine
            .run_policy_work(created.change_request)
            .await?;
        Ok(view(&request, caller))
    }

    async fn edit(
        &self,
        caller: &Caller,
        req: pb::UpdateChangeRequestRequest,
    ) -> Result<pb::ChangeRequest, ApiError> {
        let Edit { id, etag, patch } = Edit::try_from(req)?;
        // The latest applied versions decide which changes are (still) in conflict.
        let store = &self.context.store;
        let versions = store.latest_versions(&store.get(&id).await?).await?;
        let clock = self.context.clock.clone();
        let edit: Command<'_> = Box::new(move |r, actor, now| {
            r.update_with_versions(
                actor,
                patch.clone(),
                now,
                &mut || clock.new_id(),
                &|kind, id| versions.get(&(kind.to_owned(), id.to_owned())).cloned(),
            )
        });
        // An update without an etag is allowed (last writer wins); `command` checks one given.
        let updated = self.command(caller, &id, etag.as_deref(), edit).await?;
        // An edit that sent it back to review runs the policy's own reviews again.
        let updated = self.context.engine.run_policy_work(updated).await?;
        Ok(view(&updated, caller))
    }
}

/// Refuses a command from a caller after which the request, as served, would be larger than
/// [`validation::MAX_DOCUMENT_BYTES`]. The domain holds the stored JSON to the same limit; the
/// message can be the larger of the two (a payload's small numbers take 2 bytes of JSON and 11
/// of protobuf), and it is what has to fit a client's 4 MiB.
fn fits_a_message(request: &ChangeRequest) -> Result<(), DomainError> {
    validation::check_document_size(convert::change_request(request, None).encoded_len())
}

/// A command's result as the caller sees it.
fn answer_seen(
    result: Result<ChangeRequest, ApiError>,
    caller: &Caller,
) -> Answer<pb::ChangeRequest> {
    answer(result.map(|request| view(&request, caller)))
}

/// The request with the fields computed for the caller: reviewing and cancelling need
/// `approvals:write` besides what the request's rules allow.
pub(super) fn view(request: &ChangeRequest, caller: &Caller) -> pb::ChangeRequest {
    let mut out = convert::change_request(request, Some(&caller.actor()));
    if !caller.has(Scope::Write) {
        if out.can_approve {
            out.can_approve_reason = "MISSING_SCOPE".to_owned();
        }
        out.can_approve = false;
        out.can_cancel = false;
    }
    out
}

#[tonic::async_trait]
impl ChangeRequests for ChangeRequestsService {
    type WatchChangeRequestsStream = watch::WatchMessages;

    async fn create_change_request(
        &self,
        request: Request<pb::CreateChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        answer(self.create(&caller, req).await)
    }

    async fn get_change_request(
        &self,
        request: Request<pb::GetChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        answer(self.get(&caller, &req.id).await)
    }

    async fn list_change_requests(
        &self,
        request: Request<pb::ListChangeRequestsRequest>,
    ) -> Answer<pb::ListChangeRequestsResponse> {
        let (caller, req) = called(request)?;
        answer(self.list(&caller, &req).await)
    }

    async fn update_change_request(
        &self,
        request: Request<pb::UpdateChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        answer(self.edit(&caller, req).await)
    }

    async fn submit_change_request(
        &self,
        request: Request<pb::SubmitChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let submit = Box::new(|r: &mut ChangeRequest, actor: &Actor, now| r.submit(actor, now));
        let submitted = match self
            .command(&caller, &req.id, Some(&req.etag), submit)
            .await
        {
            Ok(submitted) => self
                .context
                .engine
                .run_policy_work(submitted)
                .await
                .map_err(ApiError::from),
            Err(err) => Err(err),
        };
        answer_seen(submitted, &caller)
    }

    async fn approve_change_request(
        &self,
        request: Request<pb::ApproveChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let approve = Decision::Approve;
        answer(
            self.review(&caller, &req.id, &req.etag, approve, req.comment)
                .await,
        )
    }

    async fn reject_change_request(
        &self,
        request: Request<pb::RejectChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let reject = Decision::Reject;
        answer(
            self.review(&caller, &req.id, &req.etag, reject, req.comment)
                .await,
        )
    }

    async fn cancel_change_request(
        &self,
        request: Request<pb::CancelChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let reason = req.reason;
        let cancel = Box::new(move |r: &mut ChangeRequest, actor: &Actor, now| {
            r.cancel(actor, reason.clone(), now)
        });
        answer_seen(
            self.command(&caller, &req.id, Some(&req.etag), cancel)
                .await,
            &caller,
        )
    }

    async fn add_comment(
        &self,
        request: Request<pb::AddCommentRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let (id, text) = (self.context.clock.new_id(), req.text);
        let comment = Box::new(move |r: &mut ChangeRequest, actor: &Actor, now| {
            r.add_comment(actor, id.clone(), text.clone(), now)
        });
        answer_seen(self.command(&caller, &req.id, None, comment).await, &caller)
    }

    async fn apply_change_request(
        &self,
        request: Request<pb::ApplyChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        answer(self.apply(&caller, req).await)
    }

    async fn schedule_change_request(
        &self,
        request: Request<pb::ScheduleChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        requests::id("id", &req.id)?;
        let at = requests::schedule_at(&req)?;
        let schedule =
            |r: &mut ChangeRequest, actor: &Actor, wiring: &ApplyWiring, windows: &Windows, now| {
                r.schedule(actor, wiring, windows, at, now)
            };
        answer_seen(
            self.wired_command(&caller, &req.id, Some(&req.etag), schedule)
                .await,
            &caller,
        )
    }

    async fn unschedule_change_request(
        &self,
        request: Request<pb::UnscheduleChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let unschedule =
            |r: &mut ChangeRequest, actor: &Actor, wiring: &ApplyWiring, _: &Windows, now| {
                r.unschedule(actor, wiring, now)
            };
        answer_seen(
            self.wired_command(&caller, &req.id, Some(&req.etag), unschedule)
                .await,
            &caller,
        )
    }

    async fn complete_change_request(
        &self,
        request: Request<pb::CompleteChangeRequestRequest>,
    ) -> Answer<pb::ChangeRequest> {
        let (caller, req) = called(request)?;
        let Completion {
            id,
            success,
            result_data,
            error,
        } = Completion::try_from(req)?;
        let complete =
            move |r: &mut ChangeRequest, actor: &Actor, wiring: &ApplyWiring, _: &Windows, now| {
                r.complete(
                    actor,
                    wiring,
                    success,
                    result_data.clone(),
                    error.clone(),
                    now,
                )
            };
        answer_seen(
            self.wired_command(&caller, &id, None, complete).await,
            &caller,
        )
    }

    /// Never reached: `transport::watch_route` serves this path, sending the frames as they
    /// are (its opening comment says why tonic's path lost). The generated trait asks for the
    /// method, in plain messages.
    async fn watch_change_requests(
        &self,
        request: Request<pb::WatchChangeRequestsRequest>,
    ) -> Answer<Self::WatchChangeRequestsStream> {
        let stream = self.open_watch(request).await?.into_inner();
        Ok(Response::new(Box::pin(
            stream.map(|frame| frame.map(watch::WatchFrame::into_message)),
        )))
    }

    async fn list_change_request_events(
        &self,
        request: Request<pb::ListChangeRequestEventsRequest>,
    ) -> Answer<pb::ListChangeRequestEventsResponse> {
        let (caller, req) = called(request)?;
        answer(self.events(&caller, &req).await)
    }
}
