//! The chat's WebSocket server.
//!
//! A raw tokio-tungstenite accept loop around `chat-core`: the core decides
//! what happens, this crate carries it out over sockets. It is a library as
//! well as a binary, so a test or another program can run a server on port
//! 0, learn its address and shut it down:
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
//! The modules, one concern each:
//! - `server`: binding, running and stopping the server;
//! - [`config`]: every setting and bound;
//! - [`clock`]: the time commands are stamped with;
//! - [`cluster`]: cluster mode, an ordering point on NATS JetStream;
//! - `listener`: the accept loop and the connection limit;
//! - [`http`]: HTTP/1 on the same port: the codec, the keep-alive loop, the
//!   routes (the page, health, metrics, whoami), the upgrade's form and the
//!   101, and every refusal's status;
//! - `metrics`: what `/metrics` reports;
//! - [`admission`]: the chat's rules for a handshake: path, origin, client
//!   address, the `/ws` query and the per-address limit;
//! - `limits`: places per address (open connections, pending requests);
//! - [`host`]: which `Host` names the server answers to (DNS rebinding);
//! - [`identity`]: from an address to a user id;
//! - `hub`: the ordering point, the chat applying commands in one order;
//! - `pipeline`: apply → commit → publish, and the committer;
//! - `log`: what is published: history, recent events, head;
//! - `resume`: the `/ws` query (`?sync`, `?since=&epoch=`);
//! - [`store`]: the durable history, a plain writer of events;
//! - `delivery`: one connection's delivery, a state machine without I/O:
//!   its queue, cursor, parking, deadlines and close;
//! - `tap`: the publisher writing for connections parked at the head;
//! - `wire`: the socket after the handshake, frames framed once;
//! - `connection`: one client, reader and writer; `close`: why it ended,
//!   and the close code; `echo`: the conformance mode (`--echo`);
//! - [`shutdown`]: signals and the graceful stop.
#![forbid(unsafe_code)]

pub mod admission;
pub mod clock;
mod close;
pub mod cluster;
pub mod config;
mod connection;
mod delivery;
mod echo;
pub mod host;
pub mod http;
mod hub;
pub mod identity;
mod limits;
mod listener;
mod log;
mod metrics;
mod pipeline;
mod resume;
mod server;
pub mod shutdown;
pub mod store;
mod tap;
mod wire;

pub use config::Config;
pub use identity::IdentityMode;
pub use server::{Server, StartError, Stopped};
pub use tokio_util::sync::CancellationToken;

use server::Shared;
