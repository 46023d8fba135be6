//! Every refusal a client can receive is listed in `asyncapi.yaml`, with
//! its exact text at the default configuration: the error texts cannot
//! drift from the contract any more than the frame schemas can.

use chat_core::{ChatError, Config, RateKind, Window};
use chat_proto::DecodeError;

/// Every refusal the server can send, at `config`'s numbers. The match in
/// `every_variant_is_here` makes adding a variant without listing it here
/// a compile error.
fn every_refusal(config: &Config) -> Vec<ChatError> {
    vec![
        ChatError::EmptyText,
        ChatError::TextTooLong {
            max: config.max_text_chars,
        },
        ChatError::ControlCharInText,
        ChatError::DirectionControlInText,
        ChatError::NameTooLong {
            max: config.max_author_name_chars,
        },
        ChatError::ControlCharInName,
        ChatError::InvisibleCharInName,
        ChatError::NotAnEmoji,
        ChatError::TooManyEmojis {
            max: config.max_emojis_per_message,
        },
        ChatError::TooManyReactors {
            max: config.max_reactors_per_emoji,
        },
        ChatError::MessageNotFound,
        ChatError::RateLimited {
            kind: RateKind::Messages,
            max: config.message_rate.max,
            window: Window(60_000),
        },
        ChatError::RateLimited {
            kind: RateKind::Reactions,
            max: config.reaction_rate.max,
            window: Window(60_000),
        },
    ]
}

#[test]
fn every_variant_is_here() {
    for e in every_refusal(&Config::default()) {
        match e {
            ChatError::EmptyText
            | ChatError::TextTooLong { .. }
            | ChatError::ControlCharInText
            | ChatError::DirectionControlInText
            | ChatError::NameTooLong { .. }
            | ChatError::ControlCharInName
            | ChatError::InvisibleCharInName
            | ChatError::NotAnEmoji
            | ChatError::TooManyEmojis { .. }
            | ChatError::TooManyReactors { .. }
            | ChatError::MessageNotFound
            | ChatError::RateLimited { .. } => {}
            // An embedder's mistake (it supplied an id already in use); a
            // server that draws fresh ids never sends it.
            ChatError::DuplicateMessageId => panic!("not a client's refusal"),
        }
    }
}

#[test]
fn kinds_lists_each_refusals_kind_once() {
    let mut of_every: Vec<_> = every_refusal(&Config::default())
        .iter()
        .chain([&ChatError::DuplicateMessageId])
        .map(ChatError::kind)
        .collect();
    of_every.sort_unstable();
    of_every.dedup();
    let mut listed = ChatError::KINDS.to_vec();
    listed.sort_unstable();
    assert_eq!(of_every, listed, "ChatError::KINDS against kind()");
    listed.dedup();
    assert_eq!(listed.len(), ChatError::KINDS.len(), "a kind listed twice");
}

/// The `error` frame's documented texts, one per `- "..."` line.
fn documented() -> Vec<String> {
    let doc = chat_testkit::asyncapi();
    let description = doc
        .pointer("/components/schemas/ErrorFrame/properties/data/properties/error/description")
        .and_then(|d| d.as_str())
        .expect("the error text's description");
    description
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- \""))
        .map(|l| l.split('"').next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn every_refusal_text_is_documented_in_asyncapi() {
    let listed = documented();
    let mut missing = Vec::new();
    // A frame that does not decode never reaches the core; its text comes
    // from chat-proto. The detail varies; the contract documents the prefix.
    let decode = DecodeError::Binary.to_string();
    assert!(decode.starts_with("Invalid message format: "), "{decode}");
    let texts = every_refusal(&Config::default())
        .into_iter()
        .map(|refusal| refusal.to_string())
        .chain(["Invalid message format: <detail>".to_owned()]);
    for text in texts {
        if !listed.contains(&text) {
            missing.push(text);
        }
    }
    assert!(
        missing.is_empty(),
        "not in asyncapi.yaml: {missing:#?}\nlisted: {listed:#?}"
    );
    // The decode prefix, and the server's own two "the chat is
    // unavailable" texts, not taken and not confirmed (checked against its
    // constants in chat-server's connection/reader.rs).
    assert_eq!(
        listed.len(),
        every_refusal(&Config::default()).len() + 3,
        "asyncapi.yaml lists a text the server never sends: {listed:#?}"
    );
}
