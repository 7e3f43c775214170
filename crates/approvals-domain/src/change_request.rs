use serde::{Deserialize, Serialize};

use crate::{
    Action, Actor, ApplyRun, AuthMethod, Decision, DomainError, EventDraft, EventKind,
    IdentityProof, PolicySnapshot, Principal, ReciprocalApproval, Schedule, State, Timestamp,
    condition::{ChangeFacts, RequestFacts},
    principal::party,
    rules::Risk,
    validation::{self, Violations},
};

/// A proposed change to one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    /// The opaque body to apply: a JSON object.
    pub payload: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<String>,
    pub created_by: Principal,
    pub create_time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// A change as a caller writes it. `id` is set only in an update, to replace an existing change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeInput {
    pub id: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub payload: serde_json::Map<String, serde_json::Value>,
    pub base_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub reviewer: Principal,
    pub decision: Decision,
    #[serde(default)]
    pub comment: String,
    pub create_time: Timestamp,
    #[serde(default)]
    pub dismissed: bool,
    #[serde(default)]
    pub reviewer_groups: Vec<String>,
    /// The service that called on the reviewer's behalf, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acting_principal: Option<Principal>,
    /// How the reviewer's identity was established.
    #[serde(default)]
    pub proof: IdentityProof,
    /// How the credential that made the review was presented (unspecified in reviews written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "AuthMethod::is_unspecified")]
    pub auth_method: AuthMethod,
    /// The level (1-based) the review was made at, under a policy with levels; 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Review {
    /// Who answers for this review (see [`Actor::party`]).
    pub fn party(&self) -> &Principal {
        party(&self.reviewer, self.acting_principal.as_ref(), self.proof)
    }

    pub(crate) fn is_live_approval(&self) -> bool {
        !self.dismissed && self.decision == Decision::Approve
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    pub id: String,
    pub author: Principal,
    pub text: String,
    pub create_time: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ValidationStatus {
    Valid,
    Invalid,
    Skipped,
}

/// A change request: the aggregate every command acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRequest {
    pub id: String,
    pub project: String,
    pub environment: String,
    pub action_key: String,
    pub action_version: i32,
    pub title: String,
    pub description: String,
    /// Why the change is needed (its policy may require one, or a ticket in it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub justification: String,
    pub changes: Vec<Change>,
    pub intent_display: String,
    pub state: State,
    pub created_by: Principal,
    /// The service that created the request on the requester's behalf, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by_acting_principal: Option<Principal>,
    /// How the requester's identity was established.
    #[serde(default)]
    pub created_by_proof: IdentityProof,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<Principal>,
    #[serde(default)]
    pub reviews: Vec<Review>,
    #[serde(default)]
    pub comments: Vec<Comment>,
    /// The rules frozen at creation (from the matching policy, or the server default). Stored
    /// as `rules` before policies existed.
    #[serde(alias = "rules")]
    pub policy: PolicySnapshot,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_data: Option<serde_json::Map<String, serde_json::Value>>,
    pub validation_status: ValidationStatus,
    #[serde(default)]
    pub validation_errors: Vec<String>,
    /// When the payloads were last checked against the policy's intent schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate_time: Option<Timestamp>,
    /// Revision of the latest event; set by the store, 0 before the first write.
    #[serde(default)]
    pub revision: i64,
    /// The planned apply (set at creation with `apply_time`, or by a schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypassed_by: Option<Principal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass_justification: Option<String>,
    /// The closed change calendar a break-glass apply overrode, if one was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypassed_calendar: Option<String>,
    /// The current (or last) apply run: its idempotency key, attempts and lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_run: Option<ApplyRun>,
    /// The highest risk label of the policy's `risk_rules` that matched (see [`crate::rules`]).
    #[serde(default, skip_serializing_if = "Risk::is_unspecified")]
    pub risk: Risk,
    /// When the request last entered review (escalations count from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_start_time: Option<Timestamp>,
    /// The requirements escalated so far (paths such as `requirements[0]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalated: Vec<String>,
    /// The policy's own work (pre-approval, automatic reviews) is still to run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub policy_work_pending: bool,
    /// The signed attestation of the approval (issued on quorum or break-glass by a server
    /// with a signing key); dropped when the request goes back to review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<crate::attestation::Envelope>,
    /// What the shadow policies matching the request would have asked (set at creation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_verdicts: Vec<crate::ShadowVerdict>,
}

/// What a caller asks for in `CreateChangeRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChangeRequest {
    pub project: String,
    pub environment: String,
    pub action_key: String,
    pub action_version: i32,
    pub title: String,
    pub description: String,
    pub changes: Vec<ChangeInput>,
    pub intent_display: String,
    pub expire_time: Option<Timestamp>,
    pub draft: bool,
    /// Planned apply: on quorum the request becomes SCHEDULED instead of APPROVED.
    pub apply_time: Option<Timestamp>,
    /// Why the change is needed; the policy's `justification` rule says whether it is required.
    pub justification: String,
}

/// The fields an update replaces; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeRequestPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub changes: Option<Vec<ChangeInput>>,
    pub intent_display: Option<String>,
    /// `Some(None)` clears the expiry.
    pub expire_time: Option<Option<Timestamp>>,
}

impl ChangeRequestPatch {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// What the caller of an RPC may do with a request, computed for that caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerFlags {
    pub can_approve: bool,
    pub can_cancel: bool,
    pub is_requester: bool,
    pub user_decision: Option<Decision>,
}

fn validate_changes(v: &mut Violations, changes: &[ChangeInput]) {
    if changes.is_empty() {
        v.add("changes", "at least one change is required");
    }
    if changes.len() > validation::MAX_CHANGES {
        v.add(
            "changes",
            format!(
                "at most {} changes per request (got {})",
                validation::MAX_CHANGES,
                changes.len()
            ),
        );
    }
    for (i, change) in changes.iter().enumerate() {
        v.required_name(&format!("changes[{i}].action"), &change.action);
        v.required_name(
            &format!("changes[{i}].resource_type"),
            &change.resource_type,
        );
        v.required_name(&format!("changes[{i}].resource_id"), &change.resource_id);
        if let Some(base) = &change.base_version {
            v.optional_name(&format!("changes[{i}].base_version"), base);
        }
        let size = serde_json::to_vec(&change.payload)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if size > validation::MAX_PAYLOAD_BYTES {
            v.add(
                format!("changes[{i}].payload"),
                format!(
                    "is {size} bytes encoded; the limit is {} bytes",
                    validation::MAX_PAYLOAD_BYTES
                ),
            );
        } else {
            v.json_strings(&format!("changes[{i}].payload"), &change.payload);
        }
    }
}

fn validate_expire_time(v: &mut Violations, expire_time: Option<Timestamp>, now: Timestamp) {
    if let Some(expire) = expire_time
        && expire <= now
    {
        v.add("expire_time", "must be in the future");
    }
}

impl NewChangeRequest {
    /// What conditions see of this request, created by `requester` holding `groups`.
    pub fn facts<'a>(&'a self, requester: &'a Principal, groups: &'a [String]) -> RequestFacts<'a> {
        RequestFacts {
            project: &self.project,
            environment: &self.environment,
            action_key: &self.action_key,
            requester,
            requester_groups: groups,
            changes: self
                .changes
                .iter()
                .map(|c| ChangeFacts {
                    action: &c.action,
                    resource_type: &c.resource_type,
                    resource_id: &c.resource_id,
                    payload: &c.payload,
                })
                .collect(),
        }
    }

    pub fn validate(&self, now: Timestamp) -> Result<(), DomainError> {
        let mut v = Violations::default();
        v.required_name("project", &self.project);
        v.optional_name("environment", &self.environment);
        v.required_name("action_key", &self.action_key);
        if self.action_version < 0 {
            v.add("action_version", "must not be negative");
        }
        v.title("title", &self.title);
        v.text("description", &self.description, validation::MAX_TEXT_BYTES);
        v.text(
            "justification",
            &self.justification,
            validation::MAX_TEXT_BYTES,
        );
        v.text(
            "intent_display",
            &self.intent_display,
            validation::MAX_TEXT_BYTES,
        );
        validate_changes(&mut v, &self.changes);
        for (i, change) in self.changes.iter().enumerate() {
            if change.id.is_some() {
                v.add(
                    format!("changes[{i}].id"),
                    "is assigned by the server; leave it empty",
                );
            }
        }
        validate_expire_time(&mut v, self.expire_time, now);
        v.into_result()
    }
}

impl ChangeRequest {
    /// Creates a request from validated input. `change_ids` gives one fresh id per change.
    pub fn create(
        id: String,
        new: NewChangeRequest,
        actor: &Actor,
        policy: PolicySnapshot,
        now: Timestamp,
        change_ids: &mut dyn FnMut() -> String,
    ) -> Result<(Self, EventDraft), DomainError> {
        new.validate(now)?;
        if let Some(refusal) = policy
            .rules
            .justification
            .refusal(&policy.name, &new.justification)
        {
            return Err(DomainError::invalid("justification", refusal));
        }
        let validated = policy.validate_intent("", &new.changes)?;
        let expire_time = policy.expire_time(new.expire_time, now);
        if let Some(apply_time) = new.apply_time {
            if apply_time <= now {
                return Err(DomainError::invalid("apply_time", "must be in the future"));
            }
            if expire_time.is_some_and(|expire| apply_time > expire) {
                return Err(DomainError::invalid(
                    "apply_time",
                    "must not be after the change request's expire_time",
                ));
            }
            if policy.rules.apply_mode == crate::policy::ApplyMode::External {
                return Err(DomainError::CannotApply(
                    "EXTERNAL change requests cannot be scheduled: their executor applies them"
                        .into(),
                ));
            }
        }
        let mut policy = policy;
        policy.evaluate_conditions(&new.facts(&actor.principal, &actor.groups));
        let state = if new.draft {
            State::Draft
        } else {
            State::InReview
        };
        let changes = new
            .changes
            .into_iter()
            .map(|input| Change {
                id: change_ids(),
                action: input.action,
                resource_type: input.resource_type,
                resource_id: input.resource_id,
                payload: input.payload,
                base_version: input.base_version.filter(|b| !b.is_empty()),
                created_by: actor.principal.clone(),
                create_time: now,
                conflict: None,
            })
            .collect();
        let request = Self {
            id,
            project: new.project,
            environment: new.environment,
            action_key: new.action_key,
            action_version: new.action_version,
            title: new.title,
            description: new.description,
            justification: new.justification,
            changes,
            intent_display: new.intent_display,
            state,
            created_by: actor.principal.clone(),
            created_by_acting_principal: actor.acting_principal.clone(),
            created_by_proof: actor.proof,
            applied_by: None,
            reviews: Vec::new(),
            comments: Vec::new(),
            expire_time,
            policy,
            create_time: now,
            update_time: now,
            apply_time: None,
            apply_error: None,
            result_data: None,
            validation_status: match validated {
                Some(()) => ValidationStatus::Valid,
                None => ValidationStatus::Skipped,
            },
            validation_errors: Vec::new(),
            validate_time: validated.map(|()| now),
            revision: 0,
            schedule: new
                .apply_time
                .map(|apply_time| Schedule::pending(apply_time, actor.principal.clone())),
            bypassed_by: None,
            bypass_justification: None,
            bypassed_calendar: None,
            attestation: None,
            apply_run: None,
            risk: Risk::Unspecified,
            review_start_time: None,
            escalated: Vec::new(),
            policy_work_pending: false,
            shadow_verdicts: Vec::new(),
        };
        let mut request = request;
        request.risk = request.policy.risk();
        if state == State::InReview {
            request.enter_review(now);
        }
        request.ensure_document_fits()?;
        let event = request.event(EventKind::Created, actor, state, now, String::new());
        Ok((request, event))
    }

    /// Refuses a document over [`validation::MAX_DOCUMENT_BYTES`] of JSON (as stored). Checked
    /// after the commands a caller grows a request with (create, update, review, comment); the
    /// service's own transitions add little and are never refused for it.
    pub fn ensure_document_fits(&self) -> Result<(), DomainError> {
        validation::check_document_size(validation::json_len(self))
    }

    /// The opaque etag of the current version (AIP-154).
    pub fn etag(&self) -> String {
        format!("r{}", self.revision)
    }

    /// Refuses the command when the caller sent an etag that is not the current one.
    pub fn check_etag(&self, given: Option<&str>) -> Result<(), DomainError> {
        crate::validation::check_etag(self.etag(), given)
    }

    /// What conditions see of this request; `groups`: the requester's.
    pub fn facts<'a>(&'a self, groups: &'a [String]) -> RequestFacts<'a> {
        RequestFacts {
            project: &self.project,
            environment: &self.environment,
            action_key: &self.action_key,
            requester: &self.created_by,
            requester_groups: groups,
            changes: self
                .changes
                .iter()
                .map(|c| ChangeFacts {
                    action: &c.action,
                    resource_type: &c.resource_type,
                    resource_id: &c.resource_id,
                    payload: &c.payload,
                })
                .collect(),
        }
    }

    pub fn is_requester(&self, principal: &Principal) -> bool {
        &self.created_by == principal
    }

    /// Approvals that count now: distinct reviewers' approvals that are not dismissed (see
    /// [`Self::counted_approvals`]).
    pub fn approval_count(&self) -> u32 {
        u32::try_from(self.counted_approvals().len()).unwrap_or(u32::MAX)
    }

    /// Who answers for the request (see [`Actor::party`]).
    pub fn requester_party(&self) -> &Principal {
        party(
            &self.created_by,
            self.created_by_acting_principal.as_ref(),
            self.created_by_proof,
        )
    }

    /// The approvals that count toward quorum: live (not dismissed) approvals; under a policy
    /// with `independent_approvals`, at most one per party, and none from the requester's party
    /// by anyone but the requester (whose own approval the self-approval rule governs). Review
    /// refuses such approvals as they are made; counting holds to the same rule.
    pub fn counted_approvals(&self) -> Vec<&Review> {
        let live = self.reviews.iter().filter(|r| r.is_live_approval());
        if !self.policy.rules.independent_approvals {
            return live.collect();
        }
        let requester = self.requester_party();
        let mut counted: Vec<&Review> = Vec::new();
        for review in live {
            let party = review.party();
            let same_as_requester = party == requester && review.reviewer != self.created_by;
            if !same_as_requester && !counted.iter().any(|c| c.party() == party) {
                counted.push(review);
            }
        }
        counted
    }

    /// Why an approval by `actor` would not be independent, if it would not (a policy with
    /// `independent_approvals`): its party is the requester's, or stands behind another live
    /// approval already. The requester's own approval is the self-approval rule's.
    fn independence_refusal(&self, actor: &Actor) -> Option<DomainError> {
        if !self.policy.rules.independent_approvals || actor.principal == self.created_by {
            return None;
        }
        let party = actor.party();
        let other = if party == self.requester_party() {
            Some(format!("the change request of {}", self.created_by))
        } else {
            self.reviews
                .iter()
                .find(|r| {
                    r.is_live_approval() && r.reviewer != actor.principal && r.party() == party
                })
                .map(|r| format!("the approval of {}", r.reviewer))
        };
        other.map(|other| DomainError::NotIndependent {
            party: party.to_string(),
            principal: actor.principal.to_string(),
            other,
        })
    }

    /// The caller's current decision (not dismissed).
    pub fn decision_of(&self, principal: &Principal) -> Option<Decision> {
        self.reviews
            .iter()
            .rev()
            .find(|r| !r.dismissed && &r.reviewer == principal)
            .map(|r| r.decision)
    }

    pub fn viewer_flags(&self, actor: &Actor) -> ViewerFlags {
        let is_requester = self.is_requester(&actor.principal);
        ViewerFlags {
            can_approve: self
                .approve_refusal(actor, None, self.update_time)
                .is_none(),
            can_cancel: is_requester && Action::Cancel.is_allowed_in(self.state),
            is_requester,
            user_decision: self.decision_of(&actor.principal),
        }
    }

    pub(crate) fn ensure_allowed(&self, action: Action) -> Result<(), DomainError> {
        if action.is_allowed_in(self.state) {
            Ok(())
        } else {
            Err(DomainError::InvalidTransition {
                state: self.state,
                action,
            })
        }
    }

    pub(crate) fn ensure_requester(
        &self,
        actor: &Actor,
        action: Action,
    ) -> Result<(), DomainError> {
        if self.is_requester(&actor.principal) {
            Ok(())
        } else {
            Err(DomainError::NotRequester {
                requester: self.created_by.to_string(),
                action,
            })
        }
    }

    pub(crate) fn event(
        &self,
        kind: EventKind,
        actor: &Actor,
        from_state: State,
        time: Timestamp,
        detail: String,
    ) -> EventDraft {
        EventDraft {
            kind,
            actor: actor.principal.clone(),
            acting_principal: actor.acting_principal.clone(),
            auth_method: actor.auth_method,
            from_state,
            to_state: self.state,
            time,
            detail,
        }
    }

    pub(crate) fn moved(
        &mut self,
        kind: EventKind,
        actor: &Actor,
        to: State,
        now: Timestamp,
        detail: String,
    ) -> EventDraft {
        let from = self.state;
        self.state = to;
        self.update_time = now;
        if to == State::InReview {
            // What was attested is not what will be approved next.
            self.attestation = None;
        }
        self.event(kind, actor, from, now, detail)
    }

    /// DRAFT -> IN_REVIEW, by the requester.
    pub fn submit(&mut self, actor: &Actor, now: Timestamp) -> Result<EventDraft, DomainError> {
        self.ensure_allowed(Action::Submit)?;
        self.ensure_requester(actor, Action::Submit)?;
        self.enter_review(now);
        Ok(self.moved(
            EventKind::Submitted,
            actor,
            State::InReview,
            now,
            String::new(),
        ))
    }

    /// The level waiting for approvals (1-based; `None` once every level passed).
    pub fn current_level(&self) -> Option<u32> {
        self.level_progress()
            .iter()
            .find(|p| !p.passed)
            .map(|p| p.level)
    }

    /// Each level's progress (one level without `levels`).
    pub fn level_progress(&self) -> Vec<crate::LevelProgress> {
        self.policy
            .level_progress_escalated(&self.counted_approvals(), &self.escalated)
    }

    /// Why `actor` may not approve now, if they may not: the state, the approvers (of the
    /// policy and of the current level), self-approval, independence, an approval of theirs at
    /// an earlier level, and anti-collusion (`reciprocal`: the requester's latest approval of
    /// a request of `actor`, as the store found it). Expiry is checked by the review itself.
    pub fn approve_refusal(
        &self,
        actor: &Actor,
        reciprocal: Option<&ReciprocalApproval>,
        now: Timestamp,
    ) -> Option<DomainError> {
        if let Err(err) = self.ensure_allowed(Action::Approve) {
            return Some(err);
        }
        if let Some(refusal) = self.reviewer_refusal(actor) {
            return Some(refusal);
        }
        if self.is_requester(&actor.principal) && !self.policy.rules.allow_self_approval {
            return Some(DomainError::SelfApproval);
        }
        if let Some(refusal) = self.independence_refusal(actor) {
            return Some(refusal);
        }
        let level = self.review_level();
        if level > 1
            && let Some(earlier) = self
                .reviews
                .iter()
                .find(|r| r.is_live_approval() && r.reviewer == actor.principal && r.level < level)
        {
            return Some(DomainError::ApprovedAtEarlierLevel {
                principal: actor.principal.to_string(),
                level: earlier.level,
            });
        }
        self.collusion_refusal(actor, reciprocal, now)
    }

    /// The level a review made now is made at: the current one (0 without levels).
    fn review_level(&self) -> u32 {
        if !self.policy.has_levels() {
            return 0;
        }
        let last = u32::try_from(self.policy.rules.levels.len()).unwrap_or(u32::MAX);
        self.current_level().unwrap_or(last)
    }

    /// Why `actor` may not review at the current level, if they may not.
    fn reviewer_refusal(&self, actor: &Actor) -> Option<DomainError> {
        let level = self.review_level();
        // Escalation adds reviewers: members of a group an escalated requirement (of the
        // current level) was escalated to may review, whoever the approvers are.
        let escalated = self.escalated_reviewer(actor, level);
        if !escalated && !self.policy.may_review(actor) {
            return Some(DomainError::NotApprover {
                principal: actor.principal.to_string(),
            });
        }
        if level > 0 && !escalated && !self.policy.may_review_at(actor, level) {
            return Some(DomainError::NotLevelApprover {
                principal: actor.principal.to_string(),
                level,
            });
        }
        None
    }

    /// Anti-collusion: the requester approved a request of `actor` within the policy's window.
    fn collusion_refusal(
        &self,
        actor: &Actor,
        reciprocal: Option<&ReciprocalApproval>,
        now: Timestamp,
    ) -> Option<DomainError> {
        let window = self.policy.rules.anti_collusion?;
        let reciprocal = reciprocal?;
        if actor.principal == self.created_by {
            return None;
        }
        let since = now.saturating_add_micros(window.window_micros.saturating_neg());
        (reciprocal.approve_time >= since).then(|| DomainError::ReciprocalApproval {
            principal: actor.principal.to_string(),
            requester: self.created_by.to_string(),
            change_request_id: reciprocal.change_request_id.clone(),
        })
    }

    /// Records a review, by one of the policy's approvers (see [`Self::review_with`]), with no
    /// knowledge of other requests (anti-collusion is not checked).
    pub fn review(
        &mut self,
        actor: &Actor,
        decision: Decision,
        comment: String,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        self.review_with(actor, decision, comment, now, None)
    }

    /// Records a review, by one of the policy's approvers (of the current level, under a policy
    /// with levels). A reviewer's later decision replaces their earlier one at the same level.
    /// Reaching the policy's quorum (every level passed, see
    /// [`PolicySnapshot::level_progress`]) approves; `rejections_to_reject` rejections, at any
    /// level, reject. `reciprocal`: the requester's latest approval of a request of `actor`,
    /// for anti-collusion.
    pub fn review_with(
        &mut self,
        actor: &Actor,
        decision: Decision,
        comment: String,
        now: Timestamp,
        reciprocal: Option<&ReciprocalApproval>,
    ) -> Result<EventDraft, DomainError> {
        let action = match decision {
            Decision::Approve => Action::Approve,
            Decision::Reject => Action::Reject,
        };
        let mut v = Violations::default();
        v.text("comment", &comment, validation::MAX_TEXT_BYTES);
        let rule = &self.policy.rules.justification;
        let comment_required = match decision {
            Decision::Approve => rule.comment_on_approve,
            Decision::Reject => rule.comment_on_reject,
        };
        if comment_required && comment.trim().is_empty() {
            v.add(
                "comment",
                format!(
                    "is required to {} under policy {:?}",
                    action.as_str(),
                    self.policy.name
                ),
            );
        }
        v.into_result()?;
        self.ensure_allowed(action)?;
        self.ensure_not_expired(now)?;
        if decision == Decision::Approve {
            if let Some(refusal) = self.approve_refusal(actor, reciprocal, now) {
                return Err(refusal);
            }
        } else if let Some(refusal) = self.reviewer_refusal(actor) {
            return Err(refusal);
        }
        let level = self.review_level();
        let mut reviews: Vec<Review> = self
            .reviews
            .iter()
            .filter(|r| r.dismissed || r.reviewer != actor.principal || r.level != level)
            .cloned()
            .collect();
        reviews.push(Review {
            reviewer: actor.principal.clone(),
            decision,
            comment: comment.clone(),
            create_time: now,
            dismissed: false,
            reviewer_groups: actor.groups.clone(),
            acting_principal: actor.acting_principal.clone(),
            proof: actor.proof,
            auth_method: actor.auth_method,
            level,
        });
        if reviews.len() > validation::MAX_REVIEWS {
            return Err(DomainError::TooManyReviews {
                limit: validation::MAX_REVIEWS,
            });
        }
        let previous = std::mem::replace(&mut self.reviews, reviews);
        if let Err(err) = self.ensure_document_fits() {
            self.reviews = previous;
            return Err(err);
        }
        // A request created with an apply_time is scheduled rather than approved.
        let to = self.state_after_review();
        let detail = if level > 0 {
            format!("level {level}: {comment}")
        } else {
            comment
        };
        Ok(self.moved(EventKind::Reviewed, actor, to, now, detail))
    }

    /// Withdraws the request, by the requester.
    pub fn cancel(
        &mut self,
        actor: &Actor,
        reason: String,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        let mut v = Violations::default();
        v.text("reason", &reason, validation::MAX_TEXT_BYTES);
        v.into_result()?;
        self.ensure_allowed(Action::Cancel)?;
        self.ensure_requester(actor, Action::Cancel)?;
        Ok(self.moved(EventKind::Cancelled, actor, State::Cancelled, now, reason))
    }

    /// Adds a comment; allowed in every state, up to [`validation::MAX_COMMENTS`] and
    /// [`validation::MAX_DOCUMENT_BYTES`]. Comments are append-only: the store keeps them once,
    /// in the request, and each event's snapshot records how many there were.
    pub fn add_comment(
        &mut self,
        actor: &Actor,
        comment_id: String,
        text: String,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        let mut v = Violations::default();
        if text.trim().is_empty() {
            v.add("text", "is required");
        }
        v.text("text", &text, validation::MAX_TEXT_BYTES);
        v.into_result()?;
        self.ensure_allowed(Action::Comment)?;
        if self.comments.len() >= validation::MAX_COMMENTS {
            return Err(DomainError::TooManyComments {
                limit: validation::MAX_COMMENTS,
            });
        }
        self.comments.push(Comment {
            id: comment_id,
            author: actor.principal.clone(),
            text: text.clone(),
            create_time: now,
        });
        if let Err(err) = self.ensure_document_fits() {
            self.comments.pop();
            return Err(err);
        }
        let state = self.state;
        Ok(self.moved(EventKind::Commented, actor, state, now, text))
    }

    /// Edits a DRAFT or IN_REVIEW request, by the requester. When the request is in review and
    /// its rules dismiss stale approvals, every earlier review stops counting.
    pub fn update(
        &mut self,
        actor: &Actor,
        patch: ChangeRequestPatch,
        now: Timestamp,
        change_ids: &mut dyn FnMut() -> String,
    ) -> Result<EventDraft, DomainError> {
        self.update_with_versions(actor, patch, now, change_ids, &|_, _| None)
    }

    /// Like [`Self::update`], knowing each resource's latest applied version: a change whose
    /// base_version is older gets (or keeps) a conflict, one that matches loses it. A request
    /// with a conflict (IN_REVIEW, APPROVED, SCHEDULED or APPLY_FAILED) may be edited to
    /// resolve it: it returns to IN_REVIEW, its reviews are dismissed and its schedule dropped.
    /// An edit that would make the document too large is refused after it was applied to
    /// `self`, which the caller then discards (the store writes nothing on an error).
    pub fn update_with_versions(
        &mut self,
        actor: &Actor,
        patch: ChangeRequestPatch,
        now: Timestamp,
        change_ids: &mut dyn FnMut() -> String,
        latest_version: &dyn Fn(&str, &str) -> Option<String>,
    ) -> Result<EventDraft, DomainError> {
        let mut v = Violations::default();
        if patch.is_empty() {
            v.add("update_mask", "names no field to update");
        }
        if let Some(title) = &patch.title {
            v.title("change_request.title", title);
        }
        if let Some(description) = &patch.description {
            v.text(
                "change_request.description",
                description,
                validation::MAX_TEXT_BYTES,
            );
        }
        if let Some(intent) = &patch.intent_display {
            v.text(
                "change_request.intent_display",
                intent,
                validation::MAX_TEXT_BYTES,
            );
        }
        if let Some(expire) = patch.expire_time {
            let mut inner = Violations::default();
            validate_expire_time(&mut inner, expire, now);
            if !inner.is_empty() {
                v.add("change_request.expire_time", "must be in the future");
            }
        }
        if let Some(changes) = &patch.changes {
            let mut inner = Violations::default();
            validate_changes(&mut inner, changes);
            if let Err(DomainError::InvalidArgument(list)) = inner.into_result() {
                for violation in list {
                    v.add(
                        format!("change_request.{}", violation.field),
                        violation.description,
                    );
                }
            }
            for (i, change) in changes.iter().enumerate() {
                if let Some(id) = &change.id
                    && !self.changes.iter().any(|c| &c.id == id)
                {
                    v.add(
                        format!("change_request.changes[{i}].id"),
                        format!("no change with id {id:?} in this change request"),
                    );
                }
            }
        }
        let mut validated = None;
        if let Some(changes) = &patch.changes {
            match self.policy.validate_intent("change_request.", changes) {
                Ok(outcome) => validated = outcome,
                Err(DomainError::InvalidArgument(list)) => {
                    for violation in list {
                        v.add(violation.field, violation.description);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        v.into_result()?;
        let resolving = self.conflict().is_some()
            && matches!(
                self.state,
                State::Approved | State::Scheduled | State::ApplyFailed
            );
        if !resolving {
            self.ensure_allowed(Action::Update)?;
        }
        self.ensure_requester(actor, Action::Update)?;
        if validated.is_some() {
            self.validation_status = ValidationStatus::Valid;
            self.validation_errors.clear();
            self.validate_time = Some(now);
        }

        if let Some(title) = patch.title {
            self.title = title;
        }
        if let Some(description) = patch.description {
            self.description = description;
        }
        if let Some(intent) = patch.intent_display {
            self.intent_display = intent;
        }
        if let Some(expire) = patch.expire_time {
            self.expire_time = self.policy.expire_time(expire, self.create_time);
        }
        let changes_edited = patch.changes.is_some();
        if let Some(inputs) = patch.changes {
            let mut previous = std::mem::take(&mut self.changes);
            self.changes = inputs
                .into_iter()
                .map(|input| {
                    let kept = input
                        .id
                        .as_ref()
                        .and_then(|id| previous.iter().position(|c| &c.id == id))
                        .map(|at| previous.swap_remove(at));
                    let (id, created_by, create_time) = match kept {
                        Some(old) => (old.id, old.created_by, old.create_time),
                        None => (change_ids(), actor.principal.clone(), now),
                    };
                    Change {
                        id,
                        action: input.action,
                        resource_type: input.resource_type,
                        resource_id: input.resource_id,
                        payload: input.payload,
                        base_version: input.base_version.filter(|b| !b.is_empty()),
                        created_by,
                        create_time,
                        conflict: None,
                    }
                })
                .collect();
        }
        for change in &mut self.changes {
            let Some(latest) = latest_version(&change.resource_type, &change.resource_id) else {
                continue;
            };
            change.conflict = match &change.base_version {
                Some(base) if base != &latest => Some(format!(
                    "{} {} is at version {latest}; this change was written against version {base}",
                    change.resource_type, change.resource_id
                )),
                _ => None,
            };
        }
        if changes_edited {
            // What the conditions require follows what the request now changes.
            let mut policy = self.policy.clone();
            policy.evaluate_conditions(&self.facts(&actor.groups));
            self.policy = policy;
            self.risk = self.policy.risk();
        }
        let to = if resolving {
            // Back to review: what was approved is not what is there now.
            self.schedule = None;
            self.apply_run = None;
            self.apply_error = None;
            State::InReview
        } else {
            self.state
        };
        let mut dismissed = 0;
        if to == State::InReview && (resolving || self.policy.rules.dismiss_stale_approvals) {
            for review in self.reviews.iter_mut().filter(|r| !r.dismissed) {
                review.dismissed = true;
                dismissed += 1;
            }
        }
        if to == State::InReview && (resolving || dismissed > 0) {
            // Reviews start over: so do the policy's own (its escalations stay recorded).
            self.policy_work_pending =
                self.policy.rules.pre_approved || !self.policy.rules.automatic_reviews.is_empty();
        }
        if resolving {
            self.review_start_time = Some(now);
        }
        let detail = if dismissed > 0 {
            format!("{dismissed} earlier review(s) dismissed")
        } else {
            String::new()
        };
        self.ensure_document_fits()?;
        Ok(self.moved(EventKind::Updated, actor, to, now, detail))
    }
}
