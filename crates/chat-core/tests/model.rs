//! Model-based property test: a deliberately simple reference model (plain
//! `Vec`s, linear scans, every timestamp kept) runs beside the real
//! [`Chat`] over random command sequences. After every step the outcome
//! (events or refusal) and the whole history must agree.
//!
//! The limits are tiny so that random runs reach every edge: full history,
//! rate limits, the emoji and reactor caps, evicted ids, a clock that jumps
//! forwards and sometimes backwards, and reused message ids. A moderator
//! removes messages, times users out and bans them (with purges), lifts
//! restrictions and turns slow mode on and off among them.

use chat_core::{
    Chat, ChatError, Config, Context, Event, EventKind, Held, RateKind, RateLimit, Timestamp,
    Until, Window,
};
use chat_proto::{
    AddReaction, AuditEntry, ClientFrame, LiftRestriction, Message, Moderation, Position, Purge,
    ReactionAction, ReactionUpdated, Reactions, RemoveMessage, RestrictUser, Room, SendMessage,
    Term, UserId, Uuid,
};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use std::time::Duration;

const HISTORY: usize = 4;
const MSG_MAX: u32 = 3;
const REACT_MAX: u32 = 4;
const WINDOW_MS: u64 = 10_000;
const TEXT_MAX: usize = 6;
const NAME_MAX: usize = 4;
const EMOJI_MAX: usize = 3;
const REACTOR_MAX: usize = 2;

fn config() -> Config {
    Config {
        history_limit: HISTORY,
        max_text_chars: TEXT_MAX,
        max_author_name_chars: NAME_MAX,
        max_emojis_per_message: EMOJI_MAX,
        max_reactors_per_emoji: REACTOR_MAX,
        message_rate: RateLimit {
            max: MSG_MAX,
            window: Duration::from_millis(WINDOW_MS),
        },
        reaction_rate: RateLimit {
            max: REACT_MAX,
            window: Duration::from_millis(WINDOW_MS),
        },
    }
}

#[derive(Debug, Clone)]
struct ModelMessage {
    id: u128,
    text: String,
    author: String,
    name: String,
    created_at: i64,
    reactions: Vec<(String, Vec<String>)>,
}

impl ModelMessage {
    fn to_message(&self) -> Message {
        let mut reactions = Reactions::default();
        for (emoji, users) in &self.reactions {
            reactions.insert(
                emoji.clone(),
                users.iter().map(|u| UserId::from(u.as_str())).collect(),
            );
        }
        Message {
            id: Uuid::from_u128(self.id),
            text: self.text.clone(),
            author_id: UserId::from(self.author.as_str()),
            author_name: self.name.clone(),
            created_at: self.created_at,
            reactions,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    history: Vec<ModelMessage>,
    /// Every accepted (user, time), never pruned.
    sends: Vec<(String, u64)>,
    reacts: Vec<(String, u64)>,
    /// The chat's time: the input time plus `skew`, the backward steps
    /// since the input time last reached the chat's.
    clock: u64,
    skew: u64,
    last_input_time: u64,
    next_id: u128,
    /// The position of the latest event: each accepted command is one more.
    head: u64,
    /// What the last command should have produced.
    outcome: Option<Result<Vec<Event>, ChatError>>,
    /// Every restriction ever set and not lifted, expired or not:
    /// (user, until in ms or a ban, reason, since in ms, position).
    restrictions: Vec<Restricted>,
    /// Slow mode's seconds (0: off).
    slow: u32,
    /// Every accepted post since slow mode's length last changed.
    slow_sends: Vec<(String, u64)>,
    /// Every moderation command applied.
    audit: Vec<AuditEntry>,
}

#[derive(Debug, Clone)]
enum Command {
    Send { text: String, name: Option<String> },
    React { target: u128, emoji: String },
    Moderate(Moderation),
}

/// A restriction in the model: user, until in ms (or a ban), reason,
/// since in ms, position.
type Restricted = (String, Option<u64>, Option<String>, u64, u64);

/// Who gives the moderator's orders.
const MODERATOR: &str = "mod";

#[derive(Debug, Clone)]
struct Step {
    user: String,
    now: u64,
    message_id: u128,
    command: Command,
}

/// The emojis the model knows, with their canonical forms; anything else is
/// not an emoji. Written out by hand so the model does not share the
/// implementation's emoji table.
fn canonical_emoji(s: &str) -> Option<&'static str> {
    match s {
        "👍" => Some("👍"),
        "🎉" => Some("🎉"),
        "😀" => Some("😀"),
        "❤" | "❤\u{fe0f}" => Some("❤\u{fe0f}"),
        _ => None,
    }
}

fn in_window(log: &[(String, u64)], user: &str, now: u64) -> usize {
    log.iter()
        .filter(|(u, t)| u == user && now.saturating_sub(*t) < WINDOW_MS)
        .count()
}

impl Model {
    fn send(&mut self, s: &Step, text: &str, name: Option<&str>) -> Result<Vec<Event>, ChatError> {
        if text.trim().is_empty() {
            return Err(ChatError::EmptyText);
        }
        if text.chars().count() > TEXT_MAX {
            return Err(ChatError::TextTooLong { max: TEXT_MAX });
        }
        if text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ChatError::ControlCharInText);
        }
        let name = name.unwrap_or("").trim();
        if name.chars().count() > NAME_MAX {
            return Err(ChatError::NameTooLong { max: NAME_MAX });
        }
        if name.chars().any(char::is_control) {
            return Err(ChatError::ControlCharInName);
        }
        // The default is not subject to the configured name limit.
        let name = if name.is_empty() { "Anonymous" } else { name };
        self.restricted(&s.user)?;
        if self.slow > 0
            && let Some(t) = self
                .slow_sends
                .iter()
                .filter(|(u, t)| {
                    *u == s.user && self.clock.saturating_sub(*t) < u64::from(self.slow) * 1000
                })
                .map(|(_, t)| *t)
                .max()
        {
            return Err(ChatError::SlowMode {
                seconds: self.slow,
                until: Until(Timestamp::from_unix_millis(t + u64::from(self.slow) * 1000)),
            });
        }
        if in_window(&self.sends, &s.user, self.clock) >= MSG_MAX as usize {
            return Err(ChatError::RateLimited {
                kind: RateKind::Messages,
                max: MSG_MAX,
                window: Window(WINDOW_MS),
            });
        }
        if self.history.iter().any(|m| m.id == s.message_id) {
            return Err(ChatError::DuplicateMessageId);
        }
        self.sends.push((s.user.clone(), self.clock));
        self.slow_sends.push((s.user.clone(), self.clock));
        let m = ModelMessage {
            id: s.message_id,
            text: text.to_owned(),
            author: s.user.clone(),
            name: name.to_owned(),
            created_at: (self.clock / 1000) as i64,
            reactions: vec![],
        };
        self.history.push(m.clone());
        let evicted = (self.history.len() > HISTORY).then(|| self.history.remove(0).to_message());
        Ok(vec![self.event(EventKind::MessagePosted {
            message: m.to_message(),
            evicted,
        })])
    }

    fn react(&mut self, s: &Step, target: u128, emoji: &str) -> Result<Vec<Event>, ChatError> {
        let emoji = canonical_emoji(emoji).ok_or(ChatError::NotAnEmoji)?;
        let Some(i) = self.history.iter().position(|m| m.id == target) else {
            return Err(ChatError::MessageNotFound);
        };
        self.restricted(&s.user)?;
        if in_window(&self.reacts, &s.user, self.clock) >= REACT_MAX as usize {
            return Err(ChatError::RateLimited {
                kind: RateKind::Reactions,
                max: REACT_MAX,
                window: Window(WINDOW_MS),
            });
        }
        let m = &mut self.history[i];
        let action = match m.reactions.iter().position(|(e, _)| e == emoji) {
            Some(e) => {
                let users = &mut m.reactions[e].1;
                if let Some(u) = users.iter().position(|u| *u == s.user) {
                    users.remove(u);
                    if users.is_empty() {
                        m.reactions.remove(e);
                    }
                    ReactionAction::Removed
                } else if users.len() >= REACTOR_MAX {
                    return Err(ChatError::TooManyReactors { max: REACTOR_MAX });
                } else {
                    users.push(s.user.clone());
                    ReactionAction::Added
                }
            }
            None if m.reactions.len() >= EMOJI_MAX => {
                return Err(ChatError::TooManyEmojis { max: EMOJI_MAX });
            }
            None => {
                m.reactions.push((emoji.to_owned(), vec![s.user.clone()]));
                ReactionAction::Added
            }
        };
        self.reacts.push((s.user.clone(), self.clock));
        let update = ReactionUpdated {
            message_id: Uuid::from_u128(target),
            emoji: emoji.to_owned(),
            user_id: UserId::from(s.user.as_str()),
            action,
            message: m.to_message(),
        };
        Ok(vec![self.event(EventKind::ReactionUpdated(update))])
    }

    /// The restriction in force on `user`, as its refusal.
    fn restricted(&self, user: &str) -> Result<(), ChatError> {
        match self.in_force().into_iter().find(|r| r.0 == user) {
            Some((_, Some(until), ..)) => Err(ChatError::TimedOut {
                until: Until(Timestamp::from_unix_millis(until)),
            }),
            Some((_, None, ..)) => Err(ChatError::Banned),
            None => Ok(()),
        }
    }

    /// The restrictions in force at the chat's time.
    fn in_force(&self) -> Vec<Restricted> {
        self.restrictions
            .iter()
            .filter(|r| r.1.is_none_or(|until| self.clock < until))
            .cloned()
            .collect()
    }

    fn moderate(&mut self, order: &Moderation) -> Result<Vec<Event>, ChatError> {
        let reason = match order {
            Moderation::RemoveMessage(r) => r.reason.clone(),
            Moderation::RestrictUser(r) => r.reason.clone(),
            Moderation::LiftRestriction(r) => r.reason.clone(),
            Moderation::SetRoom(_) => None,
        };
        if let Moderation::RestrictUser(r) = order {
            if matches!(r.term, Term::Seconds(s) if s == 0 || s > 366 * 86_400) {
                return Err(ChatError::BadTerm { max_days: 366 });
            }
            if r.purge == Purge::LastMinutes(0) {
                return Err(ChatError::EmptyPurge);
            }
        }
        if let Moderation::SetRoom(room) = order
            && room.slow_mode_seconds > 86_400
        {
            return Err(ChatError::SlowModeTooLong { max: 86_400 });
        }
        if let Some(reason) = &reason {
            if reason.chars().count() > 200 {
                return Err(ChatError::ReasonTooLong { max: 200 });
            }
            if reason
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                return Err(ChatError::ControlCharInReason);
            }
        }
        let mut events = Vec::new();
        let mut removed = Vec::new();
        match order {
            Moderation::RemoveMessage(r) => {
                let id = r.message_id.as_u128();
                let i = self
                    .history
                    .iter()
                    .position(|m| m.id == id)
                    .ok_or(ChatError::MessageNotFound)?;
                let message = self.history.remove(i).to_message();
                removed.push(message.id);
                events.push(self.event(EventKind::MessageRemoved {
                    message,
                    audit: None,
                }));
            }
            Moderation::RestrictUser(r) => {
                let since_ms = match r.purge {
                    Purge::None => None,
                    Purge::All => Some(0),
                    Purge::LastMinutes(m) => Some(self.clock.saturating_sub(u64::from(m) * 60_000)),
                };
                if let Some(since_ms) = since_ms {
                    let user = r.user_id.as_str();
                    while let Some(i) = self.history.iter().position(|m| {
                        m.author == user && m.created_at * 1000 >= (since_ms / 1000 * 1000) as i64
                    }) {
                        let message = self.history.remove(i).to_message();
                        removed.push(message.id);
                        events.push(self.event(EventKind::MessageRemoved {
                            message,
                            audit: None,
                        }));
                    }
                }
                let until = match r.term {
                    Term::Seconds(s) => Some(self.clock + s * 1000),
                    Term::Forever => None,
                };
                let user = r.user_id.as_str().to_owned();
                self.restrictions.retain(|x| x.0 != user);
                let position = self.head + 1;
                self.restrictions.push((
                    user.clone(),
                    until,
                    r.reason.clone(),
                    self.clock,
                    position,
                ));
                let held = Held {
                    until: until.map(Timestamp::from_unix_millis),
                    reason: r.reason.clone(),
                    by: UserId::from(MODERATOR),
                    since: Timestamp::from_unix_millis(self.clock),
                    position: Position(position),
                };
                events.push(self.event(EventKind::UserRestricted {
                    user: r.user_id.clone(),
                    held,
                    audit: None,
                }));
            }
            Moderation::LiftRestriction(r) => {
                if !self.in_force().iter().any(|x| x.0 == r.user_id.as_str()) {
                    return Err(ChatError::NotRestricted);
                }
                self.restrictions.retain(|x| x.0 != r.user_id.as_str());
                events.push(self.event(EventKind::RestrictionLifted {
                    user: r.user_id.clone(),
                    audit: None,
                }));
            }
            Moderation::SetRoom(room) => {
                if room.slow_mode_seconds != self.slow {
                    self.slow_sends.clear();
                }
                self.slow = room.slow_mode_seconds;
                events.push(self.event(EventKind::RoomUpdated {
                    room: *room,
                    audit: None,
                }));
            }
        }
        let entry = AuditEntry {
            position: Position(self.head),
            at: (self.clock / 1000) as i64,
            by: UserId::from(MODERATOR),
            command: order.clone(),
            removed,
        };
        // The order's last event carries its audit entry.
        match events.last_mut().map(|e| &mut e.kind) {
            Some(
                EventKind::MessageRemoved { audit, .. }
                | EventKind::UserRestricted { audit, .. }
                | EventKind::RestrictionLifted { audit, .. }
                | EventKind::RoomUpdated { audit, .. },
            ) => *audit = Some(Box::new(entry.clone())),
            other => panic!("an order's last event is moderation's: {other:?}"),
        }
        self.audit.push(entry);
        Ok(events)
    }

    /// The next event in the log.
    fn event(&mut self, kind: EventKind) -> Event {
        self.head += 1;
        Event {
            position: Position(self.head),
            kind,
        }
    }
}

struct ChatModel;

impl ReferenceStateMachine for ChatModel {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            clock: 0,
            last_input_time: 1_000_000,
            next_id: 1,
            ..Model::default()
        })
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let users = prop::sample::select(vec!["u1", "u2", "u3", "u4"]);
        // Mostly forward, sometimes a big jump, sometimes backwards.
        let dt = prop_oneof![
            6 => 0i64..2_000,
            1 => 5_000i64..25_000,
            1 => -3_000i64..0,
        ];
        // The next fresh id, or one already used (held or evicted).
        let fresh = state.next_id;
        let id = prop_oneof![9 => Just(fresh), 1 => 1..=fresh];
        let texts = prop::sample::select(vec![
            "",
            " ",
            "\n",
            "hi",
            "a\tb",
            "a\u{1}b",
            "a\rb",
            "six ch",
            "seven c",
            "éééééé",
            "ééééééé",
            "😀😀😀😀😀😀",
            "😀😀😀😀😀😀😀",
        ]);
        let names = prop::sample::select(vec![
            None,
            Some(""),
            Some("  "),
            Some("Bo"),
            Some(" Ada "),
            Some("abcd"),
            Some("abcde"),
            Some(" abcd "),
            Some("a\nb"),
            Some("éééé"),
        ]);
        let send = (texts, names).prop_map(|(t, n)| Command::Send {
            text: t.to_owned(),
            name: n.map(str::to_owned),
        });
        // Targets: mostly a held message, else any id ever issued, or one
        // never issued.
        let held: Vec<u128> = state.history.iter().map(|m| m.id).collect();
        let any_issued = 1..=fresh;
        let target = if held.is_empty() {
            prop_oneof![any_issued, Just(u128::MAX)].boxed()
        } else {
            prop_oneof![6 => prop::sample::select(held), 2 => any_issued, 1 => Just(u128::MAX)]
                .boxed()
        };
        let emojis =
            prop::sample::select(vec!["👍", "🎉", "😀", "❤", "❤\u{fe0f}", "x", "", "👍👍"]);
        let react = (target.clone(), emojis).prop_map(|(target, e)| Command::React {
            target,
            emoji: e.to_owned(),
        });
        let reasons = prop::sample::select(vec![
            None,
            Some("spam".to_owned()),
            Some("a\u{7}b".to_owned()),
            Some("x".repeat(200)),
            Some("x".repeat(201)),
        ]);
        let targets_user = prop::sample::select(vec!["u1", "u2", "u3", "u4"]);
        let remove = (target, reasons.clone()).prop_map(|(target, reason)| {
            Moderation::RemoveMessage(RemoveMessage {
                message_id: Uuid::from_u128(target),
                reason,
            })
        });
        let term = prop_oneof![
            4 => (1u64..30).prop_map(Term::Seconds),
            1 => Just(Term::Seconds(0)),
            1 => Just(Term::Seconds(366 * 86_400 + 1)),
            2 => Just(Term::Forever),
        ];
        let purge = prop_oneof![
            3 => Just(Purge::None),
            1 => Just(Purge::All),
            2 => (0u32..3).prop_map(Purge::LastMinutes),
        ];
        let restrict = (targets_user.clone(), term, purge, reasons.clone()).prop_map(
            |(user, term, purge, reason)| {
                Moderation::RestrictUser(RestrictUser {
                    user_id: UserId::from(user),
                    term,
                    purge,
                    reason,
                })
            },
        );
        let lift = (targets_user, reasons).prop_map(|(user, reason)| {
            Moderation::LiftRestriction(LiftRestriction {
                user_id: UserId::from(user),
                reason,
            })
        });
        let room = prop_oneof![Just(0u32), 1u32..5, Just(86_401)]
            .prop_map(|slow_mode_seconds| Moderation::SetRoom(Room { slow_mode_seconds }));
        let moderate = prop_oneof![3 => remove, 3 => restrict, 2 => lift, 2 => room]
            .prop_map(Command::Moderate);
        let last = state.last_input_time;
        (
            users,
            dt,
            id,
            prop_oneof![5 => send, 4 => react, 2 => moderate],
        )
            .prop_map(move |(user, dt, message_id, command)| Step {
                user: match command {
                    Command::Moderate(_) => MODERATOR.to_owned(),
                    _ => user.to_owned(),
                },
                now: last.saturating_add_signed(dt),
                message_id,
                command,
            })
            .boxed()
    }

    fn apply(mut state: Model, s: &Step) -> Model {
        state.last_input_time = s.now;
        if s.now >= state.clock {
            // The input time caught up with the chat's: no drift kept.
            state.skew = 0;
        } else if s.now + state.skew < state.clock {
            state.skew = state.clock - s.now;
        }
        state.clock = s.now + state.skew;
        if s.message_id == state.next_id {
            state.next_id += 1;
        }
        let outcome = match &s.command {
            Command::Send { text, name } => state.send(s, text, name.as_deref()),
            Command::React { target, emoji } => state.react(s, *target, emoji),
            Command::Moderate(order) => state.moderate(order),
        };
        state.outcome = Some(outcome);
        state
    }
}

struct ChatUnderTest;

impl StateMachineTest for ChatUnderTest {
    type SystemUnderTest = Chat;
    type Reference = ChatModel;

    fn init_test(_: &Model) -> Chat {
        Chat::new(config())
    }

    fn apply(mut chat: Chat, model: &Model, s: Step) -> Chat {
        let ctx = Context {
            user: UserId::from(s.user.as_str()),
            now: Timestamp::from_unix_millis(s.now),
            message_id: Uuid::from_u128(s.message_id),
        };
        let command: chat_core::Command = match s.command {
            Command::Send { text, name } => ClientFrame::SendMessage(SendMessage {
                text,
                author_name: name,
            })
            .into(),
            Command::React { target, emoji } => ClientFrame::AddReaction(AddReaction {
                message_id: Uuid::from_u128(target),
                emoji,
            })
            .into(),
            Command::Moderate(order) => order.into(),
        };
        let outcome = chat
            .handle(ctx, command)
            .map(|()| std::iter::from_fn(|| chat.poll_event()).collect::<Vec<_>>());
        // Compared through `Debug` too: `IndexMap`'s `==` ignores order, and
        // the order of emojis and users is part of the contract.
        assert_eq!(Some(&outcome), model.outcome.as_ref(), "outcome differs");
        assert_eq!(
            format!("{outcome:?}"),
            format!("{:?}", model.outcome.as_ref().expect("applied")),
            "outcome order differs"
        );
        assert!(chat.poll_event().is_none(), "no events left behind");
        chat
    }

    fn check_invariants(chat: &Chat, model: &Model) {
        let expected: Vec<Message> = model.history.iter().map(ModelMessage::to_message).collect();
        let actual: Vec<Message> = chat.history().iter().cloned().collect();
        assert_eq!(actual, expected, "history differs");
        assert_eq!(
            format!("{actual:?}"),
            format!("{expected:?}"),
            "history order differs"
        );
        assert!(chat.history().len() <= HISTORY);
        assert_eq!(chat.head(), Position(model.head), "head differs");
        for (i, m) in chat.history().iter().enumerate() {
            assert_eq!(chat.history().position(&m.id), Some(i));
            assert_eq!(chat.history().get(&m.id), Some(m));
            assert!(m.reactions.len() <= EMOJI_MAX);
            assert!(
                m.reactions
                    .values()
                    .all(|u| !u.is_empty() && u.len() <= REACTOR_MAX)
            );
        }
        let (senders, reactors) = chat.rate_limited_users();
        assert!(senders <= 4 && reactors <= 4);
        let restrictions: Vec<Restricted> = chat
            .restrictions()
            .map(|(user, held)| {
                (
                    user.to_string(),
                    held.until.map(Timestamp::as_millis),
                    held.reason.clone(),
                    held.since.as_millis(),
                    held.position.0,
                )
            })
            .collect();
        let mut expected = model.in_force();
        expected.sort();
        assert_eq!(restrictions, expected, "restrictions differ");
        assert_eq!(
            chat.room().slow_mode_seconds,
            model.slow,
            "slow mode differs"
        );
        let audit: Vec<&AuditEntry> = chat.audit().collect();
        let want: Vec<&AuditEntry> = model.audit.iter().collect();
        assert_eq!(audit, want, "audit trail differs");
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_shrink_iters: 4096,
        .. ProptestConfig::default()
    })]

    #[test]
    fn chat_agrees_with_the_reference_model(sequential 1..120 => ChatUnderTest);
}

/// Same commands, same order, same everything: two chats fed one random
/// log end in identical states with identical events.
#[test]
fn replaying_a_log_is_deterministic() {
    let log: Vec<(Context, ClientFrame)> = (0..500u64)
        .map(|i| {
            let ctx = Context {
                user: UserId::from(format!("u{}", i % 7).as_str()),
                now: Timestamp::from_unix_millis(1_000_000 + i * 397 % 5_000 + i * 50),
                message_id: Uuid::from_u128(u128::from(i) + 1),
            };
            let cmd = if i % 3 == 0 {
                ClientFrame::AddReaction(AddReaction {
                    message_id: Uuid::from_u128(u128::from(i / 2) + 1),
                    emoji: ["👍", "🎉", "❤"][(i / 3 % 3) as usize].to_owned(),
                })
            } else {
                ClientFrame::SendMessage(SendMessage {
                    text: format!("m{i}"),
                    author_name: None,
                })
            };
            (ctx, cmd)
        })
        .collect();
    let run = || {
        let mut chat = Chat::new(config());
        let mut trace = Vec::new();
        for (ctx, cmd) in log.clone() {
            trace.push(format!("{:?}", chat.handle(ctx, cmd)));
            while let Some(e) = chat.poll_event() {
                trace.push(format!("{e:?}"));
            }
        }
        (trace, chat.history().iter().cloned().collect::<Vec<_>>())
    };
    let (a, b) = (run(), run());
    assert!(a.0.len() > 500);
    assert_eq!(a, b);
}
