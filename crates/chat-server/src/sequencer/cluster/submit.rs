//! Submitting a command: refused here what the stream is sure to refuse,
//! else published to the stream, and answered from this node's own apply.

use super::envelope::{ENVELOPE_VERSION, Envelope, Outcome};
use super::view::View;
use crate::sequencer::{ApplyError, Health, Sequencer};
use async_nats::jetstream;
use chat_core::RateKind;
use chat_proto::{ClientFrame, UserId, Uuid};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tracing::warn;

/// The cluster's sequencer: publishes commands and waits for their
/// outcome from this node's own apply.
#[derive(Debug)]
pub(crate) struct ClusterSequencer {
    pub(super) js: jetstream::Context,
    pub(super) subject: String,
    pub(super) node: String,
    pub(super) boot: Uuid,
    pub(super) next_request: AtomicU64,
    /// Outcomes awaited by this node's connections, by request.
    pub(super) waiting: Arc<Waiting>,
    /// Catching up, serving, or stopped (an entry it cannot apply).
    pub(super) health: watch::Receiver<Health>,
    /// This node's rules fingerprint.
    pub(super) rules: String,
    /// This node's rules, to refuse what they refuse whatever the state
    /// without publishing it.
    pub(super) config: chat_core::Config,
    /// This node's chat as far as its connections need it, to refuse
    /// without publishing what the stream is sure to refuse.
    pub(super) view: Arc<Mutex<View>>,
    /// The rate limits' refusals (messages, reactions).
    pub(super) rate_limited: [chat_core::ChatError; 2],
    pub(super) timeout: Duration,
    /// Since when NATS has been unreachable, if it is.
    pub(super) lost_since: Arc<Mutex<Option<Instant>>>,
    /// The last stream entry this node applied ([`Envelope::seen`]).
    pub(super) applied: Arc<AtomicU64>,
}

/// Why a node cannot take commands while NATS is away.
const UNREACHABLE: &str = "NATS has been unreachable for longer than --cluster-timeout: commands are refused, reads go on";

pub(super) type Waiting = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

impl ClusterSequencer {
    /// Follows the node's health.
    pub(crate) fn watch_health(&self) -> watch::Receiver<Health> {
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
            seen: Some(self.applied.load(Ordering::Relaxed)),
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
            Ok(Ok(Outcome::Expired | Outcome::OtherRules)) => Err(ApplyError::Unavailable),
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

    fn ready(&self) -> Result<(), &'static str> {
        self.health.borrow().serving()?;
        let lost = *self
            .lost_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match lost {
            Some(since) if since.elapsed() > self.timeout => Err(UNREACHABLE),
            _ => Ok(()),
        }
    }

    fn submit<'a>(
        &'a self,
        user: &'a UserId,
        command: ClientFrame,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.submit_inner(user, command))
    }
}
