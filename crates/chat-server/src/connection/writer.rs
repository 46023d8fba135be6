//! The writing half: a thin loop around the connection's delivery.

use crate::shared::Shared;
use crate::wire::close::CloseReason;
use crate::wire::delivery::{Delivery, Lane};
use crate::wire::frame::Frame;
use crate::wire::link::Link;
use chat_proto::{Reset, ServerFrame};
use std::task::Poll;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::error::Error as WsError;

/// What a joining client is sent before the log: a `reset`, if its
/// resume became a full replay, then the history, read from the log a
/// batch at a time (`Log::replay`).
pub(crate) struct Replay {
    reset: Option<Frame>,
    /// The next message of the history to queue, by sequence number.
    next: u64,
    /// The first sequence number past what the client joined with.
    end: u64,
}

impl Replay {
    pub(crate) fn new(
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
pub(crate) struct Writer;

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
    /// This node stopped serving the chat.
    NotServing,
}

impl Writer {
    // Not an `async fn`, for the reason given at `super::run`.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    pub(crate) fn run<'a>(
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
                        if shared.unserved.is_cancelled() {
                            return CloseReason::NotServing;
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
                    Woke::NotServing => return CloseReason::NotServing,
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
                    delivery.push_event(frame);
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
            if shared.unserved.is_cancelled() {
                return Poll::Ready(Woke::NotServing);
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
