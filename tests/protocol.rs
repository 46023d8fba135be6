//! The seed protocol, end to end over real sockets.

mod support;

use chat_proto::{ReactionAction, ServerFrame, Uuid};
use support::{TestServer, say, say_as, test_config};

#[tokio::test]
async fn a_message_reaches_everyone_including_the_sender() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.client(2).await;
    let mut b = server.client(3).await;
    a.send(&say_as("hello", "Ada")).await;
    let at_a = a.message().await;
    let at_b = b.message().await;
    assert_eq!(at_a, at_b);
    assert_eq!(at_a.text, "hello");
    assert_eq!(at_a.author_name, "Ada");
    assert_eq!(at_a.author_id.as_str(), "127.0.0.2");
    assert!(at_a.reactions.is_empty());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (at_a.created_at - now).abs() < 60,
        "created_at is unix seconds"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn distinct_source_addresses_are_distinct_users() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.client(2).await;
    let mut b = server.client(3).await;
    a.say("from a").await;
    let m1 = b.message().await;
    b.say("from b").await;
    let m2 = b.message().await;
    assert_eq!(m1.author_id.as_str(), "127.0.0.2");
    assert_eq!(m2.author_id.as_str(), "127.0.0.3");
    assert_eq!(m1.author_name, "Anonymous");
    // Same address, new connection: same user.
    let mut a2 = server.client(2).await;
    a2.message().await;
    a2.message().await;
    a2.say("again").await;
    assert_eq!(a2.message().await.author_id.as_str(), "127.0.0.2");
    server.shutdown().await;
}

#[tokio::test]
async fn history_is_replayed_oldest_first_on_connect() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.client(2).await;
    for i in 0..5 {
        a.say(&format!("m{i}")).await;
        a.message().await;
    }
    let mut late = server.client(3).await;
    for i in 0..5 {
        assert_eq!(late.message().await.text, format!("m{i}"));
    }
    // Then nothing: history is not sent twice.
    late.quiet_for(std::time::Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// Who reacted with 👍, in order.
fn thumbs_up(m: &chat_proto::Message) -> Vec<&str> {
    m.reactions["👍"].iter().map(|u| u.as_str()).collect()
}

#[tokio::test]
async fn reactions_toggle_and_everyone_sees_the_full_message() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.client(2).await;
    let mut b = server.client(3).await;
    a.say("react to me").await;
    let m = a.message().await;
    b.message().await;

    b.react(m.id, "👍").await;
    for c in [&mut a, &mut b] {
        let r = c.reaction().await;
        assert_eq!(r.action, ReactionAction::Added);
        assert_eq!(r.user_id.as_str(), "127.0.0.3");
        assert_eq!(r.message_id, m.id);
        assert_eq!(r.message.text, "react to me");
        assert_eq!(thumbs_up(&r.message), ["127.0.0.3"]);
    }
    a.react(m.id, "👍").await;
    let r = b.reaction().await;
    assert_eq!(thumbs_up(&r.message), ["127.0.0.3", "127.0.0.2"]);
    a.reaction().await;

    b.react(m.id, "👍").await;
    let r = a.reaction().await;
    assert_eq!(r.action, ReactionAction::Removed);
    b.reaction().await;
    // History carries the reactions as they stand.
    let mut late = server.client(4).await;
    let replayed = late.message().await;
    assert_eq!(thumbs_up(&replayed), ["127.0.0.2"]);
    server.shutdown().await;
}

#[tokio::test]
async fn every_error_text_goes_to_the_offender_only_and_the_connection_stays_open() {
    let server = TestServer::start(test_config()).await;
    let mut bad = server.client(2).await;
    let mut other = server.client(3).await;
    bad.say("ok").await;
    let m = bad.message().await;
    other.message().await;
    let long = "x".repeat(501);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "Invalid message format"),
        (
            r#"{"type":"shout","data":{}}"#.into(),
            "Invalid message format",
        ),
        (
            r#"{"type":"send_message","data":{"text":7}}"#.into(),
            "Invalid message format",
        ),
        (
            r#"{"type":"send_message"}"#.into(),
            "Invalid message format",
        ),
        (
            r#"{"type":"add_reaction","data":{"message_id":"nope","emoji":"👍"}}"#.into(),
            "Invalid message format",
        ),
        (say("").encode(), "message text cannot be empty"),
        (say("   ").encode(), "message text cannot be empty"),
        (say(&long).encode(), "message too long (max 500 characters)"),
        (
            say("bell\u{7}").encode(),
            "message text contains control characters",
        ),
        (
            say_as("x", &"n".repeat(51)).encode(),
            "author name too long (max 50 characters)",
        ),
        (
            format!(
                r#"{{"type":"add_reaction","data":{{"message_id":"{}","emoji":"👍"}}}}"#,
                Uuid::nil()
            ),
            "message not found",
        ),
        (
            format!(
                r#"{{"type":"add_reaction","data":{{"message_id":"{}","emoji":"yes"}}}}"#,
                m.id
            ),
            "emoji must be a single emoji",
        ),
    ];
    for (frame, expected) in &cases {
        bad.send_text(frame).await;
        let got = bad.error().await;
        assert!(
            got.starts_with(expected),
            "{frame}: got {got:?}, want {expected:?}"
        );
    }
    // Still open, still working.
    bad.say("still here").await;
    assert_eq!(bad.message().await.text, "still here");
    // The bystander saw none of the errors, only the good message.
    assert_eq!(other.message().await.text, "still here");
    other.quiet_for(std::time::Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn binary_frames_get_an_error_frame() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.client(2).await;
    use futures_util::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .expect("send");
    assert_eq!(
        c.error().await,
        "Invalid message format: binary frames are not supported"
    );
    c.say("ok").await;
    assert_eq!(c.message().await.text, "ok");
    server.shutdown().await;
}

#[tokio::test]
async fn extra_properties_are_accepted() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.client(2).await;
    c.send_text(r#"{"type":"send_message","id":9,"data":{"text":"hi","author_name":null,"color":"red"},"v":2}"#)
        .await;
    let m = c.message().await;
    assert_eq!(m.text, "hi");
    assert_eq!(m.author_name, "Anonymous");
    c.send_text(&format!(
        r#"{{"type":"add_reaction","data":{{"message_id":"{}","emoji":"🎉","x":[]}},"y":null}}"#,
        m.id
    ))
    .await;
    assert_eq!(c.reaction().await.emoji, "🎉");
    server.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_is_per_address_across_connections() {
    let mut config = test_config();
    config.message_rate = 3;
    let server = TestServer::start(config).await;
    let mut a1 = server.client(2).await;
    let mut a2 = server.client(2).await;
    let mut b = server.client(3).await;
    // a1 reads everything, so each send is applied before the next.
    a1.say("1").await;
    assert_eq!(a1.message().await.text, "1");
    a2.say("2").await;
    assert_eq!(a1.message().await.text, "2");
    a1.say("3").await;
    assert_eq!(a1.message().await.text, "3");
    a2.say("4").await;
    // a2 saw messages 1..3 as live frames first.
    let (texts, refusal) = a2.texts_until_error().await;
    assert_eq!(
        refusal,
        "Rate limit exceeded. Maximum 3 messages per minute."
    );
    assert_eq!(texts, ["1", "2", "3"]);
    b.say("other users are not limited").await;
    loop {
        if let ServerFrame::Message(m) = b.frame().await
            && m.author_id.as_str() == "127.0.0.3"
        {
            break;
        }
    }
    server.shutdown().await;
}
