//! Erasing a removed message from the cluster's stream.
//!
//! Once a moderator's removal is applied, the stream entry that posted the
//! message still holds its text. Each node that applies the removal then
//! (the first to get there does the work; the others find it done):
//!
//! 1. writes a **tombstone** for the entry, `erased-<seq>` in the snapshot
//!    bucket: the entry's envelope with the post's text and name taken out
//!    ([`redacted`]), and its time;
//! 2. erases the entry from the stream (JetStream's message delete, which
//!    overwrites the message in the store unless told not to);
//! 3. deletes the snapshots taken between the post and the removal, which
//!    hold the text too (the ones before and after it do not).
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

use super::envelope::{Envelope, message_id};
use super::snapshot::snapshot_seq;
use async_nats::jetstream::{object_store, stream};
use chat_core::Command;
use chat_proto::{ClientFrame, Uuid};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The text a redacted post carries: one visible character, which any
/// chat's rules accept.
pub(super) const REDACTED_TEXT: &str = "-";

/// What a node applies in place of an erased entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tombstone {
    /// The erased entry's time in the stream, in ms.
    pub ms: u64,
    /// Its envelope, redacted.
    pub envelope: Envelope,
}

/// The object name of the tombstone of entry `seq`.
fn tombstone_name(seq: u64) -> String {
    format!("erased-{seq:020}")
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

/// The tombstone of entry `seq`, if it was erased after a removal.
pub(super) async fn tombstone(store: &object_store::ObjectStore, seq: u64) -> Option<Tombstone> {
    patiently(|| async {
        let mut object = store.get(tombstone_name(seq)).await.ok()?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    })
    .await
}

/// What `lookup` finds, asked up to five times 200 ms apart while it finds
/// nothing: the bucket is read from any of its replicas, and one may not
/// hold yet a tombstone just written (before the entry was erased). A
/// hole with no tombstone costs a second; such holes are rare (an
/// operator's deletion).
async fn patiently<T, F, Fut>(mut lookup: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..4 {
        if let Some(found) = lookup().await {
            return Some(found);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    lookup().await
}

/// Whether every entry from `from` up to (not including) `to` was erased
/// after a removal (each has a tombstone): then their absence is no gap.
pub(super) async fn erased_between(store: &object_store::ObjectStore, from: u64, to: u64) -> bool {
    for seq in from..to {
        let name = tombstone_name(seq);
        if patiently(|| async { store.info(&name).await.ok() })
            .await
            .is_none()
        {
            return false;
        }
    }
    true
}

/// Erases, after the removal at entry `removal`, the entry `post` that
/// posted message `id`, and the snapshots that hold its text (see the
/// module's documentation). Safe to run on every node at once.
pub(super) async fn erase_post(
    stream: stream::Stream,
    store: object_store::ObjectStore,
    post: u64,
    id: Uuid,
    removal: u64,
) {
    // Not there: erased already (by another node), or dropped by
    // retention.
    if let Ok(raw) = stream.get_raw_message(post).await {
        let ms = u64::try_from(raw.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        // Only the entry that made this very message: its id names
        // the entry's sequence and time.
        if message_id(post, ms) != id {
            warn!(post, %id, "the entry at the removed message's sequence is another one; not erased");
            return;
        }
        let Some(envelope) = redacted(&raw.payload) else {
            warn!(
                post,
                "the entry that posted a removed message is not a post; not erased"
            );
            return;
        };
        // Plain data: it always serializes.
        let bytes = serde_json::to_vec(&Tombstone { ms, envelope }).expect("tombstones serialize");
        if let Err(e) = store
            .put(tombstone_name(post).as_str(), &mut bytes.as_slice())
            .await
        {
            warn!(post, error = %e, "writing a tombstone failed; the entry is not erased");
            return;
        }
        match stream.delete_message(post).await {
            Ok(_) => info!(
                post,
                removal, "erased the stream entry of a removed message"
            ),
            // Another node got there first.
            Err(e) => warn!(post, error = %e, "erasing the entry of a removed message failed"),
        }
    }
    // The snapshots after the post and before the removal hold its text.
    let mut names = Vec::new();
    if let Ok(mut list) = store.list().await {
        while let Some(Ok(object)) = list.next().await {
            if !object.deleted
                && snapshot_seq(&object.name).is_some_and(|seq| (post..removal).contains(&seq))
            {
                names.push(object.name);
            }
        }
    }
    for name in names {
        let _ = store.delete(&name).await;
    }
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
