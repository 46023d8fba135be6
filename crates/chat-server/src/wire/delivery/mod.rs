//! One connection's delivery, as a state machine that does no I/O.
//!
//! Everything a connection's writer decides is here, owned in one place:
//! what is queued for the socket and in what order, where the connection
//! is in the log (its cursor, and the position its last `sync` announced),
//! whether it waits at the head for the publisher to write for it, its
//! three deadlines (ping, idle, write) and its close. Like quinn-proto's
//! `Connection`, it is driven by calls, each given the time where time
//! matters, and it answers with what to write ([`Delivery::transmit`]) and
//! when to call back ([`Delivery::poll_timeout`]). It holds no socket, no
//! timer and nothing of tokio's, so its tests below run it on a manual
//! clock. The connection's writer (`crate::connection`) and the publisher
//! (`crate::publish::fanout`) are thin loops around it, and share this one state under
//! the connection's lock: whoever holds the lock writes the socket.
//!
//! The rules it keeps:
//! - **Every frame whole.** Frames are queued whole and written in order.
//!   What the kernel took of a frame is remembered, and a frame begun is
//!   always finished before anything else is written.
//! - **Urgent frames at the next boundary.** Pings, tungstenite's own
//!   frames (pongs, the close frame) and the replies for this client go
//!   after the frame being written and before the log's frames queued
//!   after it, so a client that reads a long replay still gets its pings.
//! - **Bounded in bytes.** The log's frames queued never exceed
//!   [`Settings::queue_bytes`] (one frame is always let in, and the server
//!   refuses to start with a bound smaller than its largest frame). The
//!   urgent frames are bounded where they come from: the connection's
//!   outbox and reply queue, and one ping at a time.
//! - **The close is last.** Once closing, the log's frames not yet begun
//!   are dropped, and nothing but tungstenite's frames (which end with the
//!   close frame; tungstenite writes nothing after it) is queued again.
//! - **Three deadlines.** A ping every `ping_interval`, whatever the
//!   connection is doing. Idle: a client not heard from for
//!   `idle_timeout` is closed; it is heard from when a frame arrives from
//!   it, and when its socket takes bytes after being full (the kernel
//!   frees room only as the client's TCP acknowledges what it read). Write:
//!   what was queued when the socket first refused bytes must be written
//!   within `write_timeout`, or the client is stalled.

use super::close::CloseReason;
use super::frame::Frame;
use bytes::Bytes;
use chat_proto::Position;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Queue capacity kept once the queue is empty; more is given back, so
/// that a connection that goes quiet holds no buffer.
const QUEUE_KEPT: usize = 8;

/// A ping frame with no payload, as sent.
pub(crate) const PING: Bytes = Bytes::from_static(&[0x89, 0x00]);

/// A connection's bounds and deadlines, shared by every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// How often the client is pinged.
    pub ping_interval: Duration,
    /// How long a client may go unheard from.
    pub idle_timeout: Duration,
    /// How long what is queued may wait for a socket that takes nothing.
    pub write_timeout: Duration,
    /// The most bytes of the log's frames queued (`--send-queue-bytes`).
    pub queue_bytes: usize,
    /// The time from which a delivery counts its deadlines, in
    /// milliseconds (no later than any connection's start): eight bytes
    /// for each of a connection's four times, instead of sixteen.
    pub epoch: Instant,
}

impl Settings {
    /// `t`, in milliseconds from the epoch.
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The time `ms` milliseconds from the epoch.
    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

/// A duration in milliseconds.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// "No deadline", among milliseconds from the epoch.
const NEVER: u64 = u64::MAX;

/// One connection's delivery. See the module's documentation.
///
/// Every connection holds one for its life, so it is kept small: one
/// queue, the settings by reference, times in milliseconds.
#[derive(Debug)]
pub(crate) struct Delivery {
    settings: Arc<Settings>,
    /// What to write, in order: the frame begun (if `begun`), then
    /// `urgent` urgent frames, then the log's frames.
    queue: VecDeque<Bytes>,
    /// Whether the first frame is partly written (it is what is left).
    begun: bool,
    /// Whether the client opted in to `sync` frames.
    sync: bool,
    /// Whether the publisher writes for the connection.
    parked: bool,
    /// Whether `announced` holds a position.
    has_announced: bool,
    /// How many urgent frames follow the one begun.
    urgent: u32,
    /// Bytes of the log's frames queued and not begun.
    frame_bytes: usize,
    /// Bytes queued, in every lane.
    queued: usize,
    /// The position of the last event of the log queued.
    cursor: Position,
    /// The position the last `sync` frame queued announced.
    announced: Position,
    /// Bytes ever written.
    written: u64,
    /// When the client was last heard from (ms from the epoch).
    heard: u64,
    /// When the next ping is due.
    next_ping: u64,
    /// While the socket holds back what is queued: by when everything
    /// queued at that moment must be written ([`NEVER`] if it does not),
    /// and the count of bytes written that means it is.
    stall_by: u64,
    stall_mark: u64,
    /// Once closing: by when the close must be written ([`NEVER`] before).
    closing_by: u64,
}

/// Where a frame queued through [`Delivery::push`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// A frame of the history replay: no position of its own.
    History,
    /// The log's event at the position after the cursor.
    Event,
    /// A ping, tungstenite's frames, a reply: at the next frame boundary.
    Urgent,
}

impl Delivery {
    /// A connection's delivery from its handshake, at `now`: pings are due
    /// from `now`, and the client counts as heard from then.
    pub(crate) fn new(settings: Arc<Settings>, now: Instant) -> Self {
        let now = settings.ms(now);
        let next_ping = now.saturating_add(ms(settings.ping_interval));
        Delivery {
            settings,
            queue: VecDeque::new(),
            begun: false,
            sync: false,
            parked: false,
            has_announced: false,
            urgent: 0,
            frame_bytes: 0,
            queued: 0,
            cursor: Position::ZERO,
            announced: Position::ZERO,
            written: 0,
            heard: now,
            next_ping,
            stall_by: NEVER,
            stall_mark: 0,
            closing_by: NEVER,
        }
    }

    /// Starts reading the log after `cursor`; `sync` says whether the
    /// client opted in to `sync` frames.
    pub(crate) fn start(&mut self, cursor: Position, sync: bool) {
        self.cursor = cursor;
        self.sync = sync;
    }

    /// The position of the last event queued.
    pub(crate) fn cursor(&self) -> Position {
        self.cursor
    }

    fn closing(&self) -> bool {
        self.closing_by != NEVER
    }

    /// The bytes of the frame begun, which count against the room until
    /// written.
    fn begun_bytes(&self) -> usize {
        if self.begun {
            self.queue.front().map_or(0, Bytes::len)
        } else {
            0
        }
    }

    /// Whether a frame of `len` bytes may be queued in the log's lanes:
    /// never while closing; always when none of their frames is queued
    /// (so a frame larger than the bound still goes); else within
    /// `--send-queue-bytes`, the frame being written counted until it is.
    pub(crate) fn fits(&self, len: usize) -> bool {
        if self.closing() {
            return false;
        }
        let held = self.frame_bytes + self.begun_bytes();
        held == 0 || held + len <= self.settings.queue_bytes
    }

    /// Whether the urgent lane takes more: it holds at most one batch of
    /// the connection's outbox at a time, so what waits there stays
    /// within the outbox's own bounds.
    pub(crate) fn takes_urgent(&self) -> bool {
        self.urgent == 0
    }

    /// Queues a frame in `lane`. The log's frames are refused while
    /// closing (after the close frame, nothing may follow it).
    pub(crate) fn push(&mut self, lane: Lane, wire: Bytes) {
        if wire.is_empty() {
            return;
        }
        match lane {
            Lane::Urgent => {
                let at = usize::from(self.begun) + self.urgent as usize;
                self.queued += wire.len();
                self.queue.insert(at, wire);
                self.urgent += 1;
            }
            Lane::History | Lane::Event => {
                if self.closing() {
                    return;
                }
                if lane == Lane::Event {
                    self.cursor = self.cursor.next();
                }
                self.push_frame(wire);
            }
        }
    }

    fn push_frame(&mut self, wire: Bytes) {
        self.frame_bytes += wire.len();
        self.queued += wire.len();
        self.queue.push_back(wire);
    }

    /// Queues the log's frame at the position after the cursor, if it is
    /// for this client; one that is not (moderation's, for a client that
    /// did not opt in; an erased one) only moves the cursor on.
    pub(crate) fn push_event(&mut self, frame: &Frame) {
        if frame.is_for(self.sync) {
            self.push(Lane::Event, frame.wire().clone());
        } else if !self.closing() {
            self.cursor = self.cursor.next();
        }
    }

    /// The position a `sync` frame should announce now, if the client
    /// opted in and was not told of the cursor yet.
    pub(crate) fn sync_due(&self) -> Option<Position> {
        let told = self.has_announced && self.announced == self.cursor;
        (self.sync && !self.closing() && !told).then_some(self.cursor)
    }

    /// Queues the `sync` frame announcing `position` (from
    /// [`Delivery::sync_due`]).
    pub(crate) fn push_sync(&mut self, position: Position, wire: Bytes) {
        if !self.closing() {
            self.announced = position;
            self.has_announced = true;
            self.push_frame(wire);
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes queued, in every lane.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// What to write next, in order: the rest of the frame begun, the
    /// urgent frames, the log's frames.
    pub(crate) fn transmit(&self) -> impl Iterator<Item = &Bytes> {
        self.queue.iter()
    }

    /// The socket took `n` bytes of [`Delivery::transmit`] at `now`.
    pub(crate) fn on_written(&mut self, mut n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.written += n as u64;
        self.queued -= n.min(self.queued);
        if self.stall_by != NEVER {
            // The socket had been full: that it took bytes again means
            // the client's TCP acknowledged what it read.
            self.heard = self.heard.max(self.settings.ms(now));
            if self.written >= self.stall_mark {
                self.stall_by = NEVER;
            }
        }
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                debug_assert!(false, "more written than queued");
                return;
            };
            if !self.begun {
                // The front starts being written: it leaves its lane.
                if self.urgent > 0 {
                    self.urgent -= 1;
                } else {
                    self.frame_bytes -= front.len();
                }
                self.begun = true;
            }
            if n >= front.len() {
                n -= front.len();
                self.queue.pop_front();
                self.begun = false;
            } else {
                *front = front.slice(n..);
                n = 0;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > QUEUE_KEPT {
            self.queue = VecDeque::new();
        }
    }

    /// Whether the queue holds no more capacity than an idle connection
    /// keeps.
    #[cfg(test)]
    pub(crate) fn holds_no_buffer(&self) -> bool {
        self.queue.capacity() <= QUEUE_KEPT
    }

    /// The socket took less than was queued at `now`: what is queued now
    /// must be written within the write timeout (unless it already runs
    /// for what was queued before).
    pub(crate) fn on_blocked(&mut self, now: Instant) {
        if self.stall_by == NEVER && !self.is_empty() {
            self.stall_mark = self.written + self.queued as u64;
            self.stall_by = self
                .settings
                .ms(now)
                .saturating_add(ms(self.settings.write_timeout));
        }
    }

    /// A frame arrived from the client at `now`.
    pub(crate) fn on_heard(&mut self, now: Instant) {
        self.heard = self.heard.max(self.settings.ms(now));
    }

    /// When the client counts as idle.
    fn idle_by(&self) -> u64 {
        self.heard.saturating_add(ms(self.settings.idle_timeout))
    }

    /// When [`Delivery::on_timeout`] should be called next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let next = if self.closing() {
            self.closing_by
        } else {
            self.next_ping.min(self.idle_by()).min(self.stall_by)
        };
        self.settings.at(next)
    }

    /// Carries out what is due at `now`: a ping is queued, or the
    /// connection must close, for the reason returned.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Result<(), CloseReason> {
        let now = self.settings.ms(now);
        if self.closing() {
            return if now >= self.closing_by {
                Err(CloseReason::Stalled)
            } else {
                Ok(())
            };
        }
        if now >= self.stall_by {
            return Err(CloseReason::Stalled);
        }
        if now >= self.idle_by() {
            return Err(CloseReason::IdleTimeout);
        }
        if now >= self.next_ping {
            self.next_ping = now.saturating_add(ms(self.settings.ping_interval));
            // One ping waiting is enough.
            if !self.urgent_frames().any(|b| b.as_ptr() == PING.as_ptr()) {
                self.push(Lane::Urgent, PING);
            }
        }
        Ok(())
    }

    /// The urgent frames not begun.
    fn urgent_frames(&self) -> impl Iterator<Item = &Bytes> {
        self.queue
            .iter()
            .skip(usize::from(self.begun))
            .take(self.urgent as usize)
    }

    /// Whether the publisher writes for the connection.
    pub(crate) fn is_parked(&self) -> bool {
        self.parked
    }

    /// Parks the connection if it has everything up to `head` and nothing
    /// queued: the publisher then writes for it. Says whether it did.
    pub(crate) fn park(&mut self, head: Position) -> bool {
        self.parked = !self.closing() && self.is_empty() && self.cursor == head;
        self.parked
    }

    /// The connection's writer takes the socket back.
    pub(crate) fn unpark(&mut self) {
        self.parked = false;
    }

    /// Starts the close: the log's frames not yet begun (and any ping)
    /// are dropped, nothing from the log is queued again, and what is
    /// queued next (tungstenite's frames, ending with the close frame) must
    /// be written by `deadline`. The frame being written is finished first.
    pub(crate) fn close(&mut self, deadline: Instant) {
        if self.closing() {
            return;
        }
        self.parked = false;
        self.stall_by = NEVER;
        let keep = usize::from(self.begun) + self.urgent as usize;
        self.queue.truncate(keep);
        let begun = usize::from(self.begun);
        let mut i = begun;
        while i < self.queue.len() {
            if self.queue[i].as_ptr() == PING.as_ptr() {
                self.queue.remove(i);
                self.urgent -= 1;
            } else {
                i += 1;
            }
        }
        self.frame_bytes = 0;
        self.queued = self.queue.iter().map(Bytes::len).sum();
        self.closing_by = self.settings.ms(deadline);
    }
}

#[cfg(test)]
mod tests;
