//! Approval attestations (issue 27): what an applier checks offline before it applies.
//!
//! When a request reaches quorum (or is applied break-glass) the service signs a DSSE envelope
//! (<https://github.com/secure-systems-lab/dsse>, payload type [`PAYLOAD_TYPE`]) holding an
//! in-toto Statement v1 whose predicate ([`PREDICATE_TYPE`]) says who approved what under which
//! policy, until when. This module builds and checks the statement and the bytes signed (DSSE's
//! pre-authentication encoding, [`pae`]); the Ed25519 signature itself is the server's
//! (`approvals::audit::attestation`), so the domain stays free of keys.
//!
//! Canonical encodings (all digests SHA-256, lower-case hex):
//! - a change's `payloadSha256` is the digest of the RFC 8785 (JCS) encoding of its payload
//!   object: keys sorted by UTF-16 code units, numbers as ECMAScript prints doubles (so a
//!   payload that went through `google.protobuf.Struct`, where every number is a double,
//!   digests the same as the JSON it came from);
//! - the subject's digest is the digest of the JCS encoding of `predicate.changes` (each
//!   change's id, action, resource type and id, payload digest and base version, in the
//!   request's order);
//! - `predicate.policy.snapshotSha256` is the digest of the JCS encoding of the policy snapshot
//!   as the service stores it.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ChangeRequest, EventDraft, EventKind, State, Timestamp, audit::hex};

/// DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// Our predicate: an approval of a change request.
pub const PREDICATE_TYPE: &str = "https://approvals.dev/attestation/v1";

/// A DSSE envelope, in its JSON form (`payload` and `sig` base64, standard alphabet, padded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// Lower-case hex SHA-256 of the raw 32-byte Ed25519 public key ([`keyid`]).
    #[serde(default)]
    pub keyid: String,
    #[serde(with = "base64_bytes")]
    pub sig: Vec<u8>,
}

mod base64_bytes {
    use super::{Engine, STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
    }
}

/// DSSE v1 pre-authentication encoding: the bytes a signature covers,
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body` with lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// The key id of a raw Ed25519 public key: lower-case hex SHA-256 of its 32 bytes.
pub fn keyid(public_key: &[u8]) -> String {
    hex(&Sha256::digest(public_key))
}

/// An in-toto Statement v1 with our predicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// `change_requests/{id}/changes`.
    pub name: String,
    /// `{"sha256": hex}` of the canonical changes.
    pub digest: BTreeMap<String, String>,
}

/// What was approved, by whom, under which rules, until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Predicate {
    pub change_request_id: String,
    pub project: String,
    pub environment: String,
    pub action_key: String,
    pub action_version: i32,
    /// The request's changes, in order; their JCS encoding is the subject.
    pub changes: Vec<AttestedChange>,
    pub policy: AttestedPolicy,
    /// The approvals that counted toward quorum, in the order they were made.
    pub approvers: Vec<AttestedApprover>,
    /// Set on a break-glass apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass: Option<AttestedBypass>,
    /// When the attestation was issued (RFC 3339, UTC, to the microsecond).
    pub issue_time: String,
    /// After this instant (RFC 3339, UTC) an applier must refuse the attestation.
    pub expire_time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestedChange {
    pub id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub payload_sha256: String,
    /// Empty when the change names none.
    #[serde(default)]
    pub base_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestedPolicy {
    /// Empty for the server default.
    pub name: String,
    pub uid: String,
    pub snapshot_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestedApprover {
    pub principal: String,
    /// The service that called on the approver's behalf; empty when none.
    #[serde(default)]
    pub acting_principal: String,
    /// How the approver's identity was established: `CREDENTIAL`, `USER_TOKEN`, `ASSERTED`,
    /// `DEVELOPMENT`, `UNSPECIFIED`.
    pub identity_proof: String,
    /// How the credential was presented: `API_KEY`, `JWT`, `CLIENT_CERTIFICATE`,
    /// `DEVELOPMENT`, or `UNSPECIFIED`.
    pub auth_method: String,
    pub groups: Vec<String>,
    /// The approval level (1-based) under a policy with levels; 0 otherwise.
    pub level: u32,
    pub approve_time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestedBypass {
    pub by: String,
    pub justification: String,
}

/// Why an attestation was not issued or does not verify. The messages name what differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("the attestation is malformed: {0}")]
    Malformed(String),
    #[error("no signature of the attestation verifies with the given public key (keyid {keyid})")]
    BadSignature { keyid: String },
    #[error("the attestation expired at {expire_time} (now {now})")]
    Expired { expire_time: String, now: String },
    #[error("the attestation is of change request {attested}, not of change request {expected}")]
    OtherRequest { attested: String, expected: String },
    #[error("the attestation covers {attested} change(s); {given} given")]
    ChangeCount { attested: usize, given: usize },
    #[error(
        "changes[{index}] ({resource}): its {field} is {given:?}; the attestation approved {attested:?}"
    )]
    ChangeMismatch {
        index: usize,
        resource: String,
        field: &'static str,
        attested: String,
        given: String,
    },
    #[error("the subject digest {attested} does not match the attested changes ({computed})")]
    SubjectMismatch { attested: String, computed: String },
}

fn jcs<T: Serialize>(value: &T) -> Result<Vec<u8>, AttestationError> {
    serde_json_canonicalizer::to_vec(value)
        .map_err(|e| AttestationError::Malformed(format!("cannot encode canonically: {e}")))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 (hex) of the JCS encoding of a payload object.
pub fn payload_digest(
    payload: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, AttestationError> {
    Ok(sha256_hex(&jcs(payload)?))
}

/// SHA-256 (hex) of the JCS encoding of the attested changes: the statement's subject.
pub fn changes_digest(changes: &[AttestedChange]) -> Result<String, AttestationError> {
    Ok(sha256_hex(&jcs(&changes)?))
}

/// RFC 3339 in UTC to the microsecond (`2026-12-07T06:00:00.000000Z`).
pub fn rfc3339(time: Timestamp) -> String {
    let micros = time.as_micros();
    let system = if micros >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.unsigned_abs())
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_micros(micros.unsigned_abs())
    };
    humantime::format_rfc3339_micros(system).to_string()
}

/// The instant of an RFC 3339 time written by [`rfc3339`].
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let system = humantime::parse_rfc3339(text).ok()?;
    let since = system.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_micros())
        .ok()
        .map(Timestamp::from_micros)
}

/// The subject name of a request's changes.
pub fn subject_name(change_request_id: &str) -> String {
    format!("change_requests/{change_request_id}/changes")
}

impl ChangeRequest {
    /// Whether `event` (just produced by a command on `self`) calls for a new attestation: a
    /// review that reached quorum (IN_REVIEW -> APPROVED or SCHEDULED), or a break-glass apply.
    pub fn attestation_due(&self, event: &EventDraft) -> bool {
        match event.kind {
            EventKind::Bypassed => true,
            EventKind::Reviewed => {
                event.from_state == State::InReview
                    && matches!(event.to_state, State::Approved | State::Scheduled)
            }
            _ => false,
        }
    }

    /// The statement attesting the request as it stands at `now`, valid for `ttl_micros` from
    /// `now` (or from its planned apply time, when that is later).
    pub fn attestation_statement(
        &self,
        now: Timestamp,
        ttl_micros: i64,
    ) -> Result<Statement, AttestationError> {
        let changes = self
            .changes
            .iter()
            .map(|c| {
                Ok(AttestedChange {
                    id: c.id.clone(),
                    action: c.action.clone(),
                    resource_type: c.resource_type.clone(),
                    resource_id: c.resource_id.clone(),
                    payload_sha256: payload_digest(&c.payload)?,
                    base_version: c.base_version.clone().unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, AttestationError>>()?;
        let approvers = self
            .counted_approvals()
            .into_iter()
            .map(|r| AttestedApprover {
                principal: r.reviewer.to_string(),
                acting_principal: r
                    .acting_principal
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                identity_proof: r.proof.as_str().to_owned(),
                auth_method: r.auth_method.stored().unwrap_or("UNSPECIFIED").to_owned(),
                groups: r.reviewer_groups.clone(),
                level: r.level,
                approve_time: rfc3339(r.create_time),
            })
            .collect();
        let bypass = match (&self.bypassed_by, &self.bypass_justification) {
            (Some(by), Some(justification)) => Some(AttestedBypass {
                by: by.to_string(),
                justification: justification.clone(),
            }),
            _ => None,
        };
        let from = match &self.schedule {
            Some(s) if s.apply_time > now => s.apply_time,
            _ => now,
        };
        let mut digest = BTreeMap::new();
        digest.insert("sha256".to_owned(), changes_digest(&changes)?);
        Ok(Statement {
            statement_type: STATEMENT_TYPE.to_owned(),
            subject: vec![Subject {
                name: subject_name(&self.id),
                digest,
            }],
            predicate_type: PREDICATE_TYPE.to_owned(),
            predicate: Predicate {
                change_request_id: self.id.clone(),
                project: self.project.clone(),
                environment: self.environment.clone(),
                action_key: self.action_key.clone(),
                action_version: self.action_version,
                changes,
                policy: AttestedPolicy {
                    name: self.policy.name.clone(),
                    uid: self.policy.uid.clone(),
                    snapshot_sha256: sha256_hex(&jcs(&self.policy)?),
                },
                approvers,
                bypass,
                issue_time: rfc3339(now),
                expire_time: rfc3339(from.saturating_add_micros(ttl_micros)),
            },
        })
    }
}

/// The envelope of `statement`, signed by `sign` (given the PAE bytes, returns the signature)
/// under `keyid`.
pub fn seal(
    statement: &Statement,
    keyid: String,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<Envelope, AttestationError> {
    let payload = serde_json::to_vec(statement)
        .map_err(|e| AttestationError::Malformed(format!("cannot encode the statement: {e}")))?;
    let sig = sign(&pae(PAYLOAD_TYPE, &payload));
    Ok(Envelope {
        payload_type: PAYLOAD_TYPE.to_owned(),
        payload,
        signatures: vec![EnvelopeSignature { keyid, sig }],
    })
}

/// What an applier holds and wants the attestation to cover. `None` fields are not checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected<'a> {
    /// The change request being applied.
    pub change_request_id: Option<&'a str>,
    /// The changes being applied, in the request's order; `None`: the payloads are not checked.
    pub changes: Option<&'a [ExpectedChange<'a>]>,
}

/// One change being applied. `None` fields are not compared (the payload always is).
#[derive(Debug, Clone, Copy)]
pub struct ExpectedChange<'a> {
    pub payload: &'a serde_json::Map<String, serde_json::Value>,
    pub action: Option<&'a str>,
    pub resource_type: Option<&'a str>,
    pub resource_id: Option<&'a str>,
    pub base_version: Option<&'a str>,
}

impl<'a> ExpectedChange<'a> {
    /// A change of which only the payload is known.
    pub fn payload(payload: &'a serde_json::Map<String, serde_json::Value>) -> Self {
        Self {
            payload,
            action: None,
            resource_type: None,
            resource_id: None,
            base_version: None,
        }
    }
}

/// The statement in an envelope whose signature was checked by the caller: checks the types,
/// the subject against the attested changes, expiry at `now`, and what `expected` names.
pub fn check_statement(
    envelope: &Envelope,
    now: Timestamp,
    expected: &Expected<'_>,
) -> Result<Statement, AttestationError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(AttestationError::Malformed(format!(
            "payloadType is {:?}, not {PAYLOAD_TYPE:?}",
            envelope.payload_type
        )));
    }
    let statement: Statement = serde_json::from_slice(&envelope.payload).map_err(|e| {
        AttestationError::Malformed(format!("the payload is not an approvals statement: {e}"))
    })?;
    if statement.statement_type != STATEMENT_TYPE {
        return Err(AttestationError::Malformed(format!(
            "_type is {:?}, not {STATEMENT_TYPE:?}",
            statement.statement_type
        )));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(AttestationError::Malformed(format!(
            "predicateType is {:?}, not {PREDICATE_TYPE:?}",
            statement.predicate_type
        )));
    }
    let predicate = &statement.predicate;
    let computed = changes_digest(&predicate.changes)?;
    let subject = statement
        .subject
        .iter()
        .find(|s| s.name == subject_name(&predicate.change_request_id))
        .ok_or_else(|| {
            AttestationError::Malformed(format!(
                "no subject named {:?}",
                subject_name(&predicate.change_request_id)
            ))
        })?;
    let attested = subject.digest.get("sha256").cloned().unwrap_or_default();
    if attested != computed {
        return Err(AttestationError::SubjectMismatch { attested, computed });
    }
    let expire = parse_rfc3339(&predicate.expire_time).ok_or_else(|| {
        AttestationError::Malformed(format!(
            "expireTime {:?} is not an RFC 3339 time",
            predicate.expire_time
        ))
    })?;
    if now > expire {
        return Err(AttestationError::Expired {
            expire_time: predicate.expire_time.clone(),
            now: rfc3339(now),
        });
    }
    if let Some(id) = expected.change_request_id
        && id != predicate.change_request_id
    {
        return Err(AttestationError::OtherRequest {
            attested: predicate.change_request_id.clone(),
            expected: id.to_owned(),
        });
    }
    if let Some(changes) = expected.changes {
        check_changes(&predicate.changes, changes)?;
    }
    Ok(statement)
}

fn check_changes(
    attested: &[AttestedChange],
    given: &[ExpectedChange<'_>],
) -> Result<(), AttestationError> {
    if attested.len() != given.len() {
        return Err(AttestationError::ChangeCount {
            attested: attested.len(),
            given: given.len(),
        });
    }
    for (index, (a, g)) in attested.iter().zip(given).enumerate() {
        let resource = format!("{} {}", a.resource_type, a.resource_id);
        let mismatch =
            |field: &'static str, attested: &str, given: &str| AttestationError::ChangeMismatch {
                index,
                resource: resource.clone(),
                field,
                attested: attested.to_owned(),
                given: given.to_owned(),
            };
        let fields = [
            ("action", &a.action, g.action),
            ("resource_type", &a.resource_type, g.resource_type),
            ("resource_id", &a.resource_id, g.resource_id),
            ("base_version", &a.base_version, g.base_version),
        ];
        for (field, attested, given) in fields {
            if let Some(given) = given
                && given != attested
            {
                return Err(mismatch(field, attested, given));
            }
        }
        let digest = payload_digest(g.payload)?;
        if digest != a.payload_sha256 {
            return Err(mismatch("payload digest", &a.payload_sha256, &digest));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pae_follows_the_dsse_spec() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn payload_digests_are_canonical() {
        let a = json!({"b": 1, "a": [1.0, "x"], "c": {"z": true, "y": null}});
        let b = json!({"c": {"y": null, "z": true}, "a": [1, "x"], "b": 1.0});
        let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else {
            unreachable!("objects")
        };
        assert_eq!(payload_digest(&a).ok(), payload_digest(&b).ok());
        let mut c = a.clone();
        c.insert("b".into(), json!(2));
        assert_ne!(payload_digest(&a).ok(), payload_digest(&c).ok());
    }

    #[test]
    fn times_round_trip() {
        let t = Timestamp::from_micros(1_796_630_400_123_456);
        assert_eq!(rfc3339(t), "2026-12-07T08:00:00.123456Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }

    fn statement_of(changes: Vec<AttestedChange>, expire: &str) -> Envelope {
        let mut digest = BTreeMap::new();
        digest.insert(
            "sha256".to_owned(),
            changes_digest(&changes).unwrap_or_default(),
        );
        let statement = Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: vec![Subject {
                name: subject_name("cr1"),
                digest,
            }],
            predicate_type: PREDICATE_TYPE.into(),
            predicate: Predicate {
                change_request_id: "cr1".into(),
                project: "p".into(),
                environment: "prod".into(),
                action_key: "flag.update".into(),
                action_version: 1,
                changes,
                policy: AttestedPolicy {
                    name: String::new(),
                    uid: String::new(),
                    snapshot_sha256: String::new(),
                },
                approvers: vec![],
                bypass: None,
                issue_time: "2026-01-01T00:00:00.000000Z".into(),
                expire_time: expire.into(),
            },
        };
        seal(&statement, "k".into(), |_| vec![0; 64]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn change(payload: &serde_json::Map<String, serde_json::Value>) -> AttestedChange {
        AttestedChange {
            id: "c1".into(),
            action: "set".into(),
            resource_type: "flag".into(),
            resource_id: "f1".into(),
            payload_sha256: payload_digest(payload).unwrap_or_default(),
            base_version: "7".into(),
        }
    }

    #[test]
    fn the_checks_name_what_differs() {
        let serde_json::Value::Object(payload) = json!({"on": true}) else {
            unreachable!()
        };
        let serde_json::Value::Object(other) = json!({"on": false}) else {
            unreachable!()
        };
        let envelope = statement_of(vec![change(&payload)], "2026-06-01T00:00:00Z");
        let now = parse_rfc3339("2026-03-01T00:00:00Z").unwrap_or(Timestamp::MAX);
        let good = [ExpectedChange {
            base_version: Some("7"),
            ..ExpectedChange::payload(&payload)
        }];
        let expected = Expected {
            change_request_id: Some("cr1"),
            changes: Some(&good),
        };
        assert!(check_statement(&envelope, now, &expected).is_ok());

        let bad = [ExpectedChange::payload(&other)];
        let err = check_statement(
            &envelope,
            now,
            &Expected {
                changes: Some(&bad),
                ..expected
            },
        );
        assert!(
            matches!(
                err,
                Err(AttestationError::ChangeMismatch {
                    index: 0,
                    field: "payload digest",
                    ..
                })
            ),
            "{err:?}"
        );
        let stale = [ExpectedChange {
            base_version: Some("6"),
            ..ExpectedChange::payload(&payload)
        }];
        let err = check_statement(
            &envelope,
            now,
            &Expected {
                changes: Some(&stale),
                ..expected
            },
        );
        assert!(
            matches!(
                err,
                Err(AttestationError::ChangeMismatch {
                    field: "base_version",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = check_statement(
            &envelope,
            now,
            &Expected {
                change_request_id: Some("cr2"),
                ..expected
            },
        );
        assert!(matches!(err, Err(AttestationError::OtherRequest { .. })));
        let later = parse_rfc3339("2026-07-01T00:00:00Z").unwrap_or(Timestamp::MAX);
        let err = check_statement(&envelope, later, &expected);
        assert!(matches!(err, Err(AttestationError::Expired { .. })));
        let err = check_statement(
            &envelope,
            now,
            &Expected {
                changes: Some(&[]),
                ..expected
            },
        );
        assert!(matches!(
            err,
            Err(AttestationError::ChangeCount {
                attested: 1,
                given: 0
            })
        ));
    }

    #[test]
    fn a_subject_that_does_not_match_its_changes_is_refused() {
        let serde_json::Value::Object(payload) = json!({"on": true}) else {
            unreachable!()
        };
        let mut envelope = statement_of(vec![change(&payload)], "2026-06-01T00:00:00Z");
        // Swap the payload digest inside the statement without updating the subject.
        let mut statement: Statement =
            serde_json::from_slice(&envelope.payload).unwrap_or_else(|e| panic!("{e}"));
        statement.predicate.changes[0].payload_sha256 = "00".repeat(32);
        envelope.payload = serde_json::to_vec(&statement).unwrap_or_default();
        let now = parse_rfc3339("2026-03-01T00:00:00Z").unwrap_or(Timestamp::MAX);
        let err = check_statement(&envelope, now, &Expected::default());
        assert!(
            matches!(err, Err(AttestationError::SubjectMismatch { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn envelopes_use_the_dsse_json_form() {
        let envelope = Envelope {
            payload_type: PAYLOAD_TYPE.into(),
            payload: b"{}".to_vec(),
            signatures: vec![EnvelopeSignature {
                keyid: "k".into(),
                sig: vec![1, 2, 3],
            }],
        };
        let json = serde_json::to_value(&envelope).unwrap_or_default();
        assert_eq!(
            json,
            json!({"payloadType": PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"keyid": "k", "sig": "AQID"}]})
        );
    }
}
