//! JSON Web Tokens from an identity provider: signature (RS256, ES256, EdDSA) against keys from a
//! JWKS file or URL (refreshed in the background), `iss`, `aud`, `exp` and `nbf` with leeway.
//! The principal is `sub` with the configured prefix (`user:` by default) unless `sub` is already
//! `user:NAME` or `service:NAME`; groups, scopes and projects come from configurable claims.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use approvals_domain::{IdentityProof, Timestamp};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use serde_json::Value;

use super::caller::parse_groups;
use super::{ActAsList, Authenticated, Caller, JwtConfig, Scope, caller_principal, parse_projects};
use crate::error::ApiError;

/// The algorithms accepted; anything else (HS*, none) is refused whatever the token says.
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Three base64url segments: a compact JWS. API keys never contain a dot.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

/// A `jwks_url` must be `https://`, except on a loopback host (a sidecar or a test), where
/// `http://` cannot be intercepted on the network.
pub fn check_jwks_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&parsed) => Ok(()),
        "http" => Err(format!(
            "{url:?} is plain http: the keys that decide who may call must come over https (http is accepted only on a loopback host)"
        )),
        other => Err(format!("{url:?}: scheme {other:?} is not https")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
                if response.status().is_redirection() {
                    return Err(format!(
                        "the JWKS at {url} answered with a redirect ({}); redirects are not followed: configure the final URL",
                        response.status()
                    ));
                }
                response
                    .text()
                    .await
                    .map_err(|e| format!("cannot read JWKS from {url}: {e}"))?
            }
        };
        serde_json::from_str(&text).map_err(|e| format!("the JWKS document does not parse: {e}"))
    }
}

/// The keys in use, and when they were last loaded successfully.
struct Keys {
    set: JwkSet,
    loaded: Instant,
}

/// Shared by the verifier and its refresh task.
struct KeyStore {
    source: JwksSource,
    keys: RwLock<Keys>,
    /// When a load was last attempted, for the rate limit on unknown-`kid` refetches; the async
    /// lock makes concurrent refetches wait for one load.
    last_attempt: tokio::sync::Mutex<Instant>,
}

impl KeyStore {
    /// Loads the keys now; a failure keeps the previous keys (until they are too old).
    async fn reload(&self) -> Result<(), String> {
        let set = self.source.load().await?;
        if let Ok(mut keys) = self.keys.write() {
            *keys = Keys {
                set,
                loaded: Instant::now(),
            };
        }
        Ok(())
    }

    /// Reloads for a token whose `kid` is unknown, unless a load was attempted within
    /// `min_interval`. Returns whether a load was made.
    async fn refetch_for_unknown_kid(&self, min_interval: Duration) -> bool {
        let mut last = self.last_attempt.lock().await;
        if last.elapsed() < min_interval {
            return false;
        }
        *last = Instant::now();
        if let Err(err) = self.reload().await {
            tracing::warn!(%err, "JWKS refetch for an unknown kid failed");
        }
        true
    }
}

pub struct JwtVerifier {
    config: JwtConfig,
    store: Arc<KeyStore>,
    refresh: tokio::task::JoinHandle<()>,
}

impl Drop for JwtVerifier {
    fn drop(&mut self) {
        self.refresh.abort();
    }
}

impl JwtVerifier {
    /// Loads the keys (a failure stops the server from starting) and refreshes them every
    /// `jwks_refresh_interval`; a failed refresh keeps the previous keys and is logged, until
    /// they are older than `jwks_max_age`.
    pub async fn start(config: &JwtConfig) -> Result<Self, String> {
        let source = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), _) => JwksSource::File(path.clone()),
            (None, Some(url)) => {
                check_jwks_url(url)?;
                // One process-wide TLS provider; an error only means one is installed already.
                let client = crate::tls::outbound::jwks_client(
                    &config.jwks_ca_file,
                    &config.jwks_cert_file,
                    &config.jwks_key_file,
                )?;
                JwksSource::Url(url.clone(), client)
            }
            (None, None) => return Err("set jwks_file or jwks_url".to_owned()),
        };
        let set = source.load().await?;
        let store = Arc::new(KeyStore {
            source,
            keys: RwLock::new(Keys {
                set,
                loaded: Instant::now(),
            }),
            last_attempt: tokio::sync::Mutex::new(Instant::now()),
        });
        let refresh = tokio::spawn({
            let store = Arc::downgrade(&store);
            let interval = config.jwks_refresh_interval;
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let Some(store) = store.upgrade() else { return };
                    *store.last_attempt.lock().await = Instant::now();
                    if let Err(err) = store.reload().await {
                        tracing::warn!(%err, "JWKS refresh failed; keeping the previous keys");
                    }
                }
            }
        });
        Ok(Self {
            config: config.clone(),
            store,
            refresh,
        })
    }

    /// The keys that may verify a token with this header: matching `kid` and algorithm, from a
    /// key set no older than `jwks_max_age`.
    fn candidates(&self, header: &jsonwebtoken::Header) -> Result<Vec<DecodingKey>, String> {
        let keys = self
            .store
            .keys
            .read()
            .map_err(|_| "the key set is unavailable".to_owned())?;
        if keys.loaded.elapsed() > self.config.jwks_max_age {
            return Err(format!(
                "the signing keys could not be refreshed for more than {}; tokens are refused until they are",
                humantime::format_duration(self.config.jwks_max_age)
            ));
        }
        Ok(keys
            .set
            .keys
            .iter()
            .filter(|jwk| match &header.kid {
                Some(kid) => jwk.common.key_id.as_deref() == Some(kid.as_str()),
                None => true,
            })
            .filter(|jwk| key_fits(jwk, header.alg))
            .filter_map(|jwk| DecodingKey::from_jwk(jwk).ok())
            .collect())
    }

    pub async fn verify(&self, token: &str) -> Result<Authenticated, ApiError> {
        let invalid = |why: String| ApiError::CredentialsInvalid(format!("invalid JWT: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid(format!(
                "algorithm {:?} is not accepted (RS256, ES256, EdDSA)",
                header.alg
            )));
        }
        let mut candidates = self.candidates(&header).map_err(invalid)?;
        // A kid the server does not know may be a key the provider just published.
        if candidates.is_empty()
            && header.kid.is_some()
            && self
                .store
                .refetch_for_unknown_kid(self.config.jwks_min_refetch_interval)
                .await
        {
            candidates = self.candidates(&header).map_err(invalid)?;
        }
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
                Ok(data) => return self.holder(&data.claims).map_err(invalid),
                Err(err) => last_error = Some(err),
            }
        }
        Err(invalid(
            last_error
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no key verified it".to_owned()),
        ))
    }

    fn holder(&self, claims: &serde_json::Map<String, Value>) -> Result<Authenticated, String> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("the token has no sub")?;
        let prefix = self.config.principal_prefix.as_str();
        // A sub that names a principal keeps it only when it is of the configured kind: a
        // provider's users cannot make themselves services by their choice of subject.
        let principal = match sub.strip_prefix(prefix) {
            Some(_) => caller_principal(sub)?,
            None if sub.starts_with("user:") || sub.starts_with("service:") => {
                return Err(format!(
                    "sub {sub:?} names another kind of principal than auth.jwt.principal_prefix {prefix:?}"
                ));
            }
            None => caller_principal(&format!("{prefix}{sub}"))?,
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
            let listed = strings(claims.get(&self.config.projects_claim));
            parse_projects(&listed).map_err(|m| {
                format!(
                    "the {:?} claim (auth.jwt.projects_claim): {m}",
                    self.config.projects_claim
                )
            })?
        };
        // `exp` is required and was checked to be a number: seconds since the epoch.
        let expire_time = claims
            .get("exp")
            .and_then(Value::as_f64)
            .and_then(|exp| Timestamp::from_seconds_nanos(exp.floor() as i64, 0));
        let act_as = ActAsList::granted(&strings(claims.get(&self.config.act_as_claim)));
        Ok(Authenticated {
            caller: Caller {
                principal,
                groups,
                scopes,
                projects,
                acting_principal: None,
                proof: IdentityProof::Credential,
                method: super::AuthMethod::Jwt,
                expire_time,
            },
            act_as,
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
