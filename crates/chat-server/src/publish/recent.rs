//! The recent events: the last `--log-events` frames (at most
//! `--log-bytes`), by position. A live connection reads from them at its
//! own pace, and a reconnecting client resumes from them (`?since=`).

use crate::wire::frame::Frame;
use chat_proto::{FixedState, Position, Uuid};
use std::collections::{HashSet, VecDeque};

/// The bounds of the recent events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    /// The most events kept (at least 1).
    pub events: usize,
    /// The most bytes of frames kept. The newest event is always kept.
    pub bytes: usize,
}

/// A reader asked for events the log no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Behind {
    /// How many events it would have to skip.
    pub missed: u64,
}

/// The last events, by position, within their [`Retention`].
#[derive(Debug)]
pub(super) struct Recent {
    frames: VecDeque<Kept>,
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

/// One event kept: its frame, and the message whose body the frame holds
/// (erased if a moderator removes it).
#[derive(Debug)]
struct Kept {
    frame: Frame,
    message: Option<Uuid>,
}

impl Recent {
    pub(super) fn new(retention: Retention, head: Position) -> Self {
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
    pub(super) fn reaches(&self, position: Position) -> bool {
        position >= self.base && position >= self.floor
    }

    /// Takes back one event kept by an earlier run. They come oldest
    /// first and end at the head the log was created with.
    pub(super) fn restore(&mut self, position: Position, frame: Frame, message: Option<Uuid>) {
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
        self.push(position, frame, message);
    }

    /// Checks the restored events end at `head`; if they do not (a store
    /// never writes that), none of them is served.
    pub(super) fn end_restore(&mut self, head: Position) {
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
    pub(super) fn resume_no_earlier_than(&mut self, position: Position) {
        self.floor = self.floor.max(position);
    }

    pub(super) fn push(&mut self, position: Position, frame: Frame, message: Option<Uuid>) {
        debug_assert_eq!(position.0, self.base.0 + self.frames.len() as u64 + 1);
        self.bytes += frame.len();
        self.frames.push_back(Kept { frame, message });
        while self.frames.len() > 1
            && (self.frames.len() > self.retention.events || self.bytes > self.retention.bytes)
        {
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= old.frame.len();
                self.base = self.base.next();
            }
        }
    }

    /// Erases every kept frame that holds one of `removed` (a post, a
    /// reaction's whole message): no one is sent it again. One pass,
    /// however many were removed.
    pub(super) fn erase(&mut self, removed: &HashSet<Uuid, FixedState>) {
        for kept in &mut self.frames {
            if kept.message.is_some_and(|m| removed.contains(&m)) {
                self.bytes -= kept.frame.len();
                kept.frame = Frame::erased();
                kept.message = None;
            }
        }
    }

    pub(super) fn read(
        &self,
        cursor: Position,
        take: impl FnMut(&Frame) -> bool,
    ) -> Result<bool, Behind> {
        if cursor < self.base {
            return Err(Behind {
                missed: self.base.0 - cursor.0,
            });
        }
        let skip = usize::try_from(cursor.0 - self.base.0).unwrap_or(usize::MAX);
        if skip >= self.frames.len() {
            return Ok(true);
        }
        let mut take = take;
        Ok(self.frames.range(skip..).all(|kept| take(&kept.frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::testing::read_in_steps;

    fn frame(p: u64) -> Frame {
        Frame::text(format!("e{p:03}"))
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
            recent.push(Position(p), frame(p), None);
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
            recent.push(Position(p), frame(p), None);
        }
        assert_eq!(recent.frames.len(), 2, "12 bytes fit, 18 do not");
        assert_eq!(recent.base, Position(2));
        recent.push(
            Position(5),
            Frame::text("a frame larger than the bound"),
            None,
        );
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
            recent.restore(Position(p), frame(p), None);
        }
        assert_eq!(recent.base, Position(6), "the oldest two did not fit");
        assert_eq!(
            read_all(&recent, 6),
            Ok(vec!["e007".into(), "e008".into(), "e009".into()])
        );
        recent.push(Position(10), frame(10), None);
        assert_eq!(read_all(&recent, 9), Ok(vec!["e010".into()]));
    }
}
