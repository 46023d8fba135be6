//! The chat's rules as a pure, deterministic state machine.
//!
//! `chat-core` does no I/O, reads no clock, draws no random numbers, and
//! holds no locks, channels or async types. Everything it needs from the
//! outside world comes in with each command as a [`Context`]: who is acting,
//! what time it is, and the id a new message would get. Given the same
//! commands in the same order, every [`Chat`] reaches the same state and
//! emits the same events, on any machine. That is what lets a server replay a
//! log to rebuild its state, lets several nodes apply one ordered log, and
//! lets tests run thousands of random sessions in milliseconds.
//!
//! The loop an embedder writes:
//!
//! ```
//! use chat_core::{Chat, Config, Context, Event, Timestamp};
//! use chat_proto::{ClientFrame, SendMessage, Uuid};
//!
//! let mut chat = Chat::new(Config::default());
//! let ctx = Context {
//!     user: "alice".into(),
//!     now: Timestamp::from_unix_millis(1_700_000_000_000),
//!     message_id: Uuid::from_u128(1),
//! };
//! let command = ClientFrame::SendMessage(SendMessage { text: "hi".into(), author_name: None });
//! match chat.handle(ctx, command) {
//!     Ok(()) => {
//!         while let Some(event) = chat.poll_event() {
//!             println!("broadcast event {}: {}", event.position, event.frame().encode());
//!         }
//!     }
//!     Err(refusal) => println!("to the sender only: {refusal}"),
//! }
//! assert_eq!(chat.history().len(), 1);
//! ```
#![forbid(unsafe_code)]

mod error;
mod frame_bound;
mod history;
mod moderation;
mod rate_limit;
mod validate;

use chat_proto::{
    AddReaction, AuditEntry, ClientFrame, LiftRestriction, Message, MessageRemoved, Moderation,
    Position, Purge, ReactionAction, ReactionUpdated, Reactions, RemoveMessage, RestrictUser,
    RestrictionLifted, Room, SendMessage, ServerFrame, Term, UserId, Uuid,
};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

pub use error::{ChatError, RateKind, Until, Window};
pub use history::History;
pub use moderation::{
    AUDIT_KEPT, Held, MAX_RESTRICTIONS, MAX_SLOW_MODE_SECONDS, MAX_TIMEOUT_DAYS, ModerationSnapshot,
};
use rate_limit::RateLimiter;
pub use rate_limit::{LimiterSnapshot, RateLimit};

/// The chat's bounds and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The most messages kept in history; the oldest is dropped first.
    pub history_limit: usize,
    /// The longest message text, in Unicode scalar values.
    pub max_text_chars: usize,
    /// The longest author name after trimming, in Unicode scalar values.
    pub max_author_name_chars: usize,
    /// The most distinct emojis on one message.
    pub max_emojis_per_message: usize,
    /// The most users reacting with one emoji on one message.
    pub max_reactors_per_emoji: usize,
    /// How many messages one user may send per window.
    pub message_rate: RateLimit,
    /// How many reaction toggles one user may make per window.
    pub reaction_rate: RateLimit,
}

impl Config {
    /// The refusal `command` gets under these rules whatever the chat's
    /// state: a text, name or emoji against the rules. `Ok` does not mean
    /// it will be accepted (the rate limit, a missing message); an `Err`
    /// is exactly what [`Chat::handle`] would answer, at any time, in any
    /// state.
    ///
    /// A node of a replicated chat uses it to refuse such commands itself,
    /// without putting them in the shared log.
    pub fn check(&self, command: &Command) -> Result<(), ChatError> {
        match command {
            Command::Client(ClientFrame::SendMessage(m)) => {
                validate::text(self, &m.text)?;
                validate::author_name(self, m.author_name.as_deref()).map(drop)
            }
            Command::Client(ClientFrame::AddReaction(r)) => validate::emoji(&r.emoji).map(drop),
            Command::Moderation(m) => validate::moderation(m),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history_limit: 10_000,
            max_text_chars: chat_proto::MAX_TEXT_CHARS,
            max_author_name_chars: 50,
            max_emojis_per_message: 20,
            max_reactors_per_emoji: 100,
            message_rate: RateLimit::per_minute(60),
            reaction_rate: RateLimit::per_minute(60),
        }
    }
}

/// A point in time, in milliseconds since the Unix epoch. The core never
/// reads a clock; the embedder passes the time in with each command.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The time `ms` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch, as `created_at` carries them.
    pub const fn unix_seconds(self) -> i64 {
        // u64::MAX / 1000 fits in an i64.
        (self.0 / 1000) as i64
    }

    /// Seconds since the Unix epoch, rounded up: the first whole second
    /// at or after this time (how an end is written, so that at the
    /// second shown it has passed).
    pub const fn unix_seconds_ceil(self) -> i64 {
        self.0.div_ceil(1000) as i64
    }

    /// This time plus `ms` milliseconds, saturating.
    pub const fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

impl From<SystemTime> for Timestamp {
    /// Converts a wall-clock reading taken by the embedder (the core never
    /// takes one itself). Times before the epoch become the epoch.
    fn from(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// Everything a command needs from outside the state machine.
///
/// A command with its context is a complete, replayable record: a log of
/// `(Context, ClientFrame)` pairs rebuilds the chat exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// Who is acting (the server derives it from the client's address).
    pub user: UserId,
    /// The current time. Feed a clock that does not step: a monotonic
    /// clock anchored to the wall clock, or a log's timestamps. The chat
    /// takes a step backwards out of its own time (see [`Chat`]'s clock),
    /// but a step forwards is indistinguishable from time passing and ends
    /// rate-limit windows early.
    pub now: Timestamp,
    /// The id the message gets if the command posts one.
    pub message_id: Uuid,
}

/// A command the chat applies: a client's frame, or an operator's order.
///
/// A moderation command is taken as given: the embedder authenticates
/// whoever orders it (the server takes them only from its operator API,
/// with a key) and passes their name as the [`Context`]'s user.
///
/// It serializes as the frame it holds, so a log written before
/// moderation existed reads as client commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// What a client sent.
    Client(ClientFrame),
    /// What an operator ordered.
    Moderation(Moderation),
}

impl From<ClientFrame> for Command {
    fn from(frame: ClientFrame) -> Self {
        Command::Client(frame)
    }
}

impl From<Moderation> for Command {
    fn from(order: Moderation) -> Self {
        Command::Moderation(order)
    }
}

/// Something that happened, with its place in the chat's log.
///
/// Every accepted command makes at least one event (a client's exactly
/// one; a restriction that removes messages one per message, then its
/// own), and events are numbered
/// in the order they happen: the first is at position 1, each next one is
/// one further. A log of events is therefore gap-free, and "everything after
/// position `n`" is exactly what a client that has seen `n` is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Where the event stands in the log.
    pub position: Position,
    /// What happened.
    pub kind: EventKind,
}

/// What an [`Event`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A message was accepted and appended to history. Broadcast it.
    MessagePosted {
        /// The new message.
        message: Message,
        /// The oldest message, if the post pushed it out of the bounded
        /// history. Nothing is broadcast for it; a store should delete it.
        evicted: Option<Message>,
    },
    /// A reaction was toggled. Broadcast it; it carries the whole message.
    ReactionUpdated(ReactionUpdated),
    /// A moderator removed a message from the history (by
    /// `remove_message`, or with a restriction that purges). A store
    /// erases it. Only clients that opted in are told.
    MessageRemoved {
        /// The message as it was, so that a store can erase what it kept
        /// of it.
        message: Message,
        /// The order's entry in the audit trail, on its last event (none
        /// on the removals a restriction makes before its own event).
        audit: Option<Box<AuditEntry>>,
    },
    /// A moderator timed a user out or banned them. Only clients that
    /// opted in are told.
    UserRestricted {
        /// The user.
        user: UserId,
        /// The restriction.
        held: Held,
        /// The order's entry in the audit trail.
        audit: Option<Box<AuditEntry>>,
    },
    /// A moderator lifted a user's restriction. Only clients that opted
    /// in are told.
    RestrictionLifted {
        /// The user.
        user: UserId,
        /// The order's entry in the audit trail.
        audit: Option<Box<AuditEntry>>,
    },
    /// A moderator changed the room's modes. Only clients that opted in
    /// are told.
    RoomUpdated {
        /// The modes now.
        room: Room,
        /// The order's entry in the audit trail.
        audit: Option<Box<AuditEntry>>,
    },
}

impl Event {
    /// The id of the message the event carries: the one posted, or the
    /// one whose reactions changed.
    pub fn message_id(&self) -> Option<Uuid> {
        match &self.kind {
            EventKind::MessagePosted { message, .. }
            | EventKind::MessageRemoved { message, .. } => Some(message.id),
            EventKind::ReactionUpdated(r) => Some(r.message_id),
            EventKind::UserRestricted { .. }
            | EventKind::RestrictionLifted { .. }
            | EventKind::RoomUpdated { .. } => None,
        }
    }

    /// The audit trail's entry of the moderation order this event ends
    /// (as [`Chat::audit`] lists it): what a store keeps of who did what.
    pub fn audit(&self) -> Option<&AuditEntry> {
        match &self.kind {
            EventKind::MessageRemoved { audit, .. }
            | EventKind::UserRestricted { audit, .. }
            | EventKind::RestrictionLifted { audit, .. }
            | EventKind::RoomUpdated { audit, .. } => audit.as_deref(),
            EventKind::MessagePosted { .. } | EventKind::ReactionUpdated(_) => None,
        }
    }

    /// The frame to broadcast for this event.
    pub fn frame(&self) -> ServerFrame {
        match &self.kind {
            EventKind::MessagePosted { message, .. } => ServerFrame::Message(message.clone()),
            EventKind::ReactionUpdated(r) => ServerFrame::ReactionUpdated(r.clone()),
            EventKind::MessageRemoved { message, .. } => {
                ServerFrame::MessageRemoved(MessageRemoved {
                    message_id: message.id,
                })
            }
            EventKind::UserRestricted { user, held, .. } => {
                ServerFrame::UserRestricted(held.restriction(user))
            }
            EventKind::RestrictionLifted { user, .. } => {
                ServerFrame::RestrictionLifted(RestrictionLifted {
                    user_id: user.clone(),
                })
            }
            EventKind::RoomUpdated { room, .. } => ServerFrame::RoomUpdated(*room),
        }
    }

    /// Whether every client is sent this event's frame: `false` for
    /// moderation's events, which only clients that opted in understand
    /// (the seed protocol has no frame for them).
    pub fn for_every_client(&self) -> bool {
        matches!(
            self.kind,
            EventKind::MessagePosted { .. } | EventKind::ReactionUpdated(_)
        )
    }
}

/// Everything a [`Chat`] holds, as plain data: history with reactions,
/// both rate limiters' memory, the chat's own clock, and the log's head.
///
/// A chat rebuilt from it with the same [`Config`]
/// ([`Chat::from_snapshot`]) goes on exactly as the one it was taken from:
/// the same commands give the same events. That is what lets a node that
/// joins a replicated chat late start from another node's snapshot instead
/// of the whole log. (A store's messages alone are not enough for that:
/// they leave out the rate limiters.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSnapshot {
    /// The history, oldest first.
    pub messages: Vec<Message>,
    /// Who sent messages when, within the window.
    pub message_limiter: LimiterSnapshot,
    /// Who toggled reactions when, within the window.
    pub reaction_limiter: LimiterSnapshot,
    /// The chat's own time.
    pub clock: Timestamp,
    /// How far the chat's time runs ahead of its input, in ms.
    pub skew: u64,
    /// The position of the latest event.
    pub head: Position,
    /// Restrictions, the room's modes and the audit trail (empty in a
    /// snapshot taken before moderation existed).
    #[serde(default)]
    pub moderation: ModerationSnapshot,
}

/// The chat room's state: history, reactions and rate limits.
#[derive(Debug, Clone)]
pub struct Chat {
    config: Config,
    history: History,
    message_limiter: RateLimiter,
    reaction_limiter: RateLimiter,
    /// Restrictions, the room's modes, the audit trail.
    moderation: moderation::Moderation,
    /// The chat's own time: the latest `now` plus `skew`. It never runs
    /// backwards and never stands still while `now` advances.
    clock: Timestamp,
    /// How far the chat's time runs ahead of the embedder's, in ms, since
    /// the embedder's clock last stepped back. A step back of an hour thus
    /// costs no hour of frozen time (every message stamped alike, every
    /// rate window stuck open); the chat's time simply goes on from where
    /// it was. Once the embedder's `now` reaches the chat's time again (its
    /// clock was set right), the skew is dropped: the chat's time never
    /// runs ahead by more than the last step, however many steps there
    /// were.
    skew: u64,
    /// The position of the latest event (0 before the first).
    head: Position,
    /// Events not yet taken by [`Chat::poll_event`]. A command adds at most
    /// one, so this stays tiny as long as the embedder drains it.
    events: VecDeque<Event>,
}

impl Chat {
    /// An empty chat.
    pub fn new(config: Config) -> Self {
        Chat {
            history: History::new(config.history_limit),
            message_limiter: RateLimiter::new(config.message_rate),
            reaction_limiter: RateLimiter::new(config.reaction_rate),
            moderation: moderation::Moderation::default(),
            clock: Timestamp::default(),
            skew: 0,
            head: Position::ZERO,
            events: VecDeque::with_capacity(4),
            config,
        }
    }

    /// Rebuilds a chat from a stored history, oldest first (as a store
    /// wrote it from [`Event`]s), whose latest event was at `head`: the next
    /// event is at `head` + 1.
    ///
    /// If there are more messages than `config.history_limit` (the limit was
    /// lowered since they were stored), the oldest are dropped and returned,
    /// so the store can delete them. A repeated id keeps its first message.
    /// Time resumes from the newest message: if the embedder's first `now`
    /// is earlier (a clock set back, or a bad future time stored by an
    /// earlier run), the chat's time goes on from the newest message at the
    /// embedder's pace, so `created_at` never goes backwards and never
    /// freezes. Rate-limit windows start empty.
    pub fn restore(
        config: Config,
        messages: impl IntoIterator<Item = Message>,
        head: Position,
    ) -> (Chat, Vec<Message>) {
        let mut chat = Chat::new(config);
        chat.head = head;
        let mut dropped = Vec::new();
        for message in messages {
            if chat.history.contains(&message.id) {
                continue;
            }
            let created_ms = u64::try_from(message.created_at)
                .unwrap_or(0)
                .saturating_mul(1000);
            chat.clock = chat.clock.max(Timestamp(created_ms));
            dropped.extend(chat.history.push(message));
        }
        (chat, dropped)
    }

    /// Everything the chat holds, as data. Take it between commands, once
    /// every event has been polled (events not yet polled are not in it).
    pub fn snapshot(&self) -> ChatSnapshot {
        debug_assert!(self.events.is_empty(), "snapshot with events unpolled");
        ChatSnapshot {
            messages: self.history.iter().cloned().collect(),
            message_limiter: self.message_limiter.snapshot(),
            reaction_limiter: self.reaction_limiter.snapshot(),
            clock: self.clock,
            skew: self.skew,
            head: self.head,
            moderation: self.moderation.snapshot(),
        }
    }

    /// The chat a [`snapshot`](Self::snapshot) was taken of, with `config`
    /// (which must be the one it ran with, or it goes on differently).
    pub fn from_snapshot(config: Config, snapshot: ChatSnapshot) -> Chat {
        let mut chat = Chat::new(config);
        for message in snapshot.messages {
            // Within its own limit when it was taken; a lower limit drops
            // the oldest, as restore does.
            let _ = chat.history.push(message);
        }
        chat.message_limiter =
            RateLimiter::from_snapshot(chat.config.message_rate, snapshot.message_limiter);
        chat.reaction_limiter =
            RateLimiter::from_snapshot(chat.config.reaction_rate, snapshot.reaction_limiter);
        chat.clock = snapshot.clock;
        chat.skew = snapshot.skew;
        chat.head = snapshot.head;
        chat.moderation = moderation::Moderation::from_snapshot(snapshot.moderation);
        chat
    }

    /// Puts back what moderation held (as a store kept it, after
    /// [`restore`](Self::restore)): restrictions, the room's modes and the
    /// audit trail. Slow mode's memory of who posted when starts empty
    /// unless `snapshot` has it.
    pub fn restore_moderation(&mut self, snapshot: ModerationSnapshot) {
        self.moderation = moderation::Moderation::from_snapshot(snapshot);
    }

    /// What moderation holds, as data.
    pub fn moderation(&self) -> ModerationSnapshot {
        self.moderation.snapshot()
    }

    /// The restrictions in force at the chat's time, by user id.
    pub fn restrictions(&self) -> impl Iterator<Item = (&UserId, &Held)> {
        let now = self.clock;
        self.moderation
            .restrictions
            .iter()
            .filter(move |(_, held)| held.in_force(now))
    }

    /// The room's modes.
    pub fn room(&self) -> Room {
        self.moderation.room
    }

    /// The latest moderation commands applied, oldest first (at most
    /// [`AUDIT_KEPT`]).
    pub fn audit(&self) -> impl DoubleEndedIterator<Item = &AuditEntry> + ExactSizeIterator {
        self.moderation.audit.iter()
    }

    /// The refusal a post or reaction of `user` gets at the embedder's
    /// `now` from a moderator's restriction, or for a post from slow mode
    /// (`posting`), in this state.
    ///
    /// A node of a replicated chat uses it to refuse such commands itself,
    /// without putting them in the shared log. Unlike
    /// [`refused_until`](Self::refused_until) this can change in either
    /// direction as the log goes on (a restriction can be lifted, slow
    /// mode turned off), so a node that is behind the log may refuse for a
    /// little while what the log would take.
    pub fn moderated(&self, user: &UserId, now: Timestamp, posting: bool) -> Result<(), ChatError> {
        self.check_moderation(user, self.time_at(now), posting)
    }

    /// The chat's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The message history, oldest first.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The position of the latest event (including any not yet polled);
    /// [`Position::ZERO`] if there has been none.
    pub fn head(&self) -> Position {
        self.head
    }

    /// Applies one command. On success its events are queued for
    /// [`poll_event`](Self::poll_event); a refusal changes nothing and is
    /// meant for the acting client only.
    pub fn handle(&mut self, ctx: Context, command: impl Into<Command>) -> Result<(), ChatError> {
        match command.into() {
            Command::Client(ClientFrame::SendMessage(m)) => self.send_message(ctx, m),
            Command::Client(ClientFrame::AddReaction(r)) => self.add_reaction(ctx, r),
            Command::Moderation(order) => self.moderate(ctx, order),
        }
    }

    /// Takes the next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Posts a message (the `send_message` command).
    fn send_message(&mut self, ctx: Context, m: SendMessage) -> Result<(), ChatError> {
        let now = self.advance_clock(ctx.now);
        validate::text(&self.config, &m.text)?;
        let author_name = validate::author_name(&self.config, m.author_name.as_deref())?;
        self.check_moderation(&ctx.user, now, true)?;
        if !self.message_limiter.check(&ctx.user, now) {
            return Err(rate_limited(RateKind::Messages, self.config.message_rate));
        }
        if self.history.contains(&ctx.message_id) {
            return Err(ChatError::DuplicateMessageId);
        }
        self.message_limiter.record(&ctx.user, now);
        if let Some(slow) = &mut self.moderation.slow_mode {
            slow.record(&ctx.user, now);
        }
        let message = Message {
            id: ctx.message_id,
            text: m.text,
            author_id: ctx.user,
            author_name,
            created_at: now.unix_seconds(),
            reactions: Reactions::default(),
        };
        let evicted = self.history.push(message.clone());
        self.emit(EventKind::MessagePosted { message, evicted });
        Ok(())
    }

    /// Toggles the acting user's reaction (the `add_reaction` command).
    fn add_reaction(&mut self, ctx: Context, r: AddReaction) -> Result<(), ChatError> {
        let now = self.advance_clock(ctx.now);
        let emoji = validate::emoji(&r.emoji)?;
        let config = &self.config;
        if !self.history.contains(&r.message_id) {
            return Err(ChatError::MessageNotFound);
        }
        self.check_moderation(&ctx.user, now, false)?;
        let Some(message) = self.history.get_mut(&r.message_id) else {
            return Err(ChatError::MessageNotFound);
        };
        if !self.reaction_limiter.check(&ctx.user, now) {
            return Err(rate_limited(RateKind::Reactions, config.reaction_rate));
        }
        let action = toggle(config, &mut message.reactions, emoji, &ctx.user)?;
        self.reaction_limiter.record(&ctx.user, now);
        let update = ReactionUpdated {
            message_id: r.message_id,
            emoji: emoji.to_owned(),
            user_id: ctx.user,
            action,
            message: message.clone(),
        };
        self.emit(EventKind::ReactionUpdated(update));
        Ok(())
    }

    /// Whether a moderator's restriction, or slow mode for a post,
    /// refuses `user` at chat time `now`.
    fn check_moderation(
        &self,
        user: &UserId,
        now: Timestamp,
        posting: bool,
    ) -> Result<(), ChatError> {
        if let Some(held) = self.moderation.restricted(user, now) {
            return Err(match held.until {
                Some(until) => ChatError::TimedOut {
                    until: Until(until),
                },
                None => ChatError::Banned,
            });
        }
        if posting
            && let Some(slow) = &self.moderation.slow_mode
            && !slow.check(user, now)
        {
            let until = slow.refused_until(user).unwrap_or(now);
            return Err(ChatError::SlowMode {
                seconds: self.moderation.room.slow_mode_seconds,
                until: Until(until),
            });
        }
        Ok(())
    }

    /// Applies an operator's order: checked whole first, so a refusal
    /// changes nothing.
    fn moderate(&mut self, ctx: Context, order: Moderation) -> Result<(), ChatError> {
        let now = self.advance_clock(ctx.now);
        validate::moderation(&order)?;
        let first = self.head.next();
        let mut removed = Vec::new();
        match &order {
            Moderation::RemoveMessage(RemoveMessage { message_id, .. }) => {
                let message = self
                    .history
                    .remove(message_id)
                    .ok_or(ChatError::MessageNotFound)?;
                removed.push(message.id);
                self.emit(EventKind::MessageRemoved {
                    message,
                    audit: None,
                });
            }
            Moderation::RestrictUser(RestrictUser {
                user_id,
                term,
                purge,
                reason,
            }) => {
                self.moderation.prune(now);
                if !self.moderation.restrictions.contains_key(user_id)
                    && self.moderation.restrictions.len() >= MAX_RESTRICTIONS
                {
                    return Err(ChatError::TooManyRestrictions {
                        max: MAX_RESTRICTIONS,
                    });
                }
                let since_ms = match purge {
                    Purge::None => None,
                    Purge::All => Some(0),
                    Purge::LastMinutes(m) => {
                        Some(now.as_millis().saturating_sub(u64::from(*m) * 60_000))
                    }
                };
                if let Some(since_ms) = since_ms {
                    let doomed: Vec<Uuid> = self
                        .history
                        .iter()
                        .filter(|m| {
                            // `created_at` is in whole seconds, rounded down.
                            m.author_id == *user_id && m.created_at >= (since_ms / 1000) as i64
                        })
                        .map(|m| m.id)
                        .collect();
                    for id in doomed {
                        if let Some(message) = self.history.remove(&id) {
                            removed.push(id);
                            self.emit(EventKind::MessageRemoved {
                                message,
                                audit: None,
                            });
                        }
                    }
                }
                let held = Held {
                    until: match term {
                        Term::Seconds(s) => Some(now.plus_millis(s.saturating_mul(1000))),
                        Term::Forever => None,
                    },
                    reason: reason.clone(),
                    by: ctx.user.clone(),
                    since: now,
                    position: self.head.next(),
                };
                self.moderation
                    .restrictions
                    .insert(user_id.clone(), held.clone());
                self.emit(EventKind::UserRestricted {
                    user: user_id.clone(),
                    held,
                    audit: None,
                });
            }
            Moderation::LiftRestriction(LiftRestriction { user_id, .. }) => {
                self.moderation.prune(now);
                if self.moderation.restrictions.remove(user_id).is_none() {
                    return Err(ChatError::NotRestricted);
                }
                self.emit(EventKind::RestrictionLifted {
                    user: user_id.clone(),
                    audit: None,
                });
            }
            Moderation::SetRoom(room) => {
                self.moderation.prune(now);
                self.moderation.set_room(*room);
                self.emit(EventKind::RoomUpdated {
                    room: *room,
                    audit: None,
                });
            }
        }
        debug_assert!(self.head >= first, "an order makes at least one event");
        let entry = AuditEntry {
            position: self.head,
            at: now.unix_seconds(),
            by: ctx.user,
            command: order,
            removed,
        };
        // Its last event carries it, for a store to keep.
        if let Some(Event {
            kind:
                EventKind::MessageRemoved { audit, .. }
                | EventKind::UserRestricted { audit, .. }
                | EventKind::RestrictionLifted { audit, .. }
                | EventKind::RoomUpdated { audit, .. },
            ..
        }) = self.events.back_mut()
        {
            *audit = Some(Box::new(entry.clone()));
        }
        self.moderation.record(entry);
        Ok(())
    }

    /// Queues an event at the next position.
    fn emit(&mut self, kind: EventKind) {
        self.head = self.head.next();
        self.events.push_back(Event {
            position: self.head,
            kind,
        });
    }

    /// The chat's time: that of the latest command (see [`Chat`]'s clock).
    pub fn now(&self) -> Timestamp {
        self.clock
    }

    /// The chat's time that a command at the embedder's `now` would get,
    /// without applying anything.
    pub fn time_at(&self, now: Timestamp) -> Timestamp {
        self.next_clock(now).0
    }

    /// The chat time before which every `kind` command from `user` is
    /// refused, whatever is applied first: `Some` once the user has used
    /// up the allowance in this state. Such a command is refused by the
    /// rate limit, with [`rate_limited`](Self::rate_limited), unless a
    /// rule checked before it refuses it first (a bad text, a reaction to a
    /// message that is gone).
    ///
    /// A node of a replicated chat uses it to refuse, without putting them
    /// in the shared log, commands that the log is sure to refuse: the
    /// node's state may be behind the log's, but later commands only use up
    /// more of the allowance, so the answer can only grow.
    pub fn refused_until(&self, kind: RateKind, user: &UserId) -> Option<Timestamp> {
        match kind {
            RateKind::Messages => self.message_limiter.refused_until(user),
            RateKind::Reactions => self.reaction_limiter.refused_until(user),
        }
    }

    /// The refusal of the rate limit for `kind` in this chat's rules.
    pub fn rate_limited(&self, kind: RateKind) -> ChatError {
        match kind {
            RateKind::Messages => rate_limited(kind, self.config.message_rate),
            RateKind::Reactions => rate_limited(kind, self.config.reaction_rate),
        }
    }

    /// How many users each rate limiter remembers (messages, reactions).
    /// Bounded by the users active within the last two windows.
    pub fn rate_limited_users(&self) -> (usize, usize) {
        (
            self.message_limiter.tracked_users(),
            self.reaction_limiter.tracked_users(),
        )
    }

    /// The chat's time for a command at the embedder's `now`.
    fn advance_clock(&mut self, now: Timestamp) -> Timestamp {
        (self.clock, self.skew) = self.next_clock(now);
        self.clock
    }

    /// The chat's time, and the skew, after a command at `now`.
    fn next_clock(&self, now: Timestamp) -> (Timestamp, u64) {
        if now >= self.clock {
            // At or past the chat's time: no drift to keep.
            return (now, 0);
        }
        let mut skew = self.skew;
        let shifted = now.0.saturating_add(skew);
        if shifted < self.clock.0 {
            // A step backwards: absorb it, so time goes on from here.
            skew += self.clock.0 - shifted;
        }
        (Timestamp(now.0.saturating_add(skew)), skew)
    }
}

fn rate_limited(kind: RateKind, limit: RateLimit) -> ChatError {
    ChatError::RateLimited {
        kind,
        max: limit.max,
        window: Window(limit.window_ms()),
    }
}

/// Adds `user` to `emoji`'s reactors, or removes them if already there. An
/// emoji whose last reactor leaves is removed; the others keep their order.
fn toggle(
    config: &Config,
    reactions: &mut Reactions,
    emoji: &str,
    user: &UserId,
) -> Result<ReactionAction, ChatError> {
    match reactions.get_mut(emoji) {
        Some(users) => {
            if users.shift_remove(user) {
                if users.is_empty() {
                    reactions.shift_remove(emoji);
                }
                return Ok(ReactionAction::Removed);
            }
            if users.len() >= config.max_reactors_per_emoji {
                return Err(ChatError::TooManyReactors {
                    max: config.max_reactors_per_emoji,
                });
            }
            users.insert(user.clone());
            Ok(ReactionAction::Added)
        }
        None => {
            if reactions.len() >= config.max_emojis_per_message {
                return Err(ChatError::TooManyEmojis {
                    max: config.max_emojis_per_message,
                });
            }
            if config.max_reactors_per_emoji == 0 {
                return Err(ChatError::TooManyReactors { max: 0 });
            }
            let mut users = chat_proto::Reactors::default();
            users.insert(user.clone());
            reactions.insert(emoji.to_owned(), users);
            Ok(ReactionAction::Added)
        }
    }
}
