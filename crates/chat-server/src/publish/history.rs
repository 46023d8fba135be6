//! The history as published: every message held, as its `message` frame,
//! by sequence number, read live by joining clients.

use crate::wire::frame::Frame;
use chat_proto::{FixedState, Position, Uuid};
use std::collections::{HashMap, VecDeque};

/// The messages held, as frames, by sequence number, with an index by
/// message id.
#[derive(Debug, Default)]
pub(super) struct History {
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
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// The sequence numbers held now.
    pub(super) fn seqs(&self) -> std::ops::Range<u64> {
        self.first_seq..self.first_seq + self.held.len() as u64
    }

    /// Adds a message, posted at `position`.
    pub(super) fn push(&mut self, id: Uuid, frame: Frame, position: Position) {
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
    pub(super) fn touch(&mut self, id: &Uuid, position: Position) -> bool {
        self.get_mut(id)
            .map(|held| held.touched = position)
            .is_some()
    }

    /// Replaces a message's frame, after the event at `position` changed it.
    pub(super) fn set(&mut self, id: &Uuid, frame: Frame, position: Position) {
        if let Some(held) = self.get_mut(id) {
            held.frame = frame;
            held.touched = position;
        }
    }

    /// Evicts the oldest message: the position of the last event that
    /// carried it.
    pub(super) fn pop_front(&mut self) -> Option<Position> {
        let held = self.held.pop_front()?;
        self.index.remove(&held.id);
        self.first_seq += 1;
        Some(held.touched)
    }

    /// See `Log::replay`.
    pub(super) fn replay(
        &self,
        next: &mut u64,
        end: u64,
        mut take: impl FnMut(&Frame) -> bool,
    ) -> bool {
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
}
