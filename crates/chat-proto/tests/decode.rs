//! Decoding client frames: what is accepted, and the error for everything else.

use chat_proto::{
    AddReaction, ClientFrame, DecodeError, ErrorBody, Message, ReactionAction, ReactionUpdated,
    SendMessage, ServerFrame, UserId, Uuid,
};
use chat_testkit::FrameValidator;

#[test]
fn send_message_decodes() {
    let f =
        ClientFrame::decode(r#"{"type":"send_message","data":{"text":"hi","author_name":"Ada"}}"#)
            .expect("valid frame");
    assert_eq!(
        f,
        ClientFrame::SendMessage(SendMessage {
            text: "hi".into(),
            author_name: Some("Ada".into())
        })
    );
}

#[test]
fn author_name_may_be_missing_or_null() {
    for text in [
        r#"{"type":"send_message","data":{"text":"hi"}}"#,
        r#"{"type":"send_message","data":{"text":"hi","author_name":null}}"#,
    ] {
        let f = ClientFrame::decode(text).expect("valid frame");
        assert_eq!(
            f,
            ClientFrame::SendMessage(SendMessage {
                text: "hi".into(),
                author_name: None
            })
        );
    }
}

#[test]
fn additional_properties_are_ignored_at_every_level() {
    let text = r#"{"extra":1,"type":"add_reaction","data":{"message_id":"d7d9d9fd-478f-40e6-b651-49b7f19878a2","emoji":"👍","more":[1,2]},"z":{}}"#;
    let f = ClientFrame::decode(text).expect("extra properties are allowed");
    assert_eq!(
        f,
        ClientFrame::AddReaction(AddReaction {
            message_id: "d7d9d9fd-478f-40e6-b651-49b7f19878a2"
                .parse()
                .expect("uuid"),
            emoji: "👍".into()
        })
    );
}

#[test]
fn data_before_type_is_fine() {
    let f = ClientFrame::decode(r#"{"data":{"text":"x"},"type":"send_message"}"#);
    assert!(f.is_ok(), "{f:?}");
}

#[test]
fn malformed_frames_are_invalid_message_format() {
    let cases = [
        ("not json", "hello"),
        (
            "truncated json",
            r#"{"type":"send_message","data":{"text":"#,
        ),
        ("json array", "[1,2]"),
        ("json string", r#""send_message""#),
        ("empty", ""),
        ("unknown type", r#"{"type":"shout","data":{"text":"x"}}"#),
        ("missing type", r#"{"data":{"text":"x"}}"#),
        ("missing data", r#"{"type":"send_message"}"#),
        (
            "data not an object",
            r#"{"type":"send_message","data":"x"}"#,
        ),
        ("missing text", r#"{"type":"send_message","data":{}}"#),
        (
            "text not a string",
            r#"{"type":"send_message","data":{"text":5}}"#,
        ),
        (
            "name not a string",
            r#"{"type":"send_message","data":{"text":"x","author_name":5}}"#,
        ),
        (
            "malformed uuid",
            r#"{"type":"add_reaction","data":{"message_id":"nope","emoji":"👍"}}"#,
        ),
        (
            "missing emoji",
            r#"{"type":"add_reaction","data":{"message_id":"d7d9d9fd-478f-40e6-b651-49b7f19878a2"}}"#,
        ),
        ("type not a string", r#"{"type":1,"data":{"text":"x"}}"#),
        (
            "server frame sent by a client",
            r#"{"type":"error","data":{"error":"x"}}"#,
        ),
    ];
    for (what, text) in cases {
        let err = ClientFrame::decode(text).expect_err(what);
        let wire = err.to_string();
        assert!(
            wire.starts_with("Invalid message format"),
            "{what}: wire text {wire:?}"
        );
    }
}

#[test]
fn syntax_and_shape_errors_are_told_apart() {
    assert!(matches!(
        ClientFrame::decode("{"),
        Err(DecodeError::Syntax { .. })
    ));
    assert!(matches!(
        ClientFrame::decode(r#"{"type":"shout","data":{}}"#),
        Err(DecodeError::Shape { .. })
    ));
}

#[test]
fn error_detail_does_not_echo_a_huge_input() {
    let huge_type = "x".repeat(10_000);
    let text = format!(r#"{{"type":"{huge_type}","data":{{}}}}"#);
    let wire = ClientFrame::decode(&text)
        .expect_err("unknown type")
        .to_string();
    assert!(
        wire.chars().count() < 250,
        "error text is {} chars",
        wire.len()
    );
}

#[test]
fn binary_frames_have_their_own_text() {
    assert_eq!(
        DecodeError::Binary.to_string(),
        "Invalid message format: binary frames are not supported"
    );
}

fn sample_message() -> Message {
    let mut m = Message {
        id: Uuid::from_u128(7),
        text: "hi <b>".into(),
        author_id: UserId::from("u1"),
        author_name: "Ada".into(),
        created_at: 1_700_000_000,
        reactions: Default::default(),
    };
    m.reactions
        .entry("👍".into())
        .or_default()
        .insert(UserId::from("u2"));
    m
}

#[test]
fn server_frames_encode_to_the_documented_shape() {
    let v = FrameValidator::server_frames();
    let frames = [
        ServerFrame::Message(sample_message()),
        ServerFrame::ReactionUpdated(ReactionUpdated {
            message_id: Uuid::from_u128(7),
            emoji: "👍".into(),
            user_id: UserId::from("u2"),
            action: ReactionAction::Added,
            message: sample_message(),
        }),
        ServerFrame::Error(ErrorBody {
            error: "message not found".into(),
        }),
    ];
    for f in frames {
        let text = f.encode();
        v.assert_valid(&text);
        assert_eq!(ServerFrame::decode(&text).expect("round trip"), f);
    }
}

#[test]
fn client_frames_encode_to_the_documented_shape() {
    let v = FrameValidator::client_frames();
    let frames = [
        ClientFrame::SendMessage(SendMessage {
            text: "x".into(),
            author_name: None,
        }),
        ClientFrame::SendMessage(SendMessage {
            text: "x".into(),
            author_name: Some("Ada".into()),
        }),
        ClientFrame::AddReaction(AddReaction {
            message_id: Uuid::from_u128(1),
            emoji: "🎉".into(),
        }),
    ];
    for f in frames {
        let text = f.encode();
        v.assert_valid(&text);
        assert_eq!(ClientFrame::decode(&text).expect("round trip"), f);
    }
}

#[test]
fn encoding_is_deterministic_and_keeps_reaction_order() {
    let mut m = sample_message();
    m.reactions
        .entry("🎉".into())
        .or_default()
        .insert(UserId::from("u9"));
    m.reactions
        .entry("👍".into())
        .or_default()
        .insert(UserId::from("u1"));
    let text = ServerFrame::Message(m).encode();
    assert!(
        text.contains(r#""reactions":{"👍":["u2","u1"],"🎉":["u9"]}"#),
        "{text}"
    );
}

#[test]
fn data_must_be_an_object_not_an_array_of_fields() {
    let id = Uuid::from_u128(1);
    for text in [
        r#"{"type":"send_message","data":["hi","Bob"]}"#.to_owned(),
        r#"{"type":"send_message","data":["hi"]}"#.to_owned(),
        r#"{"type":"send_message","data":["hi","Bob","extra"]}"#.to_owned(),
        format!(r#"{{"type":"add_reaction","data":["{id}","👍"]}}"#),
        r#"{"type":"send_message","data":"hi"}"#.to_owned(),
        r#"{"type":"send_message","data":null}"#.to_owned(),
    ] {
        let err = ClientFrame::decode(&text).expect_err(&text);
        assert!(matches!(err, DecodeError::Shape { .. }), "{text}: {err:?}");
        assert!(
            err.to_string()
                .starts_with("Invalid message format: data must be an object"),
            "{text}: {err}"
        );
    }
    // The same fields as an object decode, and a field's own error still
    // names it.
    let ok = format!(r#"{{"type":"add_reaction","data":{{"message_id":"{id}","emoji":"👍"}}}}"#);
    assert!(ClientFrame::decode(&ok).is_ok());
    let err =
        ClientFrame::decode(r#"{"type":"send_message","data":{"text":1}}"#).expect_err("mistyped");
    assert!(err.to_string().contains("invalid type"), "{err}");
}
