//! Conformance mode (`--echo`): every data message goes straight back,
//! through the same handshake, limits, timeouts and close handling as the
//! chat, so a WebSocket test suite (Autobahn) exercises the real server.

use crate::Shared;
use crate::close::CloseReason;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

/// Echoes until the connection ends, and says why it did.
pub(crate) async fn run(
    stream: &mut SplitStream<Ws>,
    sink: &mut SplitSink<Ws, Message>,
    shared: &Shared,
) -> CloseReason {
    loop {
        let message = tokio::select! {
            () = shared.shutdown.cancelled() => return CloseReason::Shutdown,
            next = timeout(shared.config.idle_timeout, stream.next()) => match next {
                Err(_) => return CloseReason::IdleTimeout,
                Ok(None) => return CloseReason::ClientClosed,
                Ok(Some(Err(e))) => return CloseReason::from_read_error(&e),
                Ok(Some(Ok(m))) => m,
            },
        };
        if let Message::Text(_) | Message::Binary(_) = message {
            match timeout(shared.config.write_timeout, sink.send(message)).await {
                Err(_) => return CloseReason::Stalled,
                Ok(Err(e)) => return CloseReason::from_write_error(e),
                Ok(Ok(())) => {}
            }
        }
    }
}
