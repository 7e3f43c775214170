//! Protection: the per-principal rate limit refuses only the caller over it, the concurrency
//! limit refuses a unary call over it at once, and watch streams are neither counted by the
//! unary concurrency limit nor cut by the request timeout.

use std::time::Duration;

use approvals::pb::{
    self,
    change_applier_server::{ChangeApplier, ChangeApplierServer},
    policies_client::PoliciesClient,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_refused_and_others_are_not() {
    let server = TestServer::start_with(|config| {
        config.limits.rate_limit_per_second = 1;
        config.limits.rate_limit_burst = 3;
    })
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    for _ in 0..3 {
        create(&mut alice, new_request()).await;
    }
    let status = alice
        .create_change_request(new_request())
        .await
        .expect_err("over the burst");
    let message = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert!(message.contains("user:alice"), "{message}");
    assert!(
        tonic_types::StatusExt::get_details_retry_info(&status).is_some(),
        "a retry hint"
    );
    // Bob has his own budget.
    create(&mut bob, new_request()).await;
    // Alice's budget refills at 1/s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create(&mut alice, new_request()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_do_not_count_against_the_unary_limits() {
    let server = TestServer::start_with(|config| {
        config.limits.max_concurrent_requests = 1;
        config.limits.request_timeout = Duration::from_millis(500);
    })
    .await;
    let mut client = server.client("user:alice").await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(
            client
                .watch_change_requests(pb::WatchChangeRequestsRequest {
                    project: "web".into(),
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner(),
        );
    }
    // Longer than the request timeout: the streams stay open and unary calls still pass.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let created = create(&mut client, new_request()).await;
    for stream in &mut streams {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("a message")
                .expect("the stream outlives the request timeout")
                .expect("open");
            if message
                .events
                .iter()
                .any(|e| e.change_request_id == created.id)
            {
                break;
            }
        }
    }
}

/// An applier that holds every call for a minute: an AUTO approval then waits `apply.deadline`.
struct Hanging;

#[tonic::async_trait]
impl ChangeApplier for Hanging {
    async fn apply_changes(
        &self,
        _request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Err(Status::unavailable("gave up"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_over_the_concurrency_limit_is_refused_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ChangeApplierServer::new(Hanging))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let server = TestServer::start_with(|config| {
        config.limits.max_concurrent_requests = 1;
        config.apply.deadline = Duration::from_secs(2);
    })
    .await;
    PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"))
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-auto".into(),
                project: "web".into(),
                action_key: "*".into(),
                apply_mode: pb::ApplyMode::Auto as i32,
                applier_endpoint: endpoint,
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    // Bob's approval holds the one permit while it waits for the applier.
    let approving = tokio::spawn({
        let id = created.id.clone();
        async move { approve(&mut bob, &id).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let status = alice
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect_err("over the limit");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    let message = assert_error(
        &status,
        Code::ResourceExhausted,
        "TOO_MANY_CONCURRENT_REQUESTS",
    );
    assert_eq!(
        message,
        "the server is handling its limit of 1 concurrent calls; retry shortly"
    );
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata
            .get("max_concurrent_requests")
            .map(String::as_str),
        Some("1")
    );
    assert_eq!(
        status
            .get_details_retry_info()
            .and_then(|retry| retry.retry_delay),
        Some(Duration::from_millis(100))
    );
    // A watch opens meanwhile: streams are not counted.
    alice
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    approving.await.expect("approved at the deadline");
    get(&mut alice, &created.id).await;
}
