//! TLS of the server's own calls: to appliers (tonic's client, per `apply.allowed_endpoints`
//! entry) and to the JWKS URL (reqwest). Both verify the server's certificate by default, with
//! the system's roots or the given CA file, and may present a client certificate.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::allowed_endpoints::EndpointTls;

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// The TLS of a channel to an `https://` applier endpoint.
pub fn applier_tls(settings: &EndpointTls) -> Result<ClientTlsConfig, String> {
    let mut tls = ClientTlsConfig::new();
    if settings.ca_file.is_empty() {
        tls = tls.with_native_roots();
    } else {
        super::read_certificates(&settings.ca_file)?;
        tls = tls.ca_certificate(Certificate::from_pem(read(&settings.ca_file)?));
    }
    if !settings.cert_file.is_empty() {
        tls = tls.identity(identity(&settings.cert_file, &settings.key_file)?);
    }
    Ok(tls)
}

fn identity(cert_file: &str, key_file: &str) -> Result<Identity, String> {
    let cert = read(cert_file)?;
    let key = read(key_file)?;
    super::certified_key(cert_file, &cert, key_file, &key).map_err(|(_, message)| message)?;
    Ok(Identity::from_pem(cert, key))
}

/// The JWKS client: verified TLS (system roots, or `ca_file` alone), an optional client
/// certificate, no redirects.
pub fn jwks_client(
    ca_file: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<reqwest::Client, String> {
    super::install_default_provider();
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    if !ca_file.is_empty() {
        let certificates = reqwest::Certificate::from_pem_bundle(&read(ca_file)?)
            .map_err(|e| format!("{ca_file}: {e}"))?;
        builder = builder.tls_certs_only(certificates);
    }
    if !cert_file.is_empty() {
        let cert = read(cert_file)?;
        let key = read(key_file)?;
        super::certified_key(cert_file, &cert, key_file, &key).map_err(|(_, message)| message)?;
        let mut pem = cert;
        pem.push(b'\n');
        pem.extend_from_slice(&key);
        let identity =
            reqwest::Identity::from_pem(&pem).map_err(|e| format!("{cert_file}: {e}"))?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}
