//! The WebSocket handshake: the chat's own checks (`crate::admission`),
//! the 101, and the socket split for the connection.

use super::request::{self, Upgrade};
use crate::admission::Admitted;
use crate::http::{self, Refusal};
use crate::shared::Shared;
use crate::wire::delivery::Delivery;
use crate::wire::link::{self, Link, Ws};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::header;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::info;

/// The chat's part of the handshake (`crate::admission`), then the 101,
/// and the socket is a WebSocket.
pub(crate) async fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    upgrade: Box<Upgrade>,
) -> Result<(Ws, Arc<Link>, Admitted), String> {
    let request = &upgrade.head.request;
    let admitted = match shared.not_serving() {
        Some(why) => Err(Refusal::NotServing(why)),
        None => shared.admission.admit(request, peer.ip()),
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            if refusal == Refusal::OriginNotAllowed {
                // The one refusal an operator causes (a proxy that rewrites
                // `Host`, a page on another site) rather than a client:
                // say how to fix it. Header values are logged escaped.
                info!(
                    %peer,
                    origin = ?request.headers().get(header::ORIGIN),
                    host = ?request.headers().get(header::HOST),
                    "browser handshake refused: its Origin is not this server's own (Host); if the page is yours, add it with --allowed-origin"
                );
            }
            request::refuse(&mut stream, &upgrade.head, &refusal, true, shared).await;
            return Err(refusal.to_string());
        }
    };
    match timeout_at(
        upgrade.deadline,
        http::upgrade::switch_protocols(&mut stream, &upgrade.head, &upgrade.key),
    )
    .await
    {
        Err(_) => return Err("handshake timeout".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(())) => {}
    }
    let delivery = Delivery::new(Arc::clone(&shared.delivery), std::time::Instant::now());
    let (io, link) = link::split(
        stream,
        shared.config.read_buffer_size,
        shared.config.outbox_bound(),
        shared.config.reply_queue,
        delivery,
    );
    let ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(shared.config.websocket())).await;
    Ok((ws, link, admitted))
}
