//! Approval attestations (issue 27): the server signs them with the audit key, and appliers
//! written in Rust verify them with [`verify`] or [`verify_apply`] (the statement, its
//! encodings and the checks that need no key are `approvals_domain::attestation`).
//!
//! An applier that refuses a payload the approvers did not see:
//!
//! ```no_run
//! use approvals::{audit::attestation, pb};
//!
//! fn check(request: &pb::ApplyChangesRequest, key: &ed25519_dalek::VerifyingKey) -> Result<(), tonic::Status> {
//!     attestation::verify_apply(request, key, std::time::SystemTime::now())
//!         .map(|_| ())
//!         .map_err(|e| tonic::Status::permission_denied(e.to_string()))
//! }
//! ```

use std::{sync::Arc, time::SystemTime};

pub use approvals_domain::attestation::{
    AttestationError, Envelope, EnvelopeSignature, Expected, ExpectedChange, PAYLOAD_TYPE,
    PREDICATE_TYPE, Statement, keyid, pae,
};
use approvals_domain::{ChangeRequest, Timestamp};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::{convert::struct_to_json, pb};

/// Issues attestations: the audit key, its key id, and how long an attestation is valid.
pub struct Attestor {
    key: Arc<SigningKey>,
    keyid: String,
    ttl_micros: i64,
}

impl Attestor {
    pub fn new(key: Arc<SigningKey>, ttl: std::time::Duration) -> Self {
        let keyid = keyid(key.verifying_key().as_bytes());
        Self {
            key,
            keyid,
            ttl_micros: i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX),
        }
    }

    /// Signs a new attestation of `request` as it stands at `now` onto it (replacing any).
    pub fn attest(&self, request: &mut ChangeRequest, now: Timestamp) {
        let sealed = request
            .attestation_statement(now, self.ttl_micros)
            .and_then(|statement| {
                approvals_domain::attestation::seal(&statement, self.keyid.clone(), |bytes| {
                    self.key.sign(bytes).to_bytes().to_vec()
                })
            });
        match sealed {
            Ok(envelope) => request.attestation = Some(envelope),
            Err(err) => {
                // Not reachable with JSON the service stored; an apply without an attestation
                // is refused by a verifying applier, which is the safe side.
                tracing::warn!(change_request_id = %request.id, error = %err, "no attestation issued");
                request.attestation = None;
            }
        }
    }
}

/// What a verified attestation says, for the applier to look at further.
#[derive(Debug, Clone)]
pub struct Verified {
    pub statement: Statement,
    /// The key id of the signature that verified.
    pub keyid: String,
}

fn timestamp(now: SystemTime) -> Timestamp {
    match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => Timestamp::from_micros(i64::try_from(since.as_micros()).unwrap_or(i64::MAX)),
        Err(_) => Timestamp::from_micros(0),
    }
}

/// Checks an attestation: a signature by `public_key` over the DSSE pre-authentication
/// encoding, not expired at `now`, and of what `expected` names (the request id, and each
/// change's payload and whichever of its resource, action and base version are given).
pub fn verify(
    envelope: &Envelope,
    public_key: &VerifyingKey,
    now: SystemTime,
    expected: &Expected<'_>,
) -> Result<Verified, AttestationError> {
    let keyid = keyid(public_key.as_bytes());
    let message = pae(&envelope.payload_type, &envelope.payload);
    let verified = envelope.signatures.iter().any(|s| {
        (s.keyid.is_empty() || s.keyid == keyid)
            && Signature::from_slice(&s.sig)
                .is_ok_and(|sig| public_key.verify(&message, &sig).is_ok())
    });
    if !verified {
        return Err(AttestationError::BadSignature { keyid });
    }
    let statement =
        approvals_domain::attestation::check_statement(envelope, timestamp(now), expected)?;
    Ok(Verified { statement, keyid })
}

/// Checks the attestation an applier received with `request` against the request it is asked
/// to apply: its id, and every change's action, resource, base version and payload. A request
/// without an attestation is refused.
pub fn verify_apply(
    request: &pb::ApplyChangesRequest,
    public_key: &VerifyingKey,
    now: SystemTime,
) -> Result<Verified, AttestationError> {
    let attestation = request
        .attestation
        .as_ref()
        .ok_or_else(|| AttestationError::Malformed("the call carries no attestation".into()))?;
    let change_request = request
        .change_request
        .as_ref()
        .ok_or_else(|| AttestationError::Malformed("the call carries no change request".into()))?;
    verify_change_request(&from_proto(attestation), change_request, public_key, now)
}

/// Checks `envelope` against a change request as the applier received it (see
/// [`verify_apply`]).
pub fn verify_change_request(
    envelope: &Envelope,
    change_request: &pb::ChangeRequest,
    public_key: &VerifyingKey,
    now: SystemTime,
) -> Result<Verified, AttestationError> {
    let payloads: Vec<_> = change_request
        .changes
        .iter()
        .map(|c| c.payload.as_ref().map(struct_to_json).unwrap_or_default())
        .collect();
    let changes: Vec<_> = change_request
        .changes
        .iter()
        .zip(&payloads)
        .map(|(c, payload)| ExpectedChange {
            payload,
            action: Some(&c.action),
            resource_type: Some(&c.resource_type),
            resource_id: Some(&c.resource_id),
            base_version: Some(&c.base_version),
        })
        .collect();
    verify(
        envelope,
        public_key,
        now,
        &Expected {
            change_request_id: Some(&change_request.id),
            changes: Some(&changes),
        },
    )
}

/// The envelope of the proto message.
pub fn from_proto(attestation: &pb::Attestation) -> Envelope {
    Envelope {
        payload_type: attestation.payload_type.clone(),
        payload: attestation.payload.clone(),
        signatures: attestation
            .signatures
            .iter()
            .map(|s| EnvelopeSignature {
                keyid: s.keyid.clone(),
                sig: s.sig.clone(),
            })
            .collect(),
    }
}

/// The proto message of an envelope.
pub fn to_proto(envelope: &Envelope) -> pb::Attestation {
    pb::Attestation {
        payload_type: envelope.payload_type.clone(),
        payload: envelope.payload.clone(),
        signatures: envelope
            .signatures
            .iter()
            .map(|s| pb::AttestationSignature {
                keyid: s.keyid.clone(),
                sig: s.sig.clone(),
            })
            .collect(),
    }
}
