//! Every refusal, with its wire text.
//!
//! This is the one place where the rule-breaking texts are written. The
//! server sends `err.to_string()` in an `error` frame; tests compare against
//! the same `Display`.

use std::fmt;
use thiserror::Error;

/// Why a command was refused. `Display` is the exact text sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChatError {
    /// The text is empty or only white space.
    #[error("message text cannot be empty")]
    EmptyText,
    /// The text has more Unicode scalar values than allowed.
    #[error("message too long (max {max} characters)")]
    TextTooLong {
        /// The configured maximum, in characters.
        max: usize,
    },
    /// The text holds a control character other than newline or tab.
    #[error("message text contains control characters")]
    ControlCharInText,
    /// The text holds a direction embedding, override or isolate, which
    /// would reorder what follows it on screen.
    #[error("message text contains direction-changing characters")]
    DirectionControlInText,
    /// The author name is longer than allowed (after trimming).
    #[error("author name too long (max {max} characters)")]
    NameTooLong {
        /// The configured maximum, in characters.
        max: usize,
    },
    /// The author name holds a control character.
    #[error("author name contains control characters")]
    ControlCharInName,
    /// The author name holds an invisible or direction-changing character
    /// (outside the emoji sequences that need one), which would let it pass
    /// for another name.
    #[error("author name contains invisible or direction-changing characters")]
    InvisibleCharInName,
    /// The reaction is not exactly one emoji.
    #[error("emoji must be a single emoji")]
    NotAnEmoji,
    /// Adding this emoji would exceed the distinct emojis allowed on one message.
    #[error("too many different reactions on this message (max {max})")]
    TooManyEmojis {
        /// The configured maximum of distinct emojis per message.
        max: usize,
    },
    /// Adding this user would exceed the users allowed on one emoji.
    #[error("too many users reacted with this emoji (max {max})")]
    TooManyReactors {
        /// The configured maximum of users per emoji on one message.
        max: usize,
    },
    /// The message does not exist (or has left the bounded history).
    #[error("message not found")]
    MessageNotFound,
    /// The user has used up their allowance in the current window.
    #[error("Rate limit exceeded. Maximum {max} {kind} per {window}.")]
    RateLimited {
        /// What was limited.
        kind: RateKind,
        /// How many are allowed per window.
        max: u32,
        /// The window's length.
        window: Window,
    },
    /// The embedder supplied a message id that is already in history.
    #[error("message id already in use")]
    DuplicateMessageId,
}

impl ChatError {
    /// Every [`kind`](ChatError::kind), so that a metric can show each at 0
    /// before the first refusal.
    pub const KINDS: &'static [&'static str] = &[
        "empty_text",
        "text_too_long",
        "control_char_in_text",
        "name_too_long",
        "control_char_in_name",
        "direction_control_in_text",
        "invisible_char_in_name",
        "not_an_emoji",
        "too_many_emojis",
        "too_many_reactors",
        "message_not_found",
        "rate_limited",
        "duplicate_message_id",
    ];

    /// A short, stable name for the kind of refusal, for metrics labels and
    /// logs: `invalid_format`, `rate_limited`, `text_too_long`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            ChatError::EmptyText => "empty_text",
            ChatError::TextTooLong { .. } => "text_too_long",
            ChatError::ControlCharInText => "control_char_in_text",
            ChatError::NameTooLong { .. } => "name_too_long",
            ChatError::ControlCharInName => "control_char_in_name",
            ChatError::DirectionControlInText => "direction_control_in_text",
            ChatError::InvisibleCharInName => "invisible_char_in_name",
            ChatError::NotAnEmoji => "not_an_emoji",
            ChatError::TooManyEmojis { .. } => "too_many_emojis",
            ChatError::TooManyReactors { .. } => "too_many_reactors",
            ChatError::MessageNotFound => "message_not_found",
            ChatError::RateLimited { .. } => "rate_limited",
            ChatError::DuplicateMessageId => "duplicate_message_id",
        }
    }
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKind {
    /// Accepted `send_message` commands.
    Messages,
    /// Accepted `add_reaction` toggles.
    Reactions,
}

impl fmt::Display for RateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RateKind::Messages => "messages",
            RateKind::Reactions => "reactions",
        })
    }
}

/// A rate-limit window's length, in milliseconds, written the way a person
/// says it: `minute`, `30 seconds`, `hour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window(pub u64);

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (3_600_000, "hour"),
            (60_000, "minute"),
            (1_000, "second"),
            (1, "millisecond"),
        ];
        let ms = self.0;
        let (size, unit) = UNITS
            .into_iter()
            .find(|(size, _)| ms >= *size && ms.is_multiple_of(*size))
            .unwrap_or((1, "millisecond"));
        match ms / size {
            1 => f.write_str(unit),
            n => write!(f, "{n} {unit}s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_naturally() {
        assert_eq!(Window(60_000).to_string(), "minute");
        assert_eq!(Window(1_000).to_string(), "second");
        assert_eq!(Window(3_600_000).to_string(), "hour");
        assert_eq!(Window(30_000).to_string(), "30 seconds");
        assert_eq!(Window(120_000).to_string(), "2 minutes");
        assert_eq!(Window(1_500).to_string(), "1500 milliseconds");
        assert_eq!(Window(0).to_string(), "0 milliseconds");
    }

    #[test]
    fn rate_limit_text_follows_the_numbers() {
        let e = ChatError::RateLimited {
            kind: RateKind::Messages,
            max: 60,
            window: Window(60_000),
        };
        assert_eq!(
            e.to_string(),
            "Rate limit exceeded. Maximum 60 messages per minute."
        );
        let e = ChatError::RateLimited {
            kind: RateKind::Reactions,
            max: 5,
            window: Window(10_000),
        };
        assert_eq!(
            e.to_string(),
            "Rate limit exceeded. Maximum 5 reactions per 10 seconds."
        );
    }
}
