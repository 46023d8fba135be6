//! The content rules for text, author names and emojis.

use crate::{ChatError, Config};
use chat_proto::DEFAULT_AUTHOR_NAME;

/// Newline and tab are the only control characters a message may hold.
fn is_forbidden_control(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Checks message text. Length is counted in Unicode scalar values, as JSON
/// Schema's `maxLength` counts it.
pub(crate) fn text(config: &Config, text: &str) -> Result<(), ChatError> {
    if text.trim().is_empty() {
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
    Ok(())
}

/// Trims the author name and applies the default; refuses names that are
/// too long or hold control characters.
pub(crate) fn author_name(config: &Config, name: Option<&str>) -> Result<String, ChatError> {
    let name = name.map(str::trim).unwrap_or_default();
    if name.is_empty() {
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
    Ok(name.to_owned())
}

/// Checks that `emoji` is exactly one emoji, and returns its fully-qualified
/// form, so that "❤" and "❤️" count as the same reaction.
pub(crate) fn emoji(emoji: &str) -> Result<&'static str, ChatError> {
    emojis::get(emoji)
        .map(emojis::Emoji::as_str)
        .ok_or(ChatError::NotAnEmoji)
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
