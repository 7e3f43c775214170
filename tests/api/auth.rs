//! Authentication and scopes: API keys, JWTs, on-behalf-of, projects, and local development
//! mode, through the real server.

use std::process::Command;

use approvals::{
    auth::AuthConfig,
    config::{Config, Flags},
    pb,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    callers::*,
    common::{TestServer, assert_error, new_request},
};

const BINARY: &str = env!("CARGO_BIN_EXE_approvals");

fn assert_missing_scope(status: &tonic::Status, scope: &str) {
    let message = assert_error(status, Code::PermissionDenied, "MISSING_SCOPE");
    assert!(message.contains(scope), "{message}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some(scope));
}

async fn server_with_keys(keys: Vec<approvals::auth::ApiKeyConfig>) -> TestServer {
    TestServer::start_with(|c| {
        c.auth = AuthConfig {
            api_keys: keys,
            ..AuthConfig::default()
        }
    })
    .await
}

fn get(id: &str) -> pb::GetChangeRequestRequest {
    pb::GetChangeRequestRequest { id: id.into() }
}

fn list(project: &str) -> pb::ListChangeRequestsRequest {
    pb::ListChangeRequestsRequest {
        project: project.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn each_scope_grants_its_methods_and_no_more() {
    let (read_key, read) = api_key("user:reader", &["approvals:read"], &[], &[]);
    let (write_key, write) = api_key("user:writer", &["approvals:write"], &[], &[]);
    let (admin_key, admin) = api_key("user:admin", &["approvals:admin"], &[], &[]);
    let (act_key, act) = api_key("service:web", &["approvals:act_as"], &[], &[]);
    let server = server_with_keys(vec![read, write, admin, act]).await;

    // write: create and review; it includes read.
    let mut writer = requests(&server, Headers::bearer(&write_key)).await;
    let created = writer
        .create_change_request(new_request())
        .await
        .expect("write creates")
        .into_inner();
    assert_eq!(created.created_by, "user:writer");
    assert!(created.can_cancel);
    writer
        .get_change_request(get(&created.id))
        .await
        .expect("write reads");

    // read: reads and lists, but creates and reviews nothing, and is told it cannot.
    let mut reader = requests(&server, Headers::bearer(&read_key)).await;
    let seen = reader
        .get_change_request(get(&created.id))
        .await
        .expect("read reads")
        .into_inner();
    assert!(!seen.can_approve && !seen.can_cancel);
    reader
        .list_change_requests(list("web"))
        .await
        .expect("read lists");
    let err = reader
        .create_change_request(new_request())
        .await
        .expect_err("read cannot create");
    assert_missing_scope(&err, "approvals:write");
    let err = reader
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("read cannot approve");
    assert_missing_scope(&err, "approvals:write");
    let mut reader_policies = policies(&server, Headers::bearer(&read_key)).await;
    reader_policies
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .expect("read lists policies");
    let err = reader_policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "p".into(),
                project: "web".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("read cannot write policies");
    assert_missing_scope(&err, "approvals:admin");

    // write does not manage policies.
    let mut writer_policies = policies(&server, Headers::bearer(&write_key)).await;
    let err = writer_policies
        .delete_policy(pb::DeletePolicyRequest {
            name: "p".into(),
            ..Default::default()
        })
        .await
        .expect_err("write cannot delete policies");
    assert_missing_scope(&err, "approvals:admin");

    // admin: policies, and everything write does.
    let mut admin_policies = policies(&server, Headers::bearer(&admin_key)).await;
    admin_policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-default".into(),
                project: "web".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("admin creates a policy");
    let mut admin_requests = requests(&server, Headers::bearer(&admin_key)).await;
    let approved = admin_requests
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("admin approves")
        .into_inner();
    assert_eq!(approved.state, pb::State::Approved as i32);

    // act_as alone includes nothing else.
    let mut acting = requests(&server, Headers::bearer(&act_key)).await;
    let err = acting
        .get_change_request(get(&created.id))
        .await
        .expect_err("act_as does not read");
    assert_missing_scope(&err, "approvals:read");

    // Health and reflection need no credentials.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
}

#[tokio::test]
async fn missing_and_unknown_credentials_are_unauthenticated() {
    let (_, known) = api_key("user:alice", &["approvals:write"], &[], &[]);
    let server = server_with_keys(vec![known]).await;

    let mut nobody = requests(&server, Headers::default()).await;
    let err = nobody
        .create_change_request(new_request())
        .await
        .expect_err("no credentials");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_MISSING");

    // With authentication configured, naming yourself proves nothing.
    let mut claimant = requests(&server, Headers::actor("user:alice")).await;
    let err = claimant
        .create_change_request(new_request())
        .await
        .expect_err("x-approvals-actor is not a credential");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_MISSING");

    let mut stranger = requests(&server, Headers::bearer("apv1_not-in-the-config")).await;
    let err = stranger
        .create_change_request(new_request())
        .await
        .expect_err("unknown key");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");

    let mut policies_stranger = policies(&server, Headers::bearer("apv1_nope")).await;
    let err = policies_stranger
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .expect_err("unknown key");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
}

#[tokio::test]
async fn a_key_limited_to_projects_acts_only_there() {
    let (web_key, web) = api_key("user:wendy", &["approvals:admin"], &[], &["web"]);
    let (all_key, all) = api_key("user:olga", &["approvals:write"], &[], &[]);
    let server = server_with_keys(vec![web, all]).await;
    let mut wendy = requests(&server, Headers::bearer(&web_key)).await;
    let mut olga = requests(&server, Headers::bearer(&all_key)).await;

    let mobile = olga
        .create_change_request(pb::CreateChangeRequestRequest {
            project: "mobile".into(),
            ..new_request()
        })
        .await
        .expect("olga may act anywhere")
        .into_inner();

    let err = wendy
        .create_change_request(pb::CreateChangeRequestRequest {
            project: "mobile".into(),
            ..new_request()
        })
        .await
        .expect_err("other project");
    let message = assert_error(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    assert!(message.contains("mobile"), "{message}");
    // A request of another project is answered exactly as an id that does not exist, so ids
    // cannot be probed across projects.
    let unknown = uuid::Uuid::now_v7().to_string();
    let not_found = wendy
        .get_change_request(get(&unknown))
        .await
        .expect_err("unknown id");
    for (found, err) in [
        (
            &mobile.id,
            wendy
                .get_change_request(get(&mobile.id))
                .await
                .expect_err("get"),
        ),
        (
            &mobile.id,
            wendy
                .approve_change_request(pb::ApproveChangeRequestRequest {
                    id: mobile.id.clone(),
                    ..Default::default()
                })
                .await
                .expect_err("approve"),
        ),
        (
            &mobile.id,
            wendy
                .list_change_request_events(pb::ListChangeRequestEventsRequest {
                    id: mobile.id.clone(),
                    ..Default::default()
                })
                .await
                .expect_err("events"),
        ),
        (&unknown, not_found),
    ] {
        let message = assert_error(&err, Code::NotFound, "CHANGE_REQUEST_NOT_FOUND");
        assert_eq!(message, format!("change request {found:?} not found"));
        assert!(!message.contains("mobile"), "{message}");
    }
    for err in [
        wendy
            .list_change_requests(list("mobile"))
            .await
            .expect_err("list"),
        wendy
            .watch_change_requests(pb::WatchChangeRequestsRequest {
                project: "mobile".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .expect_err("watch"),
    ] {
        assert_error(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    }
    // A watcher of its own project does not see the other one's events.
    let mut stream = wendy
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .await
        .expect("watch own project")
        .into_inner();
    let mut wendy_policies = policies(&server, Headers::bearer(&web_key)).await;
    let err = wendy_policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "mobile-default".into(),
                project: "mobile".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("policy in another project");
    assert_error(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");

    // In its own project everything works.
    let own = wendy
        .create_change_request(new_request())
        .await
        .expect("own project")
        .into_inner();
    olga.approve_change_request(pb::ApproveChangeRequestRequest {
        id: own.id.clone(),
        ..Default::default()
    })
    .await
    .expect("olga approves");
    olga.create_change_request(pb::CreateChangeRequestRequest {
        project: "mobile".into(),
        ..new_request()
    })
    .await
    .expect("another mobile request");
    let marker = wendy
        .create_change_request(new_request())
        .await
        .expect("own project")
        .into_inner();
    let mut seen = Vec::new();
    while seen.last() != Some(&marker.id) {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
            .await
            .expect("events within 20 s")
            .expect("stream ok")
            .expect("stream open");
        for event in message.events {
            assert_eq!(event.project, "web", "a web watcher saw {event:?}");
            seen.push(event.change_request_id);
        }
    }
    assert_eq!(
        seen,
        vec![own.id.clone(), own.id.clone(), marker.id.clone()]
    );
}

#[tokio::test]
async fn acting_on_behalf_of_a_user_needs_act_as_and_is_recorded() {
    let (backend_key, backend) = api_key(
        "service:web-backend",
        &["approvals:act_as", "approvals:write"],
        &[],
        &[],
    );
    let (plain_key, plain) = api_key("service:plain", &["approvals:write"], &[], &[]);
    let server = server_with_keys(vec![backend, plain]).await;

    let mut as_alice = requests(
        &server,
        Headers::bearer(&backend_key).on_behalf_of("user:alice", "sre,dba"),
    )
    .await;
    let created = as_alice
        .create_change_request(new_request())
        .await
        .expect("on behalf of alice")
        .into_inner();
    assert_eq!(created.created_by, "user:alice");
    assert!(created.is_requester);

    let mut as_bob = requests(
        &server,
        Headers::bearer(&backend_key).on_behalf_of("user:bob", ""),
    )
    .await;
    let commented = as_bob
        .add_comment(pb::AddCommentRequest {
            id: created.id.clone(),
            text: "looks right".into(),
        })
        .await
        .expect("bob comments through the backend")
        .into_inner();
    assert_eq!(commented.comments[0].author, "user:bob");

    let events = as_bob
        .list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    let trail: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.actor.as_str(), e.acting_principal.as_str()))
        .collect();
    assert_eq!(
        trail,
        vec![
            ("user:alice", "service:web-backend"),
            ("user:bob", "service:web-backend")
        ]
    );

    // Without act_as the headers are refused, naming the scope.
    let mut pretender = requests(
        &server,
        Headers::bearer(&plain_key).on_behalf_of("user:alice", ""),
    )
    .await;
    let err = pretender
        .create_change_request(new_request())
        .await
        .expect_err("no act_as");
    assert_missing_scope(&err, "approvals:act_as");
}

#[tokio::test]
async fn jwts_are_verified_by_signature_issuer_audience_and_time() {
    let issuer = Issuer::new("key-1");
    let jwt = issuer.config();
    let server = TestServer::start_with(|c| c.auth.jwt = Some(jwt)).await;

    let token = issuer.token("alice", "approvals:write", &["sre"]);
    let mut alice = requests(&server, Headers::bearer(&token)).await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("valid JWT")
        .into_inner();
    assert_eq!(created.created_by, "user:alice");

    // A subject that is a principal of the configured kind already keeps it.
    let reader = issuer.token("user:rita", "approvals:read", &[]);
    let mut rita = requests(&server, Headers::bearer(&reader)).await;
    let seen = rita
        .get_change_request(get(&created.id))
        .await
        .expect("read scope")
        .into_inner();
    assert_eq!(seen.id, created.id);
    let err = rita
        .create_change_request(new_request())
        .await
        .expect_err("read only");
    assert_missing_scope(&err, "approvals:write");
    // A subject of another kind does not get past principal_prefix: a user of the provider
    // cannot become a service (an executor, an applier) by its choice of subject.
    let service = issuer.token("service:deployer", "approvals:write", &[]);
    let mut deployer = requests(&server, Headers::bearer(&service)).await;
    let err = deployer
        .get_change_request(get(&created.id))
        .await
        .expect_err("another kind of principal");
    let message = assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
    assert!(message.contains("principal_prefix"), "{message}");

    let now = now_secs();
    let claims = |aud: &str, iss: &str, exp: i64| {
        serde_json::json!({
            "iss": iss, "aud": aud, "sub": "mallory", "scope": "approvals:admin",
            "iat": now - 7200, "exp": exp,
        })
    };
    let cases = [
        ("expired", issuer.sign(claims(AUDIENCE, ISSUER, now - 3600))),
        (
            "wrong audience",
            issuer.sign(claims("other", ISSUER, now + 3600)),
        ),
        (
            "wrong issuer",
            issuer.sign(claims(AUDIENCE, "https://evil.test/", now + 3600)),
        ),
        (
            "forged",
            issuer.forger().sign(claims(AUDIENCE, ISSUER, now + 3600)),
        ),
        ("garbage", "a.b.c".to_owned()),
    ];
    for (case, token) in cases {
        let mut mallory = requests(&server, Headers::bearer(&token)).await;
        let err = mallory
            .create_change_request(new_request())
            .await
            .expect_err(case);
        assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
    }
}

#[tokio::test]
async fn jwks_from_a_url_is_refreshed() {
    let first = Issuer::new("key-1");
    let second = Issuer::new("key-2");
    let jwks = JwksServer::start(&first.jwks).await;
    let mut config = first.config();
    config.jwks_file = None;
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_refresh_interval = std::time::Duration::from_millis(100);
    let server = TestServer::start_with(|c| c.auth.jwt = Some(config)).await;

    let mut by_first = requests(
        &server,
        Headers::bearer(&first.token("alice", "approvals:write", &[])),
    )
    .await;
    by_first
        .create_change_request(new_request())
        .await
        .expect("key from the URL");
    let mut by_second = requests(
        &server,
        Headers::bearer(&second.token("bob", "approvals:write", &[])),
    )
    .await;
    let err = by_second
        .create_change_request(new_request())
        .await
        .expect_err("not published yet");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");

    // The provider rotates its key: the server picks it up on its next refresh.
    jwks.set(&second.jwks);
    let mut rotated = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if by_second.create_change_request(new_request()).await.is_ok() {
            rotated = true;
            break;
        }
    }
    assert!(rotated, "the rotated key was never accepted");
    let err = by_first
        .create_change_request(new_request())
        .await
        .expect_err("retired key");
    assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
}

#[test]
fn generated_keys_configure_the_server() {
    let out = Command::new(BINARY)
        .args([
            "keys",
            "generate",
            "--principal",
            "service:flags",
            "--scopes",
            "approvals:read,approvals:write",
            "--groups",
            "sre",
            "--projects",
            "web",
        ])
        .output()
        .expect("run keys generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find(|l| l.starts_with("apv1_"))
        .expect("the key is printed")
        .to_owned();
    let entry = &stdout[stdout.find("[[auth.api_keys]]").expect("entry")..];
    assert!(!entry.contains(&key), "the config holds only the digest");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("approvals.toml");
    std::fs::write(&file, format!("listen = \"0.0.0.0:50051\"\n{entry}")).expect("write");
    // With a key configured, a non-loopback address is accepted.
    let config = Config::load(Some(&file), |_| None, &Flags::default()).expect("loads");
    approvals::transport::check_config(&config).expect("loads");
    assert_eq!(config.auth.api_keys.len(), 1);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let server = TestServer::start_with(|c| c.auth = config.auth.clone()).await;
        let mut flags = requests(&server, Headers::bearer(&key)).await;
        let created = flags
            .create_change_request(new_request())
            .await
            .expect("the generated key works")
            .into_inner();
        assert_eq!(created.created_by, "service:flags");
    });

    let bad = Command::new(BINARY)
        .args([
            "keys",
            "generate",
            "--principal",
            "service:flags",
            "--scopes",
            "approvals:everything",
        ])
        .output()
        .expect("run keys generate");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("approvals:everything"));
}

#[test]
fn without_auth_a_non_loopback_address_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(BINARY)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--database-url",
            &format!("sqlite://{}", dir.path().join("a.db").display()),
        ])
        .current_dir(dir.path())
        .env_remove("APPROVALS_CONFIG")
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen") && stderr.contains("loopback") && stderr.contains("[auth"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("a.db").exists(),
        "refused before touching the database"
    );
}

#[tokio::test]
async fn development_mode_keeps_the_actor_header_with_every_scope() {
    let server = TestServer::start().await;
    let mut admin = policies(&server, Headers::actor("user:root")).await;
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "dev".into(),
                project: "web".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("every scope in development");
    let mut backend = requests(
        &server,
        Headers::actor("service:web").on_behalf_of("user:alice", ""),
    )
    .await;
    let created = backend
        .create_change_request(new_request())
        .await
        .expect("act_as in development")
        .into_inner();
    assert_eq!(created.created_by, "user:alice");
}

/// The README's `[auth]` example is a valid configuration (with real digests in place of the
/// elided ones).
#[test]
fn readme_auth_example_is_a_valid_config() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = &readme[readme.find("### The `[auth]` section").expect("section")..];
    let block: String = section
        .lines()
        .skip_while(|l| !l.starts_with("```toml"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    let block = block
        .replace("5f1d…", &"5f".repeat(32))
        .replace("a03c…", &"a0".repeat(32));
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("approvals.toml");
    std::fs::write(&file, block).expect("write");
    let config = Config::load(Some(&file), |_| None, &Flags::default()).expect("valid");
    approvals::transport::check_config(&config).expect("valid");
    assert_eq!(config.auth.api_keys.len(), 2);
    let jwt = config.auth.jwt.expect("jwt");
    assert_eq!(
        jwt.jwks_refresh_interval,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(jwt.scopes_claim, "scope");
}

/// `approvals config check` on `file`: its exit code and what it printed.
fn config_check(file: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("approvals.toml");
    std::fs::write(&path, file).expect("write config");
    let out = Command::new(BINARY)
        .args(["config", "check", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .env_remove("APPROVALS_CONFIG")
        .output()
        .expect("run config check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn key_entry(extra: &str, digest: &str) -> String {
    format!(
        "[[auth.api_keys]]\nprincipal = \"service:web\"\nscopes = [\"approvals:write\"]\nsha256 = \"{digest}\"\n{extra}\n"
    )
}

#[test]
fn every_project_is_said_explicitly_and_keys_are_distinct() {
    let digest = "ab".repeat(32);
    for (file, key, says) in [
        (
            key_entry("", &digest),
            "auth.api_keys[0].projects",
            "[\"*\"]",
        ),
        (
            key_entry("projects = []", &digest),
            "auth.api_keys[0].projects",
            "[\"*\"]",
        ),
        (
            key_entry("projects = [\"*\", \"web\"]", &digest),
            "auth.api_keys[0].projects",
            "stands alone",
        ),
        (
            format!(
                "{}{}",
                key_entry("projects = [\"web\"]", &digest),
                key_entry("projects = [\"*\"]", &digest)
            ),
            "auth.api_keys[1].sha256",
            "auth.api_keys[0]",
        ),
        (
            key_entry("projects = [\"*\"]", &digest).replace(
                "[\"approvals:write\"]",
                "[\"approvals:write\", \"approvals:act_as\"]",
            ),
            "auth.api_keys[0].act_as",
            "user:*",
        ),
        (
            key_entry("projects = [\"*\"]\nact_as = [\"service:deployer\"]", &digest).replace(
                "[\"approvals:write\"]",
                "[\"approvals:write\", \"approvals:act_as\"]",
            ),
            "auth.api_keys[0].act_as",
            "service:deployer",
        ),
        (
            "[auth.jwt]\nissuer = \"https://id.example.test/\"\naudience = \"approvals\"\njwks_url = \"http://id.example.test/jwks.json\"\n".to_owned(),
            "auth.jwt.jwks_url",
            "https",
        ),
    ] {
        let (code, text) = config_check(&file);
        assert_eq!(code, Some(2), "{file}\n{text}");
        assert!(text.contains(key) && text.contains(says), "{file}\n{text}");
    }
    let (code, text) = config_check(&key_entry("projects = [\"*\"]", &digest));
    assert_eq!(code, Some(0), "{text}");
}

#[tokio::test]
async fn a_projects_claim_when_configured_is_required() {
    let issuer = Issuer::new("key-1");
    let mut jwt = issuer.config();
    jwt.projects_claim = "projects".into();
    let server = TestServer::start_with(|c| c.auth.jwt = Some(jwt)).await;
    let token = |projects: Option<serde_json::Value>| {
        let now = now_secs();
        let mut claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "approvals:write",
            "exp": now + 600,
        });
        if let Some(projects) = projects {
            claims["projects"] = projects;
        }
        issuer.sign(claims)
    };
    for (case, claim) in [
        ("no projects claim", None),
        ("an empty projects claim", Some(serde_json::json!([]))),
    ] {
        let mut caller = requests(&server, Headers::bearer(&token(claim))).await;
        let err = caller
            .create_change_request(new_request())
            .await
            .expect_err(case);
        let message = assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
        assert!(message.contains("projects"), "{message}");
    }
    let mut web_only = requests(
        &server,
        Headers::bearer(&token(Some(serde_json::json!(["web"])))),
    )
    .await;
    web_only
        .create_change_request(new_request())
        .await
        .expect("web");
    let err = web_only
        .create_change_request(pb::CreateChangeRequestRequest {
            project: "mobile".into(),
            ..new_request()
        })
        .await
        .expect_err("not mobile");
    assert_error(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    let mut everywhere = requests(&server, Headers::bearer(&token(Some("*".into())))).await;
    everywhere
        .create_change_request(pb::CreateChangeRequestRequest {
            project: "mobile".into(),
            ..new_request()
        })
        .await
        .expect("\"*\" is every project");
}

#[tokio::test]
async fn an_unknown_kid_refetches_the_keys_at_most_once_per_interval() {
    let first = Issuer::new("key-1");
    let second = Issuer::new("key-2");
    let jwks = JwksServer::start(&first.jwks).await;
    let mut config = first.config();
    config.jwks_file = None;
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_refresh_interval = std::time::Duration::from_secs(3600);
    config.jwks_max_age = std::time::Duration::from_secs(3600);
    config.jwks_min_refetch_interval = std::time::Duration::from_millis(300);
    let server = TestServer::start_with(|c| c.auth.jwt = Some(config)).await;
    assert_eq!(jwks.hits(), 1, "loaded once at start");

    // The provider publishes a new key; a token signed with it is accepted at once, long
    // before the hourly refresh.
    jwks.set(&second.jwks);
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    let mut by_second = requests(
        &server,
        Headers::bearer(&second.token("bob", "approvals:write", &[])),
    )
    .await;
    by_second
        .create_change_request(new_request())
        .await
        .expect("the unknown kid made the server fetch the keys");
    assert_eq!(jwks.hits(), 2);

    // Tokens with kids nobody published cannot make it fetch more than once per interval.
    let stranger = Issuer::new("key-9");
    let mut unknown = requests(
        &server,
        Headers::bearer(&stranger.token("mallory", "approvals:write", &[])),
    )
    .await;
    for _ in 0..5 {
        let err = unknown
            .create_change_request(new_request())
            .await
            .expect_err("unknown kid");
        assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
    }
    assert!(jwks.hits() <= 3, "{} fetches", jwks.hits());
}

#[tokio::test]
async fn keys_that_cannot_be_refreshed_expire_after_jwks_max_age() {
    let issuer = Issuer::new("key-1");
    let jwks = JwksServer::start(&issuer.jwks).await;
    let mut config = issuer.config();
    config.jwks_file = None;
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_refresh_interval = std::time::Duration::from_millis(100);
    config.jwks_max_age = std::time::Duration::from_millis(400);
    let server = TestServer::start_with(|c| c.auth.jwt = Some(config)).await;
    let mut alice = requests(
        &server,
        Headers::bearer(&issuer.token("alice", "approvals:write", &[])),
    )
    .await;
    alice
        .create_change_request(new_request())
        .await
        .expect("fresh keys");
    // The provider's document breaks (or it removed the key and cannot be reached): after
    // jwks_max_age without a good refresh the old key is no longer trusted.
    jwks.set("not a JWKS");
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    let err = alice
        .create_change_request(new_request())
        .await
        .expect_err("stale keys");
    let message = assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
    assert!(message.contains("refreshed"), "{message}");
    // A good refresh trusts the keys again.
    jwks.set(&issuer.jwks);
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if alice.create_change_request(new_request()).await.is_ok() {
            back = true;
            break;
        }
    }
    assert!(back, "the refreshed keys were never trusted again");
}

#[tokio::test]
async fn a_jwks_url_that_redirects_is_not_followed() {
    let issuer = Issuer::new("key-1");
    let target = JwksServer::start(&issuer.jwks).await;
    let redirect = JwksServer::redirecting(&target.url).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("approvals.toml");
    std::fs::write(
        &file,
        format!(
            "[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_url = \"{}\"\n",
            redirect.url
        ),
    )
    .expect("write");
    let database = format!("sqlite://{}", dir.path().join("a.db").display());
    let cwd = dir.path().to_owned();
    // The JWKS servers run on this test's runtime: wait for the process on another thread.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&file)
            .arg("--database-url")
            .arg(database)
            .current_dir(cwd)
            .env_remove("APPROVALS_CONFIG")
            .output()
    })
    .await
    .expect("join")
    .expect("serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("redirect"), "{stderr}");
    assert_eq!(redirect.hits(), 1);
    assert_eq!(target.hits(), 0, "the redirect was not followed");
}

#[tokio::test]
async fn the_rate_limit_is_the_credentials_whoever_it_acts_for() {
    let (key, backend) = api_key(
        "service:backend",
        &["approvals:write", "approvals:act_as"],
        &[],
        &[],
    );
    let server = TestServer::start_with(|c| {
        c.auth.api_keys = vec![backend];
        c.limits.rate_limit_per_second = 1;
        c.limits.rate_limit_burst = 1;
    })
    .await;
    let mut alice = requests(
        &server,
        Headers::bearer(&key).on_behalf_of("user:alice", ""),
    )
    .await;
    alice
        .create_change_request(new_request())
        .await
        .expect("the credential's first call");
    let mut bob = requests(&server, Headers::bearer(&key).on_behalf_of("user:bob", "")).await;
    let err = bob
        .create_change_request(new_request())
        .await
        .expect_err("another user, the same credential");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "RATE_LIMITED");
    assert_eq!(
        info.metadata.get("principal").map(String::as_str),
        Some("service:backend")
    );
}
