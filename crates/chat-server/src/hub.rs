//! The hub: the one chat, its serialized history, and the fan-out.
//!
//! Every command is applied under one short lock, which gives a single
//! order for all events. Under that same lock each event is serialized
//! **once** and put into one bounded broadcast ring that every connection
//! reads from; recipients share the bytes (`Utf8Bytes` is reference
//! counted). Joining takes the history snapshot and the ring subscription
//! under the lock too, so a new client sees exactly the history followed by
//! every later event: no gap, no duplicate.
//!
//! The history is also kept as serialized `message` frames ([`ReplayLog`]),
//! so a connecting client costs no serialization, and taking a snapshot
//! copies a few dozen pointers rather than 10,000 frames.
//!
//! The lock is a `std::sync::Mutex`: it is never held across an `.await`,
//! and the work under it is a few microseconds.

use chat_core::{Chat, ChatError, Context, Event, Timestamp};
use chat_proto::{ClientFrame, ServerFrame, UserId, Uuid};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Frames per chunk of the replay log.
const CHUNK: usize = 256;

/// The chat plus everything needed to fan its events out.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    chat: Chat,
    replay: ReplayLog,
    live: broadcast::Sender<Utf8Bytes>,
}

/// What a new connection starts from.
#[derive(Debug)]
pub struct Joined {
    /// Every message in history, oldest first, as `message` frames.
    pub history: Snapshot,
    /// Every event after that snapshot.
    pub live: broadcast::Receiver<Utf8Bytes>,
}

impl Hub {
    /// A hub whose broadcast ring holds `max_lag` frames: a client further
    /// behind than that is told it lagged.
    pub fn new(config: chat_core::Config, max_lag: usize) -> Self {
        let (live, _) = broadcast::channel(max_lag);
        Hub {
            state: Mutex::new(State {
                chat: Chat::new(config),
                replay: ReplayLog::default(),
                live,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics; if something ever did, the state
        // is still consistent (each command is applied whole or not at all).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Snapshot of the history and a subscription to what follows, taken
    /// atomically.
    pub fn join(&self) -> Joined {
        let state = self.lock();
        Joined {
            history: state.replay.snapshot(),
            live: state.live.subscribe(),
        }
    }

    /// Decodes a client's text frame and applies it for `user`. Accepted
    /// events are broadcast; a refusal is returned for that client alone.
    pub fn handle_text(&self, user: &UserId, text: &str) -> Result<(), ChatError> {
        let command = ClientFrame::decode(text)?;
        self.apply(user, command)
    }

    /// Applies one command for `user`, stamping it with the time and a new
    /// message id.
    pub fn apply(&self, user: &UserId, command: ClientFrame) -> Result<(), ChatError> {
        let ctx = Context {
            user: user.clone(),
            now: Timestamp::from(SystemTime::now()),
            message_id: Uuid::now_v7(),
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        state.chat.handle(ctx, command)?;
        while let Some(event) = state.chat.poll_event() {
            state.publish(event);
        }
        Ok(())
    }

    /// How many messages the history holds.
    pub fn history_len(&self) -> usize {
        self.lock().chat.history().len()
    }
}

impl State {
    fn publish(&mut self, event: Event) {
        match event {
            Event::MessagePosted(message) => {
                let frame = encode(&ServerFrame::Message(message));
                self.replay.push(frame.clone());
                // No receivers is fine: nobody is connected.
                let _ = self.live.send(frame);
            }
            Event::ReactionUpdated(update) => {
                if let Some(pos) = self.chat.history().position(&update.message_id) {
                    let replay = encode(&ServerFrame::Message(update.message.clone()));
                    self.replay.set(pos, replay);
                }
                let _ = self
                    .live
                    .send(encode(&ServerFrame::ReactionUpdated(update)));
            }
            Event::MessageEvicted(_) => self.replay.pop_front(),
        }
    }
}

fn encode(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(frame.encode())
}

/// The history as serialized frames, in chunks shared copy-on-write with
/// outstanding snapshots.
#[derive(Debug, Default)]
struct ReplayLog {
    chunks: VecDeque<Arc<Vec<Utf8Bytes>>>,
    /// Frames at the front of the first chunk that were evicted.
    skip: usize,
    len: usize,
}

impl ReplayLog {
    fn push(&mut self, frame: Utf8Bytes) {
        if self.chunks.back().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push_back(Arc::new(Vec::with_capacity(CHUNK)));
        }
        if let Some(last) = self.chunks.back_mut() {
            Arc::make_mut(last).push(frame);
            self.len += 1;
        }
    }

    fn set(&mut self, pos: usize, frame: Utf8Bytes) {
        let i = self.skip + pos;
        if let Some(chunk) = self.chunks.get_mut(i / CHUNK)
            && let Some(slot) = Arc::make_mut(chunk).get_mut(i % CHUNK)
        {
            *slot = frame;
        }
    }

    fn pop_front(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
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
            len: self.len,
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
        let mut model: VecDeque<String> = VecDeque::new();
        let mut snapshots = Vec::new();
        for i in 0..(CHUNK * 3 + 17) {
            log.push(Utf8Bytes::from(i.to_string()));
            model.push_back(i.to_string());
            if i % 5 == 0 {
                log.pop_front();
                model.pop_front();
            }
            if i % 7 == 0 && !model.is_empty() {
                let pos = i % model.len();
                log.set(pos, Utf8Bytes::from(format!("r{i}")));
                model[pos] = format!("r{i}");
            }
            if i % 97 == 0 {
                snapshots.push((log.snapshot(), model.clone()));
            }
        }
        assert_eq!(frames(&log.snapshot()), Vec::from(model));
        // Older snapshots were not changed by later writes.
        for (snap, expected) in snapshots {
            assert_eq!(frames(&snap), Vec::from(expected));
            assert_eq!(snap.len(), snap.iter().count());
        }
    }
}
