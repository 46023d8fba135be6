//! A chat rebuilt from a snapshot goes on exactly as the chat it was taken
//! from: that is what lets a node of a replicated chat start from another
//! node's snapshot instead of the whole log.

use chat_core::{Chat, ChatSnapshot, Config, Context, RateLimit, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage, Uuid};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
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

fn step() -> impl Strategy<Value = Step> {
    // Mostly forwards, sometimes a step back (the chat absorbs it).
    let dt = prop_oneof![8 => 0i64..20_000, 1 => -30_000i64..0];
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

fn config() -> Config {
    Config {
        history_limit: 5,
        max_reactors_per_emoji: 3,
        message_rate: RateLimit::per_minute(4),
        reaction_rate: RateLimit::per_minute(3),
        ..Config::default()
    }
}

/// Applies `steps` from `start`, numbering ids from `first_id`; returns
/// what each did, as text.
fn run(chat: &mut Chat, steps: &[Step], mut now: i64, first_id: u128) -> (Vec<String>, i64) {
    let mut trace = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let (user, dt, command) = match s {
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
        now = (now + dt).max(0);
        let ctx = Context {
            user: format!("u{user}").as_str().into(),
            now: Timestamp::from_unix_millis(now as u64),
            message_id: Uuid::from_u128(first_id + i as u128),
        };
        let outcome = chat.handle(ctx, command);
        trace.push(format!("{outcome:?}"));
        while let Some(e) = chat.poll_event() {
            trace.push(format!("{e:?}"));
        }
    }
    (trace, now)
}

proptest! {
    #[test]
    fn a_chat_from_its_snapshot_goes_on_the_same(
        steps in proptest::collection::vec(step(), 1..120),
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(steps.len());
        let start = 1_700_000_000_000i64;
        let mut original = Chat::new(config());
        let (_, now) = run(&mut original, &steps[..cut], start, 1);
        // Through JSON, as a store or a snapshot bucket keeps it.
        let json = serde_json::to_string(&original.snapshot()).expect("encodes");
        let snapshot: ChatSnapshot = serde_json::from_str(&json).expect("decodes");
        prop_assert_eq!(&snapshot, &original.snapshot());
        let mut rebuilt = Chat::from_snapshot(config(), snapshot);
        prop_assert_eq!(rebuilt.snapshot(), original.snapshot());

        let rest = &steps[cut..];
        let a = run(&mut original, rest, now, 1_000);
        let b = run(&mut rebuilt, rest, now, 1_000);
        prop_assert_eq!(a, b);
        prop_assert_eq!(original.snapshot(), rebuilt.snapshot());
    }
}

#[test]
fn a_snapshot_keeps_the_rate_limit_that_messages_alone_forget() {
    let mut chat = Chat::new(config());
    let ctx = |i: u128| Context {
        user: "u".into(),
        now: Timestamp::from_unix_millis(1_700_000_000_000 + i as u64),
        message_id: Uuid::from_u128(i),
    };
    let say = || {
        ClientFrame::SendMessage(SendMessage {
            text: "x".into(),
            author_name: None,
        })
    };
    for i in 1..=4 {
        chat.handle(ctx(i), say()).expect("within the limit");
        while chat.poll_event().is_some() {}
    }
    let mut rebuilt = Chat::from_snapshot(config(), chat.snapshot());
    assert!(
        rebuilt.handle(ctx(5), say()).is_err(),
        "the fifth is refused"
    );
    // Restored from its messages alone, the limit would start empty.
    let messages = chat.history().iter().cloned().collect::<Vec<_>>();
    let (mut forgetful, _) = Chat::restore(config(), messages, chat.head());
    assert!(forgetful.handle(ctx(5), say()).is_ok());
}
