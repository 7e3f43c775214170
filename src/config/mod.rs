//! Configuration: one TOML file (`--config FILE` or `APPROVALS_CONFIG`), then `APPROVALS_*`
//! environment overrides, then flags. Precedence: flag > environment > file > default. Unknown
//! keys in the file are an error naming the key; every invalid value names its key.

use std::{net::SocketAddr, time::Duration};

use approvals_store::DatabaseSettings;

pub mod allowed_endpoints;
pub mod auth;
pub mod check;
pub(crate) mod fields;
mod load;
pub mod tls;

pub use self::load::{ConfigError, Flags, env_name, key_paths};

use self::{allowed_endpoints::AllowedEndpoints, auth::AuthConfig, tls::TlsConfig};
use serde::{Deserialize, Serialize};

/// The embedded default: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://approvals.db";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    #[serde(deserialize_with = "fields::address")]
    pub listen: String,
    /// Distinct approvals needed for quorum when no policy says otherwise.
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub min_approvals: u32,
    pub database: DatabaseConfig,
    pub limits: LimitsConfig,
    pub watch: WatchConfig,
    pub apply: ApplyConfig,
    pub telemetry: TelemetryConfig,
    /// The verifiable history: checkpoints and their signing key.
    pub audit: AuditConfig,
    /// The server's certificate and client certificates; without `tls.cert_file`, plain text.
    pub tls: TlsConfig,
    /// API keys and JWTs; without any, the server runs in local development mode (loopback
    /// only, identity from `x-approvals-actor`).
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    #[serde(deserialize_with = "fields::not_empty")]
    pub url: String,
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub max_connections: u32,
    #[serde(with = "fields::duration")]
    pub acquire_timeout: Duration,
    #[serde(with = "fields::duration")]
    pub statement_timeout: Duration,
    /// How often the background probe checks the database for the health service.
    #[serde(with = "fields::duration")]
    pub health_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Deadline of a unary call (a shorter `grpc-timeout` from the client wins).
    #[serde(with = "fields::duration")]
    pub request_timeout: Duration,
    /// Largest request message accepted, in bytes.
    #[serde(deserialize_with = "fields::at_least::<1024, _, _>")]
    pub max_message_bytes: usize,
    /// After SIGTERM, how long in-flight calls may take to finish before the server exits.
    #[serde(with = "fields::duration")]
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
    #[serde(with = "fields::duration")]
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this is closed.
    #[serde(with = "fields::duration")]
    pub keepalive_timeout: Duration,
    /// HTTP/2 streams (calls, watch streams included) one connection may have open at once,
    /// announced to the client in SETTINGS_MAX_CONCURRENT_STREAMS: a client opens more only as
    /// earlier ones end. 0: no limit.
    pub max_concurrent_streams: u32,
    /// Gather the HTTP/2 frames of a connection's ready streams into one write (the
    /// connection reports no vectored writes and steps aside once per burst; see
    /// `transport/connection.rs`): an event delivered to 10,000 watchers takes a few hundred
    /// system calls instead of 10,000. false: one write per frame, as hyper does by default.
    pub coalesce_writes: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// How far behind the head (in revisions) a watch may start; older is OUT_OF_RANGE.
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub history: i64,
    /// A watcher at the live tail this many events behind is ended (RESOURCE_EXHAUSTED).
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub max_lag: i64,
    /// An idle stream gets a progress message this often.
    #[serde(with = "fields::duration::positive")]
    pub progress_interval: Duration,
    /// Most concurrent watch streams; more are RESOURCE_EXHAUSTED.
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub max_watchers: usize,
    /// Most concurrent watch streams of one authenticated principal (the acting service for an
    /// on-behalf-of call); more are RESOURCE_EXHAUSTED. 0: no per-principal limit.
    pub max_watchers_per_principal: usize,
    /// Fallback: how often the log is read when no commit wake-up arrived.
    #[serde(with = "fields::duration::positive")]
    pub poll_interval: Duration,
    /// Events kept in memory for watchers at the live tail; a watcher further behind reads the
    /// log instead (it is ended only past `max_lag`).
    #[serde(deserialize_with = "fields::at_least::<16, _, _>")]
    pub buffer: usize,
    /// Change requests kept in memory for GetChangeRequest, kept current by the event log;
    /// 0: every get reads the database. See the README, "Reads".
    pub cache_entries: usize,
}

/// Logs and OpenTelemetry export. The standard `OTEL_*` variables still apply and win.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json` (`--log-format` wins).
    #[serde(deserialize_with = "fields::log_format")]
    pub log_format: String,
    /// OTLP/gRPC collector, e.g. `http://collector:4317`; empty: no export unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    /// `service.name` of spans and metrics (`OTEL_SERVICE_NAME` wins).
    #[serde(deserialize_with = "fields::not_empty")]
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

/// The audit log's checkpoints and the approval attestations (see the README, "Audit").
/// Events are hash-chained whatever this says.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often one replica signs a checkpoint, when events were written since the last one.
    #[serde(with = "fields::duration::positive")]
    pub checkpoint_interval: Duration,
    /// The Ed25519 private key checkpoints are signed with: a PKCS#8 PEM file (`approvals audit
    /// keygen`, or `openssl genpkey -algorithm ed25519`). Empty: no checkpoints, and
    /// GetAuditCheckpoint / GetAuditPublicKey answer AUDIT_NOT_CONFIGURED.
    pub signing_key_file: String,
    /// How long an approval attestation stays valid after it is issued (or after the planned
    /// apply time, when that is later); appliers refuse it afterwards.
    #[serde(with = "fields::duration::positive")]
    pub attestation_ttl: Duration,
    /// Benchmarks only (`approvals-bench --create-hashing off`): `false` writes each request's
    /// CREATED event without a hash, to measure what hashing costs a create. Leave it `true`.
    pub bench_create_hashing: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(60),
            signing_key_file: String::new(),
            attestation_ttl: Duration::from_secs(7 * 24 * 3600),
            bench_create_hashing: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// How long ApproveChangeRequest (AUTO) and ApplyChangeRequest wait for the apply before
    /// returning the request APPLYING (it finishes in the background). Below the unary timeout.
    #[serde(with = "fields::duration")]
    pub deadline: Duration,
    /// How long a replica holds an apply it works on; renewed while it works. A replica that
    /// finds an expired lease (its owner died) retries the apply with the same key.
    #[serde(with = "fields::duration::positive")]
    pub lease: Duration,
    /// First wait after a transient applier failure; doubles, at most 60 s.
    #[serde(with = "fields::duration")]
    pub retry_backoff: Duration,
    /// Timeout of one applier call (counts as DEADLINE_EXCEEDED, transient).
    #[serde(with = "fields::duration::positive")]
    pub call_timeout: Duration,
    /// Attempts before an apply gives up with APPLY_FAILED.
    #[serde(deserialize_with = "fields::at_least::<1, _, _>")]
    pub max_attempts: u32,
    /// How often each replica looks for due work (schedules, expiry, expired leases).
    #[serde(with = "fields::duration::positive")]
    pub poll_interval: Duration,
    /// The applier endpoints policies may name and the server may call (`scheme://host[:port]`,
    /// `*.suffix` hosts; see `config::allowed_endpoints`). Empty: none, so no policy may have an
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
            audit: AuditConfig::default(),
            tls: TlsConfig::default(),
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
            coalesce_writes: true,
        }
    }
}

impl Config {
    /// The rules between keys (a key's own bounds are checked as it is read, see `fields.rs`);
    /// `[auth]`'s meaning is checked by `auth::validate_config` (`transport::check_config`
    /// runs both).
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.apply.deadline >= self.limits.request_timeout {
            return Err(invalid(
                "apply.deadline",
                format!(
                    "must stay below limits.request_timeout ({:?}), or approvals would time out while waiting",
                    self.limits.request_timeout
                ),
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        fields::parse_address(&self.listen)
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
