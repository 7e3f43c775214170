//! Caller-written `google.protobuf.Struct`s (change payloads, `result_data`, a policy's
//! `intent_schema`) are checked before anything is copied: a hostile Struct is refused in
//! milliseconds, naming its field, and the server keeps answering everyone else meanwhile.

use std::time::{Duration, Instant};

use approvals::pb;
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    callers::{Headers, policies},
    common::*,
};

/// A correctness bound against minutes of work, not a performance measurement (debug build, a
/// shared two-core machine).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// `{ "<key_len x 'k'>": [null, null, ...values] }` with empty (kind-less) values, the densest
/// list protobuf allows: two bytes per value.
fn huge_key_payload(key_len: usize, values: usize) -> Struct {
    let list = ListValue {
        values: vec![Value { kind: None }; values],
    };
    Struct {
        fields: [(
            "k".repeat(key_len),
            Value {
                kind: Some(Kind::ListValue(list)),
            },
        )]
        .into(),
    }
}

/// The finding's payload: a 3 MB key holding 500,000 empty values.
fn hostile() -> Struct {
    huge_key_payload(3_000_000, 500_000)
}

fn create_with(payload: Struct) -> pb::CreateChangeRequestRequest {
    let mut request = new_request();
    request.changes[0].payload = Some(payload);
    request
}

/// What one probe saw: how long each refused call took, and the slowest health check.
#[derive(Debug)]
struct Probe {
    answers: Vec<(
        String,
        &'static str,
        Duration,
        Result<tonic::Status, String>,
    )>,
    slowest_health: Duration,
    health_checks: usize,
}

/// Sends `calls` at once while checking health every 20 ms, on a runtime of its own (so that a
/// server whose workers are all stuck cannot stop this side's clocks), and reports.
fn probe(
    endpoint: String,
    calls: Vec<(&'static str, pb::CreateChangeRequestRequest, &'static str)>,
) -> Probe {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    runtime.block_on(async move {
        let channel = || async {
            tonic::transport::Channel::from_shared(endpoint.clone())
                .expect("endpoint")
                .connect()
                .await
                .expect("connect")
        };
        let mut health = HealthClient::new(channel().await);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checking = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut checks = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(5),
                        health.check(HealthCheckRequest {
                            service: String::new(),
                        }),
                    )
                    .await;
                    slowest = slowest.max(started.elapsed());
                    if !matches!(answer, Ok(Ok(_))) {
                        // Stuck (or failing): the slowest check says enough.
                        slowest = slowest.max(Duration::from_secs(5));
                        break;
                    }
                    checks += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (slowest, checks)
            })
        };
        // Let health be checked on a quiet server first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut sent = Vec::new();
        for (name, request, field) in calls {
            // Each on its own connection, as separate clients would.
            let mut client =
                approvals::pb::change_requests_client::ChangeRequestsClient::with_interceptor(
                    channel().await,
                    Caller::named("user:alice"),
                )
                .max_encoding_message_size(usize::MAX);
            sent.push(tokio::spawn(async move {
                let started = Instant::now();
                let answer =
                    tokio::time::timeout(ANSWER_WITHIN, client.create_change_request(request))
                        .await;
                let elapsed = started.elapsed();
                let refused = match answer {
                    Err(_) => Err(format!("no answer within {ANSWER_WITHIN:?}")),
                    Ok(Ok(_)) => Err("accepted".to_owned()),
                    Ok(Err(status)) => Ok(status),
                };
                (name.to_owned(), field, elapsed, refused)
            }));
        }
        let mut answers = Vec::new();
        for call in sent {
            answers.push(call.await.expect("call task"));
        }
        // A little longer: the server must still be answering once the calls are refused.
        tokio::time::sleep(Duration::from_millis(100)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (slowest_health, health_checks) = checking.await.expect("health task");
        Probe {
            answers,
            slowest_health,
            health_checks,
        }
    })
}

async fn run_probe(
    server: &TestServer,
    calls: Vec<(&'static str, pb::CreateChangeRequestRequest, &'static str)>,
) -> Probe {
    let endpoint = server.endpoint();
    let thread = std::thread::spawn(move || probe(endpoint, calls));
    tokio::task::spawn_blocking(move || thread.join().expect("probe thread"))
        .await
        .expect("join")
}

/// The finding: a huge key holding very many empty values, 4 MB in all (under the 4 MiB message
/// limit). The path of each value (the 3 MB key and an index) was formatted before any size
/// check: 1.5 TB copied, minutes per call. Two at once (the test server has two workers)
/// stalled every RPC, health included. (Half a million values rather than the finding's
/// million with a 2 MB key: as bad for the old code, half the decoding for a debug build.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_payload_is_refused_at_once_and_health_stays_responsive() {
    let server = TestServer::start().await;
    let attack = create_with(hostile());
    let size = attack.encoded_len();
    assert!(
        size > 3_900_000 && size < 4 * 1024 * 1024,
        "the attack fits one message: {size} bytes"
    );
    // Under the payload limit, but with a key over the key limit holding many values (a
    // 100,000-character path formatted 60,000 times before).
    let long_key = create_with(huge_key_payload(100_000, 60_000));
    assert!(
        long_key.changes[0]
            .payload
            .as_ref()
            .map_or(0, Message::encoded_len)
            < 256 * 1024
    );
    let probe = run_probe(
        &server,
        vec![
            ("attack 1", attack.clone(), "changes[0].payload"),
            ("attack 2", attack, "changes[0].payload"),
            ("long key", long_key, "changes[0].payload"),
        ],
    )
    .await;
    for (name, field, elapsed, refused) in &probe.answers {
        let Ok(status) = refused else {
            panic!("{name}: {refused:?} after {elapsed:?} ({probe:?})");
        };
        assert_invalid(status, &[field]);
        assert!(*elapsed < ANSWER_WITHIN, "{name} took {elapsed:?}");
    }
    assert!(
        probe.slowest_health < Duration::from_secs(1),
        "health stays responsive: {probe:?}"
    );
    assert!(probe.health_checks >= 3, "{probe:?}");
    // The server is fine afterwards, and nothing was written.
    let mut client = server.client("user:alice").await;
    let created = create(&mut client, new_request()).await;
    assert_eq!(state(&created), pb::State::InReview);
    let list = list_project(&mut client, "web").await;
    assert_eq!(list.change_requests.len(), 1);
}

/// Over the payload limit with ordinary content: refused by the size check, naming the field.
#[tokio::test]
async fn a_payload_over_the_limit_is_refused_naming_it() {
    let server = TestServer::start().await;
    let mut client = server.client("user:alice").await;
    let big = payload(serde_json::json!({"blob": "x".repeat(300 * 1024)}));
    let status = client
        .create_change_request(create_with(big.clone()))
        .await
        .expect_err("over the limit");
    assert_invalid(&status, &["changes[0].payload"]);
    assert!(status.message().contains("262144"), "{status:?}");

    // The same rules for an update's changes.
    let created = create(&mut client, new_request()).await;
    let mut body = created.clone();
    body.changes[0].payload = Some(hostile());
    let started = Instant::now();
    let status = client
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(body.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect_err("hostile update");
    assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());
    assert_invalid(&status, &["change_request.changes[0].payload"]);
    body.changes[0].payload = Some(big);
    let status = client
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(body),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["changes".into()],
            }),
        })
        .await
        .expect_err("over the limit");
    assert_invalid(&status, &["change_request.changes[0].payload"]);
    assert_eq!(
        get(&mut client, &created.id).await.revision,
        created.revision
    );
}

#[tokio::test]
async fn keys_are_limited_and_bad_numbers_named_without_building_every_path() {
    let server = TestServer::start().await;
    let mut client = server.client("user:alice").await;
    let long_key = payload(serde_json::json!({"outer": {"k".repeat(257): 1}}));
    let status = client
        .create_change_request(create_with(long_key))
        .await
        .expect_err("key too long");
    assert_invalid(&status, &["changes[0].payload.outer"]);
    assert!(status.message().contains("256"), "{status:?}");
    // At the limit is fine.
    create(
        &mut client,
        create_with(payload(serde_json::json!({"k".repeat(256): 1}))),
    )
    .await;

    // A non-finite number deep in a list is named by its path.
    let mut nan = payload(serde_json::json!({"a": [1, 2, {"b": [0]}]}));
    if let Some(Value {
        kind: Some(Kind::ListValue(list)),
    }) = nan.fields.get_mut("a")
        && let Some(Kind::StructValue(inner)) = &mut list.values[2].kind
        && let Some(Value {
            kind: Some(Kind::ListValue(b)),
        }) = inner.fields.get_mut("b")
    {
        b.values[0].kind = Some(Kind::NumberValue(f64::INFINITY));
    }
    let status = client
        .create_change_request(create_with(nan))
        .await
        .expect_err("infinity");
    assert_invalid(&status, &["changes[0].payload.a[2].b[0]"]);
}

/// CompleteChangeRequest's `result_data` and a policy's `intent_schema` follow the same rules.
#[tokio::test]
async fn result_data_and_intent_schemas_follow_the_same_rules() {
    let server = TestServer::start().await;
    let mut client = server.client("service:deployer").await;
    let started = Instant::now();
    let status = client
        .complete_change_request(pb::CompleteChangeRequestRequest {
            id: uuid::Uuid::now_v7().to_string(),
            success: true,
            result_data: Some(hostile()),
            ..Default::default()
        })
        .await
        .expect_err("hostile result_data");
    assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());
    assert_invalid(&status, &["result_data"]);

    let mut admin = policies(&server, Headers::actor("user:root")).await;
    for (schema, field) in [
        (hostile(), "policy.intent_schema"),
        (
            payload(serde_json::json!({"properties": {"k".repeat(300): {"type": "string"}}})),
            "policy.intent_schema.properties",
        ),
    ] {
        let started = Instant::now();
        let status = admin
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(pb::Policy {
                    name: "flags".into(),
                    project: "web".into(),
                    environment: "prod".into(),
                    action_key: "feature_flag.update".into(),
                    intent_schema: Some(schema),
                    ..Default::default()
                }),
            })
            .await
            .expect_err("hostile schema");
        assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());
        assert_invalid(&status, &[field]);
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
