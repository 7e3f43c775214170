//! Authentication and scopes, for every call but health and reflection: the transport's stack
//! asks [`Authenticator::admit`]. It authenticates the caller (API key, JWT, a TLS client
//! certificate, or in local development the `x-approvals-actor` metadata), applies on-behalf-of, checks the method's
//! scope in ONE table, and puts the [`Caller`] into the request's extensions, where handlers
//! find it through [`caller`].

pub mod api_keys;
mod client_certs;
mod jwt;
pub mod methods;

mod authenticator;
mod caller;
mod validate;

use self::{api_keys::ApiKeys, jwt::JwtVerifier};
pub use self::{
    authenticator::{AuthSetupError, Authenticator},
    caller::{
        ACTOR_HEADER, ActAsList, AuthMethod, Authenticated, Caller, GROUPS_HEADER, actor, caller,
        caller_principal, parse_groups, parse_projects,
    },
    validate::{parse_scopes, validate_config},
};
pub use crate::config::auth::{ApiKeyConfig, AuthConfig, ClientCertConfig, JwtConfig};

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
    /// The relays' own state (`approvals.v1.RelayState`); includes nothing else, and no other
    /// scope includes it.
    Relay,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Read,
        Scope::Write,
        Scope::Admin,
        Scope::ActAs,
        Scope::Bypass,
        Scope::Relay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "approvals:read",
            Scope::Write => "approvals:write",
            Scope::Admin => "approvals:admin",
            Scope::ActAs => "approvals:act_as",
            Scope::Bypass => "approvals:bypass",
            Scope::Relay => "approvals:relay",
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
        for other in [Scope::Read, Scope::Write, Scope::Admin] {
            assert!(!Scope::Relay.grants(other) && !other.grants(Scope::Relay));
        }
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
    }
}
