//! `Chat::refused_until` may only say what is sure: a node of a replicated
//! chat refuses, without putting it in the shared log, a command from a
//! user whose allowance is used up at the node's (possibly older) state,
//! before the time it names. Whatever the log applies first, the log must
//! then refuse that command too.

mod common;

use chat_core::{Chat, ChatError, Command, RateKind};
use chat_proto::{ClientFrame, UserId};
use common::{command, config, step_by};
use proptest::prelude::*;

proptest! {
    #[test]
    fn whatever_is_applied_first_the_log_refuses_what_refused_until_names(
        // Whole seconds, often none: users reach their limits (4 a
        // minute) and their windows end exactly on a step, so the bound
        // is tested at the millisecond. (Measured: 196 of 256 cases check
        // at least one command, 1,349 in all; the bound made 1 ms later
        // fails.)
        steps in proptest::collection::vec(
            step_by(prop_oneof![6 => (0i64..4).prop_map(|s| s * 1000), 1 => (-20i64..0).prop_map(|s| s * 1000)]),
            1..200,
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(steps.len());
        let mut chat = Chat::new(config());
        let mut now = 1_700_000_000_000i64;
        for (i, s) in steps[..cut].iter().enumerate() {
            let (ctx, cmd, next) = command(&chat, s, i, now, i as u128 + 1);
            now = next;
            let _ = chat.handle(ctx, cmd);
            while chat.poll_event().is_some() {}
        }
        // What the node, at this state, would refuse until when.
        let sure: Vec<(UserId, RateKind, chat_core::Timestamp)> = (0..4)
            .flat_map(|u| [RateKind::Messages, RateKind::Reactions].map(|k| (u, k)))
            .filter_map(|(u, k)| {
                let user = UserId::from(format!("u{u}").as_str());
                chat.refused_until(k, &user).map(|t| (user, k, t))
            })
            .collect();
        // The log goes on: every command it applies that the node would
        // have refused is refused.
        for (i, s) in steps[cut..].iter().enumerate() {
            let (ctx, cmd, next) = command(&chat, s, cut + i, now, (cut + i) as u128 + 1);
            now = next;
            let kind = match cmd {
                Command::Client(ClientFrame::SendMessage(_)) => RateKind::Messages,
                Command::Client(ClientFrame::AddReaction(_)) => RateKind::Reactions,
                Command::Moderation(_) => unreachable!("no moderation among these steps"),
            };
            let at = chat.time_at(ctx.now);
            let node_refuses = sure
                .iter()
                .any(|(u, k, until)| *u == ctx.user && *k == kind && at < *until);
            let outcome = chat.handle(ctx, cmd);
            if node_refuses {
                match (kind, &outcome) {
                    (RateKind::Messages, Err(e)) => prop_assert_eq!(e, &chat.rate_limited(kind)),
                    (RateKind::Reactions, Err(e)) => prop_assert!(
                        *e == chat.rate_limited(kind) || *e == ChatError::MessageNotFound,
                        "{e:?}"
                    ),
                    (_, Ok(())) => prop_assert!(false, "the node refused what the log accepts"),
                }
            }
            while chat.poll_event().is_some() {}
        }
    }
}
