//! One client's WebSocket, from the 101 to the close.
//!
//! After the handshake (`crate::front`) the socket is split
//! (`crate::wire::link`). The **reader** ([`reader`]) is tungstenite: it
//! decodes frames, and the reader loop submits them to the sequencer;
//! refusals go into a small per-client reply queue. The **writer**
//! ([`writer`]) is a thin loop around the connection's `Delivery`
//! (`crate::wire::delivery`), the one state of what goes to the socket and
//! when: it queues the history (or, resuming, nothing), then the shared
//! log from the connection's cursor, with the replies, pings and
//! tungstenite's own frames (pongs, close frames), and, for clients that
//! opted in, a `sync` frame each time it reaches the head. Everything
//! ready goes to the kernel in one `sendmsg`, as frames framed once for
//! every client. Once it has sent everything up to the log's head, it
//! parks: the publisher (`crate::publish::fanout`) then writes new events
//! to the socket itself, and wakes the writer only if the socket did not
//! take them all.
//!
//! The two run as one task (`select!`), so when either ends the other is
//! dropped, and the connection closes ([`closing`]) with one reason and
//! one close code. A client that reads slowly cannot slow anyone else
//! down: the log does not wait for it, and it catches up from the log at
//! its own pace. It is dropped only when its socket has held back what
//! was queued for `--write-timeout` (its socket is then reset), it fell
//! further behind than the log holds, or it was not heard from for
//! `--idle-timeout`.
//!
//! With `--echo`, [`echo`] takes the place of both.

pub(crate) mod closing;
pub(crate) mod echo;
pub(crate) mod reader;
pub(crate) mod writer;

use crate::admission::Admitted;
use crate::admission::query::Protocol;
use crate::publish::log::Since;
use crate::shared::Shared;
use crate::wire::close::CloseReason;
use crate::wire::link::{Link, Ws};
use std::sync::Arc;
use std::time::Duration;
use writer::{Replay, Writer};

/// How long a node of a cluster waits to apply a resuming client's
/// position before answering it (past it: a `reset`, as for a position
/// ahead of the log).
const RESUME_WAIT: Duration = Duration::from_secs(5);

/// The connection's life after the handshake, and its close.
///
/// Not an `async fn`: rustc stores an `async fn`'s arguments in its
/// future twice (as captured, and moved into locals at the first poll), and
/// every connection holds this future for its whole life. An `async move`
/// block uses what it captures in place.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub(crate) fn run<'a>(
    mut ws: Ws,
    link: Arc<Link>,
    admitted: &'a Admitted,
    shared: &'a Shared,
) -> impl Future<Output = CloseReason> + 'a {
    async move {
        let reason = if shared.config.echo {
            Box::pin(echo::run(
                &mut ws,
                &link,
                &shared.shutdown,
                shared.config.idle_timeout,
                shared.config.write_timeout,
            ))
            .await
        } else {
            let (sync, since) = match admitted.protocol {
                Protocol::Seed => (false, Since::Start),
                Protocol::Positions(since) => (true, since),
            };
            if shared.config.cluster.is_some()
                && let Since::Resume { epoch, position } = since
                && epoch == shared.log.epoch()
            {
                // Another node may have shown the client more than this one has
                // applied yet: wait for it, within a bound, before deciding.
                Box::pin(shared.log.wait_for(position, RESUME_WAIT)).await;
            }
            let joined = shared.log.join(since);
            link.delivery().start(joined.cursor, sync);
            let replay = Replay::new(joined.reset, joined.history);
            let _attached = shared.fanout.attach(&link);
            tokio::select! {
                r = reader::read_loop(&mut ws, admitted, shared, &link) => r,
                r = Writer::run(&link, shared, replay) => r,
            }
        };
        // Boxed: only a closing connection needs room for the handshake.
        let drained = Box::pin(closing::close(&mut ws, &link, &reason, shared)).await;
        if !drained {
            // The socket does not drain: a graceful close would leave our FIN
            // queued behind unsent data the peer never reads, and the kernel
            // holding both until it gives up on its own (and then silently).
            // Reset it instead: the peer learns at once that the connection
            // is gone, and the kernel frees the buffer now.
            let _ = socket2::SockRef::from(link.socket()).set_linger(Some(Duration::ZERO));
        }
        reason
    }
}
