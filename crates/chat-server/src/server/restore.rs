//! Restoring the chat at start: from the store (and its epoch), from a
//! cluster's snapshot, or empty; and the published log that goes with it.

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::log::Log;
use crate::publish::recent::Retention;
use crate::sequencer::cluster::nats::Connected;
use crate::store::{Store, StoreError};
use crate::wire::frame::{Audience, Frame};
use chat_core::{Chat, Timestamp};
use chat_proto::{Epoch, Uuid};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The chat to start from, and its log: what `store` holds (a lower
/// `--history-limit` than the stored history drops the oldest, and
/// starts a new epoch), else the cluster's newest snapshot, else an empty
/// chat in `fresh_epoch`.
pub(super) fn restore(
    config: &Config,
    store: Option<&mut Store>,
    mut cluster: Option<&mut Connected>,
    fresh_epoch: Epoch,
    clock: &Clock,
    metrics: Arc<Metrics>,
) -> Result<(Chat, Log), StoreError> {
    let retention = Retention {
        events: config.log_events,
        bytes: config.log_bytes,
    };
    Ok(match store {
        None => {
            let (chat, epoch) = match &mut cluster {
                Some(cluster) => cluster.initial_chat(config.chat()),
                None => (Chat::new(config.chat()), fresh_epoch),
            };
            let log = Log::new(&chat, epoch, [], retention, Arc::clone(&metrics));
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
            let mut chat = chat;
            store.forget_ended_restrictions(clock.now().as_millis())?;
            chat.restore_moderation(std::mem::take(&mut loaded.moderation));
            let recent = loaded.recent.into_iter().map(|e| {
                let frame = match e.audience {
                    Audience::Nobody => Frame::erased(),
                    audience => Frame::for_audience(e.frame, audience),
                };
                (e.position, e.message, frame)
            });
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
    })
}
