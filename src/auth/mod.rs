//! Authentication and scopes: a tower layer in front of every service except health and
//! reflection. It authenticates the caller (API key, JWT, or in local development the
//! `x-approvals-actor` metadata), applies on-behalf-of, checks the method's scope in ONE table,
//! and puts the [`Caller`] into the request's extensions, where handlers find it through
//! [`crate::identity`].

pub mod api_keys;
mod config;
mod jwt;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use approvals_domain::{Actor, DomainError, Principal, PrincipalKind, Timestamp};
use http::HeaderMap;
use tonic::Status;
use tower::{Layer, Service};

pub use self::config::{ApiKeyConfig, AuthConfig, JwtConfig};
use self::{api_keys::ApiKeys, jwt::JwtVerifier};
use crate::{
    error::ApiError,
    identity::{ACTOR_HEADER, GROUPS_HEADER, parse_groups},
};

pub const AUTHORIZATION_HEADER: &str = "authorization";
pub const ON_BEHALF_OF_HEADER: &str = "x-approvals-on-behalf-of";
pub const ON_BEHALF_OF_GROUPS_HEADER: &str = "x-approvals-on-behalf-of-groups";

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

/// The scope each method needs: every RPC of our services is listed (CONTRACT.md "Who may call
/// what"); a method missing here is denied.
const METHOD_SCOPES: &[(&str, Scope)] = &[
    ("/approvals.v1.ChangeRequests/GetChangeRequest", Scope::Read),
    (
        "/approvals.v1.ChangeRequests/ListChangeRequests",
        Scope::Read,
    ),
    (
        "/approvals.v1.ChangeRequests/ListChangeRequestEvents",
        Scope::Read,
    ),
    (
        "/approvals.v1.ChangeRequests/WatchChangeRequests",
        Scope::Read,
    ),
    (
        "/approvals.v1.ChangeRequests/CreateChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/UpdateChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/SubmitChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/ApproveChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/RejectChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/CancelChangeRequest",
        Scope::Write,
    ),
    ("/approvals.v1.ChangeRequests/AddComment", Scope::Write),
    // A bypass (with `approvals:bypass` alone) is decided by the apply handler, which sees the
    // justification; the layer lets such callers through (see `required_scopes`).
    (
        "/approvals.v1.ChangeRequests/ApplyChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/ScheduleChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/UnscheduleChangeRequest",
        Scope::Write,
    ),
    (
        "/approvals.v1.ChangeRequests/CompleteChangeRequest",
        Scope::Write,
    ),
    ("/approvals.v1.Policies/GetPolicy", Scope::Read),
    ("/approvals.v1.Policies/ListPolicies", Scope::Read),
    ("/approvals.v1.Policies/CreatePolicy", Scope::Admin),
    ("/approvals.v1.Policies/UpdatePolicy", Scope::Admin),
    ("/approvals.v1.Policies/DeletePolicy", Scope::Admin),
];

/// Services served without authentication: health checks and reflection.
const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The scopes that let a caller through the layer for `path`: any one of them suffices.
fn required_scopes(path: &str) -> Option<&'static [Scope]> {
    const APPLY: &str = "/approvals.v1.ChangeRequests/ApplyChangeRequest";
    if path == APPLY {
        return Some(&[Scope::Write, Scope::Bypass]);
    }
    METHOD_SCOPES
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, scope)| match scope {
            Scope::Read => &[Scope::Read][..],
            Scope::Write => &[Scope::Write][..],
            Scope::Admin => &[Scope::Admin][..],
            Scope::ActAs => &[Scope::ActAs][..],
            Scope::Bypass => &[Scope::Bypass][..],
        })
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
    /// When the credential expires: a JWT's `exp` claim; `None` for API keys and development
    /// mode, which do not expire. (A JWT is still accepted until `exp` plus `auth.jwt.leeway`.)
    pub expire_time: Option<Timestamp>,
}

impl Caller {
    pub fn has(&self, required: Scope) -> bool {
        self.scopes.iter().any(|held| held.grants(required))
    }

    /// The domain's view of the caller.
    pub fn actor(&self) -> Actor {
        Actor {
            principal: self.principal.clone(),
            groups: self.groups.clone(),
            acting_principal: self.acting_principal.clone(),
        }
    }

    pub fn may_act_in(&self, project: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|projects| projects.iter().any(|p| p == project))
    }

    /// PERMISSION_DENIED (`PROJECT_NOT_ALLOWED`) unless the credential may act in `project`.
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
}

/// How callers are authenticated.
pub struct Authenticator {
    mode: Mode,
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
}

impl Authenticator {
    /// Builds the authenticator; with a JWKS URL or file, loads the keys once and keeps them
    /// refreshed by a background task.
    pub async fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        if !config.is_configured() {
            return Ok(Self {
                mode: Mode::Development,
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
        })
    }

    pub fn is_development(&self) -> bool {
        matches!(self.mode, Mode::Development)
    }

    /// The caller of a call to `path`, or `None` for the open services; an error for a caller
    /// that is not authenticated or lacks the method's scope.
    pub fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
            return Ok(None);
        }
        let caller = self.authenticate(headers)?;
        let Some(required) = required_scopes(path) else {
            return Err(ApiError::MethodNotAllowed(path.to_owned()));
        };
        if !required.iter().any(|scope| caller.has(*scope)) {
            return Err(ApiError::MissingScope {
                scope: required[0].as_str(),
                method: path.to_owned(),
            });
        }
        Ok(Some(caller))
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = match &self.mode {
            Mode::Development => development_caller(headers)?,
            Mode::Configured { api_keys, jwt } => {
                let token = bearer_token(headers)?;
                match jwt {
                    Some(jwt) if jwt::looks_like_jwt(token) => jwt.verify(token)?,
                    _ => api_keys.verify(token)?,
                }
            }
        };
        on_behalf_of(caller, headers)
    }
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
fn development_caller(headers: &HeaderMap) -> Result<Caller, ApiError> {
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
    Ok(Caller {
        principal,
        groups,
        scopes: Scope::ALL.to_vec(),
        projects: None,
        acting_principal: None,
        expire_time: None,
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

/// With `x-approvals-on-behalf-of`, the call is made as that user by a caller holding
/// `approvals:act_as`; the caller is kept as the acting principal.
fn on_behalf_of(caller: Caller, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(user) = header(headers, ON_BEHALF_OF_HEADER)? else {
        if headers.contains_key(ON_BEHALF_OF_GROUPS_HEADER) {
            return Err(ApiError::invalid(
                ON_BEHALF_OF_GROUPS_HEADER,
                format!("is only meaningful with {ON_BEHALF_OF_HEADER}"),
            ));
        }
        return Ok(caller);
    };
    if !caller.has(Scope::ActAs) {
        return Err(ApiError::MissingScope {
            scope: Scope::ActAs.as_str(),
            method: ON_BEHALF_OF_HEADER.to_owned(),
        });
    }
    let principal = caller_principal(user)
        .map_err(|message| ApiError::invalid(ON_BEHALF_OF_HEADER, message))?;
    let groups = header(headers, ON_BEHALF_OF_GROUPS_HEADER)?
        .map(parse_groups)
        .unwrap_or_default();
    Ok(Caller {
        principal,
        groups,
        acting_principal: Some(caller.principal),
        scopes: caller.scopes,
        projects: caller.projects,
        expire_time: caller.expire_time,
    })
}

/// The tower layer that authenticates every call (see the module documentation).
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self
            .authenticator
            .authorize(request.uri().path(), request.headers())
        {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(Arc::new(caller));
                }
                Box::pin(self.inner.call(request))
            }
            Err(err) => {
                let status: Status = err.into();
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Checks the `[auth]` section; the error names the key.
pub fn validate_config(config: &AuthConfig) -> Result<(), (String, String)> {
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
        api_keys::parse_digest(&key.sha256).map_err(|m| (name("sha256"), m))?;
    }
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
        if jwt.jwks_refresh_interval.is_zero() {
            return Err((
                "auth.jwt.jwks_refresh_interval".into(),
                "must be positive".into(),
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

    #[test]
    fn every_method_is_in_the_table_and_unknown_ones_are_not() {
        let protos = [
            include_str!("../../proto/approvals/v1/change_requests.proto"),
            include_str!("../../proto/approvals/v1/policies.proto"),
        ];
        for (proto, service) in protos.iter().zip(["ChangeRequests", "Policies"]) {
            for line in proto.lines() {
                if let Some(rest) = line.trim().strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap_or_default().trim();
                    let path = format!("/approvals.v1.{service}/{method}");
                    assert!(required_scopes(&path).is_some(), "{path} has no scope");
                }
            }
        }
        assert!(required_scopes("/approvals.v1.ChangeRequests/DropEverything").is_none());
    }
}
