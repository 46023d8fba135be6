//! The hub: the one chat, and the fan-out of what it has published.
//!
//! Events flow one way, through one pipeline: **apply → commit → publish**.
//!
//! - [`Hub::apply`] applies a command under one short lock, which gives a
//!   single order for all events, and hands the events to the commit queue
//!   in that order (after reserving a place, so a slow disk makes senders
//!   wait instead of memory grow).
//! - The committer (see [`crate::pipeline`]) writes each batch with its
//!   writer (the SQLite store, or, in memory, a writer that writes nothing)
//!   and then publishes it to the [`FanOut`].
//! - The [`FanOut`] serializes each event **once** into one bounded
//!   broadcast ring that every connection reads from (recipients share the
//!   bytes: `Utf8Bytes` is reference counted), and keeps the history as
//!   serialized frames ([`ReplayLog`]), so a connecting client costs no
//!   serialization and a snapshot copies a few dozen pointers. Joining takes
//!   the snapshot and the ring subscription under the fan-out's lock, so a
//!   new client sees exactly the history followed by every later event: no
//!   gap, no duplicate. Only published events are ever in it, so no client
//!   sees anything a crash could take back.
//!
//! Both locks are `std::sync::Mutex`es: never held across an `.await`, and
//! the work under each is a few microseconds.

use crate::clock::Clock;
use crate::metrics::Metrics;
use chat_core::{Chat, ChatError, Context, Event};
use chat_proto::{ClientFrame, FixedState, ServerFrame, UserId, Uuid};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Frames per chunk of the replay log.
const CHUNK: usize = 256;

/// The chat, applying commands in one order.
#[derive(Debug)]
pub struct Hub {
    chat: Mutex<Chat>,
    /// Where applied events wait for their commit, in the order applied.
    commits: mpsc::Sender<Vec<Event>>,
    /// The time each command is stamped with.
    clock: Clock,
    /// What has been published, for joining clients.
    fanout: Arc<FanOut>,
}

/// The published side: the history as frames and the live ring.
#[derive(Debug)]
pub struct FanOut {
    state: Mutex<Published>,
}

#[derive(Debug)]
struct Published {
    replay: ReplayLog,
    live: broadcast::Sender<Utf8Bytes>,
    metrics: Arc<Metrics>,
}

/// What a new connection starts from.
#[derive(Debug)]
pub struct Joined {
    /// Every message in history, oldest first, as `message` frames.
    pub history: Snapshot,
    /// Every event after that snapshot.
    pub live: broadcast::Receiver<Utf8Bytes>,
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The chat refused it; tell the client.
    #[error(transparent)]
    Refused(#[from] ChatError),
    /// The server is stopping and no longer commits.
    #[error("server stopping")]
    Stopping,
}

impl From<chat_proto::DecodeError> for ApplyError {
    fn from(e: chat_proto::DecodeError) -> Self {
        ApplyError::Refused(e.into())
    }
}

/// Recovers a lock whose holder panicked: nothing under these locks
/// panics, and if something ever did, the state is still consistent (each
/// command or event is applied whole or not at all).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// A hub around `chat` (empty, or restored from a store) whose applied
    /// events go to `commits`, stamped with `clock`'s time. `fanout` must
    /// have been built from the same chat ([`FanOut::new`]).
    pub fn new(
        chat: Chat,
        commits: mpsc::Sender<Vec<Event>>,
        clock: Clock,
        fanout: Arc<FanOut>,
    ) -> Self {
        Hub {
            chat: Mutex::new(chat),
            commits,
            clock,
            fanout,
        }
    }

    /// Snapshot of the published history and a subscription to what
    /// follows, taken atomically.
    pub fn join(&self) -> Joined {
        self.fanout.join()
    }

    /// Decodes a client's text frame and applies it for `user`.
    pub async fn handle_text(&self, user: &UserId, text: &str) -> Result<(), ApplyError> {
        let command = ClientFrame::decode(text)?;
        self.apply(user, command).await
    }

    /// Applies one command for `user`, stamping it with the time and a new
    /// message id. Accepted events are committed, then broadcast; a refusal
    /// is returned for that client alone.
    pub async fn apply(&self, user: &UserId, command: ClientFrame) -> Result<(), ApplyError> {
        // Take a place in the commit queue first: while the disk is behind,
        // this waits, and nothing is applied that could not be queued.
        let permit = self
            .commits
            .reserve()
            .await
            .map_err(|_| ApplyError::Stopping)?;
        let ctx = Context {
            user: user.clone(),
            now: self.clock.now(),
            message_id: Uuid::now_v7(),
        };
        let mut chat = lock(&self.chat);
        chat.handle(ctx, command)?;
        // Sent under the lock, so the queue holds events in the order they
        // were applied.
        permit.send(std::iter::from_fn(|| chat.poll_event()).collect());
        Ok(())
    }
}

impl FanOut {
    /// The fan-out of `chat`'s history (as restored), with a broadcast ring
    /// of `max_lag` frames: a client further behind is told it lagged.
    /// Published events are counted in `metrics`.
    pub fn new(chat: &Chat, max_lag: usize, metrics: Arc<Metrics>) -> Self {
        let (live, _) = broadcast::channel(max_lag);
        let mut replay = ReplayLog::default();
        for message in chat.history().iter() {
            replay.push(message.id, encode(&ServerFrame::Message(message.clone())));
        }
        metrics.history_messages.set(replay.len() as i64);
        FanOut {
            state: Mutex::new(Published {
                replay,
                live,
                metrics,
            }),
        }
    }

    /// Snapshot of the history and a subscription to what follows, taken
    /// atomically.
    pub fn join(&self) -> Joined {
        let state = lock(&self.state);
        Joined {
            history: state.replay.snapshot(),
            live: state.live.subscribe(),
        }
    }

    /// Publishes events whose commit has completed, in order.
    pub fn publish(&self, events: Vec<Event>) {
        let mut state = lock(&self.state);
        for event in events {
            state.publish(event);
        }
    }
}

impl Published {
    fn publish(&mut self, event: Event) {
        match event {
            Event::MessagePosted(message) => {
                let id = message.id;
                let frame = encode(&ServerFrame::Message(message));
                self.replay.push(id, frame.clone());
                // No receivers is fine: nobody is connected.
                let _ = self.live.send(frame);
                self.metrics.messages_accepted.inc();
            }
            Event::ReactionUpdated(update) => {
                let replay = encode(&ServerFrame::Message(update.message.clone()));
                self.replay.set(&update.message_id, replay);
                let _ = self
                    .live
                    .send(encode(&ServerFrame::ReactionUpdated(update)));
                self.metrics.reactions_accepted.inc();
            }
            Event::MessageEvicted(_) => self.replay.pop_front(),
        }
        self.metrics.history_messages.set(self.replay.len() as i64);
    }
}

fn encode(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(frame.encode())
}

/// The published history as serialized frames, in chunks shared
/// copy-on-write with outstanding snapshots, with an index by message id
/// (it can trail the chat's own history while commits are in flight).
#[derive(Debug, Default)]
struct ReplayLog {
    chunks: VecDeque<Arc<Vec<Utf8Bytes>>>,
    /// Ids in the same order as the frames.
    ids: VecDeque<Uuid>,
    /// Message id → sequence number; `first_seq` is the oldest held.
    index: HashMap<Uuid, u64, FixedState>,
    first_seq: u64,
    /// Frames at the front of the first chunk that were evicted.
    skip: usize,
}

impl ReplayLog {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn push(&mut self, id: Uuid, frame: Utf8Bytes) {
        if self.chunks.back().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push_back(Arc::new(Vec::with_capacity(CHUNK)));
        }
        if let Some(last) = self.chunks.back_mut() {
            Arc::make_mut(last).push(frame);
            self.index
                .insert(id, self.first_seq + self.ids.len() as u64);
            self.ids.push_back(id);
        }
    }

    fn set(&mut self, id: &Uuid, frame: Utf8Bytes) {
        let Some(seq) = self.index.get(id) else {
            return;
        };
        let i = self.skip + (seq - self.first_seq) as usize;
        if let Some(chunk) = self.chunks.get_mut(i / CHUNK)
            && let Some(slot) = Arc::make_mut(chunk).get_mut(i % CHUNK)
        {
            *slot = frame;
        }
    }

    fn pop_front(&mut self) {
        let Some(id) = self.ids.pop_front() else {
            return;
        };
        self.index.remove(&id);
        self.first_seq += 1;
        self.skip += 1;
        if self.skip == CHUNK {
            self.chunks.pop_front();
            self.skip = 0;
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            chunks: self.chunks.iter().cloned().collect(),
            skip: self.skip,
            len: self.len(),
        }
    }
}

/// An immutable view of the history frames at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    chunks: Vec<Arc<Vec<Utf8Bytes>>>,
    skip: usize,
    len: usize,
}

impl Snapshot {
    /// How many frames the snapshot holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the snapshot holds no frame.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frames, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Utf8Bytes> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .skip(self.skip)
            .take(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(s: &Snapshot) -> Vec<String> {
        s.iter().map(|f| f.as_str().to_owned()).collect()
    }

    #[test]
    fn replay_log_tracks_push_set_and_evict_across_chunks() {
        let mut log = ReplayLog::default();
        let mut model: VecDeque<(Uuid, String)> = VecDeque::new();
        let mut snapshots = Vec::new();
        let texts =
            |m: &VecDeque<(Uuid, String)>| m.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>();
        for i in 0..(CHUNK * 3 + 17) {
            let id = Uuid::from_u128(i as u128);
            log.push(id, Utf8Bytes::from(i.to_string()));
            model.push_back((id, i.to_string()));
            if i % 5 == 0 {
                log.pop_front();
                model.pop_front();
            }
            if i % 7 == 0 && !model.is_empty() {
                let pos = i % model.len();
                let id = model[pos].0;
                log.set(&id, Utf8Bytes::from(format!("r{i}")));
                model[pos].1 = format!("r{i}");
            }
            // An id that is not (or no longer) held changes nothing.
            log.set(&Uuid::from_u128(u128::MAX), Utf8Bytes::from("x"));
            if i % 97 == 0 {
                snapshots.push((log.snapshot(), texts(&model)));
            }
        }
        assert_eq!(frames(&log.snapshot()), texts(&model));
        // Older snapshots were not changed by later writes.
        for (snap, expected) in snapshots {
            assert_eq!(frames(&snap), expected);
            assert_eq!(snap.len(), snap.iter().count());
        }
    }
}
