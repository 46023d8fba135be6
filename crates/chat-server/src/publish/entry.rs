//! What the committer publishes: an applied event and its frames.

use crate::wire::frame::Frame;
use chat_core::{Event, EventKind};
use chat_proto::ServerFrame;

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

/// A server frame, framed once.
pub(crate) fn encode(frame: &ServerFrame) -> Frame {
    Frame::text(frame.encode())
}
