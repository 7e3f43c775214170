//! "Now" for a watch is the committed head: a write acknowledged to anyone before the call is
//! never delivered as new, a snapshot includes it, and the oldest revision REVISION_TOO_OLD
//! reports is itself accepted. (The hub's own published head trails commits by milliseconds;
//! watches used to start from it.)

use std::time::Duration;

use approvals::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestServer, assert_error, create, new_request};

fn in_project(project: &str) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: project.into(),
        ..new_request()
    }
}

async fn message(
    stream: &mut tonic::Streaming<pb::WatchChangeRequestsResponse>,
) -> pb::WatchChangeRequestsResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a message within 20 s")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn a_watch_from_now_never_delivers_a_write_acknowledged_before_it() {
    let server = TestServer::start().await;
    let mut writer = server.client("user:alice").await;
    let mut watcher = server.client("service:w").await;
    for round in 0..30 {
        let before = create(&mut writer, in_project("now")).await;
        let mut stream = watcher
            .watch_change_requests(pb::WatchChangeRequestsRequest {
                project: "now".into(),
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        let marker = create(&mut writer, in_project("now")).await;
        let first = loop {
            let m = message(&mut stream).await;
            if let Some(event) = m.events.first() {
                break event.clone();
            }
        };
        assert_ne!(
            first.change_request_id, before.id,
            "round {round}: the write acknowledged before the watch came as new"
        );
        assert_eq!(first.change_request_id, marker.id, "round {round}");
    }
}

#[tokio::test]
async fn a_snapshot_holds_every_write_acknowledged_before_it() {
    let server = TestServer::start().await;
    let mut writer = server.client("user:alice").await;
    let mut watcher = server.client("service:w").await;
    for round in 0..30 {
        // Into the watched project, and into another one with a watch on an empty project.
        let mine = create(&mut writer, in_project("snap")).await;
        let elsewhere = create(&mut writer, in_project("other")).await;
        for (project, acknowledged, member) in [
            ("snap", elsewhere.revision, Some(&mine.id)),
            (
                &*format!("empty-{round}"),
                elsewhere.revision,
                None::<&String>,
            ),
        ] {
            let mut stream = watcher
                .watch_change_requests(pb::WatchChangeRequestsRequest {
                    project: project.into(),
                    include_initial: true,
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            let mut ids = Vec::new();
            let revision = loop {
                let m = message(&mut stream).await;
                ids.extend(m.snapshot.iter().map(|r| r.id.clone()));
                if m.snapshot_complete {
                    break m.revision;
                }
            };
            assert!(
                revision >= acknowledged,
                "round {round}, {project}: snapshot at {revision}, but {acknowledged} was acknowledged"
            );
            if let Some(member) = member {
                assert!(ids.contains(member), "round {round}: the snapshot lacks it");
            }
        }
    }
}

#[tokio::test]
async fn the_oldest_revision_reported_is_exactly_the_oldest_accepted() {
    let server = TestServer::start_with(|c| c.watch.history = 5).await;
    let mut writer = server.client("user:alice").await;
    for _ in 0..12 {
        create(&mut writer, in_project("old")).await;
    }
    let mut watcher = server.client("service:w").await;
    let start = |start_revision: i64| pb::WatchChangeRequestsRequest {
        project: "old".into(),
        start_revision,
        ..Default::default()
    };
    // Asked at once after the last acknowledged write.
    let err = watcher
        .watch_change_requests(start(1))
        .await
        .expect_err("too old");
    assert_error(&err, Code::OutOfRange, "REVISION_TOO_OLD");
    let oldest: i64 = err
        .get_details_error_info()
        .expect("info")
        .metadata
        .get("oldest_revision")
        .expect("oldest_revision")
        .parse()
        .expect("number");
    let mut stream = watcher
        .watch_change_requests(start(oldest))
        .await
        .unwrap_or_else(|e| panic!("the reported oldest revision {oldest} was refused: {e:?}"))
        .into_inner();
    let first = loop {
        let m = message(&mut stream).await;
        if let Some(event) = m.events.first() {
            break event.revision;
        }
    };
    assert_eq!(first, oldest);
    let err = watcher
        .watch_change_requests(start(oldest - 1))
        .await
        .expect_err("one before the oldest");
    assert_error(&err, Code::OutOfRange, "REVISION_TOO_OLD");
}
