//! The replica's read cache of change requests, for `GetChangeRequest`.
//!
//! Owned by the handlers' [`Context`](super::Context) and kept current by the event log, the
//! same feed the watch streams follow: the hub's reader hands it, as a
//! [`LogFollower`](crate::watch::LogFollower), every settled event in revision order before
//! publishing the event, and the cache drops the request that event changed. A request is cached only when a read from the database proves
//! to be no older than the log the cache has applied (see [`RequestCache::offer`]).
//!
//! Consistency, as documented in the README ("Reads"):
//! - Read-your-writes on this replica: the store counts the highest revision this process has
//!   written ([`approvals_store::Store::written_head`]); while the cache has not applied the log
//!   up to it, every get reads the database.
//! - A write through another replica reaches this cache once this replica's hub has read it
//!   (the commit notification plus one log read, milliseconds), as it reaches watchers.
//! - A request in APPLYING is never cached: its attempt count and lease change without an
//!   event.
//! - Writes never use the cache: they lock and check the row in the database, so an etag from a
//!   stale read fails with ABORTED instead of overwriting anything.

use std::{
    collections::VecDeque,
    num::NonZeroUsize,
    sync::{Arc, Mutex, MutexGuard},
};

use approvals_domain::{ChangeRequest, State};
use lru::LruCache;

/// Invalidations remembered, so that a read racing with them can tell whether they concern it.
const RECENT: usize = 4096;

pub struct RequestCache {
    inner: Option<Mutex<Inner>>,
}

struct Inner {
    entries: LruCache<String, Arc<ChangeRequest>>,
    /// The last revision of the log applied to `entries`.
    applied: i64,
    /// (revision, change request id) of the last `RECENT` events applied, oldest first.
    recent: VecDeque<(i64, String)>,
}

impl RequestCache {
    /// A cache of up to `capacity` requests whose log is applied from `head` on; 0 caches
    /// nothing (every read goes to the database).
    pub fn new(capacity: usize, head: i64) -> Self {
        Self {
            inner: NonZeroUsize::new(capacity).map(|capacity| {
                Mutex::new(Inner {
                    entries: LruCache::new(capacity),
                    applied: head,
                    recent: VecDeque::with_capacity(RECENT),
                })
            }),
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, Inner>> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that
        // matters more than losing it: treat a poisoned lock as usable.
        self.inner
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The last revision applied: a read from the database that starts after this call sees
    /// every event up to it. Pass it to [`Self::offer`].
    pub fn mark(&self) -> i64 {
        self.lock().map_or(i64::MAX, |inner| inner.applied)
    }

    /// The cached request, when the cache has applied the log up to `written_head` (the
    /// highest revision this process wrote), so that a caller's own writes are never missed.
    pub fn get(&self, id: &str, written_head: i64) -> Option<Arc<ChangeRequest>> {
        let mut inner = self.lock()?;
        if inner.applied < written_head {
            return None;
        }
        inner.entries.get(id).cloned()
    }

    /// Caches `request`, read from the database after [`Self::mark`] returned `mark`, unless an
    /// event applied since then changed it after the revision read.
    pub fn offer(&self, mark: i64, request: &ChangeRequest) {
        if request.state == State::Applying {
            // An apply in progress changes its attempt count and lease without an event (so
            // without telling this cache): such a request is always read from the database.
            return;
        }
        let Some(mut inner) = self.lock() else {
            return;
        };
        if inner.applied > mark {
            let first = inner
                .recent
                .front()
                .map_or(i64::MAX, |(revision, _)| *revision);
            if first > mark + 1 {
                // The invalidations since `mark` are no longer all remembered.
                return;
            }
            let start = inner
                .recent
                .partition_point(|(revision, _)| *revision <= mark);
            let changed = inner
                .recent
                .range(start..)
                .any(|(revision, id)| *id == request.id && *revision > request.revision);
            if changed {
                return;
            }
        }
        let newer = inner
            .entries
            .peek(&request.id)
            .is_some_and(|cached| cached.revision >= request.revision);
        if !newer {
            inner
                .entries
                .put(request.id.clone(), Arc::new(request.clone()));
        }
    }

    /// Applies settled events, in revision order: each drops the request it changed.
    pub fn apply<'a>(&self, events: impl IntoIterator<Item = (i64, &'a str)>) {
        let Some(mut inner) = self.lock() else {
            return;
        };
        for (revision, id) in events {
            if revision <= inner.applied {
                continue;
            }
            inner.entries.pop(id);
            if inner.recent.len() == RECENT {
                inner.recent.pop_front();
            }
            inner.recent.push_back((revision, id.to_owned()));
            inner.applied = revision;
        }
    }
}

impl crate::watch::LogFollower for RequestCache {
    fn apply(&self, events: &mut dyn Iterator<Item = (i64, &str)>) {
        RequestCache::apply(self, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, revision: i64) -> ChangeRequest {
        use approvals_domain::{Actor, ChangeInput, NewChangeRequest, ReviewRules, Timestamp};
        let new = NewChangeRequest {
            project: "web".into(),
            environment: "prod".into(),
            action_key: "feature_flag.update".into(),
            action_version: 1,
            title: "Roll out".into(),
            description: String::new(),
            changes: vec![ChangeInput {
                id: None,
                action: "update".into(),
                resource_type: "feature_flag".into(),
                resource_id: "checkout".into(),
                payload: serde_json::Map::new(),
                base_version: None,
            }],
            intent_display: String::new(),
            expire_time: None,
            draft: false,
            apply_time: None,
            justification: String::new(),
        };
        let actor = Actor::caller("user:alice", vec![]).expect("valid principal");
        let (mut request, _) = ChangeRequest::create(
            id.to_owned(),
            new,
            &actor,
            ReviewRules::with_min_approvals(1),
            Timestamp::from_micros(1_700_000_000_000_000),
            &mut || "change-1".to_owned(),
        )
        .expect("valid request");
        request.revision = revision;
        request
    }

    #[test]
    fn a_read_older_than_an_event_applied_meanwhile_is_not_cached() {
        let cache = RequestCache::new(10, 5);
        let mark = cache.mark();
        // The read saw revision 4 of "a"; meanwhile revision 6 changed "a".
        cache.apply([(6, "a")]);
        cache.offer(mark, &request("a", 4));
        assert!(cache.get("a", 0).is_none());
        // A read after that event is cached.
        let mark = cache.mark();
        cache.offer(mark, &request("a", 6));
        assert_eq!(cache.get("a", 0).map(|r| r.revision), Some(6));
    }

    #[test]
    fn events_for_other_requests_do_not_stop_caching() {
        let cache = RequestCache::new(10, 5);
        let mark = cache.mark();
        cache.apply([(6, "b"), (7, "c")]);
        cache.offer(mark, &request("a", 4));
        assert_eq!(cache.get("a", 7).map(|r| r.revision), Some(4));
        cache.apply([(8, "a")]);
        assert!(cache.get("a", 8).is_none());
    }

    #[test]
    fn the_cache_is_bypassed_until_it_has_applied_this_replicas_writes() {
        let cache = RequestCache::new(10, 5);
        cache.offer(cache.mark(), &request("a", 4));
        assert!(cache.get("a", 6).is_none(), "this process wrote revision 6");
        cache.apply([(6, "b")]);
        assert!(cache.get("a", 6).is_some());
    }

    #[test]
    fn forgotten_invalidations_refuse_the_read() {
        let cache = RequestCache::new(10, 0);
        let mark = cache.mark();
        cache.apply((1..=(RECENT as i64 + 1)).map(|r| (r, "b")));
        cache.offer(mark, &request("a", 0));
        assert!(cache.get("a", 0).is_none());
    }

    #[test]
    fn a_request_being_applied_is_not_cached() {
        let cache = RequestCache::new(10, 0);
        let mut applying = request("a", 3);
        applying.state = State::Applying;
        cache.offer(cache.mark(), &applying);
        assert!(cache.get("a", 0).is_none());
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = RequestCache::new(0, 0);
        cache.offer(cache.mark(), &request("a", 1));
        assert!(cache.get("a", 0).is_none());
    }
}
