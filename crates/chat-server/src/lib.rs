//! The chat's WebSocket server: a tokio server around `chat-core`. The
//! core decides what happens; this crate carries it out over sockets.
//!
//! It is a library as well as a binary, so a test or another program can
//! run a server on port 0, learn its address and shut it down:
//!
//! ```no_run
//! # async fn demo() -> Result<(), chat_server::StartError> {
//! let config = chat_server::Config { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
//! let server = chat_server::Server::bind(config).await?;
//! let addr = server.local_addr();
//! let stop = server.shutdown_handle();
//! let running = tokio::spawn(server.run());
//! // ... connect to ws://{addr}/ws ...
//! stop.cancel();
//! running.await.unwrap();
//! # Ok(()) }
//! ```
//!
//! The modules, top to bottom; each imports only from those below it
//! (the README's map, checked by `tests/module_map.rs`):
//!
//! - `server`: binding (restoring the chat, the pipeline, the sequencer,
//!   the listener), running and stopping;
//! - `front`: every accepted connection, from the accept to the WebSocket:
//!   the accept loop, plain HTTP routes, the handshake;
//! - `connection`: one client's WebSocket: reader, writer, close, echo;
//! - `shared`: what every connection's task shares;
//! - [`config`]: every setting and bound;
//! - `admission`: the chat's rules for a handshake: path, origin, `Host`,
//!   client address, the `/ws` query, the per-address limit, user ids;
//! - `sequencer`: where commands are put in one order and applied, in
//!   this process or across a cluster (NATS JetStream);
//! - `store`: the durable history, a plain writer of events;
//! - `publish`: apply → commit → publish, the published log, and the
//!   fan-out to connections waiting at its head;
//! - `metrics`: what `/metrics` reports;
//! - `wire`: one socket's frames, delivery state machine, link and close;
//! - `http`: plain HTTP/1, knowing nothing of the chat;
//! - [`clock`]: the time commands are stamped with; [`shutdown`]: signals.
//!
//! The public surface is what the binary, an embedder, the tests and the
//! fuzz targets use, and nothing else.
#![forbid(unsafe_code)]

mod admission;
/// Public for embedders and tests: [`Clock`] starts a server at a chosen
/// time ([`Server::bind_with_clock`]).
pub mod clock;
/// Public for the binary and embedders: [`Config`] and its value types.
pub mod config;
mod connection;
mod front;
mod http;
mod metrics;
mod publish;
mod sequencer;
mod server;
mod shared;
/// Public for the binary and embedders: the signals that stop a server.
pub mod shutdown;
mod store;
mod wire;

// For embedders and the binary: run a server, and learn why it stopped.
pub use clock::Clock;
pub use config::Config;
pub use server::{Server, StartError, Stopped};
pub use tokio_util::sync::CancellationToken;
// The errors a start can end in, named by `StartError`.
pub use sequencer::cluster::nats::ClusterError;
pub use store::{DB_FILE, StoreError};
// A setting's type (`Config::identity`), and for tests the user id a
// server gives an address.
pub use admission::identity::{Identity, IdentityMode};

/// The server's own rules and parsers, for the fuzz targets (`fuzz/`) and
/// the tests, which feed them hostile input without a socket. Not for
/// embedders: nothing here is needed to run a server.
pub mod checks {
    pub use crate::admission::host::HostPolicy;
    pub use crate::admission::policy::{Origin, Policy};
    pub use crate::http::{MAX_REQUESTS, Refusal, Request, check_upgrade, parse_head};
}
