//! The `[auth]` section of the configuration file.
//!
//! ```toml
//! [[auth.api_keys]]
//! principal = "service:flags"
//! groups = []
//! scopes = ["approvals:write"]
//! projects = ["web"]        # or ["*"]: every project
//! sha256 = "…"            # hex SHA-256 of the key; the key itself is never stored
//! act_as = ["user:*"]       # with approvals:act_as: whom it may act for
//!
//! [auth.groups]             # group memberships the server vouches for
//! sre = ["user:alice", "service:deployer"]
//!
//! [[auth.client_certs]]    # a verified client certificate (tls.client_auth) -> a caller
//! uri_san = "spiffe://example.org/ns/ci/sa/deployer"   # or dns_san = "…", or common_name = "…"
//! principal = "service:deployer"
//! scopes = ["approvals:write"]
//! projects = ["web"]
//!
//! [auth.jwt]
//! issuer = "https://id.example.com/"
//! audience = "approvals"
//! jwks_file = "/etc/approvals/jwks.json"   # or jwks_url = "https://id.example.com/jwks.json"
//! ```

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::fields;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// API keys, presented as `authorization: Bearer <key>`. Only in the file.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Verified client certificates (`[tls]` with `client_auth`), each matched by exactly one of
    /// a URI SAN (SPIFFE ID), a DNS SAN or the subject CN. Only in the file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_certs: Vec<ClientCertConfig>,
    /// JSON Web Tokens from an identity provider, presented the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Group memberships from the server's own configuration: a bare group name -> its members
    /// (`user:NAME`, `service:NAME`). Added to the groups a caller's credential carries, and the
    /// only groups an on-behalf-of user has besides those of a forwarded user token.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, Vec<String>>,
}

impl AuthConfig {
    /// Whether any way to authenticate is configured. Without one, the server runs in local
    /// development mode: loopback only, identity from `x-approvals-actor`.
    pub fn is_configured(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt.is_some() || !self.client_certs.is_empty()
    }
}

/// One `[[auth.client_certs]]` entry: which verified client certificates it matches (exactly
/// one of `uri_san`, `dns_san`, `common_name`, compared exactly; DNS names case-insensitively),
/// and the caller they are, as an API key's entry says.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// A URI subject alternative name, e.g. the SPIFFE ID
    /// `spiffe://example.org/ns/ci/sa/deployer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_san: Option<String>,
    /// A DNS subject alternative name, e.g. `deployer.ci.svc.cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_san: Option<String>,
    /// The subject's common name (CN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    /// `user:NAME` or `service:NAME`.
    pub principal: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub scopes: Vec<String>,
    /// As for API keys: required, `["*"]` for every project.
    #[serde(default)]
    pub projects: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act_as: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// `user:NAME` or `service:NAME`.
    pub principal: String,
    /// Bare group names (`sre`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// `approvals:read`, `approvals:write`, `approvals:admin`, `approvals:act_as`,
    /// `approvals:bypass`, `approvals:relay`.
    pub scopes: Vec<String>,
    /// The projects the key may act in; `["*"]`: every project. Required: a key without
    /// projects is refused when the configuration loads.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Lower-case hex SHA-256 digest of the key.
    pub sha256: String,
    /// With `approvals:act_as`: the users the key may act for, `user:NAME` or `user:*` (every
    /// user). Required with that scope; only `user:` principals can be acted for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act_as: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// A JWKS document on disk (re-read every `jwks_refresh_interval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// A JWKS document over HTTP(S) (re-fetched every `jwks_refresh_interval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// CAs (PEM) that sign the JWKS server's certificate; empty: the system's roots.
    pub jwks_ca_file: String,
    /// A client certificate (PEM chain) to present to the JWKS server, with `jwks_key_file`.
    pub jwks_cert_file: String,
    pub jwks_key_file: String,
    #[serde(with = "fields::duration")]
    pub jwks_refresh_interval: Duration,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "fields::duration")]
    pub leeway: Duration,
    /// Prefix that makes a principal of `sub` (unless `sub` is `user:…` or `service:…` already).
    pub principal_prefix: String,
    /// Claim holding the caller's groups: an array of strings, or one string separated by spaces
    /// or commas.
    pub groups_claim: String,
    /// Claim holding the caller's scopes, in the same forms (OAuth's `scope` is space separated).
    pub scopes_claim: String,
    /// Claim holding the projects the caller may act in (`*`: every project). When set, a token
    /// without it (or with none listed) is refused; "" (the default) reads no claim and lets
    /// tokens act in every project.
    pub projects_claim: String,
    /// Claim listing whom a token holding `approvals:act_as` may act for (`user:NAME`, or
    /// `user:*`); without it such a token acts for nobody.
    pub act_as_claim: String,
    /// Keys not refreshed successfully for this long are dropped (tokens are then refused until
    /// a refresh succeeds), so a key the provider removed is not trusted forever.
    #[serde(with = "fields::duration")]
    pub jwks_max_age: Duration,
    /// A token signed with an unknown `kid` makes the server fetch the keys again at once, at
    /// most once per this interval.
    #[serde(with = "fields::duration")]
    pub jwks_min_refetch_interval: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: String::new(),
            jwks_cert_file: String::new(),
            jwks_key_file: String::new(),
            jwks_refresh_interval: Duration::from_secs(300),
            leeway: Duration::from_secs(30),
            principal_prefix: "user:".to_owned(),
            groups_claim: "groups".to_owned(),
            scopes_claim: "scope".to_owned(),
            projects_claim: String::new(),
            act_as_claim: "act_as".to_owned(),
            jwks_max_age: Duration::from_secs(24 * 3600),
            jwks_min_refetch_interval: Duration::from_secs(30),
        }
    }
}
