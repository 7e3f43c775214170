//! Watch fan-out: many watch streams multiplexed over few HTTP/2 connections, server memory per
//! idle watcher, and commit-to-delivery latency (from the moment the write is issued to the
//! moment each watcher has the event).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use approvals::pb::{self, change_requests_client::ChangeRequestsClient};
use serde::Serialize;
use tokio::sync::watch;
use tonic::{codegen::http::uri::PathAndQuery, transport::Channel};

use futures::{FutureExt, StreamExt};

use crate::{
    connect, create_request,
    load::percentile,
    server::{cpu_seconds, rss_bytes},
    with_actor,
};

#[derive(Debug, Clone, Serialize)]
pub struct WatchResult {
    pub watchers: usize,
    pub decode: WatchDecode,
    pub connections: usize,
    pub established: usize,
    pub writes: usize,
    pub deliveries: u64,
    pub missing: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub rss_before_bytes: Option<u64>,
    pub rss_idle_bytes: Option<u64>,
    pub bytes_per_idle_watcher: Option<f64>,
    /// CPU the server used from the first watched write to two seconds after the last, per
    /// delivery (microseconds); and the bench's own (its watchers' receiving and decoding, the
    /// writes), the other tenant of the machine.
    pub server_cpu_us_per_delivery: Option<f64>,
    pub client_cpu_us_per_delivery: Option<f64>,
}

pub struct WatchOptions {
    pub watchers: usize,
    pub per_connection: usize,
    pub writes: usize,
    pub interval: Duration,
    pub decode: WatchDecode,
    pub project: String,
}

/// How much of each message a bench watcher decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WatchDecode {
    /// Each event's revision only.
    Revisions,
    /// The whole `WatchChangeRequestsResponse`.
    Full,
}

/// `WatchChangeRequestsResponse` as a `revisions` watcher reads it: prost skips the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct DeliveredRevisions {
    #[prost(message, repeated, tag = "2")]
    events: Vec<DeliveredRevision>,
}

/// `Event` as a `revisions` watcher reads it.
#[derive(Clone, PartialEq, prost::Message)]
struct DeliveredRevision {
    #[prost(int64, tag = "1")]
    revision: i64,
}

/// A watch message as a bench watcher decodes it.
trait Delivered: prost::Message + Default + Send + 'static {
    fn revisions(&self) -> impl Iterator<Item = i64>;
}

impl Delivered for DeliveredRevisions {
    fn revisions(&self) -> impl Iterator<Item = i64> {
        self.events.iter().map(|event| event.revision)
    }
}

impl Delivered for pb::WatchChangeRequestsResponse {
    fn revisions(&self) -> impl Iterator<Item = i64> {
        self.events.iter().map(|event| event.revision)
    }
}

/// Events received over one connection's watchers: (revision, arrival) pairs, and the errors
/// of the streams that failed.
type Received = (Vec<(i64, Instant)>, Vec<String>);

/// The watchers of one connection.
struct ConnectionWatchers {
    channel: Channel,
    /// Streams to open on it.
    count: usize,
    project: String,
    /// Counts the streams open, across connections.
    established: Arc<AtomicUsize>,
    stop: watch::Receiver<bool>,
    /// Events each stream should receive (to size the record).
    expected: usize,
}

/// Opens a connection's watch streams, then records when each event arrives on each until
/// `stop`. One task polls all of them, as a client process would, so the bench's own
/// scheduling weighs little on the server it shares the machine with.
async fn watch_connection<U: Delivered>(watchers: ConnectionWatchers) -> Received {
    let ConnectionWatchers {
        channel,
        count,
        project,
        established,
        mut stop,
        expected,
    } = watchers;
    let open = (0..count).map(|_| {
        let channel = channel.clone();
        let project = project.clone();
        let established = established.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.map_err(|e| e.to_string())?;
            let request = with_actor(
                pb::WatchChangeRequestsRequest {
                    project,
                    ..Default::default()
                },
                "user:watcher",
            );
            let stream = grpc
                .server_streaming::<_, U, _>(
                    request,
                    PathAndQuery::from_static("/approvals.v1.ChangeRequests/WatchChangeRequests"),
                    tonic_prost::ProstCodec::<pb::WatchChangeRequestsRequest, U>::default(),
                )
                .await
                .map_err(|status| status.to_string())?
                .into_inner();
            established.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(stream)
        }
    });
    let mut errors = Vec::new();
    let mut streams = Vec::with_capacity(count);
    for opened in futures::future::join_all(open).await {
        match opened {
            Ok(stream) => streams.push(stream),
            Err(err) => errors.push(err),
        }
    }
    let mut received = Vec::with_capacity(streams.len() * expected);
    let mut messages = futures::stream::select_all(streams);
    let stopped = stop.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            message = messages.next() => match message {
                Some(Ok(message)) => {
                    let now = Instant::now();
                    received.extend(message.revisions().map(|revision| (revision, now)));
                }
                Some(Err(status)) => errors.push(status.to_string()),
                None => break,
            },
            _ = &mut stopped => break,
        }
    }
    (received, errors)
}

pub async fn fan_out(
    addr: &str,
    server_pid: Option<u32>,
    options: &WatchOptions,
) -> Result<WatchResult, String> {
    let connections = options
        .watchers
        .div_ceil(options.per_connection.max(1))
        .max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(addr, None).await?);
    }
    // Let the server settle after the connections, so RSS counts the watchers only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server_pid.and_then(rss_bytes);

    let established = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::with_capacity(connections);
    for (i, channel) in channels.into_iter().enumerate() {
        // The first `watchers % connections` connections take one more.
        let count =
            options.watchers / connections + usize::from(i < options.watchers % connections);
        let watchers = ConnectionWatchers {
            channel,
            count,
            project: options.project.clone(),
            established: established.clone(),
            stop: stop.clone(),
            expected: options.writes,
        };
        tasks.push(tokio::spawn(match options.decode {
            WatchDecode::Revisions => watch_connection::<DeliveredRevisions>(watchers).boxed(),
            WatchDecode::Full => {
                watch_connection::<pb::WatchChangeRequestsResponse>(watchers).boxed()
            }
        }));
    }
    // Wait until every stream is open (or a minute has passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while established.load(Ordering::Relaxed) < options.watchers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = server_pid.and_then(rss_bytes);
    let established = established.load(Ordering::Relaxed);

    // Writes, spaced out: each one is delivered to every watcher.
    let mut writer = ChangeRequestsClient::new(connect(addr, None).await?);
    let mut issued: Vec<(i64, Instant)> = Vec::with_capacity(options.writes);
    let server_cpu_before = server_pid.and_then(|pid| cpu_seconds(&pid.to_string()));
    let client_cpu_before = cpu_seconds("self");
    for i in 0..options.writes {
        let started = Instant::now();
        let created = writer
            .create_change_request(with_actor(
                create_request(&options.project, &format!("watched-{i}")),
                "user:writer",
            ))
            .await
            .map_err(|s| format!("watch write: {s}"))?
            .into_inner();
        issued.push((created.revision, started));
        tokio::time::sleep(options.interval).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_cpu = server_pid
        .and_then(|pid| cpu_seconds(&pid.to_string()))
        .zip(server_cpu_before)
        .map(|(after, before)| after - before);
    let client_cpu = cpu_seconds("self")
        .zip(client_cpu_before)
        .map(|(after, before)| after - before);
    let _ = stop_tx.send(true);

    let issued: std::collections::HashMap<i64, Instant> = issued.into_iter().collect();
    let mut latencies = Vec::with_capacity(options.watchers * options.writes);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok((received, failed)) => {
                for (revision, at) in received {
                    if let Some(started) = issued.get(&revision) {
                        latencies.push(at.saturating_duration_since(*started).as_nanos() as u64);
                    }
                }
                errors.extend(failed);
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    if let Some(err) = errors.first() {
        eprintln!("watch: {} streams failed, first: {err}", errors.len());
    }
    latencies.sort_unstable();
    let expected = (established * options.writes) as u64;
    let deliveries = latencies.len() as u64;
    Ok(WatchResult {
        watchers: options.watchers,
        decode: options.decode,
        connections,
        established,
        writes: options.writes,
        deliveries,
        missing: expected.saturating_sub(deliveries),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |n| *n as f64 / 1e6),
        rss_before_bytes: rss_before,
        rss_idle_bytes: rss_idle,
        bytes_per_idle_watcher: match (rss_before, rss_idle) {
            (Some(before), Some(idle)) if established > 0 => {
                Some((idle as f64 - before as f64) / established as f64)
            }
            _ => None,
        },
        server_cpu_us_per_delivery: server_cpu
            .filter(|_| deliveries > 0)
            .map(|seconds| seconds * 1e6 / deliveries as f64),
        client_cpu_us_per_delivery: client_cpu
            .filter(|_| deliveries > 0)
            .map(|seconds| seconds * 1e6 / deliveries as f64),
    })
}
