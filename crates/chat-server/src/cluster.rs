//! Cluster mode (`--cluster nats://HOST:PORT`): several servers, one chat,
//! ordered by one NATS JetStream stream (state-machine replication).
//!
//! A node that receives a command wraps it in an [`Envelope`] (origin node,
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

use crate::hub::{ApplyError, Health, Sequencer};
use crate::log::Log;
use crate::pipeline::Commits;
use crate::store::DataDir;
use async_nats::jetstream::{self, consumer, object_store, stream};
use chat_core::{Chat, ChatSnapshot, Context, Event, RateKind, Timestamp};
use chat_proto::{ClientFrame, Epoch, UserId, Uuid};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// The envelope format this build writes. A node that meets one it does
/// not know stops applying rather than diverge from the nodes that know it.
/// Version 2 added [`Envelope::deadline`]; this build applies 1 and 2.
pub const ENVELOPE_VERSION: u32 = 2;

/// The oldest envelope format this build applies.
const OLDEST_ENVELOPE_VERSION: u32 = 1;

/// One command in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`ENVELOPE_VERSION`] when written.
    pub v: u32,
    /// The node the client is connected to.
    pub node: String,
    /// That node's run (a fresh id each start), so request ids of two runs
    /// never meet.
    pub boot: Uuid,
    /// The command's number on that node's run.
    pub request: u64,
    /// Who sent it, as the origin node judged it (from the address or a
    /// trusted proxy).
    pub user: UserId,
    /// The fingerprint of the origin node's chat rules ([`rules_of`]):
    /// nodes with other rules would compute another chat from the same
    /// log, so a node that meets other rules stops applying.
    pub rules: String,
    /// The command.
    pub command: ClientFrame,
    /// The latest chat time, in ms, at which the command may be applied
    /// (version 2 on): one the stream stamps later is not applied by any
    /// node, and its sender is told the chat was unavailable. Bounding when
    /// a command can take effect is what lets the origin node refuse alone
    /// what the stream is sure to refuse (see [`ClusterSequencer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
}

/// What became of a command in the stream.
#[derive(Debug)]
enum Outcome {
    /// Applied: accepted, or refused by the chat's rules.
    Applied(Result<(), chat_core::ChatError>),
    /// Stamped after its deadline: no node applied it.
    Expired,
}

/// What this node's connections need of its chat to refuse, without the
/// stream, what the stream is sure to refuse: the chat's time after the
/// last entry applied, and the users whose allowance that entry and the
/// ones before used up.
#[derive(Debug)]
struct View {
    /// The chat's time after the last entry applied...
    clock: Timestamp,
    /// ...and when this node applied it.
    applied_at: Instant,
    /// Users out of allowance: until when messages and reactions are
    /// refused ([`Chat::refused_until`]). Only users who used up a limit
    /// within the last window are here, and those whose times have all
    /// passed are swept out once per window.
    refused: HashMap<UserId, [Option<Timestamp>; 2]>,
    /// When the next sweep is due (chat time).
    next_sweep: Timestamp,
    /// How long an entry in `refused` can matter.
    window_ms: u64,
}

impl View {
    fn new(chat: &Chat) -> View {
        let config = chat.config();
        View {
            clock: chat.now(),
            applied_at: Instant::now(),
            refused: HashMap::new(),
            next_sweep: Timestamp::default(),
            window_ms: u64::try_from(
                config
                    .message_rate
                    .window
                    .max(config.reaction_rate.window)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
        }
    }

    /// Takes in what applying an entry of `user`'s did to `chat`.
    fn applied(&mut self, chat: &Chat, user: Option<&UserId>) {
        self.clock = chat.now();
        self.applied_at = Instant::now();
        if let Some(user) = user {
            let until = [RateKind::Messages, RateKind::Reactions]
                .map(|kind| chat.refused_until(kind, user));
            if until == [None, None] {
                self.refused.remove(user);
            } else {
                self.refused.insert(user.clone(), until);
            }
        }
        if self.clock >= self.next_sweep {
            let now = self.clock;
            self.refused
                .retain(|_, until| until.iter().flatten().any(|t| *t > now));
            self.next_sweep =
                Timestamp::from_unix_millis(now.as_millis().saturating_add(self.window_ms));
        }
    }

    /// A deadline for a command sent now: the chat's time now, as well as
    /// this node can tell, plus `grace`. The later of two estimates: the
    /// chat's time at the last entry plus the time since, and this host's
    /// clock. A late estimate only makes the deadline lenient; the check
    /// stays sound whatever it is, because every node enforces the
    /// deadline the envelope carries.
    fn deadline(&self, grace: Duration) -> u64 {
        let since = u64::try_from(self.applied_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let grace = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.clock
            .as_millis()
            .saturating_add(since)
            .max(wall)
            .saturating_add(grace)
    }

    /// Whether `user`'s `kind` command, applied at `deadline` at the
    /// latest, is sure to be refused by the rate limit.
    fn refuses(&self, user: &UserId, kind: RateKind, deadline: u64) -> bool {
        let slot = match kind {
            RateKind::Messages => 0,
            RateKind::Reactions => 1,
        };
        self.refused
            .get(user)
            .and_then(|until| until[slot])
            .is_some_and(|until| deadline < until.as_millis())
    }
}

/// A snapshot of the chat after applying the stream up to `seq`, as kept
/// in the stream's object store (a node that joins after the stream has
/// dropped its oldest entries starts from it) and in each node's data
/// directory (a node that restarts starts from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The stream's epoch: a snapshot of a deleted and recreated stream
    /// (whose snapshot bucket or data directory outlived it) is not used.
    epoch: Epoch,
    seq: u64,
    rules: String,
    chat: ChatSnapshot,
}

impl Stored {
    /// Whether a node of `rules` may start from this snapshot of the
    /// stream with `epoch`, whose last entry is `last_sequence`.
    fn fits(&self, epoch: Epoch, rules: &str, last_sequence: u64) -> Result<(), &'static str> {
        if self.epoch != epoch {
            Err("a snapshot of another stream (deleted and recreated since)")
        } else if self.rules != rules {
            Err("a snapshot taken under other chat rules")
        } else if self.seq > last_sequence {
            Err("a snapshot ahead of the stream")
        } else {
            Ok(())
        }
    }
}

/// The file in a node's data directory that holds its own snapshot of
/// `stream`'s chat.
fn local_snapshot_file(stream: &str) -> String {
    format!("cluster-{stream}.snapshot.json")
}

/// The fingerprint of a chat's rules: the same rules, the same chat from
/// the same log.
pub fn rules_of(config: &chat_core::Config) -> String {
    let hash = blake3::hash(format!("{config:?}").as_bytes());
    hash.to_hex()[..16].to_owned()
}

/// Why a node stopped applying: an envelope of a version it does not know.
const STOPPED_VERSION: &str = "stopped applying the cluster's stream: it holds an envelope of a version this build does not know; upgrade this node";

/// Why a node stopped applying: a command from a node with other rules.
const STOPPED_RULES: &str = "stopped applying the cluster's stream: it holds a command from a node with other chat rules; give every node the same rules";

/// How many snapshots the object store keeps.
const SNAPSHOTS_KEPT: usize = 3;

/// An object's name for the snapshot after entry `seq` (sorts by `seq`).
fn snapshot_name(seq: u64) -> String {
    format!("after-{seq:020}")
}

/// Why the cluster could not be joined.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// NATS could not be reached.
    #[error("cannot reach NATS at {url}: {detail}")]
    Connect {
        /// The URL given with `--cluster`.
        url: String,
        /// What the client said.
        detail: String,
    },
    /// The stream could not be created or read.
    #[error("JetStream stream {stream}: {detail}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What JetStream said.
        detail: String,
    },
}

/// How to join the cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The NATS server.
    pub url: String,
    /// The stream that orders the chat.
    pub stream: String,
    /// JetStream replicas of the stream.
    pub replicas: usize,
    /// The most bytes the stream keeps.
    pub max_bytes: i64,
    /// This node's name.
    pub node: String,
    /// How long to wait for JetStream to confirm a command, and then for
    /// this node's apply of it.
    pub timeout: Duration,
    /// Every how many entries a snapshot is stored.
    pub snapshot_every: u64,
    /// The chat's rules on this node.
    pub rules: chat_core::Config,
    /// Where this node keeps its own snapshot (none with `--in-memory`).
    pub local: Option<Arc<DataDir>>,
}

/// The cluster's ordering point: publishes commands and waits for their
/// outcome from this node's own apply.
#[derive(Debug)]
pub struct ClusterSequencer {
    js: jetstream::Context,
    subject: String,
    node: String,
    boot: Uuid,
    next_request: AtomicU64,
    /// Outcomes awaited by this node's connections, by request.
    waiting: Arc<Waiting>,
    /// Catching up, serving, or stopped (an entry it cannot apply).
    health: watch::Receiver<Health>,
    /// This node's rules fingerprint.
    rules: String,
    /// This node's rules, to refuse what they refuse whatever the state
    /// without publishing it.
    config: chat_core::Config,
    /// This node's chat as far as its connections need it, to refuse
    /// without publishing what the stream is sure to refuse.
    view: Arc<Mutex<View>>,
    /// The rate limits' refusals (messages, reactions).
    rate_limited: [chat_core::ChatError; 2],
    timeout: Duration,
}

type Waiting = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

/// A connection to the cluster's stream, before anything is applied.
pub struct Connected {
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    node: String,
    /// The stream's epoch (the same on every node).
    pub epoch: Epoch,
    /// The last entry in the stream when this node joined.
    last_sequence: u64,
    /// The first entry the stream still holds.
    first_sequence: u64,
    /// Where snapshots are kept.
    snapshots: object_store::ObjectStore,
    /// Where this node keeps its own.
    local: Option<Arc<DataDir>>,
    /// The newest snapshot, this node's or the cluster's, it can start
    /// from, if any.
    snapshot: Option<Stored>,
    snapshot_every: u64,
    rules: String,
    timeout: Duration,
    /// Counts the client's (re)connections to NATS.
    reconnected: watch::Receiver<u64>,
    /// The entry the chat given to [`start`](Self::start) has applied.
    start_after: u64,
}

fn subject(stream: &str) -> String {
    format!("{stream}.commands")
}

/// Connects to NATS and creates the stream if needed.
pub async fn connect(settings: &Settings) -> Result<Connected, ClusterError> {
    let (reconnected_tx, reconnected) = watch::channel(0u64);
    let reconnected_tx = Arc::new(reconnected_tx);
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let tx = Arc::clone(&reconnected_tx);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tx.send_modify(|n| *n += 1);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        warn!("lost NATS: commands are refused until it is back; reads go on");
                    }
                    other => tracing::debug!(event = %other, "NATS"),
                }
            }
        })
        .name(format!("chat-server {}", settings.node))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        // Backoff from 50 ms doubling to 2 s: a NATS restart costs a node
        // seconds of "unavailable", not the client's default minutes.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(50u64 << attempts.min(6)).min(Duration::from_secs(2))
        })
        .connect(settings.url.as_str());
    // `retry_on_initial_connect` would wait for ever; a node that cannot
    // reach NATS at start says so instead.
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .map_err(|_| ClusterError::Connect {
            url: settings.url.clone(),
            detail: "no answer within 10 s".into(),
        })?
        .map_err(|e| ClusterError::Connect {
            url: settings.url.clone(),
            detail: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let stream_err = |e: &dyn std::fmt::Display| ClusterError::Stream {
        stream: settings.stream.clone(),
        detail: e.to_string(),
    };
    let subject = subject(&settings.stream);
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            max_bytes: settings.max_bytes,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| stream_err(&e))?;
    let info = stream.info().await.map_err(|e| stream_err(&e))?;
    let epoch = epoch_of(&settings.stream, info.created.unix_timestamp_nanos());
    let last_sequence = info.state.last_sequence;
    let first_sequence = info.state.first_sequence;
    let bucket = format!("{}-snapshots", settings.stream);
    let snapshots = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: bucket.clone(),
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_err(&e))?,
    };
    let rules = rules_of(&settings.rules);
    let shared = newest_snapshot(&snapshots, epoch, &rules, last_sequence)
        .await
        .map_err(|e| stream_err(&e))?;
    let own = match &settings.local {
        Some(dir) => own_snapshot(dir, &settings.stream, epoch, &rules, last_sequence).await,
        None => None,
    };
    let snapshot = match (own, shared) {
        (Some(own), Some(shared)) if shared.seq > own.seq => Some(shared),
        (Some(own), _) => {
            tracing::info!(after = own.seq, "starting from this node's own snapshot");
            Some(own)
        }
        (None, shared) => shared,
    };
    if let Some(s) = &snapshot {
        tracing::info!(
            after = s.seq,
            last = last_sequence,
            "applying the stream from a snapshot"
        );
    }
    // A stream that dropped entries can be caught up with only from a
    // snapshot taken at or after the last one dropped.
    // (A stream that dropped every entry it had is empty, with its first
    // sequence past its last.)
    let from = snapshot.as_ref().map_or(0, |s| s.seq);
    if first_sequence > from + 1 && last_sequence > from {
        return Err(ClusterError::Stream {
            stream: settings.stream.clone(),
            detail: format!(
                "it no longer holds entries {}..{} and no snapshot after them exists in {bucket}; \
                 this node cannot compute the chat",
                from + 1,
                first_sequence - 1
            ),
        });
    }
    Ok(Connected {
        js,
        stream,
        subject,
        node: settings.node.clone(),
        epoch,
        last_sequence,
        first_sequence,
        snapshots,
        local: settings.local.clone(),
        snapshot,
        snapshot_every: settings.snapshot_every,
        rules,
        timeout: settings.timeout,
        reconnected,
        start_after: 0,
    })
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("node", &self.node)
            .field("epoch", &self.epoch)
            .field("first_sequence", &self.first_sequence)
            .field("last_sequence", &self.last_sequence)
            .field("start_after", &self.start_after)
            .finish_non_exhaustive()
    }
}

/// An ordered read of `stream` from entry `first` on.
async fn read_from(stream: &stream::Stream, first: u64) -> Result<consumer::pull::Ordered, String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            // Pull requests expire every 2 s, so idle heartbeats come every
            // second and a consumer that lost its server notices soon.
            max_expires: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// The newest snapshot in `store` that a node of `rules` may start from.
async fn newest_snapshot(
    store: &object_store::ObjectStore,
    epoch: Epoch,
    rules: &str,
    last_sequence: u64,
) -> Result<Option<Stored>, String> {
    let mut names = Vec::new();
    let mut list = store.list().await.map_err(|e| e.to_string())?;
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if !info.deleted && info.name.starts_with("after-") {
            names.push(info.name);
        }
    }
    names.sort();
    for name in names.iter().rev() {
        let mut object = store.get(name).await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        match serde_json::from_slice::<Stored>(&bytes) {
            Ok(stored) => match stored.fits(epoch, rules, last_sequence) {
                Ok(()) => return Ok(Some(stored)),
                Err(why) => warn!(%name, "{why}; not used"),
            },
            Err(e) => warn!(%name, error = %e, "an unreadable snapshot; not used"),
        }
    }
    Ok(None)
}

/// This node's own snapshot of `stream`'s chat in `dir`, if it has one it
/// may start from. One it cannot use is said and ignored: the cluster's
/// snapshots and the stream still hold the chat.
async fn own_snapshot(
    dir: &Arc<DataDir>,
    stream: &str,
    epoch: Epoch,
    rules: &str,
    last_sequence: u64,
) -> Option<Stored> {
    let name = local_snapshot_file(stream);
    let dir = Arc::clone(dir);
    let read = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || dir.read(&name))
    };
    let bytes = match read.await {
        Ok(Ok(Some(bytes))) => bytes,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            warn!(file = %name, error = %e, "this node's snapshot cannot be read; not used");
            return None;
        }
        Err(_) => return None,
    };
    match serde_json::from_slice::<Stored>(&bytes) {
        Ok(stored) => match stored.fits(epoch, rules, last_sequence) {
            Ok(()) => Some(stored),
            Err(why) => {
                warn!(file = %name, "{why}; not used");
                None
            }
        },
        Err(e) => {
            warn!(file = %name, error = %e, "this node's snapshot is unreadable; not used");
            None
        }
    }
}

/// Replaces this node's own snapshot with `stored`, on disk when it
/// returns.
fn write_own_snapshot(dir: &DataDir, stream: &str, stored: &Stored) {
    // A chat snapshot is strings, numbers and maps with string keys.
    let bytes = serde_json::to_vec(stored).expect("snapshots serialize");
    if let Err(e) = dir.replace(&local_snapshot_file(stream), &bytes) {
        warn!(
            dir = %dir.path().display(),
            error = %e,
            seq = stored.seq,
            "writing this node's snapshot failed; a restart catches up from an older one"
        );
    }
}

/// Stores the snapshot taken after entry `seq` (unless another node
/// already did: they are the same), and forgets all but the newest few.
async fn store_snapshot(store: object_store::ObjectStore, stored: Stored) {
    let name = snapshot_name(stored.seq);
    if store.info(&name).await.is_ok() {
        return;
    }
    // A chat snapshot is strings, numbers and maps with string keys.
    let bytes = serde_json::to_vec(&stored).expect("snapshots serialize");
    if let Err(e) = store.put(name.as_str(), &mut bytes.as_slice()).await {
        warn!(error = %e, seq = stored.seq, "storing a snapshot failed; the next one will try again");
        return;
    }
    let mut names = Vec::new();
    if let Ok(mut list) = store.list().await {
        while let Some(Ok(info)) = list.next().await {
            if !info.deleted && info.name.starts_with("after-") {
                names.push(info.name);
            }
        }
    }
    names.sort();
    let old = names.len().saturating_sub(SNAPSHOTS_KEPT);
    for name in &names[..old] {
        let _ = store.delete(name).await;
    }
}

impl Connected {
    /// The chat this node starts from, with `config`: the newest snapshot,
    /// or an empty chat.
    pub fn initial_chat(&mut self, config: chat_core::Config) -> Chat {
        match self.snapshot.take() {
            Some(stored) => {
                let chat = Chat::from_snapshot(config, stored.chat);
                self.start_after = stored.seq;
                chat
            }
            None => Chat::new(config),
        }
    }

    /// Starts applying the stream: every entry, in order, goes through
    /// `chat`, and its events to `commits` (and from there to `log`),
    /// until `stop` is cancelled. The node's sequencer is
    /// [`Health::CatchingUp`] until everything the stream held when it
    /// joined is applied and published to `log`, then
    /// [`Health::Serving`]. The task that applies ends once `stop` is
    /// cancelled and this node's own snapshot of what it applied is on
    /// disk (with a data directory).
    pub(crate) async fn start(
        self,
        mut chat: Chat,
        commits: Commits,
        stop: CancellationToken,
        log: Arc<Log>,
    ) -> Result<(ClusterSequencer, JoinHandle<()>), ClusterError> {
        let name = self.stream.cached_info().config.name.clone();
        let stream_err = |e: &dyn std::fmt::Display| ClusterError::Stream {
            stream: name.clone(),
            detail: e.to_string(),
        };
        let first = (self.start_after + 1).max(self.first_sequence);
        let stream_name = name.clone();
        let mut entries = read_from(&self.stream, first)
            .await
            .map_err(|e| stream_err(&e))?;
        let stream = self.stream.clone();
        let mut reconnected = self.reconnected.clone();
        reconnected.borrow_and_update();
        let boot = Uuid::new_v4();
        let waiting: Arc<Waiting> = Arc::default();
        let (health_tx, health) = watch::channel(Health::CatchingUp);
        let health_tx = Arc::new(health_tx);
        // Serving once the head reached while catching up is published.
        let (caught_up_tx, caught_up) = oneshot::channel::<chat_proto::Position>();
        {
            let health_tx = Arc::clone(&health_tx);
            tokio::spawn(async move {
                if let Ok(head) = caught_up.await {
                    log.wait_for(head, Duration::from_secs(3600)).await;
                    health_tx.send_if_modified(|h| {
                        let catching_up = *h == Health::CatchingUp;
                        if catching_up {
                            *h = Health::Serving;
                        }
                        catching_up
                    });
                }
            });
        }
        let caught_up_to = self.last_sequence;
        let node = self.node.clone();
        let rules = self.rules.clone();
        let config = chat.config().clone();
        let snapshots = self.snapshots.clone();
        let every = self.snapshot_every.max(1);
        let start_after = self.start_after;
        let epoch = self.epoch;
        let local = self.local.clone();
        let view = Arc::new(Mutex::new(View::new(&chat)));
        let rate_limited = [
            chat.rate_limited(RateKind::Messages),
            chat.rate_limited(RateKind::Reactions),
        ];
        let applier = {
            let view = Arc::clone(&view);
            let waiting = Arc::clone(&waiting);
            let node = node.clone();
            let rules = rules.clone();
            tokio::spawn(async move {
                // This node's own snapshot is written off the runtime;
                // the write under way, if any.
                let mut writing: Option<JoinHandle<()>> = None;
                let mut caught_up_tx = Some(caught_up_tx);
                if caught_up_to <= start_after
                    && let Some(tx) = caught_up_tx.take()
                {
                    let _ = tx.send(chat.head());
                }
                // The entry to apply next.
                let mut next = first;
                loop {
                    let entry = tokio::select! {
                        () = stop.cancelled() => {
                            // What this node applied, for its next start.
                            if let Some(w) = writing.take() {
                                let _ = w.await;
                            }
                            if let Some(dir) = &local
                                && next > 1
                            {
                                let stored = Stored {
                                    epoch,
                                    seq: next - 1,
                                    rules: rules.clone(),
                                    chat: chat.snapshot(),
                                };
                                let dir = Arc::clone(dir);
                                let _ = tokio::task::spawn_blocking(move || {
                                    write_own_snapshot(&dir, &stream_name, &stored);
                                })
                                .await;
                            }
                            return;
                        }
                        changed = reconnected.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            // NATS came back (perhaps restarted, perhaps
                            // another server of its cluster): read on from
                            // the next entry with a fresh consumer, rather
                            // than wait for the old one to notice. JetStream
                            // may still be electing the stream's leader, so
                            // a failure is retried (no other reconnect may
                            // come to retry it).
                            let mut delay = Duration::from_millis(100);
                            loop {
                                match read_from(&stream, next).await {
                                    Ok(fresh) => {
                                        entries = fresh;
                                        break;
                                    }
                                    Err(e) => {
                                        warn!(error = %e, next, "re-reading the stream failed; retrying");
                                        tokio::select! {
                                            // The next turn of the loop stops.
                                            () = stop.cancelled() => break,
                                            () = tokio::time::sleep(delay) => {}
                                        }
                                        delay = (delay * 2).min(Duration::from_secs(2));
                                    }
                                }
                            }
                            continue;
                        }
                        entry = entries.next() => match entry {
                            Some(entry) => entry,
                            None => return,
                        },
                    };
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            warn!(error = %e, "reading the stream failed; the ordered consumer resumes");
                            continue;
                        }
                    };
                    let Ok(info) = entry.info() else {
                        warn!("a stream entry without its metadata; skipped");
                        continue;
                    };
                    let seq = info.stream_sequence;
                    if seq < next {
                        continue; // already applied (a consumer recreated)
                    }
                    next = seq + 1;
                    let ms = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000)
                        .unwrap_or(0);
                    match apply(&mut chat, &rules, seq, ms, &entry.payload) {
                        Applied::Done {
                            origin,
                            user,
                            outcome,
                            events,
                        } => {
                            view.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .applied(&chat, user.as_ref());
                            if !events.is_empty() && commits.send(events, 1).await.is_err() {
                                return; // the server is stopping
                            }
                            if let Some((n, b, request)) = origin
                                && n == node
                                && b == boot
                            {
                                let waiter = waiting
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .remove(&request);
                                if let Some(waiter) = waiter {
                                    let _ = waiter.send(outcome);
                                }
                            }
                        }
                        Applied::Skipped(why) => {
                            warn!(seq, %why, "a stream entry that is not a command was skipped, on every node alike");
                        }
                        Applied::OtherRules(theirs) => {
                            error!(
                                seq,
                                theirs = %theirs,
                                ours = %rules,
                                "the stream holds a command from a node with other chat rules (limits, history size); \
                                 applying it here would compute another chat, so this node stops: \
                                 give every node the same rules"
                            );
                            let _ = health_tx.send(Health::Stopped(STOPPED_RULES));
                            return;
                        }
                        Applied::Unknown(v) => {
                            error!(
                                seq,
                                version = v,
                                "the stream holds an envelope of version {v}, which this build does not know; \
                                 this node stops applying rather than diverge from the others: upgrade it"
                            );
                            let _ = health_tx.send(Health::Stopped(STOPPED_VERSION));
                            return;
                        }
                    }
                    if seq % every == 0 {
                        let stored = Stored {
                            epoch,
                            seq,
                            rules: rules.clone(),
                            chat: chat.snapshot(),
                        };
                        // This node's own, unless the last is still being
                        // written (the next one will be).
                        if let Some(dir) = &local
                            && writing.as_ref().is_none_or(JoinHandle::is_finished)
                        {
                            let dir = Arc::clone(dir);
                            let own = stored.clone();
                            let stream_name = stream_name.clone();
                            writing = Some(tokio::task::spawn_blocking(move || {
                                write_own_snapshot(&dir, &stream_name, &own);
                            }));
                        }
                        tokio::spawn(store_snapshot(snapshots.clone(), stored));
                    }
                    if seq >= caught_up_to
                        && let Some(tx) = caught_up_tx.take()
                    {
                        let _ = tx.send(chat.head());
                    }
                }
            })
        };
        let sequencer = ClusterSequencer {
            js: self.js,
            subject: self.subject,
            node,
            boot,
            next_request: AtomicU64::new(0),
            waiting,
            health,
            rules,
            config,
            view,
            rate_limited,
            timeout: self.timeout,
        };
        Ok((sequencer, applier))
    }
}

/// The epoch of a stream: the same on every node, new when the stream is
/// recreated.
fn epoch_of(stream: &str, created_nanos: i128) -> Epoch {
    let name = blake3::hash(stream.as_bytes());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&name.as_bytes()[..8]);
    bytes[8..].copy_from_slice(&(created_nanos as u64).to_be_bytes());
    Epoch(Uuid::from_bytes(bytes))
}

/// What applying one stream entry did.
enum Applied {
    Done {
        origin: Option<(String, Uuid, u64)>,
        /// Whose command it was, if it was applied.
        user: Option<UserId>,
        outcome: Outcome,
        events: Vec<Event>,
    },
    /// Not an envelope: skipped, on every node alike.
    Skipped(String),
    /// An envelope of a version this build does not know.
    Unknown(u32),
    /// An envelope from a node with other chat rules.
    OtherRules(String),
}

/// Applies the entry at stream sequence `seq`, stored at `ms`, to `chat`.
/// Everything it uses comes from the entry, so every node computes the
/// same thing.
fn apply(chat: &mut Chat, rules: &str, seq: u64, ms: u64, payload: &[u8]) -> Applied {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    match serde_json::from_slice::<Versioned>(payload) {
        Ok(Versioned { v }) if (OLDEST_ENVELOPE_VERSION..=ENVELOPE_VERSION).contains(&v) => {}
        Ok(Versioned { v }) => return Applied::Unknown(v),
        Err(e) => return Applied::Skipped(e.to_string()),
    }
    let envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(e) => return Applied::Skipped(e.to_string()),
    };
    if envelope.v >= 2 && envelope.deadline.is_none() {
        return Applied::Skipped("an envelope of version 2 without its deadline".into());
    }
    if envelope.rules != rules {
        return Applied::OtherRules(envelope.rules);
    }
    let origin = Some((envelope.node, envelope.boot, envelope.request));
    let now = Timestamp::from_unix_millis(ms);
    if envelope
        .deadline
        .is_some_and(|deadline| chat.time_at(now).as_millis() > deadline)
    {
        return Applied::Done {
            origin,
            user: None,
            outcome: Outcome::Expired,
            events: Vec::new(),
        };
    }
    let ctx = Context {
        user: envelope.user.clone(),
        now,
        message_id: message_id(seq, ms),
    };
    let outcome = chat.handle(ctx, envelope.command);
    let events = std::iter::from_fn(|| chat.poll_event()).collect();
    Applied::Done {
        origin,
        user: Some(envelope.user),
        outcome: Outcome::Applied(outcome),
        events,
    }
}

/// The id of a message posted by the entry at stream sequence `seq`: a
/// UUIDv7 whose time is the entry's and whose other bits are the sequence,
/// unique within the stream and the same on every node.
fn message_id(seq: u64, ms: u64) -> Uuid {
    let mut rest = [0u8; 10];
    rest[..8].copy_from_slice(&seq.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(ms, &rest).into_uuid()
}

impl ClusterSequencer {
    /// Follows the node's health.
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    async fn submit_inner(&self, user: &UserId, command: ClientFrame) -> Result<(), ApplyError> {
        if *self.health.borrow() != Health::Serving {
            return Err(ApplyError::Unavailable);
        }
        // What the rules refuse whatever the state never reaches the
        // stream: every node's apply would refuse it the same way, so junk
        // costs the stream nothing.
        self.config.check(&command)?;
        // A user out of allowance at this node's position, until after the
        // command's deadline, is refused here too: the stream can only
        // have used up more of it, and no node applies the command after
        // its deadline. Anything less sure is published and decided there.
        let kind = match command {
            ClientFrame::SendMessage(_) => RateKind::Messages,
            ClientFrame::AddReaction(_) => RateKind::Reactions,
        };
        let deadline = {
            let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
            let deadline = view.deadline(self.timeout);
            if view.refuses(user, kind, deadline) {
                let refusal = match kind {
                    RateKind::Messages => &self.rate_limited[0],
                    RateKind::Reactions => &self.rate_limited[1],
                };
                return Err(ApplyError::Refused(refusal.clone()));
            }
            deadline
        };
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            node: self.node.clone(),
            boot: self.boot,
            request,
            user: user.clone(),
            rules: self.rules.clone(),
            command,
            deadline: Some(deadline),
        };
        // An envelope is a tree of strings and numbers: it always encodes.
        let payload = serde_json::to_vec(&envelope).expect("envelopes serialize");
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request, tx);
        let forget = || {
            self.waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&request);
        };
        let id = format!("{}/{}/{}", self.node, self.boot, request);
        let publish = async {
            let message = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(id);
            self.js
                .send_publish(self.subject.clone(), message)
                .await?
                .await
        };
        match tokio::time::timeout(self.timeout, publish).await {
            Ok(Ok(_ack)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "JetStream did not take a command");
                forget();
                return Err(ApplyError::Unavailable);
            }
            Err(_) => {
                forget();
                return Err(ApplyError::Unavailable);
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Outcome::Applied(Ok(())))) => Ok(()),
            Ok(Ok(Outcome::Applied(Err(refusal)))) => Err(ApplyError::Refused(refusal)),
            Ok(Ok(Outcome::Expired)) => Err(ApplyError::Unavailable),
            Ok(Err(_)) | Err(_) => {
                forget();
                Err(ApplyError::Unavailable)
            }
        }
    }
}

impl Sequencer for ClusterSequencer {
    fn health(&self) -> Health {
        *self.health.borrow()
    }

    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: ClientFrame,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.submit_inner(user, command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::Config;
    use chat_proto::SendMessage;

    fn envelope(text: &str) -> Vec<u8> {
        envelope_by(text, Some(u64::MAX))
    }

    fn envelope_by(text: &str, deadline: Option<u64>) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            v: ENVELOPE_VERSION,
            node: "a".into(),
            boot: Uuid::from_u128(1),
            request: 0,
            user: "u".into(),
            rules: "r".into(),
            command: ClientFrame::SendMessage(SendMessage {
                text: text.into(),
                author_name: None,
            }),
            deadline,
        })
        .expect("encodes")
    }

    #[test]
    fn the_same_entries_give_every_node_the_same_chat() {
        let entries: Vec<(u64, u64, Vec<u8>)> = vec![
            (1, 1_700_000_000_000, envelope("one")),
            (2, 1_700_000_000_005, b"junk from elsewhere".to_vec()),
            (3, 1_699_000_000_000, envelope("two")),
            (4, 1_700_000_001_000, envelope("")),
        ];
        let run = || {
            let mut chat = Chat::new(Config::default());
            let mut log = Vec::new();
            for (seq, ms, payload) in &entries {
                match apply(&mut chat, "r", *seq, *ms, payload) {
                    Applied::Done {
                        outcome: Outcome::Applied(outcome),
                        events,
                        ..
                    } => {
                        log.push(format!("{outcome:?} {events:?}"));
                    }
                    Applied::Done {
                        outcome: Outcome::Expired,
                        ..
                    } => log.push("expired".into()),
                    Applied::Skipped(_) => log.push("skipped".into()),
                    Applied::Unknown(v) => log.push(format!("unknown {v}")),
                    Applied::OtherRules(r) => log.push(format!("rules {r}")),
                }
            }
            (log, chat.head())
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!(a.0[1], "skipped");
        assert!(a.0[3].starts_with("Err(EmptyText)"), "{}", a.0[3]);
        assert_eq!(a.1, chat_proto::Position(2));
    }

    #[test]
    fn an_unknown_envelope_version_stops_the_node() {
        let mut chat = Chat::new(Config::default());
        let newer = br#"{"v":3,"anything":"else"}"#;
        assert!(matches!(
            apply(&mut chat, "r", 1, 0, newer),
            Applied::Unknown(3)
        ));
    }

    #[test]
    fn a_command_from_a_node_with_other_rules_stops_the_node() {
        let mut chat = Chat::new(Config::default());
        assert!(matches!(
            apply(&mut chat, "other rules", 1, 0, &envelope("hi")),
            Applied::OtherRules(r) if r == "r"
        ));
        assert_eq!(chat.head(), chat_proto::Position(0), "nothing applied");
        let strict = Config {
            history_limit: 10,
            ..Config::default()
        };
        assert_ne!(rules_of(&strict), rules_of(&Config::default()));
        assert_eq!(rules_of(&Config::default()), rules_of(&Config::default()));
    }

    #[test]
    fn a_command_stamped_after_its_deadline_is_applied_by_no_node() {
        let t = 1_700_000_000_000u64;
        let mut chat = Chat::new(Config::default());
        let on_time = apply(&mut chat, "r", 1, t, &envelope_by("on time", Some(t)));
        assert!(matches!(
            on_time,
            Applied::Done {
                outcome: Outcome::Applied(Ok(())),
                ..
            }
        ));
        let late = apply(&mut chat, "r", 2, t + 1, &envelope_by("late", Some(t)));
        assert!(matches!(
            late,
            Applied::Done {
                outcome: Outcome::Expired,
                ref events,
                ..
            } if events.is_empty()
        ));
        assert_eq!(chat.head(), chat_proto::Position(1), "nothing applied");
        // Version 1 had no deadline: still applied as it was.
        let mut v1: serde_json::Value =
            serde_json::from_slice(&envelope_by("from v1", None)).expect("json");
        v1["v"] = 1.into();
        let v1 = serde_json::to_vec(&v1).expect("json");
        assert!(matches!(
            apply(&mut chat, "r", 3, t + 2, &v1),
            Applied::Done {
                outcome: Outcome::Applied(Ok(())),
                ..
            }
        ));
        // Version 2 without one is not a command.
        assert!(matches!(
            apply(&mut chat, "r", 4, t + 3, &envelope_by("no deadline", None)),
            Applied::Skipped(_)
        ));
    }

    #[test]
    fn the_view_refuses_only_until_the_limit_frees() {
        let config = Config {
            message_rate: chat_core::RateLimit::per_minute(2),
            ..Config::default()
        };
        let t = 1_700_000_000_000u64;
        let mut chat = Chat::new(config);
        let mut view = View::new(&chat);
        let u = UserId::from("u");
        for (seq, ms) in [(1, t), (2, t + 1_000)] {
            let mut e: Envelope =
                serde_json::from_slice(&envelope_by("x", Some(u64::MAX))).expect("json");
            e.user = u.clone();
            let payload = serde_json::to_vec(&e).expect("json");
            let Applied::Done { user, .. } = apply(&mut chat, "r", seq, ms, &payload) else {
                panic!("applied")
            };
            view.applied(&chat, user.as_ref());
        }
        // The first message leaves the window at t + 60 s.
        assert!(view.refuses(&u, RateKind::Messages, t + 59_999));
        assert!(!view.refuses(&u, RateKind::Messages, t + 60_000));
        assert!(!view.refuses(&u, RateKind::Reactions, t + 1_000));
        assert!(!view.refuses(&UserId::from("v"), RateKind::Messages, t + 1_000));
    }

    #[test]
    fn a_snapshot_fits_only_its_stream_its_rules_and_what_the_stream_holds() {
        let epoch = epoch_of("chat", 1);
        let stored = Stored {
            epoch,
            seq: 10,
            rules: "r".into(),
            chat: Chat::new(Config::default()).snapshot(),
        };
        assert_eq!(stored.fits(epoch, "r", 10), Ok(()));
        assert!(
            stored.fits(epoch_of("chat", 2), "r", 10).is_err(),
            "a recreated stream"
        );
        assert!(stored.fits(epoch, "other", 10).is_err(), "other rules");
        assert!(stored.fits(epoch, "r", 9).is_err(), "ahead of the stream");
    }

    #[test]
    fn message_ids_come_from_the_stream_position() {
        assert_eq!(message_id(7, 1000), message_id(7, 1000));
        assert_ne!(message_id(7, 1000), message_id(8, 1000));
        assert_eq!(message_id(7, 1000).get_version_num(), 7);
    }
}
