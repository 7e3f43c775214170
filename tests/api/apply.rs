//! Applying approved changes, with a real `ChangeApplier` server started by each test: AUTO,
//! MANUAL and EXTERNAL modes, retries, deadlines, schedules, expiry, conflicts, break-glass,
//! and exactly-once across a crash and across replicas.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use approvals::{
    auth::AuthConfig,
    pb::{
        self, EventKind, State,
        change_applier_server::{ChangeApplier, ChangeApplierServer},
        policies_client::PoliciesClient,
    },
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use crate::{callers::*, common::*};

/// What the test applier answers to one call.
#[derive(Clone)]
enum Reply {
    Applied(Vec<(&'static str, &'static str, &'static str)>),
    Failed(&'static str),
    Conflict(&'static str),
    Status(Code),
    /// Answer `Applied` after this long.
    Slow(Duration),
}

#[derive(Clone, Default)]
struct Applier {
    calls: Arc<Mutex<Vec<pb::ApplyChangesRequest>>>,
    /// When each call arrived.
    arrivals: Arc<Mutex<Vec<std::time::Instant>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

#[tonic::async_trait]
impl ChangeApplier for Applier {
    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        self.arrivals
            .lock()
            .expect("arrivals")
            .push(std::time::Instant::now());
        let request = request.into_inner();
        self.calls.lock().expect("calls").push(request);
        let reply = self
            .script
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or(Reply::Applied(vec![]));
        let applied = |versions: Vec<(&str, &str, &str)>| pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            result_data: Some(payload(serde_json::json!({"deployed": true}))),
            resource_versions: versions
                .into_iter()
                .map(|(t, i, v)| pb::ResourceVersion {
                    resource_type: t.into(),
                    resource_id: i.into(),
                    version: v.into(),
                })
                .collect(),
            ..Default::default()
        };
        match reply {
            Reply::Applied(versions) => Ok(Response::new(applied(versions))),
            Reply::Failed(error) => Ok(Response::new(pb::ApplyChangesResponse {
                outcome: pb::Outcome::Failed as i32,
                error: error.into(),
                ..Default::default()
            })),
            Reply::Conflict(error) => Ok(Response::new(pb::ApplyChangesResponse {
                outcome: pb::Outcome::Conflict as i32,
                error: error.into(),
                ..Default::default()
            })),
            Reply::Status(code) => Err(Status::new(code, "applier says no")),
            Reply::Slow(delay) => {
                tokio::time::sleep(delay).await;
                Ok(Response::new(applied(vec![])))
            }
        }
    }
}

impl Applier {
    /// Serves on an ephemeral port; returns its endpoint.
    async fn start(script: Vec<Reply>) -> (Self, String) {
        let applier = Self {
            script: Arc::new(Mutex::new(script.into())),
            ..Default::default()
        };
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

    fn calls(&self) -> Vec<pb::ApplyChangesRequest> {
        self.calls.lock().expect("calls").clone()
    }

    fn arrivals(&self) -> Vec<std::time::Instant> {
        self.arrivals.lock().expect("arrivals").clone()
    }
}

fn fast(c: &mut approvals::config::Config) {
    c.apply.retry_backoff = Duration::from_millis(30);
    c.apply.poll_interval = Duration::from_millis(100);
    c.apply.deadline = Duration::from_secs(3);
}

fn policy(mode: pb::ApplyMode, endpoint: &str) -> pb::Policy {
    pb::Policy {
        name: format!("web-{}", uuid::Uuid::now_v7().simple()),
        project: "web".into(),
        action_key: "*".into(),
        apply_mode: mode as i32,
        applier_endpoint: endpoint.into(),
        ..Default::default()
    }
}

async fn create_policy(server: &TestServer, policy: pb::Policy) -> pb::Policy {
    let mut client =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    client
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy),
        })
        .await
        .expect("create policy")
        .into_inner()
}

/// Polls until the request is in `wanted` (at most 15 s).
async fn wait_for(client: &mut Client, id: &str, wanted: State) -> pb::ChangeRequest {
    for _ in 0..300 {
        let current = get(client, id).await;
        if state(&current) == wanted {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{id} did not reach {wanted:?}: {:?}",
        state(&get(client, id).await)
    );
}

fn kinds(events: &[pb::Event]) -> Vec<(EventKind, State, State)> {
    events
        .iter()
        .map(|e| {
            (
                EventKind::try_from(e.kind).expect("kind"),
                State::try_from(e.from_state).expect("state"),
                State::try_from(e.to_state).expect("state"),
            )
        })
        .collect()
}

#[tokio::test]
async fn auto_apply_on_quorum_succeeds() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let applied = approve(&mut bob, &created.id).await;
    assert_eq!(
        state(&applied),
        State::Applied,
        "the approval returns after the apply"
    );
    assert_eq!(applied.applied_by, "user:bob");
    assert_eq!(
        applied.result_data,
        Some(payload(serde_json::json!({"deployed": true})))
    );
    assert!(applied.apply_time.is_some());

    let calls = applier.calls();
    assert_eq!(calls.len(), 1);
    assert!(!calls[0].idempotency_key.is_empty());
    assert_eq!(calls[0].approvers, vec!["user:bob"]);
    let sent = calls[0].change_request.as_ref().expect("request sent");
    assert_eq!(
        (sent.id.as_str(), sent.changes.len()),
        (created.id.as_str(), 1)
    );
    assert_eq!(
        kinds(&events(&mut alice, &created.id).await),
        vec![
            (EventKind::Created, State::InReview, State::InReview),
            (EventKind::Reviewed, State::InReview, State::Approved),
            (EventKind::ApplyStarted, State::Approved, State::Applying),
            (EventKind::Applied, State::Applying, State::Applied),
        ]
    );
}

#[tokio::test]
async fn auto_apply_failure_is_recorded() {
    let (_applier, endpoint) =
        Applier::start(vec![Reply::Failed("flag service rejected the rollout")]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let failed = approve(&mut bob, &created.id).await;
    assert_eq!(state(&failed), State::ApplyFailed);
    assert_eq!(failed.apply_error, "flag service rejected the rollout");
}

/// What an applier says is stored as every caller string is: a NUL (which PostgreSQL's text
/// refuses) once made the outcome unrecordable, and the applier was called again every lease.
#[tokio::test]
async fn an_appliers_nul_characters_are_stored_replaced() {
    let (applier, endpoint) = Applier::start(vec![Reply::Failed("bad\0byte")]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let failed = approve(&mut bob, &created.id).await;
    assert_eq!(state(&failed), State::ApplyFailed);
    assert_eq!(failed.apply_error, "bad\u{FFFD}byte");
    assert_eq!(applier.calls().len(), 1, "called once");
}

#[tokio::test]
async fn an_applier_conflict_fails_the_apply_and_marks_every_change() {
    let (applier, endpoint) =
        Applier::start(vec![Reply::Conflict("checkout moved to version 7")]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![flag_change("a"), flag_change("b")],
            ..new_request()
        },
    )
    .await;
    let failed = approve(&mut bob, &created.id).await;
    assert_eq!(
        (state(&failed), failed.apply_error.as_str()),
        (State::ApplyFailed, "checkout moved to version 7")
    );
    assert!(
        failed
            .changes
            .iter()
            .all(|c| c.conflict == "checkout moved to version 7")
    );
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("conflict");
    assert_error(&err, Code::FailedPrecondition, "CONFLICT");
    assert_eq!(
        applier.calls().len(),
        1,
        "no applier call for a request with a conflict"
    );
}

#[tokio::test]
async fn an_unavailable_applier_is_retried_with_one_key() {
    let (applier, endpoint) = Applier::start(vec![
        Reply::Status(Code::Unavailable),
        Reply::Status(Code::ResourceExhausted),
        Reply::Applied(vec![]),
    ])
    .await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let applied = wait_for(&mut alice, &created.id, State::Applied).await;
    assert_eq!(applied.apply_attempts, 3);
    let keys: Vec<String> = applier
        .calls()
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "one key throughout: {keys:?}"
    );
}

/// The wait before each retry doubles from `apply.retry_backoff`: 0.2, 0.4, 0.8 s for 200 ms,
/// measured between the applier's calls (the tolerance allows for a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_backoff_doubles_with_each_attempt() {
    let (applier, endpoint) = Applier::start(vec![
        Reply::Status(Code::Unavailable),
        Reply::Status(Code::Unavailable),
        Reply::Status(Code::Unavailable),
        Reply::Applied(vec![]),
    ])
    .await;
    let server = TestServer::start_with(|c| {
        c.apply.retry_backoff = Duration::from_millis(200);
        c.apply.poll_interval = Duration::from_millis(100);
        c.apply.deadline = Duration::from_secs(4);
    })
    .await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let applied = wait_for(&mut alice, &created.id, State::Applied).await;
    assert_eq!(applied.apply_attempts, 4);

    let arrivals = applier.arrivals();
    assert_eq!(arrivals.len(), 4, "three retries");
    let gaps: Vec<f64> = arrivals
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for (gap, expected) in gaps.iter().zip([0.2, 0.4, 0.8]) {
        assert!(
            (0.9 * expected..=0.9 * expected + 0.5).contains(gap),
            "gaps {gaps:?}: expected about {expected} s"
        );
    }
    assert!(gaps[1] > 1.5 * gaps[0], "the second wait doubles: {gaps:?}");
    assert!(gaps[2] > 1.5 * gaps[1], "the third wait doubles: {gaps:?}");
}

#[tokio::test]
async fn past_the_deadline_the_apply_finishes_in_the_background() {
    let (_applier, endpoint) = Applier::start(vec![Reply::Slow(Duration::from_millis(1500))]).await;
    let server = TestServer::start_with(|c| {
        fast(c);
        c.apply.deadline = Duration::from_millis(300);
    })
    .await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let started = std::time::Instant::now();
    let returned = approve(&mut bob, &created.id).await;
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "returned at the deadline"
    );
    assert_eq!(state(&returned), State::Applying);
    wait_for(&mut alice, &created.id, State::Applied).await;
}

#[tokio::test]
async fn retries_give_up_after_max_attempts() {
    let (applier, endpoint) = Applier::start(vec![Reply::Status(Code::Unavailable); 10]).await;
    let server = TestServer::start_with(|c| {
        fast(c);
        c.apply.max_attempts = 3;
    })
    .await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let failed = wait_for(&mut alice, &created.id, State::ApplyFailed).await;
    assert!(
        failed.apply_error.starts_with("gave up after 3 attempts: "),
        "{}",
        failed.apply_error
    );
    assert_eq!(applier.calls().len(), 3);
}

#[tokio::test]
async fn manual_apply_by_the_requester_or_an_applier_only() {
    let (applier, endpoint) = Applier::start(vec![Reply::Failed("first try fails")]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(
        &server,
        pb::Policy {
            appliers: vec!["group:deployers".into()],
            ..policy(pb::ApplyMode::Manual, &endpoint)
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut dave = server.client_in_groups("user:dave", "deployers").await;
    let created = create(&mut alice, new_request()).await;
    let approved = approve(&mut bob, &created.id).await;
    assert_eq!(
        state(&approved),
        State::Approved,
        "MANUAL: quorum only approves"
    );
    assert!(applier.calls().is_empty());

    let apply = |id: &str| pb::ApplyChangeRequestRequest {
        id: id.into(),
        ..Default::default()
    };
    let err = bob
        .apply_change_request(apply(&created.id))
        .await
        .expect_err("not an applier");
    assert_error(&err, Code::PermissionDenied, "NOT_APPLIER");

    let failed = alice
        .apply_change_request(apply(&created.id))
        .await
        .expect("requester applies")
        .into_inner();
    assert_eq!(
        (state(&failed), failed.apply_error.as_str()),
        (State::ApplyFailed, "first try fails")
    );
    // APPLY_FAILED may be applied again, with a new key.
    let applied = dave
        .apply_change_request(apply(&created.id))
        .await
        .expect("applier applies")
        .into_inner();
    assert_eq!(
        (state(&applied), applied.applied_by.as_str()),
        (State::Applied, "user:dave")
    );
    let keys: Vec<String> = applier
        .calls()
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1]);

    let err = alice
        .apply_change_request(apply(&created.id))
        .await
        .expect_err("already applied");
    assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION");
}

#[tokio::test]
async fn apply_without_an_applier_or_on_external_requests_is_refused() {
    let server = TestServer::start_with(fast).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    // No policy at all: MANUAL with no applier.
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no applier");
    let message = assert_error(&err, Code::FailedPrecondition, "NO_APPLIER");
    assert!(message.contains("no policy matched"), "{message}");

    create_policy(&server, policy(pb::ApplyMode::External, "")).await;
    let external = create(&mut alice, new_request()).await;
    approve(&mut bob, &external.id).await;
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: external.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("external");
    assert_error(&err, Code::FailedPrecondition, "NO_APPLIER");
    let err = alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: external.id.clone(),
            apply_time: Some(in_seconds(60.0)),
            ..Default::default()
        })
        .await
        .expect_err("external requests are not scheduled");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn external_requests_are_completed_by_an_executor() {
    let server = TestServer::start_with(fast).await;
    create_policy(
        &server,
        pb::Policy {
            executors: vec!["group:deployers".into()],
            ..policy(pb::ApplyMode::External, "")
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut pipeline = server
        .client_in_groups("service:pipeline", "deployers")
        .await;
    let created = create(&mut alice, new_request()).await;
    assert_eq!(
        state(&approve(&mut bob, &created.id).await),
        State::Approved
    );
    let complete = |success: bool| pb::CompleteChangeRequestRequest {
        id: created.id.clone(),
        success,
        result_data: Some(payload(serde_json::json!({"build": 42}))),
        error: String::new(),
    };
    let err = bob
        .complete_change_request(complete(true))
        .await
        .expect_err("not an executor");
    assert_error(&err, Code::PermissionDenied, "NOT_EXECUTOR");
    let done = pipeline
        .complete_change_request(complete(true))
        .await
        .expect("executor")
        .into_inner();
    assert_eq!(
        (state(&done), done.applied_by.as_str()),
        (State::Applied, "service:pipeline")
    );
    assert_eq!(
        done.result_data,
        Some(payload(serde_json::json!({"build": 42})))
    );
    let err = pipeline
        .complete_change_request(complete(false))
        .await
        .expect_err("second completion");
    assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION");
    let trail = events(&mut alice, &created.id).await;
    assert_eq!(
        trail.last().map(|e| e.kind),
        Some(EventKind::Completed as i32)
    );

    let failing = create(&mut alice, new_request()).await;
    approve(&mut bob, &failing.id).await;
    let failed = pipeline
        .complete_change_request(pb::CompleteChangeRequestRequest {
            id: failing.id.clone(),
            success: false,
            error: "deploy broke".into(),
            ..Default::default()
        })
        .await
        .expect("report failure")
        .into_inner();
    assert_eq!(
        (state(&failed), failed.apply_error.as_str()),
        (State::ApplyFailed, "deploy broke")
    );
}

fn in_seconds(seconds: f64) -> prost_types::Timestamp {
    let now = std::time::SystemTime::now();
    let at = if seconds >= 0.0 {
        now + Duration::from_secs_f64(seconds)
    } else {
        now - Duration::from_secs_f64(-seconds)
    };
    let since = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch");
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

#[tokio::test]
async fn schedules_apply_at_their_time_and_can_be_changed() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Manual, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;

    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let schedule = |id: &str, at: prost_types::Timestamp| pb::ScheduleChangeRequestRequest {
        id: id.into(),
        apply_time: Some(at),
        ..Default::default()
    };
    let err = alice
        .schedule_change_request(schedule(&created.id, in_seconds(-5.0)))
        .await
        .expect_err("past");
    assert_invalid(&err, &["apply_time"]);
    let err = bob
        .schedule_change_request(schedule(&created.id, in_seconds(60.0)))
        .await
        .expect_err("not an applier");
    assert_error(&err, Code::PermissionDenied, "NOT_APPLIER");
    let scheduled = alice
        .schedule_change_request(schedule(&created.id, in_seconds(60.0)))
        .await
        .expect("schedule")
        .into_inner();
    assert_eq!(state(&scheduled), State::Scheduled);
    let plan = scheduled.schedule.expect("schedule");
    assert_eq!(
        (plan.scheduled_by.as_str(), plan.status),
        ("user:alice", pb::ScheduleStatus::Pending as i32)
    );
    // Rescheduled sooner: applied then, on behalf of whoever scheduled it.
    alice
        .schedule_change_request(schedule(&created.id, in_seconds(0.8)))
        .await
        .expect("reschedule");
    let applied = wait_for(&mut alice, &created.id, State::Applied).await;
    assert_eq!(applied.applied_by, "user:alice");
    assert_eq!(applier.calls().len(), 1);

    // Unscheduled: back to APPROVED, never applied.
    let second = create(&mut alice, new_request()).await;
    approve(&mut bob, &second.id).await;
    alice
        .schedule_change_request(schedule(&second.id, in_seconds(0.5)))
        .await
        .expect("schedule");
    let back = alice
        .unschedule_change_request(pb::UnscheduleChangeRequestRequest {
            id: second.id.clone(),
            ..Default::default()
        })
        .await
        .expect("unschedule")
        .into_inner();
    assert_eq!(state(&back), State::Approved);
    // Cancelled while scheduled: never applied.
    let third = create(&mut alice, new_request()).await;
    approve(&mut bob, &third.id).await;
    alice
        .schedule_change_request(schedule(&third.id, in_seconds(0.5)))
        .await
        .expect("schedule");
    alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: third.id.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(state(&get(&mut alice, &second.id).await), State::Approved);
    assert_eq!(state(&get(&mut alice, &third.id).await), State::Cancelled);
    assert_eq!(applier.calls().len(), 1, "neither was applied");
}

#[tokio::test]
async fn apply_time_at_creation_schedules_on_quorum_and_a_failed_schedule_is_reported() {
    let (_applier, endpoint) =
        Applier::start(vec![Reply::Failed("maintenance window closed")]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Manual, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            apply_time: Some(in_seconds(1.0)),
            ..new_request()
        },
    )
    .await;
    let scheduled = approve(&mut bob, &created.id).await;
    assert_eq!(state(&scheduled), State::Scheduled);
    let failed = wait_for(&mut alice, &created.id, State::ApplyFailed).await;
    let plan = failed.schedule.expect("schedule");
    assert_eq!(plan.status, pb::ScheduleStatus::Failed as i32);
    assert_eq!(plan.reason, "maintenance window closed");
    let trail = events(&mut alice, &created.id).await;
    assert_eq!(
        trail.last().map(|e| e.kind),
        Some(EventKind::ScheduleFailed as i32)
    );

    let err = alice
        .create_change_request(pb::CreateChangeRequestRequest {
            apply_time: Some(in_seconds(-1.0)),
            ..new_request()
        })
        .await
        .expect_err("past apply_time");
    assert_invalid(&err, &["apply_time"]);
}

#[tokio::test]
async fn open_requests_expire() {
    let server = TestServer::start_with(fast).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            expire_time: Some(in_seconds(0.5)),
            ..new_request()
        },
    )
    .await;
    let expired = wait_for(&mut alice, &created.id, State::Expired).await;
    assert_eq!(state(&expired), State::Expired);
    let err = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let trail = events(&mut alice, &created.id).await;
    assert_eq!(
        kinds(&trail).last().copied(),
        Some((EventKind::Expired, State::InReview, State::Expired))
    );
    assert_eq!(
        trail.last().map(|e| e.actor.as_str()),
        Some("system:approvals")
    );
}

/// The server's clock, not the wall clock, decides expiry: a request due to expire in a day
/// expires as soon as the clock says a day has passed, with no test waiting a day (or a second).
#[tokio::test]
async fn requests_expire_by_the_servers_clock() {
    let clock = ManualClock::now();
    let server = TestServer::start_with_clock(clock.clone(), fast).await;
    let mut alice = server.client("user:alice").await;
    let day = Duration::from_secs(24 * 3600);
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            expire_time: Some(clock.timestamp_in(day)),
            ..new_request()
        },
    )
    .await;
    // A second of fast polls: not expired while the clock stands still.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&get(&mut alice, &created.id).await), State::InReview);
    clock.advance(day + Duration::from_secs(1));
    let expired = wait_for(&mut alice, &created.id, State::Expired).await;
    assert_eq!(
        expired.update_time.map(|t| t.seconds),
        Some(clock.timestamp_in(Duration::ZERO).seconds),
        "the expiry is stamped with the server's clock"
    );
}

fn versioned(resource_id: &str, base: &str) -> pb::Change {
    pb::Change {
        base_version: base.into(),
        ..flag_change(resource_id)
    }
}

#[tokio::test]
async fn conflicts_are_marked_and_resolved_by_an_update() {
    let (_applier, endpoint) = Applier::start(vec![Reply::Applied(vec![(
        "feature_flag",
        "checkout",
        "2",
    )])])
    .await;
    let server = TestServer::start_with(fast).await;
    create_policy(&server, policy(pb::ApplyMode::Manual, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let first = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned("checkout", "1")],
            ..new_request()
        },
    )
    .await;
    let second = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned("checkout", "1")],
            ..new_request()
        },
    )
    .await;
    let scheduled = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned("checkout", "1")],
            ..new_request()
        },
    )
    .await;
    let unrelated = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned("other", "1")],
            ..new_request()
        },
    )
    .await;
    for id in [&first.id, &second.id, &scheduled.id] {
        approve(&mut bob, id).await;
    }
    alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: scheduled.id.clone(),
            apply_time: Some(in_seconds(3600.0)),
            ..Default::default()
        })
        .await
        .expect("schedule");
    let applied = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: first.id.clone(),
            ..Default::default()
        })
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);

    let marked = get(&mut alice, &second.id).await;
    let conflict = &marked.changes[0].conflict;
    assert!(
        conflict.contains("version 2") && conflict.contains(&first.id),
        "{conflict}"
    );
    let trail = events(&mut alice, &second.id).await;
    assert_eq!(
        trail.last().map(|e| e.kind),
        Some(EventKind::ConflictDetected as i32)
    );
    let suspended = get(&mut alice, &scheduled.id).await;
    assert_eq!(
        suspended.schedule.as_ref().map(|s| s.status),
        Some(pb::ScheduleStatus::Suspended as i32)
    );
    assert!(
        get(&mut alice, &unrelated.id).await.changes[0]
            .conflict
            .is_empty()
    );

    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: second.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("conflict");
    assert_error(&err, Code::FailedPrecondition, "CONFLICT");

    // The requester rewrites the change against the new version: back to review, conflict gone.
    let resolved = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: second.id.clone(),
                changes: vec![pb::Change {
                    id: marked.changes[0].id.clone(),
                    ..versioned("checkout", "2")
                }],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(state(&resolved), State::InReview);
    assert!(resolved.changes[0].conflict.is_empty());
    assert_eq!(resolved.approval_count, 0, "earlier approvals dismissed");
}

/// A server with three API keys: `user:oncall` with `approvals:bypass` alone, `user:alice`
/// with `approvals:write`, `user:admin` with `approvals:admin`.
struct BreakGlass {
    server: TestServer,
    bypass_key: String,
    writer_key: String,
    admin_key: String,
}

impl BreakGlass {
    async fn start() -> Self {
        let (bypass_key, bypass) = api_key("user:oncall", &["approvals:bypass"], &[], &[]);
        let (writer_key, writer) = api_key("user:alice", &["approvals:write"], &[], &[]);
        let (admin_key, admin) = api_key("user:admin", &["approvals:admin"], &[], &[]);
        let server = TestServer::start_with(|c| {
            fast(c);
            c.auth = AuthConfig {
                api_keys: vec![bypass, writer, admin],
                ..AuthConfig::default()
            };
        })
        .await;
        Self {
            server,
            bypass_key,
            writer_key,
            admin_key,
        }
    }
}

#[tokio::test]
async fn break_glass_applies_without_quorum() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let BreakGlass {
        server,
        bypass_key,
        writer_key,
        admin_key,
    } = BreakGlass::start().await;
    let mut admin = policies(&server, Headers::bearer(&admin_key)).await;
    let guarded = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                action_key: "guarded".into(),
                forbid_bypass: true,
                ..policy(pb::ApplyMode::Manual, &endpoint)
            }),
        })
        .await
        .expect("policy")
        .into_inner();
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy(pb::ApplyMode::Manual, &endpoint)),
        })
        .await
        .expect("policy");
    let mut alice = requests(&server, Headers::bearer(&writer_key)).await;
    let mut oncall = requests(&server, Headers::bearer(&bypass_key)).await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let bypass = |id: &str, why: &str| pb::ApplyChangeRequestRequest {
        id: id.into(),
        bypass_justification: why.into(),
        ..Default::default()
    };

    let err = alice
        .apply_change_request(bypass(&created.id, "prod is down"))
        .await
        .expect_err("no bypass scope");
    assert_error(&err, Code::PermissionDenied, "MISSING_SCOPE");
    let err = oncall
        .apply_change_request(bypass(&created.id, "   "))
        .await
        .expect_err("blank");
    assert_invalid(&err, &["bypass_justification"]);

    let applied = oncall
        .apply_change_request(bypass(&created.id, "prod is down"))
        .await
        .expect("break glass")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(
        (
            applied.bypassed_by.as_str(),
            applied.bypass_justification.as_str()
        ),
        ("user:oncall", "prod is down")
    );
    assert_eq!(applied.applied_by, "user:oncall");
    assert_eq!(applier.calls().len(), 1);
    let trail = alice
        .list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    assert!(
        trail
            .iter()
            .any(|e| e.kind == EventKind::Bypassed as i32 && e.actor == "user:oncall")
    );

    let forbidden = alice
        .create_change_request(pb::CreateChangeRequestRequest {
            action_key: "guarded".into(),
            ..new_request()
        })
        .await
        .expect("create")
        .into_inner();
    let err = oncall
        .apply_change_request(bypass(&forbidden.id, "prod is down"))
        .await
        .expect_err("forbidden");
    let message = assert_error(&err, Code::FailedPrecondition, "BYPASS_FORBIDDEN");
    assert!(message.contains(&guarded.name), "{message}");
}

fn apply_request(id: &str) -> pb::ApplyChangeRequestRequest {
    pb::ApplyChangeRequestRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn snapshot_uid(request: &pb::ChangeRequest) -> &str {
    request
        .policy_snapshot
        .as_ref()
        .map(|p| p.uid.as_str())
        .expect("policy_snapshot")
}

/// Policy names are global: after project web deletes its `prod-deploy`, project mobile's
/// admin creates one of that name with his own applier and no bypass ban. web's open requests
/// stay governed by their snapshot: a bypass is still refused, and applies go to web's applier.
#[tokio::test]
async fn a_name_taken_over_by_another_project_does_not_govern_open_requests() {
    let (web_applier, web_endpoint) = Applier::start(vec![]).await;
    let (mobile_applier, mobile_endpoint) = Applier::start(vec![]).await;
    let (web_admin_key, web_admin) = api_key("user:web-admin", &["approvals:admin"], &[], &["web"]);
    let (mobile_admin_key, mobile_admin) =
        api_key("user:mobile-admin", &["approvals:admin"], &[], &["mobile"]);
    let (alice_key, alice) = api_key("user:alice", &["approvals:write"], &[], &["web"]);
    let (bob_key, bob) = api_key("user:bob", &["approvals:write"], &[], &["web"]);
    let (oncall_key, oncall) = api_key("user:oncall", &["approvals:bypass"], &[], &["web"]);
    let server = TestServer::start_with(|c| {
        fast(c);
        c.auth = AuthConfig {
            api_keys: vec![web_admin, mobile_admin, alice, bob, oncall],
            ..AuthConfig::default()
        };
    })
    .await;
    let mut web_admin = policies(&server, Headers::bearer(&web_admin_key)).await;
    let mut mobile_admin = policies(&server, Headers::bearer(&mobile_admin_key)).await;
    let mut alice = requests(&server, Headers::bearer(&alice_key)).await;
    let mut bob = requests(&server, Headers::bearer(&bob_key)).await;
    let mut oncall = requests(&server, Headers::bearer(&oncall_key)).await;

    let original = web_admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "prod-deploy".into(),
                forbid_bypass: true,
                ..policy(pb::ApplyMode::Manual, &web_endpoint)
            }),
        })
        .await
        .expect("web's policy")
        .into_inner();
    assert!(!original.uid.is_empty(), "a uid is assigned at creation");
    let guarded = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let approved = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    assert_eq!(snapshot_uid(&approved), original.uid);
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: approved.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");

    web_admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "prod-deploy".into(),
            etag: String::new(),
        })
        .await
        .expect("delete");
    let takeover = mobile_admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "prod-deploy".into(),
                project: "mobile".into(),
                forbid_bypass: false,
                ..policy(pb::ApplyMode::Manual, &mobile_endpoint)
            }),
        })
        .await
        .expect("mobile may take the free name")
        .into_inner();
    assert_ne!(takeover.uid, original.uid);

    let err = oncall
        .apply_change_request(pb::ApplyChangeRequestRequest {
            bypass_justification: "prod is down".into(),
            ..apply_request(&guarded.id)
        })
        .await
        .expect_err("the snapshot still forbids bypass");
    let message = assert_error(&err, Code::FailedPrecondition, "BYPASS_FORBIDDEN");
    assert!(message.contains("prod-deploy"), "{message}");

    let applied = alice
        .apply_change_request(apply_request(&approved.id))
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(
        web_applier.calls().len(),
        1,
        "applied through web's applier"
    );
    assert!(
        mobile_applier.calls().is_empty(),
        "mobile's applier never sees web's requests"
    );
}

/// The same project deleting and re-creating a policy of the same name makes another policy:
/// requests created before keep the old one's wiring, requests created after get the new one.
#[tokio::test]
async fn a_policy_recreated_under_the_same_name_is_another_policy() {
    let (old_applier, old_endpoint) = Applier::start(vec![]).await;
    let (new_applier, new_endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    let mut admin =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let name = "web-deploy";
    let first = create_policy(
        &server,
        pb::Policy {
            name: name.into(),
            ..policy(pb::ApplyMode::Manual, &old_endpoint)
        },
    )
    .await;
    let before = create(&mut alice, new_request()).await;
    approve(&mut bob, &before.id).await;
    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: name.into(),
            etag: String::new(),
        })
        .await
        .expect("delete");
    let second = create_policy(
        &server,
        pb::Policy {
            name: name.into(),
            ..policy(pb::ApplyMode::Manual, &new_endpoint)
        },
    )
    .await;
    assert_ne!(first.uid, second.uid);
    let after = create(&mut alice, new_request()).await;
    assert_eq!(
        (snapshot_uid(&before), snapshot_uid(&after)),
        (first.uid.as_str(), second.uid.as_str())
    );
    approve(&mut bob, &after.id).await;

    for id in [&before.id, &after.id] {
        let applied = alice
            .apply_change_request(apply_request(id))
            .await
            .expect("apply")
            .into_inner();
        assert_eq!(state(&applied), State::Applied);
    }
    let sent = |applier: &Applier| -> Vec<String> {
        applier
            .calls()
            .iter()
            .filter_map(|c| c.change_request.as_ref().map(|r| r.id.clone()))
            .collect()
    };
    assert_eq!(sent(&old_applier), vec![before.id.clone()]);
    assert_eq!(sent(&new_applier), vec![after.id.clone()]);
}

/// Fixing the endpoint of the policy an open request was created under helps that request:
/// its apply goes to the new endpoint, though its snapshot keeps the old one.
#[tokio::test]
async fn editing_the_same_policy_s_endpoint_helps_open_requests() {
    let (old_applier, old_endpoint) = Applier::start(vec![]).await;
    let (new_applier, new_endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    let mut admin =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    let created_policy = create_policy(&server, policy(pb::ApplyMode::Manual, &old_endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let updated = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                name: created_policy.name.clone(),
                applier_endpoint: new_endpoint.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["applier_endpoint".into()],
            }),
        })
        .await
        .expect("fix the endpoint")
        .into_inner();
    assert_eq!(updated.uid, created_policy.uid, "an update keeps the uid");

    let applied = alice
        .apply_change_request(apply_request(&created.id))
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(
        new_applier.calls().len(),
        1,
        "applied through the fixed endpoint"
    );
    assert!(old_applier.calls().is_empty());
    assert_eq!(
        applied.policy_snapshot.map(|p| p.applier_endpoint),
        Some(old_endpoint),
        "the snapshot itself never changes"
    );
}

/// Two replicas on one database race the same schedules: each request is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_apply_each_schedule_once() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    let replica = TestServer::replica_of(&server, fast).await;
    create_policy(&server, policy(pb::ApplyMode::Manual, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = replica.client("user:bob").await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let created = create(&mut alice, new_request()).await;
        approve(&mut bob, &created.id).await;
        alice
            .schedule_change_request(pb::ScheduleChangeRequestRequest {
                id: created.id.clone(),
                apply_time: Some(in_seconds(1.0)),
                ..Default::default()
            })
            .await
            .expect("schedule");
        ids.push(created.id);
    }
    for id in &ids {
        wait_for(&mut alice, id, State::Applied).await;
    }
    let calls = applier.calls();
    for id in &ids {
        let n = calls
            .iter()
            .filter(|c| c.change_request.as_ref().map(|r| &r.id) == Some(id))
            .count();
        assert_eq!(n, 1, "{id} applied {n} times");
    }
    drop(replica);
}

/// The server is killed while the applier holds the call; restarted with a short lease, it
/// retries with the same key, and the request ends APPLIED exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_apply_is_retried_with_the_same_key() {
    let (applier, endpoint) = Applier::start(vec![
        Reply::Slow(Duration::from_secs(60)),
        Reply::Applied(vec![]),
    ])
    .await;
    let (database, url) = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("dir");
    // The test applier speaks plain text: said per entry, in the file.
    let config = dir.path().join("approvals.toml");
    std::fs::write(
        &config,
        "[apply]\nallowed_endpoints = [{ endpoint = \"http://127.0.0.1\", allow_insecure = true }]\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let env = [
        ("APPROVALS_APPLY_LEASE", "1s"),
        ("APPROVALS_APPLY_DEADLINE", "200ms"),
        ("APPROVALS_APPLY_POLL_INTERVAL", "100ms"),
        ("APPROVALS_CONFIG", config.as_str()),
    ];
    let mut first = Process::serve_with(&url, dir.path(), &env);
    let connect = |addr: String| async move {
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    };
    let channel = connect(first.addr.clone()).await;
    PoliciesClient::with_interceptor(channel.clone(), Caller::named("user:admin"))
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy(pb::ApplyMode::Auto, &endpoint)),
        })
        .await
        .expect("policy");
    let mut alice = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel.clone(),
        Caller::named("user:alice"),
    );
    let mut bob = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel,
        Caller::named("user:bob"),
    );
    let created = create(&mut alice, new_request()).await;
    let returned = approve(&mut bob, &created.id).await;
    assert_eq!(state(&returned), State::Applying);
    for _ in 0..100 {
        if !applier.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(applier.calls().len(), 1, "the applier holds the first call");
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();

    let second = Process::serve_with(&url, dir.path(), &env);
    let channel = connect(second.addr.clone()).await;
    let mut alice = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel,
        Caller::named("user:alice"),
    );
    let applied = wait_for(&mut alice, &created.id, State::Applied).await;
    assert_eq!(applied.applied_by, "user:bob");
    let keys: Vec<String> = applier
        .calls()
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2, "one retry after the crash");
    assert_eq!(keys[0], keys[1], "the same idempotency key");
    let trail = kinds(&events(&mut alice, &created.id).await);
    assert_eq!(
        trail
            .iter()
            .filter(|(kind, _, _)| *kind == EventKind::ApplyStarted)
            .count(),
        1
    );
    assert_eq!(
        trail
            .iter()
            .filter(|(kind, _, _)| *kind == EventKind::Applied)
            .count(),
        1
    );
    drop(second);
    drop(database);
}

/// While an apply is retried, a get shows each attempt as it is recorded (attempts change
/// without an event, so a request being applied is never served from the read cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_show_the_attempts_of_an_apply_in_progress() {
    let (_applier, endpoint) = Applier::start(vec![
        Reply::Status(Code::Unavailable),
        Reply::Status(Code::Unavailable),
        Reply::Status(Code::Unavailable),
        Reply::Slow(Duration::from_secs(30)),
    ])
    .await;
    let server = TestServer::start_with(|c| {
        c.apply.retry_backoff = Duration::from_millis(200);
        c.apply.poll_interval = Duration::from_millis(100);
        c.apply.deadline = Duration::from_secs(10);
    })
    .await;
    create_policy(&server, policy(pb::ApplyMode::Auto, &endpoint)).await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let mut bob = server.client("user:bob").await;
    let id = created.id.clone();
    // The approval starts the apply and waits for it; meanwhile alice reads.
    let approval = tokio::spawn(async move { approve(&mut bob, &id).await });
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        let read = get(&mut alice, &created.id).await;
        if state(&read) == State::Applying && seen.last() != Some(&read.apply_attempts) {
            seen.push(read.apply_attempts);
        }
        if read.apply_attempts >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "attempts seen while applying: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    approval.abort();
}

/// A calendar closed by default (no entries), created by `user:admin`: nothing applies while
/// it exists.
async fn closed_calendar(server: &TestServer, name: &str) {
    let mut admin = calendars(server, Headers::actor("user:admin")).await;
    create_closed_calendar(&mut admin, name).await;
}

async fn create_closed_calendar(admin: &mut CalendarsClient, name: &str) {
    admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(pb::Calendar {
                name: name.into(),
                time_zone: "Europe/Berlin".into(),
                default: pb::WindowKind::Closed as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("create calendar");
}

#[tokio::test]
async fn a_closed_calendar_refuses_a_manual_apply_and_suspends_an_auto_one_until_it_opens() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    closed_calendar(&server, "freeze").await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;

    // MANUAL: refused with the calendar named.
    let manual = create_policy(
        &server,
        pb::Policy {
            calendars: vec!["freeze".into()],
            ..policy(pb::ApplyMode::Manual, &endpoint)
        },
    )
    .await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the window is closed");
    assert_error(&err, Code::FailedPrecondition, "CHANGE_WINDOW_CLOSED");
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("calendar").map(String::as_str),
        Some("freeze")
    );
    assert!(applier.calls().is_empty());
    let mut admin =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: manual.name.clone(),
            ..Default::default()
        })
        .await
        .expect("delete the manual policy");

    // AUTO: quorum schedules it, suspended by the calendar; deleting the freeze releases it.
    create_policy(
        &server,
        pb::Policy {
            calendars: vec!["freeze".into()],
            ..policy(pb::ApplyMode::Auto, &endpoint)
        },
    )
    .await;
    let created = create(&mut alice, new_request()).await;
    let approved = approve(&mut bob, &created.id).await;
    assert_eq!(state(&approved), State::Scheduled);
    let schedule = approved.schedule.expect("schedule");
    assert_eq!(schedule.status, pb::ScheduleStatus::Suspended as i32);
    assert_eq!(schedule.calendar, "freeze");
    assert!(applier.calls().is_empty());
    let mut cal = calendars(&server, Headers::actor("user:admin")).await;
    cal.delete_calendar(pb::DeleteCalendarRequest {
        name: "freeze".into(),
        ..Default::default()
    })
    .await
    .expect("delete the freeze");
    wait_for(&mut alice, &created.id, State::Applied).await;
    let kinds: Vec<EventKind> = kinds(&events(&mut alice, &created.id).await)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert!(kinds.contains(&EventKind::ScheduleSuspended), "{kinds:?}");
    assert!(kinds.contains(&EventKind::ScheduleResumed), "{kinds:?}");
    assert_eq!(applier.calls().len(), 1);
}

#[tokio::test]
async fn apply_delay_holds_a_manual_apply_and_bounds_schedules() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    create_policy(
        &server,
        pb::Policy {
            apply_delay: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..policy(pb::ApplyMode::Manual, &endpoint)
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let approved = approve(&mut bob, &created.id).await;
    assert_eq!(state(&approved), State::Approved);
    let err = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("within the apply delay");
    assert_error(&err, Code::FailedPrecondition, "APPLY_DELAY_NOT_ELAPSED");
    let info = err.get_details_error_info().expect("error info");
    assert!(info.metadata.contains_key("apply_time"), "{info:?}");

    let now = unix_now();
    let err = alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: created.id.clone(),
            apply_time: Some(prost_types::Timestamp {
                seconds: now + 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("before approval plus the delay");
    assert_invalid(&err, &["apply_time"]);
    let err = alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: created.id.clone(),
            apply_time: Some(prost_types::Timestamp {
                seconds: now + 7200,
                nanos: 0,
            }),
            next_open_window: true,
            ..Default::default()
        })
        .await
        .expect_err("both");
    assert_invalid(&err, &["next_open_window"]);
    let scheduled = alice
        .schedule_change_request(pb::ScheduleChangeRequestRequest {
            id: created.id.clone(),
            next_open_window: true,
            ..Default::default()
        })
        .await
        .expect("the next window")
        .into_inner();
    assert_eq!(state(&scheduled), State::Scheduled);
    let schedule = scheduled.schedule.expect("schedule");
    assert_eq!(schedule.status, pb::ScheduleStatus::Pending as i32);
    let at = schedule.apply_time.expect("apply_time").seconds;
    assert!(
        (now + 3590..=now + 3610).contains(&at),
        "applies at approval plus one hour: {at} vs now {now}"
    );
    assert!(applier.calls().is_empty());
}

#[tokio::test]
async fn two_replicas_apply_a_schedule_a_freeze_released_once() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    let replica = TestServer::replica_of(&server, fast).await;
    closed_calendar(&server, "year-end").await;
    create_policy(
        &server,
        pb::Policy {
            calendars: vec!["year-end".into()],
            ..policy(pb::ApplyMode::Manual, &endpoint)
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = replica.client("user:bob").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = create(&mut alice, new_request()).await;
        approve(&mut bob, &created.id).await;
        let scheduled = alice
            .schedule_change_request(pb::ScheduleChangeRequestRequest {
                id: created.id.clone(),
                apply_time: Some(prost_types::Timestamp {
                    seconds: unix_now() + 2,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("schedule inside the freeze")
            .into_inner();
        let schedule = scheduled.schedule.expect("schedule");
        assert_eq!(schedule.status, pb::ScheduleStatus::Suspended as i32);
        assert_eq!(schedule.calendar, "year-end");
        ids.push(created.id);
    }
    // Past their time, still held by the freeze.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(applier.calls().is_empty());
    let mut cal = calendars(&replica, Headers::actor("user:admin")).await;
    cal.delete_calendar(pb::DeleteCalendarRequest {
        name: "year-end".into(),
        ..Default::default()
    })
    .await
    .expect("lift the freeze");
    for id in &ids {
        wait_for(&mut alice, id, State::Applied).await;
        let resumed = kinds(&events(&mut alice, id).await)
            .into_iter()
            .filter(|(k, _, _)| *k == EventKind::ScheduleResumed)
            .count();
        assert_eq!(resumed, 1, "one SCHEDULE_RESUMED event for {id}");
    }
    assert_eq!(
        applier.calls().len(),
        2,
        "each applied once across replicas"
    );
}

#[tokio::test]
async fn break_glass_applies_inside_a_closed_window_and_records_the_calendar() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let BreakGlass {
        server,
        bypass_key,
        writer_key,
        admin_key,
    } = BreakGlass::start().await;
    let mut cal = calendars(&server, Headers::bearer(&admin_key)).await;
    create_closed_calendar(&mut cal, "incident").await;
    let mut admin = policies(&server, Headers::bearer(&admin_key)).await;
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                calendars: vec!["incident".into()],
                ..policy(pb::ApplyMode::Manual, &endpoint)
            }),
        })
        .await
        .expect("policy");
    let mut alice = requests(&server, Headers::bearer(&writer_key)).await;
    let mut oncall = requests(&server, Headers::bearer(&bypass_key)).await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let applied = oncall
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            bypass_justification: "prod is down".into(),
            ..Default::default()
        })
        .await
        .expect("break glass")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(applied.bypassed_calendar, "incident");
    assert_eq!(applier.calls().len(), 1);
}

#[tokio::test]
async fn a_freeze_created_while_requests_are_scheduled_suspends_them_and_its_end_releases_them() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    // The policy names a calendar that does not exist yet: nothing closes the requests.
    create_policy(
        &server,
        pb::Policy {
            calendars: vec!["launch".into()],
            ..policy(pb::ApplyMode::Manual, &endpoint)
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let apply_at = unix_now() + 3;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = create(&mut alice, new_request()).await;
        approve(&mut bob, &created.id).await;
        let scheduled = alice
            .schedule_change_request(pb::ScheduleChangeRequestRequest {
                id: created.id.clone(),
                apply_time: Some(prost_types::Timestamp {
                    seconds: apply_at,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("schedule")
            .into_inner();
        let schedule = scheduled.schedule.expect("schedule");
        assert_eq!(schedule.status, pb::ScheduleStatus::Pending as i32);
        ids.push(created.id);
    }

    // The freeze arrives: both schedules are suspended by the sweep, one event each.
    let mut cal = calendars(&server, Headers::actor("user:admin")).await;
    create_closed_calendar(&mut cal, "launch").await;
    for id in &ids {
        let started = std::time::Instant::now();
        loop {
            let read = get(&mut alice, id).await;
            let schedule = read.schedule.expect("schedule");
            if schedule.status == pb::ScheduleStatus::Suspended as i32 {
                assert_eq!(schedule.calendar, "launch");
                assert!(schedule.next_open_time.is_none(), "closed for good");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{id} was not suspended: {schedule:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Past their apply time, they stay held.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(applier.calls().is_empty());
    for id in &ids {
        let read = get(&mut alice, id).await;
        assert_eq!(state(&read), State::Scheduled);
    }

    // The freeze is edited to open: both are released and applied, once each.
    cal.update_calendar(pb::UpdateCalendarRequest {
        calendar: Some(pb::Calendar {
            name: "launch".into(),
            time_zone: "Europe/Berlin".into(),
            default: pb::WindowKind::Open as i32,
            ..Default::default()
        }),
    })
    .await
    .expect("open the calendar");
    for id in &ids {
        wait_for(&mut alice, id, State::Applied).await;
        let history = kinds(&events(&mut alice, id).await);
        let count = |kind: EventKind| history.iter().filter(|(k, _, _)| *k == kind).count();
        assert_eq!(count(EventKind::ScheduleSuspended), 1, "{id}: {history:?}");
        assert_eq!(count(EventKind::ScheduleResumed), 1, "{id}: {history:?}");
    }
    assert_eq!(applier.calls().len(), 2, "each applied once");
}

#[tokio::test]
async fn a_calendar_edit_inside_a_freeze_resumes_nothing_early() {
    let (applier, endpoint) = Applier::start(vec![]).await;
    let server = TestServer::start_with(fast).await;
    let mut cal = calendars(&server, Headers::actor("user:admin")).await;
    let now = unix_now();
    let freeze = |end: i64| pb::Calendar {
        name: "freeze".into(),
        time_zone: "Europe/Berlin".into(),
        default: pb::WindowKind::Open as i32,
        entries: vec![pb::CalendarEntry {
            kind: pb::WindowKind::Closed as i32,
            reason: "launch".into(),
            range: Some(pb::TimeRange {
                start_time: Some(prost_types::Timestamp {
                    seconds: now - 60,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: end,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    cal.create_calendar(pb::CreateCalendarRequest {
        calendar: Some(freeze(now + 4)),
    })
    .await
    .expect("freeze");
    create_policy(
        &server,
        pb::Policy {
            calendars: vec!["freeze".into()],
            ..policy(pb::ApplyMode::Auto, &endpoint)
        },
    )
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let approved = approve(&mut bob, &created.id).await;
    let schedule = approved.schedule.expect("schedule");
    assert_eq!(schedule.status, pb::ScheduleStatus::Suspended as i32);
    assert_eq!(schedule.next_open_time.map(|t| t.seconds), Some(now + 4));

    // Another calendar changes, so every calendar-bound schedule is checked again, while the
    // freeze still holds: the request stays SUSPENDED.
    cal.create_calendar(pb::CreateCalendarRequest {
        calendar: Some(pb::Calendar {
            name: "other".into(),
            ..freeze(now + 1)
        }),
    })
    .await
    .expect("another calendar");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let read = get(&mut alice, &created.id).await;
    assert_eq!(state(&read), State::Scheduled);
    assert_eq!(
        read.schedule.map(|s| s.status),
        Some(pb::ScheduleStatus::Suspended as i32),
        "still suspended inside the freeze"
    );
    let early: Vec<_> = kinds(&events(&mut alice, &created.id).await)
        .into_iter()
        .filter(|(k, _, _)| *k == EventKind::ScheduleResumed)
        .collect();
    assert!(early.is_empty(), "resumed inside the freeze: {early:?}");
    assert!(applier.calls().is_empty());

    // When the freeze ends it resumes, once, and applies.
    wait_for(&mut alice, &created.id, State::Applied).await;
    let resumed = kinds(&events(&mut alice, &created.id).await)
        .into_iter()
        .filter(|(k, _, _)| *k == EventKind::ScheduleResumed)
        .count();
    assert_eq!(resumed, 1);
    assert_eq!(applier.calls().len(), 1);
}
