//! Conversions between the protobuf messages and the domain types.

pub mod policy;

use approvals_domain::{
    Actor, Change, ChangeInput, ChangeRequest, Comment, Decision, Event, EventKind, IdentityProof,
    Principal, Review, State, Timestamp, ValidationStatus,
    validation::{self, Violations},
};
use prost::Message as _;
use prost_types::{Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

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
    }
}

/// A Struct from a trusted peer (an applier's result) as JSON; non-finite numbers become null.
/// Not limited: the applier is configured by the policy's administrators.
pub fn struct_to_json(s: &Struct) -> Map<String, Json> {
    json_object(s)
}

/// JSON object -> `google.protobuf.Struct`.
pub fn to_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// A caller's `google.protobuf.Struct` (a change's payload, `result_data`, a policy's
/// `intent_schema`) -> JSON object. Checked before anything is copied, so the work is bounded
/// by the limit, not by what a caller sends: at most [`validation::MAX_PAYLOAD_BYTES`] encoded
/// (protobuf), keys of at most [`validation::MAX_PAYLOAD_KEY_CHARS`] characters, finite numbers.
/// A refused Struct adds one violation, naming `field` or the path inside it, and converts to an
/// empty object. Nesting is bounded by prost's decoding limit (100 nested messages, so fewer
/// than 50 JSON levels), below serde_json's reading limit of 128 for the stored document.
pub fn from_struct(field: &str, s: &Struct, v: &mut Violations) -> Map<String, Json> {
    let size = s.encoded_len();
    if size > validation::MAX_PAYLOAD_BYTES {
        v.add(
            field,
            format!(
                "is {size} bytes encoded as a google.protobuf.Struct; the limit is {} bytes",
                validation::MAX_PAYLOAD_BYTES
            ),
        );
        return Map::new();
    }
    let mut path = Vec::new();
    if let Err(problem) = check_struct(s, &mut path) {
        v.add(render_path(field, &path), problem);
        return Map::new();
    }
    json_object(s)
}

/// One step into a Struct: a key of an object, or an index into a list.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Finds the first thing wrong in `s`, leaving `path` at the object or value it concerns. Paths
/// are only rendered for a violation, never for every value.
fn check_struct<'a>(s: &'a Struct, path: &mut Vec<Step<'a>>) -> Result<(), String> {
    for (key, value) in &s.fields {
        // Bytes bound characters: counting them only for long keys.
        if key.len() > validation::MAX_PAYLOAD_KEY_CHARS {
            let chars = key.chars().count();
            if chars > validation::MAX_PAYLOAD_KEY_CHARS {
                return Err(format!(
                    "has a key of {chars} characters; keys may have at most {}",
                    validation::MAX_PAYLOAD_KEY_CHARS
                ));
            }
        }
        path.push(Step::Key(key));
        check_value(value, path)?;
        path.pop();
    }
    Ok(())
}

fn check_value<'a>(value: &'a Value, path: &mut Vec<Step<'a>>) -> Result<(), String> {
    match &value.kind {
        Some(Kind::NumberValue(n)) if !n.is_finite() => Err("numbers must be finite".to_owned()),
        Some(Kind::StructValue(inner)) => check_struct(inner, path),
        Some(Kind::ListValue(list)) => {
            for (i, item) in list.values.iter().enumerate() {
                path.push(Step::Index(i));
                check_value(item, path)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Longest path a violation names; a longer one is cut (keys are short, but nesting is deep).
const MAX_PATH_BYTES: usize = 1024;

fn render_path(field: &str, path: &[Step<'_>]) -> String {
    use std::fmt::Write as _;
    let mut out = field.to_owned();
    for step in path {
        let _ = match step {
            Step::Key(key) => write!(out, ".{key}"),
            Step::Index(i) => write!(out, "[{i}]"),
        };
        if out.len() > MAX_PATH_BYTES {
            let mut cut = MAX_PATH_BYTES;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("...");
            break;
        }
    }
    out
}

/// The conversion itself, after the checks; a non-finite number (only from a trusted peer)
/// becomes null.
fn json_object(s: &Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, value)| (k.clone(), json_value(value)))
        .collect()
}

fn json_value(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(json_value).collect()),
        Some(Kind::StructValue(inner)) => Json::Object(json_object(inner)),
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
    }
}

fn principal_or_empty(principal: Option<&Principal>) -> String {
    principal.map(ToString::to_string).unwrap_or_default()
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
        validate_time: r.validate_time.map(timestamp),
        schedule: r.schedule.as_ref().map(schedule),
        bypassed_by: r
            .bypassed_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        bypass_justification: r.bypass_justification.clone().unwrap_or_default(),
        apply_attempts: r
            .apply_run
            .as_ref()
            .map_or(0, |run| i32::try_from(run.attempts).unwrap_or(i32::MAX)),
        created_by_acting_principal: principal_or_empty(r.created_by_acting_principal.as_ref()),
        created_by_identity_proof: identity_proof(r.created_by_proof).into(),
        ..Default::default()
    };
    if let Some(viewer) = viewer {
        let flags = r.viewer_flags(viewer);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json() {
        let json: Map<String, Json> =
            serde_json::from_str(r#"{"a": 1.5, "b": [true, null, "x"], "c": {"d": {}}}"#)
                .expect("json");
        let mut v = Violations::default();
        assert_eq!(from_struct("payload", &to_struct(&json), &mut v), json);
        assert!(v.is_empty());
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let mut v = Violations::default();
        from_struct("changes[0].payload", &s, &mut v);
        let err = v.into_result().expect_err("nan refused");
        assert!(err.to_string().contains("changes[0].payload.x"), "{err}");
    }

    fn list_of(values: Vec<Value>) -> Value {
        Value {
            kind: Some(Kind::ListValue(prost_types::ListValue { values })),
        }
    }

    #[test]
    fn only_the_first_violation_is_named_and_paths_stay_short() {
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        // Many bad numbers: one violation, the first.
        let mut s = Struct::default();
        s.fields.insert("a".into(), list_of(vec![nan; 1000]));
        let mut v = Violations::default();
        assert!(from_struct("payload", &s, &mut v).is_empty());
        let err = v.into_result().expect_err("refused").to_string();
        assert!(
            err.contains("payload.a[0]: numbers must be finite"),
            "{err}"
        );
        assert!(!err.contains("a[1]"), "{err}");

        // A deep path of long keys is cut.
        let key = "k".repeat(validation::MAX_PAYLOAD_KEY_CHARS);
        let mut inner = Struct::default();
        inner.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::INFINITY)),
            },
        );
        for _ in 0..20 {
            let mut outer = Struct::default();
            outer.fields.insert(
                key.clone(),
                Value {
                    kind: Some(Kind::StructValue(inner)),
                },
            );
            inner = outer;
        }
        let mut v = Violations::default();
        from_struct("payload", &inner, &mut v);
        let Err(approvals_domain::DomainError::InvalidArgument(list)) = v.into_result() else {
            panic!("refused");
        };
        assert!(
            list[0].field.len() <= MAX_PATH_BYTES + 3,
            "{}",
            list[0].field.len()
        );
        assert!(list[0].field.ends_with("..."));
    }

    #[test]
    fn keys_are_counted_in_characters() {
        let mut v = Violations::default();
        let mut s = Struct::default();
        // 256 two-byte characters: 512 bytes, within the limit.
        s.fields.insert(
            "é".repeat(validation::MAX_PAYLOAD_KEY_CHARS),
            list_of(vec![]),
        );
        assert_eq!(from_struct("payload", &s, &mut v).len(), 1);
        assert!(v.is_empty());
        s.fields.insert(
            "é".repeat(validation::MAX_PAYLOAD_KEY_CHARS + 1),
            list_of(vec![]),
        );
        from_struct("payload", &s, &mut v);
        let err = v.into_result().expect_err("too long").to_string();
        assert!(
            err.contains("payload: has a key of 257 characters"),
            "{err}"
        );
    }

    #[test]
    fn every_state_converts_both_ways() {
        for s in State::ALL {
            assert_eq!(from_state("states", state(s) as i32).ok(), Some(s));
        }
        assert!(from_state("states", 0).is_err());
        assert!(from_state("states", 99).is_err());
    }
}
