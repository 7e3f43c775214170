//! Policy rules that act by themselves: risk labels, pre-approval, automatic reviews and
//! escalation, with their properties (conditions never panic; escalation never removes
//! eligibility nor an approval).

use approvals_domain::{
    Actor, AutomaticReview, ChangeInput, ChangeRequest, Decision, EventKind, GroupRequirement,
    NewChangeRequest, PolicyRules, PolicySnapshot, Principal, Risk, RiskRule, State, Timestamp,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);
const SECOND: i64 = 1_000_000;

fn actor(name: &str, groups: &[&str]) -> Actor {
    Actor::caller(name, groups.iter().map(|g| (*g).to_owned()).collect()).expect("principal")
}

fn principal(text: &str) -> Principal {
    Principal::parse(text).expect("principal")
}

fn snapshot(rules: PolicyRules) -> PolicySnapshot {
    PolicySnapshot {
        name: "p".into(),
        uid: "uid-p".into(),
        project: "web".into(),
        environment: String::new(),
        action_key: "*".into(),
        rules,
        matched_conditions: Vec::new(),
        condition_errors: Vec::new(),
    }
}

fn request_with(rules: PolicyRules, rollout: i64) -> ChangeRequest {
    let mut n = 0;
    ChangeRequest::create(
        "cr-1".into(),
        NewChangeRequest {
            project: "web".into(),
            environment: "prod".into(),
            action_key: "feature_flag.update".into(),
            action_version: 1,
            title: "t".into(),
            description: String::new(),
            changes: vec![ChangeInput {
                id: None,
                action: "update".into(),
                resource_type: "feature_flag".into(),
                resource_id: "x".into(),
                payload: serde_json::json!({"rollout": rollout})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                base_version: None,
            }],
            intent_display: String::new(),
            expire_time: None,
            draft: false,
            apply_time: None,
            justification: String::new(),
        },
        &actor("user:alice", &[]),
        snapshot(rules),
        NOW,
        &mut || {
            n += 1;
            format!("c{n}")
        },
    )
    .expect("valid")
    .0
}

fn escalating(min_approvals: u32, after: i64) -> PolicyRules {
    PolicyRules {
        min_approvals,
        approvers: vec![principal("group:security")],
        requirements: vec![GroupRequirement {
            escalate_after_micros: Some(after),
            escalate_to: vec![principal("group:oncall")],
            ..GroupRequirement::new(principal("group:security"), 1)
        }],
        ..PolicyRules::default()
    }
}

#[test]
fn the_highest_matching_risk_wins_and_failures_count() {
    let rules = PolicyRules {
        risk_rules: vec![
            RiskRule {
                condition: "changes.exists(c, c.payload.rollout > 50)".into(),
                risk: Risk::High,
            },
            RiskRule {
                condition: "true".into(),
                risk: Risk::Low,
            },
            RiskRule {
                condition: "changes.exists(c, c.payload.missing > 1)".into(),
                risk: Risk::Medium,
            },
        ],
        ..PolicyRules::default()
    };
    // The third rule fails (no such key): it counts as matched.
    assert_eq!(request_with(rules.clone(), 10).risk, Risk::Medium);
    assert_eq!(request_with(rules, 80).risk, Risk::High);
    assert_eq!(
        request_with(PolicyRules::default(), 80).risk,
        Risk::Unspecified
    );
}

#[test]
fn pre_approval_approves_once_as_the_policy() {
    let mut r = request_with(
        PolicyRules {
            pre_approved: true,
            min_approvals: 3,
            ..PolicyRules::default()
        },
        5,
    );
    assert!(r.policy_work_pending);
    let event = r.run_policy_work(NOW).expect("approved");
    assert_eq!(event.kind, EventKind::Reviewed);
    assert_eq!(event.actor.as_str(), "policy:p");
    assert_eq!(event.to_state, State::Approved);
    assert_eq!(r.reviews.len(), 1);
    assert!(r.run_policy_work(NOW).is_none(), "done once");
}

#[test]
fn automatic_reviews_count_in_their_group_and_never_undo_a_rejection() {
    let rules = PolicyRules {
        min_approvals: 1,
        requirements: vec![GroupRequirement::new(principal("group:security"), 1)],
        automatic_reviews: vec![AutomaticReview {
            condition: "changes.all(c, c.payload.rollout < 50)".into(),
            decision: Decision::Approve,
            reason: "scan passed".into(),
            group: Some(principal("group:security")),
        }],
        ..PolicyRules::default()
    };
    let mut r = request_with(rules.clone(), 5);
    let event = r.run_policy_work(NOW).expect("reviewed");
    assert_eq!(event.to_state, State::Approved);
    assert_eq!(r.reviews[0].reviewer_groups, vec!["security"]);
    // No match: no review.
    let mut big = request_with(rules.clone(), 80);
    assert!(big.run_policy_work(NOW).is_none());
    assert!(big.reviews.is_empty());
    // A person's rejection stands.
    let mut rejected = request_with(
        PolicyRules {
            rejections_to_reject: 1,
            ..rules
        },
        5,
    );
    rejected.policy_work_pending = false;
    rejected
        .review(
            &actor("user:bob", &[]),
            Decision::Reject,
            String::new(),
            NOW,
        )
        .expect("reject");
    rejected.policy_work_pending = true;
    assert!(rejected.run_policy_work(NOW).is_none());
    assert_eq!(rejected.state, State::Rejected);
}

#[test]
fn escalation_is_recorded_once_when_due() {
    let mut r = request_with(escalating(1, 2 * SECOND), 5);
    let oncall = actor("user:carol", &["oncall"]);
    assert!(!r.viewer_flags(&oncall).can_approve);
    assert!(r.escalate(NOW.saturating_add_micros(SECOND)).is_none());
    let later = NOW.saturating_add_micros(2 * SECOND);
    let event = r.escalate(later).expect("escalated");
    assert_eq!(event.kind, EventKind::Escalated);
    assert_eq!(event.actor.as_str(), "system:approvals");
    assert_eq!(r.escalated, vec!["requirements[0]"]);
    assert!(r.escalate(later).is_none(), "recorded once");
    assert!(r.viewer_flags(&oncall).can_approve);
    r.review(&oncall, Decision::Approve, String::new(), later)
        .expect("approve");
    assert_eq!(r.state, State::Approved);
}

fn groups() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(vec!["security", "oncall", "sre"], 0..=3)
}

proptest! {
    /// Escalation only adds: whoever could approve before still can, and a request whose
    /// rules were met still is, at every time.
    #[test]
    fn escalation_never_removes_eligibility(
        min in 1u32..3,
        reviewers in proptest::collection::vec(groups(), 0..4),
        candidate in groups(),
        wait in 0i64..5,
    ) {
        let mut r = request_with(escalating(min, SECOND), 5);
        let mut time = NOW;
        for (i, held) in reviewers.iter().enumerate() {
            time = time.saturating_add_micros(1);
            let _ = r.review(
                &actor(&format!("user:r{i}"), held),
                Decision::Approve,
                String::new(),
                time,
            );
        }
        let who = actor("user:candidate", &candidate);
        let could = r.viewer_flags(&who).can_approve;
        let state = r.state;
        let progress: Vec<bool> = r.level_progress().iter().map(|p| p.passed).collect();
        let _ = r.escalate(NOW.saturating_add_micros(wait * SECOND));
        prop_assert!(!could || r.viewer_flags(&who).can_approve);
        prop_assert_eq!(r.state, state);
        let after: Vec<bool> = r.level_progress().iter().map(|p| p.passed).collect();
        for (before, after) in progress.iter().zip(&after) {
            prop_assert!(!before || *after);
        }
    }

    /// Whatever a risk rule or an automatic review says, evaluating it never panics: it
    /// matches, does not, or fails (and counts as matched).
    #[test]
    fn rule_conditions_never_panic(
        source in "[a-z_.()<>=!&|' 0-9\\[\\]]{0,60}",
        rollout in any::<i64>(),
    ) {
        let rules = PolicyRules {
            risk_rules: vec![RiskRule { condition: source.clone(), risk: Risk::High }],
            automatic_reviews: vec![AutomaticReview {
                condition: source,
                decision: Decision::Approve,
                reason: "r".into(),
                group: None,
            }],
            ..PolicyRules::default()
        };
        let mut r = request_with(rules, rollout);
        let _ = r.run_policy_work(NOW);
        let _ = r.escalate(NOW);
    }
}
