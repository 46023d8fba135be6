//! Moderation's rules, each shown once on a small chat (the model test in
//! `model.rs` checks them against a reference over random runs).

use chat_core::{Chat, ChatError, Command, Config, Context, EventKind, Timestamp, Until};
use chat_proto::{
    AddReaction, ClientFrame, LiftRestriction, Moderation, Position, Purge, RemoveMessage,
    RestrictUser, Room, SendMessage, ServerFrame, Term, UserId, Uuid,
};

const T0: u64 = 1_800_000_000_000;

struct Room1 {
    chat: Chat,
    next_id: u128,
}

impl Room1 {
    fn new() -> Self {
        Room1 {
            chat: Chat::new(Config::default()),
            next_id: 1,
        }
    }

    /// Applies `command` as `user` at `T0 + ms`; the events it made.
    fn at(
        &mut self,
        ms: u64,
        user: &str,
        command: impl Into<Command>,
    ) -> Result<Vec<EventKind>, ChatError> {
        let ctx = Context {
            user: user.into(),
            now: Timestamp::from_unix_millis(T0 + ms),
            message_id: Uuid::from_u128(self.next_id),
        };
        self.next_id += 1;
        self.chat.handle(ctx, command)?;
        Ok(std::iter::from_fn(|| self.chat.poll_event())
            .map(|e| e.kind)
            .collect())
    }

    fn say(&mut self, ms: u64, user: &str, text: &str) -> Result<Uuid, ChatError> {
        let id = Uuid::from_u128(self.next_id);
        self.at(
            ms,
            user,
            ClientFrame::SendMessage(SendMessage {
                text: text.into(),
                author_name: None,
            }),
        )?;
        Ok(id)
    }

    fn react(&mut self, ms: u64, user: &str, id: Uuid) -> Result<Vec<EventKind>, ChatError> {
        self.at(
            ms,
            user,
            ClientFrame::AddReaction(AddReaction {
                message_id: id,
                emoji: "👍".into(),
            }),
        )
    }

    fn texts(&self) -> Vec<&str> {
        self.chat
            .history()
            .iter()
            .map(|m| m.text.as_str())
            .collect()
    }
}

fn restrict(user: &str, term: Term, purge: Purge) -> Moderation {
    Moderation::RestrictUser(RestrictUser {
        user_id: user.into(),
        term,
        purge,
        reason: Some("spam".into()),
    })
}

#[test]
fn a_removed_message_leaves_history_with_its_own_position_and_takes_no_reactions() {
    let mut room = Room1::new();
    let a = room.say(0, "ann", "one").expect("posted");
    room.say(1, "bob", "two").expect("posted");
    let events = room
        .at(
            2,
            "moderator:alice",
            Moderation::RemoveMessage(RemoveMessage {
                message_id: a,
                reason: Some("off topic".into()),
            }),
        )
        .expect("removed");
    assert!(
        matches!(&events[..], [EventKind::MessageRemoved { message, audit: Some(_) }] if message.id == a)
    );
    assert_eq!(room.texts(), ["two"]);
    assert_eq!(
        room.chat.head(),
        Position(3),
        "positions are not renumbered"
    );
    assert_eq!(room.react(3, "bob", a), Err(ChatError::MessageNotFound));
    let again = Moderation::RemoveMessage(RemoveMessage {
        message_id: a,
        reason: None,
    });
    assert_eq!(
        room.at(4, "moderator:alice", again),
        Err(ChatError::MessageNotFound)
    );
    let audit: Vec<_> = room.chat.audit().collect();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].position, Position(3));
    assert_eq!(audit[0].by, UserId::from("moderator:alice"));
    assert_eq!(audit[0].removed, [a]);
}

#[test]
fn a_time_out_refuses_posts_and_reactions_until_it_ends_then_not() {
    let mut room = Room1::new();
    let m = room.say(0, "bob", "hello").expect("posted");
    room.at(
        1_000,
        "moderator:alice",
        restrict("ann", Term::Seconds(60), Purge::None),
    )
    .expect("restricted");
    let until = Until(Timestamp::from_unix_millis(T0 + 61_000));
    assert_eq!(
        room.say(2_000, "ann", "hi"),
        Err(ChatError::TimedOut { until })
    );
    assert_eq!(
        room.react(60_999, "ann", m),
        Err(ChatError::TimedOut { until })
    );
    assert_eq!(
        room.say(2_000, "ann", "hi").unwrap_err().to_string(),
        "You are timed out until 2027-01-15T08:01:01Z."
    );
    room.say(61_000, "ann", "back")
        .expect("the time-out has ended");
    assert_eq!(
        room.chat.restrictions().count(),
        0,
        "an ended time-out is not in force"
    );
}

#[test]
fn a_ban_lasts_until_lifted_and_a_lift_of_nobody_is_refused() {
    let mut room = Room1::new();
    room.at(
        0,
        "moderator:alice",
        restrict("ann", Term::Forever, Purge::None),
    )
    .expect("banned");
    assert_eq!(
        room.say(86_400_000 * 400, "ann", "hi"),
        Err(ChatError::Banned)
    );
    let lift = |user: &str| {
        Moderation::LiftRestriction(LiftRestriction {
            user_id: user.into(),
            reason: None,
        })
    };
    let events = room
        .at(86_400_000 * 400, "moderator:alice", lift("ann"))
        .expect("lifted");
    assert!(
        matches!(&events[..], [EventKind::RestrictionLifted { user, .. }] if user.as_str() == "ann")
    );
    room.say(86_400_000 * 400 + 1, "ann", "hi")
        .expect("may post again");
    assert_eq!(
        room.at(86_400_000 * 400 + 2, "moderator:alice", lift("ann")),
        Err(ChatError::NotRestricted)
    );
}

#[test]
fn a_purge_removes_the_users_messages_of_the_last_minutes_each_at_its_own_position() {
    let mut room = Room1::new();
    room.say(0, "ann", "old").expect("posted");
    room.say(1_000, "bob", "bob's").expect("posted");
    let recent = room.say(200_000, "ann", "recent").expect("posted");
    let events = room
        .at(
            230_000,
            "moderator:alice",
            restrict("ann", Term::Seconds(10), Purge::LastMinutes(1)),
        )
        .expect("restricted");
    assert_eq!(room.texts(), ["old", "bob's"]);
    match &events[..] {
        [
            EventKind::MessageRemoved {
                message,
                audit: None,
            },
            EventKind::UserRestricted {
                user,
                held,
                audit: Some(audit),
            },
        ] => {
            assert_eq!(message.id, recent);
            assert_eq!(user.as_str(), "ann");
            assert_eq!(held.position, Position(5), "the restriction's own position");
            assert_eq!(audit.position, Position(5));
            assert_eq!(audit.removed, [recent]);
        }
        other => panic!("{other:?}"),
    }
    room.at(
        241_000,
        "moderator:alice",
        restrict("ann", Term::Seconds(10), Purge::All),
    )
    .expect("restricted again");
    assert_eq!(room.texts(), ["bob's"]);
}

#[test]
fn slow_mode_refuses_a_second_post_within_its_seconds_but_not_reactions() {
    let mut room = Room1::new();
    let events = room
        .at(
            0,
            "moderator:alice",
            Moderation::SetRoom(Room {
                slow_mode_seconds: 30,
            }),
        )
        .expect("set");
    let frame = room.chat.snapshot();
    assert_eq!(frame.moderation.room.slow_mode_seconds, 30);
    assert!(matches!(
        events[..],
        [EventKind::RoomUpdated {
            room: Room {
                slow_mode_seconds: 30
            },
            audit: Some(_)
        }]
    ));
    let m = room.say(1_000, "ann", "one").expect("first");
    let refusal = room.say(2_000, "ann", "two").unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "Slow mode is on: one message every 30 seconds. You may post again at 2027-01-15T08:00:31Z."
    );
    room.react(2_000, "ann", m)
        .expect("reactions are not slowed");
    room.say(2_000, "bob", "bob's").expect("another user");
    room.say(31_000, "ann", "two")
        .expect("the window has passed");
    room.at(
        31_500,
        "moderator:alice",
        Moderation::SetRoom(Room {
            slow_mode_seconds: 0,
        }),
    )
    .expect("off");
    room.say(32_000, "ann", "three").expect("slow mode is off");
}

#[test]
fn a_restricted_users_bad_text_gets_the_same_refusal_the_node_gives_alone() {
    // Config::check answers alike in any state: a restriction comes after
    // the checks that need none.
    let mut room = Room1::new();
    room.at(
        0,
        "moderator:alice",
        restrict("ann", Term::Forever, Purge::None),
    )
    .expect("banned");
    let empty = ClientFrame::SendMessage(SendMessage {
        text: " ".into(),
        author_name: None,
    });
    assert_eq!(
        room.chat.config().check(&empty.clone().into()),
        Err(ChatError::EmptyText)
    );
    assert_eq!(room.at(1, "ann", empty), Err(ChatError::EmptyText));
    assert_eq!(
        room.chat
            .moderated(&"ann".into(), Timestamp::from_unix_millis(T0 + 2), true),
        Err(ChatError::Banned)
    );
}

#[test]
fn moderation_frames_are_for_clients_that_opted_in() {
    let mut room = Room1::new();
    let a = room.say(0, "ann", "one").expect("posted");
    room.at(
        1,
        "moderator:alice",
        Moderation::RemoveMessage(RemoveMessage {
            message_id: a,
            reason: None,
        }),
    )
    .expect("removed");
    // Through events with positions, as an embedder sees them.
    let mut chat = Chat::new(Config::default());
    let ctx = |i: u128| Context {
        user: "ann".into(),
        now: Timestamp::from_unix_millis(T0),
        message_id: Uuid::from_u128(i),
    };
    chat.handle(
        ctx(1),
        ClientFrame::SendMessage(SendMessage {
            text: "x".into(),
            author_name: None,
        }),
    )
    .expect("posted");
    let posted = chat.poll_event().expect("event");
    assert!(posted.for_every_client());
    chat.handle(
        ctx(2),
        Moderation::RemoveMessage(RemoveMessage {
            message_id: Uuid::from_u128(1),
            reason: None,
        }),
    )
    .expect("removed");
    let removed = chat.poll_event().expect("event");
    assert!(!removed.for_every_client());
    assert!(
        matches!(removed.frame(), ServerFrame::MessageRemoved(m) if m.message_id == Uuid::from_u128(1))
    );
}

#[test]
fn a_chat_restored_from_a_store_keeps_its_restrictions_and_audit_trail() {
    let mut room = Room1::new();
    room.say(0, "bob", "kept").expect("posted");
    room.at(
        1,
        "moderator:alice",
        restrict("ann", Term::Forever, Purge::None),
    )
    .expect("banned");
    room.at(
        2,
        "moderator:alice",
        Moderation::SetRoom(Room {
            slow_mode_seconds: 5,
        }),
    )
    .expect("set");
    let messages: Vec<_> = room.chat.history().iter().cloned().collect();
    let kept = room.chat.moderation();
    let (mut restored, _) = Chat::restore(Config::default(), messages, room.chat.head());
    restored.restore_moderation(kept);
    assert_eq!(restored.audit().count(), 2);
    assert_eq!(restored.room().slow_mode_seconds, 5);
    let ctx = Context {
        user: "ann".into(),
        now: Timestamp::from_unix_millis(T0 + 10),
        message_id: Uuid::from_u128(99),
    };
    let say = ClientFrame::SendMessage(SendMessage {
        text: "hi".into(),
        author_name: None,
    });
    assert_eq!(restored.handle(ctx, say), Err(ChatError::Banned));
}
