//! Rules of the change-request aggregate, exercised without any I/O.

use approvals_domain::{
    Action, Actor, ChangeInput, ChangeRequest, ChangeRequestPatch, Decision, DomainError,
    EventKind, NewChangeRequest, Principal, ReviewRules, State, Timestamp, validation,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

fn actor(name: &str) -> Actor {
    Actor::caller(name, vec![]).expect("valid principal")
}

fn change(resource_id: &str) -> ChangeInput {
    ChangeInput {
        id: None,
        action: "update".into(),
        resource_type: "feature_flag".into(),
        resource_id: resource_id.into(),
        payload: serde_json::Map::new(),
        base_version: None,
    }
}

fn new_request(draft: bool) -> NewChangeRequest {
    NewChangeRequest {
        project: "web".into(),
        environment: "prod".into(),
        action_key: "feature_flag.update".into(),
        action_version: 1,
        title: "Roll out".into(),
        description: String::new(),
        changes: vec![change("checkout")],
        intent_display: String::new(),
        expire_time: None,
        draft,
        apply_time: None,
        justification: String::new(),
    }
}

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("change-{n}")
    }
}

fn create(min_approvals: u32, draft: bool) -> ChangeRequest {
    let (request, event) = ChangeRequest::create(
        "cr-1".into(),
        new_request(draft),
        &actor("user:alice"),
        ReviewRules::with_min_approvals(min_approvals),
        NOW,
        &mut ids(),
    )
    .expect("valid request");
    assert_eq!(event.kind, EventKind::Created);
    request
}

fn fields(err: DomainError) -> Vec<String> {
    match err {
        DomainError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn create_starts_in_review_or_draft() {
    assert_eq!(create(1, false).state, State::InReview);
    let draft = create(1, true);
    assert_eq!(draft.state, State::Draft);
    assert_eq!(draft.changes[0].id, "change-1");
    assert_eq!(draft.changes[0].created_by.as_str(), "user:alice");
}

#[test]
fn create_names_every_bad_field() {
    let mut bad = new_request(false);
    bad.project = String::new();
    bad.action_key = "  ".into();
    bad.action_version = -1;
    bad.expire_time = Some(NOW);
    bad.changes = vec![ChangeInput {
        resource_id: String::new(),
        ..change("x")
    }];
    let err = ChangeRequest::create(
        "id".into(),
        bad,
        &actor("user:a"),
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut ids(),
    )
    .expect_err("invalid");
    assert_eq!(
        fields(err),
        vec![
            "project",
            "action_key",
            "action_version",
            "changes[0].resource_id",
            "expire_time"
        ]
    );
}

#[test]
fn create_refuses_no_changes_and_oversized_payloads() {
    let mut none = new_request(false);
    none.changes.clear();
    let err = ChangeRequest::create(
        "id".into(),
        none,
        &actor("user:a"),
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut ids(),
    )
    .expect_err("no changes");
    assert_eq!(fields(err), vec!["changes"]);

    let mut big = new_request(false);
    let mut payload = serde_json::Map::new();
    payload.insert(
        "blob".into(),
        "x".repeat(validation::MAX_PAYLOAD_BYTES).into(),
    );
    big.changes = vec![
        change("a"),
        ChangeInput {
            payload,
            ..change("b")
        },
    ];
    let err = ChangeRequest::create(
        "id".into(),
        big,
        &actor("user:a"),
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut ids(),
    )
    .expect_err("too big");
    assert_eq!(fields(err), vec!["changes[1].payload"]);
}

#[test]
fn quorum_of_distinct_reviewers_approves() {
    let mut request = create(2, false);
    let event = request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    assert_eq!(
        (event.from_state, event.to_state),
        (State::InReview, State::InReview)
    );
    // The same reviewer again does not count twice.
    request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect("approve again");
    assert_eq!(request.approval_count(), 1);
    assert_eq!(request.state, State::InReview);
    let event = request
        .review(&actor("user:carol"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    assert_eq!(event.kind, EventKind::Reviewed);
    assert_eq!(
        (event.from_state, event.to_state),
        (State::InReview, State::Approved)
    );
    assert_eq!(request.approval_count(), 2);
}

#[test]
fn one_rejection_rejects_and_later_decision_replaces_earlier() {
    let mut request = create(2, false);
    request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    request
        .review(&actor("user:bob"), Decision::Reject, "no".into(), NOW)
        .expect("reject");
    assert_eq!(request.state, State::Rejected);
    assert_eq!(request.reviews.len(), 1);
    assert_eq!(request.approval_count(), 0);
    assert_eq!(
        request.decision_of(&Principal::parse("user:bob").expect("ok")),
        Some(Decision::Reject)
    );
}

#[test]
fn requester_cannot_approve_own_request() {
    let mut request = create(1, false);
    assert_eq!(
        request.review(&actor("user:alice"), Decision::Approve, String::new(), NOW),
        Err(DomainError::SelfApproval)
    );
    assert!(request.reviews.is_empty());
    assert!(!request.viewer_flags(&actor("user:alice")).can_approve);
    assert!(request.viewer_flags(&actor("user:bob")).can_approve);
}

#[test]
fn transitions_outside_the_table_name_state_and_action() {
    let mut request = create(1, true);
    let err = request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect_err("draft");
    assert_eq!(
        err,
        DomainError::InvalidTransition {
            state: State::Draft,
            action: Action::Approve
        }
    );
    assert_eq!(
        err.to_string(),
        "cannot approve a change request in state DRAFT"
    );
    request.submit(&actor("user:alice"), NOW).expect("submit");
    assert_eq!(
        request.submit(&actor("user:alice"), NOW),
        Err(DomainError::InvalidTransition {
            state: State::InReview,
            action: Action::Submit
        })
    );
}

#[test]
fn only_the_requester_cancels_submits_and_updates() {
    let mut request = create(1, true);
    assert!(matches!(
        request.submit(&actor("user:bob"), NOW),
        Err(DomainError::NotRequester { .. })
    ));
    assert!(matches!(
        request.cancel(&actor("user:bob"), String::new(), NOW),
        Err(DomainError::NotRequester { .. })
    ));
    let patch = ChangeRequestPatch {
        title: Some("x".into()),
        ..Default::default()
    };
    assert!(matches!(
        request.update(&actor("user:bob"), patch, NOW, &mut ids()),
        Err(DomainError::NotRequester { .. })
    ));
    let event = request
        .cancel(&actor("user:alice"), "changed my mind".into(), NOW)
        .expect("cancel");
    assert_eq!(
        (event.kind, event.to_state, event.detail.as_str()),
        (EventKind::Cancelled, State::Cancelled, "changed my mind")
    );
    assert!(matches!(
        request.cancel(&actor("user:alice"), String::new(), NOW),
        Err(DomainError::InvalidTransition { .. })
    ));
}

#[test]
fn editing_in_review_dismisses_earlier_reviews() {
    let mut request = create(2, false);
    request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    let patch = ChangeRequestPatch {
        changes: Some(vec![change("other")]),
        ..Default::default()
    };
    let event = request
        .update(&actor("user:alice"), patch, NOW, &mut || "new".into())
        .expect("update");
    assert_eq!(event.kind, EventKind::Updated);
    assert_eq!(request.approval_count(), 0);
    assert!(request.reviews[0].dismissed);
    assert_eq!(request.changes[0].id, "new");
    // The dismissed approval does not count: bob approves again and carol completes quorum.
    request
        .review(&actor("user:bob"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    assert_eq!(request.state, State::InReview);
    request
        .review(&actor("user:carol"), Decision::Approve, String::new(), NOW)
        .expect("approve");
    assert_eq!(request.state, State::Approved);
}

#[test]
fn update_replaces_adds_and_discards_changes() {
    let mut request = ChangeRequest::create(
        "cr".into(),
        NewChangeRequest {
            changes: vec![change("a"), change("b")],
            ..new_request(true)
        },
        &actor("user:alice"),
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut ids(),
    )
    .expect("create")
    .0;
    let first = request.changes[0].id.clone();
    let replaced = ChangeInput {
        id: Some(first.clone()),
        ..change("a2")
    };
    let patch = ChangeRequestPatch {
        changes: Some(vec![replaced, change("c")]),
        ..Default::default()
    };
    request
        .update(&actor("user:alice"), patch, NOW, &mut || "fresh".into())
        .expect("update");
    let summary: Vec<(&str, &str)> = request
        .changes
        .iter()
        .map(|c| (c.id.as_str(), c.resource_id.as_str()))
        .collect();
    assert_eq!(summary, vec![(first.as_str(), "a2"), ("fresh", "c")]);

    let unknown = ChangeRequestPatch {
        changes: Some(vec![ChangeInput {
            id: Some("nope".into()),
            ..change("x")
        }]),
        ..Default::default()
    };
    let err = request
        .update(&actor("user:alice"), unknown, NOW, &mut ids())
        .expect_err("unknown id");
    assert_eq!(fields(err), vec!["change_request.changes[0].id"]);
    let err = request
        .update(
            &actor("user:alice"),
            ChangeRequestPatch::default(),
            NOW,
            &mut ids(),
        )
        .expect_err("empty");
    assert_eq!(fields(err), vec!["update_mask"]);
}

#[test]
fn etag_follows_revision() {
    let mut request = create(1, false);
    request.revision = 42;
    assert_eq!(request.etag(), "r42");
    assert!(request.check_etag(None).is_ok());
    assert!(request.check_etag(Some("")).is_ok());
    assert!(request.check_etag(Some("r42")).is_ok());
    assert!(matches!(
        request.check_etag(Some("r41")),
        Err(DomainError::EtagMismatch { .. })
    ));
}

#[test]
fn comments_are_allowed_in_every_state_but_not_empty() {
    let mut request = create(1, false);
    request
        .cancel(&actor("user:alice"), String::new(), NOW)
        .expect("cancel");
    let event = request
        .add_comment(&actor("user:bob"), "c1".into(), "why?".into(), NOW)
        .expect("comment");
    assert_eq!(
        (event.from_state, event.to_state),
        (State::Cancelled, State::Cancelled)
    );
    assert_eq!(
        fields(
            request
                .add_comment(&actor("user:bob"), "c2".into(), " ".into(), NOW)
                .expect_err("empty")
        ),
        vec!["text"]
    );
}

#[test]
fn comments_are_capped_and_a_refused_one_leaves_the_request_as_it_was() {
    let mut request = create(1, false);
    for i in 0..validation::MAX_COMMENTS {
        request
            .add_comment(&actor("user:bob"), format!("c{i}"), "ok".into(), NOW)
            .expect("comment");
    }
    let before = request.clone();
    let err = request
        .add_comment(&actor("user:bob"), "late".into(), "ok".into(), NOW)
        .expect_err("over the cap");
    assert_eq!(
        err,
        DomainError::TooManyComments {
            limit: validation::MAX_COMMENTS
        }
    );
    assert_eq!(request, before);
}

#[test]
fn the_document_cap_refuses_a_comment_or_review_that_would_not_fit() {
    let mut request = create(5, false);
    let text = "x".repeat(validation::MAX_TEXT_BYTES);
    let mut i = 0;
    let err = loop {
        match request.add_comment(&actor("user:bob"), format!("c{i}"), text.clone(), NOW) {
            Ok(_) => i += 1,
            Err(err) => break err,
        }
    };
    assert!(matches!(
        err,
        DomainError::DocumentTooLarge { size, limit }
            if limit == validation::MAX_DOCUMENT_BYTES && size > limit
    ));
    assert_eq!(request.comments.len(), i);
    assert!(validation::json_len(&request) <= validation::MAX_DOCUMENT_BYTES);
    let before = request.clone();
    let err = request
        .review(&actor("user:carol"), Decision::Approve, text, NOW)
        .expect_err("too large");
    assert!(matches!(err, DomainError::DocumentTooLarge { .. }));
    assert_eq!(request, before);
    request
        .review(&actor("user:carol"), Decision::Approve, String::new(), NOW)
        .expect("a short review fits");
}

#[test]
fn reviews_are_capped_counting_dismissed_ones() {
    let mut request = create(100, false);
    let alice = actor("user:alice");
    let mut round = 0;
    while request.reviews.len() < validation::MAX_REVIEWS {
        request
            .review(
                &actor(&format!("user:r{}", request.reviews.len() % 7)),
                Decision::Approve,
                String::new(),
                NOW,
            )
            .expect("review");
        if request.reviews.iter().filter(|r| !r.dismissed).count() == 7 {
            round += 1;
            request
                .update(
                    &alice,
                    ChangeRequestPatch {
                        title: Some(format!("take {round}")),
                        ..Default::default()
                    },
                    NOW,
                    &mut ids(),
                )
                .expect("edit dismisses");
        }
    }
    // Replacing one's own current review adds none; a new one is refused.
    let current = request
        .reviews
        .iter()
        .rev()
        .find(|r| !r.dismissed)
        .map(|r| r.reviewer.to_string())
        .expect("a current review");
    request
        .review(&actor(&current), Decision::Approve, "again".into(), NOW)
        .expect("a replacement");
    assert_eq!(request.reviews.len(), validation::MAX_REVIEWS);
    let stranger = (0..7)
        .map(|n| format!("user:r{n}"))
        .find(|name| request.decision_of(&actor(name).principal).is_none())
        .unwrap_or_else(|| "user:newcomer".into());
    let before = request.clone();
    assert_eq!(
        request
            .review(&actor(&stranger), Decision::Approve, String::new(), NOW)
            .expect_err("over the cap"),
        DomainError::TooManyReviews {
            limit: validation::MAX_REVIEWS
        }
    );
    assert_eq!(request, before);
}

proptest! {
    /// Whatever the order of reviews by whichever reviewers, the request is approved exactly
    /// when the distinct current approvers reach quorum before any rejection, and every event
    /// follows the transition table.
    #[test]
    fn reviews_follow_quorum(
        min in 1u32..4,
        reviews in proptest::collection::vec((0usize..5, any::<bool>()), 0..12),
    ) {
        let mut request = create(min, false);
        let mut current: std::collections::BTreeMap<usize, bool> = Default::default();
        for (reviewer, approve) in reviews {
            let before = request.state;
            let decision = if approve { Decision::Approve } else { Decision::Reject };
            let result = request.review(&actor(&format!("user:r{reviewer}")), decision, String::new(), NOW);
            if before != State::InReview {
                let refused = matches!(result, Err(DomainError::InvalidTransition { .. }));
                prop_assert!(refused);
                prop_assert_eq!(request.state, before);
                continue;
            }
            let event = result.expect("allowed in review");
            current.insert(reviewer, approve);
            let approvals = current.values().filter(|a| **a).count() as u32;
            let rejected = current.values().any(|a| !*a);
            let expected = if rejected { State::Rejected } else if approvals >= min { State::Approved } else { State::InReview };
            prop_assert_eq!(request.state, expected);
            prop_assert_eq!(event.to_state, expected);
            prop_assert_eq!(request.approval_count(), approvals);
        }
    }
}
