//! Checks of the `[auth]` section beyond its types (digests, scopes, projects, act_as, JWT),
//! each error naming its key.

use std::collections::HashMap;

use super::{
    ActAsList, AuthConfig, Scope, api_keys, authenticator::group_members, caller_principal,
    client_certs, jwt, parse_projects,
};

/// Checks the `[auth]` section; the error names the key.
pub fn validate_config(config: &AuthConfig) -> Result<(), (String, String)> {
    let mut digests: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, key) in config.api_keys.iter().enumerate() {
        let name = |field: &str| format!("auth.api_keys[{i}].{field}");
        validate_holder(
            &key.principal,
            &key.scopes,
            &key.projects,
            &key.act_as,
            &name,
        )?;
        let digest = api_keys::parse_digest(&key.sha256).map_err(|m| (name("sha256"), m))?;
        if let Some(first) = digests.insert(digest, i) {
            return Err((
                name("sha256"),
                format!("is the digest of auth.api_keys[{first}] too: every key must be distinct"),
            ));
        }
    }
    let mut matchers: HashMap<(&str, String), usize> = HashMap::new();
    for (i, entry) in config.client_certs.iter().enumerate() {
        let name = |field: &str| format!("auth.client_certs[{i}].{field}");
        let (field, value) = client_certs::matcher_of(entry).map_err(|m| (name("uri_san"), m))?;
        if let Some(first) = matchers.insert((field, value.to_ascii_lowercase()), i) {
            return Err((
                name(field),
                format!(
                    "matches what auth.client_certs[{first}] matches: every entry must match other certificates"
                ),
            ));
        }
        validate_holder(
            &entry.principal,
            &entry.scopes,
            &entry.projects,
            &entry.act_as,
            &name,
        )?;
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

/// The rules an API key's and a client certificate's entry share; `name` makes a field's key.
fn validate_holder(
    principal: &str,
    scopes: &[String],
    projects: &[String],
    act_as: &[String],
    name: &dyn Fn(&str) -> String,
) -> Result<(), (String, String)> {
    caller_principal(principal).map_err(|m| (name("principal"), m))?;
    if scopes.is_empty() {
        return Err((name("scopes"), "must name at least one scope".to_owned()));
    }
    for scope in scopes {
        if Scope::parse(scope).is_none() {
            return Err((name("scopes"), unknown_scope(scope)));
        }
    }
    parse_projects(projects).map_err(|m| (name("projects"), m))?;
    let list = ActAsList::parse(act_as).map_err(|m| (name("act_as"), m))?;
    let acts = scopes.iter().any(|s| s == Scope::ActAs.as_str());
    if acts && list == ActAsList::default() {
        return Err((
            name("act_as"),
            "is required with approvals:act_as: the users the holder may act for (user:NAME, or user:* for every user)".to_owned(),
        ));
    }
    if !acts && !act_as.is_empty() {
        return Err((
            name("act_as"),
            "needs the approvals:act_as scope".to_owned(),
        ));
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
