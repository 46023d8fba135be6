//! Snapshots of the stream's chat: the cluster's, in the stream's object
//! store, and each node's own, in its data directory.

use crate::store::data_dir::DataDir;
use async_nats::jetstream::object_store;
use chat_core::ChatSnapshot;
use chat_proto::Epoch;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tracing::warn;

/// A snapshot of the chat after applying the stream up to `seq`, as kept
/// in the stream's object store (a node that joins after the stream has
/// dropped its oldest entries starts from it) and in each node's data
/// directory (a node that restarts starts from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Stored {
    /// The stream's epoch: a snapshot of a deleted and recreated stream
    /// (whose snapshot bucket or data directory outlived it) is not used.
    pub(super) epoch: Epoch,
    /// The last entry applied.
    pub(super) seq: u64,
    /// The rules' fingerprint.
    pub(super) rules: String,
    /// The chat.
    pub(super) chat: ChatSnapshot,
}

impl Stored {
    /// Whether a node of `rules` may start from this snapshot of the
    /// stream with `epoch`, whose last entry is `last_sequence`.
    pub(super) fn fits(
        &self,
        epoch: Epoch,
        rules: &str,
        last_sequence: u64,
    ) -> Result<(), &'static str> {
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

/// How many snapshots the object store keeps.
const SNAPSHOTS_KEPT: usize = 3;

/// An object's name for the snapshot after entry `seq` (sorts by `seq`).
fn snapshot_name(seq: u64) -> String {
    format!("after-{seq:020}")
}

/// The newest snapshot in `store` that a node of `rules` may start from.
pub(super) async fn newest_snapshot(
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
        // One being replaced, or broken: an older one will do.
        let mut object = match store.get(name).await {
            Ok(object) => object,
            Err(e) => {
                warn!(%name, error = %e, "a snapshot that cannot be read; trying an older one");
                continue;
            }
        };
        let mut bytes = Vec::new();
        if let Err(e) = tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes).await {
            warn!(%name, error = %e, "a snapshot that cannot be read; trying an older one");
            continue;
        }
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
pub(super) async fn own_snapshot(
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
pub(super) async fn store_snapshot(store: object_store::ObjectStore, stored: Stored) {
    let name = snapshot_name(stored.seq);
    if store.info(&name).await.is_ok() {
        return;
    }
    let mut names = Vec::new();
    if let Ok(mut list) = store.list().await {
        while let Some(Ok(info)) = list.next().await {
            if !info.deleted && info.name.starts_with("after-") && info.name < name {
                names.push(info.name);
            }
        }
    }
    names.sort();
    let old = names.len().saturating_sub(SNAPSHOTS_KEPT - 1);
    for name in &names[..old] {
        let _ = store.delete(name).await;
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
}
