//! `RequestFilter`: what a list, a watch and a snapshot select, on requests and on events.

use approvals_domain::{
    Actor, ChangeInput, ChangeRequest, Event, EventKind, NewChangeRequest, RequestFilter,
    ReviewRules, State, Timestamp,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

const PROJECTS: [&str; 2] = ["web", "api"];
const ENVIRONMENTS: [&str; 2] = ["prod", "dev"];
const ACTION_KEYS: [&str; 2] = ["flag.update", "secret.rotate"];
const REQUESTERS: [&str; 2] = ["user:alice", "user:bob"];
const RESOURCE_TYPES: [&str; 2] = ["flag", "secret"];
const RESOURCE_IDS: [&str; 3] = ["x", "y", "z"];
const IDS: [&str; 2] = ["cr-1", "cr-2"];

/// What makes one generated request differ from another.
#[derive(Debug, Clone)]
struct Shape {
    id: usize,
    project: usize,
    environment: usize,
    action_key: usize,
    requester: usize,
    changes: Vec<(usize, usize)>,
    state: State,
}

fn request(shape: &Shape) -> ChangeRequest {
    let new = NewChangeRequest {
        project: PROJECTS[shape.project].into(),
        environment: ENVIRONMENTS[shape.environment].into(),
        action_key: ACTION_KEYS[shape.action_key].into(),
        action_version: 1,
        title: "t".into(),
        description: String::new(),
        changes: shape
            .changes
            .iter()
            .map(|&(t, i)| ChangeInput {
                id: None,
                action: "update".into(),
                resource_type: RESOURCE_TYPES[t].into(),
                resource_id: RESOURCE_IDS[i].into(),
                payload: serde_json::Map::new(),
                base_version: None,
            })
            .collect(),
        intent_display: String::new(),
        expire_time: None,
        draft: false,
        apply_time: None,
        justification: String::new(),
    };
    let actor = Actor::caller(REQUESTERS[shape.requester], vec![]).expect("valid principal");
    let mut n = 0;
    let (mut request, _) = ChangeRequest::create(
        IDS[shape.id].into(),
        new,
        &actor,
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut || {
            n += 1;
            format!("change-{n}")
        },
    )
    .expect("valid request");
    request.state = shape.state;
    request
}

/// An event that left `request` as it is, carrying it (or not).
fn event_of(request: &ChangeRequest, with_request: bool) -> Event {
    Event {
        revision: 7,
        change_request_id: request.id.clone(),
        project: request.project.clone(),
        environment: request.environment.clone(),
        kind: EventKind::Updated,
        actor: request.created_by.clone(),
        acting_principal: None,
        auth_method: Default::default(),
        from_state: State::Draft,
        to_state: request.state,
        time: NOW,
        detail: String::new(),
        change_request: with_request.then(|| request.clone()),
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        (0..IDS.len(), 0..PROJECTS.len(), 0..ENVIRONMENTS.len()),
        (0..ACTION_KEYS.len(), 0..REQUESTERS.len()),
        proptest::collection::vec((0..RESOURCE_TYPES.len(), 0..RESOURCE_IDS.len()), 1..4),
        proptest::sample::select(State::ALL.to_vec()),
    )
        .prop_map(
            |((id, project, environment), (action_key, requester), changes, state)| Shape {
                id,
                project,
                environment,
                action_key,
                requester,
                changes,
                state,
            },
        )
}

fn one_of(values: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
    proptest::option::of(proptest::sample::select(values).prop_map(str::to_owned))
}

fn filter() -> impl Strategy<Value = RequestFilter> {
    (
        (
            proptest::sample::select(PROJECTS.as_slice()),
            one_of(&ENVIRONMENTS),
            one_of(&ACTION_KEYS),
            one_of(&RESOURCE_TYPES),
        ),
        (
            one_of(&RESOURCE_IDS),
            one_of(&REQUESTERS),
            proptest::sample::subsequence(State::ALL.to_vec(), 0..3),
            one_of(&IDS),
        ),
    )
        .prop_map(
            |(
                (project, environment, action_key, resource_type),
                (resource_id, requester, states, id),
            )| RequestFilter {
                project: project.to_owned(),
                environment,
                action_key,
                resource_type,
                resource_id,
                requester,
                states,
                id,
                risks: Vec::new(),
            },
        )
}

/// The filters that each keep one field of `filter` (and its project).
fn single_fields(filter: &RequestFilter) -> Vec<RequestFilter> {
    let only = |f: &dyn Fn(&mut RequestFilter)| {
        let mut single = RequestFilter {
            project: filter.project.clone(),
            ..Default::default()
        };
        f(&mut single);
        single
    };
    vec![
        only(&|s| s.environment = filter.environment.clone()),
        only(&|s| s.action_key = filter.action_key.clone()),
        only(&|s| {
            s.resource_type = filter.resource_type.clone();
            s.resource_id = filter.resource_id.clone();
        }),
        only(&|s| s.requester = filter.requester.clone()),
        only(&|s| s.states = filter.states.clone()),
        only(&|s| s.id = filter.id.clone()),
    ]
}

proptest! {
    /// A filter is the conjunction of its fields (the resource's type and id count as one: they
    /// must hold of the same change).
    #[test]
    fn a_filter_is_the_and_of_its_fields(shape in shape(), filter in filter()) {
        let request = request(&shape);
        let each = single_fields(&filter).iter().all(|f| f.matches(&request));
        prop_assert_eq!(filter.matches(&request), each);
    }

    /// A watch's event matches as the request it left behind does.
    #[test]
    fn an_event_matches_as_its_request(shape in shape(), filter in filter()) {
        let request = request(&shape);
        prop_assert_eq!(filter.matches_event(&event_of(&request, true)), filter.matches(&request));
    }

    /// Without its request, an event matches on its own columns, when the filter needs no more.
    #[test]
    fn an_event_without_its_request_matches_on_its_columns(
        shape in shape(),
        filter in filter(),
    ) {
        let request = request(&shape);
        let expected = !filter.needs_request()
            && RequestFilter {
                action_key: None,
                requester: None,
                resource_type: None,
                resource_id: None,
                ..filter.clone()
            }
            .matches(&request);
        prop_assert_eq!(filter.matches_event(&event_of(&request, false)), expected);
    }

    /// A request matches every filter made of its own values, and none that differs in one.
    #[test]
    fn a_request_matches_its_own_values(shape in shape(), mask in any::<[bool; 7]>()) {
        let request = request(&shape);
        let own = |set: bool, value: &str| set.then(|| value.to_owned());
        let change = &request.changes[0];
        let filter = RequestFilter {
            project: request.project.clone(),
            environment: own(mask[0], &request.environment),
            action_key: own(mask[1], &request.action_key),
            resource_type: own(mask[2], &change.resource_type),
            resource_id: own(mask[3], &change.resource_id),
            requester: own(mask[4], request.created_by.as_str()),
            states: if mask[5] { vec![request.state] } else { vec![] },
            id: own(mask[6], &request.id),
            risks: Vec::new(),
        };
        prop_assert!(filter.matches(&request));
        let other_project = RequestFilter { project: "elsewhere".into(), ..filter.clone() };
        prop_assert!(!other_project.matches(&request));
        let other_id = RequestFilter { id: Some("cr-other".into()), ..filter.clone() };
        prop_assert!(!other_id.matches(&request));
        let other_state = RequestFilter {
            states: State::ALL.into_iter().filter(|s| *s != request.state).collect(),
            ..filter
        };
        prop_assert!(!other_state.matches(&request));
    }
}

#[test]
fn a_resource_matches_when_one_change_has_both_its_type_and_id() {
    let request = request(&Shape {
        id: 0,
        project: 0,
        environment: 0,
        action_key: 0,
        requester: 0,
        // flag/x and secret/y
        changes: vec![(0, 0), (1, 1)],
        state: State::InReview,
    });
    let resource = |t: &str, i: &str| RequestFilter {
        project: "web".into(),
        resource_type: Some(t.into()),
        resource_id: Some(i.into()),
        ..Default::default()
    };
    assert!(resource("flag", "x").matches_resources(&request));
    assert!(resource("secret", "y").matches_resources(&request));
    // Each exists, on different changes.
    assert!(!resource("flag", "y").matches_resources(&request));
    assert!(!resource("flag", "y").matches(&request));
    // A filter naming no resource matches any request's resources.
    assert!(RequestFilter::default().matches_resources(&request));
}

#[test]
fn a_watch_matches_states_on_the_events_to_state() {
    let mut request = request(&Shape {
        id: 0,
        project: 0,
        environment: 0,
        action_key: 0,
        requester: 0,
        changes: vec![(0, 0)],
        state: State::Approved,
    });
    let approved = RequestFilter {
        project: "web".into(),
        states: vec![State::Approved],
        ..Default::default()
    };
    let mut event = event_of(&request, false);
    assert!(approved.matches_event(&event));
    event.to_state = State::Applied;
    assert!(!approved.matches_event(&event));
    request.state = State::Applied;
    assert!(!approved.matches(&request));
}
