//! Authentication and scopes, for every call but health and reflection: the transport's stack
//! asks [`Authenticator::admit`]. It authenticates the caller (API key, JWT, or in local
//! development the `x-approvals-actor` metadata), applies on-behalf-of, checks the method's
//! scope in ONE table, and puts the [`Caller`] into the request's extensions, where handlers
//! find it through [`caller`].

pub mod api_keys;
mod identity;
mod jwt;
pub mod methods;

use std::{collections::HashMap, sync::Arc};

use approvals_domain::{
    Actor, ChangeRequest, DomainError, IdentityProof, Policy, Principal, PrincipalKind, Timestamp,
};
use http::HeaderMap;
use tonic::Status;

pub use self::identity::{ACTOR_HEADER, GROUPS_HEADER, actor, caller, parse_groups};
use self::{api_keys::ApiKeys, jwt::JwtVerifier};
pub use crate::config::auth::{ApiKeyConfig, AuthConfig, JwtConfig};
use crate::error::ApiError;

pub const AUTHORIZATION_HEADER: &str = "authorization";
pub const ON_BEHALF_OF_HEADER: &str = "x-approvals-on-behalf-of";
pub const ON_BEHALF_OF_GROUPS_HEADER: &str = "x-approvals-on-behalf-of-groups";
/// The user's own token (a JWT from the configured issuer), forwarded by a service acting on
/// their behalf: proof of who the user is (RFC 8693's subject token, as a header).
pub const USER_TOKEN_HEADER: &str = "x-approvals-user-token";

/// A permission a caller holds. Scopes nest: `Write` includes `Read`, `Admin` includes both;
/// `ActAs` and `Bypass` include nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
    ActAs,
    Bypass,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Read,
        Scope::Write,
        Scope::Admin,
        Scope::ActAs,
        Scope::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "approvals:read",
            Scope::Write => "approvals:write",
            Scope::Admin => "approvals:admin",
            Scope::ActAs => "approvals:act_as",
            Scope::Bypass => "approvals:bypass",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether holding `self` grants `required`.
    pub fn grants(self, required: Scope) -> bool {
        self == required
            || matches!(
                (self, required),
                (Scope::Write, Scope::Read) | (Scope::Admin, Scope::Read | Scope::Write)
            )
    }
}

/// Who is calling, as authenticated: put into the request extensions by the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// On whose behalf the call is made (the user, for an on-behalf-of call).
    pub principal: Principal,
    /// That principal's groups (bare names).
    pub groups: Vec<String>,
    /// The scopes of the authenticated credential.
    pub scopes: Vec<Scope>,
    /// The projects the credential may act in; `None`: every project.
    pub projects: Option<Vec<String>>,
    /// The authenticated service, when it acts on behalf of `principal`.
    pub acting_principal: Option<Principal>,
    /// How `principal`'s identity was established.
    pub proof: IdentityProof,
    /// When the credential expires: a JWT's `exp` claim; `None` for API keys and development
    /// mode, which do not expire. (A JWT is still accepted until `exp` plus `auth.jwt.leeway`.)
    pub expire_time: Option<Timestamp>,
}

impl Caller {
    pub fn has(&self, required: Scope) -> bool {
        self.scopes.iter().any(|held| held.grants(required))
    }

    /// Refuses a call of `method` (its name, for the message) without `scope`.
    pub fn require(&self, scope: Scope, method: &str) -> Result<(), ApiError> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope {
                scope: scope.as_str(),
                method: method.to_owned(),
            })
        }
    }

    /// The domain's view of the caller.
    pub fn actor(&self) -> Actor {
        Actor {
            principal: self.principal.clone(),
            groups: self.groups.clone(),
            acting_principal: self.acting_principal.clone(),
            proof: self.proof,
        }
    }

    /// The principal whose credential authenticated the call: the acting service of an
    /// on-behalf-of call, else the caller itself.
    pub fn credential_principal(&self) -> &Principal {
        self.acting_principal.as_ref().unwrap_or(&self.principal)
    }

    pub fn may_act_in(&self, project: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|projects| projects.iter().any(|p| p == project))
    }

    /// PERMISSION_DENIED (`PROJECT_NOT_ALLOWED`) unless the credential may act in `project`,
    /// which the caller named itself (create, list, watch, policy writes).
    pub fn ensure_project(&self, project: &str) -> Result<(), DomainError> {
        // Every call that names a project passes here: label the call's span with it.
        tracing::Span::current().record("project", project);
        if self.may_act_in(project) {
            Ok(())
        } else {
            Err(DomainError::ProjectNotAllowed {
                project: project.to_owned(),
            })
        }
    }

    /// A change request found by id is visible only in the credential's projects; any other
    /// is NOT_FOUND exactly as an unknown id, so that ids cannot be probed across projects.
    pub fn ensure_sees(&self, request: &ChangeRequest) -> Result<(), DomainError> {
        tracing::Span::current().record("project", request.project.as_str());
        if self.may_act_in(&request.project) {
            Ok(())
        } else {
            Err(DomainError::ChangeRequestNotFound {
                id: request.id.clone(),
            })
        }
    }

    /// Likewise for a policy found by name.
    pub fn ensure_sees_policy(&self, policy: &Policy) -> Result<(), DomainError> {
        tracing::Span::current().record("project", policy.project.as_str());
        if self.may_act_in(&policy.project) {
            Ok(())
        } else {
            Err(DomainError::PolicyNotFound {
                name: policy.name.clone(),
            })
        }
    }
}

/// What a credential proved: its caller, and whom it may act for with `approvals:act_as`.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub caller: Caller,
    pub act_as: ActAsList,
}

/// Whom a credential may act for: `user:NAME` entries, or `user:*` for every user. Only users
/// can be acted for: acting as a service would let a credential be another service (an
/// executor, an applier).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActAsList {
    any_user: bool,
    users: Vec<Principal>,
}

impl ActAsList {
    /// From a key's `act_as`: an entry that is not `user:NAME` or `user:*` is an error naming
    /// it.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut list = Self::default();
        for entry in entries {
            list.add(entry)?;
        }
        Ok(list)
    }

    /// From a token's claim: entries that are not `user:NAME` or `user:*` grant nothing, as
    /// unknown scopes grant nothing.
    pub fn granted(entries: &[String]) -> Self {
        let mut list = Self::default();
        for entry in entries {
            let _ = list.add(entry);
        }
        list
    }

    fn add(&mut self, entry: &str) -> Result<(), String> {
        let entry = entry.trim();
        if entry == "user:*" {
            self.any_user = true;
            return Ok(());
        }
        match Principal::parse(entry) {
            Ok(p) if p.kind() == PrincipalKind::User => {
                self.users.push(p);
                Ok(())
            }
            _ => Err(format!(
                "{entry:?} cannot be acted for: write user:NAME, or user:* for every user"
            )),
        }
    }

    pub fn allows(&self, user: &Principal) -> bool {
        user.kind() == PrincipalKind::User && (self.any_user || self.users.contains(user))
    }
}

/// `["*"]` -> every project (`None`); names -> those projects. Empty, or `*` beside names, is an
/// error: "every project" must be said explicitly.
pub fn parse_projects(projects: &[String]) -> Result<Option<Vec<String>>, String> {
    let projects: Vec<String> = projects.iter().map(|p| p.trim().to_owned()).collect();
    if projects.is_empty() {
        return Err("name the projects it may act in, or [\"*\"] for every project".to_owned());
    }
    if projects.iter().any(|p| p == "*") {
        return if projects.len() == 1 {
            Ok(None)
        } else {
            Err("\"*\" (every project) stands alone".to_owned())
        };
    }
    if let Some(empty) = projects.iter().find(|p| p.is_empty()) {
        return Err(format!("{empty:?} is not a project name"));
    }
    Ok(Some(projects))
}

/// How callers are authenticated.
pub struct Authenticator {
    mode: Mode,
    /// Group memberships from `[auth.groups]`: principal -> bare group names.
    configured_groups: HashMap<Principal, Vec<String>>,
}

enum Mode {
    /// No authentication configured (loopback only): callers name themselves with
    /// `x-approvals-actor` and hold every scope.
    Development,
    Configured {
        api_keys: ApiKeys,
        jwt: Option<Box<JwtVerifier>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth.api_keys: {0}")]
    ApiKeys(String),
    #[error("auth.jwt: {0}")]
    Jwt(String),
    #[error("auth.groups: {0}")]
    Groups(String),
}

impl Authenticator {
    /// Builds the authenticator; with a JWKS URL or file, loads the keys once and keeps them
    /// refreshed by a background task.
    pub async fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let configured_groups = group_members(config).map_err(AuthSetupError::Groups)?;
        if !config.is_configured() {
            return Ok(Self {
                mode: Mode::Development,
                configured_groups,
            });
        }
        let api_keys = ApiKeys::new(&config.api_keys).map_err(AuthSetupError::ApiKeys)?;
        let jwt = match &config.jwt {
            Some(jwt) => Some(Box::new(
                JwtVerifier::start(jwt).await.map_err(AuthSetupError::Jwt)?,
            )),
            None => None,
        };
        Ok(Self {
            mode: Mode::Configured { api_keys, jwt },
            configured_groups,
        })
    }

    pub fn is_development(&self) -> bool {
        matches!(self.mode, Mode::Development)
    }

    /// What the transport's stack asks of every call (see the module documentation): puts its
    /// [`Caller`] into the request's extensions, or says which status refuses it.
    pub async fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let caller = self
            .authorize(request.uri().path(), request.headers())
            .await?;
        if let Some(caller) = caller {
            request.extensions_mut().insert(Arc::new(caller));
        }
        Ok(())
    }

    /// The caller of a call to `path`, or `None` for the open services; an error for a caller
    /// that is not authenticated or lacks the method's scope.
    pub async fn authorize(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Option<Caller>, ApiError> {
        if methods::is_open(path) {
            return Ok(None);
        }
        let caller = self.authenticate(headers).await?;
        let Some(method) = methods::method(path) else {
            return Err(ApiError::MethodNotAllowed(path.to_owned()));
        };
        if !method.scopes.iter().any(|scope| caller.has(*scope)) {
            return Err(ApiError::MissingScope {
                scope: method.scopes[0].as_str(),
                method: path.to_owned(),
            });
        }
        Ok(Some(caller))
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let authenticated = match &self.mode {
            Mode::Development => development_caller(headers)?,
            Mode::Configured { api_keys, jwt } => {
                let token = bearer_token(headers)?;
                match jwt {
                    Some(jwt) if jwt::looks_like_jwt(token) => jwt.verify(token).await?,
                    _ => api_keys.verify(token)?,
                }
            }
        };
        let mut caller = self.on_behalf_of(authenticated, headers).await?;
        self.add_configured_groups(&mut caller);
        Ok(caller)
    }

    fn add_configured_groups(&self, caller: &mut Caller) {
        if let Some(groups) = self.configured_groups.get(&caller.principal) {
            caller.groups.extend(groups.iter().cloned());
            caller.groups.sort();
            caller.groups.dedup();
        }
    }

    /// With `x-approvals-on-behalf-of` (and/or `x-approvals-user-token`), the call is made as
    /// that user by a caller holding `approvals:act_as` that may act for them; the caller is
    /// kept as the acting principal. The user's identity is proven by a forwarded user token
    /// (verified like any JWT) or only asserted by the caller; their groups come from that
    /// token and from `[auth.groups]`, never from a header, except in local development.
    async fn on_behalf_of(
        &self,
        authenticated: Authenticated,
        headers: &HeaderMap,
    ) -> Result<Caller, ApiError> {
        let Authenticated { caller, act_as } = authenticated;
        let named = header(headers, ON_BEHALF_OF_HEADER)?;
        let user_token = header(headers, USER_TOKEN_HEADER)?;
        if named.is_none() && user_token.is_none() {
            if headers.contains_key(ON_BEHALF_OF_GROUPS_HEADER) {
                return Err(ApiError::invalid(
                    ON_BEHALF_OF_GROUPS_HEADER,
                    format!("is only meaningful with {ON_BEHALF_OF_HEADER}"),
                ));
            }
            return Ok(caller);
        }
        if !caller.has(Scope::ActAs) {
            return Err(ApiError::MissingScope {
                scope: Scope::ActAs.as_str(),
                method: ON_BEHALF_OF_HEADER.to_owned(),
            });
        }
        let named = named
            .map(|user| {
                caller_principal(user)
                    .map_err(|message| ApiError::invalid(ON_BEHALF_OF_HEADER, message))
            })
            .transpose()?;
        let development = self.is_development();
        let mut expire_time = caller.expire_time;
        let (principal, groups, proof) = match user_token {
            Some(token) => {
                let user = self.verify_user_token(token).await?;
                // The call (a watch stream, say) lasts no longer than either credential.
                expire_time = match (expire_time, user.expire_time) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(named) = named.as_ref().filter(|named| **named != user.principal) {
                    return Err(ApiError::ActAsNotAllowed(format!(
                        "{USER_TOKEN_HEADER} is a token of {}, not of {named}",
                        user.principal
                    )));
                }
                (user.principal, user.groups, IdentityProof::UserToken)
            }
            None => {
                let Some(named) = named else {
                    return Err(ApiError::invalid(ON_BEHALF_OF_HEADER, "is required"));
                };
                // Groups the acting service asserts are believed only in local development.
                let groups = if development {
                    header(headers, ON_BEHALF_OF_GROUPS_HEADER)?
                        .map(parse_groups)
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                (named, groups, IdentityProof::Asserted)
            }
        };
        if principal.kind() != PrincipalKind::User {
            return Err(ApiError::ActAsNotAllowed(format!(
                "{} cannot act as {principal}: only user: principals can be acted for",
                caller.principal
            )));
        }
        if !development && !act_as.allows(&principal) {
            return Err(ApiError::ActAsNotAllowed(format!(
                "{} may not act for {principal}: it is not in the credential's act_as list",
                caller.principal
            )));
        }
        Ok(Caller {
            principal,
            groups,
            acting_principal: Some(caller.principal),
            scopes: caller.scopes,
            projects: caller.projects,
            proof,
            expire_time,
        })
    }

    /// A user's own token, forwarded by the service acting for them: verified as any JWT
    /// (signature, issuer, audience, time).
    async fn verify_user_token(&self, token: &str) -> Result<Caller, ApiError> {
        let Mode::Configured { jwt: Some(jwt), .. } = &self.mode else {
            return Err(ApiError::CredentialsInvalid(format!(
                "{USER_TOKEN_HEADER} needs [auth.jwt] to be configured: the server has no keys to verify it"
            )));
        };
        jwt.verify(token)
            .await
            .map(|authenticated| authenticated.caller)
            .map_err(|err| match err {
                ApiError::CredentialsInvalid(message) => {
                    ApiError::CredentialsInvalid(format!("{USER_TOKEN_HEADER}: {message}"))
                }
                other => other,
            })
    }
}

/// `[auth.groups]` turned around: each member's groups.
fn group_members(config: &AuthConfig) -> Result<HashMap<Principal, Vec<String>>, String> {
    let mut members: HashMap<Principal, Vec<String>> = HashMap::new();
    for (group, principals) in &config.groups {
        let bare = group.strip_prefix("group:").unwrap_or(group);
        if bare.is_empty() || bare.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(format!("{group:?} is not a group name"));
        }
        for member in principals {
            let principal = caller_principal(member).map_err(|m| format!("{group}: {m}"))?;
            let groups = members.entry(principal).or_default();
            groups.push(bare.to_owned());
            groups.sort();
            groups.dedup();
        }
    }
    Ok(members)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::invalid(name, "is not valid ASCII")),
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = header(headers, AUTHORIZATION_HEADER)?.ok_or_else(|| {
        ApiError::CredentialsMissing(
            "no credentials: send `authorization: Bearer <API key or JWT>`".to_owned(),
        )
    })?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::CredentialsInvalid(
            "the authorization metadata must be `Bearer <API key or JWT>`".to_owned(),
        ));
    }
    Ok(token)
}

/// Local development: the caller names itself and holds every scope.
fn development_caller(headers: &HeaderMap) -> Result<Authenticated, ApiError> {
    let principal = match headers.get(ACTOR_HEADER).map(|v| v.to_str()) {
        None => {
            return Err(ApiError::Unauthenticated(format!(
                "no caller identity: set the {ACTOR_HEADER} metadata (e.g. user:alice)"
            )));
        }
        Some(Err(_)) => {
            return Err(ApiError::Unauthenticated(format!(
                "{ACTOR_HEADER} is not valid ASCII"
            )));
        }
        Some(Ok(value)) => value.trim(),
    };
    let groups = match headers.get(GROUPS_HEADER).map(|v| v.to_str()) {
        None => Vec::new(),
        Some(Err(_)) => {
            return Err(ApiError::Unauthenticated(format!(
                "{GROUPS_HEADER} is not valid ASCII"
            )));
        }
        Some(Ok(value)) => parse_groups(value),
    };
    let principal = caller_principal(principal).map_err(|_| {
        ApiError::Unauthenticated(format!(
            "{ACTOR_HEADER} {principal:?} is not a caller principal: expected user:NAME or service:NAME"
        ))
    })?;
    Ok(Authenticated {
        caller: Caller {
            principal,
            groups,
            scopes: Scope::ALL.to_vec(),
            projects: None,
            acting_principal: None,
            proof: IdentityProof::Development,
            expire_time: None,
        },
        act_as: ActAsList::default(),
    })
}

/// A principal that can call: `user:NAME` or `service:NAME`.
pub fn caller_principal(text: &str) -> Result<Principal, String> {
    let principal = Principal::parse(text)?;
    match principal.kind() {
        PrincipalKind::User | PrincipalKind::Service => Ok(principal),
        _ => Err(format!(
            "{text:?} cannot call: a caller is user:NAME or service:NAME"
        )),
    }
}

/// Checks the `[auth]` section; the error names the key.
pub fn validate_config(config: &AuthConfig) -> Result<(), (String, String)> {
    let mut digests: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, key) in config.api_keys.iter().enumerate() {
        let name = |field: &str| format!("auth.api_keys[{i}].{field}");
        caller_principal(&key.principal).map_err(|m| (name("principal"), m))?;
        if key.scopes.is_empty() {
            return Err((name("scopes"), "must name at least one scope".to_owned()));
        }
        for scope in &key.scopes {
            if Scope::parse(scope).is_none() {
                return Err((name("scopes"), unknown_scope(scope)));
            }
        }
        parse_projects(&key.projects).map_err(|m| (name("projects"), m))?;
        let act_as = ActAsList::parse(&key.act_as).map_err(|m| (name("act_as"), m))?;
        let acts = key.scopes.iter().any(|s| s == Scope::ActAs.as_str());
        if acts && act_as == ActAsList::default() {
            return Err((
                name("act_as"),
                "is required with approvals:act_as: the users the key may act for (user:NAME, or user:* for every user)".to_owned(),
            ));
        }
        if !acts && !key.act_as.is_empty() {
            return Err((
                name("act_as"),
                "needs the approvals:act_as scope".to_owned(),
            ));
        }
        let digest = api_keys::parse_digest(&key.sha256).map_err(|m| (name("sha256"), m))?;
        if let Some(first) = digests.insert(digest, i) {
            return Err((
                name("sha256"),
                format!("is the digest of auth.api_keys[{first}] too: every key must be distinct"),
            ));
        }
    }
    group_members(config).map_err(|m| ("auth.groups".to_owned(), m))?;
    if let Some(jwt) = &config.jwt {
        if jwt.issuer.trim().is_empty() {
            return Err(("auth.jwt.issuer".into(), "is required".into()));
        }
        if jwt.audience.trim().is_empty() {
            return Err(("auth.jwt.audience".into(), "is required".into()));
        }
        match (&jwt.jwks_file, &jwt.jwks_url) {
            (Some(_), Some(_)) => {
                return Err((
                    "auth.jwt.jwks_url".into(),
                    "set jwks_file or jwks_url, not both".into(),
                ));
            }
            (None, None) => {
                return Err((
                    "auth.jwt.jwks_file".into(),
                    "set jwks_file or jwks_url".into(),
                ));
            }
            _ => {}
        }
        if !matches!(jwt.principal_prefix.as_str(), "user:" | "service:") {
            return Err((
                "auth.jwt.principal_prefix".into(),
                "must be \"user:\" or \"service:\"".into(),
            ));
        }
        if let Some(url) = &jwt.jwks_url {
            jwt::check_jwks_url(url).map_err(|m| ("auth.jwt.jwks_url".to_owned(), m))?;
        }
        for (key, value) in [
            ("jwks_refresh_interval", jwt.jwks_refresh_interval),
            ("jwks_max_age", jwt.jwks_max_age),
        ] {
            if value.is_zero() {
                return Err((format!("auth.jwt.{key}"), "must be positive".into()));
            }
        }
        if jwt.jwks_max_age < jwt.jwks_refresh_interval {
            return Err((
                "auth.jwt.jwks_max_age".into(),
                "must be at least auth.jwt.jwks_refresh_interval".into(),
            ));
        }
    }
    Ok(())
}

fn unknown_scope(scope: &str) -> String {
    let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
    format!("unknown scope {scope:?}; known: {}", known.join(", "))
}

/// Parses a comma-separated list of scopes (the key generation command).
pub fn parse_scopes(list: &[String]) -> Result<Vec<Scope>, String> {
    list.iter()
        .map(|s| Scope::parse(s.trim()).ok_or_else(|| unknown_scope(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.grants(Scope::Write));
        assert!(Scope::Admin.grants(Scope::Read));
        assert!(Scope::Write.grants(Scope::Read));
        assert!(!Scope::Read.grants(Scope::Write));
        assert!(!Scope::Write.grants(Scope::Admin));
        for other in [Scope::Read, Scope::Write, Scope::Admin, Scope::Bypass] {
            assert!(!Scope::ActAs.grants(other));
        }
        for other in [Scope::Read, Scope::Write, Scope::Admin, Scope::ActAs] {
            assert!(!Scope::Bypass.grants(other));
            assert!(!Scope::Admin.grants(Scope::ActAs) && !Scope::Admin.grants(Scope::Bypass));
        }
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
    }
}
