//! The server: binding (store, chat, log, pipeline, listener) and running
//! until it is told to stop.

mod restore;

use crate::admission::Admission;
use crate::admission::host::HostPolicy;
use crate::admission::identity::Identity;
use crate::admission::limits::AddressLimits;
use crate::admission::operators::{Denied, Operators};
use crate::admission::policy::Policy;
use crate::clock::Clock;
use crate::config::Config;
use crate::front::listener;
use crate::http::WS_PATH;
use crate::metrics::Metrics;
use crate::publish::fanout::Fanout;
use crate::publish::pipeline::{self, Committer, Finished};
use crate::sequencer::cluster::{self, nats::ClusterError};
use crate::sequencer::local::LocalSequencer;
use crate::sequencer::{Health, Sequencer};
use crate::shared::Shared;
use crate::store::data_dir::DataDir;
use crate::store::{Store, StoreError};
use chat_proto::{Epoch, Uuid};
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

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
    /// The durable store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cluster could not be joined.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The committer thread could not be started.
    #[error("cannot start the store's committer thread: {0}")]
    Thread(std::io::Error),
}

/// How [`Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was asked to stop, and did.
    Gracefully,
    /// The store failed for longer than `--max-store-outage`, and the
    /// server stopped itself: the process should exit non-zero.
    StoreFailed,
}

/// A bound, not yet running, server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    committer: Committer,
    /// A cluster node's task that applies the stream.
    applier: Option<JoinHandle<()>>,
}

impl Server {
    /// Checks the configuration, opens the store (unless `in_memory`) and
    /// rebuilds the chat from it, and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        Server::bind_with_clock(config, Clock::system()).await
    }

    /// [`bind`](Self::bind), with commands stamped by `clock` instead of
    /// the host's clock (tests start servers at chosen times with it).
    pub async fn bind_with_clock(config: Config, clock: Clock) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        // Read first: a keys file that is wrong stops the start at once.
        let operators = match &config.admin_keys_file {
            Some(path) => {
                let operators = Operators::load(path).map_err(StartError::Config)?;
                info!(
                    keys = operators.len(),
                    "the operator API is on, under /admin/"
                );
                Some(operators)
            }
            None => None,
        };
        // A cluster node keeps only its own snapshot of the chat in its
        // data directory; the history lives in the stream.
        let own_dir = if config.cluster.is_some() && !config.in_memory {
            Some(Arc::new(DataDir::lock(&config.data_dir)?))
        } else {
            None
        };
        let mut store = if config.cluster.is_some() {
            info!(
                dir = ?own_dir.as_ref().map(|d| d.path().display().to_string()),
                "cluster mode: the history lives in the JetStream stream; this node keeps it in memory, and its own snapshot in its data directory"
            );
            None
        } else if config.in_memory {
            info!("history is in memory only (--in-memory)");
            None
        } else {
            Some(Store::open(&config.data_dir, config.log_events)?)
        };
        let identity = match (&config.identity_secret, &mut store) {
            (Some(secret), _) => Identity::new(config.identity, secret.expose()),
            (None, store) => {
                let fresh = Identity::random_key().map_err(StartError::Random)?;
                let key = match store {
                    Some(store) => store.identity_key(fresh)?,
                    None => fresh,
                };
                Identity::from_key(config.identity, key)
            }
        };
        let metrics = Arc::new(if config.cluster.is_some() {
            Metrics::with_cluster()
        } else {
            Metrics::new()
        });
        if operators.is_some() {
            metrics.expect_admin_denials(Denied::KINDS);
        }
        let fresh_epoch = Epoch(Uuid::new_v4());
        let mut cluster = match &config.cluster {
            None => None,
            Some(url) => {
                let settings = cluster::nats::Settings {
                    url: url.clone(),
                    stream: config.cluster_stream.clone(),
                    replicas: config.cluster_replicas,
                    max_bytes: config.cluster_max_bytes,
                    node: config.node_id.clone().unwrap_or_else(|| {
                        format!("node-{}", &Uuid::new_v4().simple().to_string()[..8])
                    }),
                    timeout: config.cluster_timeout,
                    snapshot_every: config.cluster_snapshot_every,
                    snapshot_bytes: config.cluster_snapshot_bytes,
                    rules: config.chat(),
                    rule_flags: config.rule_flags(),
                    identity: identity.fingerprint(),
                    local: own_dir.clone(),
                    metrics: metrics.cluster.clone(),
                };
                Some(cluster::nats::connect(&settings).await?)
            }
        };
        let (chat, log) = restore::restore(
            &config,
            store.as_mut(),
            cluster.as_mut(),
            fresh_epoch,
            &clock,
            Arc::clone(&metrics),
        )?;
        let log = Arc::new(log);
        // One pipeline either way: apply → commit → publish. In memory, the
        // writer writes nothing.
        let (commits, queue) =
            pipeline::commit_queue(config.commit_queue_bytes, config.largest_server_frame());
        let shutdown = CancellationToken::new();
        let fanout = Arc::new(Fanout::default());
        let pipe = pipeline::Pipe {
            queue,
            log: Arc::clone(&log),
            fanout: Arc::clone(&fanout),
            metrics: Arc::clone(&metrics),
            max_outage: config.max_store_outage,
            stop: shutdown.clone(),
        };
        let committer = match store {
            Some(store) => pipeline::spawn_committer(store, pipe),
            None => pipeline::spawn_committer(pipeline::Discard, pipe),
        }
        .map_err(StartError::Thread)?;
        let mut applier = None;
        let unserved = CancellationToken::new();
        let sequencer: Arc<dyn Sequencer> = match cluster {
            None => Arc::new(LocalSequencer::new(chat, commits, clock)),
            Some(cluster) => {
                let started = std::time::Instant::now();
                let (sequencer, applying) = cluster::applier::start(
                    cluster,
                    chat,
                    commits,
                    shutdown.clone(),
                    Arc::clone(&log),
                )
                .await?;
                applier = Some(applying);
                // The node's state in /metrics, as it changes.
                let mut states = sequencer.watch_health();
                let reported = metrics.cluster.clone();
                tokio::spawn(async move {
                    loop {
                        reported.set_state(cluster::state_name(*states.borrow_and_update()));
                        if states.changed().await.is_err() {
                            break;
                        }
                    }
                });
                let mut health = sequencer.watch_health();
                let unserved = unserved.clone();
                let fanout = Arc::clone(&fanout);
                tokio::spawn(async move {
                    let _ = health.wait_for(|h| *h != Health::CatchingUp).await;
                    let now = *health.borrow();
                    match now {
                        Health::Serving => {
                            info!(took = ?started.elapsed(), "caught up with the cluster's stream: serving")
                        }
                        other => error!(?other, "not serving"),
                    }
                    // Broken: every connection closes, and its client
                    // reconnects to a node that serves. (A stop of the
                    // server drops the sender instead: nothing to do.)
                    let broken = health.wait_for(|h| matches!(h, Health::Broken(_))).await;
                    if broken.is_ok() {
                        unserved.cancel();
                        fanout.wake_all();
                    }
                });
                Arc::new(sequencer)
            }
        };
        let shared = Shared {
            operators,
            clock,
            sequencer,
            log,
            fanout,
            admission: Admission::new(
                Policy {
                    trusted_proxies: config.trusted_proxies.clone(),
                    allowed_origins: config.allowed_origins.clone(),
                },
                identity,
                config.max_connections_per_ip,
            ),
            hosts: HostPolicy::new(config.listen, &config.public_hosts),
            pending: AddressLimits::new(config.max_pending_per_ip),
            metrics,
            shutdown,
            unserved,
            stop_by: std::sync::OnceLock::new(),
            delivery: Arc::new(config.delivery(std::time::Instant::now())),
            config,
        };
        // Bound last: once a client can connect, the history is restored
        // and its replay log serialized, so start-up time measured at the
        // first accepted connection includes both.
        let listener =
            listen(shared.config.listen, shared.config.listen_backlog).map_err(|source| {
                StartError::Bind {
                    addr: shared.config.listen,
                    source,
                }
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: shared.config.listen,
            source,
        })?;
        Ok(Server {
            listener,
            local_addr,
            shared: Arc::new(shared),
            committer,
            applier,
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

    /// Serves until the shutdown handle is cancelled (or the store has
    /// failed for `--max-store-outage`). Then it stops accepting, sends
    /// every client 1001 "going away", and waits up to `--shutdown-grace`
    /// for them and for the store to write what it holds, whatever the disk
    /// does, before returning.
    pub async fn run(self) -> Stopped {
        let Server {
            listener,
            local_addr,
            shared,
            committer,
            applier,
        } = self;
        if shared.hosts.accepts_any() {
            warn!(
                "every Host is accepted (no --public-host, listening on a non-loopback address): \
                 a web page on a name that resolves to this server (DNS rebinding) can read the chat \
                 and post as its visitor. List the names users type with --public-host chat.example.com \
                 (address literals and localhost always work)"
            );
        }
        info!(addr = %local_addr, path = WS_PATH, "listening");
        let page = if local_addr.ip().is_unspecified() {
            format!("http://localhost:{}/", local_addr.port())
        } else {
            format!("http://{local_addr}/")
        };
        info!("web client at {page}");
        let tasks = TaskTracker::new();
        let accept = tokio::spawn(listener::accept_loop(
            listener,
            Arc::clone(&shared),
            tasks.clone(),
        ));
        shared.shutdown.cancelled().await;
        // One deadline for everything, so a stuck disk cannot stretch it;
        // connections closing meanwhile give up at it too.
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
        let _ = shared.stop_by.set(deadline);
        // No command is applied from now on; what was is still written.
        committer.close_queue();
        // Connections waiting at the log's head wait on nothing else.
        shared.fanout.wake_all();
        let _ = accept.await;
        tasks.close();
        info!(open = tasks.len(), "shutting down: closing connections");
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = tasks.len(),
                "connections still open after the grace period"
            );
        }
        // A cluster node stops applying and writes its own snapshot.
        if let Some(applier) = applier
            && tokio::time::timeout_at(deadline, applier).await.is_err()
        {
            warn!(
                "this node's snapshot was not written within the grace period; its next start catches up from an older one"
            );
        }
        // With the connections gone, dropping the sequencer closes the
        // commit queue; the committer writes what is queued and stops.
        drop(shared);
        let outage = committer.stopped_the_server();
        let finished = committer.finish(deadline).await;
        if finished == Finished::GaveUp {
            error!(
                "stopped without writing everything accepted: what was not written was never shown to anyone, and everything shown is on disk"
            );
        }
        if outage {
            error!("stopped: the store failed for longer than --max-store-outage");
            return Stopped::StoreFailed;
        }
        info!("stopped");
        Stopped::Gracefully
    }
}

/// Listens on `addr` as `TcpListener::bind` does (with `SO_REUSEADDR`, so
/// a restart finds its port free past the old connections' TIME_WAIT), with
/// a listen backlog of `backlog` rather than the runtime's default (128).
fn listen(addr: SocketAddr, backlog: usize) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog).unwrap_or(u32::MAX))
}
