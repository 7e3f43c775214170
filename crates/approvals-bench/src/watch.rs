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

use crate::{connect, create_request, load::percentile, server::rss_bytes, with_actor};

#[derive(Debug, Clone, Serialize)]
pub struct WatchResult {
    pub watchers: usize,
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
}

pub struct WatchOptions {
    pub watchers: usize,
    pub per_connection: usize,
    pub writes: usize,
    pub interval: Duration,
    pub project: String,
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
        channels.push(connect(addr).await?);
    }
    // Let the server settle after the connections, so RSS counts the watchers only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server_pid.and_then(rss_bytes);

    let established = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::with_capacity(options.watchers);
    for i in 0..options.watchers {
        let channel = channels[i % connections].clone();
        let established = established.clone();
        let mut stop = stop.clone();
        let project = options.project.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = ChangeRequestsClient::new(channel);
            let request = with_actor(
                pb::WatchChangeRequestsRequest {
                    project,
                    ..Default::default()
                },
                "user:watcher",
            );
            let mut received: Vec<(String, Instant)> = Vec::new();
            let mut stream = match client.watch_change_requests(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Err(status.to_string()),
            };
            established.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(message)) => {
                            let now = Instant::now();
                            for event in message.events {
                                received.push((event.change_request_id, now));
                            }
                        }
                        Ok(None) => break,
                        Err(status) => return Err(status.to_string()),
                    },
                    _ = stop.changed() => break,
                }
            }
            Ok(received)
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
    let mut writer = ChangeRequestsClient::new(connect(addr).await?);
    let mut issued: Vec<(String, Instant)> = Vec::with_capacity(options.writes);
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
        issued.push((created.id, started));
        tokio::time::sleep(options.interval).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);

    let issued: std::collections::HashMap<String, Instant> = issued.into_iter().collect();
    let mut latencies = Vec::with_capacity(options.watchers * options.writes);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(received)) => {
                for (id, at) in received {
                    if let Some(started) = issued.get(&id) {
                        latencies.push(at.saturating_duration_since(*started).as_nanos() as u64);
                    }
                }
            }
            Ok(Err(err)) => errors.push(err),
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
    })
}
