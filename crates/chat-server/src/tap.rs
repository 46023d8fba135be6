//! Writing for the idle: the publisher sends new events straight to the
//! sockets of connections that wait at the log's head.
//!
//! A connection's writer that has sent everything up to the head, and has
//! nothing queued, *parks* ([`HandOver`], in the connection's [`Link`]).
//! When the committer publishes the next batch, it writes the batch (and,
//! for a client that opted in, the `sync` frame after it) to every parked
//! connection's socket itself, one
//! non-blocking `sendmsg` each, and the connection's task is not woken at
//! all. This is what uWebSockets' `publish` does; at a low rate, a task
//! wake-up per client per event was most of our user-space cost per
//! delivered frame.
//!
//! Only what the socket takes at once is written so. When it takes less,
//! the publisher notes how far it got (the rest of a frame it began, and
//! the position of the last frame it took), unparks it and wakes the
//! connection's writer, which carries on from there under
//! `--write-timeout`, as it would have anyway. A writer that is busy
//! (replaying, catching up, flushing, answering) is not parked, and the
//! publisher leaves it alone: it reads the log itself, and parks again
//! only once it is at the head.
//!
//! So a socket has one writer at a time: the publisher while the
//! connection is parked, its writer otherwise. The hand-over's lock hands
//! it over, and a frame is never interleaved with another.

use crate::log::Entry;
use crate::wire::{self, Frame, Link};
use chat_proto::Position;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio_tungstenite::tungstenite::Bytes;

/// Every connection, for the publisher.
#[derive(Debug, Default)]
pub(crate) struct Taps {
    all: Mutex<slab::Slab<Arc<Link>>>,
}

/// One connection's side of the hand-over, in its [`Link`].
#[derive(Debug, Default)]
pub(crate) struct HandOver {
    state: Mutex<TapState>,
}

#[derive(Debug, Default)]
struct TapState {
    /// Whether the publisher writes for the connection.
    parked: bool,
    /// Whether the connection is attached (it may be parked).
    attached: bool,
    /// Whether the client opted in to `sync` frames.
    sync: bool,
    /// The last position written to the socket (while parked).
    cursor: Position,
    /// The position the last `sync` frame written announced.
    announced: Option<Position>,
    /// The rest of a frame the publisher began and the socket did not
    /// take whole: the writer sends it before anything else.
    rest: Option<Bytes>,
}

/// Where a connection's writer carries on when it takes its socket back.
#[derive(Debug)]
pub(crate) struct Resumed {
    /// The last position written.
    pub cursor: Position,
    /// The position the last `sync` frame written announced.
    pub announced: Option<Position>,
    /// The rest of a frame begun, to send first.
    pub rest: Option<Bytes>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Taps {
    /// Adds a connection; it starts unparked.
    pub(crate) fn attach(self: &Arc<Self>, link: &Arc<Link>, sync: bool) -> Attached {
        {
            let mut state = link.tap.lock();
            state.attached = true;
            state.sync = sync;
        }
        let key = lock(&self.all).insert(Arc::clone(link));
        Attached {
            taps: Arc::clone(self),
            key,
            link: Arc::clone(link),
        }
    }

    /// Writes `entries` (published in order, just now) to every parked
    /// connection's socket, as far as each takes them without waiting.
    /// `sync` makes the `sync` frame announcing the last entry.
    pub(crate) fn deliver(&self, entries: &[Entry], sync: impl FnOnce() -> Frame) {
        let Some(first) = entries.first() else {
            return;
        };
        // Copied out, so that joining and leaving never wait for a
        // delivery to a thousand sockets.
        let links: Vec<Arc<Link>> = lock(&self.all).iter().map(|(_, l)| Arc::clone(l)).collect();
        let mut sync = Some(sync);
        let mut sync_frame: Option<Frame> = None;
        for link in &links {
            link.tap
                .deliver(link, entries, first.event.position, &mut || {
                    if let Some(make) = sync.take() {
                        sync_frame = Some(make());
                    }
                    sync_frame.clone()
                });
        }
    }
}

impl Taps {
    /// Wakes every connection's task (the server is stopping).
    pub(crate) fn wake_all(&self) {
        for (_, link) in lock(&self.all).iter() {
            link.wake();
        }
    }
}

impl HandOver {
    fn lock(&self) -> MutexGuard<'_, TapState> {
        lock(&self.state)
    }

    /// Whether the publisher writes for the connection.
    pub(crate) fn is_parked(&self) -> bool {
        self.lock().parked
    }

    /// Writes what a parked connection has not had of `entries` (the
    /// first at position `first`) and its `sync` frame, as far as the
    /// socket takes them now; hands the socket back to the writer if it did
    /// not take everything.
    fn deliver(
        &self,
        link: &Link,
        entries: &[Entry],
        first: Position,
        sync: &mut impl FnMut() -> Option<Frame>,
    ) {
        let mut state = self.lock();
        if !state.parked || !state.attached {
            return;
        }
        // Parked at the head, the connection has everything before
        // `first`; it may have had some of these too, if it parked after
        // their publish.
        let Some(skip) = state.cursor.0.checked_sub(first.0 - 1) else {
            // A gap (never expected): let the writer read the log.
            state.parked = false;
            drop(state);
            link.wake();
            return;
        };
        let entries = entries.get(skip as usize..).unwrap_or_default();
        let Some(last) = entries.last() else {
            return;
        };
        let sync = if state.sync { sync() } else { None };
        let count = entries.len() + usize::from(sync.is_some());
        let wire = |i: usize| -> &Bytes {
            match entries.get(i) {
                Some(entry) => entry.frame.wire(),
                None => sync
                    .as_ref()
                    .map(Frame::wire)
                    .expect("the index is below count"),
            }
        };
        // Frames taken whole, or begun (then `rest` holds what is left).
        let mut taken = 0;
        let mut rest = None;
        while taken < count {
            let end = (taken + wire::SLICES).min(count);
            // WouldBlock, or an error the writer will meet too.
            let Ok(mut written) = wire::send_now(link.socket(), (taken..end).map(wire)) else {
                break;
            };
            while taken < end && written >= wire(taken).len() {
                written -= wire(taken).len();
                taken += 1;
            }
            if taken < end {
                if written > 0 {
                    rest = Some(wire(taken).slice(written..));
                    taken += 1;
                }
                break;
            }
        }
        let events = taken.min(entries.len());
        if events > 0 {
            state.cursor = entries[events - 1].event.position;
        }
        if taken > entries.len() {
            state.announced = Some(last.event.position);
        }
        if taken < count || rest.is_some() {
            state.rest = rest;
            state.parked = false;
            drop(state);
            link.wake();
        }
    }
}

/// A connection, attached to the publisher until dropped.
#[derive(Debug)]
pub(crate) struct Attached {
    taps: Arc<Taps>,
    key: usize,
    link: Arc<Link>,
}

impl Attached {
    /// Parks the connection at `cursor`, the last position the writer
    /// sent, if that is the log's `head` (read under the hand-over's lock,
    /// so that a publish the writer has not read finds it parked, or the
    /// writer sees its head). The writer must have nothing queued.
    pub(crate) fn park(
        &self,
        cursor: Position,
        announced: Option<Position>,
        head: impl FnOnce() -> Position,
    ) -> bool {
        let mut state = self.link.tap.lock();
        if head() != cursor {
            return false;
        }
        state.parked = true;
        state.cursor = cursor;
        state.announced = announced;
        true
    }

    /// Takes the socket back from the publisher: where to carry on.
    pub(crate) fn unpark(&self) -> Resumed {
        let mut state = self.link.tap.lock();
        state.parked = false;
        Resumed {
            cursor: state.cursor,
            announced: state.announced,
            rest: state.rest.take(),
        }
    }

    /// Takes the socket back for good (the connection is closing): the
    /// rest of a frame the publisher began, which must go out before
    /// anything else.
    pub(crate) fn detach(&self) -> Option<Bytes> {
        let mut state = self.link.tap.lock();
        state.parked = false;
        state.attached = false;
        state.rest.take()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
        lock(&self.taps.all).try_remove(self.key);
    }
}
