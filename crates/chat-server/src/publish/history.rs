//! The history as published: every message held, as its `message` frame,
//! by sequence number, read live by joining clients.
//!
//! Sequence numbers only grow along the history. A message a moderator
//! removes leaves a gap in them (nothing is renumbered, so a replay under
//! way at a sequence number goes on from the right message); finding a
//! number is then a binary search.

use crate::wire::frame::Frame;
use chat_proto::{FixedState, Position, Uuid};
use std::collections::{HashMap, VecDeque};

/// The messages held, as frames, by sequence number, with an index by
/// message id.
#[derive(Debug, Default)]
pub(super) struct History {
    held: VecDeque<Held>,
    /// Message id → sequence number.
    index: HashMap<Uuid, u64, FixedState>,
    /// The next sequence number.
    next_seq: u64,
    /// Whether a message was ever removed after the oldest: until then a
    /// message's slot is its number less the oldest's.
    gaps: bool,
}

/// One message of the history.
#[derive(Debug)]
struct Held {
    seq: u64,
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

    /// The sequence numbers held now (and maybe some removed).
    pub(super) fn seqs(&self) -> std::ops::Range<u64> {
        self.held.front().map_or(self.next_seq, |h| h.seq)..self.next_seq
    }

    /// Adds a message, posted at `position`.
    pub(super) fn push(&mut self, id: Uuid, frame: Frame, position: Position) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.insert(id, seq);
        self.held.push_back(Held {
            seq,
            id,
            frame,
            touched: position,
        });
    }

    /// The slot of the first message whose number is `seq` or later.
    fn slot(&self, seq: u64) -> usize {
        match self.held.front() {
            None => 0,
            Some(first) if !self.gaps => {
                usize::try_from(seq.saturating_sub(first.seq)).unwrap_or(usize::MAX)
            }
            Some(_) => self.held.partition_point(|h| h.seq < seq),
        }
    }

    fn get_mut(&mut self, id: &Uuid) -> Option<&mut Held> {
        let seq = *self.index.get(id)?;
        let slot = self.slot(seq);
        self.held.get_mut(slot)
    }

    /// Takes a removed message out: no replay sends it again.
    pub(super) fn remove(&mut self, id: &Uuid) -> bool {
        let Some(seq) = self.index.remove(id) else {
            return false;
        };
        let slot = self.slot(seq);
        if slot > 0 {
            self.gaps = true;
        }
        self.held.remove(slot).is_some()
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
        Some(held.touched)
    }

    /// See `Log::replay`.
    pub(super) fn replay(
        &self,
        next: &mut u64,
        end: u64,
        mut take: impl FnMut(&Frame) -> bool,
    ) -> bool {
        let mut slot = self.slot(*next);
        while let Some(held) = self.held.get(slot)
            && held.seq < end
        {
            if !take(&held.frame) {
                *next = held.seq;
                return false;
            }
            slot += 1;
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

    /// Messages `m0` to `m9`, posted at positions 1 to 10.
    fn ten() -> History {
        let mut log = History::default();
        for i in 0..10u64 {
            log.push(
                Uuid::from_u128(i.into()),
                Frame::text(format!("m{i}")),
                Position(i + 1),
            );
        }
        log
    }

    #[test]
    fn a_replay_reads_the_history_as_it_is_and_skips_what_was_evicted_meanwhile() {
        let mut log = ten();
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

    #[test]
    fn a_replay_under_way_skips_a_removed_message_and_misses_no_other() {
        let mut log = ten();
        let joined = log.seqs();
        let mut next = joined.start;
        assert_eq!(
            replay_texts(&log, &mut next, joined.start + 4, 4),
            ["m0", "m1", "m2", "m3"]
        );
        // One removed behind the replay, two ahead of it (one the very
        // next), and one evicted.
        for gone in [1u128, 4, 7] {
            assert!(log.remove(&Uuid::from_u128(gone)));
        }
        assert!(!log.remove(&Uuid::from_u128(7)), "only once");
        log.pop_front();
        log.push(Uuid::from_u128(10), Frame::text("m10"), Position(11));
        log.set(&Uuid::from_u128(8), Frame::text("m8*"), Position(12));
        assert_eq!(
            replay_texts(&log, &mut next, joined.end, 2),
            ["m5", "m6", "m8*", "m9"]
        );
        let all = log.seqs();
        let mut next = all.start;
        assert_eq!(
            replay_texts(&log, &mut next, all.end, 3),
            ["m2", "m3", "m5", "m6", "m8*", "m9", "m10"]
        );
        assert_eq!(log.len(), 7);
    }
}
