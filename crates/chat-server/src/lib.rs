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
//! The modules, one concept each:
//! - [`config`]: every setting and bound;
//! - `listener`: the accept loop and the connection limit;
//! - [`handshake`]: path, origin, client address and per-address limits;
//! - [`identity`]: from an address to a user id;
//! - [`hub`]: the chat, its serialized history and the fan-out;
//! - [`connection`]: one client, reader and writer;
//! - [`shutdown`]: signals and the graceful stop.
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod handshake;
pub mod hub;
pub mod identity;
mod listener;
pub mod shutdown;

pub use config::{Config, IdentityMode};
pub use tokio_util::sync::CancellationToken;

use handshake::{AddressLimits, Policy};
use hub::Hub;
use identity::Identity;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No random identity secret could be drawn.
    #[error("cannot draw a random identity secret: {0}")]
    Random(getrandom::Error),
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    hub: Hub,
    policy: Policy,
    identity: Identity,
    addresses: Arc<AddressLimits>,
    shutdown: CancellationToken,
}

/// A bound, not yet running, server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Server {
    /// Checks the configuration and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let identity = match &config.identity_secret {
            Some(secret) => Identity::new(config.identity, secret),
            None => Identity::random(config.identity).map_err(StartError::Random)?,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Shared {
            hub: Hub::new(config.chat(), config.max_lag),
            policy: Policy {
                trusted_proxies: config.trusted_proxies.clone(),
                allowed_origins: config.allowed_origins.clone(),
            },
            identity,
            addresses: AddressLimits::new(config.max_connections_per_ip),
            shutdown: CancellationToken::new(),
            config,
        };
        Ok(Server {
            listener,
            local_addr,
            shared: Arc::new(shared),
        })
    }

    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Cancelling this token stops the server gracefully.
    pub fn shutdown_handle(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Serves until the shutdown handle is cancelled. Then it stops
    /// accepting, sends every client 1001 "going away", and waits up to
    /// `--shutdown-grace` for them before returning.
    pub async fn run(self) {
        let Server {
            listener,
            local_addr,
            shared,
        } = self;
        info!(addr = %local_addr, path = handshake::WS_PATH, "listening");
        let tasks = TaskTracker::new();
        let accept = tokio::spawn(listener::accept_loop(
            listener,
            Arc::clone(&shared),
            tasks.clone(),
        ));
        shared.shutdown.cancelled().await;
        let _ = accept.await;
        tasks.close();
        info!(open = tasks.len(), "shutting down: closing connections");
        let grace = shared.config.shutdown_grace;
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!(
                left = tasks.len(),
                "connections still open after the grace period"
            );
        }
        info!("stopped");
    }
}
