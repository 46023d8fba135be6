//! The socket after the handshake: tungstenite reads, the server writes.
//!
//! Each connection's
//! [`Delivery`] queues shared frames, and [`Link::send`] writes them with
//! `sendmsg`, as many as are ready in one system call, straight from the
//! shared buffers. A connection holds no write buffer of its own, so an
//! idle connection holds none.
//!
//! tungstenite keeps the reading side: it unmasks, checks and reassembles
//! what the client sends, answers pings and close frames, and enforces the
//! size limits. What it writes (those answers, the echo mode's frames, our
//! close frame) goes through [`TungsteniteIo`] into a small bounded outbox in
//! the connection's [`Link`], which the writer moves into the delivery
//! between two whole frames. Only the holder of the delivery's lock writes
//! to the socket.

use super::delivery::{Delivery, Lane};
use super::frame::Frame;
use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Bytes;

/// What a connection's parts share, in one allocation: the socket, the
/// outbox, the connection's [`Delivery`], and the connection's task to
/// wake.
///
/// The **delivery** is the one state of what goes to the socket
/// ([`super::delivery`]). Whoever holds its lock may write the socket: the
/// connection's writer, or the publisher while the connection waits at
/// the log's head (`crate::publish::fanout`). Both write what
/// [`Delivery::transmit`] says, in order, so a frame is never interleaved
/// with another.
///
/// The **outbox** holds what the reading side has for the client, waiting
/// for the writer to move it into the delivery: what tungstenite writes
/// (pongs, close frames, and in echo mode the echoed frames) and the
/// replies meant for this client only (error frames). Both bounded: when
/// either is full, the reading side waits, and with it the reading of
/// further frames. Empty, it holds no allocation.
///
/// The reader and the writer run in one task, so one waker serves both:
/// it is woken when the outbox fills (for the writer), when the writer has
/// taken it (for a reader waiting for room), and when the publisher hands
/// the socket back.
#[derive(Debug)]
pub(crate) struct Link {
    socket: TcpStream,
    delivery: Mutex<Delivery>,
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
}

#[derive(Debug, Default)]
struct OutboxState {
    bytes: Vec<u8>,
    replies: VecDeque<Frame>,
    /// Whether the reading side waits for room.
    waiting: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    /// The connection's delivery, locked: the holder owns the socket.
    pub(crate) fn delivery(&self) -> MutexGuard<'_, Delivery> {
        lock(&self.delivery)
    }

    /// The socket.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Wakes the connection's task.
    pub(crate) fn wake(&self) {
        self.task.wake();
    }

    /// Registers the connection's task, to be woken by the next
    /// [`Link::wake`].
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.task.register(waker);
    }

    /// Whether the outbox may hold something.
    pub(crate) fn outbox_filled(&self) -> bool {
        self.filled.load(Ordering::Acquire)
    }

    /// Moves what waits in the outbox into the delivery's urgent lane,
    /// the replies first (tungstenite's close frame, if any, is the last
    /// thing it writes), and wakes the reading side if it waited for room.
    /// Only when the urgent lane has taken the last batch, or `all` (the
    /// connection is closing), so that what waits stays bounded.
    pub(crate) fn take_outbox(&self, delivery: &mut Delivery, all: bool) {
        if !(all || delivery.takes_urgent()) || !self.filled.swap(false, Ordering::Acquire) {
            return;
        }
        let mut state = lock(&self.outbox);
        for reply in std::mem::take(&mut state.replies) {
            delivery.push(Lane::Urgent, reply.into_wire());
        }
        if !state.bytes.is_empty() {
            delivery.push(Lane::Urgent, Bytes::from(std::mem::take(&mut state.bytes)));
        }
        if std::mem::take(&mut state.waiting) {
            drop(state);
            self.wake();
        }
    }

    /// Writes what the socket takes now, without waiting, and tells the
    /// delivery: `Ok(true)` if that was everything queued. The caller
    /// holds the delivery's lock, and with it the socket.
    pub(crate) fn send(&self, delivery: &mut Delivery, now: Instant) -> io::Result<bool> {
        while !delivery.is_empty() {
            match send_now(&self.socket, delivery.transmit()) {
                Ok(written) => delivery.on_written(written, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    delivery.on_blocked(now);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes everything queued, and what tungstenite writes meanwhile,
    /// by `deadline` (asked again at each wake-up: a stop may bring it
    /// nearer): whether it was all written.
    pub(crate) async fn flush(&self, mut deadline: impl FnMut() -> tokio::time::Instant) -> bool {
        let mut by = deadline();
        let mut timer = std::pin::pin!(tokio::time::sleep_until(by));
        loop {
            {
                let mut delivery = self.delivery();
                self.take_outbox(&mut delivery, true);
                match self.send(&mut delivery, Instant::now()) {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(_) => return false,
                }
            }
            let woke = std::future::poll_fn(|cx| {
                self.task.register(cx.waker());
                if self.outbox_filled() || self.socket.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(true);
                }
                let now = deadline();
                if now != by {
                    by = now;
                    timer.as_mut().reset(by);
                }
                timer.as_mut().poll(cx).map(|()| false)
            })
            .await;
            if !woke {
                return false;
            }
        }
    }

    /// Queues a reply for this client, waiting while `--reply-queue` of
    /// them already wait.
    pub(crate) async fn reply(&self, frame: Frame) {
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            let mut state = lock(&self.outbox);
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
pub(crate) struct TungsteniteIo {
    link: Arc<Link>,
    /// Read from the socket, not yet taken by tungstenite.
    unread: BytesMut,
    /// The most bytes one read from the socket takes.
    chunk: usize,
}

/// The reading side, as tungstenite runs it.
pub(crate) type Ws = WebSocketStream<TungsteniteIo>;

impl AsyncRead for TungsteniteIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            loop {
                // The buffer is made only once the socket is readable: a
                // connection waiting for its client holds none.
                std::task::ready!(this.link.socket.poll_read_ready(cx))?;
                let mut chunk = BytesMut::with_capacity(this.chunk);
                match this.link.socket.try_read_buf(&mut chunk) {
                    // The end of the stream reads as nothing.
                    Ok(_) => {
                        this.unread = chunk;
                        break;
                    }
                    // Readiness was cleared: the next poll registers.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
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

impl AsyncWrite for TungsteniteIo {
    /// Takes all of `buf` or nothing. tungstenite hands over whole frames
    /// (its write buffer, as it stands), and the writer moves the outbox
    /// into the delivery between two frames of the log: a frame cut in
    /// two here could have another written inside it. An empty outbox
    /// takes whatever tungstenite has, which its `max_write_buffer_size`
    /// bounds.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let link = &self.link;
        let mut state = lock(&link.outbox);
        if !state.bytes.is_empty() && state.bytes.len() + buf.len() > link.bound {
            state.waiting = true;
            link.task.register(cx.waker());
            return Poll::Pending;
        }
        state.bytes.extend_from_slice(buf);
        link.filled.store(true, Ordering::Release);
        drop(state);
        link.wake();
        Poll::Ready(Ok(buf.len()))
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
/// at the log's head (`crate::publish::fanout`).
///
/// With `MSG_NOSIGNAL`: a peer that reset the connection is an error
/// here, not a SIGPIPE that would kill a host process which left that
/// signal at its default.
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
        socket2::SockRef::from(socket).send_vectored_with_flags(slices, libc::MSG_NOSIGNAL)
    }) {
        Ok(0) if !slices.iter().all(|s| s.is_empty()) => Err(io::ErrorKind::WriteZero.into()),
        sent => sent,
    }
}

/// Splits an upgraded socket into the side tungstenite reads from and
/// what the connection's parts share. `outbox` bounds what tungstenite
/// may write ahead of the writer, `replies` how many replies may wait;
/// `delivery` is the connection's delivery, from its handshake.
pub(crate) fn split(
    stream: TcpStream,
    read_chunk: usize,
    outbox: usize,
    replies: usize,
    delivery: Delivery,
) -> (TungsteniteIo, Arc<Link>) {
    let link = Arc::new(Link {
        socket: stream,
        delivery: Mutex::new(delivery),
        outbox: Mutex::default(),
        filled: AtomicBool::new(false),
        task: AtomicWaker::new(),
        bound: outbox,
        replies_bound: replies.max(1),
    });
    (
        TungsteniteIo {
            link: Arc::clone(&link),
            unread: BytesMut::new(),
            chunk: read_chunk.max(1),
        },
        link,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::AsyncReadExt;

    fn delivery() -> Delivery {
        let settings = super::super::delivery::Settings {
            ping_interval: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(60),
            write_timeout: std::time::Duration::from_secs(10),
            queue_bytes: 1 << 20,
            epoch: Instant::now(),
        };
        Delivery::new(std::sync::Arc::new(settings), Instant::now())
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
        let (mut inbound, link) = split(server, 512, 1024, 4, delivery());
        let deadline = || tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut expected = Vec::new();
        for block in 0..5u32 {
            // What tungstenite writes goes at the next frame boundary:
            // before the frames not yet begun.
            let pong = [0x8a, 0x01, b'p'];
            let n = std::future::poll_fn(|cx| Pin::new(&mut inbound).poll_write(cx, &pong))
                .await
                .expect("outbox");
            assert_eq!(n, 3);
            expected.extend_from_slice(&pong);
            {
                let mut delivery = link.delivery();
                for i in block * 100..(block + 1) * 100 {
                    let frame =
                        Frame::text(format!("{i:>width$}", width = (i as usize * 37) % 3000));
                    expected.extend_from_slice(frame.wire());
                    delivery.push(Lane::Event, frame.into_wire());
                }
                link.take_outbox(&mut delivery, false);
            }
            assert!(link.flush(deadline).await, "flushed");
        }
        {
            let delivery = link.delivery();
            assert!(delivery.is_empty());
            assert!(delivery.holds_no_buffer(), "no buffer kept");
        }
        drop(link);
        drop(inbound);
        assert_eq!(client.await.expect("client"), expected);
    }

    #[tokio::test]
    async fn the_outbox_takes_whole_writes_and_makes_tungstenite_wait_for_room() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (mut inbound, link) = split(server, 512, 4, 4, delivery());
        let mut cx = Context::from_waker(Waker::noop());
        // Empty, it takes a write larger than its bound whole: never a
        // part of a frame.
        assert!(matches!(
            Pin::new(&mut inbound).poll_write(&mut cx, b"123456"),
            Poll::Ready(Ok(6))
        ));
        assert!(
            Pin::new(&mut inbound)
                .poll_write(&mut cx, b"78")
                .is_pending()
        );
        link.take_outbox(&mut link.delivery(), false);
        assert!(matches!(
            Pin::new(&mut inbound).poll_write(&mut cx, b"78"),
            Poll::Ready(Ok(2))
        ));
        assert!(
            matches!(
                Pin::new(&mut inbound).poll_write(&mut cx, b"9"),
                Poll::Ready(Ok(1))
            ),
            "within the bound, writes add up"
        );
    }
}
