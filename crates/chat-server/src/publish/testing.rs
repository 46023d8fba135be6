//! What the tests of `publish` share: chats driven through commands, and
//! logs to publish them to.

use super::entry::Entry;
use super::log::Log;
use super::recent::{Behind, Retention};
use crate::metrics::Metrics;
use crate::wire::frame::Frame;
use chat_core::Chat;
use chat_proto::{Epoch, Position, Uuid};
use std::sync::Arc;

use chat_core::{Config, Context, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage};

pub(crate) const EPOCH: Epoch = Epoch(Uuid::from_u128(7));

/// A chat driven through `n` commands (posts, and reactions to older
/// messages), with the entries it produced; its history holds 8
/// messages.
pub(crate) fn drive(n: u64) -> (Chat, Vec<Entry>) {
    drive_holding(n, 8)
}

/// [`drive`], with a history of `limit` messages.
pub(crate) fn drive_holding(n: u64, limit: usize) -> (Chat, Vec<Entry>) {
    let mut chat = Chat::new(Config {
        history_limit: limit,
        ..Config::default()
    });
    let mut entries = Vec::new();
    let mut posted = Vec::new();
    for i in 0..n {
        let ctx = Context {
            user: format!("u{}", i % 3).as_str().into(),
            now: Timestamp::from_unix_millis(1_700_000_000_000 + i),
            message_id: Uuid::from_u128(1000 + u128::from(i)),
        };
        let command = if i % 3 == 2 && !posted.is_empty() {
            ClientFrame::AddReaction(AddReaction {
                message_id: posted[(i as usize / 3) % posted.len()],
                emoji: "👍".into(),
            })
        } else {
            posted.push(ctx.message_id);
            ClientFrame::SendMessage(SendMessage {
                text: format!("m{i}"),
                author_name: None,
            })
        };
        if chat.handle(ctx, command).is_ok() {
            entries.extend(std::iter::from_fn(|| chat.poll_event()).map(Entry::from));
        }
    }
    (chat, entries)
}

pub(crate) fn log_of(events: usize) -> Log {
    let chat = Chat::new(Config {
        history_limit: 8,
        ..Config::default()
    });
    let retention = Retention {
        events,
        bytes: usize::MAX,
    };
    Log::new(&chat, EPOCH, [], retention, Arc::new(Metrics::new()))
}

/// Offers at most `step` frames per read, as a writer with room for
/// that many does: the frames after `cursor`, read to the head.
pub(crate) fn read_in_steps(
    read: impl Fn(Position, &mut dyn FnMut(&Frame) -> bool) -> Result<bool, Behind>,
    cursor: Position,
    step: usize,
) -> Result<Vec<Frame>, Behind> {
    let mut out = Vec::new();
    let mut at = cursor;
    loop {
        let mut took = 0;
        let done = read(at, &mut |f: &Frame| {
            if took == step {
                return false;
            }
            out.push(f.clone());
            took += 1;
            true
        })?;
        at = Position(at.0 + took as u64);
        if done {
            return Ok(out);
        }
    }
}
