//! The content rules for text, author names and emojis.
//!
//! **What a reader sees.** A text or name counts as empty when nothing in
//! it shows: it holds only white space, characters Unicode says render as
//! nothing (`Default_Ignorable_Code_Point`: zero-width spaces, the Hangul
//! fillers, variation selectors, tag characters, ...), marks with no letter
//! to sit on, and the blank Braille pattern (U+2800). Such a message is
//! refused as empty; such a name becomes "Anonymous".
//!
//! **Look-alikes.** A name is an identity people read, so it may hold no
//! invisible character (a zero-width space makes "Ada\u{200B}" look like
//! "Ada") and no direction control (an override makes "Ada" show as another
//! string). The invisible characters emoji need stay allowed where emoji
//! need them: a zero-width joiner between two emoji, a variation selector
//! after a character, tag characters after a black flag. Message text may
//! hold invisible characters (they hide nothing in a message), but not the
//! direction embeddings, overrides and isolates that reorder what follows.

use crate::{ChatError, Config, MAX_SLOW_MODE_SECONDS, MAX_TIMEOUT_DAYS};
use chat_proto::{DEFAULT_AUTHOR_NAME, MAX_REASON_CHARS, Moderation, Purge, Term};
use unicode_properties::{GeneralCategoryGroup, UnicodeEmoji, UnicodeGeneralCategory};

/// Newline and tab are the only control characters a message may hold.
fn is_forbidden_control(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Unicode's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt,
/// Unicode 16.0): characters that render as nothing.
fn is_default_ignorable(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5
        | 0x180B..=0x180F | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F
        | 0x3164 | 0xFE00..=0xFE0F | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

/// Whether a reader sees nothing of `c` on its own.
fn shows_nothing(c: char) -> bool {
    c.is_whitespace()
        || is_default_ignorable(c)
        || c.general_category_group() == GeneralCategoryGroup::Mark
        || c == '\u{2800}'
}

/// Whether nothing in `s` shows: the rules' meaning of "empty".
pub(crate) fn is_blank(s: &str) -> bool {
    s.chars().all(shows_nothing)
}

/// Direction embeddings, overrides and isolates: they reorder the text
/// that follows them.
fn is_direction_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `c`, invisible, is where emoji need it: a zero-width joiner
/// between two emoji, a variation selector after a visible character, a
/// tag character after a black flag or another tag.
fn needed_by_emoji(prev: Option<char>, c: char, next: Option<char>) -> bool {
    let emoji = |c: Option<char>| c.is_some_and(|c| c.is_emoji_char() && !c.is_ascii());
    match c {
        '\u{200D}' => (emoji(prev) || prev == Some('\u{FE0F}')) && emoji(next),
        '\u{FE00}'..='\u{FE0F}' => prev.is_some_and(|p| !shows_nothing(p) && !p.is_ascii()),
        '\u{E0020}'..='\u{E007F}' => {
            prev.is_some_and(|p| p == '\u{1F3F4}' || ('\u{E0020}'..='\u{E007F}').contains(&p))
        }
        _ => false,
    }
}

/// Checks message text. Length is counted in Unicode scalar values, as JSON
/// Schema's `maxLength` counts it.
pub(crate) fn text(config: &Config, text: &str) -> Result<(), ChatError> {
    if is_blank(text) {
        return Err(ChatError::EmptyText);
    }
    // Cheap exit first: a string of n bytes has at most n characters.
    if text.len() > config.max_text_chars && text.chars().count() > config.max_text_chars {
        return Err(ChatError::TextTooLong {
            max: config.max_text_chars,
        });
    }
    if text.chars().any(is_forbidden_control) {
        return Err(ChatError::ControlCharInText);
    }
    if text.chars().any(is_direction_control) {
        return Err(ChatError::DirectionControlInText);
    }
    Ok(())
}

/// Trims the author name and applies the default; refuses names that are
/// too long or hold control characters.
pub(crate) fn author_name(config: &Config, name: Option<&str>) -> Result<String, ChatError> {
    let name = name.map(str::trim).unwrap_or_default();
    if is_blank(name) {
        return Ok(DEFAULT_AUTHOR_NAME.to_owned());
    }
    if name.chars().count() > config.max_author_name_chars {
        return Err(ChatError::NameTooLong {
            max: config.max_author_name_chars,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(ChatError::ControlCharInName);
    }
    let chars: Vec<char> = name.chars().collect();
    let hidden = chars.iter().enumerate().any(|(i, &c)| {
        let prev = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1).copied();
        (is_default_ignorable(c) || c == '\u{2800}') && !needed_by_emoji(prev, c, next)
    });
    if hidden {
        return Err(ChatError::InvisibleCharInName);
    }
    Ok(name.to_owned())
}

/// Checks that `emoji` is exactly one emoji, and returns its fully-qualified
/// form, so that "❤" and "❤️" count as the same reaction.
pub(crate) fn emoji(emoji: &str) -> Result<&'static str, ChatError> {
    emojis::get(emoji)
        .map(emojis::Emoji::as_str)
        .ok_or(ChatError::NotAnEmoji)
}

/// Checks an operator's order as far as the chat's state does not matter:
/// its reason, and that a time-out, a purge and slow mode have a length
/// within bounds.
pub(crate) fn moderation(order: &Moderation) -> Result<(), ChatError> {
    let reason = match order {
        Moderation::RemoveMessage(r) => r.reason.as_deref(),
        Moderation::RestrictUser(r) => {
            if let Term::Seconds(s) = r.term
                && !(1..=MAX_TIMEOUT_DAYS * 86_400).contains(&s)
            {
                return Err(ChatError::BadTerm {
                    max_days: MAX_TIMEOUT_DAYS,
                });
            }
            if r.purge == Purge::LastMinutes(0) {
                return Err(ChatError::EmptyPurge);
            }
            r.reason.as_deref()
        }
        Moderation::LiftRestriction(r) => r.reason.as_deref(),
        Moderation::SetRoom(room) => {
            if room.slow_mode_seconds > MAX_SLOW_MODE_SECONDS {
                return Err(ChatError::SlowModeTooLong {
                    max: MAX_SLOW_MODE_SECONDS,
                });
            }
            None
        }
    };
    let Some(reason) = reason else {
        return Ok(());
    };
    if reason.len() > MAX_REASON_CHARS && reason.chars().count() > MAX_REASON_CHARS {
        return Err(ChatError::ReasonTooLong {
            max: MAX_REASON_CHARS,
        });
    }
    if reason.chars().any(is_forbidden_control) {
        return Err(ChatError::ControlCharInReason);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::default()
    }

    #[test]
    fn text_edges() {
        let c = cfg();
        assert_eq!(text(&c, ""), Err(ChatError::EmptyText));
        assert_eq!(text(&c, " \n\t "), Err(ChatError::EmptyText));
        assert_eq!(
            text(&c, "\u{3000}"),
            Err(ChatError::EmptyText),
            "ideographic space is blank"
        );
        assert_eq!(text(&c, &"a".repeat(500)), Ok(()));
        assert_eq!(
            text(&c, &"a".repeat(501)),
            Err(ChatError::TextTooLong { max: 500 })
        );
        // 500 four-byte characters are 2000 bytes and still allowed.
        assert_eq!(text(&c, &"😀".repeat(500)), Ok(()));
        assert_eq!(
            text(&c, &"😀".repeat(501)),
            Err(ChatError::TextTooLong { max: 500 })
        );
        assert_eq!(text(&c, &"é".repeat(500)), Ok(()));
        assert_eq!(text(&c, "line one\nline\ttwo"), Ok(()));
        for bad in ["a\rb", "a\u{0}b", "a\u{1b}[31mred", "a\u{7f}", "a\u{85}"] {
            assert_eq!(text(&c, bad), Err(ChatError::ControlCharInText), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        let c = cfg();
        assert_eq!(author_name(&c, None).as_deref(), Ok("Anonymous"));
        assert_eq!(author_name(&c, Some("")).as_deref(), Ok("Anonymous"));
        assert_eq!(author_name(&c, Some("   ")).as_deref(), Ok("Anonymous"));
        assert_eq!(author_name(&c, Some("  Ada ")).as_deref(), Ok("Ada"));
        assert_eq!(
            author_name(&c, Some(&"é".repeat(50))).map(|n| n.chars().count()),
            Ok(50)
        );
        assert_eq!(
            author_name(&c, Some(&"é".repeat(51))),
            Err(ChatError::NameTooLong { max: 50 })
        );
        // Trimmed before counting.
        let padded = format!("  {}  ", "x".repeat(50));
        assert!(author_name(&c, Some(&padded)).is_ok());
        assert_eq!(
            author_name(&c, Some("a\nb")),
            Err(ChatError::ControlCharInName)
        );
    }

    #[test]
    fn what_shows_nothing_is_empty() {
        let c = cfg();
        for blank in [
            "\u{3164}",
            "\u{2800}",
            "\u{200B}",
            "\u{FEFF}",
            "\u{FE0F}",
            "\u{301}",
            "\u{E0041}\u{E0042}",
            " \u{115F}\u{1160}\u{FFA0} ",
            "\u{200B}\u{2800}\n\u{3164}",
        ] {
            assert_eq!(text(&c, blank), Err(ChatError::EmptyText), "{blank:?}");
            assert_eq!(
                author_name(&c, Some(blank)).as_deref(),
                Ok("Anonymous"),
                "{blank:?}"
            );
        }
        // Something visible beside them is a message.
        for shown in ["a\u{200B}", "e\u{301}", "\u{2800}x", "😀\u{FE0F}", "👍"] {
            assert_eq!(text(&c, shown), Ok(()), "{shown:?}");
        }
    }

    #[test]
    fn direction_controls_are_refused_in_text() {
        let c = cfg();
        for bad in ["a\u{202E}b", "\u{202D}x", "x\u{2066}y\u{2069}", "\u{202A}z"] {
            assert_eq!(
                text(&c, bad),
                Err(ChatError::DirectionControlInText),
                "{bad:?}"
            );
        }
        // Marks, not overrides: right-to-left text needs them.
        assert_eq!(text(&c, "שלום\u{200F} world"), Ok(()));
        assert_eq!(text(&c, "zero\u{200B}width"), Ok(()));
    }

    #[test]
    fn names_cannot_pass_for_other_names() {
        let c = cfg();
        for look_alike in [
            "Ada\u{200B}",
            "A\u{200D}da",
            "\u{202E}adA",
            "Ada\u{2066}",
            "Ada\u{200E}",
            "Ada\u{2800}",
            "Ada\u{FE0F}",
            "Ada\u{E0041}",
            "\u{3164}Ada",
            "Ada\u{AD}",
        ] {
            assert_eq!(
                author_name(&c, Some(look_alike)),
                Err(ChatError::InvisibleCharInName),
                "{look_alike:?}"
            );
        }
        for name in [
            "👩🏽‍💻 Ada",
            "🏳️‍🌈",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F} Ada",
            "❤️ Bo",
            "🏃‍♀️",
            "Zoë",
            "José",
            "山田",
        ] {
            assert_eq!(author_name(&c, Some(name)).as_deref(), Ok(name), "{name:?}");
        }
    }

    #[test]
    fn emojis() {
        for ok in ["👍", "👍🏽", "🏳️‍🌈", "👩🏽‍💻", "🇫🇷", "#️⃣", "❤️"]
        {
            assert_eq!(emoji(ok), Ok(ok), "{ok}");
        }
        assert_eq!(emoji("❤"), Ok("❤️"), "text presentation is normalized");
        for bad in ["", "a", "1", "#", "👍👍", "👍 ", " 👍", ":+1:", "👍\u{0}"] {
            assert_eq!(emoji(bad), Err(ChatError::NotAnEmoji), "{bad:?}");
        }
    }
}
