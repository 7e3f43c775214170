//! The second step of policies in the aggregate: levels, justification, reviewer diversity and
//! the overlapping-groups rule, with their properties.

use approvals_domain::{
    Actor, AntiCollusion, ChangeInput, ChangeRequest, Decision, DomainError, GroupRequirement,
    JustificationRule, Level, NewChangeRequest, PolicyRules, PolicySnapshot, Principal,
    ReciprocalApproval, State, Timestamp, requirements,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);
const HOUR: i64 = 3_600_000_000;

fn actor(name: &str, groups: &[&str]) -> Actor {
    Actor::caller(name, groups.iter().map(|g| (*g).to_owned()).collect()).expect("principal")
}

fn principal(text: &str) -> Principal {
    Principal::parse(text).expect("principal")
}

fn requirement(group: &str, min_approvals: u32) -> GroupRequirement {
    GroupRequirement::new(principal(&format!("group:{group}")), min_approvals)
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

fn new_request(justification: &str) -> NewChangeRequest {
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
            payload: serde_json::Map::new(),
            base_version: None,
        }],
        intent_display: String::new(),
        expire_time: None,
        draft: false,
        apply_time: None,
        justification: justification.into(),
    }
}

fn create(policy: PolicySnapshot, justification: &str) -> Result<ChangeRequest, DomainError> {
    let mut n = 0;
    ChangeRequest::create(
        "cr-1".into(),
        new_request(justification),
        &actor("user:alice", &[]),
        policy,
        NOW,
        &mut || {
            n += 1;
            format!("c{n}")
        },
    )
    .map(|(r, _)| r)
}

fn request(rules: PolicyRules) -> ChangeRequest {
    create(snapshot(rules), "").expect("valid")
}

fn approve(r: &mut ChangeRequest, who: &Actor) -> Result<State, DomainError> {
    r.review(who, Decision::Approve, String::new(), NOW)
        .map(|e| e.to_state)
}

fn two_levels() -> PolicyRules {
    PolicyRules {
        levels: vec![
            Level {
                min_approvals: 1,
                approvers: vec![principal("group:leads")],
                ..Level::default()
            },
            Level {
                min_approvals: 2,
                approvers: vec![principal("group:security")],
                requirements: vec![requirement("security", 1)],
                ..Level::default()
            },
        ],
        min_approvals: 0,
        ..PolicyRules::default()
    }
}

fn field_of(err: DomainError) -> Vec<String> {
    match err {
        DomainError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn level_two_waits_for_level_one() {
    let mut r = request(two_levels());
    assert_eq!(r.current_level(), Some(1));
    let sec = actor("user:sam", &["security"]);
    assert_eq!(
        approve(&mut r, &sec),
        Err(DomainError::NotLevelApprover {
            principal: "user:sam".into(),
            level: 1
        })
    );
    assert!(!r.viewer_flags(&sec).can_approve);
    let lead = actor("user:lee", &["leads", "security"]);
    assert!(r.viewer_flags(&lead).can_approve);
    assert_eq!(approve(&mut r, &lead), Ok(State::InReview));
    assert_eq!(r.current_level(), Some(2));
    assert_eq!(r.reviews[0].level, 1);
    // One person approves at one level only.
    assert!(matches!(
        approve(&mut r, &lead),
        Err(DomainError::ApprovedAtEarlierLevel { level: 1, .. })
    ));
    assert!(r.viewer_flags(&sec).can_approve);
    assert_eq!(approve(&mut r, &sec), Ok(State::InReview));
    assert_eq!(
        approve(&mut r, &actor("user:sue", &["security"])),
        Ok(State::Approved)
    );
    let progress = r.level_progress();
    assert_eq!(progress.len(), 2);
    assert!(progress.iter().all(|p| p.passed));
    assert_eq!(progress[1].approval_count, 2);
    assert_eq!(r.current_level(), None);
}

#[test]
fn a_rejection_at_a_later_level_is_final() {
    let mut r = request(two_levels());
    approve(&mut r, &actor("user:lee", &["leads"])).expect("level 1");
    let event = r
        .review(
            &actor("user:sam", &["security"]),
            Decision::Reject,
            "no".into(),
            NOW,
        )
        .expect("reject");
    assert_eq!(event.to_state, State::Rejected);
    assert_eq!(event.detail, "level 2: no");
}

#[test]
fn level_validation_names_the_fields() {
    let mut rules = two_levels();
    rules.min_approvals = 2;
    rules.levels[1].min_approvals = 0;
    rules.levels[1]
        .requirements
        .push(requirement("security", 1));
    rules.justification.ticket_pattern = "([A-Z".into();
    rules.anti_collusion = Some(AntiCollusion { window_micros: 0 });
    let policy = approvals_domain::Policy {
        name: "p".into(),
        uid: String::new(),
        project: "web".into(),
        environment: String::new(),
        action_key: "*".into(),
        rules,
        create_time: NOW,
        update_time: NOW,
        revision: 0,
    };
    let fields = field_of(policy.validate("policy.").expect_err("invalid"));
    assert_eq!(
        fields,
        vec![
            "policy.min_approvals",
            "policy.levels[1].min_approvals",
            "policy.levels[1].requirements[1].group",
            "policy.justification.ticket_pattern",
            "policy.anti_collusion.window",
        ]
    );
}

#[test]
fn justification_and_comments_are_required_as_the_policy_says() {
    let rules = PolicyRules {
        justification: JustificationRule {
            required_on_create: true,
            ticket_pattern: r"\b[A-Z]+-[0-9]+\b".into(),
            comment_on_approve: true,
            comment_on_reject: false,
        },
        ..PolicyRules::default()
    };
    assert_eq!(
        field_of(create(snapshot(rules.clone()), " ").expect_err("empty")),
        vec!["justification"]
    );
    assert_eq!(
        field_of(create(snapshot(rules.clone()), "because").expect_err("no ticket")),
        vec!["justification"]
    );
    let mut r = create(snapshot(rules), "fixes OPS-42").expect("valid");
    assert_eq!(r.justification, "fixes OPS-42");
    assert_eq!(
        field_of(approve(&mut r, &actor("user:bob", &[])).expect_err("no comment")),
        vec!["comment"]
    );
    r.review(&actor("user:bob", &[]), Decision::Approve, "ok".into(), NOW)
        .expect("with a comment");
}

#[test]
fn anti_collusion_refuses_a_reciprocal_approval_within_the_window() {
    let rules = PolicyRules {
        anti_collusion: Some(AntiCollusion {
            window_micros: 24 * HOUR,
        }),
        ..PolicyRules::default()
    };
    let bob = actor("user:bob", &[]);
    let recent = ReciprocalApproval {
        change_request_id: "cr-bob".into(),
        approve_time: NOW.saturating_add_micros(-HOUR),
    };
    let old = ReciprocalApproval {
        change_request_id: "cr-bob".into(),
        approve_time: NOW.saturating_add_micros(-25 * HOUR),
    };
    let mut r = request(rules.clone());
    assert!(matches!(
        r.approve_refusal(&bob, Some(&recent), NOW),
        Some(DomainError::ReciprocalApproval { .. })
    ));
    assert!(matches!(
        r.review_with(&bob, Decision::Approve, String::new(), NOW, Some(&recent)),
        Err(DomainError::ReciprocalApproval { change_request_id, .. }) if change_request_id == "cr-bob"
    ));
    assert_eq!(r.approve_refusal(&bob, Some(&old), NOW), None);
    r.review_with(&bob, Decision::Approve, String::new(), NOW, Some(&old))
        .expect("outside the window");
    // Without the rule the same history changes nothing.
    let plain = request(PolicyRules::default());
    assert_eq!(plain.approve_refusal(&bob, Some(&recent), NOW), None);
}

#[test]
fn distinct_groups_need_approvers_standing_for_different_groups() {
    let mut r = request(PolicyRules {
        min_approvals: 2,
        distinct_groups: 2,
        ..PolicyRules::default()
    });
    approve(&mut r, &actor("user:a", &["sre"])).expect("a");
    assert_eq!(
        approve(&mut r, &actor("user:b", &["sre"])),
        Ok(State::InReview)
    );
    assert_eq!(
        approve(&mut r, &actor("user:c", &["sre", "dba"])),
        Ok(State::Approved)
    );
}

#[test]
fn old_snapshots_decode_with_the_earlier_rules() {
    let old = r#"{"name":"p","min_approvals":1,"requirements":[{"group":"group:sre","min_approvals":1},{"group":"group:sec","min_approvals":1}],"allow_self_approval":false,"rejections_to_reject":1,"dismiss_stale_approvals":true}"#;
    let snapshot: PolicySnapshot = serde_json::from_str(old).expect("decodes");
    assert!(snapshot.rules.levels.is_empty());
    assert!(!snapshot.rules.count_approver_once);
    assert!(snapshot.rules.justification.is_empty());
    assert_eq!(snapshot.rules.anti_collusion, None);
    // One reviewer in both groups still meets both, as before.
    let mut r = create(snapshot, "").expect("valid");
    assert_eq!(
        approve(&mut r, &actor("user:bob", &["sre", "sec"])),
        Ok(State::Approved)
    );
}

const GROUPS: [&str; 3] = ["sre", "sec", "dba"];

fn approvers_strategy() -> impl Strategy<Value = Vec<Vec<String>>> {
    prop::collection::vec(
        prop::sample::subsequence(GROUPS.to_vec(), 0..=3)
            .prop_map(|g| g.into_iter().map(str::to_owned).collect::<Vec<_>>()),
        0..7,
    )
}

fn requirements_strategy() -> impl Strategy<Value = Vec<GroupRequirement>> {
    (0u32..3, 0u32..3, 0u32..3).prop_map(|(a, b, c)| {
        GROUPS
            .iter()
            .zip([a, b, c])
            .filter(|(_, n)| *n > 0)
            .map(|(g, n)| requirement(g, n))
            .collect()
    })
}

/// Brute force: some assignment of each approver to at most one requirement whose group they
/// hold gives every requirement its minimum.
fn brute_force(requirements: &[GroupRequirement], approvers: &[Vec<String>]) -> bool {
    fn go(i: usize, left: &mut Vec<u32>, reqs: &[GroupRequirement], who: &[Vec<String>]) -> bool {
        if left.iter().all(|n| *n == 0) {
            return true;
        }
        if i == who.len() {
            return false;
        }
        if go(i + 1, left, reqs, who) {
            return true;
        }
        for (k, req) in reqs.iter().enumerate() {
            if left[k] > 0 && who[i].iter().any(|g| g == req.group_name()) {
                left[k] -= 1;
                let found = go(i + 1, left, reqs, who);
                left[k] += 1;
                if found {
                    return true;
                }
            }
        }
        false
    }
    let mut left: Vec<u32> = requirements.iter().map(|r| r.min_approvals).collect();
    go(0, &mut left, requirements, approvers)
}

fn met(requirements: &[GroupRequirement], approvers: &[Vec<String>]) -> bool {
    let refs: Vec<&[String]> = approvers.iter().map(Vec::as_slice).collect();
    requirements::groups_met(requirements, 0, &refs, true)
}

proptest! {
    /// Overlapping groups never deadlock: the requirements are met exactly when some
    /// assignment (each approver once, toward a requirement whose group they hold) meets them;
    /// the order of approvals never matters; one more approval never un-meets them.
    #[test]
    fn overlapping_groups_never_deadlock(
        reqs in requirements_strategy(),
        approvers in approvers_strategy(),
        extra in prop::sample::subsequence(GROUPS.to_vec(), 0..=3),
    ) {
        let outcome = met(&reqs, &approvers);
        prop_assert_eq!(outcome, brute_force(&reqs, &approvers));
        let mut reversed = approvers.clone();
        reversed.reverse();
        prop_assert_eq!(met(&reqs, &reversed), outcome);
        let mut rotated = approvers.clone();
        if !rotated.is_empty() {
            rotated.rotate_left(1);
        }
        prop_assert_eq!(met(&reqs, &rotated), outcome);
        let mut more = approvers.clone();
        more.push(extra.into_iter().map(str::to_owned).collect());
        prop_assert!(!outcome || met(&reqs, &more));
    }

    /// Levels progress monotonically: whatever reviews are attempted (approvals and rejections
    /// by anyone, refused or not), the current level never goes back, every level before it has
    /// passed, and the request is approved exactly when every level passed.
    #[test]
    fn levels_progress_monotonically(
        attempts in prop::collection::vec(
            (0u8..6, prop::sample::subsequence(vec!["leads", "security", "sre"], 0..=3), any::<bool>()),
            0..25,
        ),
    ) {
        let mut rules = two_levels();
        rules.levels.push(Level {
            min_approvals: 1,
            requirements: vec![requirement("sre", 1)],
            ..Level::default()
        });
        rules.rejections_to_reject = 3;
        let mut r = request(rules);
        let rank = |r: &ChangeRequest| r.current_level().unwrap_or(u32::MAX);
        let mut before = rank(&r);
        for (who, groups, approve) in attempts {
            let who = actor(&format!("user:r{who}"), &groups);
            let decision = if approve { Decision::Approve } else { Decision::Reject };
            let _ = r.review(&who, decision, String::new(), NOW);
            let now = rank(&r);
            prop_assert!(now >= before, "level went from {} to {}", before, now);
            before = now;
            let progress = r.level_progress();
            for p in &progress {
                prop_assert_eq!(p.passed, p.level < now);
            }
            if r.state == State::Approved {
                prop_assert!(progress.iter().all(|p| p.passed));
            }
            if r.state == State::InReview {
                prop_assert!(r.current_level().is_some());
            }
        }
    }
}

fn with_rollout(rollout: i64) -> NewChangeRequest {
    let mut new = new_request("");
    new.changes[0].payload = serde_json::json!({ "rollout": rollout })
        .as_object()
        .cloned()
        .unwrap_or_default();
    new
}

fn security_above_50() -> PolicyRules {
    PolicyRules {
        min_approvals: 1,
        requirements: vec![GroupRequirement {
            condition: "changes.exists(c, c.payload.rollout > 50)".into(),
            ..requirement("security", 1)
        }],
        ..PolicyRules::default()
    }
}

fn create_new(rules: PolicyRules, new: NewChangeRequest) -> ChangeRequest {
    ChangeRequest::create(
        "cr-1".into(),
        new,
        &actor("user:alice", &[]),
        snapshot(rules),
        NOW,
        &mut || "c1".into(),
    )
    .expect("valid")
    .0
}

#[test]
fn a_condition_adds_a_requirement_and_follows_edits() {
    let mut small = create_new(security_above_50(), with_rollout(10));
    assert!(small.policy.matched_conditions.is_empty());
    assert_eq!(
        approve(&mut small, &actor("user:bob", &[])),
        Ok(State::Approved)
    );

    let mut big = create_new(security_above_50(), with_rollout(80));
    assert_eq!(
        big.policy.matched_conditions,
        vec!["requirements[0].condition"]
    );
    assert_eq!(
        approve(&mut big, &actor("user:bob", &[])),
        Ok(State::InReview)
    );
    assert_eq!(
        approve(&mut big, &actor("user:sam", &["security"])),
        Ok(State::Approved)
    );

    // An edit that raises the rollout brings the requirement in.
    let mut edited = create_new(security_above_50(), with_rollout(10));
    let patch = approvals_domain::ChangeRequestPatch {
        changes: Some(with_rollout(90).changes),
        ..Default::default()
    };
    edited
        .update(&actor("user:alice", &[]), patch, NOW, &mut || "c2".into())
        .expect("edit");
    assert_eq!(
        edited.policy.matched_conditions,
        vec!["requirements[0].condition"]
    );
    assert_eq!(
        approve(&mut edited, &actor("user:bob", &[])),
        Ok(State::InReview)
    );

    // A failed evaluation (no rollout key) counts as a match: fail closed.
    let mut missing = new_request("");
    missing.changes[0].payload = serde_json::Map::new();
    let failed = create_new(security_above_50(), missing);
    assert_eq!(
        failed.policy.matched_conditions,
        vec!["requirements[0].condition"]
    );
    assert_eq!(failed.policy.condition_errors.len(), 1);
}

#[test]
fn a_policy_condition_decides_whether_it_governs() {
    let policy = |name: &str, action_key: &str, condition: &str| approvals_domain::Policy {
        name: name.into(),
        uid: String::new(),
        project: "web".into(),
        environment: String::new(),
        action_key: action_key.into(),
        rules: PolicyRules {
            min_approvals: if condition.is_empty() { 1 } else { 3 },
            condition: condition.into(),
            ..PolicyRules::default()
        },
        create_time: NOW,
        update_time: NOW,
        revision: 1,
    };
    let policies = vec![
        policy(
            "big-rollouts",
            "feature_flag.update",
            "changes.exists(c, c.payload.rollout > 50)",
        ),
        policy("default", "*", ""),
    ];
    let alice = principal("user:alice");
    let pick = |rollout| {
        let new = with_rollout(rollout);
        PolicySnapshot::select_for(&policies, &new.facts(&alice, &[]), 1).name
    };
    assert_eq!(pick(80), "big-rollouts");
    assert_eq!(pick(10), "default");
}

fn token_soup() -> impl Strategy<Value = String> {
    let tokens = vec![
        "changes",
        "c",
        ".",
        "payload",
        "rollout",
        "exists",
        "all",
        "map",
        "filter",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        ">",
        "<",
        "==",
        "!",
        "-",
        "+",
        "*",
        "/",
        "%",
        "&&",
        "||",
        "?",
        "1",
        "0",
        "50",
        "1.5",
        "'x'",
        "true",
        "null",
        "size",
        "in",
        "project",
        "requester_groups",
        "matches",
        "'a+'",
        " ",
        "has",
        "int",
        "string",
    ];
    prop::collection::vec(prop::sample::select(tokens), 0..40).prop_map(|t| t.concat())
}

proptest! {
    /// No condition panics, compiling or evaluating, and an accepted one stays within its
    /// bounds (it never nests macros, so its work is linear in the request).
    #[test]
    fn no_condition_panics(source in token_soup(), rollout in -100i64..200) {
        let outcome = std::panic::catch_unwind(|| {
            let accepted = approvals_domain::condition::check(&source).is_ok();
            let new = with_rollout(rollout);
            let alice = principal("user:alice");
            let groups = vec!["dev".to_owned()];
            let result = approvals_domain::condition::evaluate(&source, &new.facts(&alice, &groups));
            (accepted, result)
        });
        prop_assert!(outcome.is_ok(), "panicked on {:?}", source);
        if let Ok((accepted, result)) = outcome
            && !accepted
        {
            prop_assert!(matches!(result, approvals_domain::condition::Outcome::Failed(_)));
        }
    }
}

/// The costliest shape a condition may take (four macros over payload lists as long as a
/// request's 2 MiB allow: 8 changes of 40,000 numbers) stays bounded.
#[test]
fn the_costliest_condition_is_bounded() {
    let items: Vec<i64> = (0..40_000).collect();
    let mut new = new_request("");
    new.changes = (0..8).map(|_| new.changes[0].clone()).collect();
    for change in &mut new.changes {
        change.payload = serde_json::json!({ "items": items })
            .as_object()
            .cloned()
            .unwrap_or_default();
    }
    let source = "changes[0].payload.items.exists(i, i < 0) || changes[1].payload.items.exists(i, i < 0) || changes[2].payload.items.filter(i, i < 0).size() > 0 || changes.exists(c, c.payload.items.size() > 50000)";
    approvals_domain::condition::check(source).expect("allowed");
    let alice = principal("user:alice");
    let started = std::time::Instant::now();
    let outcome = approvals_domain::condition::evaluate(source, &new.facts(&alice, &[]));
    let took = started.elapsed();
    eprintln!("costliest condition: {took:?}");
    assert_eq!(outcome, approvals_domain::condition::Outcome::NotMatched);
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
}
