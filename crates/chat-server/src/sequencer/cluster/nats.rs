//! The connection to NATS: the stream, its object store, and where this
//! node starts reading.

use super::envelope::{NewEpoch, Rewind, epoch_of, rules_of};
use super::erase::Tombstones;
use super::snapshot::{Bucket, Stored, newest_snapshot, own_snapshot};
use crate::metrics::ClusterMetrics;
use crate::store::data_dir::DataDir;
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use chat_core::Chat;
use chat_proto::Epoch;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;
use tracing::warn;

/// How long a node tries to reach NATS at start before it stops and says
/// why (a process supervisor starts it again).
pub(crate) const FIRST_CONNECT: Duration = Duration::from_secs(10);

/// How long a node that reached NATS waits at start for JetStream to
/// answer (through a leader election, say) before it stops and says why.
pub(crate) const STREAM_AT_START: Duration = Duration::from_secs(30);

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
pub(crate) struct Settings {
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
    /// The most bytes the snapshot bucket holds (when this node makes it).
    pub snapshot_bytes: i64,
    /// The chat's rules on this node.
    pub rules: chat_core::Config,
    /// The flags that make them, with their values (for the operator).
    pub rule_flags: Vec<(&'static str, String)>,
    /// How this node names users (`Identity::fingerprint`).
    pub identity: String,
    /// Where this node keeps its own snapshot (none with `--in-memory`).
    pub local: Option<Arc<DataDir>>,
    /// What it reports in `/metrics`.
    pub metrics: ClusterMetrics,
}

/// Whether getting a bucket failed because it does not exist (JetStream's
/// "stream not found"), rather than because JetStream did not answer: only
/// then is it made.
fn no_such_bucket(e: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    let mut source = e.source();
    while let Some(cause) = source {
        if let Some(get) = cause.downcast_ref::<GetStreamError>() {
            return matches!(get.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
        }
        source = cause.source();
    }
    false
}

/// A bucket of the chat's, stored as stream `underlying`: one JetStream
/// gave (`got`) is made to follow the flags; one it says does not exist is
/// made (`create`); if it did not answer (electing a leader), the error,
/// and the join is asked again.
async fn open_bucket<B, E, F>(
    js: &jetstream::Context,
    settings: &Settings,
    underlying: &str,
    got: Result<B, E>,
    create: impl std::future::Future<Output = Result<B, F>>,
) -> Result<B, ClusterError>
where
    E: std::error::Error + 'static,
    F: std::fmt::Display,
{
    let failed = |e: &dyn std::fmt::Display| ClusterError::Stream {
        stream: settings.stream.clone(),
        detail: with_hint(&e.to_string(), &settings.url),
    };
    match got {
        Ok(bucket) => {
            follow_flags(js, underlying, settings).await?;
            Ok(bucket)
        }
        Err(e) if !no_such_bucket(&e) => Err(failed(&e)),
        Err(_) => create.await.map_err(|e| failed(&e)),
    }
}

/// Makes the bucket stored as stream `underlying` (the snapshots', the
/// tombstones') follow the flags: its bound and its replicas.
async fn follow_flags(
    js: &jetstream::Context,
    underlying: &str,
    settings: &Settings,
) -> Result<(), ClusterError> {
    let failed = |e: &dyn std::fmt::Display| ClusterError::Stream {
        stream: settings.stream.clone(),
        detail: format!("cannot change the bucket {underlying} to what the flags say: {e}"),
    };
    let mut stream = js.get_stream(underlying).await.map_err(|e| failed(&e))?;
    let config = stream.info().await.map_err(|e| failed(&e))?.config.clone();
    if config.max_bytes != settings.snapshot_bytes || config.num_replicas != settings.replicas {
        js.update_stream(stream::Config {
            max_bytes: settings.snapshot_bytes,
            num_replicas: settings.replicas,
            ..config
        })
        .await
        .map_err(|e| failed(&e))?;
        tracing::info!(
            bucket = underlying,
            max_bytes = settings.snapshot_bytes,
            replicas = settings.replicas,
            "the bucket's settings now follow the flags"
        );
    }
    Ok(())
}

/// The messages a [`NewEpoch`] removes ([`Tombstones::lost`]); none if the
/// tombstones cannot be read now (their text is erased all the same; a
/// node that applies the stream anew then shows their redacted posts).
pub(super) async fn lost_removals(
    tombstones: &Tombstones,
    stream: &stream::Stream,
) -> Vec<chat_proto::Uuid> {
    match tombstones.lost(stream).await {
        Ok(lost) => {
            if !lost.is_empty() {
                warn!(
                    messages = lost.len(),
                    "the lost tail took removals whose messages' entries were already erased: the new epoch removes them again"
                );
            }
            lost
        }
        Err(e) => {
            warn!(error = %e, "reading the tombstones failed: removals the lost tail took are not given again");
            Vec::new()
        }
    }
}

/// A connection to the cluster's stream, before anything is applied.
pub(crate) struct Connected {
    pub(super) js: jetstream::Context,
    pub(super) stream: stream::Stream,
    pub(super) subject: String,
    pub(super) node: String,
    /// The stream's epoch, its identity (the same on every node).
    pub(crate) epoch: Epoch,
    /// The epoch of the chat this node starts from: the stream's, or its
    /// snapshot's (`NewEpoch` entries switch it).
    pub(super) chat_epoch: Epoch,
    /// The last entry in the stream when this node joined.
    pub(super) last_sequence: u64,
    /// The first entry the stream still holds.
    pub(super) first_sequence: u64,
    /// Where snapshots are kept.
    pub(super) snapshots: Bucket,
    /// Where the tombstones of erased entries are.
    pub(super) tombstones: Tombstones,
    /// Where this node keeps its own.
    pub(super) local: Option<Arc<DataDir>>,
    /// The newest snapshot, this node's or the cluster's, it can start
    /// from, if any.
    pub(super) snapshot: Option<Stored>,
    pub(super) snapshot_every: u64,
    pub(super) rules: String,
    pub(super) timeout: Duration,
    /// Counts the client's (re)connections to NATS.
    pub(super) reconnected: watch::Receiver<u64>,
    /// Since when NATS has been unreachable, if it is.
    pub(super) lost_since: Arc<Mutex<Option<Instant>>>,
    /// The entry the chat it starts from has applied (`super::applier::start`).
    pub(super) start_after: u64,
    /// What the node reports in `/metrics`.
    pub(super) metrics: ClusterMetrics,
}

/// The stream's metadata key that holds the chat's epoch.
pub(super) const EPOCH_KEY: &str = "chat_epoch";

/// The epoch of the stream `name`: the one stored in its metadata, or for
/// a stream that has none stored yet, the one its creation time gives.
pub(super) fn stream_epoch(
    name: &str,
    metadata: &std::collections::HashMap<String, String>,
    created_nanos: i128,
) -> Epoch {
    metadata
        .get(EPOCH_KEY)
        .and_then(|stored| stored.parse().ok())
        .map(Epoch)
        .unwrap_or_else(|| epoch_of(name, created_nanos))
}

/// The stream's metadata key that holds the fingerprint of the chat's
/// rules ([`rules_of`]).
const RULES_KEY: &str = "chat_rules";

/// The stream's metadata key that holds the flags that make the chat's
/// rules, as `--flag=value` words.
const RULE_FLAGS_KEY: &str = "chat_rule_flags";

/// The stream's metadata key that holds the fingerprint of how nodes name
/// users (never the secret).
const IDENTITY_KEY: &str = "chat_identity";

/// What every node of one chat must share, as the stream records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Terms {
    /// The rules' fingerprint.
    pub(super) rules: String,
    /// The flags that make them, `--flag=value` words.
    pub(super) flags: String,
    /// How users are named.
    pub(super) identity: String,
}

impl Terms {
    fn of(settings: &Settings) -> Terms {
        Terms {
            rules: rules_of(&settings.rules),
            flags: settings
                .rule_flags
                .iter()
                .map(|(flag, value)| format!("{flag}={value}"))
                .collect::<Vec<_>>()
                .join(" "),
            identity: settings.identity.clone(),
        }
    }

    /// The terms `metadata` records, if it records them.
    fn recorded(metadata: &std::collections::HashMap<String, String>) -> Option<Terms> {
        Some(Terms {
            rules: metadata.get(RULES_KEY)?.clone(),
            flags: metadata.get(RULE_FLAGS_KEY).cloned().unwrap_or_default(),
            identity: metadata.get(IDENTITY_KEY)?.clone(),
        })
    }

    fn record(&self, metadata: &mut std::collections::HashMap<String, String>) {
        metadata.insert(RULES_KEY.to_owned(), self.rules.clone());
        metadata.insert(RULE_FLAGS_KEY.to_owned(), self.flags.clone());
        metadata.insert(IDENTITY_KEY.to_owned(), self.identity.clone());
    }

    /// Why a node of these terms cannot serve the chat of `stream`'s
    /// terms, naming what differs and the fix; `Ok` if it can.
    fn judge(&self, stream: &Terms) -> Result<(), String> {
        if self.identity != stream.identity {
            return Err(format!(
                "this node names users otherwise than the chat's other nodes (identity {} here, {} \
                 in the stream): one address would be two users, with two rate limits. Give every \
                 node the same --identity and the same --identity-secret (CHAT_IDENTITY_SECRET)",
                self.identity, stream.identity
            ));
        }
        if self.rules == stream.rules {
            return Ok(());
        }
        let theirs: std::collections::HashMap<&str, &str> = stream
            .flags
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .collect();
        let differ: Vec<String> = self
            .flags
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .filter_map(|(flag, ours)| {
                let recorded = theirs.get(flag)?;
                (ours != *recorded)
                    .then(|| format!("{flag} is {ours} here and {recorded} in the stream"))
            })
            .collect();
        let what = if differ.is_empty() {
            format!(
                "this build's chat rules differ from those of the build that made the stream \
                 (rules {} here, {} in the stream): run one build on every node",
                self.rules, stream.rules
            )
        } else {
            format!(
                "this node's chat rules differ from the chat's: {}. Start it with the stream's \
                 values",
                differ.join(", ")
            )
        };
        Err(format!(
            "{what}. The rules of a running chat do not change: to change them, stop every \
             node and start them all with the new rules on a new stream (--cluster-stream NAME)"
        ))
    }
}

/// How long JetStream remembers a command's `Nats-Msg-Id`, so that the
/// same command published twice is stored once.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Why an existing stream cannot carry the chat, with the fix, if it
/// cannot.
fn unusable(existing: &stream::Config, wanted: &stream::Config) -> Result<(), String> {
    let name = &wanted.name;
    if existing.storage == stream::StorageType::Memory {
        return Err(format!(
            "it keeps its entries in memory, and a NATS restart would lose the chat; \
             delete it (nats stream rm {name}) to have it made with file storage, or choose another --cluster-stream"
        ));
    }
    if existing.subjects != wanted.subjects {
        return Err(format!(
            "its subjects are {:?}, and this node publishes to {:?} only; \
             give the chat a stream of its own (another --cluster-stream)",
            existing.subjects, wanted.subjects
        ));
    }
    if existing.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "its retention is {:?}: entries would go once read, and a node computes the chat \
             from all of them; give the chat a stream with the default (limits) retention",
            existing.retention
        ));
    }
    if existing.discard == stream::DiscardPolicy::New {
        return Err(format!(
            "it refuses new entries once full (discard: new), which would stop the chat at \
             its limit; set its discard policy to old (nats stream edit {name} --discard old)"
        ));
    }
    if !existing.max_age.is_zero() {
        return Err(format!(
            "its entries expire after {:?} (max_age), whatever the snapshots cover; \
             remove the limit (nats stream edit {name} --max-age 0) and bound it with \
             --cluster-max-bytes",
            existing.max_age
        ));
    }
    Ok(())
}

/// The existing stream's settings brought to the flags where JetStream
/// can change them (replicas, `max_bytes`, the dedup window), and which
/// changed; `None` if none.
fn reconciled(
    existing: &stream::Config,
    wanted: &stream::Config,
) -> Option<(stream::Config, String)> {
    let mut updated = existing.clone();
    let mut changes = Vec::new();
    if existing.num_replicas != wanted.num_replicas {
        changes.push(format!(
            "replicas {} → {}",
            existing.num_replicas, wanted.num_replicas
        ));
        updated.num_replicas = wanted.num_replicas;
    }
    if existing.max_bytes != wanted.max_bytes {
        changes.push(format!(
            "max_bytes {} → {}",
            existing.max_bytes, wanted.max_bytes
        ));
        updated.max_bytes = wanted.max_bytes;
    }
    if existing.duplicate_window != wanted.duplicate_window {
        changes.push(format!(
            "duplicate window {:?} → {:?}",
            existing.duplicate_window, wanted.duplicate_window
        ));
        updated.duplicate_window = wanted.duplicate_window;
    }
    (!changes.is_empty()).then(|| (updated, changes.join(", ")))
}

pub(super) fn subject(stream: &str) -> String {
    format!("{stream}.commands")
}

/// Connects to NATS and creates the stream if needed.
pub(crate) async fn connect(settings: &Settings) -> Result<Connected, ClusterError> {
    let (reconnected_tx, reconnected) = watch::channel(0u64);
    let reconnected_tx = Arc::new(reconnected_tx);
    let lost_since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let options = || {
        let reconnected_tx = Arc::clone(&reconnected_tx);
        let lost = Arc::clone(&lost_since);
        let metrics = settings.metrics.clone();
        async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let tx = Arc::clone(&reconnected_tx);
                let lost = Arc::clone(&lost);
                let metrics = metrics.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            *lost.lock().unwrap_or_else(PoisonError::into_inner) = None;
                            tx.send_modify(|n| *n += 1);
                            metrics.nats_connected.set(1);
                            if *tx.borrow() > 1 {
                                metrics.nats_reconnects.inc();
                            }
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            metrics.nats_connected.set(0);
                            lost.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert_with(Instant::now);
                            warn!("lost NATS: commands are refused until it is back; reads go on");
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            .name(format!("chat-server {}", settings.node))
            .connection_timeout(Duration::from_secs(5))
            // Backoff from 50 ms doubling to 2 s: a NATS restart costs a
            // node seconds of "unavailable", not the client's default
            // minutes. Once connected, the client reconnects for ever.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50u64 << attempts.min(6)).min(Duration::from_secs(2))
            })
    };
    // The first connection is this node's own loop, not the client's
    // `retry_on_initial_connect` (which waits for ever, silently): each
    // failed try is named with the URL, and after `FIRST_CONNECT` the node
    // stops with what to check.
    // One URL, or several separated by commas (a NATS cluster's servers:
    // the first that answers is taken, and the client learns the rest).
    let servers: Vec<&str> = settings.url.split(',').map(str::trim).collect();
    let deadline = Instant::now() + FIRST_CONNECT;
    let mut tries = 0u32;
    let client = loop {
        match options().connect(servers.as_slice()).await {
            Ok(client) => break client,
            Err(e) => {
                tries += 1;
                if Instant::now() >= deadline {
                    return Err(ClusterError::Connect {
                        url: settings.url.clone(),
                        detail: format!(
                            "{e} ({tries} tries in {} s). Is nats-server running there, with \
                             JetStream (`nats-server -js`)? Is --cluster (CHAT_CLUSTER) right?",
                            FIRST_CONNECT.as_secs()
                        ),
                    });
                }
                if tries == 1 {
                    warn!(
                        url = %settings.url,
                        "cannot reach NATS: {e}; trying again every second for {} s",
                        FIRST_CONNECT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let js = jetstream::new(client);
    // JetStream may be electing a leader (a NATS server just restarted, or
    // a new NATS cluster's first stream): its requests then time out for
    // seconds. Nodes started together race to create the stream: the
    // losers are told its name is in use. Joining is idempotent, so the
    // node asks again (and then finds the stream).
    let deadline = Instant::now() + STREAM_AT_START;
    loop {
        match join(&js, settings, reconnected.clone(), Arc::clone(&lost_since)).await {
            Err(ClusterError::Stream { detail, .. })
                if Instant::now() < deadline
                    && (detail.contains("timed out")
                        || detail.contains("temporarily unavailable")
                        || detail.contains("already in use")) =>
            {
                warn!(url = %settings.url, "JetStream did not answer ({detail}); asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            joined => return joined,
        }
    }
}

/// Creates or checks the stream, its snapshot bucket and where to start:
/// everything of joining after the connection.
async fn join(
    js: &jetstream::Context,
    settings: &Settings,
    reconnected: watch::Receiver<u64>,
    lost_since: Arc<Mutex<Option<Instant>>>,
) -> Result<Connected, ClusterError> {
    let stream_err = |e: &dyn std::fmt::Display| ClusterError::Stream {
        stream: settings.stream.clone(),
        detail: with_hint(&e.to_string(), &settings.url),
    };
    let subject = subject(&settings.stream);
    let terms = Terms::of(settings);
    let wanted = stream::Config {
        name: settings.stream.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DEDUP_WINDOW,
        // Recorded by the node that creates the stream, in the same
        // request: no two nodes can record different ones.
        metadata: {
            let mut metadata = std::collections::HashMap::new();
            terms.record(&mut metadata);
            metadata
        },
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| stream_err(&e))?;
    // An existing stream (made by an earlier start with other flags, or by
    // hand) is taken only if cluster mode can rely on it, and brought to
    // the flags where JetStream can change it.
    let existing = stream.cached_info().config.clone();
    unusable(&existing, &wanted).map_err(|detail| ClusterError::Stream {
        stream: settings.stream.clone(),
        detail,
    })?;
    let (mut updated, mut changes) =
        reconciled(&existing, &wanted).unwrap_or_else(|| (existing.clone(), String::new()));
    match Terms::recorded(&existing.metadata) {
        Some(recorded) => terms
            .judge(&recorded)
            .map_err(|detail| ClusterError::Stream {
                stream: settings.stream.clone(),
                detail,
            })?,
        None => {
            // A stream made by an older build: its commands say under which
            // rules they were sent; this node records its own only if they
            // are the same.
            if let Some(theirs) = last_rules(&stream, &subject).await
                && theirs != terms.rules
            {
                return Err(ClusterError::Stream {
                    stream: settings.stream.clone(),
                    detail: format!(
                        "its commands were sent under other chat rules (rules {theirs} in the \
                         stream, {} here): start this node with the rules of the chat's other \
                         nodes, or move every node to a new stream (--cluster-stream NAME)",
                        terms.rules
                    ),
                });
            }
            terms.record(&mut updated.metadata);
            changes = if changes.is_empty() {
                "the chat's rules and identity, recorded".to_owned()
            } else {
                format!("{changes}, the chat's rules and identity recorded")
            };
        }
    }
    if !updated.metadata.contains_key(EPOCH_KEY) {
        // Stored once: from now on the epoch is what the stream says,
        // whatever JetStream later does to its creation time. Taken from
        // that time this once, so that every node that gets here stores
        // the same value, and a stream made by an older build keeps the
        // epoch its clients already hold.
        let created = stream.cached_info().created.unix_timestamp_nanos();
        let epoch = epoch_of(&settings.stream, created);
        updated
            .metadata
            .insert(EPOCH_KEY.to_owned(), epoch.0.to_string());
        changes = if changes.is_empty() {
            "the epoch, stored".to_owned()
        } else {
            format!("{changes}, the epoch stored")
        };
    }
    if !changes.is_empty() {
        js.update_stream(updated)
            .await
            .map_err(|e| ClusterError::Stream {
                stream: settings.stream.clone(),
                detail: format!(
                    "cannot change {changes} to what the flags say: {}",
                    with_hint(&e.to_string(), &settings.url)
                ),
            })?;
        tracing::info!(stream = %settings.stream, %changes, "the stream's settings now follow the flags");
    }
    let info = stream.info().await.map_err(|e| stream_err(&e))?;
    let epoch = stream_epoch(
        &settings.stream,
        &info.config.metadata,
        info.created.unix_timestamp_nanos(),
    );
    let mut last_sequence = info.state.last_sequence;
    let first_sequence = info.state.first_sequence;
    let bucket = format!("{}-snapshots", settings.stream);
    // An object store is a stream, OBJ_<bucket>.
    let snapshots = open_bucket(
        js,
        settings,
        &format!("OBJ_{bucket}"),
        js.get_object_store(&bucket).await,
        js.create_object_store(object_store::Config {
            bucket: bucket.clone(),
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            max_bytes: settings.snapshot_bytes,
            ..Default::default()
        }),
    )
    .await?;
    // A key-value bucket is a stream, KV_<bucket>.
    let tombstone_bucket = Tombstones::bucket(&settings.stream);
    let tombstones = Tombstones::new(
        open_bucket(
            js,
            settings,
            &format!("KV_{tombstone_bucket}"),
            js.get_key_value(&tombstone_bucket).await,
            js.create_key_value(kv::Config {
                bucket: tombstone_bucket.clone(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                max_bytes: settings.snapshot_bytes,
                ..Default::default()
            }),
        )
        .await?,
    );
    let rules = rules_of(&settings.rules);
    let snapshots = Bucket {
        store: snapshots,
        underlying: js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| stream_err(&e))?,
    };
    let shared = newest_snapshot(&snapshots, &stream, epoch, &rules, last_sequence)
        .await
        .map_err(|e| stream_err(&e))?;
    let own = match &settings.local {
        Some(dir) => own_snapshot(dir, &stream, epoch, &rules, last_sequence)
            .await
            .map_err(|e| stream_err(&e))?,
        None => Default::default(),
    };
    // A snapshot of entries the stream no longer holds proves that it went
    // back: positions served from them will be reused, so the chat needs a
    // new epoch before anything else is applied.
    if let Some(then) = own.rewound.or(shared.rewound) {
        let rewind = Rewind {
            node: settings.node.clone(),
            boot: chat_proto::Uuid::new_v4(),
            applied: 0,
            why: "at start, a snapshot of entries the stream no longer holds".into(),
        };
        let removed = lost_removals(&tombstones, &stream).await;
        append_new_epoch(js, &subject, then, rewind, removed, settings.timeout)
            .await
            .map_err(|e| stream_err(&e))?;
        // Caught up once that entry too is applied.
        last_sequence = stream
            .info()
            .await
            .map_err(|e| stream_err(&e))?
            .state
            .last_sequence;
        warn!(
            stream = %settings.stream,
            last = last_sequence,
            "the stream went back behind a snapshot of its chat (a lost tail, or an older backup): \
             a new epoch starts, and every client's next resume is a full replay"
        );
    }
    let snapshot = match (own.usable, shared.usable) {
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
    // Entries erased after a removal are no drop: their tombstones stand
    // in for them (`super::erase`).
    if first_sequence > from + 1
        && last_sequence > from
        && !tombstones.cover(from + 1, first_sequence).await
    {
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
        js: js.clone(),
        stream,
        subject,
        node: settings.node.clone(),
        epoch,
        chat_epoch: epoch,
        last_sequence,
        first_sequence,
        snapshots,
        tombstones,
        local: settings.local.clone(),
        snapshot,
        snapshot_every: settings.snapshot_every,
        rules,
        timeout: settings.timeout,
        reconnected,
        lost_since,
        start_after: 0,
        metrics: settings.metrics.clone(),
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

/// An ordered read of `stream` from entry `first` on, and how many entries
/// it has to deliver now (JetStream's pending count: deleted entries are
/// not counted, so a node whose stream ends in a deleted entry still
/// knows when it has caught up).
pub(super) async fn read_from(
    stream: &stream::Stream,
    first: u64,
) -> Result<(consumer::pull::Ordered, u64), String> {
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
    let pending = consumer.cached_info().num_pending;
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    Ok((messages, pending))
}

impl Connected {
    /// The chat this node starts from, with `config`, and its epoch: the
    /// newest snapshot, or an empty chat in the stream's epoch.
    pub(crate) fn initial_chat(&mut self, config: chat_core::Config) -> (Chat, Epoch) {
        match self.snapshot.take() {
            Some(stored) => {
                self.chat_epoch = stored.chat_epoch();
                self.start_after = stored.seq;
                (Chat::from_snapshot(config, stored.chat), self.chat_epoch)
            }
            None => (Chat::new(config), self.chat_epoch),
        }
    }
}

/// `detail`, with what to do when it says JetStream is not there: a
/// nats-server started without it answers no JetStream request.
fn with_hint(detail: &str, url: &str) -> String {
    let lower = detail.to_lowercase();
    if lower.contains("jetstream unavailable")
        || lower.contains("no responders")
        || lower.contains("jetstream not enabled")
    {
        format!(
            "{detail}: the NATS server at {url} answers, but not with JetStream; start nats-server \
             with -js (or a jetstream {{}} block in its configuration)"
        )
    } else if lower.contains("replicas > 1 not supported")
        || lower.contains("insufficient resources")
    {
        format!(
            "{detail}: the NATS server at {url} cannot hold that many replicas. \
             --cluster-replicas 3 needs a NATS cluster of three or more servers with JetStream \
             (deploy/nats-server.conf); with one nats-server, use --cluster-replicas 1"
        )
    } else if lower.contains("timed out") {
        format!(
            "{detail}: the NATS server at {url} took the request but no JetStream answered in \
             time; with --cluster-replicas 3, are at least two of its servers up and routed?"
        )
    } else {
        detail.to_owned()
    }
}

/// The rules fingerprint of the stream's last command, if it holds one.
async fn last_rules(stream: &stream::Stream, subject: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: String,
    }
    let last = stream.get_last_raw_message_by_subject(subject).await.ok()?;
    serde_json::from_slice::<Rules>(&last.payload)
        .ok()
        .map(|r| r.rules)
}

/// Appends a [`NewEpoch`] entry for `rewind`, seen by a node whose chat
/// was in epoch `then`: retried (NATS may be restarting) until JetStream
/// takes it, for at most `within` per try and a minute in all. Its
/// `Nats-Msg-Id` names the epoch that ends, so every node that finds the
/// same rewind within the stream's dedup window appends one entry between
/// them.
pub(super) async fn append_new_epoch(
    js: &jetstream::Context,
    subject: &str,
    then: Epoch,
    rewind: Rewind,
    removed: Vec<chat_proto::Uuid>,
    within: Duration,
) -> Result<(), String> {
    let entry = NewEpoch::new(rewind, removed);
    // A tree of strings and numbers: it always encodes.
    let payload: bytes::Bytes = serde_json::to_vec(&entry)
        .expect("entries serialize")
        .into();
    let id = format!("new-epoch/{then}");
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(100);
    loop {
        let publish = async {
            let message = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.clone());
            js.send_publish(subject.to_owned(), message).await?.await
        };
        let error = match tokio::time::timeout(within, publish).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() >= give_up {
            return Err(format!(
                "cannot append the entry that starts a new epoch: {error}"
            ));
        }
        warn!(%error, "appending the entry that starts a new epoch failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> stream::Config {
        stream::Config {
            name: "chat".into(),
            subjects: vec!["chat.commands".into()],
            storage: stream::StorageType::File,
            num_replicas: 3,
            max_bytes: 1 << 30,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DEDUP_WINDOW,
            ..Default::default()
        }
    }

    /// A change to a stream's settings.
    type Spoil = fn(&mut stream::Config);

    #[test]
    fn a_stream_that_cannot_carry_the_chat_is_refused_with_the_fix() {
        assert_eq!(unusable(&wanted(), &wanted()), Ok(()));
        let cases: [(Spoil, &str); 5] = [
            (|c| c.storage = stream::StorageType::Memory, "in memory"),
            (|c| c.subjects.push("other".into()), "subjects"),
            (
                |c| c.retention = stream::RetentionPolicy::WorkQueue,
                "retention",
            ),
            (|c| c.discard = stream::DiscardPolicy::New, "--discard old"),
            (|c| c.max_age = Duration::from_secs(3600), "--max-age 0"),
        ];
        for (spoil, says) in cases {
            let mut existing = wanted();
            spoil(&mut existing);
            let why = unusable(&existing, &wanted()).expect_err(says);
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn the_stored_epoch_wins_over_the_creation_time() {
        let mut metadata = std::collections::HashMap::new();
        let derived = epoch_of("chat", 7);
        assert_eq!(stream_epoch("chat", &metadata, 7), derived);
        let stored = Epoch(chat_proto::Uuid::from_u128(42));
        metadata.insert(EPOCH_KEY.to_owned(), stored.0.to_string());
        assert_eq!(stream_epoch("chat", &metadata, 7), stored);
        assert_eq!(
            stream_epoch("chat", &metadata, 8),
            stored,
            "a rewritten creation time"
        );
        metadata.insert(EPOCH_KEY.to_owned(), "junk".to_owned());
        assert_eq!(stream_epoch("chat", &metadata, 7), derived);
    }

    #[test]
    fn what_jetstream_can_change_follows_the_flags() {
        assert!(reconciled(&wanted(), &wanted()).is_none());
        let existing = stream::Config {
            num_replicas: 1,
            max_bytes: -1,
            duplicate_window: Duration::from_secs(60),
            ..wanted()
        };
        let (updated, changes) = reconciled(&existing, &wanted()).expect("changes");
        assert_eq!(updated.num_replicas, 3);
        assert_eq!(updated.max_bytes, 1 << 30);
        assert_eq!(updated.duplicate_window, DEDUP_WINDOW);
        assert_eq!(
            changes,
            "replicas 1 → 3, max_bytes -1 → 1073741824, duplicate window 60s → 120s"
        );
    }

    #[test]
    fn a_node_is_told_which_flag_differs_from_the_chat_s_or_that_the_builds_do() {
        let chat = Terms {
            rules: "r1".into(),
            flags: "--history-limit=10000 --message-rate=60".into(),
            identity: "pseudonym-aa".into(),
        };
        assert_eq!(chat.judge(&chat.clone()), Ok(()));
        let odd = Terms {
            rules: "r2".into(),
            flags: "--history-limit=10000 --message-rate=30".into(),
            ..chat.clone()
        };
        let why = odd.judge(&chat).expect_err("other rules");
        assert!(
            why.contains("--message-rate is 30 here and 60 in the stream"),
            "{why}"
        );
        assert!(!why.contains("--history-limit is"), "{why}");
        assert!(why.contains("--cluster-stream"), "{why}");
        let other_build = Terms {
            rules: "r3".into(),
            ..chat.clone()
        };
        let why = other_build.judge(&chat).expect_err("another build");
        assert!(why.contains("run one build on every node"), "{why}");
        let other_secret = Terms {
            identity: "pseudonym-bb".into(),
            ..chat.clone()
        };
        let why = other_secret.judge(&chat).expect_err("another secret");
        assert!(why.contains("--identity-secret"), "{why}");
        let mut metadata = std::collections::HashMap::new();
        assert_eq!(Terms::recorded(&metadata), None);
        chat.record(&mut metadata);
        assert_eq!(Terms::recorded(&metadata), Some(chat));
    }

    #[test]
    fn a_nats_server_without_jetstream_is_named_with_the_fix() {
        let said = with_hint("jetstream unavailable", "nats://127.0.0.1:4222");
        assert!(said.contains("nats://127.0.0.1:4222"), "{said}");
        assert!(said.contains("-js"), "{said}");
        // A timeout and a replica count one server cannot hold get their
        // own hints; anything else is passed on as it is.
        let said = with_hint("timed out", "nats://x");
        assert!(said.contains("no JetStream answered in time"), "{said}");
        let said = with_hint(
            "replicas > 1 not supported in non-clustered mode",
            "nats://x",
        );
        assert!(said.contains("use --cluster-replicas 1"), "{said}");
        assert_eq!(
            with_hint("stream not found", "nats://x"),
            "stream not found"
        );
    }
}
