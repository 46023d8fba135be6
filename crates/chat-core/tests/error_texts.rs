//! Every refusal a client can receive is listed in `asyncapi.yaml`, with
//! its exact text at the default configuration: the error texts cannot
//! drift from the contract any more than the frame schemas can.

use chat_core::{ChatError, Config, RateKind, Timestamp, Until, Window};
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
        ChatError::TimedOut { until: SOME_TIME },
        ChatError::Banned,
        ChatError::SlowMode {
            seconds: 30,
            until: SOME_TIME,
        },
    ]
}

/// A time in a refusal; the contract writes it `<time>`.
const SOME_TIME: Until = Until(Timestamp::from_unix_millis(1_800_000_000_000));

/// A refusal's text as the contract writes it: the time as `<time>`, slow
/// mode's seconds as `N`.
fn as_documented(refusal: &ChatError) -> String {
    refusal
        .to_string()
        .replace(&SOME_TIME.to_string(), "<time>")
        .replace("every 30 seconds", "every N seconds")
}

/// The refusals only an operator gets (from the operator API), never a
/// client: not in the `error` frame's list.
fn operator_refusals() -> Vec<ChatError> {
    vec![
        ChatError::ReasonTooLong { max: 200 },
        ChatError::ControlCharInReason,
        ChatError::BadTerm { max_days: 366 },
        ChatError::EmptyPurge,
        ChatError::SlowModeTooLong { max: 86_400 },
        ChatError::TooManyRestrictions { max: 100_000 },
        ChatError::NotRestricted,
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
            | ChatError::RateLimited { .. }
            | ChatError::TimedOut { .. }
            | ChatError::Banned
            | ChatError::SlowMode { .. } => {}
            ChatError::ReasonTooLong { .. }
            | ChatError::ControlCharInReason
            | ChatError::BadTerm { .. }
            | ChatError::EmptyPurge
            | ChatError::SlowModeTooLong { .. }
            | ChatError::TooManyRestrictions { .. }
            | ChatError::NotRestricted => panic!("an operator's refusal, listed apart"),
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
        .chain(&operator_refusals())
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
        .map(|refusal| as_documented(&refusal))
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

#[test]
fn a_time_in_a_refusal_is_rfc_3339_rounded_up_to_the_second() {
    let at = |ms| ChatError::TimedOut {
        until: Until(Timestamp::from_unix_millis(ms)),
    };
    assert_eq!(
        at(1_800_000_000_000).to_string(),
        "You are timed out until 2027-01-15T08:00:00Z."
    );
    assert_eq!(
        at(1_800_000_000_001).to_string(),
        "You are timed out until 2027-01-15T08:00:01Z.",
        "at the second shown, it has ended"
    );
    assert_eq!(
        at(u64::MAX).to_string(),
        "You are timed out until 9999-12-31T23:59:59Z.",
        "the far future is written as RFC 3339's last second"
    );
}
