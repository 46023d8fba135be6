//! Positions over real sockets: `?sync`, resuming with `?since=&epoch=`,
//! resets, refused queries, catching up from the log, and the fate of a
//! socket that does not drain.

mod support;

use chat_proto::{Epoch, Position, ResetReason, ServerFrame, SyncPoint, Uuid};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use support::{Client, TestServer, say, test_config};
use tokio_tungstenite::tungstenite;

fn resume_path(since: u64, epoch: Epoch) -> String {
    format!("/ws?since={since}&epoch={epoch}")
}

/// Posts `n` messages from client `c` and reads its own echoes back
/// (skipping `sync` frames).
async fn post(c: &mut Client, n: usize, tag: &str) -> Vec<ServerFrame> {
    let mut seen = Vec::new();
    for i in 0..n {
        c.say(&format!("{tag}{i}")).await;
        loop {
            match c.frame().await {
                ServerFrame::Sync(_) => {}
                other => {
                    seen.push(other);
                    break;
                }
            }
        }
    }
    seen
}

#[tokio::test]
async fn a_resume_from_any_position_gets_exactly_what_followed() {
    let server = TestServer::start(test_config()).await;
    // A client of the seed protocol, there from the start: it sees every
    // event, in order, and never a `sync` or `reset`.
    let mut seed = server.client(2).await;
    let mut watcher = server.try_client(3, "/ws?sync", &[]).await.expect("ws");
    let (history, start) = watcher.until_sync().await;
    assert!(history.is_empty());
    assert_eq!(start.position, Position(0), "an empty log is at 0");
    let epoch = start.epoch;

    // Messages and reactions, some on older messages.
    let mut all = post(&mut seed, 4, "m").await;
    let ids: Vec<Uuid> = all
        .iter()
        .map(|f| match f {
            ServerFrame::Message(m) => m.id,
            other => panic!("{other:?}"),
        })
        .collect();
    for (id, emoji) in [(0, "👍"), (3, "🎉"), (0, "🎉"), (0, "👍")] {
        seed.react(ids[id], emoji).await;
        all.push(seed.frame().await);
    }
    all.extend(post(&mut seed, 2, "n").await);
    let head = all.len() as u64;

    // The watcher got the same frames, each batch followed by its position.
    let mut got = Vec::new();
    let mut last = Position(0);
    while last.0 < head {
        let (frames, sync) = watcher.until_sync().await;
        assert_eq!(sync.epoch, epoch);
        assert_eq!(sync.position.0, last.0 + frames.len() as u64, "no gap");
        got.extend(frames);
        last = sync.position;
    }
    assert_eq!(got, all);

    for since in 0..=head {
        let mut c = server
            .try_client(4, &resume_path(since, epoch), &[])
            .await
            .expect("resume");
        let (frames, sync) = c.until_sync().await;
        assert_eq!(frames, all[since as usize..], "resuming after {since}");
        assert_eq!(
            sync,
            SyncPoint {
                epoch,
                position: Position(head)
            }
        );
        if since == head {
            // Then live, each event followed by its position.
            seed.say("live").await;
            let (frames, sync) = c.until_sync().await;
            assert!(matches!(&frames[..], [ServerFrame::Message(m)] if m.text == "live"));
            assert_eq!(sync.position, Position(head + 1));
        }
    }
    // The seed client saw only the seed protocol's frames: its own posts,
    // reactions and the live one, all read above or here.
    assert!(matches!(seed.frame().await, ServerFrame::Message(m) if m.text == "live"));
    seed.quiet_for(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_resume_that_cannot_be_honoured_is_a_reset_then_the_full_history() {
    let mut config = test_config();
    config.log_events = 3;
    let server = TestServer::start(config.clone()).await;
    let mut c = server.try_client(2, "/ws?sync", &[]).await.expect("ws");
    let epoch = c.until_sync().await.1.epoch;
    let posted = post(&mut c, 6, "m").await;

    let full = |reason| {
        let mut frames = vec![ServerFrame::Reset(chat_proto::Reset { reason })];
        frames.extend(posted.iter().cloned());
        frames
    };
    let at_head = SyncPoint {
        epoch,
        position: Position(6),
    };
    // Only events 4, 5 and 6 are kept: from 3 on is a resume, before it a
    // reset.
    let mut ok = server
        .try_client(3, &resume_path(3, epoch), &[])
        .await
        .expect("ws");
    assert_eq!(ok.until_sync().await, (posted[3..].to_vec(), at_head));
    let cases = [
        (resume_path(2, epoch), ResetReason::Expired),
        (resume_path(0, epoch), ResetReason::Expired),
        (resume_path(7, epoch), ResetReason::Ahead),
        (resume_path(u64::MAX, epoch), ResetReason::Ahead),
        (
            resume_path(6, Epoch(Uuid::from_u128(1))),
            ResetReason::EpochChanged,
        ),
    ];
    for (path, reason) in cases {
        let mut c = server.try_client(3, &path, &[]).await.expect("ws");
        assert_eq!(c.until_sync().await, (full(reason), at_head), "{path}");
    }
    server.shutdown().await;

    // An in-memory server that restarts starts a new epoch: its positions
    // say nothing about the old ones.
    let again = TestServer::start(config).await;
    let mut c = again
        .try_client(2, &resume_path(0, epoch), &[])
        .await
        .expect("ws");
    let (frames, sync) = c.until_sync().await;
    assert_eq!(
        frames,
        [ServerFrame::Reset(chat_proto::Reset {
            reason: ResetReason::EpochChanged
        })]
    );
    assert_ne!(sync.epoch, epoch);
    again.shutdown().await;
}

/// With `--history-limit 3` and eight messages, a resume from the start
/// is a reset with the three held, before and after a restart: what the
/// history no longer holds is never served again, and the store keeps no
/// event of an evicted message. (A resume used to return all eight, and
/// the first stayed in the `events` table.)
#[tokio::test]
async fn an_evicted_message_is_never_served_again_nor_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = chat_server::Config {
        in_memory: false,
        data_dir: dir.path().to_owned(),
        history_limit: 3,
        ..test_config()
    };
    let server = TestServer::start(config.clone()).await;
    let mut c = server.try_client(2, "/ws?sync", &[]).await.expect("ws");
    let epoch = c.until_sync().await.1.epoch;
    let posted = post(&mut c, 8, "m").await;
    let held = posted[5..].to_vec();
    let from_start = |server: &TestServer| {
        let path = resume_path(0, epoch);
        let addr = server.addr;
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream)
                .await
                .expect("ws");
            Client { ws }.until_sync().await
        }
    };
    let expected = |held: &[ServerFrame]| {
        let mut frames = vec![ServerFrame::Reset(chat_proto::Reset {
            reason: ResetReason::Expired,
        })];
        frames.extend(held.iter().cloned());
        frames
    };
    let (frames, sync) = from_start(&server).await;
    assert_eq!(frames, expected(&held));
    assert_eq!(sync.position, Position(8));
    // From where the oldest held message was posted on, a resume is served.
    let mut ok = server
        .try_client(3, &resume_path(5, epoch), &[])
        .await
        .expect("ws");
    assert_eq!(ok.until_sync().await.0, held);
    drop((c, ok));
    server.shutdown().await;

    let db = rusqlite::Connection::open(dir.path().join(chat_server::DB_FILE)).expect("db");
    let events: Vec<i64> = db
        .prepare("SELECT position FROM events ORDER BY position")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("events");
    assert_eq!(events, [6, 7, 8], "the evicted messages' events are gone");
    let messages: i64 = db
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .expect("messages");
    assert_eq!(messages, 3);
    drop(db);

    let again = TestServer::start(config).await;
    let (frames, sync) = from_start(&again).await;
    assert_eq!(frames, expected(&held), "after a restart too");
    assert_eq!(
        sync,
        SyncPoint {
            epoch,
            position: Position(8)
        }
    );
    again.shutdown().await;
}

#[tokio::test]
async fn malformed_resume_queries_are_refused_with_400_and_the_reason() {
    let server = TestServer::start(test_config()).await;
    let e = "0192d7a4-5b7e-7cc1-9d3a-6c1f0e2b4a11";
    let cases = [
        ("/ws?since=1".to_owned(), "since needs the epoch"),
        (format!("/ws?epoch={e}"), "epoch needs a since"),
        (
            format!("/ws?since=abc&epoch={e}"),
            "since must be a position",
        ),
        (
            format!("/ws?since=-1&epoch={e}"),
            "since must be a position",
        ),
        ("/ws?since=1&epoch=yesterday".to_owned(), "epoch must be"),
        (
            format!("/ws?since=1&since=2&epoch={e}"),
            "since is given twice",
        ),
    ];
    for (path, why) in cases {
        match server.try_client(2, &path, &[]).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{path}");
                let body =
                    String::from_utf8(response.body().clone().unwrap_or_default()).expect("text");
                assert!(body.contains(why), "{path}: {body}");
            }
            Err(other) => panic!("{path}: {other}"),
            Ok(_) => panic!("{path} was accepted"),
        }
    }
    // Other parameters are still ignored, as they always were.
    let mut c = server.try_client(2, "/ws?v=2&x", &[]).await.expect("ws");
    c.say("hi").await;
    assert!(matches!(c.frame().await, ServerFrame::Message(_)));
    server.still_serves().await;
    server.shutdown().await;
}

/// A client whose writer fell far behind (here: its socket was full for a
/// while) catches up from the log, in order, instead of being closed: the
/// old bound, a 4,096-frame ring, would have dropped it.
#[tokio::test]
async fn a_client_far_behind_catches_up_from_the_log() {
    const SENT: usize = 6_000;
    let mut config = test_config();
    config.message_rate = 1_000_000;
    config.write_timeout = Duration::from_secs(60);
    config.history_limit = 100;
    let server = TestServer::start(config).await;

    let mut behind = server.tight_client(9, "/ws?sync").await;

    let mut sender = server.client(2).await;
    let text = "😀".repeat(100);
    for round in 0..SENT / 100 {
        for i in 0..100 {
            sender.send(&say(&format!("{round}/{i} {text}"))).await;
        }
        for _ in 0..100 {
            sender.message().await;
        }
    }
    // It has not read a frame yet: thousands of frames behind.
    let mut texts = Vec::new();
    let mut last = Position(0);
    while last.0 < SENT as u64 {
        let (frames, sync) = behind.until_sync().await;
        for f in frames {
            match f {
                ServerFrame::Message(m) => texts.push(m.text),
                other => panic!("{other:?}"),
            }
        }
        last = sync.position;
    }
    let expected: Vec<String> = (0..SENT)
        .map(|n| format!("{}/{} {text}", n / 100, n % 100))
        .collect();
    assert_eq!(texts.len(), SENT, "every event, once");
    assert!(texts == expected, "in order");
    server.shutdown().await;
}

/// A client that stops reading is closed once a write has waited
/// `--write-timeout`, and its socket is reset rather than left to the
/// kernel: with a graceful close, the FIN would queue behind data the
/// client never reads, and the client would never learn it was dropped.
#[tokio::test]
async fn a_socket_that_does_not_drain_is_reset_within_the_write_timeout() {
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
    let mut config = test_config();
    config.message_rate = 1_000_000;
    config.write_timeout = Duration::from_millis(500);
    let write_timeout = config.write_timeout;
    let server = TestServer::start(config).await;

    let mut mute = server.tight_client(9, "/ws").await;

    // Enough to fill its receive window and the server's send buffer.
    let mut sender = server.client(2).await;
    let text = "😀".repeat(500);
    for _ in 0..10 {
        for _ in 0..30 {
            sender.send(&say(&text)).await;
        }
        for _ in 0..30 {
            sender.message().await;
        }
    }
    let filled = Instant::now();
    let bound = write_timeout + CLOSE_TIMEOUT + Duration::from_secs(1);
    loop {
        match mute.ws.get_ref().take_error() {
            Ok(Some(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                break;
            }
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            filled.elapsed() < bound,
            "not reset within --write-timeout + the close timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reading now finds what was buffered, then the end.
    while let Some(Ok(_)) = mute.ws.next().await {}
    server.still_serves().await;
    server.shutdown().await;
}

/// The `/ws` query is decoded as a form, as browsers encode it; `sync=0`
/// does not opt in; a catch-up of many events ends in one `sync`, not one
/// every few hundred events.
#[tokio::test]
async fn the_query_is_decoded_and_a_catch_up_ends_in_one_sync() {
    let config = chat_server::Config {
        message_rate: 100_000,
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let mut c = server
        .try_client(2, "/ws?s%79nc=%31", &[])
        .await
        .expect("ws");
    let (history, start) = c.until_sync().await;
    assert!(history.is_empty());
    let posted = post(&mut c, 600, "m").await;
    let encoded = start.epoch.to_string().replace('-', "%2D");
    let mut behind = server
        .try_client(3, &format!("/ws?since=0&epoch={encoded}"), &[])
        .await
        .expect("ws");
    let (frames, sync) = behind.until_sync().await;
    assert_eq!(frames, posted, "all 600 events, then one sync");
    assert_eq!(sync.position, Position(600));
    behind.quiet_for(Duration::from_millis(200)).await;
    // sync=0: the seed protocol, no sync frame.
    let mut seed = server.try_client(4, "/ws?sync=0", &[]).await.expect("ws");
    for _ in 0..600 {
        assert!(matches!(seed.frame().await, ServerFrame::Message(_)));
    }
    seed.quiet_for(Duration::from_millis(200)).await;
    server.shutdown().await;
}
