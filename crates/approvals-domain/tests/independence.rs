//! Independent approvals: one acting credential that only asserts identities cannot make up
//! the four eyes of a change request on its own.

use approvals_domain::{
    Actor, ChangeInput, ChangeRequest, Decision, DomainError, IdentityProof, NewChangeRequest,
    Principal, ReviewRules, State, Timestamp,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

fn principal(name: &str) -> Principal {
    Principal::parse(name).expect("principal")
}

/// `user` as vouched for by `via` with `proof`, or with its own credential when `via` is None.
fn actor(user: &str, via: Option<&str>, proof: IdentityProof) -> Actor {
    let mut actor = Actor::new(principal(user), vec![]);
    if let Some(via) = via {
        actor.acting_principal = Some(principal(via));
        actor.proof = proof;
    }
    actor
}

fn asserted(user: &str) -> Actor {
    actor(user, Some("service:backend"), IdentityProof::Asserted)
}

fn proven(user: &str) -> Actor {
    actor(user, Some("service:backend"), IdentityProof::UserToken)
}

fn request(requester: &Actor, min_approvals: u32, independent: bool) -> ChangeRequest {
    let mut rules = ReviewRules::with_min_approvals(min_approvals);
    rules.rules.independent_approvals = independent;
    let new = NewChangeRequest {
        project: "web".into(),
        environment: "prod".into(),
        action_key: "feature_flag.update".into(),
        action_version: 1,
        title: "Roll out".into(),
        description: String::new(),
        changes: vec![ChangeInput {
            id: None,
            action: "update".into(),
            resource_type: "feature_flag".into(),
            resource_id: "checkout".into(),
            payload: serde_json::Map::new(),
            base_version: None,
        }],
        intent_display: String::new(),
        expire_time: None,
        draft: false,
        apply_time: None,
        justification: String::new(),
    };
    let mut n = 0;
    let (request, _) =
        ChangeRequest::create("cr-1".into(), new, requester, rules, NOW, &mut || {
            n += 1;
            format!("c{n}")
        })
        .expect("valid request");
    request
}

fn approve(request: &mut ChangeRequest, actor: &Actor) -> Result<(), DomainError> {
    request
        .review(actor, Decision::Approve, String::new(), NOW)
        .map(|_| ())
}

#[test]
fn the_server_default_and_new_policies_require_independence() {
    assert!(ReviewRules::server_default(1).rules.independent_approvals);
    assert!(approvals_domain::PolicyRules::default().independent_approvals);
    // A request document written before the setting existed keeps the old rule.
    let old = r#"{"min_approvals":2,"allow_self_approval":false,"rejections_to_reject":1,"dismiss_stale_approvals":true}"#;
    let snapshot: ReviewRules = serde_json::from_str(old).expect("decodes");
    assert!(!snapshot.rules.independent_approvals);
}

#[test]
fn one_credential_asserting_every_identity_never_reaches_quorum() {
    let mut request = request(&asserted("user:alice"), 2, true);
    for reviewer in ["user:bob", "user:carol"] {
        let err = approve(&mut request, &asserted(reviewer)).expect_err("not independent");
        assert!(
            matches!(&err, DomainError::NotIndependent { party, .. } if party == "service:backend"),
            "{err:?}"
        );
        assert!(!request.viewer_flags(&asserted(reviewer)).can_approve);
    }
    assert_eq!(request.approval_count(), 0);
    assert_eq!(request.state, State::InReview);
    // Rejections are never refused for lack of independence.
    request
        .review(&asserted("user:bob"), Decision::Reject, String::new(), NOW)
        .expect("a rejection");
    assert_eq!(request.state, State::Rejected);
}

#[test]
fn a_second_asserted_approval_is_refused_and_proven_ones_count() {
    // The requester proved her identity; the backend then asserts two approvers.
    let mut request = request(&proven("user:alice"), 2, true);
    approve(&mut request, &asserted("user:bob")).expect("the backend's first approval");
    assert_eq!(request.approval_count(), 1);
    assert!(!request.viewer_flags(&asserted("user:carol")).can_approve);
    let err = approve(&mut request, &asserted("user:carol")).expect_err("second asserted");
    assert!(matches!(err, DomainError::NotIndependent { .. }), "{err:?}");
    assert_eq!(request.state, State::InReview);
    // bob re-deciding through the backend replaces his own review: allowed.
    approve(&mut request, &asserted("user:bob")).expect("bob again");
    // carol's own token makes her approval hers.
    approve(&mut request, &proven("user:carol")).expect("proven approval");
    assert_eq!(request.approval_count(), 2);
    assert_eq!(request.state, State::Approved);
    let review = request
        .reviews
        .iter()
        .find(|r| r.reviewer.as_str() == "user:carol")
        .expect("carol's review");
    assert_eq!(review.proof, IdentityProof::UserToken);
    assert_eq!(
        review.acting_principal.as_ref().map(Principal::as_str),
        Some("service:backend")
    );
}

#[test]
fn without_independence_asserted_approvals_count_as_before() {
    let mut request = request(&asserted("user:alice"), 2, false);
    approve(&mut request, &asserted("user:bob")).expect("bob");
    approve(&mut request, &asserted("user:carol")).expect("carol");
    assert_eq!(request.state, State::Approved);
}

#[test]
fn the_requesters_own_approval_stays_the_self_approval_rule() {
    let mut request = request(&asserted("user:alice"), 1, true);
    let err = approve(&mut request, &asserted("user:alice")).expect_err("self approval");
    assert_eq!(err, DomainError::SelfApproval);
    // Direct callers with their own credentials are independent of each other.
    let mut request = self::request(
        &actor("user:alice", None, IdentityProof::Credential),
        2,
        true,
    );
    approve(
        &mut request,
        &actor("user:bob", None, IdentityProof::Credential),
    )
    .expect("bob");
    approve(
        &mut request,
        &actor("user:carol", None, IdentityProof::Credential),
    )
    .expect("carol");
    assert_eq!(request.state, State::Approved);
}

fn any_actor() -> impl Strategy<Value = Actor> {
    (
        0u8..4,
        prop_oneof![Just(None), Just(Some("service:a")), Just(Some("service:b"))],
        prop_oneof![
            Just(IdentityProof::Asserted),
            Just(IdentityProof::UserToken)
        ],
    )
        .prop_map(|(who, via, proof)| actor(&format!("user:u{who}"), via, proof))
}

proptest! {
    /// Whatever sequence of approvals is attempted, the approvals that count come from distinct
    /// parties, none of them the requester's, and every accepted approval is recorded with how
    /// its reviewer was proven.
    #[test]
    fn counted_approvals_come_from_distinct_parties(
        requester in any_actor(),
        approvers in prop::collection::vec(any_actor(), 0..12),
    ) {
        let mut request = request(&requester, 10, true);
        for approver in &approvers {
            let can = request.viewer_flags(approver).can_approve;
            let accepted = approve(&mut request, approver).is_ok();
            prop_assert_eq!(can, accepted, "can_approve agrees with review for {:?}", approver);
        }
        let counted = request.counted_approvals();
        let mut parties: Vec<&Principal> = counted.iter().map(|r| r.party()).collect();
        let total = parties.len();
        parties.sort();
        parties.dedup();
        prop_assert_eq!(parties.len(), total);
        prop_assert!(!parties.contains(&request.requester_party()));
        prop_assert_eq!(counted.len(), request.reviews.iter().filter(|r| !r.dismissed).count());
    }
}
