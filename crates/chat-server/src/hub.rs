//! The ordering point: where commands from every connection are put in one
//! order and applied to the chat.
//!
//! Events flow one way, through one pipeline: **apply → commit → publish**.
//!
//! - A connection hands each command to a [`Sequencer`]. The one here,
//!   [`Hub`], applies it under one short lock, which gives a single order
//!   for all events (and their [`Position`](chat_proto::Position)s), and
//!   queues the events for their commit in that order (after reserving a
//!   place, so a slow disk makes senders wait instead of memory grow).
//! - The committer (see [`crate::pipeline`]) writes each batch with its
//!   writer and then publishes it to the [`Log`](crate::log::Log), where
//!   connections read it.
//!
//! Connections see only the [`Sequencer`] trait and the log, so another
//! ordering point (a replicated log shared by several servers) can replace
//! the hub without touching them.

use crate::clock::Clock;
use crate::pipeline::Commits;
use chat_core::{Chat, ChatError, Context};
use chat_proto::{ClientFrame, UserId, Uuid};
use futures_util::future::BoxFuture;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Whether the ordering point can take commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Taking commands; the node serves.
    Serving,
    /// Still applying what its log held when it started: not yet serving.
    CatchingUp,
    /// It stopped applying, for the reason given, and will not go on by
    /// itself.
    Stopped(&'static str),
}

/// Puts clients' commands in the chat's one order.
pub(crate) trait Sequencer: Send + Sync + std::fmt::Debug {
    /// Whether it takes commands now (`/healthz`, and new connections,
    /// follow it).
    fn health(&self) -> Health {
        Health::Serving
    }

    /// Applies `command` for `user`. `Ok` means it was accepted and its
    /// event will be published once committed (the client sees it then,
    /// like everyone else); a refusal is for that client alone.
    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: ClientFrame,
    ) -> BoxFuture<'a, Result<(), ApplyError>>;
}

/// The chat, applying commands in one order in this process.
#[derive(Debug)]
pub(crate) struct Hub {
    chat: Mutex<Chat>,
    /// Where applied events wait for their commit, in the order applied.
    commits: Commits,
    /// The time each command is stamped with.
    clock: Clock,
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The chat refused it; tell the client.
    #[error(transparent)]
    Refused(#[from] ChatError),
    /// The server is stopping and no longer commits.
    #[error("server stopping")]
    Stopping,
    /// The ordering point could not take the command (the cluster's log is
    /// unreachable); it was not applied, and may be sent again.
    #[error("the chat is unavailable")]
    Unavailable,
}

/// Recovers a lock whose holder panicked: nothing under it panics, and if
/// something ever did, the chat is still consistent (each command is
/// applied whole or not at all).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// A hub around `chat` (empty, or restored from a store) whose applied
    /// events go to `commits`, stamped with `clock`'s time.
    pub(crate) fn new(chat: Chat, commits: Commits, clock: Clock) -> Self {
        Hub {
            chat: Mutex::new(chat),
            commits,
            clock,
        }
    }

    /// Applies one command for `user`, stamping it with the time and a new
    /// message id. Accepted events are committed, then published; a refusal
    /// is returned for that client alone.
    pub(crate) async fn apply(
        &self,
        user: &UserId,
        command: ClientFrame,
    ) -> Result<(), ApplyError> {
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
        Ok(())
    }
}

impl Sequencer for Hub {
    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: ClientFrame,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.apply(user, command))
    }
}
