//! The verifiable history (issue 27): hash-chained events, signed checkpoints, the Audit
//! service, and `approvals audit verify` naming each way the database was tampered with (SQL
//! run on the database directly, SQLite or PostgreSQL).

use std::{path::PathBuf, time::Duration};

use approvals::{
    audit::{self, verify},
    pb::{self, audit_client::AuditClient},
};
use approvals_store::{DatabaseSettings, Store};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use prost::Message;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::common::*;

/// A server that signs a checkpoint every 100 ms, with its key files.
struct Audited {
    server: TestServer,
    _dir: tempfile::TempDir,
    public_key: PathBuf,
    /// Change requests created, the first with four events: CREATED, COMMENTED, COMMENTED,
    /// REVIEWED.
    ids: Vec<String>,
}

fn key_files(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let pem = audit::generate_signing_key_pem().expect("keygen");
    std::fs::write(&private, &pem).expect("write key");
    let key = audit::read_signing_key(&private).expect("read key");
    let public = dir.join(format!("{name}.pub.pem"));
    std::fs::write(
        &public,
        audit::public_key_pem(&key.verifying_key()).expect("pem"),
    )
    .expect("write public key");
    (private, public)
}

async fn audited() -> Audited {
    let dir = tempfile::tempdir().expect("dir");
    let (private, public_key) = key_files(dir.path(), "audit");
    let server = TestServer::start_with(|config| {
        config.audit.signing_key_file = private.display().to_string();
        config.audit.checkpoint_interval = Duration::from_millis(100);
    })
    .await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let created = create(
            &mut alice,
            pb::CreateChangeRequestRequest {
                title: format!("audited {i}"),
                ..new_request()
            },
        )
        .await;
        ids.push(created.id);
    }
    for text in ["first look", "second look"] {
        alice
            .add_comment(pb::AddCommentRequest {
                id: ids[0].clone(),
                text: text.into(),
            })
            .await
            .expect("comment");
    }
    approve(&mut bob, &ids[0]).await;
    let head = get(&mut alice, &ids[0]).await.revision;
    wait_for_checkpoint(&server, head).await;
    Audited {
        server,
        _dir: dir,
        public_key,
        ids,
    }
}

type AuditApi =
    AuditClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Caller>>;

async fn audit_client(server: &TestServer) -> AuditApi {
    AuditClient::with_interceptor(server.channel().await, Caller::named("user:carol"))
}

/// Waits until a checkpoint covers `revision`.
async fn wait_for_checkpoint(server: &TestServer, revision: i64) -> pb::AuditCheckpoint {
    let mut client = audit_client(server).await;
    for _ in 0..200 {
        if let Ok(checkpoint) = client
            .get_audit_checkpoint(pb::GetAuditCheckpointRequest { revision: 0 })
            .await
        {
            let checkpoint = checkpoint.into_inner();
            if checkpoint.revision >= revision {
                return checkpoint;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no checkpoint covered revision {revision}");
}

/// Runs the binary off the runtime's thread, so that the server under test (on the same
/// runtime) goes on committing while the command reads, or migrates, its database.
async fn run_binary(command: &mut std::process::Command, what: &str) -> std::process::Output {
    let mut command = std::mem::replace(command, std::process::Command::new(BINARY));
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn store_of(server: &TestServer) -> Store {
    Store::connect(&DatabaseSettings {
        url: server.database_url.clone(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
    })
    .await
    .expect("connect the store")
}

async fn sql(server: &TestServer, statements: &[String]) {
    let db = Database::connect(&server.database_url).await.expect("db");
    for statement in statements {
        db.execute_unprepared(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// The revisions of a request's events, oldest first.
async fn revisions(server: &TestServer, id: &str) -> Vec<i64> {
    let mut client = server.client("user:alice").await;
    events(&mut client, id)
        .await
        .iter()
        .map(|e| e.revision)
        .collect()
}

async fn verify_report(a: &Audited) -> verify::Report {
    let key = audit::read_public_key(&a.public_key).expect("public key");
    verify::verify_database(&store_of(&a.server).await, &key)
        .await
        .expect("verify")
}

/// The breaks the report holds (at least one), rendered.
fn the_break(report: &verify::Report) -> Vec<String> {
    assert!(!report.is_clean(), "no break found:\n{}", report.render());
    report.breaks.iter().map(|b| b.to_string()).collect()
}

#[tokio::test]
async fn a_clean_database_verifies_and_so_does_its_export() {
    let a = audited().await;
    let report = verify_report(&a).await;
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(report.requests, 3);
    assert_eq!(report.events, 6);
    assert!(report.checkpoints >= 1);

    // The binary, as an operator runs it: export, then verify the file alone, then the
    // database; both exit 0.
    let export = a._dir.path().join("export.jsonl");
    let output = run_binary(
        std::process::Command::new(BINARY)
            .args(["audit", "export", "--since", "0", "--database"])
            .arg(&a.server.database_url),
        "run export",
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    std::fs::write(&export, &output.stdout).expect("write export");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.lines().any(|l| l.contains(r#""type":"checkpoint""#)));
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(r#""type":"event""#))
            .count(),
        6
    );
    for args in [
        vec!["--file".to_owned(), export.display().to_string()],
        vec!["--database".to_owned(), a.server.database_url.clone()],
    ] {
        let output = run_binary(
            std::process::Command::new(BINARY)
                .args(["audit", "verify"])
                .args(&args)
                .arg("--public-key")
                .arg(&a.public_key),
            "run verify",
        )
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert!(stdout.contains("verified"), "{stdout}");
    }

    // The export of one project from a later revision verifies its chains and signatures.
    let since = revisions(&a.server, &a.ids[0]).await[1];
    let mut partial = Vec::new();
    verify::export(&store_of(&a.server).await, since, Some("web"), &mut partial)
        .await
        .expect("export");
    let key = audit::read_public_key(&a.public_key).expect("key");
    let report = verify::verify_export(&partial[..], &key).expect("verify export");
    assert!(report.is_clean(), "{}", report.render());
    assert!(report.events < 6);

    // A tampered export is caught like a tampered database.
    let forged = String::from_utf8(partial)
        .expect("utf8")
        .replace(r#""actor":"user:bob""#, r#""actor":"user:eve""#);
    assert!(forged.contains("user:eve"), "the export holds bob's review");
    let report = verify::verify_export(forged.as_bytes(), &key).expect("verify export");
    assert!(!report.is_clean());
}

#[tokio::test]
async fn an_edited_detail_is_named() {
    let a = audited().await;
    let revs = revisions(&a.server, &a.ids[0]).await;
    sql(
        &a.server,
        &[format!(
            "UPDATE change_request_events SET detail = 'approved by nobody' WHERE revision = {}",
            revs[1]
        )],
    )
    .await;
    let breaks = the_break(&verify_report(&a).await);
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert!(
        breaks[0].contains(&format!(
            "change request {}, revision {}",
            a.ids[0], revs[1]
        )) && breaks[0].contains("edited"),
        "{breaks:?}"
    );

    // The binary says so too, and exits 1.
    let output = run_binary(
        std::process::Command::new(BINARY)
            .args(["audit", "verify", "--database", &a.server.database_url])
            .arg("--public-key")
            .arg(&a.public_key),
        "run verify",
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("revision {}", revs[1])),
        "{stdout}"
    );
}

#[tokio::test]
async fn an_edited_actor_is_named() {
    let a = audited().await;
    let revs = revisions(&a.server, &a.ids[0]).await;
    let last = *revs.last().expect("events");
    sql(
        &a.server,
        &[format!(
            "UPDATE change_request_events SET actor = 'user:mallory' WHERE revision = {last}"
        )],
    )
    .await;
    let breaks = the_break(&verify_report(&a).await);
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert!(
        breaks[0].contains(&format!("change request {}, revision {last}", a.ids[0]))
            && breaks[0].contains("actor"),
        "{breaks:?}"
    );
}

#[tokio::test]
async fn a_deleted_event_in_the_middle_of_a_chain_is_named() {
    let a = audited().await;
    let revs = revisions(&a.server, &a.ids[0]).await;
    sql(
        &a.server,
        &[format!(
            "DELETE FROM change_request_events WHERE revision = {}",
            revs[1]
        )],
    )
    .await;
    let breaks = the_break(&verify_report(&a).await);
    assert!(
        breaks.iter().any(|b| b.contains(&format!(
            "change request {}, revision {}",
            a.ids[0], revs[2]
        )) && b.contains(&format!("does not follow revision {}", revs[0]))
            && b.contains("deleted")),
        "{breaks:?}"
    );
    // A checkpoint taken while the deleted event was the head (the server may have signed one
    // between the writes) no longer matches either; every other break is such a checkpoint.
    assert!(
        breaks
            .iter()
            .filter(|b| !b.starts_with("checkpoint at revision"))
            .count()
            == 1,
        "{breaks:?}"
    );
}

#[tokio::test]
async fn two_swapped_events_are_named() {
    let a = audited().await;
    let revs = revisions(&a.server, &a.ids[0]).await;
    let (x, y) = (revs[1], revs[2]);
    // Swap everything but the revisions (PostgreSQL refuses to update an identity column).
    let columns = [
        "kind",
        "actor",
        "acting_principal",
        "from_state",
        "to_state",
        "event_time",
        "detail",
        "snapshot",
        "comment_count",
        "prev_hash",
        "hash",
    ];
    let sets: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{c} = (SELECT {c} FROM swap WHERE swap.revision = \
                 CASE change_request_events.revision WHEN {x} THEN {y} ELSE {x} END)"
            )
        })
        .collect();
    sql(
        &a.server,
        &[
            format!(
                "CREATE TABLE swap AS SELECT * FROM change_request_events \
                 WHERE revision IN ({x}, {y})"
            ),
            format!(
                "UPDATE change_request_events SET {} WHERE revision IN ({x}, {y})",
                sets.join(", ")
            ),
            "DROP TABLE swap".into(),
        ],
    )
    .await;
    let breaks = the_break(&verify_report(&a).await);
    assert!(
        breaks.iter().any(
            |b| b.contains(&format!("change request {}, revision {x}", a.ids[0]))
                && b.contains("swapped")
        ),
        "{breaks:?}"
    );
}

#[tokio::test]
async fn a_change_request_deleted_after_a_checkpoint_is_named() {
    let a = audited().await;
    let id = &a.ids[2];
    sql(
        &a.server,
        &[
            format!("DELETE FROM change_request_events WHERE change_request_id = '{id}'"),
            format!("DELETE FROM change_request_resources WHERE change_request_id = '{id}'"),
            format!("DELETE FROM change_requests WHERE id = '{id}'"),
        ],
    )
    .await;
    // The server signs no new checkpoint over the shrunken log: no event was written since.
    let report = verify_report(&a).await;
    let breaks = the_break(&report);
    assert!(
        breaks
            .iter()
            .any(|b| b.starts_with("checkpoint at revision")
                && b.contains("a change request it covered was deleted")),
        "{breaks:?}"
    );
}

#[tokio::test]
async fn a_forged_checkpoint_is_named() {
    let a = audited().await;
    let store = store_of(&a.server).await;
    let forger =
        approvals::audit::read_signing_key(&key_files(a._dir.path(), "forger").0).expect("key");
    // The right tree, signed with the wrong key, at a revision of its own.
    let head = store.head_revision().await.expect("head");
    let heads = store.chain_heads_at(head).await.expect("heads");
    let forged = audit::sign_checkpoint(&forger, head + 1000, &heads, 0);
    let db = Database::connect(&a.server.database_url).await.expect("db");
    let backend = db.get_database_backend();
    let placeholders = match backend {
        DbBackend::Postgres => "$1, $2, $3, $4, $5",
        _ => "?, ?, ?, ?, ?",
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "INSERT INTO audit_checkpoints (revision, tree_size, root, checkpoint_time, signature) \
             VALUES ({placeholders})"
        ),
        [
            forged.revision.into(),
            (forged.tree_size as i64).into(),
            forged.root.to_vec().into(),
            forged.time_micros.into(),
            forged.signature.clone().into(),
        ],
    ))
    .await
    .expect("insert the forged checkpoint");
    let breaks = the_break(&verify_report(&a).await);
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert!(
        breaks[0].starts_with(&format!("checkpoint at revision {}", head + 1000))
            && breaks[0].contains("signature does not verify"),
        "{breaks:?}"
    );
}

/// RFC 6962 section 2.1.1, written from the RFC's definition of PATH(m, D[n]) backwards: the
/// root a leaf and its audit path lead to (independent of the server's implementation).
fn rfc6962_root(leaf_hash: [u8; 32], m: u64, n: u64, path: &[Vec<u8>]) -> Option<[u8; 32]> {
    let node = |l: &[u8], r: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([1u8]);
        h.update(l);
        h.update(r);
        h.finalize().into()
    };
    if n == 1 {
        return path.is_empty().then_some(leaf_hash);
    }
    let (last, rest) = path.split_last()?;
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    if m < k {
        Some(node(&rfc6962_root(leaf_hash, m, k, rest)?, last))
    } else {
        Some(node(last, &rfc6962_root(leaf_hash, m - k, n - k, rest)?))
    }
}

#[tokio::test]
async fn an_inclusion_proof_checks_with_an_independent_implementation() {
    let a = audited().await;
    let mut client = audit_client(&a.server).await;
    let key = client
        .get_audit_public_key(pb::GetAuditPublicKeyRequest {})
        .await
        .expect("public key")
        .into_inner();
    assert_eq!(key.algorithm, "Ed25519");
    let key = VerifyingKey::from_bytes(&key.public_key.try_into().expect("32 bytes")).expect("key");

    let proof = client
        .get_audit_proof(pb::GetAuditProofRequest {
            change_request_id: a.ids[0].clone(),
            checkpoint_revision: 0,
        })
        .await
        .expect("proof")
        .into_inner();
    let checkpoint = proof.checkpoint.clone().expect("checkpoint");
    assert_eq!(proof.events.len(), 4);

    // The chain, from the records' protobuf encoding (prost's, not the server's encoder).
    let mut prev = [0u8; 32];
    for event in &proof.events {
        assert_eq!(
            event.prev_hash,
            prev.to_vec(),
            "revision {}",
            event.revision
        );
        let record = event.record.as_ref().expect("record").encode_to_vec();
        let mut h = Sha256::new();
        h.update(prev);
        h.update((event.revision as u64).to_be_bytes());
        h.update(&record);
        let hash: [u8; 32] = h.finalize().into();
        assert_eq!(event.hash, hash.to_vec(), "revision {}", event.revision);
        prev = hash;
    }
    let last = proof.events.last().expect("events");
    assert_eq!(last.record.as_ref().expect("record").actor, "user:bob");

    // The leaf, the path, the root.
    let mut leaf = (last.revision as u64).to_be_bytes().to_vec();
    leaf.extend_from_slice(&prev);
    leaf.extend_from_slice(a.ids[0].as_bytes());
    assert_eq!(proof.leaf, leaf);
    let leaf_hash: [u8; 32] = Sha256::new_with_prefix([0u8])
        .chain_update(&leaf)
        .finalize()
        .into();
    assert_eq!(checkpoint.tree_size, 3);
    let root = rfc6962_root(
        leaf_hash,
        proof.leaf_index,
        checkpoint.tree_size,
        &proof.inclusion_path,
    )
    .expect("a path of the right length");
    assert_eq!(root.to_vec(), checkpoint.root_hash);

    // The signature over the documented message.
    let time = checkpoint.checkpoint_time.expect("time");
    let micros = time.seconds * 1_000_000 + i64::from(time.nanos / 1000);
    let mut message = b"approvals.audit.checkpoint.v1\n".to_vec();
    message.extend_from_slice(&(checkpoint.revision as u64).to_be_bytes());
    message.extend_from_slice(&checkpoint.tree_size.to_be_bytes());
    message.extend_from_slice(&checkpoint.root_hash);
    message.extend_from_slice(&micros.to_be_bytes());
    let signature = Signature::from_slice(&checkpoint.signature).expect("64 bytes");
    key.verify(&message, &signature)
        .expect("the signature verifies");

    // Another request's leaf does not verify on this path.
    let mut other = leaf.clone();
    other[0] ^= 1;
    let other_hash: [u8; 32] = Sha256::new_with_prefix([0u8])
        .chain_update(&other)
        .finalize()
        .into();
    let wrong = rfc6962_root(
        other_hash,
        proof.leaf_index,
        checkpoint.tree_size,
        &proof.inclusion_path,
    );
    assert_ne!(
        wrong.map(|r| r.to_vec()),
        Some(checkpoint.root_hash.clone())
    );

    // Errors.
    let status = client
        .get_audit_checkpoint(pb::GetAuditCheckpointRequest {
            revision: checkpoint.revision + 1000,
        })
        .await
        .expect_err("no checkpoint there");
    assert_error(&status, Code::NotFound, "AUDIT_CHECKPOINT_NOT_FOUND");
    let status = client
        .get_audit_proof(pb::GetAuditProofRequest {
            change_request_id: "nope".into(),
            checkpoint_revision: 0,
        })
        .await
        .expect_err("bad id");
    assert_invalid(&status, &["change_request_id"]);
}

#[tokio::test]
async fn without_a_signing_key_events_are_chained_but_no_checkpoint_is_written() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    create(&mut alice, new_request()).await;
    let mut client = audit_client(&server).await;
    let status = client
        .get_audit_public_key(pb::GetAuditPublicKeyRequest {})
        .await
        .expect_err("no key");
    assert_error(&status, Code::FailedPrecondition, "AUDIT_NOT_CONFIGURED");
    let status = client
        .get_audit_checkpoint(pb::GetAuditCheckpointRequest { revision: 0 })
        .await
        .expect_err("no key");
    assert_error(&status, Code::FailedPrecondition, "AUDIT_NOT_CONFIGURED");
    let store = store_of(&server).await;
    let events = store.stored_events(0, None, 10).await.expect("events");
    assert_eq!(events.len(), 1);
    assert!(events[0].hash.is_some());
}

/// Two replicas writing in turn into one database: on SQLite each insert guesses the log's
/// head from what its own process wrote last, and the other replica's writes make that guess
/// stale. Every event still gets the next revision (gap-free on SQLite, unique on both), a
/// refused create takes none, and every chain verifies.
#[tokio::test]
async fn two_replicas_writing_in_turn_keep_one_gap_free_log_whose_chains_verify() {
    let dir = tempfile::tempdir().expect("dir");
    let (private, public_key) = key_files(dir.path(), "audit");
    let configure = |config: &mut approvals::config::Config| {
        config.audit.signing_key_file = private.display().to_string();
        config.audit.checkpoint_interval = Duration::from_millis(100);
    };
    let server = TestServer::start_with(configure).await;
    let replica = TestServer::replica_of(&server, configure).await;
    let mut on_server = server.client("user:alice").await;
    let mut on_replica = replica.client("user:alice").await;
    let mut reviewer = replica.client("user:bob").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let client = if i % 2 == 0 {
            &mut on_server
        } else {
            &mut on_replica
        };
        let created = create(
            client,
            pb::CreateChangeRequestRequest {
                request_id: format!("turn-{i}"),
                ..new_request()
            },
        )
        .await;
        client
            .add_comment(pb::AddCommentRequest {
                id: created.id.clone(),
                text: format!("comment {i}"),
            })
            .await
            .expect("comment");
        ids.push(created.id);
    }
    // A create refused after its event row was written: it leaves no revision behind.
    let err = on_server
        .create_change_request(pb::CreateChangeRequestRequest {
            request_id: "turn-0".into(),
            title: "another body".into(),
            ..new_request()
        })
        .await
        .expect_err("request_id reused");
    assert_error(&err, Code::AlreadyExists, "REQUEST_ID_REUSED");
    for id in &ids {
        approve(&mut reviewer, id).await;
    }
    create(&mut on_server, new_request()).await;

    let store = store_of(&server).await;
    let events = store.stored_events(0, None, 1000).await.expect("events");
    let revisions: Vec<i64> = events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions.len(), 6 * 3 + 1, "{revisions:?}");
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "unique, ascending: {revisions:?}"
    );
    if server.database_url.starts_with("sqlite") {
        let expected: Vec<i64> = (revisions[0]..revisions[0] + revisions.len() as i64).collect();
        assert_eq!(revisions, expected, "gap-free on SQLite");
    }
    assert!(
        events.iter().all(|e| e.hash.is_some()),
        "every event hashed"
    );
    let head = *revisions.last().expect("events");
    wait_for_checkpoint(&server, head).await;
    let key = audit::read_public_key(&public_key).expect("public key");
    let report = verify::verify_database(&store, &key).await.expect("verify");
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(report.events, revisions.len());
}

/// Transitions in flight together share one statement on PostgreSQL and one commit on SQLite
/// (issue 28). Sixteen comments on one request race one another (on PostgreSQL all but one of
/// those sharing a statement find their guard failed and are written again, locking the row),
/// beside approvals of other requests and cancels refused for a stale etag: every accepted
/// write is kept with exactly its event and a revision of its own, the refused ones leave
/// nothing, and the history still verifies hash by hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transitions_in_flight_together_keep_every_write_and_a_verifiable_history() {
    const COMMENTS: usize = 16;
    const APPROVALS: usize = 8;
    const STALE: usize = 4;
    let a = audited().await;
    let mut alice = a.server.client("user:alice").await;
    let hot = a.ids[1].clone();
    let mut others = Vec::new();
    for i in 0..APPROVALS + STALE {
        let created = create(
            &mut alice,
            pb::CreateChangeRequestRequest {
                title: format!("reviewed {i}"),
                ..new_request()
            },
        )
        .await;
        others.push(created);
    }
    // The stale ones are commented on after their etag was read.
    for request in &others[APPROVALS..] {
        alice
            .add_comment(pb::AddCommentRequest {
                id: request.id.clone(),
                text: "changes the etag".into(),
            })
            .await
            .expect("comment");
    }
    let calls_count = COMMENTS + APPROVALS + STALE;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(calls_count));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..COMMENTS {
        let (mut client, start, id) = (
            a.server.client("user:carol").await,
            start.clone(),
            hot.clone(),
        );
        calls.spawn(async move {
            start.wait().await;
            let result = client
                .add_comment(pb::AddCommentRequest {
                    id,
                    text: format!("comment {i}"),
                })
                .await;
            ("comment", result.map(|r| r.into_inner()))
        });
    }
    for (i, request) in others.iter().enumerate() {
        // Bob approves; Alice, the requester, cancels with the etag she read.
        let actor = if i < APPROVALS {
            "user:bob"
        } else {
            "user:alice"
        };
        let (mut client, start) = (a.server.client(actor).await, start.clone());
        let request = request.clone();
        calls.spawn(async move {
            start.wait().await;
            if i < APPROVALS {
                let result = client
                    .approve_change_request(pb::ApproveChangeRequestRequest {
                        id: request.id,
                        etag: request.etag,
                        ..Default::default()
                    })
                    .await;
                ("approve", result.map(|r| r.into_inner()))
            } else {
                let result = cancel_with_etag_read(&mut client, request).await;
                ("stale", result)
            }
        });
    }
    let mut revisions = Vec::new();
    while let Some(joined) = calls.join_next().await {
        match joined.expect("join") {
            ("stale", Err(status)) => {
                assert_error(&status, Code::Aborted, "ETAG_MISMATCH");
            }
            ("stale", Ok(request)) => panic!("a stale etag was accepted: {request:?}"),
            (_, Ok(request)) => revisions.push(request.revision),
            (what, Err(status)) => panic!("{what} failed: {status:?}"),
        }
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        COMMENTS + APPROVALS,
        "a revision of its own each"
    );

    let read = get(&mut alice, &hot).await;
    let mut texts: Vec<String> = read.comments.iter().map(|c| c.text.clone()).collect();
    texts.sort();
    let mut expected: Vec<String> = (0..COMMENTS).map(|i| format!("comment {i}")).collect();
    expected.sort();
    assert_eq!(texts, expected, "no comment lost");
    let trail = events(&mut alice, &hot).await;
    assert_eq!(trail.len(), 1 + COMMENTS, "CREATED and one COMMENTED each");
    assert!(trail.windows(2).all(|w| w[0].revision < w[1].revision));
    for (i, request) in others.iter().enumerate() {
        let read = get(&mut alice, &request.id).await;
        let kinds: Vec<i32> = events(&mut alice, &request.id)
            .await
            .iter()
            .map(|e| e.kind)
            .collect();
        if i < APPROVALS {
            assert_eq!(read.approval_count, 1, "{}", request.id);
            assert_eq!(
                kinds,
                [
                    pb::EventKind::Created as i32,
                    pb::EventKind::Reviewed as i32
                ],
                "{}",
                request.id
            );
        } else {
            assert_eq!(state(&read), pb::State::InReview, "{}", request.id);
            assert_eq!(
                kinds,
                [
                    pb::EventKind::Created as i32,
                    pb::EventKind::Commented as i32
                ],
                "{}: nothing of the refused cancel",
                request.id
            );
        }
    }
    let head = get(&mut alice, &hot)
        .await
        .revision
        .max(revisions[revisions.len() - 1]);
    wait_for_checkpoint(&a.server, head).await;
    let report = verify_report(&a).await;
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(
        report.events,
        6 + others.len() + STALE + COMMENTS + APPROVALS,
        "exactly the accepted writes' events"
    );
}

/// A cancel with the etag `request` was read with.
async fn cancel_with_etag_read(
    client: &mut Client,
    request: pb::ChangeRequest,
) -> Result<pb::ChangeRequest, tonic::Status> {
    client
        .cancel_change_request(pb::CancelChangeRequestRequest {
            id: request.id,
            etag: request.etag,
            reason: "stale".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Creates in flight together share one statement on PostgreSQL and one commit on SQLite
/// (issue 28). A create refused among them (its request_id just taken with another body) is
/// refused alone: every other caller gets its own request, each request has exactly its one
/// CREATED event with a revision of its own, and the history still verifies hash by hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_refused_among_concurrent_ones_leaves_the_others_created_and_verifiable() {
    const CALLS: usize = 48;
    let a = audited().await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLS));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let mut client = a.server.client("user:alice").await;
        let start = start.clone();
        calls.spawn(async move {
            // Every sixth call races for one request_id, each with a body of its own.
            let racing = i % 6 == 0;
            let request = pb::CreateChangeRequestRequest {
                title: format!("concurrent {i}"),
                request_id: if racing {
                    "taken".into()
                } else {
                    String::new()
                },
                ..new_request()
            };
            start.wait().await;
            let result = client.create_change_request(request).await;
            (i, racing, result.map(|r| r.into_inner()))
        });
    }
    let mut created = Vec::new();
    let mut refused = 0;
    while let Some(joined) = calls.join_next().await {
        let (i, racing, result) = joined.expect("join");
        match result {
            Ok(request) => {
                assert_eq!(
                    request.title,
                    format!("concurrent {i}"),
                    "{i}: someone else's"
                );
                created.push(request);
            }
            Err(status) if racing => {
                assert_error(&status, Code::AlreadyExists, "REQUEST_ID_REUSED");
                refused += 1;
            }
            Err(status) => panic!("call {i} failed: {status:?}"),
        }
    }
    assert_eq!(
        refused,
        CALLS / 6 - 1,
        "every racer but the winner is refused"
    );
    assert_eq!(created.len(), CALLS - refused);

    let mut revisions: Vec<i64> = created.iter().map(|r| r.revision).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), created.len(), "a revision of its own each");
    let mut alice = a.server.client("user:alice").await;
    for request in &created {
        let trail = events(&mut alice, &request.id).await;
        let kinds: Vec<i32> = trail.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [pb::EventKind::Created as i32], "{}", request.id);
        assert_eq!(trail[0].revision, request.revision, "{}", request.id);
    }
    let report = verify_report(&a).await;
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(report.requests, a.ids.len() + created.len());
    assert_eq!(
        report.events,
        6 + created.len(),
        "no event of a refused create"
    );
}
