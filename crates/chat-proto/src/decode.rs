//! Why a frame could not be decoded.
//!
//! serde's own message is kept as detail because it tells a client developer
//! exactly which field is wrong. It is cut short so that a hostile frame
//! cannot make the server echo back kilobytes of its own input.

use thiserror::Error;

/// The longest piece of serde's explanation that is sent back, in characters.
const MAX_DETAIL_CHARS: usize = 160;

/// A frame that is not a well-formed protocol frame.
///
/// Every variant's wire text starts with `"Invalid message format"`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The text is not JSON at all, or is cut short.
    #[error("Invalid message format: {detail}")]
    Syntax {
        /// What the JSON parser saw, shortened.
        detail: String,
    },
    /// The text is JSON but not a known frame: unknown `type`, missing or
    /// mistyped field, malformed uuid.
    #[error("Invalid message format: {detail}")]
    Shape {
        /// Which part of the frame is wrong, shortened.
        detail: String,
    },
    /// A binary WebSocket frame; the protocol is text only.
    #[error("Invalid message format: binary frames are not supported")]
    Binary,
}

impl DecodeError {
    pub(crate) fn from_json(err: serde_json::Error) -> Self {
        let detail = shorten(err.to_string());
        match err.classify() {
            serde_json::error::Category::Data => DecodeError::Shape { detail },
            _ => DecodeError::Syntax { detail },
        }
    }
}

fn shorten(mut s: String) -> String {
    if let Some((cut, _)) = s.char_indices().nth(MAX_DETAIL_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_DETAIL_CHARS * 3);
        let short = shorten(long);
        assert_eq!(short.chars().count(), MAX_DETAIL_CHARS + 1);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn short_detail_is_untouched() {
        assert_eq!(shorten("abc".into()), "abc");
    }
}
