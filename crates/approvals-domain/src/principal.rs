use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, FieldViolation};

/// The principal the service acts as for its own work (expiry, schedules, conflict marking).
pub const SYSTEM_PRINCIPAL: &str = "system:approvals";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    User,
    Service,
    Group,
    System,
}

/// A principal string `kind:name`, e.g. `user:alice`, `service:flags`, `group:sre`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    /// Parses `user:NAME`, `service:NAME`, `group:NAME`, `system:NAME` or `policy:NAME`. The
    /// name is 1 to 256 characters with no whitespace or control characters.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((kind, name)) = text.split_once(':') else {
            return Err(format!(
                "{text:?} is not a principal: expected user:NAME, service:NAME or group:NAME"
            ));
        };
        // `policy:NAME` is how a policy's own reviews are recorded (see `crate::rules`); like
        // `system:`, it is read back from the store but can never call or be listed.
        if !matches!(kind, "user" | "service" | "group" | "system" | "policy") {
            return Err(format!(
                "{text:?} has unknown principal kind {kind:?}: expected user, service or group"
            ));
        }
        if name.is_empty() || name.chars().count() > 256 {
            return Err(format!(
                "{text:?}: the name after {kind:?} must be 1 to 256 characters"
            ));
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{text:?}: the name must not contain whitespace"));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn kind(&self) -> PrincipalKind {
        match self.0.split_once(':').map(|(kind, _)| kind) {
            Some("user") => PrincipalKind::User,
            Some("service") => PrincipalKind::Service,
            Some("group") => PrincipalKind::Group,
            _ => PrincipalKind::System,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A principal the service builds itself (`policy:NAME` for a policy's own reviews), never
    /// parsed from a caller's input.
    pub(crate) fn from_trusted(text: String) -> Self {
        Self(text)
    }

    pub fn system() -> Self {
        Self(SYSTEM_PRINCIPAL.to_owned())
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the identity of an actor was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IdentityProof {
    /// Not recorded (reviews and requests written before proofs were recorded).
    #[default]
    Unspecified,
    /// The principal authenticated with its own credential (an API key or a JWT of its own).
    Credential,
    /// A service acted on the principal's behalf and forwarded the principal's own token, which
    /// the server verified.
    UserToken,
    /// A service acted on the principal's behalf without proof: only the acting credential
    /// vouches for the identity.
    Asserted,
    /// Local development: the caller named itself.
    Development,
}

impl IdentityProof {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityProof::Unspecified => "UNSPECIFIED",
            IdentityProof::Credential => "CREDENTIAL",
            IdentityProof::UserToken => "USER_TOKEN",
            IdentityProof::Asserted => "ASSERTED",
            IdentityProof::Development => "DEVELOPMENT",
        }
    }
}

/// How the credential that made a change was presented (an API key, a JWT, a TLS client
/// certificate, or local development), recorded on each event and review. For an on-behalf-of
/// call it is the acting service's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthMethod {
    /// Not recorded: events and reviews written before the method was recorded, and the
    /// service's own work (`system:approvals`).
    #[default]
    Unspecified,
    /// `authorization: Bearer <API key>`.
    ApiKey,
    /// `authorization: Bearer <JWT>`.
    Jwt,
    /// A verified TLS client certificate mapped by `[[auth.client_certs]]`.
    ClientCertificate,
    /// Local development: the caller named itself with `x-approvals-actor`.
    Development,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 5] = [
        AuthMethod::Unspecified,
        AuthMethod::ApiKey,
        AuthMethod::Jwt,
        AuthMethod::ClientCertificate,
        AuthMethod::Development,
    ];

    /// The stored name (`API_KEY`); `None` for [`AuthMethod::Unspecified`], which is stored as
    /// NULL and left out of the audit record.
    pub fn stored(self) -> Option<&'static str> {
        match self {
            AuthMethod::Unspecified => None,
            AuthMethod::ApiKey => Some("API_KEY"),
            AuthMethod::Jwt => Some("JWT"),
            AuthMethod::ClientCertificate => Some("CLIENT_CERTIFICATE"),
            AuthMethod::Development => Some("DEVELOPMENT"),
        }
    }

    /// The inverse of [`AuthMethod::stored`].
    pub fn parse(stored: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.stored() == Some(stored))
    }

    pub fn is_unspecified(&self) -> bool {
        *self == AuthMethod::Unspecified
    }
}

/// Who answers for a decision: the acting credential's principal when it only asserted the
/// identity, else the principal itself. Two approvals with one party are not independent.
pub(crate) fn party<'a>(
    principal: &'a Principal,
    acting_principal: Option<&'a Principal>,
    proof: IdentityProof,
) -> &'a Principal {
    match (proof, acting_principal) {
        (IdentityProof::Asserted, Some(acting)) => acting,
        _ => principal,
    }
}

/// Who performs a command: the principal on whose behalf it is done, the groups that principal
/// holds (bare names), the service that called when it acted on the principal's behalf, and how
/// the principal's identity was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub principal: Principal,
    pub groups: Vec<String>,
    pub acting_principal: Option<Principal>,
    pub proof: IdentityProof,
    /// How the calling credential was presented (unspecified for the service's own work).
    pub auth_method: AuthMethod,
}

impl Actor {
    /// An actor authenticated with its own credential.
    pub fn new(principal: Principal, groups: Vec<String>) -> Self {
        Self {
            principal,
            groups,
            acting_principal: None,
            proof: IdentityProof::Credential,
            auth_method: AuthMethod::Unspecified,
        }
    }

    /// Who answers for this actor's decisions (see [`IdentityProof`]): the acting service when
    /// it only asserted the principal's identity, else the principal.
    pub fn party(&self) -> &Principal {
        party(&self.principal, self.acting_principal.as_ref(), self.proof)
    }

    /// Parses a caller's principal (a user or a service; groups and the system cannot call).
    pub fn caller(principal: &str, groups: Vec<String>) -> Result<Self, DomainError> {
        let parsed = Principal::parse(principal)
            .map_err(|message| DomainError::invalid("actor", message))?;
        match parsed.kind() {
            PrincipalKind::User | PrincipalKind::Service => Ok(Self::new(parsed, groups)),
            _ => Err(DomainError::invalid(
                "actor",
                format!("{principal:?} cannot act: a caller is user:NAME or service:NAME"),
            )),
        }
    }

    pub fn system() -> Self {
        Self::new(Principal::system(), Vec::new())
    }
}

impl From<FieldViolation> for DomainError {
    fn from(violation: FieldViolation) -> Self {
        DomainError::InvalidArgument(vec![violation])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_principals() {
        assert_eq!(
            Principal::parse("user:alice").map(|p| p.kind()),
            Ok(PrincipalKind::User)
        );
        assert_eq!(
            Principal::parse("service:flags").map(|p| p.kind()),
            Ok(PrincipalKind::Service)
        );
        assert_eq!(
            Principal::parse("group:sre").map(|p| p.kind()),
            Ok(PrincipalKind::Group)
        );
        assert!(Principal::parse("alice").is_err());
        assert!(Principal::parse("robot:alice").is_err());
        assert!(Principal::parse("user:").is_err());
        assert!(Principal::parse("user:a b").is_err());
    }

    #[test]
    fn only_users_and_services_call() {
        assert!(Actor::caller("user:alice", vec![]).is_ok());
        assert!(Actor::caller("group:sre", vec![]).is_err());
        assert!(Actor::caller("system:approvals", vec![]).is_err());
    }
}
