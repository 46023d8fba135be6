//! What a node knows of its chat to refuse, without the stream, what the
//! stream is sure to refuse.

use chat_core::{Chat, RateKind, Timestamp};
use chat_proto::UserId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What this node's connections need of its chat to refuse, without the
/// stream, what the stream is sure to refuse: the chat's time after the
/// last entry applied, and the users whose allowance that entry and the
/// ones before used up.
#[derive(Debug)]
pub(super) struct View {
    /// The chat's time after the last entry applied...
    clock: Timestamp,
    /// ...and when this node applied it.
    applied_at: Instant,
    /// Users out of allowance: until when messages and reactions are
    /// refused ([`Chat::refused_until`]). Only users who used up a limit
    /// within the last window are here, and those whose times have all
    /// passed are swept out once per window.
    refused: HashMap<UserId, [Option<Timestamp>; 2]>,
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
            applied_at: Instant::now(),
            refused: HashMap::new(),
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

    /// Takes in what applying an entry of `user`'s did to `chat`.
    pub(super) fn applied(&mut self, chat: &Chat, user: Option<&UserId>) {
        self.clock = chat.now();
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
            self.next_sweep =
                Timestamp::from_unix_millis(now.as_millis().saturating_add(self.window_ms));
        }
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
        self.clock
            .as_millis()
            .saturating_add(since)
            .max(wall)
            .saturating_add(grace)
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
    use crate::sequencer::cluster::envelope::{Applied, Envelope, apply};
    use chat_core::Config;

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
            let Applied::Done { user, .. } = apply(&mut chat, "r", seq, ms, &payload) else {
                panic!("applied")
            };
            view.applied(&chat, user.as_ref());
        }
        // The first message leaves the window at t + 60 s.
        assert!(view.refuses(&u, RateKind::Messages, t + 59_999));
        assert!(!view.refuses(&u, RateKind::Messages, t + 60_000));
        assert!(!view.refuses(&u, RateKind::Reactions, t + 1_000));
        assert!(!view.refuses(&UserId::from("v"), RateKind::Messages, t + 1_000));
    }
}
