//! `approvals config check`: the effective configuration (file, environment and flags merged
//! and validated) as TOML, with secrets redacted, so an operator sees what the server would run
//! with before starting it.

use std::time::Duration;

use toml::{Table, Value};

use crate::config::Config;

pub const REDACTED: &str = "<redacted>";

/// The effective configuration as a TOML document, secrets redacted.
pub fn render(config: &Config) -> String {
    let mut root = Table::new();
    root.insert("listen".into(), config.listen.clone().into());
    root.insert(
        "min_approvals".into(),
        i64::from(config.min_approvals).into(),
    );

    let d = &config.database;
    let mut database = Table::new();
    database.insert("url".into(), redact_url(&d.url).into());
    database.insert(
        "max_connections".into(),
        i64::from(d.max_connections).into(),
    );
    database.insert("acquire_timeout".into(), duration(d.acquire_timeout));
    database.insert("statement_timeout".into(), duration(d.statement_timeout));
    database.insert("health_interval".into(), duration(d.health_interval));
    root.insert("database".into(), database.into());

    let l = &config.limits;
    let mut limits = Table::new();
    limits.insert("request_timeout".into(), duration(l.request_timeout));
    limits.insert("max_message_bytes".into(), count(l.max_message_bytes));
    limits.insert("shutdown_grace".into(), duration(l.shutdown_grace));
    limits.insert("keepalive_interval".into(), duration(l.keepalive_interval));
    limits.insert("keepalive_timeout".into(), duration(l.keepalive_timeout));
    limits.insert(
        "max_concurrent_requests".into(),
        count(l.max_concurrent_requests),
    );
    limits.insert(
        "rate_limit_per_second".into(),
        i64::from(l.rate_limit_per_second).into(),
    );
    limits.insert(
        "rate_limit_burst".into(),
        i64::from(l.rate_limit_burst).into(),
    );
    limits.insert(
        "max_concurrent_streams".into(),
        i64::from(l.max_concurrent_streams).into(),
    );
    root.insert("limits".into(), limits.into());

    let w = &config.watch;
    let mut watch = Table::new();
    watch.insert("history".into(), w.history.into());
    watch.insert("max_lag".into(), w.max_lag.into());
    watch.insert("progress_interval".into(), duration(w.progress_interval));
    watch.insert("max_watchers".into(), count(w.max_watchers));
    watch.insert(
        "max_watchers_per_principal".into(),
        count(w.max_watchers_per_principal),
    );
    watch.insert("poll_interval".into(), duration(w.poll_interval));
    watch.insert("buffer".into(), count(w.buffer));
    watch.insert("cache_entries".into(), count(w.cache_entries));
    root.insert("watch".into(), watch.into());

    let a = &config.apply;
    let mut apply = Table::new();
    apply.insert("deadline".into(), duration(a.deadline));
    apply.insert("lease".into(), duration(a.lease));
    apply.insert("retry_backoff".into(), duration(a.retry_backoff));
    apply.insert("call_timeout".into(), duration(a.call_timeout));
    apply.insert("max_attempts".into(), i64::from(a.max_attempts).into());
    apply.insert("poll_interval".into(), duration(a.poll_interval));
    apply.insert(
        "allowed_endpoints".into(),
        strings(a.allowed_endpoints.entries()),
    );
    root.insert("apply".into(), apply.into());

    let t = &config.telemetry;
    let mut telemetry = Table::new();
    telemetry.insert("log_format".into(), t.log_format.clone().into());
    telemetry.insert("otlp_endpoint".into(), redact_url(&t.otlp_endpoint).into());
    telemetry.insert("service_name".into(), t.service_name.clone().into());
    root.insert("telemetry".into(), telemetry.into());

    let mut auth = Table::new();
    let keys: Vec<Value> = config
        .auth
        .api_keys
        .iter()
        .map(|key| {
            let mut entry = Table::new();
            entry.insert("principal".into(), key.principal.clone().into());
            entry.insert("groups".into(), strings(&key.groups));
            entry.insert("scopes".into(), strings(&key.scopes));
            entry.insert("projects".into(), strings(&key.projects));
            entry.insert("sha256".into(), REDACTED.into());
            if !key.act_as.is_empty() {
                entry.insert("act_as".into(), strings(&key.act_as));
            }
            entry.into()
        })
        .collect();
    auth.insert("api_keys".into(), keys.into());
    if !config.auth.groups.is_empty() {
        let groups: Table = config
            .auth
            .groups
            .iter()
            .map(|(group, members)| (group.clone(), strings(members)))
            .collect();
        auth.insert("groups".into(), groups.into());
    }
    if let Some(j) = &config.auth.jwt {
        let mut jwt = Table::new();
        jwt.insert("issuer".into(), j.issuer.clone().into());
        jwt.insert("audience".into(), j.audience.clone().into());
        if let Some(file) = &j.jwks_file {
            jwt.insert("jwks_file".into(), file.clone().into());
        }
        if let Some(url) = &j.jwks_url {
            jwt.insert("jwks_url".into(), redact_url(url).into());
        }
        jwt.insert(
            "jwks_refresh_interval".into(),
            duration(j.jwks_refresh_interval),
        );
        jwt.insert("leeway".into(), duration(j.leeway));
        jwt.insert("principal_prefix".into(), j.principal_prefix.clone().into());
        jwt.insert("groups_claim".into(), j.groups_claim.clone().into());
        jwt.insert("scopes_claim".into(), j.scopes_claim.clone().into());
        jwt.insert("projects_claim".into(), j.projects_claim.clone().into());
        jwt.insert("act_as_claim".into(), j.act_as_claim.clone().into());
        jwt.insert("jwks_max_age".into(), duration(j.jwks_max_age));
        jwt.insert(
            "jwks_min_refetch_interval".into(),
            duration(j.jwks_min_refetch_interval),
        );
        auth.insert("jwt".into(), jwt.into());
    }
    root.insert("auth".into(), auth.into());
    toml::to_string(&root).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

fn duration(value: Duration) -> Value {
    humantime::format_duration(value).to_string().into()
}

fn count(value: usize) -> Value {
    i64::try_from(value).unwrap_or(i64::MAX).into()
}

fn strings(values: &[String]) -> Value {
    values
        .iter()
        .cloned()
        .map(Value::from)
        .collect::<Vec<_>>()
        .into()
}

/// `scheme://user:secret@host/...` with the password (and any query, which may hold one)
/// replaced.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, Some(REDACTED)),
        None => (url, None),
    };
    let redacted = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    if userinfo.contains(':') {
                        format!("{scheme}://{user}:{REDACTED}@{host}{path}")
                    } else {
                        format!("{scheme}://{user}@{host}{path}")
                    }
                }
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    match query {
        Some(query) => format!("{redacted}?{query}"),
        None => redacted,
    }
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
    fn the_rendered_configuration_loads_back() {
        let mut config = Config::default();
        let text = render(&config);
        let parsed: Config = toml::from_str(&text).expect("renders valid config");
        assert_eq!(parsed, config);
        config.apply.allowed_endpoints =
            crate::config::allowed_endpoints::AllowedEndpoints::parse(&[
                "http://127.0.0.1",
                "https://*.internal:8443",
            ])
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

    /// Every key an environment variable can set is shown: a section added to the config but
    /// forgotten here fails this test.
    #[test]
    fn every_configurable_key_is_rendered() {
        let rendered: toml::Table =
            toml::from_str(&render(&Config::default())).expect("valid TOML");
        for key in crate::config::key_paths() {
            let mut node: Option<&toml::Value> = None;
            let mut table = Some(&rendered);
            for part in key.split('.') {
                node = table.and_then(|t| t.get(part));
                table = node.and_then(toml::Value::as_table);
            }
            assert!(
                node.is_some() || key.starts_with("auth."),
                "{key} is missing from `config check`"
            );
        }
    }
}
