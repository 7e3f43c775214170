//! Who is calling. Until authentication is configured, the caller names itself with the
//! `x-approvals-actor` metadata (`user:NAME` or `service:NAME`) and its groups with
//! `x-approvals-groups` (comma separated, bare names).

use approvals_domain::Actor;
use tonic::Request;

use crate::error::ApiError;

pub const ACTOR_HEADER: &str = "x-approvals-actor";
pub const GROUPS_HEADER: &str = "x-approvals-groups";

pub fn actor<T>(request: &Request<T>) -> Result<Actor, ApiError> {
    let metadata = request.metadata();
    let principal = match metadata.get(ACTOR_HEADER).map(|v| v.to_str()) {
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
    let groups = match metadata.get(GROUPS_HEADER).map(|v| v.to_str()) {
        None => Vec::new(),
        Some(Err(_)) => {
            return Err(ApiError::Unauthenticated(format!(
                "{GROUPS_HEADER} is not valid ASCII"
            )));
        }
        Some(Ok(value)) => parse_groups(value),
    };
    Actor::caller(principal, groups)
        .map_err(|_| ApiError::Unauthenticated(format!(
            "{ACTOR_HEADER} {principal:?} is not a caller principal: expected user:NAME or service:NAME"
        )))
}

/// `sre, dba` -> `["sre", "dba"]`; a `group:` prefix is accepted and dropped.
pub fn parse_groups(value: &str) -> Vec<String> {
    let mut groups: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
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
        assert!(parse_groups("").is_empty());
    }
}
