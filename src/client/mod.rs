//! The one client of the public gRPC API, shared by the CLI and the relay (CONTRACT: neither
//! touches the database). It knows the endpoint, the TLS settings and the credential, and hands
//! out the generated clients with the credential attached to every call.
//!
//! - The endpoint is `http://HOST:PORT` (plain text) or `https://HOST:PORT` (TLS, verified
//!   against the system roots, or against `ca_file` alone when one is given).
//! - `cert_file` + `key_file` present a client certificate (mTLS).
//! - The credential is a bearer token (an API key or a JWT): sent as
//!   `authorization: Bearer <token>`. [`Credential::from_env`] reads `APPROVALS_API_KEY`, then
//!   `APPROVALS_TOKEN`.

pub mod json;

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::pb::{change_requests_client::ChangeRequestsClient, policies_client::PoliciesClient};

/// The environment variable holding an API key for the CLI and the relay.
pub const API_KEY_ENV: &str = "APPROVALS_API_KEY";
/// The environment variable holding a JWT for the CLI and the relay.
pub const TOKEN_ENV: &str = "APPROVALS_TOKEN";

/// TLS settings of a client (all optional: an `https://` endpoint with none of them verifies
/// the server against the system roots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM bundle of the CAs the server's certificate must chain to (instead of the system
    /// roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (a chain allowed), presented for mTLS; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it differs from the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A bearer credential: an API key or a JWT. Its `Debug` never prints the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credential(Option<String>);

impl Credential {
    /// No credential (calls are refused by a server that requires one).
    pub fn none() -> Self {
        Self(None)
    }

    /// A bearer token (an API key or a JWT), trimmed of surrounding whitespace.
    pub fn bearer(token: impl AsRef<str>) -> Self {
        let token = token.as_ref().trim();
        Self((!token.is_empty()).then(|| token.to_owned()))
    }

    /// `APPROVALS_API_KEY`, else `APPROVALS_TOKEN`, else none.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        [API_KEY_ENV, TOKEN_ENV]
            .into_iter()
            .filter_map(&get)
            .map(Self::bearer)
            .find(Self::is_present)
            .unwrap_or_default()
    }

    /// Reads the token from a file (its whole content, trimmed).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self::bearer(text))
    }

    pub fn is_present(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credential(<redacted>)"
        } else {
            "Credential(none)"
        })
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub endpoint: String,
    pub tls: ClientTls,
    pub credential: Credential,
    /// Time allowed to establish the connection (default 10 s).
    pub connect_timeout: Duration,
    /// Deadline of each unary call, sent as `grpc-timeout` (none by default; watches are
    /// streams and must not have one).
    pub timeout: Option<Duration>,
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls: ClientTls::default(),
            credential: Credential::none(),
            connect_timeout: Duration::from_secs(10),
            timeout: None,
        }
    }

    pub fn with_credential(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = tls;
        self
    }
}

/// Why a client could not be built or connected.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("credential: {0}")]
    Credential(String),
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
}

/// Attaches the credential to every call.
#[derive(Clone)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert(crate::AUTHORIZATION_HEADER, value.clone());
        }
        Ok(request)
    }
}

/// A channel with the credential attached: what the generated clients run over.
pub type AuthedChannel = InterceptedService<Channel, Credentials>;

/// A connected client of the approvals API.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    credentials: Credentials,
}

impl Client {
    /// Connects now (so that a wrong endpoint or a TLS failure is reported here, not at the
    /// first call).
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        let endpoint = endpoint(config)?;
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            endpoint: config.endpoint.clone(),
            message: error_chain(&e),
        })?;
        Self::over(channel, &config.credential)
    }

    /// Does not connect until the first call (the relay's reconnecting loops use this).
    pub fn connect_lazy(config: &ClientConfig) -> Result<Self, ClientError> {
        let channel = endpoint(config)?.connect_lazy();
        Self::over(channel, &config.credential)
    }

    fn over(channel: Channel, credential: &Credential) -> Result<Self, ClientError> {
        let header = match &credential.0 {
            Some(token) => Some(
                AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    ClientError::Credential("holds characters not allowed in a header".into())
                })?,
            ),
            None => None,
        };
        Ok(Self {
            channel,
            credentials: Credentials(header),
        })
    }

    /// The channel with the credential attached, for any generated client.
    pub fn authed_channel(&self) -> AuthedChannel {
        InterceptedService::new(self.channel.clone(), self.credentials.clone())
    }

    pub fn change_requests(&self) -> ChangeRequestsClient<AuthedChannel> {
        ChangeRequestsClient::new(self.authed_channel()).max_decoding_message_size(64 * 1024 * 1024)
    }

    pub fn policies(&self) -> PoliciesClient<AuthedChannel> {
        PoliciesClient::new(self.authed_channel()).max_decoding_message_size(64 * 1024 * 1024)
    }
}

fn endpoint(config: &ClientConfig) -> Result<Endpoint, ClientError> {
    let bad = |message: String| ClientError::Endpoint {
        endpoint: config.endpoint.clone(),
        message,
    };
    let scheme = config
        .endpoint
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .ok_or_else(|| bad("must start with http:// or https://".into()))?;
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    if let Some(timeout) = config.timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let tls = &config.tls;
    match scheme.as_str() {
        "https" => {
            endpoint = endpoint
                .tls_config(tls_config(tls)?)
                .map_err(|e| bad(error_chain(&e)))?
        }
        "http" => {
            if tls.ca_file.is_some() || tls.cert_file.is_some() || tls.key_file.is_some() {
                return Err(bad(
                    "TLS files are set but the endpoint is http://: use https://".into(),
                ));
            }
        }
        other => return Err(bad(format!("scheme {other:?} is neither http nor https"))),
    }
    Ok(endpoint)
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn tls_config(tls: &ClientTls) -> Result<ClientTlsConfig, ClientError> {
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_file {
        Some(path) => config.ca_certificate(Certificate::from_pem(read(path)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(ClientError::Tls(
                "a client certificate needs both cert_file and key_file".into(),
            ));
        }
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// An error and its sources on one line (tonic's transport errors hide the cause).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_from_env_prefers_the_api_key_and_skips_blank_values() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        assert_eq!(
            Credential::from_env(env(&[(API_KEY_ENV, "k"), (TOKEN_ENV, "t")])),
            Credential::bearer("k")
        );
        assert_eq!(
            Credential::from_env(env(&[(API_KEY_ENV, "  "), (TOKEN_ENV, "t")])),
            Credential::bearer("t")
        );
        assert!(!Credential::from_env(env(&[])).is_present());
        assert_eq!(
            format!("{:?}", Credential::bearer("secret")),
            "Credential(<redacted>)"
        );
    }

    #[test]
    fn endpoints_are_checked_before_connecting() {
        let refused =
            |config: ClientConfig| Client::connect_lazy(&config).err().map(|e| e.to_string());
        assert!(
            refused(ClientConfig::new("localhost:50051"))
                .is_some_and(|m| m.contains("must start with http:// or https://"))
        );
        let with_ca = ClientConfig::new("http://127.0.0.1:1").with_tls(ClientTls {
            ca_file: Some("ca.pem".into()),
            ..ClientTls::default()
        });
        assert!(refused(with_ca).is_some_and(|m| m.contains("use https://")));
        let half = ClientConfig::new("https://127.0.0.1:1").with_tls(ClientTls {
            cert_file: Some("c.pem".into()),
            ..ClientTls::default()
        });
        assert!(refused(half).is_some_and(|m| m.contains("needs both cert_file and key_file")));
    }
}
