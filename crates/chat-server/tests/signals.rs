//! Signals against the real binary while its store cannot write: the first
//! SIGTERM stops it within `--shutdown-grace` plus a moment, and a second
//! one ends it at once.

use futures_util::{SinkExt, StreamExt};
mod binary;

use binary::ServerProcess;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Posts one message and sees it, then takes the store's write lock and
/// posts another, which cannot be committed.
async fn one_committed_one_stuck(
    port: u16,
    dir: &std::path::Path,
    run: u8,
) -> rusqlite::Connection {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .expect("connect");
    let say = |t: &str| {
        Message::text(format!(
            r#"{{"type":"send_message","data":{{"text":"{t}"}}}}"#
        ))
    };
    let committed = format!("committed {run}");
    ws.send(say(&committed)).await.expect("send");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains(&format!("\"{committed}\"")) => break,
            Some(Ok(_)) => {}
            other => panic!("no echo: {other:?}"),
        }
    }
    let blocker = rusqlite::Connection::open(dir.join(chat_server::store::DB_FILE)).expect("open");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("write lock");
    ws.send(say("stuck")).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::mem::forget(ws);
    blocker
}

#[tokio::test]
async fn a_first_signal_is_bounded_and_a_second_ends_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");

    // A long grace: the first signal alone would wait it out for the store.
    let mut server = ServerProcess::start(dir.path(), &["--shutdown-grace", "30s"]);
    let port = server.port;
    let blocker = one_committed_one_stuck(port, dir.path(), 1).await;
    server.terminate();
    assert_eq!(
        server.exited_within(Duration::from_secs(1)),
        None,
        "still waiting for the store within its grace"
    );
    let started = Instant::now();
    server.terminate();
    assert_eq!(
        server.exited_within(Duration::from_secs(3)),
        Some(130),
        "the second signal ends it at once"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(blocker);

    // A short grace: the first signal alone ends it, store or no store.
    let mut server = ServerProcess::start(dir.path(), &["--shutdown-grace", "1s"]);
    let port = server.port;
    let blocker = one_committed_one_stuck(port, dir.path(), 2).await;
    server.terminate();
    assert_eq!(
        server.exited_within(Duration::from_secs(4)),
        Some(0),
        "stopped within the grace and a moment, exit 0"
    );
    drop(blocker);

    // What was committed is there; what was stuck was never shown, and
    // is not there either.
    let server = ServerProcess::start(dir.path(), &["--shutdown-grace", "1s"]);
    let port = server.port;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .expect("connect");
    let mut texts = Vec::new();
    // The two committed messages, then nothing: a third would be a stuck one.
    let mut wait = Duration::from_secs(10);
    while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(wait, ws.next()).await {
        texts.push(t.as_str().to_owned());
        if texts.len() == 2 {
            wait = Duration::from_secs(1);
        }
    }
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[0].contains("\"committed 1\""), "{texts:?}");
    assert!(texts[1].contains("\"committed 2\""), "{texts:?}");
    drop(server);
}
