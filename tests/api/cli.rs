//! The human CLI (`approvals cr`, `approvals policy`, `approvals login`) as a person or a script
//! runs it: the binary as a subprocess against a real server, with real API keys, its results
//! checked through the API.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use approvals::{
    auth::AuthConfig,
    cli::output::{from_json, names},
    pb::{
        self, State,
        change_applier_server::{ChangeApplier, ChangeApplierServer},
    },
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{callers::*, common::*};

/// An applier that applies everything.
struct Applies;

#[tonic::async_trait]
impl ChangeApplier for Applies {
    async fn apply_changes(
        &self,
        _request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        Ok(Response::new(pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            ..Default::default()
        }))
    }
}

async fn start_applier() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ChangeApplierServer::new(Applies))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    endpoint
}

/// A server with API keys for alice and bob (write) and admin, and an empty config dir.
struct Setup {
    server: TestServer,
    alice: String,
    bob: String,
    admin: String,
    /// `service:pager`, holding approvals:bypass alone.
    bypass: String,
    home: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Self {
        let (alice, alice_config) = api_key("user:alice", &["approvals:write"], &[], &[]);
        let (bob, bob_config) = api_key("user:bob", &["approvals:write"], &[], &[]);
        let (admin, admin_config) = api_key("user:admin", &["approvals:admin"], &[], &[]);
        let (bypass, bypass_config) = api_key("service:pager", &["approvals:bypass"], &[], &[]);
        let server = TestServer::start_with(|c| {
            c.auth = AuthConfig {
                api_keys: vec![alice_config, bob_config, admin_config, bypass_config],
                ..AuthConfig::default()
            };
            c.apply.poll_interval = Duration::from_millis(100);
            c.apply.deadline = Duration::from_secs(3);
        })
        .await;
        Self {
            server,
            alice,
            bob,
            admin,
            bypass,
            home: tempfile::tempdir().expect("home"),
        }
    }

    /// The CLI as the holder of `key`, with the endpoint from the environment.
    fn command(&self, key: &str, args: &[&str]) -> Command {
        let mut command = Command::new(BINARY);
        command
            .args(args)
            .current_dir(self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("HOME", self.home.path())
            .env("APPROVALS_ENDPOINT", self.server.endpoint())
            .env("APPROVALS_API_KEY", key)
            .env_remove("APPROVALS_TOKEN")
            .env_remove("APPROVALS_PROFILE")
            .env_remove("APPROVALS_ACTOR")
            .env_remove("NO_COLOR");
        command
    }

    async fn run(&self, key: &str, args: &[&str]) -> Output {
        let mut command = self.command(key, args);
        tokio::task::spawn_blocking(move || command.output().expect("run the CLI"))
            .await
            .expect("join")
    }

    /// Runs and expects exit code 0; returns stdout.
    async fn ok(&self, key: &str, args: &[&str]) -> String {
        let out = self.run(key, args).await;
        assert!(
            out.status.success(),
            "{args:?} exited {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.home.path().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("dir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    async fn api(&self, key: &str) -> RequestsClient {
        requests(&self.server, Headers::bearer(key)).await
    }

    async fn policy(&self, policy: pb::Policy) {
        policies(&self.server, Headers::bearer(&self.admin))
            .await
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy),
            })
            .await
            .expect("create policy");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn get_as(client: &mut RequestsClient, id: &str) -> pb::ChangeRequest {
    client
        .get_change_request(pb::GetChangeRequestRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_lifecycle_runs_from_the_cli_alone() {
    let setup = Setup::start().await;
    let applier = start_applier().await;
    setup
        .policy(pb::Policy {
            name: "web-manual".into(),
            project: "web".into(),
            action_key: "*".into(),
            apply_mode: pb::ApplyMode::Manual as i32,
            applier_endpoint: applier,
            ..Default::default()
        })
        .await;
    setup.file("rollout.json", r#"{"enabled": true, "rollout": 50}"#);
    let create = [
        "cr",
        "create",
        "--project",
        "web",
        "--env",
        "prod",
        "--action-key",
        "feature_flag.update",
        "--title",
        "Roll out checkout",
        "--change",
        "feature_flag/checkout=rollout.json",
        "--draft",
        "--request-id",
        "retry-1",
        "-o",
        "id",
    ];
    let id = setup.ok(&setup.alice, &create).await.trim().to_owned();
    // The same request id returns the same request.
    assert_eq!(setup.ok(&setup.alice, &create).await.trim(), id);
    let mut api = setup.api(&setup.alice).await;
    let draft = get_as(&mut api, &id).await;
    assert_eq!(state(&draft), State::Draft);
    assert_eq!(draft.changes[0].resource_id, "checkout");
    assert_eq!(
        draft.changes[0].payload,
        Some(payload(serde_json::json!({"enabled": true, "rollout": 50})))
    );

    setup.file("half.json", r#"{"enabled": true, "rollout": 25}"#);
    let out = setup
        .ok(
            &setup.alice,
            &[
                "cr",
                "edit",
                &id,
                "--title",
                "Checkout to 25%",
                "--change",
                "feature_flag/checkout=half.json",
            ],
        )
        .await;
    assert!(out.starts_with(&format!("updated {id}: DRAFT")), "{out}");
    let edited = get_as(&mut api, &id).await;
    assert_eq!(edited.title, "Checkout to 25%");
    assert_eq!(
        edited.changes.len(),
        1,
        "the change on the same resource is replaced"
    );
    assert_eq!(edited.changes[0].id, draft.changes[0].id);

    let out = setup.ok(&setup.alice, &["cr", "submit", &id]).await;
    assert_eq!(out, format!("submitted {id}: IN_REVIEW (0/1 approvals)\n"));
    setup
        .ok(&setup.bob, &["cr", "comment", &id, "-m", "looks fine"])
        .await;
    let out = setup
        .ok(&setup.bob, &["cr", "approve", &id, "-m", "LGTM"])
        .await;
    assert_eq!(out, format!("approved {id}: APPROVED (1/1 approvals)\n"));
    let out = setup.ok(&setup.alice, &["cr", "apply", &id]).await;
    assert_eq!(out, format!("applied {id}: APPLIED (1/1 approvals)\n"));

    let applied = get_as(&mut api, &id).await;
    assert_eq!(state(&applied), State::Applied);
    assert_eq!(applied.applied_by, "user:alice");
    assert_eq!(applied.reviews[0].reviewer, "user:bob");
    assert_eq!(applied.comments[0].text, "looks fine");

    let show = setup.ok(&setup.bob, &["cr", "show", &id]).await;
    for expected in [
        "Checkout to 25%",
        "APPLIED",
        "user:alice",
        "web-manual",
        "feature_flag/checkout",
        "rollout: 25\n",
        "APPROVE  user:bob",
        "looks fine",
    ] {
        assert!(show.contains(expected), "show lacks {expected:?}:\n{show}");
    }
    let history = setup.ok(&setup.bob, &["cr", "history", &id]).await;
    let kinds: Vec<&str> = history
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        kinds,
        [
            "CREATED",
            "UPDATED",
            "SUBMITTED",
            "COMMENTED",
            "REVIEWED",
            "APPLY_STARTED",
            "APPLIED"
        ],
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_equals_the_apis_pending_for_me_and_json_round_trips() {
    let setup = Setup::start().await;
    let mut alice = setup.api(&setup.alice).await;
    let mut bob = setup.api(&setup.bob).await;
    let mut ids = Vec::new();
    for title in ["one", "two", "three"] {
        let mut request = new_request();
        request.title = title.into();
        ids.push(
            alice
                .create_change_request(request)
                .await
                .expect("create")
                .into_inner()
                .id,
        );
    }
    // bob has reviewed one of them: it is no longer pending for him.
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: ids[0].clone(),
        ..Default::default()
    })
    .await
    .expect("approve");

    let pending_ids = |out: &str| -> Vec<String> { out.lines().map(str::to_owned).collect() };
    let cli = setup
        .ok(
            &setup.bob,
            &["cr", "list", "--project", "web", "--pending", "-o", "id"],
        )
        .await;
    let api: Vec<String> = bob
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .change_requests
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending_ids(&cli), api);
    assert_eq!(api.len(), 2);
    // For alice, the requester, nothing is pending; `--mine` is hers.
    let none = setup
        .ok(
            &setup.alice,
            &["cr", "list", "--project", "web", "--pending", "-o", "id"],
        )
        .await;
    assert_eq!(none, "");
    let mine = setup
        .ok(
            &setup.alice,
            &["cr", "list", "--project", "web", "--mine", "-o", "id"],
        )
        .await;
    assert_eq!(pending_ids(&mine).len(), 3);
    let mine_for_bob = setup
        .ok(
            &setup.bob,
            &["cr", "list", "--project", "web", "--mine", "-o", "id"],
        )
        .await;
    assert_eq!(mine_for_bob, "");
    let approved = setup
        .ok(
            &setup.bob,
            &[
                "cr",
                "list",
                "--project",
                "web",
                "--state",
                "approved",
                "-o",
                "id",
            ],
        )
        .await;
    assert_eq!(pending_ids(&approved), [ids[0].clone()]);

    // `--output json` is the proto JSON mapping: it decodes into the message the API returns.
    let json = setup
        .ok(&setup.bob, &["cr", "show", &ids[0], "--output", "json"])
        .await;
    let value: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(value["state"], "STATE_APPROVED");
    assert!(
        value["createTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "RFC 3339: {value}"
    );
    let decoded: pb::ChangeRequest = from_json(value, names::CHANGE_REQUEST).expect("decodes");
    assert_eq!(decoded, get_as(&mut bob, &ids[0]).await);

    let list = setup
        .ok(
            &setup.bob,
            &["cr", "list", "--project", "web", "-o", "yaml"],
        )
        .await;
    let value: serde_json::Value = serde_yaml::from_str(&list).expect("yaml");
    let decoded: pb::ListChangeRequestsResponse =
        from_json(value, names::LIST_CHANGE_REQUESTS).expect("decodes");
    assert_eq!(decoded.change_requests.len(), 3);
    assert_eq!(decoded.change_requests[2], get_as(&mut bob, &ids[0]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_is_declarative_idempotent_and_prunes() {
    let setup = Setup::start().await;
    let dir = setup.home.path().join("policies");
    setup.file(
        "policies/web.yaml",
        r#"policies:
  - name: web-prod
    project: web
    environment: prod
    action_key: "feature_flag.*"
    min_approvals: 2
    approvers: ["group:sre", "user:bob"]
    default_ttl: 7d
    calendars: ["year-end"]
    apply_delay: 30m
  - name: web-default
    project: web
    actionKey: "*"
"#,
    );
    setup.file(
        "policies/staging.toml",
        "name = \"web-staging\"\nproject = \"web\"\nenvironment = \"staging\"\naction_key = \"*\"\napply_mode = \"APPLY_MODE_MANUAL\"\n",
    );
    let dir = dir.to_str().expect("utf-8 path");
    let mut admin = policies(&setup.server, Headers::bearer(&setup.admin)).await;
    let list = |admin: &mut Policies| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_policies(pb::ListPoliciesRequest::default())
                .await
                .expect("list")
                .into_inner()
                .policies
        }
    };

    let dry = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir, "--dry-run"])
        .await;
    assert!(dry.contains("+ would create policy web-prod"), "{dry}");
    assert!(
        list(&mut admin).await.is_empty(),
        "a dry run changes nothing"
    );

    let first = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir])
        .await;
    assert!(
        first.ends_with("applied: 3 to create, 0 to update, 0 to delete, 0 unchanged\n"),
        "{first}"
    );
    let created = list(&mut admin).await;
    let names: Vec<&str> = created.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-default", "web-prod", "web-staging"]);
    let prod = &created[1];
    assert_eq!(prod.min_approvals, 2);
    assert_eq!(prod.approvers, ["group:sre", "user:bob"]);
    assert_eq!(
        prod.default_ttl,
        Some(prost_types::Duration {
            seconds: 7 * 86_400,
            nanos: 0
        })
    );
    assert_eq!(created[2].apply_mode, pb::ApplyMode::Manual as i32);
    assert_eq!(prod.calendars, ["year-end"]);
    assert_eq!(
        prod.apply_delay,
        Some(prost_types::Duration {
            seconds: 1800,
            nanos: 0
        })
    );

    // Twice: nothing to do, nothing touched.
    let second = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir])
        .await;
    assert_eq!(second, "no changes (3 policies unchanged)\n");
    assert_eq!(
        list(&mut admin).await,
        created,
        "etags and update times unchanged"
    );

    // An edit and a removed file: an update, and with --prune a delete.
    std::fs::remove_file(Path::new(dir).join("staging.toml")).expect("rm");
    let text = std::fs::read_to_string(Path::new(dir).join("web.yaml")).expect("read");
    setup.file(
        "policies/web.yaml",
        &text.replace("min_approvals: 2", "min_approvals: 3"),
    );
    let without_prune = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir, "-o", "json"])
        .await;
    let summary: serde_json::Value = serde_json::from_str(&without_prune).expect("json");
    assert_eq!(summary["updated"], serde_json::json!(["web-prod"]));
    assert_eq!(summary["deleted"], serde_json::json!([]));
    assert_eq!(list(&mut admin).await.len(), 3, "no prune, no delete");
    let pruned = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir, "--prune"])
        .await;
    assert_eq!(
        pruned,
        "- delete policy web-staging (project web)\napplied: 0 to create, 0 to update, 1 to delete, 2 unchanged\n"
    );
    let left = list(&mut admin).await;
    let names: Vec<&str> = left.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-default", "web-prod"]);
    assert_eq!(left[1].min_approvals, 3);
    let again = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir, "--prune"])
        .await;
    assert_eq!(again, "no changes (2 policies unchanged)\n");

    // A rename: the new name takes the old one's project/environment/action_key, so the old
    // one is deleted first.
    let text = std::fs::read_to_string(Path::new(dir).join("web.yaml")).expect("read");
    setup.file(
        "policies/web.yaml",
        &text.replace("web-default", "web-fallback"),
    );
    let renamed = setup
        .ok(&setup.admin, &["policy", "apply", "-f", dir, "--prune"])
        .await;
    assert!(
        renamed.contains("+ create policy web-fallback")
            && renamed.contains("- delete policy web-default"),
        "{renamed}"
    );
    let names: Vec<String> = list(&mut admin).await.into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["web-fallback", "web-prod"]);

    // A field the proto does not have is refused, naming the file and the entry.
    let bad = setup.file(
        "bad.yaml",
        "policies:\n  - {name: x, project: web, action_key: '*', bogus: 1}\n",
    );
    let out = setup
        .run(
            &setup.admin,
            &["policy", "apply", "-f", bad.to_str().expect("path")],
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("bad.yaml: policies[0]: unrecognized field name 'bogus'"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_request_until_it_is_applied() {
    let setup = Setup::start().await;
    let applier = start_applier().await;
    setup
        .policy(pb::Policy {
            name: "web-auto".into(),
            project: "web".into(),
            action_key: "*".into(),
            apply_mode: pb::ApplyMode::Auto as i32,
            applier_endpoint: applier,
            ..Default::default()
        })
        .await;
    setup.file("rollout.json", r#"{"enabled": true}"#);
    let mut command = setup.command(
        &setup.alice,
        &[
            "cr",
            "create",
            "--project",
            "web",
            "--action-key",
            "feature_flag.update",
            "--title",
            "auto",
            "--change",
            "feature_flag/checkout=rollout.json",
            "--wait",
            "-o",
            "json",
        ],
    );
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the CLI");
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"));

    // The CLI waits in IN_REVIEW until bob approves through the API.
    let mut bob = setup.api(&setup.bob).await;
    let id = loop {
        let listed = bob
            .list_change_requests(pb::ListChangeRequestsRequest {
                project: "web".into(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .change_requests;
        if let Some(r) = listed.first() {
            break r.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "--wait returned while IN_REVIEW");
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");

    let out = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("--wait returns")
        .expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(printed["state"], "STATE_APPLIED");
    assert_eq!(printed["id"], id.as_str());
    let transitions = stderr(&out);
    assert!(
        transitions.contains("REVIEWED IN_REVIEW -> APPROVED by user:bob")
            && transitions.contains("APPLIED APPLYING -> APPLIED"),
        "each transition printed:\n{transitions}"
    );

    // A request rejected while waited for: exit code 7.
    let mut command = setup.command(
        &setup.alice,
        &[
            "cr",
            "create",
            "--project",
            "web",
            "--action-key",
            "feature_flag.update",
            "--title",
            "rejected",
            "--change",
            "feature_flag/other=rollout.json",
            "--wait",
            "-o",
            "id",
        ],
    );
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the CLI");
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"));
    let rejected_id = loop {
        let listed = bob
            .list_change_requests(pb::ListChangeRequestsRequest {
                project: "web".into(),
                states: vec![State::InReview as i32],
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .change_requests;
        if let Some(r) = listed.first() {
            break r.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    bob.reject_change_request(pb::RejectChangeRequestRequest {
        id: rejected_id.clone(),
        comment: "no".into(),
        ..Default::default()
    })
    .await
    .expect("reject");
    let out = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("--wait returns")
        .expect("join");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), rejected_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_print_code_reason_and_fields_with_documented_exit_codes() {
    let setup = Setup::start().await;
    let mut alice = setup.api(&setup.alice).await;
    let id = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner()
        .id;

    // FAILED_PRECONDITION: exit code 5.
    let out = setup.run(&setup.alice, &["cr", "submit", &id]).await;
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        stderr(&out),
        "error: FAILED_PRECONDITION: cannot submit a change request in state IN_REVIEW\n  \
         reason: INVALID_TRANSITION action=submit state=IN_REVIEW\n"
    );
    assert!(out.stdout.is_empty());

    // A BadRequest: each field on its own line; exit code 2.
    let long = "x".repeat(600);
    let out = setup
        .run(
            &setup.alice,
            &["cr", "create", "--project", "web", "--title", &long],
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "error: INVALID_ARGUMENT: invalid argument: action_key: is required; title: must be at \
         most 512 characters; changes: at least one change is required\n  \
         reason: INVALID_ARGUMENT\n  \
         action_key: is required\n  \
         title: must be at most 512 characters\n  \
         changes: at least one change is required\n"
    );

    // NOT_FOUND: 3; PERMISSION_DENIED: 4; UNAUTHENTICATED: 4; a stale etag (ABORTED): 5.
    let missing = "01a24dfb-2160-723b-a125-000000000000";
    let out = setup.run(&setup.alice, &["cr", "show", missing]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = setup.run(&setup.alice, &["cr", "approve", &id]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).starts_with("error: PERMISSION_DENIED: ")
            && stderr(&out).contains("reason: SELF_APPROVAL_FORBIDDEN"),
        "{}",
        stderr(&out)
    );
    let out = setup.run("apv1_wrong", &["cr", "show", &id]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = setup
        .run(&setup.alice, &["cr", "cancel", &id, "--etag", "stale"])
        .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reason: ETAG_MISMATCH"),
        "{}",
        stderr(&out)
    );
    // Usage errors (clap's): 2; no server there: 6.
    let out = setup.run(&setup.alice, &["cr", "lst"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = setup
        .run(
            &setup.alice,
            &[
                "cr",
                "list",
                "--project",
                "web",
                "--endpoint",
                "http://127.0.0.1:1",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("error: cannot connect to http://127.0.0.1:1"));
    // Never a debug dump.
    assert!(!stderr(&out).contains("Status {"));

    // The exit code table is in --help.
    let help = setup.ok(&setup.alice, &["cr", "--help"]).await;
    assert!(
        help.contains("Exit codes:") && help.contains("7  --wait"),
        "{help}"
    );
    let help = setup.ok(&setup.alice, &["cr", "apply", "--help"]).await;
    assert!(
        help.contains("Examples:") && help.contains("--break-glass"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_writes_a_profile_that_later_commands_use() {
    let setup = Setup::start().await;
    let mut alice = setup.api(&setup.alice).await;
    let id = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner()
        .id;
    // Interactive: the answers on stdin (endpoint, "t" to paste the token, the token).
    let mut command = setup.command("", &["login", "--profile", "bob", "--project", "web"]);
    command
        .env_remove("APPROVALS_API_KEY")
        .env_remove("APPROVALS_ENDPOINT");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("login");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{}\nt\n{}", setup.server.endpoint(), setup.bob).expect("answers");
    }
    let out = child.wait_with_output().expect("login");
    assert!(out.status.success(), "{}", stderr(&out));
    let file = setup.home.path().join("config/approvals/config.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Non-interactive: a profile that reads the key from a variable, made the default.
    let mut command = setup.command(
        "",
        &[
            "login",
            "--profile",
            "alice",
            "--endpoint",
            &setup.server.endpoint(),
            "--credential-env",
            "ALICE_KEY",
            "--project",
            "web",
            "--default",
        ],
    );
    let out = command.output().expect("login");
    assert!(out.status.success(), "{}", stderr(&out));

    let as_profile = |profile: Option<&str>, args: &[&str]| {
        let mut command = setup.command("", args);
        command
            .env_remove("APPROVALS_API_KEY")
            .env_remove("APPROVALS_ENDPOINT")
            .env("ALICE_KEY", &setup.alice);
        if let Some(profile) = profile {
            command.env("APPROVALS_PROFILE", profile);
        }
        command.output().expect("run")
    };
    // bob's profile: the request is pending for him; the default profile is alice's.
    let out = as_profile(Some("bob"), &["cr", "list", "--pending", "-o", "id"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        id,
        "{}",
        stderr(&out)
    );
    let out = as_profile(None, &["cr", "list", "--pending", "-o", "id"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let out = as_profile(
        None,
        &["cr", "list", "--profile", "bob", "--mine", "-o", "id"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "--profile wins");

    // An inline token in a file others may read is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = as_profile(Some("bob"), &["cr", "list"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    }

    // Completions for the three shells.
    for shell in ["bash", "zsh", "fish"] {
        let out = setup.ok("", &["completions", shell]).await;
        assert!(out.contains("approvals") && out.contains("cr"), "{shell}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_from_a_file_and_watch_the_events() {
    let setup = Setup::start().await;
    setup.file(
        "request.yaml",
        r#"project: web
environment: prod
action_key: feature_flag.update
title: From a file
changes:
  - action: update
    resource_type: feature_flag
    resource_id: checkout
    payload: {enabled: true, rollout: 10}
"#,
    );
    let id = setup
        .ok(
            &setup.alice,
            &[
                "cr",
                "create",
                "-f",
                "request.yaml",
                "--title",
                "Flag wins",
                "-o",
                "id",
            ],
        )
        .await
        .trim()
        .to_owned();
    let mut alice = setup.api(&setup.alice).await;
    let created = get_as(&mut alice, &id).await;
    assert_eq!(created.title, "Flag wins", "a flag overrides the file");
    assert_eq!(created.environment, "prod");
    assert_eq!(
        created.changes[0].payload,
        Some(payload(serde_json::json!({"enabled": true, "rollout": 10})))
    );
    setup
        .ok(&setup.bob, &["cr", "approve", &id, "-m", "ok"])
        .await;

    // `cr watch --from 1 -o json`: one event a line, replayed from the log, until stopped.
    let mut command = setup.command(
        &setup.bob,
        &[
            "cr",
            "watch",
            "--project",
            "web",
            "--from",
            "1",
            "-o",
            "json",
        ],
    );
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(2)
            .map(|l| l.expect("line"))
            .collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), lines)
        .await
        .expect("two events")
        .expect("join");
    let _ = child.kill();
    let _ = child.wait();
    let events: Vec<pb::Event> = lines
        .into_iter()
        .map(|l| from_json(serde_json::from_str(&l).expect("json"), names::EVENT).expect("event"))
        .collect();
    assert_eq!(events[0].kind, pb::EventKind::Created as i32);
    assert_eq!(events[1].kind, pb::EventKind::Reviewed as i32);
    assert_eq!(events[1].to_state, State::Approved as i32);
    assert_eq!(events[1].change_request_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_unschedule_cancel_and_break_glass() {
    let setup = Setup::start().await;
    let applier = start_applier().await;
    setup
        .policy(pb::Policy {
            name: "web-manual".into(),
            project: "web".into(),
            action_key: "*".into(),
            apply_mode: pb::ApplyMode::Manual as i32,
            applier_endpoint: applier,
            ..Default::default()
        })
        .await;
    let mut alice = setup.api(&setup.alice).await;
    let mut bob = setup.api(&setup.bob).await;
    let id = approved_request(&mut alice, &mut bob).await;

    let out = setup
        .ok(&setup.alice, &["cr", "schedule", &id, "--at", "in 1h"])
        .await;
    assert_eq!(out, format!("scheduled {id}: SCHEDULED (1/1 approvals)\n"));
    let scheduled = get_as(&mut alice, &id).await;
    let at = scheduled
        .schedule
        .as_ref()
        .and_then(|s| s.apply_time)
        .expect("apply time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs() as i64;
    assert!((at.seconds - now - 3600).abs() < 60, "in an hour: {at:?}");
    let show = setup.ok(&setup.alice, &["cr", "show", &id]).await;
    assert!(
        show.contains("schedule:") && (show.contains("in 59m (") || show.contains("in 1h (")),
        "{show}"
    );
    assert!(!show.contains('\x1b'), "no colours off a terminal:\n{show}");

    setup.ok(&setup.alice, &["cr", "unschedule", &id]).await;
    assert_eq!(state(&get_as(&mut alice, &id).await), State::Approved);
    for args in [
        &["cr", "schedule", &id, "--at", "in 1h", "--next-open-window"][..],
        &["cr", "schedule", &id][..],
    ] {
        let out = setup.run(&setup.alice, args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "--at or --next-open-window: {args:?}"
        );
    }
    let out = setup
        .ok(&setup.alice, &["cr", "cancel", &id, "-m", "superseded"])
        .await;
    assert_eq!(out, format!("cancelled {id}: CANCELLED (1/1 approvals)\n"));
    let out = setup.run(&setup.alice, &["cr", "reject", &id]).await;
    assert_eq!(out.status.code(), Some(2), "-m is required for reject");

    // Break-glass: a key with approvals:bypass alone applies a request in review.
    let urgent = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner()
        .id;
    let out = setup
        .ok(
            &setup.bypass,
            &[
                "cr",
                "apply",
                &urgent,
                "--break-glass",
                "incident 4711",
                "--wait",
            ],
        )
        .await;
    assert_eq!(out, format!("applied {urgent}: APPLIED (0/1 approvals)\n"));
    let applied = get_as(&mut alice, &urgent).await;
    assert_eq!(applied.bypassed_by, "service:pager");
    assert_eq!(applied.bypass_justification, "incident 4711");

    // The next open window: with no calendar and no delay, that is now.
    let next = approved_request(&mut alice, &mut bob).await;
    let out = setup
        .ok(
            &setup.alice,
            &["cr", "schedule", &next, "--next-open-window"],
        )
        .await;
    assert!(out.starts_with(&format!("scheduled {next}: ")), "{out}");
    let started = std::time::Instant::now();
    while state(&get_as(&mut alice, &next).await) != State::Applied {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{next} applies at the next open instant"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A request alice created and bob approved, by id.
async fn approved_request(alice: &mut RequestsClient, bob: &mut RequestsClient) -> String {
    let id = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner()
        .id;
    bob.approve_change_request(pb::ApproveChangeRequestRequest {
        id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("approve");
    id
}
