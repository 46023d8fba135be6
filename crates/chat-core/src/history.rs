//! The bounded, ordered message history.
//!
//! Messages live in a ring (`VecDeque`) in the order they were accepted.
//! Each message is also given a sequence number that never repeats; the id
//! index maps to it, so finding a message by id and turning that into its
//! position are both O(1), and dropping the oldest message shifts nothing.

use chat_proto::{FixedState, Message, Uuid};
use std::collections::{HashMap, VecDeque};

/// The ordered, bounded history of messages.
#[derive(Debug, Clone)]
pub struct History {
    messages: VecDeque<Message>,
    /// Message id → sequence number.
    index: HashMap<Uuid, u64, FixedState>,
    /// Sequence number of `messages[0]`.
    first_seq: u64,
    limit: usize,
}

impl History {
    pub(crate) fn new(limit: usize) -> Self {
        History {
            messages: VecDeque::with_capacity(limit.min(1024)),
            index: HashMap::default(),
            first_seq: 0,
            limit,
        }
    }

    /// The most messages kept; older ones are dropped first.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Whether a message with this id is held.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.index.contains_key(id)
    }

    /// The message with this id, if it is held. O(1).
    pub fn get(&self, id: &Uuid) -> Option<&Message> {
        self.position(id).map(|i| &self.messages[i])
    }

    /// Where the message with this id stands, counting from the oldest held
    /// (0). O(1). Embedders that keep a parallel cache per message (such as
    /// serialized frames) use it to update the right slot.
    pub fn position(&self, id: &Uuid) -> Option<usize> {
        let seq = *self.index.get(id)?;
        usize::try_from(seq - self.first_seq).ok()
    }

    /// Every message held, oldest first: what a client receives on connect.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Message> + DoubleEndedIterator {
        self.messages.iter()
    }

    pub(crate) fn get_mut(&mut self, id: &Uuid) -> Option<&mut Message> {
        let i = self.position(id)?;
        self.messages.get_mut(i)
    }

    /// Appends a message, returning the one dropped to stay within the limit.
    pub(crate) fn push(&mut self, message: Message) -> Option<Message> {
        if self.limit == 0 {
            return Some(message);
        }
        let evicted = if self.messages.len() >= self.limit {
            self.pop_oldest()
        } else {
            None
        };
        let seq = self.first_seq + self.messages.len() as u64;
        self.index.insert(message.id, seq);
        self.messages.push_back(message);
        evicted
    }

    fn pop_oldest(&mut self) -> Option<Message> {
        let oldest = self.messages.pop_front()?;
        self.index.remove(&oldest.id);
        self.first_seq += 1;
        Some(oldest)
    }
}
