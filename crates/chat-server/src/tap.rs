//! Writing for the idle: the publisher sends new events straight to the
//! sockets of connections that wait at the log's head.
//!
//! A connection's writer that has sent everything up to the head, and has
//! nothing queued, *parks* its [`Delivery`](crate::delivery::Delivery).
//! When the committer publishes the next batch, it queues the batch (and,
//! for a client that opted in, the `sync` frame after it) in every parked
//! connection's delivery and writes it to the socket itself, one
//! non-blocking `sendmsg` each, and the connection's task is not woken at
//! all. This is what uWebSockets' `publish` does; at a low rate, a task
//! wake-up per client per event was most of our user-space cost per
//! delivered frame.
//!
//! Only what the socket takes at once is written so. When it takes less,
//! what is left stays queued in the delivery, exactly where the socket
//! stopped (the rest of a frame begun first); the publisher unparks the
//! connection and wakes its writer, which carries on from there under
//! `--write-timeout`. A writer that is busy (replaying, catching up,
//! waiting for its socket, closing) is not parked, and the publisher
//! leaves it alone: it reads the log itself, and parks again only once it
//! is at the head.
//!
//! There is one state and one lock per connection: whoever holds the
//! delivery's lock writes the socket, in the delivery's order, so a frame
//! is never interleaved with another, and a close is never followed by
//! anything.

use crate::delivery::Lane;
use crate::log::Entry;
use crate::wire::{Frame, Link};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Every connection, for the publisher.
#[derive(Debug, Default)]
pub(crate) struct Taps {
    all: Mutex<slab::Slab<Arc<Link>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Taps {
    /// Adds a connection, for the publisher to write to while it is parked.
    pub(crate) fn attach(self: &Arc<Self>, link: &Arc<Link>) -> Attached {
        let key = lock(&self.all).insert(Arc::clone(link));
        Attached {
            taps: Arc::clone(self),
            key,
        }
    }

    /// Writes `entries` (published in order, just now) to every parked
    /// connection's socket, as far as each takes them without waiting.
    /// `sync` makes the `sync` frame announcing the last entry.
    pub(crate) fn deliver(&self, entries: &[Entry], sync: impl FnOnce() -> Frame) {
        if entries.is_empty() {
            return;
        }
        // Copied out, so that joining and leaving never wait for a
        // delivery to a thousand sockets.
        let links: Vec<Arc<Link>> = lock(&self.all).iter().map(|(_, l)| Arc::clone(l)).collect();
        let mut sync = Some(sync);
        let mut sync_frame: Option<Frame> = None;
        let now = Instant::now();
        for link in &links {
            deliver(link, entries, now, &mut || {
                if let Some(make) = sync.take() {
                    sync_frame = Some(make());
                }
                sync_frame.clone()
            });
        }
    }

    /// Wakes every connection's task (the server is stopping).
    pub(crate) fn wake_all(&self) {
        for (_, link) in lock(&self.all).iter() {
            link.wake();
        }
    }
}

/// Queues and writes what a parked connection has not had of `entries`,
/// and its `sync` frame, as far as the socket takes them now; hands the
/// socket back to the writer if it did not take everything.
fn deliver(link: &Link, entries: &[Entry], now: Instant, sync: &mut impl FnMut() -> Option<Frame>) {
    let mut delivery = link.delivery();
    if !delivery.is_parked() {
        return;
    }
    // Parked at the head, the connection has everything before the
    // first entry; it may have had some of these too, if it parked after
    // their publish.
    let cursor = delivery.cursor();
    let first = entries[0].event.position;
    let Some(skip) = cursor.0.checked_sub(first.0 - 1) else {
        // A gap (never expected): let the writer read the log.
        delivery.unpark();
        drop(delivery);
        link.wake();
        return;
    };
    let mut rest = entries.get(skip as usize..).unwrap_or_default();
    if rest.is_empty() {
        return;
    }
    let mut sent = true;
    while sent && !rest.is_empty() {
        while let Some(entry) = rest.first()
            && delivery.fits(entry.frame.len())
        {
            delivery.push(Lane::Event, entry.frame.wire().clone());
            rest = &rest[1..];
        }
        if rest.is_empty()
            && let Some(position) = delivery.sync_due()
            && let Some(frame) = sync()
        {
            delivery.push_sync(position, frame.into_wire());
        }
        // An error is the writer's to meet: it is woken below.
        sent = link.send(&mut delivery, now).unwrap_or(false);
    }
    if !sent || !rest.is_empty() {
        delivery.unpark();
        drop(delivery);
        link.wake();
    }
}

/// A connection, attached to the publisher until dropped.
#[derive(Debug)]
pub(crate) struct Attached {
    taps: Arc<Taps>,
    key: usize,
}

impl Drop for Attached {
    fn drop(&mut self) {
        lock(&self.taps.all).try_remove(self.key);
    }
}
