//! The one path every event takes: **apply → commit → publish**.
//!
//! The sequencer (`crate::sequencer`) applies commands in one order and queues
//! their events in the [`Commits`] queue, bounded in bytes: each command
//! takes room for the largest frames its event can make before it is
//! applied, and while the queue is full, senders wait. The committer
//! thread here takes everything waiting, hands it to an
//! [`EventWriter`], and once that returns publishes the batch to the
//! [`Log`], where connections read it, and through the [`Fanout`] to the
//! connections waiting at its head. With the default store the
//! writer is SQLite, so nothing is shown before it is on disk; with
//! `--in-memory` it is [`Discard`], a writer that writes nothing, and the
//! path is otherwise the same.
//!
//! While writes fail the committer retries with backoff and publishes
//! nothing; it never drops anything. Past `--max-store-outage` it stops the
//! server, and at shutdown it gives up when told to.

use super::entry::Entry;
use super::fanout::Fanout;
use super::log::Log;
use crate::metrics::Metrics;
use chat_core::Event;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

/// The queue of applied events waiting for their commit, bounded in
/// bytes (`--commit-queue-bytes`).
///
/// The size of an event is not known before its command is applied, and
/// a sender must not wait after applying (the order is decided then). So
/// each command reserves room for the most its event can hold: the
/// largest frame the rules allow, twice (a `reaction_updated` becomes its
/// frame and the message's new history frame; a post may carry the
/// message it evicts). The room comes back once the committer has
/// published the batch.
#[derive(Debug, Clone)]
pub(crate) struct Commits {
    tx: mpsc::UnboundedSender<Commit>,
    room: Arc<Semaphore>,
    /// The room one command takes, in bytes.
    per_command: u32,
}

/// Applied events, with the room they took.
#[derive(Debug)]
pub(crate) struct Commit {
    events: Vec<Event>,
    room: u32,
}

/// Room for one command's events, taken before it is applied.
#[derive(Debug)]
pub(crate) struct Reserved<'a> {
    commits: &'a Commits,
    permit: SemaphorePermit<'a>,
}

/// The queue no longer takes commands: the server is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// What the committer takes commits from, and gives their room back to.
#[derive(Debug)]
pub(crate) struct Queue {
    rx: mpsc::UnboundedReceiver<Commit>,
    room: Arc<Semaphore>,
}

/// A commit queue of `bytes` (at least one command's room), where a
/// command takes `largest_frame` twice.
pub(crate) fn commit_queue(bytes: usize, largest_frame: usize) -> (Commits, Queue) {
    let per_command = u32::try_from(largest_frame.saturating_mul(2)).unwrap_or(u32::MAX);
    let total = bytes
        .clamp(per_command as usize, Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let room = Arc::new(Semaphore::new(total));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Commits {
            tx,
            room: Arc::clone(&room),
            per_command,
        },
        Queue { rx, room },
    )
}

impl Commits {
    /// Waits for room for one command's events.
    pub(crate) async fn reserve(&self) -> Result<Reserved<'_>, Closed> {
        let permit = self
            .room
            .acquire_many(self.per_command)
            .await
            .map_err(|_| Closed)?;
        Ok(Reserved {
            commits: self,
            permit,
        })
    }

    /// Queues the events of `commands` applied commands, waiting for their
    /// room first (the cluster's applier, which applies before it knows).
    pub(crate) async fn send(&self, events: Vec<Event>, commands: usize) -> Result<(), Closed> {
        let want = u32::try_from(commands.max(1))
            .unwrap_or(u32::MAX)
            .saturating_mul(self.per_command);
        let permit = self.room.acquire_many(want).await.map_err(|_| Closed)?;
        permit.forget();
        self.tx
            .send(Commit { events, room: want })
            .map_err(|_| Closed)
    }
}

impl Reserved<'_> {
    /// Queues the applied command's events in the room taken.
    pub(crate) fn send(self, events: Vec<Event>) {
        let room = self.permit.num_permits() as u32;
        self.permit.forget();
        // The committer is gone only once the server has stopped.
        let _ = self.commits.tx.send(Commit { events, room });
    }
}

/// Where applied events are written before they are published.
pub(crate) trait EventWriter: Send + 'static {
    /// Why a write failed.
    type Error: std::fmt::Display;

    /// Writes `entries`, in order, as one unit; `Ok` means they are as
    /// durable as this writer makes anything.
    fn write(&mut self, entries: &[Entry]) -> Result<(), Self::Error>;
}

/// The writer of `--in-memory`: writes nothing, never fails.
#[derive(Debug, Default)]
pub(crate) struct Discard;

impl EventWriter for Discard {
    type Error = std::convert::Infallible;

    fn write(&mut self, _: &[Entry]) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Most commands written in one transaction.
const MAX_COMMANDS: usize = 1024;

/// The longest wait between two attempts at a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The running committer thread, as the server sees it.
#[derive(Debug)]
pub(crate) struct Committer {
    /// Set when the server stops waiting: the committer abandons a commit
    /// it cannot make instead of retrying forever.
    give_up: Arc<AtomicBool>,
    /// Set when the store failed for longer than allowed and the committer
    /// stopped the server.
    outage: Arc<AtomicBool>,
    /// Resolves (with an error: the sender is dropped) when the thread ends.
    done: oneshot::Receiver<()>,
    /// The commit queue's room: all of it is back once everything queued
    /// is written.
    room: Arc<Semaphore>,
    /// All of the room.
    total: usize,
}

/// How the committer's work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// Everything queued was written.
    AllWritten,
    /// It was still failing (or stuck in a write) when time ran out; what
    /// it had not written was never shown to anyone.
    GaveUp,
}

impl Committer {
    /// Whether the committer stopped the server because the store had
    /// failed for longer than allowed.
    pub(crate) fn stopped_the_server(&self) -> bool {
        self.outage.load(Ordering::Relaxed)
    }

    /// Closes the commit queue: no command is applied any more (senders
    /// are told the server is stopping); what is queued is still written.
    pub(crate) fn close_queue(&self) {
        self.room.close();
    }

    /// Whether the queue is closed and everything it took is written and
    /// published: all its room is back.
    fn all_written(&self) -> bool {
        self.room.is_closed() && self.room.available_permits() == self.total
    }

    /// Waits until the committer has written what was queued and ended
    /// (the queue's last sender is gone), or until `deadline`. Past it, the
    /// committer is told to give up; a commit stuck in the kernel is left
    /// behind (the process exits around it, and SQLite's journal keeps the
    /// database whole).
    ///
    /// Everything is written once the queue is closed and all its room is
    /// back, even while a connection that is still closing keeps the
    /// queue's sender (and so the committer's thread) alive past the
    /// deadline: that is not a commit given up.
    pub(crate) async fn finish(mut self, deadline: tokio::time::Instant) -> Finished {
        if tokio::time::timeout_at(deadline, &mut self.done)
            .await
            .is_ok()
        {
            return if self.give_up.load(Ordering::Relaxed) {
                Finished::GaveUp
            } else {
                Finished::AllWritten
            };
        }
        if self.all_written() {
            return Finished::AllWritten;
        }
        self.give_up.store(true, Ordering::Relaxed);
        // A retrying committer notices within one backoff step.
        let _ = tokio::time::timeout(BACKOFF_STEP * 2, &mut self.done).await;
        if self.all_written() {
            Finished::AllWritten
        } else {
            Finished::GaveUp
        }
    }
}

/// How often a backing-off committer checks whether to give up.
const BACKOFF_STEP: Duration = Duration::from_millis(100);

/// What the committer works between: the queue it takes events from, the
/// log it publishes them to, and how long a failing writer may fail.
#[derive(Debug)]
pub(crate) struct Pipe {
    /// Applied events, in order.
    pub(crate) queue: Queue,
    /// Where written events are published.
    pub(crate) log: Arc<Log>,
    /// The connections waiting at the log's head, written to on publish.
    pub(crate) fanout: Arc<Fanout>,
    /// Where commits are counted and timed.
    pub(crate) metrics: Arc<Metrics>,
    /// How long writes may fail before the server is stopped.
    pub(crate) max_outage: Duration,
    /// Cancelled to stop the server.
    pub(crate) stop: CancellationToken,
}

/// Starts the committer thread: it writes queued events in batches with
/// `writer` (with the store: one transaction, one fsync, each), and
/// publishes each batch to `log` once it is written. It ends when the
/// sequencer, and with it the queue's sender, is gone, after writing what was
/// queued, or when told to give up.
///
/// While commits fail it retries with backoff; nothing is published or
/// dropped meanwhile. If they have failed for `max_outage`, it cancels
/// `stop` (the server stops and exits non-zero: a supervisor should know)
/// and keeps trying until the server gives up on it.
pub(crate) fn spawn_committer(writer: impl EventWriter, pipe: Pipe) -> std::io::Result<Committer> {
    let Pipe {
        queue,
        log,
        fanout,
        metrics,
        max_outage,
        stop,
    } = pipe;
    let give_up = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = oneshot::channel::<()>();
    let giving_up = Arc::clone(&give_up);
    let outage = Arc::new(AtomicBool::new(false));
    let out = Arc::clone(&outage);
    let room = Arc::clone(&queue.room);
    let total = room.available_permits();
    std::thread::Builder::new()
        .name("chat-store".into())
        .spawn(move || {
            // Declared first, dropped last: the writer (the store, and the
            // data directory's lock) is released before `finish` hears of it.
            let _done = done_tx;
            let mut writer = writer;
            let Queue { mut rx, room } = queue;
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_COMMANDS {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let commands = batch.len();
                let taken: usize = batch.iter().map(|c| c.room as usize).sum();
                let started = Instant::now();
                let mut backoff = Duration::from_millis(10);
                // Nothing is published until it is on disk: on a failing
                // disk, clients' messages wait (and the queue applies
                // backpressure) rather than being lost.
                let entries: Vec<Entry> = batch
                    .into_iter()
                    .flat_map(|c| c.events)
                    .map(Entry::from)
                    .collect();
                while let Err(e) = writer.write(&entries) {
                    metrics.store_failing.set(1);
                    let failing_for = started.elapsed();
                    if failing_for >= max_outage && !stop.is_cancelled() {
                        error!(
                            error = %e,
                            failing_for = ?failing_for,
                            "the store has failed for longer than --max-store-outage; stopping the server"
                        );
                        out.store(true, Ordering::Relaxed);
                        stop.cancel();
                    }
                    error!(error = %e, retry_in = ?backoff, "commit failed; messages wait");
                    if !sleep_unless(&giving_up, backoff) {
                        let unwritten = commands + rx.len();
                        error!(
                            unwritten,
                            "gave up on the store: {unwritten} accepted commands were not written; none of them was ever shown to anyone"
                        );
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                let took = started.elapsed();
                metrics.store_failing.set(0);
                metrics.store_commit.observe(took.as_secs_f64());
                metrics.store_commit_commands.observe(commands as f64);
                debug!(commands, ?took, "committed");
                fanout.publish(&log, &entries);
                drop(entries);
                room.add_permits(taken);
            }
        })?;
    Ok(Committer {
        give_up,
        outage,
        done,
        room,
        total,
    })
}

/// Sleeps for `d` in short steps; false if told to give up meanwhile.
fn sleep_unless(give_up: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if give_up.load(Ordering::Relaxed) {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(BACKOFF_STEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::publish::log::Since;
    use crate::publish::recent::Retention;
    use crate::sequencer::local::LocalSequencer;
    use chat_core::{Chat, Config};
    use chat_proto::{ClientFrame, Epoch, Position, SendMessage, ServerFrame, Uuid};
    use std::sync::{Condvar, Mutex};

    /// A writer that records what it wrote and holds every write until the
    /// test opens its gate.
    #[derive(Clone, Default)]
    struct Gated {
        written: Arc<Mutex<Vec<u64>>>,
        open: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Gated {
        fn open(&self) {
            let (open, changed) = &*self.open;
            *open.lock().expect("gate") = true;
            changed.notify_all();
        }
    }

    impl EventWriter for Gated {
        type Error = std::convert::Infallible;

        fn write(&mut self, entries: &[Entry]) -> Result<(), Self::Error> {
            let (open, changed) = &*self.open;
            let mut open = open.lock().expect("gate");
            while !*open {
                open = changed.wait(open).expect("gate");
            }
            let mut written = self.written.lock().expect("written");
            written.extend(entries.iter().map(|e| e.event.position.0));
            Ok(())
        }
    }

    fn say(text: &str) -> ClientFrame {
        ClientFrame::SendMessage(SendMessage {
            text: text.into(),
            author_name: None,
        })
    }

    #[tokio::test]
    async fn nothing_is_published_before_its_commit_and_the_order_is_the_applied_one() {
        let chat = Chat::new(Config::default());
        let metrics = Arc::new(Metrics::new());
        let retention = Retention {
            events: 100,
            bytes: usize::MAX,
        };
        let log = Arc::new(Log::new(
            &chat,
            Epoch(Uuid::from_u128(1)),
            [],
            retention,
            Arc::clone(&metrics),
        ));
        let (commits, queue) = commit_queue(1 << 20, 1024);
        let writer = Gated::default();
        let pipe = Pipe {
            queue,
            log: Arc::clone(&log),
            fanout: Arc::default(),
            metrics,
            max_outage: Duration::from_secs(60),
            stop: CancellationToken::new(),
        };
        let committer = spawn_committer(writer.clone(), pipe).expect("thread");
        let sequencer = LocalSequencer::new(chat, commits, Clock::system());
        for text in ["one", "two", "three"] {
            sequencer
                .apply(&"u".into(), say(text))
                .await
                .expect("accepted");
        }
        // Applied, not written: nothing is visible to a joining client.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let joined = log.join(Since::Start);
        assert_eq!(joined.cursor, Position(0));
        assert!(joined.history.is_empty());
        assert!(writer.written.lock().expect("written").is_empty());

        writer.open();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let published = loop {
            let joined = log.join(Since::Start);
            if joined.cursor == Position(3) {
                break joined;
            }
            assert!(tokio::time::Instant::now() < deadline, "never published");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(*writer.written.lock().expect("written"), [1, 2, 3]);
        let mut texts = Vec::new();
        let mut next = published.history.start;
        log.replay(&mut next, published.history.end, |f| {
            match ServerFrame::decode(f.as_str()).expect("frame") {
                ServerFrame::Message(m) => texts.push(m.text),
                other => panic!("{other:?}"),
            }
            true
        });
        assert_eq!(texts, ["one", "two", "three"], "in the order applied");
        drop(sequencer);
        let finished = committer
            .finish(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        assert_eq!(finished, Finished::AllWritten);
    }
}
