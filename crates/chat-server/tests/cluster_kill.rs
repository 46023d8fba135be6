//! A cluster node killed with SIGKILL behind a real nginx: the real binary,
//! a real `nats-server`, a real nginx.
//!
//! Two nodes serve one chat. A client on node a follows it with `?sync`;
//! node a is killed mid-chat, so the client's socket just dies (no close
//! frame). The chat goes on through node b. The client comes back through
//! nginx, which can only send it to node b, resumes with `?since=&epoch=`,
//! and must then have seen every confirmed message exactly once, in order.
//! Node a is restarted with its data directory and must compute the same
//! chat as node b from its own snapshot and the stream.

#[allow(dead_code, unreachable_pub)]
#[path = "../../../tests/support/nats.rs"]
mod nats;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../tests/support/nginx.rs"]
mod nginx;

mod binary;

use binary::ServerProcess;
use chat_proto::{ClientFrame, Message, SendMessage, ServerFrame, SyncPoint};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A node of the cluster on `nats`, its data in `dir`, trusting nginx's
/// `X-Forwarded-For`.
fn node(nats: &nats::NatsServer, name: &str, dir: &Path, port: u16) -> ServerProcess {
    ServerProcess::start_on(
        dir,
        port,
        &[
            "--cluster",
            &nats.url(),
            "--node-id",
            name,
            "--identity",
            "raw-ip",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--cluster-snapshot-every",
            "5",
        ],
    )
}

/// Waits until the node at `port` says it serves.
async fn serving(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "node on {port} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client from `127.0.0.<n>` to `port` (a node, or nginx).
async fn connect(port: u16, n: u8, path: &str) -> Ws {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, n], 0)))
        .expect("bind");
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{port}{path}");
    tokio_tungstenite::client_async(url, stream)
        .await
        .expect("handshake")
        .0
}

/// The next frame, or `None` once the connection is gone.
async fn frame(ws: &mut Ws) -> Option<ServerFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame within 20 s")
        {
            Some(Ok(WsMessage::Text(t))) => {
                return Some(ServerFrame::decode(&t).expect("server frames decode"));
            }
            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Messages up to the next `sync`.
async fn until_sync(ws: &mut Ws) -> (Vec<Message>, SyncPoint) {
    let mut messages = Vec::new();
    loop {
        match frame(ws).await.expect("the connection lives") {
            ServerFrame::Message(m) => messages.push(m),
            ServerFrame::Sync(s) => return (messages, s),
            other => panic!("{other:?}"),
        }
    }
}

/// Says `text` and waits for its broadcast: confirmed by the cluster.
async fn say(ws: &mut Ws, text: &str) {
    let frame = ClientFrame::SendMessage(SendMessage {
        text: text.into(),
        author_name: None,
    });
    ws.send(WsMessage::text(frame.encode()))
        .await
        .expect("send");
    loop {
        match frame_of(ws).await {
            ServerFrame::Message(m) if m.text == text => return,
            ServerFrame::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

async fn frame_of(ws: &mut Ws) -> ServerFrame {
    frame(ws).await.expect("the connection lives")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_behind_nginx_its_client_resumes_on_another_and_it_comes_back_the_same() {
    let nats = nats::NatsServer::start();
    let dir_a = tempfile::tempdir().expect("dir");
    let dir_b = tempfile::tempdir().expect("dir");
    let (port_a, port_b) = (binary::free_port(), binary::free_port());
    let mut a = node(&nats, "a", dir_a.path(), port_a);
    let b = node(&nats, "b", dir_b.path(), port_b);
    serving(port_a).await;
    serving(port_b).await;
    let nginx = nginx::Nginx::start(&[
        SocketAddr::from(([127, 0, 0, 1], port_a)),
        SocketAddr::from(([127, 0, 0, 1], port_b)),
    ]);

    // A follower on node a, a sender on node b.
    let mut follower = connect(port_a, 2, "/ws?sync").await;
    let (history, start) = until_sync(&mut follower).await;
    assert!(history.is_empty());
    assert_eq!(start.position.0, 0);
    let mut sender = connect(port_b, 3, "/ws").await;
    let mut confirmed = Vec::new();
    for i in 0..12 {
        let text = format!("before the kill {i}");
        say(&mut sender, &text).await;
        confirmed.push(text);
    }
    // The follower reads some of it, then node a dies under it.
    let mut seen: Vec<String> = Vec::new();
    let mut last = loop {
        match frame_of(&mut follower).await {
            ServerFrame::Message(m) => seen.push(m.text),
            ServerFrame::Sync(s) if seen.len() >= 6 => break s,
            ServerFrame::Sync(_) => {}
            other => panic!("{other:?}"),
        }
    };
    a.kill().expect("SIGKILL node a");
    a.wait().expect("node a is gone");
    assert!(
        dir_a.path().join("cluster-chat.snapshot.json").exists(),
        "node a wrote its own snapshot while it ran"
    );
    // Its socket just ends: no close frame from a dead process.
    loop {
        match frame(&mut follower).await {
            None => break,
            Some(ServerFrame::Message(m)) => seen.push(m.text),
            Some(ServerFrame::Sync(s)) => last = s,
            Some(other) => panic!("{other:?}"),
        }
    }
    // Only what a sync covers counts as received; the rest comes again.
    seen.truncate(usize::try_from(last.position.0).expect("small"));

    // The chat goes on through node b while a is gone.
    for i in 0..5 {
        let text = format!("while a is dead {i}");
        say(&mut sender, &text).await;
        confirmed.push(text);
    }

    // Back through nginx, which can only reach node b now: exactly what
    // was missed, once, in order.
    let path = format!("/ws?since={}&epoch={}", last.position, last.epoch);
    let mut back = connect(nginx.port, 2, &path).await;
    while seen.len() < confirmed.len() {
        let (missed, sync) = until_sync(&mut back).await;
        seen.extend(missed.into_iter().map(|m| m.text));
        last = sync;
    }
    assert_eq!(seen, confirmed);
    assert_eq!(
        last.position.0,
        u64::try_from(confirmed.len()).expect("small")
    );

    // Node a comes back with its data directory and computes the same
    // chat: the same history, epoch and position as node b.
    let a = node(&nats, "a", dir_a.path(), port_a);
    serving(port_a).await;
    let (on_a, at_a) = until_sync(&mut connect(port_a, 9, "/ws?sync").await).await;
    let (on_b, at_b) = until_sync(&mut connect(port_b, 9, "/ws?sync").await).await;
    assert_eq!(at_a, at_b);
    assert_eq!(at_a, last);
    assert_eq!(format!("{on_a:?}"), format!("{on_b:?}"));
    drop((a, b, nginx));
}
