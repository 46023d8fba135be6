//! One accepted TCP connection: its plain HTTP requests, its WebSocket
//! handshake, then its life as a client of the chat (`crate::connection`).

use super::request::{self, Next};
use super::upgrade;
use crate::admission::Admitted;
use crate::admission::limits::AddressSlot;
use crate::connection;
use crate::shared::Shared;
use crate::wire::close::CloseReason;
use crate::wire::link::{Link, Ws};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, error, info};

/// Serves one accepted TCP connection until it closes. `permit` is its
/// place under the server's connection limit.
///
/// Every connection's task is sized by this future, so it holds only what
/// the connection's life needs: the request and handshake phases run in a
/// box of their own ([`accept`]), freed once done, and this is not an
/// `async fn`, whose arguments would be stored twice (see
/// `crate::connection::run`).
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    pending: Option<AddressSlot>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> {
    let accept = Box::pin(accept(stream, peer, pending, Arc::clone(&shared)));
    async move {
        let Some((ws, link, admitted)) = accept.await else {
            return;
        };
        info!(user = %admitted.user, %peer, client = %admitted.addr, "connection opened");
        shared.metrics.connection_opened();
        // Boxed, so that the task is sized for the request phase and the
        // box for the connection's life (the sizes are measured by the
        // test below).
        let reason = Box::pin(connection::run(ws, link, &admitted, &shared)).await;
        shared.metrics.connection_closed(&reason);
        if let CloseReason::ServerError(_) = reason {
            error!(user = %admitted.user, %peer, reason = %reason, "connection closed by a server-side error");
        } else {
            info!(user = %admitted.user, %peer, reason = %reason, "connection closed");
        }
        // The place is given back only now.
        drop(permit);
    }
}

/// The request phase, then the handshake: the WebSocket, or `None` when
/// the connection ended (plain HTTP requests answered, or refused). The
/// per-address place of the request phase (`pending`) is given back when
/// it ends.
async fn accept(
    mut stream: TcpStream,
    peer: SocketAddr,
    pending: Option<AddressSlot>,
    shared: Arc<Shared>,
) -> Option<(Ws, Arc<Link>, Admitted)> {
    // Frames are coalesced by the writer; Nagle would only add delay.
    let _ = stream.set_nodelay(true);
    // Bound what the kernel holds for a client that stops reading, and
    // what it holds unsent (the rest waits in the connection's delivery).
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_send_buffer_size(shared.config.socket_send_buffer);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_notsent_lowat(shared.config.socket_unsent_bytes);
    // Plain HTTP requests are answered first; a well-formed WebSocket
    // upgrade comes back here with its head still unread.
    let upgrade = match request::serve(&mut stream, peer.ip(), pending.as_ref(), &shared).await {
        Next::Upgrade(upgrade) => upgrade,
        Next::Done => return None,
    };
    match upgrade::handshake(stream, peer, &shared, upgrade).await {
        Ok(done) => Some(done),
        Err(why) => {
            debug!(%peer, %why, "handshake refused");
            None
        }
    }
}

/// Refuses a connection that arrived while the server was full, with a 503
/// to whatever it asked.
pub(crate) async fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let _permit = permit;
    request::refuse_full(&mut stream, &shared).await;
    debug!(%peer, "refused: server full");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn returns<A, B, C, D, E, F: Future>(_: fn(A, B, C, D, E) -> F) -> usize {
        size_of::<F>()
    }

    /// [`returns`], for a function of four arguments.
    fn returns4<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        size_of::<F>()
    }

    /// Every connection's task is this future for its whole life, so it is
    /// kept small: the request phase and the connection's life are boxes
    /// of their own. `--nocapture` prints the sizes this compiler makes.
    #[test]
    fn a_connections_task_holds_its_phases_in_boxes() {
        let task = returns(serve);
        let request_phase = returns4(accept);
        let life = returns4(connection::run);
        println!("task {task} bytes, request phase {request_phase}, life {life}");
        assert!(
            task < life && task < request_phase,
            "the task ({task} bytes) holds its phases inline"
        );
        assert!(task <= 512, "the task grew to {task} bytes");
    }
}
