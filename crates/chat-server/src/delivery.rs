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
//! (`crate::tap`) are thin loops around it, and share this one state under
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

use crate::close::CloseReason;
use bytes::Bytes;
use chat_proto::Position;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Queue capacity kept once the queue is empty; more is given back, so
/// that a connection that goes quiet holds no buffer.
const QUEUE_KEPT: usize = 8;

/// A ping frame with no payload, as sent.
pub(crate) const PING: Bytes = Bytes::from_static(&[0x89, 0x00]);

/// A connection's bounds and deadlines.
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
}

/// One connection's delivery. See the module's documentation.
#[derive(Debug)]
pub(crate) struct Delivery {
    settings: Settings,
    /// Whether the client opted in to `sync` frames.
    sync: bool,
    /// The position of the last event of the log queued.
    cursor: Position,
    /// The position the last `sync` frame queued announced.
    announced: Option<Position>,
    /// What is left of the frame being written: it goes first.
    current: Bytes,
    /// Pings, tungstenite's frames and replies, after `current`.
    urgent: VecDeque<Bytes>,
    /// The log's frames (and `sync` frames), after `urgent`.
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    frame_bytes: usize,
    /// Bytes in `current` and `urgent`.
    urgent_bytes: usize,
    /// Bytes ever written.
    written: u64,
    /// When the client was last heard from.
    heard: Instant,
    /// When the next ping is due.
    next_ping: Instant,
    /// While the socket holds back what is queued: by when everything
    /// queued at that moment must be written, and the count of bytes
    /// written that means it is.
    stall: Option<(Instant, u64)>,
    /// Whether the publisher writes for the connection.
    parked: bool,
    /// Once closing: by when the close must be written.
    closing: Option<Instant>,
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
    pub(crate) fn new(settings: Settings, now: Instant) -> Self {
        Delivery {
            settings,
            sync: false,
            cursor: Position::ZERO,
            announced: None,
            current: Bytes::new(),
            urgent: VecDeque::new(),
            frames: VecDeque::new(),
            frame_bytes: 0,
            urgent_bytes: 0,
            written: 0,
            heard: now,
            next_ping: now + settings.ping_interval,
            stall: None,
            parked: false,
            closing: None,
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

    /// Room left for the log's frames, in bytes: none while closing. A
    /// frame larger than the room is still let in when nothing is queued.
    pub(crate) fn room(&self) -> usize {
        if self.closing.is_some() {
            0
        } else if self.frames.is_empty() && self.current.is_empty() {
            self.settings.queue_bytes.max(1)
        } else {
            // The frame being written counts until it is written.
            let held = self.frame_bytes + self.current.len();
            self.settings.queue_bytes.saturating_sub(held)
        }
    }

    /// Whether a frame of `len` bytes fits in [`Delivery::room`].
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.closing.is_none()
            && ((self.frames.is_empty() && self.current.is_empty()) || len <= self.room())
    }

    /// Whether the urgent lane takes more: it holds at most one batch of
    /// the connection's outbox at a time, so what waits there stays
    /// within the outbox's own bounds.
    pub(crate) fn takes_urgent(&self) -> bool {
        self.urgent.is_empty()
    }

    /// Queues a frame in `lane`. The log's frames are refused while
    /// closing (after the close frame, nothing may follow it).
    pub(crate) fn push(&mut self, lane: Lane, wire: Bytes) {
        if wire.is_empty() {
            return;
        }
        match lane {
            Lane::Urgent => {
                self.urgent_bytes += wire.len();
                self.urgent.push_back(wire);
            }
            Lane::History | Lane::Event => {
                if self.closing.is_some() {
                    return;
                }
                if lane == Lane::Event {
                    self.cursor = self.cursor.next();
                }
                self.frame_bytes += wire.len();
                self.frames.push_back(wire);
            }
        }
    }

    /// The position a `sync` frame should announce now, if the client
    /// opted in and was not told of the cursor yet.
    pub(crate) fn sync_due(&self) -> Option<Position> {
        (self.sync && self.closing.is_none() && self.announced != Some(self.cursor))
            .then_some(self.cursor)
    }

    /// Queues the `sync` frame announcing `position` (from
    /// [`Delivery::sync_due`]).
    pub(crate) fn push_sync(&mut self, position: Position, wire: Bytes) {
        if self.closing.is_none() {
            self.announced = Some(position);
            self.frame_bytes += wire.len();
            self.frames.push_back(wire);
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.current.is_empty() && self.urgent.is_empty() && self.frames.is_empty()
    }

    /// Bytes queued, in every lane.
    pub(crate) fn queued(&self) -> usize {
        self.urgent_bytes + self.frame_bytes
    }

    /// What to write next, in order: the rest of the frame begun, the
    /// urgent frames, the log's frames.
    pub(crate) fn transmit(&self) -> impl Iterator<Item = &Bytes> {
        let current = (!self.current.is_empty()).then_some(&self.current);
        current
            .into_iter()
            .chain(self.urgent.iter())
            .chain(self.frames.iter())
    }

    /// The socket took `n` bytes of [`Delivery::transmit`] at `now`.
    pub(crate) fn on_written(&mut self, mut n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.written += n as u64;
        if let Some((_, mark)) = self.stall {
            // The socket had been full: that it took bytes again means
            // the client's TCP acknowledged what it read.
            self.heard = self.heard.max(now);
            if self.written >= mark {
                self.stall = None;
            }
        }
        while n > 0 {
            if self.current.is_empty() {
                let next = if let Some(next) = self.urgent.pop_front() {
                    next
                } else if let Some(next) = self.frames.pop_front() {
                    self.frame_bytes -= next.len();
                    self.urgent_bytes += next.len();
                    next
                } else {
                    debug_assert!(false, "more written than queued");
                    return;
                };
                self.current = next;
            }
            let take = n.min(self.current.len());
            self.urgent_bytes -= take;
            n -= take;
            if take == self.current.len() {
                self.current = Bytes::new();
            } else {
                self.current = self.current.slice(take..);
            }
        }
        if self.frames.is_empty() && self.frames.capacity() > QUEUE_KEPT {
            self.frames = VecDeque::new();
        }
        if self.urgent.is_empty() && self.urgent.capacity() > QUEUE_KEPT {
            self.urgent = VecDeque::new();
        }
    }

    /// Whether the queues hold no more capacity than an idle connection
    /// keeps.
    #[cfg(test)]
    pub(crate) fn holds_no_buffer(&self) -> bool {
        self.frames.capacity() <= QUEUE_KEPT && self.urgent.capacity() <= QUEUE_KEPT
    }

    /// The socket took less than was queued at `now`: what is queued now
    /// must be written within the write timeout (unless it already runs
    /// for what was queued before).
    pub(crate) fn on_blocked(&mut self, now: Instant) {
        if self.stall.is_none() && !self.is_empty() {
            let mark = self.written + self.queued() as u64;
            self.stall = Some((now + self.settings.write_timeout, mark));
        }
    }

    /// A frame arrived from the client at `now`.
    pub(crate) fn on_heard(&mut self, now: Instant) {
        self.heard = self.heard.max(now);
    }

    /// When [`Delivery::on_timeout`] should be called next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        if let Some(deadline) = self.closing {
            return deadline;
        }
        let mut next = self.next_ping.min(self.heard + self.settings.idle_timeout);
        if let Some((deadline, _)) = self.stall {
            next = next.min(deadline);
        }
        next
    }

    /// Carries out what is due at `now`: a ping is queued, or the
    /// connection must close, for the reason returned.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Result<(), CloseReason> {
        if let Some(deadline) = self.closing {
            return if now >= deadline {
                Err(CloseReason::Stalled)
            } else {
                Ok(())
            };
        }
        if self.stall.is_some_and(|(deadline, _)| now >= deadline) {
            return Err(CloseReason::Stalled);
        }
        if now >= self.heard + self.settings.idle_timeout {
            return Err(CloseReason::IdleTimeout);
        }
        if now >= self.next_ping {
            self.next_ping = now + self.settings.ping_interval;
            // One ping waiting is enough.
            if !self.urgent.iter().any(|b| b.as_ptr() == PING.as_ptr()) {
                self.push(Lane::Urgent, PING);
            }
        }
        Ok(())
    }

    /// Whether the publisher writes for the connection.
    pub(crate) fn is_parked(&self) -> bool {
        self.parked
    }

    /// Parks the connection if it has everything up to `head` and nothing
    /// queued: the publisher then writes for it. Says whether it did.
    pub(crate) fn park(&mut self, head: Position) -> bool {
        self.parked = self.closing.is_none() && self.is_empty() && self.cursor == head;
        self.parked
    }

    /// The connection's writer takes the socket back.
    pub(crate) fn unpark(&mut self) {
        self.parked = false;
    }

    /// Starts the close at `now`: the log's frames not yet begun are
    /// dropped, nothing from the log is queued again, and what is queued
    /// next (tungstenite's frames, ending with the close frame) must be
    /// written by `deadline`. The frame being written is finished first.
    pub(crate) fn close(&mut self, deadline: Instant) {
        if self.closing.is_some() {
            return;
        }
        self.parked = false;
        self.stall = None;
        self.frames.clear();
        self.frame_bytes = 0;
        self.urgent.retain(|b| b.as_ptr() != PING.as_ptr());
        self.urgent_bytes = self.current.len() + self.urgent.iter().map(Bytes::len).sum::<usize>();
        self.closing = Some(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        ping_interval: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(10),
        queue_bytes: 4096,
    };

    /// A manual clock: milliseconds after a fixed start.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn frame(tag: u8, len: usize) -> Bytes {
        Bytes::from(vec![tag; len])
    }

    /// A socket on the manual clock: it takes at most `room` bytes, and
    /// keeps what it took.
    #[derive(Default)]
    struct Socket {
        got: Vec<u8>,
    }

    impl Socket {
        /// Writes what the socket takes (up to `room`), as the writer does:
        /// true if everything queued went out.
        fn write(&mut self, d: &mut Delivery, room: usize, now: Instant) -> bool {
            let mut left = room;
            let mut n = 0;
            for bytes in d.transmit() {
                let take = bytes.len().min(left);
                self.got.extend_from_slice(&bytes[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            d.on_written(n, now);
            if d.is_empty() {
                true
            } else {
                d.on_blocked(now);
                false
            }
        }
    }

    /// Splits the bytes written into frames by their tags, checking that
    /// no frame was interleaved with another: the frame `(tag, len)`
    /// sequence.
    fn runs(bytes: &[u8]) -> Vec<(u8, usize)> {
        let mut out: Vec<(u8, usize)> = Vec::new();
        for &b in bytes {
            match out.last_mut() {
                Some((tag, len)) if *tag == b => *len += 1,
                _ => out.push((b, 1)),
            }
        }
        out
    }

    #[test]
    fn a_long_replay_to_a_reader_that_answers_pings_is_never_closed_as_idle() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.start(Position::ZERO, false);
        let mut socket = Socket::default();
        let mut pings_sent = 0;
        // A 60 s replay, 10 bytes every 10 ms: the socket is always full,
        // and the client answers each ping 200 ms after it arrived.
        let mut pong_due = None;
        for tick in 0..=6_000u64 {
            let now = clock.at(tick * 10);
            while d.fits(100) && d.queued() < 1000 {
                d.push(Lane::History, frame(1, 100));
            }
            if pong_due.is_some_and(|due| now >= due) {
                d.on_heard(now);
                pong_due = None;
            }
            if now >= d.poll_timeout() {
                d.on_timeout(now).expect("never closed while it reads");
            }
            let before = socket.got.len();
            socket.write(&mut d, 10, now);
            if socket.got[before..].windows(2).any(|w| w == [0x89, 0x00]) {
                pings_sent += 1;
                pong_due = Some(now + Duration::from_millis(200));
            }
        }
        socket.write(&mut d, usize::MAX, clock.at(60_010));
        assert!(pings_sent >= 1, "pinged during the replay");
        // Every history frame whole, the pings between them.
        for (tag, len) in runs(&socket.got) {
            match tag {
                1 => assert_eq!(len % 100, 0, "history frames whole"),
                0x89 | 0x00 => {}
                other => panic!("tag {other}"),
            }
        }
    }

    #[test]
    fn a_quiet_client_is_pinged_before_it_counts_as_idle() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.start(Position::ZERO, false);
        let mut socket = Socket::default();
        assert_eq!(d.poll_timeout(), clock.at(30_000), "the first ping");
        d.on_timeout(clock.at(30_000)).expect("a ping");
        assert!(socket.write(&mut d, usize::MAX, clock.at(30_000)));
        assert_eq!(socket.got, [0x89, 0x00]);
        // No pong: idle 60 s after the handshake, not after the ping.
        assert_eq!(d.poll_timeout(), clock.at(60_000));
        assert_eq!(
            d.on_timeout(clock.at(60_000)),
            Err(CloseReason::IdleTimeout)
        );
        // A pong at 45 s moves it.
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.on_timeout(clock.at(30_000)).expect("a ping");
        d.on_heard(clock.at(45_000));
        assert_eq!(d.poll_timeout(), clock.at(60_000), "the next ping");
        d.on_timeout(clock.at(60_000)).expect("pinged again");
        assert_eq!(d.poll_timeout(), clock.at(90_000));
        assert_eq!(
            d.on_timeout(clock.at(105_000)),
            Err(CloseReason::IdleTimeout)
        );
    }

    #[test]
    fn a_reader_that_stops_is_cut_at_the_write_timeout_exactly() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.start(Position::ZERO, false);
        let mut socket = Socket::default();
        d.push(Lane::Event, frame(1, 3000));
        // The socket takes 1,000 bytes at 5 s, then nothing.
        assert!(!socket.write(&mut d, 1000, clock.at(5_000)));
        assert_eq!(d.poll_timeout(), clock.at(15_000));
        d.on_timeout(clock.at(14_999)).expect("not yet");
        assert_eq!(d.on_timeout(clock.at(15_000)), Err(CloseReason::Stalled));

        // A reader that keeps taking, slower than the log grows, is not
        // stalled: what was queued when its socket refused is written
        // within the timeout, each time (4 KiB at 500 bytes a second).
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        let mut socket = Socket::default();
        for second in 0..120u64 {
            let now = clock.at(second * 1000);
            for _ in 0..2 {
                if d.fits(500) {
                    d.push(Lane::Event, frame(1, 500));
                }
            }
            d.on_heard(now);
            if now >= d.poll_timeout() {
                d.on_timeout(now).expect("never stalled");
            }
            socket.write(&mut d, 500, now);
        }
        // It read a frame a second, as fast as its socket took them.
        assert!(d.cursor().0 >= 115, "{:?}", d.cursor());
    }

    #[test]
    fn a_close_comes_after_whole_frames_and_nothing_follows_it() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.start(Position::ZERO, true);
        let mut socket = Socket::default();
        d.push(Lane::Event, frame(1, 600));
        d.push(Lane::Event, frame(2, 600));
        // The kernel takes half a frame.
        assert!(!socket.write(&mut d, 300, clock.at(0)));
        d.close(clock.at(10_000));
        // The publisher keeps publishing: nothing more is queued.
        d.push(Lane::Event, frame(3, 600));
        assert_eq!(d.sync_due(), None, "no sync after the close");
        assert!(!d.park(d.cursor()), "a closing connection never parks");
        // tungstenite's close frame.
        d.push(Lane::Urgent, frame(8, 4));
        assert!(socket.write(&mut d, usize::MAX, clock.at(1)));
        assert_eq!(runs(&socket.got), [(1, 600), (8, 4)]);
        // The close must be written by its deadline.
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.close(clock.at(10_000));
        d.push(Lane::Urgent, frame(8, 4));
        assert_eq!(d.poll_timeout(), clock.at(10_000));
        assert_eq!(d.on_timeout(clock.at(10_000)), Err(CloseReason::Stalled));
    }

    #[test]
    fn urgent_frames_go_at_the_next_frame_boundary() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        let mut socket = Socket::default();
        d.push(Lane::History, frame(1, 100));
        d.push(Lane::History, frame(2, 100));
        assert!(!socket.write(&mut d, 50, clock.at(0)));
        d.push(Lane::Urgent, frame(9, 2));
        d.push(Lane::Urgent, frame(7, 10));
        assert!(socket.write(&mut d, usize::MAX, clock.at(1)));
        assert_eq!(runs(&socket.got), [(1, 100), (9, 2), (7, 10), (2, 100)]);
    }

    #[test]
    fn bytes_queued_never_exceed_the_bound_whatever_the_frame_sizes() {
        // Frames of every size up to the bound, offered as fast as the
        // delivery lets them in, to a socket taking random amounts.
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        let mut socket = Socket::default();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        let mut offered = Vec::new();
        for step in 0..20_000u64 {
            let len = 1 + random(SETTINGS.queue_bytes);
            if d.fits(len) {
                let tag = (step % 200) as u8 + 1;
                d.push(Lane::Event, frame(tag, len));
                offered.push((tag, len));
            }
            assert!(d.queued() <= SETTINGS.queue_bytes, "step {step}");
            socket.write(&mut d, random(3000), clock.at(step));
            d.on_heard(clock.at(step));
        }
        socket.write(&mut d, usize::MAX, clock.at(20_000));
        // Every frame arrived whole, in order (adjacent frames have
        // different tags).
        assert_eq!(runs(&socket.got), offered);
    }

    #[test]
    fn a_connection_parks_only_at_the_head_with_nothing_queued() {
        let clock = Clock(Instant::now());
        let mut d = Delivery::new(SETTINGS, clock.at(0));
        d.start(Position(5), true);
        assert_eq!(d.sync_due(), Some(Position(5)));
        assert!(!d.park(Position(6)), "behind the head");
        d.push(Lane::Event, frame(1, 10));
        assert_eq!(d.cursor(), Position(6));
        assert!(!d.park(Position(6)), "something queued");
        d.push_sync(Position(6), frame(2, 5));
        assert_eq!(d.sync_due(), None);
        Socket::default().write(&mut d, usize::MAX, clock.at(0));
        assert!(d.park(Position(6)));
        assert!(d.is_parked());
        d.unpark();
        assert!(!d.is_parked());
    }
}
