//! An arbitrary sequence of commands, decoded from client text or built
//! directly, applied to the state machine: it never panics, and after every
//! step history stays bounded, reactions hold no duplicate user and no
//! empty emoji, and ids index the right messages.
#![no_main]

use arbitrary::Arbitrary;
use chat_core::{Chat, Config, Context, RateLimit, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage, UserId, Uuid};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::time::Duration;

#[derive(Debug, Arbitrary)]
enum Step {
    /// Raw client text, through the decoder.
    Text { user: u8, dt: i16, text: String },
    Send { user: u8, dt: i16, text: String, name: Option<String> },
    React { user: u8, dt: i16, target: u8, emoji: String },
}

fuzz_target!(|steps: Vec<Step>| {
    let config = Config {
        history_limit: 8,
        max_emojis_per_message: 3,
        max_reactors_per_emoji: 3,
        message_rate: RateLimit { max: 5, window: Duration::from_secs(10) },
        reaction_rate: RateLimit { max: 5, window: Duration::from_secs(10) },
        ..Config::default()
    };
    let mut chat = Chat::new(config.clone());
    let mut now: u64 = 1_000_000;
    let mut next_id: u128 = 1;
    for step in steps {
        let (user, dt, command) = match step {
            Step::Text { user, dt, text } => match ClientFrame::decode(&text) {
                Ok(frame) => (user, dt, frame),
                Err(_) => continue,
            },
            Step::Send { user, dt, text, name } => {
                (user, dt, ClientFrame::SendMessage(SendMessage { text, author_name: name }))
            }
            Step::React { user, dt, target, emoji } => {
                // Mostly ids that exist or existed.
                let id = Uuid::from_u128(u128::from(target) % (next_id + 1));
                (user, dt, ClientFrame::AddReaction(AddReaction { message_id: id, emoji }))
            }
        };
        now = now.saturating_add_signed(i64::from(dt) * 10);
        let ctx = Context {
            user: UserId::from(format!("u{}", user % 6)),
            now: Timestamp::from_unix_millis(now),
            message_id: Uuid::from_u128(next_id),
        };
        next_id += 1;
        if let Err(e) = chat.handle(ctx, command) {
            assert!(!e.to_string().is_empty());
        }
        while chat.poll_event().is_some() {}
        let history = chat.history();
        assert!(history.len() <= config.history_limit);
        for (i, m) in history.iter().enumerate() {
            assert_eq!(history.position(&m.id), Some(i));
            assert!(m.reactions.len() <= config.max_emojis_per_message);
            for users in m.reactions.values() {
                assert!(!users.is_empty() && users.len() <= config.max_reactors_per_emoji);
                let distinct: HashSet<_> = users.iter().collect();
                assert_eq!(distinct.len(), users.len());
            }
        }
    }
});
