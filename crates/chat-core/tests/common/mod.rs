//! Random steps for the property tests of a replicated chat: sends and
//! reactions from a few users, with time mostly going forwards.
#![allow(dead_code, unreachable_pub)]

use chat_core::{Chat, Config, Context, RateLimit, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage, Uuid};
use proptest::prelude::*;

#[derive(Debug, Clone)]
pub enum Step {
    Send {
        user: u8,
        dt: i64,
    },
    React {
        user: u8,
        dt: i64,
        target: usize,
        emoji: u8,
    },
}

pub fn step() -> impl Strategy<Value = Step> {
    // Mostly forwards, sometimes a step back (the chat absorbs it).
    step_by(prop_oneof![8 => 0i64..20_000, 1 => -30_000i64..0])
}

/// Steps whose clock moves by `dt` (ms).
pub fn step_by(dt: impl Strategy<Value = i64> + Clone) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4, dt.clone()).prop_map(|(user, dt)| Step::Send { user, dt }),
        (0u8..4, dt, any::<usize>(), 0u8..3).prop_map(|(user, dt, target, emoji)| Step::React {
            user,
            dt,
            target,
            emoji
        }),
    ]
}

pub fn config() -> Config {
    Config {
        history_limit: 5,
        max_reactors_per_emoji: 3,
        message_rate: RateLimit::per_minute(4),
        reaction_rate: RateLimit::per_minute(3),
        ..Config::default()
    }
}

/// Step `i` of a run as a command for `chat`, at `now` (ms, before the
/// step's own move of the clock), with message id `id`; and the new `now`.
pub fn command(
    chat: &Chat,
    step: &Step,
    i: usize,
    now: i64,
    id: u128,
) -> (Context, ClientFrame, i64) {
    let (user, dt, command) = match step {
        Step::Send { user, dt } => (
            *user,
            *dt,
            ClientFrame::SendMessage(SendMessage {
                text: format!("m{i}"),
                author_name: None,
            }),
        ),
        Step::React {
            user,
            dt,
            target,
            emoji,
        } => {
            let ids: Vec<Uuid> = chat.history().iter().map(|m| m.id).collect();
            let id = if ids.is_empty() {
                Uuid::from_u128(0)
            } else {
                ids[target % ids.len()]
            };
            let emoji = ["👍", "🎉", "❤️"][*emoji as usize];
            (
                *user,
                *dt,
                ClientFrame::AddReaction(AddReaction {
                    message_id: id,
                    emoji: emoji.into(),
                }),
            )
        }
    };
    let now = (now + dt).max(0);
    let ctx = Context {
        user: format!("u{user}").as_str().into(),
        now: Timestamp::from_unix_millis(now as u64),
        message_id: Uuid::from_u128(id),
    };
    (ctx, command, now)
}
