//! The relay's configuration: one TOML file (`approvals relay --config FILE`) with a `[relay]`
//! section and its `[[relay.sinks]]`, then `APPROVALS_RELAY_*` environment overrides of the
//! scalar keys (CONTRACT: `relay.endpoint` <-> `APPROVALS_RELAY_ENDPOINT`), then flags. Unknown
//! keys are an error naming the key.

use std::{collections::HashSet, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::{
    client::{ClientConfig, ClientTls, Credential},
    config::fields::duration,
    pb,
};

/// The file: only `[relay]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    relay: RelayConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The approvals server: `http://HOST:PORT` or `https://HOST:PORT`.
    pub endpoint: String,
    #[serde(default)]
    pub tls: ClientTls,
    /// A file holding the API key or JWT (`approvals:read` and `approvals:relay`); without
    /// it, `APPROVALS_API_KEY` or `APPROVALS_TOKEN`.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// How long a sink's lease lasts unless renewed (renewed every third of it); another
    /// replica takes a sink over at most this long after its relay died.
    #[serde(default = "default_lease_duration", with = "duration::positive")]
    pub lease_duration: Duration,
    /// This replica's name in leases (default `HOSTNAME/pid/uuid`).
    #[serde(default)]
    pub holder: Option<String>,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Cloudevents,
    Slack,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique; names the sink's state on the server (cursor, lease, dead letters).
    pub name: String,
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// Required: the watch's project.
    pub project: String,
    #[serde(default)]
    pub environment: String,
    #[serde(default)]
    pub action_key: String,
    /// Event kinds, lower snake case as in the CloudEvents type (`submitted`, `reviewed`,
    /// `apply_failed`, ...); empty: every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// States the event moved to (`approved`, `in_review`, ...); empty: every state.
    #[serde(default)]
    pub states: Vec<String>,
    pub format: Format,
    /// Standard Webhooks secrets (`whsec_` + base64); each signs every request (rotation).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Per attempt.
    #[serde(default = "default_timeout", with = "duration::positive")]
    pub timeout: Duration,
    /// Attempts per event before it goes to dead letters.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Time since the first attempt after which an event goes to dead letters.
    #[serde(default = "default_max_age", with = "duration::positive")]
    pub max_age: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff`, with jitter (a random wait
    /// between half and all of it).
    #[serde(default = "default_backoff", with = "duration::positive")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "duration::positive")]
    pub max_backoff: Duration,
    /// Slack: the link of a request, `{id}`, `{project}` and `{environment}` replaced.
    #[serde(default)]
    pub link_template: String,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

/// A sink's filter, parsed.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kinds: Vec<pb::EventKind>,
    pub states: Vec<pb::State>,
}

impl Filter {
    pub fn admits(&self, event: &pb::Event) -> bool {
        (self.kinds.is_empty() || self.kinds.iter().any(|k| *k as i32 == event.kind))
            && (self.states.is_empty() || self.states.iter().any(|s| *s as i32 == event.to_state))
    }
}

/// `reviewed` / `REVIEWED` / `EVENT_KIND_REVIEWED` -> the enum value.
fn enum_name<T>(prefix: &str, text: &str, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    let upper = text.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix(prefix).unwrap_or(&upper);
    if bare.is_empty() || bare == "UNSPECIFIED" {
        return None;
    }
    parse(&format!("{prefix}{bare}"))
}

impl SinkConfig {
    pub fn filter(&self) -> Result<Filter, String> {
        let mut filter = Filter::default();
        for (i, kind) in self.kinds.iter().enumerate() {
            filter.kinds.push(
                enum_name("EVENT_KIND_", kind, pb::EventKind::from_str_name)
                    .ok_or_else(|| format!("kinds[{i}]: {kind:?} is not an event kind"))?,
            );
        }
        for (i, state) in self.states.iter().enumerate() {
            filter.states.push(
                enum_name("STATE_", state, pb::State::from_str_name)
                    .ok_or_else(|| format!("states[{i}]: {state:?} is not a state"))?,
            );
        }
        Ok(filter)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key} (from {source_name}): {message}")]
    Invalid {
        key: String,
        source_name: String,
        message: String,
    },
}

fn invalid(key: impl Into<String>, source: &str, message: impl Into<String>) -> RelayConfigError {
    RelayConfigError::Invalid {
        key: key.into(),
        source_name: source.to_owned(),
        message: message.into(),
    }
}

/// Flags of `approvals relay`.
#[derive(Debug, Default, Clone)]
pub struct RelayFlags {
    pub endpoint: Option<String>,
}

impl RelayConfig {
    /// File, then `APPROVALS_RELAY_*` variables (`get`), then flags; then checked.
    pub fn load(
        path: &std::path::Path,
        get: impl Fn(&str) -> Option<String>,
        flags: &RelayFlags,
    ) -> Result<Self, RelayConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RelayConfigError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let mut config = Self::parse(&text, &shown)?;
        let env = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        if let Some(value) = env("APPROVALS_RELAY_ENDPOINT") {
            config.endpoint = value;
        }
        if let Some(value) = env("APPROVALS_RELAY_CREDENTIAL_FILE") {
            config.credential_file = Some(value.into());
        }
        if let Some(value) = env("APPROVALS_RELAY_HOLDER") {
            config.holder = Some(value);
        }
        if let Some(value) = env("APPROVALS_RELAY_LEASE_DURATION") {
            config.lease_duration = humantime::parse_duration(value.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    invalid(
                        "relay.lease_duration",
                        "APPROVALS_RELAY_LEASE_DURATION",
                        format!("{value:?} is not a duration above 0 like \"15s\""),
                    )
                })?;
        }
        for (name, slot) in [
            ("APPROVALS_RELAY_TLS_CA_FILE", &mut config.tls.ca_file),
            ("APPROVALS_RELAY_TLS_CERT_FILE", &mut config.tls.cert_file),
            ("APPROVALS_RELAY_TLS_KEY_FILE", &mut config.tls.key_file),
        ] {
            if let Some(value) = env(name) {
                *slot = Some(value.into());
            }
        }
        if let Some(value) = env("APPROVALS_RELAY_TLS_SERVER_NAME") {
            config.tls.server_name = Some(value);
        }
        if let Some(endpoint) = &flags.endpoint {
            config.endpoint = endpoint.clone();
        }
        config.check(&shown)?;
        Ok(config)
    }

    /// Parses the file's text (`shown` names it in errors) without environment or flags.
    pub fn parse(text: &str, shown: &str) -> Result<Self, RelayConfigError> {
        let file: RelayFile = toml::from_str(text).map_err(|e| RelayConfigError::Parse {
            path: shown.to_owned(),
            message: e.to_string(),
        })?;
        Ok(file.relay)
    }

    /// Checks what serde cannot: unique names, URLs, filters, secrets.
    pub fn check(&self, source: &str) -> Result<(), RelayConfigError> {
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err(invalid(
                "relay.endpoint",
                source,
                "must start with http:// or https://",
            ));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err(invalid(
                "relay.lease_duration",
                source,
                "must be at least 1s",
            ));
        }
        let mut names = HashSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let key = |field: &str| format!("relay.sinks[{i}].{field}");
            if sink.name.trim().is_empty() || sink.name.chars().any(char::is_control) {
                return Err(invalid(
                    key("name"),
                    source,
                    "is required (no control characters)",
                ));
            }
            if !names.insert(sink.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    source,
                    format!("{:?} names two sinks", sink.name),
                ));
            }
            match reqwest::Url::parse(&sink.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid(
                        key("url"),
                        source,
                        format!("{:?} is not an http:// or https:// URL", sink.url),
                    ));
                }
            }
            if sink.project.trim().is_empty() {
                return Err(invalid(key("project"), source, "is required"));
            }
            sink.filter()
                .map_err(|message| invalid(key("filter"), source, message))?;
            for (j, secret) in sink.secrets.iter().enumerate() {
                super::sign::Secret::parse(secret).map_err(|message| {
                    invalid(format!("relay.sinks[{i}].secrets[{j}]"), source, message)
                })?;
            }
            if sink.max_attempts == 0 {
                return Err(invalid(key("max_attempts"), source, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The client settings: endpoint, TLS, and the credential from `credential_file` or the
    /// environment (`APPROVALS_API_KEY`, `APPROVALS_TOKEN`).
    pub fn client(
        &self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<ClientConfig, crate::client::ClientError> {
        let credential = match &self.credential_file {
            Some(path) => Credential::from_file(path)?,
            None => Credential::from_env(get),
        };
        Ok(ClientConfig::new(self.endpoint.clone())
            .with_tls(self.tls.clone())
            .with_credential(credential))
    }

    pub fn sink(&self, name: &str) -> Option<&SinkConfig> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[relay]
endpoint = "http://127.0.0.1:50051"
lease_duration = "5s"

[[relay.sinks]]
name = "hooks"
url = "http://127.0.0.1:9/hook"
project = "payments"
kinds = ["reviewed", "EVENT_KIND_APPLIED"]
states = ["approved"]
format = "cloudevents"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
"#;

    #[test]
    fn a_file_parses_and_its_filter_reads_both_spellings() {
        let config = RelayConfig::parse(FILE, "relay.toml").expect("parses");
        config.check("relay.toml").expect("valid");
        let filter = config.sinks[0].filter().expect("filter");
        assert_eq!(
            filter.kinds,
            [pb::EventKind::Reviewed, pb::EventKind::Applied]
        );
        assert_eq!(filter.states, [pb::State::Approved]);
        assert_eq!(config.sinks[0].max_attempts, 10);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = RelayConfig::parse(&FILE.replace("lease_duration", "lease_time"), "f")
            .expect_err("unknown key");
        assert!(err.to_string().contains("lease_time"), "{err}");
        let config =
            RelayConfig::parse(&FILE.replace("\"reviewed\"", "\"reviewd\""), "f").expect("parses");
        let err = config.check("f").expect_err("bad kind");
        assert!(
            err.to_string().contains("relay.sinks[0].filter")
                && err.to_string().contains("reviewd"),
            "{err}"
        );
        let config =
            RelayConfig::parse(&FILE.replace("whsec_Mf", "whsec_!!"), "f").expect("parses");
        let err = config.check("f").expect_err("bad secret");
        assert!(
            err.to_string().contains("relay.sinks[0].secrets[0]"),
            "{err}"
        );
    }
}
