//! Throwaway certificates for local use (`approvals certs dev --out DIR`) and tests: a CA, and
//! server and client certificates it signs (ECDSA P-256, via rcgen). Never for production: the
//! CA's key is written beside the certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The SPIFFE ID of the client certificate `approvals certs dev` writes.
pub const DEV_CLIENT_SPIFFE_ID: &str = "spiffe://approvals.local/ns/dev/sa/cli";

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that signs [`Leaf`] certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, PEM.
    pub cert_pem: String,
    key_pem: String,
}

fn failed(e: rcgen::Error) -> String {
    format!("cannot make a certificate: {e}")
}

impl DevCa {
    /// A new self-signed CA named `name` (its subject CN).
    pub fn new(name: &str) -> Result<Self, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(failed)?;
        let certificate = params.self_signed(&key).map_err(failed)?;
        Ok(Self {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), subject CN `common_name`.
    pub fn server(&self, common_name: &str, names: &[&str]) -> Result<Leaf, String> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with subject CN `common_name`, and `uri_sans` (SPIFFE IDs, say) and
    /// `dns_sans` as subject alternative names.
    pub fn client(
        &self,
        common_name: &str,
        uri_sans: &[&str],
        dns_sans: &[&str],
    ) -> Result<Leaf, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for uri in uri_sans {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().map_err(failed)?));
        }
        for name in dns_sans {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into().map_err(failed)?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Leaf, String> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(failed)?;
        let certificate = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok(Leaf {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `ca.pem` (and `ca-key.pem`), `server.pem`/`server-key.pem` (localhost, 127.0.0.1,
/// ::1) and `client.pem`/`client-key.pem` (CN `dev-client`, URI SAN
/// [`DEV_CLIENT_SPIFFE_ID`]) into `out`, created if missing; returns the paths written.
pub fn write(out: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let ca = DevCa::new("approvals dev CA")?;
    let server = ca.server("localhost", &["localhost", "127.0.0.1", "::1"])?;
    let client = ca.client("dev-client", &[DEV_CLIENT_SPIFFE_ID], &[])?;
    let files = [
        ("ca.pem", &ca.cert_pem),
        ("ca-key.pem", &ca.key_pem),
        ("server.pem", &server.cert_pem),
        ("server-key.pem", &server.key_pem),
        ("client.pem", &client.cert_pem),
        ("client-key.pem", &client.key_pem),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = out.join(name);
        write_private(&path, text, name.ends_with("-key.pem"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn write_private(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}
