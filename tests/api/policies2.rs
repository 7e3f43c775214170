//! Policies, second step, through the real server: levels, justification, reviewer diversity
//! (distinct groups, anti-collusion, overlapping groups).

use std::time::Duration;

use approvals::pb::{self, State};
use tonic::Code;

use crate::{
    callers::*,
    common::{ManualClock, TestServer, assert_error, assert_invalid, new_request, state},
};

fn policy(name: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        project: "web".into(),
        action_key: "*".into(),
        ..Default::default()
    }
}

async fn admin(server: &TestServer) -> Policies {
    policies(server, Headers::actor("user:root")).await
}

async fn as_user(server: &TestServer, actor: &str, groups: &str) -> RequestsClient {
    let headers = Headers::actor(actor);
    let headers = if groups.is_empty() {
        headers
    } else {
        headers.with(approvals::GROUPS_HEADER, groups)
    };
    requests(server, headers).await
}

async fn create_policy(server: &TestServer, policy: pb::Policy) -> pb::Policy {
    admin(server)
        .await
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy),
        })
        .await
        .expect("create policy")
        .into_inner()
}

async fn create(
    client: &mut RequestsClient,
    request: pb::CreateChangeRequestRequest,
) -> Result<pb::ChangeRequest, tonic::Status> {
    client
        .create_change_request(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn approve(
    client: &mut RequestsClient,
    id: &str,
    comment: &str,
) -> Result<pb::ChangeRequest, tonic::Status> {
    client
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.into(),
            comment: comment.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get(client: &mut RequestsClient, id: &str) -> pb::ChangeRequest {
    client
        .get_change_request(pb::GetChangeRequestRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn pending_ids(client: &mut RequestsClient) -> Vec<String> {
    client
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .change_requests
        .into_iter()
        .map(|r| r.id)
        .collect()
}

fn two_levels(name: &str) -> pb::Policy {
    pb::Policy {
        levels: vec![
            pb::ApprovalLevel {
                min_approvals: 1,
                approvers: vec!["group:leads".into()],
                ..Default::default()
            },
            pb::ApprovalLevel {
                min_approvals: 1,
                approvers: vec!["group:security".into()],
                ..Default::default()
            },
        ],
        ..policy(name)
    }
}

/// Level 2's reviewers cannot approve before level 1 passed; the request shows its current
/// level and each level's progress; pending_for_me and can_approve follow the current level;
/// the review events name their level.
#[tokio::test]
async fn level_two_reviewers_wait_for_level_one() {
    let server = TestServer::start().await;
    let stored = create_policy(&server, two_levels("staged")).await;
    assert_eq!(stored.levels.len(), 2);
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, new_request()).await.expect("create");
    assert_eq!(request.current_level, 1);
    assert_eq!(request.level_progress.len(), 2);
    assert!(request.level_progress.iter().all(|p| !p.passed));
    assert_eq!(
        request
            .policy_snapshot
            .as_ref()
            .map(|p| p.levels.len())
            .unwrap_or_default(),
        2,
        "the levels are part of the snapshot"
    );

    let mut sam = as_user(&server, "user:sam", "security").await;
    let seen = get(&mut sam, &request.id).await;
    assert!(!seen.can_approve);
    assert_eq!(seen.can_approve_reason, "NOT_LEVEL_APPROVER");
    assert!(pending_ids(&mut sam).await.is_empty());
    let err = approve(&mut sam, &request.id, "")
        .await
        .expect_err("level 2 before level 1");
    assert_error(&err, Code::PermissionDenied, "NOT_LEVEL_APPROVER");

    let mut lee = as_user(&server, "user:lee", "leads,security").await;
    assert_eq!(pending_ids(&mut lee).await, vec![request.id.clone()]);
    let after_lee = approve(&mut lee, &request.id, "fine").await.expect("lee");
    assert_eq!(state(&after_lee), State::InReview);
    assert_eq!(after_lee.current_level, 2);
    assert!(after_lee.level_progress[0].passed);
    assert_eq!(after_lee.reviews[0].level, 1);
    // One person approves at one level only, even holding both groups.
    let err = approve(&mut lee, &request.id, "")
        .await
        .expect_err("again at level 2");
    assert_error(&err, Code::PermissionDenied, "APPROVED_AT_EARLIER_LEVEL");

    assert_eq!(pending_ids(&mut sam).await, vec![request.id.clone()]);
    let seen = get(&mut sam, &request.id).await;
    assert!(seen.can_approve);
    assert_eq!(seen.can_approve_reason, "");
    let approved = approve(&mut sam, &request.id, "ok").await.expect("sam");
    assert_eq!(state(&approved), State::Approved);
    assert_eq!(approved.current_level, 0);
    assert!(approved.level_progress.iter().all(|p| p.passed));

    let events = crate::common::events(&mut server.client("user:alice").await, &request.id).await;
    let details: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == pb::EventKind::Reviewed as i32)
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(details, vec!["level 1: fine", "level 2: ok"]);
}

/// A level policy refuses a top-level quorum, and every bad level field is named.
#[tokio::test]
async fn level_and_justification_fields_are_checked_when_written() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let mut bad = two_levels("bad");
    bad.min_approvals = 2;
    bad.levels[1].min_approvals = 0;
    bad.levels[1].approvers = vec!["nobody".into()];
    bad.justification = Some(pb::JustificationRequirement {
        ticket_pattern: "([A-Z]+".into(),
        ..Default::default()
    });
    bad.anti_collusion = Some(pb::AntiCollusion { window: None });
    let err = admin
        .create_policy(pb::CreatePolicyRequest { policy: Some(bad) })
        .await
        .expect_err("invalid");
    assert_invalid(
        &err,
        &[
            "policy.levels[1].approvers[0]",
            "policy.anti_collusion.window",
            "policy.min_approvals",
            "policy.levels[1].min_approvals",
            "policy.justification.ticket_pattern",
        ],
    );
}

/// A policy may require a justification (with a ticket) on create and a comment on approve and
/// reject; a refusal names the field.
#[tokio::test]
async fn justifications_and_comments_are_required_as_the_policy_says() {
    let server = TestServer::start().await;
    create_policy(
        &server,
        pb::Policy {
            justification: Some(pb::JustificationRequirement {
                required_on_create: true,
                ticket_pattern: r"\b[A-Z]+-[0-9]+\b".into(),
                comment_on_approve: true,
                comment_on_reject: true,
            }),
            ..policy("justified")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let err = create(&mut alice, new_request())
        .await
        .expect_err("no justification");
    assert_invalid(&err, &["justification"]);
    let err = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            justification: "because I said so".into(),
            ..new_request()
        },
    )
    .await
    .expect_err("no ticket");
    assert_invalid(&err, &["justification"]);
    assert!(err.message().contains("ticket"), "{}", err.message());

    let request = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            justification: "rollout for OPS-1234".into(),
            ..new_request()
        },
    )
    .await
    .expect("with a ticket");
    assert_eq!(request.justification, "rollout for OPS-1234");

    let mut bob = as_user(&server, "user:bob", "").await;
    let err = approve(&mut bob, &request.id, " ")
        .await
        .expect_err("no comment");
    assert_invalid(&err, &["comment"]);
    let err = bob
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: request.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no comment");
    assert_invalid(&err, &["comment"]);
    let approved = approve(&mut bob, &request.id, "checked the ticket")
        .await
        .expect("with a comment");
    assert_eq!(state(&approved), State::Approved);
}

/// Anti-collusion: bob may not approve alice's request while alice's approval of a request of
/// bob lies within the window; `can_approve` says why; once the window passed, he may.
#[tokio::test]
async fn reciprocal_approvals_within_the_window_are_refused() {
    let clock = ManualClock::now();
    let server = TestServer::start_with_clock(clock.clone(), |_| {}).await;
    create_policy(
        &server,
        pb::Policy {
            anti_collusion: Some(pb::AntiCollusion {
                window: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            }),
            ..policy("no-collusion")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let mut bob = as_user(&server, "user:bob", "").await;
    let mut carol = as_user(&server, "user:carol", "").await;
    let bobs = create(&mut bob, new_request()).await.expect("bob's");
    approve(&mut alice, &bobs.id, "")
        .await
        .expect("alice approves bob's request");

    let alices = create(&mut alice, new_request()).await.expect("alice's");
    let seen = get(&mut bob, &alices.id).await;
    assert!(!seen.can_approve);
    assert_eq!(seen.can_approve_reason, "RECIPROCAL_APPROVAL");
    let err = approve(&mut bob, &alices.id, "")
        .await
        .expect_err("reciprocal");
    assert_error(&err, Code::PermissionDenied, "RECIPROCAL_APPROVAL");
    assert!(err.message().contains(&bobs.id), "{}", err.message());
    // Someone else may.
    assert!(get(&mut carol, &alices.id).await.can_approve);

    clock.advance(Duration::from_secs(3601));
    let second = create(&mut alice, new_request()).await.expect("later");
    assert!(get(&mut bob, &second.id).await.can_approve);
    let approved = approve(&mut bob, &second.id, "")
        .await
        .expect("outside the window");
    assert_eq!(state(&approved), State::Approved);
}

/// distinct_groups: two approvals from one group are not two groups; a reviewer in two groups
/// stands for one of them.
#[tokio::test]
async fn distinct_groups_need_approvers_from_different_groups() {
    let server = TestServer::start().await;
    create_policy(
        &server,
        pb::Policy {
            min_approvals: 2,
            distinct_groups: 2,
            ..policy("diverse")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, new_request()).await.expect("create");
    let mut a = as_user(&server, "user:a", "sre").await;
    let mut b = as_user(&server, "user:b", "sre").await;
    let mut c = as_user(&server, "user:c", "sre,dba").await;
    approve(&mut a, &request.id, "").await.expect("a");
    let two_sre = approve(&mut b, &request.id, "").await.expect("b");
    assert_eq!(state(&two_sre), State::InReview, "one group twice");
    let done = approve(&mut c, &request.id, "").await.expect("c");
    assert_eq!(state(&done), State::Approved);
}

/// A policy stored with count_approver_once false keeps the earlier rule: one reviewer in two
/// required groups meets both.
#[tokio::test]
async fn count_approver_once_false_keeps_the_earlier_rule() {
    let server = TestServer::start().await;
    let stored = create_policy(
        &server,
        pb::Policy {
            min_approvals: 1,
            requirements: vec![
                pb::GroupRequirement {
                    group: "group:sre".into(),
                    min_approvals: 1,
                    ..Default::default()
                },
                pb::GroupRequirement {
                    group: "group:security".into(),
                    min_approvals: 1,
                    ..Default::default()
                },
            ],
            count_approver_once: Some(false),
            ..policy("each")
        },
    )
    .await;
    assert_eq!(stored.count_approver_once, Some(false));
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, new_request()).await.expect("create");
    let mut carol = as_user(&server, "user:carol", "sre,security").await;
    let done = approve(&mut carol, &request.id, "").await.expect("carol");
    assert_eq!(state(&done), State::Approved);
}

fn with_rollout(rollout: i64) -> pb::CreateChangeRequestRequest {
    let mut request = new_request();
    request.changes[0].payload = Some(crate::common::payload(
        serde_json::json!({ "enabled": true, "rollout": rollout }),
    ));
    request
}

/// A CEL condition on a requirement adds it to the requests it matches; the snapshot records
/// which conditions matched; an edit of the changes evaluates them again; a condition that
/// does not compile is refused with its position.
#[tokio::test]
async fn a_cel_condition_adds_a_requirement() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let err = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                requirements: vec![pb::GroupRequirement {
                    group: "group:security".into(),
                    min_approvals: 1,
                    condition: "changes.exists(c, c.payload.rollout >)".into(),
                    ..Default::default()
                }],
                condition: "launch(project)".into(),
                ..policy("broken")
            }),
        })
        .await
        .expect_err("does not compile");
    assert_invalid(
        &err,
        &["policy.requirements[0].condition", "policy.condition"],
    );
    assert!(err.message().contains("at 1:"), "{}", err.message());
    assert!(
        err.message().contains("unknown function"),
        "{}",
        err.message()
    );

    create_policy(
        &server,
        pb::Policy {
            min_approvals: 1,
            requirements: vec![pb::GroupRequirement {
                group: "group:security".into(),
                min_approvals: 1,
                condition: "changes.exists(c, c.payload.rollout > 50)".into(),
                ..Default::default()
            }],
            ..policy("rollouts")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let mut bob = as_user(&server, "user:bob", "").await;
    let mut sam = as_user(&server, "user:sam", "security").await;

    let small = create(&mut alice, with_rollout(10)).await.expect("small");
    let snapshot = small.policy_snapshot.as_ref().expect("snapshot");
    assert!(snapshot.matched_conditions.is_empty());
    let done = approve(&mut bob, &small.id, "").await.expect("bob");
    assert_eq!(state(&done), State::Approved, "no security needed at 10%");

    let big = create(&mut alice, with_rollout(80)).await.expect("big");
    let snapshot = big.policy_snapshot.as_ref().expect("snapshot");
    assert_eq!(
        snapshot.matched_conditions,
        vec!["requirements[0].condition"]
    );
    let after_bob = approve(&mut bob, &big.id, "").await.expect("bob");
    assert_eq!(
        state(&after_bob),
        State::InReview,
        "security is required above 50%"
    );
    let done = approve(&mut sam, &big.id, "").await.expect("sam");
    assert_eq!(state(&done), State::Approved);

    // Raising the rollout of a small request brings the requirement in.
    let edited = create(&mut alice, with_rollout(10)).await.expect("edited");
    let raised = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: edited.id.clone(),
                changes: with_rollout(90).changes,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(
        raised
            .policy_snapshot
            .as_ref()
            .map(|p| p.matched_conditions.clone())
            .unwrap_or_default(),
        vec!["requirements[0].condition"]
    );
    let after_bob = approve(&mut bob, &edited.id, "").await.expect("bob");
    assert_eq!(state(&after_bob), State::InReview);
}
