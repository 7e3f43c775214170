//! The hub: one reader of the event log per process, publishing to the live ring.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use approvals_store::{Backend, Store, StoreError};
use tokio::{
    sync::{Notify, Semaphore, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{config::WatchConfig, error::ApiError};

use super::{BATCH, frame::LiveEvent, ring::LiveRing};

/// How long a watch waits for the hub to publish the committed head it starts from.
const HEAD_WAIT: Duration = Duration::from_secs(10);

/// What the hub keeps current besides the watchers (the replica's read cache): it is handed
/// every settled event, as (revision, change request id) in revision order, before the head
/// moves and watchers see the event.
pub trait LogFollower: Send + Sync + 'static {
    fn apply(&self, events: &mut dyn Iterator<Item = (i64, &str)>);
}

pub struct Hub {
    pub(super) store: Store,
    pub(super) live: Arc<LiveRing<Arc<LiveEvent>>>,
    pub(super) head: watch::Receiver<i64>,
    /// The same head, for the watchers' reads: a delivery reads it (the lag it records), and
    /// the channel's read lock, taken by every delivery on both cores, bounced one cache line
    /// between them 100,000 times an event. Stored before the channel is sent to.
    pub(super) published: Arc<AtomicI64>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) settings: WatchConfig,
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// Open streams per principal, while `watch.max_watchers_per_principal` is set.
    pub(super) principals: Arc<Mutex<HashMap<String, usize>>>,
    /// How long past its expire_time a credential is still accepted (`auth.jwt.leeway`).
    pub(super) credential_leeway: Duration,
    /// On PostgreSQL, the last database head read for a watch, and when that read began (see
    /// `committed_head`).
    pub(super) committed: tokio::sync::Mutex<Option<(Instant, i64)>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Hub {
    /// Finds a settled starting point in the log and starts following it. A stream whose
    /// caller's credential expires ends `credential_leeway` after its expire_time, when the
    /// authentication layer would no longer accept the credential either.
    pub async fn start(
        store: Store,
        settings: WatchConfig,
        credential_leeway: Duration,
        follower: Arc<dyn LogFollower>,
    ) -> Result<Arc<Self>, StoreError> {
        let start = store.settled_head().await?;
        let (head_tx, head) = watch::channel(start);
        let published = Arc::new(AtomicI64::new(start));
        let live = LiveRing::new(
            settings.buffer,
            u64::try_from(settings.max_lag).unwrap_or(u64::MAX),
        );
        let wake = Arc::new(Notify::new());
        let mut tasks = store.spawn_commit_relay(wake.clone());
        tasks.push(tokio::spawn(follow(
            store.clone(),
            start,
            live.clone(),
            (published.clone(), head_tx),
            wake,
            settings.poll_interval,
            follower,
        )));
        Ok(Arc::new(Self {
            store,
            live,
            head,
            published,
            permits: Arc::new(Semaphore::new(settings.max_watchers)),
            settings,
            tasks,
            principals: Arc::default(),
            credential_leeway,
            committed: tokio::sync::Mutex::new(None),
        }))
    }

    /// "Now" for a watch opened at this moment: a revision at least as high as every write
    /// acknowledged to anyone before the call, which the hub has published (so every revision
    /// at or below it is settled). The hub's own head can trail a commit by milliseconds. On
    /// SQLite every write goes through this process, which knows the highest it has written; on
    /// PostgreSQL other replicas write too, so the database's highest revision is read, one read
    /// shared by the watches opened while it runs (a read counts for a watch only if it began
    /// after the watch asked). The settling itself is the hub's work, done once for everyone:
    /// a per-watch settle cost every open three queries, and 10,000 opens waiting on them left
    /// 11 KiB of RSS per watcher instead of 5.
    pub(super) async fn committed_head(&self) -> Result<i64, ApiError> {
        let target = match self.store.backend() {
            Backend::Sqlite => self.store.written_head(),
            Backend::Postgres => {
                let asked = Instant::now();
                let mut last = self.committed.lock().await;
                match *last {
                    Some((began, head)) if began >= asked => head,
                    _ => {
                        let began = Instant::now();
                        let head = self.store.head_revision().await?;
                        *last = Some((began, head));
                        head
                    }
                }
            }
        };
        // Never below the hub's head: that is settled and published already.
        if self.head() >= target {
            return Ok(self.head());
        }
        let mut published = self.head.clone();
        match tokio::time::timeout(HEAD_WAIT, published.wait_for(|head| *head >= target)).await {
            Ok(Ok(head)) => Ok(Ord::max(target, *head)),
            _ => Err(StoreError::Unavailable(format!(
                "the event log reader has not reached revision {target} within {HEAD_WAIT:?}"
            ))
            .into()),
        }
    }

    /// Counts one more stream for `principal`, unless it holds its limit already.
    pub(super) fn count_watcher(
        &self,
        principal: &str,
    ) -> Result<Option<PrincipalPermit>, ApiError> {
        let max = self.settings.max_watchers_per_principal;
        if max == 0 {
            return Ok(None);
        }
        let mut counts = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(principal.to_owned()).or_default();
        if *count >= max {
            return Err(ApiError::TooManyWatchersForPrincipal {
                principal: principal.to_owned(),
                max,
            });
        }
        *count += 1;
        Ok(Some(PrincipalPermit {
            counts: self.principals.clone(),
            principal: principal.to_owned(),
        }))
    }

    /// The last revision settled: every event at or below it is in the log for good, and is in
    /// the live ring or about to be (the head moves just before the ring, see `follow`).
    pub fn head(&self) -> i64 {
        self.published.load(Ordering::SeqCst)
    }

    /// Ends every watch stream (with the revision to resume from), for shutdown.
    pub fn close(&self) {
        self.live.close();
    }
}

/// The hub's reader: publishes settled events as soon as they are committed anywhere.
async fn follow(
    store: Store,
    start: i64,
    live: Arc<LiveRing<Arc<LiveEvent>>>,
    (published, head): (Arc<AtomicI64>, watch::Sender<i64>),
    wake: Arc<Notify>,
    poll_interval: Duration,
    follower: Arc<dyn LogFollower>,
) {
    let mut reader = store.log_reader(start);
    let mut local_commits = store.local_commits();
    loop {
        match reader.next_batch(BATCH as u64).await {
            Ok(batch) => {
                let last = batch.events.last().map(|e| e.revision);
                // The cache first: once a watcher or a reader sees the head move, the cache no
                // longer holds what the new events changed.
                follower.apply(
                    &mut batch
                        .events
                        .iter()
                        .map(|e| (e.revision, e.change_request_id.as_str())),
                );
                let read_at = Instant::now();
                let events: Vec<Arc<LiveEvent>> = batch
                    .events
                    .into_iter()
                    .map(|event| {
                        crate::telemetry::metrics::record_transition(event.kind.as_str());
                        Arc::new(LiveEvent::new(event, read_at))
                    })
                    .collect();
                // The head moves first: a watcher subscribes to the ring, then reads the head,
                // so whatever it reads, every event above that head is still to come in the
                // ring. Published first, an event could land before the subscription while the
                // head still read below it, and that watcher would never get it.
                if let Some(last) = last {
                    published.store(last, Ordering::SeqCst);
                    head.send_replace(last);
                }
                if !events.is_empty() {
                    live.publish(events);
                }
                if batch.full {
                    continue;
                }
                if batch.waiting {
                    // An earlier revision is still in flight: look again very soon.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                tokio::select! {
                    _ = local_commits.changed() => {}
                    () = wake.notified() => {}
                    () = tokio::time::sleep(poll_interval) => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "reading the event log failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// One of a principal's open streams; released when the stream ends.
pub(super) struct PrincipalPermit {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    principal: String,
}

impl Drop for PrincipalPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.principal) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.principal);
            }
        }
    }
}
