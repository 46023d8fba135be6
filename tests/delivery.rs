//! Delivery to one connection, checked byte by byte on raw sockets:
//! every frame whole, a close after whole frames with nothing after it,
//! and a client that reads slowly but answers pings never closed as idle.

mod support;

use chat_proto::ServerFrame;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::raw::{self, End, RawClient};
use support::{TestServer, test_config};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How a closing client ends its connection, and the close code the
/// server's last frame must carry.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// The client sends a close (1000); the server echoes it.
    ClientClose,
    /// The client sends a text frame that is not UTF-8: 1007.
    InvalidUtf8,
    /// The client sets a reserved bit: 1002.
    ProtocolError,
}

impl Ending {
    fn expected_code(self) -> u16 {
        match self {
            Ending::ClientClose => 1000,
            Ending::InvalidUtf8 => 1007,
            Ending::ProtocolError => 1002,
        }
    }
}

/// Checks what one closing client received: whole frames only, every
/// text frame a server frame, one close frame with `ending`'s code as the
/// very last thing, and an orderly end of the stream.
fn check_ending(received: &[u8], end: End, ending: Ending) -> Result<usize, String> {
    let (frames, tail) = raw::parse(received)?;
    if tail != 0 {
        return Err(format!(
            "the stream ends inside a frame: {tail} bytes after {} whole frames",
            frames.len()
        ));
    }
    let Some((last, data)) = frames.split_last() else {
        return Err("nothing arrived".into());
    };
    if last.close_code() != Some(ending.expected_code()) {
        return Err(format!(
            "the last frame is not a close with {}: {:?} (opcode {:#x}); {} frames before it",
            ending.expected_code(),
            last.close_code(),
            last.opcode,
            data.len()
        ));
    }
    for (i, frame) in data.iter().enumerate() {
        match frame.opcode {
            raw::TEXT => {
                let text = std::str::from_utf8(&frame.payload)
                    .map_err(|_| format!("frame {i} is not UTF-8"))?;
                ServerFrame::decode(text).map_err(|e| format!("frame {i}: {e}"))?;
            }
            raw::PING => {}
            raw::CLOSE => return Err(format!("a close frame at {i}, and more after it")),
            other => return Err(format!("frame {i} has opcode {other:#x}")),
        }
        if !frame.fin {
            return Err(format!("frame {i} is a fragment"));
        }
    }
    if end != End::Eof {
        return Err(format!("the stream ended with {end:?}, not an orderly FIN"));
    }
    Ok(data.len())
}

/// One client that reads a few frames, then ends its connection as
/// `ending` says, waits, and reads to the end.
async fn close_once(server: &TestServer, n: u8, ending: Ending) -> Result<usize, String> {
    // A small receive buffer: once the client stops reading, the server's
    // writes back up at once, and a close meets a full socket.
    let mut client = RawClient::connect(server, n, "/ws", Some(4096)).await;
    client.read_frames(3).await;
    let sent = match ending {
        Ending::ClientClose => client.send_close(1000).await,
        Ending::InvalidUtf8 => client.send(0x80 | raw::TEXT, &[0xff, 0xfe, 0xfd]).await,
        Ending::ProtocolError => client.send(0x80 | 0x40 | raw::TEXT, b"rsv1").await,
    };
    sent.map_err(|e| format!("could not send: {e}"))?;
    // Publishing goes on meanwhile.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let end = client.read_to_end(Duration::from_secs(20)).await;
    check_ending(&client.received, end, ending)
}

/// Three clients publish as fast as they may while hundreds of others
/// close, each with a full socket: every close comes after whole frames,
/// and nothing comes after it. (Before the connection's delivery became
/// one state machine, about one close in ten ended inside a data frame,
/// with no close frame.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_under_live_publishing_comes_after_whole_frames_and_ends_the_stream() {
    const CLOSES: usize = 200;
    const AT_ONCE: usize = 25;
    let config = chat_server::Config {
        message_rate: 1_000_000,
        history_limit: 20,
        ..test_config()
    };
    let server = Arc::new(TestServer::start(config).await);
    let running = Arc::new(AtomicBool::new(true));
    // The publishers run on a thread of their own, so that the closers
    // cannot slow them down: 3 clients, 32 messages per flush.
    let publishers = {
        let running = Arc::clone(&running);
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for n in 2..=4u8 {
                    let client = server.client(n).await;
                    let (mut sink, mut stream) = client.ws.split();
                    let running = Arc::clone(&running);
                    tasks.push(tokio::spawn(async move {
                        let text = support::say(&"x".repeat(400)).encode();
                        while running.load(Ordering::Relaxed) {
                            for _ in 0..32 {
                                if sink.feed(WsMessage::text(text.clone())).await.is_err() {
                                    return;
                                }
                            }
                            if sink.flush().await.is_err() {
                                return;
                            }
                        }
                    }));
                    // Its own echoes are read, so that it is never dropped
                    // as slow.
                    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                }
                for task in tasks {
                    task.await.expect("publisher");
                }
            });
        })
    };
    let endings = [
        Ending::ClientClose,
        Ending::ClientClose,
        Ending::InvalidUtf8,
        Ending::ProtocolError,
    ];
    let mut failures = Vec::new();
    for wave in 0..CLOSES / AT_ONCE {
        let mut closers = Vec::new();
        for k in 0..AT_ONCE {
            let i = wave * AT_ONCE + k;
            let ending = endings[i % endings.len()];
            let server = Arc::clone(&server);
            // Addresses 127.0.0.10 ..= 127.0.0.209.
            let n = 10 + u8::try_from(i % 200).expect("an address");
            closers.push(tokio::spawn(async move {
                (i, ending, close_once(&server, n, ending).await)
            }));
        }
        for closer in closers {
            let (i, ending, result) = closer.await.expect("closer");
            if let Err(why) = result {
                failures.push(format!("close {i} ({ending:?}): {why}"));
            }
        }
    }
    running.store(false, Ordering::Relaxed);
    publishers.join().expect("publishers");
    assert!(
        failures.is_empty(),
        "{} of {CLOSES} closes were not clean:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.still_serves().await;
}

/// A client that reads a long history slowly, and answers every ping, is
/// not closed for idleness: the server pings it during the replay, and a
/// socket that keeps taking bytes shows the client is there. (It used to
/// be closed with 1008 "idle timeout" after the data, never pinged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_to_a_client_that_answers_pings_is_not_closed_as_idle() {
    const HISTORY: usize = 400;
    let config = chat_server::Config {
        message_rate: 1_000_000,
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(800),
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let mut author = server.client(2).await;
    for i in 0..HISTORY {
        author.say(&format!("{i:>300}")).await;
    }
    for _ in 0..HISTORY {
        author.message().await;
    }
    drop(author);
    // A small receive buffer, and 100 frames a second: the replay takes
    // four seconds, five times the idle timeout.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(server.addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(server.url("/ws"), stream)
        .await
        .expect("handshake");
    let (mut messages, mut pings) = (0, 0);
    let quiet_after = tokio::time::Instant::now() + Duration::from_secs(30);
    // The history, then two idle seconds (answering pings) after it.
    let mut idle_until = None;
    loop {
        if idle_until.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = idle_until.unwrap_or(quiet_after);
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) if idle_until.is_some() => break,
            Err(_) => panic!("the history did not arrive; {messages} messages"),
            Ok(next) => next,
        };
        // tungstenite answers the ping on the next read.
        match next {
            Some(Ok(WsMessage::Text(_))) => {
                messages += 1;
                if messages == HISTORY {
                    idle_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                }
            }
            Some(Ok(WsMessage::Ping(_))) => pings += 1,
            Some(Ok(WsMessage::Close(frame))) => {
                panic!("closed after {messages} messages and {pings} pings: {frame:?}")
            }
            other => panic!("after {messages} messages and {pings} pings: {other:?}"),
        }
    }
    assert_eq!(messages, HISTORY);
    assert!(pings >= 3, "only {pings} pings in six seconds");
    // Still open: it can chat.
    ws.send(WsMessage::text(support::say("still here").encode()))
        .await
        .expect("send");
    loop {
        match tokio::time::timeout(support::PATIENCE, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) if t.contains("still here") => break,
            Ok(Some(Ok(WsMessage::Text(_) | WsMessage::Ping(_)))) => {}
            other => panic!("{other:?}"),
        }
    }
}
