//! Protection: the per-principal rate limit refuses only the caller over it, and watch streams
//! are neither counted by the unary concurrency limit nor cut by the request timeout.

use std::time::Duration;

use approvals::pb;
use tonic::Code;

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
