//! WebSocket clients of a server process, from chosen loopback addresses.

use chat_proto::{ClientFrame, Message, SendMessage, ServerFrame, SyncPoint};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A client's socket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A client from `127.0.0.<n>` to `port` (a node, or nginx).
pub async fn connect(port: u16, n: u8, path: &str) -> Ws {
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
pub async fn frame(ws: &mut Ws) -> Option<ServerFrame> {
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
pub async fn until_sync(ws: &mut Ws) -> (Vec<Message>, SyncPoint) {
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
pub async fn say(ws: &mut Ws, text: &str) {
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

pub async fn frame_of(ws: &mut Ws) -> ServerFrame {
    frame(ws).await.expect("the connection lives")
}
