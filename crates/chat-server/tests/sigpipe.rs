//! The server is a library too, and a host process may leave SIGPIPE at
//! its default (Rust programs ignore it at start; a host written in
//! another language, or one that restored the default, dies of it). So
//! the server must never raise it: every write to a client's socket says
//! `MSG_NOSIGNAL`. Here a handler notes any SIGPIPE while clients reset
//! their connections under live publishing, so that the publisher and
//! the writers meet sockets whose peer is gone. (Its own test binary: a
//! signal handler belongs to the whole process.)

use chat_proto::{ClientFrame, SendMessage};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_reset_under_publishing_raise_no_sigpipe() {
    let raised = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGPIPE, Arc::clone(&raised))
        .expect("a SIGPIPE handler");
    let config = chat_server::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        in_memory: true,
        identity: chat_server::IdentityMode::RawIp,
        message_rate: 1_000_000,
        max_connections_per_ip: 1_000,
        ..chat_server::Config::default()
    };
    let server = chat_server::Server::bind(config).await.expect("bind");
    let addr = server.local_addr();
    let stop = server.shutdown_handle();
    let running = tokio::spawn(server.run());

    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let publishing = Arc::clone(&publishing);
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("publisher");
        let (mut sink, mut stream) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        tokio::spawn(async move {
            let text = ClientFrame::SendMessage(SendMessage {
                text: "x".repeat(400),
                author_name: None,
            })
            .encode();
            while publishing.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    sink.feed(Message::text(text.clone())).await.expect("send");
                }
                sink.flush().await.expect("flush");
            }
        })
    };
    // Clients that keep up (so the publisher writes to their sockets
    // itself) and then reset their connection (RST, not FIN) while frames
    // keep coming: the publisher's next write meets ECONNRESET, and any
    // write after it EPIPE.
    let reset = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let mut wave = Vec::new();
        for _ in 0..30 {
            let reset = Arc::clone(&reset);
            wave.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let (mut ws, _) =
                    tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
                        .await
                        .expect("handshake");
                let reading = tokio::time::Instant::now() + Duration::from_millis(100);
                while tokio::time::timeout_at(reading, ws.next()).await.is_ok() {}
                let stream = ws.into_inner();
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger");
                drop(stream);
                reset.fetch_add(1, Ordering::Relaxed);
            }));
        }
        for client in wave {
            client.await.expect("client");
        }
    }
    // Frames keep being published to whatever is left of them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    publishing.store(false, Ordering::Relaxed);
    publisher.await.expect("publisher");
    assert_eq!(reset.load(Ordering::Relaxed), 300);
    assert!(
        !raised.load(Ordering::SeqCst),
        "the server raised SIGPIPE writing to a reset connection"
    );
    stop.cancel();
    running.await.expect("the server stops");
}
