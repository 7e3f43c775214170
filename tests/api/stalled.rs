//! A watcher that stops reading (its HTTP/2 window full) must cost nobody else anything:
//! writers keep their latency, other watchers get every event as it commits, and the stalled
//! one either catches up from the log when it reads again or is ended for lag.

use std::time::{Duration, Instant};

use approvals::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{Caller, TestServer, payload};

/// A create in project `stall` whose one change carries `{"blob": <16,000 characters>}`.
fn big_request(n: usize) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: "stall".into(),
        action_key: "feature_flag.update".into(),
        title: format!("big {n}"),
        changes: vec![pb::Change {
            action: "update".into(),
            resource_type: "feature_flag".into(),
            resource_id: format!("flag-{n}"),
            payload: Some(payload(serde_json::json!({ "blob": "x".repeat(16_000) }))),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn watch_from(start_revision: i64) -> pb::WatchChangeRequestsRequest {
    pb::WatchChangeRequestsRequest {
        project: "stall".into(),
        start_revision,
        ..Default::default()
    }
}

/// Revisions of the events in the stream until `until` revisions were seen or the stream ends.
async fn collect(
    stream: &mut tonic::Streaming<pb::WatchChangeRequestsResponse>,
    until: usize,
    within: Duration,
) -> (Vec<i64>, Option<tonic::Status>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < until {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) | Ok(Ok(None)) => break,
            Ok(Err(status)) => return (seen, Some(status)),
            Ok(Ok(Some(message))) => seen.extend(message.events.iter().map(|e| e.revision)),
        }
    }
    (seen, None)
}

/// Writes `count` big requests one after another; returns their revisions and the median
/// create's latency.
async fn write_big(server: &TestServer, count: usize) -> (Vec<i64>, Duration) {
    let mut writer = server.client("user:writer").await;
    let mut revisions = Vec::with_capacity(count);
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let started = Instant::now();
        let created = writer
            .create_change_request(big_request(n))
            .await
            .expect("create")
            .into_inner();
        latencies.push(started.elapsed());
        revisions.push(created.revision);
    }
    latencies.sort();
    (revisions, latencies[latencies.len() / 2])
}

/// A client of its own connection, with tonic's defaults (no adaptive window: a 64 KiB
/// receive window), that opens a watch and, until told, never reads it.
async fn lazy_watch(
    server: &TestServer,
    start_revision: i64,
) -> tonic::Streaming<pb::WatchChangeRequestsResponse> {
    // The windows of a client without BDP probing: 64 KiB for the stream and the connection.
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .http2_adaptive_window(false)
        .connect()
        .await
        .expect("connect");
    let mut client = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel,
        Caller::named("user:lazy"),
    );
    client
        .watch_change_requests(watch_from(start_revision))
        .await
        .expect("lazy watch")
        .into_inner()
}

async fn head(server: &TestServer) -> i64 {
    let mut client = server.client("user:writer").await;
    client
        .create_change_request(pb::CreateChangeRequestRequest {
            project: "marker".into(),
            ..big_request(0)
        })
        .await
        .expect("marker")
        .into_inner()
        .revision
}

#[tokio::test]
async fn a_stalled_watcher_delays_no_writer_and_no_other_watcher() {
    let server = TestServer::start().await;
    let start = head(&server).await + 1;
    let mut lazy = lazy_watch(&server, start).await;
    let mut fast = server
        .client("user:fast")
        .await
        .watch_change_requests(watch_from(start))
        .await
        .expect("fast watch")
        .into_inner();
    let fast_reader = tokio::spawn(async move {
        let seen = collect(&mut fast, 200, Duration::from_secs(120)).await;
        (seen, Instant::now())
    });

    let (revisions, median) = write_big(&server, 200).await;
    let written = Instant::now();
    let ((seen, status), done) = fast_reader.await.expect("fast reader");
    assert!(status.is_none(), "fast watcher ended: {status:?}");
    assert_eq!(
        seen, revisions,
        "the fast watcher got every event, in order"
    );
    assert!(
        done.saturating_duration_since(written) < Duration::from_secs(5),
        "the fast watcher got the last event {:?} after the last commit",
        done.saturating_duration_since(written)
    );
    // A create of 16 KB is a few milliseconds, stalled watcher or not. (It was 45 ms on
    // PostgreSQL whatever the watchers did: the database driver left Nagle's algorithm on, so
    // a query written in two pieces waited for the server's delayed ACK.)
    assert!(
        median < Duration::from_millis(30),
        "the median create took {median:?}"
    );

    // The stalled watcher, reading at last, catches up from the log with nothing lost.
    let (late, status) = collect(&mut lazy, 200, Duration::from_secs(60)).await;
    assert!(status.is_none(), "lazy watcher ended: {status:?}");
    assert_eq!(late, revisions);
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_ended_at_max_lag() {
    let server = TestServer::start_with(|c| c.watch.max_lag = 20).await;
    let start = head(&server).await + 1;
    let mut lazy = lazy_watch(&server, start).await;
    // Let the watch reach the live tail before the writes begin.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (revisions, _) = write_big(&server, 100).await;

    let (late, status) = collect(&mut lazy, 100, Duration::from_secs(60)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "the stream went on after falling 100 events behind with max_lag 20 ({} delivered)",
            late.len()
        )
    });
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WATCHER_TOO_SLOW");
    let resume: i64 = info
        .metadata
        .get("resume_revision")
        .and_then(|r| r.parse().ok())
        .expect("resume_revision");
    // Everything before the resume revision was delivered, in order, and nothing after it.
    let delivered = revisions.iter().take_while(|r| **r < resume).count();
    assert_eq!(late, revisions[..delivered]);
    assert!(
        delivered < 100,
        "ended only after delivering everything ({delivered})"
    );
}
