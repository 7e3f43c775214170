//! Policy rules that act by themselves, through the real server: risk labels (shown, filtered
//! in List and Watch), pre-approved standard changes, automatic reviews, escalation.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use approvals::pb::{
    self, State,
    change_applier_server::{ChangeApplier, ChangeApplierServer},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::{
    callers::*,
    common::{TestServer, assert_error, assert_invalid, new_request, payload, state},
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

async fn create_policy(server: &TestServer, policy: pb::Policy) -> Result<pb::Policy, Status> {
    admin(server)
        .await
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy),
        })
        .await
        .map(Response::into_inner)
}

fn with_rollout(rollout: i64) -> pb::CreateChangeRequestRequest {
    let mut request = new_request();
    request.changes[0].payload = Some(payload(
        serde_json::json!({"enabled": true, "rollout": rollout}),
    ));
    request
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

async fn approve(client: &mut RequestsClient, id: &str) -> Result<pb::ChangeRequest, Status> {
    client
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .map(Response::into_inner)
}

async fn get(client: &mut RequestsClient, id: &str) -> pb::ChangeRequest {
    client
        .get_change_request(pb::GetChangeRequestRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

fn kinds(events: &[pb::Event]) -> Vec<pb::EventKind> {
    events
        .iter()
        .map(|e| pb::EventKind::try_from(e.kind).expect("known kind"))
        .collect()
}

async fn listed(client: &mut RequestsClient, risks: &[pb::Risk]) -> Vec<String> {
    let mut ids: Vec<String> = client
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            risks: risks.iter().map(|r| *r as i32).collect(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .change_requests
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// The highest matching risk label is shown on the request, its rules are recorded in the
/// snapshot, it follows edits of the changes, and List and Watch filter by it.
#[tokio::test]
async fn risk_is_shown_and_filtered() {
    let server = TestServer::start().await;
    create_policy(
        &server,
        pb::Policy {
            risk_rules: vec![
                pb::RiskRule {
                    condition: "changes.exists(c, c.payload.rollout > 50)".into(),
                    risk: pb::Risk::High as i32,
                },
                pb::RiskRule {
                    condition: "environment == 'prod'".into(),
                    risk: pb::Risk::Low as i32,
                },
            ],
            ..policy("flags")
        },
    )
    .await
    .expect("policy");
    let mut alice = as_user(&server, "user:alice", "").await;
    let big = create(&mut alice, with_rollout(80)).await;
    let small = create(&mut alice, with_rollout(10)).await;
    let mut staging = with_rollout(10);
    staging.environment = "staging".into();
    let unlabelled = create(&mut alice, staging).await;
    assert_eq!(big.risk, pb::Risk::High as i32);
    assert_eq!(small.risk, pb::Risk::Low as i32);
    assert_eq!(unlabelled.risk, pb::Risk::Unspecified as i32);
    let snapshot = big.policy_snapshot.as_ref().expect("snapshot");
    assert_eq!(
        snapshot.matched_conditions,
        vec!["risk_rules[0].condition", "risk_rules[1].condition"]
    );
    assert_eq!(snapshot.risk_rules.len(), 2);

    assert_eq!(
        listed(&mut alice, &[pb::Risk::High]).await,
        vec![big.id.clone()]
    );
    assert_eq!(
        listed(&mut alice, &[pb::Risk::Low, pb::Risk::High]).await,
        sorted(vec![big.id.clone(), small.id.clone()])
    );
    assert_eq!(
        listed(&mut alice, &[pb::Risk::Unspecified]).await,
        vec![unlabelled.id.clone()]
    );
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            risks: vec![9],
            ..Default::default()
        })
        .await
        .expect_err("unknown risk");
    assert_invalid(&err, &["risks[0]"]);

    // A watch of HIGH requests from the start sees only the big one's events ...
    let mut watcher = as_user(&server, "user:watcher", "").await;
    let mut stream = watcher
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            risks: vec![pb::Risk::High as i32],
            start_revision: 1,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next_event(&mut stream).await;
    assert_eq!(first.change_request_id, big.id);
    // ... and the small one's once an edit makes it HIGH.
    let edited = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: small.id.clone(),
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
    assert_eq!(edited.risk, pb::Risk::High as i32);
    let next = next_event(&mut stream).await;
    assert_eq!(next.change_request_id, small.id);
    assert_eq!(next.kind, pb::EventKind::Updated as i32);
    assert_eq!(
        next.change_request.as_ref().map(|r| r.risk),
        Some(pb::Risk::High as i32)
    );
    drop(stream);

    // Bad rules are refused when the policy is written, each field named.
    let err = create_policy(
        &server,
        pb::Policy {
            risk_rules: vec![
                pb::RiskRule {
                    condition: "changes.exists(c, c.payload.rollout >)".into(),
                    risk: pb::Risk::High as i32,
                },
                pb::RiskRule {
                    condition: "true".into(),
                    risk: pb::Risk::Unspecified as i32,
                },
            ],
            action_key: "segment.*".into(),
            ..policy("bad-risks")
        },
    )
    .await
    .expect_err("invalid");
    assert_invalid(
        &err,
        &[
            "policy.risk_rules[0].condition",
            "policy.risk_rules[1].risk",
        ],
    );
    assert!(err.message().contains("at 1:"), "{}", err.message());
    server.stop().await;
}

async fn next_event(stream: &mut tonic::Streaming<pb::WatchChangeRequestsResponse>) -> pb::Event {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a message within 20 s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(event) = message.events.into_iter().next() {
            return event;
        }
    }
}

/// An applier that records the requests it is asked to apply.
#[derive(Clone, Default)]
struct Applier {
    calls: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl ChangeApplier for Applier {
    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        let request = request.into_inner();
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(request.change_request.map(|r| r.id).unwrap_or_default());
        }
        Ok(Response::new(pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            ..Default::default()
        }))
    }
}

impl Applier {
    async fn start() -> (Self, String) {
        let applier = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let service = ChangeApplierServer::new(applier.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        (applier, endpoint)
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// A standard change: the policy approves the requests it governs as they enter review, and
/// AUTO applies them, with no person reviewing; requests its condition does not match are
/// reviewed as usual.
#[tokio::test]
async fn pre_approved_standard_change_is_applied_without_review() {
    let server = TestServer::start_with(|c| {
        c.apply.poll_interval = Duration::from_millis(100);
        c.apply.deadline = Duration::from_secs(3);
    })
    .await;
    let (applier, endpoint) = Applier::start().await;
    create_policy(
        &server,
        pb::Policy {
            pre_approved: true,
            min_approvals: 2,
            condition: "changes.all(c, c.payload.rollout <= 10)".into(),
            apply_mode: pb::ApplyMode::Auto as i32,
            applier_endpoint: endpoint,
            ..policy("small-rollouts")
        },
    )
    .await
    .expect("policy");
    let mut alice = as_user(&server, "user:alice", "").await;
    let standard = create(&mut alice, with_rollout(5)).await;
    assert_eq!(state(&standard), State::Applied, "{standard:?}");
    assert_eq!(standard.reviews.len(), 1);
    let review = &standard.reviews[0];
    assert_eq!(review.reviewer, "policy:small-rollouts");
    assert_eq!(review.decision, pb::Decision::Approve as i32);
    assert_eq!(applier.calls(), vec![standard.id.clone()]);
    let history = events_of(&mut alice, &standard.id).await;
    assert_eq!(
        kinds(&history),
        vec![
            pb::EventKind::Created,
            pb::EventKind::Reviewed,
            pb::EventKind::ApplyStarted,
            pb::EventKind::Applied,
        ]
    );
    let approval = &history[1];
    assert_eq!(approval.actor, "policy:small-rollouts");
    assert_eq!(approval.from_state, State::InReview as i32);
    assert_eq!(approval.to_state, State::Approved as i32);

    // A draft is pre-approved when it is submitted.
    let draft = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            draft: true,
            ..with_rollout(10)
        },
    )
    .await;
    assert_eq!(state(&draft), State::Draft);
    let submitted = alice
        .submit_change_request(pb::SubmitChangeRequestRequest {
            id: draft.id.clone(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(state(&submitted), State::Applied, "{submitted:?}");

    // Not a standard change: the server default governs it, and a person reviews.
    let large = create(&mut alice, with_rollout(50)).await;
    assert_eq!(state(&large), State::InReview);
    assert!(large.reviews.is_empty());
    assert_eq!(applier.calls().len(), 2);
    server.stop().await;
}

/// An automatic review is recorded by the policy with its rule's reason, shown as a review and
/// an event, and counted like a person's in its group; an automatic rejection rejects.
#[tokio::test]
async fn automatic_review_is_counted_and_shown() {
    let server = TestServer::start().await;
    create_policy(
        &server,
        pb::Policy {
            min_approvals: 2,
            requirements: vec![pb::GroupRequirement {
                group: "group:security".into(),
                min_approvals: 1,
                ..Default::default()
            }],
            automatic_reviews: vec![
                pb::AutomaticReview {
                    condition: "environment == 'staging'".into(),
                    decision: pb::Decision::Reject as i32,
                    reason: "flags change in prod only".into(),
                    ..Default::default()
                },
                pb::AutomaticReview {
                    condition: "changes.all(c, c.payload.rollout <= 50)".into(),
                    decision: pb::Decision::Approve as i32,
                    reason: "small rollout: security scan passed".into(),
                    group: "group:security".into(),
                },
            ],
            ..policy("scanned")
        },
    )
    .await
    .expect("policy");
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, with_rollout(50)).await;
    assert_eq!(state(&request), State::InReview);
    assert_eq!(request.approval_count, 1, "{request:?}");
    let review = &request.reviews[0];
    assert_eq!(review.reviewer, "policy:scanned");
    assert_eq!(review.decision, pb::Decision::Approve as i32);
    assert_eq!(review.comment, "small rollout: security scan passed");
    assert_eq!(review.reviewer_groups, vec!["security"]);
    let history = events_of(&mut alice, &request.id).await;
    assert_eq!(
        kinds(&history),
        vec![pb::EventKind::Created, pb::EventKind::Reviewed]
    );
    assert_eq!(history[1].actor, "policy:scanned");

    // bob holds no group: his approval and the machine's (in security) meet the policy.
    let mut bob = as_user(&server, "user:bob", "").await;
    let approved = approve(&mut bob, &request.id).await.expect("approve");
    assert_eq!(state(&approved), State::Approved);

    // Without the machine's approval (a large rollout), bob's is not enough.
    let large = create(&mut alice, with_rollout(80)).await;
    assert!(large.reviews.is_empty());
    let after = approve(&mut bob, &large.id).await.expect("approve");
    assert_eq!(state(&after), State::InReview);

    // An automatic rejection rejects (the first matching rule decides).
    let mut staging = with_rollout(5);
    staging.environment = "staging".into();
    let rejected = create(&mut alice, staging).await;
    assert_eq!(state(&rejected), State::Rejected, "{rejected:?}");
    assert_eq!(rejected.reviews[0].comment, "flags change in prod only");

    // Bad rules are refused when the policy is written.
    let err = create_policy(
        &server,
        pb::Policy {
            automatic_reviews: vec![pb::AutomaticReview {
                condition: "nope == 1".into(),
                group: "user:carol".into(),
                ..Default::default()
            }],
            action_key: "segment.*".into(),
            ..policy("bad-reviews")
        },
    )
    .await
    .expect_err("invalid");
    assert_invalid(
        &err,
        &[
            "policy.automatic_reviews[0].decision",
            "policy.automatic_reviews[0].condition",
            "policy.automatic_reviews[0].reason",
            "policy.automatic_reviews[0].group",
        ],
    );
    server.stop().await;
}

/// After `escalate_after` in review, members of the escalation group may approve, and their
/// approval counts toward the requirement; one ESCALATED event records it.
#[tokio::test]
async fn escalation_lets_the_escalation_group_approve() {
    let server = TestServer::start_with(|c| {
        c.apply.poll_interval = Duration::from_millis(100);
    })
    .await;
    create_policy(
        &server,
        pb::Policy {
            approvers: vec!["group:security".into()],
            requirements: vec![pb::GroupRequirement {
                group: "group:security".into(),
                min_approvals: 1,
                escalate_after: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                escalate_to: vec!["group:oncall".into()],
                ..Default::default()
            }],
            ..policy("escalating")
        },
    )
    .await
    .expect("policy");
    let mut alice = as_user(&server, "user:alice", "").await;
    let request = create(&mut alice, with_rollout(50)).await;
    let mut carol = as_user(&server, "user:carol", "oncall").await;
    let seen = get(&mut carol, &request.id).await;
    assert!(!seen.can_approve);
    assert_eq!(seen.can_approve_reason, "NOT_APPROVER");
    let err = approve(&mut carol, &request.id)
        .await
        .expect_err("too early");
    assert_error(&err, Code::PermissionDenied, "NOT_APPROVER");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let escalated = loop {
        let current = get(&mut carol, &request.id).await;
        if !current.escalated_requirements.is_empty() {
            break current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not escalated within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(escalated.escalated_requirements, vec!["requirements[0]"]);
    assert!(escalated.can_approve, "{escalated:?}");
    let history = events_of(&mut alice, &request.id).await;
    let escalation: Vec<&pb::Event> = history
        .iter()
        .filter(|e| e.kind == pb::EventKind::Escalated as i32)
        .collect();
    assert_eq!(escalation.len(), 1);
    assert_eq!(escalation[0].actor, "system:approvals");
    assert!(
        escalation[0].detail.contains("group:oncall"),
        "{:?}",
        escalation[0].detail
    );
    let approved = approve(&mut carol, &request.id).await.expect("approve");
    assert_eq!(state(&approved), State::Approved);

    // Escalation settings are checked together.
    let err = create_policy(
        &server,
        pb::Policy {
            requirements: vec![pb::GroupRequirement {
                group: "group:security".into(),
                min_approvals: 1,
                escalate_to: vec!["user:dave".into(), "group:oncall".into()],
                ..Default::default()
            }],
            action_key: "segment.*".into(),
            ..policy("bad-escalation")
        },
    )
    .await
    .expect_err("invalid");
    assert_invalid(
        &err,
        &[
            "policy.requirements[0].escalate_after",
            "policy.requirements[0].escalate_to[0]",
        ],
    );
    server.stop().await;
}
