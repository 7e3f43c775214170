//! `approvals config check`: the effective configuration (file, environment and flags merged
//! and validated) as TOML, with secrets redacted, so an operator sees what the server would run
//! with before starting it. It is `toml::to_string` of the configuration itself, so every key
//! is shown, in the order of the definition.
//!
//! URLs are redacted by the store's [`redact_url`], the one redactor, which the store's own
//! error messages use too.

use approvals_store::redact_url;

use crate::config::Config;

pub const REDACTED: &str = "<redacted>";

/// The effective configuration as a TOML document, secrets redacted: passwords (and queries) in
/// URLs, and the API keys' digests.
pub fn render(config: &Config) -> String {
    let mut shown = config.clone();
    shown.database.url = redact_url(&shown.database.url);
    shown.telemetry.otlp_endpoint = redact_url(&shown.telemetry.otlp_endpoint);
    for key in &mut shown.auth.api_keys {
        key.sha256 = REDACTED.to_owned();
    }
    if let Some(url) = shown
        .auth
        .jwt
        .as_mut()
        .and_then(|jwt| jwt.jwks_url.as_mut())
    {
        *url = redact_url(url);
    }
    toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/approvals"),
            "postgres://app:<redacted>@db:5432/approvals"
        );
        assert_eq!(
            redact_url("postgres://app@db/approvals?password=x"),
            "postgres://app@db/approvals?<redacted>"
        );
        assert_eq!(redact_url("sqlite://approvals.db"), "sqlite://approvals.db");
    }

    #[test]
    fn every_secret_is_redacted() {
        let mut config = Config::default();
        config.database.url = "postgres://app:db-secret@db/approvals".into();
        config.telemetry.otlp_endpoint = "http://otel:otlp-secret@collector:4317".into();
        config
            .auth
            .api_keys
            .push(crate::config::auth::ApiKeyConfig {
                principal: "service:flags".into(),
                scopes: vec!["approvals:read".into()],
                projects: vec!["*".into()],
                sha256: "digest-secret".into(),
                ..Default::default()
            });
        config.auth.jwt = Some(crate::config::auth::JwtConfig {
            jwks_url: Some("https://id:jwks-secret@id.example.com/jwks.json".into()),
            ..Default::default()
        });
        let text = render(&config);
        assert!(!text.contains("secret"), "{text}");
        let parsed: Config = toml::from_str(&text).expect("loads back");
        assert_eq!(parsed.auth.api_keys[0].sha256, REDACTED);
        assert_eq!(parsed.auth.api_keys[0].principal, "service:flags");
    }

    #[test]
    fn the_rendered_configuration_loads_back() {
        let mut config = Config::default();
        let text = render(&config);
        let parsed: Config = toml::from_str(&text).expect("renders valid config");
        assert_eq!(parsed, config);
        config.apply.allowed_endpoints =
            crate::config::allowed_endpoints::AllowedEndpoints::insecure(&["http://127.0.0.1"])
                .and_then(|list| list.with("https://*.internal:8443", Default::default()))
                .expect("entries");
        let parsed: Config = toml::from_str(&render(&config)).expect("renders valid config");
        assert_eq!(parsed, config);
        assert_eq!(
            parsed.apply.allowed_endpoints.entries(),
            ["http://127.0.0.1", "https://*.internal:8443"]
        );
    }
}

#[cfg(test)]
mod completeness {
    use super::*;

    /// Every key an environment variable can set is shown, `[auth.jwt]`'s optional ones
    /// included when they are set.
    #[test]
    fn every_configurable_key_is_rendered() {
        let mut config = Config::default();
        config.auth.jwt = Some(crate::config::auth::JwtConfig {
            jwks_file: Some("/etc/jwks.json".into()),
            jwks_url: Some("https://id.example.com/jwks.json".into()),
            ..Default::default()
        });
        let rendered: toml::Table = toml::from_str(&render(&config)).expect("valid TOML");
        for key in crate::config::key_paths() {
            let mut node: Option<&toml::Value> = None;
            let mut table = Some(&rendered);
            for part in key.split('.') {
                node = table.and_then(|t| t.get(part));
                table = node.and_then(toml::Value::as_table);
            }
            assert!(node.is_some(), "{key} is missing from `config check`");
        }
    }
}
