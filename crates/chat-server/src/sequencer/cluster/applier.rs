//! Applying the stream: every entry, in order, through this node's chat,
//! its events on to the commit queue, and each outcome back to the
//! connection on this node that sent the command.

use super::envelope::{Applied, Outcome, Rewind, apply};
use super::erase::{Eraser, Tombstones, post_of};
use super::nats::{
    ClusterError, Connected, append_new_epoch, lost_removals, read_from, stream_epoch,
};
use super::snapshot::{
    Bucket, Stored, drop_own_snapshot, fingerprint, holds, newest_snapshot, store_snapshot,
    write_own_snapshot,
};
use super::submit::{ClusterSequencer, Waiting};
use super::view::View;
use crate::metrics::ClusterMetrics;
use crate::publish::log::Log;
use crate::publish::pipeline::Commits;
use crate::sequencer::Health;
use crate::store::data_dir::DataDir;
use async_nats::jetstream::{self, consumer, stream};
use chat_core::{Chat, Event, EventKind, RateKind, Timestamp};
use chat_proto::{Epoch, Position, UserId, Uuid};
use futures_util::StreamExt;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// Why a node stopped applying: an envelope of a version it does not know.
const STOPPED_VERSION: &str = "stopped applying the cluster's stream: it holds an envelope of a version this build does not know; upgrade this node";

/// Why a node stopped: the stream went back behind what it applied.
const STOPPED_REWOUND: &str = "stopped serving: the cluster's stream holds fewer entries than this node applied (a lost tail, or a restore from an older backup), so it is not the log this node computed its chat from; a new epoch starts, and a restart of this node serves it";

/// Why a node stopped: the stream went back, then grew past it again.
const STOPPED_REPLACED: &str = "stopped serving: the cluster's stream holds another entry where this node applied one (it went back, a lost tail or an older backup, then took new entries), so it is not the log this node computed its chat from; a new epoch starts, and a restart of this node serves it";

/// Why a node stopped: the stream is another one under the same name.
const STOPPED_RECREATED: &str = "stopped serving: the cluster's stream was deleted and recreated, so it is not the log this node computed its chat from; restart this node to serve the new one";

/// Why a node stopped: entries it had not applied are gone.
const STOPPED_GAP: &str = "stopped serving: the cluster's stream dropped entries this node had not applied (its retention, or a purge, while this node was behind), so it cannot compute the chat from here; restart this node (it starts from a snapshot)";

/// Why a node stopped: the read of the stream ended.
const STOPPED_ENDED: &str = "stopped applying the cluster's stream: the read of it ended";

/// `health`'s name in `/metrics` (one of `metrics::CLUSTER_STATES`).
pub(crate) fn state_name(health: Health) -> &'static str {
    match health {
        Health::CatchingUp => "catching_up",
        Health::Serving => "serving",
        Health::Stopped(why) | Health::Broken(why) => match why {
            STOPPED_VERSION => "stopped_unknown_version",
            STOPPED_REWOUND => "stopped_rewound",
            STOPPED_REPLACED => "stopped_replaced",
            STOPPED_RECREATED => "stopped_recreated",
            STOPPED_GAP => "stopped_gap",
            STOPPED_ENDED => "stopped_read_ended",
            _ => "stopped_read_ended",
        },
    }
}

/// How often a node checks that the stream is still the log it applied
/// (and on every reconnection to NATS).
const STREAM_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long one check of the stream, or one attempt to read it again,
/// waits for JetStream's answer before it asks again.
const CHECK_TRY: Duration = Duration::from_secs(1);

/// Starts applying the stream: every entry, in order, goes through
/// `chat`, and its events to `commits` (and from there to `log`), until
/// `stop` is cancelled. The node's sequencer is [`Health::CatchingUp`]
/// until everything the stream held when it joined is applied and
/// published to `log`, then [`Health::Serving`]. The task that applies
/// ends once `stop` is cancelled and this node's own snapshot of what it
/// applied is on disk (with a data directory).
pub(crate) async fn start(
    connected: Connected,
    chat: Chat,
    commits: Commits,
    stop: CancellationToken,
    log: Arc<Log>,
) -> Result<(ClusterSequencer, JoinHandle<()>), ClusterError> {
    let stream_name = connected.stream.cached_info().config.name.clone();
    // The next entry this node needs; the stream's first may be later,
    // past entries erased after removals, whose tombstones stand in.
    let next = connected.start_after + 1;
    let first = next.max(connected.first_sequence);
    let (entries, pending) =
        read_from(&connected.stream, first)
            .await
            .map_err(|e| ClusterError::Stream {
                stream: stream_name.clone(),
                detail: e,
            })?;
    let mut reconnected = connected.reconnected.clone();
    reconnected.borrow_and_update();
    let boot = Uuid::new_v4();
    let waiting: Arc<Waiting> = Arc::default();
    let (health_tx, health) = watch::channel(Health::CatchingUp);
    let health_tx = Arc::new(health_tx);
    let caught_up = serving_once_published(Arc::clone(&log), Arc::clone(&health_tx));
    let applied = Arc::new(AtomicU64::new(next - 1));
    let checker = Checker {
        stream: connected.stream.clone(),
        stream_name: stream_name.clone(),
        stream_epoch: connected.epoch,
        applied: Arc::clone(&applied),
        last: Arc::default(),
        metrics: connected.metrics.clone(),
        tombstones: connected.tombstones.clone(),
    };
    let (verdict_tx, verdict) = oneshot::channel();
    tokio::spawn(checker.clone().every_second(verdict_tx));
    let config = chat.config().clone();
    let view = View::new(&chat);
    let (clock_tx, clock) = watch::channel(view.clock_ms());
    let view = Arc::new(Mutex::new(view));
    let rate_limited = [
        chat.rate_limited(RateKind::Messages),
        chat.rate_limited(RateKind::Reactions),
    ];
    let applier = Applier {
        metrics: connected.metrics.clone(),
        chat,
        commits,
        stop,
        stream: connected.stream.clone(),
        stream_name,
        entries,
        reconnected,
        next,
        caught_up: Some(caught_up),
        caught_up_to: connected.last_sequence,
        node: connected.node.clone(),
        boot,
        rules: connected.rules.clone(),
        waiting: Arc::clone(&waiting),
        view: Arc::clone(&view),
        clock: clock_tx,
        health: health_tx,
        stream_epoch: connected.epoch,
        epoch: connected.chat_epoch,
        log,
        last: None,
        applied: Arc::clone(&applied),
        checker: checker.clone(),
        verdict,
        diverged: false,
        js: connected.js.clone(),
        subject: connected.subject.clone(),
        timeout: connected.timeout,
        snapshots: connected.snapshots.clone(),
        tombstones: connected.tombstones.clone(),
        eraser: Eraser::start(
            connected.stream.clone(),
            connected.snapshots.clone(),
            connected.tombstones.clone(),
        ),
        every: connected.snapshot_every.max(1),
        local: connected.local.clone(),
        writing: None,
    };
    let start_after = connected.start_after;
    // Nothing to read (the stream may end in deleted entries, whose
    // sequence numbers it keeps): caught up at once.
    let caught_up_at_start = start_after >= connected.last_sequence || pending == 0;
    let task = tokio::spawn(applier.run(caught_up_at_start));
    let sequencer = ClusterSequencer {
        js: connected.js,
        subject: connected.subject,
        node: connected.node,
        boot,
        next_request: AtomicU64::new(0),
        waiting,
        health,
        rules: connected.rules,
        config,
        view,
        rate_limited,
        timeout: connected.timeout,
        lost_since: connected.lost_since,
        applied,
        clock,
        metrics: connected.metrics,
    };
    Ok((sequencer, task))
}

/// Turns the node's health to serving once the head it reached while
/// catching up (sent on the channel returned) is published to `log`.
fn serving_once_published(
    log: Arc<Log>,
    health: Arc<watch::Sender<Health>>,
) -> oneshot::Sender<Position> {
    let (caught_up_tx, caught_up) = oneshot::channel::<Position>();
    tokio::spawn(async move {
        if let Ok(head) = caught_up.await {
            log.wait_for(head, Duration::from_secs(3600)).await;
            health.send_if_modified(|h| {
                let catching_up = *h == Health::CatchingUp;
                if catching_up {
                    *h = Health::Serving;
                }
                catching_up
            });
        }
    });
    caught_up_tx
}

/// What a check of the stream needs: shared by the applier (which checks
/// on every reconnection, before it reads on) and the task that checks
/// every [`STREAM_CHECK_EVERY`] beside it (so that the questions to
/// JetStream never hold up applying).
#[derive(Clone)]
struct Checker {
    stream: stream::Stream,
    stream_name: String,
    /// The stream's own epoch, its identity.
    stream_epoch: Epoch,
    /// The last entry applied.
    applied: Arc<AtomicU64>,
    /// The last entry applied, and what it held: the stream must still
    /// hold it.
    last: Arc<Mutex<Option<(u64, bytes::Bytes)>>>,
    /// Where the stream's last sequence is reported.
    metrics: ClusterMetrics,
    /// Where the tombstones of erased entries are.
    tombstones: Tombstones,
}

impl Checker {
    /// Asks the stream whether it is still the log this node applied (the
    /// same stream, not one deleted and recreated under its name; holding
    /// at least what this node applied, and not dropped from the front
    /// past it; still holding the last entry it applied, not another one
    /// under its sequence), and judges: `Err` if it could not ask.
    async fn judge(&mut self) -> Result<Result<(), &'static str>, String> {
        let next = self.applied.load(Ordering::Relaxed) + 1;
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let info = self.stream.info().await.map_err(|e| e.to_string())?.clone();
        let epoch = stream_epoch(
            &self.stream_name,
            &info.config.metadata,
            info.created.unix_timestamp_nanos(),
        );
        self.metrics
            .stream_last
            .set(i64::try_from(info.state.last_sequence).unwrap_or(i64::MAX));
        let state = (info.state.first_sequence, info.state.last_sequence);
        let mut verdict = judge_stream(self.stream_epoch, next, epoch, state);
        // Erased after a removal, not dropped: the applier applies their
        // tombstones.
        if verdict == Err(STOPPED_GAP)
            && self.tombstones.cover(next, info.state.first_sequence).await
        {
            verdict = Ok(());
        }
        if verdict.is_ok()
            && let Some((seq, payload)) = &last
            && holds(&self.stream, *seq, &fingerprint(payload)).await? == Some(false)
        {
            verdict = Err(STOPPED_REPLACED);
        }
        if let Err(why) = verdict {
            error!(
                applied = next - 1,
                stream_first = info.state.first_sequence,
                stream_last = info.state.last_sequence,
                %epoch,
                ours = %self.stream_epoch,
                "{why}"
            );
        }
        Ok(verdict)
    }

    /// Checks the stream every [`STREAM_CHECK_EVERY`] until it fails a
    /// check (the reason is sent on `verdict`) or the applier is gone. A
    /// stream that cannot be read now is left to the next check.
    async fn every_second(mut self, mut verdict: oneshot::Sender<&'static str>) {
        let mut every = tokio::time::interval(STREAM_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = verdict.closed() => return,
                _ = every.tick() => {}
            }
            if let Ok(Ok(Err(why))) = tokio::time::timeout(CHECK_TRY, self.judge()).await {
                let _ = verdict.send(why);
                return;
            }
        }
    }
}

/// The task that applies the stream, and what it works with.
struct Applier {
    /// What it reports in `/metrics`.
    metrics: ClusterMetrics,
    chat: Chat,
    commits: Commits,
    stop: CancellationToken,
    stream: stream::Stream,
    stream_name: String,
    /// The ordered read of the stream.
    entries: consumer::pull::Ordered,
    /// Counts the client's (re)connections to NATS.
    reconnected: watch::Receiver<u64>,
    /// The entry to apply next.
    next: u64,
    /// Told the head once the stream as it was when this node joined is
    /// applied.
    caught_up: Option<oneshot::Sender<Position>>,
    /// The last entry in the stream when this node joined.
    caught_up_to: u64,
    node: String,
    boot: Uuid,
    rules: String,
    /// Outcomes awaited by this node's connections.
    waiting: Arc<Waiting>,
    view: Arc<Mutex<View>>,
    /// The view's clock, for the commands that wait for their fate.
    clock: watch::Sender<u64>,
    health: Arc<watch::Sender<Health>>,
    /// The stream's own epoch, its identity.
    stream_epoch: Epoch,
    /// The chat's epoch: the stream's, switched by every rewind found in it
    /// (`super::envelope::NewEpoch`).
    epoch: Epoch,
    /// Where a new epoch is announced.
    log: Arc<Log>,
    /// The last entry applied, and what it held (the checks' and the
    /// snapshots'; `checker.last` is the same, for the checks).
    last: Option<(u64, bytes::Bytes)>,
    /// The last entry applied, for the sequencer's envelopes.
    applied: Arc<AtomicU64>,
    /// Checks the stream on every reconnection.
    checker: Checker,
    /// The periodic check's verdict, if the stream fails it.
    verdict: oneshot::Receiver<&'static str>,
    /// What this node applied is not the stream's chat: it keeps no
    /// snapshot of it.
    diverged: bool,
    js: jetstream::Context,
    subject: String,
    timeout: Duration,
    snapshots: Bucket,
    /// The tombstones of erased entries, applied in their place.
    tombstones: Tombstones,
    /// Erases the entries of removed messages.
    eraser: Eraser,
    /// Every how many entries a snapshot is taken.
    every: u64,
    /// Where this node keeps its own snapshot.
    local: Option<Arc<DataDir>>,
    /// This node's own snapshot is written off the runtime: the write
    /// under way, if any.
    writing: Option<JoinHandle<()>>,
}

impl Applier {
    /// Applies the stream until told to stop, or until it cannot go on;
    /// `caught_up` if there is nothing to catch up with.
    async fn run(mut self, caught_up: bool) {
        if caught_up {
            self.report_caught_up();
        }
        loop {
            let entry = tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    self.write_last_snapshot().await;
                    return;
                }
                changed = self.reconnected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // NATS may have restarted with less than it had: the
                    // stream is checked before anything more is read.
                    if self.check_stream().await.is_break() {
                        return;
                    }
                    self.read_again().await;
                    continue;
                }
                Ok(why) = &mut self.verdict => {
                    self.stop_serving(why);
                    return;
                }
                entry = self.entries.next() => match entry {
                    Some(entry) => entry,
                    None => {
                        let _ = self.health.send(Health::Stopped(STOPPED_ENDED));
                        return;
                    }
                },
            };
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!(error = %e, "reading the stream failed; the ordered consumer resumes");
                    continue;
                }
            };
            if self.take(&entry).await.is_break() {
                return;
            }
        }
    }

    /// NATS came back (perhaps restarted, perhaps another server of its
    /// cluster): read on from the next entry with a fresh consumer, rather
    /// than wait for the old one to notice. JetStream may still be
    /// electing the stream's leader, so a failure is retried (no other
    /// reconnect may come to retry it).
    async fn read_again(&mut self) {
        let mut delay = Duration::from_millis(100);
        loop {
            let read = tokio::time::timeout(CHECK_TRY, read_from(&self.stream, self.next))
                .await
                .unwrap_or_else(|_| Err("no answer within a second".to_owned()));
            match read {
                Ok((fresh, _)) => {
                    self.entries = fresh;
                    return;
                }
                Err(e) => {
                    warn!(error = %e, next = self.next, "re-reading the stream failed; retrying");
                    tokio::select! {
                        // The next turn of the loop stops.
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Checks, after a reconnection and before anything more is read, that
    /// the stream is still the log this node applied ([`Checker::judge`]):
    /// `Break` when it is not (this node then stops serving). It asks
    /// until it gets an answer (or the server stops).
    async fn check_stream(&mut self) -> ControlFlow<()> {
        let mut delay = Duration::from_millis(100);
        loop {
            // A request sent while NATS elects the stream's leader may get
            // no answer: asked again soon rather than waited out.
            let judged = tokio::time::timeout(CHECK_TRY, self.checker.judge())
                .await
                .unwrap_or_else(|_| Err("no answer within a second".to_owned()));
            match judged {
                Ok(Ok(())) => return ControlFlow::Continue(()),
                Ok(Err(why)) => {
                    self.stop_serving(why);
                    return ControlFlow::Break(());
                }
                Err(e) => {
                    warn!(error = %e, "checking the stream failed; retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => return ControlFlow::Continue(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Whether the entries before `seq` that this node did not get were
    /// deleted one by one (an operator's `nats stream rmm`: known holes,
    /// the same for every node) rather than dropped from the front of the
    /// stream before this node read them (a gap: the chat cannot be
    /// computed from here). Asks the stream until it answers, or the
    /// server stops (`None`).
    async fn holes_deleted(&mut self) -> Option<bool> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.stream.info().await {
                Ok(info) => return Some(info.state.first_sequence <= self.next),
                Err(e) => {
                    warn!(error = %e, "reading the stream's state failed; retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Stops serving for `why`: `/healthz` and new connections get 503
    /// with it, and open connections are closed (`crate::server`): the
    /// stream is not the log this node applied. If it went back, a new
    /// epoch is due: see [`Applier::rewound`].
    fn stop_serving(&mut self, why: &'static str) {
        let _ = self.health.send(Health::Broken(why));
        if why == STOPPED_REWOUND || why == STOPPED_REPLACED {
            self.rewound(why);
        }
    }

    /// The stream went back behind what this node applied: the positions
    /// of what it lost will be given to new entries, so clients that saw
    /// them must be told to reset, wherever they resume. This node appends
    /// a `NewEpoch` entry (every node switches epoch when it applies it),
    /// forgets its own snapshot (of a chat the stream no longer holds),
    /// and deletes the cluster's snapshots of it, so that no node starts
    /// from them.
    fn rewound(&mut self, why: &'static str) {
        self.diverged = true;
        let rewind = Rewind {
            node: self.node.clone(),
            boot: self.boot,
            applied: self.next - 1,
            why: why.to_owned(),
        };
        let (js, subject, then, within) = (
            self.js.clone(),
            self.subject.clone(),
            self.epoch,
            self.timeout,
        );
        // Weak: this task may outlive the server (the append waits up to
        // the cluster timeout), and must not keep the data directory
        // locked after it stopped.
        let local = self.local.as_ref().map(Arc::downgrade);
        let stream_name = self.stream_name.clone();
        let (snapshots, tombstones, stream, stream_epoch, rules) = (
            self.snapshots.clone(),
            self.tombstones.clone(),
            self.stream.clone(),
            self.stream_epoch,
            self.rules.clone(),
        );
        tokio::spawn(async move {
            let removed = lost_removals(&tombstones, &stream).await;
            match append_new_epoch(&js, &subject, then, rewind, removed, within).await {
                Ok(()) => warn!(ended = %then, "appended the entry that starts a new epoch"),
                Err(e) => {
                    error!(error = %e, "a new epoch is due, and the entry that starts it could not be appended; the next node to start appends it")
                }
            }
            if let Some(dir) = local.and_then(|dir| dir.upgrade()) {
                drop_own_snapshot(&dir, &stream_name).await;
            }
            let mut stream = stream;
            if let Ok(info) = stream.info().await {
                let last = info.state.last_sequence;
                let _ = newest_snapshot(&snapshots, &stream, stream_epoch, &rules, last).await;
            }
        });
    }

    /// Applies one entry read from the stream: `Break` when this node
    /// cannot go on.
    async fn take(&mut self, entry: &async_nats::jetstream::Message) -> ControlFlow<()> {
        let Ok(info) = entry.info() else {
            warn!("a stream entry without its metadata; skipped");
            return ControlFlow::Continue(());
        };
        let seq = info.stream_sequence;
        match continuity(self.next, seq) {
            Continuity::Next => {}
            Continuity::Rewound => {
                // An entry this node applied. Either the stream went back,
                // or the consumer did: async-nats makes an ordered consumer
                // again (after missed heartbeats, or a consumer lost with
                // its server) from the entry after the last it delivered,
                // but from the stream's first entry when it delivered none
                // yet. Only the stream can tell which: checked (it stops
                // this node if the stream went back), then read on from
                // the next entry. (The chaos test's seed
                // 1796382458618142420 found this: a false new epoch.)
                if self.check_stream().await.is_break() {
                    return ControlFlow::Break(());
                }
                warn!(
                    seq,
                    next = self.next,
                    "the stream sent again an entry this node applied (its reader was made again from the start); the stream holds what was applied: reading on from the next"
                );
                self.read_again().await;
                return ControlFlow::Continue(());
            }
            Continuity::Skipped => {
                // Entries erased after a moderator removed what they
                // posted: their tombstones are applied in their place,
                // as on every node (`super::erase`).
                while self.next < seq {
                    let Some(erased) = self.tombstones.get(self.next).await else {
                        break;
                    };
                    // An envelope is plain data: it always serializes.
                    let payload =
                        serde_json::to_vec(&erased.envelope).expect("envelopes serialize");
                    if self
                        .apply_at(self.next, erased.ms, payload.into(), info.pending + 1)
                        .await
                        .is_break()
                    {
                        return ControlFlow::Break(());
                    }
                }
                if self.next < seq {
                    match self.holes_deleted().await {
                        None => return ControlFlow::Break(()),
                        Some(true) => {
                            warn!(
                                from = self.next,
                                to = seq - 1,
                                "stream entries deleted (known holes, the same for every node); skipped"
                            );
                        }
                        Some(false) => {
                            error!(seq, next = self.next, "{STOPPED_GAP}");
                            self.stop_serving(STOPPED_GAP);
                            return ControlFlow::Break(());
                        }
                    }
                }
            }
        }
        let ms = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        self.apply_at(seq, ms, entry.payload.clone(), info.pending)
            .await
    }

    /// Applies the entry at stream sequence `seq`, stored at `ms`, holding
    /// `payload`, with `pending` entries after it in the stream: `Break`
    /// when this node cannot go on.
    async fn apply_at(
        &mut self,
        seq: u64,
        ms: u64,
        payload: bytes::Bytes,
        pending: u64,
    ) -> ControlFlow<()> {
        self.next = seq + 1;
        self.last = Some((seq, payload.clone()));
        *self
            .checker
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.last.clone();
        self.applied.store(seq, Ordering::Relaxed);
        self.metrics
            .applied
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
        let mut uploader = false;
        let before = self.epoch;
        let applied = apply(
            &mut self.chat,
            &mut self.epoch,
            &self.rules,
            seq,
            ms,
            &payload,
        );
        if self.epoch != before {
            // Before any event of the new epoch goes to the pipeline.
            self.log.set_epoch(self.epoch);
            warn!(
                seq,
                ended = %before,
                epoch = %self.epoch,
                "the stream went back before this entry (a lost tail): a new epoch starts here, on every node; clients resuming from the old one get a full replay"
            );
        }
        match applied {
            Applied::Done {
                origin,
                user,
                outcome,
                events,
            } => {
                if matches!(outcome, Outcome::OtherRules) {
                    warn!(
                        seq,
                        from = ?origin.as_ref().map(|(node, _, _)| node),
                        "a command sent under other chat rules than the stream's (a node of a build that does not check them); not applied, on every node alike"
                    );
                }
                let Some(clock) = self
                    .take_events(seq, ms, &payload, user.as_ref(), events)
                    .await
                else {
                    return ControlFlow::Break(()); // the server is stopping
                };
                // The snapshot after this entry, if one is due, is stored
                // by the node that sent the command: one node, chosen by
                // the log itself.
                uploader = origin.as_ref().is_some_and(|(n, _, _)| *n == self.node);
                if let Some((n, b, request)) = origin
                    && n == self.node
                    && b == self.boot
                {
                    let waiter = self
                        .waiting
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&request);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(outcome);
                    }
                }
                // After the outcome: a command whose deadline this passes
                // and that has none was not applied.
                self.clock.send_replace(clock);
            }
            Applied::Skipped(why) => {
                warn!(seq, %why, "a stream entry that is not a command was skipped, on every node alike");
            }
            Applied::NewEpoch { rewind, events } => {
                warn!(seq, by = %rewind.node, why = %rewind.why, removed = events.len(), "a node found the stream rewound");
                let Some(clock) = self.take_events(seq, ms, &payload, None, events).await else {
                    return ControlFlow::Break(()); // the server is stopping
                };
                self.clock.send_replace(clock);
            }
            Applied::Unknown(v) => {
                error!(
                    seq,
                    version = v,
                    "the stream holds an envelope of version {v}, which this build does not know; \
                     this node stops applying rather than diverge from the others: upgrade it"
                );
                let _ = self.health.send(Health::Stopped(STOPPED_VERSION));
                return ControlFlow::Break(());
            }
        }
        if seq.is_multiple_of(self.every) {
            self.snapshot(seq, uploader);
        }
        // Caught up once past what the stream held when this node joined,
        // or once nothing more is pending (the stream may end in deleted
        // entries).
        if seq >= self.caught_up_to || pending == 0 {
            self.report_caught_up();
        }
        ControlFlow::Continue(())
    }

    /// Takes the `events` of the entry at `seq` (stored at `ms`, holding
    /// `payload`), the command of `user`: into this node's view, the
    /// erasure of what they removed, and on to the pipeline. The view's
    /// clock after them, or `None` if the server is stopping.
    async fn take_events(
        &mut self,
        seq: u64,
        ms: u64,
        payload: &[u8],
        user: Option<&UserId>,
        events: Vec<Event>,
    ) -> Option<u64> {
        let clock = {
            let mut view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
            view.applied(&self.chat, Timestamp::from_unix_millis(ms), user, &events);
            view.clock_ms()
        };
        let mut entry: Option<Arc<str>> = None;
        for event in &events {
            if let EventKind::MessageRemoved { message, .. } = &event.kind
                && let Some(post) = post_of(message.id)
            {
                let entry = entry.get_or_insert_with(|| fingerprint(payload).into());
                self.erase(post, message.id, seq, Arc::clone(entry)).await;
            }
        }
        if !events.is_empty() && self.commits.send(events, 1).await.is_err() {
            return None;
        }
        Some(clock)
    }

    /// A removal at entry `removal` took message `id`, posted by entry
    /// `post`, out of the chat: this node's own snapshot goes if it was
    /// taken between the two (it holds the text), and the entry is erased
    /// from the stream, with the cluster's snapshots between the two
    /// (`super::erase`; every node tries, the first does it).
    async fn erase(&mut self, post: u64, id: Uuid, removal: u64, removal_entry: Arc<str>) {
        if let Some(dir) = &self.local
            && removal - removal % self.every >= post
        {
            if let Some(w) = self.writing.take() {
                let _ = w.await;
            }
            drop_own_snapshot(dir, &self.stream_name).await;
        }
        self.eraser.erase(post, id, removal, removal_entry);
    }

    /// Says, once, that the stream as it was when this node joined is
    /// applied.
    fn report_caught_up(&mut self) {
        if let Some(tx) = self.caught_up.take() {
            let _ = tx.send(self.chat.head());
        }
    }

    fn stored(&self, seq: u64) -> Stored {
        Stored {
            epoch: self.stream_epoch,
            chat_epoch: Some(self.epoch),
            seq,
            entry: self
                .last
                .as_ref()
                .filter(|(at, _)| *at == seq)
                .map(|(_, payload)| fingerprint(payload)),
            rules: self.rules.clone(),
            chat: self.chat.snapshot(),
        }
    }

    /// Takes the snapshot after entry `seq`: this node's own unless the
    /// last is still being written (the next one will be), and the
    /// cluster's if this node is its `uploader`.
    fn snapshot(&mut self, seq: u64, uploader: bool) {
        if !uploader && self.local.is_none() {
            return;
        }
        let stored = self.stored(seq);
        if let Some(dir) = &self.local
            && self.writing.as_ref().is_none_or(JoinHandle::is_finished)
        {
            let dir = Arc::clone(dir);
            let own = stored.clone();
            let stream_name = self.stream_name.clone();
            self.writing = Some(tokio::task::spawn_blocking(move || {
                write_own_snapshot(&dir, &stream_name, &own);
            }));
        }
        if uploader {
            tokio::spawn(store_snapshot(self.snapshots.clone(), stored));
        }
    }

    /// What this node applied, for its next start (unless it is not the
    /// stream's chat).
    async fn write_last_snapshot(&mut self) {
        if let Some(w) = self.writing.take() {
            let _ = w.await;
        }
        if let Some(dir) = &self.local
            && !self.diverged
            && self.last.is_some()
        {
            let stored = self.stored(self.next - 1);
            let dir = Arc::clone(dir);
            let stream_name = self.stream_name.clone();
            let _ = tokio::task::spawn_blocking(move || {
                write_own_snapshot(&dir, &stream_name, &stored);
            })
            .await;
        }
    }
}

/// Where an entry's stream sequence stands against the next one a node
/// expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continuity {
    /// The very next entry.
    Next,
    /// At or before one already applied: the stream went back.
    Rewound,
    /// Past the next: entries between were deleted, or dropped.
    Skipped,
}

fn continuity(next: u64, seq: u64) -> Continuity {
    match seq.cmp(&next) {
        std::cmp::Ordering::Equal => Continuity::Next,
        std::cmp::Ordering::Less => Continuity::Rewound,
        std::cmp::Ordering::Greater => Continuity::Skipped,
    }
}

/// Whether the stream, now of `epoch` and holding entries `first..=last`,
/// is still the log a node of `ours`, whose next entry is `next`, applied
/// (and can go on applying).
fn judge_stream(
    ours: Epoch,
    next: u64,
    epoch: Epoch,
    (first, last): (u64, u64),
) -> Result<(), &'static str> {
    if epoch != ours {
        Err(STOPPED_RECREATED)
    } else if last < next - 1 {
        Err(STOPPED_REWOUND)
    } else if first > next {
        // Entries from `next` on were dropped before this node read them.
        Err(STOPPED_GAP)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_its_name_in_the_metrics() {
        let all = [
            Health::CatchingUp,
            Health::Serving,
            Health::Stopped(STOPPED_VERSION),
            Health::Stopped(STOPPED_ENDED),
            Health::Broken(STOPPED_REWOUND),
            Health::Broken(STOPPED_REPLACED),
            Health::Broken(STOPPED_RECREATED),
            Health::Broken(STOPPED_GAP),
        ];
        let names: Vec<&str> = all.into_iter().map(state_name).collect();
        assert_eq!(
            names,
            crate::metrics::CLUSTER_STATES,
            "one name each, all listed"
        );
    }
    use crate::sequencer::cluster::envelope::epoch_of;

    #[test]
    fn only_the_very_next_entry_is_applied() {
        assert_eq!(continuity(5, 5), Continuity::Next);
        assert_eq!(continuity(5, 4), Continuity::Rewound);
        assert_eq!(continuity(5, 1), Continuity::Rewound);
        assert_eq!(continuity(5, 6), Continuity::Skipped);
    }

    #[test]
    fn a_stream_recreated_rewound_or_cut_short_is_not_the_log_applied() {
        let ours = epoch_of("chat", 1);
        // Applied up to 10: the next is 11.
        assert_eq!(judge_stream(ours, 11, ours, (1, 10)), Ok(()));
        assert_eq!(judge_stream(ours, 11, ours, (1, 12)), Ok(()));
        assert_eq!(
            judge_stream(ours, 11, ours, (11, 12)),
            Ok(()),
            "older ones dropped"
        );
        assert_eq!(
            judge_stream(ours, 11, ours, (11, 10)),
            Ok(()),
            "all applied, then purged"
        );
        assert_eq!(judge_stream(ours, 1, ours, (1, 0)), Ok(()), "empty");
        assert_eq!(
            judge_stream(ours, 11, ours, (1, 9)),
            Err(STOPPED_REWOUND),
            "a lost tail"
        );
        assert_eq!(
            judge_stream(ours, 11, ours, (13, 15)),
            Err(STOPPED_GAP),
            "11 and 12 dropped unread"
        );
        assert_eq!(
            judge_stream(ours, 11, ours, (13, 12)),
            Err(STOPPED_GAP),
            "11 and 12 purged unread"
        );
        assert_eq!(
            judge_stream(ours, 11, epoch_of("chat", 2), (1, 20)),
            Err(STOPPED_RECREATED),
            "recreated, even if longer"
        );
    }
}
