//! ListChangeRequests: filters, keyset pages that stay correct while rows are inserted,
//! total_size, and the AIP-158 rules for page_size and page_token.

use std::collections::HashSet;

use approvals::pb::{self, State};
use tonic::Code;

use crate::common::*;

fn list(project: &str) -> pb::ListChangeRequestsRequest {
    pb::ListChangeRequestsRequest {
        project: project.into(),
        ..Default::default()
    }
}

async fn ids(client: &mut Client, request: pb::ListChangeRequestsRequest) -> Vec<String> {
    let response = client
        .list_change_requests(request)
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        response.total_size as usize,
        response.change_requests.len(),
        "one page holds them all"
    );
    response.change_requests.into_iter().map(|r| r.id).collect()
}

#[tokio::test]
async fn filters_match_what_they_name() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;

    let flag = create(&mut alice, new_request()).await;
    let staging = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            environment: "staging".into(),
            ..new_request()
        },
    )
    .await;
    let segment = create(
        &mut bob,
        pb::CreateChangeRequestRequest {
            action_key: "segment.update".into(),
            changes: vec![
                flag_change("checkout"),
                pb::Change {
                    resource_type: "segment".into(),
                    resource_id: "beta".into(),
                    ..flag_change("x")
                },
            ],
            ..new_request()
        },
    )
    .await;
    let draft = create(
        &mut bob,
        pb::CreateChangeRequestRequest {
            draft: true,
            ..new_request()
        },
    )
    .await;
    let other_project = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            project: "api".into(),
            ..new_request()
        },
    )
    .await;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: flag.id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");

    let newest_first =
        |v: &[&pb::ChangeRequest]| v.iter().rev().map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&mut alice, list("web")).await,
        newest_first(&[&flag, &staging, &segment, &draft])
    );
    assert_eq!(
        ids(&mut alice, list("api")).await,
        vec![other_project.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                environment: "staging".into(),
                ..list("web")
            }
        )
        .await,
        vec![staging.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                action_key: "segment.update".into(),
                ..list("web")
            }
        )
        .await,
        vec![segment.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                resource_type: "segment".into(),
                ..list("web")
            }
        )
        .await,
        vec![segment.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                resource_id: "beta".into(),
                ..list("web")
            }
        )
        .await,
        vec![segment.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                resource_type: "feature_flag".into(),
                resource_id: "checkout".into(),
                ..list("web")
            }
        )
        .await,
        newest_first(&[&flag, &staging, &segment, &draft]),
        "a request matches when any of its changes does"
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                requester: "user:bob".into(),
                ..list("web")
            }
        )
        .await,
        newest_first(&[&segment, &draft])
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                states: vec![State::Approved as i32],
                ..list("web")
            }
        )
        .await,
        vec![flag.id.clone()]
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                states: vec![State::Draft as i32, State::Approved as i32],
                ..list("web")
            }
        )
        .await,
        newest_first(&[&flag, &draft])
    );
    assert_eq!(
        ids(
            &mut alice,
            pb::ListChangeRequestsRequest {
                requester: "user:bob".into(),
                states: vec![State::InReview as i32],
                ..list("web")
            }
        )
        .await,
        vec![segment.id.clone()],
        "filters combine"
    );

    // The fields computed for the caller are filled in on lists too.
    let listed = bob
        .list_change_requests(list("web"))
        .await
        .expect("list")
        .into_inner();
    let seen_draft = listed
        .change_requests
        .iter()
        .find(|r| r.id == draft.id)
        .expect("draft listed");
    assert!(seen_draft.is_requester && seen_draft.can_cancel);
}

#[tokio::test]
async fn pages_cover_every_request_once_while_rows_are_inserted() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut created = Vec::new();
    for _ in 0..23 {
        created.push(create(&mut alice, new_request()).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = alice
            .list_change_requests(pb::ListChangeRequestsRequest {
                page_size: 5,
                page_token: token,
                ..list("web")
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.change_requests.len() <= 5);
        seen.extend(page.change_requests.into_iter().map(|r| r.id));
        // New requests arriving between pages do not shift or repeat what follows.
        create(&mut alice, new_request()).await;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 5);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no request twice");
    created.reverse();
    assert_eq!(
        seen, created,
        "every request that existed at the start, newest first"
    );

    let total = alice
        .list_change_requests(list("web"))
        .await
        .expect("list")
        .into_inner()
        .total_size;
    assert_eq!(total, 23 + 5);
}

#[tokio::test]
async fn page_size_and_token_rules() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    for _ in 0..3 {
        create(&mut alice, new_request()).await;
    }
    let coerced = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            page_size: 100_000,
            ..list("web")
        })
        .await
        .expect("large page sizes are coerced down")
        .into_inner();
    assert_eq!(
        (
            coerced.change_requests.len(),
            coerced.next_page_token.as_str()
        ),
        (3, "")
    );

    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            page_size: -1,
            ..list("web")
        })
        .await
        .expect_err("negative");
    assert_invalid(&err, &["page_size"]);

    let first = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            page_size: 1,
            ..list("web")
        })
        .await
        .expect("page")
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    assert_eq!(first.total_size, 3);
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            environment: "staging".into(),
            ..list("web")
        })
        .await
        .expect_err("token from another query");
    assert_invalid(&err, &["page_token"]);
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            page_token: "garbage".into(),
            ..list("web")
        })
        .await
        .expect_err("not a token");
    assert_invalid(&err, &["page_token"]);
}

#[tokio::test]
async fn list_filters_are_validated() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let err = alice
        .list_change_requests(list(""))
        .await
        .expect_err("no project");
    assert_invalid(&err, &["project"]);
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            states: vec![State::Unspecified as i32],
            ..list("web")
        })
        .await
        .expect_err("unspecified state");
    assert_invalid(&err, &["states[0]"]);
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            states: vec![State::Draft as i32, 42],
            ..list("web")
        })
        .await
        .expect_err("unknown state");
    assert_invalid(&err, &["states[1]"]);
    let err = alice
        .list_change_requests(pb::ListChangeRequestsRequest {
            requester: "alice".into(),
            ..list("web")
        })
        .await
        .expect_err("not a principal");
    assert_invalid(&err, &["requester"]);
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// total_size is exact up to 1,000 matches; beyond, an estimate that never says 1,000 or less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_size_is_exact_up_to_a_thousand_then_an_estimate() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let create_many = |n: usize| {
        let server = &server;
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..16 {
                let mut client = server.client("user:alice").await;
                tasks.spawn(async move {
                    for _ in (worker..n).step_by(16) {
                        create(&mut client, new_request()).await;
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("creates");
            }
        }
    };
    let total = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            client
                .list_change_requests(pb::ListChangeRequestsRequest {
                    page_size: 10,
                    ..list("web")
                })
                .await
                .expect("list")
                .into_inner()
                .total_size
        }
    };
    create_many(1000).await;
    assert_eq!(total(&mut alice).await, 1000);
    create_many(1).await;
    let beyond = total(&mut alice).await;
    assert!(beyond > 1000, "an estimate past the exact limit: {beyond}");
}
