//! What one caller can hold with watch streams (security review, issue 19 item 5): streams per
//! principal, streams per HTTP/2 connection, a snapshot read a page at a time, and streams that
//! end when their credential expires, with the revision to resume from.

use std::{collections::BTreeSet, time::Duration};

use approvals::pb::{self, EventKind, State};
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

use crate::{
    callers::{self, Headers, Issuer},
    common::*,
};

type Messages = Streaming<pb::WatchChangeRequestsResponse>;

fn watch_request(project: &str) -> pb::WatchChangeRequestsRequest {
    pb::WatchChangeRequestsRequest {
        project: project.into(),
        ..Default::default()
    }
}

async fn next_message(stream: &mut Messages) -> pb::WatchChangeRequestsResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a message within 20 s")
        .expect("stream ok")
        .expect("stream open")
}

/// The next `n` events, skipping progress messages.
async fn next_events(stream: &mut Messages, n: usize) -> Vec<pb::Event> {
    let mut events = Vec::new();
    while events.len() < n {
        let message = next_message(stream).await;
        assert!(message.snapshot.is_empty(), "no snapshot here: {message:?}");
        events.extend(message.events);
    }
    events
}

/// The snapshot messages up to `snapshot_complete`: the requests and the snapshot's revision.
async fn snapshot(stream: &mut Messages) -> (Vec<pb::ChangeRequest>, i64) {
    let mut requests = Vec::new();
    loop {
        let message = next_message(stream).await;
        assert!(
            message.events.is_empty() && !message.progress,
            "{message:?}"
        );
        requests.extend(message.snapshot);
        if message.snapshot_complete {
            return (requests, message.revision);
        }
        assert_eq!(message.revision, 0, "only the last snapshot message has it");
    }
}

fn metadata(status: &tonic::Status, key: &str) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}

/// Waits until the hub has published `revision`, so that a watch opened next starts at or
/// after it (a watch "from now" starts at the published head, which may trail the last write).
async fn wait_published(client: &mut Client, project: &str, revision: i64) {
    let mut tail = client
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: revision,
            ..watch_request(project)
        })
        .await
        .expect("watch")
        .into_inner();
    let events = next_events(&mut tail, 1).await;
    assert_eq!(events[0].revision, revision);
}

#[tokio::test]
async fn watchers_are_capped_per_principal_and_released_when_streams_end() {
    let server = TestServer::start_with(|c| c.watch.max_watchers_per_principal = 2).await;
    // Development mode: callers name themselves, and may act on behalf of users.
    let mut feed = callers::requests(&server, Headers::actor("service:feed")).await;
    let mut for_u1 = callers::requests(
        &server,
        Headers::actor("service:feed").on_behalf_of("user:u1", ""),
    )
    .await;
    let mut for_u2 = callers::requests(
        &server,
        Headers::actor("service:feed").on_behalf_of("user:u2", ""),
    )
    .await;
    let first = feed
        .watch_change_requests(watch_request("web"))
        .await
        .expect("first stream")
        .into_inner();
    // On behalf of a user, the acting service holds the stream: it counts for service:feed.
    let _second = for_u1
        .watch_change_requests(watch_request("web"))
        .await
        .expect("second stream");
    let status = for_u2
        .watch_change_requests(watch_request("web"))
        .await
        .expect_err("a third stream of service:feed");
    let message = assert_error(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");
    assert!(message.contains("service:feed"), "{message}");
    assert!(message.contains("per principal"), "{message}");
    assert_eq!(
        metadata(&status, "max_watchers_per_principal").as_deref(),
        Some("2")
    );
    assert_eq!(
        metadata(&status, "principal").as_deref(),
        Some("service:feed")
    );

    // Another principal has its own allowance, the user included.
    let mut u2 = server.client("user:u2").await;
    let _own = u2
        .watch_change_requests(watch_request("web"))
        .await
        .expect("user:u2's own stream");

    // Ending a stream gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match feed.watch_change_requests(watch_request("web")).await {
            Ok(_) => break,
            Err(status) => {
                assert_error(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the ended stream was not released within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn one_connection_opens_at_most_max_concurrent_streams_at_once() {
    let server = TestServer::start_with(|c| c.limits.max_concurrent_streams = 2).await;
    // One client, one HTTP/2 connection.
    let mut w = server.client("service:w").await;
    let first = w
        .watch_change_requests(watch_request("web"))
        .await
        .expect("first stream")
        .into_inner();
    let _second = w
        .watch_change_requests(watch_request("web"))
        .await
        .expect("second stream")
        .into_inner();
    // The third waits for a free stream on that connection.
    let mut third_client = w.clone();
    let mut third = tokio::spawn(async move {
        third_client
            .watch_change_requests(watch_request("web"))
            .await
            .map(tonic::Response::into_inner)
    });
    let waited = tokio::time::timeout(Duration::from_millis(800), &mut third).await;
    assert!(
        waited.is_err(),
        "a third stream opened at once on a connection limited to 2: {waited:?}"
    );
    // Another connection is not held up by this one.
    let mut other = server.client("service:w").await;
    let _elsewhere = other
        .watch_change_requests(watch_request("web"))
        .await
        .expect("a stream on another connection");

    // When one ends, the waiting one opens, and works.
    drop(first);
    let mut third = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third stream opens once one has ended")
        .expect("task")
        .expect("third stream");
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let events = next_events(&mut third, 1).await;
    assert_eq!(events[0].change_request_id, created.id);
}

/// More requests than two snapshot pages (a page is 200), and a page that is only partly full.
const SNAPSHOT_REQUESTS: usize = 450;

/// Creates `SNAPSHOT_REQUESTS` requests in project `web`, oldest first, and waits until the hub
/// has published the last, so that a snapshot taken next holds every one of them.
async fn many_requests(server: &TestServer) -> Vec<pb::ChangeRequest> {
    let mut alice = server.client("user:alice").await;
    let mut created = Vec::with_capacity(SNAPSHOT_REQUESTS);
    for _ in 0..SNAPSHOT_REQUESTS {
        created.push(create(&mut alice, new_request()).await);
    }
    let last = created.last().map(|r| r.revision).expect("created");
    wait_published(&mut alice, "web", last).await;
    created
}

/// A client whose HTTP/2 window is small, so the server sends little ahead of what it reads.
async fn slow_client(server: &TestServer, headers: Headers) -> callers::RequestsClient {
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    pb::change_requests_client::ChangeRequestsClient::with_interceptor(channel, headers)
}

#[tokio::test]
async fn a_snapshot_larger_than_a_page_arrives_whole_then_exactly_the_events_after_it() {
    let server = TestServer::start().await;
    let created = many_requests(&server).await;
    // Two watchers: one of every request, one of IN_REVIEW requests only.
    let mut all_client = slow_client(&server, Headers::actor("service:all")).await;
    let mut in_review_client = slow_client(&server, Headers::actor("service:review")).await;
    let mut all = all_client
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            include_initial: true,
            ..watch_request("web")
        })
        .await
        .expect("watch")
        .into_inner();
    let mut in_review = in_review_client
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            include_initial: true,
            states: vec![State::InReview as i32],
            ..watch_request("web")
        })
        .await
        .expect("watch")
        .into_inner();
    let first_all = next_message(&mut all).await;
    let first_in_review = next_message(&mut in_review).await;
    assert!(!first_all.snapshot_complete && !first_in_review.snapshot_complete);

    // While the snapshots are being sent: the oldest requests (the last page, not read yet)
    // are approved, so they no longer are IN_REVIEW, and new ones are created.
    let mut bob = server.client("user:bob").await;
    let mut alice = server.client("user:alice").await;
    let mut after = Vec::new();
    for request in &created[..30] {
        after.push((
            approve(&mut bob, &request.id).await.revision,
            request.id.clone(),
        ));
    }
    for _ in 0..5 {
        let request = create(&mut alice, new_request()).await;
        after.push((request.revision, request.id));
    }
    let marker = create(&mut alice, new_request()).await;

    let expected: BTreeSet<&str> = created.iter().map(|r| r.id.as_str()).collect();
    for (first, stream, name) in [
        (first_all, &mut all, "all"),
        (first_in_review, &mut in_review, "IN_REVIEW"),
    ] {
        let (rest, revision) = snapshot(stream).await;
        let requests: Vec<pb::ChangeRequest> = first.snapshot.into_iter().chain(rest).collect();
        let ids: BTreeSet<&str> = requests.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), requests.len(), "{name}: no request twice");
        assert_eq!(ids, expected, "{name}: every request, and only those");
        // As they stood at the snapshot's revision: all in review, approved only after it.
        assert!(
            requests
                .iter()
                .all(|r| state(r) == State::InReview && r.revision <= revision),
            "{name}: requests as they stood at {revision}"
        );
        assert!(revision >= created.last().map(|r| r.revision).unwrap_or_default());
        assert!(after.iter().all(|(rev, _)| *rev > revision));
    }

    // Then exactly the events after the snapshot, and nothing before the marker but them.
    let events = next_events(&mut all, after.len() + 1).await;
    let mut revisions: Vec<i64> = after.iter().map(|(rev, _)| *rev).collect();
    revisions.push(marker.revision);
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        revisions
    );
    // The approvals moved out of IN_REVIEW: that watcher gets the creates only.
    let events = next_events(&mut in_review, 6).await;
    assert!(
        events
            .iter()
            .all(|e| e.kind == EventKind::Created as i32 && e.to_state == State::InReview as i32)
    );
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        revisions[30..]
    );
}

#[tokio::test]
async fn a_snapshot_is_read_a_page_at_a_time_as_it_is_sent() {
    let server = TestServer::start().await;
    let created = many_requests(&server).await;
    // The oldest request, the last the snapshot reads, cannot be read: the stored document is
    // damaged. A snapshot read whole before sending fails before sending anything; one read a
    // page at a time sends the pages before it, then fails.
    let db = Database::connect(&server.database_url)
        .await
        .expect("connect to the server's database");
    let backend = db.get_database_backend();
    let damaged = created.first().map(|r| r.id.clone()).expect("created");
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        match backend {
            sea_orm::DbBackend::Postgres => "UPDATE change_requests SET body = '{' WHERE id = $1",
            _ => "UPDATE change_requests SET body = '{' WHERE id = ?",
        },
        [damaged.clone().into()],
    ))
    .await
    .expect("damage one document");

    let mut w = server.client("service:w").await;
    let mut stream = w
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            include_initial: true,
            ..watch_request("web")
        })
        .await
        .expect("the stream opens before the whole snapshot is read")
        .into_inner();
    let mut received = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    assert!(!message.snapshot_complete, "the damaged page fails");
                    received.extend(message.snapshot.into_iter().map(|r| r.id));
                }
                Ok(None) => panic!("ended without an error"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ends within 20 s");
    assert_error(&status, Code::Internal, "INTERNAL");
    assert!(
        received.len() >= 200 && received.len() < SNAPSHOT_REQUESTS,
        "{} requests before the damaged page",
        received.len()
    );
    assert!(!received.contains(&damaged));
}

#[tokio::test]
async fn a_jwt_watch_ends_when_the_token_expires_and_resumes_with_a_fresh_one() {
    let issuer = Issuer::new("k1");
    let mut jwt = issuer.config();
    jwt.leeway = Duration::ZERO;
    let server = TestServer::start_with(|c| c.auth.jwt = Some(jwt)).await;
    let writer_token = issuer.token("user:alice", "approvals:write", &[]);
    let mut writer = callers::requests(&server, Headers::bearer(&writer_token)).await;
    let first = writer
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();

    // A token that expires in about two seconds.
    let now = callers::now_secs();
    let short = issuer.sign(serde_json::json!({
        "iss": callers::ISSUER, "aud": callers::AUDIENCE, "sub": "user:feed",
        "scope": "approvals:read", "iat": now, "nbf": now - 5, "exp": now + 3,
    }));
    let mut feed = callers::requests(&server, Headers::bearer(&short)).await;
    let opened = std::time::Instant::now();
    let mut stream = feed
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: first.revision,
            ..watch_request("web")
        })
        .await
        .expect("watch")
        .into_inner();
    let second = writer
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let mut delivered = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    delivered.extend(message.events.into_iter().map(|e| e.revision))
                }
                Ok(None) => panic!("ended without a status"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ends within 15 s");
    let lived = opened.elapsed();
    assert_eq!(delivered, [first.revision, second.revision]);
    let message = assert_error(&status, Code::Unauthenticated, "CREDENTIALS_EXPIRED");
    assert!(message.contains("start_revision"), "{message}");
    assert!(
        lived >= Duration::from_millis(1500),
        "ended after {lived:?}, before the token expired"
    );
    let resume: i64 = metadata(&status, "resume_revision")
        .expect("resume_revision")
        .parse()
        .expect("a number");
    assert_eq!(
        resume,
        second.revision + 1,
        "the first revision not delivered"
    );

    // Written while the watcher reconnects.
    let third = writer
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let fresh = issuer.token("user:feed", "approvals:read", &[]);
    let mut feed = callers::requests(&server, Headers::bearer(&fresh)).await;
    let mut resumed = feed
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: resume,
            ..watch_request("web")
        })
        .await
        .expect("resume with a fresh token")
        .into_inner();
    let events = next_events(&mut resumed, 1).await;
    assert_eq!(
        events[0].revision, third.revision,
        "nothing lost, nothing twice"
    );
}

#[tokio::test]
async fn a_snapshot_cut_short_by_expiry_has_no_resume_revision() {
    let issuer = Issuer::new("k1");
    let mut jwt = issuer.config();
    jwt.leeway = Duration::ZERO;
    let server = TestServer::start_with(|c| c.auth.jwt = Some(jwt)).await;
    let writer_token = issuer.token("user:alice", "approvals:write", &[]);
    let mut writer = callers::requests(&server, Headers::bearer(&writer_token)).await;
    let mut last = 0;
    for _ in 0..SNAPSHOT_REQUESTS {
        last = writer
            .create_change_request(new_request())
            .await
            .expect("create")
            .into_inner()
            .revision;
    }
    let mut reader = callers::requests(&server, Headers::bearer(&writer_token)).await;
    let mut tail = reader
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            start_revision: last,
            ..watch_request("web")
        })
        .await
        .expect("watch")
        .into_inner();
    next_events(&mut tail, 1).await;

    let now = callers::now_secs();
    let short = issuer.sign(serde_json::json!({
        "iss": callers::ISSUER, "aud": callers::AUDIENCE, "sub": "user:feed",
        "scope": "approvals:read", "iat": now, "nbf": now - 5, "exp": now + 2,
    }));
    // A slow reader: it takes one message, then pauses past the token's expiry.
    let mut feed = slow_client(&server, Headers::bearer(&short)).await;
    let mut stream = feed
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            include_initial: true,
            ..watch_request("web")
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next_message(&mut stream).await;
    assert!(!first.snapshot_complete);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(message)) => assert!(
                    !message.snapshot_complete,
                    "the snapshot went on after the token expired"
                ),
                Ok(None) => panic!("ended without a status"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ends within 15 s");
    let message = assert_error(&status, Code::Unauthenticated, "CREDENTIALS_EXPIRED");
    assert!(message.contains("include_initial"), "{message}");
    assert_eq!(metadata(&status, "resume_revision"), None);
}
