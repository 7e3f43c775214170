//! Policy governance in the domain: protected policies refuse direct changes; shadow verdicts
//! and replays are pure (the same verdict twice, nothing mutated).

use approvals_domain::{
    Actor, ChangeInput, ChangeRequest, Decision, DomainError, GroupRequirement, NewChangeRequest,
    Policy, PolicyMode, PolicyRules, PolicySnapshot, Principal, Timestamp,
    governance::{self, ReplayOutcome},
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

fn actor(name: &str) -> Actor {
    Actor::caller(name, Vec::new()).expect("principal")
}

fn policy(name: &str, action_key: &str, rules: PolicyRules) -> Policy {
    Policy {
        name: name.into(),
        uid: format!("uid-{name}"),
        project: "web".into(),
        environment: String::new(),
        action_key: action_key.into(),
        rules,
        create_time: NOW,
        update_time: NOW,
        revision: 1,
    }
}

fn request(enforced_min: u32, rollout: i64, approvers: usize) -> ChangeRequest {
    let mut n = 0;
    let enforced = policy(
        "current",
        "*",
        PolicyRules {
            min_approvals: enforced_min,
            ..PolicyRules::default()
        },
    );
    let mut r = ChangeRequest::create(
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
        &actor("user:alice"),
        PolicySnapshot::of(&enforced, 1),
        NOW,
        &mut || {
            n += 1;
            format!("c{n}")
        },
    )
    .expect("valid")
    .0;
    for i in 0..approvers {
        // Once approved, later approvals are refused: the request keeps what it had.
        let _ = r.review(
            &actor(&format!("user:r{i}")),
            Decision::Approve,
            String::new(),
            NOW,
        );
    }
    r
}

fn draft(min: u32, condition: &str) -> Policy {
    policy(
        "draft",
        "feature_flag.update",
        PolicyRules {
            min_approvals: min,
            requirements: vec![GroupRequirement {
                condition: condition.into(),
                ..GroupRequirement::new(Principal::parse("group:security").expect("group"), 1)
            }],
            mode: PolicyMode::Shadow,
            ..PolicyRules::default()
        },
    )
}

#[test]
fn a_protected_policy_refuses_direct_changes() {
    let mut p = policy("p", "*", PolicyRules::default());
    assert!(
        governance::check_direct_change(&p).is_ok(),
        "protecting is direct"
    );
    p.rules.protected = true;
    assert!(matches!(
        governance::check_direct_change(&p),
        Err(DomainError::PolicyProtected { name }) if name == "p"
    ));
}

#[test]
fn a_shadow_policy_is_never_selected() {
    let shadow = draft(3, "");
    let enforced = policy("current", "*", PolicyRules::default());
    let both = [shadow.clone(), enforced];
    let selected = approvals_domain::select_policy(&both, "web", "prod", "feature_flag.update");
    assert_eq!(selected.map(|p| p.name.as_str()), Some("current"));
    let r = request(1, 5, 0);
    let verdicts = governance::shadow_verdicts(&both, &r.facts(&[]), 1);
    assert_eq!(verdicts.len(), 1);
    assert_eq!(verdicts[0].policy, "draft");
    assert_eq!(verdicts[0].required_approvals, 3);
}

#[test]
fn a_stricter_draft_would_block_what_passed() {
    let r = request(1, 50, 1);
    let replayed = governance::replay(&draft(2, ""), &r, &[], 1);
    assert_eq!(replayed.outcome, ReplayOutcome::WouldBlock);
    assert_eq!(
        (replayed.enforced_required, replayed.draft_required),
        (1, 2)
    );
    let open = request(3, 50, 1);
    let laxer = policy("draft", "feature_flag.*", PolicyRules::default());
    assert_eq!(
        governance::replay(&laxer, &open, &[], 1).outcome,
        ReplayOutcome::WouldPass
    );
    let other = policy("draft", "deploy.*", PolicyRules::default());
    assert_eq!(
        governance::replay(&other, &open, &[], 1).outcome,
        ReplayOutcome::NotMatched
    );
}

proptest! {
    /// Replaying never changes the request, and the same draft on the same request gives the
    /// same verdict and the same replay outcome twice.
    #[test]
    fn replay_is_pure_and_deterministic(
        enforced_min in 1u32..4,
        draft_min in 0u32..5,
        rollout in -10i64..100,
        approvers in 0usize..5,
        conditional in any::<bool>(),
    ) {
        let r = request(enforced_min, rollout, approvers);
        let before = r.clone();
        let condition = if conditional { "changes.exists(c, c.payload.rollout > 50)" } else { "" };
        let d = draft(draft_min, condition);
        let first = governance::replay(&d, &r, &[], 1);
        let second = governance::replay(&d, &r, &[], 1);
        prop_assert_eq!(&first, &second);
        prop_assert_eq!(&r, &before);
        let v1 = governance::verdict(&d, &r.facts(&[]), 1);
        let v2 = governance::verdict(&d, &r.facts(&[]), 1);
        prop_assert_eq!(&v1, &v2);
        prop_assert!(v1.is_some(), "the draft matches every request of its action");
        // More required approvals than the enforced quorum never reads as "would pass".
        if first.draft_required > first.enforced_required {
            prop_assert_ne!(first.outcome, ReplayOutcome::WouldPass);
        }
    }
}
