//! Who is calling: the [`Caller`] the authentication layer ([`crate::auth`]) put into the
//! request's extensions. In local development (no `[auth]` configured) the caller names itself
//! with the `x-approvals-actor` metadata (`user:NAME` or `service:NAME`) and its groups with
//! `x-approvals-groups` (comma separated, bare names).

use std::sync::Arc;

use approvals_domain::Actor;
use tonic::Request;

use super::Caller;
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
