//! Writing for the idle: the publisher sends new events straight to the
//! sockets of connections that wait at the log's head.
//!
//! A connection's writer that has sent everything up to the head, and has
//! nothing queued, *parks* its `Delivery` (`crate::wire::delivery`).
//! When the committer publishes the next batch, it queues the batch (and,
//! for a client that opted in, the `sync` frame after it) in every parked
//! connection's delivery and writes it to the socket itself, one
//! non-blocking `sendmsg` each, and the connection's task is not woken at
//! all. This is what uWebSockets' `publish` does; at a low rate, a task
//! wake-up per client per event was most of our user-space cost per
//! delivered frame.
//!
//! Only what the socket takes at once is written so. When it takes less,
//! what is left stays queued in the delivery, exactly where the socket
//! stopped (the rest of a frame begun first); the publisher unparks the
//! connection and wakes its writer, which carries on from there under
//! `--write-timeout`. A writer that is busy (replaying, catching up,
//! waiting for its socket, closing) is not parked, and the publisher
//! leaves it alone: it reads the log itself, and parks again only once it
//! is at the head.
//!
//! There is one state and one lock per connection: whoever holds the
//! delivery's lock writes the socket, in the delivery's order, so a frame
//! is never interleaved with another, and a close is never followed by
//! anything.

use super::entry::Entry;
use super::log::Log;
use crate::wire::frame::Frame;
use crate::wire::link::Link;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Every connection, for the publisher.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    all: Mutex<slab::Slab<Arc<Link>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fanout {
    /// Adds a connection, for the publisher to write to while it is parked.
    pub(crate) fn attach(self: &Arc<Self>, link: &Arc<Link>) -> Attached {
        let key = lock(&self.all).insert(Arc::clone(link));
        Attached {
            fanout: Arc::clone(self),
            key,
        }
    }

    /// Publishes committed entries to `log`, then writes them to every
    /// parked connection's socket, as far as each takes them without
    /// waiting.
    pub(crate) fn publish(&self, log: &Log, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        log.publish(entries);
        let head = last.event.position;
        self.deliver(entries, || log.sync_frame(head));
    }

    /// Writes `entries` (published in order, just now) to every parked
    /// connection's socket, as far as each takes them without waiting.
    /// `sync` makes the `sync` frame announcing the last entry.
    fn deliver(&self, entries: &[Entry], sync: impl FnOnce() -> Frame) {
        if entries.is_empty() {
            return;
        }
        // Copied out, so that joining and leaving never wait for a
        // delivery to a thousand sockets.
        let links: Vec<Arc<Link>> = lock(&self.all).iter().map(|(_, l)| Arc::clone(l)).collect();
        let mut sync = Some(sync);
        let mut sync_frame: Option<Frame> = None;
        let now = Instant::now();
        for link in &links {
            deliver(link, entries, now, &mut || {
                if let Some(make) = sync.take() {
                    sync_frame = Some(make());
                }
                sync_frame.clone()
            });
        }
    }

    /// Wakes every connection's task (the server is stopping).
    pub(crate) fn wake_all(&self) {
        for (_, link) in lock(&self.all).iter() {
            link.wake();
        }
    }
}

/// Queues and writes what a parked connection has not had of `entries`,
/// and its `sync` frame, as far as the socket takes them now; hands the
/// socket back to the writer if it did not take everything.
fn deliver(link: &Link, entries: &[Entry], now: Instant, sync: &mut impl FnMut() -> Option<Frame>) {
    let mut delivery = link.delivery();
    if !delivery.is_parked() {
        return;
    }
    // Parked at the head, the connection has everything before the
    // first entry; it may have had some of these too, if it parked after
    // their publish.
    let cursor = delivery.cursor();
    let first = entries[0].event.position;
    let Some(skip) = cursor.0.checked_sub(first.0 - 1) else {
        // A gap (never expected): let the writer read the log.
        delivery.unpark();
        drop(delivery);
        link.wake();
        return;
    };
    let mut rest = entries.get(skip as usize..).unwrap_or_default();
    if rest.is_empty() {
        return;
    }
    let mut sent = true;
    while sent && !rest.is_empty() {
        while let Some(entry) = rest.first()
            && delivery.fits(entry.frame.len())
        {
            delivery.push_event(&entry.frame);
            rest = &rest[1..];
        }
        if rest.is_empty()
            && let Some(position) = delivery.sync_due()
            && let Some(frame) = sync()
        {
            delivery.push_sync(position, frame.into_wire());
        }
        // An error is the writer's to meet: it is woken below.
        sent = link.send(&mut delivery, now).unwrap_or(false);
    }
    if !sent || !rest.is_empty() {
        delivery.unpark();
        drop(delivery);
        link.wake();
    }
}

/// A connection, attached to the publisher until dropped.
#[derive(Debug)]
pub(crate) struct Attached {
    fanout: Arc<Fanout>,
    key: usize,
}

impl Drop for Attached {
    fn drop(&mut self) {
        lock(&self.fanout.all).try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::testing::{drive, log_of};
    use crate::wire::delivery::{Delivery, Settings};
    use crate::wire::link::TungsteniteIo;
    use chat_core::{Chat, Config, Context, Timestamp};
    use chat_proto::{ClientFrame, Position, SendMessage, Uuid};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// A connected pair: the server's socket, split as a connection splits
    /// it, and the client's. `small` shrinks both buffers so that a client
    /// that does not read fills them quickly.
    async fn pair(small: bool) -> ((TungsteniteIo, Arc<Link>), TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        if small {
            client.set_recv_buffer_size(4096).expect("rcvbuf");
        }
        let client = client
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        if small {
            socket2::SockRef::from(&server)
                .set_send_buffer_size(4096)
                .expect("sndbuf");
        }
        let settings = Settings {
            ping_interval: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(60),
            write_timeout: std::time::Duration::from_secs(10),
            queue_bytes: 64 * 1024,
            epoch: std::time::Instant::now(),
        };
        let delivery = Delivery::new(Arc::new(settings), std::time::Instant::now());
        (
            crate::wire::link::split(server, 4096, 1024, 4, delivery),
            client,
        )
    }

    async fn receive(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_exact(&mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        got
    }

    /// Whether nothing arrives for 100 ms.
    async fn quiet(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(
            std::time::Duration::from_millis(100),
            client.read(&mut byte),
        )
        .await
        .is_err()
    }

    #[tokio::test]
    async fn a_connection_waiting_at_the_head_is_written_to_by_the_publisher_without_a_wake_up() {
        let log = log_of(1000);
        let (_, entries) = drive(30);
        let ((_io, link), mut client) = pair(false).await;
        let fanout = Arc::new(Fanout::default());
        let _attached = fanout.attach(&link);
        link.delivery().start(Position::ZERO, true);
        // Parking needs the sync of the start announced first.
        link.delivery()
            .push_sync(Position::ZERO, log.sync_frame(Position::ZERO).into_wire());
        let mut expected = log.sync_frame(Position::ZERO).wire().to_vec();
        assert!(
            link.send(&mut link.delivery(), std::time::Instant::now())
                .expect("sent")
        );
        assert!(link.delivery().park(log.head()));
        let woken = std::sync::Arc::new(Woken::default());
        link.register(&std::task::Waker::from(std::sync::Arc::clone(&woken)));
        for batch in entries.chunks(7) {
            fanout.publish(&log, batch);
            for entry in batch {
                expected.extend_from_slice(entry.frame.wire());
            }
            let last = batch.last().expect("a batch").event.position;
            expected.extend_from_slice(log.sync_frame(last).wire());
        }
        assert_eq!(receive(&mut client, expected.len()).await, expected);
        assert!(
            !woken.0.load(std::sync::atomic::Ordering::SeqCst),
            "the writer was not needed"
        );
        {
            let delivery = link.delivery();
            assert!(delivery.is_parked());
            assert!(delivery.is_empty());
            assert_eq!(delivery.cursor(), log.head());
            assert_eq!(delivery.sync_due(), None, "the head was announced");
        }
        // Unparked, the writer writes: a publish leaves the socket alone.
        link.delivery().unpark();
        let (_, more) = drive(31);
        fanout.publish(&log, &more[entries.len()..]);
        assert!(
            quiet(&mut client).await,
            "nothing written for an unparked connection"
        );
        // And a writer behind the head cannot park.
        assert!(!link.delivery().park(log.head()));
    }

    /// A waker that notes it was woken.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_socket_that_takes_less_is_handed_back_to_its_writer_where_the_publisher_stopped() {
        let log = log_of(100_000);
        let mut chat = Chat::new(Config::default());
        let ((_io, link), mut client) = pair(true).await;
        let fanout = Arc::new(Fanout::default());
        let _attached = fanout.attach(&link);
        assert!(link.delivery().park(Position::ZERO));
        let mut all = Vec::new();
        let mut i = 0u64;
        // The client does not read: the publisher stops where its socket
        // is full, and hands it back. Batches of 20 frames of about 2 KB,
        // so that the socket fills in the middle of one.
        while link.delivery().is_parked() {
            let batch: Vec<Entry> = (0..20).flat_map(|k| post(&mut chat, i * 20 + k)).collect();
            fanout.publish(&log, &batch);
            all.extend(batch);
            i += 1;
            assert!(i < 1_000, "a 4 KiB socket never filled");
        }
        let (cursor, queued) = {
            let delivery = link.delivery();
            (delivery.cursor(), delivery.queued())
        };
        assert!(queued > 0, "what the socket did not take is queued");
        // The kernel takes bytes, not frames: the client has every frame
        // before the cursor but the bytes still queued, and the queue
        // begins inside a frame.
        let mut expected = Vec::new();
        for entry in &all {
            expected.extend_from_slice(entry.frame.wire());
        }
        let up_to_cursor: usize = all[..cursor.0 as usize].iter().map(|e| e.frame.len()).sum();
        let taken = up_to_cursor - queued;
        assert!(
            !all.iter()
                .scan(0, |at, e| {
                    *at += e.frame.len();
                    Some(*at)
                })
                .any(|end| end == taken),
            "the socket filled inside a frame"
        );
        assert_eq!(receive(&mut client, taken).await, expected[..taken]);
        // The writer sends what is queued, then reads the log from the
        // cursor: the client gets every frame once, in order.
        let rest = {
            let mut delivery = link.delivery();
            log.read(cursor, |frame| {
                delivery.push_event(frame);
                true
            })
            .expect("held");
            delivery.queued()
        };
        assert_eq!(link.delivery().cursor(), log.head());
        let (got, flushed) = tokio::join!(
            receive(&mut client, rest),
            link.flush(|| tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        );
        assert!(flushed, "flushed");
        assert_eq!(got, expected[taken..]);
    }

    /// A 500-character message of 1,985 bytes from a new user, as the chat
    /// applies it.
    fn post(chat: &mut Chat, i: u64) -> Vec<Entry> {
        let ctx = Context {
            user: format!("u{i}").as_str().into(),
            now: Timestamp::from_unix_millis(1_700_000_000_000 + i),
            message_id: Uuid::from_u128(u128::from(i) + 1),
        };
        let text = format!("{}{i:05}", "😀".repeat(495));
        chat.handle(
            ctx,
            ClientFrame::SendMessage(SendMessage {
                text,
                author_name: None,
            }),
        )
        .expect("a post");
        std::iter::from_fn(|| chat.poll_event())
            .map(Entry::from)
            .collect()
    }
}
