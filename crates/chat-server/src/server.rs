//! The server: binding (store, chat, log, pipeline, listener) and running
//! until it is told to stop.

use crate::config::Config;
use crate::http::WS_PATH;
use crate::listener;
use crate::{cluster, log, pipeline};
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, Policy};
use crate::clock::Clock;
use crate::host::HostPolicy;
use crate::hub::{Health, Hub, Sequencer};
use crate::identity::Identity;
use crate::limits::AddressLimits;
use crate::log::Log;
use crate::metrics::Metrics;
use crate::pipeline::{Committer, Finished};
use crate::store::{DataDir, Store, StoreError};
use crate::wire::Frame;
use chat_core::{Chat, Timestamp};
use chat_proto::{Epoch, Uuid};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
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
    Cluster(#[from] cluster::ClusterError),
    /// The committer thread could not be started.
    #[error("cannot start the store's committer thread: {0}")]
    Thread(std::io::Error),
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// Where commands are put in order.
    pub(crate) order: Arc<dyn Sequencer>,
    /// What has been published, for connections to read.
    pub(crate) log: Arc<Log>,
    /// The chat's rules for joining.
    pub(crate) admission: Admission,
    /// Which `Host` every request must name.
    pub(crate) hosts: HostPolicy,
    /// Connections per TCP peer still in their request phase.
    pub(crate) pending: Arc<AddressLimits>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    /// Once stopping: when `--shutdown-grace` ends.
    pub(crate) stop_by: std::sync::OnceLock<tokio::time::Instant>,
    /// Every connection's bounds and deadlines.
    pub(crate) delivery: Arc<crate::delivery::Settings>,
}

impl Shared {
    /// Why the node does not serve now, if it does not: catching up with
    /// its cluster, or stopped applying.
    pub(crate) fn not_serving(&self) -> Option<&'static str> {
        match self.order.health() {
            Health::Serving => None,
            Health::CatchingUp => Some(CATCHING_UP),
            Health::Stopped(why) => Some(why),
        }
    }

    /// The deadline of a close that would end at `wanted`: no later than
    /// the end of the grace period, once the server is stopping.
    pub(crate) fn closing_deadline(&self, wanted: tokio::time::Instant) -> tokio::time::Instant {
        match self.stop_by.get() {
            Some(by) => wanted.min(*by),
            None => wanted,
        }
    }
}

/// What `/healthz` and a refused handshake say while a cluster node catches up.
const CATCHING_UP: &str = "catching up with the cluster's stream; not serving yet";

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
        let retention = log::Retention {
            events: config.log_events,
            bytes: config.log_bytes,
        };
        let metrics = Arc::new(Metrics::new());
        let fresh_epoch = Epoch(Uuid::new_v4());
        let mut cluster = match &config.cluster {
            None => None,
            Some(url) => {
                let settings = cluster::Settings {
                    url: url.clone(),
                    stream: config.cluster_stream.clone(),
                    replicas: config.cluster_replicas,
                    max_bytes: config.cluster_max_bytes,
                    node: config.node_id.clone().unwrap_or_else(|| {
                        format!("node-{}", &Uuid::new_v4().simple().to_string()[..8])
                    }),
                    timeout: config.cluster_timeout,
                    snapshot_every: config.cluster_snapshot_every,
                    rules: config.chat(),
                    local: own_dir.clone(),
                };
                Some(cluster::connect(&settings).await?)
            }
        };
        let fresh_epoch = cluster.as_ref().map_or(fresh_epoch, |c| c.epoch);
        let (chat, log) = match &mut store {
            None => {
                let chat = match &mut cluster {
                    Some(cluster) => cluster.initial_chat(config.chat()),
                    None => Chat::new(config.chat()),
                };
                let log = Log::new(&chat, fresh_epoch, [], retention, Arc::clone(&metrics));
                (chat, log)
            }
            Some(store) => {
                let started = std::time::Instant::now();
                if config.new_epoch {
                    store.set_epoch(fresh_epoch)?;
                    warn!(epoch = %fresh_epoch, "started a new epoch (--new-epoch): every client's next resume is a full replay");
                }
                let mut loaded = store.load(fresh_epoch)?;
                let (chat, dropped) = Chat::restore(config.chat(), loaded.messages, loaded.head);
                store.delete(&dropped)?;
                if !dropped.is_empty() {
                    // The history changed outside the log (a lower
                    // --history-limit): clients resuming would keep showing
                    // what is gone, so they start over instead.
                    let epoch = Epoch(Uuid::new_v4());
                    store.set_epoch(epoch)?;
                    loaded.epoch = epoch;
                    warn!(
                        dropped = dropped.len(),
                        %epoch,
                        "--history-limit is lower than the stored history: the oldest messages were deleted, and a new epoch started so that clients rebuild their lists"
                    );
                }
                let newest = chat.history().iter().last().map(|m| m.created_at);
                let newest_ms = newest.map_or(0, |s| u64::try_from(s).unwrap_or(0) * 1000);
                if let Some(ahead) = clock.behind(Timestamp::from_unix_millis(newest_ms)) {
                    warn!(
                        ahead = %humantime::format_duration(Duration::from_secs(ahead.as_secs())),
                        "the newest stored message is ahead of this host's clock; \
                         new messages are stamped on from it, so times never run backwards"
                    );
                }
                let recent = loaded
                    .recent
                    .into_iter()
                    .map(|e| (e.position, e.message, Frame::text(e.frame)));
                let log = Log::new(&chat, loaded.epoch, recent, retention, Arc::clone(&metrics));
                info!(
                    path = %store.path().display(),
                    messages = chat.history().len(),
                    epoch = %loaded.epoch,
                    head = %loaded.head,
                    took = ?started.elapsed(),
                    "history restored"
                );
                (chat, log)
            }
        };
        let log = Arc::new(log);
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
        // One pipeline either way: apply → commit → publish. In memory, the
        // writer writes nothing.
        let (commits, queue) =
            pipeline::commit_queue(config.commit_queue_bytes, config.largest_server_frame());
        let shutdown = CancellationToken::new();
        let pipe = pipeline::Pipe {
            queue,
            log: Arc::clone(&log),
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
        let order: Arc<dyn Sequencer> = match cluster {
            None => Arc::new(Hub::new(chat, commits, clock)),
            Some(cluster) => {
                let started = std::time::Instant::now();
                let (sequencer, applying) = cluster
                    .start(chat, commits, shutdown.clone(), Arc::clone(&log))
                    .await?;
                applier = Some(applying);
                let mut health = sequencer.watch_health();
                tokio::spawn(async move {
                    let _ = health.wait_for(|h| *h != Health::CatchingUp).await;
                    let now = *health.borrow();
                    match now {
                        Health::Serving => {
                            info!(took = ?started.elapsed(), "caught up with the cluster's stream: serving")
                        }
                        other => error!(?other, "not serving"),
                    }
                });
                Arc::new(sequencer)
            }
        };
        let shared = Shared {
            order,
            log,
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
            stop_by: std::sync::OnceLock::new(),
            delivery: Arc::new(config.delivery(std::time::Instant::now())),
            config,
        };
        // Bound last: once a client can connect, the history is restored
        // and its replay log serialized, so start-up time measured at the
        // first accepted connection includes both.
        let listener = TcpListener::bind(shared.config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: shared.config.listen,
                source,
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
        shared.log.wake_all();
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
        // With the connections gone, dropping the hub closes the commit
        // queue; the committer writes what is queued and stops.
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
