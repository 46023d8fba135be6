//! A server frame, framed once.
//!
//! Every frame the server sends to clients is a server frame, and server
//! frames are not masked, so the bytes on the wire are the same for every
//! recipient. A [`Frame`] is framed once (by tungstenite's own framing),
//! when the event is published, and shared by reference: sending it to a
//! thousand clients copies nothing in user space.

use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A server text frame, framed once: the WebSocket header and the JSON
/// text in one shared buffer, the same bytes for every recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    wire: Bytes,
    /// Where the text starts (after the header).
    text_at: u8,
    /// Who is sent it.
    audience: Audience,
}

/// Which clients a frame of the log is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// Every client.
    Everyone,
    /// Only clients that opted in to the protocol's extensions (`?sync`,
    /// `?since=`): moderation's frames, which the seed protocol lacks.
    OptedIn,
    /// No one: the frame of an event whose message a moderator removed
    /// since, erased. Its position still counts.
    Nobody,
}

impl Frame {
    /// The text frame carrying `text`, for every client.
    pub(crate) fn text(text: impl Into<String>) -> Frame {
        Frame::for_audience(text, Audience::Everyone)
    }

    /// The text frame carrying `text`, for `audience`.
    pub(crate) fn for_audience(text: impl Into<String>, audience: Audience) -> Frame {
        let text: String = text.into();
        let len = text.len();
        let frame = WsFrame::message(text, OpCode::Data(Data::Text), true);
        let mut wire = Vec::with_capacity(frame.len());
        // Formatting into a Vec cannot fail.
        frame
            .format(&mut wire)
            .expect("formatting into memory never fails");
        let text_at = u8::try_from(wire.len() - len).expect("a header is at most 10 bytes");
        Frame {
            wire: Bytes::from(wire),
            text_at,
            audience,
        }
    }

    /// The erased frame at a position whose event carried a message
    /// since removed: sent to no one, holding nothing.
    pub(crate) fn erased() -> Frame {
        Frame {
            wire: Bytes::new(),
            text_at: 0,
            audience: Audience::Nobody,
        }
    }

    /// Who is sent it.
    pub(crate) fn audience(&self) -> Audience {
        self.audience
    }

    /// Whether a client is sent it: every client, or (`opted_in`) one that
    /// opted in to the protocol's extensions.
    pub(crate) fn is_for(&self, opted_in: bool) -> bool {
        match self.audience {
            Audience::Everyone => true,
            Audience::OptedIn => opted_in,
            Audience::Nobody => false,
        }
    }

    /// The bytes on the wire.
    pub(crate) fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// The text the frame carries.
    pub(crate) fn as_str(&self) -> &str {
        // Made from a String in `text`, and never changed.
        std::str::from_utf8(&self.wire[usize::from(self.text_at)..])
            .expect("a text frame's payload is the UTF-8 it was made from")
    }

    /// How many bytes it takes on the wire.
    pub(crate) fn len(&self) -> usize {
        self.wire.len()
    }

    /// The bytes on the wire, to queue.
    pub(crate) fn into_wire(self) -> Bytes {
        self.wire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_tungstenites_framing_of_its_text() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536] {
            let text = "x".repeat(len);
            let frame = Frame::text(text.clone());
            assert_eq!(frame.as_str(), text);
            let mut expected = Vec::new();
            WsFrame::message(text, OpCode::Data(Data::Text), true)
                .format(&mut expected)
                .expect("format");
            assert_eq!(&frame.wire()[..], &expected[..], "length {len}");
            assert_eq!(frame.len(), expected.len());
        }
    }
}
