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
    server: &mut ServerProcess,
    dir: &std::path::Path,
    run: u8,
) -> rusqlite::Connection {
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let mut ws = match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => ws,
        Err(e) => panic!("{}", server.failed("connect", e)),
    };
    let say = |t: &str| {
        Message::text(
            chat_proto::ClientFrame::SendMessage(chat_proto::SendMessage {
                text: t.to_owned(),
                author_name: None,
            })
            .encode(),
        )
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
    let blocker = rusqlite::Connection::open(dir.join(chat_server::DB_FILE)).expect("open");
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
    let blocker = one_committed_one_stuck(&mut server, dir.path(), 1).await;
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
    let blocker = one_committed_one_stuck(&mut server, dir.path(), 2).await;
    server.terminate();
    assert_eq!(
        server.exited_within(Duration::from_secs(4)),
        Some(0),
        "stopped within the grace and a moment, exit 0"
    );
    drop(blocker);

    // What was committed is there; what was stuck was never shown, and
    // is not there either.
    let mut server = ServerProcess::start(dir.path(), &["--shutdown-grace", "1s"]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let mut ws = match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => ws,
        Err(e) => panic!("{}", server.failed("connect", e)),
    };
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

/// A client whose socket is full outlives `--shutdown-grace` (its writes
/// may wait `--write-timeout`, 10 s): the server still stops within the
/// grace, resets it, and does not report a commit given up, since every
/// accepted message was written. (It used to log "stopped without writing
/// everything accepted", and leave the connection to its write timeout.)
#[tokio::test]
async fn a_connection_that_outlives_the_grace_is_no_commit_given_up() {
    use std::io::{BufRead, BufReader};
    use std::process::Command;
    let port = binary::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = binary::logging(&[
        "--listen",
        &listen,
        "--in-memory",
        "--shutdown-grace",
        "1s",
        "--message-rate",
        "100000",
    ]);
    let lines = {
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("ws://127.0.0.1:{port}/ws");
    // A client that never reads, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let (stuck, _) = tokio_tungstenite::client_async(&url, stream)
        .await
        .expect("handshake");
    // Enough messages to fill its socket and the server's queue for it.
    let (mut poster, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let text = chat_proto::ClientFrame::SendMessage(chat_proto::SendMessage {
        text: "x".repeat(400),
        author_name: None,
    })
    .encode();
    for _ in 0..2000 {
        poster
            .feed(Message::text(text.clone()))
            .await
            .expect("send");
    }
    poster.flush().await.expect("flush");
    let mut echoed = 0;
    while echoed < 2000 {
        match poster.next().await {
            Some(Ok(Message::Text(_))) => echoed += 1,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let started = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not stopped within the grace and a moment"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let lines = lines.join().expect("log lines");
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("without writing everything accepted")),
        "a false report of a commit given up: {lines:#?}"
    );
    drop(stuck);
}
