//! Test harness: the real server on an ephemeral port, called through the generated client.
//!
//! Each server gets its own database: a SQLite file in a temporary directory, or, when
//! `APPROVALS_TEST_DATABASE_URL` names a PostgreSQL server, a fresh database created on it and
//! dropped afterwards. So tests run in parallel on either backend.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use approvals::{
    config::Config,
    pb::{self, change_requests_client::ChangeRequestsClient},
};
use sea_orm::{ConnectionTrait, Database};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_types::StatusExt;

pub const TEST_DATABASE_ENV: &str = "APPROVALS_TEST_DATABASE_URL";

/// `APPROVALS_TEST_POSTGRES=later`: this run is on SQLite and a later run of the same suite with
/// `APPROVALS_TEST_DATABASE_URL` covers the PostgreSQL-only tests (`.ci/run`'s first pass).
pub const TEST_POSTGRES_LATER_ENV: &str = "APPROVALS_TEST_POSTGRES";

/// Whether this is CI (`CI=true` or `CI=1`, as CI systems and `.ci/run` set it).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "1" || ci.eq_ignore_ascii_case("true"))
}

/// A test that cannot run here because `why` (what is missing, and how to provide it). In CI
/// that fails the test: a suite that passes there has run everything. Elsewhere it prints
/// `SKIPPED <test>: <why>` past the test harness's output capture, so a plain `cargo test`
/// shows it; the caller then returns.
#[track_caller]
pub fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run: {why}; with CI=true a missing dependency fails the test"
    );
    say_skipped(test, why);
}

/// Writes to the process's stderr directly: `eprintln!` in a test is captured and shown only
/// when the test fails, which is what made skips silent.
fn say_skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The PostgreSQL server a PostgreSQL-only test runs on (`APPROVALS_TEST_DATABASE_URL`), or
/// `None` after [`skip`], or after only a notice when `APPROVALS_TEST_POSTGRES=later` says a
/// later pass runs the test on PostgreSQL.
#[track_caller]
pub fn postgres_or_skip(test: &str) -> Option<String> {
    match std::env::var(TEST_DATABASE_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(TEST_POSTGRES_LATER_ENV).is_ok_and(|v| v == "later") => {
            say_skipped(
                test,
                &format!("runs in the PostgreSQL pass ({TEST_POSTGRES_LATER_ENV}=later)"),
            );
            None
        }
        _ => {
            skip(
                test,
                &format!(
                    "needs PostgreSQL: set {TEST_DATABASE_ENV}=postgres://postgres@127.0.0.1:5432/postgres \
                     (any server this user may create databases on)"
                ),
            );
            None
        }
    }
}

/// Where a test server keeps its data; removed on drop.
pub enum TestDatabase {
    Sqlite(tempfile::TempDir),
    Postgres {
        admin_url: String,
        name: String,
    },
    /// Another server's database, not owned.
    Shared,
}

impl TestDatabase {
    pub async fn create() -> (Self, String) {
        match std::env::var(TEST_DATABASE_ENV) {
            Ok(admin_url) if !admin_url.is_empty() => {
                let name = format!("approvals_test_{}", uuid::Uuid::now_v7().simple());
                let admin = Database::connect(&admin_url)
                    .await
                    .expect("connect to the test PostgreSQL");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let url = with_database(&admin_url, &name);
                (Self::Postgres { admin_url, name }, url)
            }
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("approvals.db").display());
                (Self::Sqlite(dir), url)
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }
}

/// `postgres://u@h:5432/db?x=y` with `db` replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let prefix = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{prefix}/{name}?{query}"),
        None => format!("{prefix}/{name}"),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Self::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        if let Ok(admin) = Database::connect(&admin_url).await {
                            let _ = admin
                                .execute_unprepared(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await;
                        }
                    });
                }
            });
            let _ = cleanup.join();
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    // Last: the database outlives the server task.
    pub database: TestDatabase,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server whose configuration `configure` may adjust.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let (database, database_url) = TestDatabase::create().await;
        Self::start_on(database, database_url, configure).await
    }

    /// Starts a server that reads the time from `clock` (a [`ManualClock`], say).
    pub async fn start_with_clock(
        clock: approvals::clock::SharedClock,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let (database, database_url) = TestDatabase::create().await;
        Self::start_on_clock(database, database_url, configure, clock).await
    }

    /// Starts a second server (a replica) on the database of `other`.
    pub async fn replica_of(other: &TestServer, configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(TestDatabase::Shared, other.database_url.clone(), configure).await
    }

    async fn start_on(
        database: TestDatabase,
        database_url: String,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_on_clock(
            database,
            database_url,
            configure,
            approvals::clock::system(),
        )
        .await
    }

    async fn start_on_clock(
        database: TestDatabase,
        database_url: String,
        configure: impl FnOnce(&mut Config),
        clock: approvals::clock::SharedClock,
    ) -> Self {
        let mut config = Config::default();
        config.database.url = database_url.clone();
        config.database.max_connections = 8;
        // Test appliers listen on loopback ports, in plain text (`allow_insecure`); `configure`
        // may narrow or clear this.
        config.apply.allowed_endpoints =
            approvals::config::allowed_endpoints::AllowedEndpoints::insecure(&["http://127.0.0.1"])
                .expect("allowed endpoints");
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stop.await;
            };
            if let Err(err) =
                approvals::transport::run_with_clock(config, listener, stopped, clock).await
            {
                panic!("server failed: {err}");
            }
        });
        let server = Self {
            addr,
            database_url,
            shutdown: Some(shutdown),
            task: Some(task),
            database,
        };
        server.wait_until_serving().await;
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the test server")
    }

    async fn wait_until_serving(&self) {
        for _ in 0..200 {
            if let Ok(channel) = Channel::from_shared(self.endpoint())
                .expect("endpoint")
                .connect()
                .await
            {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                if let Ok(response) = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && response.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("test server did not start serving");
    }

    /// A client that calls as `actor` (e.g. `user:alice`).
    pub async fn client(&self, actor: &str) -> Client {
        self.client_in_groups(actor, "").await
    }

    pub async fn client_in_groups(&self, actor: &str, groups: &str) -> Client {
        ChangeRequestsClient::with_interceptor(
            self.channel().await,
            Caller::new(Some(actor), groups),
        )
    }

    /// A client that sends no identity at all.
    pub async fn anonymous(&self) -> Client {
        ChangeRequestsClient::with_interceptor(self.channel().await, Caller::new(None, ""))
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Adds the caller's identity metadata to every call.
#[derive(Clone)]
pub struct Caller {
    actor: Option<MetadataValue<tonic::metadata::Ascii>>,
    groups: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Caller {
    /// Calls as `actor` with no groups.
    pub fn named(actor: &str) -> Self {
        Self::new(Some(actor), "")
    }

    fn new(actor: Option<&str>, groups: &str) -> Self {
        Self {
            actor: actor.map(|a| a.parse().expect("ascii actor")),
            groups: (!groups.is_empty()).then(|| groups.parse().expect("ascii groups")),
        }
    }
}

impl Interceptor for Caller {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(actor) = &self.actor {
            request
                .metadata_mut()
                .insert(approvals::ACTOR_HEADER, actor.clone());
        }
        if let Some(groups) = &self.groups {
            request
                .metadata_mut()
                .insert(approvals::GROUPS_HEADER, groups.clone());
        }
        Ok(request)
    }
}

pub type Client = ChangeRequestsClient<InterceptedService<Channel, Caller>>;

/// A JSON object as a `google.protobuf.Struct`.
pub fn payload(json: serde_json::Value) -> prost_types::Struct {
    fn value(json: &serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match json {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.iter().map(value).collect(),
            }),
            serde_json::Value::Object(_) => Kind::StructValue(payload(json.clone())),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match json {
        serde_json::Value::Object(map) => prost_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
        },
        other => panic!("payload must be a JSON object, got {other}"),
    }
}

pub fn flag_change(resource_id: &str) -> pb::Change {
    pb::Change {
        action: "update".into(),
        resource_type: "feature_flag".into(),
        resource_id: resource_id.into(),
        payload: Some(payload(serde_json::json!({"enabled": true, "rollout": 50}))),
        ..Default::default()
    }
}

/// A valid create request for project `web`, one change on flag `checkout`.
pub fn new_request() -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: "web".into(),
        environment: "prod".into(),
        action_key: "feature_flag.update".into(),
        action_version: 1,
        title: "Roll out checkout".into(),
        description: "50% of users".into(),
        changes: vec![flag_change("checkout")],
        intent_display: "Enable checkout for 50%".into(),
        ..Default::default()
    }
}

pub async fn create(
    client: &mut Client,
    request: pb::CreateChangeRequestRequest,
) -> pb::ChangeRequest {
    client
        .create_change_request(request)
        .await
        .expect("create")
        .into_inner()
}

/// Approves as the client's caller, expecting success.
pub async fn approve(client: &mut Client, id: &str) -> pb::ChangeRequest {
    client
        .approve_change_request(pb::ApproveChangeRequestRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .expect("approve")
        .into_inner()
}

pub async fn get(client: &mut Client, id: &str) -> pb::ChangeRequest {
    client
        .get_change_request(pb::GetChangeRequestRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Asserts a status code and `ErrorInfo` reason, and returns the message for further checks.
pub fn assert_error(status: &Status, code: Code, reason: &str) -> String {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "unexpected reason in {status:?}");
    assert_eq!(info.domain, approvals::ERROR_DOMAIN);
    status.message().to_owned()
}

/// Asserts INVALID_ARGUMENT naming exactly `fields` in its BadRequest details and its message.
pub fn assert_invalid(status: &Status, fields: &[&str]) {
    let message = assert_error(status, Code::InvalidArgument, "INVALID_ARGUMENT");
    let bad = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let named: Vec<&str> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(named, fields, "violations of {status:?}");
    for field in fields {
        assert!(
            message.contains(field),
            "message {message:?} does not name {field}"
        );
    }
}

pub async fn events(client: &mut Client, id: &str) -> Vec<pb::Event> {
    client
        .list_change_request_events(pb::ListChangeRequestEventsRequest {
            id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events
}

pub fn state(r: &pb::ChangeRequest) -> pb::State {
    pb::State::try_from(r.state).expect("known state")
}

pub const BINARY: &str = env!("CARGO_BIN_EXE_approvals");

/// A server process; killed on drop if still running.
pub struct Process {
    pub child: Child,
    pub addr: String,
    pub output: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `approvals serve` on an ephemeral port and waits for its "serving" log line.
    pub fn serve(database_url: &str, dir: &Path) -> Self {
        Self::serve_with(database_url, dir, &[])
    }

    /// Like [`Self::serve`], with extra environment variables (`APPROVALS_*` settings).
    pub fn serve_with(database_url: &str, dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(BINARY);
        command.envs(env.iter().copied());
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
            ])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start approvals");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, output) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        while addr.is_none() {
            let line = output
                .recv_timeout(Duration::from_secs(30))
                .expect("server logs that it is serving");
            if line.contains("serving") {
                addr = line.rsplit("address=").next().map(|a| a.trim().to_owned());
            }
        }
        Self {
            child,
            addr: addr.expect("address"),
            output,
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        for _ in 0..100 {
            if let Ok(Some(exit)) = self.child.try_wait() {
                return exit;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not stop within 5 s of SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A clock a test moves by hand: the server sees time pass without the test waiting for it.
pub struct ManualClock {
    micros: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    /// A clock standing at the real time now.
    pub fn now() -> std::sync::Arc<Self> {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        std::sync::Arc::new(Self {
            micros: std::sync::atomic::AtomicI64::new(micros),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.micros
            .fetch_add(by.as_micros() as i64, std::sync::atomic::Ordering::SeqCst);
    }

    /// The clock's time plus `ahead`, as a protobuf Timestamp.
    pub fn timestamp_in(&self, ahead: Duration) -> prost_types::Timestamp {
        let micros =
            self.micros.load(std::sync::atomic::Ordering::SeqCst) + ahead.as_micros() as i64;
        prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
        }
    }
}

impl approvals::clock::Clock for ManualClock {
    fn now(&self) -> approvals_domain::Timestamp {
        approvals_domain::Timestamp::from_micros(
            self.micros.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

/// The first page of `project`'s requests (ListChangeRequests with its defaults).
pub async fn list_project(client: &mut Client, project: &str) -> pb::ListChangeRequestsResponse {
    client
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: project.into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
}

/// The real time now, in whole seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}
