//! Conversions between the protobuf messages and the domain types.

pub mod calendar;
mod json;
pub mod policy;

pub use self::json::{from_struct, struct_to_json, to_struct};

use approvals_domain::{
    Actor, AuthMethod, Change, ChangeInput, ChangeRequest, Comment, Decision, Event, EventKind,
    IdentityProof, Principal, Review, Risk, State, Timestamp, ValidationStatus,
    validation::Violations,
};

use crate::{error::ApiError, pb};

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

/// A Timestamp from a caller; outside the well-known type's documented range it is refused.
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<Timestamp, ApiError> {
    Timestamp::from_seconds_nanos(t.seconds, t.nanos)
        .ok_or_else(|| ApiError::invalid(field, approvals_domain::TIMESTAMP_RANGE))
}

pub fn state(s: State) -> pb::State {
    match s {
        State::Draft => pb::State::Draft,
        State::InReview => pb::State::InReview,
        State::Approved => pb::State::Approved,
        State::Scheduled => pb::State::Scheduled,
        State::Applying => pb::State::Applying,
        State::Applied => pb::State::Applied,
        State::ApplyFailed => pb::State::ApplyFailed,
        State::Rejected => pb::State::Rejected,
        State::Cancelled => pb::State::Cancelled,
        State::Expired => pb::State::Expired,
    }
}

/// A state named by a caller (filters); UNSPECIFIED and unknown numbers are refused.
pub fn from_state(field: &str, value: i32) -> Result<State, ApiError> {
    let parsed = pb::State::try_from(value).ok().and_then(|s| {
        State::ALL
            .into_iter()
            .find(|candidate| state(*candidate) == s)
    });
    parsed.ok_or_else(|| {
        ApiError::invalid(
            field,
            format!("{value} is not a state (STATE_DRAFT .. STATE_EXPIRED)"),
        )
    })
}

pub fn risk(r: Risk) -> pb::Risk {
    match r {
        Risk::Unspecified => pb::Risk::Unspecified,
        Risk::Low => pb::Risk::Low,
        Risk::Medium => pb::Risk::Medium,
        Risk::High => pb::Risk::High,
    }
}

/// A risk label from a request (`field` names it); an unknown number is INVALID_ARGUMENT.
pub fn from_risk(field: &str, value: i32) -> Result<Risk, ApiError> {
    pb::Risk::try_from(value)
        .ok()
        .and_then(|p| Risk::ALL.into_iter().find(|r| risk(*r) == p))
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{value} is not a risk (RISK_UNSPECIFIED .. RISK_HIGH)"),
            )
        })
}

fn decision(d: Decision) -> pb::Decision {
    match d {
        Decision::Approve => pb::Decision::Approve,
        Decision::Reject => pb::Decision::Reject,
    }
}

pub fn event_kind(k: EventKind) -> pb::EventKind {
    use pb::EventKind as P;
    match k {
        EventKind::Created => P::Created,
        EventKind::Updated => P::Updated,
        EventKind::Submitted => P::Submitted,
        EventKind::Reviewed => P::Reviewed,
        EventKind::Commented => P::Commented,
        EventKind::Cancelled => P::Cancelled,
        EventKind::ApplyStarted => P::ApplyStarted,
        EventKind::Applied => P::Applied,
        EventKind::ApplyFailed => P::ApplyFailed,
        EventKind::Scheduled => P::Scheduled,
        EventKind::Unscheduled => P::Unscheduled,
        EventKind::ScheduleSuspended => P::ScheduleSuspended,
        EventKind::ScheduleFailed => P::ScheduleFailed,
        EventKind::Expired => P::Expired,
        EventKind::ConflictDetected => P::ConflictDetected,
        EventKind::Bypassed => P::Bypassed,
        EventKind::Completed => P::Completed,
        EventKind::Escalated => P::Escalated,
        EventKind::ScheduleResumed => P::ScheduleResumed,
    }
}

fn validation_status(s: ValidationStatus) -> pb::ValidationStatus {
    match s {
        ValidationStatus::Valid => pb::ValidationStatus::Valid,
        ValidationStatus::Invalid => pb::ValidationStatus::Invalid,
        ValidationStatus::Skipped => pb::ValidationStatus::Skipped,
    }
}

fn schedule(s: &approvals_domain::Schedule) -> pb::Schedule {
    use approvals_domain::ScheduleStatus;
    pb::Schedule {
        apply_time: Some(timestamp(s.apply_time)),
        scheduled_by: s.scheduled_by.to_string(),
        status: match s.status {
            ScheduleStatus::Pending => pb::ScheduleStatus::Pending,
            ScheduleStatus::Failed => pb::ScheduleStatus::Failed,
            ScheduleStatus::Suspended => pb::ScheduleStatus::Suspended,
        }
        .into(),
        reason: s.reason.clone(),
        calendar: s.calendar.clone(),
        next_open_time: s.next_open_time.map(timestamp),
    }
}

/// Reads the caller-writable fields of changes.
pub fn change_inputs(prefix: &str, changes: &[pb::Change], v: &mut Violations) -> Vec<ChangeInput> {
    changes
        .iter()
        .enumerate()
        .map(|(i, c)| ChangeInput {
            id: (!c.id.is_empty()).then(|| c.id.clone()),
            action: c.action.clone(),
            resource_type: c.resource_type.clone(),
            resource_id: c.resource_id.clone(),
            payload: c
                .payload
                .as_ref()
                .map(|p| from_struct(&format!("{prefix}[{i}].payload"), p, v))
                .unwrap_or_default(),
            base_version: (!c.base_version.is_empty()).then(|| c.base_version.clone()),
        })
        .collect()
}

fn change(c: &Change) -> pb::Change {
    pb::Change {
        id: c.id.clone(),
        action: c.action.clone(),
        resource_type: c.resource_type.clone(),
        resource_id: c.resource_id.clone(),
        payload: Some(to_struct(&c.payload)),
        base_version: c.base_version.clone().unwrap_or_default(),
        created_by: c.created_by.to_string(),
        create_time: Some(timestamp(c.create_time)),
        conflict: c.conflict.clone().unwrap_or_default(),
    }
}

fn review(r: &Review) -> pb::Review {
    pb::Review {
        reviewer: r.reviewer.to_string(),
        decision: decision(r.decision).into(),
        comment: r.comment.clone(),
        create_time: Some(timestamp(r.create_time)),
        dismissed: r.dismissed,
        reviewer_groups: r.reviewer_groups.clone(),
        acting_principal: principal_or_empty(r.acting_principal.as_ref()),
        identity_proof: identity_proof(r.proof).into(),
        auth_method: auth_method(r.auth_method).into(),
        level: i32::try_from(r.level).unwrap_or(i32::MAX),
    }
}

fn level_progress(p: &approvals_domain::LevelProgress) -> pb::LevelProgress {
    let n = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    pb::LevelProgress {
        level: n(p.level),
        approval_count: n(p.approval_count),
        min_approvals: n(p.min_approvals),
        passed: p.passed,
    }
}

fn principal_or_empty(principal: Option<&Principal>) -> String {
    principal.map(ToString::to_string).unwrap_or_default()
}

fn auth_method(method: AuthMethod) -> pb::AuthMethod {
    match method {
        AuthMethod::Unspecified => pb::AuthMethod::Unspecified,
        AuthMethod::ApiKey => pb::AuthMethod::ApiKey,
        AuthMethod::Jwt => pb::AuthMethod::Jwt,
        AuthMethod::ClientCertificate => pb::AuthMethod::ClientCertificate,
        AuthMethod::Development => pb::AuthMethod::Development,
    }
}

fn identity_proof(proof: IdentityProof) -> pb::IdentityProof {
    match proof {
        IdentityProof::Unspecified => pb::IdentityProof::Unspecified,
        IdentityProof::Credential => pb::IdentityProof::Credential,
        IdentityProof::UserToken => pb::IdentityProof::UserToken,
        IdentityProof::Asserted => pb::IdentityProof::Asserted,
        IdentityProof::Development => pb::IdentityProof::Development,
    }
}

fn comment(c: &Comment) -> pb::Comment {
    pb::Comment {
        id: c.id.clone(),
        author: c.author.to_string(),
        text: c.text.clone(),
        create_time: Some(timestamp(c.create_time)),
    }
}

/// The request as stored; with a viewer, the fields computed for that caller are filled in.
pub fn change_request(r: &ChangeRequest, viewer: Option<&Actor>) -> pb::ChangeRequest {
    let mut out = pb::ChangeRequest {
        id: r.id.clone(),
        project: r.project.clone(),
        environment: r.environment.clone(),
        action_key: r.action_key.clone(),
        action_version: r.action_version,
        title: r.title.clone(),
        description: r.description.clone(),
        changes: r.changes.iter().map(change).collect(),
        intent_display: r.intent_display.clone(),
        state: state(r.state).into(),
        created_by: r.created_by.to_string(),
        applied_by: r
            .applied_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        reviews: r.reviews.iter().map(review).collect(),
        comments: r.comments.iter().map(comment).collect(),
        min_approvals: i32::try_from(r.policy.rules.min_approvals).unwrap_or(i32::MAX),
        approval_count: i32::try_from(r.approval_count()).unwrap_or(i32::MAX),
        create_time: Some(timestamp(r.create_time)),
        update_time: Some(timestamp(r.update_time)),
        expire_time: r.expire_time.map(timestamp),
        apply_time: r.apply_time.map(timestamp),
        apply_error: r.apply_error.clone().unwrap_or_default(),
        result_data: r.result_data.as_ref().map(to_struct),
        validation_status: validation_status(r.validation_status).into(),
        validation_errors: r.validation_errors.clone(),
        etag: r.etag(),
        revision: r.revision,
        policy_snapshot: Some(policy::snapshot(&r.policy)),
        shadow_verdicts: r
            .shadow_verdicts
            .iter()
            .map(|v| pb::ShadowVerdict {
                policy: v.policy.clone(),
                required_approvals: i32::try_from(v.required_approvals).unwrap_or(i32::MAX),
                required_groups: v.required_groups.clone(),
                would_block: v.would_block,
                would_auto_approve: v.would_auto_approve,
                matched_conditions: v.matched_conditions.clone(),
            })
            .collect(),
        validate_time: r.validate_time.map(timestamp),
        schedule: r.schedule.as_ref().map(schedule),
        bypassed_by: r
            .bypassed_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        bypass_justification: r.bypass_justification.clone().unwrap_or_default(),
        bypassed_calendar: r.bypassed_calendar.clone().unwrap_or_default(),
        apply_attempts: r
            .apply_run
            .as_ref()
            .map_or(0, |run| i32::try_from(run.attempts).unwrap_or(i32::MAX)),
        created_by_acting_principal: principal_or_empty(r.created_by_acting_principal.as_ref()),
        created_by_identity_proof: identity_proof(r.created_by_proof).into(),
        justification: r.justification.clone(),
        risk: risk(r.risk).into(),
        escalated_requirements: r.escalated.clone(),
        attestation: r
            .attestation
            .as_ref()
            .map(crate::audit::attestation::to_proto),
        ..Default::default()
    };
    let progress = r.level_progress();
    if r.policy.has_levels() {
        let current = r.current_level();
        out.current_level = current.map_or(0, |l| i32::try_from(l).unwrap_or(i32::MAX));
        // The quorum shown is the current level's (the last one's once all passed).
        let shown = current
            .and_then(|l| progress.iter().find(|p| p.level == l))
            .or(progress.last());
        if let Some(shown) = shown {
            out.min_approvals = i32::try_from(shown.min_approvals).unwrap_or(i32::MAX);
        }
    }
    out.level_progress = progress.iter().map(level_progress).collect();
    if let Some(viewer) = viewer {
        let flags = r.viewer_flags(viewer);
        if let Some(refusal) = r.approve_refusal(viewer, None, r.update_time) {
            out.can_approve_reason = crate::error::reason_of(refusal);
        }
        out.can_approve = flags.can_approve;
        out.can_cancel = flags.can_cancel;
        out.is_requester = flags.is_requester;
        out.user_decision = flags
            .user_decision
            .map(decision)
            .unwrap_or(pb::Decision::Unspecified)
            .into();
    }
    out
}

pub fn event(e: &Event) -> pb::Event {
    pb::Event {
        revision: e.revision,
        change_request_id: e.change_request_id.clone(),
        project: e.project.clone(),
        environment: e.environment.clone(),
        kind: event_kind(e.kind).into(),
        actor: e.actor.to_string(),
        acting_principal: e
            .acting_principal
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        from_state: state(e.from_state).into(),
        to_state: state(e.to_state).into(),
        event_time: Some(timestamp(e.time)),
        detail: e.detail.clone(),
        change_request: e.change_request.as_ref().map(|r| change_request(r, None)),
        auth_method: auth_method(e.auth_method).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_converts_both_ways() {
        for s in State::ALL {
            assert_eq!(from_state("states", state(s) as i32).ok(), Some(s));
        }
        assert!(from_state("states", 0).is_err());
        assert!(from_state("states", 99).is_err());
    }
}
