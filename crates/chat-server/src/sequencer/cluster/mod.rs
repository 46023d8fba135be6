//! Cluster mode (`--cluster nats://HOST:PORT`): several servers, one chat,
//! ordered by one NATS JetStream stream (state-machine replication).
//!
//! A node that receives a command wraps it in an [`Envelope`](envelope::Envelope) (origin node,
//! request id, the user as this node judged it, the command) and publishes
//! it to the stream, with `Nats-Msg-Id` set so that a retry is stored once.
//! Every node reads the whole stream in order with its own ordered consumer
//! and applies each entry to its own `chat-core`, with a context derived
//! from the entry alone: the time is the stream's timestamp, the new
//! message's id is made from the stream sequence, the user comes from the
//! envelope. Every node therefore computes the same state, the same events
//! and the same positions. The origin node hands the outcome of its own
//! entries (accepted, or refused) back to the connection that sent them.
//!
//! A node starts from the newest snapshot it can find of the stream's
//! chat, its own (in its data directory, written every
//! `--cluster-snapshot-every` entries and when it stops) or the cluster's
//! (in the stream's object store), then applies the stream from there on.
//! It does not serve until it has applied what the stream held when it
//! joined.

//!
//! The parts, each a file:
//! - [`envelope`]: one command in the stream, and its pure apply;
//! - [`view`]: what a node knows of its chat to refuse early;
//! - [`snapshot`]: the cluster's snapshots and each node's own;
//! - [`erase`]: a removed message's entry erased from the stream, and the
//!   tombstone applied in its place;
//! - [`nats`]: the connection, the stream, and where to start reading;
//! - [`applier`]: the task that applies the stream;
//! - [`submit`]: the sequencer that connections hand commands to.

pub(crate) mod applier;
pub(crate) mod envelope;
pub(crate) mod erase;
pub(crate) mod nats;
pub(crate) mod snapshot;
pub(crate) mod submit;
pub(crate) mod view;

pub(crate) use applier::state_name;
