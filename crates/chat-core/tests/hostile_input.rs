//! Whatever a client sends, decoding and then handling it never panics, and
//! every refusal has a wire text.

use chat_core::{Chat, ChatError, Config, Context, Event, EventKind, Timestamp};
use chat_proto::{ClientFrame, UserId, Uuid};
use proptest::prelude::*;
use serde_json::{Value, json};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        Just(json!("send_message")),
        Just(json!("add_reaction")),
        Just(json!("👍")),
        Just(json!("00000000-0000-0000-0000-000000000001")),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("type".to_owned()),
            Just("data".to_owned()),
            Just("text".to_owned()),
            Just("author_name".to_owned()),
            Just("message_id".to_owned()),
            Just("emoji".to_owned()),
            "[a-z]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames with the right outer shape and random insides: these reach the
/// core far more often than fully random JSON does.
fn near_frames() -> impl Strategy<Value = Value> {
    let send = (any_json(), any_json()).prop_map(
        |(text, name)| json!({"type": "send_message", "data": {"text": text, "author_name": name}}),
    );
    let send_str = (".{0,600}", proptest::option::of(".{0,60}")).prop_map(
        |(text, name)| json!({"type": "send_message", "data": {"text": text, "author_name": name}}),
    );
    let emoji = prop_oneof![
        ".{0,12}",
        prop::sample::select(vec!["👍", "🎉", "❤", "❤\u{fe0f}", "👍🏽"]).prop_map(String::from),
    ];
    // Plausible posts, so that reactions find messages to act on.
    let plain =
        "[a-z ]{1,20}".prop_map(|text| json!({"type": "send_message", "data": {"text": text}}));
    let react = (0u128..6, emoji).prop_map(|(id, emoji)| {
        json!({"type": "add_reaction", "data": {"message_id": Uuid::from_u128(id), "emoji": emoji}})
    });
    prop_oneof![send, send_str, plain, react, any_json()]
}

/// Feeds one text frame through the decoder and the chat, as the server
/// does, and checks what came out: a refusal changes nothing and is a
/// client's refusal with its wire text; an acceptance emits exactly the
/// events its command means, within every rule.
fn run(chat: &mut Chat, i: u64, text: &str) {
    let ctx = Context {
        user: UserId::from(format!("u{}", i % 3).as_str()),
        now: Timestamp::from_unix_millis(i * 100),
        message_id: Uuid::from_u128(u128::from(i)),
    };
    let before = format!("{:?}", chat.history().iter().collect::<Vec<_>>());
    let frame = match ClientFrame::decode(text) {
        Ok(frame) => frame,
        Err(e) => {
            assert!(e.to_string().starts_with("Invalid message format"), "{e}");
            return;
        }
    };
    match chat.handle(ctx.clone(), frame.clone()) {
        Err(e) => {
            assert_ne!(e, ChatError::DuplicateMessageId, "every id is fresh");
            assert_eq!(chat.poll_event(), None, "a refusal emits nothing");
            let after = format!("{:?}", chat.history().iter().collect::<Vec<_>>());
            assert_eq!(after, before, "a refusal changes nothing");
        }
        Ok(()) => {
            let head = chat.head();
            let events: Vec<Event> = std::iter::from_fn(|| chat.poll_event()).collect();
            assert_eq!(events.len(), 1, "one command, one event");
            assert_eq!(events[0].position, head, "at the head");
            match (&frame, events.first().map(|e| &e.kind)) {
                (
                    ClientFrame::SendMessage(m),
                    Some(EventKind::MessagePosted {
                        message: posted, ..
                    }),
                ) => {
                    assert_eq!(posted.id, ctx.message_id);
                    assert_eq!(posted.text, m.text);
                    assert_eq!(posted.author_id, ctx.user);
                    assert!(!posted.text.trim().is_empty());
                    assert!(posted.text.chars().count() <= chat.config().max_text_chars);
                    let name = posted.author_name.chars().count();
                    assert!((1..=chat.config().max_author_name_chars).contains(&name));
                }
                (ClientFrame::AddReaction(r), Some(EventKind::ReactionUpdated(update))) => {
                    assert_eq!(update.message_id, r.message_id);
                    assert_eq!(update.user_id, ctx.user);
                    let held = chat
                        .history()
                        .get(&r.message_id)
                        .expect("the message is held");
                    assert_eq!(
                        &update.message, held,
                        "the update carries the message as it is"
                    );
                }
                (frame, first) => panic!("{frame:?} was accepted with {first:?}"),
            }
        }
    }
    assert!(chat.history().len() <= chat.config().history_limit);
}

fn small_config() -> Config {
    Config {
        history_limit: 8,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..256), 1..16)) {
        let mut chat = Chat::new(small_config());
        for (i, bytes) in frames.iter().enumerate() {
            // The transport hands over text frames only; bytes that are not
            // UTF-8 are refused before decoding, lossy text still reaches it.
            run(&mut chat, i as u64 + 1, &String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn arbitrary_json_never_panics(frames in prop::collection::vec(near_frames(), 1..24)) {
        let mut chat = Chat::new(small_config());
        for (i, v) in frames.iter().enumerate() {
            run(&mut chat, i as u64 + 1, &v.to_string());
        }
    }
}
