//! Bad input gets a precise status naming the field; unknown ids are NOT_FOUND; a caller with
//! no identity is UNAUTHENTICATED. None of them writes anything.

use approvals::pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn create_names_each_invalid_field() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let cases: Vec<(&str, pb::CreateChangeRequestRequest, Vec<&str>)> = vec![
        (
            "no project",
            pb::CreateChangeRequestRequest {
                project: String::new(),
                ..new_request()
            },
            vec!["project"],
        ),
        (
            "no action_key",
            pb::CreateChangeRequestRequest {
                action_key: String::new(),
                ..new_request()
            },
            vec!["action_key"],
        ),
        (
            "no changes",
            pb::CreateChangeRequestRequest {
                changes: vec![],
                ..new_request()
            },
            vec!["changes"],
        ),
        (
            "negative action_version",
            pb::CreateChangeRequestRequest {
                action_version: -1,
                ..new_request()
            },
            vec!["action_version"],
        ),
        (
            "change without resource",
            pb::CreateChangeRequestRequest {
                changes: vec![
                    flag_change("ok"),
                    pb::Change {
                        resource_id: String::new(),
                        ..flag_change("x")
                    },
                ],
                ..new_request()
            },
            vec!["changes[1].resource_id"],
        ),
        (
            "change without action or type",
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    action: String::new(),
                    resource_type: String::new(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            vec!["changes[0].action", "changes[0].resource_type"],
        ),
        (
            "oversized payload",
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    payload: Some(payload(serde_json::json!({"blob": "x".repeat(300 * 1024)}))),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            vec!["changes[0].payload"],
        ),
        (
            "non-finite number",
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    payload: Some(prost_types::Struct {
                        fields: [(
                            "rollout".to_string(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::NumberValue(f64::INFINITY)),
                            },
                        )]
                        .into(),
                    }),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            vec!["changes[0].payload.rollout"],
        ),
        (
            "expire_time in the past",
            pb::CreateChangeRequestRequest {
                expire_time: Some(prost_types::Timestamp {
                    seconds: 1_000_000,
                    nanos: 0,
                }),
                ..new_request()
            },
            vec!["expire_time"],
        ),
        (
            "server-assigned change id",
            pb::CreateChangeRequestRequest {
                changes: vec![pb::Change {
                    id: "mine".into(),
                    ..flag_change("x")
                }],
                ..new_request()
            },
            vec!["changes[0].id"],
        ),
        (
            "overlong request_id",
            pb::CreateChangeRequestRequest {
                request_id: "r".repeat(129),
                ..new_request()
            },
            vec!["request_id"],
        ),
        (
            "several at once",
            pb::CreateChangeRequestRequest {
                project: String::new(),
                action_key: String::new(),
                ..new_request()
            },
            vec!["project", "action_key"],
        ),
    ];
    for (case, request, fields) in cases {
        let err = alice.create_change_request(request).await.expect_err(case);
        assert_invalid(&err, &fields);
    }
    let list = list_project(&mut alice, "web").await;
    assert_eq!(list.total_size, 0, "no refused request was written");
}

#[tokio::test]
async fn malformed_ids_are_invalid_for_every_rpc() {
    let server = TestServer::start().await;
    let mut c = server.client("user:alice").await;
    let bad = "not-a-uuid".to_string();
    let results = vec![
        c.get_change_request(pb::GetChangeRequestRequest { id: bad.clone() })
            .await
            .map(|_| ()),
        c.submit_change_request(pb::SubmitChangeRequestRequest {
            id: bad.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.approve_change_request(pb::ApproveChangeRequestRequest {
            id: bad.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.reject_change_request(pb::RejectChangeRequestRequest {
            id: bad.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.cancel_change_request(pb::CancelChangeRequestRequest {
            id: bad.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.add_comment(pb::AddCommentRequest {
            id: bad.clone(),
            text: "x".into(),
        })
        .await
        .map(|_| ()),
        c.list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: bad.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for result in results {
        assert_invalid(&result.expect_err("malformed id"), &["id"]);
    }
    let err = c
        .get_change_request(pb::GetChangeRequestRequest { id: String::new() })
        .await
        .expect_err("empty id");
    assert_invalid(&err, &["id"]);
    let err = c
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: bad,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["title".into()],
            }),
        })
        .await
        .expect_err("malformed id");
    assert_invalid(&err, &["change_request.id"]);
    let err = c
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: None,
            update_mask: None,
        })
        .await
        .expect_err("no body");
    assert_invalid(&err, &["change_request"]);
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let server = TestServer::start().await;
    let mut c = server.client("user:bob").await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let results = vec![
        c.get_change_request(pb::GetChangeRequestRequest {
            id: unknown.clone(),
        })
        .await
        .map(|_| ()),
        c.approve_change_request(pb::ApproveChangeRequestRequest {
            id: unknown.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.cancel_change_request(pb::CancelChangeRequestRequest {
            id: unknown.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.add_comment(pb::AddCommentRequest {
            id: unknown.clone(),
            text: "x".into(),
        })
        .await
        .map(|_| ()),
        c.list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: unknown.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for result in results {
        let err = result.expect_err("unknown id");
        let message = assert_error(&err, Code::NotFound, "CHANGE_REQUEST_NOT_FOUND");
        assert!(message.contains(&unknown), "{message}");
    }
}

#[tokio::test]
async fn review_and_comment_inputs_are_checked() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let err = alice
        .add_comment(pb::AddCommentRequest {
            id: created.id.clone(),
            text: "   ".into(),
        })
        .await
        .expect_err("empty comment");
    assert_invalid(&err, &["text"]);
    let mut bob = server.client("user:bob").await;
    let err = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            comment: "x".repeat(70 * 1024),
            ..Default::default()
        })
        .await
        .expect_err("oversized comment");
    assert_invalid(&err, &["comment"]);
}

#[tokio::test]
async fn callers_must_say_who_they_are() {
    let server = TestServer::start().await;
    let mut anonymous = server.anonymous().await;
    let err = anonymous
        .create_change_request(new_request())
        .await
        .expect_err("no actor");
    let message = assert_error(&err, Code::Unauthenticated, "ACTOR_MISSING");
    assert!(message.contains("x-approvals-actor"), "{message}");
    let err = anonymous
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .await
        .expect_err("no actor");
    assert_eq!(err.code(), Code::Unauthenticated);

    for bad in ["alice", "group:sre", "robot:x", "user:"] {
        let mut client = server.client(bad).await;
        let err = client
            .create_change_request(new_request())
            .await
            .expect_err("bad actor");
        let message = assert_error(&err, Code::Unauthenticated, "ACTOR_MISSING");
        assert!(message.contains(bad), "{message}");
    }
}
