//! GetChangeRequest and the replica's read cache: a replica's own writes are read back at once,
//! another replica's writes once this replica's event log has them (see the README, "Reads").

use std::time::{Duration, Instant};

use approvals::pb::State;

use crate::common::*;

#[tokio::test]
async fn a_get_after_a_write_on_the_same_replica_sees_the_write() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    for _ in 0..20 {
        let created = create(&mut alice, new_request()).await;
        // Read twice, so the second read may come from the cache.
        get(&mut bob, &created.id).await;
        assert_eq!(get(&mut bob, &created.id).await.etag, created.etag);
        let approved = approve(&mut bob, &created.id).await;
        let read = get(&mut alice, &created.id).await;
        assert_eq!(state(&read), State::Approved);
        assert_eq!(
            (read.revision, read.etag),
            (approved.revision, approved.etag)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_replica_reaches_this_replicas_reads() {
    let server = TestServer::start().await;
    let replica = TestServer::replica_of(&server, |_| {}).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut carol = replica.client("user:carol").await;
    let created = create(&mut alice, new_request()).await;
    // The replica caches the request, then the other server approves it.
    get(&mut carol, &created.id).await;
    get(&mut carol, &created.id).await;
    let approved = approve(&mut bob, &created.id).await;
    let started = Instant::now();
    loop {
        let read = get(&mut carol, &created.id).await;
        if read.revision == approved.revision {
            assert_eq!(state(&read), State::Approved);
            break;
        }
        assert_eq!(read.revision, created.revision, "a revision in between");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the replica still serves revision {} {:?} after the approval",
            read.revision,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_every_get_reads_the_database() {
    let server = TestServer::start().await;
    let replica = TestServer::replica_of(&server, |c| c.watch.cache_entries = 0).await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut carol = replica.client("user:carol").await;
    for _ in 0..5 {
        let created = create(&mut alice, new_request()).await;
        get(&mut carol, &created.id).await;
        let approved = approve(&mut bob, &created.id).await;
        assert_eq!(get(&mut carol, &created.id).await.etag, approved.etag);
    }
}
