//! One client connection, from handshake to close.
//!
//! After the handshake the socket is split ([`crate::wire`]). The
//! **reader** is tungstenite: it decodes frames, and the reader loop
//! submits them to the ordering point; refusals go into a small per-client
//! reply queue. The **writer** is a thin loop around the connection's
//! [`Delivery`], the one state of what goes to the socket and when
//! ([`crate::delivery`]): it queues the history snapshot (or, resuming,
//! nothing), then the shared log from the connection's cursor, with the
//! replies, pings and tungstenite's own frames (pongs, close frames), and,
//! for clients that opted in, a `sync` frame each time it reaches the
//! head. Everything ready goes to the kernel in one `sendmsg`, as frames
//! framed once for every client. Once it has sent everything up to the
//! log's head, it parks ([`crate::tap`]): the publisher then writes new
//! events to the socket itself, and wakes the writer only if the socket
//! did not take them all.
//!
//! The two run as one task (`select!`), so when either ends the other is
//! dropped, and the connection closes with one reason and one close code.
//! A client that reads slowly cannot slow anyone else down: the log does
//! not wait for it, and it catches up from the log at its own pace. It is
//! dropped only when its socket has held back what was queued for
//! `--write-timeout` (its socket is then reset), it fell further behind
//! than the log holds, or it was not heard from for `--idle-timeout`.

use crate::Shared;
use crate::admission::Admitted;
use crate::close::CloseReason;
use crate::delivery::{Delivery, Lane};
use crate::echo;
use crate::http;
use crate::http::Refusal;
use crate::hub::ApplyError;
use crate::limits::AddressSlot;
use crate::log::Since;
use crate::resume::Resume;
use crate::wire::{self, Frame, Link};
use chat_core::ChatError;
use chat_proto::{ClientFrame, DecodeError, Reset, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::http::header;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, error, info};

/// The reading side, as tungstenite runs it.
pub(crate) type Ws = WebSocketStream<wire::Inbound>;

/// How long a node of a cluster waits to apply a resuming client's
/// position before answering it (past it: a `reset`, as for a position
/// ahead of the log).
const RESUME_WAIT: Duration = Duration::from_secs(5);

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
        let Some((ws, link, admitted)) = accept.await else {
            return;
        };
        info!(user = %admitted.user, %peer, client = %admitted.addr, "connection opened");
        shared.metrics.connection_opened();
        // Boxed, so that the task is sized for the request phase and the
        // box for the connection's life: measured, inline, this future was
        // 1,848 bytes, against 288 and a 1,384-byte box.
        let reason = Box::pin(run(ws, link, &admitted, &shared)).await;
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
    let delivery = Delivery::new(Arc::clone(&shared.delivery), std::time::Instant::now());
    let (inbound, link) = wire::split(
        stream,
        shared.config.read_buffer_size,
        shared.config.outbox_bound(),
        shared.config.reply_queue,
        delivery,
    );
    let ws =
        WebSocketStream::from_raw_socket(inbound, Role::Server, Some(shared.config.websocket()))
            .await;
    Ok((ws, link, admitted))
}

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
fn run<'a>(
    mut ws: Ws,
    link: Arc<Link>,
    admitted: &'a Admitted,
    shared: &'a Shared,
) -> impl Future<Output = CloseReason> + 'a {
    async move {
        let reason = if shared.config.echo {
            Box::pin(echo::run(&mut ws, &link, shared)).await
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
            let joined = shared.log.join(since);
            link.delivery().start(joined.cursor, sync);
            let replay = Replay::new(joined.reset, joined.history);
            let _attached = shared.log.attach(&link);
            tokio::select! {
                r = read_loop(&mut ws, admitted, shared, &link) => r,
                r = Writer::run(&link, shared, replay) => r,
            }
        };
        // Boxed: only a closing connection needs room for the handshake.
        let drained = Box::pin(close(&mut ws, &link, &reason, shared)).await;
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

/// Ends the connection for `reason`, and says whether everything was
/// written (false: reset the socket).
///
/// The close frame comes after whole frames, and nothing comes after it:
/// the delivery drops the log's frames not yet begun, finishes the one
/// begun, and takes nothing more from the log ([`Delivery::close`]).
/// Then the closing handshake: our close frame (or tungstenite's answer
/// to the client's), written within `--write-timeout` (or what is left of
/// `--shutdown-grace`), then, when the server closed, the client's close
/// read back, so that the client reads our close frame before the TCP
/// connection goes away.
async fn close(ws: &mut Ws, link: &Link, reason: &CloseReason, shared: &Shared) -> bool {
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

async fn read_loop(
    stream: &mut Ws,
    admitted: &Admitted,
    shared: &Shared,
    link: &Link,
) -> CloseReason {
    let mut refusals = RefusalBudget::new(shared.config.max_refusals);
    // Each step keeps in a block of its own what it needs only until its
    // `.await`: what a future holds across one, it holds for the
    // connection's life.
    loop {
        // Decoded here, so that only commands reach the ordering point.
        let decoded = {
            // No timer here: the delivery keeps the idle timeout.
            let message = match stream.next().await {
                None => return CloseReason::ClientClosed,
                Some(Err(e)) => return CloseReason::from_read_error(&e),
                Some(Ok(m)) => m,
            };
            link.delivery().on_heard(std::time::Instant::now());
            match message {
                Message::Text(text) => ClientFrame::decode(&text).map(Some),
                Message::Binary(_) => Err(DecodeError::Binary),
                // The client closes: tungstenite answers it, in the close.
                Message::Close(_) => return CloseReason::ClientClosed,
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
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

/// What a joining client is sent before the log: a `reset`, if its
/// resume became a full replay, then the history, read from the log a
/// batch at a time ([`crate::log::Log::replay`]).
struct Replay {
    reset: Option<Frame>,
    /// The next message of the history to queue, by sequence number.
    next: u64,
    /// The first sequence number past what the client joined with.
    end: u64,
}

impl Replay {
    fn new(
        reset: Option<chat_proto::ResetReason>,
        history: std::ops::Range<u64>,
    ) -> Option<Box<Replay>> {
        let reset = reset.map(|reason| Frame::text(ServerFrame::Reset(Reset { reason }).encode()));
        // Boxed, and only for a connection that replays: an idle
        // connection's task holds a pointer.
        (reset.is_some() || !history.is_empty()).then(|| {
            Box::new(Replay {
                reset,
                next: history.start,
                end: history.end,
            })
        })
    }

    /// Queues as much as fits: whether everything is queued.
    fn fill(&mut self, delivery: &mut Delivery, shared: &Shared) -> bool {
        if let Some(reset) = self.reset.take() {
            delivery.push(Lane::History, reset.into_wire());
        }
        shared.log.replay(&mut self.next, self.end, |frame| {
            let fits = delivery.fits(frame.len());
            if fits {
                delivery.push(Lane::History, frame.wire().clone());
            }
            fits
        })
    }
}

/// The writing half: a thin loop around the connection's [`Delivery`].
/// Each step, under the delivery's lock: the outbox's frames, then as
/// much of the replay or the log as fits, a `sync` frame once at the
/// head (for a client that opted in), then what the socket takes now;
/// then it parks at the head, or waits for the socket, a wake-up or the
/// delivery's next deadline.
struct Writer;

/// What a writer waits for after a step.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// The socket has not taken everything queued.
    writable: bool,
    /// The connection is parked: the publisher may hand it back.
    parked: bool,
    /// The outbox is taken when it fills.
    outbox: bool,
    /// The delivery's next deadline.
    deadline: std::time::Instant,
}

/// Why a waiting writer woke.
enum Woke {
    /// Something to do: the outbox filled, the socket is writable, or the
    /// publisher handed the socket back.
    Work,
    /// The delivery's deadline.
    Timer,
    /// The server is stopping.
    Shutdown,
}

impl Writer {
    // Not an `async fn`, for the reason given at [`run`].
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    fn run<'a>(
        link: &'a Link,
        shared: &'a Shared,
        mut replay: Option<Box<Replay>>,
    ) -> impl Future<Output = CloseReason> + 'a {
        async move {
            let mut timer = std::pin::pin!(sleep_until(Instant::now()));
            let mut armed = None;
            loop {
                let wait = match Writer::step(link, shared, &mut replay) {
                    Err(reason) => return reason,
                    Ok(None) => {
                        // More to read, and the socket took all: go on,
                        // giving other tasks their turn now and then.
                        if shared.shutdown.is_cancelled() {
                            return CloseReason::Shutdown;
                        }
                        tokio::task::consume_budget().await;
                        continue;
                    }
                    Ok(Some(wait)) => wait,
                };
                if armed != Some(wait.deadline) {
                    armed = Some(wait.deadline);
                    timer.as_mut().reset(Instant::from_std(wait.deadline));
                }
                match Writer::wait(link, shared, wait, timer.as_mut()).await {
                    Woke::Work => {}
                    Woke::Shutdown => return CloseReason::Shutdown,
                    Woke::Timer => {
                        let now = std::time::Instant::now();
                        if let Err(reason) = link.delivery().on_timeout(now) {
                            return reason;
                        }
                        // Set again even to the same deadline: a timer
                        // that fired stays fired until reset.
                        armed = None;
                    }
                }
            }
        }
    }

    /// One step under the delivery's lock; `None` if there is more to
    /// read at once.
    fn step(
        link: &Link,
        shared: &Shared,
        replay: &mut Option<Box<Replay>>,
    ) -> Result<Option<Wait>, CloseReason> {
        let now = std::time::Instant::now();
        let mut delivery = link.delivery();
        link.take_outbox(&mut delivery, false);
        // Parked, the publisher queues the log's frames.
        let mut at_head = delivery.is_parked();
        if !at_head {
            let replayed = replay
                .as_mut()
                .is_none_or(|r| r.fill(&mut delivery, shared));
            at_head = replayed && {
                *replay = None;
                Writer::read_log(&mut delivery, shared)?
            };
        }
        if at_head && let Some(position) = delivery.sync_due() {
            delivery.push_sync(position, shared.log.sync_frame(position).into_wire());
        }
        let sent = link.send(&mut delivery, now).map_err(write_failed)?;
        if !sent {
            delivery.unpark();
        } else if at_head && !delivery.is_parked() && !delivery.park(shared.log.head()) {
            // The log moved on meanwhile.
            return Ok(None);
        } else if !at_head {
            return Ok(None);
        }
        Ok(Some(Wait {
            writable: !sent,
            parked: delivery.is_parked(),
            outbox: delivery.takes_urgent(),
            deadline: delivery.poll_timeout(),
        }))
    }

    /// Queues the log's frames after the cursor, as far as they fit:
    /// whether it reached the head.
    fn read_log(delivery: &mut Delivery, shared: &Shared) -> Result<bool, CloseReason> {
        shared
            .log
            .read(delivery.cursor(), |frame| {
                let fits = delivery.fits(frame.len());
                if fits {
                    delivery.push(Lane::Event, frame.wire().clone());
                }
                fits
            })
            .map_err(|behind| CloseReason::Lagged(behind.missed))
    }

    /// Waits for what `wait` says, the server's stop, or the deadline.
    async fn wait(
        link: &Link,
        shared: &Shared,
        wait: Wait,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Woke {
        std::future::poll_fn(|cx| {
            link.register(cx.waker());
            if shared.shutdown.is_cancelled() {
                return Poll::Ready(Woke::Shutdown);
            }
            if (wait.outbox && link.outbox_filled())
                || (wait.parked && !link.delivery().is_parked())
                || (wait.writable && link.socket().poll_write_ready(cx).is_ready())
            {
                return Poll::Ready(Woke::Work);
            }
            timer.as_mut().poll(cx).map(|()| Woke::Timer)
        })
        .await
    }
}

/// A write that failed: the client's socket is gone.
fn write_failed(e: std::io::Error) -> CloseReason {
    CloseReason::from_write_error(WsError::Io(e))
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
