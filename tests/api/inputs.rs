//! Hardening of caller input (issue 20): U+0000 (NUL) in any string a caller sends is refused
//! the same way on SQLite and PostgreSQL (whose text type cannot hold it), and Timestamps and
//! Durations outside the protobuf well-known types' range are refused, each naming the field,
//! with nothing written.

use approvals::pb;
use prost_types::{Duration, FieldMask, Timestamp};

use crate::{
    callers::{Headers, Policies, policies},
    common::*,
};

const NUL: &str = "a\0b";

/// Year 10000: one second past the largest protobuf Timestamp.
const PAST_MAX_SECONDS: i64 = 253_402_300_800;

async fn admin(server: &TestServer) -> Policies {
    policies(server, Headers::actor("user:root")).await
}

fn web_policy(name: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        project: "web".into(),
        action_key: "*".into(),
        ..Default::default()
    }
}

fn with_payload(json: serde_json::Value) -> pb::Change {
    pb::Change {
        payload: Some(payload(json)),
        ..flag_change("checkout")
    }
}

async fn list_all(client: &mut Client) -> Vec<pb::ChangeRequest> {
    client
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .change_requests
}

#[tokio::test]
async fn nul_in_a_created_request_is_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let cases: Vec<(pb::CreateChangeRequestRequest, &str)> = vec![
        (
            pb::CreateChangeRequestRequest {
                project: NUL.into(),
                ..new_request()
            },
            "project",
        ),
        (
            pb::CreateChangeRequestRequest {
                environment: NUL.into(),
                ..new_request()
            },
            "environment",
        ),
        (
            pb::CreateChangeRequestRequest {
                action_key: NUL.into(),
                ..new_request()
            },
            "action_key",
        ),
        (
            pb::CreateChangeRequestRequest {
                title: NUL.into(),
                ..new_request()
            },
            "title",
        ),
        (
            pb::CreateChangeRequestRequest {
                description: NUL.into(),
                ..new_request()
            },
            "description",
        ),
        (
            pb::CreateChangeRequestRequest {
                intent_display: NUL.into(),
                ..new_request()
            },
            "intent_display",
        ),
        (
            pb::CreateChangeRequestRequest {
                request_id: NUL.into(),
                ..new_request()
            },
            "request_id",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    action: NUL.into(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            "changes[0].action",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    resource_type: NUL.into(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            "changes[0].resource_type",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    resource_id: NUL.into(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            "changes[0].resource_id",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    base_version: NUL.into(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            "changes[0].base_version",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![with_payload(serde_json::json!({"key": NUL}))],
                ..new_request()
            },
            "changes[0].payload.key",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![
                    flag_change("ok"),
                    with_payload(serde_json::json!({"meta": {"tags": ["fine", NUL]}})),
                ],
                ..new_request()
            },
            "changes[1].payload.meta.tags[1]",
        ),
        (
            pb::CreateChangeRequestRequest {
                changes: vec![with_payload(serde_json::json!({NUL: 1}))],
                ..new_request()
            },
            "changes[0].payload.a\\u0000b",
        ),
    ];
    for (request, field) in cases {
        let err = alice.create_change_request(request).await.expect_err(field);
        assert_invalid(&err, &[field]);
    }
    assert!(list_all(&mut alice).await.is_empty(), "nothing was written");
}

#[tokio::test]
async fn nul_in_reviews_comments_and_edits_is_refused_and_nothing_is_written() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let id = created.id.clone();

    let err = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.clone(),
            comment: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("approve");
    assert_invalid(&err, &["comment"]);
    let err = bob
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: id.clone(),
            comment: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("reject");
    assert_invalid(&err, &["comment"]);
    let err = alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: id.clone(),
            reason: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("cancel");
    assert_invalid(&err, &["reason"]);
    let err = bob
        .add_comment(pb::AddCommentRequest {
            id: id.clone(),
            text: NUL.into(),
        })
        .await
        .expect_err("comment");
    assert_invalid(&err, &["text"]);
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: id.clone(),
            bypass_justification: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("bypass");
    assert_invalid(&err, &["bypass_justification"]);
    let err = alice
        .complete_change_request(pb::CompleteChangeRequestRequest {
            id: id.clone(),
            success: false,
            error: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("complete error");
    assert_invalid(&err, &["error"]);
    let err = alice
        .complete_change_request(pb::CompleteChangeRequestRequest {
            id: id.clone(),
            success: true,
            result_data: Some(payload(serde_json::json!({"out": [NUL]}))),
            ..Default::default()
        })
        .await
        .expect_err("complete result_data");
    assert_invalid(&err, &["result_data.out[0]"]);

    for (path, body, field) in [
        (
            "title",
            pb::ChangeRequest {
                title: NUL.into(),
                ..Default::default()
            },
            "change_request.title",
        ),
        (
            "description",
            pb::ChangeRequest {
                description: NUL.into(),
                ..Default::default()
            },
            "change_request.description",
        ),
        (
            "intent_display",
            pb::ChangeRequest {
                intent_display: NUL.into(),
                ..Default::default()
            },
            "change_request.intent_display",
        ),
        (
            "changes",
            pb::ChangeRequest {
                changes: vec![with_payload(serde_json::json!({"k": NUL}))],
                ..Default::default()
            },
            "change_request.changes[0].payload.k",
        ),
        (
            "changes",
            pb::ChangeRequest {
                changes: vec![pb::Change {
                    resource_id: NUL.into(),
                    ..flag_change("x")
                }],
                ..Default::default()
            },
            "change_request.changes[0].resource_id",
        ),
    ] {
        let err = alice
            .update_change_request(pb::UpdateChangeRequestRequest {
                change_request: Some(pb::ChangeRequest {
                    id: id.clone(),
                    ..body
                }),
                update_mask: Some(FieldMask {
                    paths: vec![path.into()],
                }),
            })
            .await
            .expect_err(field);
        assert_invalid(&err, &[field]);
    }

    let after = get(&mut alice, &id).await;
    assert_eq!(after.etag, created.etag, "the request did not change");
    assert_eq!(state(&after), pb::State::InReview);
    assert!(after.comments.is_empty() && after.reviews.is_empty());
    assert_eq!(events(&mut alice, &id).await.len(), 1, "only CREATED");
}

#[tokio::test]
async fn nul_in_filters_and_policy_lookups_is_refused() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("list");
    assert_invalid(&err, &["project"]);

    let mut root = admin(&server).await;
    let err = root
        .get_policy(pb::GetPolicyRequest { name: NUL.into() })
        .await
        .expect_err("get policy");
    assert_invalid(&err, &["name"]);
    let err = root
        .delete_policy(pb::DeletePolicyRequest {
            name: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("delete policy");
    assert_invalid(&err, &["name"]);
    let err = root
        .list_policies(pb::ListPoliciesRequest {
            project: NUL.into(),
            ..Default::default()
        })
        .await
        .expect_err("list policies");
    assert_invalid(&err, &["project"]);
    let err = root
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                name: NUL.into(),
                min_approvals: 2,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["min_approvals".into()],
            }),
        })
        .await
        .expect_err("update policy by name");
    assert_invalid(&err, &["policy.name"]);
}

#[tokio::test]
async fn nul_in_a_policy_is_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut root = admin(&server).await;
    let schema = payload(serde_json::json!({
        "type": "object",
        "properties": {"mode": {"enum": ["on", NUL]}}
    }));
    let cases: Vec<(pb::Policy, &str)> = vec![
        (web_policy(NUL), "policy.name"),
        (
            pb::Policy {
                project: NUL.into(),
                ..web_policy("p")
            },
            "policy.project",
        ),
        (
            pb::Policy {
                environment: NUL.into(),
                ..web_policy("p")
            },
            "policy.environment",
        ),
        (
            pb::Policy {
                action_key: NUL.into(),
                ..web_policy("p")
            },
            "policy.action_key",
        ),
        (
            pb::Policy {
                approvers: vec!["user:ok".into(), "user:a\0b".into()],
                ..web_policy("p")
            },
            "policy.approvers[1]",
        ),
        (
            pb::Policy {
                requirements: vec![pb::GroupRequirement {
                    group: "group:a\0b".into(),
                    min_approvals: 1,
                    ..Default::default()
                }],
                ..web_policy("p")
            },
            "policy.requirements[0].group",
        ),
        (
            pb::Policy {
                applier_endpoint: "http://a\0b".into(),
                ..web_policy("p")
            },
            "policy.applier_endpoint",
        ),
        (
            pb::Policy {
                appliers: vec!["user:a\0b".into()],
                ..web_policy("p")
            },
            "policy.appliers[0]",
        ),
        (
            pb::Policy {
                executors: vec!["service:a\0b".into()],
                ..web_policy("p")
            },
            "policy.executors[0]",
        ),
        (
            pb::Policy {
                intent_schema: Some(schema.clone()),
                ..web_policy("p")
            },
            "policy.intent_schema.properties.mode.enum[1]",
        ),
    ];
    for (policy, field) in cases {
        let err = root
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy),
            })
            .await
            .expect_err(field);
        assert_invalid(&err, &[field]);
    }

    // An update is checked the same way and leaves the policy as it was.
    let created = root
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(web_policy("p")),
        })
        .await
        .expect("create policy")
        .into_inner();
    for (body, path, field) in [
        (
            pb::Policy {
                project: NUL.into(),
                ..web_policy("p")
            },
            "project",
            "policy.project",
        ),
        (
            pb::Policy {
                intent_schema: Some(schema.clone()),
                ..web_policy("p")
            },
            "intent_schema",
            "policy.intent_schema.properties.mode.enum[1]",
        ),
    ] {
        let err = root
            .update_policy(pb::UpdatePolicyRequest {
                policy: Some(body),
                update_mask: Some(FieldMask {
                    paths: vec![path.into()],
                }),
            })
            .await
            .expect_err(field);
        assert_invalid(&err, &[field]);
    }
    let listed = root
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .expect("list policies")
        .into_inner()
        .policies;
    assert_eq!(listed, vec![created], "only the valid policy, unchanged");
}

fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

#[tokio::test]
async fn timestamps_outside_the_protobuf_range_are_refused() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let cases: Vec<(pb::CreateChangeRequestRequest, &str)> = vec![
        (
            pb::CreateChangeRequestRequest {
                expire_time: at(PAST_MAX_SECONDS, 0),
                ..new_request()
            },
            "expire_time",
        ),
        (
            pb::CreateChangeRequestRequest {
                expire_time: at(4_000_000_000, 1_000_000_000),
                ..new_request()
            },
            "expire_time",
        ),
        (
            pb::CreateChangeRequestRequest {
                apply_time: at(PAST_MAX_SECONDS, 0),
                ..new_request()
            },
            "apply_time",
        ),
        (
            pb::CreateChangeRequestRequest {
                apply_time: at(i64::MAX / 1_000_000, 0),
                ..new_request()
            },
            "apply_time",
        ),
        (
            pb::CreateChangeRequestRequest {
                expire_time: at(-62_135_596_801, 0),
                ..new_request()
            },
            "expire_time",
        ),
    ];
    for (request, field) in cases {
        let err = alice.create_change_request(request).await.expect_err(field);
        assert_invalid(&err, &[field]);
        assert!(
            err.message().contains("9999-12-31T23:59:59.999999999Z"),
            "{}",
            err.message()
        );
    }
    assert!(list_all(&mut alice).await.is_empty(), "nothing was written");

    // The last representable instant is accepted (kept to the microsecond).
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            expire_time: at(PAST_MAX_SECONDS - 1, 999_999_999),
            ..new_request()
        },
    )
    .await;
    assert_eq!(created.expire_time, at(PAST_MAX_SECONDS - 1, 999_999_000));

    let err = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: created.id.clone(),
                expire_time: at(PAST_MAX_SECONDS, 0),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["expire_time".into()],
            }),
        })
        .await
        .expect_err("update");
    assert_invalid(&err, &["change_request.expire_time"]);
    let err = alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: created.id.clone(),
            apply_time: at(PAST_MAX_SECONDS, 0),
            ..Default::default()
        })
        .await
        .expect_err("schedule");
    assert_invalid(&err, &["apply_time"]);
    assert_eq!(get(&mut alice, &created.id).await.etag, created.etag);
}

#[tokio::test]
async fn durations_outside_the_protobuf_range_are_refused() {
    let server = TestServer::start().await;
    let mut root = admin(&server).await;
    let ttl = |seconds: i64, nanos: i32| pb::Policy {
        default_ttl: Some(Duration { seconds, nanos }),
        ..web_policy("ttl")
    };
    for (policy, case) in [
        (ttl(315_576_000_001, 0), "seconds past 10,000 years"),
        (ttl(10, 1_000_000_000), "nanos of a second or more"),
        (ttl(10, -1), "nanos of the other sign"),
        (ttl(-10, 5), "nanos of the other sign, negative"),
    ] {
        let err = root
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy),
            })
            .await
            .expect_err(case);
        assert_invalid(&err, &["policy.default_ttl"]);
        assert!(
            err.message().contains("315576000000"),
            "{case}: {}",
            err.message()
        );
    }
    let created = root
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(ttl(315_576_000_000, 999_999_999)),
        })
        .await
        .expect("the largest duration is accepted")
        .into_inner();
    let err = root
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(ttl(315_576_000_001, 0)),
            update_mask: Some(FieldMask {
                paths: vec!["default_ttl".into()],
            }),
        })
        .await
        .expect_err("update");
    assert_invalid(&err, &["policy.default_ttl"]);

    // A request under a 10,000-year ttl expires at the last representable instant, never past
    // it: every Timestamp the service returns is one a client can decode.
    let mut alice = server.client("user:alice").await;
    let request = create(&mut alice, new_request()).await;
    assert_eq!(
        request.policy_snapshot.as_ref().map(|p| p.name.as_str()),
        Some(created.name.as_str())
    );
    assert_eq!(request.expire_time, at(PAST_MAX_SECONDS - 1, 999_999_000));
}
