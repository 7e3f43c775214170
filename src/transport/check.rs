//! What the server refuses to start with: the configuration's own checks of types and ranges,
//! the meaning of its `[auth]` section, and the files of `[tls]` (readable, parsed, the key the
//! certificate's). `config check` and `serve` both run [`check_config`], so they refuse the same
//! configurations with the same messages; [`warnings`] is what both report and start anyway.

use crate::{
    auth,
    config::{Config, ConfigError, tls::ClientAuth},
};

/// Logged at start, and shown by `config check`, for a non-loopback `listen` without `[tls]`.
pub const PLAIN_TEXT_WARNING: &str = "serving plain text on a non-loopback address: credentials and changes cross the network in clear text unless something in front (a service mesh) terminates TLS; set tls.cert_file and tls.key_file";

pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    let invalid = |key: String, message: String| ConfigError::Invalid {
        key,
        source_name: "the merged configuration".to_owned(),
        message,
    };
    auth::validate_config(&config.auth).map_err(|(key, message)| invalid(key, message))?;
    crate::tls::check_config(&config.tls)?;
    if !config.auth.client_certs.is_empty() && config.tls.client_auth == ClientAuth::None {
        return Err(invalid(
            "auth.client_certs".to_owned(),
            "needs tls.client_auth = \"optional\" or \"required\": without it no client certificate is asked for".to_owned(),
        ));
    }
    for (key, path) in config.apply.allowed_endpoints.files() {
        let readable = if key.ends_with(".key_file") {
            std::fs::read(path)
                .map(drop)
                .map_err(|e| format!("cannot read {path}: {e}"))
        } else {
            crate::tls::read_certificates(path).map(drop)
        };
        readable.map_err(|message| invalid(key, message))?;
    }
    if let Some(jwt) = &config.auth.jwt {
        for (key, path) in [
            ("auth.jwt.jwks_ca_file", &jwt.jwks_ca_file),
            ("auth.jwt.jwks_cert_file", &jwt.jwks_cert_file),
        ] {
            if !path.is_empty() {
                crate::tls::read_certificates(path).map_err(|m| invalid(key.to_owned(), m))?;
            }
        }
        if jwt.jwks_cert_file.is_empty() != jwt.jwks_key_file.is_empty() {
            return Err(invalid(
                "auth.jwt.jwks_key_file".to_owned(),
                "jwks_cert_file and jwks_key_file go together".to_owned(),
            ));
        }
    }
    Ok(())
}

/// What the configuration allows but an operator should know: the server starts anyway.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if !config.tls.is_enabled()
        && let Ok(addr) = config.listen_addr()
        && !addr.ip().is_loopback()
    {
        warnings.push(format!("listen {addr}: {PLAIN_TEXT_WARNING}"));
    }
    warnings
}
