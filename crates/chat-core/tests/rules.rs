//! Every rule of the chat, through the public API, with its edges.

use chat_core::{Chat, ChatError, Config, Context, Event, EventKind, RateLimit, Timestamp};
use chat_proto::{
    AddReaction, ClientFrame, Message, Position, ReactionAction, SendMessage, ServerFrame, UserId,
    Uuid,
};
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;

/// Drives a chat with ids 1, 2, 3… and an explicit clock.
struct Harness {
    chat: Chat,
    next_id: u128,
    now: u64,
}

impl Harness {
    fn new(config: Config) -> Self {
        Harness {
            chat: Chat::new(config),
            next_id: 1,
            now: T0,
        }
    }

    fn ctx(&mut self, user: &str) -> Context {
        let id = Uuid::from_u128(self.next_id);
        self.next_id += 1;
        Context {
            user: user.into(),
            now: Timestamp::from_unix_millis(self.now),
            message_id: id,
        }
    }

    fn send(&mut self, user: &str, text: &str) -> Result<Vec<Event>, ChatError> {
        self.send_named(user, text, None)
    }

    fn send_named(
        &mut self,
        user: &str,
        text: &str,
        name: Option<&str>,
    ) -> Result<Vec<Event>, ChatError> {
        let ctx = self.ctx(user);
        let cmd = ClientFrame::SendMessage(SendMessage {
            text: text.into(),
            author_name: name.map(Into::into),
        });
        self.chat.handle(ctx, cmd)?;
        Ok(self.drain())
    }

    fn react(&mut self, user: &str, id: Uuid, emoji: &str) -> Result<Vec<Event>, ChatError> {
        let ctx = self.ctx(user);
        let cmd = ClientFrame::AddReaction(AddReaction {
            message_id: id,
            emoji: emoji.into(),
        });
        self.chat.handle(ctx, cmd)?;
        Ok(self.drain())
    }

    fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.chat.poll_event()).collect()
    }

    fn posted(&mut self, user: &str, text: &str) -> Message {
        match self.send(user, text).expect("accepted").remove(0).kind {
            EventKind::MessagePosted { message, .. } => message,
            other => panic!("expected a posted message, got {other:?}"),
        }
    }
}

fn reactors(m: &Message, emoji: &str) -> Vec<String> {
    m.reactions
        .get(emoji)
        .map(|users| users.iter().map(|u| u.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn a_message_is_appended_and_its_event_carries_it_whole() {
    let mut h = Harness::new(Config::default());
    let events = h.send_named("u1", "hello", Some(" Ada ")).expect("ok");
    let expected = Message {
        id: Uuid::from_u128(1),
        text: "hello".into(),
        author_id: UserId::from("u1"),
        author_name: "Ada".into(),
        created_at: (T0 / 1000) as i64,
        reactions: Default::default(),
    };
    let posted = EventKind::MessagePosted {
        message: expected.clone(),
        evicted: None,
    };
    assert_eq!(
        events,
        vec![Event {
            position: Position(1),
            kind: posted
        }]
    );
    assert_eq!(h.chat.history().iter().collect::<Vec<_>>(), vec![&expected]);
    assert_eq!(h.chat.history().get(&expected.id), Some(&expected));
}

#[test]
fn missing_null_or_blank_name_is_anonymous() {
    let mut h = Harness::new(Config::default());
    for name in [None, Some(""), Some("  \t ")] {
        let m = match h.send_named("u", "x", name).expect("ok").remove(0).kind {
            EventKind::MessagePosted { message, .. } => message,
            e => panic!("{e:?}"),
        };
        assert_eq!(m.author_name, "Anonymous");
    }
}

#[test]
fn text_rules_and_their_wire_texts() {
    let mut h = Harness::new(Config::default());
    let cases: [(&str, String, &str); 5] = [
        ("empty", String::new(), "message text cannot be empty"),
        ("blank", " \n ".into(), "message text cannot be empty"),
        (
            "501 ascii",
            "a".repeat(501),
            "message too long (max 500 characters)",
        ),
        (
            "501 emoji",
            "🎉".repeat(501),
            "message too long (max 500 characters)",
        ),
        (
            "escape",
            "\u{1b}[2J".into(),
            "message text contains control characters",
        ),
    ];
    for (what, text, wire) in cases {
        let err = h.send("u", &text).expect_err(what);
        assert_eq!(err.to_string(), wire, "{what}");
    }
    assert!(h.chat.history().is_empty(), "refusals change nothing");
    h.send("u", &"a".repeat(500)).expect("exactly 500");
    h.send("u", &"🎉".repeat(500))
        .expect("500 multi-byte characters");
    h.send("u", "tab\tand\nnewline").expect("tab and newline");
    assert_eq!(h.chat.history().len(), 3);
}

#[test]
fn name_rules() {
    let mut h = Harness::new(Config::default());
    let err = h
        .send_named("u", "x", Some(&"n".repeat(51)))
        .expect_err("51");
    assert_eq!(err.to_string(), "author name too long (max 50 characters)");
    h.send_named("u", "x", Some(&"n".repeat(50))).expect("50");
    let err = h.send_named("u", "x", Some("a\u{0}")).expect_err("nul");
    assert_eq!(err, ChatError::ControlCharInName);
}

#[test]
fn reaction_toggles_and_reports_the_full_message() {
    let mut h = Harness::new(Config::default());
    let m = h.posted("author", "hi");
    let events = h.react("u1", m.id, "👍").expect("add");
    let EventKind::ReactionUpdated(up) = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(up.action, ReactionAction::Added);
    assert_eq!(up.user_id, UserId::from("u1"));
    assert_eq!(up.message_id, m.id);
    assert_eq!(up.emoji, "👍");
    assert_eq!(up.message.text, "hi");
    assert_eq!(reactors(&up.message, "👍"), ["u1"]);
    assert_eq!(&up.message, h.chat.history().get(&m.id).expect("held"));

    let events = h.react("u1", m.id, "👍").expect("remove");
    let EventKind::ReactionUpdated(up) = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(up.action, ReactionAction::Removed);
    assert!(
        up.message.reactions.is_empty(),
        "an emoji with no users disappears"
    );
}

#[test]
fn reaction_order_is_deterministic() {
    let mut h = Harness::new(Config::default());
    let m = h.posted("a", "hi");
    h.react("u2", m.id, "🎉").expect("ok");
    h.react("u1", m.id, "👍").expect("ok");
    h.react("u3", m.id, "🎉").expect("ok");
    h.react("u1", m.id, "🎉").expect("ok");
    h.react("u3", m.id, "🎉").expect("toggle off u3");
    h.react("u3", m.id, "🎉").expect("u3 back, now last");
    let msg = h.chat.history().get(&m.id).expect("held").clone();
    assert_eq!(reactors(&msg, "🎉"), ["u2", "u1", "u3"]);
    let json = ServerFrame::Message(msg).encode();
    assert!(
        json.contains(r#""reactions":{"🎉":["u2","u1","u3"],"👍":["u1"]}"#),
        "{json}"
    );
    // Removing the first emoji keeps the order of the rest.
    h.react("u2", m.id, "🎉").expect("ok");
    h.react("u1", m.id, "🎉").expect("ok");
    h.react("u3", m.id, "🎉").expect("ok");
    h.react("u9", m.id, "🎉").expect("ok");
    let msg = h.chat.history().get(&m.id).expect("held");
    let emojis: Vec<&String> = msg.reactions.keys().collect();
    assert_eq!(emojis, ["👍", "🎉"]);
}

#[test]
fn emoji_forms_are_one_reaction() {
    let mut h = Harness::new(Config::default());
    let m = h.posted("a", "hi");
    h.react("u1", m.id, "❤").expect("text form");
    let events = h.react("u1", m.id, "❤️").expect("emoji form");
    let EventKind::ReactionUpdated(up) = &events[0].kind else {
        panic!()
    };
    assert_eq!(up.action, ReactionAction::Removed);
    assert_eq!(up.emoji, "❤️");
}

#[test]
fn reaction_refusals() {
    let cfg = Config {
        max_emojis_per_message: 2,
        max_reactors_per_emoji: 2,
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    let m = h.posted("a", "hi");
    assert_eq!(
        h.react("u", Uuid::from_u128(999), "👍")
            .expect_err("missing")
            .to_string(),
        "message not found"
    );
    assert_eq!(
        h.react("u", m.id, "ok").expect_err("not emoji").to_string(),
        "emoji must be a single emoji"
    );
    assert_eq!(
        h.react("u", m.id, "👍👍").expect_err("two").to_string(),
        "emoji must be a single emoji"
    );
    h.react("u", m.id, "👍").expect("1st emoji");
    h.react("u", m.id, "🎉").expect("2nd emoji");
    assert_eq!(
        h.react("u", m.id, "😀").expect_err("3rd").to_string(),
        "too many different reactions on this message (max 2)"
    );
    h.react("v", m.id, "👍").expect("2nd user");
    assert_eq!(
        h.react("w", m.id, "👍").expect_err("3rd user").to_string(),
        "too many users reacted with this emoji (max 2)"
    );
    h.react("v", m.id, "👍")
        .expect("removing is always allowed");
}

#[test]
fn sixtieth_message_passes_and_sixty_first_is_refused() {
    let mut h = Harness::new(Config::default());
    for i in 0..60 {
        h.send("u", &format!("m{i}"))
            .unwrap_or_else(|e| panic!("message {} refused: {e}", i + 1));
        h.now += 500; // 60 messages over 29.5 s
    }
    let err = h.send("u", "m61").expect_err("61st");
    assert_eq!(
        err.to_string(),
        "Rate limit exceeded. Maximum 60 messages per minute."
    );
    h.send("other", "hi").expect("other users are not limited");
}

#[test]
fn the_window_slides() {
    let mut h = Harness::new(Config::default());
    let start = h.now;
    for _ in 0..60 {
        h.send("u", "x").expect("ok");
    }
    h.now = start + 59_999;
    h.send("u", "x").expect_err("1 ms early");
    h.now = start + 60_000;
    h.send("u", "x").expect("the first 60 left the window");
    h.send("u", "x").expect("all 60 were at the same instant");
    // 62 sent, the last two at start + 60 s: 58 more fit.
    for _ in 0..58 {
        h.send("u", "x").expect("ok");
    }
    h.send("u", "x").expect_err("full again");
}

#[test]
fn refused_attempts_do_not_use_the_allowance() {
    let cfg = Config {
        message_rate: RateLimit::per_minute(2),
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    h.send("u", "").expect_err("empty");
    h.send("u", "a").expect("1");
    h.send("u", "b").expect("2");
    for _ in 0..10 {
        h.send("u", "c").expect_err("limited");
    }
    h.now += 60_000;
    h.send("u", "d").expect("refusals did not extend the limit");
}

#[test]
fn reactions_have_their_own_limit_and_text() {
    let cfg = Config {
        reaction_rate: RateLimit {
            max: 3,
            window: Duration::from_secs(10),
        },
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    let m = h.posted("u", "hi");
    for _ in 0..3 {
        h.react("u", m.id, "👍").expect("within limit");
    }
    assert_eq!(
        h.react("u", m.id, "👍").expect_err("4th").to_string(),
        "Rate limit exceeded. Maximum 3 reactions per 10 seconds."
    );
    h.send("u", "messages are limited separately").expect("ok");
    h.react("u", Uuid::from_u128(12345), "👍")
        .expect_err("not found");
    h.now += 10_000;
    h.react("u", m.id, "👍").expect("window slid");
}

#[test]
fn default_reaction_limit_text() {
    let mut h = Harness::new(Config::default());
    let m = h.posted("u", "hi");
    for _ in 0..60 {
        h.react("u", m.id, "👍").expect("ok");
    }
    assert_eq!(
        h.react("u", m.id, "👍").expect_err("61st").to_string(),
        "Rate limit exceeded. Maximum 60 reactions per minute."
    );
}

#[test]
fn history_is_bounded_and_eviction_is_an_event() {
    let cfg = Config {
        history_limit: 3,
        message_rate: RateLimit::per_minute(1000),
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    let first = h.posted("u", "1");
    h.send("u", "2").expect("ok");
    h.send("u", "3").expect("ok");
    let events = h.send("u", "4").expect("ok");
    assert_eq!(events.len(), 1, "one command, one event");
    assert_eq!(events[0].position, Position(4));
    let EventKind::MessagePosted { message, evicted } = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(message.text, "4");
    assert_eq!(evicted.as_ref().map(|m| m.id), Some(first.id));
    assert_eq!(
        events[0].frame(),
        ServerFrame::Message(message.clone()),
        "the frame is the new message; the eviction is not broadcast"
    );
    let texts: Vec<&str> = h.chat.history().iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["2", "3", "4"]);
    assert!(h.chat.history().get(&first.id).is_none());
    assert_eq!(h.chat.history().position(&Uuid::from_u128(4)), Some(2));
    h.react("u", first.id, "👍")
        .expect_err("evicted is not found");
}

#[test]
fn time_never_runs_backwards() {
    let mut h = Harness::new(Config::default());
    h.send("u", "a").expect("ok");
    h.now -= 5_000;
    let m = h.posted("u", "b");
    assert_eq!(m.created_at, (T0 / 1000) as i64);
    h.now += 2_000;
    let m = h.posted("u", "c");
    assert_eq!(
        m.created_at,
        (T0 / 1000) as i64 + 2,
        "and goes on from there"
    );
}

const HOUR: u64 = 3_600_000;

#[test]
fn a_clock_stepped_back_an_hour_neither_freezes_time_nor_loosens_the_limit() {
    let mut h = Harness::new(Config::default());
    // 60 messages, one a second.
    for i in 0..60 {
        h.send("u", &format!("m{i}")).expect("within the limit");
        h.now += 1_000;
    }
    // The 61st comes right after the 60th in real time, but the embedder's
    // clock has just been set back an hour.
    h.now -= 1_000 + HOUR;
    let newest = h.chat.history().iter().last().expect("held").created_at;
    h.send("u", "61st")
        .expect_err("still 60 in the last minute of real time");
    // One real second later the first message leaves the window: the
    // limit neither stayed shut for the hour nor opened early.
    h.now += 1_000;
    let m = h.posted("u", "a second later");
    assert_eq!(m.created_at, newest + 1, "time went on, a second later");
    h.send("u", "62nd").expect_err("60 in the window again");
    // And a minute after that, 60 more, each a second apart.
    h.now += 60_000;
    for i in 0..60 {
        let m = h.posted("u", &format!("n{i}"));
        assert!(m.created_at > newest, "never backwards");
        h.now += 1_000;
    }
}

#[test]
fn a_clock_stepped_back_and_set_right_again_keeps_no_drift() {
    let mut h = Harness::new(Config::default());
    let start = h.now;
    h.posted("u", "at the start");
    // Ten seconds back: the chat's time goes on from where it was...
    h.now -= 10_000;
    for i in 0..5 {
        h.now += 1_000;
        let m = h.posted("u", &format!("behind {i}"));
        assert_eq!(m.created_at, (start / 1000 + i) as i64, "at the real pace");
    }
    // ...and once the clock is set right (it reads the chat's time or
    // later), the chat's time is the clock's again: no drift is kept,
    // however many steps there were.
    for step in 0..3 {
        h.now = start + 5_000 + step * 20_000;
        let m = h.posted("u", &format!("set right {step}"));
        assert_eq!(m.created_at, (h.now / 1000) as i64, "step {step}");
        h.now -= 10_000;
        h.posted("u", &format!("behind again {step}"));
    }
    // Never backwards, throughout.
    let times: Vec<i64> = h.chat.history().iter().map(|m| m.created_at).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn a_chat_restored_from_a_future_time_goes_on_from_it() {
    // An earlier run stored messages an hour ahead of this host's clock.
    let mut earlier = Harness::new(Config::default());
    earlier.now = T0 + HOUR;
    for i in 0..3 {
        earlier.send("u", &format!("m{i}")).expect("ok");
    }
    let stored: Vec<Message> = earlier.chat.history().iter().cloned().collect();
    let newest = stored[2].created_at;
    let (chat, _) = Chat::restore(Config::default(), stored, earlier.chat.head());
    let mut h = Harness {
        chat,
        next_id: 100,
        now: T0,
    };
    for i in 0..60 {
        let m = h.posted("v", &format!("v{i}"));
        assert!(m.created_at >= newest, "never backwards");
        h.now += 500;
    }
    h.send("v", "61st").expect_err("60 in 29.5 s");
    // 30.5 s later (60 s after the first), the window has moved on: the
    // chat's time did not stand still for the hour.
    h.now += 30_000;
    let m = h.posted("v", "a minute after the first");
    assert_eq!(m.created_at, newest + 60, "a minute of real time later");
}

#[test]
fn duplicate_ids_are_refused() {
    let mut chat = Chat::new(Config::default());
    let ctx = Context {
        user: "u".into(),
        now: Timestamp::from_unix_millis(T0),
        message_id: Uuid::from_u128(1),
    };
    let cmd = ClientFrame::SendMessage(SendMessage {
        text: "x".into(),
        author_name: None,
    });
    chat.handle(ctx.clone(), cmd.clone()).expect("first");
    assert_eq!(chat.handle(ctx, cmd), Err(ChatError::DuplicateMessageId));
    assert_eq!(chat.history().len(), 1);
}

#[test]
fn context_is_a_replayable_record() {
    let ctx = Context {
        user: "u".into(),
        now: Timestamp::from_unix_millis(T0),
        message_id: Uuid::from_u128(1),
    };
    let json = serde_json::to_string(&ctx).expect("serialize");
    assert_eq!(
        serde_json::from_str::<Context>(&json).expect("deserialize"),
        ctx
    );
}

#[test]
fn restore_rebuilds_the_same_history_and_continues() {
    let cfg = Config {
        history_limit: 5,
        ..Config::default()
    };
    let mut h = Harness::new(cfg.clone());
    for i in 0..7 {
        h.send("u", &format!("m{i}")).expect("ok");
    }
    let m = h.chat.history().iter().next().expect("held").id;
    h.react("v", m, "👍").expect("ok");
    h.react("w", m, "🎉").expect("ok");
    let stored: Vec<Message> = h.chat.history().iter().cloned().collect();
    let (mut restored, dropped) = Chat::restore(cfg.clone(), stored.clone(), h.chat.head());
    assert!(dropped.is_empty());
    assert_eq!(restored.head(), Position(9), "7 posts and 2 toggles");
    let again: Vec<Message> = restored.history().iter().cloned().collect();
    assert_eq!(
        format!("{again:?}"),
        format!("{stored:?}"),
        "same order, same reactions"
    );
    // The log goes on where it stopped.
    let ctx = Context {
        user: "v".into(),
        now: Timestamp::from_unix_millis(T0),
        message_id: Uuid::from_u128(1000),
    };
    let next = ClientFrame::SendMessage(SendMessage {
        text: "next".into(),
        author_name: None,
    });
    restored.handle(ctx, next).expect("ok");
    assert_eq!(
        restored.poll_event().map(|e| e.position),
        Some(Position(10))
    );

    // A lower limit drops the oldest and says which.
    let smaller = Config {
        history_limit: 2,
        ..cfg
    };
    let (restored, dropped) = Chat::restore(smaller, stored.clone(), Position(9));
    assert_eq!(restored.history().len(), 2);
    assert_eq!(dropped.len(), 3);
    assert_eq!(dropped[0].id, stored[0].id);

    // Time resumes from the newest message: it never runs backwards.
    let (mut restored, _) = Chat::restore(Config::default(), stored.clone(), Position(9));
    let ctx = Context {
        user: "u".into(),
        now: Timestamp::from_unix_millis(0),
        message_id: Uuid::from_u128(999),
    };
    restored
        .handle(
            ctx,
            ClientFrame::SendMessage(SendMessage {
                text: "after".into(),
                author_name: None,
            }),
        )
        .expect("ok");
    let last = restored.history().iter().last().expect("held");
    assert_eq!(last.created_at, stored.last().expect("held").created_at);
}

#[test]
fn check_refuses_exactly_what_handle_refuses_whatever_the_state() {
    let mut h = Harness::new(Config {
        message_rate: RateLimit::per_minute(1),
        ..Config::default()
    });
    let posted = h.posted("u", "first");
    let commands = [
        ClientFrame::SendMessage(SendMessage {
            text: String::new(),
            author_name: None,
        }),
        ClientFrame::SendMessage(SendMessage {
            text: "x".repeat(501),
            author_name: None,
        }),
        ClientFrame::SendMessage(SendMessage {
            text: "ok".into(),
            author_name: Some("n".repeat(51)),
        }),
        ClientFrame::AddReaction(AddReaction {
            message_id: posted.id,
            emoji: "not an emoji".into(),
        }),
    ];
    for command in commands {
        let checked = h
            .chat
            .config()
            .check(&command.clone().into())
            .expect_err("refused alone");
        // `u` is over its limit and the message exists: the command's own
        // fault still comes first.
        let ctx = h.ctx("u");
        assert_eq!(h.chat.handle(ctx, command), Err(checked));
    }
    // What only the state refuses passes the check.
    let over_the_limit = ClientFrame::SendMessage(SendMessage {
        text: "second".into(),
        author_name: None,
    });
    assert_eq!(
        h.chat.config().check(&over_the_limit.clone().into()),
        Ok(())
    );
    let ctx = h.ctx("u");
    assert!(h.chat.handle(ctx, over_the_limit).is_err());
    let missing = ClientFrame::AddReaction(AddReaction {
        message_id: Uuid::from_u128(999_999),
        emoji: "👍".into(),
    });
    assert_eq!(h.chat.config().check(&missing.clone().into()), Ok(()));
}
