//! The live ring: the last events the hub published, read by every live watcher.
//!
//! tokio's broadcast channel did this job, but every receive took the channel's one lock, to
//! read and then to queue the receiver's waker again, so one event delivered to 10,000
//! watchers meant 20,000 turns of one lock, fought over by every worker thread. Here a reader
//! keeps its waker in its own slot, registered without a lock, and reads the ring under a
//! shared lock; the publisher takes the exclusive lock once per batch of events, then wakes
//! every slot.
//!
//! A reader also keeps its position in its slot, so that the publisher sees who is behind
//! without the reader being polled: a watch stream whose client stopped reading is never
//! polled (its HTTP/2 window is full), and lag counted only when it is polled would never be
//! counted at all. A reader that, at a publish, still had more than `max_behind` earlier items
//! to read is marked; the watcher checks the mark when it is polled again.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::Context,
};

use futures::task::AtomicWaker;
use slab::Slab;

/// The ring. Readers see its items by reference, under its read lock (`Reader::read_while`).
pub(crate) struct LiveRing<T> {
    items: RwLock<Items<T>>,
    /// `items`' end, stored after each publish: a reader with nothing new to read sees so here,
    /// without the lock (whose every read took the lock word from the other core's cache).
    end: AtomicU64,
    readers: Mutex<Slab<Arc<Slot>>>,
    closed: AtomicBool,
    capacity: usize,
    /// A reader with more unread items than this at a publish is marked behind.
    max_behind: u64,
}

/// What the ring knows of one reader.
#[derive(Default)]
struct Slot {
    waker: AtomicWaker,
    /// The reader's position: the next item it will read.
    next: AtomicU64,
    /// Set by a publish that found the reader more than `max_behind` items behind.
    behind: AtomicBool,
}

struct Items<T> {
    items: VecDeque<T>,
    /// Position (counted from the first item ever published) of `items[0]`.
    first: u64,
}

impl<T> Items<T> {
    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// Items were appended to the caller's buffer.
    Items,
    /// Nothing new; the reader is woken when there is.
    Empty,
    /// Items the reader had not read yet were overwritten: it has missed some.
    Lagged,
    /// The ring was closed and the reader has read everything.
    Closed,
}

impl<T: Clone> LiveRing<T> {
    /// A ring that keeps the last `capacity` items (at least one), marking readers more than
    /// `max_behind` items behind at a publish.
    pub(crate) fn new(capacity: usize, max_behind: u64) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            items: RwLock::new(Items {
                items: VecDeque::with_capacity(capacity),
                first: 0,
            }),
            end: AtomicU64::new(0),
            readers: Mutex::new(Slab::new()),
            closed: AtomicBool::new(false),
            capacity,
            max_behind,
        })
    }

    /// A reader of every item published from now on.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Reader<T> {
        let next = self.end();
        let slot = Arc::new(Slot {
            next: AtomicU64::new(next),
            ..Slot::default()
        });
        let key = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(slot.clone());
        Reader {
            next,
            ring: self.clone(),
            key,
            slot,
        }
    }

    /// Appends `items`, dropping the oldest beyond the capacity, and wakes every reader,
    /// marking those that were behind.
    pub(crate) fn publish(&self, items: impl IntoIterator<Item = T>) {
        let end_before = {
            let mut ring = self.items.write().unwrap_or_else(PoisonError::into_inner);
            let end_before = ring.end();
            for item in items {
                if ring.items.len() == self.capacity {
                    ring.items.pop_front();
                    ring.first += 1;
                }
                ring.items.push_back(item);
            }
            self.end.store(ring.end(), Ordering::Release);
            end_before
        };
        self.wake_all(Some(end_before));
    }

    /// Readers read what is left, then see [`Read::Closed`].
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all(None);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn end(&self) -> u64 {
        self.items
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .end()
    }

    /// Wakes every reader; with `end_before` (the end before a publish), marks each reader
    /// that had more than `max_behind` of those earlier items still to read.
    fn wake_all(&self, end_before: Option<u64>) {
        let readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, slot) in readers.iter() {
            if let Some(end) = end_before
                && end.saturating_sub(slot.next.load(Ordering::Relaxed)) > self.max_behind
            {
                slot.behind.store(true, Ordering::Relaxed);
            }
            slot.waker.wake();
        }
    }
}

/// A reader's place in the ring. Dropping it ends its wake-ups.
pub(crate) struct Reader<T> {
    ring: Arc<LiveRing<T>>,
    key: usize,
    slot: Arc<Slot>,
    /// Position of the next item to read.
    next: u64,
}

impl<T: Clone> Reader<T> {
    /// Appends up to `max` unread items to `out`. When there are none, the task of `cx` is
    /// woken by the next publish or close.
    #[cfg(test)]
    pub(crate) fn read(&mut self, cx: &mut Context<'_>, max: usize, out: &mut Vec<T>) -> Read {
        self.read_while(cx, max, |_| true, |item| out.push(item.clone()))
    }

    /// Like [`Self::read`], taking items only while `more` says yes to the next one; `more`
    /// sees every item offered, and the first is taken whatever it says. Items are handed to
    /// `take` by reference, under the ring's read lock: nothing is cloned that the caller does
    /// not clone itself (at 100,000 watchers, each clone of one shared item was an atomic
    /// increment and decrement on one cache line that both cores fought over).
    pub(crate) fn read_while(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        mut more: impl FnMut(&T) -> bool,
        mut take: impl FnMut(&T),
    ) -> Read {
        // Nothing new: register, then look again, so that a publish after the look wakes this
        // task. With items to read, no registration is needed (the caller polls again).
        if self.ring.end.load(Ordering::Acquire) <= self.next {
            self.slot.waker.register(cx.waker());
            // A publish stores `end` before it wakes the readers, and `close` stores `closed`
            // before it does: either this second look sees the news, or the wake that follows
            // it finds this waker registered (the waker's own atomic orders the two).
            let closed = self.ring.is_closed();
            if self.ring.end.load(Ordering::SeqCst) <= self.next {
                return if closed { Read::Closed } else { Read::Empty };
            }
        }
        let ring = self
            .ring
            .items
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if self.next < ring.first {
            return Read::Lagged;
        }
        let start = usize::try_from(self.next - ring.first).unwrap_or(usize::MAX);
        let mut taken = 0;
        for item in ring.items.iter().skip(start).take(max) {
            if !more(item) && taken > 0 {
                break;
            }
            take(item);
            taken += 1;
        }
        if taken > 0 {
            self.next += taken as u64;
            self.slot.next.store(self.next, Ordering::Relaxed);
        }
        // `end` was above `next`, so at least one item was there to take.
        Read::Items
    }

    /// Skips everything published so far (after a [`Read::Lagged`], say).
    pub(crate) fn skip_to_end(&mut self) {
        self.next = self.ring.end();
        self.slot.next.store(self.next, Ordering::Relaxed);
        self.slot.behind.store(false, Ordering::Relaxed);
    }

    /// Whether a publish found this reader behind since the last call (and clears the mark).
    pub(crate) fn take_behind(&self) -> bool {
        self.slot.behind.swap(false, Ordering::Relaxed)
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        let mut readers = self
            .ring
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if readers.contains(self.key) {
            readers.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Poll, Waker};

    use super::*;

    fn read(reader: &mut Reader<u32>, max: usize) -> (Read, Vec<u32>) {
        let mut out = Vec::new();
        let read = reader.read(&mut Context::from_waker(Waker::noop()), max, &mut out);
        (read, out)
    }

    #[test]
    fn readers_see_what_was_published_after_they_subscribed_in_order() {
        let ring = LiveRing::new(8, u64::MAX);
        ring.publish([1]);
        let mut reader = ring.subscribe();
        assert_eq!(read(&mut reader, 10), (Read::Empty, vec![]));
        ring.publish([2, 3]);
        ring.publish([4]);
        assert_eq!(read(&mut reader, 2), (Read::Items, vec![2, 3]));
        assert_eq!(read(&mut reader, 10), (Read::Items, vec![4]));
        assert_eq!(read(&mut reader, 10), (Read::Empty, vec![]));
    }

    #[test]
    fn a_reader_left_behind_by_the_capacity_is_told_it_lagged() {
        let ring = LiveRing::new(2, u64::MAX);
        let mut reader = ring.subscribe();
        ring.publish([1, 2, 3]);
        assert_eq!(read(&mut reader, 10), (Read::Lagged, vec![]));
        reader.skip_to_end();
        ring.publish([4]);
        assert_eq!(read(&mut reader, 10), (Read::Items, vec![4]));
    }

    #[test]
    fn close_lets_readers_finish_then_reports_closed() {
        let ring = LiveRing::new(4, u64::MAX);
        let mut reader = ring.subscribe();
        ring.publish([1]);
        ring.close();
        assert_eq!(read(&mut reader, 10), (Read::Items, vec![1]));
        assert_eq!(read(&mut reader, 10), (Read::Closed, vec![]));
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_publish() {
        let ring = LiveRing::new(4, u64::MAX);
        let mut reader = ring.subscribe();
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            std::future::poll_fn(|cx| match reader.read(cx, 10, &mut out) {
                Read::Empty => Poll::Pending,
                _ => Poll::Ready(()),
            })
            .await;
            out
        });
        tokio::task::yield_now().await;
        ring.publish([7]);
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn a_reader_that_does_not_read_between_publishes_is_marked_behind() {
        let ring = LiveRing::new(16, 2);
        let mut idle = ring.subscribe();
        let mut busy = ring.subscribe();
        // A burst larger than the limit marks nobody: nobody could have read it yet.
        ring.publish([1, 2, 3, 4]);
        assert!(!idle.take_behind() && !busy.take_behind());
        read(&mut busy, 10);
        ring.publish([5]);
        assert!(idle.take_behind(), "4 earlier items unread at a publish");
        assert!(!busy.take_behind());
        assert!(!idle.take_behind(), "the mark is taken once");
        // Reading with a budget takes at least one item, then stops when told.
        let mut taken = Vec::new();
        let read = idle.read_while(
            &mut Context::from_waker(Waker::noop()),
            10,
            |next| *next < 3,
            |item| taken.push(*item),
        );
        assert_eq!((read, taken), (Read::Items, vec![1, 2]));
        let mut taken = Vec::new();
        let read = idle.read_while(
            &mut Context::from_waker(Waker::noop()),
            10,
            |_| false,
            |item| taken.push(*item),
        );
        assert_eq!((read, taken), (Read::Items, vec![3]));
        idle.skip_to_end();
        ring.publish([6]);
        assert!(!idle.take_behind());
    }

    #[test]
    fn dropping_a_reader_frees_its_slot() {
        let ring = LiveRing::<u32>::new(4, u64::MAX);
        let reader = ring.subscribe();
        assert_eq!(ring.readers.lock().map(|r| r.len()).unwrap_or(0), 1);
        drop(reader);
        assert_eq!(ring.readers.lock().map(|r| r.len()).unwrap_or(1), 0);
    }
}
