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
//!
//! - `hub`: the log reader, the live ring's publisher, the watcher counts;
//! - `ring`: the live ring every live watcher reads;
//! - `frame`: a watch message, each live event encoded once for every watcher;
//! - `watcher`: one stream: its filter, where it starts, its snapshot, catch-up and live steps.

mod frame;
mod hub;
mod ring;
mod watcher;

pub use self::{
    frame::{LiveEvent, WatchFrame},
    hub::{Hub, LogFollower},
    watcher::{Start, WatchMessages, WatchStream, open},
};

/// Events per live message, at most.
const BATCH: usize = 256;
