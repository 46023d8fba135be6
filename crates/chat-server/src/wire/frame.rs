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
}

impl Frame {
    /// The text frame carrying `text`.
    pub(crate) fn text(text: impl Into<String>) -> Frame {
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
