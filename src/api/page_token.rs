//! Opaque page tokens (AIP-158): the position to continue after, bound to the query that made
//! it, so a token used with other filters is refused instead of returning a wrong page.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Digest of the query a token belongs to (its filters, not its page size).
pub fn query_digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.len().to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn encode(position: &str, digest: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{digest}|{position}"))
}

/// The position in `token`, which must have been made for the query `digest`.
pub fn decode(token: &str, digest: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ApiError::invalid(
            "page_token",
            "is not a token this service issued for this query",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    match text.split_once('|') {
        Some((d, position)) if d == digest && !position.is_empty() => Ok(Some(position.to_owned())),
        _ => Err(bad()),
    }
}

/// The page size of the small collections (policies, calendars, relay sinks and dead letters)
/// when the caller sends none, and the most one page holds.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 1000;

/// AIP-158 page size: 0 means the default, larger values are coerced down, negative is refused.
pub fn page_size(value: i32, default: u64, max: u64) -> Result<u64, ApiError> {
    match value {
        v if v < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(default),
        v => Ok((v as u64).min(max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_their_query() {
        let a = query_digest(&["web", "", "x"]);
        let b = query_digest(&["web", "x", ""]);
        assert_ne!(a, b);
        let token = encode("0190-id", &a);
        assert_eq!(
            decode(&token, &a).ok().flatten().as_deref(),
            Some("0190-id")
        );
        assert!(decode(&token, &b).is_err());
        assert!(decode("not base64!", &a).is_err());
        assert!(matches!(decode("", &a), Ok(None)));
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0, 50, 1000).ok(), Some(50));
        assert_eq!(page_size(5000, 50, 1000).ok(), Some(1000));
        assert!(page_size(-1, 50, 1000).is_err());
    }
}
