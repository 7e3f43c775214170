//! Bounded change request documents: comments and reviews are capped, so is the document's
//! size (as stored and as served), a refused command writes nothing, and the event log keeps
//! comments once (in the request) instead of in every event's snapshot, while watch and
//! ListChangeRequestEvents still serve exactly the request as it stood after each event.

use std::time::Duration;

use approvals::pb::{self, EventKind};
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::*;

const MAX_COMMENTS: usize = 500;
const MAX_REVIEWS: usize = 500;
const MAX_DOCUMENT_BYTES: usize = 2 * 1024 * 1024;
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The request as an event carries it: without the fields computed for a caller.
fn as_stored(mut request: pb::ChangeRequest) -> pb::ChangeRequest {
    request.can_approve = false;
    request.can_cancel = false;
    request.is_requester = false;
    request.user_decision = pb::Decision::Unspecified as i32;
    request.can_approve_reason.clear();
    request
}

fn metadata(status: &tonic::Status, key: &str) -> String {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
        .unwrap_or_else(|| panic!("no metadata {key} in {status:?}"))
}

async fn comment(
    client: &mut Client,
    id: &str,
    text: &str,
) -> Result<pb::ChangeRequest, tonic::Status> {
    client
        .add_comment(pb::AddCommentRequest {
            id: id.into(),
            text: text.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every event of `id` with the request it carries, page by page (a page of large requests
/// must fit the client's message limit).
async fn events_with_requests(client: &mut Client, id: &str) -> Vec<pb::Event> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_change_request_events(pb::ListChangeRequestEventsRequest {
                id: id.into(),
                page_size: 20,
                page_token,
                include_change_request: true,
            })
            .await
            .expect("events")
            .into_inner();
        all.extend(page.events);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Events of `id` from a watch stream, until the one at `last`.
async fn watched_until(
    stream: &mut tonic::Streaming<pb::WatchChangeRequestsResponse>,
    id: &str,
    last: i64,
) -> Vec<pb::Event> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|e: &pb::Event| e.revision < last) {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("not ended");
        seen.extend(
            message
                .events
                .into_iter()
                .filter(|e| e.change_request_id == id),
        );
    }
    seen
}

async fn watch(
    server: &TestServer,
    id: &str,
    start_revision: i64,
) -> tonic::Streaming<pb::WatchChangeRequestsResponse> {
    // A catching-up watcher gets up to 256 events per message: large with large requests.
    let mut client = server
        .client("user:carol")
        .await
        .max_decoding_message_size(256 * 1024 * 1024);
    client
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            id: id.into(),
            start_revision,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The event rows of one request, the bytes of their snapshots, and the bytes of the request
/// row's document, read from the database.
async fn stored_events(server: &TestServer, id: &str) -> (i64, i64, i64) {
    let db = Database::connect(&server.database_url)
        .await
        .expect("connect to the test database");
    let backend = db.get_database_backend();
    let sql = "SELECT COUNT(*) AS n, CAST(SUM(LENGTH(e.snapshot)) AS BIGINT) AS bytes, \
               CAST(MAX(LENGTH(r.body)) AS BIGINT) AS body \
               FROM change_request_events e JOIN change_requests r ON r.id = e.change_request_id \
               WHERE e.change_request_id = ";
    let sql = match backend {
        DbBackend::Postgres => format!("{sql}$1"),
        _ => format!("{sql}?"),
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(backend, sql, [id.into()]))
        .await
        .expect("query")
        .expect("a row");
    (
        row.try_get("", "n").expect("n"),
        row.try_get("", "bytes").expect("bytes"),
        row.try_get("", "body").expect("body"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_are_capped_kept_once_and_served_exactly_after_each_event() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    // From now, on the hub's live path (no id filter yet: the request does not exist).
    let mut live = watch(&server, "", 0).await;
    let created = create(&mut alice, new_request()).await;
    let id = created.id.clone();

    // Ten at a time (each call answers with the request right after its own event; their
    // revisions order them).
    let mut after_each = vec![as_stored(created.clone())];
    for batch in 0..MAX_COMMENTS / 10 {
        let calls = (0..10).map(|i| {
            let mut bob = bob.clone();
            let id = id.clone();
            async move {
                comment(
                    &mut bob,
                    &id,
                    &format!("comment {batch}.{i}: looks fine to me"),
                )
                .await
                .expect("comment")
            }
        });
        after_each.extend(
            futures::future::join_all(calls)
                .await
                .into_iter()
                .map(as_stored),
        );
    }
    after_each.sort_by_key(|r| r.revision);
    for (n, request) in after_each.iter().enumerate() {
        assert_eq!(request.comments.len(), n, "one comment per event, in order");
    }
    let full = after_each.last().cloned().expect("commented");

    // One more is refused, and writes nothing.
    let before = events(&mut alice, &id).await.len();
    let status = comment(&mut bob, &id, "one too many")
        .await
        .expect_err("over the cap");
    let message = assert_error(&status, Code::FailedPrecondition, "TOO_MANY_COMMENTS");
    assert!(message.contains("500"), "{message}");
    assert_eq!(metadata(&status, "max_comments"), "500");
    assert_eq!(events(&mut alice, &id).await.len(), before);
    let current = get(&mut alice, &id).await;
    assert_eq!(current.revision, full.revision);
    assert_eq!(current.comments.len(), MAX_COMMENTS);

    // An event of another kind after them carries them all.
    let approved = approve(&mut bob, &id).await;
    assert_eq!(approved.comments.len(), MAX_COMMENTS);
    after_each.push(as_stored(approved.clone()));

    // Stored once: each event's snapshot leaves the comments to the request row.
    let (rows, bytes, body) = stored_events(&server, &id).await;
    eprintln!(
        "{rows} event rows, {bytes} snapshot bytes ({} per row) for {MAX_COMMENTS} comments; \
         the request row's document is {body} bytes, the message {} bytes",
        bytes / rows,
        full.encoded_len()
    );
    assert_eq!(rows as usize, MAX_COMMENTS + 2);
    // Whole snapshots took about 20 MB here (they grew with every comment); without the
    // comments each is the size of the request before its first comment.
    assert!(
        (bytes as usize) < (MAX_COMMENTS + 2) * 4096,
        "{bytes} bytes of snapshots"
    );

    // ListChangeRequestEvents, a replaying watcher (the log) and the live one (the hub) all
    // serve the request exactly as it stood after each event.
    let listed = events_with_requests(&mut alice, &id).await;
    let mut replayed = watch(&server, &id, created.revision).await;
    let replayed = watched_until(&mut replayed, &id, approved.revision).await;
    let live = watched_until(&mut live, &id, approved.revision).await;
    for (name, events) in [("listed", listed), ("replayed", replayed), ("live", live)] {
        assert_eq!(events.len(), after_each.len(), "{name}");
        for (event, expected) in events.iter().zip(&after_each) {
            assert_eq!(event.revision, expected.revision, "{name}");
            let carried = event.change_request.as_ref().expect("the request");
            assert!(
                carried == expected,
                "{name}: event {} ({:?}) carries {} comments, expected {}",
                event.revision,
                event.kind(),
                carried.comments.len(),
                expected.comments.len()
            );
        }
        assert!(
            events[1..=MAX_COMMENTS]
                .iter()
                .all(|e| e.kind() == EventKind::Commented),
            "{name}"
        );
    }

    // include_initial: the request at the head, with every comment.
    let mut initial = server
        .client("user:carol")
        .await
        .max_decoding_message_size(64 * 1024 * 1024)
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            id: id.clone(),
            include_initial: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let snapshot = initial.message().await.expect("open").expect("snapshot");
    assert!(snapshot.snapshot_complete);
    assert_eq!(snapshot.snapshot, vec![as_stored(approved)]);
}

/// A change whose payload is `count` zeros: 2 bytes each as JSON, 11 as protobuf.
fn zeros_change(resource_id: &str, count: usize) -> pb::Change {
    let zeros = ListValue {
        values: vec![
            Value {
                kind: Some(Kind::NumberValue(0.0)),
            };
            count
        ],
    };
    pb::Change {
        payload: Some(Struct {
            fields: [(
                "zeros".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(zeros)),
                },
            )]
            .into(),
        }),
        ..flag_change(resource_id)
    }
}

#[tokio::test]
async fn the_document_cap_refuses_what_would_grow_past_it_and_writes_nothing() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let id = created.id.clone();

    // Comments of the largest size allowed: about 32 fit in 2 MiB.
    let text = "x".repeat(MAX_TEXT_BYTES);
    let mut accepted = 0;
    let status = loop {
        match comment(&mut bob, &id, &text).await {
            Ok(_) => accepted += 1,
            Err(status) => break status,
        }
        assert!(
            accepted <= MAX_DOCUMENT_BYTES / MAX_TEXT_BYTES,
            "never refused"
        );
    };
    assert!(accepted >= 30, "{accepted} comments accepted");
    let message = assert_error(&status, Code::FailedPrecondition, "DOCUMENT_TOO_LARGE");
    assert!(message.contains("2097152"), "{message}");
    assert_eq!(metadata(&status, "max_document_bytes"), "2097152");
    assert!(
        metadata(&status, "document_bytes")
            .parse::<usize>()
            .expect("a size")
            > MAX_DOCUMENT_BYTES
    );
    let current = get(&mut alice, &id).await;
    assert_eq!(current.comments.len(), accepted);
    let revision = current.revision;
    let count = events(&mut alice, &id).await.len();
    assert!(current.encoded_len() <= MAX_DOCUMENT_BYTES);

    // A review that would not fit is refused too; a short one still fits.
    let status = bob
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: id.clone(),
            comment: text.clone(),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_error(&status, Code::FailedPrecondition, "DOCUMENT_TOO_LARGE");
    // And an edit.
    let mut body = current.clone();
    body.description = text.clone();
    let status = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(body),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect_err("too large");
    assert_error(&status, Code::FailedPrecondition, "DOCUMENT_TOO_LARGE");
    assert_eq!(get(&mut alice, &id).await.revision, revision);
    assert_eq!(events(&mut alice, &id).await.len(), count);
    let approved = approve(&mut bob, &id).await;
    assert_eq!(state(&approved), pb::State::Approved);

    // A create over the cap as JSON: ten payloads of 250 KiB (each under the payload limit).
    let mut big = new_request();
    big.changes = (0..10)
        .map(|i| pb::Change {
            payload: Some(payload(serde_json::json!({"blob": "y".repeat(250 * 1024)}))),
            ..flag_change(&format!("flag-{i}"))
        })
        .collect();
    let status = alice
        .create_change_request(big)
        .await
        .expect_err("too large");
    assert_error(&status, Code::FailedPrecondition, "DOCUMENT_TOO_LARGE");

    // Over the cap only as served: ten payloads of 23,000 zeros are 46 KB of JSON each but
    // 253 KB of protobuf, 2.5 MB in all.
    let mut zeros = new_request();
    zeros.changes = (0..10)
        .map(|i| zeros_change(&format!("flag-{i}"), 23_000))
        .collect();
    assert!(
        zeros
            .changes
            .iter()
            .all(|c| c.payload.as_ref().map_or(0, Message::encoded_len) < 256 * 1024)
    );
    let status = alice
        .create_change_request(zeros)
        .await
        .expect_err("too large to serve");
    assert_error(&status, Code::FailedPrecondition, "DOCUMENT_TOO_LARGE");
    assert!(
        metadata(&status, "document_bytes")
            .parse::<usize>()
            .expect("a size")
            > MAX_DOCUMENT_BYTES
    );

    let list = list_project(&mut alice, "web").await;
    assert_eq!(list.change_requests.len(), 1, "nothing else was created");
}

/// Reviews grow when edits dismiss them and reviewers review again: capped, dismissed ones
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_are_capped() {
    let server = TestServer::start_with(|config| config.min_approvals = 100).await;
    let mut alice = server.client("user:alice").await;
    let mut reviewers = Vec::new();
    for i in 0..10 {
        reviewers.push(server.client(&format!("user:reviewer{i}")).await);
    }
    let mut current = create(&mut alice, new_request()).await;
    let id = current.id.clone();
    for round in 0..MAX_REVIEWS / reviewers.len() {
        let calls = reviewers.iter().map(|reviewer| {
            let mut reviewer = reviewer.clone();
            let id = id.clone();
            async move { approve(&mut reviewer, &id).await }
        });
        let reviewed = futures::future::join_all(calls).await;
        current = reviewed
            .into_iter()
            .max_by_key(|r| r.revision)
            .expect("reviewed");
        let mut body = current.clone();
        body.title = format!("Roll out checkout, take {round}");
        current = alice
            .update_change_request(pb::UpdateChangeRequestRequest {
                change_request: Some(body),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            })
            .await
            .expect("edit")
            .into_inner();
    }
    assert_eq!(current.reviews.len(), MAX_REVIEWS);
    assert!(current.reviews.iter().all(|r| r.dismissed));
    let count = events(&mut alice, &id).await.len();
    let status = reviewers[0]
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("over the cap");
    assert_error(&status, Code::FailedPrecondition, "TOO_MANY_REVIEWS");
    assert_eq!(metadata(&status, "max_reviews"), "500");
    assert_eq!(get(&mut alice, &id).await.revision, current.revision);
    assert_eq!(events(&mut alice, &id).await.len(), count);
    // The requester can still withdraw it.
    let cancelled = alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id,
            ..Default::default()
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(state(&cancelled), pb::State::Cancelled);
}
