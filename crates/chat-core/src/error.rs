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
    /// A moderator timed the user out: they may read, but not post or
    /// react, until then.
    #[error("You are timed out until {until}.")]
    TimedOut {
        /// When the time-out ends.
        until: Until,
    },
    /// A moderator banned the user: they may read, but not post or react.
    #[error("You are banned from this chat.")]
    Banned,
    /// Slow mode is on and the user posted within its window.
    #[error("Slow mode is on: one message every {seconds} seconds. You may post again at {until}.")]
    SlowMode {
        /// Slow mode's window, in seconds.
        seconds: u32,
        /// When the user may post again.
        until: Until,
    },
    /// A moderation reason longer than allowed.
    #[error("reason too long (max {max} characters)")]
    ReasonTooLong {
        /// The maximum, in characters.
        max: usize,
    },
    /// A moderation reason holding a control character other than newline
    /// or tab.
    #[error("reason contains control characters")]
    ControlCharInReason,
    /// A time-out of no time, or of longer than allowed.
    #[error("a time-out lasts from 1 second to {max_days} days (ban for longer)")]
    BadTerm {
        /// The longest time-out, in days.
        max_days: u64,
    },
    /// A purge of the last 0 minutes.
    #[error("a purge covers at least the last 1 minute")]
    EmptyPurge,
    /// Slow mode longer than allowed.
    #[error("slow mode too long (max {max} seconds)")]
    SlowModeTooLong {
        /// The maximum, in seconds.
        max: u32,
    },
    /// Restricting one more user would exceed the restrictions allowed.
    #[error("too many restrictions in force (max {max})")]
    TooManyRestrictions {
        /// The maximum in force at once.
        max: usize,
    },
    /// Lifting the restriction of a user who has none in force.
    #[error("user is not restricted")]
    NotRestricted,
}

/// A point in time as a refusal writes it: RFC 3339 in UTC, to the second,
/// rounded up (so that at the time shown, the refusal no longer holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Until(pub crate::Timestamp);

impl fmt::Display for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // RFC 3339 ends with the year 9999: 9999-12-31T23:59:59Z.
        const LAST: u64 = 253_402_300_799;
        let seconds = u64::try_from(self.0.unix_seconds_ceil())
            .unwrap_or(0)
            .min(LAST);
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        write!(f, "{}", humantime::format_rfc3339_seconds(t))
    }
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
        "timed_out",
        "banned",
        "slow_mode",
        "reason_too_long",
        "control_char_in_reason",
        "bad_term",
        "empty_purge",
        "slow_mode_too_long",
        "too_many_restrictions",
        "not_restricted",
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
            ChatError::TimedOut { .. } => "timed_out",
            ChatError::Banned => "banned",
            ChatError::SlowMode { .. } => "slow_mode",
            ChatError::ReasonTooLong { .. } => "reason_too_long",
            ChatError::ControlCharInReason => "control_char_in_reason",
            ChatError::BadTerm { .. } => "bad_term",
            ChatError::EmptyPurge => "empty_purge",
            ChatError::SlowModeTooLong { .. } => "slow_mode_too_long",
            ChatError::TooManyRestrictions { .. } => "too_many_restrictions",
            ChatError::NotRestricted => "not_restricted",
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
