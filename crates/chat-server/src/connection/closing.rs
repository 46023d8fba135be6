//! The close: after whole frames, within `--write-timeout`, and then the
//! client's close read back.

use crate::shared::Shared;
use crate::wire::close::CloseReason;
use crate::wire::link::{Link, Ws};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout_at};

/// Ends the connection for `reason`, and says whether everything was
/// written (false: reset the socket).
///
/// The close frame comes after whole frames, and nothing comes after it:
/// the delivery drops the log's frames not yet begun, finishes the one
/// begun, and takes nothing more from the log (`Delivery::close`).
/// Then the closing handshake: our close frame (or tungstenite's answer
/// to the client's), written within `--write-timeout` (or what is left of
/// `--shutdown-grace`), then, when the server closed, the client's close
/// read back, so that the client reads our close frame before the TCP
/// connection goes away.
pub(crate) async fn close(ws: &mut Ws, link: &Link, reason: &CloseReason, shared: &Shared) -> bool {
    match reason {
        // Nothing more can reach a client that is gone.
        CloseReason::PeerGone => return true,
        // Its socket took nothing for --write-timeout: waiting longer for
        // it to take a close frame would only hold the buffer.
        CloseReason::Stalled => return false,
        _ => {}
    }
    let deadline = shared.closing_deadline(Instant::now() + shared.config.write_timeout);
    {
        let mut delivery = link.delivery();
        delivery.close(deadline.into_std());
        // What tungstenite wrote so far, so that its outbox takes the
        // close frame whole.
        link.take_outbox(&mut delivery, true);
    }
    let frame = reason.close_frame();
    let server_closed = frame.is_some();
    let _ = timeout_at(deadline, async {
        match frame {
            // tungstenite frames our close (and knows it was sent).
            Some(frame) => ws.close(Some(frame)).await,
            // The client closed: tungstenite writes its answer.
            None => ws.flush().await,
        }
    })
    .await;
    if !link.flush(|| shared.closing_deadline(deadline)).await {
        return false;
    }
    if server_closed {
        let _ = timeout_at(deadline, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
    true
}
