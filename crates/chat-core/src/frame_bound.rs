//! The largest frame the chat's rules let a server send.
//!
//! A `reaction_updated` frame carries the whole message, so its size grows
//! with every reactor. The bound is computed by building the worst message
//! the rules allow and encoding it with the wire types themselves, so it
//! cannot drift from the real encoding: the longest text and name (every
//! character four bytes of UTF-8; no allowed character is escaped to more),
//! the longest emojis, and every emoji at its reactor limit with ids of the
//! longest length the embedder's identities have.

use crate::Config;
use chat_proto::{Message, ReactionAction, ReactionUpdated, Reactors, ServerFrame, UserId, Uuid};

/// A character that takes four bytes of UTF-8 and is sent unescaped, the
/// most any character the rules accept costs in a frame.
const WIDEST_CHAR: char = '\u{1F600}';

impl Config {
    /// The length in bytes of the longest frame these rules can make the
    /// server send, when no user id is longer than `max_user_id_len` bytes.
    ///
    /// A server sizes its write buffers from it, so that any frame it can
    /// produce is delivered.
    pub fn largest_frame(&self, max_user_id_len: usize) -> usize {
        let wide = |chars: usize| WIDEST_CHAR.to_string().repeat(chars);
        let user = |i: usize| UserId::from(format!("{i:0>max_user_id_len$}"));
        let mut emojis = longest_emojis();
        emojis.truncate(self.max_emojis_per_message);
        let reactors: Reactors = (0..self.max_reactors_per_emoji).map(user).collect();
        let reactions = emojis
            .iter()
            .map(|e| ((*e).to_owned(), reactors.clone()))
            .collect();
        let message = Message {
            id: Uuid::max(),
            text: wide(self.max_text_chars),
            author_id: user(0),
            author_name: wide(self.max_author_name_chars),
            created_at: i64::MIN,
            reactions,
        };
        let frame = ServerFrame::ReactionUpdated(ReactionUpdated {
            message_id: message.id,
            emoji: emojis.first().map_or_else(String::new, |e| (*e).to_owned()),
            user_id: user(0),
            action: ReactionAction::Removed,
            message,
        });
        frame.encode().len()
    }
}

/// Every emoji a reaction may use (as normalized), longest first.
fn longest_emojis() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = emojis::iter()
        .flat_map(|e| {
            let tones = e.skin_tones().into_iter().flatten();
            std::iter::once(e).chain(tones)
        })
        .map(emojis::Emoji::as_str)
        .collect();
    all.sort_unstable_by_key(|e| std::cmp::Reverse(e.len()));
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Chat, Context, Timestamp};
    use chat_proto::{AddReaction, ClientFrame, SendMessage};

    /// Fills a message to every limit through the real rules, and checks
    /// that the frames it produced are no longer than the bound, and that
    /// the bound is not far above them.
    #[test]
    fn the_bound_holds_for_a_message_filled_to_every_limit() {
        let config = Config {
            max_emojis_per_message: 5,
            max_reactors_per_emoji: 7,
            reaction_rate: crate::RateLimit::per_minute(1000),
            ..Config::default()
        };
        let id_len = 16;
        let bound = config.largest_frame(id_len);
        let mut chat = Chat::new(config.clone());
        let ctx = |user: usize, n: u128| Context {
            user: UserId::from(format!("{user:x>id_len$}")),
            now: Timestamp::from_unix_millis(1_700_000_000_000),
            message_id: Uuid::from_u128(n),
        };
        let text = "𝄞\"\\\n".repeat(config.max_text_chars / 4);
        let name = "𝄞".repeat(config.max_author_name_chars);
        let post = ClientFrame::SendMessage(SendMessage {
            text,
            author_name: Some(name),
        });
        chat.handle(ctx(0, 1), post).expect("posted");
        let emojis = longest_emojis();
        let mut largest = 0;
        for emoji in &emojis[..config.max_emojis_per_message] {
            for user in 0..config.max_reactors_per_emoji {
                let react = ClientFrame::AddReaction(AddReaction {
                    message_id: Uuid::from_u128(1),
                    emoji: (*emoji).to_owned(),
                });
                chat.handle(ctx(user, 0), react).expect("reacted");
            }
        }
        while let Some(event) = chat.poll_event() {
            largest = largest.max(event.frame().encode().len());
        }
        assert!(largest <= bound, "{largest} > {bound}");
        // The text above is only partly four-byte characters; the rest of
        // the message is at its worst, so the bound is close.
        assert!(bound - largest < 1200, "bound {bound}, largest {largest}");
    }

    #[test]
    fn the_bound_grows_with_reactors_and_ids() {
        let small = Config {
            max_reactors_per_emoji: 10,
            ..Config::default()
        };
        let large = Config {
            max_reactors_per_emoji: 1000,
            ..Config::default()
        };
        assert!(
            large.largest_frame(16) > 64 * 1024,
            "the limits of issue 11"
        );
        assert!(small.largest_frame(16) < large.largest_frame(16));
        assert!(small.largest_frame(16) < small.largest_frame(40));
    }
}
