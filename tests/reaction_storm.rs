//! A popular message: many users, every emoji, every reactor place taken.
//! Its frames are the largest the rules allow, and they must still reach
//! everyone, live and in the history replay.

mod support;

use chat_proto::{ReactionAction, ServerFrame};
use chat_server::Identity;
use chat_server::IdentityMode;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use support::{Client, PATIENCE, TestServer, test_config};

/// Twenty distinct emojis, the default `--max-emojis-per-message`.
const EMOJIS: [&str; 20] = [
    "👍", "❤️", "😂", "🎉", "😮", "😢", "🙏", "🔥", "👀", "💯", "🚀", "✅", "👏", "🤔", "😍", "🙌",
    "💡", "⭐", "🍕", "🌈",
];

/// Source addresses 127.0.0.2 ..= 127.0.0.201.
const REACTORS: std::ops::RangeInclusive<u8> = 2..=201;

/// How many reactors take turns at once.
const AT_ONCE: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_every_reaction_limit_is_still_delivered_and_replayed() {
    // Pseudonyms, the default: 16-character ids, longer than these
    // addresses, so the frames are as large as they get here.
    let config = chat_server::Config {
        identity: IdentityMode::Pseudonym,
        ..test_config()
    };
    let identity = Identity::new(IdentityMode::Pseudonym, support::TEST_SECRET);
    let places = config.max_reactors_per_emoji.min(REACTORS.len());
    let server = TestServer::start(config).await;

    let mut author = server.client(1).await;
    author.say("the popular one").await;
    let message = author.message().await;
    // It would not read the storm's frames; a client that does not read is
    // dropped, as it should be.
    drop(author);

    // The observer stays connected throughout and reads everything.
    let mut observer = server.client(250).await;
    assert_eq!(observer.message().await.id, message.id);
    let watching = tokio::spawn(async move {
        let mut updates = 0usize;
        loop {
            match observer.frame().await {
                ServerFrame::ReactionUpdated(_) => updates += 1,
                ServerFrame::Message(m) => return (observer, updates, m),
                other => panic!("the observer got {other:?}"),
            }
        }
    });

    // 200 addresses, each toggling all 20 emojis on the message.
    let mut accepted = 0usize;
    let mut refused = 0usize;
    let reactors: Vec<u8> = REACTORS.collect();
    for wave in reactors.chunks(AT_ONCE) {
        let turns = wave.iter().map(|&n| {
            let (server, identity) = (&server, &identity);
            async move {
                let mut c = server.client(n).await;
                assert_eq!(c.message().await.id, message.id, "history first");
                for emoji in EMOJIS {
                    c.react(message.id, emoji).await;
                }
                let me = identity.user_id(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)));
                own_outcomes(&mut c, me.as_str()).await
            }
        });
        for (ok, no) in futures_util::future::join_all(turns).await {
            accepted += ok;
            refused += no;
        }
    }
    assert_eq!(accepted, EMOJIS.len() * places, "every place taken");
    assert_eq!(accepted + refused, EMOJIS.len() * REACTORS.len());

    // The observer got every update, and then the next message.
    let mut author = server.client(251).await;
    author.say("after the storm").await;
    let (_observer, updates, next) = tokio::time::timeout(PATIENCE * 3, watching)
        .await
        .expect("the observer keeps up")
        .expect("observer task");
    assert_eq!(
        updates, accepted,
        "every reaction_updated reached the observer"
    );
    assert_eq!(next.text, "after the storm");

    // A newcomer gets the full history, the crowded message included.
    let mut late = server.client(252).await;
    let replayed = late.message().await;
    assert_eq!(replayed.id, message.id);
    assert_eq!(replayed.reactions.len(), EMOJIS.len());
    for (emoji, users) in &replayed.reactions {
        assert_eq!(users.len(), places, "{emoji}");
    }
    let frame_len = ServerFrame::Message(replayed).encode().len();
    assert!(frame_len > 32 * 1024, "a large frame: {frame_len}");
    assert_eq!(late.message().await.text, "after the storm");
    server.shutdown().await;
}

/// Reads `c`'s replies to its own 20 toggles (other reactors' updates pass
/// by): how many were accepted and how many refused for a full emoji.
async fn own_outcomes(c: &mut Client, me: &str) -> (usize, usize) {
    let (mut accepted, mut refused) = (BTreeSet::new(), 0);
    while accepted.len() + refused < EMOJIS.len() {
        match c.frame().await {
            ServerFrame::ReactionUpdated(r) if r.user_id.as_str() == me => {
                assert_eq!(r.action, ReactionAction::Added);
                assert!(accepted.insert(r.emoji), "one update per toggle");
            }
            ServerFrame::ReactionUpdated(_) => {}
            ServerFrame::Error(e) => {
                assert!(
                    e.error
                        .starts_with("too many users reacted with this emoji"),
                    "{}",
                    e.error
                );
                refused += 1;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    (accepted.len(), refused)
}
