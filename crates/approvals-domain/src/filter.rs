//! Which change requests a list, a watch or a snapshot selects: one definition, evaluated here
//! on domain values (a request as it stands, or an event of the log) and translated to SQL by
//! the store.

use crate::{ChangeRequest, Event, Risk, State};

/// A filter of change requests: a request matches when it matches every field that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// The project; always set (every list and watch is of one project).
    pub project: String,
    pub environment: Option<String>,
    pub action_key: Option<String>,
    /// A change of the request touches a resource of this type (and of `resource_id`, when
    /// that is set too).
    pub resource_type: Option<String>,
    /// A change of the request touches a resource of this id.
    pub resource_id: Option<String>,
    /// The principal that created the request.
    pub requester: Option<String>,
    /// Any of these states; empty: any state.
    pub states: Vec<State>,
    /// One change request.
    pub id: Option<String>,
    /// Any of these risk labels (`Risk::Unspecified`: requests no risk rule labelled); empty:
    /// any risk.
    pub risks: Vec<Risk>,
}

impl RequestFilter {
    /// Whether `request`, as it stands, matches every field.
    pub fn matches(&self, request: &ChangeRequest) -> bool {
        request.project == self.project
            && is_unset_or(&self.environment, &request.environment)
            && is_unset_or(&self.id, &request.id)
            && self.matches_state(request.state)
            && self.matches_request_only(request)
    }

    /// Whether any change of `request` touches the resource the filter names (true when it
    /// names none).
    pub fn matches_resources(&self, request: &ChangeRequest) -> bool {
        touches_resource(
            self.resource_type.as_deref(),
            self.resource_id.as_deref(),
            request,
        )
    }

    /// Whether an event of the log matches, for a watch: the project, environment, id and
    /// states on the event itself (`states` on its `to_state`), the other fields on the request
    /// as it stood right after it. An event read without that request matches only a filter
    /// that sets none of those other fields.
    ///
    /// For an event and the request it carries (same project, environment and id, the request
    /// in the event's `to_state`), this is [`RequestFilter::matches`] of the request.
    pub fn matches_event(&self, event: &Event) -> bool {
        event.project == self.project
            && is_unset_or(&self.environment, &event.environment)
            && is_unset_or(&self.id, &event.change_request_id)
            && self.matches_state(event.to_state)
            && match &event.change_request {
                Some(request) => self.matches_request_only(request),
                None => !self.needs_request(),
            }
    }

    /// Whether the filter sets a field that only the request's document holds (an event's own
    /// columns hold the project, environment, id and states).
    pub fn needs_request(&self) -> bool {
        self.action_key.is_some()
            || self.requester.is_some()
            || self.resource_type.is_some()
            || self.resource_id.is_some()
            || !self.risks.is_empty()
    }

    fn matches_state(&self, state: State) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }

    /// The fields an event's columns do not hold: action key, requester, resources, risk.
    fn matches_request_only(&self, request: &ChangeRequest) -> bool {
        is_unset_or(&self.action_key, &request.action_key)
            && self
                .requester
                .as_ref()
                .is_none_or(|p| request.created_by.as_str() == p)
            && self.matches_resources(request)
            && (self.risks.is_empty() || self.risks.contains(&request.risk))
    }
}

fn is_unset_or(wanted: &Option<String>, value: &str) -> bool {
    wanted.as_deref().is_none_or(|wanted| wanted == value)
}

/// Whether any change of `request` touches a resource of this type and id; an unset one
/// matches any, both unset match every request.
pub fn touches_resource(
    resource_type: Option<&str>,
    resource_id: Option<&str>,
    request: &ChangeRequest,
) -> bool {
    (resource_type.is_none() && resource_id.is_none())
        || request.changes.iter().any(|c| {
            resource_type.is_none_or(|t| c.resource_type == t)
                && resource_id.is_none_or(|i| c.resource_id == i)
        })
}
