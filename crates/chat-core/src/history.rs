//! The bounded, ordered message history.
//!
//! Messages live in a ring (`VecDeque`) in the order they were accepted.
//! Each message is also given a sequence number that never repeats and
//! only grows along the ring; the id index maps to it. Finding a message by
//! id is a hash lookup and, when a moderator has removed messages from the
//! middle (which leaves gaps in the numbers), a binary search; dropping the
//! oldest message shifts nothing.

use chat_proto::{FixedState, Message, Uuid};
use std::collections::{HashMap, VecDeque};

/// The ordered, bounded history of messages.
#[derive(Debug, Clone)]
pub struct History {
    /// Each message with its sequence number, in order.
    messages: VecDeque<(u64, Message)>,
    /// Message id → sequence number.
    index: HashMap<Uuid, u64, FixedState>,
    /// The next sequence number.
    next_seq: u64,
    /// Whether a message was ever removed from the middle: until then a
    /// sequence number is its slot plus the first's, no search needed.
    gaps: bool,
    limit: usize,
}

impl History {
    pub(crate) fn new(limit: usize) -> Self {
        History {
            messages: VecDeque::with_capacity(limit.min(1024)),
            index: HashMap::default(),
            next_seq: 0,
            gaps: false,
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

    /// The message with this id, if it is held.
    pub fn get(&self, id: &Uuid) -> Option<&Message> {
        self.position(id).map(|i| &self.messages[i].1)
    }

    /// Where the message with this id stands, counting from the oldest held
    /// (0). Embedders that keep a parallel cache per message (such as
    /// serialized frames) use it to update the right slot.
    pub fn position(&self, id: &Uuid) -> Option<usize> {
        let seq = *self.index.get(id)?;
        let first = self.messages.front()?.0;
        if !self.gaps {
            return usize::try_from(seq - first).ok();
        }
        self.messages.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }

    /// Every message held, oldest first: what a client receives on connect.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Message> + DoubleEndedIterator {
        self.messages.iter().map(|(_, m)| m)
    }

    pub(crate) fn get_mut(&mut self, id: &Uuid) -> Option<&mut Message> {
        let i = self.position(id)?;
        self.messages.get_mut(i).map(|(_, m)| m)
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
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.insert(message.id, seq);
        self.messages.push_back((seq, message));
        evicted
    }

    /// Takes the message with this id out of the history, wherever it
    /// stands. O(n) in the messages after it: a moderator's action, rare.
    pub(crate) fn remove(&mut self, id: &Uuid) -> Option<Message> {
        let i = self.position(id)?;
        let (_, message) = self.messages.remove(i)?;
        self.index.remove(id);
        // Not the oldest: the numbers after it (or the next one given)
        // skip one.
        if i > 0 {
            self.gaps = true;
        }
        Some(message)
    }

    fn pop_oldest(&mut self) -> Option<Message> {
        let (_, oldest) = self.messages.pop_front()?;
        self.index.remove(&oldest.id);
        Some(oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u128) -> Message {
        Message {
            id: Uuid::from_u128(i),
            text: i.to_string(),
            author_id: "u".into(),
            author_name: "A".into(),
            created_at: 0,
            reactions: Default::default(),
        }
    }

    #[test]
    fn removal_from_anywhere_keeps_lookups_and_order_right() {
        let mut history = History::new(8);
        let mut model: VecDeque<u128> = VecDeque::new();
        for i in 0..40u128 {
            if history.push(message(i)).is_some() {
                model.pop_front();
            }
            model.push_back(i);
            if i % 3 == 0 && model.len() > 2 {
                // From the middle, or (every fifth) the newest.
                let at = if i % 5 == 0 {
                    model.len() - 1
                } else {
                    model.len() / 2
                };
                let gone = model.remove(at).expect("held");
                assert_eq!(
                    history.remove(&Uuid::from_u128(gone)).map(|m| m.text),
                    Some(gone.to_string())
                );
                assert!(
                    history.remove(&Uuid::from_u128(gone)).is_none(),
                    "removed once"
                );
            }
            let texts: Vec<String> = history.iter().map(|m| m.text.clone()).collect();
            let want: Vec<String> = model.iter().map(u128::to_string).collect();
            assert_eq!(texts, want);
            for (slot, id) in model.iter().enumerate() {
                assert_eq!(history.position(&Uuid::from_u128(*id)), Some(slot));
            }
        }
    }

    #[test]
    fn the_message_after_a_removed_newest_is_found() {
        let mut history = History::new(8);
        for i in 0..3 {
            history.push(message(i));
        }
        history.remove(&Uuid::from_u128(2));
        history.push(message(3));
        assert_eq!(history.position(&Uuid::from_u128(3)), Some(2));
        assert_eq!(
            history.get(&Uuid::from_u128(3)).map(|m| m.id),
            Some(Uuid::from_u128(3))
        );
    }
}
