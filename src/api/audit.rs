//! `approvals.v1.Audit`: signed checkpoints, a request's chain with its inclusion proof, and
//! the public key. The layer checks `approvals:read`; a proof also needs the request's project.

use std::sync::Arc;

use approvals_domain::audit::{ChainHead, inclusion_path, leaf_hash};
use approvals_store::Checkpoint;
use ed25519_dalek::VerifyingKey;
use tonic::Request;

use super::{Answer, Context, answer, called, requests};
use crate::{
    auth::Caller,
    convert,
    error::ApiError,
    pb::{self, audit_server::Audit},
};

pub struct AuditService {
    context: Arc<Context>,
    /// The checkpoints' key; `None` without `audit.signing_key_file`.
    public_key: Option<VerifyingKey>,
}

impl AuditService {
    pub fn new(context: Arc<Context>, public_key: Option<VerifyingKey>) -> Self {
        Self {
            context,
            public_key,
        }
    }

    async fn checkpoint(&self, revision: i64) -> Result<Checkpoint, ApiError> {
        if revision < 0 {
            return Err(ApiError::invalid("revision", "must not be negative"));
        }
        if self.public_key.is_none() {
            return Err(ApiError::AuditNotConfigured);
        }
        let store = &self.context.store;
        let found = if revision == 0 {
            store.latest_checkpoint().await?
        } else {
            store.checkpoint_at(revision).await?
        };
        found.ok_or(ApiError::AuditCheckpointNotFound { revision })
    }

    async fn proof(
        &self,
        caller: &Caller,
        req: pb::GetAuditProofRequest,
    ) -> Result<pb::AuditProof, ApiError> {
        let id = requests::id("change_request_id", &req.change_request_id)?;
        if req.checkpoint_revision < 0 {
            return Err(ApiError::invalid(
                "checkpoint_revision",
                "must not be negative",
            ));
        }
        let store = &self.context.store;
        let request = store.get(&id).await?;
        caller.ensure_sees(&request)?;
        let checkpoint = self.checkpoint(req.checkpoint_revision).await?;
        let chain = store.stored_chain(&id, checkpoint.revision).await?;
        let heads = store.chain_heads_at(checkpoint.revision).await?;
        let index = heads
            .iter()
            .position(|h| h.change_request_id == id)
            .ok_or_else(|| ApiError::AuditNotCovered {
                id: id.clone(),
                revision: checkpoint.revision,
            })?;
        let leaves: Vec<_> = heads.iter().map(|h| leaf_hash(&h.leaf())).collect();
        let path = inclusion_path(&leaves, index).unwrap_or_default();
        let head: &ChainHead = &heads[index];
        Ok(pb::AuditProof {
            checkpoint: Some(checkpoint_message(&checkpoint)),
            events: chain
                .into_iter()
                .filter(|e| e.hash.is_some())
                .map(|e| {
                    let fields = e.fields;
                    pb::AuditEvent {
                        revision: e.revision,
                        prev_hash: e.prev_hash.map(|h| h.to_vec()).unwrap_or_default(),
                        hash: e.hash.map(|h| h.to_vec()).unwrap_or_default(),
                        record: Some(pb::AuditRecord {
                            change_request_id: fields.change_request_id,
                            project: fields.project,
                            environment: fields.environment,
                            kind: fields.kind,
                            actor: fields.actor,
                            acting_principal: fields.acting_principal.unwrap_or_default(),
                            from_state: fields.from_state,
                            to_state: fields.to_state,
                            event_time_micros: fields.event_time_micros,
                            detail: fields.detail,
                            snapshot: fields.snapshot,
                            comment_count: fields.comment_count,
                            auth_method: fields.auth_method.unwrap_or_default(),
                        }),
                    }
                })
                .collect(),
            leaf: head.leaf(),
            leaf_index: index as u64,
            inclusion_path: path.iter().map(|h| h.to_vec()).collect(),
        })
    }

    /// The request's current attestation; without one, AUDIT_NOT_CONFIGURED on a server
    /// with no key, ATTESTATION_NOT_FOUND otherwise.
    async fn attestation(
        &self,
        caller: &Caller,
        req: pb::GetAttestationRequest,
    ) -> Result<pb::Attestation, ApiError> {
        let id = requests::id("change_request_id", &req.change_request_id)?;
        let request = self.context.store.get(&id).await?;
        caller.ensure_sees(&request)?;
        match &request.attestation {
            Some(envelope) => Ok(crate::audit::attestation::to_proto(envelope)),
            None if self.public_key.is_none() => Err(ApiError::AuditNotConfigured),
            None => Err(ApiError::AttestationNotFound { id }),
        }
    }

    fn public_key(&self) -> Result<pb::AuditPublicKey, ApiError> {
        let key = self.public_key.ok_or(ApiError::AuditNotConfigured)?;
        let pem = crate::audit::public_key_pem(&key)
            .map_err(|e| ApiError::Store(approvals_store::StoreError::Internal(e)))?;
        Ok(pb::AuditPublicKey {
            algorithm: "Ed25519".into(),
            public_key: key.to_bytes().to_vec(),
            public_key_pem: pem,
        })
    }
}

/// A stored checkpoint as the API shows it.
pub fn checkpoint_message(checkpoint: &Checkpoint) -> pb::AuditCheckpoint {
    pb::AuditCheckpoint {
        revision: checkpoint.revision,
        tree_size: checkpoint.tree_size,
        root_hash: checkpoint.root.to_vec(),
        checkpoint_time: Some(convert::timestamp(
            approvals_domain::Timestamp::from_micros(checkpoint.time_micros),
        )),
        signature: checkpoint.signature.clone(),
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn get_audit_checkpoint(
        &self,
        request: Request<pb::GetAuditCheckpointRequest>,
    ) -> Answer<pb::AuditCheckpoint> {
        let (_caller, req) = called(request)?;
        answer(
            self.checkpoint(req.revision)
                .await
                .map(|c| checkpoint_message(&c)),
        )
    }

    async fn get_audit_proof(
        &self,
        request: Request<pb::GetAuditProofRequest>,
    ) -> Answer<pb::AuditProof> {
        let (caller, req) = called(request)?;
        answer(self.proof(&caller, req).await)
    }

    async fn get_audit_public_key(
        &self,
        request: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Answer<pb::AuditPublicKey> {
        let (_caller, _req) = called(request)?;
        answer(self.public_key())
    }

    async fn get_attestation(
        &self,
        request: Request<pb::GetAttestationRequest>,
    ) -> Answer<pb::Attestation> {
        let (caller, req) = called(request)?;
        answer(self.attestation(&caller, req).await)
    }
}
