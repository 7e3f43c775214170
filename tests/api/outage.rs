//! A database outage, for real: a PostgreSQL cluster the test owns is stopped under a running
//! server and started again. Calls fail fast with UNAVAILABLE, health follows the database with
//! no traffic, and everything recovers by itself with nothing acknowledged lost.

use std::time::{Duration, Instant};

use approvals::pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    common::*,
    pg_cluster::{PgCluster, within},
};

async fn health(server: &TestServer, service: &str) -> Option<i32> {
    let mut client = HealthClient::new(server.channel().await);
    let response = tokio::time::timeout(
        Duration::from_secs(2),
        client.check(HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(response.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_fast_turns_unready_and_recovers() {
    let Some(cluster) = PgCluster::start("database_outage_fails_fast_turns_unready_and_recovers")
    else {
        return;
    };
    let url = cluster.url();
    let server = TestServer::start_with(|config| {
        config.database.url = url.clone();
        config.database.health_interval = Duration::from_secs(1);
    })
    .await;
    let mut client = server.client("user:alice").await;

    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let created = create(
            &mut client,
            pb::CreateChangeRequestRequest {
                request_id: format!("before-{i}"),
                ..new_request()
            },
        )
        .await;
        acknowledged.push(created.id);
    }
    let mut stream = client
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project: "web".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    // Outage.
    cluster.stop();
    let down = Instant::now();
    let unready = within(Duration::from_secs(10), || async {
        health(&server, "").await == Some(ServingStatus::NotServing as i32)
    })
    .await
    .expect("health turns NOT_SERVING within 10 s with no traffic");
    assert_eq!(
        health(&server, "approvals.v1.ChangeRequests").await,
        Some(ServingStatus::NotServing as i32)
    );
    assert_eq!(
        health(&server, approvals::transport::LIVENESS_SERVICE).await,
        Some(ServingStatus::Serving as i32),
        "liveness never follows the database"
    );
    eprintln!("outage: NOT_SERVING after {unready:?}");

    // Calls fail fast with UNAVAILABLE, never hang (with the default acquire_timeout).
    {
        let started = Instant::now();
        let status = tokio::time::timeout(
            Duration::from_secs(20),
            client.create_change_request(new_request()),
        )
        .await
        .expect("create answers (no hang)")
        .expect_err("no database, no create");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "create took {took:?}");

        let started = Instant::now();
        let status = tokio::time::timeout(
            Duration::from_secs(20),
            client.get_change_request(pb::GetChangeRequestRequest {
                id: acknowledged[0].clone(),
            }),
        )
        .await
        .expect("get answers (no hang)")
        .expect_err("no database, no get");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "get took {took:?}");
        eprintln!("outage: UNAVAILABLE after {took:?}");
    }
    let outage = down.elapsed();

    // Recovery, with no restart of the server.
    cluster.resume();
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(30) {
        match tokio::time::timeout(
            Duration::from_secs(10),
            client.create_change_request(pb::CreateChangeRequestRequest {
                request_id: "after".into(),
                ..new_request()
            }),
        )
        .await
        {
            Ok(Ok(response)) => {
                recovered = Some(response.into_inner());
                break;
            }
            Ok(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            Err(_) => panic!("create hung while the database came back"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = recovered.expect("creates succeed within 30 s of the database's return");
    let writes_back = back.elapsed();
    let ready = within(Duration::from_secs(30), || async {
        health(&server, "").await == Some(ServingStatus::Serving as i32)
    })
    .await
    .expect("health SERVING again within 30 s");
    eprintln!(
        "outage of {outage:?}: writes back after {writes_back:?}, SERVING after {:?}",
        back.elapsed().min(writes_back + ready)
    );

    // Nothing acknowledged was lost.
    for (i, id) in acknowledged.iter().enumerate() {
        let got = client
            .get_change_request(pb::GetChangeRequestRequest { id: id.clone() })
            .await
            .expect("acknowledged request survives the outage")
            .into_inner();
        assert_eq!(&got.id, id);
        let again = create(
            &mut client,
            pb::CreateChangeRequestRequest {
                request_id: format!("before-{i}"),
                ..new_request()
            },
        )
        .await;
        assert_eq!(&again.id, id, "a retried request_id returns the original");
    }

    // The watch stream opened before the outage delivers the new event: the hub's reader and
    // the commit relay recovered too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "watch did not deliver the post-outage create"
        );
        let message = tokio::time::timeout(left, stream.message())
            .await
            .expect("watch message within 30 s")
            .expect("watch stream survives the outage")
            .expect("stream open");
        if message
            .events
            .iter()
            .any(|e| e.change_request_id == recovered.id)
        {
            break;
        }
    }
    server.stop().await;
}
