//! Submitting a command: refused here what the stream is sure to refuse,
//! else published to the stream, and answered from this node's own apply.

use super::envelope::{Envelope, Outcome, version_for};
use super::view::View;
use crate::sequencer::{ApplyError, Health, Sequencer};
use async_nats::jetstream;
use chat_core::{Command, RateKind};
use chat_proto::{ClientFrame, Position, UserId, Uuid};
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
    /// The chat's time, in ms, after the last command this node applied
    /// (or found expired): past a command's deadline, it never applies.
    pub(super) clock: watch::Receiver<u64>,
    /// Where publish times are reported.
    pub(super) metrics: crate::metrics::ClusterMetrics,
}

/// Why a node cannot take commands while NATS is away.
const UNREACHABLE: &str = "NATS has been unreachable for longer than --cluster-timeout: commands are refused, reads go on";

pub(super) type Waiting = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

impl ClusterSequencer {
    /// Follows the node's health.
    pub(crate) fn watch_health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    async fn submit_inner(&self, user: &UserId, command: Command) -> Result<Position, ApplyError> {
        if *self.health.borrow() != Health::Serving {
            return Err(ApplyError::NotTaken);
        }
        // What the rules refuse whatever the state never reaches the
        // stream: every node's apply would refuse it the same way, so junk
        // costs the stream nothing.
        self.config.check(&command)?;
        // A user out of allowance at this node's position, until after the
        // command's deadline, is refused here too: the stream can only
        // have used up more of it, and no node applies the command after
        // its deadline. Anything less sure is published and decided there.
        // A user a moderator restricted (or slowed) is refused here too,
        // as far as this node knows.
        let kind = match &command {
            Command::Client(ClientFrame::SendMessage(_)) => Some(RateKind::Messages),
            Command::Client(ClientFrame::AddReaction(_)) => Some(RateKind::Reactions),
            Command::Moderation(_) => None,
        };
        let deadline = {
            let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
            let deadline = view.deadline(self.timeout);
            if let Some(kind) = kind {
                if let Some(refusal) = view.moderated(user, kind == RateKind::Messages, deadline) {
                    return Err(ApplyError::Refused(refusal));
                }
                if view.refuses(user, kind, deadline) {
                    let refusal = match kind {
                        RateKind::Messages => &self.rate_limited[0],
                        RateKind::Reactions => &self.rate_limited[1],
                    };
                    return Err(ApplyError::Refused(refusal.clone()));
                }
            }
            deadline
        };
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope {
            v: version_for(&command),
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
        let payload: bytes::Bytes = serde_json::to_vec(&envelope)
            .expect("envelopes serialize")
            .into();
        let (tx, mut outcome) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request, tx);
        let id = format!("{}/{}/{}", self.node, self.boot, request);
        let answer = self.follow(&id, payload, deadline, &mut outcome).await;
        if !matches!(answer, Answer::Outcome(_)) {
            self.waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&request);
        }
        answer.into_result()
    }

    /// Publishes a command and follows it to its exact outcome: retried
    /// with the same `Nats-Msg-Id` (JetStream stores it once) until
    /// JetStream confirms it, then awaited from this node's apply. Whatever
    /// happens, once this node has applied the stream past the command's
    /// `deadline` without it, it can never apply, and that is the answer.
    /// Only if JetStream could not be reached for all of
    /// `--cluster-timeout` is the answer "not confirmed".
    async fn follow(
        &self,
        id: &str,
        payload: bytes::Bytes,
        deadline: u64,
        outcome: &mut oneshot::Receiver<Outcome>,
    ) -> Answer {
        let first_try = tokio::time::Instant::now();
        let give_up = first_try + self.timeout;
        let mut delay = Duration::from_millis(50);
        // Until JetStream confirms it. The clock is looked at only when a
        // try fails: a command waiting on it would be woken by every entry.
        loop {
            let publish = async {
                let message = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id);
                self.js
                    .send_publish(self.subject.clone(), message)
                    .await?
                    .await
            };
            let try_for =
                PUBLISH_TRY.min(give_up.saturating_duration_since(tokio::time::Instant::now()));
            // Stored once JetStream acks it, or once this node applied it
            // (its ack may come later, or be lost): either ends the publish.
            let stored = || {
                self.metrics
                    .publish
                    .observe(first_try.elapsed().as_secs_f64());
            };
            let tried = tokio::select! {
                tried = tokio::time::timeout(try_for, publish) => tried,
                // Stored after all (a lost ack), and already applied.
                got = &mut *outcome => {
                    stored();
                    return outcome_of(got);
                }
            };
            match tried {
                Ok(Ok(_ack)) => {
                    stored();
                    break;
                }
                Ok(Err(e)) => warn!(error = %e, "JetStream did not take a command; retrying it"),
                Err(_) => {}
            }
            if let Some(answer) = decided_now(outcome, &self.clock, deadline) {
                return answer;
            }
            if tokio::time::Instant::now() >= give_up {
                return Answer::NotConfirmed;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                got = &mut *outcome => {
                    stored();
                    return outcome_of(got);
                }
            }
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        // In the stream: this node's apply gives the outcome (applied,
        // refused, or expired: entries apply in order, so the clock cannot
        // pass its deadline before it does), unless this node stops
        // applying, or NATS goes away for good.
        let mut health = self.health.clone();
        let unreachable = async {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let lost = *self
                    .lost_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if lost.is_some_and(|since| since.elapsed() > self.timeout) {
                    return;
                }
            }
        };
        tokio::select! {
            got = &mut *outcome => outcome_of(got),
            _ = health.wait_for(|h| !matches!(h, Health::Serving | Health::CatchingUp)) => {
                decided_now(outcome, &self.clock, deadline).unwrap_or(Answer::NotConfirmed)
            }
            () = unreachable => {
                decided_now(outcome, &self.clock, deadline).unwrap_or(Answer::NotConfirmed)
            }
            () = tokio::time::sleep(APPLY_WAIT) => {
                decided_now(outcome, &self.clock, deadline).unwrap_or(Answer::NotConfirmed)
            }
        }
    }
}

/// How long one try to publish a command waits for JetStream's ack before
/// it is sent again (the same `Nats-Msg-Id`: stored once).
const PUBLISH_TRY: Duration = Duration::from_secs(1);

/// The longest a command JetStream confirmed waits for this node to apply
/// it before its sender is told it was not confirmed (sooner if NATS has
/// been unreachable for `--cluster-timeout` meanwhile).
const APPLY_WAIT: Duration = Duration::from_secs(120);

/// What a connection is told of its command.
#[derive(Debug)]
enum Answer {
    /// This node applied it: accepted, refused, or not applied.
    Outcome(Outcome),
    /// This node applied the stream past its deadline without it: it was
    /// not applied, and never will be.
    PastDeadline,
    /// JetStream could not be reached throughout: it may still be taken.
    NotConfirmed,
}

impl Answer {
    fn into_result(self) -> Result<Position, ApplyError> {
        match self {
            Answer::Outcome(Outcome::Applied(Ok(position))) => Ok(position),
            Answer::Outcome(Outcome::Applied(Err(refusal))) => Err(ApplyError::Refused(refusal)),
            Answer::Outcome(Outcome::Expired | Outcome::OtherRules) | Answer::PastDeadline => {
                Err(ApplyError::NotTaken)
            }
            Answer::NotConfirmed => Err(ApplyError::Unavailable),
        }
    }
}

/// The answer for what the applier sent (or, if it dropped the sender,
/// that it ended).
fn outcome_of(got: Result<Outcome, oneshot::error::RecvError>) -> Answer {
    match got {
        Ok(outcome) => Answer::Outcome(outcome),
        Err(_) => Answer::NotConfirmed,
    }
}

/// The command's fate, if it is known now: its outcome from this node's
/// apply, or, without one, the applied chat time past its `deadline` (the
/// applier sends each entry's outcome before it moves the clock on, so an
/// outcome is never missed).
fn decided_now(
    outcome: &mut oneshot::Receiver<Outcome>,
    clock: &watch::Receiver<u64>,
    deadline: u64,
) -> Option<Answer> {
    match outcome.try_recv() {
        Ok(outcome) => Some(Answer::Outcome(outcome)),
        Err(oneshot::error::TryRecvError::Closed) => Some(Answer::NotConfirmed),
        Err(oneshot::error::TryRecvError::Empty) => {
            (*clock.borrow() > deadline).then_some(Answer::PastDeadline)
        }
    }
}

impl Sequencer for ClusterSequencer {
    fn moderation(&self) -> chat_core::ModerationSnapshot {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .moderation
            .clone()
    }

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
        command: Command,
    ) -> BoxFuture<'a, Result<Position, ApplyError>> {
        Box::pin(self.submit_inner(user, command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::ChatError;

    fn answered(answer: Answer) -> Result<Position, String> {
        answer.into_result().map_err(|e| match e {
            ApplyError::Refused(r) => format!("refused: {r}"),
            other => other.to_string(),
        })
    }

    #[test]
    fn a_command_s_fate_is_its_outcome_else_not_taken_once_the_chat_is_past_its_deadline() {
        let deadline = 1_000;
        // Nothing known yet.
        let (tx, mut outcome) = oneshot::channel();
        let (clock_tx, clock) = watch::channel(900u64);
        assert!(decided_now(&mut outcome, &clock, deadline).is_none());
        clock_tx.send_replace(1_000);
        assert!(
            decided_now(&mut outcome, &clock, deadline).is_none(),
            "at the deadline, it may still apply"
        );
        // Applied, then the chat moves on past the deadline: the outcome
        // wins.
        tx.send(Outcome::Applied(Ok(Position(7)))).expect("send");
        clock_tx.send_replace(1_001);
        let answer = decided_now(&mut outcome, &clock, deadline).expect("known");
        assert_eq!(answered(answer), Ok(Position(7)));
        // Refused by the rules: the refusal.
        let (tx, outcome) = oneshot::channel();
        tx.send(Outcome::Applied(Err(ChatError::EmptyText)))
            .expect("send");
        assert_eq!(
            answered(outcome_of(outcome.blocking_recv())),
            Err(format!("refused: {}", ChatError::EmptyText))
        );
        // Stamped after its deadline, or sent under other rules: not taken.
        for fate in [Outcome::Expired, Outcome::OtherRules] {
            let (tx, outcome) = oneshot::channel();
            tx.send(fate).expect("send");
            assert_eq!(
                answered(outcome_of(outcome.blocking_recv())),
                Err("not taken".into())
            );
        }
        // No outcome, and this node applied past the deadline: not taken,
        // for sure.
        let (_tx, mut outcome) = oneshot::channel::<Outcome>();
        let answer = decided_now(&mut outcome, &clock, deadline).expect("known");
        assert!(matches!(answer, Answer::PastDeadline), "{answer:?}");
        assert_eq!(answered(answer), Err("not taken".into()));
        // The applier ended (it dropped the sender): not confirmed.
        let (tx, mut outcome) = oneshot::channel::<Outcome>();
        drop(tx);
        assert_eq!(
            answered(decided_now(&mut outcome, &clock, deadline).expect("known")),
            Err("not confirmed".into())
        );
    }
}
