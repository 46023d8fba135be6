//! Every setting of the server, as a flag with an environment twin.
//!
//! Each bound a client can push against is named here, so an operator can
//! see and change all of them in `--help`, and so tests can shrink them.

use crate::admission::identity::Identity;
use crate::wire::delivery;
use chat_core::RateLimit;
use clap::{CommandFactory, FromArgMatches, Parser};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// The types of `Config`'s fields, for an embedder who fills them in.
pub use crate::admission::host::PublicHost;
pub use crate::admission::identity::IdentityMode;
pub use crate::admission::policy::AllowedOrigin;

/// A real-time WebSocket chat server.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-server", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (the WebSocket endpoint is `/ws`).
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    // --- Storage -----------------------------------------------------------
    /// Directory of the durable history (an SQLite database). Created if
    /// missing; only one server may use it at a time.
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "chat-data")]
    pub data_dir: PathBuf,

    /// Keep history in memory only: it is gone when the server stops.
    #[arg(long, env = "CHAT_IN_MEMORY")]
    pub in_memory: bool,

    // --- Cluster -----------------------------------------------------------
    /// Run as one node of a cluster ordered by this NATS server's
    /// JetStream (for example `nats://127.0.0.1:4222`, or several of a NATS
    /// cluster's servers separated by commas). Without it, the server is a
    /// single node with its own store.
    #[arg(long, env = "CHAT_CLUSTER")]
    pub cluster: Option<String>,

    /// The JetStream stream that orders the chat (cluster mode).
    #[arg(long, env = "CHAT_CLUSTER_STREAM", default_value = "chat")]
    pub cluster_stream: String,

    /// JetStream replicas of that stream: 1, or 3 on a NATS cluster of
    /// three or more servers (cluster mode).
    #[arg(long, env = "CHAT_CLUSTER_REPLICAS", default_value_t = 1)]
    pub cluster_replicas: usize,

    /// The most bytes the stream keeps; the oldest entries go first
    /// (cluster mode).
    #[arg(long, env = "CHAT_CLUSTER_MAX_BYTES", default_value_t = 1 << 30)]
    pub cluster_max_bytes: i64,

    /// How long a node waits for JetStream to confirm a command, and then
    /// for its own apply of it, before telling the client the chat is
    /// unavailable (cluster mode).
    #[arg(long, env = "CHAT_CLUSTER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cluster_timeout: Duration,

    /// Every how many stream entries a snapshot of the chat is stored in
    /// the stream's object store, for nodes that join after the stream
    /// has dropped its oldest entries (cluster mode).
    #[arg(long, env = "CHAT_CLUSTER_SNAPSHOT_EVERY", default_value_t = 1000)]
    pub cluster_snapshot_every: u64,

    /// The most bytes the stream's snapshot bucket holds (cluster mode; an
    /// existing bucket is changed to it at start). Three snapshots are
    /// kept; one of a full 10,000-message history is a few megabytes.
    #[arg(long, env = "CHAT_CLUSTER_SNAPSHOT_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cluster_snapshot_bytes: i64,

    /// This node's name in the cluster (default: a random one per start).
    #[arg(long, env = "CHAT_NODE_ID")]
    pub node_id: Option<String>,

    /// Start a new epoch of the log: every client's position becomes stale,
    /// and its next resume is a full replay. Use it once after restoring a
    /// backup into the data directory, whose positions clients may have
    /// seen go further. (A new data directory always starts a new epoch.)
    #[arg(long, env = "CHAT_NEW_EPOCH")]
    pub new_epoch: bool,

    /// Bytes of accepted commands waiting for their commit (to disk, or,
    /// with `--in-memory`, to the writer that writes nothing) before they
    /// are published; while full, senders wait (backpressure) instead of
    /// memory growing. Each command takes twice the largest frame the
    /// rules allow (the most its event can hold), whatever its size: 16
    /// MiB is about 200 commands of the default rules' 41 KB frames.
    #[arg(long, env = "CHAT_COMMIT_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub commit_queue_bytes: usize,

    /// How long commits may keep failing (a full or broken disk) before the
    /// server stops itself and exits non-zero, so a supervisor notices,
    /// rather than answering `/healthz` with 503 for ever. Nothing is lost:
    /// what was not written was never shown.
    #[arg(long, env = "CHAT_MAX_STORE_OUTAGE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub max_store_outage: Duration,

    // --- Connections -------------------------------------------------------
    /// Most connections open at once, handshakes included; beyond it a
    /// handshake is refused with 503.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Connections the kernel queues until the server accepts them (the
    /// listen backlog, capped by the kernel at `net.core.somaxconn`). When
    /// it is full the kernel drops a new connection's first packet, and
    /// that client waits a second to try again: a cluster node's clients,
    /// all reconnecting to the others at once when it dies, need room.
    #[arg(long, env = "CHAT_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: usize,

    /// Most connections from one client address (an IPv6 /64 counts as one);
    /// beyond it a handshake is refused with 429.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,

    /// Connections from one TCP peer address (an IPv6 /64 counts as one)
    /// still in their request phase: plain HTTP, or a handshake not yet
    /// finished. Beyond it, an idle keep-alive connection from the address
    /// is closed to make room, or with none the new connection is closed at
    /// once, so one address cannot hold every `--max-connections` slot with
    /// silent sockets. Trusted proxies are exempt.
    #[arg(long, env = "CHAT_MAX_PENDING_PER_IP", default_value_t = 64)]
    pub max_pending_per_ip: usize,

    /// Time a client has to send a whole request head (a WebSocket
    /// handshake or a plain HTTP request) and, for a handshake, to finish it.
    /// It also bounds how long an idle HTTP keep-alive connection stays open.
    #[arg(long, env = "CHAT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest HTTP request head (request line and headers), in bytes, for
    /// handshakes and plain HTTP alike; a bigger one gets 431.
    #[arg(long, env = "CHAT_MAX_REQUEST_HEAD", default_value_t = 8 * 1024)]
    pub max_request_head: usize,

    /// Largest incoming WebSocket frame and message, in bytes; a bigger one
    /// closes the connection with 1009.
    #[arg(long, env = "CHAT_MAX_MESSAGE_SIZE", default_value_t = 16 * 1024)]
    pub max_message_size: usize,

    /// The most bytes one read from a client's socket takes. The buffer
    /// is held only until the frames in it are decoded: a connection that
    /// sends nothing holds none. Chat commands are a few hundred bytes.
    #[arg(long, env = "CHAT_READ_BUFFER_SIZE", default_value_t = 4096)]
    pub read_buffer_size: usize,

    /// tungstenite's buffer for the frames it writes itself (answers to
    /// pings and close frames, and in `--echo` mode the echoed frames), in
    /// bytes. Chat frames do not go through it: they are framed once for
    /// every client and written straight from the shared log.
    #[arg(long, env = "CHAT_WRITE_BUFFER_SIZE", default_value_t = 2 * 1024)]
    pub write_buffer_size: usize,

    /// Largest frame the server may send, in bytes. The chat rules decide
    /// how large a frame can get (a `reaction_updated` carries the whole
    /// message with every reactor); the server refuses to start if they
    /// allow a frame larger than this. Every connection's send queue
    /// (`--send-queue-bytes`, at least this) takes one such frame, so any
    /// frame the chat produces is delivered.
    #[arg(long, env = "CHAT_MAX_SERVER_FRAME", default_value_t = 64 * 1024)]
    pub max_server_frame: usize,

    /// Kernel send buffer per connection (SO_SNDBUF), in bytes. What a
    /// client that stops reading can make the kernel hold for it; once it is
    /// full, the client falls behind and is dropped.
    #[arg(long, env = "CHAT_SOCKET_SEND_BUFFER", default_value_t = 64 * 1024)]
    pub socket_send_buffer: usize,

    /// The most bytes a connection's socket may hold not yet sent
    /// (TCP_NOTSENT_LOWAT, on Linux). Past it, what is queued for a client
    /// waits in the server's own queue, where pings and replies can go
    /// ahead of it, and where a socket that takes bytes again shows the
    /// client is reading (so a slow reader is not closed as idle).
    #[arg(long, env = "CHAT_SOCKET_UNSENT_BYTES", default_value_t = 16 * 1024)]
    pub socket_unsent_bytes: u32,

    /// How many of the latest events the server keeps (in memory, and in
    /// the store) for clients to read from: a live client that fell behind
    /// catches up from them, and a client reconnecting with `?since=`
    /// resumes from them. A live client further behind is closed with
    /// 1013; a resume from further back gets a `reset` and the full history.
    #[arg(long, env = "CHAT_LOG_EVENTS", default_value_t = 100_000)]
    pub log_events: usize,

    /// The most bytes of frames those events may hold in memory; the
    /// oldest go first (the newest is always kept).
    #[arg(long, env = "CHAT_LOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub log_bytes: usize,

    /// The most bytes of the log's frames queued for one connection
    /// beyond what its kernel send buffer holds: a client that reads
    /// slowly catches up from the log in steps of this size. At least
    /// `--max-server-frame`, so that any frame fits.
    #[arg(long, env = "CHAT_SEND_QUEUE_BYTES", default_value_t = 128 * 1024)]
    pub send_queue_bytes: usize,

    /// How many replies meant for one client only (error frames) may wait
    /// for it; while full, the server stops reading from that client.
    #[arg(long, env = "CHAT_REPLY_QUEUE", default_value_t = 16)]
    pub reply_queue: usize,

    /// Refused frames (malformed, or against the rules) one connection may
    /// send per 10 seconds; one more closes it with 1008. Ordinary clients
    /// never come near it; a client spraying junk stops costing CPU.
    #[arg(long, env = "CHAT_MAX_REFUSALS", default_value_t = 100)]
    pub max_refusals: u32,

    /// Time one batch of writes to a client may take before the client is
    /// considered stalled and dropped.
    #[arg(long, env = "CHAT_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// How often the server pings each connection.
    #[arg(long, env = "CHAT_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A connection that sends nothing (not even a pong) for this long is
    /// closed with 1008.
    #[arg(long, env = "CHAT_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to wait for clients to take the 1001
    /// close and for the store to write what it holds, before exiting
    /// anyway. A second signal exits at once.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    // --- Moderation ---------------------------------------------------------
    /// Turns on the operator API under `/admin/` (remove messages, time
    /// users out or ban them, slow mode, the audit trail): a file of one
    /// operator per line, a name and a key of at least 24 characters
    /// (`alice $(openssl rand -base64 32)`). The name is who the audit
    /// trail says acted. Without it there is no operator API.
    #[arg(long, env = "CHAT_ADMIN_KEYS_FILE")]
    pub admin_keys_file: Option<PathBuf>,

    // --- Identity and origin ----------------------------------------------
    /// How a user id is derived from the client address: `pseudonym` (a
    /// keyed hash, so addresses are never broadcast) or `raw-ip` (for
    /// trusted LANs).
    #[arg(long, env = "CHAT_IDENTITY", value_enum, default_value_t = IdentityMode::Pseudonym)]
    pub identity: IdentityMode,

    /// Secret key for pseudonyms, at least 16 characters (e.g. `openssl
    /// rand -base64 32`; pass it in `CHAT_IDENTITY_SECRET`, as `ps` shows
    /// a flag's value). Without it a random one is drawn at start and kept
    /// in the data directory.
    #[arg(long, env = "CHAT_IDENTITY_SECRET", hide_env_values = true)]
    pub identity_secret: Option<Secret>,

    /// Proxy networks (CIDR) whose `X-Forwarded-For` is believed. Repeat the
    /// flag or separate with commas. Without any, the header is ignored.
    #[arg(
        long = "trusted-proxy",
        env = "CHAT_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = proxy_net
    )]
    pub trusted_proxies: Vec<IpNet>,

    /// Browser origins allowed to connect besides the server's own (e.g.
    /// `https://chat.example.com`), or `*` for every page. Repeat or
    /// separate with commas. A browser handshake from any other `Origin`
    /// gets 403; requests with no `Origin` (non-browser clients) are
    /// accepted. The server's own origin is the one its `Host` header
    /// names, so the page it serves always connects.
    #[arg(
        long = "allowed-origin",
        env = "CHAT_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<AllowedOrigin>,

    /// Host names users reach the server by (e.g. `chat.example.com`),
    /// or `*` for any. Every request, page or WebSocket, must name one in
    /// its `Host` header, or `localhost`, or an address literal; others
    /// get 403, so a DNS-rebinding page cannot reach the server through a
    /// visitor's browser. Without any, a server on a loopback address
    /// accepts only `localhost` and address literals, and one on any other
    /// address accepts every name (and warns at start). Repeat or separate
    /// with commas.
    #[arg(long = "public-host", env = "CHAT_PUBLIC_HOSTS", value_delimiter = ',')]
    pub public_hosts: Vec<PublicHost>,

    /// Threads that serve connections. One, by default, like the event
    /// loop of uWebSockets: a chat's work is waking writers and handing
    /// shared frames to the kernel, and a second thread costs more (work
    /// moving between cores, reference counts bouncing between caches)
    /// than it adds until one core is full, about two million delivered
    /// frames a second on the machine in BENCHMARKS.md. Raise it on a
    /// machine whose cores are the server's own and busier than that.
    #[arg(long, env = "CHAT_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Echo every data frame back instead of chatting, through the same
    /// handshake, limits and close handling: for the Autobahn WebSocket
    /// conformance suite only.
    #[arg(long, hide = true)]
    pub echo: bool,

    // --- Chat rules ---------------------------------------------------------
    /// Most messages kept in history and replayed on connect.
    #[arg(long, env = "CHAT_HISTORY_LIMIT", default_value_t = 10_000)]
    pub history_limit: usize,

    /// Messages one user may send per rate window.
    #[arg(long, env = "CHAT_MESSAGE_RATE", default_value_t = 60)]
    pub message_rate: u32,

    /// Reaction toggles one user may make per rate window.
    #[arg(long, env = "CHAT_REACTION_RATE", default_value_t = 60)]
    pub reaction_rate: u32,

    /// The rate limits' sliding window.
    #[arg(long, env = "CHAT_RATE_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,

    /// Longest author name, in characters.
    #[arg(long, env = "CHAT_MAX_NAME_CHARS", default_value_t = 50)]
    pub max_name_chars: usize,

    /// Most distinct emojis on one message.
    #[arg(long, env = "CHAT_MAX_EMOJIS_PER_MESSAGE", default_value_t = 20)]
    pub max_emojis_per_message: usize,

    /// Most users reacting with one emoji on one message.
    /// Every toggle sends the whole message to every client, so this and
    /// `--max-emojis-per-message` bound both the largest frame and what one
    /// click costs in egress.
    #[arg(long, env = "CHAT_MAX_REACTORS_PER_EMOJI", default_value_t = 100)]
    pub max_reactors_per_emoji: usize,
}

/// The smallest `--max-request-head` allowed: a browser's WebSocket
/// handshake, with cookies and user agent, is commonly 500-1,500 bytes.
pub const MIN_REQUEST_HEAD: usize = 1024;

/// The shortest `--identity-secret` taken, in characters.
pub const MIN_IDENTITY_SECRET: usize = 16;

/// A `--trusted-proxy` value: a network (`10.0.0.0/8`), or one address
/// (`127.0.0.1`, taken as `/32`; `::1` as `/128`).
fn proxy_net(value: &str) -> Result<IpNet, String> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("{value:?} is neither an address (10.0.0.1) nor a network (10.0.0.0/8)")
        })
}

/// Room past a frame's payload for its header (at most 10 bytes from a
/// server) and one queued control frame (a pong: at most 127 bytes).
const FRAME_OVERHEAD: usize = 256;

/// A secret setting: its `Debug` never shows it, so a config, or anything
/// holding one, can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Default for Config {
    /// The defaults of every flag, read from the flags' own definitions
    /// above (one definition), ignoring the environment.
    fn default() -> Self {
        let command = Config::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["chat-server"])
            .expect("every flag has a default or is optional");
        Config::from_arg_matches(&matches).expect("the defaults are well-typed")
    }
}

impl Config {
    /// The chat rules this configuration asks for.
    pub fn chat(&self) -> chat_core::Config {
        chat_core::Config {
            history_limit: self.history_limit,
            max_author_name_chars: self.max_name_chars,
            max_emojis_per_message: self.max_emojis_per_message,
            max_reactors_per_emoji: self.max_reactors_per_emoji,
            message_rate: RateLimit {
                max: self.message_rate,
                window: self.rate_window,
            },
            reaction_rate: RateLimit {
                max: self.reaction_rate,
                window: self.rate_window,
            },
            ..chat_core::Config::default()
        }
    }

    /// The flags that make the chat's rules ([`Config::chat`]), each with
    /// its value: what a cluster's stream records, so that a node started
    /// with other rules is told which flag differs.
    pub fn rule_flags(&self) -> Vec<(&'static str, String)> {
        vec![
            ("--history-limit", self.history_limit.to_string()),
            ("--message-rate", self.message_rate.to_string()),
            ("--reaction-rate", self.reaction_rate.to_string()),
            ("--rate-window", format!("{:?}", self.rate_window)),
            ("--max-name-chars", self.max_name_chars.to_string()),
            (
                "--max-emojis-per-message",
                self.max_emojis_per_message.to_string(),
            ),
            (
                "--max-reactors-per-emoji",
                self.max_reactors_per_emoji.to_string(),
            ),
        ]
    }

    /// The longest frame the chat rules and the identity mode let the
    /// server send, in bytes.
    pub fn largest_server_frame(&self) -> usize {
        self.chat()
            .largest_frame(Identity::max_user_id_len(self.identity))
    }

    /// The WebSocket limits every connection gets. Nothing is left at
    /// tungstenite's defaults (64 MiB messages, unlimited write buffer).
    pub fn websocket(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            // Empty until a frame arrives: the connection reads the socket
            // into its own buffer, held only while it is not yet decoded
            // (`wire::link::TungsteniteIo`).
            .read_buffer_size(0)
            .write_buffer_size(self.write_buffer_size)
            // tungstenite writes only its own frames (pongs, close frames,
            // in --echo mode the echoes; chat frames never go through it),
            // and hands each on to the connection's outbox, which bounds
            // what waits (`outbox_bound`). This bound only has to be above
            // any one frame it writes, so that it never refuses one: room
            // for the largest frame past the coalescing target, plus a
            // queued control frame. In --echo mode the largest frame sent
            // is the largest received.
            .max_write_buffer_size(
                self.write_buffer_size
                    + self
                        .max_server_frame
                        .max(if self.echo { self.max_message_size } else { 0 })
                    + FRAME_OVERHEAD,
            )
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
            .accept_unmasked_frames(false)
    }

    /// Every connection's bounds and deadlines, counted from `epoch`
    /// (the server's start).
    pub(crate) fn delivery(&self, epoch: std::time::Instant) -> delivery::Settings {
        delivery::Settings {
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            queue_bytes: self.send_queue_bytes,
            epoch,
        }
    }

    /// The most bytes tungstenite may write ahead of a connection's writer
    /// (its answers to pings and close frames, and in `--echo` mode the
    /// echoed frames): room for one frame of the largest size it may send.
    pub(crate) fn outbox_bound(&self) -> usize {
        let largest = if self.echo {
            self.max_message_size
        } else {
            // A control frame's payload is at most 125 bytes.
            125
        };
        largest + FRAME_OVERHEAD
    }

    /// Checks settings that would make the server useless or unsafe.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--max-connections", self.max_connections),
            ("--listen-backlog", self.listen_backlog),
            ("--max-connections-per-ip", self.max_connections_per_ip),
            ("--max-pending-per-ip", self.max_pending_per_ip),
            ("--max-message-size", self.max_message_size),
            ("--read-buffer-size", self.read_buffer_size),
            ("--socket-send-buffer", self.socket_send_buffer),
            ("--log-events", self.log_events),
            ("--log-bytes", self.log_bytes),
            ("--reply-queue", self.reply_queue),
            ("--commit-queue-bytes", self.commit_queue_bytes),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.cluster.is_some()
            && self.identity_secret.is_none()
            && self.identity == IdentityMode::Pseudonym
        {
            return Err(
                "--cluster needs --identity-secret (the same on every node), so that every node \
                 gives one address the same user id; or --identity raw-ip"
                    .into(),
            );
        }
        if self.identity == IdentityMode::Pseudonym
            && let Some(secret) = &self.identity_secret
            && secret.expose().chars().count() < MIN_IDENTITY_SECRET
        {
            return Err(format!(
                "--identity-secret has {} characters, and needs at least {MIN_IDENTITY_SECRET}: a \
                 short secret can be guessed, and with it every user id turned back into an \
                 address. Generate one with `openssl rand -base64 32`, and pass it in \
                 CHAT_IDENTITY_SECRET rather than on the command line, where `ps` shows it",
                secret.expose().chars().count()
            ));
        }
        if let Some(urls) = &self.cluster {
            for url in urls.split(',').map(str::trim) {
                url.parse::<async_nats::ServerAddr>().map_err(|e| {
                    format!(
                        "--cluster: `{url}` is not a NATS URL ({e}); give one like \
                         nats://127.0.0.1:4222, or several separated by commas"
                    )
                })?;
            }
        }
        if self.cluster.is_some() && !(1..=5).contains(&self.cluster_replicas) {
            return Err("--cluster-replicas must be 1 to 5".into());
        }
        if self.max_request_head < MIN_REQUEST_HEAD {
            return Err(format!(
                "--max-request-head must be at least {MIN_REQUEST_HEAD} bytes, or ordinary browsers are refused"
            ));
        }
        if self.max_refusals == 0 {
            return Err("--max-refusals must be at least 1".into());
        }
        if self.rate_window.is_zero() {
            return Err("--rate-window must be more than zero, or no rate limit holds".into());
        }
        if self.max_store_outage.is_zero() {
            return Err("--max-store-outage must be more than zero".into());
        }
        if self.ping_interval.is_zero() {
            return Err("--ping-interval must be more than zero".into());
        }
        if self.idle_timeout <= self.ping_interval {
            return Err("--idle-timeout must be longer than --ping-interval, or live clients are dropped between pings".into());
        }
        if self.send_queue_bytes < self.max_server_frame {
            return Err(format!(
                "--send-queue-bytes ({}) must be at least --max-server-frame ({}), so that any frame fits",
                self.send_queue_bytes, self.max_server_frame
            ));
        }
        let largest = self.largest_server_frame();
        if self.commit_queue_bytes < 2 * largest {
            return Err(format!(
                "--commit-queue-bytes ({}) must be at least twice the largest frame these rules allow ({largest} bytes): each command takes that much",
                self.commit_queue_bytes
            ));
        }
        if largest > self.max_server_frame {
            return Err(format!(
                "these chat rules let a frame reach {largest} bytes (a reaction_updated on a message with \
                 {} emojis of {} reactors each), more than --max-server-frame {}: raise it, or lower \
                 --max-reactors-per-emoji or --max-emojis-per-message",
                self.max_emojis_per_message, self.max_reactors_per_emoji, self.max_server_frame
            ));
        }
        if self
            .identity_secret
            .as_ref()
            .is_some_and(|s| s.0.is_empty())
        {
            return Err("--identity-secret must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_secret_never_shows_in_debug() {
        let c = Config {
            identity_secret: Some("hunter2-very-secret".into()),
            ..Config::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn a_zero_rate_window_is_refused() {
        let c = Config {
            rate_window: Duration::ZERO,
            ..Config::default()
        };
        let err = c.validate().expect_err("no rate limit would hold");
        assert!(err.contains("--rate-window"), "{err}");
    }

    #[test]
    fn defaults_come_from_the_flags() {
        let c = Config::default();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.data_dir, PathBuf::from("chat-data"));
        assert!(!c.in_memory && !c.echo);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.listen_backlog, 4096);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_request_head, 8 * 1024);
        assert_eq!(c.identity, IdentityMode::Pseudonym);
        assert_eq!(c.identity_secret, None);
        assert!(c.trusted_proxies.is_empty() && c.allowed_origins.is_empty());
        assert_eq!(c.message_rate, 60);
        assert_eq!(c.rate_window, Duration::from_secs(60));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_cluster_url_is_checked_and_may_list_several_servers() {
        let with = |url: &str| {
            Config::try_parse_from(["chat-server", "--cluster", url, "--identity", "raw-ip"])
                .expect("parses")
                .validate()
        };
        assert!(with("nats://127.0.0.1:4222").is_ok());
        assert!(with("nats://10.0.0.1:4222, nats://10.0.0.2:4222").is_ok());
        let err = with("nats://127.0.0.1:4222,http://[::1").expect_err("not a URL");
        assert!(err.contains("`http://[::1` is not a NATS URL"), "{err}");
    }

    #[test]
    fn lists_and_durations_parse() {
        let c = Config::try_parse_from([
            "chat-server",
            "--listen",
            "0.0.0.0:9000",
            "--trusted-proxy",
            "10.0.0.0/8,::1/128,127.0.0.1,::1",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
            "--idle-timeout",
            "90s",
            "--handshake-timeout",
            "500ms",
        ])
        .expect("parses");
        assert_eq!(c.trusted_proxies.len(), 4);
        // A bare address is that one host.
        assert_eq!(c.trusted_proxies[2].to_string(), "127.0.0.1/32");
        assert_eq!(c.trusted_proxies[3].to_string(), "::1/128");
        let err = Config::try_parse_from(["chat-server", "--trusted-proxy", "proxy.local"])
            .expect_err("not an address");
        assert!(err.to_string().contains("neither an address"), "{err}");
        assert_eq!(c.allowed_origins.len(), 2);
        let not_an_origin =
            Config::try_parse_from(["chat-server", "--allowed-origin", "chat.example"]);
        assert!(not_an_origin.is_err(), "an origin needs a scheme");
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.handshake_timeout, Duration::from_millis(500));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn useless_settings_are_refused() {
        let c = Config {
            idle_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            log_events: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            max_request_head: MIN_REQUEST_HEAD - 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            max_request_head: MIN_REQUEST_HEAD,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn rules_whose_frames_do_not_fit_are_refused() {
        let defaults = Config::default();
        assert!(defaults.largest_server_frame() <= defaults.max_server_frame);
        let raw_ip = Config {
            identity: IdentityMode::RawIp,
            ..Config::default()
        };
        assert!(
            raw_ip.validate().is_ok(),
            "the defaults fit either identity"
        );
        let crowded = Config {
            max_reactors_per_emoji: 1_000,
            ..Config::default()
        };
        let err = crowded.validate().expect_err("400 KB frames");
        assert!(err.contains("--max-server-frame"), "{err}");
        let fits = Config {
            max_server_frame: crowded.largest_server_frame(),
            send_queue_bytes: crowded.largest_server_frame(),
            ..crowded
        };
        assert!(fits.validate().is_ok());
        let ws = fits.websocket();
        assert!(
            ws.max_write_buffer_size >= fits.write_buffer_size + fits.largest_server_frame() + 14
        );
    }
}
