//! The store's writes on SQLite: what a write leaves behind (rows, revisions, the log reader's
//! wake-up) when it commits and when it is refused.

use std::time::Duration;

use approvals_domain::{
    Actor, ChangeInput, ChangeRequest, DomainError, EventDraft, NewChangeRequest, Policy,
    PolicyRules, ReviewRules, State, Timestamp,
};
use approvals_store::{DatabaseSettings, Step, Store, StoreError};

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

/// A fresh SQLite file, removed (with its WAL) when dropped.
struct TempDatabase(std::path::PathBuf);

impl Drop for TempDatabase {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A store on a fresh SQLite file, migrated.
async fn store() -> (Store, TempDatabase) {
    let path =
        std::env::temp_dir().join(format!("approvals-store-test-{}.db", uuid::Uuid::now_v7()));
    let file = TempDatabase(path.clone());
    let store = Store::connect(&DatabaseSettings {
        url: format!("sqlite://{}", path.display()),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
    })
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    (store, file)
}

fn alice() -> Actor {
    Actor::caller("user:alice", vec![]).expect("valid principal")
}

fn new_request(id: &str, resource_id: &str) -> (ChangeRequest, EventDraft) {
    let new = NewChangeRequest {
        project: "web".into(),
        environment: "prod".into(),
        action_key: "flag.update".into(),
        action_version: 1,
        title: "Roll out".into(),
        description: String::new(),
        changes: vec![ChangeInput {
            id: None,
            action: "update".into(),
            resource_type: "flag".into(),
            resource_id: resource_id.into(),
            payload: serde_json::Map::new(),
            base_version: None,
        }],
        intent_display: String::new(),
        expire_time: None,
        draft: false,
        apply_time: None,
        justification: String::new(),
    };
    let mut n = 0;
    ChangeRequest::create(
        id.into(),
        new,
        &alice(),
        ReviewRules::with_min_approvals(1),
        NOW,
        &mut || {
            n += 1;
            format!("{id}-change-{n}")
        },
    )
    .expect("valid request")
}

fn id(n: u32) -> String {
    format!("00000000-0000-7000-8000-{n:012}")
}

#[tokio::test]
async fn a_committed_event_moves_the_written_head_and_wakes_the_log_reader() {
    let (store, _file) = store().await;
    let mut commits = store.local_commits();
    let (request, event) = new_request(&id(1), "checkout");
    let created = store.create(request, event, None).await.expect("create");
    let revision = created.change_request.revision;
    assert!(revision > 0);
    assert_eq!(store.written_head(), revision);
    assert!(commits.has_changed().expect("open"));
    commits.mark_unchanged();

    let cancelled = store
        .mutate(&id(1), |request| {
            request.cancel(&alice(), "not needed".into(), NOW)
        })
        .await
        .expect("cancel");
    assert_eq!(cancelled.state, State::Cancelled);
    assert!(cancelled.revision > revision);
    assert_eq!(store.written_head(), cancelled.revision);
    assert_eq!(
        store.head_revision().await.expect("head"),
        cancelled.revision
    );
    assert!(commits.has_changed().expect("open"));
}

#[tokio::test]
async fn a_refused_command_writes_nothing() {
    let (store, _file) = store().await;
    let (request, event) = new_request(&id(1), "checkout");
    let created = store.create(request, event, None).await.expect("create");
    let commits = store.local_commits();
    let err = store
        .mutate(&id(1), |request| {
            // A command that changes the request, then refuses.
            request.title = "changed".into();
            Err(DomainError::invalid("title", "refused"))
        })
        .await
        .expect_err("refused");
    assert!(matches!(err, StoreError::Domain(_)), "{err:?}");
    let stored = store.get(&id(1)).await.expect("get");
    assert_eq!(stored.title, "Roll out");
    assert_eq!(stored.revision, created.change_request.revision);
    assert_eq!(
        store.head_revision().await.expect("head"),
        created.change_request.revision
    );
    assert!(!commits.has_changed().expect("open"));
    let missing = store
        .mutate(&id(2), |request| {
            request.cancel(&alice(), String::new(), NOW)
        })
        .await
        .expect_err("no such request");
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing:?}");
}

/// Writes that append no event (bookkeeping, policies) have nothing for the log reader.
#[tokio::test]
async fn a_write_without_an_event_keeps_the_revision_and_leaves_the_log_reader_be() {
    let (store, _file) = store().await;
    let (request, event) = new_request(&id(1), "checkout");
    let created = store.create(request, event, None).await.expect("create");
    let commits = store.local_commits();
    let quiet = store
        .step(&id(1), |request| {
            request.description = "bookkeeping".into();
            Ok(Step::Quiet)
        })
        .await
        .expect("quiet step");
    assert_eq!(quiet.revision, created.change_request.revision);
    assert_eq!(
        store.get(&id(1)).await.expect("get").description,
        "bookkeeping"
    );
    let policy = Policy {
        name: "web-default".into(),
        uid: "uid-1".into(),
        project: "web".into(),
        environment: String::new(),
        action_key: "*".into(),
        rules: PolicyRules::default(),
        create_time: NOW,
        update_time: NOW,
        revision: 0,
    };
    store.create_policy(policy).await.expect("create policy");
    store
        .update_policy("web-default", |policy| {
            policy.rules.min_approvals = 2;
            Ok(())
        })
        .await
        .expect("update policy");
    assert!(!commits.has_changed().expect("open"));
    assert_eq!(
        store.head_revision().await.expect("head"),
        created.change_request.revision
    );
}

#[tokio::test]
async fn a_database_url_in_an_error_shows_no_secret() {
    let err = Store::connect(&DatabaseSettings {
        url: "mysql://app:s3cret@db/approvals?password=s3cret".into(),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(1),
    })
    .await
    .err()
    .expect("unsupported");
    let message = err.to_string();
    assert!(!message.contains("s3cret"), "{message}");
    assert!(
        message.contains("mysql://app:<redacted>@db/approvals?<redacted>"),
        "{message}"
    );
}

/// Seeded requests read back like created ones: the same document, the same list columns and
/// resource rows, a CREATED event with its snapshot.
#[tokio::test]
async fn seeded_requests_read_back_as_created_ones() {
    let (store, file) = store().await;
    let db = sea_orm::Database::connect(format!("sqlite://{}", file.0.display()))
        .await
        .expect("connect");
    let mut created: Vec<(ChangeRequest, EventDraft)> = (1..=3)
        .map(|n| new_request(&id(n), &format!("flag-{n}")))
        .collect();
    approvals_store::seed::insert_created(&db, &mut created)
        .await
        .expect("seed");
    let head = store.head_revision().await.expect("head");
    assert_eq!(head, 3);
    for (request, event) in &created {
        let stored = store.get(&request.id).await.expect("get");
        assert_eq!(&stored, request);
        let events = store
            .events(&request.id, 0, 10, true)
            .await
            .expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].revision, request.revision);
        assert_eq!(events[0].kind, event.kind);
        assert_eq!(events[0].change_request.as_ref(), Some(request));
    }
    let filter = approvals_domain::RequestFilter {
        project: "web".into(),
        resource_id: Some("flag-2".into()),
        requester: Some("user:alice".into()),
        ..Default::default()
    };
    let page = store.list(&filter, None, 10).await.expect("list");
    assert_eq!(page.total_size, 1);
    assert_eq!(page.change_requests, vec![created[1].0.clone()]);
    // A request created by the store after them is next in the log.
    let (request, event) = new_request(&id(4), "flag-4");
    let fourth = store.create(request, event, None).await.expect("create");
    assert_eq!(fourth.change_request.revision, head + 1);
}

/// Group commit: writers queued together share one commit, each in its own savepoint, so one
/// refused write undoes only itself and the others commit with their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_queued_together_share_a_commit_and_a_refused_one_undoes_only_itself() {
    let (store, _file) = store().await;
    const N: u32 = 32;
    for n in 1..=N {
        let (request, event) = new_request(&id(n), &format!("flag-{n}"));
        store.create(request, event, None).await.expect("create");
    }
    let head = store.head_revision().await.expect("head");
    let commits = *store.local_commits().borrow();
    let writers: Vec<_> = (1..=N)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .mutate(&id(n), move |request| {
                        if n % 2 == 0 {
                            // Changes the request, then refuses: nothing of it may stay.
                            request.title = "changed".into();
                            Err(DomainError::invalid("title", "refused"))
                        } else {
                            request.cancel(&alice(), format!("cancel {n}"), NOW)
                        }
                    })
                    .await
            })
        })
        .collect();
    for (n, writer) in (1..=N).zip(writers) {
        let result = writer.await.expect("join");
        if n % 2 == 0 {
            assert!(
                matches!(result, Err(StoreError::Domain(_))),
                "{n}: {result:?}"
            );
        } else {
            assert_eq!(result.expect("cancel").state, State::Cancelled);
        }
    }
    for n in 1..=N {
        let stored = store.get(&id(n)).await.expect("get");
        let events = store.events(&id(n), 0, 10, false).await.expect("events");
        if n % 2 == 0 {
            assert_eq!(stored.title, "Roll out", "{n}");
            assert_eq!(stored.state, State::InReview, "{n}");
            assert_eq!(events.len(), 1, "{n}: only CREATED");
        } else {
            assert_eq!(stored.state, State::Cancelled, "{n}");
            assert_eq!(events.len(), 2, "{n}: CREATED, CANCELLED");
        }
    }
    // One event per successful write, gap-free after the creates.
    assert_eq!(
        store.head_revision().await.expect("head"),
        head + i64::from(N / 2)
    );
    let shared = *store.local_commits().borrow() - commits;
    assert!(
        shared < u64::from(N / 2),
        "{} writes that appended an event committed {shared} times: none shared a commit",
        N / 2
    );
}
