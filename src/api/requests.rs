//! Request messages parsed into what the handlers run: ids, filters, idempotency keys, update
//! masks, page positions. Every bad field is an `INVALID_ARGUMENT` naming it; where a message
//! has several fields to check, all of them are named at once.

use approvals_domain::{
    ChangeRequestPatch, NewChangeRequest, Principal, RequestFilter, ScheduleAt, State, Timestamp,
    validation::{self, Violations},
};
use approvals_store::IdempotencyKey;
use prost::Message;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::page_token;
use crate::{convert, error::ApiError, pb, watch::Start};

const LIST_DEFAULT_PAGE_SIZE: u64 = 50;
const LIST_MAX_PAGE_SIZE: u64 = 1000;
const EVENTS_DEFAULT_PAGE_SIZE: u64 = 100;
const EVENTS_MAX_PAGE_SIZE: u64 = 1000;

/// A change request id from a request: required, a UUID, normalised to lower-case hyphenated.
pub fn id(field: &str, id: &str) -> Result<String, ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| {
            ApiError::invalid(field, format!("{id:?} is not a change request id (a UUID)"))
        })
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

pub(super) fn optional_timestamp(
    field: &str,
    time: Option<&prost_types::Timestamp>,
) -> Result<Option<Timestamp>, ApiError> {
    time.map(|t| convert::from_timestamp(field, t)).transpose()
}

/// The [`FilterFields`] of a List or Watch request (two messages with the same fields).
macro_rules! filter_fields {
    ($req:expr) => {
        FilterFields {
            project: &$req.project,
            environment: &$req.environment,
            action_key: &$req.action_key,
            resource_type: &$req.resource_type,
            resource_id: &$req.resource_id,
            states: &$req.states,
            risks: &$req.risks,
        }
    };
}

/// The filter fields List and Watch share: a project (required), optional names, states.
/// (`filter_fields!(req)` takes them from either message.)
struct FilterFields<'a> {
    project: &'a str,
    environment: &'a str,
    action_key: &'a str,
    resource_type: &'a str,
    resource_id: &'a str,
    states: &'a [i32],
    risks: &'a [i32],
}

impl FilterFields<'_> {
    fn check(&self, violations: &mut Violations) {
        violations.required_name("project", self.project);
        for (field, value) in [
            ("environment", self.environment),
            ("action_key", self.action_key),
            ("resource_type", self.resource_type),
            ("resource_id", self.resource_id),
        ] {
            violations.optional_name(field, value);
        }
    }

    /// The filter, once [`Self::check`] passed; states are sorted and unique.
    fn filter(&self) -> Result<RequestFilter, ApiError> {
        let mut states = self
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::from_state(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<State>, _>>()?;
        states.sort_by_key(|s| s.as_str());
        states.dedup();
        let mut risks = self
            .risks
            .iter()
            .enumerate()
            .map(|(i, r)| convert::from_risk(&format!("risks[{i}]"), *r))
            .collect::<Result<Vec<_>, _>>()?;
        risks.sort();
        risks.dedup();
        Ok(RequestFilter {
            project: self.project.to_owned(),
            environment: optional(self.environment),
            action_key: optional(self.action_key),
            resource_type: optional(self.resource_type),
            resource_id: optional(self.resource_id),
            requester: None,
            states,
            id: None,
            risks,
        })
    }
}

/// ListChangeRequests, parsed.
pub struct ListQuery {
    pub filter: RequestFilter,
    pub pending_for_me: bool,
    pub page_size: u64,
    /// The position to continue after (from the page token).
    pub after: Option<String>,
    /// The digest page tokens of this query carry.
    pub digest: String,
}

impl TryFrom<&pb::ListChangeRequestsRequest> for ListQuery {
    type Error = ApiError;

    fn try_from(req: &pb::ListChangeRequestsRequest) -> Result<Self, ApiError> {
        let fields = filter_fields!(req);
        let mut violations = Violations::default();
        fields.check(&mut violations);
        if !req.requester.is_empty()
            && let Err(message) = Principal::parse(&req.requester)
        {
            violations.add("requester", message);
        }
        violations.into_result()?;
        let mut filter = fields.filter()?;
        filter.requester = optional(&req.requester);
        let page_size =
            page_token::page_size(req.page_size, LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)?;
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let digest = page_token::query_digest(&[
            "list",
            &req.project,
            &req.environment,
            &req.action_key,
            &req.resource_type,
            &req.resource_id,
            &req.requester,
            &states.join(","),
            if req.pending_for_me { "pending" } else { "" },
        ]);
        let after = page_token::decode(&req.page_token, &digest)?;
        if req.pending_for_me
            && (filter.states.is_empty() || filter.states.contains(&State::InReview))
        {
            filter.states = vec![State::InReview];
        }
        Ok(Self {
            filter,
            pending_for_me: req.pending_for_me,
            page_size,
            after,
            digest,
        })
    }
}

/// WatchChangeRequests, parsed.
pub struct WatchQuery {
    pub filter: RequestFilter,
    pub start: Start,
}

impl TryFrom<&pb::WatchChangeRequestsRequest> for WatchQuery {
    type Error = ApiError;

    fn try_from(req: &pb::WatchChangeRequestsRequest) -> Result<Self, ApiError> {
        let fields = filter_fields!(req);
        let mut violations = Violations::default();
        fields.check(&mut violations);
        if req.start_revision < 0 {
            violations.add("start_revision", "must not be negative (0 means from now)");
        }
        if req.start_revision > 0 && req.include_initial {
            violations.add(
                "include_initial",
                "cannot be combined with start_revision: a snapshot starts at the current revision",
            );
        }
        violations.into_result()?;
        let mut filter = fields.filter()?;
        if !req.id.is_empty() {
            filter.id = Some(id("id", &req.id)?);
        }
        let start = if req.include_initial {
            Start::Initial
        } else if req.start_revision > 0 {
            Start::Revision(req.start_revision)
        } else {
            Start::Now
        };
        Ok(Self { filter, start })
    }
}

/// ListChangeRequestEvents, parsed.
pub struct EventsQuery {
    pub id: String,
    pub page_size: u64,
    /// The revision to continue after (0: from the first event).
    pub after: i64,
    pub digest: String,
}

impl TryFrom<&pb::ListChangeRequestEventsRequest> for EventsQuery {
    type Error = ApiError;

    fn try_from(req: &pb::ListChangeRequestEventsRequest) -> Result<Self, ApiError> {
        let id = id("id", &req.id)?;
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
        Ok(Self {
            id,
            page_size,
            after,
            digest,
        })
    }
}

/// CreateChangeRequest, parsed: the new request and its idempotency key.
pub struct Creation {
    pub new: NewChangeRequest,
    pub key: Option<IdempotencyKey>,
}

impl TryFrom<pb::CreateChangeRequestRequest> for Creation {
    type Error = ApiError;

    fn try_from(req: pb::CreateChangeRequestRequest) -> Result<Self, ApiError> {
        let key = idempotency_key(&req)?;
        let mut violations = Violations::default();
        let changes = convert::change_inputs("changes", &req.changes, &mut violations);
        let expire_time = optional_timestamp("expire_time", req.expire_time.as_ref())?;
        let apply_time = optional_timestamp("apply_time", req.apply_time.as_ref())?;
        violations.into_result()?;
        Ok(Self {
            new: NewChangeRequest {
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
                justification: req.justification,
            },
            key,
        })
    }
}

/// The request_id (AIP-155) and a digest of the body without it: a retry must send the same
/// body to get the same answer.
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

/// UpdateChangeRequest, parsed: the update mask made into a patch.
pub struct Edit {
    pub id: String,
    pub etag: Option<String>,
    pub patch: ChangeRequestPatch,
}

/// The fields UpdateChangeRequest may change.
const UPDATABLE: &str = "title, description, changes, intent_display, expire_time";

impl TryFrom<pb::UpdateChangeRequestRequest> for Edit {
    type Error = ApiError;

    fn try_from(req: pb::UpdateChangeRequestRequest) -> Result<Self, ApiError> {
        let Some(body) = req.change_request else {
            return Err(ApiError::invalid("change_request", "is required"));
        };
        let id = id("change_request.id", &body.id)?;
        let Some(mask) = req.update_mask else {
            return Err(ApiError::invalid(
                "update_mask",
                "is required: name the fields to update",
            ));
        };
        let mut violations = Violations::default();
        let mut patch = ChangeRequestPatch::default();
        for (i, path) in mask.paths.iter().enumerate() {
            match path.as_str() {
                "title" => patch.title = Some(body.title.clone()),
                "description" => patch.description = Some(body.description.clone()),
                "intent_display" => patch.intent_display = Some(body.intent_display.clone()),
                "changes" => {
                    patch.changes = Some(convert::change_inputs(
                        "change_request.changes",
                        &body.changes,
                        &mut violations,
                    ))
                }
                "expire_time" => {
                    patch.expire_time = Some(optional_timestamp(
                        "change_request.expire_time",
                        body.expire_time.as_ref(),
                    )?)
                }
                other => violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!("{other:?} cannot be updated; updatable: {UPDATABLE}"),
                ),
            }
        }
        violations.into_result()?;
        Ok(Self {
            id,
            etag: optional(&body.etag),
            patch,
        })
    }
}

/// ApplyChangeRequest, parsed.
pub struct Application {
    pub id: String,
    /// The bypass justification, when the caller applies without quorum.
    pub bypass: Option<String>,
}

impl TryFrom<&pb::ApplyChangeRequestRequest> for Application {
    type Error = ApiError;

    fn try_from(req: &pb::ApplyChangeRequestRequest) -> Result<Self, ApiError> {
        let id = id("id", &req.id)?;
        let bypass = if req.bypass_justification.is_empty() {
            None
        } else if req.bypass_justification.trim().is_empty() {
            return Err(ApiError::invalid(
                "bypass_justification",
                "must say why (it is only whitespace)",
            ));
        } else {
            let mut v = Violations::default();
            v.text(
                "bypass_justification",
                &req.bypass_justification,
                validation::MAX_TEXT_BYTES,
            );
            v.into_result()?;
            Some(req.bypass_justification.clone())
        };
        Ok(Self { id, bypass })
    }
}

/// CompleteChangeRequest, parsed.
pub struct Completion {
    pub id: String,
    pub success: bool,
    pub result_data: Option<Map<String, Value>>,
    pub error: String,
}

impl TryFrom<pb::CompleteChangeRequestRequest> for Completion {
    type Error = ApiError;

    fn try_from(req: pb::CompleteChangeRequestRequest) -> Result<Self, ApiError> {
        let id = id("id", &req.id)?;
        let mut v = Violations::default();
        v.text("error", &req.error, validation::MAX_TEXT_BYTES);
        let result_data = req
            .result_data
            .as_ref()
            .map(|s| convert::from_struct("result_data", s, &mut v));
        if let Some(data) = &result_data {
            v.json_strings("result_data", data);
        }
        v.into_result()?;
        Ok(Self {
            id,
            success: req.success,
            result_data,
            error: req.error,
        })
    }
}

/// ScheduleChangeRequest's apply_time: required.
/// When a ScheduleChangeRequest asks to apply: `apply_time`, or `next_open_window`.
pub fn schedule_at(req: &pb::ScheduleChangeRequestRequest) -> Result<ScheduleAt, ApiError> {
    match (req.apply_time.as_ref(), req.next_open_window) {
        (Some(_), true) => Err(ApiError::invalid(
            "next_open_window",
            "must not be set with apply_time: send one of them",
        )),
        (None, true) => Ok(ScheduleAt::NextOpenWindow),
        (None, false) => Err(ApiError::invalid(
            "apply_time",
            "is required (or set next_open_window)",
        )),
        (Some(apply_time), false) => Ok(ScheduleAt::Time(convert::from_timestamp(
            "apply_time",
            apply_time,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_normalised_and_bad_ones_name_the_field() {
        let upper = "0192F5E0-0000-7000-8000-000000000001";
        assert_eq!(
            id("id", upper).ok().as_deref(),
            Some("0192f5e0-0000-7000-8000-000000000001")
        );
        assert!(id("change_request.id", "nope").is_err());
        assert!(id("id", "").is_err());
    }

    #[test]
    fn pending_for_me_narrows_the_states_to_in_review() {
        let req = pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            ..Default::default()
        };
        let query = ListQuery::try_from(&req).expect("valid");
        assert_eq!(query.filter.states, vec![State::InReview]);
        // A token of another query is refused.
        let other = ListQuery::try_from(&pb::ListChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .expect("valid");
        assert_ne!(query.digest, other.digest);
    }

    #[test]
    fn a_mask_path_that_cannot_be_updated_is_named() {
        let req = pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: "0192f5e0-0000-7000-8000-000000000001".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["title".into(), "state".into()],
            }),
        };
        let Err(err) = Edit::try_from(req) else {
            panic!("state is not updatable");
        };
        assert!(err.to_string().contains("update_mask.paths[1]"), "{err}");
    }
}
