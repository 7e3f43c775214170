//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): `webhook-id`,
//! `webhook-timestamp` (seconds since the epoch) and `webhook-signature`, the base64
//! HMAC-SHA256 of `id.timestamp.body` under each secret, `v1,<sig>` entries separated by
//! spaces, so a receiver keeps verifying while secrets rotate.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

const PREFIX: &str = "whsec_";

/// A signing secret: `whsec_` followed by base64 of 24 to 64 random bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| "must start with whsec_".to_owned())?;
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|e| format!("is not whsec_ followed by base64: {e}"))?;
        if !(16..=64).contains(&bytes.len()) {
            return Err(format!(
                "decodes to {} bytes; use 24 to 64 random bytes",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }
}

/// The `webhook-signature` header: one `v1,<base64>` per secret, space separated; empty
/// without secrets.
pub fn signature(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).ok()?;
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            Some(format!(
                "v1,{}",
                STANDARD.encode(mac.finalize().into_bytes())
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn the_specifications_example_signs_alike() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
