//! Whatever a client sends, decoding and then handling it never panics, and
//! every refusal has a wire text.

use chat_core::{Chat, Config, Context, Timestamp};
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
    let react = (0u128..4, ".{0,12}").prop_map(|(id, emoji)| {
        json!({"type": "add_reaction", "data": {"message_id": Uuid::from_u128(id), "emoji": emoji}})
    });
    prop_oneof![send, send_str, react, any_json()]
}

fn run(chat: &mut Chat, i: u64, text: &str) {
    let ctx = Context {
        user: UserId::from(format!("u{}", i % 3).as_str()),
        now: Timestamp::from_unix_millis(i * 100),
        message_id: Uuid::from_u128(u128::from(i)),
    };
    match ClientFrame::decode(text) {
        Ok(frame) => {
            if let Err(e) = chat.handle(ctx, frame) {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(e.to_string().starts_with("Invalid message format")),
    }
    while chat.poll_event().is_some() {}
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
