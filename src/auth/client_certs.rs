//! `[[auth.client_certs]]`: a client certificate the TLS handshake verified (against
//! `tls.client_ca_file`) is a caller when an entry matches it, by exactly one of
//! - `uri_san`: a URI subject alternative name, compared exactly (a SPIFFE ID such as
//!   `spiffe://example.org/ns/ci/sa/deployer`);
//! - `dns_san`: a DNS subject alternative name, compared case-insensitively;
//! - `common_name`: the subject's CN, compared exactly.
//!
//! The first matching entry wins (entries are refused at load when two match the same value).
//! A valid certificate that no entry matches is UNAUTHENTICATED (`CLIENT_CERTIFICATE_NOT_MAPPED`),
//! the message listing what the certificate holds.

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::{
    Authenticated, ClientCertConfig,
    api_keys::{Holder, holder},
    caller::AuthMethod,
};
use crate::error::ApiError;

enum Matcher {
    Uri(String),
    /// Lower-cased.
    Dns(String),
    CommonName(String),
}

struct Entry {
    matcher: Matcher,
    holder: Authenticated,
}

pub struct ClientCerts(Vec<Entry>);

/// The one field an entry matches on, and its value; an error unless exactly one is set.
pub(super) fn matcher_of(entry: &ClientCertConfig) -> Result<(&'static str, &str), String> {
    let set: Vec<(&'static str, &str)> = [
        ("uri_san", &entry.uri_san),
        ("dns_san", &entry.dns_san),
        ("common_name", &entry.common_name),
    ]
    .into_iter()
    .filter_map(|(field, value)| value.as_deref().map(|v| (field, v.trim())))
    .collect();
    match set.as_slice() {
        [(_, "")] => Err("must not be empty".to_owned()),
        [one] => Ok(*one),
        [] => Err("set one of uri_san, dns_san or common_name: what the entry matches".to_owned()),
        _ => Err("set only one of uri_san, dns_san and common_name".to_owned()),
    }
}

/// What a certificate says about its subject.
#[derive(Debug, Default)]
struct Names {
    uris: Vec<String>,
    dns: Vec<String>,
    common_name: Option<String>,
}

fn names(leaf: &CertificateDer<'_>) -> Result<Names, String> {
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let mut names = Names {
        common_name: certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        ..Names::default()
    };
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => names.uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => names.dns.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    Ok(names)
}

impl ClientCerts {
    pub fn new(configs: &[ClientCertConfig]) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(configs.len());
        for (i, config) in configs.iter().enumerate() {
            let (field, value) = matcher_of(config).map_err(|m| format!("[{i}]: {m}"))?;
            let matcher = match field {
                "uri_san" => Matcher::Uri(value.to_owned()),
                "dns_san" => Matcher::Dns(value.to_ascii_lowercase()),
                _ => Matcher::CommonName(value.to_owned()),
            };
            let holder = holder(
                &Holder {
                    principal: &config.principal,
                    groups: &config.groups,
                    scopes: &config.scopes,
                    projects: &config.projects,
                    act_as: &config.act_as,
                },
                AuthMethod::ClientCertificate,
            )
            .map_err(|(field, m)| format!("[{i}].{field}: {m}"))?;
            entries.push(Entry { matcher, holder });
        }
        Ok(Self(entries))
    }

    /// The caller a verified client certificate (its leaf) is.
    pub fn verify(&self, leaf: &CertificateDer<'_>) -> Result<Authenticated, ApiError> {
        let names = names(leaf).map_err(ApiError::CredentialsInvalid)?;
        let found = self.0.iter().find(|entry| match &entry.matcher {
            Matcher::Uri(uri) => names.uris.iter().any(|u| u == uri),
            Matcher::Dns(dns) => names.dns.iter().any(|d| d.eq_ignore_ascii_case(dns)),
            Matcher::CommonName(cn) => names.common_name.as_deref() == Some(cn.as_str()),
        });
        match found {
            Some(entry) => Ok(entry.holder.clone()),
            None => Err(ApiError::ClientCertificateNotMapped(format!(
                "the client certificate (URI SANs {:?}, DNS SANs {:?}, subject CN {:?}) matches no [[auth.client_certs]] entry (uri_san, dns_san or common_name); add one, or send `authorization: Bearer <API key or JWT>`",
                names.uris,
                names.dns,
                names.common_name.unwrap_or_default()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::dev::DevCa;

    fn entry(field: &str, value: &str, principal: &str) -> ClientCertConfig {
        let mut config = ClientCertConfig {
            principal: principal.into(),
            scopes: vec!["approvals:read".into()],
            projects: vec!["*".into()],
            ..Default::default()
        };
        match field {
            "uri_san" => config.uri_san = Some(value.into()),
            "dns_san" => config.dns_san = Some(value.into()),
            _ => config.common_name = Some(value.into()),
        }
        config
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("one")
            .expect("pem")
    }

    use rustls::pki_types::pem::PemObject;

    #[test]
    fn each_field_matches_and_others_do_not() {
        let ca = DevCa::new("test CA").expect("ca");
        let cert = der(&ca
            .client(
                "deployer",
                &["spiffe://example.org/ns/ci/sa/deployer"],
                &["Deployer.CI.svc"],
            )
            .expect("cert")
            .cert_pem);
        for (field, value) in [
            ("uri_san", "spiffe://example.org/ns/ci/sa/deployer"),
            ("dns_san", "deployer.ci.svc"),
            ("common_name", "deployer"),
        ] {
            let certs = ClientCerts::new(&[
                entry("uri_san", "spiffe://example.org/ns/other", "service:other"),
                entry(field, value, "service:deployer"),
            ])
            .expect("entries");
            let caller = certs.verify(&cert).expect(field).caller;
            assert_eq!(caller.principal.as_str(), "service:deployer", "{field}");
            assert_eq!(caller.method, AuthMethod::ClientCertificate);
        }
        let certs = ClientCerts::new(&[
            entry(
                "uri_san",
                "spiffe://example.org/ns/ci/sa/deployer/x",
                "service:x",
            ),
            entry("common_name", "Deployer", "service:x"),
        ])
        .expect("entries");
        let err = certs.verify(&cert).expect_err("no entry matches");
        assert!(
            matches!(&err, ApiError::ClientCertificateNotMapped(m) if m.contains("spiffe://example.org/ns/ci/sa/deployer")),
            "{err:?}"
        );
    }

    #[test]
    fn an_entry_matches_on_exactly_one_field() {
        let mut two = entry("uri_san", "spiffe://a", "service:a");
        two.common_name = Some("a".into());
        assert!(matcher_of(&two).is_err());
        let none = ClientCertConfig::default();
        assert!(matcher_of(&none).is_err());
        assert!(matcher_of(&entry("dns_san", " ", "service:a")).is_err());
    }
}
