//! Moderation: who may not post until when, the room's modes, and the
//! trail of what moderators did.
//!
//! A moderation command is a command like a client's: it comes with a
//! [`Context`](crate::Context) (the acting operator's name as the user,
//! and the time), it is applied in the log's order, and it makes events.
//! So every node of a replicated chat restricts the same users at the same
//! positions, and a restriction survives a restart, a snapshot and a
//! resume like a message does.
//!
//! Restrictions are kept by user id, the pseudonym a message carries,
//! never by address. A time-out that has ended is no longer in force; it
//! is dropped from memory at the next moderation command.

use crate::Timestamp;
use crate::rate_limit::{LimiterSnapshot, RateLimit, RateLimiter};
use chat_proto::{AuditEntry, Position, Restriction, RestrictionEntry, Room, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The most restrictions in force at once. One more is refused
/// ([`ChatError::TooManyRestrictions`](crate::ChatError::TooManyRestrictions)).
pub const MAX_RESTRICTIONS: usize = 100_000;

/// The longest time-out, in days; a ban lasts longer.
pub const MAX_TIMEOUT_DAYS: u64 = 366;

/// The longest slow mode, in seconds (a day).
pub const MAX_SLOW_MODE_SECONDS: u32 = 86_400;

/// How many moderation commands the audit trail keeps; the oldest is
/// dropped first.
pub const AUDIT_KEPT: usize = 10_000;

/// One restriction in force, as the chat holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// When it ends (chat time); `None` for a ban.
    pub until: Option<Timestamp>,
    /// Why, as the moderator gave it.
    pub reason: Option<String>,
    /// Who set it.
    pub by: UserId,
    /// When it was set (chat time).
    pub since: Timestamp,
    /// The position of the event that set it.
    pub position: Position,
}

impl Held {
    /// Whether it is still in force at `now`.
    pub fn in_force(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| now < until)
    }

    /// As clients are told of it, for `user`.
    pub fn restriction(&self, user: &UserId) -> Restriction {
        Restriction {
            user_id: user.clone(),
            until: self.until.map(Timestamp::unix_seconds_ceil),
            reason: self.reason.clone(),
        }
    }

    /// As the operator API lists it, for `user`.
    pub fn entry(&self, user: &UserId) -> RestrictionEntry {
        RestrictionEntry {
            restriction: self.restriction(user),
            by: self.by.clone(),
            since: self.since.unix_seconds(),
            position: self.position,
        }
    }
}

/// Everything moderation holds, as plain data (part of a
/// [`ChatSnapshot`](crate::ChatSnapshot), and what a store keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModerationSnapshot {
    /// The restrictions, by user, in order of id.
    pub restrictions: Vec<(UserId, Held)>,
    /// The room's modes.
    pub room: Room,
    /// Who posted when, within slow mode's window (`None` while it is
    /// off). A store need not keep it: like the rate limits, it starts
    /// empty after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_mode: Option<LimiterSnapshot>,
    /// The latest moderation commands, oldest first.
    pub audit: Vec<AuditEntry>,
}

/// Moderation's state in a chat.
#[derive(Debug, Clone, Default)]
pub(crate) struct Moderation {
    pub(crate) restrictions: BTreeMap<UserId, Held>,
    pub(crate) room: Room,
    /// One message per `room.slow_mode_seconds` per user, while on.
    pub(crate) slow_mode: Option<RateLimiter>,
    pub(crate) audit: VecDeque<AuditEntry>,
}

/// Slow mode's limit: one message per `seconds`.
fn slow_limit(seconds: u32) -> RateLimit {
    RateLimit {
        max: 1,
        window: Duration::from_secs(seconds.into()),
    }
}

impl Moderation {
    pub(crate) fn snapshot(&self) -> ModerationSnapshot {
        ModerationSnapshot {
            restrictions: self
                .restrictions
                .iter()
                .map(|(user, held)| (user.clone(), held.clone()))
                .collect(),
            room: self.room,
            slow_mode: self.slow_mode.as_ref().map(RateLimiter::snapshot),
            audit: self.audit.iter().cloned().collect(),
        }
    }

    pub(crate) fn from_snapshot(snapshot: ModerationSnapshot) -> Self {
        let slow_mode = (snapshot.room.slow_mode_seconds > 0).then(|| {
            let limit = slow_limit(snapshot.room.slow_mode_seconds);
            match snapshot.slow_mode {
                Some(s) => RateLimiter::from_snapshot(limit, s),
                None => RateLimiter::new(limit),
            }
        });
        let mut audit: VecDeque<AuditEntry> = snapshot.audit.into();
        while audit.len() > AUDIT_KEPT {
            audit.pop_front();
        }
        Moderation {
            restrictions: snapshot.restrictions.into_iter().collect(),
            room: snapshot.room,
            slow_mode,
            audit,
        }
    }

    /// The restriction on `user` in force at `now`, if any.
    pub(crate) fn restricted(&self, user: &UserId, now: Timestamp) -> Option<&Held> {
        self.restrictions.get(user).filter(|h| h.in_force(now))
    }

    /// Drops the restrictions that have ended by `now`.
    pub(crate) fn prune(&mut self, now: Timestamp) {
        self.restrictions.retain(|_, held| held.in_force(now));
    }

    /// Sets the room's modes. Slow mode starts afresh when its length
    /// changes.
    pub(crate) fn set_room(&mut self, room: Room) {
        if room.slow_mode_seconds != self.room.slow_mode_seconds {
            self.slow_mode = (room.slow_mode_seconds > 0)
                .then(|| RateLimiter::new(slow_limit(room.slow_mode_seconds)));
        }
        self.room = room;
    }

    pub(crate) fn record(&mut self, entry: AuditEntry) {
        if self.audit.len() >= AUDIT_KEPT {
            self.audit.pop_front();
        }
        self.audit.push_back(entry);
    }
}
