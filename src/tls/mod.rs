//! TLS with rustls (the `ring` provider; no OpenSSL): the server's certificate, reloaded from
//! disk without a restart ([`ServerTls`]), the verification of client certificates, the
//! configurations of the server's own outbound calls ([`outbound`]), and throwaway certificates
//! for local use ([`dev`]).
//!
//! tonic's `ServerTlsConfig` is fixed once the server starts, so the server runs its own
//! handshake (tokio-rustls) in its accept loop (`transport/connection.rs`): the certificate is
//! picked per handshake by a [`ResolvesServerCert`] that reads the current one from an
//! [`ArcSwap`], and client certificates are verified by a verifier swapped the same way. A
//! reload swaps both; connections already open keep the session they negotiated.

pub mod dev;
pub mod outbound;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::config::{
    ConfigError,
    tls::{ClientAuth, TlsConfig},
};

/// What the server knows of a connection, in every request's extensions (tonic's connect info).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The client's certificate chain, leaf first, verified against `tls.client_ca_file` in
    /// the handshake; `None` without TLS or without a client certificate.
    pub peer_certificates: Option<PeerCertificates>,
}

/// A verified client certificate chain, leaf first.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<[CertificateDer<'static>]>);

impl PeerCertificates {
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.0.first()
    }
}

/// The crypto provider of every TLS configuration of the server: rustls' `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process's default provider (reqwest and tonic's clients look it up);
/// a second call changes nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates of a PEM file, in order (a leaf and its chain, or CAs).
pub fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    parse_certificates(path, &bytes)
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("cannot read {path}: {e}"))
}

fn parse_certificates(path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not a PEM certificate file: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certificates)
}

fn parse_key(path: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(
    cert_path: &str,
    cert_pem: &[u8],
    key_path: &str,
    key_pem: &[u8],
) -> Result<CertifiedKey, (&'static str, String)> {
    let chain = parse_certificates(cert_path, cert_pem).map_err(|m| ("cert_file", m))?;
    let key = parse_key(key_path, key_pem).map_err(|m| ("key_file", m))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ("key_file", format!("{key_path}: unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err((
            "key_file",
            format!("{key_path} is not the key of the certificate in {cert_path}: {e}"),
        )),
    }
}

/// The roots of a CA file.
pub fn root_store(path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|e| format!("{path}: not a CA certificate rustls accepts: {e}"))?;
    }
    Ok(roots)
}

/// The contents of the files of `[tls]`, as last read: a reload happens when they change.
#[derive(Clone, PartialEq, Eq, Default)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

/// What the files make: the server's certificate and the client verifier.
struct Loaded {
    certificate: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

fn read_files(config: &TlsConfig) -> Result<Files, (&'static str, String)> {
    Ok(Files {
        cert: read(&config.cert_file).map_err(|m| ("cert_file", m))?,
        key: read(&config.key_file).map_err(|m| ("key_file", m))?,
        client_ca: if config.client_ca_file.is_empty() {
            Vec::new()
        } else {
            read(&config.client_ca_file).map_err(|m| ("client_ca_file", m))?
        },
    })
}

fn load(config: &TlsConfig, files: &Files) -> Result<Loaded, (&'static str, String)> {
    let certificate = certified_key(&config.cert_file, &files.cert, &config.key_file, &files.key)?;
    let verifier = match config.client_auth {
        ClientAuth::None => WebPkiClientVerifier::no_client_auth(),
        auth => {
            let path = &config.client_ca_file;
            let mut roots = RootCertStore::empty();
            for certificate in
                parse_certificates(path, &files.client_ca).map_err(|m| ("client_ca_file", m))?
            {
                roots.add(certificate).map_err(|e| {
                    (
                        "client_ca_file",
                        format!("{path}: not a CA certificate rustls accepts: {e}"),
                    )
                })?;
            }
            let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let builder = if auth == ClientAuth::Optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder
                .build()
                .map_err(|e| ("client_ca_file", format!("{path}: {e}")))?
        }
    };
    Ok(Loaded {
        certificate: Arc::new(certificate),
        verifier,
    })
}

/// Checks `[tls]` as the server would load it: the files are readable and parse, the key is
/// the certificate's, a client CA is given when client certificates are asked for. The error
/// names the key.
pub fn check_config(config: &TlsConfig) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: format!("tls.{key}"),
        source_name: "the merged configuration".to_owned(),
        message,
    };
    if !config.is_enabled() {
        for (key, value) in [
            ("key_file", &config.key_file),
            ("client_ca_file", &config.client_ca_file),
        ] {
            if !value.trim().is_empty() {
                return Err(invalid(key, "needs tls.cert_file".to_owned()));
            }
        }
        if config.client_auth != ClientAuth::None {
            return Err(invalid(
                "client_auth",
                "needs tls.cert_file: client certificates are asked for in the TLS handshake"
                    .to_owned(),
            ));
        }
        return Ok(());
    }
    if config.key_file.trim().is_empty() {
        return Err(invalid(
            "key_file",
            "is required with tls.cert_file".to_owned(),
        ));
    }
    if config.client_auth != ClientAuth::None && config.client_ca_file.trim().is_empty() {
        return Err(invalid(
            "client_ca_file",
            format!(
                "is required with client_auth = \"{}\": the CAs that sign client certificates",
                config.client_auth
            ),
        ));
    }
    let files = read_files(config).map_err(|(key, m)| invalid(key, m))?;
    load(config, &files).map_err(|(key, m)| invalid(key, m))?;
    Ok(())
}

/// The server's TLS: the acceptor of its accept loop, over a certificate and a client verifier
/// that [`ServerTls::reload`] replaces when the files change.
pub struct ServerTls {
    config: TlsConfig,
    resolver: Arc<CurrentCertificate>,
    verifier: Arc<CurrentVerifier>,
    acceptor: tokio_rustls::TlsAcceptor,
    /// What the files held at the last attempt (loaded or refused), so each change is loaded
    /// (or reported) once.
    seen: Mutex<Files>,
    /// Reloads done and refused (also counted by the metric `approvals.tls.reloads`).
    reloaded: AtomicU64,
    failed: AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.config.cert_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tls.{key}: {message}")]
pub struct TlsSetupError {
    key: &'static str,
    message: String,
}

impl ServerTls {
    /// Loads the files of `[tls]` (TLS 1.2 and 1.3, ALPN `h2`).
    pub fn new(config: &TlsConfig) -> Result<Arc<Self>, TlsSetupError> {
        let error = |(key, message): (&'static str, String)| TlsSetupError { key, message };
        let files = read_files(config).map_err(error)?;
        let loaded = load(config, &files).map_err(error)?;
        let resolver = Arc::new(CurrentCertificate(ArcSwap::new(loaded.certificate)));
        let verifier = Arc::new(CurrentVerifier {
            current: ArcSwap::from_pointee(VerifierBox(loaded.verifier)),
            mandatory: config.client_auth == ClientAuth::Required,
            offered: config.client_auth != ClientAuth::None,
        });
        let mut server_config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsSetupError {
                key: "cert_file",
                message: e.to_string(),
            })?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(resolver.clone());
        server_config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(Self {
            config: config.clone(),
            resolver,
            verifier,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
            seen: Mutex::new(files),
            reloaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }))
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// `tls.reload_interval`.
    pub fn reload_interval(&self) -> Duration {
        self.config.reload_interval
    }

    /// Reads the files again; when they changed, loads them and swaps the certificate and the
    /// verifier in for new connections. A file that cannot be read or loaded leaves the current
    /// ones in place, logged (warn) and counted. Returns whether a new certificate is in use.
    pub fn reload(&self) -> bool {
        let files = match read_files(&self.config) {
            Ok(files) => files,
            Err((key, message)) => {
                // A rotation in progress (a file briefly missing) or a real problem: keep going.
                tracing::warn!(key = %format!("tls.{key}"), %message, "TLS files not reloaded; the current certificate stays in use");
                self.count_failure();
                return false;
            }
        };
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if *seen == files {
            return false;
        }
        *seen = files.clone();
        match load(&self.config, &files) {
            Ok(loaded) => {
                self.resolver.0.store(loaded.certificate);
                self.verifier
                    .current
                    .store(Arc::new(VerifierBox(loaded.verifier)));
                tracing::info!(cert_file = %self.config.cert_file, "TLS certificate reloaded; new connections use it");
                crate::telemetry::metrics::record_tls_reload("reloaded");
                self.reloaded.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err((key, message)) => {
                tracing::warn!(key = %format!("tls.{key}"), %message, "new TLS files refused; the current certificate stays in use");
                self.count_failure();
                false
            }
        }
    }

    fn count_failure(&self) {
        crate::telemetry::metrics::record_tls_reload("failed");
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Reloads done, and reloads refused (a file unreadable, or not loadable), so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloaded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Reloads every `tls.reload_interval` until the task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(tls.reload_interval());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let tls = tls.clone();
                // File reads block: off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
            }
        })
    }
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct CurrentCertificate(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

#[derive(Debug)]
struct VerifierBox(Arc<dyn ClientCertVerifier>);

/// The client verifier new handshakes use. It names no CA to the client (an empty list of
/// hints, which clients answer with the certificate they have), since the CAs may change.
#[derive(Debug)]
struct CurrentVerifier {
    current: ArcSwap<VerifierBox>,
    mandatory: bool,
    offered: bool,
}

impl ClientCertVerifier for CurrentVerifier {
    fn offer_client_auth(&self) -> bool {
        self.offered
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::dev::DevCa;

    fn config(dir: &Path, client_auth: ClientAuth) -> TlsConfig {
        let file = |name: &str| dir.join(name).display().to_string();
        TlsConfig {
            cert_file: file("server.pem"),
            key_file: file("server-key.pem"),
            client_ca_file: file("ca.pem"),
            client_auth,
            reload_interval: Duration::from_secs(60),
        }
    }

    fn serve_as(ca: &DevCa, dir: &Path, name: &str) {
        let leaf = ca.server(name, &["localhost"]).expect("leaf");
        std::fs::write(dir.join("server.pem"), leaf.cert_pem).expect("write");
        std::fs::write(dir.join("server-key.pem"), leaf.key_pem).expect("write");
    }

    /// Each change of the files is loaded or refused once, and counted; a refused change
    /// leaves the last good certificate in use.
    #[test]
    fn reloads_and_refusals_are_counted_once_per_change() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = DevCa::new("test CA").expect("ca");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("write");
        serve_as(&ca, dir.path(), "one");
        let tls = ServerTls::new(&config(dir.path(), ClientAuth::Required)).expect("loads");
        let first = tls.resolver.0.load_full();
        assert!(!tls.reload(), "unchanged files: nothing to do");
        assert_eq!(tls.reload_counts(), (0, 0));

        serve_as(&ca, dir.path(), "two");
        assert!(tls.reload());
        assert_eq!(tls.reload_counts(), (1, 0));
        let second = tls.resolver.0.load_full();
        assert_ne!(first.cert, second.cert, "the new certificate is served");

        std::fs::write(dir.path().join("server.pem"), "not a certificate").expect("write");
        assert!(!tls.reload());
        assert!(!tls.reload(), "the same bad file is not counted again");
        assert_eq!(tls.reload_counts(), (1, 1));
        assert_eq!(
            tls.resolver.0.load_full().cert,
            second.cert,
            "the old one stays"
        );

        std::fs::remove_file(dir.path().join("server-key.pem")).expect("remove");
        assert!(!tls.reload());
        assert_eq!(
            tls.reload_counts(),
            (1, 2),
            "an unreadable file is a failure too"
        );
    }

    #[test]
    fn the_configuration_is_checked_with_its_files() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = DevCa::new("test CA").expect("ca");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("write");
        serve_as(&ca, dir.path(), "one");
        let key = |result: Result<(), ConfigError>| match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => format!("{other:?}"),
        };
        assert!(check_config(&config(dir.path(), ClientAuth::Optional)).is_ok());
        let mut no_ca = config(dir.path(), ClientAuth::Required);
        no_ca.client_ca_file.clear();
        assert_eq!(key(check_config(&no_ca)), "tls.client_ca_file");
        let other = ca.server("other", &["localhost"]).expect("leaf");
        std::fs::write(dir.path().join("other-key.pem"), other.key_pem).expect("write");
        let mut mismatched = config(dir.path(), ClientAuth::None);
        mismatched.key_file = dir.path().join("other-key.pem").display().to_string();
        assert_eq!(key(check_config(&mismatched)), "tls.key_file");
        let off = TlsConfig {
            client_auth: ClientAuth::Required,
            ..TlsConfig::default()
        };
        assert_eq!(key(check_config(&off)), "tls.client_auth");
    }
}
