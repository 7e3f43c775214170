//! The [`Authenticator`]: from a call's metadata to its [`Caller`] (API key, JWT, or the
//! development metadata), on-behalf-of included, and the method's scope checked.

use std::{collections::HashMap, sync::Arc};

use approvals_domain::{IdentityProof, Principal, PrincipalKind};
use http::HeaderMap;
use tonic::Status;

use super::client_certs::ClientCerts;
use super::{
    ACTOR_HEADER, AUTHORIZATION_HEADER, ActAsList, ApiKeys, AuthConfig, AuthMethod, Authenticated,
    Caller, GROUPS_HEADER, JwtVerifier, ON_BEHALF_OF_GROUPS_HEADER, ON_BEHALF_OF_HEADER, Scope,
    USER_TOKEN_HEADER, caller_principal, jwt, methods, parse_groups,
};
use crate::{
    error::ApiError,
    tls::{ConnectionInfo, PeerCertificates},
};

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
        client_certs: ClientCerts,
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
    #[error("auth.client_certs{0}")]
    ClientCerts(String),
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
        let client_certs =
            ClientCerts::new(&config.client_certs).map_err(AuthSetupError::ClientCerts)?;
        let jwt = match &config.jwt {
            Some(jwt) => Some(Box::new(
                JwtVerifier::start(jwt).await.map_err(AuthSetupError::Jwt)?,
            )),
            None => None,
        };
        Ok(Self {
            mode: Mode::Configured {
                api_keys,
                client_certs,
                jwt,
            },
            configured_groups,
        })
    }

    pub fn is_development(&self) -> bool {
        matches!(self.mode, Mode::Development)
    }

    /// What the transport's stack asks of every call (see the module documentation): puts its
    /// [`Caller`] into the request's extensions, or says which status refuses it.
    pub async fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let certificate = request
            .extensions()
            .get::<ConnectionInfo>()
            .and_then(|info| info.peer_certificates.clone());
        let caller = self
            .authorize_with(
                request.uri().path(),
                request.headers(),
                certificate.as_ref(),
            )
            .await?;
        if let Some(caller) = caller {
            let span = tracing::Span::current();
            span.record("enduser.id", caller.principal.as_str());
            span.record(
                "auth.method",
                super::caller::auth_method_name(caller.method),
            );
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
        self.authorize_with(path, headers, None).await
    }

    /// [`Authenticator::authorize`] for a connection that presented the verified client
    /// certificate chain `certificate`.
    pub async fn authorize_with(
        &self,
        path: &str,
        headers: &HeaderMap,
        certificate: Option<&PeerCertificates>,
    ) -> Result<Option<Caller>, ApiError> {
        if methods::is_open(path) {
            return Ok(None);
        }
        let caller = self.authenticate(headers, certificate).await?;
        let Some(method) = methods::method(path) else {
            return Err(ApiError::MethodNotAllowed(path.to_owned()));
        };
        if !method.scopes.iter().any(|scope| caller.has(*scope)) {
            return Err(ApiError::MissingScope {
                scope: method.scopes[0].as_str(),
                method: path.to_owned(),
            });
        }
        if method.all_projects && caller.projects.is_some() {
            return Err(ApiError::AllProjectsRequired {
                method: path.to_owned(),
            });
        }
        Ok(Some(caller))
    }

    /// A bearer credential, when sent, authenticates the call, whether or not the connection
    /// presented a client certificate (the certificate then only admitted the connection);
    /// without one, the client certificate does, through `[[auth.client_certs]]`.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        certificate: Option<&PeerCertificates>,
    ) -> Result<Caller, ApiError> {
        let authenticated = match &self.mode {
            Mode::Development => development_caller(headers)?,
            Mode::Configured {
                api_keys,
                client_certs,
                jwt,
            } => match (
                certificate.and_then(PeerCertificates::leaf),
                headers.contains_key(AUTHORIZATION_HEADER),
            ) {
                (Some(leaf), false) => client_certs.verify(leaf)?,
                _ => {
                    let token = bearer_token(headers)?;
                    match jwt {
                        Some(jwt) if jwt::looks_like_jwt(token) => jwt.verify(token).await?,
                        _ => api_keys.verify(token)?,
                    }
                }
            },
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
            method: caller.method,
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
pub(super) fn group_members(
    config: &AuthConfig,
) -> Result<HashMap<Principal, Vec<String>>, String> {
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
            "no credentials: send `authorization: Bearer <API key or JWT>` (or, over TLS, a client certificate that [[auth.client_certs]] maps)".to_owned(),
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
            method: AuthMethod::Development,
            expire_time: None,
        },
        act_as: ActAsList::default(),
    })
}
