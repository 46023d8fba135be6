//! One client connection, from handshake to close.
//!
//! After the handshake the socket is split ([`crate::wire`]). The
//! **reader** is tungstenite: it decodes frames, and the reader loop
//! submits them to the ordering point; refusals go into a small per-client
//! reply queue. The **writer** first sends the history snapshot (or,
//! resuming, nothing), then reads the shared log from its own cursor, with
//! the replies, pings and tungstenite's own answers (pongs, close frames),
//! and, for clients that opted in, a `sync` frame after each batch. It
//! coalesces: it queues everything that is ready, as frames framed once
//! for every client, and hands them to the kernel in one `sendmsg`. Once
//! it has sent everything up to the log's head, it parks ([`crate::tap`]):
//! the publisher then writes new events to the socket itself, and wakes
//! the writer only if the socket did not take them all.
//!
//! The two run as one task (`select!`), so when either ends the other is
//! dropped, and the connection closes with one reason and one close code.
//! A client that reads slowly cannot slow anyone else down: the log does
//! not wait for it, and it catches up from the log at its own pace. It is
//! dropped only when a write has waited `--write-timeout` (its socket is
//! then reset) or it fell further behind than the log holds.

use crate::Shared;
use crate::admission::Admitted;
use crate::close::CloseReason;
use crate::echo;
use crate::http;
use crate::http::Refusal;
use crate::hub::ApplyError;
use crate::limits::AddressSlot;
use crate::log::{Joined, Since};
use crate::resume::Resume;
use crate::tap::Attached;
use crate::wire::{self, Frame, Inbound, Link, Outbound};
use chat_core::ChatError;
use chat_proto::{ClientFrame, DecodeError, Position, Reset, ServerFrame};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::http::header;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tracing::{debug, error, info};

/// The reading side, as tungstenite runs it.
pub(crate) type Ws = WebSocketStream<Inbound>;

/// Most frames written between two flushes, so one busy client cannot keep
/// its writer from noticing shutdown or pings.
const MAX_BATCH: usize = 256;

/// How long a node of a cluster waits to apply a resuming client's
/// position before answering it (past it: a `reset`, as for a position
/// ahead of the log).
const RESUME_WAIT: Duration = Duration::from_secs(5);

/// How long the server waits for its close frame to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted TCP connection until it closes. `permit` is its
/// place under the server's connection limit.
///
/// Every connection's task is sized by this future, so it holds only what
/// the connection's life needs: the request and handshake phases run in a
/// box of their own ([`accept`]), freed once done, and this is not an
/// `async fn`, whose arguments would be stored twice (see [`run`]).
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    pending: Option<AddressSlot>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> {
    let accept = Box::pin(accept(stream, peer, pending, Arc::clone(&shared)));
    async move {
        let Some((ws, out, admitted)) = accept.await else {
            return;
        };
        info!(user = %admitted.user, %peer, client = %admitted.addr, "connection opened");
        shared.metrics.connection_opened();
        // Boxed, so that the task is sized for the request phase and the
        // box for the connection's life: measured, inline, this future was
        // 1,848 bytes, against 288 and a 1,384-byte box.
        let reason = Box::pin(run(ws, out, &admitted, &shared)).await;
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
) -> Option<(Ws, Outbound, Admitted)> {
    // Frames are coalesced by the writer; Nagle would only add delay.
    let _ = stream.set_nodelay(true);
    // Bound what the kernel holds for a client that stops reading.
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(shared.config.socket_send_buffer);
    // Plain HTTP requests are answered first; a well-formed WebSocket
    // upgrade comes back here with its head still unread.
    let upgrade = match http::serve(&mut stream, peer.ip(), pending.as_ref(), &shared).await {
        http::Next::Upgrade(upgrade) => upgrade,
        http::Next::Done => return None,
    };
    match handshake(stream, peer, &shared, upgrade).await {
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
    http::refuse_full(&mut stream, &shared).await;
    debug!(%peer, "refused: server full");
}

/// The chat's part of the handshake ([`crate::admission`]), then the 101,
/// and the socket is a WebSocket.
async fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    upgrade: Box<http::Upgrade>,
) -> Result<(Ws, Outbound, Admitted), String> {
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
            http::refuse(&mut stream, &upgrade.head, &refusal, true, shared).await;
            return Err(refusal.to_string());
        }
    };
    match timeout_at(
        upgrade.deadline,
        http::switch_protocols(&mut stream, &upgrade),
    )
    .await
    {
        Err(_) => return Err("handshake timeout".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(())) => {}
    }
    let (inbound, out) = wire::split(
        stream,
        shared.config.read_buffer_size,
        shared.config.outbox_bound(),
        shared.config.reply_queue,
    );
    let ws =
        WebSocketStream::from_raw_socket(inbound, Role::Server, Some(shared.config.websocket()))
            .await;
    Ok((ws, out, admitted))
}

/// The connection's life after the handshake, and its close.
///
/// Not an `async fn`: rustc stores an `async fn`'s arguments in its
/// future twice (as captured, and moved into locals at the first poll), and
/// every connection holds this future for its whole life. An `async move`
/// block uses what it captures in place: measured, this future is 1,384
/// bytes instead of 1,824.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn run<'a>(
    mut ws: Ws,
    mut out: Outbound,
    admitted: &'a Admitted,
    shared: &'a Shared,
) -> impl Future<Output = CloseReason> + 'a {
    async move {
        let reason = if shared.config.echo {
            Box::pin(echo::run(&mut ws, &mut out, shared)).await
        } else {
            let (sync, since) = match admitted.resume {
                Resume::Seed => (false, Since::Start),
                Resume::Sync(since) => (true, since),
            };
            if shared.config.cluster.is_some()
                && let Since::Resume { epoch, position } = since
                && epoch == shared.log.epoch()
            {
                // Another node may have shown the client more than this one has
                // applied yet: wait for it, within a bound, before deciding.
                Box::pin(shared.log.wait_for(position, RESUME_WAIT)).await;
            }
            let joined = Box::new(shared.log.join(since));
            let link = Arc::clone(out.link());
            let tap = shared.log.attach(&link, sync);
            let heard = Heard::new();
            let writer = Writer {
                out: &mut out,
                shared,
                sync,
                link: &link,
                tap: &tap,
                heard: &heard,
            };
            let reason = tokio::select! {
                r = read_loop(&mut ws, admitted, shared, &link, &heard) => r,
                r = writer.run(joined) => r,
            };
            // The socket is ours alone again; a frame the publisher began is
            // finished before the close frame.
            if let Some(rest) = tap.detach() {
                out.push(rest);
            }
            reason
        };
        // Boxed: only a closing connection needs room for the handshake.
        let drained = Box::pin(close(&mut ws, &mut out, &reason)).await;
        if reason == CloseReason::Stalled || !drained {
            // The socket does not drain: a graceful close would leave our FIN
            // queued behind unsent data the peer never reads, and the kernel
            // holding both until it gives up on its own (and then silently).
            // Reset it instead: the peer learns at once that the connection
            // is gone, and the kernel frees the buffer now.
            let _ = socket2::SockRef::from(out.socket()).set_linger(Some(Duration::ZERO));
        }
        reason
    }
}

/// Ends the connection for `reason`, and says whether everything was
/// written (false: reset the socket).
async fn close(ws: &mut Ws, out: &mut Outbound, reason: &CloseReason) -> bool {
    let Some(frame) = reason.close_frame() else {
        // The client closed (tungstenite answered it) or is gone: send
        // what tungstenite wrote, if the socket takes it.
        let _ = timeout(CLOSE_TIMEOUT, out.flush()).await;
        return true;
    };
    // The closing handshake: send the replies still queued and our close,
    // then read until the client's close comes back (or it hangs up), so
    // the client reads our close frame before the TCP connection goes away.
    let mut sent = false;
    let handshake = async {
        // The replies still waiting go first (the flush takes them).
        out.push_outbox();
        // tungstenite frames our close (and knows it was sent).
        ws.close(Some(frame)).await?;
        out.flush().await?;
        sent = true;
        while let Some(Ok(_)) = ws.next().await {}
        Ok::<(), WsError>(())
    };
    let _ = timeout(CLOSE_TIMEOUT, handshake).await;
    sent
}

async fn read_loop(
    stream: &mut Ws,
    admitted: &Admitted,
    shared: &Shared,
    link: &Link,
    heard: &Heard,
) -> CloseReason {
    let mut refusals = RefusalBudget::new(shared.config.max_refusals);
    // Each step keeps in a block of its own what it needs only until its
    // `.await`: what a future holds across one, it holds for the
    // connection's life.
    loop {
        // Decoded here, so that only commands reach the ordering point.
        let decoded = {
            // No timer here: the writer's one timer keeps the idle timeout.
            let message = match stream.next().await {
                None => return CloseReason::ClientClosed,
                Some(Err(e)) => return CloseReason::from_read_error(&e),
                Some(Ok(m)) => m,
            };
            heard.now();
            match message {
                Message::Text(text) => ClientFrame::decode(&text).map(Some),
                Message::Binary(_) => Err(DecodeError::Binary),
                // tungstenite answers pings and close frames itself; a
                // close ends the stream on the next read.
                Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                    Ok(None)
                }
            }
        };
        let reply = {
            let refusal = match decoded {
                Ok(None) => continue,
                Err(e) => Refused::Malformed(e),
                Ok(Some(command)) => match shared.order.submit(&admitted.user, command).await {
                    Ok(()) => continue,
                    Err(ApplyError::Refused(refusal)) => Refused::Rule(refusal),
                    Err(ApplyError::Stopping) => return CloseReason::Shutdown,
                    Err(ApplyError::Unavailable) => Refused::Unavailable,
                },
            };
            debug!(user = %admitted.user, %refusal, "refused");
            shared.metrics.frame_refused(refusal.kind());
            // Only the client's own mistakes count against its budget.
            if !matches!(refusal, Refused::Unavailable) && !refusals.take() {
                return CloseReason::TooManyRefusals;
            }
            Frame::text(ServerFrame::error(&refusal).encode())
        };
        // A full queue means the client is not reading its replies: stop
        // reading from it until it does (or the writer gives up).
        link.reply(reply).await;
    }
}

/// Why a client's frame was refused; its `Display` is the wire text.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Not a well-formed frame.
    #[error(transparent)]
    Malformed(DecodeError),
    /// Against the chat's rules.
    #[error(transparent)]
    Rule(ChatError),
    /// Not the client's doing: the ordering point could not take it.
    #[error("{UNAVAILABLE}")]
    Unavailable,
}

/// The wire text of [`Refused::Unavailable`].
pub(crate) const UNAVAILABLE: &str = "the chat is unavailable: your last message or reaction was not confirmed, and shows up only if it was taken";

impl Refused {
    /// A short stable name, for metrics labels.
    fn kind(&self) -> &'static str {
        match self {
            Refused::Malformed(_) => "invalid_format",
            Refused::Rule(e) => e.kind(),
            Refused::Unavailable => "unavailable",
        }
    }
}

/// How long the refusal budget's window is.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Counts one connection's refused frames per [`REFUSAL_WINDOW`].
struct RefusalBudget {
    max: u32,
    used: u32,
    since: Instant,
}

impl RefusalBudget {
    fn new(max: u32) -> Self {
        RefusalBudget {
            max,
            used: 0,
            since: Instant::now(),
        }
    }

    /// Counts one refusal; false once the window's budget is spent.
    fn take(&mut self) -> bool {
        if self.since.elapsed() >= REFUSAL_WINDOW {
            self.since = Instant::now();
            self.used = 0;
        }
        self.used += 1;
        self.used <= self.max
    }
}

/// The writing half: the history (or a resume's missed events), then the
/// log as it grows, the replies and pings, in coalesced batches.
struct Writer<'a> {
    out: &'a mut Outbound,
    shared: &'a Shared,
    /// Whether the client opted in to `sync` frames.
    sync: bool,
    /// What the connection's parts share.
    link: &'a Link,
    /// Where the publisher takes over while the writer waits at the head.
    tap: &'a Attached,
    /// When the client was last heard from.
    heard: &'a Heard,
}

/// When a client was last heard from: the reader notes it, and the
/// writer's timer closes a connection quiet for `--idle-timeout`.
struct Heard {
    since: Instant,
    /// Milliseconds after `since`.
    last: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard {
            since: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// The client was heard from just now.
    fn now(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.since + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Sends a joining client the `reset` (if its resume became a full
/// replay) and the history, in batches, each under the write timeout.
async fn replay(
    out: &mut Outbound,
    reset: Option<chat_proto::ResetReason>,
    history: crate::log::Snapshot,
    write_timeout: Duration,
) -> Result<(), CloseReason> {
    if let Some(reason) = reset {
        let frame = Frame::text(ServerFrame::Reset(Reset { reason }).encode());
        out.push(frame.into_wire());
    }
    let mut frames = history.iter().peekable();
    while frames.peek().is_some() || !out.is_empty() {
        for frame in frames.by_ref().take(MAX_BATCH) {
            out.push(frame.wire().clone());
        }
        match timeout(write_timeout, out.flush()).await {
            Err(_) => return Err(CloseReason::Stalled),
            Ok(Err(e)) => return Err(write_failed(e)),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// A write that failed: the client's socket is gone.
fn write_failed(e: std::io::Error) -> CloseReason {
    CloseReason::from_write_error(WsError::Io(e))
}

impl<'a> Writer<'a> {
    // Not an `async fn`, for the reason given at [`run`].
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    //
    // `joined` comes boxed, and is taken apart in a block of its own: what
    // the future captures, or holds across an `.await`, it holds for the
    // connection's life.
    fn run(mut self, joined: Box<Joined>) -> impl Future<Output = CloseReason> + 'a {
        async move {
            let config = &self.shared.config;
            // Boxed: only a joining connection needs room for the replay.
            let (replay, mut cursor) = {
                let Joined {
                    reset,
                    history,
                    cursor,
                } = *joined;
                let replay = replay(self.out, reset, history, config.write_timeout);
                (Box::pin(replay), cursor)
            };
            if let Err(reason) = replay.await {
                return reason;
            }

            // One timer for the pings and the idle timeout: it fires at
            // whichever comes first (the reader moves the idle deadline
            // without waking us; a timer that fires early is re-armed).
            let mut next_ping = Instant::now() + config.ping_interval;
            let mut timer = std::pin::pin!(sleep_until(
                next_ping.min(self.heard.last() + config.idle_timeout)
            ));
            let shutdown = &self.shared.shutdown;
            // The position last announced in a `sync` frame.
            let mut announced = None;
            let mut extra = None;
            loop {
                let more = match self.step(&mut cursor, &mut announced, extra.take()) {
                    Err(reason) => return reason,
                    Ok(more) => more,
                };
                // What the socket did not take at once is written under the
                // write timeout, which the one timer keeps meanwhile.
                if !self.out.is_empty() {
                    timer.as_mut().reset(Instant::now() + config.write_timeout);
                    let flushed = tokio::select! {
                        biased;
                        flushed = self.out.flush() => flushed,
                        () = &mut timer => return CloseReason::Stalled,
                    };
                    if let Err(e) = flushed {
                        return write_failed(e);
                    }
                    timer
                        .as_mut()
                        .reset(next_ping.min(self.heard.last() + config.idle_timeout));
                }
                if more {
                    continue;
                }
                // Everything is sent: wait at the head, where the publisher
                // writes for us, unless the log moved on meanwhile.
                if !self.tap.park(cursor, announced, || self.shared.log.head()) {
                    continue;
                }
                extra = tokio::select! {
                    biased;
                    // A reply, tungstenite answered a ping or a close, the
                    // socket did not take all the publisher wrote, or the
                    // server is stopping.
                    () = self.link.writer_needed(shutdown) => {
                        if shutdown.is_cancelled() {
                            return CloseReason::Shutdown;
                        }
                        None
                    }
                    () = &mut timer => {
                        let now = Instant::now();
                        let quiet_until = self.heard.last() + config.idle_timeout;
                        if now >= quiet_until {
                            return CloseReason::IdleTimeout;
                        }
                        let ping = (now >= next_ping).then(|| {
                            next_ping = now + config.ping_interval;
                            wire::ping()
                        });
                        timer.as_mut().reset(next_ping.min(quiet_until));
                        ping
                    }
                };
                // Carry on from where the publisher stopped.
                let resumed = self.tap.unpark();
                cursor = resumed.cursor;
                announced = resumed.announced;
                if let Some(rest) = resumed.rest {
                    self.out.push(rest);
                }
            }
        }
    }

    /// Queues `extra`, the log's frames after `cursor` (at most a batch),
    /// the waiting replies and, for a client that opted in, a `sync` frame
    /// with the new cursor; then writes what the socket takes now. True if
    /// the log may hold more.
    fn step(
        &mut self,
        cursor: &mut Position,
        announced: &mut Option<Position>,
        extra: Option<Bytes>,
    ) -> Result<bool, CloseReason> {
        if let Some(bytes) = extra {
            self.out.push(bytes);
        }
        let from = *cursor;
        *cursor = self
            .shared
            .log
            .read(from, MAX_BATCH, self.out)
            .map_err(|behind| CloseReason::Lagged(behind.missed))?;
        let more = cursor.0 - from.0 == MAX_BATCH as u64;
        self.out.push_outbox();
        if self.sync && *announced != Some(*cursor) {
            self.out
                .push(self.shared.log.sync_frame(*cursor).into_wire());
            *announced = Some(*cursor);
        }
        // Also sends what tungstenite wrote meanwhile.
        self.out.try_flush().map_err(write_failed)?;
        Ok(more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unavailable_text_is_documented_in_asyncapi() {
        let doc = chat_testkit::asyncapi();
        let description = doc
            .pointer("/components/schemas/ErrorFrame/properties/data/properties/error/description")
            .and_then(|d| d.as_str())
            .expect("the error text's description");
        assert!(
            description.contains(&format!("- \"{UNAVAILABLE}\"")),
            "asyncapi.yaml does not list {UNAVAILABLE:?}"
        );
        assert_eq!(Refused::Unavailable.to_string(), UNAVAILABLE);
    }
}
