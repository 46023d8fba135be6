//! Hostile and broken clients: each gets its documented answer, and the
//! server goes on serving everyone else.

mod support;

use chat_loadgen::http::read_response;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use support::{PATIENCE, TestServer, eventually, say, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// "At once" for a close that tests set a 30 s handshake timeout against.
const AT_ONCE: Duration = Duration::from_secs(5);

/// Asserts that the server closes `stream` within `within`, sending
/// nothing first.
async fn closed_without_a_word(stream: &mut tokio::net::TcpStream, within: Duration) {
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .expect("the server hangs up by itself, in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
}

fn http_status(err: WsError) -> u16 {
    match err {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.client(2).await;
    let huge = "x".repeat(17 * 1024);
    c.send_text(&format!(
        r#"{{"type":"send_message","data":{{"text":"{huge}"}}}}"#
    ))
    .await;
    let close = c.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_frame_just_under_the_limit_is_read_and_refused_by_the_rules() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.client(2).await;
    let big = "x".repeat(16 * 1024 - 64);
    c.send_text(&format!(
        r#"{{"type":"send_message","data":{{"text":"{big}"}}}}"#
    ))
    .await;
    assert_eq!(c.error().await, "message too long (max 500 characters)");
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.client(2).await;
    let frame = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    let close = c.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Invalid);
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_paths_get_404() {
    let server = TestServer::start(test_config()).await;
    for path in ["/", "/chat", "/ws/extra", "/WS"] {
        let err = server
            .try_client(2, path, &[])
            .await
            .err()
            .expect("refused");
        assert_eq!(http_status(err), 404, "{path}");
    }
    assert!(server.try_client(2, "/ws?token=abc", &[]).await.is_ok());
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_disallowed_origin_gets_403() {
    let mut config = test_config();
    config.allowed_origins = vec!["https://chat.example".parse().expect("origin")];
    let server = TestServer::start(config).await;
    let err = server
        .try_client(2, "/ws", &[("origin", "https://evil.example")])
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(err), 403);
    assert!(
        server
            .try_client(2, "/ws", &[("origin", "https://chat.example")])
            .await
            .is_ok()
    );
    assert!(
        server.try_client(2, "/ws", &[]).await.is_ok(),
        "no Origin: not a browser"
    );
    server.shutdown().await;
}

/// Without `--allowed-origin`, the page the server serves connects and a
/// page from anywhere else cannot post as its visitor.
#[tokio::test]
async fn by_default_only_the_servers_own_page_connects() {
    let server = TestServer::start(test_config()).await;
    let own = format!("http://{}", server.addr);
    let mut client = server
        .try_client(2, "/ws", &[("origin", own.as_str())])
        .await
        .expect("the server's own page connects");
    client.say("from the served page").await;
    assert_eq!(client.message().await.text, "from the served page");
    for foreign in [
        "https://evil.example",
        "null",
        &format!("http://127.0.0.1:{}", server.addr.port() ^ 1),
    ] {
        let err = server
            .try_client(3, "/ws", &[("origin", foreign)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{foreign} must be refused"));
        assert_eq!(http_status(err), 403, "{foreign}");
    }
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_dropped() {
    let mut config = test_config();
    config.handshake_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut silent = server.tcp_from(2).await;
    let mut half = server.tcp_from(3).await;
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    // A plain HTTP request head gets the same bound.
    let mut half_page = server.tcp_from(4).await;
    half_page
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    for sock in [&mut silent, &mut half, &mut half_page] {
        closed_without_a_word(sock, PATIENCE).await;
    }
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_hold_many_silent_connections() {
    let mut config = test_config();
    config.max_pending_per_ip = 2;
    // Long enough that only the pending limit can explain a quick close.
    config.handshake_timeout = Duration::from_secs(30);
    config.trusted_proxies = vec!["127.0.0.4/32".parse().expect("net")];
    let server = TestServer::start(config).await;
    let silent: Vec<_> = futures_util::future::join_all((0..2).map(|_| server.tcp_from(2))).await;
    let mut third = server.tcp_from(2).await;
    closed_without_a_word(&mut third, AT_ONCE).await;
    // Other addresses are not affected, and a trusted proxy is exempt.
    let _other = server.client(3).await;
    let _proxied: Vec<_> = futures_util::future::join_all((0..3).map(|_| server.tcp_from(4))).await;
    let _via_proxy = server.client(4).await;
    // The slots free when the silent connections go.
    drop(silent);
    eventually("the pending slots free", || async {
        server.try_client(2, "/ws", &[]).await.is_ok()
    })
    .await;
    server.shutdown().await;
}

/// Behind a NAT many people share one address, and their browsers keep
/// connections open between requests. Such an idle keep-alive connection
/// gives its place to a new connection from the same address, longest idle
/// first; connections not yet answered never do (see above).
#[tokio::test]
async fn idle_keep_alive_connections_make_room_for_new_ones() {
    let mut config = test_config();
    config.max_pending_per_ip = 2;
    config.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(config).await;
    let fetch = async |stream: &mut tokio::net::TcpStream| {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        tokio::time::timeout(PATIENCE, read_response(stream))
            .await
            .expect("an answer in time")
            .expect("a response")
            .status
    };
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut browser = server.tcp_from(2).await;
        assert_eq!(fetch(&mut browser).await, 200);
        kept.push(browser);
    }
    // Both places are held by idle connections: a newcomer is served...
    let mut newcomer = server.tcp_from(2).await;
    assert_eq!(fetch(&mut newcomer).await, 200);
    // ...and the longest idle connection was closed for it.
    closed_without_a_word(&mut kept[0], AT_ONCE).await;
    // A WebSocket client from the address gets in the same way.
    let mut chatter = server.client(2).await;
    chatter.say("behind the NAT").await;
    assert_eq!(chatter.message().await.text, "behind the NAT");
    closed_without_a_word(&mut kept[1], AT_ONCE).await;
    // The newcomer, idle now, still serves its next request.
    assert_eq!(fetch(&mut newcomer).await, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_refused() {
    let server = TestServer::start(test_config()).await;
    let mut sock = server.tcp_from(2).await;
    sock.write_all(&[0u8; 4096]).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, sock.read_to_end(&mut buf))
        .await
        .expect("closed");
    let reply = String::from_utf8_lossy(&buf);
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(reply.contains("connection: close\r\n"), "{reply}");
    assert!(reply.ends_with("malformed HTTP request\n"), "{reply}");
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn abrupt_disconnects_do_not_disturb_the_server() {
    let server = TestServer::start(test_config()).await;
    let mut watcher = server.client(9).await;
    for n in 2..12u8 {
        let mut c = server.client(n).await;
        c.say("bye").await;
        // Drop the TCP connection without a close frame, mid-conversation.
        drop(c);
    }
    for _ in 2..12 {
        assert_eq!(watcher.message().await.text, "bye");
    }
    server.still_serves().await;
    server.shutdown().await;
}

/// Sends `frame` raw and returns the close frame the server answers with.
async fn close_answer(server: &TestServer, frame: Frame) -> Option<CloseFrame> {
    let mut c = server.client(2).await;
    c.ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    loop {
        match tokio::time::timeout(PATIENCE, c.ws.next())
            .await
            .expect("an answer in time")
        {
            Some(Ok(Message::Close(answer))) => return answer,
            Some(Ok(_)) => continue,
            other => panic!("closed without a close frame: {other:?}"),
        }
    }
}

/// The closing handshake as the README documents it: the client's close is
/// answered with its own code (RFC 6455, 5.5.1: an endpoint echoes the code
/// it received), a close with no code with none, and a close with a code
/// the RFC does not allow with 1002 `Protocol violation`, the same words as
/// every other 1002.
#[tokio::test]
async fn a_close_is_answered_as_documented() {
    let server = TestServer::start(test_config()).await;
    let close = |code: u16| {
        Frame::close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        }))
    };
    for code in [1000, 1001, 3000, 4999] {
        let answer = close_answer(&server, close(code)).await.expect("a code");
        assert_eq!(u16::from(answer.code), code, "echoed");
    }
    assert_eq!(close_answer(&server, Frame::close(None)).await, None);
    for invalid in [999, 1005, 1006, 1016, 2999, 5000] {
        let answer = close_answer(&server, close(invalid)).await.expect("a code");
        assert_eq!(answer.code, CloseCode::Protocol, "{invalid}");
        assert_eq!(answer.reason.as_str(), "Protocol violation", "{invalid}");
    }
    // The server's own 1002, for a frame with a reserved bit set.
    let mut reserved = Frame::message("{}", OpCode::Data(Data::Text), true);
    reserved.header_mut().rsv1 = true;
    let answer = close_answer(&server, reserved).await.expect("a code");
    assert_eq!(answer.code, CloseCode::Protocol);
    assert_eq!(answer.reason.as_str(), "Protocol violation");
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn connections_per_address_are_limited_with_429() {
    let mut config = test_config();
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let a = server.client(2).await;
    let _b = server.client(2).await;
    let err = server
        .try_client(2, "/ws", &[])
        .await
        .err()
        .expect("third refused");
    assert_eq!(http_status(err), 429);
    let _other = server.client(3).await;
    drop(a);
    // The slot frees once the server has seen the disconnect.
    eventually("the address slot frees", || async {
        server.try_client(2, "/ws", &[]).await.is_ok()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_total_connection_limit_answers_503() {
    let mut config = test_config();
    config.max_connections = 2;
    let server = TestServer::start(config).await;
    let _a = server.client(2).await;
    let _b = server.client(3).await;
    let err = server
        .try_client(4, "/ws", &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(err), 503);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_dropped_with_1008() {
    let mut config = test_config();
    config.ping_interval = Duration::from_millis(100);
    config.idle_timeout = Duration::from_millis(400);
    let server = TestServer::start(config).await;
    // A client that keeps reading answers pings automatically and stays.
    let mut live = server.client(2).await;
    let mut mute = server.client(3).await;
    // Reading (and so answering pings) for longer than the idle timeout.
    live.quiet_for(Duration::from_millis(900)).await;
    live.say("still here").await;
    assert_eq!(live.message().await.text, "still here");
    // The mute one never polled its socket, so it never sent a pong.
    let close = mute.closed().await.expect("close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "idle timeout");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_others_keep_up() {
    // 2 KB frames, 12 MB in all: more than the kernel buffers between
    // the server and a client that never reads (4 MB send buffer here).
    const SENT: usize = 6_000;
    let mut config = test_config();
    config.message_rate = 1_000_000;
    config.log_events = 64;
    config.write_timeout = Duration::from_millis(500);
    config.history_limit = 100;
    let server = TestServer::start(config).await;

    // Its kernel receive buffer is tiny, so the server's writes back up fast.
    let mut slow = server.tight_client(9, "/ws").await;

    let mut reader = server.client(3).await;
    let mut sender = server.client(2).await;
    let text = "😀".repeat(500);
    // Sent in rounds that the reading clients keep up with, so only the
    // one that never reads falls behind.
    for _ in 0..SENT / 30 {
        for _ in 0..30 {
            sender.send(&say(&text)).await;
        }
        for _ in 0..30 {
            sender.message().await;
            reader.message().await;
        }
    }

    // The slow client was cut off: when it finally reads, it finds fewer
    // than all messages and then the end of the connection.
    let mut got = 0;
    let close = loop {
        match slow.next().await {
            support::Seen::Frame(_) => got += 1,
            support::Seen::Closed(c) => break c,
        }
    };
    assert!(
        got < SENT,
        "the slow client was not dropped (got all {got})"
    );
    if let Some(close) = close {
        assert_eq!(close.code, CloseCode::Again, "{close:?}");
    }
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_spraying_junk_is_closed_with_1008() {
    let mut config = test_config();
    config.max_refusals = 20;
    let server = TestServer::start(config).await;
    let mut junk = server.client(2).await;
    let mut bystander = server.client(3).await;
    for _ in 0..60 {
        // Sending may fail once the server has closed; that is the point.
        if junk.ws.send(Message::text("{junk")).await.is_err() {
            break;
        }
    }
    let mut errors = 0;
    let close = loop {
        match junk.next().await {
            support::Seen::Frame(chat_proto::ServerFrame::Error(_)) => errors += 1,
            support::Seen::Frame(other) => panic!("{other:?}"),
            support::Seen::Closed(c) => break c,
        }
    };
    assert_eq!(errors, 20, "every refusal within the budget is answered");
    let close = close.expect("close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "too many refused frames");
    // Everyone else is unaffected.
    bystander.say("still fine").await;
    assert_eq!(bystander.message().await.text, "still fine");
    server.shutdown().await;
}
