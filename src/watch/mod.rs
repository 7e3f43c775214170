//! Watch: one reader of the event log per process feeds every watcher.
//!
//! The hub reads the log with the store's gap-free reader (every event once, in revision
//! order, across writers and replicas) and publishes each event, converted once, to a bounded
//! in-memory ring. A watcher at the live tail takes events from the ring; one that starts from
//! an old revision, or falls off the ring, reads the log itself at its own pace until it reaches
//! the head again. No event is ever dropped: a watcher that has been live and falls more than
//! `watch.max_lag` events (counted in revisions) behind is ended with RESOURCE_EXHAUSTED and the
//! revision to resume from.
//!
//! What one caller can hold is bounded: `watch.max_watchers_per_principal` streams per
//! authenticated principal (beside `watch.max_watchers` in all), a snapshot read a page at a
//! time as the client takes it, and a stream authenticated with an expiring credential (a JWT)
//! ends when the credential does, with the revision to resume from.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;

use approvals_domain::{ChangeRequest, Event, State, Timestamp};
use approvals_store::{Backend, ListFilter, LogReader, Store, StoreError};
use futures::Stream;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
    task::JoinHandle,
    time::Instant,
};
use tonic::Status;

use crate::{auth::Caller, config::WatchConfig, convert, error::ApiError, pb};

pub mod read_cache;
mod ring;

use self::{
    read_cache::RequestCache,
    ring::{LiveRing, Read, Reader},
};

/// Events per live message, at most.
const BATCH: usize = 256;
/// Encoded events per message, at most (a larger event goes alone). What the server holds for
/// a stream whose client stops reading is bounded by its HTTP/2 send window plus one message,
/// and while catching up the rest of one log read.
const FRAME_BYTES: usize = 64 * 1024;
/// How long a watch waits for the hub to publish the committed head it starts from.
const HEAD_WAIT: Duration = Duration::from_secs(10);
/// Events per log read of a watcher catching up (the hub's own reads take `BATCH`).
const CATCH_UP_BATCH: u64 = 32;
/// Requests per snapshot message.
const SNAPSHOT_CHUNK: usize = 100;
/// Requests per snapshot read (up to twice this when many changed since the snapshot's
/// revision, see `Store::requests_at_page`): a stream holds one page of its snapshot in memory,
/// and reads the next when the client has taken this one.
const SNAPSHOT_PAGE: u64 = 200;

/// An event as published to live watchers: the domain event (for filtering), its message, and
/// the message encoded once for every watcher (see [`WatchFrame`]).
pub struct LiveEvent {
    event: Event,
    message: pb::Event,
    /// The gRPC message of a frame that carries this event alone: the 5-byte gRPC prefix, then
    /// `WatchChangeRequestsResponse { revision, events: [event] }`. It ends with the encoded
    /// event, which frames of several events copy from.
    framed: Bytes,
    /// Length of the encoded event at the end of `framed`.
    event_len: usize,
}

impl LiveEvent {
    fn new(event: Event) -> Self {
        let message = convert::event(&event);
        let encoded = message.encode_to_vec();
        Self {
            framed: frame_live(event.revision, [encoded.as_slice()]),
            event_len: encoded.len(),
            event,
            message,
        }
    }

    fn encoded(&self) -> &[u8] {
        &self.framed[self.framed.len() - self.event_len..]
    }
}

/// One message of a watch stream, as the stream produces it. Events from the live ring are
/// shared, already encoded: with 10,000 watchers an event used to be cloned and encoded
/// 10,000 times, and a frame of one event is sent as the very bytes the ring holds. On the wire
/// a frame is exactly the `WatchChangeRequestsResponse` it stands for (`into_message` gives
/// that message; a test holds the bytes equal).
#[derive(Clone)]
pub enum WatchFrame {
    Message(pb::WatchChangeRequestsResponse),
    Live {
        revision: i64,
        events: Vec<Arc<LiveEvent>>,
    },
}

impl std::fmt::Debug for WatchFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(message) => message.fmt(f),
            Self::Live { revision, events } => f
                .debug_struct("WatchFrame::Live")
                .field("revision", revision)
                .field("events", &events.len())
                .finish(),
        }
    }
}

impl WatchFrame {
    pub fn into_message(self) -> pb::WatchChangeRequestsResponse {
        match self {
            Self::Message(message) => message,
            Self::Live { revision, events } => pb::WatchChangeRequestsResponse {
                revision,
                events: events.iter().map(|e| e.message.clone()).collect(),
                ..Default::default()
            },
        }
    }

    /// The frame as one length-prefixed gRPC message (uncompressed), as it goes on the wire.
    pub fn grpc_message(&self) -> Bytes {
        match self {
            Self::Live { revision, events } => match events.as_slice() {
                [only] if only.event.revision == *revision => only.framed.clone(),
                _ => frame_live(*revision, events.iter().map(|event| event.encoded())),
            },
            Self::Message(message) => {
                let body_len = message.encoded_len();
                let mut buf = bytes::BytesMut::with_capacity(GRPC_PREFIX + body_len);
                put_grpc_prefix(body_len, &mut buf);
                message.encode_raw(&mut buf);
                buf.freeze()
            }
        }
    }
}

/// Bytes before each gRPC message: a compression flag (0) and the length (u32, big-endian).
const GRPC_PREFIX: usize = 5;
/// Field numbers of `WatchChangeRequestsResponse` that a live frame writes, in number order,
/// as prost writes them.
const REVISION_FIELD: u32 = 1;
const EVENTS_FIELD: u32 = 2;

fn put_grpc_prefix(body_len: usize, buf: &mut bytes::BytesMut) {
    use bytes::BufMut;
    buf.put_u8(0);
    // A single event is far below 4 GiB: the store refuses payloads past the message limit.
    buf.put_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
}

/// The gRPC message of a live frame: `WatchChangeRequestsResponse { revision, events }` with
/// the events already encoded, fields in number order as prost writes them.
fn frame_live<'a>(revision: i64, events: impl IntoIterator<Item = &'a [u8]> + Clone) -> Bytes {
    let revision_len = if revision != 0 {
        prost::encoding::int64::encoded_len(REVISION_FIELD, &revision)
    } else {
        0
    };
    let body_len = revision_len
        + events
            .clone()
            .into_iter()
            .map(|event| {
                prost::encoding::key_len(EVENTS_FIELD)
                    + prost::encoding::encoded_len_varint(event.len() as u64)
                    + event.len()
            })
            .sum::<usize>();
    let mut buf = bytes::BytesMut::with_capacity(GRPC_PREFIX + body_len);
    put_grpc_prefix(body_len, &mut buf);
    if revision != 0 {
        prost::encoding::int64::encode(REVISION_FIELD, &revision, &mut buf);
    }
    for event in events {
        prost::encoding::encode_key(
            EVENTS_FIELD,
            prost::encoding::WireType::LengthDelimited,
            &mut buf,
        );
        prost::encoding::encode_varint(event.len() as u64, &mut buf);
        buf.extend_from_slice(event);
    }
    buf.freeze()
}

pub struct Hub {
    store: Store,
    live: Arc<LiveRing<Arc<LiveEvent>>>,
    head: watch::Receiver<i64>,
    permits: Arc<Semaphore>,
    settings: WatchConfig,
    tasks: Vec<JoinHandle<()>>,
    cache: Arc<RequestCache>,
    /// Open streams per principal, while `watch.max_watchers_per_principal` is set.
    principals: Arc<Mutex<HashMap<String, usize>>>,
    /// How long past its expire_time a credential is still accepted (`auth.jwt.leeway`).
    credential_leeway: Duration,
    /// On PostgreSQL, the last database head read for a watch, and when that read began (see
    /// `committed_head`).
    committed: tokio::sync::Mutex<Option<(Instant, i64)>>,
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
    ) -> Result<Arc<Self>, StoreError> {
        let start = store.settled_head().await?;
        let (head_tx, head) = watch::channel(start);
        let live = LiveRing::new(
            settings.buffer,
            u64::try_from(settings.max_lag).unwrap_or(u64::MAX),
        );
        let wake = Arc::new(Notify::new());
        let mut tasks = store.spawn_commit_relay(wake.clone());
        let cache = Arc::new(RequestCache::new(settings.cache_entries, start));
        tasks.push(tokio::spawn(follow(
            store.clone(),
            start,
            live.clone(),
            head_tx,
            wake,
            settings.poll_interval,
            cache.clone(),
        )));
        Ok(Arc::new(Self {
            store,
            live,
            head,
            permits: Arc::new(Semaphore::new(settings.max_watchers)),
            settings,
            tasks,
            cache,
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
    async fn committed_head(&self) -> Result<i64, ApiError> {
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
    fn count_watcher(&self, principal: &str) -> Result<Option<PrincipalPermit>, ApiError> {
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

    /// The read cache this hub keeps current (see `read_cache`).
    pub fn cache(&self) -> &RequestCache {
        &self.cache
    }

    /// The last revision settled: every event at or below it is in the log for good, and is in
    /// the live ring or about to be (the head moves just before the ring, see `follow`).
    pub fn head(&self) -> i64 {
        *self.head.borrow()
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
    head: watch::Sender<i64>,
    wake: Arc<Notify>,
    poll_interval: Duration,
    cache: Arc<RequestCache>,
) {
    let mut reader = store.log_reader(start);
    let mut local_commits = store.local_commits();
    loop {
        match reader.next_batch(BATCH as u64).await {
            Ok(batch) => {
                let last = batch.events.last().map(|e| e.revision);
                // The cache first: once a watcher or a reader sees the head move, the cache no
                // longer holds what the new events changed.
                cache.apply(
                    batch
                        .events
                        .iter()
                        .map(|e| (e.revision, e.change_request_id.as_str())),
                );
                let published: Vec<Arc<LiveEvent>> = batch
                    .events
                    .into_iter()
                    .map(|event| {
                        crate::telemetry::metrics::record_transition(event.kind.as_str());
                        Arc::new(LiveEvent::new(event))
                    })
                    .collect();
                // The head moves first: a watcher subscribes to the ring, then reads the head,
                // so whatever it reads, every event above that head is still to come in the
                // ring. Published first, an event could land before the subscription while the
                // head still read below it, and that watcher would never get it.
                if let Some(last) = last {
                    head.send_replace(last);
                }
                if !published.is_empty() {
                    live.publish(published);
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
struct PrincipalPermit {
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

/// Which events a watcher receives.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub project: String,
    pub environment: Option<String>,
    pub action_key: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub states: Vec<State>,
    pub id: Option<String>,
}

impl EventFilter {
    fn as_list_filter(&self) -> ListFilter {
        ListFilter {
            project: self.project.clone(),
            environment: self.environment.clone(),
            action_key: self.action_key.clone(),
            resource_type: self.resource_type.clone(),
            resource_id: self.resource_id.clone(),
            requester: None,
            states: self.states.clone(),
            id: self.id.clone(),
        }
    }

    /// Matches on the event and on the request as it stood right after it; `states` on the
    /// event's `to_state`.
    fn matches(&self, event: &Event) -> bool {
        event.project == self.project
            && self
                .environment
                .as_ref()
                .is_none_or(|e| &event.environment == e)
            && self
                .id
                .as_ref()
                .is_none_or(|id| &event.change_request_id == id)
            && (self.states.is_empty() || self.states.contains(&event.to_state))
            && match &event.change_request {
                Some(request) => {
                    self.action_key
                        .as_ref()
                        .is_none_or(|a| &request.action_key == a)
                        && approvals_store::touches_resource(
                            self.resource_type.as_deref(),
                            self.resource_id.as_deref(),
                            request,
                        )
                }
                None => {
                    self.action_key.is_none()
                        && self.resource_type.is_none()
                        && self.resource_id.is_none()
                }
            }
    }
}

/// Where a watch starts.
pub enum Start {
    /// After the current head.
    Now,
    /// At this revision (inclusive).
    Revision(i64),
    /// A snapshot of the matching requests at the head, then the events after it.
    Initial,
}

/// A snapshot being sent: the requests matching at `revision`, read a page at a time.
struct Snapshot {
    revision: i64,
    filter: ListFilter,
    /// The rest of the page read last.
    page: std::vec::IntoIter<ChangeRequest>,
    /// Where the next page starts (below this id; from the newest when `None`).
    before: Option<String>,
    /// The last page has been read.
    read_all: bool,
}

enum Mode {
    /// Taking events from the hub's ring.
    Live,
    /// Reading the log up to `target` (a head published after `live` was subscribed).
    CatchingUp { reader: LogReader, target: i64 },
}

struct Watcher {
    hub: Arc<Hub>,
    filter: EventFilter,
    /// Every event at or below it has been processed (delivered if it matched).
    cursor: i64,
    /// Matching events of the last log read not sent yet (see `take_pending`), and the
    /// revision that read reached.
    pending: std::collections::VecDeque<pb::Event>,
    pending_to: i64,
    live: Reader<Arc<LiveEvent>>,
    mode: Mode,
    /// Once at the live tail, the lag limit applies.
    was_live: bool,
    snapshot: Option<Snapshot>,
    /// When the caller's credential stops being accepted: the stream ends then.
    expires: Option<Instant>,
    /// Fires at `expires`, so an idle stream ends on time too.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    last_sent: Instant,
    /// Fires at or before the next progress notification is due; when it fires early (messages
    /// were sent since it was set) it is set again from `last_sent`. Kept across messages, so a
    /// delivery does not register and drop a timer for each of thousands of watchers.
    progress: Pin<Box<tokio::time::Sleep>>,
    done: bool,
    _permit: OwnedSemaphorePermit,
    _principal_permit: Option<PrincipalPermit>,
    _counted: crate::telemetry::metrics::OpenWatcher,
}

/// A watch stream as the watch route sends it (see `watch_route`).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchFrame, Status>> + Send>>;

/// The same stream as plain messages, for the generated service trait.
pub type WatchMessages =
    Pin<Box<dyn Stream<Item = Result<pb::WatchChangeRequestsResponse, Status>> + Send>>;

/// Opens a watch stream for `caller`: counted against `watch.max_watchers` and, by the
/// authenticated principal (the acting service of an on-behalf-of call, which holds the
/// stream), against `watch.max_watchers_per_principal`; ended when its credential expires.
pub async fn open(
    hub: Arc<Hub>,
    filter: EventFilter,
    start: Start,
    caller: &Caller,
) -> Result<WatchStream, ApiError> {
    let principal_permit = hub.count_watcher(caller.credential_principal().as_str())?;
    let permit =
        hub.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyWatchers {
                max: hub.settings.max_watchers,
            })?;
    // Subscribe before reading the head: every event after the head is then in `live`. The
    // head is the database's committed one, so that a write acknowledged before this call is
    // never delivered as new, a snapshot holds it, and the oldest revision a watch may start
    // from is the same one REVISION_TOO_OLD reported (with no writes in between).
    let live = hub.live.subscribe();
    let head = hub.committed_head().await?;
    let mut snapshot = None;
    let (cursor, mode) = match start {
        Start::Now => (head, Mode::Live),
        Start::Revision(first) => {
            let oldest = Ord::max(head - hub.settings.history + 1, 1);
            if first < oldest {
                return Err(ApiError::RevisionTooOld {
                    requested: first,
                    oldest,
                });
            }
            let cursor = first - 1;
            if cursor >= head {
                (cursor, Mode::Live)
            } else {
                let reader = hub.store.log_reader_settled(cursor, head);
                (
                    cursor,
                    Mode::CatchingUp {
                        reader,
                        target: head,
                    },
                )
            }
        }
        Start::Initial => {
            // Read page by page as it is sent (see `next_snapshot_message`).
            snapshot = Some(Snapshot {
                revision: head,
                filter: filter.as_list_filter(),
                page: Vec::new().into_iter(),
                before: None,
                read_all: false,
            });
            (head, Mode::Live)
        }
    };
    // After a snapshot the watcher catches up from its revision at its own pace, like one that
    // starts from a revision: the lag limit applies once it is live.
    let was_live = matches!(mode, Mode::Live) && snapshot.is_none();
    let now = Instant::now();
    let expires = caller
        .expire_time
        .and_then(|expire_time| instant_of(expire_time, hub.credential_leeway, now));
    let watcher = Watcher {
        progress: Box::pin(tokio::time::sleep_until(
            now + hub.settings.progress_interval,
        )),
        expiry: expires.map(|at| Box::pin(tokio::time::sleep_until(at))),
        expires,
        hub,
        filter,
        cursor,
        pending: std::collections::VecDeque::new(),
        pending_to: cursor,
        live,
        mode,
        was_live,
        snapshot,
        last_sent: now,
        done: false,
        _permit: permit,
        _principal_permit: principal_permit,
        _counted: crate::telemetry::metrics::OpenWatcher::new(),
    };
    Ok(Box::pin(Steps::Idle(Box::new(watcher))))
}

/// Whether `expires` (if any) has passed.
fn expired(expires: Option<Instant>) -> bool {
    expires.is_some_and(|at| Instant::now() >= at)
}

/// The monotonic instant at which `expire_time` plus `leeway` passes, `now` being the present;
/// `None` when it lies too far ahead to matter.
fn instant_of(expire_time: Timestamp, leeway: Duration, now: Instant) -> Option<Instant> {
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let leeway = i64::try_from(leeway.as_micros()).unwrap_or(i64::MAX);
    let remaining = expire_time
        .as_micros()
        .saturating_add(leeway)
        .saturating_sub(wall_now);
    now.checked_add(Duration::from_micros(u64::try_from(remaining).unwrap_or(0)))
}

/// A watch stream. At the live tail (nearly all of a watcher's life) a delivery is polled in
/// place: read the ring, filter, frame. Everything else (the snapshot, reads of the log, the
/// switch between the two, the end) runs as a future that owns the watcher until it yields a
/// message. An async stream throughout cost a third of the server's CPU at 10,000 watchers.
enum Steps {
    Idle(Box<Watcher>),
    Busy(Pin<Box<dyn Future<Output = Stepped> + Send>>),
    Done,
}

/// A slow step's outcome: the watcher back, and the message (none once the stream is over).
type Stepped = (Box<Watcher>, Option<Result<WatchFrame, Status>>);

impl Stream for Steps {
    type Item = Result<WatchFrame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let steps = self.get_mut();
        loop {
            match std::mem::replace(steps, Steps::Done) {
                Steps::Idle(mut watcher) => {
                    if watcher.at_live_tail() {
                        match watcher.poll_live(cx) {
                            Poll::Pending => {
                                *steps = Steps::Idle(watcher);
                                return Poll::Pending;
                            }
                            Poll::Ready(Ok(Some(frame))) => {
                                let item = watcher.sent(Ok(frame));
                                *steps = Steps::Idle(watcher);
                                return Poll::Ready(item);
                            }
                            Poll::Ready(Err(err)) => {
                                let item = watcher.sent(Err(err));
                                *steps = Steps::Idle(watcher);
                                return Poll::Ready(item);
                            }
                            // Off the live tail: the slow path takes it from here.
                            Poll::Ready(Ok(None)) => {}
                        }
                    }
                    *steps = Steps::Busy(Box::pin(async move {
                        let item = watcher.next().await;
                        (watcher, item)
                    }));
                }
                Steps::Busy(mut step) => match step.as_mut().poll(cx) {
                    Poll::Pending => {
                        *steps = Steps::Busy(step);
                        return Poll::Pending;
                    }
                    Poll::Ready((watcher, item)) => {
                        if item.is_some() {
                            *steps = Steps::Idle(watcher);
                        }
                        return Poll::Ready(item);
                    }
                },
                Steps::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchFrame, Status>> {
        if self.done {
            return None;
        }
        let result = self.next_message().await;
        self.sent(result)
    }

    /// Live, nothing else to send first: [`Steps`] polls the ring in place.
    fn at_live_tail(&self) -> bool {
        !self.done
            && self.snapshot.is_none()
            && matches!(self.mode, Mode::Live)
            && !self.hub.live.is_closed()
    }

    /// Books a message about to go out; an error is the stream's last.
    fn sent(&mut self, result: Result<WatchFrame, ApiError>) -> Option<Result<WatchFrame, Status>> {
        match &result {
            Ok(_) if matches!(self.mode, Mode::Live) => {
                crate::telemetry::metrics::record_watch_lag(self.hub.head() - self.cursor);
            }
            Ok(_) => {}
            Err(_) => self.done = true,
        }
        self.last_sent = Instant::now();
        Some(result.map_err(Status::from))
    }

    async fn next_message(&mut self) -> Result<WatchFrame, ApiError> {
        if self.snapshot.is_some() {
            return self.next_snapshot_message().await;
        }
        loop {
            if self.hub.live.is_closed() {
                return Err(ApiError::ShuttingDown {
                    resume: self.cursor + 1,
                });
            }
            self.check_expiry()?;
            if matches!(self.mode, Mode::CatchingUp { .. }) {
                self.check_lag()?;
            }
            let frame = match &mut self.mode {
                Mode::CatchingUp { reader, target } => {
                    let target = *target;
                    let mut finished = false;
                    if self.pending.is_empty() {
                        let batch = reader.next_batch(CATCH_UP_BATCH).await?;
                        if batch.events.is_empty() && batch.waiting {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        for event in &batch.events {
                            if self.filter.matches(event) {
                                self.pending.push_back(convert::event(event));
                            }
                        }
                        if let Some(last) = batch.events.last() {
                            self.pending_to = last.revision;
                        }
                        finished = batch.events.is_empty() && !batch.waiting;
                    }
                    let frame = self.take_pending();
                    if self.pending.is_empty() && (self.cursor >= target || finished) {
                        self.mode = Mode::Live;
                        self.was_live = true;
                    }
                    frame
                }
                Mode::Live => std::future::poll_fn(|cx| self.poll_live(cx)).await?,
            };
            if let Some(frame) = frame {
                return Ok(frame);
            }
        }
    }

    /// A message of the log events read but not sent yet, at most `FRAME_BYTES` of them (a
    /// larger one alone), so that a client's message limit and what the server holds for a
    /// stalled stream stay bounded whatever the events hold. The cursor moves past what it
    /// sends, and past the whole read once nothing of it is left.
    fn take_pending(&mut self) -> Option<WatchFrame> {
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.pending.front() {
            bytes += next.encoded_len();
            if !events.is_empty() && bytes > FRAME_BYTES {
                break;
            }
            events.extend(self.pending.pop_front());
        }
        self.cursor = match (self.pending.front(), events.last()) {
            (Some(_), Some(last)) => last.revision,
            _ => Ord::max(self.cursor, self.pending_to),
        };
        events.last().map(|last| last.revision).map(|revision| {
            WatchFrame::Message(pb::WatchChangeRequestsResponse {
                revision,
                events,
                ..Default::default()
            })
        })
    }

    /// The next message of the snapshot, reading the next page when the last one has been
    /// sent; after the last message (`snapshot_complete`), the events after its revision.
    async fn next_snapshot_message(&mut self) -> Result<WatchFrame, ApiError> {
        let Some(snapshot) = &mut self.snapshot else {
            return Err(StoreError::Internal("no snapshot to send".to_owned()).into());
        };
        loop {
            // Nothing more once the credential has expired, not even the rest of a page.
            if expired(self.expires) {
                return Err(ApiError::CredentialsExpired { resume: None });
            }
            if snapshot.page.len() > 0 || snapshot.read_all {
                break;
            }
            let page = self
                .hub
                .store
                .requests_at_page(
                    &snapshot.filter,
                    snapshot.revision,
                    snapshot.before.as_deref(),
                    SNAPSHOT_PAGE,
                )
                .await?;
            snapshot.read_all = page.next_before.is_none();
            snapshot.before = page.next_before;
            snapshot.page = page.change_requests.into_iter();
        }
        let chunk: Vec<pb::ChangeRequest> = snapshot
            .page
            .by_ref()
            .take(SNAPSHOT_CHUNK)
            .map(|request| convert::change_request(&request, None))
            .collect();
        let complete = snapshot.page.len() == 0 && snapshot.read_all;
        let revision = snapshot.revision;
        if complete {
            self.snapshot = None;
            self.after_snapshot();
        }
        Ok(WatchFrame::Message(pb::WatchChangeRequestsResponse {
            revision: if complete { revision } else { 0 },
            snapshot: chunk,
            snapshot_complete: complete,
            ..Default::default()
        }))
    }

    /// The snapshot is sent: the events after its revision follow, from the log up to the
    /// head (the snapshot took as long as the client took to read it), then from the ring.
    fn after_snapshot(&mut self) {
        self.live.skip_to_end();
        let target = self.hub.head();
        if target > self.cursor {
            let reader = self.hub.store.log_reader_settled(self.cursor, target);
            self.mode = Mode::CatchingUp { reader, target };
        } else {
            self.was_live = true;
        }
    }

    /// Ends the stream once the caller's credential has expired: with the revision to resume
    /// from, unless a snapshot was cut short (then there is none to give).
    fn check_expiry(&self) -> Result<(), ApiError> {
        if expired(self.expires) {
            return Err(self.expired());
        }
        Ok(())
    }

    fn expired(&self) -> ApiError {
        ApiError::CredentialsExpired {
            resume: self.snapshot.is_none().then_some(self.cursor + 1),
        }
    }

    /// At the live tail: the next frame of matching events from the ring, a progress message
    /// when one is due, or `None` when the mode changed (the watcher fell off the ring) or the
    /// hub closed.
    fn poll_live(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<WatchFrame>, ApiError>> {
        loop {
            if let Err(expired) = self.check_expiry() {
                return Poll::Ready(Err(expired));
            }
            // A publish found this watcher behind: events went by while it was not polled (its
            // client stopped reading, so its HTTP/2 window stayed full). Lag counts what it has
            // taken: still more than max_lag behind, it ends here, its resume revision the
            // first it did not take.
            if self.was_live && self.live.take_behind() {
                self.check_lag()?;
            }
            let mut events = Vec::new();
            let mut bytes = 0;
            let read = self.live.read_while(cx, BATCH, &mut events, |next| {
                bytes += next.encoded().len();
                bytes <= FRAME_BYTES
            });
            match read {
                Read::Items => {
                    let cursor = &mut self.cursor;
                    let filter = &self.filter;
                    events.retain(|live| {
                        if live.event.revision <= *cursor {
                            return false;
                        }
                        *cursor = live.event.revision;
                        filter.matches(&live.event)
                    });
                    if let Some(revision) = events.last().map(|live| live.event.revision) {
                        return Poll::Ready(Ok(Some(WatchFrame::Live { revision, events })));
                    }
                }
                Read::Lagged => {
                    self.fall_back_to_log()?;
                    return Poll::Ready(Ok(None));
                }
                Read::Closed => return Poll::Ready(Ok(None)),
                Read::Empty => {
                    if let Some(expiry) = &mut self.expiry
                        && expiry.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(self.expired()));
                    }
                    ready!(self.progress.as_mut().poll(cx));
                    let interval = self.hub.settings.progress_interval;
                    let due = self.last_sent + interval;
                    let now = Instant::now();
                    if now < due {
                        // Messages went out since it was set: wait out the rest.
                        self.progress.as_mut().reset(due);
                        continue;
                    }
                    self.progress.as_mut().reset(now + interval);
                    return Poll::Ready(Ok(Some(WatchFrame::Message(
                        pb::WatchChangeRequestsResponse {
                            revision: self.cursor,
                            progress: true,
                            ..Default::default()
                        },
                    ))));
                }
            }
        }
    }

    /// The ring moved past this watcher: read the log instead, from where it is, unless it has
    /// been live and is now too far behind.
    fn fall_back_to_log(&mut self) -> Result<(), ApiError> {
        self.live.skip_to_end();
        let target = self.hub.head();
        self.check_lag()?;
        let reader = self.hub.store.log_reader_settled(self.cursor, target);
        // Marks from before the switch say nothing of the watcher once it reads the log.
        self.live.take_behind();
        self.mode = Mode::CatchingUp { reader, target };
        Ok(())
    }

    fn check_lag(&self) -> Result<(), ApiError> {
        let lag = self.hub.head() - self.cursor;
        if self.was_live && lag > self.hub.settings.max_lag {
            return Err(ApiError::WatcherTooSlow {
                max_lag: self.hub.settings.max_lag,
                resume: self.cursor + 1,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use approvals_domain::{EventKind, Principal, Timestamp};

    use super::*;

    fn live(revision: i64, detail: &str) -> Arc<LiveEvent> {
        Arc::new(LiveEvent::new(Event {
            revision,
            change_request_id: format!("cr-{revision}"),
            project: "web".into(),
            environment: "prod".into(),
            kind: EventKind::Commented,
            actor: Principal::parse("user:alice").expect("principal"),
            acting_principal: None,
            from_state: State::InReview,
            to_state: State::InReview,
            time: Timestamp::from_micros(1_700_000_000_000_000),
            detail: detail.into(),
            change_request: None,
        }))
    }

    #[test]
    fn a_live_frame_is_byte_for_byte_the_message_it_stands_for() {
        for events in [
            vec![],
            vec![live(7, "hi")],
            vec![live(8, ""), live(300, "long")],
        ] {
            let revision = events.last().map_or(0, |e| e.event.revision);
            let frame = WatchFrame::Live { revision, events };
            let message = frame.clone().into_message();
            let body = message.encode_to_vec();
            let mut expected = vec![0];
            expected.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
            expected.extend_from_slice(&body);
            assert_eq!(frame.grpc_message().as_ref(), expected.as_slice());
        }
    }

    #[test]
    fn any_frame_is_its_message_prefixed() {
        let frame = WatchFrame::Message(pb::WatchChangeRequestsResponse {
            revision: 12,
            progress: true,
            ..Default::default()
        });
        let bytes = frame.grpc_message();
        assert_eq!(bytes[0], 0, "uncompressed");
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
            bytes.len() - 5
        );
        assert_eq!(
            pb::WatchChangeRequestsResponse::decode(&bytes[5..]).expect("decodes"),
            frame.into_message()
        );
    }
}
