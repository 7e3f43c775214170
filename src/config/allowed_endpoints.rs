//! `apply.allowed_endpoints`: the applier endpoints this server may call.
//!
//! A policy's `applier_endpoint` is written by a project admin, but the call comes from the
//! server, from inside its network: without a limit an admin could make the server call any
//! internal host and read the callee's error text back in `apply_error`. The operator lists
//! where appliers live; everything else is refused when a policy is written and again right
//! before each call (the list may have changed since, or an old snapshot holds an endpoint).
//!
//! An entry is `scheme://host[:port]` (a trailing `/` is allowed):
//! - `scheme`: `http` or `https`, matched exactly;
//! - `host`: a host name (case-insensitive), an IPv4 address or a bracketed IPv6 address, matched
//!   exactly; or `*.example.com`, any name that ends in `.example.com` (not `example.com`
//!   itself, never an IP address);
//! - `port`: matched exactly, against the endpoint's port or its scheme's default (80, 443);
//!   without a port, any port.
//!
//! An endpoint must be `http://` or `https://` + host + optional port, with at most a `/` after
//! it: userinfo (`user@`), any other path, a query or a fragment is refused. Endpoints are
//! parsed and compared by their scheme, host and port, never as string prefixes, so
//! `http://flags.internal.evil.example` is not `http://flags.internal`. Host names are compared
//! as names: the server does not check what they resolve to, so list only names whose DNS the
//! operator controls.
//!
//! An entry is a string, or a table that adds how the call is secured (see [`EndpointTls`]):
//!
//! ```toml
//! allowed_endpoints = [
//!   "https://*.apply.svc.cluster.local:8443",               # system roots, no client cert
//!   { endpoint = "https://flags.internal:8443", ca_file = "/etc/approvals/applier-ca.pem",
//!     cert_file = "/etc/approvals/client.pem", key_file = "/etc/approvals/client-key.pem" },
//!   { endpoint = "http://127.0.0.1:9000", allow_insecure = true },   # clear text, explicitly
//! ]
//! ```
//!
//! An `http://` entry sends the change (and nothing proves who calls) in clear text: it is
//! refused when the configuration loads unless it says `allow_insecure = true`.
//!
//! Over 500 lines with its tests, which are most of it: every way an endpoint can be written
//! (ports, schemes, IP literals, DNS names, wildcards) is a case a test holds.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Lower-cased.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// An applier endpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    scheme: Scheme,
    host: Host,
    /// Given, or the scheme's default.
    port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(Host),
    /// `*.example.com`, held as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    scheme: Scheme,
    host: HostPattern,
    /// `None`: any port.
    port: Option<u16>,
    tls: EndpointTls,
}

/// How the server secures its calls to the endpoints of one entry. Paths are PEM files, read
/// when the first call to an endpoint opens its channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointTls {
    /// CAs that sign the applier's certificate; empty: the system's roots.
    pub ca_file: String,
    /// A client certificate (PEM chain) the server presents, with `key_file`.
    pub cert_file: String,
    pub key_file: String,
    /// Required on an `http://` entry: the calls are made in clear text.
    pub allow_insecure: bool,
}

/// An entry as the file writes it: a string, or a table with the settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EntryTable {
    endpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    ca_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key_file: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    allow_insecure: bool,
}

impl EntryTable {
    fn new(endpoint: String, tls: EndpointTls) -> Self {
        Self {
            endpoint,
            ca_file: tls.ca_file,
            cert_file: tls.cert_file,
            key_file: tls.key_file,
            allow_insecure: tls.allow_insecure,
        }
    }

    fn tls(&self) -> EndpointTls {
        EndpointTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            allow_insecure: self.allow_insecure,
        }
    }
}

impl Entry {
    fn allows(&self, target: &Target) -> bool {
        let host = match (&self.host, &target.host) {
            (HostPattern::Exact(host), given) => host == given,
            (HostPattern::Suffix(suffix), Host::Name(name)) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
            (HostPattern::Suffix(_), Host::Ip(_)) => false,
        };
        self.scheme == target.scheme && host && self.port.is_none_or(|port| port == target.port)
    }
}

/// The `apply.allowed_endpoints` list. Empty (the default): no applier endpoint is allowed.
#[derive(Debug, Clone, Default)]
pub struct AllowedEndpoints {
    /// The entries' endpoints as written.
    texts: Vec<String>,
    /// As written, for `config check`: a plain string stays one.
    written: Vec<Written>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
enum Written {
    Plain(String),
    Table(EntryTable),
}

impl PartialEq for AllowedEndpoints {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

/// Why an endpoint may not be called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointRefusal {
    /// Not an endpoint this server can call at all.
    Malformed(String),
    /// A well-formed endpoint the list does not hold.
    NotAllowed {
        /// `scheme://host:port`, as an operator would add it.
        normalized: String,
        /// The list is empty.
        none_allowed: bool,
    },
}

impl fmt::Display for EndpointRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => f.write_str(why),
            Self::NotAllowed {
                normalized,
                none_allowed: true,
            } => write!(
                f,
                "is not allowed: this server allows no applier endpoint (apply.allowed_endpoints \
                 is empty); an operator must add {normalized:?} (or a pattern covering it) to \
                 apply.allowed_endpoints first"
            ),
            Self::NotAllowed { normalized, .. } => write!(
                f,
                "is not allowed by this server's apply.allowed_endpoints; an operator must add \
                 {normalized:?} (or a pattern covering it) to apply.allowed_endpoints first"
            ),
        }
    }
}

impl AllowedEndpoints {
    /// Parses plain entries (no TLS settings, so no `http://`); an error names the bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut list = Self::default();
        for text in entries {
            list.push(Written::Plain(text.as_ref().trim().to_owned()))?;
        }
        Ok(list)
    }

    /// Adds an entry with its settings (`allow_insecure` for `http://`, CA and client files
    /// for `https://`); the error names the entry.
    pub fn with(mut self, endpoint: &str, tls: EndpointTls) -> Result<Self, String> {
        self.push(Written::Table(EntryTable::new(
            endpoint.trim().to_owned(),
            tls,
        )))?;
        Ok(self)
    }

    /// `endpoints` allowed in clear text (`allow_insecure = true`): tests and loopback appliers.
    pub fn insecure<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, String> {
        endpoints
            .iter()
            .try_fold(Self::default(), |list, endpoint| {
                list.with(
                    endpoint.as_ref(),
                    EndpointTls {
                        allow_insecure: true,
                        ..EndpointTls::default()
                    },
                )
            })
    }

    fn push(&mut self, written: Written) -> Result<(), String> {
        let i = self.entries.len();
        let (text, tls) = match &written {
            Written::Plain(text) => (text.trim(), EndpointTls::default()),
            Written::Table(table) => (table.endpoint.trim(), table.tls()),
        };
        let mut entry = parse_entry(text).map_err(|why| format!("entry [{i}] {text:?} {why}"))?;
        match entry.scheme {
            Scheme::Http if !tls.allow_insecure => {
                return Err(format!(
                    "entry [{i}] {text:?} would send applier calls in clear text: write \
                     {{ endpoint = {text:?}, allow_insecure = true }} to allow that, or use https://"
                ));
            }
            Scheme::Http
                if !(tls.ca_file.is_empty()
                    && tls.cert_file.is_empty()
                    && tls.key_file.is_empty()) =>
            {
                return Err(format!(
                    "entry [{i}] {text:?}: ca_file, cert_file and key_file are for https:// entries"
                ));
            }
            Scheme::Https if tls.allow_insecure => {
                return Err(format!(
                    "entry [{i}] {text:?}: allow_insecure is for http:// entries; https:// is always verified"
                ));
            }
            _ => {}
        }
        if tls.cert_file.is_empty() != tls.key_file.is_empty() {
            return Err(format!(
                "entry [{i}] {text:?}: cert_file and key_file go together"
            ));
        }
        entry.tls = tls;
        self.texts.push(text.to_owned());
        self.written.push(written);
        self.entries.push(entry);
        Ok(())
    }

    /// The entries' endpoints as written.
    pub fn entries(&self) -> &[String] {
        &self.texts
    }

    /// The files the entries name, with the key that names each (`config check` reads them).
    pub fn files(&self) -> Vec<(String, &str)> {
        let mut files = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            for (name, path) in [
                ("ca_file", &entry.tls.ca_file),
                ("cert_file", &entry.tls.cert_file),
                ("key_file", &entry.tls.key_file),
            ] {
                if !path.is_empty() {
                    files.push((
                        format!("apply.allowed_endpoints[{i}].{name}"),
                        path.as_str(),
                    ));
                }
            }
        }
        files
    }

    /// Whether the server may call `endpoint`, and how (the first entry that allows it).
    pub fn check(&self, endpoint: &str) -> Result<&EndpointTls, EndpointRefusal> {
        let target = parse_target(endpoint).map_err(EndpointRefusal::Malformed)?;
        match self.entries.iter().find(|entry| entry.allows(&target)) {
            Some(entry) => Ok(&entry.tls),
            None => Err(EndpointRefusal::NotAllowed {
                normalized: target.to_string(),
                none_allowed: self.entries.is_empty(),
            }),
        }
    }
}

impl<'de> Deserialize<'de> for AllowedEndpoints {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// A string or a table.
        struct EntryVisitor;

        impl<'de> serde::de::Visitor<'de> for EntryVisitor {
            type Value = Written;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an endpoint string, or a table { endpoint = \"...\", ... }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Written, E> {
                Ok(Written::Plain(text.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Written, A::Error> {
                EntryTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Written::Table)
            }
        }

        struct Item(Written);

        impl<'de> Deserialize<'de> for Item {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(EntryVisitor).map(Item)
            }
        }

        let items = Vec::<Item>::deserialize(deserializer)?;
        let mut list = Self::default();
        for Item(written) in items {
            list.push(written).map_err(serde::de::Error::custom)?;
        }
        Ok(list)
    }
}

/// The entries as written.
impl Serialize for AllowedEndpoints {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.written.len()))?;
        for written in &self.written {
            match written {
                Written::Plain(text) => seq.serialize_element(text)?,
                Written::Table(table) => seq.serialize_element(table)?,
            }
        }
        seq.end()
    }
}

/// `scheme://` and what follows, with the scheme checked.
fn split_scheme(text: &str) -> Result<(Scheme, &str), String> {
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '\\' || *c == '%')
    {
        return Err(format!("must not contain {c:?}"));
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("must start with http:// or https://".into());
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => {
            return Err(format!(
                "has scheme {scheme:?}: only http and https are allowed"
            ));
        }
    };
    Ok((scheme, rest))
}

/// The authority (`host[:port]`) of what follows `scheme://`, refusing userinfo, a path other
/// than `/`, a query and a fragment.
fn authority(rest: &str) -> Result<&str, String> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err("must not contain userinfo (user@ or user:password@)".into());
    }
    if !(tail.is_empty() || tail == "/") {
        return Err(
            "must be scheme://host[:port] only: no path (other than /), query or fragment".into(),
        );
    }
    if authority.is_empty() {
        return Err("has no host".into());
    }
    Ok(authority)
}

/// `host` and the port, if given.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some((ip, after)) = inner.split_once(']') else {
            return Err("has an unclosed '[' in its host".into());
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("has {p:?} after its IPv6 address"))?,
            ),
        };
        (&authority[..ip.len() + 2], port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => match p.parse() {
            Ok(0) | Err(_) => return Err(format!("has port {p:?}: expected 1 to 65535")),
            Ok(n) => Some(n),
        },
        Some(p) => return Err(format!("has port {p:?}: expected 1 to 65535")),
    };
    Ok((host, port))
}

/// A host: a bracketed IPv6 address, a dotted IPv4 address, or a DNS name (lower-cased).
fn parse_host(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("has {host:?}, which is not an IPv6 address"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    check_name(host)?;
    Ok(Host::Name(host.to_ascii_lowercase()))
}

/// A DNS name: labels of ASCII letters, digits and '-', the last not a number (so nothing a
/// resolver reads as an IPv4 address in another notation, like `127.1` or `0x7f000001`).
fn check_name(name: &str) -> Result<(), String> {
    let labels: Vec<&str> = name.split('.').collect();
    let well_formed = name.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !well_formed {
        return Err(format!(
            "has host {name:?}: expected a host name (letters, digits, '-' and '.'), an IPv4 \
             address or a bracketed IPv6 address"
        ));
    }
    let last = labels.last().copied().unwrap_or_default();
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()));
    if hex || last.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "has host {name:?}, which is neither a host name nor a dotted IPv4 address"
        ));
    }
    Ok(())
}

fn parse_target(text: &str) -> Result<Target, String> {
    let (scheme, rest) = split_scheme(text)?;
    let (host, port) = split_port(authority(rest)?)?;
    let host = parse_host(host)?;
    // What the client that makes the call (tonic, through `http::Uri`) reads must be what was
    // checked: the same host, or no call at all.
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("is not a URI the server can call: {e}"))?;
    let same_host = uri.host().is_some_and(|h| match &host {
        Host::Name(name) => h.eq_ignore_ascii_case(name),
        Host::Ip(IpAddr::V4(ip)) => h.parse::<Ipv4Addr>().ok() == Some(*ip),
        Host::Ip(IpAddr::V6(ip)) => {
            h.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<Ipv6Addr>().ok())
                == Some(*ip)
        }
    });
    if !same_host || uri.port_u16() != port {
        return Err("is ambiguous: it is read as another host or port".into());
    }
    Ok(Target {
        scheme,
        port: port.unwrap_or(scheme.default_port()),
        host,
    })
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let (scheme, rest) = split_scheme(text)?;
    let (host, port) = split_port(authority(rest)?)?;
    let host = match host.strip_prefix("*.") {
        Some(suffix) => {
            check_name(suffix)?;
            HostPattern::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        }
        None if host.contains('*') => {
            return Err("may use '*' only as the whole first label (*.example.com)".into());
        }
        None => HostPattern::Exact(parse_host(host)?),
    };
    Ok(Entry {
        scheme,
        host,
        port,
        tls: EndpointTls::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries, `http://` ones with `allow_insecure`.
    fn list(entries: &[&str]) -> AllowedEndpoints {
        entries
            .iter()
            .try_fold(AllowedEndpoints::default(), |list, entry| {
                let allow_insecure = entry.starts_with("http://");
                list.with(
                    entry,
                    EndpointTls {
                        allow_insecure,
                        ..EndpointTls::default()
                    },
                )
            })
            .expect("valid entries")
    }

    fn allowed(list: &AllowedEndpoints, endpoint: &str) -> bool {
        list.check(endpoint).is_ok()
    }

    #[test]
    fn empty_allows_nothing() {
        let none = AllowedEndpoints::default();
        let err = none.check("http://127.0.0.1:8080").expect_err("refused");
        assert_eq!(
            err,
            EndpointRefusal::NotAllowed {
                normalized: "http://127.0.0.1:8080".into(),
                none_allowed: true
            }
        );
        assert!(err.to_string().contains("apply.allowed_endpoints"), "{err}");
    }

    #[test]
    fn exact_hosts_match_by_scheme_host_and_port() {
        let l = list(&[
            "http://127.0.0.1",
            "https://flags.internal:8443/",
            "http://[::1]:9000",
        ]);
        assert!(allowed(&l, "http://127.0.0.1:50051"));
        assert!(allowed(&l, "http://127.0.0.1"));
        assert!(allowed(&l, "http://127.0.0.1/"));
        assert!(allowed(&l, "https://FLAGS.internal:8443"));
        assert!(allowed(&l, "HTTPS://flags.internal:8443"));
        assert!(allowed(&l, "http://[0:0::1]:9000"));
        // Another scheme, port, host.
        assert!(!allowed(&l, "https://127.0.0.1:50051"));
        assert!(!allowed(&l, "https://flags.internal"), "443 is not 8443");
        assert!(!allowed(&l, "https://flags.internal:8444"));
        assert!(!allowed(&l, "http://flags.internal:8443"));
        assert!(!allowed(&l, "http://[::1]:9001"));
        assert!(!allowed(&l, "http://127.0.0.2:50051"));
        assert!(!allowed(&l, "http://localhost:50051"));
    }

    #[test]
    fn a_default_port_is_the_schemes() {
        let l = list(&["http://flags.internal:80", "https://deploy.internal:443"]);
        assert!(allowed(&l, "http://flags.internal"));
        assert!(allowed(&l, "https://deploy.internal"));
        assert!(!allowed(&l, "http://flags.internal:8080"));
    }

    #[test]
    fn prefixes_and_lookalikes_do_not_match() {
        let l = list(&["http://good.example.com", "http://127.0.0.1:8080"]);
        for endpoint in [
            "http://good.example.com.evil.net",
            "http://good.example.com.evil.net:80",
            "http://evilgood.example.com",
            "http://sub.good.example.com",
            "http://127.0.0.1:80800",
            "http://127.0.0.1:8080.evil.net",
            "http://127.0.0.10:8080",
        ] {
            assert!(!allowed(&l, endpoint), "{endpoint}");
        }
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let l = list(&["https://*.svc.cluster.local:8443", "http://*.Internal"]);
        assert!(allowed(&l, "https://flags.web.svc.cluster.local:8443"));
        assert!(allowed(&l, "http://a.internal:1234"));
        assert!(allowed(&l, "http://a.b.INTERNAL"));
        assert!(
            !allowed(&l, "https://svc.cluster.local:8443"),
            "the suffix itself"
        );
        assert!(!allowed(&l, "http://internal"));
        assert!(!allowed(&l, "http://a.internal.evil.net"));
        assert!(!allowed(&l, "http://ainternal"));
        assert!(!allowed(&l, "https://flags.web.svc.cluster.local:443"));
        assert!(!allowed(&l, "http://10.0.0.1"));
    }

    #[test]
    fn endpoints_with_more_than_scheme_host_port_are_refused() {
        let l = list(&["http://127.0.0.1", "http://good.example.com"]);
        for endpoint in [
            "http://user@127.0.0.1:8080",
            "http://user:pw@127.0.0.1:8080",
            "http://good.example.com@evil.net",
            "http://evil.net@good.example.com",
            "http://127.0.0.1:8080/admin",
            "http://127.0.0.1:8080//",
            "http://127.0.0.1:8080?x=1",
            "http://127.0.0.1:8080/?x=1",
            "http://127.0.0.1:8080#frag",
            "http://127.0.0.1:8080/#frag",
            "127.0.0.1:8080",
            "flags.internal:443",
            "ftp://127.0.0.1",
            "unix:///tmp/applier.sock",
            "http://",
            "http://:8080",
            "http://127.0.0.1:",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:+80",
            "http://127.1:8080",
            "http://2130706433",
            "http://0x7f000001",
            "http://good.example.com.",
            "http://good..example.com",
            "http://good_example.com",
            "http://good.example.com%2eevil.net",
            "http://good.example.com\\@evil.net",
            "http://good.example.com /",
            " http://127.0.0.1",
            "http://[::1",
            "http://[::1]x",
            "http://[fe80::1%25eth0]:80",
            "http://127.0.0.1:8080:9090",
        ] {
            let err = l.check(endpoint).expect_err(endpoint);
            assert!(
                matches!(err, EndpointRefusal::Malformed(_)),
                "{endpoint}: {err:?}"
            );
        }
    }

    #[test]
    fn bad_entries_are_named() {
        for entry in [
            "127.0.0.1",
            "grpc://127.0.0.1",
            "http://127.0.0.1/path",
            "http://user@127.0.0.1",
            "http://*",
            "http://*.",
            "http://a.*.com",
            "http://*example.com",
            "http://*.10.0.0.1",
            "http://127.0.0.1:x",
        ] {
            let err = AllowedEndpoints::insecure(&["http://ok.internal", entry]).expect_err(entry);
            assert!(err.starts_with("entry [1] "), "{entry}: {err}");
        }
    }

    /// Clear text is said per entry; TLS files belong to https:// entries; a table entry is
    /// written back as a table, a plain one as a string.
    #[test]
    fn http_needs_allow_insecure_and_tables_round_trip() {
        let err = AllowedEndpoints::parse(&["http://127.0.0.1"]).expect_err("clear text");
        assert!(err.contains("allow_insecure = true"), "{err}");
        let text = r#"allowed_endpoints = [
            "https://*.svc:8443",
            { endpoint = "https://flags.internal", ca_file = "/ca.pem", cert_file = "/c.pem", key_file = "/k.pem" },
            { endpoint = "http://127.0.0.1:9000", allow_insecure = true },
        ]"#;
        #[derive(Deserialize, Serialize)]
        struct Apply {
            allowed_endpoints: AllowedEndpoints,
        }
        let parsed: Apply = toml::from_str(text).expect("entries");
        let list = &parsed.allowed_endpoints;
        assert_eq!(
            list.check("https://flags.internal")
                .map(|t| t.ca_file.as_str()),
            Ok("/ca.pem")
        );
        assert!(
            list.check("http://127.0.0.1:9000")
                .is_ok_and(|t| t.allow_insecure)
        );
        assert_eq!(
            list.check("https://a.svc:8443"),
            Ok(&EndpointTls::default())
        );
        let again: Apply =
            toml::from_str(&toml::to_string(&parsed).expect("renders")).expect("loads back");
        assert_eq!(&again.allowed_endpoints, list);
        for (bad, why) in [
            (
                r#"[{ endpoint = "https://a", allow_insecure = true }]"#,
                "allow_insecure is for http://",
            ),
            (
                r#"[{ endpoint = "http://a", allow_insecure = true, ca_file = "x" }]"#,
                "are for https://",
            ),
            (
                r#"[{ endpoint = "https://a", cert_file = "x" }]"#,
                "go together",
            ),
            (
                r#"[{ endpoint = "https://a", cafile = "x" }]"#,
                "unknown field",
            ),
        ] {
            let err = toml::from_str::<Apply>(&format!("allowed_endpoints = {bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
