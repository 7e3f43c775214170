//! Who is calling: the [`Caller`] the authentication layer put into the request's extensions
//! (found by handlers through [`caller`]), what a credential proved ([`Authenticated`]), and
//! whom it may act for ([`ActAsList`]). In local development (no `[auth]` configured) the caller
//! names itself with the `x-approvals-actor` metadata (`user:NAME` or `service:NAME`) and its
//! groups with `x-approvals-groups` (comma separated, bare names).

use std::sync::Arc;

use approvals_domain::{
    Actor, ChangeRequest, DomainError, IdentityProof, Policy, Principal, PrincipalKind, Timestamp,
};
use tonic::Request;

use super::Scope;
use crate::error::ApiError;

pub const ACTOR_HEADER: &str = "x-approvals-actor";
pub const GROUPS_HEADER: &str = "x-approvals-groups";

/// The authenticated caller of this request.
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Caller>, ApiError> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| {
            ApiError::Unauthenticated(format!(
                "no caller identity: set the {ACTOR_HEADER} metadata (e.g. user:alice)"
            ))
        })
}

/// The domain's view of the caller: on whose behalf the call is made, their groups, and the
/// acting service for an on-behalf-of call. (Handlers that also check projects or scopes use
/// [`caller`].)
#[allow(dead_code)]
pub fn actor<T>(request: &Request<T>) -> Result<Actor, ApiError> {
    caller(request).map(|c| c.actor())
}

/// `sre, dba` -> `["sre", "dba"]`; a `group:` prefix is accepted and dropped. A name with a
/// control character (a token's claim, say) is no group a policy can name: it is dropped, so
/// that it is never stored.
pub fn parse_groups(value: &str) -> Vec<String> {
    let mut groups: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty() && !g.chars().any(char::is_control))
        .map(|g| g.strip_prefix("group:").unwrap_or(g).to_owned())
        .collect();
    groups.sort();
    groups.dedup();
    groups
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
    /// How the credential that authenticated the call was presented (for an on-behalf-of
    /// call, the acting service's).
    pub method: AuthMethod,
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
            auth_method: self.method,
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

/// How a caller authenticated: recorded on the call's span (`auth.method`), in the logs, and
/// (through [`Caller::actor`]) on each event and review the call makes. The domain's enum, so
/// that the store keeps it; [`auth_method_name`] names it on the span.
pub use approvals_domain::AuthMethod;

/// The name of `method` on the call's span and in the logs (`api_key`).
pub fn auth_method_name(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::Unspecified => "unspecified",
        AuthMethod::ApiKey => "api_key",
        AuthMethod::Jwt => "jwt",
        AuthMethod::ClientCertificate => "client_certificate",
        AuthMethod::Development => "development",
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

#[cfg(test)]
mod tests {
    use super::parse_groups;

    #[test]
    fn groups_are_bare_sorted_and_unique() {
        assert_eq!(parse_groups(" sre, dba ,,group:sre"), vec!["dba", "sre"]);
        assert_eq!(parse_groups("sre,bad\u{0}group"), vec!["sre"]);
        assert!(parse_groups("").is_empty());
    }
}
