//! The sequencer: where commands from every connection are put in one
//! order and applied to the chat.
//!
//! Events flow one way, through one pipeline: **apply → commit → publish**
//! (`crate::publish`).
//!
//! - A connection hands each command to the [`Sequencer`]. It applies the
//!   command, which gives a single order for all events (and their
//!   [`Position`](chat_proto::Position)s), and queues the events for
//!   their commit in that order (after reserving a place, so a slow disk
//!   makes senders wait instead of memory grow).
//! - The committer (`crate::publish::pipeline`) writes each batch and then
//!   publishes it, where connections read it.
//!
//! Two sequencers: [`local`], one chat in this process, and [`cluster`],
//! one chat for several servers, ordered by a NATS JetStream stream.
//! Connections see only the [`Sequencer`] trait and the log, so either
//! serves them alike.

pub(crate) mod cluster;
pub(crate) mod local;

use chat_core::{ChatError, Command, ModerationSnapshot};
use chat_proto::{Position, UserId};
use futures_util::future::BoxFuture;
/// Whether the sequencer can take commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Taking commands; the node serves.
    Serving,
    /// Still applying what its log held when it started: not yet serving.
    CatchingUp,
    /// It stopped applying, for the reason given, and will not go on by
    /// itself. What it applied is still the chat as far as it goes: open
    /// connections keep reading it.
    Stopped(&'static str),
    /// Its log is not the one it applied (the stream went back, was
    /// recreated, or lost entries this node needed), for the reason given:
    /// what it holds is not the chat, and it serves none of it.
    Broken(&'static str),
}

/// What `/healthz`, `/readyz` and a refused handshake say while a cluster
/// node catches up.
const CATCHING_UP: &str = "catching up with the cluster's stream; not serving yet";

impl Health {
    /// `Ok` when serving, else why not: the one text `/healthz`, `/readyz`
    /// and a refused handshake give.
    pub(crate) fn serving(self) -> Result<(), &'static str> {
        match self {
            Health::Serving => Ok(()),
            Health::CatchingUp => Err(CATCHING_UP),
            Health::Stopped(why) | Health::Broken(why) => Err(why),
        }
    }
}

/// Puts clients' commands in the chat's one order.
pub(crate) trait Sequencer: Send + Sync + std::fmt::Debug {
    /// Whether it takes commands now (`/healthz`, and new connections,
    /// follow it).
    fn health(&self) -> Health {
        Health::Serving
    }

    /// Whether it can take a command now, and if not why (`/readyz`): as
    /// [`health`](Self::health) says, and not while the log it orders
    /// commands through has been unreachable for longer than it waits for
    /// one.
    fn ready(&self) -> Result<(), &'static str> {
        self.health().serving()
    }

    /// Moderation as applied (restrictions, the room's modes, the audit
    /// trail), for the operator API: what is published may be a commit
    /// behind.
    fn moderation(&self) -> ModerationSnapshot;

    /// Applies `command` for `user`. `Ok` means it was accepted, and
    /// gives the position of its (last) event, which will be published
    /// once committed (the client sees it then, like everyone else); a
    /// refusal is for that client alone.
    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: Command,
    ) -> BoxFuture<'a, Result<Position, ApplyError>>;
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
    /// The command was not applied, and never will be (it reached no log
    /// in time, or this node does not serve now); it may be sent again.
    #[error("not taken")]
    NotTaken,
    /// Whether the command was taken is not known: the cluster's log was
    /// unreachable throughout. If it was, it shows up like any other.
    #[error("not confirmed")]
    Unavailable,
}
