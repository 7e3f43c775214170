//! TLS and mTLS (`[tls]`, `[[auth.client_certs]]`, TLS of applier calls): certificates made in
//! each test (rcgen, through `approvals::tls::dev`), the server called through the generated
//! client over tonic's TLS, and a raw rustls client where the served certificate matters.

use std::{path::PathBuf, sync::Arc, time::Duration};

use approvals::{
    config::{
        Config,
        allowed_endpoints::{AllowedEndpoints, EndpointTls},
        auth::{ApiKeyConfig, ClientCertConfig},
        tls::ClientAuth,
    },
    pb::{
        self,
        change_applier_server::{ChangeApplier, ChangeApplierServer},
        change_requests_client::ChangeRequestsClient,
        policies_client::PoliciesClient,
    },
    tls::dev::{DevCa, Leaf},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Code, Request, Response, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig},
};

use crate::{callers::*, common::*};

const DEPLOYER: &str = "spiffe://example.org/ns/ci/sa/deployer";

/// A CA, the server's certificate and the files `[tls]` names, in a temporary directory.
struct Pki {
    ca: DevCa,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            ca: DevCa::new("test CA").expect("ca"),
            dir: tempfile::tempdir().expect("dir"),
        };
        pki.write("ca.pem", &pki.ca.cert_pem);
        pki.serve_as("server-1");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        // Written beside and renamed, as cert-manager and Vault agents replace files.
        let temporary = self.path(&format!(".{name}.new"));
        std::fs::write(&temporary, text).expect("write");
        std::fs::rename(&temporary, self.path(name)).expect("rename");
    }

    /// A new server certificate with subject CN `common_name`, written to server.pem and
    /// server-key.pem.
    fn serve_as(&self, common_name: &str) -> Leaf {
        let leaf = self
            .ca
            .server(common_name, &["localhost", "127.0.0.1"])
            .expect("server cert");
        self.write("server-key.pem", &leaf.key_pem);
        self.write("server.pem", &leaf.cert_pem);
        leaf
    }

    fn client(&self, uri_san: &str) -> Leaf {
        self.ca
            .client("client", &[uri_san], &[])
            .expect("client cert")
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `[tls]` with this PKI's files.
    fn configure(&self, config: &mut Config, client_auth: ClientAuth) {
        config.tls.cert_file = self.file("server.pem");
        config.tls.key_file = self.file("server-key.pem");
        config.tls.client_ca_file = self.file("ca.pem");
        config.tls.client_auth = client_auth;
    }
}

/// The deployer's entry: write in project `web` only.
fn deployer_entry() -> ClientCertConfig {
    ClientCertConfig {
        uri_san: Some(DEPLOYER.into()),
        principal: "service:deployer".into(),
        scopes: vec!["approvals:write".into()],
        projects: vec!["web".into()],
        ..Default::default()
    }
}

/// The server under test over TLS, on an ephemeral port of 127.0.0.1.
struct TlsServer {
    addr: std::net::SocketAddr,
    ca_pem: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    _database: TestDatabase,
}

impl TlsServer {
    async fn start(pki: &Pki, configure: impl FnOnce(&mut Config)) -> Self {
        let (database, url) = TestDatabase::create().await;
        let mut config = Config::default();
        config.database.url = url;
        config.database.max_connections = 4;
        configure(&mut config);
        approvals::transport::check_config(&config).expect("valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stop.await;
            };
            if let Err(err) = approvals::transport::run(config, listener, stopped).await {
                panic!("server failed: {err}");
            }
        });
        let server = Self {
            addr,
            ca_pem: pki.ca.cert_pem.clone(),
            shutdown: Some(shutdown),
            task,
            _database: database,
        };
        server.wait_until_serving().await;
        server
    }

    /// A channel over TLS, verifying the server with the test CA, presenting `identity`.
    async fn connect(&self, identity: Option<&Leaf>) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(leaf) = identity {
            tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("endpoint")
            .tls_config(tls)?
            .connect()
            .await
    }

    async fn channel(&self, identity: Option<&Leaf>) -> Channel {
        self.connect(identity).await.expect("TLS connection")
    }

    async fn wait_until_serving(&self) {
        for _ in 0..200 {
            // The health service is open: any client certificate of the CA would do, but
            // `required` servers need one, so the probe sends none and accepts a refusal.
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("TLS test server did not start");
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.abort();
    }
}

fn requests_over(channel: Channel, headers: Headers) -> RequestsClient {
    ChangeRequestsClient::with_interceptor(channel, headers)
}

fn request_in(project: &str) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: project.into(),
        ..new_request()
    }
}

/// A handshake with rustls itself: what the server serves (leaf certificate, ALPN, version).
async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: &Leaf,
) -> (
    CertificateDer<'static>,
    Option<Vec<u8>>,
    rustls::ProtocolVersion,
) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .map(|c| c.expect("pem"))
            .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (_, connection) = stream.get_ref();
    (
        connection.peer_certificates().expect("served")[0].clone(),
        connection.alpn_protocol().map(<[u8]>::to_vec),
        connection.protocol_version().expect("version"),
    )
}

fn common_name(certificate: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
        .expect("certificate");
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .expect("CN")
        .to_owned()
}

/// `required`: a call with a mapped certificate works within its scopes and projects; without a
/// certificate, or with one from another CA, there is no connection at all.
#[tokio::test]
async fn required_client_certificates_map_to_scoped_callers() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Required);
        config.auth.client_certs.push(deployer_entry());
    })
    .await;
    let deployer = pki.client(DEPLOYER);

    let (served, alpn, version) = handshake(server.addr, &server.ca_pem, &deployer).await;
    assert_eq!(common_name(&served), "server-1");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN h2");
    assert!(
        matches!(
            version,
            rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2
        ),
        "{version:?}"
    );

    let mut client = requests_over(server.channel(Some(&deployer)).await, Headers::default());
    let created = client
        .create_change_request(request_in("web"))
        .await
        .expect("inside its project and scope")
        .into_inner();
    assert_eq!(created.created_by, "service:deployer");
    let err = client
        .create_change_request(request_in("payments"))
        .await
        .expect_err("outside its projects");
    assert_error(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    let mut policies = PoliciesClient::new(server.channel(Some(&deployer)).await);
    let err = policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web".into(),
                project: "web".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("admin scope needed");
    assert_error(&err, Code::PermissionDenied, "MISSING_SCOPE");

    // No certificate: the handshake fails, so the call does.
    let refused = match server.connect(None).await {
        Err(_) => true,
        Ok(channel) => {
            let mut client = requests_over(channel, Headers::default());
            client
                .create_change_request(request_in("web"))
                .await
                .is_err()
        }
    };
    assert!(refused, "a caller without a certificate is refused");
    // A certificate from another CA: refused the same way.
    let stranger = DevCa::new("another CA")
        .expect("ca")
        .client("client", &[DEPLOYER], &[])
        .expect("cert");
    let refused = match server.connect(Some(&stranger)).await {
        Err(_) => true,
        Ok(channel) => {
            let mut client = requests_over(channel, Headers::default());
            // TLS 1.3: the client finishes its side before the server refuses the certificate,
            // so the refusal (an alert) ends the connection under the first call.
            client
                .create_change_request(request_in("web"))
                .await
                .is_err()
        }
    };
    assert!(refused, "a certificate of another CA is refused");
}

/// A valid certificate no entry matches is UNAUTHENTICATED with the reason, naming what the
/// certificate holds; the same connection with an API key is that key's caller (a bearer
/// credential, when sent, authenticates).
#[tokio::test]
async fn an_unmatched_certificate_is_unauthenticated_and_a_bearer_credential_wins() {
    let pki = Pki::new();
    let (key, entry) = api_key("service:flags", &["approvals:write"], &[], &[]);
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Required);
        config.auth.client_certs.push(deployer_entry());
        config.auth.api_keys.push(entry);
    })
    .await;
    let other = pki.client("spiffe://example.org/ns/ci/sa/someone-else");
    let channel = server.channel(Some(&other)).await;
    let err = requests_over(channel.clone(), Headers::default())
        .create_change_request(request_in("web"))
        .await
        .expect_err("not mapped");
    let message = assert_error(&err, Code::Unauthenticated, "CLIENT_CERTIFICATE_NOT_MAPPED");
    assert!(
        message.contains("spiffe://example.org/ns/ci/sa/someone-else"),
        "{message}"
    );
    let created = requests_over(channel, Headers::bearer(&key))
        .create_change_request(request_in("payments"))
        .await
        .expect("the API key authenticates")
        .into_inner();
    assert_eq!(created.created_by, "service:flags");

    // The mapped certificate with a bearer credential: the credential's caller, not the
    // certificate's (the key may act in payments, the certificate may not).
    let channel = server.channel(Some(&pki.client(DEPLOYER))).await;
    let created = requests_over(channel, Headers::bearer(&key))
        .create_change_request(request_in("payments"))
        .await
        .expect("the API key authenticates")
        .into_inner();
    assert_eq!(created.created_by, "service:flags");
}

/// `optional`: a caller without a certificate uses an API key; with neither, the call is
/// refused for missing credentials; a mapped certificate alone works.
#[tokio::test]
async fn optional_client_certificates_leave_api_keys_working() {
    let pki = Pki::new();
    let (key, entry): (String, ApiKeyConfig) =
        api_key("service:flags", &["approvals:write"], &[], &[]);
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Optional);
        config.auth.client_certs.push(deployer_entry());
        config.auth.api_keys.push(entry);
    })
    .await;
    let created = requests_over(server.channel(None).await, Headers::bearer(&key))
        .create_change_request(request_in("web"))
        .await
        .expect("TLS without a client certificate, with an API key")
        .into_inner();
    assert_eq!(created.created_by, "service:flags");
    let err = requests_over(server.channel(None).await, Headers::default())
        .create_change_request(request_in("web"))
        .await
        .expect_err("no credential at all");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_MISSING");
    let created = requests_over(
        server.channel(Some(&pki.client(DEPLOYER))).await,
        Headers::default(),
    )
    .create_change_request(request_in("web"))
    .await
    .expect("the certificate alone")
    .into_inner();
    assert_eq!(created.created_by, "service:deployer");
}

/// Replacing the files: new connections get the new certificate within a reload interval,
/// a connection opened before keeps working; a bad new file is refused and the last good
/// certificate stays served.
#[tokio::test]
async fn certificates_rotate_without_a_restart() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Required);
        config.tls.reload_interval = Duration::from_millis(100);
        config.auth.client_certs.push(deployer_entry());
    })
    .await;
    let deployer = pki.client(DEPLOYER);
    let mut before = requests_over(server.channel(Some(&deployer)).await, Headers::default());
    before
        .create_change_request(request_in("web"))
        .await
        .expect("call before the rotation");
    let served = |server: &TlsServer| {
        let (addr, ca, deployer) = (server.addr, server.ca_pem.clone(), deployer.clone());
        async move { common_name(&handshake(addr, &ca, &deployer).await.0) }
    };
    assert_eq!(served(&server).await, "server-1");

    pki.serve_as("server-2");
    let mut rotated = false;
    for _ in 0..100 {
        if served(&server).await == "server-2" {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "new connections get the new certificate");
    before
        .create_change_request(request_in("web"))
        .await
        .expect("the connection opened before the rotation still works");
    let mut after = requests_over(server.channel(Some(&deployer)).await, Headers::default());
    after
        .create_change_request(request_in("web"))
        .await
        .expect("a connection with the new certificate works");

    // A broken certificate file, then a key that is not the certificate's: both refused.
    pki.write(
        "server.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served(&server).await, "server-2", "a bad file is kept out");
    let mismatched = pki.ca.server("server-3", &["localhost"]).expect("cert");
    pki.write("server.pem", &mismatched.cert_pem);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served(&server).await,
        "server-2",
        "a certificate whose key is not in key_file is kept out"
    );
    pki.write("server-key.pem", &mismatched.key_pem);
    let mut rotated = false;
    for _ in 0..100 {
        if served(&server).await == "server-3" {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the key arriving completes the rotation");
}

/// A ChangeApplier over TLS that requires a client certificate, recording what it saw.
#[derive(Clone, Default)]
struct TlsApplier {
    peers: Arc<std::sync::Mutex<Vec<usize>>>,
}

#[tonic::async_trait]
impl ChangeApplier for TlsApplier {
    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        let presented = request.peer_certs().map_or(0, |certs| certs.len());
        self.peers.lock().expect("peers").push(presented);
        Ok(Response::new(pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            ..Default::default()
        }))
    }
}

/// The server calls an `https://` applier that requires a client certificate: it verifies the
/// applier with the entry's `ca_file` and presents the entry's certificate.
#[tokio::test]
async fn appliers_are_called_over_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let applier_leaf = pki
        .ca
        .server("applier", &["localhost", "127.0.0.1"])
        .expect("applier cert");
    let applier = TlsApplier::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("https://{}", listener.local_addr().expect("addr"));
    let service = ChangeApplierServer::new(applier.clone());
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &applier_leaf.cert_pem,
            &applier_leaf.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&pki.ca.cert_pem));
    let serving = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("tls")
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let identity = pki
        .ca
        .client("approvals", &[], &["approvals.local"])
        .expect("cert");
    pki.write("applier-client.pem", &identity.cert_pem);
    pki.write("applier-client-key.pem", &identity.key_pem);

    let server = TestServer::start_with(|config| {
        config.apply.allowed_endpoints = AllowedEndpoints::default()
            .with(
                "https://127.0.0.1",
                EndpointTls {
                    ca_file: pki.file("ca.pem"),
                    cert_file: pki.file("applier-client.pem"),
                    key_file: pki.file("applier-client-key.pem"),
                    allow_insecure: false,
                },
            )
            .expect("entry");
    })
    .await;
    let mut admin =
        PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"));
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-tls".into(),
                project: "web".into(),
                action_key: "*".into(),
                apply_mode: pb::ApplyMode::Auto as i32,
                applier_endpoint: endpoint.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("policy with an https applier");
    let mut alice = server.client("user:alice").await;
    let mut bob = server.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    let applied = approve(&mut bob, &created.id).await;
    assert_eq!(state(&applied), pb::State::Applied, "{applied:?}");
    assert_eq!(
        *applier.peers.lock().expect("peers"),
        vec![1],
        "one call, with the server's client certificate"
    );
    serving.abort();
}

/// `config check`: an `http://` applier entry without `allow_insecure`, a key that is not the
/// certificate's, a client_auth without CAs are errors naming the key; plain text on a
/// non-loopback address is a warning.
#[test]
fn config_check_reports_tls_problems() {
    let pki = Pki::new();
    let other = pki.ca.server("other", &["localhost"]).expect("cert");
    pki.write("other-key.pem", &other.key_pem);
    let check = |file: &str| {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("approvals.toml");
        std::fs::write(&path, file).expect("write config");
        std::process::Command::new(BINARY)
            .args(["config", "check", "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .env_remove("APPROVALS_CONFIG")
            .output()
            .expect("run config check")
    };
    let tls = |extra: &str| {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n{extra}",
            pki.file("server.pem"),
            pki.file("server-key.pem")
        )
    };
    for (file, expected) in [
        (
            "[apply]\nallowed_endpoints = [\"http://127.0.0.1:9000\"]\n".to_owned(),
            "allow_insecure = true",
        ),
        (
            format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.file("server.pem"),
                pki.file("other-key.pem")
            ),
            "tls.key_file",
        ),
        (tls("client_auth = \"required\"\n"), "tls.client_ca_file"),
        (tls("client_auth = \"sometimes\"\n"), "tls.client_auth"),
        (
            format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.file("missing.pem"),
                pki.file("server-key.pem")
            ),
            "tls.cert_file",
        ),
    ] {
        let out = check(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
    let (_, entry) = api_key("service:flags", &["approvals:read"], &[], &[]);
    let keyed = format!(
        "[[auth.api_keys]]\nprincipal = {:?}\nscopes = [\"approvals:read\"]\nprojects = [\"*\"]\nsha256 = {:?}\n",
        entry.principal, entry.sha256
    );
    let out = check(&format!("listen = \"0.0.0.0:50051\"\n{keyed}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("# warning: listen 0.0.0.0:50051: serving plain text"),
        "{stdout}"
    );
    let out = check(&format!("listen = \"0.0.0.0:50051\"\n{keyed}{}", tls("")));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("# warning"), "{stdout}");
}

/// The README's TLS walkthrough (between the `walkthrough-tls` markers), run as written with
/// `approvals` and grpcurl on the PATH, on a free port instead of 50051.
#[test]
fn readme_tls_walkthrough_runs_as_written() {
    let grpcurl = std::env::var("GRPCURL")
        .ok()
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var("PATH").ok().and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("grpcurl"))
                    .find(|p| p.is_file())
            })
        })
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|home| PathBuf::from(home).join(".local/bin/grpcurl"))
                .filter(|p| p.is_file())
        });
    let Some(grpcurl) = grpcurl else {
        skip(
            "readme_tls_walkthrough_runs_as_written",
            "grpcurl not found in GRPCURL, PATH or ~/.local/bin \
             (../shared/tools/install-grpcurl.sh installs it)",
        );
        return;
    };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- walkthrough-tls:begin -->")
        .expect("begin marker");
    let end = readme
        .find("<!-- walkthrough-tls:end -->")
        .expect("end marker");
    let script: String = readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let script = format!(
        "trap 'kill %1 2>/dev/null || true' EXIT\n{}",
        script.replace(":50051", &format!(":{port}"))
    );
    let dir = tempfile::tempdir().expect("dir");
    let bin_dirs = [
        std::path::Path::new(BINARY)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
        grpcurl.parent().map(PathBuf::from).unwrap_or_default(),
    ];
    let path = std::env::join_paths(bin_dirs.iter().cloned().chain(std::env::split_paths(
        &std::env::var("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("APPROVALS_CONFIG")
        .env_remove("APPROVALS_DATABASE_URL")
        .output()
        .expect("run the walkthrough");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("\"createdBy\": \"service:cli\""),
        "the client certificate is service:cli:\n{stdout}"
    );
    assert!(
        stdout.contains("refused: no client certificate"),
        "no certificate, no call:\n{stdout}"
    );
}

/// The shared client of the CLI and the relay (`approvals::client`) reaches the TLS server with
/// its `ClientTls` (CA, client certificate, server name), and with a bearer credential.
#[tokio::test]
async fn the_shared_client_speaks_mtls() {
    use approvals::client::{Client, ClientConfig, ClientTls, Credential};
    let pki = Pki::new();
    let (key, entry) = api_key("service:relay", &["approvals:read"], &[], &[]);
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Required);
        config.auth.client_certs.push(deployer_entry());
        config.auth.api_keys.push(entry);
    })
    .await;
    let deployer = pki.client(DEPLOYER);
    pki.write("client.pem", &deployer.cert_pem);
    pki.write("client-key.pem", &deployer.key_pem);
    let tls = ClientTls {
        ca_file: Some(pki.path("ca.pem")),
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client-key.pem")),
        server_name: Some("localhost".into()),
    };
    let config = ClientConfig::new(format!("https://{}", server.addr)).with_tls(tls.clone());
    let client = Client::connect(&config).await.expect("connects over mTLS");
    let created = client
        .change_requests()
        .create_change_request(request_in("web"))
        .await
        .expect("the certificate's caller")
        .into_inner();
    assert_eq!(created.created_by, "service:deployer");
    let keyed = Client::connect(&config.clone().with_credential(Credential::bearer(&key)))
        .await
        .expect("connects");
    let err = keyed
        .change_requests()
        .create_change_request(request_in("web"))
        .await
        .expect_err("the key only reads");
    assert_error(&err, Code::PermissionDenied, "MISSING_SCOPE");
}

/// Serves `document` over HTTPS (HTTP/1.1) with `leaf`, requiring a client certificate of
/// `client_ca`; counts the requests answered.
async fn https_jwks(
    leaf: &Leaf,
    client_ca: &str,
    document: String,
) -> (String, Arc<std::sync::atomic::AtomicUsize>, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .map(|c| c.expect("pem"))
            .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "https://localhost:{}/jwks.json",
        listener.local_addr().expect("addr").port()
    );
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut stream) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{document}",
                document.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (url, hits, task)
}

/// The JWKS client verifies the JWKS server with `auth.jwt.jwks_ca_file` and presents
/// `jwks_cert_file`; with the system roots alone the test CA's server is refused, and the
/// server does not start.
#[tokio::test]
async fn the_jwks_client_verifies_tls_and_presents_a_client_certificate() {
    let pki = Pki::new();
    let issuer = Issuer::new("k1");
    let jwks_leaf = pki.ca.server("jwks", &["localhost"]).expect("cert");
    let (url, hits, serving) = https_jwks(&jwks_leaf, &pki.ca.cert_pem, issuer.jwks.clone()).await;
    let identity = pki
        .ca
        .client("approvals", &[], &["approvals.local"])
        .expect("cert");
    pki.write("jwks-client.pem", &identity.cert_pem);
    pki.write("jwks-client-key.pem", &identity.key_pem);
    let jwt = approvals::config::auth::JwtConfig {
        jwks_file: None,
        jwks_url: Some(url.clone()),
        jwks_ca_file: pki.file("ca.pem"),
        jwks_cert_file: pki.file("jwks-client.pem"),
        jwks_key_file: pki.file("jwks-client-key.pem"),
        ..issuer.config()
    };
    let server = TestServer::start_with(|config| config.auth.jwt = Some(jwt.clone())).await;
    let token = issuer.token("user:alice", "approvals:write", &[]);
    let created = requests(&server, Headers::bearer(&token))
        .await
        .create_change_request(new_request())
        .await
        .expect("a JWT verified with keys fetched over mTLS")
        .into_inner();
    assert_eq!(created.created_by, "user:alice");
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // The system roots do not hold the test CA: the keys cannot be fetched, the server stops.
    let mut config = Config::default();
    let (_database, database_url) = TestDatabase::create().await;
    config.database.url = database_url;
    config.auth.jwt = Some(approvals::config::auth::JwtConfig {
        jwks_ca_file: String::new(),
        ..jwt
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        approvals::transport::run(config, listener, std::future::pending()),
    )
    .await
    .expect("refuses to start in time");
    let err = result
        .expect_err("an unverified JWKS server is refused")
        .to_string();
    assert!(err.contains("auth.jwt") && err.contains("JWKS"), "{err}");
    serving.abort();
}

/// Each event and review records how the credential that made it was presented: an API key
/// (the requester), a JWT (the first reviewer) and a mapped client certificate (the second),
/// read back from ListChangeRequestEvents and from the reviews of GetChangeRequest.
#[tokio::test]
async fn events_and_reviews_record_how_the_caller_authenticated() {
    let pki = Pki::new();
    let issuer = Issuer::new("key-1");
    let (key, entry) = api_key("user:alice", &["approvals:write"], &[], &[]);
    let jwt = issuer.config();
    let server = TlsServer::start(&pki, |config| {
        pki.configure(config, ClientAuth::Optional);
        config.min_approvals = 2;
        config.auth.client_certs.push(deployer_entry());
        config.auth.api_keys.push(entry);
        config.auth.jwt = Some(jwt);
    })
    .await;
    let mut alice = requests_over(server.channel(None).await, Headers::bearer(&key));
    let mut bob = requests_over(
        server.channel(None).await,
        Headers::bearer(&issuer.token("bob", "approvals:write", &[])),
    );
    let mut deployer = requests_over(
        server.channel(Some(&pki.client(DEPLOYER))).await,
        Headers::default(),
    );

    let created = alice
        .create_change_request(request_in("web"))
        .await
        .expect("create with an API key")
        .into_inner();
    for reviewer in [&mut bob, &mut deployer] {
        reviewer
            .approve_change_request(pb::ApproveChangeRequestRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
            .expect("approve");
    }

    let events = deployer
        .list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    let recorded: Vec<(pb::EventKind, String, pb::AuthMethod)> = events
        .iter()
        .map(|e| (e.kind(), e.actor.clone(), e.auth_method()))
        .collect();
    let first = recorded.first().cloned().expect("a CREATED event");
    assert_eq!(
        first,
        (
            pb::EventKind::Created,
            "user:alice".into(),
            pb::AuthMethod::ApiKey
        )
    );
    let reviewed: Vec<_> = recorded
        .iter()
        .filter(|(kind, _, _)| *kind == pb::EventKind::Reviewed)
        .map(|(_, actor, method)| (actor.as_str(), *method))
        .collect();
    assert_eq!(
        reviewed,
        [
            ("user:bob", pb::AuthMethod::Jwt),
            ("service:deployer", pb::AuthMethod::ClientCertificate),
        ],
        "{recorded:?}"
    );

    let seen = alice
        .get_change_request(pb::GetChangeRequestRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let reviews: Vec<_> = seen
        .reviews
        .iter()
        .map(|r| (r.reviewer.as_str(), r.auth_method()))
        .collect();
    assert_eq!(
        reviews,
        [
            ("user:bob", pb::AuthMethod::Jwt),
            ("service:deployer", pb::AuthMethod::ClientCertificate),
        ]
    );
}
