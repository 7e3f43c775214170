//! Callers with credentials: API keys, JWTs signed by a key the test generates (served to the
//! server as a JWKS file), on-behalf-of headers, and a Policies client.

#![allow(dead_code)]

use std::path::PathBuf;

use approvals::{
    auth::{ApiKeyConfig, JwtConfig, api_keys},
    pb::{change_requests_client::ChangeRequestsClient, policies_client::PoliciesClient},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{
    Status,
    metadata::{Ascii, MetadataKey, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::common::TestServer;

/// Adds fixed metadata to every call.
#[derive(Clone, Default)]
pub struct Headers(Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>);

impl Headers {
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0.push((
            name.parse().expect("metadata name"),
            value.parse().expect("ascii metadata"),
        ));
        self
    }

    pub fn bearer(token: &str) -> Self {
        Self::default().with(approvals::AUTHORIZATION_HEADER, &format!("Bearer {token}"))
    }

    pub fn actor(actor: &str) -> Self {
        Self::default().with(approvals::ACTOR_HEADER, actor)
    }

    pub fn on_behalf_of(self, user: &str, groups: &str) -> Self {
        let with_user = self.with(approvals::ON_BEHALF_OF_HEADER, user);
        if groups.is_empty() {
            with_user
        } else {
            with_user.with(approvals::ON_BEHALF_OF_GROUPS_HEADER, groups)
        }
    }
}

impl Interceptor for Headers {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        for (name, value) in &self.0 {
            request.metadata_mut().insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

pub type RequestsClient = ChangeRequestsClient<InterceptedService<Channel, Headers>>;

/// A request's events, oldest first (up to 1,000), through a [`RequestsClient`].
pub async fn events_of(client: &mut RequestsClient, id: &str) -> Vec<approvals::pb::Event> {
    client
        .list_change_request_events(approvals::pb::ListChangeRequestEventsRequest {
            id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events
}
pub type Policies = PoliciesClient<InterceptedService<Channel, Headers>>;

pub async fn requests(server: &TestServer, headers: Headers) -> RequestsClient {
    ChangeRequestsClient::with_interceptor(server.channel().await, headers)
}

pub async fn policies(server: &TestServer, headers: Headers) -> Policies {
    PoliciesClient::with_interceptor(server.channel().await, headers)
}

/// A fresh API key and its configuration entry.
pub fn api_key(
    principal: &str,
    scopes: &[&str],
    groups: &[&str],
    projects: &[&str],
) -> (String, ApiKeyConfig) {
    let key = format!("apv1_test_{}", uuid::Uuid::now_v7().simple());
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let config = ApiKeyConfig {
        principal: principal.to_owned(),
        groups: owned(groups),
        scopes: owned(scopes),
        // No projects named: every project, which a key must say explicitly.
        projects: if projects.is_empty() {
            vec!["*".to_owned()]
        } else {
            owned(projects)
        },
        sha256: api_keys::digest_hex(&key),
        // A key that acts for users may act for every user unless a test narrows it.
        act_as: if scopes.contains(&"approvals:act_as") {
            vec!["user:*".to_owned()]
        } else {
            Vec::new()
        },
    };
    (key, config)
}

pub const ISSUER: &str = "https://id.example.test/";
pub const AUDIENCE: &str = "approvals";

/// An Ed25519 signing key generated for the test, with its public half as a JWKS file.
pub struct Issuer {
    kid: String,
    seed: [u8; 32],
    /// The public key as a JWKS document.
    pub jwks: String,
    pub jwks_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn random_seed() -> [u8; 32] {
    use rand::Rng;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    seed
}

impl Issuer {
    pub fn new(kid: &str) -> Self {
        let seed = random_seed();
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(public),
        }]});
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string()).expect("write jwks");
        Self {
            kid: kid.to_owned(),
            seed,
            jwks: jwks.to_string(),
            jwks_path,
            _dir: dir,
        }
    }

    /// Another key claiming the same key id: what a forger would sign with.
    pub fn forger(&self) -> Self {
        Self::new(&self.kid)
    }

    pub fn config(&self) -> JwtConfig {
        JwtConfig {
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            jwks_file: Some(self.jwks_path.display().to_string()),
            ..JwtConfig::default()
        }
    }

    /// Signs `claims` (EdDSA).
    pub fn sign(&self, claims: serde_json::Value) -> String {
        // PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): a fixed prefix, then the 32 bytes.
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&self.seed);
        let key = jsonwebtoken::EncodingKey::from_ed_der(&der);
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }

    /// A token valid for an hour.
    pub fn token(&self, sub: &str, scope: &str, groups: &[&str]) -> String {
        let now = now_secs();
        self.sign(serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope, "groups": groups,
            "iat": now, "nbf": now - 5, "exp": now + 3600,
        }))
    }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Serves a JWKS document over plain HTTP on loopback until dropped; `set` replaces it.
pub struct JwksServer {
    pub url: String,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(document: &str) -> Self {
        Self::serve(document, None).await
    }

    /// Answers every request with a redirect to `location`.
    pub async fn redirecting(location: &str) -> Self {
        Self::serve("", Some(location.to_owned())).await
    }

    /// How many requests it has answered.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn serve(document: &str, redirect: Option<String>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let document = std::sync::Arc::new(std::sync::Mutex::new(document.to_owned()));
        let served = document.clone();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = served.lock().map(|d| d.clone()).unwrap_or_default();
                let response = match &redirect {
                    Some(location) => format!(
                        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    ),
                    None => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                };
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        Self {
            url,
            document,
            hits,
            task,
        }
    }

    pub fn set(&self, document: &str) {
        if let Ok(mut current) = self.document.lock() {
            *current = document.to_owned();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type CalendarsClient =
    approvals::pb::calendars_client::CalendarsClient<InterceptedService<Channel, Headers>>;

pub async fn calendars(server: &TestServer, headers: Headers) -> CalendarsClient {
    approvals::pb::calendars_client::CalendarsClient::with_interceptor(
        server.channel().await,
        headers,
    )
}
