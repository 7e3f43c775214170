//! Configuration: one TOML file (`--config FILE` or `APPROVALS_CONFIG`), then `APPROVALS_*`
//! environment overrides, then flags. Precedence: flag > environment > file > default. Unknown
//! keys in the file are an error naming the key; every invalid value names its key.

use std::{net::SocketAddr, path::Path, time::Duration};

use approvals_store::DatabaseSettings;

pub mod allowed_endpoints;
pub mod auth;
pub mod check;

use self::{
    allowed_endpoints::AllowedEndpoints,
    auth::{AuthConfig, JwtConfig},
};
use serde::{Deserialize, Deserializer};

/// The embedded default: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://approvals.db";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Distinct approvals needed for quorum when no policy says otherwise.
    pub min_approvals: u32,
    pub database: DatabaseConfig,
    pub limits: LimitsConfig,
    pub watch: WatchConfig,
    pub apply: ApplyConfig,
    pub telemetry: TelemetryConfig,
    /// API keys and JWTs; without any, the server runs in local development mode (loopback
    /// only, identity from `x-approvals-actor`).
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    #[serde(deserialize_with = "duration")]
    pub acquire_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub statement_timeout: Duration,
    /// How often the background probe checks the database for the health service.
    #[serde(deserialize_with = "duration")]
    pub health_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Deadline of a unary call (a shorter `grpc-timeout` from the client wins).
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// After SIGTERM, how long in-flight calls may take to finish before the server exits.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Unary calls handled at once; more are RESOURCE_EXHAUSTED at once. 0: no limit.
    pub max_concurrent_requests: usize,
    /// Unary calls per second per authenticated principal; more are RESOURCE_EXHAUSTED
    /// (reason RATE_LIMITED) for that principal only. 0: no limit.
    pub rate_limit_per_second: u32,
    /// Calls a principal may make at once above its rate; 0: the same as the rate.
    pub rate_limit_burst: u32,
    /// HTTP/2 PING on every connection this often, so idle watch streams survive proxies and
    /// NATs that drop quiet connections, and dead clients are noticed. 0s: no pings.
    #[serde(deserialize_with = "duration")]
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this is closed.
    #[serde(deserialize_with = "duration")]
    pub keepalive_timeout: Duration,
    /// HTTP/2 streams (calls, watch streams included) one connection may have open at once,
    /// announced to the client in SETTINGS_MAX_CONCURRENT_STREAMS: a client opens more only as
    /// earlier ones end. 0: no limit.
    pub max_concurrent_streams: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// How far behind the head (in revisions) a watch may start; older is OUT_OF_RANGE.
    pub history: i64,
    /// A watcher at the live tail this many events behind is ended (RESOURCE_EXHAUSTED).
    pub max_lag: i64,
    /// An idle stream gets a progress message this often.
    #[serde(deserialize_with = "duration")]
    pub progress_interval: Duration,
    /// Most concurrent watch streams; more are RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
    /// Most concurrent watch streams of one authenticated principal (the acting service for an
    /// on-behalf-of call); more are RESOURCE_EXHAUSTED. 0: no per-principal limit.
    pub max_watchers_per_principal: usize,
    /// Fallback: how often the log is read when no commit wake-up arrived.
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Events kept in memory for watchers at the live tail; a watcher further behind reads the
    /// log instead (it is ended only past `max_lag`).
    pub buffer: usize,
    /// Change requests kept in memory for GetChangeRequest, kept current by the event log;
    /// 0: every get reads the database. See the README, "Reads".
    pub cache_entries: usize,
}

/// Logs and OpenTelemetry export. The standard `OTEL_*` variables still apply and win.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json` (`--log-format` wins).
    pub log_format: String,
    /// OTLP/gRPC collector, e.g. `http://collector:4317`; empty: no export unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    /// `service.name` of spans and metrics (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            otlp_endpoint: String::new(),
            service_name: "approvals".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// How long ApproveChangeRequest (AUTO) and ApplyChangeRequest wait for the apply before
    /// returning the request APPLYING (it finishes in the background). Below the unary timeout.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// How long a replica holds an apply it works on; renewed while it works. A replica that
    /// finds an expired lease (its owner died) retries the apply with the same key.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// First wait after a transient applier failure; doubles, at most 60 s.
    #[serde(deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// Timeout of one applier call (counts as DEADLINE_EXCEEDED, transient).
    #[serde(deserialize_with = "duration")]
    pub call_timeout: Duration,
    /// Attempts before an apply gives up with APPLY_FAILED.
    pub max_attempts: u32,
    /// How often each replica looks for due work (schedules, expiry, expired leases).
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// The applier endpoints policies may name and the server may call (`scheme://host[:port]`,
    /// `*.suffix` hosts; see `applier_endpoints`). Empty: none, so no policy may have an
    /// `applier_endpoint`.
    pub allowed_endpoints: AllowedEndpoints,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(1),
            call_timeout: Duration::from_secs(30),
            max_attempts: 10,
            poll_interval: Duration::from_secs(1),
            allowed_endpoints: AllowedEndpoints::default(),
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            history: 100_000,
            max_lag: 10_000,
            progress_interval: Duration::from_secs(10),
            max_watchers: 50_000,
            max_watchers_per_principal: 1_000,
            poll_interval: Duration::from_millis(500),
            buffer: 1024,
            cache_entries: 20_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            min_approvals: 1,
            database: DatabaseConfig::default(),
            limits: LimitsConfig::default(),
            watch: WatchConfig::default(),
            apply: ApplyConfig::default(),
            telemetry: TelemetryConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_DATABASE_URL.to_owned(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            health_interval: Duration::from_secs(2),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            max_concurrent_requests: 1024,
            rate_limit_per_second: 0,
            rate_limit_burst: 0,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1_000,
        }
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"500ms\" or \"2s\": {e}"))
}

fn parse_number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))
}

type Setter = fn(&mut Config, &str) -> Result<(), String>;

/// Every key that an environment variable can override: `APPROVALS_` + the key path
/// upper-cased with `.` as `_`.
const KEYS: &[(&str, Setter)] = &[
    ("listen", |c, v| {
        c.listen = v.to_owned();
        Ok(())
    }),
    ("min_approvals", |c, v| {
        c.min_approvals = parse_number(v)?;
        Ok(())
    }),
    ("database.url", |c, v| {
        c.database.url = v.to_owned();
        Ok(())
    }),
    ("database.max_connections", |c, v| {
        c.database.max_connections = parse_number(v)?;
        Ok(())
    }),
    ("database.acquire_timeout", |c, v| {
        c.database.acquire_timeout = parse_duration(v)?;
        Ok(())
    }),
    ("database.statement_timeout", |c, v| {
        c.database.statement_timeout = parse_duration(v)?;
        Ok(())
    }),
    ("database.health_interval", |c, v| {
        c.database.health_interval = parse_duration(v)?;
        Ok(())
    }),
    ("limits.request_timeout", |c, v| {
        c.limits.request_timeout = parse_duration(v)?;
        Ok(())
    }),
    ("limits.max_message_bytes", |c, v| {
        c.limits.max_message_bytes = parse_number(v)?;
        Ok(())
    }),
    ("watch.history", |c, v| {
        c.watch.history = parse_number(v)?;
        Ok(())
    }),
    ("watch.max_lag", |c, v| {
        c.watch.max_lag = parse_number(v)?;
        Ok(())
    }),
    ("watch.progress_interval", |c, v| {
        c.watch.progress_interval = parse_duration(v)?;
        Ok(())
    }),
    ("watch.max_watchers", |c, v| {
        c.watch.max_watchers = parse_number(v)?;
        Ok(())
    }),
    ("watch.max_watchers_per_principal", |c, v| {
        c.watch.max_watchers_per_principal = parse_number(v)?;
        Ok(())
    }),
    ("watch.poll_interval", |c, v| {
        c.watch.poll_interval = parse_duration(v)?;
        Ok(())
    }),
    ("watch.buffer", |c, v| {
        c.watch.buffer = parse_number(v)?;
        Ok(())
    }),
    ("watch.cache_entries", |c, v| {
        c.watch.cache_entries = parse_number(v)?;
        Ok(())
    }),
    ("apply.deadline", |c, v| {
        c.apply.deadline = parse_duration(v)?;
        Ok(())
    }),
    ("apply.lease", |c, v| {
        c.apply.lease = parse_duration(v)?;
        Ok(())
    }),
    ("apply.retry_backoff", |c, v| {
        c.apply.retry_backoff = parse_duration(v)?;
        Ok(())
    }),
    ("apply.call_timeout", |c, v| {
        c.apply.call_timeout = parse_duration(v)?;
        Ok(())
    }),
    ("apply.max_attempts", |c, v| {
        c.apply.max_attempts = parse_number(v)?;
        Ok(())
    }),
    ("apply.poll_interval", |c, v| {
        c.apply.poll_interval = parse_duration(v)?;
        Ok(())
    }),
    // A comma-separated list in the environment; a TOML array in the file.
    ("apply.allowed_endpoints", |c, v| {
        c.apply.allowed_endpoints = AllowedEndpoints::parse_list(v)?;
        Ok(())
    }),
    ("telemetry.log_format", |c, v| {
        c.telemetry.log_format = v.trim().to_owned();
        Ok(())
    }),
    ("telemetry.otlp_endpoint", |c, v| {
        c.telemetry.otlp_endpoint = v.trim().to_owned();
        Ok(())
    }),
    ("telemetry.service_name", |c, v| {
        c.telemetry.service_name = v.trim().to_owned();
        Ok(())
    }),
    ("limits.shutdown_grace", |c, v| {
        c.limits.shutdown_grace = parse_duration(v)?;
        Ok(())
    }),
    ("limits.max_concurrent_requests", |c, v| {
        c.limits.max_concurrent_requests = parse_number(v)?;
        Ok(())
    }),
    ("limits.rate_limit_per_second", |c, v| {
        c.limits.rate_limit_per_second = parse_number(v)?;
        Ok(())
    }),
    ("limits.rate_limit_burst", |c, v| {
        c.limits.rate_limit_burst = parse_number(v)?;
        Ok(())
    }),
    ("limits.keepalive_interval", |c, v| {
        c.limits.keepalive_interval = parse_duration(v)?;
        Ok(())
    }),
    ("limits.keepalive_timeout", |c, v| {
        c.limits.keepalive_timeout = parse_duration(v)?;
        Ok(())
    }),
    ("limits.max_concurrent_streams", |c, v| {
        c.limits.max_concurrent_streams = parse_number(v)?;
        Ok(())
    }),
    ("auth.jwt.issuer", |c, v| {
        jwt(c).issuer = v.to_owned();
        Ok(())
    }),
    ("auth.jwt.audience", |c, v| {
        jwt(c).audience = v.to_owned();
        Ok(())
    }),
    ("auth.jwt.jwks_file", |c, v| {
        jwt(c).jwks_file = Some(v.to_owned());
        Ok(())
    }),
    ("auth.jwt.jwks_url", |c, v| {
        jwt(c).jwks_url = Some(v.to_owned());
        Ok(())
    }),
];

/// The `[auth.jwt]` table, created by the first environment variable that sets one of its keys.
fn jwt(config: &mut Config) -> &mut JwtConfig {
    config.auth.jwt.get_or_insert_with(JwtConfig::default)
}

/// The key paths environment variables can set (`database.url`, ...).
pub fn key_paths() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(key, _)| *key)
}

pub fn env_name(key: &str) -> String {
    format!("APPROVALS_{}", key.to_uppercase().replace('.', "_"))
}

/// Values given on the command line; `None` leaves the key to the environment, file or default.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub min_approvals: Option<u32>,
    pub watch_history: Option<i64>,
    pub watch_max_lag: Option<i64>,
    pub watch_progress_interval: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key} (from {source_name}): {message}")]
    Invalid {
        key: String,
        source_name: String,
        message: String,
    },
}

impl Config {
    /// Loads file, environment (`lookup` reads a variable) and flags, then validates.
    pub fn load(
        file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        for (key, set) in KEYS {
            let name = env_name(key);
            if let Some(value) = lookup(&name) {
                set(&mut config, &value).map_err(|message| ConfigError::Invalid {
                    key: (*key).to_owned(),
                    source_name: name.clone(),
                    message,
                })?;
            }
        }
        if let Some(listen) = &flags.listen {
            config.listen = listen.clone();
        }
        if let Some(url) = &flags.database_url {
            config.database.url = url.clone();
        }
        if let Some(min) = flags.min_approvals {
            config.min_approvals = min;
        }
        if let Some(history) = flags.watch_history {
            config.watch.history = history;
        }
        if let Some(max_lag) = flags.watch_max_lag {
            config.watch.max_lag = max_lag;
        }
        if let Some(interval) = &flags.watch_progress_interval {
            config.watch.progress_interval =
                parse_duration(interval).map_err(|message| ConfigError::Invalid {
                    key: "watch.progress_interval".into(),
                    source_name: "--watch-progress-interval".into(),
                    message,
                })?;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const POSITIVE: &str = "must be more than 0s";
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            source_name: "the merged configuration".to_owned(),
            message,
        };
        let addr = self.listen_addr().map_err(|m| invalid("listen", m))?;
        if !self.limits.keepalive_interval.is_zero() && self.limits.keepalive_timeout.is_zero() {
            return Err(invalid(
                "limits.keepalive_timeout",
                "must be more than 0s while limits.keepalive_interval is set".into(),
            ));
        }
        crate::auth::validate_config(&self.auth).map_err(|(key, m)| invalid(&key, m))?;
        if !self.auth.is_configured() && !addr.ip().is_loopback() {
            return Err(invalid(
                "listen",
                format!(
                    "{addr} is not a loopback address and no authentication is configured: \
                     refusing to start, since any caller could name itself with x-approvals-actor. \
                     Configure [[auth.api_keys]] or [auth.jwt], or listen on 127.0.0.1"
                ),
            ));
        }
        if self.min_approvals < 1 {
            return Err(invalid("min_approvals", "must be at least 1".into()));
        }
        if self.database.max_connections < 1 {
            return Err(invalid(
                "database.max_connections",
                "must be at least 1".into(),
            ));
        }
        if self.database.url.trim().is_empty() {
            return Err(invalid("database.url", "must not be empty".into()));
        }
        if self.watch.history < 1 {
            return Err(invalid("watch.history", "must be at least 1".into()));
        }
        if self.watch.max_lag < 1 {
            return Err(invalid("watch.max_lag", "must be at least 1".into()));
        }
        if self.watch.progress_interval.is_zero() {
            return Err(invalid("watch.progress_interval", POSITIVE.into()));
        }
        if self.watch.poll_interval.is_zero() {
            return Err(invalid("watch.poll_interval", POSITIVE.into()));
        }
        if self.watch.buffer < 16 {
            return Err(invalid("watch.buffer", "must be at least 16".into()));
        }
        if self.watch.max_watchers < 1 {
            return Err(invalid("watch.max_watchers", "must be at least 1".into()));
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return Err(invalid(
                "telemetry.log_format",
                format!(
                    "{:?} is not a log format: expected \"text\" or \"json\"",
                    self.telemetry.log_format
                ),
            ));
        }
        if self.telemetry.service_name.trim().is_empty() {
            return Err(invalid(
                "telemetry.service_name",
                "must not be empty".into(),
            ));
        }
        if self.apply.deadline >= self.limits.request_timeout {
            return Err(invalid(
                "apply.deadline",
                format!(
                    "must stay below limits.request_timeout ({:?}), or approvals would time out while waiting",
                    self.limits.request_timeout
                ),
            ));
        }
        if self.apply.lease.is_zero() {
            return Err(invalid("apply.lease", POSITIVE.into()));
        }
        if self.apply.poll_interval.is_zero() {
            return Err(invalid("apply.poll_interval", POSITIVE.into()));
        }
        if self.apply.call_timeout.is_zero() {
            return Err(invalid("apply.call_timeout", POSITIVE.into()));
        }
        if self.apply.max_attempts < 1 {
            return Err(invalid("apply.max_attempts", "must be at least 1".into()));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("{:?} is not an address like 127.0.0.1:50051", self.listen))
    }

    pub fn database_settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: self.database.url.clone(),
            max_connections: self.database.max_connections,
            acquire_timeout: self.database.acquire_timeout,
            statement_timeout: self.database.statement_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A file removed when dropped; enough for these tests without another dependency.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn with(text: &str) -> Self {
                let path = std::env::temp_dir()
                    .join(format!("approvals-config-{}.toml", uuid::Uuid::now_v7()));
                std::fs::write(&path, text).expect("temp file");
                Self(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn precedence_is_flag_then_env_then_file_then_default() {
        let file = write(
            "listen = \"127.0.0.1:1\"\nmin_approvals = 2\n[database]\nurl = \"sqlite://f.db\"\nacquire_timeout = \"500ms\"\n",
        );
        let env: HashMap<&str, &str> = [
            ("APPROVALS_MIN_APPROVALS", "3"),
            ("APPROVALS_LISTEN", "127.0.0.1:2"),
        ]
        .into();
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let config = Config::load(Some(&file.0), |k| env.get(k).map(|v| v.to_string()), &flags)
            .expect("loads");
        assert_eq!(config.listen, "127.0.0.1:3");
        assert_eq!(config.min_approvals, 3);
        assert_eq!(config.database.url, "sqlite://f.db");
        assert_eq!(config.database.acquire_timeout, Duration::from_millis(500));
        assert_eq!(config.database.max_connections, 16);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let file = write("[database]\nurll = \"x\"\n");
        let err =
            Config::load(Some(&file.0), |_| None, &Overrides::default()).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `urll`"), "{err}");

        let err = Config::load(
            None,
            |k| (k == "APPROVALS_DATABASE_ACQUIRE_TIMEOUT").then(|| "soon".into()),
            &Overrides::default(),
        )
        .expect_err("bad duration");
        assert!(
            err.to_string()
                .starts_with("database.acquire_timeout (from APPROVALS_DATABASE_ACQUIRE_TIMEOUT)"),
            "{err}"
        );

        let err = Config::load(
            None,
            |_| None,
            &Overrides {
                min_approvals: Some(0),
                ..Default::default()
            },
        )
        .expect_err("zero");
        assert!(err.to_string().starts_with("min_approvals"), "{err}");
    }

    #[test]
    fn telemetry_section() {
        let file = write(
            "[telemetry]\nlog_format = \"json\"\notlp_endpoint = \"http://collector:4317\"\n",
        );
        let config = Config::load(Some(&file.0), |_| None, &Overrides::default()).expect("loads");
        assert_eq!(config.telemetry.log_format, "json");
        assert_eq!(config.telemetry.otlp_endpoint, "http://collector:4317");
        assert_eq!(config.telemetry.service_name, "approvals");
        let err = Config::load(
            None,
            |k| (k == "APPROVALS_TELEMETRY_LOG_FORMAT").then(|| "xml".into()),
            &Overrides::default(),
        )
        .expect_err("unknown format");
        assert!(err.to_string().starts_with("telemetry.log_format"), "{err}");
    }

    #[test]
    fn keepalive_is_configurable_and_checked() {
        let file = write("[limits]\nkeepalive_interval = \"0s\"\n");
        let config = Config::load(Some(&file.0), |_| None, &Overrides::default()).expect("loads");
        assert_eq!(config.limits.keepalive_interval, Duration::ZERO);
        let config = Config::load(
            None,
            |k| (k == "APPROVALS_LIMITS_KEEPALIVE_INTERVAL").then(|| "5s".into()),
            &Overrides::default(),
        )
        .expect("loads");
        assert_eq!(config.limits.keepalive_interval, Duration::from_secs(5));
        assert_eq!(config.limits.keepalive_timeout, Duration::from_secs(10));
        let err = Config::load(
            None,
            |k| (k == "APPROVALS_LIMITS_KEEPALIVE_TIMEOUT").then(|| "0s".into()),
            &Overrides::default(),
        )
        .expect_err("no timeout");
        assert!(
            err.to_string().starts_with("limits.keepalive_timeout"),
            "{err}"
        );
    }

    #[test]
    fn allowed_endpoints_from_the_file_or_the_environment() {
        assert!(
            Config::default()
                .apply
                .allowed_endpoints
                .entries()
                .is_empty()
        );
        let file = write(
            "[apply]\nallowed_endpoints = [\"http://127.0.0.1\", \"https://*.svc.cluster.local:8443\"]\n",
        );
        let config = Config::load(Some(&file.0), |_| None, &Overrides::default()).expect("loads");
        assert_eq!(
            config.apply.allowed_endpoints.entries(),
            ["http://127.0.0.1", "https://*.svc.cluster.local:8443"]
        );
        let config = Config::load(
            Some(&file.0),
            |k| {
                (k == "APPROVALS_APPLY_ALLOWED_ENDPOINTS")
                    .then(|| "http://flags.internal:8080, http://deploy.internal".into())
            },
            &Overrides::default(),
        )
        .expect("loads");
        assert_eq!(
            config.apply.allowed_endpoints.entries(),
            ["http://flags.internal:8080", "http://deploy.internal"],
            "the environment replaces the file's list"
        );
        let err = Config::load(
            None,
            |k| (k == "APPROVALS_APPLY_ALLOWED_ENDPOINTS").then(|| "http://a.internal/x".into()),
            &Overrides::default(),
        )
        .expect_err("a path");
        assert!(
            err.to_string().starts_with(
                "apply.allowed_endpoints (from APPROVALS_APPLY_ALLOWED_ENDPOINTS): entry [0]"
            ),
            "{err}"
        );
        let file = write("[apply]\nallowed_endpoints = [\"grpc://x\"]\n");
        let err =
            Config::load(Some(&file.0), |_| None, &Overrides::default()).expect_err("a scheme");
        assert!(err.to_string().contains("allowed_endpoints"), "{err}");
    }

    #[test]
    fn watch_and_stream_limits_are_configurable() {
        let config = Config::default();
        assert_eq!(config.watch.max_watchers_per_principal, 1000);
        assert_eq!(config.limits.max_concurrent_streams, 1000);
        let file = write("[watch]\nmax_watchers_per_principal = 0\n");
        let config = Config::load(Some(&file.0), |_| None, &Overrides::default()).expect("loads");
        assert_eq!(config.watch.max_watchers_per_principal, 0);
        let env: HashMap<&str, &str> = [
            ("APPROVALS_WATCH_MAX_WATCHERS_PER_PRINCIPAL", "25"),
            ("APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS", "64"),
        ]
        .into();
        let config = Config::load(
            Some(&file.0),
            |k| env.get(k).map(|v| v.to_string()),
            &Overrides::default(),
        )
        .expect("loads");
        assert_eq!(config.watch.max_watchers_per_principal, 25);
        assert_eq!(config.limits.max_concurrent_streams, 64);
        let err = Config::load(
            None,
            |k| (k == "APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS").then(|| "-1".into()),
            &Overrides::default(),
        )
        .expect_err("negative");
        assert!(
            err.to_string().starts_with("limits.max_concurrent_streams"),
            "{err}"
        );
    }

    #[test]
    fn env_names_follow_the_key_path() {
        assert_eq!(env_name("database.url"), "APPROVALS_DATABASE_URL");
        assert_eq!(env_name("listen"), "APPROVALS_LISTEN");
    }
}
