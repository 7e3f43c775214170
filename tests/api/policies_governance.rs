//! Policy governance through the real server: protected policies changed only under four eyes
//! (a change request on project `_policies`), and shadow policies whose verdicts are recorded.

use approvals::pb::{self, State};
use tonic::Code;

use crate::{
    callers::*,
    common::{TestServer, assert_error, assert_invalid, new_request, payload, state},
};

fn policy(name: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        project: "web".into(),
        action_key: "*".into(),
        min_approvals: 1,
        ..Default::default()
    }
}

async fn admin(server: &TestServer) -> Policies {
    policies(server, Headers::actor("user:root")).await
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

/// A `_policies` request replacing `name` with `body`.
fn policy_update(name: &str, body: serde_json::Value) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: "_policies".into(),
        environment: String::new(),
        action_key: "policy.update".into(),
        action_version: 1,
        title: format!("Change policy {name}"),
        changes: vec![pb::Change {
            action: "update".into(),
            resource_type: "policy".into(),
            resource_id: name.into(),
            payload: Some(payload(body)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn as_json(policy: &pb::Policy) -> serde_json::Value {
    approvals::client::json::to_json(policy, "approvals.v1.Policy", false).expect("policy json")
}

/// A protected policy is refused on direct update and delete with POLICY_PROTECTED, a bad
/// replacement is refused when its change request is created, and an approved change request
/// on `_policies` changes it (applied by the service itself, APPLIED by system:approvals).
#[tokio::test]
async fn protected_policy_changes_only_through_an_approved_change_request() {
    let server = TestServer::start().await;
    // Protecting is allowed directly.
    let created = create_policy(&server, policy("guarded")).await;
    let mut root = admin(&server).await;
    let protected = root
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                protected: true,
                ..created.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["protected".into()],
            }),
        })
        .await
        .expect("protect directly")
        .into_inner();
    assert!(protected.protected);

    // Every direct change of it is refused now, un-protecting included.
    for (paths, body) in [
        (
            vec!["min_approvals".to_owned()],
            pb::Policy {
                min_approvals: 2,
                ..protected.clone()
            },
        ),
        (
            vec!["protected".to_owned()],
            pb::Policy {
                protected: false,
                ..protected.clone()
            },
        ),
    ] {
        let refused = root
            .update_policy(pb::UpdatePolicyRequest {
                policy: Some(body),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await
            .expect_err("direct update of a protected policy");
        assert_error(&refused, Code::FailedPrecondition, "POLICY_PROTECTED");
    }
    let refused = root
        .delete_policy(pb::DeletePolicyRequest {
            name: "guarded".into(),
            etag: String::new(),
        })
        .await
        .expect_err("direct delete of a protected policy");
    let message = assert_error(&refused, Code::FailedPrecondition, "POLICY_PROTECTED");
    assert!(message.contains("_policies"), "{message}");

    // A bad replacement is refused at create, naming the field inside the payload.
    let mut requester = requests(&server, Headers::actor("user:root")).await;
    let mut bad = as_json(&pb::Policy {
        min_approvals: 2,
        ..policy("guarded")
    });
    bad["minApprovals"] = serde_json::json!(-1);
    let refused = requester
        .create_change_request(policy_update("guarded", bad))
        .await
        .expect_err("a bad policy is refused at create");
    assert_invalid(&refused, &["changes[0].payload.min_approvals"]);
    let refused = requester
        .create_change_request(pb::CreateChangeRequestRequest {
            action_key: "policy.rewrite".into(),
            ..policy_update("guarded", as_json(&policy("guarded")))
        })
        .await
        .expect_err("another action on _policies");
    assert_invalid(&refused, &["action_key"]);

    // The four-eyes path: created by root, approved by bob, applied by the service.
    let wanted = pb::Policy {
        min_approvals: 2,
        protected: true,
        ..policy("guarded")
    };
    let change = requester
        .create_change_request(policy_update("guarded", as_json(&wanted)))
        .await
        .expect("create a policy change")
        .into_inner();
    assert_eq!(state(&change), State::InReview);
    let unchanged = root
        .get_policy(pb::GetPolicyRequest {
            name: "guarded".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        unchanged.min_approvals, 1,
        "nothing changes before approval"
    );
    let self_approval = requester
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the requester cannot approve their own policy change");
    assert_eq!(self_approval.code(), Code::PermissionDenied);
    let mut bob = requests(&server, Headers::actor("user:bob")).await;
    let applied = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(applied.applied_by, "system:approvals");
    let changed = root
        .get_policy(pb::GetPolicyRequest {
            name: "guarded".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(changed.min_approvals, 2);
    assert!(changed.protected);
    assert_eq!(changed.uid, created.uid, "the same policy, changed");
    server.stop().await;
}

/// An approved `_policies` request is applied whole or not at all: when one of its changes is
/// refused at apply time (its policy was deleted after the request was made), the approval is
/// answered with that refusal, no other policy of the request has changed, and the request
/// stays APPROVED without an APPLIED event.
#[tokio::test]
async fn a_policy_change_refused_midway_applies_none_of_its_changes() {
    let server = TestServer::start().await;
    for (name, action_key) in [("alpha", "flag.alpha"), ("beta", "flag.beta")] {
        create_policy(
            &server,
            pb::Policy {
                action_key: action_key.into(),
                ..policy(name)
            },
        )
        .await;
    }
    let wanted = |name: &str, action_key: &str| {
        as_json(&pb::Policy {
            action_key: action_key.into(),
            min_approvals: 3,
            ..policy(name)
        })
    };
    let mut both = policy_update("alpha", wanted("alpha", "flag.alpha"));
    let mut second = both.changes[0].clone();
    second.resource_id = "beta".into();
    second.payload = Some(payload(wanted("beta", "flag.beta")));
    both.changes.push(second);
    let mut requester = requests(&server, Headers::actor("user:root")).await;
    let change = requester
        .create_change_request(both)
        .await
        .expect("create a policy change")
        .into_inner();
    // The second policy goes away before the request is approved.
    let mut root = admin(&server).await;
    root.delete_policy(pb::DeletePolicyRequest {
        name: "beta".into(),
        etag: String::new(),
    })
    .await
    .expect("delete beta");

    let mut bob = requests(&server, Headers::actor("user:bob")).await;
    let refused = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: change.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("beta cannot be updated");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("beta"), "{refused:?}");
    let alpha = root
        .get_policy(pb::GetPolicyRequest {
            name: "alpha".into(),
        })
        .await
        .expect("get alpha")
        .into_inner();
    assert_eq!(alpha.min_approvals, 1, "alpha is not changed without beta");
    let read = bob
        .get_change_request(pb::GetChangeRequestRequest {
            id: change.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(state(&read), State::Approved);
    let events = events_of(&mut bob, &change.id).await;
    assert!(
        events
            .iter()
            .all(|e| e.kind != pb::EventKind::Applied as i32),
        "{events:?}"
    );
    server.stop().await;
}

/// A shadow policy never governs a request, but its verdict is recorded on every request it
/// matches: what it would have required, and the conditions that matched.
#[tokio::test]
async fn shadow_verdicts_are_recorded_without_enforcing() {
    let server = TestServer::start().await;
    create_policy(&server, policy("current")).await;
    let shadow = create_policy(
        &server,
        pb::Policy {
            action_key: "feature_flag.update".into(),
            mode: pb::PolicyMode::Shadow.into(),
            min_approvals: 3,
            requirements: vec![pb::GroupRequirement {
                group: "group:security".into(),
                min_approvals: 1,
                condition: "changes.exists(c, c.payload.rollout > 10)".into(),
                ..Default::default()
            }],
            ..policy("stricter")
        },
    )
    .await;
    assert_eq!(shadow.mode, i32::from(pb::PolicyMode::Shadow));
    let mut alice = requests(&server, Headers::actor("user:alice")).await;
    let request = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let snapshot = request.policy_snapshot.clone().unwrap_or_default();
    assert_eq!(
        snapshot.name, "current",
        "the shadow policy is not enforced"
    );
    assert_eq!(request.shadow_verdicts.len(), 1);
    let verdict = &request.shadow_verdicts[0];
    assert_eq!(verdict.policy, "stricter");
    assert_eq!(verdict.required_approvals, 3);
    assert_eq!(verdict.required_groups, vec!["group:security".to_owned()]);
    assert!(verdict.would_block);
    assert!(!verdict.would_auto_approve);
    assert_eq!(
        verdict.matched_conditions,
        vec!["requirements[0].condition".to_owned()]
    );
    // One approval passes the enforced policy.
    let mut bob = requests(&server, Headers::actor("user:bob")).await;
    let approved = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: request.id.clone(),
            ..Default::default()
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(state(&approved), State::Approved);
    assert_eq!(approved.shadow_verdicts, request.shadow_verdicts);
    server.stop().await;
}

/// A replay over 1,000 historical requests: counts of matched requests and of changed
/// outcomes, bounded examples, a bounded read that resumes, and nothing written.
#[tokio::test]
async fn replay_reports_changed_outcomes_over_a_thousand_requests() {
    use futures::StreamExt;

    let server = TestServer::start().await;
    create_policy(&server, policy("current")).await;
    let alice = requests(&server, Headers::actor("user:alice")).await;
    let bob = requests(&server, Headers::actor("user:bob")).await;
    const REQUESTS: usize = 1_000;
    const APPROVED: usize = 40;
    let ids: Vec<String> = futures::stream::iter(0..REQUESTS)
        .map(|i| {
            let mut alice = alice.clone();
            let mut bob = bob.clone();
            async move {
                let created = alice
                    .create_change_request(new_request())
                    .await
                    .expect("create")
                    .into_inner();
                if i < APPROVED {
                    bob.approve_change_request(pb::ApproveChangeRequestRequest {
                        id: created.id.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("approve");
                }
                created.id
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(ids.len(), REQUESTS);

    let mut root = admin(&server).await;
    let draft = pb::Policy {
        min_approvals: 2,
        ..policy("")
    };
    let head_before = root
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let report = root
        .replay_policy(pb::ReplayPolicyRequest {
            policy: Some(draft.clone()),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(report.evaluated, REQUESTS as i64);
    assert_eq!(report.matched, REQUESTS as i64);
    assert_eq!(
        report.would_block, APPROVED as i64,
        "one approval no longer passes"
    );
    assert_eq!(
        report.would_need_more_approvals,
        (REQUESTS - APPROVED) as i64,
        "the open ones would need two"
    );
    assert_eq!(report.would_pass, 0);
    assert_eq!(report.next_revision, 0, "the whole log was read");
    assert_eq!(report.examples.len(), 10, "the default bound");
    let example = &report.examples[0];
    assert_eq!(example.enforced_policy, "current");
    assert_eq!(
        (
            example.enforced_required_approvals,
            example.draft_required_approvals
        ),
        (1, 2)
    );

    // A draft for another action matches nothing; a bounded read says where to resume.
    let other = root
        .replay_policy(pb::ReplayPolicyRequest {
            policy: Some(pb::Policy {
                action_key: "deploy.*".into(),
                ..draft.clone()
            }),
            max_events: 100,
            max_examples: 1,
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(other.matched, 0);
    assert!(other.evaluated > 0 && other.evaluated <= 100);
    assert!(other.next_revision > 0, "more of the log remains");
    let refused = root
        .replay_policy(pb::ReplayPolicyRequest {
            policy: Some(pb::Policy {
                min_approvals: -1,
                ..draft.clone()
            }),
            ..Default::default()
        })
        .await
        .expect_err("a bad draft");
    assert_invalid(&refused, &["policy.min_approvals"]);

    // Read-only: no policy created, no request changed.
    let head_after = root
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(head_before, head_after);
    let listed = alice
        .clone()
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            states: vec![pb::State::Approved.into()],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.total_size, APPROVED as i32,
        "the requests are unchanged"
    );
    server.stop().await;
}
