//! Random steps for the property tests of a replicated chat: sends and
//! reactions from a few users, with time mostly going forwards, and (with
//! [`step_moderated`]) a moderator's orders among them.
#![allow(dead_code, unreachable_pub)]

use chat_core::{Chat, Command, Config, Context, RateLimit, Timestamp};
use chat_proto::{
    AddReaction, ClientFrame, LiftRestriction, Moderation, Purge, RemoveMessage, RestrictUser,
    Room, SendMessage, Term, Uuid,
};
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
    /// A moderator's order, at `dt`.
    Moderate {
        dt: i64,
        order: Order,
    },
}

/// A moderator's order, with its target picked when it is applied.
#[derive(Debug, Clone)]
pub enum Order {
    Remove {
        target: usize,
    },
    Restrict {
        user: u8,
        seconds: Option<u64>,
        purge: u8,
    },
    Lift {
        user: u8,
    },
    Slow {
        seconds: u32,
    },
}

/// A step, or now and then a moderator's order.
pub fn step_moderated() -> impl Strategy<Value = Step> {
    let dt = prop_oneof![8 => 0i64..20_000, 1 => -30_000i64..0];
    let order = prop_oneof![
        any::<usize>().prop_map(|target| Order::Remove { target }),
        (0u8..4, prop::option::of(1u64..120), 0u8..3).prop_map(|(user, seconds, purge)| {
            Order::Restrict {
                user,
                seconds,
                purge,
            }
        }),
        (0u8..4).prop_map(|user| Order::Lift { user }),
        prop_oneof![Just(0u32), 1u32..90].prop_map(|seconds| Order::Slow { seconds }),
    ];
    prop_oneof![
        6 => step(),
        1 => (dt, order).prop_map(|(dt, order)| Step::Moderate { dt, order }),
    ]
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
pub fn command(chat: &Chat, step: &Step, i: usize, now: i64, id: u128) -> (Context, Command, i64) {
    let pick = |target: usize| {
        let ids: Vec<Uuid> = chat.history().iter().map(|m| m.id).collect();
        if ids.is_empty() {
            Uuid::from_u128(0)
        } else {
            ids[target % ids.len()]
        }
    };
    let (user, dt, command): (String, i64, Command) = match step {
        Step::Send { user, dt } => (
            format!("u{user}"),
            *dt,
            ClientFrame::SendMessage(SendMessage {
                text: format!("m{i}"),
                author_name: None,
            })
            .into(),
        ),
        Step::React {
            user,
            dt,
            target,
            emoji,
        } => {
            let emoji = ["👍", "🎉", "❤️"][*emoji as usize];
            (
                format!("u{user}"),
                *dt,
                ClientFrame::AddReaction(AddReaction {
                    message_id: pick(*target),
                    emoji: emoji.into(),
                })
                .into(),
            )
        }
        Step::Moderate { dt, order } => {
            let order = match order {
                Order::Remove { target } => Moderation::RemoveMessage(RemoveMessage {
                    message_id: pick(*target),
                    reason: None,
                }),
                Order::Restrict {
                    user,
                    seconds,
                    purge,
                } => Moderation::RestrictUser(RestrictUser {
                    user_id: format!("u{user}").as_str().into(),
                    term: seconds.map_or(Term::Forever, Term::Seconds),
                    purge: [Purge::None, Purge::LastMinutes(1), Purge::All][*purge as usize],
                    reason: Some("spam".into()),
                }),
                Order::Lift { user } => Moderation::LiftRestriction(LiftRestriction {
                    user_id: format!("u{user}").as_str().into(),
                    reason: None,
                }),
                Order::Slow { seconds } => Moderation::SetRoom(Room {
                    slow_mode_seconds: *seconds,
                }),
            };
            ("mod".to_owned(), *dt, order.into())
        }
    };
    let now = (now + dt).max(0);
    let ctx = Context {
        user: user.as_str().into(),
        now: Timestamp::from_unix_millis(now as u64),
        message_id: Uuid::from_u128(id),
    };
    (ctx, command, now)
}
