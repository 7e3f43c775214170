//! The verifiable history (issue 27): the Ed25519 key checkpoints are signed with, the task
//! that signs them (the `approvals.v1.Audit` service is `api::audit`), and the `approvals audit` commands
//! (export and verify, which read the database directly through the store: they are operator
//! tools). The hashes themselves are pure functions in `approvals_domain::audit`.

pub mod attestation;
pub mod command;
pub mod verify;

use std::{path::Path, sync::Arc, time::Duration};

use approvals_domain::audit::{ChainHead, checkpoint_message, leaf_hash, merkle_root};
use approvals_store::{Checkpoint, Store};
use ed25519_dalek::{
    Signature, Signer, SigningKey, Verifier, VerifyingKey,
    pkcs8::{
        DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey,
        spki::der::pem::LineEnding,
    },
};

use crate::clock::SharedClock;

/// Reads a PKCS#8 PEM Ed25519 private key (`approvals audit keygen`, `openssl genpkey
/// -algorithm ed25519`).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| {
        format!(
            "{} is not a PKCS#8 PEM Ed25519 private key (-----BEGIN PRIVATE KEY-----): {e}",
            path.display()
        )
    })
}

/// Reads a PEM SubjectPublicKeyInfo Ed25519 public key (`approvals audit public-key`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| {
        format!(
            "{} is not a PEM Ed25519 public key (-----BEGIN PUBLIC KEY-----): {e}",
            path.display()
        )
    })
}

/// The PEM SubjectPublicKeyInfo of `key`.
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, String> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| format!("cannot encode the public key: {e}"))
}

/// A new private key as PKCS#8 PEM.
pub fn generate_signing_key_pem() -> Result<String, String> {
    use rand::Rng;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| format!("cannot encode the key: {e}"))
}

/// The checkpoint of `heads` (every request's chain head at `revision`), signed.
pub fn sign_checkpoint(
    key: &SigningKey,
    revision: i64,
    heads: &[ChainHead],
    time_micros: i64,
) -> Checkpoint {
    let leaves: Vec<_> = heads.iter().map(|h| leaf_hash(&h.leaf())).collect();
    let root = merkle_root(&leaves);
    let tree_size = leaves.len() as u64;
    let signature = key.sign(&checkpoint_message(revision, tree_size, &root, time_micros));
    Checkpoint {
        revision,
        tree_size,
        root,
        time_micros,
        signature: signature.to_bytes().to_vec(),
    }
}

/// Whether `checkpoint`'s signature verifies with `key`.
pub fn signature_verifies(key: &VerifyingKey, checkpoint: &Checkpoint) -> bool {
    let Ok(signature) = Signature::from_slice(&checkpoint.signature) else {
        return false;
    };
    let message = checkpoint_message(
        checkpoint.revision,
        checkpoint.tree_size,
        &checkpoint.root,
        checkpoint.time_micros,
    );
    key.verify(&message, &signature).is_ok()
}

/// Signs a checkpoint every `interval` when the log grew since the last one (one replica at a
/// time, see `Store::write_checkpoint`). A failure is logged and tried again next time.
pub fn spawn_checkpointer(
    store: Store,
    key: Arc<SigningKey>,
    interval: Duration,
    clock: SharedClock,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = clock.now().as_micros();
            let result = store
                .write_checkpoint(|revision, heads| sign_checkpoint(&key, revision, heads, now))
                .await;
            match result {
                Ok(Some(checkpoint)) => tracing::info!(
                    revision = checkpoint.revision,
                    tree_size = checkpoint.tree_size,
                    "audit checkpoint signed"
                ),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "audit checkpoint failed; retrying next interval")
                }
            }
        }
    })
}
