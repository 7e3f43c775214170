//! A watch stream: its filter, its start (now, a revision, a snapshot), and its steps. One
//! cohesive thing over 500 lines: the stream's states (snapshot, catch-up from the log, live
//! from the ring, ended) and the moves between them only make sense read together.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use prost::Message as _;

use approvals_domain::RequestFilter;
use approvals_domain::{ChangeRequest, Timestamp};
use approvals_store::{LogReader, StoreError};
use futures::Stream;
use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tonic::Status;

use crate::{auth::Caller, convert, error::ApiError, pb};

use super::{
    BATCH,
    frame::{LiveEvent, LiveFrame, WatchFrame},
    hub::{Hub, PrincipalPermit},
    ring::{Read, Reader},
};

/// Encoded events per message, at most (a larger event goes alone). What the server holds for
/// a stream whose client stops reading is bounded by its HTTP/2 send window plus one message,
/// and while catching up the rest of one log read.
const FRAME_BYTES: usize = 64 * 1024;
/// Events per log read of a watcher catching up (the hub's own reads take `BATCH`).
const CATCH_UP_BATCH: u64 = 32;
/// Requests per snapshot message.
const SNAPSHOT_CHUNK: usize = 100;
/// Requests per snapshot read (up to twice this when many changed since the snapshot's
/// revision, see `Store::requests_at_page`): a stream holds one page of its snapshot in memory,
/// and reads the next when the client has taken this one.
const SNAPSHOT_PAGE: u64 = 200;

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
    filter: RequestFilter,
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
    /// Which events the watcher receives: the requests a list with the same filter would
    /// return (`RequestFilter::matches_event`).
    filter: RequestFilter,
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
    /// When `progress` fires (its deadline, kept here beside the rest of the watcher).
    progress_at: Instant,
    /// The waker both timers were last polled with, until one fires or is reset. While it is
    /// the polling task's and neither is due, they are not polled again: a delivery ends with a
    /// poll that finds the ring empty, and polling two timers there (each a registration in
    /// its own allocation) was a tenth of the server's work per delivery at 100,000 watchers.
    timers_armed: Option<Waker>,
    done: bool,
    _permit: OwnedSemaphorePermit,
    _principal_permit: Option<PrincipalPermit>,
    _counted: crate::telemetry::metrics::OpenWatcher,
}

/// A watch stream as the watch route sends it (see `transport::watch_route`). Held inline in
/// the response body, the watcher inside it too: each delivery follows every pointer from the
/// HTTP/2 stream's task to the ring, and at 100,000 watchers each is a cache miss.
pub struct WatchStream(Steps);

impl Stream for WatchStream {
    type Item = Result<WatchFrame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().0).poll_next(cx)
    }
}

/// The same stream as plain messages, for the generated service trait.
pub type WatchMessages =
    Pin<Box<dyn Stream<Item = Result<pb::WatchChangeRequestsResponse, Status>> + Send>>;

/// Opens a watch stream for `caller`: counted against `watch.max_watchers` and, by the
/// authenticated principal (the acting service of an on-behalf-of call, which holds the
/// stream), against `watch.max_watchers_per_principal`; ended when its credential expires.
pub async fn open(
    hub: Arc<Hub>,
    filter: RequestFilter,
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
                filter: filter.clone(),
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
    let progress_at = now + hub.settings.progress_interval;
    let watcher = Watcher {
        progress: Box::pin(tokio::time::sleep_until(progress_at)),
        progress_at,
        timers_armed: None,
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
    Ok(WatchStream(Steps::Idle(watcher)))
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
// The watcher is inline, not boxed, on purpose (see `WatchStream`); the fast path never moves it.
#[allow(clippy::large_enum_variant)]
enum Steps {
    Idle(Watcher),
    Busy(Pin<Box<dyn Future<Output = Stepped> + Send>>),
    Done,
}

/// A slow step's outcome: the watcher back, and the message (none once the stream is over).
type Stepped = (Watcher, Option<Result<WatchFrame, Status>>);

impl Stream for Steps {
    type Item = Result<WatchFrame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let steps = self.get_mut();
        loop {
            match steps {
                Steps::Idle(watcher) => {
                    if watcher.at_live_tail() {
                        match watcher.poll_live(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(Some(frame))) => {
                                return Poll::Ready(watcher.sent(Ok(frame)));
                            }
                            Poll::Ready(Err(err)) => return Poll::Ready(watcher.sent(Err(err))),
                            // Off the live tail: the slow path takes it from here.
                            Poll::Ready(Ok(None)) => {}
                        }
                    }
                    if let Steps::Idle(mut watcher) = std::mem::replace(steps, Steps::Done) {
                        *steps = Steps::Busy(Box::pin(async move {
                            let item = watcher.next().await;
                            (watcher, item)
                        }));
                    }
                }
                Steps::Busy(step) => {
                    let (watcher, item) = match step.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(stepped) => stepped,
                    };
                    *steps = match item {
                        Some(_) => Steps::Idle(watcher),
                        None => Steps::Done,
                    };
                    return Poll::Ready(item);
                }
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
        if result.is_ok() && matches!(self.mode, Mode::Live) {
            crate::telemetry::metrics::record_watch_lag(self.hub.head() - self.cursor);
        }
        self.last_sent = match &result {
            // The hub read the clock for it; within a delivery's latency of now.
            Ok(WatchFrame::Live { read_at, .. }) => *read_at,
            Ok(_) => Instant::now(),
            Err(_) => {
                self.done = true;
                Instant::now()
            }
        };
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
                            if self.filter.matches_event(event) {
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
            let mut frame = LiveFrame::default();
            let mut bytes = 0;
            let cursor = &mut self.cursor;
            let filter = &self.filter;
            let read = self.live.read_while(
                cx,
                BATCH,
                |next| {
                    bytes += next.encoded().len();
                    bytes <= FRAME_BYTES
                },
                |live| {
                    if live.event.revision > *cursor {
                        *cursor = live.event.revision;
                        if filter.matches_event(&live.event) {
                            frame.push(live);
                        }
                    }
                },
            );
            match read {
                Read::Items => {
                    if let Some(frame) = frame.finish() {
                        return Poll::Ready(Ok(Some(frame)));
                    }
                }
                Read::Lagged => {
                    self.fall_back_to_log()?;
                    return Poll::Ready(Ok(None));
                }
                Read::Closed => return Poll::Ready(Ok(None)),
                Read::Empty => {
                    // `check_expiry` above found the expiry (if any) ahead.
                    let now = Instant::now();
                    if now < self.progress_at
                        && self
                            .timers_armed
                            .as_ref()
                            .is_some_and(|armed| armed.will_wake(cx.waker()))
                    {
                        return Poll::Pending;
                    }
                    if let Some(expiry) = &mut self.expiry
                        && expiry.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(self.expired()));
                    }
                    if self.progress.as_mut().poll(cx).is_pending() {
                        self.timers_armed = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    self.timers_armed = None;
                    let interval = self.hub.settings.progress_interval;
                    let due = self.last_sent + interval;
                    if now < due {
                        // Messages went out since it was set: wait out the rest.
                        self.progress_at = due;
                        self.progress.as_mut().reset(due);
                        continue;
                    }
                    self.progress_at = now + interval;
                    self.progress.as_mut().reset(self.progress_at);
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
