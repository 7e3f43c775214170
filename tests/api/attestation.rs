//! Approval attestations (issue 27): issued on quorum and on break-glass, sent to the applier,
//! served by GetAttestation, dropped by an edit that sends the request back to review, and
//! refused by the verifier (the library function and `approvals attest verify`) when a payload
//! was tampered with, the key is another, it expired, or it is of another request.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use approvals::{
    audit::{
        self,
        attestation::{self, AttestationError, Expected},
    },
    pb::{
        self, State,
        audit_client::AuditClient,
        change_applier_server::{ChangeApplier, ChangeApplierServer},
        policies_client::PoliciesClient,
    },
};
use ed25519_dalek::VerifyingKey;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::common::*;

/// An applier that records each call and answers APPLIED, moving every resource to `version`.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<pb::ApplyChangesRequest>>>,
    version: Arc<Mutex<String>>,
}

#[tonic::async_trait]
impl ChangeApplier for Recorder {
    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        let request = request.into_inner();
        let version = self.version.lock().expect("version").clone();
        let resource_versions = request
            .change_request
            .iter()
            .flat_map(|r| &r.changes)
            .filter(|_| !version.is_empty())
            .map(|c| pb::ResourceVersion {
                resource_type: c.resource_type.clone(),
                resource_id: c.resource_id.clone(),
                version: version.clone(),
            })
            .collect();
        self.calls.lock().expect("calls").push(request);
        Ok(Response::new(pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            resource_versions,
            ..Default::default()
        }))
    }
}

impl Recorder {
    async fn start() -> (Self, String) {
        let recorder = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let service = ChangeApplierServer::new(recorder.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        (recorder, endpoint)
    }

    fn calls(&self) -> Vec<pb::ApplyChangesRequest> {
        self.calls.lock().expect("calls").clone()
    }
}

/// A server with an audit key, its public key file, and the key itself.
struct Attesting {
    server: TestServer,
    dir: tempfile::TempDir,
    public_key_file: PathBuf,
    key: VerifyingKey,
}

async fn attesting(mode: pb::ApplyMode, endpoint: &str) -> Attesting {
    let dir = tempfile::tempdir().expect("dir");
    let private = dir.path().join("audit.pem");
    std::fs::write(&private, audit::generate_signing_key_pem().expect("keygen")).expect("key");
    let key = audit::read_signing_key(&private)
        .expect("read key")
        .verifying_key();
    let public_key_file = dir.path().join("audit.pub.pem");
    std::fs::write(&public_key_file, audit::public_key_pem(&key).expect("pem")).expect("pub");
    let server = TestServer::start_with(|c| {
        c.audit.signing_key_file = private.display().to_string();
        c.apply.poll_interval = Duration::from_millis(100);
        c.apply.deadline = Duration::from_secs(3);
    })
    .await;
    if endpoint.is_empty() {
        // The server default rules: one approval, no applier.
        return Attesting {
            server,
            dir,
            public_key_file,
            key,
        };
    }
    let mut admin =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: format!("web-{}", uuid::Uuid::now_v7().simple()),
                project: "web".into(),
                action_key: "*".into(),
                apply_mode: mode as i32,
                applier_endpoint: endpoint.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    Attesting {
        server,
        dir,
        public_key_file,
        key,
    }
}

fn two_changes() -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        changes: vec![
            pb::Change {
                base_version: "7".into(),
                ..flag_change("checkout")
            },
            pb::Change {
                payload: Some(payload(
                    serde_json::json!({"limit": 1.5, "tags": ["a", "b"]}),
                )),
                ..flag_change("search")
            },
        ],
        ..new_request()
    }
}

async fn get_attestation(server: &TestServer, id: &str) -> Result<pb::Attestation, Status> {
    AuditClient::with_interceptor(server.channel().await, Caller::named("user:carol"))
        .get_attestation(pb::GetAttestationRequest {
            change_request_id: id.into(),
        })
        .await
        .map(Response::into_inner)
}

fn statement(attestation: &pb::Attestation) -> serde_json::Value {
    assert_eq!(attestation.payload_type, "application/vnd.in-toto+json");
    serde_json::from_slice(&attestation.payload).expect("statement JSON")
}

#[tokio::test]
async fn an_attestation_is_issued_on_quorum_and_sent_to_the_applier() {
    let (applier, endpoint) = Recorder::start().await;
    let a = attesting(pb::ApplyMode::Auto, &endpoint).await;
    let mut alice = a.server.client("user:alice").await;
    let mut bob = a.server.client_in_groups("user:bob", "sre").await;
    let created = create(&mut alice, two_changes()).await;
    assert!(created.attestation.is_none(), "not approved yet");
    let err = get_attestation(&a.server, &created.id)
        .await
        .expect_err("none yet");
    assert_error(&err, Code::NotFound, "ATTESTATION_NOT_FOUND");

    let applied = approve(&mut bob, &created.id).await;
    assert_eq!(state(&applied), State::Applied);
    let attested = applied.attestation.clone().expect("attested on quorum");
    assert_eq!(
        get_attestation(&a.server, &created.id).await.expect("get"),
        attested,
        "GetAttestation serves the request's attestation"
    );

    // The applier got it with the request, and it verifies against what it was asked to apply.
    let calls = applier.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].attestation.as_ref(), Some(&attested));
    let verified =
        attestation::verify_apply(&calls[0], &a.key, SystemTime::now()).expect("verifies");
    let predicate = &verified.statement.predicate;
    assert_eq!(predicate.change_request_id, created.id);
    assert_eq!(
        (
            predicate.project.as_str(),
            predicate.environment.as_str(),
            predicate.action_key.as_str()
        ),
        ("web", "prod", "feature_flag.update")
    );
    assert_eq!(predicate.changes.len(), 2);
    assert_eq!(predicate.changes[0].base_version, "7");
    assert_eq!(predicate.approvers.len(), 1);
    let approver = &predicate.approvers[0];
    assert_eq!(approver.principal, "user:bob");
    assert_eq!(approver.groups, vec!["sre"]);
    assert_eq!(approver.auth_method, "DEVELOPMENT");
    assert!(predicate.bypass.is_none());
    assert_eq!(
        predicate.policy.uid,
        applied.policy_snapshot.expect("snapshot").uid
    );

    // The statement as JSON: in-toto v1, our predicate type, a subject digest.
    let json = statement(&attested);
    assert_eq!(json["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        json["predicateType"],
        "https://approvals.dev/attestation/v1"
    );
    assert_eq!(
        json["subject"][0]["name"],
        format!("change_requests/{}/changes", created.id)
    );
    assert_eq!(
        json["subject"][0]["digest"]["sha256"]
            .as_str()
            .map(str::len),
        Some(64)
    );
    let expires = humantime::parse_rfc3339(json["predicate"]["expireTime"].as_str().expect("t"))
        .expect("RFC 3339");
    let ttl = expires
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(
        ttl > Duration::from_secs(6 * 86_400) && ttl <= Duration::from_secs(7 * 86_400),
        "default ttl 7 days: {ttl:?}"
    );
}

#[tokio::test]
async fn break_glass_is_attested_with_its_justification() {
    let (applier, endpoint) = Recorder::start().await;
    let a = attesting(pb::ApplyMode::Manual, &endpoint).await;
    let mut alice = a.server.client("user:alice").await;
    let created = create(&mut alice, new_request()).await;
    let mut oncall = a.server.client("user:oncall").await;
    let applied = oncall
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            bypass_justification: "prod is down".into(),
            ..Default::default()
        })
        .await
        .expect("break glass")
        .into_inner();
    assert_eq!(state(&applied), State::Applied);
    let calls = applier.calls();
    let verified = attestation::verify_apply(&calls[0], &a.key, SystemTime::now()).expect("ok");
    let bypass = verified.statement.predicate.bypass.expect("bypass named");
    assert_eq!(
        (bypass.by.as_str(), bypass.justification.as_str()),
        ("user:oncall", "prod is down")
    );
    assert!(verified.statement.predicate.approvers.is_empty());
}

fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(value).expect("json")).expect("write");
    path
}

/// `approvals attest verify`: its exit code and what it printed.
fn attest_verify(envelope: &Path, key: &Path, extra: &[&str]) -> (i32, String) {
    let output = std::process::Command::new(BINARY)
        .args(["attest", "verify"])
        .arg(envelope)
        .arg("--public-key")
        .arg(key)
        .args(extra)
        .output()
        .expect("run attest verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn the_verifier_refuses_tampering_another_key_expiry_and_another_request() {
    let a = attesting(pb::ApplyMode::Manual, "").await;
    let mut alice = a.server.client("user:alice").await;
    let mut bob = a.server.client("user:bob").await;
    let first = create(&mut alice, two_changes()).await;
    let second = create(&mut alice, new_request()).await;
    let first = approve(&mut bob, &first.id).await;
    let second = approve(&mut bob, &second.id).await;
    let envelope = attestation::from_proto(first.attestation.as_ref().expect("first"));
    let other = attestation::from_proto(second.attestation.as_ref().expect("second"));
    let now = SystemTime::now();
    assert!(attestation::verify_change_request(&envelope, &first, &a.key, now).is_ok());

    // A payload that is not what was approved.
    let mut tampered = first.clone();
    tampered.changes[1].payload = Some(payload(serde_json::json!({"limit": 100})));
    let err = attestation::verify_change_request(&envelope, &tampered, &a.key, now)
        .expect_err("tampered payload");
    assert!(
        matches!(
            err,
            AttestationError::ChangeMismatch {
                index: 1,
                field: "payload digest",
                ..
            }
        ),
        "{err}"
    );
    // Another resource, or another base version, than approved.
    let mut moved = first.clone();
    moved.changes[0].base_version = "8".into();
    let err = attestation::verify_change_request(&envelope, &moved, &a.key, now)
        .expect_err("base version");
    assert!(err.to_string().contains("base_version"), "{err}");
    // A statement edited after signing.
    let mut edited = envelope.clone();
    edited.payload = String::from_utf8(edited.payload)
        .expect("utf-8")
        .replace("user:bob", "user:eve")
        .into_bytes();
    let err = attestation::verify(&edited, &a.key, now, &Expected::default())
        .expect_err("edited statement");
    assert!(
        matches!(err, AttestationError::BadSignature { .. }),
        "{err}"
    );
    // Another key.
    let stranger = audit::read_signing_key(&{
        let path = a.dir.path().join("other.pem");
        std::fs::write(&path, audit::generate_signing_key_pem().expect("keygen")).expect("w");
        path
    })
    .expect("other key")
    .verifying_key();
    let err = attestation::verify_change_request(&envelope, &first, &stranger, now)
        .expect_err("wrong key");
    assert!(
        matches!(err, AttestationError::BadSignature { .. }),
        "{err}"
    );
    // Expired: eight days on, past the default seven.
    let later = now + Duration::from_secs(8 * 86_400);
    let err =
        attestation::verify_change_request(&envelope, &first, &a.key, later).expect_err("expired");
    assert!(matches!(err, AttestationError::Expired { .. }), "{err}");
    // Another request's attestation, offered for this one.
    let err =
        attestation::verify_change_request(&other, &first, &a.key, now).expect_err("other request");
    assert!(
        matches!(&err, AttestationError::OtherRequest { attested, expected } if attested == &second.id && expected == &first.id),
        "{err}"
    );

    // The same through the CLI, exit 0 or 1 and a message naming what differs.
    let dir = a.dir.path();
    let file = write_json(dir, "first.json", &envelope);
    let payloads: Vec<_> = first
        .changes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let json = approvals::convert::struct_to_json(c.payload.as_ref().expect("payload"));
            write_json(dir, &format!("payload{i}.json"), &json)
        })
        .collect();
    let p0 = payloads[0].display().to_string();
    let p1 = payloads[1].display().to_string();
    let (code, out) = attest_verify(
        &file,
        &a.public_key_file,
        &[
            "--change-request-id",
            &first.id,
            "--payload",
            &p0,
            "--payload",
            &p1,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("verified") && out.contains("payloads match"),
        "{out}"
    );

    let bad = write_json(dir, "bad.json", &serde_json::json!({"limit": 100}));
    let (code, out) = attest_verify(
        &file,
        &a.public_key_file,
        &["--payload", &p0, "--payload", &bad.display().to_string()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("changes[1]") && out.contains("payload digest"),
        "{out}"
    );

    let stranger_file = dir.join("stranger.pub.pem");
    std::fs::write(
        &stranger_file,
        audit::public_key_pem(&stranger).expect("pem"),
    )
    .expect("w");
    let (code, out) = attest_verify(&file, &stranger_file, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no signature"), "{out}");

    let at = humantime::format_rfc3339(later).to_string();
    let (code, out) = attest_verify(&file, &a.public_key_file, &["--at", &at]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expired"), "{out}");

    let other_file = write_json(dir, "second.json", &other);
    let (code, out) = attest_verify(
        &other_file,
        &a.public_key_file,
        &["--change-request-id", &first.id],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&second.id) && out.contains(&first.id), "{out}");

    // The proto3 JSON of GetAttestation's answer is the same DSSE envelope.
    let (code, out) = attest_verify(
        &write_json(dir, "garbage.json", &serde_json::json!({"payload": 1})),
        &a.public_key_file,
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a DSSE envelope"), "{out}");
}

#[tokio::test]
async fn an_edit_after_approval_drops_the_attestation_until_a_new_quorum() {
    let (applier, endpoint) = Recorder::start().await;
    *applier.version.lock().expect("version") = "8".into();
    let a = attesting(pb::ApplyMode::Manual, &endpoint).await;
    let mut alice = a.server.client("user:alice").await;
    let mut bob = a.server.client("user:bob").await;
    let versioned = || pb::Change {
        base_version: "7".into(),
        ..flag_change("checkout")
    };
    let first = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned()],
            ..new_request()
        },
    )
    .await;
    let second = create(
        &mut alice,
        pb::CreateChangeRequestRequest {
            changes: vec![versioned()],
            ..new_request()
        },
    )
    .await;
    approve(&mut bob, &first.id).await;
    let approved = approve(&mut bob, &second.id).await;
    let old = approved.attestation.clone().expect("attested");
    alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: first.id.clone(),
            ..Default::default()
        })
        .await
        .expect("apply first");
    // `second` is APPROVED with a conflict now: its requester may edit it, which sends it back
    // to review and drops its attestation.
    let marked = get(&mut alice, &second.id).await;
    assert!(!marked.changes[0].conflict.is_empty());
    let edited = alice
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(pb::ChangeRequest {
                id: second.id.clone(),
                changes: vec![pb::Change {
                    id: marked.changes[0].id.clone(),
                    base_version: "8".into(),
                    ..flag_change("checkout")
                }],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect("edit")
        .into_inner();
    assert_eq!(state(&edited), State::InReview);
    assert!(edited.attestation.is_none(), "the old attestation is gone");
    let err = get_attestation(&a.server, &second.id)
        .await
        .expect_err("none after the edit");
    assert_error(&err, Code::NotFound, "ATTESTATION_NOT_FOUND");
    // The old one no longer matches what the request now holds.
    let err = attestation::verify_change_request(
        &attestation::from_proto(&old),
        &edited,
        &a.key,
        SystemTime::now(),
    )
    .expect_err("stale");
    assert!(err.to_string().contains("base_version"), "{err}");

    // A new quorum issues a new attestation, of the edited changes, which the applier gets.
    let reapproved = approve(&mut bob, &second.id).await;
    let new = reapproved.attestation.clone().expect("attested again");
    assert_ne!(new, old);
    alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: second.id.clone(),
            ..Default::default()
        })
        .await
        .expect("apply second");
    let call = applier.calls().pop().expect("second call");
    assert_eq!(call.attestation.as_ref(), Some(&new));
    attestation::verify_apply(&call, &a.key, SystemTime::now()).expect("verifies");
}

#[tokio::test]
async fn a_server_without_a_key_issues_none() {
    let server = TestServer::start().await;
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let approved = approve(&mut bob, &created.id).await;
    assert_eq!(state(&approved), State::Approved);
    assert!(approved.attestation.is_none());
    let err = get_attestation(&server, &created.id)
        .await
        .expect_err("no key");
    assert_error(&err, Code::FailedPrecondition, "AUDIT_NOT_CONFIGURED");
}
