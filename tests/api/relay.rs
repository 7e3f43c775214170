//! The relay (`approvals relay`): real HTTP receivers on ephemeral ports, the relay run in
//! process through `approvals::relay::run` (and as a process of the built binary for the
//! SIGKILL test), its state on the server's RelayState API.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use approvals::{
    auth::AuthConfig,
    pb::{self, relay_state_client::RelayStateClient},
    relay::RelayConfig,
};
use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    callers::{Headers, api_key, requests},
    common::{BINARY, TestServer, assert_error, new_request},
};

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The CloudEvent's id: the event's revision.
    fn revision(&self) -> i64 {
        self.json()["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("id is a revision")
    }
}

#[derive(Clone, Default)]
struct Behaviour {
    received: Arc<Mutex<Vec<Received>>>,
    /// The status answered (200 unless set).
    status: Arc<AtomicU16>,
    /// Answer the first N requests with 503 (then `status`).
    fail_first: Arc<AtomicU64>,
    /// Wait this many ms before answering.
    delay_ms: Arc<AtomicU64>,
}

async fn receive(State(b): State<Behaviour>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delay = b.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    b.received.lock().expect("lock").push(Received {
        headers,
        body,
        at: Instant::now(),
    });
    if b.fail_first
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::from_u16(b.status.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK)
}

/// An HTTP receiver on an ephemeral port, which can go down and come back on the same port.
struct Receiver {
    addr: SocketAddr,
    behaviour: Behaviour,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    async fn start() -> Self {
        let behaviour = Behaviour::default();
        behaviour.status.store(200, Ordering::Relaxed);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut receiver = Self {
            addr,
            behaviour,
            stop: None,
            task: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: TcpListener) {
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(self.behaviour.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Stops listening: connections are refused.
    async fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.serve(listener);
    }

    fn received(&self) -> Vec<Received> {
        self.behaviour.received.lock().expect("lock").clone()
    }

    /// Waits until `n` requests arrived (at most `within`).
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= n || Instant::now() > deadline {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A server with API keys: a relay's (read + relay), two writers.
struct Setup {
    server: TestServer,
    relay_key: String,
    writer_key: String,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut approvals::config::Config)) -> Self {
        let (relay_key, relay) = api_key(
            "service:relay",
            &["approvals:read", "approvals:relay"],
            &[],
            &[],
        );
        let (writer_key, writer) = api_key("user:alice", &["approvals:write"], &[], &[]);
        let server = TestServer::start_with(|c| {
            c.auth = AuthConfig {
                api_keys: vec![relay, writer],
                ..AuthConfig::default()
            };
            configure(c);
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("credential"), &relay_key).expect("credential");
        Self {
            server,
            relay_key,
            writer_key,
            dir,
        }
    }

    /// A relay config with these sinks (TOML of `[[relay.sinks]]` tables).
    fn config(&self, sinks: &str) -> RelayConfig {
        let text = format!(
            "[relay]\nendpoint = {:?}\ncredential_file = {:?}\nlease_duration = \"2s\"\n\n{sinks}",
            self.server.endpoint(),
            self.credential_file(),
        );
        let config = RelayConfig::parse(&text, "test").expect("relay config");
        config.check("test").expect("valid relay config");
        config
    }

    fn credential_file(&self) -> PathBuf {
        self.dir.path().join("credential")
    }

    /// Creates a request in project `web` (one CREATED event); returns its revision.
    async fn create(&self, title: &str) -> i64 {
        let mut writer = requests(&self.server, Headers::bearer(&self.writer_key)).await;
        writer
            .create_change_request(pb::CreateChangeRequestRequest {
                title: title.into(),
                ..new_request()
            })
            .await
            .expect("create")
            .into_inner()
            .revision
    }

    async fn state(&self) -> RelayStateClient<InterceptedService<Channel, Headers>> {
        RelayStateClient::with_interceptor(
            self.server.channel().await,
            Headers::bearer(&self.relay_key),
        )
    }

    async fn cursor(&self, sink: &str) -> i64 {
        match self
            .state()
            .await
            .get_sink_state(pb::GetSinkStateRequest { sink: sink.into() })
            .await
        {
            Ok(state) => state.into_inner().cursor,
            Err(_) => 0,
        }
    }

    /// Waits until the sink's cursor reaches `revision`.
    async fn wait_cursor(&self, sink: &str, revision: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let cursor = self.cursor(sink).await;
            if cursor >= revision || Instant::now() > deadline {
                return cursor;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a relay serves the sink (its lease is held), so that "from now" has begun.
    async fn wait_served(&self, sink: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(state) = self
                .state()
                .await
                .get_sink_state(pb::GetSinkStateRequest { sink: sink.into() })
                .await
                && !state.into_inner().holder.is_empty()
            {
                // The watch opens right after the lease.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no relay took the lease on {sink}");
    }
}

fn sink(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[relay.sinks]]\nname = {name:?}\nurl = {url:?}\nproject = \"web\"\nformat = \"cloudevents\"\nsecrets = [{SECRET_A:?}, {SECRET_B:?}]\ntimeout = \"2s\"\nbackoff = \"50ms\"\nmax_backoff = \"500ms\"\n{extra}\n"
    )
}

/// A relay running in this process until dropped (aborted: like a process that died, its
/// lease is not released) or stopped (released).
struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl InProcess {
    fn start(config: RelayConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            approvals::relay::run(config, async {
                let _ = stopped.await;
            })
            .await
            .expect("relay runs");
        });
        Self {
            stop: Some(stop),
            task,
        }
    }

    fn kill(self) {
        self.task.abort();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Verifies a request's signature with the `standardwebhooks` crate under `secret`.
fn verify(received: &Received, secret: &str) -> Result<(), String> {
    let webhook = standardwebhooks::Webhook::new(secret).map_err(|e| format!("{e:?}"))?;
    webhook
        .verify(&received.body, &received.headers)
        .map_err(|e| format!("{e:?}"))
}

/// Every revision delivered in order, each once, except a repeat of the one before it (the
/// event in flight, same webhook-id).
fn assert_in_order_without_gaps(received: &[Received], expected: &[i64]) {
    let mut seen: Vec<i64> = Vec::new();
    let mut ids: HashMap<i64, String> = HashMap::new();
    for r in received {
        let revision = r.revision();
        let id = r.header("webhook-id").to_owned();
        if let Some(previous) = ids.insert(revision, id.clone()) {
            assert_eq!(previous, id, "a repeat keeps its webhook-id");
        }
        if seen.last() == Some(&revision) {
            continue; // the in-flight event, again
        }
        assert!(
            !seen.contains(&revision),
            "revision {revision} delivered twice, not in a row: {seen:?}"
        );
        seen.push(revision);
    }
    assert_eq!(seen, expected, "every event once, in revision order");
}

#[tokio::test]
async fn cloudevents_are_signed_with_every_secret_and_carry_the_required_attributes() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    let relay = InProcess::start(setup.config(&sink("ce", &receiver.url(), "")));
    setup.wait_served("ce").await;
    let first = setup.create("First").await;
    let second = setup.create("Second").await;
    let received = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 2, "both events delivered");
    for (r, revision, title) in [
        (&received[0], first, "First"),
        (&received[1], second, "Second"),
    ] {
        // Signed with both secrets (rotation): each verifies alone, independently.
        verify(r, SECRET_A).expect("signature under the first secret");
        verify(r, SECRET_B).expect("signature under the second secret");
        assert!(verify(r, "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldCBhdCBhbGw=").is_err());
        assert_eq!(r.header("webhook-signature").split(' ').count(), 2);
        assert_eq!(r.header("webhook-id"), format!("ce-{revision}"));
        assert_eq!(r.header("content-type"), "application/cloudevents+json");
        let event = r.json();
        // CloudEvents 1.0 required attributes, and ours.
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], revision.to_string());
        assert_eq!(event["source"], "approvals/web");
        assert_eq!(event["type"], "approvals.change_request.created");
        assert!(event["subject"].as_str().is_some_and(|s| s.len() == 36));
        assert!(
            event["time"]
                .as_str()
                .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
            "{event}"
        );
        assert_eq!(event["datacontenttype"], "application/json");
        // data: the Event in proto JSON, with the request as it stood after it.
        let data = &event["data"];
        assert_eq!(
            data["revision"],
            revision.to_string(),
            "int64 is a JSON string"
        );
        assert_eq!(data["kind"], "EVENT_KIND_CREATED");
        assert_eq!(data["changeRequestId"], event["subject"]);
        assert_eq!(data["changeRequest"]["title"], title);
        assert_eq!(data["actor"], "user:alice");
    }
    assert_eq!(
        setup
            .wait_cursor("ce", second, Duration::from_secs(5))
            .await,
        second
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_in_order_afterwards() {
    let setup = Setup::start().await;
    let mut receiver = Receiver::start().await;
    // Enough attempts to outlast the outage (the default, 10, would dead letter the first
    // event after about 3 s of 500 ms backoffs).
    let relay =
        InProcess::start(setup.config(&sink("down", &receiver.url(), "max_attempts = 100")));
    setup.wait_served("down").await;
    let mut revisions = vec![setup.create("before").await];
    receiver.wait_for(1, Duration::from_secs(10)).await;
    // Down for 3 s: the relay retries the same event with backoff (capped at 500 ms here, so
    // the test does not wait for minutes; a 10 s outage is the same loop, longer).
    receiver.down().await;
    for i in 0..5 {
        revisions.push(setup.create(&format!("during {i}")).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "nothing got through while down"
    );
    receiver.up().await;
    revisions.push(setup.create("after").await);
    let last = *revisions.last().expect("revisions");
    assert_eq!(
        setup
            .wait_cursor("down", last, Duration::from_secs(15))
            .await,
        last
    );
    assert_in_order_without_gaps(&receiver.received(), &revisions);
    relay.stop().await;
}

#[tokio::test]
async fn a_4xx_goes_to_dead_letters_at_once_a_5xx_is_retried_and_a_retry_redelivers() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    let relay = InProcess::start(setup.config(&sink("dl", &receiver.url(), "max_attempts = 5")));
    setup.wait_served("dl").await;

    // 400: one attempt, then a dead letter, and delivery goes on.
    receiver.behaviour.status.store(400, Ordering::Relaxed);
    let refused = setup.create("refused").await;
    assert_eq!(
        setup
            .wait_cursor("dl", refused, Duration::from_secs(10))
            .await,
        refused
    );
    assert_eq!(receiver.received().len(), 1, "no retry after a 400");
    let mut state = setup.state().await;
    let letters = state
        .list_dead_letters(pb::ListDeadLettersRequest {
            sink: "dl".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .dead_letters;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].revision, refused);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].webhook_id, format!("dl-{refused}"));
    assert!(
        letters[0].reason.contains("HTTP 400"),
        "{}",
        letters[0].reason
    );

    // 503 twice, then 200: delivered on the third attempt, no dead letter.
    receiver.behaviour.status.store(200, Ordering::Relaxed);
    receiver.behaviour.fail_first.store(2, Ordering::Relaxed);
    let retried = setup.create("retried").await;
    assert_eq!(
        setup
            .wait_cursor("dl", retried, Duration::from_secs(10))
            .await,
        retried
    );
    let attempts: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.revision() == retried)
        .collect();
    assert_eq!(attempts.len(), 3, "two 503s, then delivered");
    assert!(
        attempts
            .iter()
            .all(|r| r.header("webhook-id") == format!("dl-{retried}"))
    );

    // Retry the dead letter: redelivered with its webhook-id, then deleted.
    let marked = state
        .retry_dead_letter(pb::RetryDeadLetterRequest {
            all: true,
            sink: "dl".into(),
            ..Default::default()
        })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(marked.count, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = state
            .get_sink_state(pb::GetSinkStateRequest { sink: "dl".into() })
            .await
            .expect("state")
            .into_inner()
            .dead_letter_count;
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letter was not redelivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let redelivered = receiver.received();
    let last = redelivered.last().expect("redelivery");
    assert_eq!(last.header("webhook-id"), format!("dl-{refused}"));
    verify(last, SECRET_A).expect("a redelivery is signed afresh");
    relay.stop().await;
}

#[tokio::test]
async fn a_sink_that_is_down_does_not_delay_another() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    // Nothing listens on the first sink's port.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_url = format!("http://{}/hook", closed.local_addr().expect("addr"));
    drop(closed);
    let sinks = format!(
        "{}{}",
        sink("dead", &dead_url, ""),
        sink("alive", &receiver.url(), "")
    );
    let relay = InProcess::start(setup.config(&sinks));
    setup.wait_served("alive").await;
    setup.wait_served("dead").await;
    let mut revisions = Vec::new();
    let started = Instant::now();
    for i in 0..5 {
        revisions.push(setup.create(&format!("event {i}")).await);
    }
    let received = receiver.wait_for(5, Duration::from_secs(10)).await;
    assert_in_order_without_gaps(&received, &revisions);
    let took = received.last().expect("received").at - started;
    assert!(
        took < Duration::from_secs(2),
        "the live sink waited {took:?}"
    );
    assert_eq!(
        setup.cursor("dead").await,
        0,
        "the dead sink delivered nothing"
    );
    relay.stop().await;
}

#[tokio::test]
async fn two_relays_on_one_sink_deliver_each_event_once_and_take_over() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    let config = setup.config(&sink("shared", &receiver.url(), ""));
    let one = InProcess::start(config.clone());
    setup.wait_served("shared").await;
    let two = InProcess::start(config);
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(setup.create(&format!("first {i}")).await);
    }
    let fifth = *revisions.last().expect("revisions");
    assert_eq!(
        setup
            .wait_cursor("shared", fifth, Duration::from_secs(10))
            .await,
        fifth
    );
    // The replica holding the lease dies (its lease is not released): the other one takes
    // over once it expires (2 s) and delivers the rest.
    let mut state = setup.state().await;
    let holder = state
        .get_sink_state(pb::GetSinkStateRequest {
            sink: "shared".into(),
        })
        .await
        .expect("state")
        .into_inner()
        .holder;
    one.kill();
    for i in 0..5 {
        revisions.push(setup.create(&format!("second {i}")).await);
    }
    let last = *revisions.last().expect("revisions");
    assert_eq!(
        setup
            .wait_cursor("shared", last, Duration::from_secs(15))
            .await,
        last
    );
    let now = state
        .get_sink_state(pb::GetSinkStateRequest {
            sink: "shared".into(),
        })
        .await
        .expect("state")
        .into_inner()
        .holder;
    assert_ne!(now, holder, "the other replica took the sink over");
    assert_in_order_without_gaps(&receiver.received(), &revisions);
    two.stop().await;
}

/// A relay process of the built binary.
fn relay_process(setup: &Setup, config: &str) -> std::process::Child {
    let path = setup.dir.path().join("relay.toml");
    std::fs::write(&path, config).expect("config");
    std::process::Command::new(BINARY)
        .args(["relay", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env_remove("APPROVALS_API_KEY")
        .env_remove("APPROVALS_TOKEN")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the relay")
}

#[tokio::test]
async fn a_relay_killed_mid_delivery_resumes_after_restart_and_loses_nothing() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    // Slow answers, so the kill lands while a delivery is in flight.
    receiver.behaviour.delay_ms.store(300, Ordering::Relaxed);
    let config = format!(
        "[relay]\nendpoint = {:?}\ncredential_file = {:?}\nlease_duration = \"2s\"\n\n{}",
        setup.server.endpoint(),
        setup.credential_file(),
        sink("killed", &receiver.url(), "")
    );
    let mut child = relay_process(&setup, &config);
    setup.wait_served("killed").await;
    let mut revisions = Vec::new();
    for i in 0..8 {
        revisions.push(setup.create(&format!("event {i}")).await);
    }
    receiver.wait_for(2, Duration::from_secs(10)).await;
    // SIGKILL: no release, no goodbye.
    child.kill().expect("kill");
    let _ = child.wait();
    let cursor = setup.cursor("killed").await;
    assert!(
        cursor < revisions[7],
        "killed before it finished ({cursor})"
    );
    let mut child = relay_process(&setup, &config);
    let last = revisions[7];
    let reached = setup
        .wait_cursor("killed", last, Duration::from_secs(20))
        .await;
    child.kill().expect("kill");
    let _ = child.wait();
    assert_eq!(reached, last, "the restarted relay delivered the rest");
    assert_in_order_without_gaps(&receiver.received(), &revisions);
}

#[tokio::test]
async fn a_gap_beyond_the_watch_history_is_recorded_as_a_dead_letter() {
    let setup = Setup::start_with(|c| c.watch.history = 3).await;
    let receiver = Receiver::start().await;
    // A cursor left behind by an earlier relay: revision 1.
    let first = setup.create("first").await;
    let mut state = setup.state().await;
    let lease = state
        .acquire_sink_lease(new_lease("gap", "earlier", 1))
        .await
        .expect("lease")
        .into_inner();
    state
        .commit_sink_cursor(pb::CommitSinkCursorRequest {
            sink: "gap".into(),
            lease_token: lease.lease_token.clone(),
            revision: first,
        })
        .await
        .expect("commit");
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(setup.create(&format!("event {i}")).await);
    }
    let last = *revisions.last().expect("revisions");
    let relay = InProcess::start(setup.config(&sink("gap", &receiver.url(), "")));
    assert_eq!(
        setup
            .wait_cursor("gap", last, Duration::from_secs(15))
            .await,
        last
    );
    let letters = state
        .list_dead_letters(pb::ListDeadLettersRequest {
            sink: "gap".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .dead_letters;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let gap = &letters[0];
    assert!(gap.gap);
    assert_eq!(gap.revision, first + 1);
    assert!(gap.reason.contains("REVISION_TOO_OLD"), "{}", gap.reason);
    // What is delivered continues right after the gap.
    let delivered: Vec<i64> = receiver.received().iter().map(Received::revision).collect();
    assert_eq!(delivered.first(), Some(&(gap.last_revision + 1)));
    assert_eq!(delivered.last(), Some(&last));
    relay.stop().await;
}

#[tokio::test]
async fn relay_state_leases_exclude_other_holders_and_need_the_relay_scope() {
    let setup = Setup::start().await;
    let mut state = setup.state().await;
    let lease = |holder: &str, token: &str| pb::AcquireSinkLeaseRequest {
        lease_token: token.into(),
        ..new_lease("leases", holder, 30)
    };
    let held = state
        .acquire_sink_lease(lease("a", ""))
        .await
        .expect("first lease")
        .into_inner();
    assert!(!held.lease_token.is_empty());
    let status = state
        .acquire_sink_lease(lease("b", ""))
        .await
        .expect_err("held by a");
    assert_error(&status, Code::FailedPrecondition, "SINK_LEASE_HELD");
    let renewed = state
        .acquire_sink_lease(lease("a", &held.lease_token))
        .await
        .expect("renewal")
        .into_inner();
    assert_eq!(renewed.lease_token, held.lease_token);
    let status = state
        .commit_sink_cursor(pb::CommitSinkCursorRequest {
            sink: "leases".into(),
            lease_token: "not-the-token".into(),
            revision: 5,
        })
        .await
        .expect_err("wrong token");
    assert_error(&status, Code::FailedPrecondition, "SINK_LEASE_LOST");
    let status = state
        .acquire_sink_lease(pb::AcquireSinkLeaseRequest {
            lease_duration: None,
            ..lease("", "")
        })
        .await
        .expect_err("bad input");
    crate::common::assert_invalid(&status, &["holder", "lease_duration"]);
    // The relay's release lets another holder in at once.
    state
        .release_sink_lease(pb::ReleaseSinkLeaseRequest {
            sink: "leases".into(),
            lease_token: held.lease_token,
        })
        .await
        .expect("release");
    state
        .acquire_sink_lease(lease("b", ""))
        .await
        .expect("b takes the released lease");
    // A writer's key lacks approvals:relay.
    let mut writer = RelayStateClient::with_interceptor(
        setup.server.channel().await,
        Headers::bearer(&setup.writer_key),
    );
    let status = writer
        .get_sink_state(pb::GetSinkStateRequest {
            sink: "leases".into(),
        })
        .await
        .expect_err("no relay scope");
    assert_error(&status, Code::PermissionDenied, "MISSING_SCOPE");
}

/// The Slack message of a review that approved a request, against the checked-in snapshot
/// (`tests/api/relay_slack.json`; `APPROVALS_UPDATE_SNAPSHOTS=1` rewrites it).
#[test]
fn the_slack_payload_matches_its_snapshot() {
    let event = pb::Event {
        revision: 42,
        change_request_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        project: "web".into(),
        environment: "prod".into(),
        kind: pb::EventKind::Reviewed as i32,
        actor: "user:bob".into(),
        acting_principal: String::new(),
        auth_method: pb::AuthMethod::Unspecified as i32,
        from_state: pb::State::InReview as i32,
        to_state: pb::State::Approved as i32,
        event_time: Some(prost_types::Timestamp {
            seconds: 1_780_000_000,
            nanos: 0,
        }),
        detail: "Looks good <ship it>".into(),
        change_request: Some(pb::ChangeRequest {
            id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            project: "web".into(),
            environment: "prod".into(),
            title: "Roll out checkout".into(),
            created_by: "user:alice".into(),
            state: pb::State::Approved as i32,
            ..Default::default()
        }),
    };
    let payload = approvals::relay::format::slack(
        &event,
        "https://approvals.example.com/{project}/requests/{id}",
    );
    assert_eq!(payload.content_type, "application/json");
    let actual: serde_json::Value = serde_json::from_str(&payload.body).expect("JSON");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/api/relay_slack.json");
    if std::env::var("APPROVALS_UPDATE_SNAPSHOTS").is_ok() {
        let text = serde_json::to_string_pretty(&actual).expect("pretty") + "\n";
        std::fs::write(&path, text).expect("write snapshot");
    }
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("snapshot")).expect("JSON");
    assert_eq!(actual, expected);
}

/// Runs `approvals relay --config FILE ARGS...`; returns (success, stdout, stderr).
fn relay_cli(setup: &Setup, config: &str, args: &[&str]) -> (bool, String, String) {
    let path = setup.dir.path().join("cli.toml");
    std::fs::write(&path, config).expect("config");
    let output = std::process::Command::new(BINARY)
        .args(["relay", "--config"])
        .arg(&path)
        .args(args)
        .env_remove("APPROVALS_API_KEY")
        .env_remove("APPROVALS_TOKEN")
        .output()
        .expect("run the relay command");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// Multi-threaded: the receiver answers while this thread waits for the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_checks_a_sink_and_lists_and_retries_dead_letters() {
    let setup = Setup::start().await;
    let receiver = Receiver::start().await;
    let config = format!(
        "[relay]\nendpoint = {:?}\ncredential_file = {:?}\nlease_duration = \"2s\"\n\n{}",
        setup.server.endpoint(),
        setup.credential_file(),
        sink("cli", &receiver.url(), "")
    );

    // check: one signed test event, and the answer printed.
    let (ok, stdout, stderr) = relay_cli(&setup, &config, &["check", "--sink", "cli"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("delivered: HTTP 200"), "{stdout}");
    let received = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert!(received[0].header("webhook-id").starts_with("cli-check-"));
    verify(&received[0], SECRET_A).expect("the test event is signed");
    assert_eq!(received[0].json()["type"], "approvals.relay.check");
    let (ok, _, stderr) = relay_cli(&setup, &config, &["check", "--sink", "nope"]);
    assert!(
        !ok && stderr.contains("\"nope\" is not configured"),
        "{stderr}"
    );

    // A refused event becomes a dead letter; the CLI lists it and marks it for retry.
    receiver.behaviour.status.store(410, Ordering::Relaxed);
    let relay = InProcess::start(setup.config(&sink("cli", &receiver.url(), "")));
    setup.wait_served("cli").await;
    let refused = setup.create("refused").await;
    setup
        .wait_cursor("cli", refused, Duration::from_secs(10))
        .await;
    relay.stop().await;
    let (ok, stdout, stderr) = relay_cli(&setup, &config, &["dead-letters", "list"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("revision {refused}")) && stdout.contains("HTTP 410"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = relay_cli(&setup, &config, &["dead-letters", "retry", "--all"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 dead letter(s) marked for retry"),
        "{stdout}"
    );
    let (ok, stdout, _) = relay_cli(&setup, &config, &["dead-letters", "list", "--sink", "cli"]);
    assert!(ok && stdout.contains("(retry requested)"), "{stdout}");
    // A bad config names the key.
    let (ok, _, stderr) = relay_cli(&setup, &config.replace("max_backoff", "max_backof"), &[]);
    assert!(!ok && stderr.contains("max_backof"), "{stderr}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The relay's figures in the README: backlog throughput (events/s to a local receiver) and
/// commit-to-webhook latency (the create acknowledged -> the receiver has the POST), at 1 and
/// 20 sinks, on SQLite (`APPROVALS_TEST_DATABASE_URL` for PostgreSQL). Not run by default:
/// `cargo test --release --test api relay::relay_bench -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn relay_bench() {
    const PACED: usize = 100;
    // 20 sinks x 200 events is 4,000 deliveries and as many cursor commits.
    for (sinks, backlog) in [(1usize, 1000usize), (20, 200)] {
        let setup = Setup::start().await;
        let receiver = Receiver::start().await;
        let names: Vec<String> = (0..sinks).map(|i| format!("bench{i}")).collect();
        // Leases of 10 s: renewals queue behind the sinks' cursor commits on SQLite's one writer.
        let config = setup.config(
            &names
                .iter()
                .map(|name| sink(name, &receiver.url(), ""))
                .collect::<String>(),
        );
        let config = RelayConfig {
            lease_duration: Duration::from_secs(10),
            ..config
        };
        // First run: each sink gets a cursor; then stop (releasing the leases).
        let relay = InProcess::start(config.clone());
        for name in &names {
            setup.wait_served(name).await;
        }
        let warm = setup.create("warm-up").await;
        for name in &names {
            setup.wait_cursor(name, warm, Duration::from_secs(30)).await;
        }
        relay.stop().await;

        // Throughput: a backlog of BACKLOG events, delivered by a fresh relay.
        let mut last = 0;
        for i in 0..backlog {
            last = setup.create(&format!("backlog {i}")).await;
        }
        let before = receiver.received().len();
        let started = Instant::now();
        let relay = InProcess::start(config.clone());
        for name in &names {
            assert_eq!(
                setup
                    .wait_cursor(name, last, Duration::from_secs(300))
                    .await,
                last
            );
        }
        let took = started.elapsed();
        let delivered = receiver.received().len() - before;
        assert!(delivered >= backlog * sinks);

        // Latency: paced creates, each POST's arrival against its create's acknowledgement.
        let mut acked = HashMap::new();
        for i in 0..PACED {
            let revision = setup.create(&format!("paced {i}")).await;
            acked.insert(revision, Instant::now());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let final_revision = *acked.keys().max().expect("revisions");
        for name in &names {
            setup
                .wait_cursor(name, final_revision, Duration::from_secs(60))
                .await;
        }
        let mut latencies: Vec<Duration> = receiver
            .received()
            .iter()
            .filter_map(|r| {
                let at = acked.get(&r.revision())?;
                Some(r.at.saturating_duration_since(*at))
            })
            .collect();
        latencies.sort();
        println!(
            "relay bench, {sinks} sink(s): backlog {backlog} events in {took:.2?}: {:.0} events/s per sink, {:.0} deliveries/s in all; commit-to-webhook over {} deliveries: p50 {:.1?}, p99 {:.1?}",
            backlog as f64 / took.as_secs_f64(),
            delivered as f64 / took.as_secs_f64(),
            latencies.len(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
        );
        relay.stop().await;
    }
}

/// Security: the relay state spans every project (sink names are global, a dead letter holds the
/// body of an event of any project), so a relay credential limited to some projects is refused
/// by every RelayState method. Before, a key limited to `web` read another relay's dead letters,
/// payloads included, of a request in `ops`.
#[tokio::test]
async fn a_relay_credential_limited_to_projects_is_refused_the_relay_state() {
    let (limited_key, limited) = api_key(
        "service:web-relay",
        &["approvals:read", "approvals:relay"],
        &[],
        &["web"],
    );
    let setup = Setup::start_with(|c| c.auth.api_keys.push(limited)).await;
    // The unrestricted relay keeps a dead letter of a request in `ops`.
    let mut state = setup.state().await;
    let held = state
        .acquire_sink_lease(new_lease("ops-hooks", "ops-relay", 30))
        .await
        .expect("lease")
        .into_inner();
    state
        .add_dead_letter(pb::AddDeadLetterRequest {
            sink: "ops-hooks".into(),
            lease_token: held.lease_token.clone(),
            dead_letter: Some(pb::DeadLetter {
                revision: 7,
                last_revision: 7,
                change_request_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
                webhook_id: "msg_7".into(),
                reason: "HTTP 500".into(),
                attempts: 3,
                payload: r#"{"project":"ops","secret":"ops only"}"#.into(),
                content_type: "application/json".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("dead letter");

    let mut web = RelayStateClient::with_interceptor(
        setup.server.channel().await,
        Headers::bearer(&limited_key),
    );
    let refused = web
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .expect_err("the dead letters of every project");
    let message = assert_error(&refused, Code::PermissionDenied, "ALL_PROJECTS_REQUIRED");
    assert!(message.contains("ListDeadLetters"), "{message}");
    let refused = web
        .get_sink_state(pb::GetSinkStateRequest {
            sink: "ops-hooks".into(),
        })
        .await
        .expect_err("another relay's sink");
    assert_error(&refused, Code::PermissionDenied, "ALL_PROJECTS_REQUIRED");
    let refused = web
        .acquire_sink_lease(new_lease("web-hooks", "web-relay", 30))
        .await
        .expect_err("even a sink of its own name");
    assert_error(&refused, Code::PermissionDenied, "ALL_PROJECTS_REQUIRED");
    // The unrestricted relay still sees its dead letter, untouched.
    let listed = state
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.dead_letters.len(), 1);
}

/// A request for a new lease on `sink` by `holder`, for `seconds`.
fn new_lease(sink: &str, holder: &str, seconds: i64) -> pb::AcquireSinkLeaseRequest {
    pb::AcquireSinkLeaseRequest {
        sink: sink.into(),
        holder: holder.into(),
        lease_duration: Some(prost_types::Duration { seconds, nanos: 0 }),
        lease_token: String::new(),
    }
}
