//! A chat rebuilt from a snapshot goes on exactly as the chat it was taken
//! from: that is what lets a node of a replicated chat start from another
//! node's snapshot instead of the whole log. Moderation is part of it:
//! restrictions, slow mode's memory, the room's modes and the audit trail.

use chat_core::{Chat, ChatSnapshot, Context, Timestamp};
use chat_proto::{ClientFrame, SendMessage, Uuid};
use proptest::prelude::*;

mod common;

use common::{command, config, step_moderated};

/// Applies `steps` from `start`, numbering ids from `first_id`; returns
/// what each did, as text.
fn run(
    chat: &mut Chat,
    steps: &[common::Step],
    mut now: i64,
    first_id: u128,
) -> (Vec<String>, i64) {
    let mut trace = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let (ctx, cmd, next) = command(chat, s, i, now, first_id + i as u128);
        now = next;
        let outcome = chat.handle(ctx, cmd);
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
        steps in proptest::collection::vec(step_moderated(), 1..120),
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
