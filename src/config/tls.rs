//! The `[tls]` section: the server's own certificate and how it treats client certificates.
//!
//! ```toml
//! [tls]
//! cert_file = "/etc/approvals/tls/tls.crt"   # PEM: the certificate, then its chain
//! key_file = "/etc/approvals/tls/tls.key"    # PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)
//! client_ca_file = "/etc/approvals/tls/ca.crt"
//! client_auth = "optional"                   # none | optional | required
//! reload_interval = "60s"
//! ```
//!
//! Without `cert_file` the server speaks plain text (a mesh may terminate TLS). The files are
//! checked when the configuration loads (`crate::tls::check_config`) and re-read every
//! `reload_interval` while the server runs.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

use super::fields;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first. Empty: no TLS.
    pub cert_file: String,
    /// The private key of the leaf certificate (PEM).
    pub key_file: String,
    /// CAs (PEM) that sign client certificates; required unless `client_auth = "none"`.
    pub client_ca_file: String,
    /// Whether callers present a certificate: `none` (not asked), `optional` (verified when
    /// sent), `required` (the handshake fails without one).
    pub client_auth: ClientAuth,
    /// How often the files are checked for a change on disk.
    #[serde(with = "fields::duration::positive")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            client_auth: ClientAuth::None,
            reload_interval: Duration::from_secs(60),
        }
    }
}

impl TlsConfig {
    /// Whether the server serves TLS.
    pub fn is_enabled(&self) -> bool {
        !self.cert_file.trim().is_empty()
    }
}

/// `tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    #[default]
    None,
    Optional,
    Required,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ClientAuth {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ClientAuth {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "none" => Ok(Self::None),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(D::Error::custom(format!(
                "{other:?} is not a client_auth: expected \"none\", \"optional\" or \"required\""
            ))),
        }
    }
}
