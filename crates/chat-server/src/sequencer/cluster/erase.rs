//! Erasing a removed message from the cluster's stream.
//!
//! Once a moderator's removal is applied, the stream entry that posted the
//! message still holds its text. Each node that applies the removal hands
//! the entry to its [`Eraser`], which (the first node to get there does
//! the work; the others find it done):
//!
//! 1. writes a **tombstone** for the entry, key `<seq>` in the stream's
//!    tombstone bucket ([`Tombstones`]): the entry's envelope with the
//!    post's text and name taken out ([`redacted`]), and its time;
//! 2. erases the entry from the stream (JetStream's message delete, which
//!    overwrites the message in the store unless told not to);
//! 3. deletes the snapshots taken between the post and the removal, which
//!    hold the text too (the ones before and after it do not).
//!
//! A step that fails (NATS away, a leader being elected) is tried again,
//! later and later, for a while; a purge's thousands of entries are one
//! batch, with one listing of the snapshot bucket.
//!
//! An erased entry is a known hole, not a gap: a node that meets it (one
//! catching up from the start or an older snapshot, or one that was
//! behind) applies the tombstone in its place. The redacted post is
//! accepted exactly as the post was (the same user, time, deadline and
//! rules; a text and a name any rules take), so it gets the same message
//! id and the same position, counts against the same limits, and the
//! removal that follows removes it: every node ends in the same chat, at
//! the same positions, without the text ever reaching it. The tombstone
//! is written before the entry is erased, so there is never a hole without
//! one.
//!
//! A lost tail (a NATS server that lost its newest writes) may take a
//! removal with it, but not the erasure it caused. So the eraser checks,
//! just before it erases, that the stream still holds the removal's entry;
//! and the node that appends the new epoch's entry lists the messages whose
//! entries were erased after a removal the stream no longer holds
//! ([`Tombstones::lost`]): every node removes them when it applies that
//! entry, rather than show a redacted post its author never wrote.
//!
//! Tombstones are read with direct gets, which make no consumer: from
//! nats-server 2.15 on a stream has at most 1,000 consumers, and an object
//! read or a listing makes one that the server keeps 30 s. Read as objects,
//! a node catching up through a purge ran out of them (the chaos test
//! found it).

use super::envelope::{Envelope, message_id};
use super::snapshot::{Bucket, gone, holds, next_matching, snapshot_seq};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{kv, stream};
use chat_core::Command;
use chat_proto::{ClientFrame, Uuid};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// The text a redacted post carries: one visible character, which any
/// chat's rules accept.
pub(super) const REDACTED_TEXT: &str = "-";

/// The most erasures a node holds waiting to be done: a purge of a whole
/// history (`--history-limit`, 10,000 by default) fits many times over.
/// Past it, an erasure is dropped with an error in the log (the other
/// nodes still do theirs).
pub(super) const MAX_PENDING_ERASURES: usize = 65_536;

/// How many times an erasure is tried before it is given up (with an
/// error that says how to erase the entry by hand): the waits between
/// tries double from [`FIRST_RETRY`] up to [`LAST_RETRY`], about ten
/// minutes in all.
const ERASE_TRIES: u32 = 24;
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// What a node applies in place of an erased entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tombstone {
    /// The erased entry's time in the stream, in ms.
    pub ms: u64,
    /// Its envelope, redacted.
    pub envelope: Envelope,
    /// The entry that removed its message, and that entry's
    /// [`fingerprint`]: a stream that no longer holds it lost the removal
    /// with a tail ([`Tombstones::lost`]). Absent in tombstones of older
    /// builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<(u64, String)>,
}

/// The envelope of a post (`payload`) with its text and author name taken
/// out; `None` for anything else.
pub(super) fn redacted(payload: &[u8]) -> Option<Envelope> {
    let mut envelope: Envelope = serde_json::from_slice(payload).ok()?;
    match &mut envelope.command {
        Command::Client(ClientFrame::SendMessage(m)) => {
            m.text = REDACTED_TEXT.to_owned();
            m.author_name = None;
        }
        _ => return None,
    }
    Some(envelope)
}

/// The tombstones of a stream's erased entries: a key-value bucket,
/// `<stream>-tombstones`, one key per erased entry (its sequence).
#[derive(Clone)]
pub(crate) struct Tombstones {
    bucket: kv::Store,
}

impl Tombstones {
    /// The bucket's name for `stream`.
    pub(super) fn bucket(stream: &str) -> String {
        format!("{stream}-tombstones")
    }

    pub(super) fn new(bucket: kv::Store) -> Tombstones {
        Tombstones { bucket }
    }

    /// The tombstone of entry `seq`, if it was erased after a removal.
    pub(super) async fn get(&self, seq: u64) -> Option<Tombstone> {
        patiently(|| async {
            let bytes = self.bucket.get(seq.to_string()).await.ok()??;
            serde_json::from_slice(&bytes).ok()
        })
        .await
    }

    /// Whether every entry from `from` up to (not including) `to` was
    /// erased after a removal (each has a tombstone): then their absence is
    /// no gap.
    pub(super) async fn cover(&self, from: u64, to: u64) -> bool {
        for seq in from..to {
            let found =
                patiently(|| async { self.bucket.get(seq.to_string()).await.ok().flatten() }).await;
            if found.is_none() {
                return false;
            }
        }
        true
    }

    /// The messages whose entries were erased after a removal that
    /// `stream` no longer holds (a lost tail took it, not the erasure):
    /// the [`NewEpoch`](super::envelope::NewEpoch) that a node appends
    /// removes them on every node. Reads every tombstone (direct gets,
    /// one by one): a rewind is rare.
    pub(super) async fn lost(&self, stream: &stream::Stream) -> Result<Vec<Uuid>, String> {
        let kv = &self.bucket.stream;
        let subjects = format!("$KV.{}.>", self.bucket.name);
        let mut lost = Vec::new();
        let mut from = 1;
        while let Some(entry) = next_matching(kv, &subjects, from).await? {
            from = entry.sequence + 1;
            let post = entry
                .subject
                .rsplit('.')
                .next()
                .and_then(|key| key.parse::<u64>().ok());
            let (Some(post), Ok(tombstone)) =
                (post, serde_json::from_slice::<Tombstone>(&entry.payload))
            else {
                continue;
            };
            let Some((removal, removal_entry)) = &tombstone.removal else {
                continue;
            };
            // Still posted (not erased): the message came back whole.
            match stream.get_raw_message(post).await {
                Ok(_) => continue,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e.to_string()),
            }
            if holds(stream, *removal, removal_entry).await? != Some(true) {
                lost.push(message_id(post, tombstone.ms));
            }
        }
        Ok(lost)
    }

    async fn put(&self, seq: u64, tombstone: &Tombstone) -> Result<(), String> {
        // Plain data: it always serializes.
        let bytes = serde_json::to_vec(tombstone).expect("tombstones serialize");
        self.bucket
            .put(seq.to_string(), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// What `lookup` finds, asked up to five times 200 ms apart while it finds
/// nothing: a direct get is answered by any of the bucket's replicas, and
/// one may not hold yet a tombstone just written (before the entry was
/// erased). A hole with no tombstone costs a second; such holes are rare
/// (an operator's deletion).
async fn patiently<T, F, Fut>(mut lookup: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..4 {
        if let Some(found) = lookup().await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lookup().await
}

/// A removed message's entry to erase: `post` posted message `id`, and the
/// entry `removal` removed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Erasure {
    post: u64,
    id: Uuid,
    removal: u64,
    /// The [`fingerprint`](super::snapshot::fingerprint) of the removal's
    /// entry.
    removal_entry: Arc<str>,
}

/// A node's eraser: erasures handed to it are done by a task of its own,
/// in batches, tried again while they fail (see the module's
/// documentation). Safe to run on every node at once.
pub(super) struct Eraser {
    to_do: mpsc::Sender<Erasure>,
}

impl Eraser {
    /// Starts the task; it ends when the eraser is dropped (the node
    /// stops: what it had not done yet is left to the other nodes).
    pub(super) fn start(
        stream: stream::Stream,
        snapshots: Bucket,
        tombstones: Tombstones,
    ) -> Eraser {
        let (to_do, rx) = mpsc::channel(MAX_PENDING_ERASURES);
        tokio::spawn(
            Work {
                stream,
                snapshots,
                tombstones,
            }
            .run(rx),
        );
        Eraser { to_do }
    }

    /// Erases, after the removal at entry `removal` (whose fingerprint is
    /// `removal_entry`), the entry `post` that posted message `id`, and the
    /// snapshots that hold its text.
    pub(super) fn erase(&self, post: u64, id: Uuid, removal: u64, removal_entry: Arc<str>) {
        let erasure = Erasure {
            post,
            id,
            removal,
            removal_entry,
        };
        if self.to_do.try_send(erasure).is_err() {
            error!(
                post,
                removal,
                limit = MAX_PENDING_ERASURES,
                "too many erasures waiting: the entry of a removed message is not erased by this node (the others still erase it); if none does, `nats stream rmm` it"
            );
        }
    }
}

/// What the eraser's task works with.
struct Work {
    stream: stream::Stream,
    snapshots: Bucket,
    tombstones: Tombstones,
}

/// An erasure waiting, and how it has fared.
struct Waiting {
    erasure: Erasure,
    tries: u32,
    not_before: Instant,
}

impl Work {
    async fn run(self, mut rx: mpsc::Receiver<Erasure>) {
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        // The spans (post..removal) whose snapshots are to go, and when
        // the listing may be tried again.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut spans_tries = 0;
        let mut list_not_before = Instant::now();
        // After a failure nothing is tried until then: with NATS away,
        // each try would wait for its timeout.
        let mut paused_until = Instant::now();
        loop {
            // Wait for work: a new erasure, or the next one due.
            let due = waiting
                .iter()
                .map(|w| w.not_before.max(paused_until))
                .chain((!spans.is_empty()).then_some(list_not_before))
                .min();
            // The node stopped (the eraser is dropped): what is left is
            // the other nodes' to do.
            let received = match due {
                None => match rx.recv().await {
                    Some(erasure) => Some(erasure),
                    None => return,
                },
                Some(due) => tokio::select! {
                    got = rx.recv() => match got {
                        Some(erasure) => Some(erasure),
                        None => return,
                    },
                    () = tokio::time::sleep_until(due) => None,
                },
            };
            let now = Instant::now();
            let mut next = received;
            while let Some(erasure) = next {
                waiting.push_back(Waiting {
                    erasure,
                    tries: 0,
                    not_before: now,
                });
                next = if waiting.len() < MAX_PENDING_ERASURES {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            // Every erasure due, once.
            for _ in 0..waiting.len() {
                if paused_until > Instant::now() {
                    break;
                }
                let Some(mut w) = waiting.pop_front() else {
                    break;
                };
                if w.not_before > Instant::now() {
                    waiting.push_back(w);
                    continue;
                }
                let (post, removal) = (w.erasure.post, w.erasure.removal);
                match self.erase_entry(&w.erasure).await {
                    Ok(()) => spans.push((post, removal)),
                    Err(e) => {
                        w.tries += 1;
                        if w.tries >= ERASE_TRIES {
                            error!(
                                post,
                                removal,
                                error = %e,
                                "gave up erasing the entry of a removed message: its text stays in the stream until it is erased by hand (`nats stream rmm <stream> {post}`)"
                            );
                            continue;
                        }
                        if w.tries == 1 {
                            warn!(post, error = %e, "erasing the entry of a removed message failed; trying again");
                        }
                        w.not_before = Instant::now() + backoff(w.tries);
                        paused_until = w.not_before;
                        waiting.push_back(w);
                    }
                }
            }
            merge(&mut spans);
            // One listing for the whole batch.
            if !spans.is_empty() && list_not_before <= Instant::now() {
                match self.drop_snapshots(&spans).await {
                    Ok(()) => {
                        spans.clear();
                        spans_tries = 0;
                    }
                    Err(e) => {
                        spans_tries += 1;
                        if spans_tries == 1 {
                            warn!(error = %e, "deleting the snapshots that hold removed messages failed; trying again");
                        }
                        list_not_before = Instant::now() + backoff(spans_tries);
                    }
                }
            }
        }
    }

    /// Erases one entry (tombstone first): `Ok` once it is gone, or it was
    /// never the entry to erase; `Err` if it should be tried again.
    async fn erase_entry(&self, e: &Erasure) -> Result<(), String> {
        let raw = match self.stream.get_raw_message(e.post).await {
            Ok(raw) => raw,
            // Erased already (by another node), or dropped by retention.
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => return Ok(()),
            Err(err) => return Err(err.to_string()),
        };
        let ms = u64::try_from(raw.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        // Only the entry that made this very message: its id names the
        // entry's sequence and time.
        if message_id(e.post, ms) != e.id {
            warn!(post = e.post, id = %e.id, "the entry at the removed message's sequence is another one; not erased");
            return Ok(());
        }
        let Some(envelope) = redacted(&raw.payload) else {
            warn!(
                post = e.post,
                "the entry that posted a removed message is not a post; not erased"
            );
            return Ok(());
        };
        let tombstone = Tombstone {
            ms,
            envelope,
            removal: Some((e.removal, e.removal_entry.to_string())),
        };
        self.tombstones
            .put(e.post, &tombstone)
            .await
            .map_err(|err| format!("writing its tombstone: {err}"))?;
        // Not if a lost tail took the removal meanwhile: the message is
        // back in the chat, with its text, on every node.
        if holds(&self.stream, e.removal, &e.removal_entry).await? != Some(true) {
            warn!(
                post = e.post,
                removal = e.removal,
                "the removal of a message is no longer in the stream (a lost tail took it); its entry is not erased"
            );
            return Ok(());
        }
        match self.stream.delete_message(e.post).await {
            Ok(_) => {
                info!(
                    post = e.post,
                    removal = e.removal,
                    "erased the stream entry of a removed message"
                );
                Ok(())
            }
            // Another node got there first.
            Err(err) if gone(&err) => Ok(()),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Deletes the snapshots taken after a post and before its removal, for
    /// each of `spans`: they hold the text.
    async fn drop_snapshots(&self, spans: &[(u64, u64)]) -> Result<(), String> {
        let mut holding = Vec::new();
        let mut list = self
            .snapshots
            .store
            .list()
            .await
            .map_err(|e| e.to_string())?;
        while let Some(object) = list.next().await {
            let object = object.map_err(|e| e.to_string())?;
            if !object.deleted
                && snapshot_seq(&object.name).is_some_and(|seq| {
                    spans
                        .iter()
                        .any(|(post, removal)| (*post..*removal).contains(&seq))
                })
            {
                holding.push(object);
            }
        }
        for object in holding {
            self.snapshots
                .erase(&object)
                .await
                .map_err(|e| format!("erasing {}: {e}", object.name))?;
        }
        Ok(())
    }
}

/// The most spans of snapshots to delete kept apart: past it, they are
/// taken as one (which may delete a snapshot that holds no removed text;
/// a node then starts from an older one).
const MAX_SPANS: usize = 1024;

/// Sorts `spans` and merges those that overlap or touch (a purge's are one).
fn merge(spans: &mut Vec<(u64, u64)>) {
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for &(from, to) in spans.iter() {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    if merged.len() > MAX_SPANS {
        let from = merged.first().map_or(0, |s| s.0);
        let to = merged.iter().map(|s| s.1).max().unwrap_or(0);
        merged = vec![(from, to)];
    }
    *spans = merged;
}

/// The wait before try `tries + 1`.
fn backoff(tries: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << tries.saturating_sub(1).min(16))
        .min(LAST_RETRY)
}

/// The stream sequence of the entry that posted the message `id`, if it is
/// an id [`message_id`] made (every message of a cluster's chat).
pub(super) fn post_of(id: Uuid) -> Option<u64> {
    let b = id.as_bytes();
    if b[6] >> 4 != 7 || b[14] != 0 || b[15] != 0 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq[0] = b[6] & 0x0F;
    seq[1] = b[7];
    seq[2] = b[8] & 0x3F;
    seq[3..].copy_from_slice(&b[9..14]);
    let seq = u64::from_be_bytes(seq);
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&b[..6]);
    let ms = u64::from_be_bytes(ms);
    // Bits a message id does not keep would make another id.
    (message_id(seq, ms) == id).then_some(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purges_spans_are_one_and_far_ones_stay_apart() {
        let mut spans = vec![(5, 20), (1, 20), (3, 20), (30, 40), (20, 25)];
        merge(&mut spans);
        assert_eq!(spans, vec![(1, 25), (30, 40)]);
        let mut many: Vec<(u64, u64)> = (0..2_000).map(|i| (i * 10, i * 10 + 1)).collect();
        merge(&mut many);
        assert_eq!(many, vec![(0, 19_991)], "bounded: taken as one");
    }

    #[test]
    fn tries_wait_longer_and_longer_up_to_a_bound() {
        assert_eq!(backoff(1), FIRST_RETRY);
        assert_eq!(backoff(2), FIRST_RETRY * 2);
        assert!(backoff(5) > backoff(4));
        assert_eq!(backoff(ERASE_TRIES), LAST_RETRY);
        assert_eq!(backoff(u32::MAX), LAST_RETRY);
        let total: Duration = (1..ERASE_TRIES).map(backoff).sum();
        assert!(
            total > Duration::from_secs(5 * 60) && total < Duration::from_secs(15 * 60),
            "about ten minutes of tries: {total:?}"
        );
    }
    use crate::sequencer::cluster::envelope::tests::envelope;

    #[test]
    fn a_message_id_names_the_entry_that_posted_it() {
        for seq in [1, 2, 255, 256, 65_535, 1 << 32, (1 << 46) - 1] {
            for ms in [0, 1_700_000_000_000, 1_800_000_000_123] {
                assert_eq!(post_of(message_id(seq, ms)), Some(seq), "{seq} at {ms}");
            }
        }
        assert_eq!(post_of(Uuid::new_v4()), None);
        assert_eq!(
            post_of(Uuid::now_v7()),
            None,
            "random bits where a sequence ends"
        );
    }

    #[test]
    fn a_redacted_post_keeps_everything_but_its_text_and_name() {
        let original: Envelope = serde_json::from_slice(&envelope("a secret")).expect("json");
        let redacted = redacted(&envelope("a secret")).expect("a post");
        let text = serde_json::to_string(&redacted).expect("json");
        assert!(!text.contains("a secret"), "{text}");
        assert_eq!(
            Envelope {
                command: original.command.clone(),
                ..redacted.clone()
            },
            original
        );
        match redacted.command {
            Command::Client(ClientFrame::SendMessage(m)) => {
                assert_eq!(m.text, REDACTED_TEXT);
                assert_eq!(m.author_name, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(super::redacted(b"not an envelope").is_none());
    }
}
