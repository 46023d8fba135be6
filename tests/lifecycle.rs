//! Joining while others talk, identity behind a proxy, and shutdown.

mod support;

use chat_proto::{ServerFrame, Uuid};
use chat_server::IdentityMode;
use std::collections::HashSet;
use support::{TestServer, test_config};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Clients that connect while others are sending see exactly the history
/// followed by the live stream: the same sequence an observer connected
/// from the start saw, with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_mid_stream_has_no_gap_and_no_duplicate() {
    join_mid_stream(test_config()).await;
}

/// The same with the durable store, where events are published by the
/// committer after their commit rather than by the sender's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_mid_stream_has_no_gap_and_no_duplicate_when_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = chat_server::Config {
        in_memory: false,
        data_dir: dir.path().to_owned(),
        ..test_config()
    };
    join_mid_stream(config).await;
}

async fn join_mid_stream(mut config: chat_server::Config) {
    const SENDERS: u8 = 4;
    const EACH: usize = 150;
    const TOTAL: usize = SENDERS as usize * EACH;
    const JOINERS: u8 = 20;
    config.message_rate = 10_000;
    let server = TestServer::start(config).await;
    let mut observer = server.client(200).await;

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut c = server.client(10 + s).await;
        senders.push(tokio::spawn(async move {
            for i in 0..EACH {
                c.say(&format!("s{s}-{i}")).await;
                // Read own echoes now and then so this sender never lags.
                if i % 10 == 9 {
                    for _ in 0..10 {
                        let _ = c.frame().await;
                    }
                }
                tokio::task::yield_now().await;
            }
            c
        }));
    }
    // Joiners arrive at staggered moments while the senders run.
    let mut joiners = Vec::new();
    for j in 0..JOINERS {
        let mut c = server.client(100 + j).await;
        joiners.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < TOTAL {
                match c.frame().await {
                    ServerFrame::Message(m) => ids.push(m.id),
                    other => panic!("{other:?}"),
                }
            }
            ids
        }));
        tokio::time::sleep(std::time::Duration::from_millis(6)).await;
    }
    let mut reference: Vec<Uuid> = Vec::new();
    while reference.len() < TOTAL {
        reference.push(observer.message().await.id);
    }
    assert_eq!(
        reference.iter().collect::<HashSet<_>>().len(),
        TOTAL,
        "observer saw duplicates"
    );
    for s in senders {
        s.await.expect("sender");
    }
    for (j, joiner) in joiners.into_iter().enumerate() {
        let ids = joiner.await.expect("joiner");
        assert_eq!(ids, reference, "joiner {j} saw a different sequence");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mut config = test_config();
    config.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
    let server = TestServer::start(config).await;
    let forged = [("x-forwarded-for", "6.6.6.6, 198.51.100.7")];
    // From the trusted proxy: the right-most untrusted entry.
    let mut via_proxy = server
        .try_client(1, "/ws", &forged)
        .await
        .expect("handshake");
    via_proxy.say("via proxy").await;
    assert_eq!(via_proxy.message().await.author_id.as_str(), "198.51.100.7");
    // From anyone else the header is ignored.
    let mut direct = server
        .try_client(2, "/ws", &forged)
        .await
        .expect("handshake");
    direct.message().await; // history
    direct.say("direct").await;
    assert_eq!(direct.message().await.author_id.as_str(), "127.0.0.2");
    server.shutdown().await;
}

#[tokio::test]
async fn pseudonymous_ids_are_stable_and_hide_the_address() {
    let mut config = test_config();
    config.identity = IdentityMode::Pseudonym;
    let server = TestServer::start(config).await;
    let mut a = server.client(2).await;
    a.say("one").await;
    let first = a.message().await.author_id;
    drop(a);
    let mut again = server.client(2).await;
    again.message().await;
    again.say("two").await;
    let second = again.message().await.author_id;
    assert_eq!(first, second, "same address, same id across connections");
    assert!(!first.as_str().contains("127."), "{first}");
    let mut other = server.client(3).await;
    other.message().await;
    other.message().await;
    other.say("three").await;
    assert_ne!(other.message().await.author_id, first);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_1001_to_every_client() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.client(2).await;
    let mut b = server.client(3).await;
    a.say("before shutdown").await;
    a.message().await;
    b.message().await;
    let addr = server.addr;
    let stopping = tokio::spawn(server.shutdown());
    for c in [&mut a, &mut b] {
        let close = c.closed().await.expect("close frame");
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
    stopping.await.expect("server stopped");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// `--echo` (for the conformance suite) sends data frames straight back,
/// and keeps the chat's limits.
#[tokio::test]
async fn echo_mode_echoes_and_keeps_the_limits() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut config = test_config();
    config.echo = true;
    let server = TestServer::start(config).await;
    let mut c = server.client(2).await;
    for m in [
        Message::text("not even json"),
        Message::binary(vec![0u8, 1, 2]),
    ] {
        c.ws.send(m.clone()).await.expect("send");
        let back = loop {
            match c.ws.next().await.expect("open").expect("frame") {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => break other,
            }
        };
        assert_eq!(back, m);
    }
    c.ws.send(Message::text("x".repeat(17 * 1024)))
        .await
        .expect("send");
    let close = loop {
        match c.ws.next().await {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(close.expect("close frame").code, CloseCode::Size);
    server.shutdown().await;
}

/// The host's clock set back two hours across a restart (an hour ahead
/// before, an hour behind after): the restarted server stamps messages on
/// from the stored ones, and its rate limit opens again after one real
/// window, not after the two hours a frozen clock would take.
#[tokio::test]
async fn a_clock_set_back_across_a_restart_neither_freezes_time_nor_the_limit() {
    use chat_server::Clock;
    use std::time::{Duration, SystemTime};
    const HOUR: Duration = Duration::from_secs(3600);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = chat_server::Config {
        in_memory: false,
        data_dir: dir.path().to_owned(),
        message_rate: 3,
        rate_window: Duration::from_secs(2),
        ..test_config()
    };
    let ahead = Clock::starting_at(SystemTime::now() + HOUR);
    let server = TestServer::start_with_clock(config.clone(), ahead).await;
    let mut c = server.client(2).await;
    let before = fill_the_window(&mut c, "before").await;
    drop(c);
    server.shutdown().await;

    let behind = Clock::starting_at(SystemTime::now() - HOUR);
    let server = TestServer::start_with_clock(config, behind).await;
    let mut c = server.client(2).await;
    for _ in 0..3 {
        c.message().await; // history
    }
    let newest = *before.last().expect("three");
    let after = fill_the_window(&mut c, "after").await;
    // One window later, in real time, the limit has moved on.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    c.say("a window later").await;
    let later = c.message().await;
    assert_eq!(later.text, "a window later");
    assert!(
        after.iter().all(|&t| t >= newest),
        "never backwards: {before:?} {after:?}"
    );
    assert!(
        later.created_at >= after[0] + 2,
        "time went on in real time: {after:?}, then {}",
        later.created_at
    );
    server.shutdown().await;
}

/// Sends the three messages a 3-per-window limit allows, and a fourth that
/// is refused; the three `created_at`s.
async fn fill_the_window(c: &mut support::Client, label: &str) -> Vec<i64> {
    let mut times = Vec::new();
    for i in 0..3 {
        c.say(&format!("{label} {i}")).await;
        times.push(c.message().await.created_at);
    }
    c.say("one too many").await;
    assert!(c.error().await.starts_with("Rate limit exceeded"));
    times
}
