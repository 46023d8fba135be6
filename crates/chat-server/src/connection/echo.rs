//! Conformance mode (`--echo`): every data message goes straight back,
//! through the same handshake, limits, timeouts and close handling as the
//! chat, so a WebSocket test suite (Autobahn) exercises the real server.

use crate::wire::close::CloseReason;
use crate::wire::link::{Link, Ws};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Echoes until the connection ends, and says why it did. tungstenite
/// frames each echo (and its answers to pings and close frames) into the
/// connection's outbox; each is written out before the next frame is read.
/// A client silent for `idle_timeout` is closed, and so is one whose
/// socket does not take an echo within `write_timeout`.
pub(crate) async fn run(
    ws: &mut Ws,
    link: &Link,
    stop: &CancellationToken,
    idle_timeout: Duration,
    write_timeout: Duration,
) -> CloseReason {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return CloseReason::Shutdown,
            next = timeout(idle_timeout, ws.next()) => match next {
                Err(_) => return CloseReason::IdleTimeout,
                Ok(None) => return CloseReason::ClientClosed,
                Ok(Some(Err(e))) => return CloseReason::from_read_error(&e),
                Ok(Some(Ok(m))) => m,
            },
        };
        let deadline = Instant::now() + write_timeout;
        // What reading wrote (a pong, a close's answer) goes out first,
        // so that the outbox takes the echo whole.
        if !link.flush(|| deadline).await {
            return CloseReason::Stalled;
        }
        match message {
            Message::Text(_) | Message::Binary(_) => {
                match tokio::time::timeout_at(deadline, ws.send(message)).await {
                    Err(_) => return CloseReason::Stalled,
                    Ok(Err(e)) => return CloseReason::from_write_error(e),
                    Ok(Ok(())) => {}
                }
            }
            Message::Close(_) => return CloseReason::ClientClosed,
            _ => continue,
        }
        if !link.flush(|| deadline).await {
            return CloseReason::Stalled;
        }
    }
}
