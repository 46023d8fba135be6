//! The published log: what every connection reads from.
//!
//! Each event the chat applies has a [`Position`]. Once its commit is done,
//! the committer publishes it here, and it becomes visible in three views
//! of the same log, updated together under one lock:
//!
//! - the **history**: every message held, as serialized `message` frames,
//!   by sequence number. A joining client reads it from the first held
//!   message to the last one held when it joined, a batch at a time, as
//!   it stands when read: it holds no copy, and what is evicted meanwhile
//!   is freed (and skipped). A message whose reactions changed after the
//!   join is read as it is now; the `reaction_updated` events after the
//!   client's cursor carry the same state or a newer one, so the client
//!   ends with exactly the chat everyone has;
//! - the **recent events**: the last `--log-events` frames (at most
//!   `--log-bytes`), by position. A live connection reads from them at its
//!   own pace, and a reconnecting client resumes from them (`?since=`);
//! - the **head**: the latest published position.
//!
//! A connection that waits at the head is not woken by a publish: the
//! publisher writes the new frames to its socket itself ([`crate::tap`]).
//!
//! A connection is only ever behind, never lost: a writer that fell behind
//! because the server was busy catches up from the recent events. Only one
//! further behind than they reach is closed (1013), and resuming it is a
//! reset. The frames are framed once and shared (`wire::Frame` is reference
//! counted), so
//! memory is one copy of the log, whatever the number of clients.
//!
//! Only published events are in the log, so no client sees anything that a
//! crash could take back.

use crate::metrics::Metrics;
use crate::tap::{Attached, Taps};
use crate::wire::{Frame, Link};
use chat_core::{Chat, Event, EventKind};
use chat_proto::{Epoch, FixedState, Position, ResetReason, ServerFrame, Uuid};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

/// An applied event with the frame clients receive for it, serialized
/// once (on the committer's thread, not under the hub's lock, nor the
/// log's) for the writer and for every reader.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The event, with its position.
    pub(crate) event: Event,
    /// Its frame, as sent.
    pub(crate) frame: Frame,
    /// For a `reaction_updated`, the message's new `message` frame, for
    /// the history: made here, so that publishing only swaps it in.
    pub(crate) replay: Option<Frame>,
}

impl From<Event> for Entry {
    fn from(event: Event) -> Self {
        let frame = Frame::text(event.frame().encode());
        let replay = match &event.kind {
            EventKind::ReactionUpdated(update) => {
                Some(encode(&ServerFrame::Message(update.message.clone())))
            }
            EventKind::MessagePosted { .. } => None,
        };
        Entry {
            event,
            frame,
            replay,
        }
    }
}

/// The bounds of the recent events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    /// The most events kept (at least 1).
    pub events: usize,
    /// The most bytes of frames kept. The newest event is always kept.
    pub bytes: usize,
}

/// The published log. Shared by the committer (which publishes) and every
/// connection (which reads).
#[derive(Debug)]
pub(crate) struct Log {
    epoch: Epoch,
    state: RwLock<State>,
    head: watch::Sender<Position>,
    /// The last `sync` frame made, shared by every writer that announces
    /// the same position (most of them, as they keep up with the head).
    sync: std::sync::Mutex<Option<(Position, Frame)>>,
    /// The connections, which the publisher writes to while they wait at
    /// the head ([`crate::tap`]).
    taps: Arc<Taps>,
}

#[derive(Debug)]
struct State {
    history: History,
    recent: Recent,
    head: Position,
    metrics: Arc<Metrics>,
}

/// Where a client asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Since {
    /// From the full history (no `since`).
    Start,
    /// After `position`, if it is still in `epoch`'s log.
    Resume {
        /// The log the position belongs to.
        epoch: Epoch,
        /// The last event the client has.
        position: Position,
    },
}

/// What a new connection starts from.
#[derive(Debug)]
pub(crate) struct Joined {
    /// Why a resume became a full replay, if it did.
    pub reset: Option<ResetReason>,
    /// The history to send first, by sequence number (empty when
    /// resuming), read with [`Log::replay`].
    pub history: std::ops::Range<u64>,
    /// The position the client is at once `history` is sent; what follows
    /// is read from the log with [`Log::read`].
    pub cursor: Position,
}

/// A reader asked for events the log no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Behind {
    /// How many events it would have to skip.
    pub missed: u64,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Nothing under this lock panics; if something ever did, each event is
    // applied to the state whole or not at all.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    /// The log of `chat` (as restored) in `epoch`, with the recent events
    /// an earlier run kept (`recent`, oldest first, ending at the chat's
    /// head, each with the id of the message it carries; the oldest are
    /// dropped to fit `retention`, and no resume is served from before the
    /// last one that carries a message the chat no longer holds).
    pub(crate) fn new(
        chat: &Chat,
        epoch: Epoch,
        recent: impl IntoIterator<Item = (Position, Uuid, Frame)>,
        retention: Retention,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut history = History::default();
        for message in chat.history().iter() {
            history.push(
                message.id,
                encode(&ServerFrame::Message(message.clone())),
                Position::ZERO,
            );
        }
        let head = chat.head();
        let mut kept = Recent::new(retention, head);
        let mut unheld = None;
        for (position, message, frame) in recent {
            if !history.touch(&message, position) {
                unheld = Some(position);
            }
            kept.restore(position, frame);
        }
        kept.end_restore(head);
        if let Some(through) = unheld {
            kept.resume_no_earlier_than(through);
        }
        metrics.history_messages.set(history.len() as i64);
        let (head_tx, _) = watch::channel(head);
        Log {
            epoch,
            state: RwLock::new(State {
                history,
                recent: kept,
                head,
                metrics,
            }),
            head: head_tx,
            sync: std::sync::Mutex::new(None),
            taps: Arc::default(),
        }
    }

    /// The log's epoch.
    pub(crate) fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The `sync` frame announcing `position` in this log's epoch, encoded
    /// and framed once for every connection at that position.
    pub(crate) fn sync_frame(&self, position: Position) -> Frame {
        let mut last = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, frame)) = last.as_ref()
            && *at == position
        {
            return frame.clone();
        }
        let frame = Frame::text(
            ServerFrame::Sync(chat_proto::Sync {
                epoch: self.epoch,
                position,
            })
            .encode(),
        );
        *last = Some((position, frame.clone()));
        frame
    }

    /// Where a connection starts, decided under the lock so that nothing is
    /// published between the history it gets and the cursor it reads on
    /// from: no gap, no duplicate.
    pub(crate) fn join(&self, since: Since) -> Joined {
        let state = read(&self.state);
        let resume = match since {
            Since::Start => Err(None),
            Since::Resume { epoch, .. } if epoch != self.epoch => {
                Err(Some(ResetReason::EpochChanged))
            }
            Since::Resume { position, .. } if position > state.head => {
                Err(Some(ResetReason::Ahead))
            }
            Since::Resume { position, .. } if !state.recent.reaches(position) => {
                Err(Some(ResetReason::Expired))
            }
            Since::Resume { position, .. } => Ok(position),
        };
        match resume {
            Ok(position) => Joined {
                reset: None,
                history: 0..0,
                cursor: position,
            },
            Err(reset) => Joined {
                reset,
                history: state.history.seqs(),
                cursor: state.head,
            },
        }
    }

    /// Attaches a connection's socket, for the publisher to write to
    /// while the connection waits at the head.
    pub(crate) fn attach(&self, link: &Arc<Link>) -> Attached {
        self.taps.attach(link)
    }

    /// Wakes every attached connection's task: the server is stopping,
    /// and a connection waiting at the head notices only when woken.
    pub(crate) fn wake_all(&self) {
        self.taps.wake_all();
    }

    /// The latest published position.
    pub(crate) fn head(&self) -> Position {
        read(&self.state).head
    }

    /// Waits, at most `bound`, until the log has published `position`.
    /// In a cluster, a client may resume on a node that has not yet
    /// applied what it saw on another; its position is not "ahead" then,
    /// only early.
    pub(crate) async fn wait_for(&self, position: Position, bound: std::time::Duration) {
        let mut head = self.head.subscribe();
        let reached = head.wait_for(|head| *head >= position);
        let _ = tokio::time::timeout(bound, reached).await;
    }

    /// Offers `take` the history's frames from sequence number `*next`
    /// up to `end`, in order, as they are now, skipping what was evicted,
    /// until it refuses one (it has no room): whether it took them all.
    /// `*next` is left at the first not taken.
    pub(crate) fn replay(
        &self,
        next: &mut u64,
        end: u64,
        take: impl FnMut(&Frame) -> bool,
    ) -> bool {
        read(&self.state).history.replay(next, end, take)
    }

    /// Offers `take` the frames after `cursor`, in order, until it
    /// refuses one (it has no room) or none is left: whether it took
    /// everything up to the head.
    pub(crate) fn read(
        &self,
        cursor: Position,
        take: impl FnMut(&Frame) -> bool,
    ) -> Result<bool, Behind> {
        read(&self.state).recent.read(cursor, take)
    }

    /// Publishes committed entries, in order: writes them to the
    /// connections waiting at the head, and wakes those waiting for it.
    pub(crate) fn publish(&self, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        {
            let mut state = write(&self.state);
            for entry in entries {
                state.publish(entry);
            }
            state
                .metrics
                .history_messages
                .set(state.history.len() as i64);
        }
        let head = last.event.position;
        self.head.send_replace(head);
        self.taps.deliver(entries, || self.sync_frame(head));
    }
}

impl State {
    fn publish(&mut self, entry: &Entry) {
        let position = entry.event.position;
        match &entry.event.kind {
            EventKind::MessagePosted { message, evicted } => {
                if evicted.is_some()
                    && let Some(through) = self.history.pop_front()
                {
                    // What the history no longer holds is never served
                    // again to a client that may still show it.
                    self.recent.resume_no_earlier_than(through);
                }
                self.history.push(message.id, entry.frame.clone(), position);
                self.metrics.messages_accepted.inc();
            }
            EventKind::ReactionUpdated(update) => {
                if let Some(replay) = &entry.replay {
                    self.history
                        .set(&update.message_id, replay.clone(), position);
                }
                self.metrics.reactions_accepted.inc();
            }
        }
        self.recent.push(position, entry.frame.clone());
        self.head = position;
    }
}

fn encode(frame: &ServerFrame) -> Frame {
    Frame::text(frame.encode())
}

/// The last events, by position, within their [`Retention`].
#[derive(Debug)]
struct Recent {
    frames: VecDeque<Frame>,
    /// The position just before `frames[0]`: a live reader at it or after
    /// it can be served.
    base: Position,
    /// A resume from before this position would return a message the
    /// history no longer holds, which the resuming client may still show:
    /// it is a reset instead.
    floor: Position,
    bytes: usize,
    retention: Retention,
}

impl Recent {
    fn new(retention: Retention, head: Position) -> Self {
        Recent {
            frames: VecDeque::new(),
            base: head,
            floor: Position::ZERO,
            bytes: 0,
            retention,
        }
    }

    /// Whether a client resuming at `position` can be served (`position`
    /// ≤ head is checked by the caller).
    fn reaches(&self, position: Position) -> bool {
        position >= self.base && position >= self.floor
    }

    /// Takes back one event kept by an earlier run. They come oldest
    /// first and end at the head the log was created with.
    fn restore(&mut self, position: Position, frame: Frame) {
        let head = Position(self.base.0 + self.frames.len() as u64);
        // The base was set to the head; rebuild it as the stored run
        // began. A gap (which a store never writes) empties the window.
        if self.frames.is_empty() {
            self.base = Position(position.0.saturating_sub(1));
        } else if position != head.next() {
            self.frames.clear();
            self.bytes = 0;
            self.base = Position(position.0.saturating_sub(1));
        }
        self.push(position, frame);
    }

    /// Checks the restored events end at `head`; if they do not (a store
    /// never writes that), none of them is served.
    fn end_restore(&mut self, head: Position) {
        if self.base.0 + self.frames.len() as u64 != head.0 {
            self.frames.clear();
            self.bytes = 0;
            self.base = head;
        }
    }

    /// No resume from before `position` is served again: the events up
    /// to it carried a message the history no longer holds. (A live reader
    /// behind still reads them, in order, as it would have live: it has
    /// not shown them yet. They go when the retention drops them.)
    fn resume_no_earlier_than(&mut self, position: Position) {
        self.floor = self.floor.max(position);
    }

    fn push(&mut self, position: Position, frame: Frame) {
        debug_assert_eq!(position.0, self.base.0 + self.frames.len() as u64 + 1);
        self.bytes += frame.len();
        self.frames.push_back(frame);
        while self.frames.len() > 1
            && (self.frames.len() > self.retention.events || self.bytes > self.retention.bytes)
        {
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= old.len();
                self.base = self.base.next();
            }
        }
    }

    fn read(&self, cursor: Position, take: impl FnMut(&Frame) -> bool) -> Result<bool, Behind> {
        if cursor < self.base {
            return Err(Behind {
                missed: self.base.0 - cursor.0,
            });
        }
        let skip = usize::try_from(cursor.0 - self.base.0).unwrap_or(usize::MAX);
        if skip >= self.frames.len() {
            return Ok(true);
        }
        Ok(self.frames.range(skip..).all(take))
    }
}

/// The messages held, as frames, by sequence number, with an index by
/// message id.
#[derive(Debug, Default)]
struct History {
    held: VecDeque<Held>,
    /// Message id → sequence number; `first_seq` is the oldest held's.
    index: HashMap<Uuid, u64, FixedState>,
    first_seq: u64,
}

/// One message of the history.
#[derive(Debug)]
struct Held {
    id: Uuid,
    /// Its `message` frame, as replayed.
    frame: Frame,
    /// The position of the last event that carried it: once it is
    /// evicted, no resume is served from before that position.
    touched: Position,
}

impl History {
    fn len(&self) -> usize {
        self.held.len()
    }

    /// The sequence numbers held now.
    fn seqs(&self) -> std::ops::Range<u64> {
        self.first_seq..self.first_seq + self.held.len() as u64
    }

    /// Adds a message, posted at `position`.
    fn push(&mut self, id: Uuid, frame: Frame, position: Position) {
        self.index
            .insert(id, self.first_seq + self.held.len() as u64);
        self.held.push_back(Held {
            id,
            frame,
            touched: position,
        });
    }

    fn get_mut(&mut self, id: &Uuid) -> Option<&mut Held> {
        let seq = self.index.get(id)?;
        self.held.get_mut((seq - self.first_seq) as usize)
    }

    /// Notes that the event at `position` carried message `id`: whether
    /// the message is held.
    fn touch(&mut self, id: &Uuid, position: Position) -> bool {
        self.get_mut(id)
            .map(|held| held.touched = position)
            .is_some()
    }

    /// Replaces a message's frame, after the event at `position` changed it.
    fn set(&mut self, id: &Uuid, frame: Frame, position: Position) {
        if let Some(held) = self.get_mut(id) {
            held.frame = frame;
            held.touched = position;
        }
    }

    /// Evicts the oldest message: the position of the last event that
    /// carried it.
    fn pop_front(&mut self) -> Option<Position> {
        let held = self.held.pop_front()?;
        self.index.remove(&held.id);
        self.first_seq += 1;
        Some(held.touched)
    }

    /// See [`Log::replay`].
    fn replay(&self, next: &mut u64, end: u64, mut take: impl FnMut(&Frame) -> bool) -> bool {
        *next = (*next).max(self.first_seq);
        while *next < end {
            let Some(held) = self.held.get((*next - self.first_seq) as usize) else {
                break;
            };
            if !take(&held.frame) {
                return false;
            }
            *next += 1;
        }
        *next = end;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts of the history's frames from `*next` up to `end`, read
    /// at most `step` at a time.
    fn replay_texts(history: &History, next: &mut u64, end: u64, step: usize) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut took = 0;
            let done = history.replay(next, end, |f| {
                if took == step {
                    return false;
                }
                took += 1;
                out.push(f.as_str().to_owned());
                true
            });
            if done {
                return out;
            }
        }
    }

    #[test]
    fn history_tracks_push_set_and_evict() {
        let mut log = History::default();
        // Id, text, and the position of the last event that carried it.
        let mut model: VecDeque<(Uuid, String, Position)> = VecDeque::new();
        let texts = |m: &VecDeque<(Uuid, String, Position)>| {
            m.iter().map(|(_, t, _)| t.clone()).collect::<Vec<_>>()
        };
        let mut position = Position::ZERO;
        for i in 0..1000 {
            let id = Uuid::from_u128(i as u128);
            position = position.next();
            log.push(id, Frame::text(i.to_string()), position);
            model.push_back((id, i.to_string(), position));
            if i % 5 == 0 {
                let evicted = log.pop_front();
                let expected = model.pop_front().map(|(_, _, touched)| touched);
                assert_eq!(evicted, expected, "the evicted message's last event");
            }
            if i % 7 == 0 && !model.is_empty() {
                let at = i % model.len();
                let id = model[at].0;
                position = position.next();
                log.set(&id, Frame::text(format!("r{i}")), position);
                model[at].1 = format!("r{i}");
                model[at].2 = position;
            }
            // An id that is not (or no longer) held changes nothing.
            log.set(
                &Uuid::from_u128(u128::MAX),
                Frame::text("x"),
                position.next(),
            );
            if i % 97 == 0 {
                let seqs = log.seqs();
                let mut next = seqs.start;
                assert_eq!(replay_texts(&log, &mut next, seqs.end, 7), texts(&model));
            }
        }
    }

    #[test]
    fn a_replay_reads_the_history_as_it_is_and_skips_what_was_evicted_meanwhile() {
        let mut log = History::default();
        for i in 0..10u64 {
            log.push(
                Uuid::from_u128(i.into()),
                Frame::text(format!("m{i}")),
                Position(i + 1),
            );
        }
        let joined = log.seqs();
        let mut next = joined.start;
        // Three taken, then the replay waits for room.
        assert_eq!(
            replay_texts(&log, &mut next, joined.start + 3, 3),
            ["m0", "m1", "m2"]
        );
        // Meanwhile: five evicted, one changed, one posted.
        for _ in 0..5 {
            log.pop_front();
        }
        log.set(
            &Uuid::from_u128(7),
            Frame::text("m7 with a reaction"),
            Position(11),
        );
        log.push(Uuid::from_u128(10), Frame::text("m10"), Position(12));
        // The rest of what it joined with, as it is now; the newer post
        // comes from the log, after the cursor.
        assert_eq!(
            replay_texts(&log, &mut next, joined.end, 2),
            ["m5", "m6", "m7 with a reaction", "m8", "m9"]
        );
        assert_eq!(next, joined.end);
    }

    /// What a joining client is sent of the history, read as the writer
    /// reads it.
    fn replayed(log: &Log, joined: &Joined) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut next = joined.history.start;
        loop {
            // Five at a time, as a writer with room for five.
            let mut room = 5;
            let done = log.replay(&mut next, joined.history.end, |f| {
                if room == 0 {
                    return false;
                }
                room -= 1;
                frames.push(f.clone());
                true
            });
            if done {
                return frames;
            }
        }
    }

    fn frame(p: u64) -> Frame {
        Frame::text(format!("e{p:03}"))
    }

    /// Offers at most `step` frames per read, as a writer with room for
    /// that many does: the frames after `cursor`, read to the head.
    fn read_in_steps(
        read: impl Fn(Position, &mut dyn FnMut(&Frame) -> bool) -> Result<bool, Behind>,
        cursor: Position,
        step: usize,
    ) -> Result<Vec<Frame>, Behind> {
        let mut out = Vec::new();
        let mut at = cursor;
        loop {
            let mut took = 0;
            let done = read(at, &mut |f: &Frame| {
                if took == step {
                    return false;
                }
                out.push(f.clone());
                took += 1;
                true
            })?;
            at = Position(at.0 + took as u64);
            if done {
                return Ok(out);
            }
        }
    }

    fn read_all(recent: &Recent, cursor: u64) -> Result<Vec<String>, Behind> {
        let frames = read_in_steps(|at, take| recent.read(at, take), Position(cursor), 3)?;
        Ok(frames.iter().map(|f| f.as_str().to_owned()).collect())
    }

    #[test]
    fn recent_events_serve_every_reader_they_reach_and_no_other() {
        let retention = Retention {
            events: 5,
            bytes: usize::MAX,
        };
        let mut recent = Recent::new(retention, Position(10));
        for p in 11..=20 {
            recent.push(Position(p), frame(p));
        }
        // Positions 16..=20 are kept: a reader at 15 gets all five.
        assert!(!recent.reaches(Position(14)));
        assert!(recent.reaches(Position(15)));
        for cursor in 15..=20 {
            let expected: Vec<String> = (cursor + 1..=20)
                .map(|p| frame(p).as_str().to_owned())
                .collect();
            assert_eq!(read_all(&recent, cursor), Ok(expected), "from {cursor}");
        }
        assert_eq!(
            read_all(&recent, 12),
            Err(Behind { missed: 3 }),
            "12 → 15 is gone"
        );
    }

    #[test]
    fn recent_events_keep_within_their_bytes_but_always_the_newest() {
        let retention = Retention {
            events: 100,
            bytes: 14,
        };
        let mut recent = Recent::new(retention, Position(0));
        for p in 1..=4 {
            // 6 bytes each on the wire: a 2-byte header, 4 of text.
            recent.push(Position(p), frame(p));
        }
        assert_eq!(recent.frames.len(), 2, "12 bytes fit, 18 do not");
        assert_eq!(recent.base, Position(2));
        recent.push(Position(5), Frame::text("a frame larger than the bound"));
        assert_eq!(recent.frames.len(), 1, "the newest stays");
        assert_eq!(read_all(&recent, 4).map(|v| v.len()), Ok(1));
    }

    #[test]
    fn restored_events_rebuild_the_window_as_stored() {
        let retention = Retention {
            events: 3,
            bytes: usize::MAX,
        };
        let mut recent = Recent::new(retention, Position(9));
        for p in 5..=9 {
            recent.restore(Position(p), frame(p));
        }
        assert_eq!(recent.base, Position(6), "the oldest two did not fit");
        assert_eq!(
            read_all(&recent, 6),
            Ok(vec!["e007".into(), "e008".into(), "e009".into()])
        );
        recent.push(Position(10), frame(10));
        assert_eq!(read_all(&recent, 9), Ok(vec!["e010".into()]));
    }

    // ---- the log as a whole: joins and resumes, no sockets ----------------

    use chat_core::{Config, Context, Timestamp};
    use chat_proto::{AddReaction, ClientFrame, SendMessage};

    const EPOCH: Epoch = Epoch(Uuid::from_u128(7));

    /// A chat driven through `n` commands (posts, and reactions to older
    /// messages), with the entries it produced; its history holds 8
    /// messages.
    fn drive(n: u64) -> (Chat, Vec<Entry>) {
        drive_holding(n, 8)
    }

    /// [`drive`], with a history of `limit` messages.
    fn drive_holding(n: u64, limit: usize) -> (Chat, Vec<Entry>) {
        let mut chat = Chat::new(Config {
            history_limit: limit,
            ..Config::default()
        });
        let mut entries = Vec::new();
        let mut posted = Vec::new();
        for i in 0..n {
            let ctx = Context {
                user: format!("u{}", i % 3).as_str().into(),
                now: Timestamp::from_unix_millis(1_700_000_000_000 + i),
                message_id: Uuid::from_u128(1000 + u128::from(i)),
            };
            let command = if i % 3 == 2 && !posted.is_empty() {
                ClientFrame::AddReaction(AddReaction {
                    message_id: posted[(i as usize / 3) % posted.len()],
                    emoji: "👍".into(),
                })
            } else {
                posted.push(ctx.message_id);
                ClientFrame::SendMessage(SendMessage {
                    text: format!("m{i}"),
                    author_name: None,
                })
            };
            if chat.handle(ctx, command).is_ok() {
                entries.extend(std::iter::from_fn(|| chat.poll_event()).map(Entry::from));
            }
        }
        (chat, entries)
    }

    fn log_of(events: usize) -> Log {
        let chat = Chat::new(Config {
            history_limit: 8,
            ..Config::default()
        });
        let retention = Retention {
            events,
            bytes: usize::MAX,
        };
        Log::new(&chat, EPOCH, [], retention, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_sync_frame_is_made_once_per_position_and_says_where() {
        let log = log_of(4);
        let decoded = |f: &Frame| ServerFrame::decode(f.as_str()).expect("frame");
        let sync_at = |p| {
            ServerFrame::Sync(chat_proto::Sync {
                epoch: EPOCH,
                position: Position(p),
            })
        };
        let at_3 = log.sync_frame(Position(3));
        assert_eq!(decoded(&at_3), sync_at(3));
        let again = log.sync_frame(Position(3));
        assert!(
            again.wire().as_ptr() == at_3.wire().as_ptr(),
            "shared, not made again"
        );
        let at_4 = log.sync_frame(Position(4));
        assert_eq!(decoded(&at_4), sync_at(4));
        // An older position (a slower writer) still gets its own.
        assert_eq!(decoded(&log.sync_frame(Position(3))), decoded(&at_3));
    }

    /// Whether all `n` events are published.
    fn joined_all(log: &Log, n: usize) -> bool {
        log.join(Since::Start).cursor.0 == n as u64
    }

    fn read_from(log: &Log, cursor: Position) -> Vec<Frame> {
        read_in_steps(|at, take| log.read(at, take), cursor, 4).expect("held")
    }

    #[test]
    fn a_resume_from_every_position_gets_exactly_the_events_after_it() {
        // Nothing evicted: every event is kept.
        let (_, entries) = drive_holding(40, 1000);
        let log = log_of(1000);
        log.publish(&entries);
        let head = entries.len() as u64;
        for p in 0..=head {
            let joined = log.join(Since::Resume {
                epoch: EPOCH,
                position: Position(p),
            });
            assert_eq!(joined.reset, None, "from {p}");
            assert!(joined.history.is_empty(), "a resume sends no history");
            let expected: Vec<Frame> = entries[p as usize..]
                .iter()
                .map(|e| e.frame.clone())
                .collect();
            assert_eq!(read_from(&log, joined.cursor), expected, "from {p}");
        }
        let reset = |since| log.join(since).reset;
        let other = Epoch(Uuid::from_u128(8));
        assert_eq!(
            reset(Since::Resume {
                epoch: other,
                position: Position(1)
            }),
            Some(ResetReason::EpochChanged)
        );
        assert_eq!(
            reset(Since::Resume {
                epoch: EPOCH,
                position: Position(head + 1)
            }),
            Some(ResetReason::Ahead)
        );
    }

    /// The message a frame of the log carries.
    fn carried(frame: &Frame) -> Uuid {
        match ServerFrame::decode(frame.as_str()).expect("a frame") {
            ServerFrame::Message(m) => m.id,
            ServerFrame::ReactionUpdated(r) => r.message_id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_resume_never_gets_what_the_history_no_longer_holds() {
        // 60 commands on a history of 8: most messages are evicted, some
        // after reactions that came late.
        let (chat, entries) = drive(60);
        let held: std::collections::HashSet<Uuid> = chat.history().iter().map(|m| m.id).collect();
        let check = |log: &Log| {
            let mut served = 0;
            for p in 0..=chat.head().0 {
                let joined = log.join(Since::Resume {
                    epoch: EPOCH,
                    position: Position(p),
                });
                if joined.reset.is_some() {
                    assert_eq!(joined.reset, Some(ResetReason::Expired), "from {p}");
                    continue;
                }
                served += 1;
                for frame in read_from(log, joined.cursor) {
                    assert!(
                        held.contains(&carried(&frame)),
                        "from {p}: an evicted message"
                    );
                }
            }
            assert!(served > 1, "some resumes are still served");
            assert_eq!(
                log.join(Since::Resume {
                    epoch: EPOCH,
                    position: Position::ZERO
                })
                .reset,
                Some(ResetReason::Expired),
                "the first message is gone"
            );
        };
        let live = log_of(1000);
        live.publish(&entries);
        check(&live);
        // Restored from what a store kept (every event, as one that kept
        // them all would give back): the same.
        let recent = entries
            .iter()
            .map(|e| (e.event.position, e.event.message_id(), e.frame.clone()));
        let retention = Retention {
            events: 1000,
            bytes: usize::MAX,
        };
        let restored = Log::new(&chat, EPOCH, recent, retention, Arc::new(Metrics::new()));
        check(&restored);
    }

    #[test]
    fn a_resume_older_than_the_log_reaches_is_a_reset_with_the_history() {
        let (chat, entries) = drive_holding(40, 1000);
        let log = log_of(10);
        log.publish(&entries);
        let head = entries.len() as u64;
        let joined = log.join(Since::Resume {
            epoch: EPOCH,
            position: Position(head - 11),
        });
        assert_eq!(joined.reset, Some(ResetReason::Expired));
        assert_eq!(joined.cursor, Position(head));
        let history: Vec<String> = replayed(&log, &joined)
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect();
        let expected: Vec<String> = chat
            .history()
            .iter()
            .map(|m| ServerFrame::Message(m.clone()).encode())
            .collect();
        assert_eq!(
            history, expected,
            "the history as it is now, reactions included"
        );
        let kept = log.join(Since::Resume {
            epoch: EPOCH,
            position: Position(head - 10),
        });
        assert_eq!(kept.reset, None, "the last 10 are kept");
        // A live reader that fell as far behind is told how far.
        assert_eq!(
            log.read(Position(head - 12), |_| true),
            Err(Behind { missed: 2 })
        );
    }

    #[test]
    fn a_join_gets_the_history_then_exactly_what_follows_while_publishing_goes_on() {
        // Messages only, no eviction: what a joiner must end up with is
        // every message once, in order, split anywhere between its
        // history and what it reads after its cursor.
        let (_, entries) = {
            let mut chat = Chat::new(Config {
                history_limit: 100_000,
                message_rate: chat_core::RateLimit::per_minute(1_000_000),
                ..Config::default()
            });
            let mut entries = Vec::new();
            for i in 0..3000u64 {
                let ctx = Context {
                    user: "u".into(),
                    now: Timestamp::from_unix_millis(1_700_000_000_000 + i),
                    message_id: Uuid::from_u128(u128::from(i) + 1),
                };
                let say = ClientFrame::SendMessage(SendMessage {
                    text: format!("m{i}"),
                    author_name: None,
                });
                chat.handle(ctx, say).expect("accepted");
                entries.extend(std::iter::from_fn(|| chat.poll_event()).map(Entry::from));
            }
            (chat, entries)
        };
        let all: Vec<Frame> = entries.iter().map(|e| e.frame.clone()).collect();
        let chat = Chat::new(Config {
            history_limit: 100_000,
            ..Config::default()
        });
        let retention = Retention {
            events: 100_000,
            bytes: usize::MAX,
        };
        let log = Arc::new(Log::new(
            &chat,
            EPOCH,
            [],
            retention,
            Arc::new(Metrics::new()),
        ));
        let publisher = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for batch in entries.chunks(3) {
                    log.publish(batch);
                    std::thread::yield_now();
                }
            })
        };
        let joiner = |log: Arc<Log>, all: Arc<Vec<Frame>>| {
            let (mut joins, mut midway) = (0, 0);
            while !joined_all(&log, all.len()) || joins < 50 {
                let joined = log.join(Since::Start);
                if joined.cursor.0 > 0 && joined.cursor.0 < all.len() as u64 {
                    midway += 1;
                }
                let mut seen: Vec<Frame> = replayed(&log, &joined);
                assert_eq!(
                    seen.len() as u64,
                    joined.cursor.0,
                    "history up to the cursor"
                );
                // Then what follows, as far as it is published by now.
                seen.extend(
                    read_in_steps(|at, take| log.read(at, take), joined.cursor, 64).expect("kept"),
                );
                assert!(
                    seen[..] == all[..seen.len()],
                    "join {joins}: a gap or a duplicate"
                );
                joins += 1;
            }
            midway
        };
        let all = Arc::new(all);
        let joiners: Vec<_> = (0..2)
            .map(|_| {
                let (log, all) = (Arc::clone(&log), Arc::clone(&all));
                std::thread::spawn(move || joiner(log, all))
            })
            .collect();
        let midway: usize = joiners.into_iter().map(|j| j.join().expect("joiner")).sum();
        publisher.join().expect("publisher");
        assert!(midway > 0, "no join happened while publishing");
    }

    #[tokio::test]
    async fn waiting_for_a_position_ends_when_it_is_published_or_at_the_bound() {
        let (_, entries) = drive(3);
        let log = Arc::new(log_of(100));
        let later = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                log.publish(&entries);
            })
        };
        let started = std::time::Instant::now();
        log.wait_for(Position(3), std::time::Duration::from_secs(10))
            .await;
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(log.join(Since::Start).cursor, Position(3));
        later.await.expect("publisher");
        // Never published: it gives up at the bound.
        let started = std::time::Instant::now();
        log.wait_for(Position(99), std::time::Duration::from_millis(100))
            .await;
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    }

    // ---- the publisher writes for connections waiting at the head -------

    use crate::delivery::{Delivery, Settings};
    use crate::wire::Inbound;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// A connected pair: the server's socket, split as a connection splits
    /// it, and the client's. `small` shrinks both buffers so that a client
    /// that does not read fills them quickly.
    async fn pair(small: bool) -> ((Inbound, Arc<Link>), TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        if small {
            client.set_recv_buffer_size(4096).expect("rcvbuf");
        }
        let client = client
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        if small {
            socket2::SockRef::from(&server)
                .set_send_buffer_size(4096)
                .expect("sndbuf");
        }
        let settings = Settings {
            ping_interval: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(60),
            write_timeout: std::time::Duration::from_secs(10),
            queue_bytes: 64 * 1024,
            epoch: std::time::Instant::now(),
        };
        let delivery = Delivery::new(Arc::new(settings), std::time::Instant::now());
        (crate::wire::split(server, 4096, 1024, 4, delivery), client)
    }

    async fn receive(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_exact(&mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        got
    }

    /// Whether nothing arrives for 100 ms.
    async fn quiet(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(
            std::time::Duration::from_millis(100),
            client.read(&mut byte),
        )
        .await
        .is_err()
    }

    #[tokio::test]
    async fn a_connection_waiting_at_the_head_is_written_to_by_the_publisher_without_a_wake_up() {
        let log = log_of(1000);
        let (_, entries) = drive(30);
        let ((_inbound, link), mut client) = pair(false).await;
        let _attached = log.attach(&link);
        link.delivery().start(Position::ZERO, true);
        // Parking needs the sync of the start announced first.
        link.delivery()
            .push_sync(Position::ZERO, log.sync_frame(Position::ZERO).into_wire());
        let mut expected = log.sync_frame(Position::ZERO).wire().to_vec();
        assert!(
            link.send(&mut link.delivery(), std::time::Instant::now())
                .expect("sent")
        );
        assert!(link.delivery().park(log.head()));
        let woken = std::sync::Arc::new(Woken::default());
        link.register(&std::task::Waker::from(std::sync::Arc::clone(&woken)));
        for batch in entries.chunks(7) {
            log.publish(batch);
            for entry in batch {
                expected.extend_from_slice(entry.frame.wire());
            }
            let last = batch.last().expect("a batch").event.position;
            expected.extend_from_slice(log.sync_frame(last).wire());
        }
        assert_eq!(receive(&mut client, expected.len()).await, expected);
        assert!(
            !woken.0.load(std::sync::atomic::Ordering::SeqCst),
            "the writer was not needed"
        );
        {
            let delivery = link.delivery();
            assert!(delivery.is_parked());
            assert!(delivery.is_empty());
            assert_eq!(delivery.cursor(), log.head());
            assert_eq!(delivery.sync_due(), None, "the head was announced");
        }
        // Unparked, the writer writes: a publish leaves the socket alone.
        link.delivery().unpark();
        let (_, more) = drive(31);
        log.publish(&more[entries.len()..]);
        assert!(
            quiet(&mut client).await,
            "nothing written for an unparked connection"
        );
        // And a writer behind the head cannot park.
        assert!(!link.delivery().park(log.head()));
    }

    /// A waker that notes it was woken.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_socket_that_takes_less_is_handed_back_to_its_writer_where_the_publisher_stopped() {
        let log = log_of(100_000);
        let mut chat = Chat::new(Config::default());
        let ((_inbound, link), mut client) = pair(true).await;
        let _attached = log.attach(&link);
        assert!(link.delivery().park(Position::ZERO));
        let mut all = Vec::new();
        let mut i = 0u64;
        // The client does not read: the publisher stops where its socket
        // is full, and hands it back. Batches of 20 frames of about 2 KB,
        // so that the socket fills in the middle of one.
        while link.delivery().is_parked() {
            let batch: Vec<Entry> = (0..20).flat_map(|k| post(&mut chat, i * 20 + k)).collect();
            log.publish(&batch);
            all.extend(batch);
            i += 1;
            assert!(i < 1_000, "a 4 KiB socket never filled");
        }
        let (cursor, queued) = {
            let delivery = link.delivery();
            (delivery.cursor(), delivery.queued())
        };
        assert!(queued > 0, "what the socket did not take is queued");
        // The kernel takes bytes, not frames: the client has every frame
        // before the cursor but the bytes still queued, and the queue
        // begins inside a frame.
        let mut expected = Vec::new();
        for entry in &all {
            expected.extend_from_slice(entry.frame.wire());
        }
        let up_to_cursor: usize = all[..cursor.0 as usize].iter().map(|e| e.frame.len()).sum();
        let taken = up_to_cursor - queued;
        assert!(
            !all.iter()
                .scan(0, |at, e| {
                    *at += e.frame.len();
                    Some(*at)
                })
                .any(|end| end == taken),
            "the socket filled inside a frame"
        );
        assert_eq!(receive(&mut client, taken).await, expected[..taken]);
        // The writer sends what is queued, then reads the log from the
        // cursor: the client gets every frame once, in order.
        let rest = {
            let mut delivery = link.delivery();
            log.read(cursor, |frame| {
                delivery.push(crate::delivery::Lane::Event, frame.wire().clone());
                true
            })
            .expect("held");
            delivery.queued()
        };
        assert_eq!(link.delivery().cursor(), log.head());
        let (got, flushed) = tokio::join!(
            receive(&mut client, rest),
            link.flush(|| tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        );
        assert!(flushed, "flushed");
        assert_eq!(got, expected[taken..]);
    }

    /// A 500-character message of 1,985 bytes from a new user, as the chat
    /// applies it.
    fn post(chat: &mut Chat, i: u64) -> Vec<Entry> {
        let ctx = Context {
            user: format!("u{i}").as_str().into(),
            now: Timestamp::from_unix_millis(1_700_000_000_000 + i),
            message_id: Uuid::from_u128(u128::from(i) + 1),
        };
        let text = format!("{}{i:05}", "😀".repeat(495));
        chat.handle(
            ctx,
            ClientFrame::SendMessage(SendMessage {
                text,
                author_name: None,
            }),
        )
        .expect("a post");
        std::iter::from_fn(|| chat.poll_event())
            .map(Entry::from)
            .collect()
    }
}
