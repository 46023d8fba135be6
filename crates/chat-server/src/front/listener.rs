//! The accept loop: limits, then one task per connection.
//!
//! A connection from an address that already has `--max-pending-per-ip`
//! connections in their request phase, none of them an idle keep-alive
//! connection it could replace, is closed at once (trusted proxies are
//! exempt; see `crate::admission::limits`).
//! A connection first takes a permit from the `--max-connections`
//! semaphore, so handshakes in progress count too and a flood of half-open
//! sockets cannot exhaust memory. When no permit is left, the client still
//! gets an HTTP 503 rather than a reset, but only while the small pool of
//! refusal slots lasts; past that, sockets are closed at once.

use super::serve;
use crate::http::refusal::Refusal;
use crate::shared::Shared;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Refusals (503 answers to a full server) in progress at once.
const REFUSAL_SLOTS: usize = 64;

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tasks: TaskTracker) {
    let connections = Arc::new(Semaphore::new(shared.config.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSAL_SLOTS));
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of file descriptors or memory: back off instead of
                // spinning; open connections will free some.
                warn!(error = %e, "accept failed, backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        // One address may not hold many connections that have not yet
        // said what they want; a trusted proxy speaks for many clients.
        let pending = if shared.admission.policy.trusts(peer.ip()) {
            None
        } else {
            match shared.pending.acquire(peer.ip()) {
                Ok(slot) => Some(slot),
                Err(_full) => {
                    let refusal = Refusal::TooManyPendingFromAddress;
                    shared.metrics.handshake_refused(refusal.kind());
                    debug!(%peer, %refusal, "closing at once");
                    continue;
                }
            }
        };
        if let Ok(permit) = Arc::clone(&connections).try_acquire_owned() {
            let shared = Arc::clone(&shared);
            tasks.spawn(serve::serve(stream, peer, permit, pending, shared));
        } else if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
            tasks.spawn(serve::refuse(stream, peer, permit, Arc::clone(&shared)));
        } else {
            debug!(%peer, "server full and refusal slots used up: closing");
        }
    }
}

/// Whether an accept error means the process is out of a resource (file
/// descriptors, memory, buffers) rather than one connection having failed.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    // ENFILE, EMFILE, ENOMEM, ENOBUFS
    matches!(err.raw_os_error(), Some(23 | 24 | 12 | 105))
}
