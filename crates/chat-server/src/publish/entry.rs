//! What the committer publishes: an applied event and its frames.

use crate::wire::frame::{Audience, Frame};
use chat_core::{Event, EventKind};
use chat_proto::{ServerFrame, Uuid};

/// An applied event with the frame clients receive for it, serialized
/// once (on the committer's thread, not under the sequencer's lock, nor the
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
        let audience = if event.for_every_client() {
            Audience::Everyone
        } else {
            Audience::OptedIn
        };
        let frame = Frame::for_audience(event.frame().encode(), audience);
        let replay = match &event.kind {
            EventKind::ReactionUpdated(update) => {
                Some(encode(&ServerFrame::Message(update.message.clone())))
            }
            _ => None,
        };
        Entry {
            event,
            frame,
            replay,
        }
    }
}

impl Entry {
    /// The message whose body the entry's frame holds (a post, or a
    /// reaction's whole message): if a moderator removes that message,
    /// this frame is erased wherever it is kept.
    pub(crate) fn holds_message(&self) -> Option<Uuid> {
        match &self.event.kind {
            EventKind::MessagePosted { message, .. } => Some(message.id),
            EventKind::ReactionUpdated(update) => Some(update.message_id),
            _ => None,
        }
    }
}

/// A server frame, framed once.
pub(crate) fn encode(frame: &ServerFrame) -> Frame {
    Frame::text(frame.encode())
}
