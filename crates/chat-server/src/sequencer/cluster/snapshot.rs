//! Snapshots of the stream's chat: the cluster's, in the stream's object
//! store, and each node's own, in its data directory.

use crate::store::data_dir::DataDir;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    DeleteMessageError, DeleteMessageErrorKind, RawMessageErrorKind,
};
use async_nats::jetstream::{object_store, stream};
use chat_core::ChatSnapshot;
use chat_proto::Epoch;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tracing::warn;

/// A snapshot of the chat after applying the stream up to `seq`, as kept
/// in the stream's object store (a node that joins after the stream has
/// dropped its oldest entries starts from it) and in each node's data
/// directory (a node that restarts starts from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Stored {
    /// The stream's own epoch, its identity: a snapshot of a deleted and
    /// recreated stream (whose snapshot bucket or data directory outlived
    /// it) is not used.
    pub(super) epoch: Epoch,
    /// The chat's epoch after `seq`: the stream's, switched by every
    /// `NewEpoch` entry since (absent in snapshots of builds before
    /// them: the stream's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chat_epoch: Option<Epoch>,
    /// The last entry applied.
    pub(super) seq: u64,
    /// The [`fingerprint`] of that entry: a stream that went back and
    /// gave `seq` to another entry no longer holds the chat of this
    /// snapshot (absent in snapshots of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) entry: Option<String>,
    /// The rules' fingerprint.
    pub(super) rules: String,
    /// The chat.
    pub(super) chat: ChatSnapshot,
}

/// Whether a snapshot may be started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fit {
    /// Yes.
    Fits,
    /// No, for the reason given (another stream, other rules).
    Unfit(&'static str),
    /// No: it holds entries the stream no longer holds, so the stream went
    /// back (a lost tail, or a restore of an older backup), and positions
    /// served from them will be reused. Proof that a new epoch is due.
    Rewound,
}

/// Why a [`Fit::Rewound`] snapshot is not used.
const REWOUND: &str = "a snapshot of entries the stream no longer holds (it went back since)";

impl Stored {
    /// The chat's epoch after this snapshot.
    pub(super) fn chat_epoch(&self) -> Epoch {
        self.chat_epoch.unwrap_or(self.epoch)
    }

    /// Whether a node of `rules` may start from this snapshot of the
    /// stream with `epoch`, whose last entry is `last_sequence`, as far as
    /// the snapshot alone tells ([`Stored::check`] asks the stream).
    pub(super) fn fits(&self, epoch: Epoch, rules: &str, last_sequence: u64) -> Fit {
        if self.epoch != epoch {
            Fit::Unfit("a snapshot of another stream (deleted and recreated since)")
        } else if self.rules != rules {
            Fit::Unfit("a snapshot taken under other chat rules")
        } else if self.seq > last_sequence {
            Fit::Rewound
        } else {
            Fit::Fits
        }
    }

    /// [`Stored::fits`], and whether `stream` still holds the entry this
    /// snapshot was taken after. One deleted since cannot be compared
    /// (an operator's `nats stream rmm`, or retention): it fits.
    pub(super) async fn check(
        &self,
        stream: &stream::Stream,
        epoch: Epoch,
        rules: &str,
        last_sequence: u64,
    ) -> Result<Fit, String> {
        let fit = self.fits(epoch, rules, last_sequence);
        let Some(entry) = &self.entry else {
            return Ok(fit);
        };
        if fit != Fit::Fits || self.seq == 0 {
            return Ok(fit);
        }
        Ok(match holds(stream, self.seq, entry).await? {
            Some(false) => Fit::Rewound,
            Some(true) | None => Fit::Fits,
        })
    }
}

/// The fingerprint of a stream entry's payload (which names its sender's
/// run and request, so two different entries do not share one).
pub(super) fn fingerprint(payload: &[u8]) -> String {
    blake3::hash(payload).to_hex()[..32].to_owned()
}

/// Whether `stream` holds, at `seq`, the entry of `fingerprint`: `None`
/// when it holds none there (deleted, or dropped).
pub(super) async fn holds(
    stream: &stream::Stream,
    seq: u64,
    fingerprint_then: &str,
) -> Result<Option<bool>, String> {
    match stream.get_raw_message(seq).await {
        Ok(message) => {
            let now = fingerprint(&message.payload);
            if now != fingerprint_then {
                // What tells a real rewind from a misread, in the log.
                warn!(
                    seq,
                    then = fingerprint_then,
                    %now,
                    subject = %message.subject,
                    bytes = message.payload.len(),
                    "the stream holds another entry than the one applied at this sequence"
                );
            }
            Ok(Some(now == fingerprint_then))
        }
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// What a node found among its snapshots.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// The newest it may start from.
    pub(super) usable: Option<Stored>,
    /// The chat epoch of one it may not, because the stream went back
    /// ([`Fit::Rewound`]), if it met one.
    pub(super) rewound: Option<Epoch>,
}

/// The file in a node's data directory that holds its own snapshot of
/// `stream`'s chat.
fn local_snapshot_file(stream: &str) -> String {
    format!("cluster-{stream}.snapshot.json")
}

/// The cluster's snapshot bucket: the object store, and the stream that
/// stores it (`OBJ_<bucket>`), whose entries are erased when a snapshot
/// goes.
#[derive(Clone)]
pub(crate) struct Bucket {
    pub(super) store: object_store::ObjectStore,
    pub(super) underlying: stream::Stream,
}

impl Bucket {
    /// Deletes snapshot `object`, and overwrites its chunks in the
    /// NATS servers' files: an object store's delete only purges them,
    /// and a purged entry's bytes stay in its block file until the whole
    /// block goes, while a snapshot holds texts that a removal erases.
    pub(super) async fn erase(&self, object: &object_store::ObjectInfo) -> Result<(), String> {
        let chunks = chunks_subject(object);
        let mut from = 1;
        while let Some(chunk) = next_matching(&self.underlying, &chunks, from).await? {
            match self.underlying.delete_message(chunk.sequence).await {
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
            from = chunk.sequence + 1;
        }
        self.store
            .delete(&object.name)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The subject of object `object`'s chunks in its bucket's stream (the
/// object store's layout: `$O.<bucket>.C.<nuid>`).
fn chunks_subject(object: &object_store::ObjectInfo) -> String {
    format!("$O.{}.C.{}", object.bucket, object.nuid)
}

/// Longest a snapshot's read waits for its next chunk before the snapshot
/// is passed over. Chunks come back to back; only a broken snapshot keeps
/// a reader waiting (the object reader of async-nats waits for ever for
/// chunks that are gone).
const CHUNK_WAIT: Duration = Duration::from_secs(10);

impl Bucket {
    /// The bytes of snapshot `object`, or why they cannot be had. An
    /// erasure cut short ([`Bucket::erase`] with NATS gone between the
    /// chunks and the name) leaves a name whose chunks are partly or
    /// wholly gone: the first is refused here at once, the second fails
    /// its digest.
    async fn read(&self, object: &object_store::ObjectInfo) -> Result<Vec<u8>, String> {
        let chunks = chunks_subject(object);
        if object.chunks > 0 && next_matching(&self.underlying, &chunks, 1).await?.is_none() {
            return Err("its chunks are gone (an erasure cut short)".into());
        }
        let mut reader = self
            .store
            .get(&object.name)
            .await
            .map_err(|e| e.to_string())?;
        // Not `read_to_end`: the reader can hand out a chunk and fail its
        // digest in one call, which tokio's `read_to_end` asserts never
        // happens (a debug build panics).
        let mut bytes = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match tokio::time::timeout(CHUNK_WAIT, reader.read(&mut buf)).await {
                Err(_) => {
                    return Err(format!(
                        "no chunk for {} s after {} bytes",
                        CHUNK_WAIT.as_secs(),
                        bytes.len()
                    ));
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(0)) => return Ok(bytes),
                Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// The first entry of `stream` at or after `from` whose subject matches
/// `subject` (wildcards too), if any: asked of the stream's leader, one by
/// one, and making no consumer (see `super::erase`).
pub(super) async fn next_matching(
    stream: &stream::Stream,
    subject: &str,
    from: u64,
) -> Result<Option<StreamMessage>, String> {
    match stream
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(subject.to_owned())
        .send()
        .await
    {
        Ok(entry) => Ok(Some(entry)),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a delete failed because the entry is gone already (another
/// node deleted it first).
pub(super) fn gone(e: &DeleteMessageError) -> bool {
    use async_nats::jetstream::ErrorCode;
    matches!(e.kind(), DeleteMessageErrorKind::JetStream(j)
        if j.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
            || j.error_code() == ErrorCode::NO_MESSAGE_FOUND)
}

/// How many snapshots the object store keeps.
const SNAPSHOTS_KEPT: usize = 3;

/// An object's name for the snapshot after entry `seq` (sorts by `seq`).
fn snapshot_name(seq: u64) -> String {
    format!("after-{seq:020}")
}

/// The entry a snapshot's object name says it was taken after.
pub(super) fn snapshot_seq(name: &str) -> Option<u64> {
    name.strip_prefix("after-")?.parse().ok()
}

/// The newest snapshot in `store` that a node of `rules` may start from
/// (of `stream`, whose epoch is `epoch`). One of entries the stream no
/// longer holds is deleted, so that no node starts from it, and reported.
pub(super) async fn newest_snapshot(
    bucket: &Bucket,
    stream: &stream::Stream,
    epoch: Epoch,
    rules: &str,
    last_sequence: u64,
) -> Result<Found, String> {
    let store = &bucket.store;
    let mut found = Found::default();
    let mut objects = Vec::new();
    let mut list = store.list().await.map_err(|e| e.to_string())?;
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if !info.deleted && info.name.starts_with("after-") {
            objects.push(info);
        }
    }
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    for info in objects.iter().rev() {
        let name = &info.name;
        // One being replaced, or broken: an older one will do.
        let bytes = match bucket.read(info).await {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(%name, error = %e, "a snapshot that cannot be read; trying an older one");
                continue;
            }
        };
        match serde_json::from_slice::<Stored>(&bytes) {
            Ok(stored) => match stored.check(stream, epoch, rules, last_sequence).await? {
                Fit::Fits => {
                    found.usable = Some(stored);
                    return Ok(found);
                }
                Fit::Unfit(why) => warn!(%name, "{why}; not used"),
                Fit::Rewound => {
                    warn!(%name, "{REWOUND}; deleted");
                    let _ = bucket.erase(info).await;
                    found.rewound = Some(stored.chat_epoch());
                }
            },
            Err(e) => warn!(%name, error = %e, "an unreadable snapshot; not used"),
        }
    }
    Ok(found)
}

/// This node's own snapshot of `stream`'s chat in `dir`, if it has one it
/// may start from. One it cannot use is said and ignored: the cluster's
/// snapshots and the stream still hold the chat. One of entries the stream
/// no longer holds is removed, and reported.
pub(super) async fn own_snapshot(
    dir: &Arc<DataDir>,
    stream: &stream::Stream,
    epoch: Epoch,
    rules: &str,
    last_sequence: u64,
) -> Result<Found, String> {
    let mut found = Found::default();
    let name = local_snapshot_file(&stream.cached_info().config.name);
    let read = {
        let (dir, name) = (Arc::clone(dir), name.clone());
        tokio::task::spawn_blocking(move || dir.read(&name))
    };
    let bytes = match read.await {
        Ok(Ok(Some(bytes))) => bytes,
        Ok(Ok(None)) | Err(_) => return Ok(found),
        Ok(Err(e)) => {
            warn!(file = %name, error = %e, "this node's snapshot cannot be read; not used");
            return Ok(found);
        }
    };
    match serde_json::from_slice::<Stored>(&bytes) {
        Ok(stored) => match stored.check(stream, epoch, rules, last_sequence).await? {
            Fit::Fits => found.usable = Some(stored),
            Fit::Unfit(why) => warn!(file = %name, "{why}; not used"),
            Fit::Rewound => {
                warn!(file = %name, "{REWOUND}; removed");
                forget_own_snapshot(dir, &name).await;
                found.rewound = Some(stored.chat_epoch());
            }
        },
        Err(e) => {
            warn!(file = %name, error = %e, "this node's snapshot is unreadable; not used");
        }
    }
    Ok(found)
}

/// Removes this node's own snapshot `name` from `dir`: it is of a chat
/// the stream no longer holds.
async fn forget_own_snapshot(dir: &Arc<DataDir>, name: &str) {
    let dir = Arc::clone(dir);
    let name = name.to_owned();
    let removed = tokio::task::spawn_blocking(move || dir.remove(&name)).await;
    if let Ok(Err(e)) = removed {
        warn!(error = %e, "removing this node's snapshot failed");
    }
}

/// Removes this node's own snapshot of `stream`'s chat, if any: the chat
/// it applied is not the stream's.
pub(super) async fn drop_own_snapshot(dir: &Arc<DataDir>, stream: &str) {
    forget_own_snapshot(dir, &local_snapshot_file(stream)).await;
}

/// Replaces this node's own snapshot with `stored`, on disk when it
/// returns.
pub(super) fn write_own_snapshot(dir: &DataDir, stream: &str, stored: &Stored) {
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

/// Stores the snapshot taken after entry `seq` (unless it is there
/// already), after forgetting all but the newest few: the bucket never
/// holds more than [`SNAPSHOTS_KEPT`], and a full bucket makes room before
/// it takes the next. Only one node stores each snapshot (the applier
/// picks it by the entry), so no two uploads of one name race (a second
/// `put` of a name would leave the first one's chunks behind).
pub(super) async fn store_snapshot(bucket: Bucket, stored: Stored) {
    let store = &bucket.store;
    let name = snapshot_name(stored.seq);
    if store.info(&name).await.is_ok() {
        return;
    }
    let mut older = Vec::new();
    if let Ok(mut list) = store.list().await {
        while let Some(Ok(info)) = list.next().await {
            if !info.deleted && info.name.starts_with("after-") && info.name < name {
                older.push(info);
            }
        }
    }
    older.sort_by(|a, b| a.name.cmp(&b.name));
    let old = older.len().saturating_sub(SNAPSHOTS_KEPT - 1);
    for object in &older[..old] {
        // An old snapshot may hold the text of a message removed later.
        if let Err(e) = bucket.erase(object).await {
            warn!(name = %object.name, error = %e, "erasing an old snapshot failed");
        }
    }
    // A chat snapshot is strings, numbers and maps with string keys.
    let bytes = serde_json::to_vec(&stored).expect("snapshots serialize");
    if let Err(e) = store.put(name.as_str(), &mut bytes.as_slice()).await {
        warn!(error = %e, seq = stored.seq, "storing a snapshot failed; the next one will try again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequencer::cluster::envelope::epoch_of;
    use chat_core::{Chat, Config};

    #[test]
    fn a_snapshot_fits_only_its_stream_its_rules_and_what_the_stream_holds() {
        let epoch = epoch_of("chat", 1);
        let stored = Stored {
            epoch,
            chat_epoch: None,
            seq: 10,
            entry: None,
            rules: "r".into(),
            chat: Chat::new(Config::default()).snapshot(),
        };
        assert_eq!(stored.fits(epoch, "r", 10), Fit::Fits);
        assert!(
            matches!(stored.fits(epoch_of("chat", 2), "r", 10), Fit::Unfit(_)),
            "a recreated stream"
        );
        assert!(
            matches!(stored.fits(epoch, "other", 10), Fit::Unfit(_)),
            "other rules"
        );
        assert_eq!(
            stored.fits(epoch, "r", 9),
            Fit::Rewound,
            "ahead of the stream: it went back"
        );
        assert_eq!(stored.chat_epoch(), epoch, "an older snapshot's");
    }
}
