//! Approval policies through the real server: CRUD, precedence, the snapshot a request keeps,
//! approvers, self-approval, group requirements, stale reviews, intent schemas, pending_for_me.

use approvals::pb::{self, State};
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    callers::*,
    common::{TestServer, assert_error, assert_invalid, flag_change, new_request, payload, state},
};

fn policy(name: &str, environment: &str, action_key: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        project: "web".into(),
        environment: environment.into(),
        action_key: action_key.into(),
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

async fn create_policy(admin: &mut Policies, policy: pb::Policy) -> pb::Policy {
    admin
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
) -> pb::ChangeRequest {
    client
        .create_change_request(request)
        .await
        .expect("create")
        .into_inner()
}

async fn approve(
    client: &mut RequestsClient,
    id: &str,
) -> Result<pb::ChangeRequest, tonic::Status> {
    client
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn snapshot_name(request: &pb::ChangeRequest) -> &str {
    request
        .policy_snapshot
        .as_ref()
        .map(|p| p.name.as_str())
        .expect("policy_snapshot is set")
}

#[tokio::test]
async fn policies_crud_with_etags_and_uniqueness() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let created = create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 2,
            approvers: vec!["group:sre".into(), "user:zed".into()],
            requirements: vec![pb::GroupRequirement {
                group: "group:sre".into(),
                min_approvals: 1,
                ..Default::default()
            }],
            default_ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            apply_mode: pb::ApplyMode::Manual as i32,
            applier_endpoint: "http://127.0.0.1:8443".into(),
            ..policy("web-prod-flags", "prod", "feature_flag.*")
        },
    )
    .await;
    assert!(!created.etag.is_empty());
    assert_eq!(created.dismiss_stale_approvals, Some(true));
    assert_eq!(created.rejections_to_reject, 1);
    assert!(created.create_time.is_some());

    let read = admin
        .get_policy(pb::GetPolicyRequest {
            name: "web-prod-flags".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read, created);

    // Same name, or same project/environment/action_key: ALREADY_EXISTS.
    for duplicate in [
        policy("web-prod-flags", "", "other"),
        policy("another-name", "prod", "feature_flag.*"),
    ] {
        let err = admin
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(duplicate),
            })
            .await
            .expect_err("duplicate");
        assert_error(&err, Code::AlreadyExists, "POLICY_ALREADY_EXISTS");
    }

    let err = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                approvers: vec!["sre".into()],
                requirements: vec![pb::GroupRequirement {
                    group: "group:sre".into(),
                    min_approvals: 0,
                    ..Default::default()
                }],
                intent_schema: Some(payload(serde_json::json!({"type": 5}))),
                ..policy("", "", "feature*.x")
            }),
        })
        .await
        .expect_err("invalid");
    assert_invalid(
        &err,
        &[
            "policy.approvers[0]",
            "policy.name",
            "policy.action_key",
            "policy.requirements[0].min_approvals",
            "policy.intent_schema",
        ],
    );

    // Update through a mask; a stale etag is ABORTED.
    let updated = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                min_approvals: 3,
                allow_self_approval: true,
                etag: created.etag.clone(),
                ..policy("web-prod-flags", "ignored", "ignored")
            }),
            update_mask: Some(FieldMask {
                paths: vec!["min_approvals".into(), "allow_self_approval".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.min_approvals, 3);
    assert!(updated.allow_self_approval);
    assert_eq!(updated.environment, "prod", "fields outside the mask stay");
    assert_ne!(updated.etag, created.etag);
    let err = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                etag: created.etag.clone(),
                ..policy("web-prod-flags", "", "")
            }),
            update_mask: Some(FieldMask {
                paths: vec!["min_approvals".into()],
            }),
        })
        .await
        .expect_err("stale etag");
    assert_error(&err, Code::Aborted, "ETAG_MISMATCH");
    let err = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(policy("web-prod-flags", "", "")),
            update_mask: Some(FieldMask {
                paths: vec!["name".into()],
            }),
        })
        .await
        .expect_err("name is not updatable");
    assert_invalid(&err, &["update_mask.paths[0]"]);

    create_policy(&mut admin, policy("web-default", "", "*")).await;
    let listed = admin
        .list_policies(pb::ListPoliciesRequest {
            project: "web".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.policies.len(), 1);
    assert_eq!(listed.policies[0].name, "web-default");
    let rest = admin
        .list_policies(pb::ListPoliciesRequest {
            project: "web".into(),
            page_size: 1,
            page_token: listed.next_page_token.clone(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.policies[0].name, "web-prod-flags");

    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "web-default".into(),
            etag: String::new(),
        })
        .await
        .expect("delete");
    let err = admin
        .get_policy(pb::GetPolicyRequest {
            name: "web-default".into(),
        })
        .await
        .expect_err("deleted");
    assert_error(&err, Code::NotFound, "POLICY_NOT_FOUND");
}

#[tokio::test]
async fn the_most_specific_policy_is_snapshotted() {
    let server = TestServer::start_with(|c| c.min_approvals = 1).await;
    let mut admin = admin(&server).await;
    for p in [
        policy("any-star", "", "*"),
        policy("any-flags", "", "feature_flag.*"),
        policy("any-exact", "", "feature_flag.update"),
        policy("prod-star", "prod", "*"),
        policy("prod-flags", "prod", "feature_flag.*"),
        policy("prod-exact", "prod", "feature_flag.update"),
    ] {
        create_policy(&mut admin, p).await;
    }
    let mut alice = as_user(&server, "user:alice", "").await;
    let cases = [
        ("prod", "feature_flag.update", "prod-exact"),
        ("prod", "feature_flag.delete", "prod-flags"),
        ("prod", "segment.update", "prod-star"),
        ("staging", "feature_flag.update", "any-exact"),
        ("staging", "feature_flag.delete", "any-flags"),
        ("staging", "segment.update", "any-star"),
    ];
    for (environment, action_key, expected) in cases {
        let created = create(
            &mut alice,
            pb::CreateChangeRequestRequest {
                environment: environment.into(),
                action_key: action_key.into(),
                ..new_request()
            },
        )
        .await;
        assert_eq!(
            snapshot_name(&created),
            expected,
            "{environment} {action_key}"
        );
    }
    // Another project has no policy: the server default, with an empty name.
    let other = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            project: "mobile".into(),
            ..new_request()
        },
    )
    .await;
    assert_eq!(snapshot_name(&other), "");
    assert_eq!(other.min_approvals, 1);
}

#[tokio::test]
async fn policy_edits_never_change_a_request_already_created() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let created_policy = create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 2,
            ..policy("web-all", "", "*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let before = create(&mut alice, new_request()).await;
    assert_eq!(before.min_approvals, 2);

    admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                min_approvals: 1,
                allow_self_approval: true,
                ..policy("web-all", "", "")
            }),
            update_mask: Some(FieldMask {
                paths: vec!["min_approvals".into(), "allow_self_approval".into()],
            }),
        })
        .await
        .expect("update");

    let mut bob = as_user(&server, "user:bob", "").await;
    let after_edit = approve(&mut bob, &before.id).await.expect("bob approves");
    assert_eq!(state(&after_edit), State::InReview, "still needs 2");
    assert_eq!(after_edit.min_approvals, 2);
    assert_eq!(after_edit.policy_snapshot, before.policy_snapshot);
    let err = approve(&mut alice, &before.id).await.expect_err("self");
    assert_error(&err, Code::PermissionDenied, "SELF_APPROVAL_FORBIDDEN");

    // A request created now takes the edited policy; deleting it leaves requests alone.
    let newer = create(&mut alice, new_request()).await;
    assert_eq!(newer.min_approvals, 1);
    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "web-all".into(),
            etag: String::new(),
        })
        .await
        .expect("delete");
    let read = bob
        .get_change_request(pb::GetChangeRequestRequest {
            id: before.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.policy_snapshot, before.policy_snapshot);
    assert_eq!(
        read.policy_snapshot.as_ref().map(|p| p.name.as_str()),
        Some(created_policy.name.as_str())
    );
}

#[tokio::test]
async fn self_approval_is_refused_unless_the_policy_allows_it() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    create_policy(
        &mut admin,
        pb::Policy {
            allow_self_approval: true,
            ..policy("self-service", "", "self.*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;

    let guarded = create(&mut alice, new_request()).await;
    assert!(!guarded.can_approve);
    let err = approve(&mut alice, &guarded.id).await.expect_err("self");
    assert_error(&err, Code::PermissionDenied, "SELF_APPROVAL_FORBIDDEN");

    let own = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            action_key: "self.update".into(),
            ..new_request()
        },
    )
    .await;
    assert!(own.can_approve && own.is_requester);
    let approved = approve(&mut alice, &own.id).await.expect("allowed");
    assert_eq!(state(&approved), State::Approved);
}

#[tokio::test]
async fn approvers_and_group_requirements_decide_quorum() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 1,
            approvers: vec!["group:sre".into(), "group:security".into()],
            requirements: vec![
                pb::GroupRequirement {
                    group: "group:security".into(),
                    min_approvals: 1,
                    ..Default::default()
                },
                pb::GroupRequirement {
                    group: "group:sre".into(),
                    min_approvals: 2,
                    ..Default::default()
                },
            ],
            ..policy("guarded", "", "*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, new_request()).await;

    // Outside the approvers: PERMISSION_DENIED, for approving and rejecting alike.
    let mut mallory = as_user(&server, "user:mallory", "dba").await;
    let seen = mallory
        .get_change_request(pb::GetChangeRequestRequest {
            id: request.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!seen.can_approve);
    let err = approve(&mut mallory, &request.id)
        .await
        .expect_err("not an approver");
    assert_error(&err, Code::PermissionDenied, "NOT_APPROVER");
    let err = mallory
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: request.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not an approver");
    assert_error(&err, Code::PermissionDenied, "NOT_APPROVER");

    // carol is in both groups: she counts once, toward the requirement that needs her
    // (count_approver_once, the default of new policies).
    let mut carol = as_user(&server, "user:carol", "sre,security").await;
    let after_carol = approve(&mut carol, &request.id).await.expect("carol");
    assert_eq!(state(&after_carol), State::InReview, "sre needs a second");
    // Approving again replaces her review; it still counts once.
    let again = approve(&mut carol, &request.id).await.expect("carol again");
    assert_eq!(state(&again), State::InReview);
    assert_eq!(again.approval_count, 1);
    assert_eq!(
        again
            .policy_snapshot
            .as_ref()
            .and_then(|p| p.count_approver_once),
        Some(true)
    );

    let mut bob = as_user(&server, "user:bob", "sre").await;
    let after_bob = approve(&mut bob, &request.id).await.expect("bob");
    assert_eq!(
        state(&after_bob),
        State::InReview,
        "carol counts for security, so sre has one of two"
    );
    let mut frank = as_user(&server, "user:frank", "sre").await;
    let approved = approve(&mut frank, &request.id).await.expect("frank");
    assert_eq!(state(&approved), State::Approved);

    // Without anyone from security, two sre approvals are not enough.
    let second = create(&mut alice, new_request()).await;
    let mut dave = as_user(&server, "user:dave", "sre").await;
    approve(&mut bob, &second.id).await.expect("bob");
    let two_sre = approve(&mut dave, &second.id).await.expect("dave");
    assert_eq!(state(&two_sre), State::InReview, "security is missing");
    let mut erin = as_user(&server, "user:erin", "security").await;
    let done = approve(&mut erin, &second.id).await.expect("erin");
    assert_eq!(state(&done), State::Approved);
    assert_eq!(done.reviews[2].reviewer_groups, vec!["security"]);
}

#[tokio::test]
async fn edits_dismiss_earlier_reviews_unless_the_policy_keeps_them() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 2,
            dismiss_stale_approvals: Some(false),
            ..policy("keep", "", "keep.*")
        },
    )
    .await;
    create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 2,
            ..policy("dismiss", "", "*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;
    let mut bob = as_user(&server, "user:bob", "").await;
    let edit = |id: &str| pb::UpdateChangeRequestRequest {
        change_request: Some(pb::ChangeRequest {
            id: id.into(),
            title: "Edited".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["title".into()],
        }),
    };

    for (action_key, kept) in [("keep.update", true), ("feature_flag.update", false)] {
        let request = create(
            &mut alice,
            pb::CreateChangeRequestRequest {
                action_key: action_key.into(),
                ..new_request()
            },
        )
        .await;
        approve(&mut bob, &request.id).await.expect("bob");
        let edited = alice
            .update_change_request(edit(&request.id))
            .await
            .expect("edit")
            .into_inner();
        assert_eq!(edited.reviews.len(), 1);
        assert_eq!(edited.reviews[0].dismissed, !kept, "{action_key}");
        assert_eq!(edited.approval_count, u32::from(kept) as i32);
    }
}

#[tokio::test]
async fn intent_schemas_list_every_violation() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    create_policy(
        &mut admin,
        pb::Policy {
            intent_schema: Some(payload(serde_json::json!({
                "type": "object",
                "required": ["enabled"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "rollout": {"type": "integer", "minimum": 0, "maximum": 100}
                }
            }))),
            default_ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..policy("flags-schema", "", "feature_flag.*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "").await;

    let valid = create(&mut alice, new_request()).await;
    assert_eq!(
        pb::ValidationStatus::try_from(valid.validation_status),
        Ok(pb::ValidationStatus::Valid)
    );
    assert!(valid.validate_time.is_some());
    let (create_time, expire_time) = (
        valid.create_time.expect("create_time"),
        valid.expire_time.expect("default_ttl sets expire_time"),
    );
    assert_eq!(expire_time.seconds - create_time.seconds, 3600);

    let mut bad = flag_change("other");
    bad.payload = Some(payload(serde_json::json!({"rollout": 150})));
    let err = alice
        .create_change_request(pb::CreateChangeRequestRequest {
            changes: vec![flag_change("checkout"), bad],
            ..new_request()
        })
        .await
        .expect_err("schema violations");
    assert_invalid(&err, &["changes[1].payload", "changes[1].payload.rollout"]);
    let violations = err.get_details_bad_request().expect("bad request");
    assert!(
        violations.field_violations[1].description.contains("150"),
        "{violations:?}"
    );

    // An edit is checked too.
    let mut worse = flag_change("checkout");
    worse.payload = Some(payload(serde_json::json!({"enabled": "yes"})));
    let err = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: valid.id.clone(),
                changes: vec![worse],
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect_err("schema violation on update");
    assert_invalid(&err, &["change_request.changes[0].payload.enabled"]);

    // Without a schema nothing is checked.
    let skipped = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            action_key: "segment.update".into(),
            ..new_request()
        },
    )
    .await;
    assert_eq!(
        pb::ValidationStatus::try_from(skipped.validation_status),
        Ok(pb::ValidationStatus::Skipped)
    );
    assert!(skipped.validate_time.is_none());
}

#[tokio::test]
async fn pending_for_me_lists_what_the_caller_could_approve_now() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    create_policy(
        &mut admin,
        pb::Policy {
            min_approvals: 2,
            approvers: vec!["group:sre".into()],
            ..policy("sre-only", "", "*")
        },
    )
    .await;
    let mut alice = as_user(&server, "user:alice", "sre").await;
    let first = create(&mut alice, new_request()).await;
    let second = create(&mut alice, new_request()).await;
    let draft = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            draft: true,
            ..new_request()
        },
    )
    .await;

    let pending = |client: RequestsClient| async move {
        let mut client = client;
        let response = client
            .list_change_requests(pb::ListChangeRequestsRequest {
                project: "web".into(),
                pending_for_me: true,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        let ids: Vec<String> = response
            .change_requests
            .iter()
            .map(|r| r.id.clone())
            .collect();
        (ids, response.total_size)
    };
    let mut bob = as_user(&server, "user:bob", "sre").await;
    assert_eq!(
        pending(bob.clone()).await,
        (vec![second.id.clone(), first.id.clone()], 2)
    );
    approve(&mut bob, &first.id).await.expect("bob");
    assert_eq!(pending(bob.clone()).await, (vec![second.id.clone()], 1));
    // The requester, and someone outside the approvers, have nothing pending.
    assert_eq!(
        pending(as_user(&server, "user:alice", "sre").await).await.1,
        0
    );
    assert_eq!(
        pending(as_user(&server, "user:mallory", "").await).await.1,
        0
    );
    assert!(
        !pending(as_user(&server, "user:carol", "sre").await)
            .await
            .0
            .contains(&draft.id)
    );

    // Pages follow each other.
    let mut carol = as_user(&server, "user:carol", "sre").await;
    let page = carol
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.change_requests.len(), 1);
    assert_eq!(page.change_requests[0].id, second.id);
    let next = carol
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            page_size: 1,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("next page")
        .into_inner();
    assert_eq!(next.change_requests[0].id, first.id);
    assert!(next.next_page_token.is_empty());
    // A token is bound to its filter.
    let err = carol
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("other filter");
    assert_invalid(&err, &["page_token"]);
}
