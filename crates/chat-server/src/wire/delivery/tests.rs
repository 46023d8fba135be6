use super::*;

/// A manual clock: milliseconds after a fixed start.
struct Clock(Instant);

impl Clock {
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }

    /// The settings of these tests, counting from this clock's start.
    fn settings(&self) -> Arc<Settings> {
        Arc::new(Settings {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            queue_bytes: 4096,
            epoch: self.0,
        })
    }
}

const QUEUE_BYTES: usize = 4096;

fn frame(tag: u8, len: usize) -> Bytes {
    Bytes::from(vec![tag; len])
}

/// A socket on the manual clock: it takes at most `room` bytes, and
/// keeps what it took.
#[derive(Default)]
struct Socket {
    got: Vec<u8>,
}

impl Socket {
    /// Writes what the socket takes (up to `room`), as the writer does:
    /// true if everything queued went out.
    fn write(&mut self, d: &mut Delivery, room: usize, now: Instant) -> bool {
        let mut left = room;
        let mut n = 0;
        for bytes in d.transmit() {
            let take = bytes.len().min(left);
            self.got.extend_from_slice(&bytes[..take]);
            left -= take;
            n += take;
            if left == 0 {
                break;
            }
        }
        d.on_written(n, now);
        if d.is_empty() {
            true
        } else {
            d.on_blocked(now);
            false
        }
    }
}

/// Splits the bytes written into frames by their tags, checking that
/// no frame was interleaved with another: the frame `(tag, len)`
/// sequence.
fn runs(bytes: &[u8]) -> Vec<(u8, usize)> {
    let mut out: Vec<(u8, usize)> = Vec::new();
    for &b in bytes {
        match out.last_mut() {
            Some((tag, len)) if *tag == b => *len += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[test]
fn a_long_replay_to_a_reader_that_answers_pings_is_never_closed_as_idle() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.start(Position::ZERO, false);
    let mut socket = Socket::default();
    let mut pings_sent = 0;
    // A 60 s replay, 10 bytes every 10 ms: the socket is always full,
    // and the client answers each ping 200 ms after it arrived.
    let mut pong_due = None;
    for tick in 0..=6_000u64 {
        let now = clock.at(tick * 10);
        while d.fits(100) && d.queued() < 1000 {
            d.push(Lane::History, frame(1, 100));
        }
        if pong_due.is_some_and(|due| now >= due) {
            d.on_heard(now);
            pong_due = None;
        }
        if now >= d.poll_timeout() {
            d.on_timeout(now).expect("never closed while it reads");
        }
        let before = socket.got.len();
        socket.write(&mut d, 10, now);
        if socket.got[before..].windows(2).any(|w| w == [0x89, 0x00]) {
            pings_sent += 1;
            pong_due = Some(now + Duration::from_millis(200));
        }
    }
    socket.write(&mut d, usize::MAX, clock.at(60_010));
    assert!(pings_sent >= 1, "pinged during the replay");
    // Every history frame whole, the pings between them.
    for (tag, len) in runs(&socket.got) {
        match tag {
            1 => assert_eq!(len % 100, 0, "history frames whole"),
            0x89 | 0x00 => {}
            other => panic!("tag {other}"),
        }
    }
}

#[test]
fn a_quiet_client_is_pinged_before_it_counts_as_idle() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.start(Position::ZERO, false);
    let mut socket = Socket::default();
    assert_eq!(d.poll_timeout(), clock.at(30_000), "the first ping");
    d.on_timeout(clock.at(30_000)).expect("a ping");
    assert!(socket.write(&mut d, usize::MAX, clock.at(30_000)));
    assert_eq!(socket.got, [0x89, 0x00]);
    // No pong: idle 60 s after the handshake, not after the ping.
    assert_eq!(d.poll_timeout(), clock.at(60_000));
    assert_eq!(
        d.on_timeout(clock.at(60_000)),
        Err(CloseReason::IdleTimeout)
    );
    // A pong at 45 s moves it.
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.on_timeout(clock.at(30_000)).expect("a ping");
    d.on_heard(clock.at(45_000));
    assert_eq!(d.poll_timeout(), clock.at(60_000), "the next ping");
    d.on_timeout(clock.at(60_000)).expect("pinged again");
    assert_eq!(d.poll_timeout(), clock.at(90_000));
    assert_eq!(
        d.on_timeout(clock.at(105_000)),
        Err(CloseReason::IdleTimeout)
    );
}

#[test]
fn a_reader_that_stops_is_cut_at_the_write_timeout_exactly() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.start(Position::ZERO, false);
    let mut socket = Socket::default();
    d.push(Lane::Event, frame(1, 3000));
    // The socket takes 1,000 bytes at 5 s, then nothing.
    assert!(!socket.write(&mut d, 1000, clock.at(5_000)));
    assert_eq!(d.poll_timeout(), clock.at(15_000));
    d.on_timeout(clock.at(14_999)).expect("not yet");
    assert_eq!(d.on_timeout(clock.at(15_000)), Err(CloseReason::Stalled));

    // A reader that keeps taking, slower than the log grows, is not
    // stalled: what was queued when its socket refused is written
    // within the timeout, each time (4 KiB at 500 bytes a second).
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    let mut socket = Socket::default();
    for second in 0..120u64 {
        let now = clock.at(second * 1000);
        for _ in 0..2 {
            if d.fits(500) {
                d.push(Lane::Event, frame(1, 500));
            }
        }
        d.on_heard(now);
        if now >= d.poll_timeout() {
            d.on_timeout(now).expect("never stalled");
        }
        socket.write(&mut d, 500, now);
    }
    // It read a frame a second, as fast as its socket took them.
    assert!(d.cursor().0 >= 115, "{:?}", d.cursor());
}

#[test]
fn a_close_comes_after_whole_frames_and_nothing_follows_it() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.start(Position::ZERO, true);
    let mut socket = Socket::default();
    d.push(Lane::Event, frame(1, 600));
    d.push(Lane::Event, frame(2, 600));
    // The kernel takes half a frame.
    assert!(!socket.write(&mut d, 300, clock.at(0)));
    d.close(clock.at(10_000));
    // The publisher keeps publishing: nothing more is queued.
    d.push(Lane::Event, frame(3, 600));
    assert_eq!(d.sync_due(), None, "no sync after the close");
    assert!(!d.park(d.cursor()), "a closing connection never parks");
    // tungstenite's close frame.
    d.push(Lane::Urgent, frame(8, 4));
    assert!(socket.write(&mut d, usize::MAX, clock.at(1)));
    assert_eq!(runs(&socket.got), [(1, 600), (8, 4)]);
    // The close must be written by its deadline.
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.close(clock.at(10_000));
    d.push(Lane::Urgent, frame(8, 4));
    assert_eq!(d.poll_timeout(), clock.at(10_000));
    assert_eq!(d.on_timeout(clock.at(10_000)), Err(CloseReason::Stalled));
}

#[test]
fn urgent_frames_go_at_the_next_frame_boundary() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    let mut socket = Socket::default();
    d.push(Lane::History, frame(1, 100));
    d.push(Lane::History, frame(2, 100));
    assert!(!socket.write(&mut d, 50, clock.at(0)));
    d.push(Lane::Urgent, frame(9, 2));
    d.push(Lane::Urgent, frame(7, 10));
    assert!(socket.write(&mut d, usize::MAX, clock.at(1)));
    assert_eq!(runs(&socket.got), [(1, 100), (9, 2), (7, 10), (2, 100)]);
}

#[test]
fn bytes_queued_never_exceed_the_bound_whatever_the_frame_sizes() {
    // Frames of every size up to the bound, offered as fast as the
    // delivery lets them in, to a socket taking random amounts.
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    let mut socket = Socket::default();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    let mut offered = Vec::new();
    for step in 0..20_000u64 {
        let len = 1 + random(QUEUE_BYTES);
        if d.fits(len) {
            let tag = (step % 200) as u8 + 1;
            d.push(Lane::Event, frame(tag, len));
            offered.push((tag, len));
        }
        assert!(d.queued() <= QUEUE_BYTES, "step {step}");
        socket.write(&mut d, random(3000), clock.at(step));
        d.on_heard(clock.at(step));
    }
    socket.write(&mut d, usize::MAX, clock.at(20_000));
    // Every frame arrived whole, in order (adjacent frames have
    // different tags).
    assert_eq!(runs(&socket.got), offered);
}

#[test]
fn a_delivery_is_small() {
    // Every connection holds one for its life (measured: it is what an
    // idle connection costs beyond its socket and task).
    let size = std::mem::size_of::<Delivery>();
    eprintln!("Delivery: {size} bytes");
    assert!(size <= 160, "{size} bytes");
}

#[test]
fn a_connection_parks_only_at_the_head_with_nothing_queued() {
    let clock = Clock(Instant::now());
    let mut d = Delivery::new(clock.settings(), clock.at(0));
    d.start(Position(5), true);
    assert_eq!(d.sync_due(), Some(Position(5)));
    assert!(!d.park(Position(6)), "behind the head");
    d.push(Lane::Event, frame(1, 10));
    assert_eq!(d.cursor(), Position(6));
    assert!(!d.park(Position(6)), "something queued");
    d.push_sync(Position(6), frame(2, 5));
    assert_eq!(d.sync_due(), None);
    Socket::default().write(&mut d, usize::MAX, clock.at(0));
    assert!(d.park(Position(6)));
    assert!(d.is_parked());
    d.unpark();
    assert!(!d.is_parked());
}
