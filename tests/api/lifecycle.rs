//! Creating, reviewing, editing, cancelling and commenting, and the audit trail they leave.

use approvals::pb::{self, EventKind, State};
use prost_types::FieldMask;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn create_returns_the_stored_request() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;

    assert_eq!(
        uuid::Uuid::parse_str(&created.id)
            .expect("uuid")
            .get_version_num(),
        7
    );
    assert_eq!(state(&created), State::InReview);
    assert_eq!(created.created_by, "user:alice");
    assert_eq!(created.min_approvals, 1);
    assert_eq!(created.approval_count, 0);
    assert!(created.revision > 0);
    assert!(!created.etag.is_empty());
    assert!(created.is_requester && created.can_cancel && !created.can_approve);
    assert_eq!(created.changes.len(), 1);
    let change = &created.changes[0];
    assert!(!change.id.is_empty());
    assert_eq!(change.created_by, "user:alice");
    assert_eq!(
        change.payload,
        Some(payload(serde_json::json!({"enabled": true, "rollout": 50})))
    );
    assert_eq!(
        pb::ValidationStatus::try_from(created.validation_status),
        Ok(pb::ValidationStatus::Skipped)
    );

    // Another caller reads the same request, with the flags computed for them.
    let mut bob = server.client("user:bob").await;
    let read = bob
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.id, created.id);
    assert_eq!(read.revision, created.revision);
    assert_eq!(read.changes, created.changes);
    assert!(read.can_approve && !read.can_cancel && !read.is_requester);
}

#[tokio::test]
async fn bundled_changes_and_drafts() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut request = new_request();
    request.changes = vec![flag_change("a"), flag_change("b"), flag_change("c")];
    request.draft = true;
    let draft = create(&mut alice, request).await;
    assert_eq!(state(&draft), State::Draft);
    assert_eq!(draft.changes.len(), 3);

    let mut bob = server.client("user:bob").await;
    let err = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: draft.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("drafts are not reviewed");
    let message = assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION");
    assert_eq!(message, "cannot approve a change request in state DRAFT");

    let err = bob
        .submit_change_request(pb::SubmitChangeRequestRequest {
            id: draft.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("only the requester submits");
    assert_error(&err, Code::PermissionDenied, "NOT_REQUESTER");

    let submitted = alice
        .submit_change_request(pb::SubmitChangeRequestRequest {
            id: draft.id.clone(),
            etag: draft.etag.clone(),
        })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(state(&submitted), State::InReview);

    let err = alice
        .submit_change_request(pb::SubmitChangeRequestRequest {
            id: draft.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("already submitted");
    let message = assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION");
    assert!(
        message.contains("IN_REVIEW") && message.contains("submit"),
        "{message}"
    );
}

#[tokio::test]
async fn quorum_of_distinct_reviewers_approves() {
    let server = TestServer::start_with(|c| c.min_approvals = 2).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut carol = server.client("user:carol").await;
    let created = create(&mut alice, new_request()).await;
    assert_eq!(created.min_approvals, 2);

    let approve = |comment: &str| pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        comment: comment.into(),
        ..Default::default()
    };
    let once = bob
        .approve_change_request(approve("looks good"))
        .await
        .expect("approve")
        .into_inner();
    assert_eq!((state(&once), once.approval_count), (State::InReview, 1));
    assert_eq!(
        pb::Decision::try_from(once.user_decision),
        Ok(pb::Decision::Approve)
    );
    // Approving twice does not count twice.
    let twice = bob
        .approve_change_request(approve("still good"))
        .await
        .expect("approve again")
        .into_inner();
    assert_eq!(
        (state(&twice), twice.approval_count, twice.reviews.len()),
        (State::InReview, 1, 1)
    );
    assert_eq!(twice.reviews[0].comment, "still good");

    let approved = carol
        .approve_change_request(approve(""))
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(
        (state(&approved), approved.approval_count),
        (State::Approved, 2)
    );
    assert!(!approved.can_approve);

    let err = carol
        .approve_change_request(approve(""))
        .await
        .expect_err("no longer in review");
    let message = assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION");
    assert_eq!(message, "cannot approve a change request in state APPROVED");
    let err = carol
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no longer in review");
    assert_eq!(
        assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION"),
        "cannot reject a change request in state APPROVED"
    );
}

#[tokio::test]
async fn requester_cannot_approve_and_nothing_is_written() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let err = alice
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("self approval");
    assert_error(&err, Code::PermissionDenied, "SELF_APPROVAL_FORBIDDEN");
    let read = alice
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.revision, created.revision);
    assert!(read.reviews.is_empty());
    assert_eq!(events(&mut alice, &created.id).await.len(), 1);
}

#[tokio::test]
async fn one_rejection_rejects_and_a_later_decision_replaces_an_earlier_one() {
    let server = TestServer::start_with(|c| c.min_approvals = 2).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");
    let rejected = bob
        .reject_change_request(pb::RejectChangeRequestRequest {
            id: created.id.clone(),
            comment: "rollout too fast".into(),
            ..Default::default()
        })
        .await
        .expect("reject")
        .into_inner();
    assert_eq!(state(&rejected), State::Rejected);
    assert_eq!(rejected.approval_count, 0);
    assert_eq!(rejected.reviews.len(), 1);
    assert_eq!(
        pb::Decision::try_from(rejected.reviews[0].decision),
        Ok(pb::Decision::Reject)
    );
    assert_eq!(rejected.reviews[0].comment, "rollout too fast");

    let err = alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("rejected requests are closed");
    assert_eq!(
        assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION"),
        "cannot cancel a change request in state REJECTED"
    );
}

#[tokio::test]
async fn only_the_requester_cancels_open_requests() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    for draft in [true, false] {
        let created = create(
            &mut alice,
            pb::CreateChangeRequestRequest {
                draft,
                ..new_request()
            },
        )
        .await;
        let err = bob
            .cancel_change_request(pb::CancelChangeRequestRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("not the requester");
        let message = assert_error(&err, Code::PermissionDenied, "NOT_REQUESTER");
        assert!(message.contains("user:alice"), "{message}");
        let cancelled = alice
            .cancel_change_request(pb::CancelChangeRequestRequest {
                id: created.id.clone(),
                reason: "not needed".into(),
                ..Default::default()
            })
            .await
            .expect("cancel")
            .into_inner();
        assert_eq!(state(&cancelled), State::Cancelled);
        assert!(!cancelled.can_cancel);
    }
    // APPROVED requests can still be withdrawn.
    let created = create(&mut alice, new_request()).await;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");
    let cancelled = alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel approved")
        .into_inner();
    assert_eq!(state(&cancelled), State::Cancelled);
    let err = alice
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("already cancelled");
    assert_eq!(
        assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION"),
        "cannot cancel a change request in state CANCELLED"
    );
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test]
async fn update_edits_fields_and_changes() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut request = new_request();
    request.changes = vec![flag_change("a"), flag_change("b")];
    let created = create(&mut alice, request).await;
    let kept = created.changes[0].clone();

    let mut edit = created.clone();
    edit.title = "New title".into();
    edit.description = "ignored: not in the mask".into();
    let mut replaced = kept.clone();
    replaced.payload = Some(payload(serde_json::json!({"enabled": false})));
    edit.changes = vec![replaced, flag_change("c")];
    let updated = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(edit),
            update_mask: mask(&["title", "changes"]),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.title, "New title");
    assert_eq!(updated.description, created.description);
    let ids: Vec<(&str, &str)> = updated
        .changes
        .iter()
        .map(|c| (c.id.as_str(), c.resource_id.as_str()))
        .collect();
    assert_eq!(ids[0], (kept.id.as_str(), "a"));
    assert_eq!(ids[1].1, "c");
    assert_ne!(
        ids[1].0, created.changes[1].id,
        "b was discarded and c is new"
    );
    assert_eq!(
        updated.changes[0].payload,
        Some(payload(serde_json::json!({"enabled": false})))
    );
    assert!(updated.revision > created.revision);
    assert_ne!(updated.etag, created.etag);

    // The stale etag is refused: optimistic concurrency.
    let mut stale = created.clone();
    stale.title = "Lost update".into();
    let err = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(stale),
            update_mask: mask(&["title"]),
        })
        .await
        .expect_err("stale etag");
    assert_error(&err, Code::Aborted, "ETAG_MISMATCH");

    // Only the requester edits.
    let mut bob = server.client("user:bob").await;
    let err = bob
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: created.id.clone(),
                title: "x".into(),
                ..Default::default()
            }),
            update_mask: mask(&["title"]),
        })
        .await
        .expect_err("not the requester");
    assert_error(&err, Code::PermissionDenied, "NOT_REQUESTER");

    // Fields outside the updatable set are named.
    let err = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: created.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["title", "state"]),
        })
        .await
        .expect_err("state is not updatable");
    assert_invalid(&err, &["update_mask.paths[1]"]);
}

#[tokio::test]
async fn editing_in_review_dismisses_earlier_approvals() {
    let server = TestServer::start_with(|c| c.min_approvals = 2).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut carol = server.client("user:carol").await;
    let created = create(&mut alice, new_request()).await;
    let approve = pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        ..Default::default()
    };
    bob.approve_change_request(approve.clone())
        .await
        .expect("approve");

    let edited = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: created.id.clone(),
                changes: vec![flag_change("other")],
                ..Default::default()
            }),
            update_mask: mask(&["changes"]),
        })
        .await
        .expect("edit")
        .into_inner();
    assert_eq!(edited.approval_count, 0);
    assert!(edited.reviews.iter().all(|r| r.dismissed));

    // The stale approval does not count: one fresh approval is not quorum.
    let after = carol
        .approve_change_request(approve.clone())
        .await
        .expect("approve")
        .into_inner();
    assert_eq!((state(&after), after.approval_count), (State::InReview, 1));
    let approved = bob
        .approve_change_request(approve)
        .await
        .expect("approve again")
        .into_inner();
    assert_eq!(
        (state(&approved), approved.approval_count),
        (State::Approved, 2)
    );

    // Approved requests are no longer edited.
    let err = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: created.id.clone(),
                title: "x".into(),
                ..Default::default()
            }),
            update_mask: mask(&["title"]),
        })
        .await
        .expect_err("approved");
    assert_eq!(
        assert_error(&err, Code::FailedPrecondition, "INVALID_TRANSITION"),
        "cannot update a change request in state APPROVED"
    );
}

#[tokio::test]
async fn etags_make_reviews_conditional() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    alice
        .add_comment(pb::AddCommentRequest {
            id: created.id.clone(),
            text: "ping".into(),
        })
        .await
        .expect("comment");
    let err = bob
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            etag: created.etag.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the request changed since bob read it");
    assert_error(&err, Code::Aborted, "ETAG_MISMATCH");
}

#[tokio::test]
async fn comments_and_the_audit_trail() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            draft: true,
            ..new_request()
        },
    )
    .await;
    alice
        .submit_change_request(pb::SubmitChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("submit");
    let commented = bob
        .add_comment(pb::AddCommentRequest {
            id: created.id.clone(),
            text: "why 50%?".into(),
        })
        .await
        .expect("comment")
        .into_inner();
    assert_eq!(commented.comments.len(), 1);
    assert_eq!(
        (
            commented.comments[0].author.as_str(),
            commented.comments[0].text.as_str()
        ),
        ("user:bob", "why 50%?")
    );
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: created.id.clone(),
        comment: "ok".into(),
        ..Default::default()
    })
    .await
    .expect("approve");
    // Comments are allowed on closed requests too.
    bob.add_comment(pb::AddCommentRequest {
        id: created.id.clone(),
        text: "thanks".into(),
    })
    .await
    .expect("comment after approval");

    let trail = events(&mut alice, &created.id).await;
    let summary: Vec<(EventKind, State, State, &str)> = trail
        .iter()
        .map(|e| {
            (
                EventKind::try_from(e.kind).expect("kind"),
                State::try_from(e.from_state).expect("state"),
                State::try_from(e.to_state).expect("state"),
                e.actor.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (EventKind::Created, State::Draft, State::Draft, "user:alice"),
            (
                EventKind::Submitted,
                State::Draft,
                State::InReview,
                "user:alice"
            ),
            (
                EventKind::Commented,
                State::InReview,
                State::InReview,
                "user:bob"
            ),
            (
                EventKind::Reviewed,
                State::InReview,
                State::Approved,
                "user:bob"
            ),
            (
                EventKind::Commented,
                State::Approved,
                State::Approved,
                "user:bob"
            ),
        ]
    );
    assert!(
        trail.windows(2).all(|w| w[0].revision < w[1].revision),
        "oldest first, increasing"
    );
    assert!(
        trail
            .iter()
            .all(|e| e.change_request_id == created.id && e.project == "web")
    );
    assert!(
        trail.iter().all(|e| e.change_request.is_none()),
        "snapshots only on request"
    );
    let latest = alice
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        latest.revision,
        trail.last().map(|e| e.revision).unwrap_or_default()
    );

    // Snapshots, and pagination of the trail.
    let first = alice
        .list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: created.id.clone(),
            page_size: 2,
            include_change_request: true,
            ..Default::default()
        })
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.events.len(), 2);
    let snapshot = first.events[1].change_request.as_ref().expect("snapshot");
    assert_eq!(
        (state(snapshot), snapshot.revision),
        (State::InReview, first.events[1].revision)
    );
    let mut seen: Vec<i64> = first.events.iter().map(|e| e.revision).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = alice
            .list_change_request_events(pb::ListChangeRequestEventsRequest {
                id: created.id.clone(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("next page")
            .into_inner();
        seen.extend(page.events.iter().map(|e| e.revision));
        token = page.next_page_token;
    }
    assert_eq!(seen, trail.iter().map(|e| e.revision).collect::<Vec<_>>());
}

#[tokio::test]
async fn request_id_makes_create_idempotent() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let request = pb::CreateChangeRequestRequest {
        request_id: "deploy-42".into(),
        ..new_request()
    };
    let first = create(&mut alice, request.clone()).await;
    let again = create(&mut alice, request.clone()).await;
    assert_eq!(again.id, first.id);
    assert_eq!(again.revision, first.revision);
    assert_eq!(events(&mut alice, &first.id).await.len(), 1);

    let err = alice
        .create_change_request(pb::CreateChangeRequestRequest {
            title: "other".into(),
            ..request.clone()
        })
        .await
        .expect_err("same request_id, different body");
    let message = assert_error(&err, tonic::Code::AlreadyExists, "REQUEST_ID_REUSED");
    assert!(message.contains("deploy-42"), "{message}");

    // Keys are per caller.
    let mut bob = server.client("user:bob").await;
    let bobs = create(&mut bob, request.clone()).await;
    assert_ne!(bobs.id, first.id);

    let list = list_project(&mut alice, "web").await;
    assert_eq!(list.total_size, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_request_id_make_one_request() {
    let server = TestServer::start().await;
    let request = pb::CreateChangeRequestRequest {
        request_id: "race".into(),
        ..new_request()
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = server.client("user:alice").await;
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            create(&mut client, request).await.id
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry got the same request: {ids:?}");
}

/// Many reviewers approve one request at the same moment, each on its own connection: every
/// approval that is accepted is counted exactly once, and exactly one of them moves the request
/// to APPROVED; the ones that arrive after quorum are refused, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_are_counted_once_with_one_transition() {
    const QUORUM: i32 = 5;
    const REVIEWERS: usize = 12;
    let server = TestServer::start_with(|c| c.min_approvals = QUORUM as u32).await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(REVIEWERS));
    let mut tasks = Vec::new();
    for i in 0..REVIEWERS {
        let mut reviewer = server.client(&format!("user:reviewer{i}")).await;
        let id = created.id.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            reviewer
                .approve_change_request(pb::ApproveChangeRequestRequest {
                    id,
                    ..Default::default()
                })
                .await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_error(&status, Code::FailedPrecondition, "INVALID_TRANSITION");
            }
        }
    }
    assert_eq!(
        accepted, QUORUM,
        "approvals until quorum are accepted, later ones refused"
    );

    let after = alice
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (state(&after), after.approval_count),
        (State::Approved, QUORUM)
    );
    let trail = events(&mut alice, &created.id).await;
    let reviews: Vec<&pb::Event> = trail
        .iter()
        .filter(|e| e.kind == EventKind::Reviewed as i32)
        .collect();
    assert_eq!(reviews.len(), QUORUM as usize);
    let transitions = reviews
        .iter()
        .filter(|e| e.to_state == State::Approved as i32)
        .count();
    assert_eq!(
        transitions, 1,
        "exactly one review moved the request to APPROVED"
    );
    assert_eq!(
        reviews.last().map(|e| e.to_state),
        Some(State::Approved as i32)
    );
    assert!(trail.windows(2).all(|w| w[0].revision < w[1].revision));
}

/// Group commit (issue 28): on SQLite the calls in flight together share one commit, each in
/// its own savepoint. Refused calls among them (a stale etag; creates racing for one
/// request_id, whose losers are refused by the unique index after their CREATED event row was
/// written) change nothing, and the others commit with exactly their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_calls_among_concurrent_ones_change_nothing_of_the_others() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut ids = Vec::new();
    let mut stale_etags = Vec::new();
    for i in 0..24 {
        let created = create(&mut alice, new_request()).await;
        if i >= 16 {
            // Edited after the etag was read: that etag is stale.
            let mut edited = created.clone();
            edited.title = format!("edited {i}");
            alice
                .update_change_request(pb::UpdateChangeRequestRequest {
                    change_request: Some(edited),
                    update_mask: mask(&["title"]),
                })
                .await
                .expect("edit");
            stale_etags.push(created.etag.clone());
        }
        ids.push(created.id);
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut bob = server.client("user:bob").await;
        let (id, etag) = (id.clone(), stale_etags.get(i.wrapping_sub(16)).cloned());
        calls.spawn(async move {
            let result = bob
                .approve_change_request(pb::ApproveChangeRequestRequest {
                    id: id.clone(),
                    etag: etag.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await;
            (id, etag.is_some(), result.map(|r| r.into_inner().id))
        });
    }
    for i in 0..8 {
        let mut alice = server.client("user:alice").await;
        calls.spawn(async move {
            let result = alice
                .create_change_request(pb::CreateChangeRequestRequest {
                    request_id: "race".into(),
                    title: format!("body {i}"),
                    ..new_request()
                })
                .await;
            (String::new(), true, result.map(|r| r.into_inner().id))
        });
    }
    let mut approved = 0;
    let mut raced = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (id, refused, result) = joined.expect("join");
        match (id.is_empty(), refused, result) {
            (false, false, Ok(_)) => approved += 1,
            (false, true, Err(err)) => {
                assert_error(&err, Code::Aborted, "ETAG_MISMATCH");
            }
            (true, _, Ok(id)) => raced.push(id),
            (true, _, Err(err)) => {
                assert_error(&err, Code::AlreadyExists, "REQUEST_ID_REUSED");
            }
            (_, _, other) => panic!("{id}: unexpected {other:?}"),
        }
    }
    assert_eq!(approved, 16);
    assert_eq!(raced.len(), 1, "one create wins the request_id: {raced:?}");
    for (i, id) in ids.iter().enumerate() {
        let read = get(&mut alice, id).await;
        let history: Vec<EventKind> = events(&mut alice, id)
            .await
            .iter()
            .map(|e| EventKind::try_from(e.kind).expect("kind"))
            .collect();
        if i < 16 {
            assert_eq!(read.approval_count, 1, "{id}");
            assert_eq!(
                history
                    .iter()
                    .filter(|k| **k == EventKind::Reviewed)
                    .count(),
                1,
                "{id}: {history:?}"
            );
        } else {
            assert_eq!(read.approval_count, 0, "{id}");
            assert!(!history.contains(&EventKind::Reviewed), "{id}: {history:?}");
        }
    }
    let list = list_project(&mut alice, "web").await;
    assert_eq!(list.total_size, 25, "no request from a refused create");
    assert_eq!(events(&mut alice, &raced[0]).await.len(), 1);
    // The log holds exactly the committed calls' events: 25 CREATED, 8 UPDATED, 16 REVIEWED,
    // and no event of a create that was refused after its event row was written.
    let store = approvals_store::Store::connect(&approvals_store::DatabaseSettings {
        url: server.database_url.clone(),
        max_connections: 1,
        acquire_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(30),
    })
    .await
    .expect("store");
    let log = store.stored_events(0, None, 1000).await.expect("events");
    assert_eq!(log.len(), 25 + 8 + 16, "{} events", log.len());
    let known: std::collections::HashSet<&str> = ids
        .iter()
        .map(String::as_str)
        .chain([raced[0].as_str()])
        .collect();
    for event in &log {
        assert!(
            known.contains(event.fields.change_request_id.as_str()),
            "an event of no request: {}",
            event.fields.change_request_id
        );
    }
}

/// PostgreSQL (issue 28): a transition is written in a shared statement, guarded by what its
/// writer read. The service's bookkeeping (an apply's lease, its attempts) rewrites a request
/// without a new revision, so the guard covers the stored body too: a bookkeeping write that
/// lands between a writer's read and its statement is kept, and the writer's command runs
/// again on the request as it now is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transition_racing_a_bookkeeping_write_keeps_both() {
    if postgres_or_skip("a_transition_racing_a_bookkeeping_write_keeps_both").is_none() {
        return;
    }
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let settings = approvals_store::DatabaseSettings {
        url: server.database_url.clone(),
        max_connections: 2,
        acquire_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(30),
    };
    let store = approvals_store::Store::connect(&settings)
        .await
        .expect("store");
    let carol = approvals_domain::Actor::caller("user:carol", vec![]).expect("actor");
    let now = approvals_domain::Timestamp::from_micros(unix_now() * 1_000_000);
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let commented = store
        .mutate(&created.id, |request| {
            if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                // After this writer read the request: a write without an event, from another
                // connection (a runtime of its own, as another replica's would be).
                let (settings, id) = (settings.clone(), request.id.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async move {
                        let other = approvals_store::Store::connect(&settings)
                            .await
                            .expect("store");
                        other
                            .step(&id, |r| {
                                r.description = "bookkeeping".into();
                                Ok(approvals_store::Step::Quiet)
                            })
                            .await
                            .expect("bookkeeping write");
                    });
                })
                .join()
                .expect("bookkeeping thread");
            }
            request.add_comment(&carol, "c-1".into(), "kept".into(), now)
        })
        .await
        .expect("comment");
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the guard failed and the command ran again"
    );
    assert_eq!(commented.description, "bookkeeping");
    let read = get(&mut alice, &created.id).await;
    assert_eq!(
        read.description, "bookkeeping",
        "the bookkeeping write is kept"
    );
    assert_eq!(
        read.comments
            .iter()
            .map(|c| c.text.as_str())
            .collect::<Vec<_>>(),
        ["kept"]
    );
    let kinds: Vec<i32> = events(&mut alice, &created.id)
        .await
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [EventKind::Created as i32, EventKind::Commented as i32]
    );
}
