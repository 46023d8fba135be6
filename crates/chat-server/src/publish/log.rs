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
//! publisher writes the new frames to its socket itself (`super::fanout`).
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

use super::entry::{Entry, encode};
use super::history::History;
use super::recent::{Behind, Recent, Retention};
use crate::metrics::Metrics;
use crate::wire::frame::Frame;
use chat_core::{Chat, EventKind};
use chat_proto::{Epoch, FixedState, Position, ResetReason, ServerFrame, Uuid};
use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

/// The published log. Shared by the committer (which publishes) and every
/// connection (which reads).
#[derive(Debug)]
pub(crate) struct Log {
    state: RwLock<State>,
    head: watch::Sender<Position>,
    /// The epoch, and the last `sync` frame made in it, shared by every
    /// writer that announces the same position (most of them, as they
    /// keep up with the head).
    sync: std::sync::Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    epoch: Epoch,
    last: Option<(Position, Frame)>,
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
        recent: impl IntoIterator<Item = (Position, Option<Uuid>, Frame)>,
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
            if let Some(id) = &message
                && !history.touch(id, position)
            {
                unheld = Some(position);
            }
            kept.restore(position, frame, message);
        }
        kept.end_restore(head);
        if let Some(through) = unheld {
            kept.resume_no_earlier_than(through);
        }
        metrics.history_messages.set(history.len() as i64);
        let (head_tx, _) = watch::channel(head);
        Log {
            state: RwLock::new(State {
                history,
                recent: kept,
                head,
                metrics,
            }),
            head: head_tx,
            sync: std::sync::Mutex::new(Current { epoch, last: None }),
        }
    }

    fn sync(&self) -> std::sync::MutexGuard<'_, Current> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The log's epoch.
    pub(crate) fn epoch(&self) -> Epoch {
        self.sync().epoch
    }

    /// Starts a new epoch (a cluster's stream went back, and positions
    /// from its head on are new ones): a client that resumes from a
    /// position of an older epoch gets a full replay and a `reset`, and
    /// every `sync` frame made from now on names the new one.
    ///
    /// Called before any event of the new epoch is handed to the commit
    /// pipeline, so no position of the new epoch is ever announced with
    /// the old one. A position published before it may be announced with
    /// the new one: that is safe, since every node that serves the new
    /// epoch holds the same chat up to it.
    pub(crate) fn set_epoch(&self, epoch: Epoch) {
        let mut sync = self.sync();
        *sync = Current { epoch, last: None };
    }

    /// The `sync` frame announcing `position` in this log's epoch, encoded
    /// and framed once for every connection at that position.
    pub(crate) fn sync_frame(&self, position: Position) -> Frame {
        let mut sync = self.sync();
        if let Some((at, frame)) = sync.last.as_ref()
            && *at == position
        {
            return frame.clone();
        }
        let frame = Frame::text(
            ServerFrame::Sync(chat_proto::SyncPoint {
                epoch: sync.epoch,
                position,
            })
            .encode(),
        );
        sync.last = Some((position, frame.clone()));
        frame
    }

    /// Where a connection starts, decided under the lock so that nothing is
    /// published between the history it gets and the cursor it reads on
    /// from: no gap, no duplicate.
    pub(crate) fn join(&self, since: Since) -> Joined {
        let state = read(&self.state);
        // Read under the state's lock: an epoch set before what the state
        // holds was published is seen.
        let current = self.epoch();
        let resume = match since {
            Since::Start => Err(None),
            Since::Resume { epoch, .. } if epoch != current => Err(Some(ResetReason::EpochChanged)),
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

    /// Publishes committed entries, in order, and wakes those waiting for
    /// a position ([`Log::wait_for`]). Writing them to the connections
    /// that wait at the head is the fan-out's job (`super::fanout`).
    pub(crate) fn publish(&self, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        {
            let mut state = write(&self.state);
            let mut removed = HashSet::default();
            for entry in entries {
                state.publish(entry, &mut removed);
            }
            if !removed.is_empty() {
                // What they held is erased from the recent events, so no
                // resume sends it again: one pass for the whole batch.
                state.recent.erase(&removed);
            }
            state
                .metrics
                .history_messages
                .set(state.history.len() as i64);
        }
        self.head.send_replace(last.event.position);
    }
}

impl State {
    /// Publishes one entry; a message it removes is added to `removed`.
    fn publish(&mut self, entry: &Entry, removed: &mut HashSet<Uuid, FixedState>) {
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
            EventKind::MessageRemoved { message, .. } => {
                self.history.remove(&message.id);
                removed.insert(message.id);
                self.metrics.messages_removed.inc();
            }
            EventKind::UserRestricted { .. }
            | EventKind::RestrictionLifted { .. }
            | EventKind::RoomUpdated { .. } => {}
        }
        self.recent
            .push(position, entry.frame.clone(), entry.holds_message());
        self.head = position;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::testing::{EPOCH, drive, drive_holding, log_of, read_in_steps};
    use chat_core::{Config, Context, Timestamp};
    use chat_proto::{ClientFrame, SendMessage};

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

    // ---- the log as a whole: joins and resumes, no sockets ----------------

    #[test]
    fn a_sync_frame_is_made_once_per_position_and_says_where() {
        let log = log_of(4);
        let decoded = |f: &Frame| ServerFrame::decode(f.as_str()).expect("frame");
        let sync_at = |p| {
            ServerFrame::Sync(chat_proto::SyncPoint {
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
    #[test]
    fn a_new_epoch_resets_every_resume_from_the_old_one_and_is_announced() {
        let (_, entries) = drive(4);
        let log = log_of(100);
        log.publish(&entries);
        let old = log.epoch();
        assert_eq!(log.sync_frame(Position(4)), log.sync_frame(Position(4)));
        let new = Epoch(Uuid::from_u128(99));
        log.set_epoch(new);
        assert_eq!(log.epoch(), new);
        let announced = ServerFrame::decode(log.sync_frame(Position(4)).as_str()).expect("frame");
        assert_eq!(
            announced,
            ServerFrame::Sync(chat_proto::SyncPoint {
                epoch: new,
                position: Position(4)
            }),
            "the frame made before is not reused"
        );
        for position in [Position(2), Position(4)] {
            let joined = log.join(Since::Resume {
                epoch: old,
                position,
            });
            assert_eq!(joined.reset, Some(ResetReason::EpochChanged));
            assert_eq!(joined.cursor, Position(4));
        }
        let joined = log.join(Since::Resume {
            epoch: new,
            position: Position(2),
        });
        assert_eq!((joined.reset, joined.cursor), (None, Position(2)));
    }

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
}
