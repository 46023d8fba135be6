//! What a node knows of its chat to refuse, without the stream, what the
//! stream is sure to refuse.

use chat_core::{
    Chat, ChatError, Event, EventKind, ModerationSnapshot, RateKind, Timestamp, Until,
};
use chat_proto::UserId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What this node's connections need of its chat to refuse, without the
/// stream, what the stream is sure to refuse: the chat's time after the
/// last entry applied, and the users whose allowance that entry and the
/// ones before used up.
#[derive(Debug)]
pub(super) struct View {
    /// The chat's time at the last entry, applied or expired (an expired
    /// entry changes nothing, but its stamp still says what time it is)...
    clock: Timestamp,
    /// ...how far that runs ahead of the entry's stamp (the chat's skew,
    /// after the leader's clock stepped back)...
    skew_ms: u64,
    /// ...and when this node applied it.
    applied_at: Instant,
    /// Users out of allowance: until when messages and reactions are
    /// refused ([`Chat::refused_until`]). Only users who used up a limit
    /// within the last window are here, and those whose times have all
    /// passed are swept out once per window.
    refused: HashMap<UserId, [Option<Timestamp>; 2]>,
    /// Users a moderator restricted: until when (`None`: banned). Kept
    /// from the events that set and lift them, so a node refuses their
    /// commands alone; a lift the stream applied and this node not yet
    /// lets them through a moment later than the stream would.
    restricted: HashMap<UserId, Option<Timestamp>>,
    /// Slow mode's seconds (0: off), and users who posted within it:
    /// until when their next post is refused.
    slow_seconds: u32,
    slowed: HashMap<UserId, Timestamp>,
    /// Moderation as applied, for the operator API to read: taken again
    /// after each entry that moderates.
    pub(super) moderation: ModerationSnapshot,
    /// When the next sweep is due (chat time).
    next_sweep: Timestamp,
    /// How long an entry in `refused` can matter.
    window_ms: u64,
}

impl View {
    pub(super) fn new(chat: &Chat) -> View {
        let config = chat.config();
        View {
            clock: chat.now(),
            skew_ms: 0,
            applied_at: Instant::now(),
            refused: HashMap::new(),
            restricted: chat
                .restrictions()
                .map(|(user, held)| (user.clone(), held.until))
                .collect(),
            slow_seconds: chat.room().slow_mode_seconds,
            slowed: HashMap::new(),
            moderation: chat.moderation(),
            next_sweep: Timestamp::default(),
            window_ms: u64::try_from(
                config
                    .message_rate
                    .window
                    .max(config.reaction_rate.window)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
        }
    }

    /// Takes in what applying an entry of `user`'s did to `chat`, and
    /// its `events`.
    ///
    /// `stamp` is the entry's time in the stream; `user` is whose command
    /// was applied (none for an expired one).
    pub(super) fn applied(
        &mut self,
        chat: &Chat,
        stamp: Timestamp,
        user: Option<&UserId>,
        events: &[Event],
    ) {
        for event in events {
            match &event.kind {
                EventKind::UserRestricted { user, held, .. } => {
                    self.restricted.insert(user.clone(), held.until);
                }
                EventKind::RestrictionLifted { user, .. } => {
                    self.restricted.remove(user);
                }
                EventKind::RoomUpdated { room, .. } => {
                    if room.slow_mode_seconds != self.slow_seconds {
                        self.slowed.clear();
                    }
                    self.slow_seconds = room.slow_mode_seconds;
                }
                EventKind::MessagePosted { message, .. } if self.slow_seconds > 0 => {
                    if let Err(ChatError::SlowMode { until, .. }) =
                        chat.moderated(&message.author_id, stamp, true)
                    {
                        self.slowed.insert(message.author_id.clone(), until.0);
                    }
                }
                _ => {}
            }
        }
        if events.iter().any(|e| e.audit().is_some()) {
            self.moderation = chat.moderation();
        }
        self.clock = chat.time_at(stamp);
        self.skew_ms = self.clock.as_millis().saturating_sub(stamp.as_millis());
        self.applied_at = Instant::now();
        if let Some(user) = user {
            let until = [RateKind::Messages, RateKind::Reactions]
                .map(|kind| chat.refused_until(kind, user));
            if until == [None, None] {
                self.refused.remove(user);
            } else {
                self.refused.insert(user.clone(), until);
            }
        }
        if self.clock >= self.next_sweep {
            let now = self.clock;
            self.refused
                .retain(|_, until| until.iter().flatten().any(|t| *t > now));
            self.restricted
                .retain(|_, until| until.is_none_or(|t| t > now));
            self.slowed.retain(|_, until| *until > now);
            self.next_sweep =
                Timestamp::from_unix_millis(now.as_millis().saturating_add(self.window_ms));
        }
    }

    /// The chat's time at the last entry, in ms.
    pub(super) fn clock_ms(&self) -> u64 {
        self.clock.as_millis()
    }

    /// A deadline for a command sent now: the chat's time now, as well as
    /// this node can tell, plus `grace`. The later of two estimates: the
    /// chat's time at the last entry plus the time since, and this host's
    /// clock. A late estimate only makes the deadline lenient; the check
    /// stays sound whatever it is, because every node enforces the
    /// deadline the envelope carries.
    pub(super) fn deadline(&self, grace: Duration) -> u64 {
        let since = u64::try_from(self.applied_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let grace = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.deadline_at(wall, since, grace)
    }

    /// [`deadline`](Self::deadline) at wall time `wall_ms`, `since_ms`
    /// after the last entry: the chat's time then plus the time since, or
    /// the wall clock plus the chat's skew, whichever is later, plus
    /// `grace_ms`.
    pub(super) fn deadline_at(&self, wall_ms: u64, since_ms: u64, grace_ms: u64) -> u64 {
        self.clock
            .as_millis()
            .saturating_add(since_ms)
            .max(wall_ms.saturating_add(self.skew_ms))
            .saturating_add(grace_ms)
    }

    /// The refusal of a moderator's restriction, or of slow mode for a
    /// post (`posting`), that `user`'s command, applied at `deadline` at
    /// the latest, gets as far as this node knows. Unlike the rate limit
    /// this is not sure: the stream may lift a restriction or end slow
    /// mode before the command, for a moment before this node applies it.
    pub(super) fn moderated(
        &self,
        user: &UserId,
        posting: bool,
        deadline: u64,
    ) -> Option<ChatError> {
        match self.restricted.get(user) {
            Some(None) => return Some(ChatError::Banned),
            Some(Some(until)) if deadline < until.as_millis() => {
                return Some(ChatError::TimedOut {
                    until: Until(*until),
                });
            }
            _ => {}
        }
        let until = self.slowed.get(user)?;
        (posting && deadline < until.as_millis()).then_some(ChatError::SlowMode {
            seconds: self.slow_seconds,
            until: Until(*until),
        })
    }

    /// Whether `user`'s `kind` command, applied at `deadline` at the
    /// latest, is sure to be refused by the rate limit.
    pub(super) fn refuses(&self, user: &UserId, kind: RateKind, deadline: u64) -> bool {
        let slot = match kind {
            RateKind::Messages => 0,
            RateKind::Reactions => 1,
        };
        self.refused
            .get(user)
            .and_then(|until| until[slot])
            .is_some_and(|until| deadline < until.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequencer::cluster::envelope::tests::envelope_by;
    use crate::sequencer::cluster::envelope::{Applied, Envelope, Outcome, apply};
    use chat_core::Config;
    use chat_core::EventKind;

    #[test]
    fn the_view_refuses_only_until_the_limit_frees() {
        let config = Config {
            message_rate: chat_core::RateLimit::per_minute(2),
            ..Config::default()
        };
        let t = 1_700_000_000_000u64;
        let mut chat = Chat::new(config);
        let mut view = View::new(&chat);
        let u = UserId::from("u");
        for (seq, ms) in [(1, t), (2, t + 1_000)] {
            let mut e: Envelope =
                serde_json::from_slice(&envelope_by("x", Some(u64::MAX))).expect("json");
            e.user = u.clone();
            let payload = serde_json::to_vec(&e).expect("json");
            let Applied::Done { user, .. } = apply(
                &mut chat,
                &mut chat_proto::Epoch(chat_proto::Uuid::nil()),
                "r",
                seq,
                ms,
                &payload,
            ) else {
                panic!("applied")
            };
            view.applied(&chat, Timestamp::from_unix_millis(ms), user.as_ref(), &[]);
        }
        // The first message leaves the window at t + 60 s.
        assert!(view.refuses(&u, RateKind::Messages, t + 59_999));
        assert!(!view.refuses(&u, RateKind::Messages, t + 60_000));
        assert!(!view.refuses(&u, RateKind::Reactions, t + 1_000));
        assert!(!view.refuses(&UserId::from("v"), RateKind::Messages, t + 1_000));
    }

    /// The stream's leader moves to a server whose clock is 10 s behind,
    /// then back, then to one 10 s ahead, then back: commands go on
    /// applying, the chat's times never go back, and they run ahead of
    /// real time by one step at most. Entries are stamped by the leader's
    /// clock; every node computes its deadline from its own, which is
    /// right.
    #[test]
    fn a_leaders_clock_step_both_ways_never_stops_the_chat() {
        let mut chat = Chat::new(Config::default());
        let mut view = View::new(&chat);
        let grace = 5_000;
        let mut real = 1_700_000_000_000u64;
        let mut seq = 0;
        let mut expired = Vec::new();
        let mut last: i64 = 0;
        for (phase, offset) in [0i64, -10_000, 0, 10_000, 0].into_iter().enumerate() {
            for _ in 0..40 {
                // A command sent now, its deadline from this node's view
                // (the last entry was applied 500 ms ago)...
                real += 500;
                seq += 1;
                let deadline = view.deadline_at(real, 500, grace);
                let mut e: Envelope =
                    serde_json::from_slice(&envelope_by("x", Some(deadline))).expect("json");
                e.user = format!("u{seq}").as_str().into();
                let payload = serde_json::to_vec(&e).expect("json");
                // ...stamped by the leader's clock.
                let stamp = real.saturating_add_signed(offset);
                let Applied::Done {
                    user,
                    outcome,
                    events,
                    ..
                } = apply(
                    &mut chat,
                    &mut chat_proto::Epoch(chat_proto::Uuid::nil()),
                    "r",
                    seq,
                    stamp,
                    &payload,
                )
                else {
                    panic!("a command")
                };
                view.applied(
                    &chat,
                    Timestamp::from_unix_millis(stamp),
                    user.as_ref(),
                    &events,
                );
                match outcome {
                    Outcome::Applied(Ok(_)) => {}
                    Outcome::Expired => {
                        expired.push((phase, seq));
                        continue;
                    }
                    Outcome::Applied(Err(e)) => panic!("refused: {e}"),
                    Outcome::OtherRules => panic!("the same rules"),
                }
                let EventKind::MessagePosted { message, .. } = &events[0].kind else {
                    panic!("a post")
                };
                assert!(message.created_at >= last, "never backwards");
                last = message.created_at;
                let ahead = message.created_at * 1000 - real as i64;
                assert!(
                    ahead <= 10_000,
                    "phase {phase}: {ahead} ms ahead of real time"
                );
                if phase == 2 {
                    // Behind, then set right: no drift is kept.
                    assert!(ahead <= 1_000, "phase 2: {ahead} ms ahead");
                }
            }
        }
        // Only the first command after the leader jumped ahead (its stamp
        // past a deadline estimated from this node's clock) expired; the
        // next deadline took the new time in.
        assert_eq!(expired, [(3, 121)], "expired: {expired:?}");
    }
}
