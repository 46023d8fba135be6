//! The local sequencer: one chat in this process, applying commands under
//! one short lock.

use super::{ApplyError, Sequencer};
use crate::clock::Clock;
use crate::publish::pipeline::Commits;
use chat_core::{Chat, Command, Context, ModerationSnapshot};
use chat_proto::{Position, UserId, Uuid};
use futures_util::future::BoxFuture;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The chat, applying commands in one order in this process.
#[derive(Debug)]
pub(crate) struct LocalSequencer {
    chat: Mutex<Chat>,
    /// Where applied events wait for their commit, in the order applied.
    commits: Commits,
    /// The time each command is stamped with.
    clock: Clock,
}

/// Recovers a lock whose holder panicked: nothing under it panics, and if
/// something ever did, the chat is still consistent (each command is
/// applied whole or not at all).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalSequencer {
    /// A sequencer around `chat` (empty, or restored from a store) whose applied
    /// events go to `commits`, stamped with `clock`'s time.
    pub(crate) fn new(chat: Chat, commits: Commits, clock: Clock) -> Self {
        LocalSequencer {
            chat: Mutex::new(chat),
            commits,
            clock,
        }
    }

    /// Applies one command for `user`, stamping it with the time and a new
    /// message id. Accepted events are committed, then published; a refusal
    /// is returned for that client alone. `Ok` holds the position of the
    /// command's last event.
    pub(crate) async fn apply(
        &self,
        user: &UserId,
        command: impl Into<Command>,
    ) -> Result<Position, ApplyError> {
        // Take a place in the commit queue first: while the disk is behind,
        // this waits, and nothing is applied that could not be queued.
        let reserved = self
            .commits
            .reserve()
            .await
            .map_err(|_| ApplyError::Stopping)?;
        let ctx = Context {
            user: user.clone(),
            now: self.clock.now(),
            message_id: Uuid::now_v7(),
        };
        let mut chat = lock(&self.chat);
        chat.handle(ctx, command)?;
        // Sent under the lock, so the queue holds events in the order they
        // were applied.
        reserved.send(std::iter::from_fn(|| chat.poll_event()).collect());
        Ok(chat.head())
    }
}

impl Sequencer for LocalSequencer {
    fn moderation(&self) -> ModerationSnapshot {
        lock(&self.chat).moderation()
    }

    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: Command,
    ) -> BoxFuture<'a, Result<Position, ApplyError>> {
        Box::pin(self.apply(user, command))
    }
}
