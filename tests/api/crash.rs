//! Crash safety: the real server process is killed with SIGKILL at random moments under
//! concurrent writes, in a loop. Every create it acknowledged is there after the restart, and a
//! retry with the same request_id returns the original request.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use approvals::pb::{self, change_requests_client::ChangeRequestsClient};
use tonic::transport::Channel;

use crate::common::*;

const ITERATIONS: usize = 4;
const WRITERS: usize = 8;

/// A pseudo-random delay between 150 and 650 ms, so each kill lands somewhere else.
fn kill_after(iteration: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0);
    Duration::from_millis(150 + ((nanos / 1000 + iteration * 137) % 500) as u64)
}

async fn client(addr: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    ChangeRequestsClient::with_interceptor(channel, Caller::named("user:crash"))
}

fn request(request_id: &str) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        request_id: request_id.into(),
        title: format!("crash {request_id}"),
        ..new_request()
    }
}

async fn crash_loop(database_url: &str) {
    let dir = tempfile::tempdir().expect("dir");
    // (request_id, id) of every acknowledged create.
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for iteration in 0..ITERATIONS {
        let mut server = Process::serve(database_url, dir.path());
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let mut client = client(&server.addr).await;
            let acknowledged = acknowledged.clone();
            writers.push(tokio::spawn(async move {
                for n in 0.. {
                    let request_id = format!("i{iteration}-w{writer}-n{n}");
                    match client.create_change_request(request(&request_id)).await {
                        Ok(response) => acknowledged
                            .lock()
                            .expect("lock")
                            .push((request_id, response.into_inner().id)),
                        // The server is gone: stop writing.
                        Err(_) => break,
                    }
                }
            }));
        }
        tokio::time::sleep(kill_after(iteration)).await;
        server.child.kill().expect("SIGKILL the server");
        let _ = server.child.wait();
        for writer in writers {
            let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        }
    }

    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() > ITERATIONS,
        "the writers got some creates in: {}",
        acknowledged.len()
    );
    let server = Process::serve(database_url, dir.path());
    let mut client = client(&server.addr).await;
    for (request_id, id) in &acknowledged {
        let got = client
            .get_change_request(pb::GetChangeRequestRequest { id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("acknowledged {request_id} ({id}) lost: {s:?}"))
            .into_inner();
        assert_eq!(got.title, format!("crash {request_id}"));
        let retried = client
            .create_change_request(request(request_id))
            .await
            .expect("retry after restart")
            .into_inner();
        assert_eq!(
            &retried.id, id,
            "retry of {request_id} returns the original"
        );
    }
    eprintln!(
        "crash safety: {} acknowledged creates over {ITERATIONS} SIGKILLs, none lost",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_concurrent_writes_loses_nothing_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("approvals.db").display());
    crash_loop(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_concurrent_writes_loses_nothing_on_postgres() {
    if postgres_or_skip("sigkill_under_concurrent_writes_loses_nothing_on_postgres").is_none() {
        return;
    }
    let (database, url) = TestDatabase::create().await;
    crash_loop(&url).await;
    drop(database);
}
