//! JSON Web Tokens from an identity provider: signature (RS256, ES256, EdDSA) against keys from a
//! JWKS file or URL (refreshed in the background), `iss`, `aud`, `exp` and `nbf` with leeway.
//! The principal is `sub` with the configured prefix (`user:` by default) unless `sub` is already
//! `user:NAME` or `service:NAME`; groups, scopes and projects come from configurable claims.

use std::sync::{Arc, RwLock};

use approvals_domain::Timestamp;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use serde_json::Value;

use super::{Caller, JwtConfig, Scope, caller_principal};
use crate::{error::ApiError, identity::parse_groups};

/// The algorithms accepted; anything else (HS*, none) is refused whatever the token says.
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Three base64url segments: a compact JWS. API keys never contain a dot.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

/// Where the keys come from.
#[derive(Clone)]
enum JwksSource {
    File(String),
    Url(String, reqwest::Client),
}

impl JwksSource {
    async fn load(&self) -> Result<JwkSet, String> {
        let text = match self {
            JwksSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("cannot read JWKS file {path}: {e}"))?,
            JwksSource::Url(url, client) => {
                let response = client
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| format!("cannot fetch JWKS from {url}: {e}"))?;
                response
                    .text()
                    .await
                    .map_err(|e| format!("cannot read JWKS from {url}: {e}"))?
            }
        };
        serde_json::from_str(&text).map_err(|e| format!("the JWKS document does not parse: {e}"))
    }
}

pub struct JwtVerifier {
    config: JwtConfig,
    keys: Arc<RwLock<JwkSet>>,
    refresh: tokio::task::JoinHandle<()>,
}

impl Drop for JwtVerifier {
    fn drop(&mut self) {
        self.refresh.abort();
    }
}

impl JwtVerifier {
    /// Loads the keys (a failure stops the server from starting) and refreshes them every
    /// `jwks_refresh_interval`; a failed refresh keeps the previous keys and is logged.
    pub async fn start(config: &JwtConfig) -> Result<Self, String> {
        let source = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), _) => JwksSource::File(path.clone()),
            (None, Some(url)) => {
                // One process-wide TLS provider; an error only means one is installed already.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("HTTP client: {e}"))?;
                JwksSource::Url(url.clone(), client)
            }
            (None, None) => return Err("set jwks_file or jwks_url".to_owned()),
        };
        let keys = Arc::new(RwLock::new(source.load().await?));
        let refresh = tokio::spawn({
            let keys = Arc::downgrade(&keys);
            let interval = config.jwks_refresh_interval;
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let Some(keys) = keys.upgrade() else { return };
                    match source.load().await {
                        Ok(set) => {
                            if let Ok(mut current) = keys.write() {
                                *current = set;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(%err, "JWKS refresh failed; keeping the previous keys")
                        }
                    }
                }
            }
        });
        Ok(Self {
            config: config.clone(),
            keys,
            refresh,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let invalid = |why: String| ApiError::CredentialsInvalid(format!("invalid JWT: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid(format!(
                "algorithm {:?} is not accepted (RS256, ES256, EdDSA)",
                header.alg
            )));
        }
        let candidates: Vec<DecodingKey> = {
            let keys = self
                .keys
                .read()
                .map_err(|_| invalid("the key set is unavailable".to_owned()))?;
            keys.keys
                .iter()
                .filter(|jwk| match &header.kid {
                    Some(kid) => jwk.common.key_id.as_deref() == Some(kid.as_str()),
                    None => true,
                })
                .filter(|jwk| key_fits(jwk, header.alg))
                .filter_map(|jwk| DecodingKey::from_jwk(jwk).ok())
                .collect()
        };
        if candidates.is_empty() {
            return Err(invalid(
                "no key in the JWKS matches the token's kid and algorithm".to_owned(),
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway.as_secs();
        let mut last_error = None;
        for key in &candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation) {
                Ok(data) => return self.caller(&data.claims).map_err(invalid),
                Err(err) => last_error = Some(err),
            }
        }
        Err(invalid(
            last_error
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no key verified it".to_owned()),
        ))
    }

    fn caller(&self, claims: &serde_json::Map<String, Value>) -> Result<Caller, String> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("the token has no sub")?;
        let principal = if sub.starts_with("user:") || sub.starts_with("service:") {
            caller_principal(sub)?
        } else {
            caller_principal(&format!("{}{sub}", self.config.principal_prefix))?
        };
        let groups = parse_groups(&strings(claims.get(&self.config.groups_claim)).join(","));
        // Unknown scopes (another service's) are ignored: they grant nothing here.
        let scopes: Vec<Scope> = strings(claims.get(&self.config.scopes_claim))
            .iter()
            .filter_map(|s| Scope::parse(s))
            .collect();
        let projects = if self.config.projects_claim.is_empty() {
            None
        } else {
            // Like a key's `projects`: absent or empty means every project.
            Some(strings(claims.get(&self.config.projects_claim))).filter(|p| !p.is_empty())
        };
        // `exp` is required and was checked to be a number: seconds since the epoch.
        let expire_time = claims
            .get("exp")
            .and_then(Value::as_f64)
            .and_then(|exp| Timestamp::from_seconds_nanos(exp.floor() as i64, 0));
        Ok(Caller {
            principal,
            groups,
            scopes,
            projects,
            acting_principal: None,
            expire_time,
        })
    }
}

/// A claim as a list: an array of strings, or one string separated by spaces or commas.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(text)) => text
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether a JWK can verify `alg`: RSA for RS256, P-256 for ES256, Ed25519 for EdDSA; never a
/// symmetric key.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_as_lists() {
        assert_eq!(
            strings(Some(&serde_json::json!("approvals:read approvals:write"))),
            vec!["approvals:read", "approvals:write"]
        );
        assert_eq!(
            strings(Some(&serde_json::json!(["sre", "dba"]))),
            vec!["sre", "dba"]
        );
        assert!(strings(None).is_empty());
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("apv1_abc"));
    }
}
