//! Model-based property test: a deliberately simple reference model (plain
//! `Vec`s, linear scans, every timestamp kept) runs beside the real
//! [`Chat`] over random command sequences. After every step the outcome
//! (events or refusal) and the whole history must agree.
//!
//! The limits are tiny so that random runs reach every edge: full history,
//! rate limits, the emoji and reactor caps, evicted ids, a clock that jumps
//! forwards and sometimes backwards, and reused message ids.

use chat_core::{
    Chat, ChatError, Config, Context, Event, EventKind, RateKind, RateLimit, Timestamp, Window,
};
use chat_proto::{
    AddReaction, ClientFrame, Message, Position, ReactionAction, ReactionUpdated, Reactions,
    SendMessage, UserId, Uuid,
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
}

#[derive(Debug, Clone)]
enum Command {
    Send { text: String, name: Option<String> },
    React { target: u128, emoji: String },
}

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
        let react = (target, emojis).prop_map(|(target, e)| Command::React {
            target,
            emoji: e.to_owned(),
        });
        let last = state.last_input_time;
        (users, dt, id, prop_oneof![send, react])
            .prop_map(move |(user, dt, message_id, command)| Step {
                user: user.to_owned(),
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
        let command = match s.command {
            Command::Send { text, name } => ClientFrame::SendMessage(SendMessage {
                text,
                author_name: name,
            }),
            Command::React { target, emoji } => ClientFrame::AddReaction(AddReaction {
                message_id: Uuid::from_u128(target),
                emoji,
            }),
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
