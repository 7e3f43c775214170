//! `apply.allowed_endpoints`: a policy may name only an applier endpoint the server allows, and
//! the server never calls one it does not allow, even one a policy or a snapshot already holds
//! (a project admin must not be able to make the server call internal hosts).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use approvals::{
    config::Config,
    config::allowed_endpoints::{AllowedEndpoints, EndpointTls},
    pb::{self, State, policies_client::PoliciesClient},
};
use prost_types::FieldMask;
use tokio::net::TcpListener;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use crate::common::*;

type Admin = PoliciesClient<InterceptedService<Channel, Caller>>;

fn allow(entries: &'static [&'static str]) -> impl FnOnce(&mut Config) {
    move |c| {
        // http:// entries are test appliers in plain text: `allow_insecure`.
        c.apply.allowed_endpoints = entries
            .iter()
            .try_fold(AllowedEndpoints::default(), |list, entry| {
                list.with(
                    entry,
                    EndpointTls {
                        allow_insecure: entry.starts_with("http://"),
                        ..EndpointTls::default()
                    },
                )
            })
            .expect("entries");
        c.apply.retry_backoff = Duration::from_millis(30);
        c.apply.poll_interval = Duration::from_millis(100);
    }
}

async fn admin(server: &TestServer) -> Admin {
    PoliciesClient::with_interceptor(server.channel().await, Caller::named("user:admin"))
}

fn policy(name: &str, action_key: &str, endpoint: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        project: "web".into(),
        action_key: action_key.into(),
        apply_mode: pb::ApplyMode::Manual as i32,
        applier_endpoint: endpoint.into(),
        ..Default::default()
    }
}

async fn create_policy(admin: &mut Admin, policy: pb::Policy) -> Result<pb::Policy, tonic::Status> {
    admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get_policy(admin: &mut Admin, name: &str) -> Result<pb::Policy, tonic::Status> {
    admin
        .get_policy(pb::GetPolicyRequest { name: name.into() })
        .await
        .map(tonic::Response::into_inner)
}

/// A loopback port that counts the connections made to it (and drops them): proof that the
/// server did or did not connect.
async fn counting_port() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (endpoint, accepted)
}

#[tokio::test]
async fn policies_may_name_only_allowed_endpoints() {
    let server = TestServer::start_with(allow(&[
        "http://127.0.0.1",
        "https://*.svc.cluster.local:8443",
    ]))
    .await;
    let mut admin = admin(&server).await;

    // Not listed, or listed only by a look-alike: refused, naming the field and the key.
    for (i, endpoint) in [
        "http://10.0.0.5:80",
        "http://169.254.169.254",
        "http://127.0.0.1.evil.example:80",
        "http://localhost:50051",
        "https://127.0.0.1:50051",
        "https://flags.svc.cluster.local",
        "https://svc.cluster.local:8443",
        "https://flags.svc.cluster.local.evil.example:8443",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("refused-{i}");
        let err = create_policy(&mut admin, policy(&name, &name, endpoint))
            .await
            .expect_err(endpoint);
        assert_invalid(&err, &["policy.applier_endpoint"]);
        assert!(
            err.message()
                .contains("is not allowed by this server's apply.allowed_endpoints"),
            "{endpoint}: {}",
            err.message()
        );
        assert_eq!(
            get_policy(&mut admin, &name)
                .await
                .expect_err("not written")
                .code(),
            Code::NotFound
        );
    }
    // More than scheme://host[:port]: refused even on an allowed host.
    for (i, endpoint) in [
        "http://user:secret@127.0.0.1:9",
        "http://10.0.0.5@127.0.0.1:9",
        "http://127.0.0.1:9/admin",
        "http://127.0.0.1:9?target=10.0.0.5",
        "http://127.0.0.1:9#x",
        "127.0.0.1:9",
        "unix:///var/run/docker.sock",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("malformed-{i}");
        let err = create_policy(&mut admin, policy(&name, &name, endpoint))
            .await
            .expect_err(endpoint);
        assert_invalid(&err, &["policy.applier_endpoint"]);
    }

    // Allowed: any port of 127.0.0.1, port 8443 under *.svc.cluster.local; and no endpoint.
    let created = create_policy(&mut admin, policy("local", "local", "http://127.0.0.1:9"))
        .await
        .expect("allowed");
    create_policy(
        &mut admin,
        policy("mesh", "mesh", "https://flags.web.svc.cluster.local:8443/"),
    )
    .await
    .expect("allowed by the wildcard");
    create_policy(
        &mut admin,
        pb::Policy {
            apply_mode: pb::ApplyMode::External as i32,
            ..policy("external", "external", "")
        },
    )
    .await
    .expect("no endpoint");

    // An update that sets a refused endpoint writes nothing.
    let err = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                min_approvals: 3,
                ..policy("local", "", "http://10.0.0.5:80")
            }),
            update_mask: Some(FieldMask {
                paths: vec!["min_approvals".into(), "applier_endpoint".into()],
            }),
        })
        .await
        .expect_err("refused endpoint");
    assert_invalid(&err, &["policy.applier_endpoint"]);
    assert_eq!(get_policy(&mut admin, "local").await.expect("get"), created);
    let err = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(policy("local", "local", "http://127.0.0.1:9/x")),
            update_mask: Some(FieldMask {
                paths: vec!["*".into()],
            }),
        })
        .await
        .expect_err("refused endpoint");
    assert_invalid(&err, &["policy.applier_endpoint"]);
    let updated = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(policy("local", "", "http://127.0.0.1:10")),
            update_mask: Some(FieldMask {
                paths: vec!["applier_endpoint".into()],
            }),
        })
        .await
        .expect("allowed endpoint")
        .into_inner();
    assert_eq!(updated.applier_endpoint, "http://127.0.0.1:10");
}

#[tokio::test]
async fn by_default_no_endpoint_is_allowed() {
    let server =
        TestServer::start_with(|c| c.apply.allowed_endpoints = AllowedEndpoints::default()).await;
    let mut admin = admin(&server).await;
    let err = create_policy(&mut admin, policy("p", "*", "http://127.0.0.1:9"))
        .await
        .expect_err("nothing is allowed");
    assert_invalid(&err, &["policy.applier_endpoint"]);
    let message = err.message();
    assert!(
        message.contains("allows no applier endpoint")
            && message.contains("add \"http://127.0.0.1:9\"")
            && message.contains("apply.allowed_endpoints"),
        "{message}"
    );
    create_policy(
        &mut admin,
        pb::Policy {
            apply_mode: pb::ApplyMode::External as i32,
            ..policy("p", "*", "")
        },
    )
    .await
    .expect("a policy without an endpoint");
}

/// The policy was written while its endpoint was allowed; the replica that applies has a list
/// without it (the configuration changed): the apply fails, and nothing connects to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_no_longer_allowed_fails_the_apply_without_a_call() {
    let (endpoint, accepted) = counting_port().await;
    let server = TestServer::start_with(allow(&["http://127.0.0.1"])).await;
    let replica = TestServer::replica_of(&server, allow(&["http://flags.internal"])).await;
    let mut admin = admin(&server).await;
    create_policy(&mut admin, policy("web-manual", "*", &endpoint))
        .await
        .expect("allowed on the first server");
    let mut alice = replica.client("user:alice").await;
    let mut bob = replica.client("user:bob").await;
    let created = create(&mut alice, new_request()).await;
    approve(&mut bob, &created.id).await;

    let failed = alice
        .apply_change_request(pb::ApplyChangeRequestRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("apply starts")
        .into_inner();
    assert_eq!(state(&failed), State::ApplyFailed, "{failed:?}");
    assert_eq!(failed.apply_attempts, 1, "not retried");
    assert!(
        failed.apply_error.contains(&format!("{endpoint:?}"))
            && failed
                .apply_error
                .contains("is not allowed by this server's apply.allowed_endpoints")
            && failed.apply_error.contains("did not call it"),
        "{}",
        failed.apply_error
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no connection was made");
    let trail = events(&mut alice, &created.id).await;
    assert_eq!(
        trail.last().map(|e| e.kind),
        Some(pb::EventKind::ApplyFailed as i32)
    );
}
