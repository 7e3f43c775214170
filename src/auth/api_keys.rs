//! API keys: `authorization: Bearer <key>`. The configuration holds only each key's SHA-256
//! digest; a presented key is hashed and compared with every digest in constant time.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use approvals_domain::IdentityProof;

use super::caller::parse_groups;
use super::{
    ActAsList, ApiKeyConfig, AuthMethod, Authenticated, Caller, Scope, caller_principal,
    parse_projects,
};
use crate::error::ApiError;

/// Every generated key starts with this, so a leaked key is recognisable (secret scanners).
pub const KEY_PREFIX: &str = "apv1_";

struct ApiKey {
    digest: [u8; 32],
    holder: Authenticated,
}

pub struct ApiKeys(Vec<ApiKey>);

/// `sha256` from the configuration: 64 hex digits.
pub fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("must be the 64 hex digits of the key's SHA-256 digest".to_owned());
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| "is not hexadecimal".to_owned())?;
    }
    Ok(digest)
}

pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ApiKeys {
    pub fn new(configs: &[ApiKeyConfig]) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(configs.len());
        for (i, config) in configs.iter().enumerate() {
            let holder = holder(
                &Holder {
                    principal: &config.principal,
                    groups: &config.groups,
                    scopes: &config.scopes,
                    projects: &config.projects,
                    act_as: &config.act_as,
                },
                AuthMethod::ApiKey,
            )
            .map_err(|(field, m)| format!("[{i}].{field}: {m}"))?;
            let digest = parse_digest(&config.sha256).map_err(|m| format!("[{i}].sha256: {m}"))?;
            if let Some(first) = keys.iter().position(|k: &ApiKey| k.digest == digest) {
                return Err(format!(
                    "[{i}].sha256: is the digest of [{first}] too: every key must be distinct"
                ));
            }
            keys.push(ApiKey { digest, holder });
        }
        Ok(Self(keys))
    }

    /// The caller a key belongs to. Every configured digest is compared, in constant time, so
    /// the time taken does not tell which (or whether a) digest matched.
    pub fn verify(&self, key: &str) -> Result<Authenticated, ApiError> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: Option<&ApiKey> = None;
        for candidate in &self.0 {
            let equal: Choice = candidate.digest.ct_eq(&presented);
            if bool::from(equal) {
                found = Some(candidate);
            }
        }
        found.map(|k| k.holder.clone()).ok_or_else(|| {
            ApiError::CredentialsInvalid("the API key is not known to this server".to_owned())
        })
    }
}

/// Who a credential entry says its holder is: the fields an API key and a client certificate
/// entry share.
pub(super) struct Holder<'a> {
    pub principal: &'a str,
    pub groups: &'a [String],
    pub scopes: &'a [String],
    pub projects: &'a [String],
    pub act_as: &'a [String],
}

/// The caller an entry describes; an error names the field.
pub(super) fn holder(
    entry: &Holder<'_>,
    method: AuthMethod,
) -> Result<Authenticated, (&'static str, String)> {
    let principal = caller_principal(entry.principal).map_err(|m| ("principal", m))?;
    let scopes = super::parse_scopes(entry.scopes).map_err(|m| ("scopes", m))?;
    let projects = parse_projects(entry.projects).map_err(|m| ("projects", m))?;
    let act_as = ActAsList::parse(entry.act_as).map_err(|m| ("act_as", m))?;
    Ok(Authenticated {
        caller: Caller {
            principal,
            groups: parse_groups(&entry.groups.join(",")),
            scopes,
            projects,
            acting_principal: None,
            proof: IdentityProof::Credential,
            method,
            expire_time: None,
        },
        act_as,
    })
}

/// A new random key (256 bits) and its configuration entry.
pub fn generate(
    principal: &str,
    scopes: &[String],
    groups: &[String],
    projects: &[String],
    act_as: &[String],
) -> Result<(String, String), String> {
    caller_principal(principal)?;
    let scopes: Vec<Scope> = super::parse_scopes(scopes)?;
    if scopes.is_empty() {
        return Err("name at least one scope".to_owned());
    }
    // No projects named: every project, said explicitly in the entry.
    let every_project = ["*".to_owned()];
    let projects = if projects.is_empty() {
        &every_project[..]
    } else {
        projects
    };
    parse_projects(projects).map_err(|m| format!("--projects: {m}"))?;
    ActAsList::parse(act_as).map_err(|m| format!("--act-as: {m}"))?;
    if scopes.contains(&Scope::ActAs) && act_as.is_empty() {
        return Err(
            "--act-as is required with approvals:act_as: the users the key may act for (user:NAME, or user:* for every user)"
                .to_owned(),
        );
    }
    if !scopes.contains(&Scope::ActAs) && !act_as.is_empty() {
        return Err("--act-as needs the approvals:act_as scope".to_owned());
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{:?}", i.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let scope_names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let groups: Vec<String> = groups
        .iter()
        .map(|g| {
            g.trim()
                .strip_prefix("group:")
                .unwrap_or(g.trim())
                .to_owned()
        })
        .collect();
    let mut entry = format!(
        "[[auth.api_keys]]\nprincipal = {principal:?}\ngroups = [{}]\nscopes = [{}]\nprojects = [{}]\nsha256 = \"{}\"\n",
        list(&groups),
        list(&scope_names),
        list(projects),
        digest_hex(&key),
    );
    if !act_as.is_empty() {
        entry.push_str(&format!("act_as = [{}]\n", list(act_as)));
    }
    Ok((key, entry))
}

/// What `approvals keys generate` prints: the key (shown once) and the config entry.
pub fn announce(key: &str, entry: &str) -> String {
    format!(
        "# The API key, shown only now; give it to the caller as a secret:\n\
         # authorization: Bearer {key}\n{key}\n\n\
         # Add this entry to the server's config file:\n{entry}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_verify_and_others_do_not() {
        let (key, entry) = generate(
            "service:flags",
            &["approvals:write".into()],
            &["sre".into()],
            &["web".into()],
            &[],
        )
        .expect("generates");
        assert!(key.starts_with(KEY_PREFIX));
        let config: crate::config::Config = toml::from_str(&entry).expect("entry is TOML");
        let keys = ApiKeys::new(&config.auth.api_keys).expect("valid");
        let caller = keys.verify(&key).expect("known key").caller;
        assert_eq!(caller.principal.as_str(), "service:flags");
        assert_eq!(caller.groups, vec!["sre"]);
        assert_eq!(caller.scopes, vec![Scope::Write]);
        assert_eq!(caller.projects, Some(vec!["web".to_owned()]));
        assert!(keys.verify("apv1_not-a-key").is_err());
        assert!(
            !entry.contains(&key),
            "the key itself is never in the entry"
        );
    }

    #[test]
    fn digests_must_be_hex() {
        assert!(parse_digest(&"ab".repeat(32)).is_ok());
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"zz".repeat(32)).is_err());
    }
}
