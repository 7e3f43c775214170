//! Policies in the aggregate: approvers, self-approval, group requirements, stale reviews,
//! intent schemas, and properties of quorum and precedence.

use approvals_domain::{
    Actor, ChangeInput, ChangeRequest, ChangeRequestPatch, Decision, DomainError, GroupRequirement,
    NewChangeRequest, Policy, PolicyRules, PolicySnapshot, Principal, Review, State, Timestamp,
    ValidationStatus, select_policy,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

fn actor(name: &str, groups: &[&str]) -> Actor {
    Actor::caller(name, groups.iter().map(|g| (*g).to_owned()).collect()).expect("principal")
}

fn principal(text: &str) -> Principal {
    Principal::parse(text).expect("principal")
}

fn requirement(group: &str, min_approvals: u32) -> GroupRequirement {
    GroupRequirement::new(principal(group), min_approvals)
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

fn request(policy: PolicySnapshot) -> ChangeRequest {
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
            changes: vec![change(serde_json::json!({"rollout": 5}))],
            intent_display: String::new(),
            expire_time: None,
            draft: false,
            apply_time: None,
            justification: String::new(),
        },
        &actor("user:alice", &[]),
        policy,
        NOW,
        &mut || {
            n += 1;
            format!("c{n}")
        },
    )
    .expect("valid")
    .0
}

fn change(payload: serde_json::Value) -> ChangeInput {
    ChangeInput {
        id: None,
        action: "update".into(),
        resource_type: "feature_flag".into(),
        resource_id: "x".into(),
        payload: payload.as_object().cloned().unwrap_or_default(),
        base_version: None,
    }
}

fn approve(r: &mut ChangeRequest, who: &Actor) -> Result<State, DomainError> {
    r.review(who, Decision::Approve, String::new(), NOW)
        .map(|_| r.state)
}

#[test]
fn reviewers_outside_the_approvers_are_refused() {
    let mut r = request(snapshot(PolicyRules {
        min_approvals: 1,
        approvers: vec![principal("group:sre"), principal("user:zed")],
        ..PolicyRules::default()
    }));
    let mallory = actor("user:mallory", &["dba"]);
    assert!(!r.viewer_flags(&mallory).can_approve);
    assert_eq!(
        approve(&mut r, &mallory),
        Err(DomainError::NotApprover {
            principal: "user:mallory".into()
        })
    );
    assert!(r.viewer_flags(&actor("user:zed", &[])).can_approve);
    assert_eq!(
        approve(&mut r, &actor("user:bob", &["sre"])),
        Ok(State::Approved)
    );
}

#[test]
fn self_approval_follows_the_policy() {
    let mut guarded = request(PolicySnapshot::server_default(1));
    assert_eq!(
        approve(&mut guarded, &actor("user:alice", &[])),
        Err(DomainError::SelfApproval)
    );
    let mut open = request(snapshot(PolicyRules {
        min_approvals: 1,
        allow_self_approval: true,
        ..PolicyRules::default()
    }));
    assert_eq!(
        approve(&mut open, &actor("user:alice", &[])),
        Ok(State::Approved)
    );
}

#[test]
fn every_group_requirement_must_be_met() {
    let mut r = request(snapshot(PolicyRules {
        min_approvals: 1,
        requirements: vec![
            requirement("group:security", 1),
            requirement("group:sre", 2),
        ],
        ..PolicyRules::default()
    }));
    assert_eq!(
        approve(&mut r, &actor("user:b", &["sre"])),
        Ok(State::InReview)
    );
    assert_eq!(
        approve(&mut r, &actor("user:c", &["sre"])),
        Ok(State::InReview)
    );
    assert_eq!(
        approve(&mut r, &actor("user:d", &["security"])),
        Ok(State::Approved)
    );
}

#[test]
fn one_reviewer_counts_once_per_requirement_under_the_earlier_rule() {
    let mut r = request(snapshot(PolicyRules {
        min_approvals: 1,
        requirements: vec![
            requirement("group:security", 1),
            requirement("group:sre", 2),
        ],
        count_approver_once: false,
        ..PolicyRules::default()
    }));
    let both = actor("user:carol", &["sre", "security"]);
    assert_eq!(approve(&mut r, &both), Ok(State::InReview));
    assert_eq!(
        approve(&mut r, &both),
        Ok(State::InReview),
        "a repeat replaces"
    );
    assert_eq!(
        approve(&mut r, &actor("user:b", &["sre"])),
        Ok(State::Approved)
    );
}

#[test]
fn stale_reviews_are_dismissed_or_kept_as_the_policy_says() {
    for keep in [false, true] {
        let mut r = request(snapshot(PolicyRules {
            min_approvals: 2,
            rejections_to_reject: 2,
            dismiss_stale_approvals: !keep,
            ..PolicyRules::default()
        }));
        approve(&mut r, &actor("user:bob", &[])).expect("bob approves");
        r.review(
            &actor("user:carol", &[]),
            Decision::Reject,
            String::new(),
            NOW,
        )
        .expect("carol rejects");
        let patch = ChangeRequestPatch {
            title: Some("edited".into()),
            ..Default::default()
        };
        r.update(&actor("user:alice", &[]), patch, NOW, &mut || "c9".into())
            .expect("edit");
        // Approvals and rejections alike.
        assert_eq!(r.reviews.len(), 2);
        assert!(
            r.reviews.iter().all(|rv| rv.dismissed != keep),
            "keep={keep}"
        );
        assert_eq!(r.approval_count(), u32::from(keep));
    }
}

#[test]
fn intent_schema_names_each_violation_and_sets_the_status() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"rollout": {"type": "integer", "maximum": 100}},
        "required": ["rollout"]
    });
    let policy = snapshot(PolicyRules {
        intent_schema: schema.as_object().cloned(),
        ..PolicyRules::default()
    });
    let r = request(policy.clone());
    assert_eq!(r.validation_status, ValidationStatus::Valid);
    assert_eq!(r.validate_time, Some(NOW));
    let err = policy
        .validate_intent(
            "",
            &[
                change(serde_json::json!({"rollout": 1})),
                change(serde_json::json!({"rollout": 101})),
                change(serde_json::json!({})),
            ],
        )
        .expect_err("invalid");
    let DomainError::InvalidArgument(violations) = err else {
        panic!("expected InvalidArgument")
    };
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        vec!["changes[1].payload.rollout", "changes[2].payload"]
    );
    assert_eq!(
        request(PolicySnapshot::server_default(1)).validation_status,
        ValidationStatus::Skipped
    );
}

fn reviews_strategy() -> impl Strategy<Value = Vec<Review>> {
    let groups = prop::sample::subsequence(vec!["sre", "security", "dba"], 0..=3);
    prop::collection::vec((0u8..8, groups, any::<bool>(), any::<bool>()), 0..10).prop_map(
        |entries| {
            let mut reviews: Vec<Review> = Vec::new();
            for (who, groups, approve, dismissed) in entries {
                let reviewer = principal(&format!("user:r{who}"));
                // One live review per reviewer, as the aggregate keeps them.
                if !dismissed {
                    reviews.retain(|r| r.dismissed || r.reviewer != reviewer);
                }
                reviews.push(Review {
                    reviewer,
                    decision: if approve {
                        Decision::Approve
                    } else {
                        Decision::Reject
                    },
                    comment: String::new(),
                    create_time: NOW,
                    dismissed,
                    reviewer_groups: groups.into_iter().map(str::to_owned).collect(),
                    acting_principal: None,
                    proof: Default::default(),
                    auth_method: Default::default(),
                    level: 0,
                });
            }
            reviews
        },
    )
}

fn rules_strategy() -> impl Strategy<Value = PolicyRules> {
    (1u32..4, 0u32..3, 0u32..3).prop_map(|(min, sre, security)| PolicyRules {
        min_approvals: min,
        requirements: [("group:sre", sre), ("group:security", security)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(g, n)| requirement(g, n))
            .collect(),
        // The earlier overlapping-groups rule, which these properties define; the one of new
        // policies is tested in tests/levels.rs.
        count_approver_once: false,
        ..PolicyRules::default()
    })
}

proptest! {
    /// Quorum is exactly: enough live approvals, and per requirement enough live approvers who
    /// held the group; dismissed reviews and rejections never count.
    #[test]
    fn quorum_matches_its_definition(rules in rules_strategy(), reviews in reviews_strategy()) {
        let policy = snapshot(rules.clone());
        let live: Vec<&Review> = reviews
            .iter()
            .filter(|r| !r.dismissed && r.decision == Decision::Approve)
            .collect();
        let expected = live.len() as u32 >= rules.min_approvals
            && rules.requirements.iter().all(|req| {
                let group = req.group.as_str().trim_start_matches("group:");
                live.iter().filter(|r| r.reviewer_groups.iter().any(|g| g == group)).count() as u32
                    >= req.min_approvals
            });
        prop_assert_eq!(policy.quorum_reached(&reviews), expected);
    }

    /// Adding one more live approval never undoes quorum.
    #[test]
    fn quorum_is_monotonic(rules in rules_strategy(), reviews in reviews_strategy(), groups in prop::sample::subsequence(vec!["sre", "security"], 0..=2)) {
        let policy = snapshot(rules);
        let before = policy.quorum_reached(&reviews);
        let mut more = reviews.clone();
        more.push(Review {
            reviewer: principal("user:newcomer"),
            decision: Decision::Approve,
            comment: String::new(),
            create_time: NOW,
            dismissed: false,
            reviewer_groups: groups.into_iter().map(str::to_owned).collect(),
            acting_principal: None,
            proof: Default::default(),
            auth_method: Default::default(),
            level: 0,
        });
        prop_assert!(!before || policy.quorum_reached(&more));
    }

    /// The selected policy matches, and no matching policy is more specific.
    #[test]
    fn selection_picks_a_most_specific_match(
        keys in prop::collection::btree_set(
            (prop::sample::select(vec!["", "prod", "dev"]),
             prop::sample::select(vec!["*", "a*", "a.*", "a.b*", "a.b.c", "a.b.d", "b.*"])),
            0..12),
        environment in prop::sample::select(vec!["prod", "dev", "qa"]),
        action_key in prop::sample::select(vec!["a.b.c", "a.b.d", "a.x", "b.y", "c"]),
    ) {
        let policies: Vec<Policy> = keys
            .iter()
            .enumerate()
            .map(|(i, (env, key))| Policy {
                name: format!("p{i}"),
                uid: format!("uid-{i}"),
                project: "web".into(),
                environment: (*env).into(),
                action_key: (*key).into(),
                rules: PolicyRules::default(),
                create_time: NOW,
                update_time: NOW,
                revision: 1,
            })
            .collect();
        let chosen = select_policy(&policies, "web", environment, action_key);
        let best = policies
            .iter()
            .filter_map(|p| p.specificity("web", environment, action_key))
            .max();
        match chosen {
            None => prop_assert!(best.is_none()),
            Some(p) => {
                let s = p.specificity("web", environment, action_key);
                prop_assert!(s.is_some());
                prop_assert_eq!(s, best);
                if !p.environment.is_empty() {
                    prop_assert_eq!(p.environment.as_str(), environment);
                }
            }
        }
    }
}
