//! WatchChangeRequests: live events, snapshots, resume, history window, lag, progress,
//! filters, and the gap-free guarantee under concurrent writers and across replicas.

use std::{collections::BTreeSet, time::Duration};

use approvals::pb::{self, EventKind, State};
use tonic::{Code, Streaming};

use crate::common::*;

fn watch_request(project: &str) -> pb::WatchChangeRequestsRequest {
    pb::WatchChangeRequestsRequest {
        project: project.into(),
        ..Default::default()
    }
}

async fn watch(
    client: &mut Client,
    request: pb::WatchChangeRequestsRequest,
) -> Streaming<pb::WatchChangeRequestsResponse> {
    client
        .watch_change_requests(request)
        .await
        .expect("watch")
        .into_inner()
}

async fn next_message(
    stream: &mut Streaming<pb::WatchChangeRequestsResponse>,
) -> pb::WatchChangeRequestsResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a message within 20 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Collects events (skipping progress messages) until `n` have arrived, checking each
/// message's invariants on the way.
async fn next_events(
    stream: &mut Streaming<pb::WatchChangeRequestsResponse>,
    n: usize,
) -> Vec<pb::Event> {
    let mut events: Vec<pb::Event> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while events.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events within 30 s: {:?}",
            events.len(),
            events.iter().map(|e| e.revision).collect::<Vec<_>>()
        );
        let message = next_message(stream).await;
        if message.progress {
            assert!(message.events.is_empty());
            continue;
        }
        assert!(
            !message.events.is_empty(),
            "an events message has events: {message:?}"
        );
        assert_eq!(
            message.revision,
            message
                .events
                .last()
                .map(|e| e.revision)
                .unwrap_or_default()
        );
        events.extend(message.events);
    }
    assert!(
        events.windows(2).all(|w| w[0].revision < w[1].revision),
        "strictly increasing revisions"
    );
    events
}

fn kinds(events: &[pb::Event]) -> Vec<EventKind> {
    events
        .iter()
        .map(|e| EventKind::try_from(e.kind).expect("kind"))
        .collect()
}

#[tokio::test]
async fn live_events_carry_the_request_as_it_stood() {
    live_events_on(TestServer::start().await).await;
}

/// `limits.coalesce_writes = false` (one write per HTTP/2 frame): the same stream, the same
/// events; and unary calls answer as before.
#[tokio::test]
async fn watch_and_calls_work_without_write_coalescing() {
    let server = TestServer::start_with(|c| c.limits.coalesce_writes = false).await;
    live_events_on(server).await;
}

async fn live_events_on(server: TestServer) {
    let mut watcher = server.client("service:notifier").await;
    let mut stream = watch(&mut watcher, watch_request("web")).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");

    let events = next_events(&mut stream, 2).await;
    assert_eq!(
        kinds(&events),
        vec![EventKind::Created, EventKind::Reviewed]
    );
    assert_eq!(events[0].revision, created.revision);
    let approved = &events[1];
    assert_eq!(
        (approved.from_state, approved.to_state),
        (State::InReview as i32, State::Approved as i32)
    );
    assert_eq!(approved.actor, "user:bob");
    let snapshot = approved.change_request.as_ref().expect("snapshot");
    assert_eq!(state(snapshot), State::Approved);
    assert_eq!(snapshot.revision, approved.revision);
    assert_eq!(snapshot.approval_count, 1);
    let first = events[0].change_request.as_ref().expect("snapshot");
    assert_eq!(state(first), State::InReview);
    assert_eq!(first.revision, events[0].revision);
}

#[tokio::test]
async fn filters_select_events() {
    let server = TestServer::start().await;
    let mut w = server.client("service:w").await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut staging = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            environment: "staging".into(),
            ..watch_request("web")
        },
    )
    .await;
    let mut approved = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            states: vec![State::Approved as i32],
            ..watch_request("web")
        },
    )
    .await;
    let mut segments = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            resource_type: "segment".into(),
            ..watch_request("web")
        },
    )
    .await;
    let mut other_project = watch(&mut w, watch_request("api")).await;

    let prod = create(&mut alice, new_request()).await;
    let stage = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            environment: "staging".into(),
            ..new_request()
        },
    )
    .await;
    let segment = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![pb::Change {
                resource_type: "segment".into(),
                resource_id: "beta".into(),
                ..flag_change("x")
            }],
            ..new_request()
        },
    )
    .await;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: prod.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");
    let api = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            project: "api".into(),
            ..new_request()
        },
    )
    .await;

    // From the revision after the last write: "now" is the hub's published head, which may
    // trail it, and the stage request's earlier events would then (rightly) come first.
    let mut by_id = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            id: stage.id.clone(),
            start_revision: api.revision + 1,
            ..watch_request("web")
        },
    )
    .await;
    alice
        .add_comment(pb::AddCommentRequest {
            id: stage.id.clone(),
            text: "hi".into(),
        })
        .await
        .expect("comment");

    let got = next_events(&mut approved, 1).await;
    assert_eq!(
        (got[0].change_request_id.as_str(), got[0].kind),
        (prod.id.as_str(), EventKind::Reviewed as i32)
    );
    let got = next_events(&mut segments, 1).await;
    assert_eq!(got[0].change_request_id, segment.id);
    let got = next_events(&mut other_project, 1).await;
    assert_eq!(got[0].change_request_id, api.id);
    let got = next_events(&mut by_id, 1).await;
    assert_eq!(
        (got[0].change_request_id.as_str(), got[0].kind),
        (stage.id.as_str(), EventKind::Commented as i32)
    );

    // Nothing else arrived on the staging stream: a last event proves the order. (The stream
    // may batch several events into one message, so they are read together.)
    let marker = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            environment: "staging".into(),
            ..new_request()
        },
    )
    .await;
    let got = next_events(&mut staging, 3).await;
    assert_eq!(
        got.iter()
            .map(|e| (e.change_request_id.as_str(), e.kind))
            .collect::<Vec<_>>(),
        vec![
            (stage.id.as_str(), EventKind::Created as i32),
            (stage.id.as_str(), EventKind::Commented as i32),
            (marker.id.as_str(), EventKind::Created as i32),
        ]
    );
}

#[tokio::test]
async fn include_initial_then_events_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut existing = Vec::new();
    for i in 0..120 {
        let created = create(&mut alice, new_request()).await;
        if i % 3 == 0 {
            bob.approve_change_request(pb::ApproveChangeRequestRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
            .expect("approve");
        }
        existing.push(created.id);
    }
    // Writers keep going while the snapshot is taken.
    let writer = {
        let mut client = server.client("user:carol").await;
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..40 {
                ids.push(create(&mut client, new_request()).await.id);
            }
            ids
        })
    };
    let mut w = server.client("service:w").await;
    let mut stream = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            include_initial: true,
            states: vec![State::InReview as i32, State::Approved as i32],
            ..watch_request("web")
        },
    )
    .await;
    let mut snapshot = Vec::new();
    let snapshot_revision = loop {
        let message = next_message(&mut stream).await;
        assert!(message.events.is_empty() && !message.progress);
        snapshot.extend(message.snapshot);
        if message.snapshot_complete {
            break message.revision;
        }
    };
    assert!(
        snapshot.len() >= 120,
        "every existing request is in the snapshot"
    );
    assert!(snapshot.iter().all(|r| r.revision <= snapshot_revision));
    let written = writer.await.expect("writer");
    let in_snapshot: BTreeSet<String> = snapshot.iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        in_snapshot.len(),
        snapshot.len(),
        "no request twice in the snapshot"
    );
    for id in &existing {
        assert!(in_snapshot.contains(id), "{id} missing from the snapshot");
    }
    // Every request written concurrently is in the snapshot or arrives as CREATED after it,
    // never both.
    let missing: Vec<&String> = written
        .iter()
        .filter(|id| !in_snapshot.contains(*id))
        .collect();
    let events = next_events(&mut stream, missing.len()).await;
    assert!(events.iter().all(|e| e.revision > snapshot_revision));
    let created_after: BTreeSet<String> = events
        .iter()
        .filter(|e| e.kind == EventKind::Created as i32)
        .map(|e| e.change_request_id.clone())
        .collect();
    for id in &missing {
        assert!(
            created_after.contains(*id),
            "{id} neither in the snapshot nor streamed"
        );
    }
    assert!(
        created_after.is_disjoint(&in_snapshot),
        "a request both in the snapshot and created after it"
    );
}

#[tokio::test]
async fn resume_continues_exactly_where_it_left_off() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut w = server.client("service:w").await;
    let mut stream = watch(&mut w, watch_request("web")).await;
    for _ in 0..3 {
        create(&mut alice, new_request()).await;
    }
    let seen = next_events(&mut stream, 3).await;
    drop(stream);
    // Written while disconnected.
    let mut missed = Vec::new();
    for _ in 0..4 {
        missed.push(create(&mut alice, new_request()).await.revision);
    }
    let last = seen.last().map(|e| e.revision).expect("events");
    let mut resumed = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            start_revision: last + 1,
            ..watch_request("web")
        },
    )
    .await;
    let events = next_events(&mut resumed, 4).await;
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        missed
    );
    // And it goes on live.
    let after = create(&mut alice, new_request()).await;
    assert_eq!(
        next_events(&mut resumed, 1).await[0].revision,
        after.revision
    );
}

#[tokio::test]
async fn start_revision_older_than_the_history_is_out_of_range() {
    let server = TestServer::start_with(|c| c.watch.history = 5).await;
    let mut alice = server.client("user:alice").await;
    let mut last = 0;
    for _ in 0..10 {
        last = create(&mut alice, new_request()).await.revision;
    }
    let mut w = server.client("service:w").await;
    // The window is measured from the head the hub has published; wait until that includes
    // the last create (a watch from it delivers it once published).
    let mut tail = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            start_revision: last,
            ..watch_request("web")
        },
    )
    .await;
    assert_eq!(next_events(&mut tail, 1).await[0].revision, last);
    drop(tail);
    let err = w
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: 1,
            ..watch_request("web")
        })
        .await
        .expect_err("too old");
    assert_error(&err, Code::OutOfRange, "REVISION_TOO_OLD");
    let info = tonic_types::StatusExt::get_details_error_info(&err).expect("info");
    let oldest: i64 = info
        .metadata
        .get("oldest_revision")
        .expect("oldest_revision")
        .parse()
        .expect("number");
    assert_eq!(oldest, last - 5 + 1);
    // The oldest allowed revision works.
    let mut stream = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            start_revision: oldest,
            ..watch_request("web")
        },
    )
    .await;
    let events = next_events(&mut stream, 5).await;
    assert_eq!(events.first().map(|e| e.revision), Some(oldest));
}

#[tokio::test]
async fn a_lagging_watcher_is_ended_with_its_resume_revision() {
    let server = TestServer::start_with(|c| {
        c.watch.max_lag = 20;
        c.watch.buffer = 16;
    })
    .await;
    // A client that reads slowly: a small HTTP/2 window, so the server stops sending.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut w = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel,
        Caller::named("service:slow"),
    );
    let mut stream = w
        .watch_change_requests(watch_request("web"))
        .await
        .expect("watch")
        .into_inner();
    let mut alice = server.client("user:alice").await;
    let mut written = Vec::new();
    for _ in 0..80 {
        let mut request = new_request();
        request.changes[0].payload =
            Some(payload(serde_json::json!({"blob": "x".repeat(8 * 1024)})));
        written.push(create(&mut alice, request).await.revision);
    }
    let mut received = Vec::new();
    let resume = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("no hang")
        {
            Ok(Some(message)) => received.extend(message.events.iter().map(|e| e.revision)),
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => {
                assert_error(&status, Code::ResourceExhausted, "WATCHER_TOO_SLOW");
                let info = tonic_types::StatusExt::get_details_error_info(&status).expect("info");
                break info
                    .metadata
                    .get("resume_revision")
                    .expect("resume_revision")
                    .parse::<i64>()
                    .expect("number");
            }
        }
    };
    assert!(
        received.len() < written.len(),
        "it was ended before it got everything"
    );
    assert_eq!(
        Some(resume),
        written.get(received.len()).copied(),
        "resume at the first revision not received"
    );
    assert_eq!(received[..], written[..received.len()]);
    // Resuming reads the log at its own pace and gets the rest.
    let mut fast = server.client("service:slow").await;
    let mut resumed = watch(
        &mut fast,
        pb::WatchChangeRequestsRequest {
            start_revision: resume,
            ..watch_request("web")
        },
    )
    .await;
    let rest = next_events(&mut resumed, written.len() - received.len()).await;
    assert_eq!(
        rest.iter().map(|e| e.revision).collect::<Vec<_>>(),
        written[received.len()..]
    );
}

#[tokio::test]
async fn idle_streams_get_progress_and_are_not_cut_by_the_request_timeout() {
    let server = TestServer::start_with(|c| {
        c.watch.progress_interval = Duration::from_millis(200);
        c.limits.request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let mut w = server.client("service:w").await;
    // From the next revision: "now" is the hub's published head, which may not include the
    // create yet, and then its event would (rightly) arrive first.
    let mut stream = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            start_revision: created.revision + 1,
            ..watch_request("web")
        },
    )
    .await;
    let started = std::time::Instant::now();
    let mut progress = 0;
    while started.elapsed() < Duration::from_millis(1200) {
        let message = next_message(&mut stream).await;
        assert!(message.progress && message.events.is_empty(), "{message:?}");
        assert_eq!(
            message.revision, created.revision,
            "every event up to the head was delivered"
        );
        progress += 1;
    }
    assert!(progress >= 4, "{progress} progress messages in 1.2 s");
    // The stream is still live after outliving the unary timeout several times.
    let later = create(&mut alice, new_request()).await;
    assert_eq!(
        next_events(&mut stream, 1).await[0].revision,
        later.revision
    );
}

/// A live stream that has just sent events still gets its progress message an interval after
/// the last of them: the timers a delivery leaves armed (and does not poll again) still fire,
/// and a progress message never comes early after a delivery.
#[tokio::test]
async fn a_stream_that_delivered_events_gets_progress_an_interval_after_the_last() {
    let interval = Duration::from_millis(300);
    let server = TestServer::start_with(|c| c.watch.progress_interval = interval).await;
    let mut alice = server.client("user:alice").await;
    let mut w = server.client("service:w").await;
    let mut stream = watch(&mut w, watch_request("web")).await;
    for round in 0..3 {
        let mut last = 0;
        for _ in 0..4 {
            let created = create(&mut alice, new_request()).await;
            let delivered = next_events(&mut stream, 1).await;
            assert_eq!(delivered[0].revision, created.revision, "round {round}");
            last = created.revision;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after_last = std::time::Instant::now();
        let message = next_message(&mut stream).await;
        let waited = after_last.elapsed();
        assert!(message.progress && message.events.is_empty(), "{message:?}");
        assert_eq!(
            message.revision, last,
            "progress names the last revision sent"
        );
        // The last event went out about 50 ms before `after_last`.
        assert!(
            waited >= interval - Duration::from_millis(100),
            "progress {waited:?} after the last event, interval {interval:?}"
        );
    }
}

#[tokio::test]
async fn watch_requests_are_validated() {
    let server = TestServer::start().await;
    let mut w = server.client("service:w").await;
    let err = w
        .watch_change_requests(watch_request(""))
        .await
        .expect_err("no project");
    assert_invalid(&err, &["project"]);
    let err = w
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: 3,
            include_initial: true,
            ..watch_request("web")
        })
        .await
        .expect_err("both");
    assert_invalid(&err, &["include_initial"]);
    let err = w
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: -1,
            ..watch_request("web")
        })
        .await
        .expect_err("negative");
    assert_invalid(&err, &["start_revision"]);
    let err = w
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            id: "nope".into(),
            ..watch_request("web")
        })
        .await
        .expect_err("bad id");
    assert_invalid(&err, &["id"]);
    let err = server
        .anonymous()
        .await
        .watch_change_requests(watch_request("web"))
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn shutdown_ends_streams_with_the_revision_to_resume_from() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let mut w = server.client("service:w").await;
    let start_revision = created.revision + 1;
    let mut stream = watch(
        &mut w,
        pb::WatchChangeRequestsRequest {
            start_revision,
            ..watch_request("web")
        },
    )
    .await;
    server.stop().await;
    let status = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("ended promptly")
        .expect_err("ended with a status");
    assert_error(&status, Code::Unavailable, "SHUTTING_DOWN");
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("info");
    assert_eq!(
        info.metadata.get("resume_revision"),
        Some(&(created.revision + 1).to_string())
    );
}

/// Many writers race; a watcher started before them must receive every committed event
/// exactly once, in revision order (numbers may have holes where a transaction rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_make_a_watcher_skip_or_repeat() {
    const WRITERS: usize = 12;
    const ROUNDS: usize = 20;
    let server = TestServer::start_with(|c| c.database.max_connections = 24).await;
    let mut w = server.client("service:w").await;
    let mut stream = watch(&mut w, watch_request("web")).await;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let mut author = server.client(&format!("user:author{writer}")).await;
        let mut reviewer = server.client(&format!("user:reviewer{writer}")).await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..ROUNDS {
                // Some creates reuse a request_id, so some transactions roll back (holes).
                let request = pb::CreateChangeRequestRequest {
                    request_id: format!("w{writer}-{}", round / 2),
                    title: format!("round {round}"),
                    ..new_request()
                };
                let created = match author.create_change_request(request).await {
                    Ok(created) => created.into_inner(),
                    Err(status) => {
                        assert_eq!(status.code(), Code::AlreadyExists);
                        continue;
                    }
                };
                reviewer
                    .approve_change_request(pb::ApproveChangeRequestRequest {
                        id: created.id.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("approve");
                ids.push(created.id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.expect("writer"));
    }
    // What the log holds, request by request.
    let mut committed = BTreeSet::new();
    let mut reader = server.client("service:w").await;
    for id in &ids {
        for event in events(&mut reader, id).await {
            committed.insert(event.revision);
        }
    }
    let mut delivered = Vec::new();
    while delivered.len() < committed.len() {
        match tokio::time::timeout(Duration::from_secs(15), next_events(&mut stream, 1)).await {
            Ok(events) => delivered.extend(events),
            Err(_) => {
                let got: BTreeSet<i64> = delivered.iter().map(|e: &pb::Event| e.revision).collect();
                panic!(
                    "missing {:?}; unexpected {:?}",
                    committed.difference(&got).collect::<Vec<_>>(),
                    got.difference(&committed).collect::<Vec<_>>()
                );
            }
        }
    }
    let delivered_set: BTreeSet<i64> = delivered.iter().map(|e| e.revision).collect();
    assert_eq!(delivered_set.len(), delivered.len(), "no event twice");
    assert_eq!(
        delivered_set, committed,
        "every committed event, nothing else"
    );
}

/// Two server processes on one database behave as one service: a watcher connected to one
/// sees the writes made through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_writes_through_another() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let other = Process::serve(&server.database_url, dir.path());
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", other.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut through_other = pb::change_requests_client::ChangeRequestsClient::with_interceptor(
        channel,
        Caller::named("user:alice"),
    );
    let mut w = server.client("service:w").await;
    let mut stream = watch(&mut w, watch_request("web")).await;
    let mut written = Vec::new();
    for _ in 0..5 {
        written.push(create(&mut through_other, new_request()).await.revision);
    }
    let events = next_events(&mut stream, 5).await;
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        written
    );
    drop(other);
}
