//! One client connection, from handshake to close.
//!
//! After the handshake the socket is split. The **reader** decodes frames
//! and submits them to the ordering point; refusals go into a small
//! per-client reply queue. The **writer** first sends the history snapshot
//! (or, resuming, nothing), then reads the shared log from its own cursor,
//! with the replies and pings, and, for clients that opted in, a `sync`
//! frame after each batch. It coalesces: it takes everything that is ready,
//! writes it into tungstenite's buffer, and flushes once.
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
use chat_core::ChatError;
use chat_proto::{ClientFrame, DecodeError, Position, Reset, ServerFrame, Sync};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::http::header;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};
use tracing::{debug, error, info};

type Ws = WebSocketStream<TcpStream>;

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
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    pending: Option<AddressSlot>,
    shared: Arc<Shared>,
) {
    let _permit = permit;
    // Frames are coalesced by the writer; Nagle would only add delay.
    let _ = stream.set_nodelay(true);
    // Bound what the kernel holds for a client that stops reading.
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(shared.config.socket_send_buffer);
    // Plain HTTP requests are answered first; a well-formed WebSocket
    // upgrade comes back here with its head still unread.
    let upgrade = match http::serve(&mut stream, peer.ip(), pending.as_ref(), &shared).await {
        http::Next::Upgrade(upgrade) => upgrade,
        http::Next::Done => return,
    };
    let (ws, admitted) = match handshake(stream, peer, &shared, upgrade).await {
        Ok(done) => done,
        Err(why) => {
            debug!(%peer, %why, "handshake refused");
            return;
        }
    };
    // Past the request phase: from here the per-client limit counts it.
    drop(pending);
    let user = admitted.user.clone();
    info!(user = %user, %peer, client = %admitted.addr, "connection opened");
    shared.metrics.connection_opened();
    let reason = run(ws, &admitted, &shared).await;
    shared.metrics.connection_closed(&reason);
    if let CloseReason::ServerError(_) = reason {
        error!(user = %user, %peer, reason = %reason, "connection closed by a server-side error");
    } else {
        info!(user = %user, %peer, reason = %reason, "connection closed");
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
) -> Result<(Ws, Admitted), String> {
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
    let ws =
        WebSocketStream::from_raw_socket(stream, Role::Server, Some(shared.config.websocket()))
            .await;
    Ok((ws, admitted))
}

async fn run(ws: Ws, admitted: &Admitted, shared: &Shared) -> CloseReason {
    let (mut sink, mut stream) = ws.split();
    let (reply_tx, mut replies) = mpsc::channel(shared.config.reply_queue);
    let reason = if shared.config.echo {
        echo::run(&mut stream, &mut sink, shared).await
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
            shared.log.wait_for(position, RESUME_WAIT).await;
        }
        let joined = shared.log.join(since);
        let writer = Writer {
            sink: &mut sink,
            shared,
            sync,
            frames: Vec::with_capacity(MAX_BATCH),
        };
        tokio::select! {
            r = read_loop(&mut stream, admitted, shared, reply_tx) => r,
            r = writer.run(joined, &mut replies) => r,
        }
    };
    let mut drained = true;
    if let Some(frame) = reason.close_frame() {
        // The closing handshake: send the replies still queued and our
        // close, then read until the client's close comes back (or it hangs
        // up), so the client reads our close frame before the TCP
        // connection goes away.
        let mut sent = false;
        let handshake = async {
            while let Ok(reply) = replies.try_recv() {
                sink.feed(Message::Text(reply)).await?;
            }
            sink.send(Message::Close(Some(frame))).await?;
            sent = true;
            while let Some(Ok(_)) = stream.next().await {}
            Ok::<(), WsError>(())
        };
        let _ = timeout(CLOSE_TIMEOUT, handshake).await;
        drained = sent;
    }
    if reason == CloseReason::Stalled || !drained {
        // The socket does not drain: a graceful close would leave our FIN
        // queued behind unsent data the peer never reads, and the kernel
        // holding both until it gives up on its own (and then silently).
        // Reset it instead: the peer learns at once that the connection
        // is gone, and the kernel frees the buffer now.
        if let Ok(ws) = sink.reunite(stream) {
            let _ = socket2::SockRef::from(ws.get_ref()).set_linger(Some(Duration::ZERO));
        }
    }
    reason
}

async fn read_loop(
    stream: &mut SplitStream<Ws>,
    admitted: &Admitted,
    shared: &Shared,
    replies: mpsc::Sender<Utf8Bytes>,
) -> CloseReason {
    let mut refusals = RefusalBudget::new(shared.config.max_refusals);
    loop {
        let message = match timeout(shared.config.idle_timeout, stream.next()).await {
            Err(_) => return CloseReason::IdleTimeout,
            Ok(None) => return CloseReason::ClientClosed,
            Ok(Some(Err(e))) => return CloseReason::from_read_error(&e),
            Ok(Some(Ok(m))) => m,
        };
        // Decoded here, so that only commands reach the ordering point.
        let refusal = match message {
            Message::Text(text) => match ClientFrame::decode(&text) {
                Err(e) => Some(Refused::Malformed(e)),
                Ok(command) => match shared.order.submit(&admitted.user, command).await {
                    Ok(()) => None,
                    Err(ApplyError::Refused(refusal)) => Some(Refused::Rule(refusal)),
                    Err(ApplyError::Stopping) => return CloseReason::Shutdown,
                    Err(ApplyError::Unavailable) => Some(Refused::Unavailable),
                },
            },
            Message::Binary(_) => Some(Refused::Malformed(DecodeError::Binary)),
            // tungstenite answers pings and close frames itself; a close
            // ends the stream on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => None,
        };
        if let Some(refusal) = refusal {
            debug!(user = %admitted.user, %refusal, "refused");
            shared.metrics.frame_refused(refusal.kind());
            // Only the client's own mistakes count against its budget.
            if !matches!(refusal, Refused::Unavailable) && !refusals.take() {
                return CloseReason::TooManyRefusals;
            }
            let frame = Utf8Bytes::from(ServerFrame::error(&refusal).encode());
            // A full queue means the client is not reading its replies:
            // stop reading from it until it does (or the writer gives up).
            if replies.send(frame).await.is_err() {
                return CloseReason::PeerGone;
            }
        }
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
    sink: &'a mut SplitSink<Ws, Message>,
    shared: &'a Shared,
    /// Whether the client opted in to `sync` frames.
    sync: bool,
    /// Frames read from the log, reused batch after batch.
    frames: Vec<Utf8Bytes>,
}

impl Writer<'_> {
    async fn run(mut self, joined: Joined, replies: &mut mpsc::Receiver<Utf8Bytes>) -> CloseReason {
        let Joined {
            reset,
            history,
            mut cursor,
            mut head,
        } = joined;
        let write_timeout = self.shared.config.write_timeout;
        if let Some(reason) = reset {
            let frame = ServerFrame::Reset(Reset { reason }).encode();
            if let Err(e) = self.sink.feed(Message::text(frame)).await {
                return CloseReason::from_write_error(e);
            }
        }
        // History first, in batches, each under the write timeout.
        let frames: Vec<&Utf8Bytes> = history.iter().collect();
        for batch in frames.chunks(MAX_BATCH) {
            let write = async {
                for frame in batch {
                    self.sink.feed(Message::Text((*frame).clone())).await?;
                }
                self.sink.flush().await
            };
            match timeout(write_timeout, write).await {
                Err(_) => return CloseReason::Stalled,
                Ok(Err(e)) => return CloseReason::from_write_error(e),
                Ok(Ok(())) => {}
            }
        }
        drop(frames);
        drop(history);

        let ping_every = self.shared.config.ping_interval;
        let mut ping = interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.shared.shutdown.clone();
        // The position last announced in a `sync` frame.
        let mut announced = None;
        let mut extra = None;
        loop {
            // Seen before reading, so a publish after the read wakes us.
            head.borrow_and_update();
            let step = self.step(&mut cursor, &mut announced, extra.take(), replies);
            let more = match timeout(write_timeout, step).await {
                Err(_) => return CloseReason::Stalled,
                Ok(Err(reason)) => return reason,
                Ok(Ok(more)) => more,
            };
            if more {
                continue;
            }
            extra = tokio::select! {
                biased;
                () = shutdown.cancelled() => return CloseReason::Shutdown,
                reply = replies.recv() => match reply {
                    Some(frame) => Some(Message::Text(frame)),
                    None => return CloseReason::PeerGone,
                },
                changed = head.changed() => match changed {
                    Ok(()) => None,
                    Err(_) => return CloseReason::Shutdown,
                },
                _ = ping.tick() => Some(Message::Ping(Bytes::new())),
            };
        }
    }

    /// Writes `extra`, the log's frames after `cursor` (at most a batch),
    /// the waiting replies and, for a client that opted in, a `sync` frame
    /// with the new cursor; then flushes once. True if the log may hold
    /// more.
    async fn step(
        &mut self,
        cursor: &mut Position,
        announced: &mut Option<Position>,
        extra: Option<Message>,
        replies: &mut mpsc::Receiver<Utf8Bytes>,
    ) -> Result<bool, CloseReason> {
        let write_failed = CloseReason::from_write_error;
        let mut fed = false;
        if let Some(message) = extra {
            self.sink.feed(message).await.map_err(write_failed)?;
            fed = true;
        }
        self.frames.clear();
        *cursor = self
            .shared
            .log
            .read(*cursor, MAX_BATCH, &mut self.frames)
            .map_err(|behind| CloseReason::Lagged(behind.missed))?;
        let more = self.frames.len() == MAX_BATCH;
        for frame in self.frames.drain(..) {
            self.sink
                .feed(Message::Text(frame))
                .await
                .map_err(write_failed)?;
            fed = true;
        }
        while let Ok(frame) = replies.try_recv() {
            self.sink
                .feed(Message::Text(frame))
                .await
                .map_err(write_failed)?;
            fed = true;
        }
        if self.sync && *announced != Some(*cursor) {
            let sync = ServerFrame::Sync(Sync {
                epoch: self.shared.log.epoch(),
                position: *cursor,
            });
            self.sink
                .feed(Message::text(sync.encode()))
                .await
                .map_err(write_failed)?;
            *announced = Some(*cursor);
            fed = true;
        }
        if fed {
            self.sink.flush().await.map_err(write_failed)?;
        }
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
