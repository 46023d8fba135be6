//! The socket after the handshake: tungstenite reads, the server writes.
//!
//! Every frame the server sends to clients is a server frame, and server
//! frames are not masked, so the bytes on the wire are the same for every
//! recipient. A [`Frame`] is framed once (by tungstenite's own framing),
//! when the event is published, and shared by reference: sending it to a
//! thousand clients copies nothing in user space. Each connection's
//! [`Outbound`] queues shared frames and writes them with `sendmsg`, as many
//! as are ready in one system call, straight from the shared buffers. It
//! holds no write buffer of its own, so an idle connection holds none.
//!
//! tungstenite keeps the reading side: it unmasks, checks and reassembles
//! what the client sends, answers pings and close frames, and enforces the
//! size limits. What it writes (those answers, the echo mode's frames, our
//! close frame) goes through [`Inbound`] into a small bounded outbox in
//! the connection's [`Link`], which the connection's writer sends between
//! two whole frames. The two
//! halves never write to the socket at once: only [`Outbound`] does.

use crate::tap::HandOver;
use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_util::sync::CancellationToken;

/// A server text frame, framed once: the WebSocket header and the JSON
/// text in one shared buffer, the same bytes for every recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    wire: Bytes,
    /// Where the text starts (after the header).
    text_at: u8,
}

impl Frame {
    /// The text frame carrying `text`.
    pub(crate) fn text(text: impl Into<String>) -> Frame {
        let text: String = text.into();
        let len = text.len();
        let frame = WsFrame::message(text, OpCode::Data(Data::Text), true);
        let mut wire = Vec::with_capacity(frame.len());
        // Formatting into a Vec cannot fail.
        frame
            .format(&mut wire)
            .expect("formatting into memory never fails");
        let text_at = u8::try_from(wire.len() - len).expect("a header is at most 10 bytes");
        Frame {
            wire: Bytes::from(wire),
            text_at,
        }
    }

    /// The bytes on the wire.
    pub(crate) fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// The text the frame carries.
    pub(crate) fn as_str(&self) -> &str {
        // Made from a String in `text`, and never changed.
        std::str::from_utf8(&self.wire[usize::from(self.text_at)..])
            .expect("a text frame's payload is the UTF-8 it was made from")
    }

    /// How many bytes it takes on the wire.
    pub(crate) fn len(&self) -> usize {
        self.wire.len()
    }

    /// The bytes on the wire, to queue.
    pub(crate) fn into_wire(self) -> Bytes {
        self.wire
    }
}

/// A ping frame with no payload, framed.
pub(crate) fn ping() -> Bytes {
    let mut wire = Vec::with_capacity(2);
    WsFrame::ping(Bytes::new())
        .format(&mut wire)
        .expect("formatting into memory never fails");
    Bytes::from(wire)
}

/// Frames read from the log go straight into the queue.
impl Extend<Frame> for Outbound {
    fn extend<I: IntoIterator<Item = Frame>>(&mut self, frames: I) {
        for frame in frames {
            self.push(frame.into_wire());
        }
    }
}

/// What a connection's parts share, in one allocation: the socket, the
/// outbox, the hand-over with the publisher ([`crate::tap`]), and the
/// connection's task to wake.
///
/// The **outbox** holds what the reading side has for the client, waiting
/// for the connection's writer: what tungstenite writes (pongs, close
/// frames, and in echo mode the echoed frames) and the replies meant for
/// this client only (error frames). Both bounded: when either is full, the
/// reading side waits, and with it the reading of further frames. Empty,
/// it holds no allocation.
///
/// The reader and the writer run in one task, so one waker serves both:
/// it is woken when the outbox fills (for the writer), when the writer has
/// taken it (for a reader waiting for room), and when the publisher hands
/// the socket back.
#[derive(Debug)]
pub(crate) struct Link {
    socket: TcpStream,
    outbox: Mutex<OutboxState>,
    /// Whether the outbox may hold something: the writer looks before it
    /// locks, on every batch.
    filled: AtomicBool,
    /// The connection's task.
    task: AtomicWaker,
    /// The most bytes tungstenite may write ahead.
    bound: usize,
    /// The most replies that may wait (`--reply-queue`).
    replies_bound: usize,
    /// Who writes to the socket: the connection's writer, or the publisher.
    pub(crate) tap: HandOver,
}

#[derive(Debug, Default)]
struct OutboxState {
    bytes: Vec<u8>,
    replies: VecDeque<Frame>,
    /// Whether the reading side waits for room.
    waiting: bool,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // Nothing under this lock panics.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The socket.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Wakes the connection's task.
    pub(crate) fn wake(&self) {
        self.task.wake();
    }

    /// Moves what is waiting into `queue`, tungstenite's bytes first, and
    /// wakes the reading side if it waited for room.
    fn take_into(&self, queue: &mut VecDeque<Bytes>) {
        if !self.filled.swap(false, Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        if !state.bytes.is_empty() {
            queue.push_back(Bytes::from(std::mem::take(&mut state.bytes)));
        }
        if !state.replies.is_empty() {
            queue.extend(state.replies.drain(..).map(Frame::into_wire));
            state.replies = VecDeque::new();
        }
        if std::mem::take(&mut state.waiting) {
            drop(state);
            self.wake();
        }
    }

    /// Queues a reply for this client, waiting while `--reply-queue` of
    /// them already wait.
    pub(crate) async fn reply(&self, frame: Frame) {
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.replies.len() < self.replies_bound {
                state.replies.extend(frame.take());
                self.filled.store(true, Ordering::Release);
                drop(state);
                self.wake();
                Poll::Ready(())
            } else {
                // Under the lock: the writer's take sees `waiting` after
                // the task is registered.
                state.waiting = true;
                self.task.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
    }

    /// Waits until the writer has something to do: the outbox filled, the
    /// publisher handed the socket back, or `shutdown` is cancelled (the
    /// server then wakes every connection: [`crate::log::Log::wake_all`]).
    pub(crate) async fn writer_needed(&self, shutdown: &CancellationToken) {
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            if self.filled.load(Ordering::Acquire)
                || !self.tap.is_parked()
                || shutdown.is_cancelled()
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// The socket as tungstenite sees it: it reads from the socket, and what
/// it writes goes into the [`Link`]'s outbox.
///
/// tungstenite's own read buffer starts empty (`read_buffer_size` 0), so
/// that a connection that has sent nothing holds none, and it then reads
/// in steps of a frame header. A read from the socket takes up to
/// `--read-buffer-size` bytes at once; what tungstenite has not taken yet
/// waits here, and the buffer is given back as soon as it is taken.
#[derive(Debug)]
pub(crate) struct Inbound {
    link: Arc<Link>,
    /// Read from the socket, not yet taken by tungstenite.
    unread: BytesMut,
    /// The most bytes one read from the socket takes.
    chunk: usize,
}

impl AsyncRead for Inbound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            let mut chunk = BytesMut::with_capacity(this.chunk);
            loop {
                std::task::ready!(this.link.socket.poll_read_ready(cx))?;
                match this.link.socket.try_read_buf(&mut chunk) {
                    // The end of the stream reads as nothing.
                    Ok(_) => break,
                    // Readiness was cleared: the next poll registers.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            this.unread = chunk;
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        if this.unread.is_empty() {
            // Give the buffer back: an idle connection holds none.
            this.unread = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Inbound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let link = &self.link;
        let mut state = link.lock();
        let room = link.bound.saturating_sub(state.bytes.len());
        if room == 0 {
            state.waiting = true;
            link.task.register(cx.waker());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        state.bytes.extend_from_slice(&buf[..n]);
        link.filled.store(true, Ordering::Release);
        drop(state);
        link.wake();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer sends the outbox; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection ends when both halves are dropped.
        Poll::Ready(Ok(()))
    }
}

/// Most frames handed to one `sendmsg`.
pub(crate) const SLICES: usize = 64;

/// Hands the first [`SLICES`] of `frames` to the kernel in one
/// `sendmsg`, without waiting: the bytes it took, or `WouldBlock`. Any
/// thread may call it: the publisher writes for the connections that wait
/// at the log's head (`crate::tap`).
pub(crate) fn send_now<'a>(
    socket: &TcpStream,
    frames: impl IntoIterator<Item = &'a Bytes>,
) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); SLICES];
    let mut n = 0;
    for (slot, bytes) in slices.iter_mut().zip(frames) {
        *slot = IoSlice::new(bytes);
        n += 1;
    }
    let slices = &slices[..n];
    // sendmsg(2) straight to the socket layer: writev(2) would take the
    // file-system path first (measured: 6 % of the server's CPU at 100
    // messages a second).
    match socket.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(socket).send_vectored(slices)
    }) {
        Ok(0) if !slices.iter().all(|s| s.is_empty()) => Err(io::ErrorKind::WriteZero.into()),
        sent => sent,
    }
}

/// Queue capacity kept between batches; more is given back, so that a
/// connection that goes quiet holds no buffer.
const QUEUE_KEPT: usize = 8;

/// The socket as the server writes it: shared frames queued, and written
/// as many at a time as the kernel takes.
#[derive(Debug)]
pub(crate) struct Outbound {
    link: Arc<Link>,
    /// Framed bytes not yet written, in order; the first may be partly
    /// written (it is then a slice of what is left).
    queue: VecDeque<Bytes>,
}

/// Splits an upgraded socket into the side tungstenite reads from and the
/// side the server writes to. `outbox` bounds what tungstenite may write
/// ahead of the writer, `replies` how many replies may wait.
pub(crate) fn split(
    stream: TcpStream,
    read_chunk: usize,
    outbox: usize,
    replies: usize,
) -> (Inbound, Outbound) {
    let link = Arc::new(Link {
        socket: stream,
        outbox: Mutex::default(),
        filled: AtomicBool::new(false),
        task: AtomicWaker::new(),
        bound: outbox,
        replies_bound: replies.max(1),
        tap: HandOver::default(),
    });
    (
        Inbound {
            link: Arc::clone(&link),
            unread: BytesMut::new(),
            chunk: read_chunk.max(1),
        },
        Outbound {
            link,
            queue: VecDeque::new(),
        },
    )
}

impl Outbound {
    /// Queues framed bytes.
    pub(crate) fn push(&mut self, wire: Bytes) {
        if !wire.is_empty() {
            self.queue.push_back(wire);
        }
    }

    /// Queues what the reading side left (tungstenite's bytes, replies):
    /// after the frames queued so far, so nothing lands inside one.
    pub(crate) fn push_outbox(&mut self) {
        self.link.take_into(&mut self.queue);
    }

    /// What the connection's parts share.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Writes what the socket takes now, without waiting: true if that
    /// was everything queued. The common case needs no timer and no
    /// wake-up registration.
    pub(crate) fn try_flush(&mut self) -> io::Result<bool> {
        self.push_outbox();
        while !self.queue.is_empty() {
            let written = match send_now(&self.link.socket, &self.queue) {
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        self.release();
        Ok(true)
    }

    /// Gives back the queue's memory once it is large and empty.
    fn release(&mut self) {
        if self.queue.capacity() > QUEUE_KEPT {
            self.queue = VecDeque::new();
        }
    }

    /// Writes everything queued (and what tungstenite wrote meanwhile).
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        self.push_outbox();
        while !self.queue.is_empty() {
            let Outbound { link, queue } = self;
            let socket = &link.socket;
            let written = std::future::poll_fn(|cx| {
                loop {
                    std::task::ready!(socket.poll_write_ready(cx))?;
                    match send_now(socket, &*queue) {
                        // Readiness was cleared: the next poll registers.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        sent => return Poll::Ready(sent),
                    }
                }
            })
            .await?;
            self.consume(written);
            if self.queue.is_empty() {
                self.push_outbox();
            }
        }
        self.release();
        Ok(())
    }

    /// Drops `n` written bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.queue.pop_front();
            } else {
                *front = front.slice(n..);
                n = 0;
            }
        }
    }

    /// The socket, for its options.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.link.socket
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_frame_is_tungstenites_framing_of_its_text() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536] {
            let text = "x".repeat(len);
            let frame = Frame::text(text.clone());
            assert_eq!(frame.as_str(), text);
            let mut expected = Vec::new();
            WsFrame::message(text, OpCode::Data(Data::Text), true)
                .format(&mut expected)
                .expect("format");
            assert_eq!(&frame.wire()[..], &expected[..], "length {len}");
            assert_eq!(frame.len(), expected.len());
        }
    }

    #[tokio::test]
    async fn everything_queued_arrives_in_order_across_partial_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.expect("read");
            all
        });
        let (server, _) = listener.accept().await.expect("accept");
        // A small send buffer forces partial writes.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        let (mut inbound, mut out) = split(server, 512, 1024, 4);
        let mut expected = Vec::new();
        for i in 0..500u32 {
            let frame = Frame::text(format!("{i:>width$}", width = (i as usize * 37) % 3000));
            expected.extend_from_slice(frame.wire());
            out.push(frame.wire().clone());
            if i % 100 == 0 {
                // What tungstenite writes goes between whole frames.
                let pong = [0x8a, 0x01, b'p'];
                let n = std::future::poll_fn(|cx| Pin::new(&mut inbound).poll_write(cx, &pong))
                    .await
                    .expect("outbox");
                assert_eq!(n, 3);
                out.push_outbox();
                expected.extend_from_slice(&pong);
            }
        }
        out.flush().await.expect("flush");
        assert!(out.is_empty());
        assert!(out.queue.capacity() <= QUEUE_KEPT, "no buffer kept");
        drop(out);
        drop(inbound);
        assert_eq!(client.await.expect("client"), expected);
    }

    #[tokio::test]
    async fn a_full_outbox_makes_tungstenite_wait_until_the_writer_takes_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (mut inbound, mut out) = split(server, 512, 4, 4);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            Pin::new(&mut inbound).poll_write(&mut cx, b"123456"),
            Poll::Ready(Ok(4))
        ));
        assert!(
            Pin::new(&mut inbound)
                .poll_write(&mut cx, b"56")
                .is_pending()
        );
        out.push_outbox();
        assert!(matches!(
            Pin::new(&mut inbound).poll_write(&mut cx, b"56"),
            Poll::Ready(Ok(2))
        ));
    }
}
