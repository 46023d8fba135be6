//! Soak and abuse: ordinary clients chat for a long time while abusers do
//! their worst, and the server's memory and file descriptors are sampled.
//!
//! Abusers: clients that never read, clients that connect and send nothing
//! (slowloris), a flood of connections from one address past its limit,
//! clients sending junk as fast as they can, and plain HTTP clients (the
//! page, `/whoami`, `/metrics`, oversized request heads). The run passes only if the
//! ordinary clients lost nothing, memory and descriptors are flat after
//! warm-up, every abuser was refused or disconnected, and the server still
//! answers at the end.

use crate::client::{Marker, Target, run_id};
use crate::http;
use crate::stats::rss_bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Debug, Clone)]
pub struct Soak {
    /// How long.
    pub duration: Duration,
    /// Ordinary clients, each sending one message every `send_every`.
    pub chatters: usize,
    /// How often each ordinary client sends.
    pub send_every: Duration,
    /// Clients that never read.
    pub non_readers: usize,
    /// Connections that open TCP and send nothing.
    pub slowloris: usize,
    /// Connections attempted at once from one address.
    pub flood: usize,
    /// Clients sending junk frames as fast as they can.
    pub junk: usize,
    /// The server's refusal budget (`--max-refusals`): a junk client must
    /// get exactly this many error frames, then a 1008 close.
    pub refusal_budget: u64,
    /// Plain HTTP clients: page, `/whoami` and `/metrics` over keep-alive,
    /// and an oversized request head now and then.
    pub browsers: usize,
    /// The server's PID, for memory and descriptors.
    pub server_pid: Option<u32>,
    /// Allowed growth of memory after warm-up, as a share.
    pub tolerance: f64,
}

#[derive(Debug, Default)]
struct Counters {
    chat_sent: AtomicU64,
    chat_received: AtomicU64,
    chat_closed: AtomicU64,
    non_readers_closed: AtomicU64,
    slowloris_dropped: AtomicU64,
    flood_refused: AtomicU64,
    flood_accepted: AtomicU64,
    junk_errors: AtomicU64,
    junk_closed: AtomicU64,
    /// Junk connections closed with 1008 after exactly the budget's errors.
    junk_closed_as_promised: AtomicU64,
    /// Junk connections that ended any other way, and the first such end.
    junk_closed_otherwise: AtomicU64,
    junk_first_surprise: std::sync::Mutex<Option<String>>,
    http_ok: AtomicU64,
    http_unexpected: AtomicU64,
    http_oversized_refused: AtomicU64,
    /// Why the first chatter that lost its connection lost it.
    chat_first_failure: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn chatter_failed(&self, why: String) {
        self.chat_closed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .chat_first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }
}

fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Where each role's source addresses start. Every role gets addresses of
/// its own, laid out one after another: a chatter that shared an address with
/// the flood would lose its per-address connection slot to it and fail the
/// run for a reason that is not the server's.
#[derive(Debug, Clone, Copy)]
struct Layout {
    non_readers: usize,
    junk: usize,
    slowloris: usize,
    flood: usize,
    browsers: usize,
    checker: usize,
    total: usize,
}

impl Layout {
    fn of(soak: &Soak) -> Self {
        let non_readers = soak.chatters;
        let junk = non_readers + soak.non_readers;
        let slowloris = junk + soak.junk;
        let flood = slowloris + soak.slowloris;
        let browsers = flood + 1;
        let checker = browsers + soak.browsers;
        Layout {
            non_readers,
            junk,
            slowloris,
            flood,
            browsers,
            checker,
            total: checker + 1,
        }
    }
}

/// What a soak "browser" asks for, in turn, on one keep-alive connection.
const BROWSER_PATHS: [&str; 6] = [
    "/",
    "/app.js",
    "/style.css",
    "/whoami",
    "/metrics",
    "/healthz",
];

/// Runs the soak and reports; `"passed"` says whether every check held.
pub async fn run(target: &Target, soak: &Soak) -> Value {
    let at = Layout::of(soak);
    if !target.sources.is_empty() && target.sources.len() < at.total {
        return json!({
            "passed": false,
            "error": format!(
                "the soak needs {} source addresses (one per client, none shared) but --source-ips is {}",
                at.total,
                target.sources.len()
            ),
        });
    }
    let run = run_id();
    let c = Arc::new(Counters::default());
    // The server's descriptors before any client of this run: every one
    // opened for a client must be closed again once the clients are gone.
    let fds_idle = soak.server_pid.and_then(fd_count);
    let start = Instant::now();
    let end = start + soak.duration;
    let mut tasks = JoinSet::new();

    // Ordinary clients: send a marked message every `send_every`, read
    // everything, count this run's messages.
    for i in 0..soak.chatters {
        let target = target.clone();
        let c = Arc::clone(&c);
        let every = soak.send_every;
        tasks.spawn(async move {
            let ws = match target.connect(i).await {
                Ok(ws) => ws,
                Err(e) => return c.chatter_failed(format!("chatter {i} could not connect: {e}")),
            };
            let (mut sink, mut stream) = ws.split();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + every.mul_f64(i as f64 / 97.0 % 1.0),
                every,
            );
            let mut seq = 0;
            let deadline = tokio::time::Instant::from_std(end);
            loop {
                tokio::select! {
                    _ = tick.tick(), if tokio::time::Instant::now() < deadline => {
                        let m = Marker::now(run, i as u32, seq);
                        if sink.send(Message::text(m.frame())).await.is_err() { break; }
                        seq += 1;
                        c.chat_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    frame = stream.next() => match frame {
                        Some(Ok(Message::Text(t))) => {
                            if Marker::find(&t, run).is_some() {
                                c.chat_received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(_)) => {}
                        other => {
                            c.chatter_failed(format!("chatter {i} lost its connection: {other:?}"));
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(deadline + Duration::from_secs(3)) => break,
                }
            }
        });
    }

    // Non-readers: connect, then never read. Each should be dropped once it
    // falls behind; it reconnects and is dropped again.
    for i in 0..soak.non_readers {
        let target = target.clone();
        let c = Arc::clone(&c);
        tasks.spawn(async move {
            while Instant::now() < end {
                let Ok(mut ws) = target.connect_with(at.non_readers + i, Some(4096)).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                // Never read; only send a ping now and then. Once the server
                // has dropped the connection, the kernel answers a write
                // with a reset, and a later write fails.
                loop {
                    if Instant::now() >= end {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        c.non_readers_closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }

    // Slowloris: open TCP, send nothing, see how long until dropped.
    for i in 0..soak.slowloris {
        let target = target.clone();
        let c = Arc::clone(&c);
        tasks.spawn(async move {
            while Instant::now() < end {
                let Ok(mut s) = target.tcp(at.slowloris + i, None).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut buf = [0u8; 64];
                let left = end.saturating_duration_since(Instant::now());
                if let Ok(Ok(0)) = tokio::time::timeout(left, s.read(&mut buf)).await {
                    c.slowloris_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Flood: many connections at once from one address, over and over.
    if soak.flood > 0 {
        let target = target.clone();
        let c = Arc::clone(&c);
        let n = soak.flood;
        tasks.spawn(async move {
            while Instant::now() < end {
                let mut wave = JoinSet::new();
                for _ in 0..n {
                    let target = target.clone();
                    wave.spawn(async move { target.connect(at.flood).await });
                }
                let mut held = Vec::new();
                while let Some(r) = wave.join_next().await {
                    match r {
                        Ok(Ok(ws)) => held.push(ws),
                        Ok(Err(e)) if e.contains("429") => {
                            c.flood_refused.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                c.flood_accepted
                    .fetch_add(held.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(held);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    // Junk: invalid frames at full speed, reading the error replies; when
    // the server closes the connection (refusal budget), reconnect.
    for i in 0..soak.junk {
        let target = target.clone();
        let c = Arc::clone(&c);
        let budget = soak.refusal_budget;
        tasks.spawn(async move {
            let junk = [
                "{",
                "[]",
                "{\"type\":\"nope\"}",
                "not json at all",
                "{\"type\":\"send_message\",\"data\":{\"text\":7}}",
            ];
            while Instant::now() < end {
                let Ok(ws) = target.connect(at.junk + i).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let (mut sink, mut stream) = ws.split();
                let mut reader = {
                    let c = Arc::clone(&c);
                    tokio::spawn(async move {
                        let mut errors = 0u64;
                        let mut close = None;
                        while let Some(Ok(m)) = stream.next().await {
                            match m {
                                Message::Text(t) if t.contains("Invalid message format") => {
                                    errors += 1;
                                    c.junk_errors.fetch_add(1, Ordering::Relaxed);
                                }
                                Message::Close(frame) => close = frame.map(|f| u16::from(f.code)),
                                _ => {}
                            }
                        }
                        c.junk_closed.fetch_add(1, Ordering::Relaxed);
                        if close == Some(1008) && errors == budget {
                            c.junk_closed_as_promised.fetch_add(1, Ordering::Relaxed);
                        } else {
                            c.junk_closed_otherwise.fetch_add(1, Ordering::Relaxed);
                            let mut first = c
                                .junk_first_surprise
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            first.get_or_insert(format!(
                                "close {close:?} after {errors} error frames"
                            ));
                        }
                    })
                };
                let mut k = 0;
                while Instant::now() < end && !reader.is_finished() {
                    if sink
                        .send(Message::text(junk[k % junk.len()]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    k += 1;
                    if k % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                // The server closes the connection after the budget; if the
                // run ended first (or the close never came), hang up without
                // counting it: the reader holds the socket, and a detached
                // one would keep it open past the run.
                if tokio::time::timeout(Duration::from_secs(2), &mut reader)
                    .await
                    .is_err()
                    || Instant::now() >= end
                {
                    reader.abort();
                    let _ = reader.await;
                }
            }
        });
    }

    // Browsers: plain HTTP over keep-alive connections, every answer must
    // be 200; every tenth connection instead sends a head over the server's
    // bound and must get 431.
    for i in 0..soak.browsers {
        let target = target.clone();
        let c = Arc::clone(&c);
        tasks.spawn(async move {
            let mut round = 0u64;
            while Instant::now() < end {
                round += 1;
                let Ok(mut s) = target.tcp(at.browsers + i, None).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if round.is_multiple_of(10) {
                    let huge =
                        format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(64 * 1024));
                    let status = match s.write_all(huge.as_bytes()).await {
                        Ok(()) => http::read_response(&mut s).await.map(|r| r.status),
                        // The server may answer and close before taking it all.
                        Err(_) => Err("reset while sending".into()),
                    };
                    if status == Ok(431) {
                        c.http_oversized_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                for path in BROWSER_PATHS.iter().cycle().take(20) {
                    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
                    if s.write_all(request.as_bytes()).await.is_err() {
                        break;
                    }
                    match http::read_response(&mut s).await {
                        Ok(r) if r.status == 200 => c.http_ok.fetch_add(1, Ordering::Relaxed),
                        _ => c.http_unexpected.fetch_add(1, Ordering::Relaxed),
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    // Sample memory and descriptors once a second.
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(pid) = soak.server_pid
            && let (Some(rss), Some(fds)) = (rss_bytes(pid), fd_count(pid))
        {
            samples.push((start.elapsed().as_secs_f64(), rss, fds));
            eprint!(
                "\r{:>5.0}s  rss {:>7.1} MiB  fds {:>6}  chat sent {:>7} recv {:>9}  junk errors {:>8}   ",
                start.elapsed().as_secs_f64(),
                rss as f64 / 1048576.0,
                fds,
                c.chat_sent.load(Ordering::Relaxed),
                c.chat_received.load(Ordering::Relaxed),
                c.junk_errors.load(Ordering::Relaxed),
            );
        }
    }
    eprintln!();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    // The server still answers: a fresh client sends and sees its message.
    let answers = answers_normally(target, at.checker, run).await;
    let fds_after = fds_settled(soak.server_pid, fds_idle).await;

    let sent = c.chat_sent.load(Ordering::Relaxed);
    let received = c.chat_received.load(Ordering::Relaxed);
    let expected = sent * soak.chatters as u64;
    let lost = expected.saturating_sub(received);
    let (rss_flat, rss_growth, fd_growth) = flatness(&samples, soak.tolerance);
    let checks = json!({
        "chatters_lost_nothing": lost == 0 && c.chat_closed.load(Ordering::Relaxed) == 0,
        "memory_flat": rss_flat,
        "fds_back_to_idle": match (fds_idle, fds_after) {
            (Some(idle), Some(after)) => after <= idle,
            // Without a PID there is nothing to count; say so by not passing.
            _ => soak.server_pid.is_none(),
        },
        "non_readers_dropped": soak.non_readers == 0 || c.non_readers_closed.load(Ordering::Relaxed) > 0,
        "slowloris_dropped": soak.slowloris == 0 || c.slowloris_dropped.load(Ordering::Relaxed) > 0,
        "flood_refused_with_429": soak.flood == 0 || c.flood_refused.load(Ordering::Relaxed) > 0,
        "junk_answered_with_errors": soak.junk == 0 || c.junk_errors.load(Ordering::Relaxed) > 0,
        "junk_closed_with_1008_after_exactly_the_budget": soak.junk == 0
            || (c.junk_closed_as_promised.load(Ordering::Relaxed) > 0
                && c.junk_closed_otherwise.load(Ordering::Relaxed) == 0),
        "http_answered": soak.browsers == 0
            || (c.http_ok.load(Ordering::Relaxed) > 0 && c.http_unexpected.load(Ordering::Relaxed) == 0),
        "oversized_heads_refused_with_431": soak.browsers == 0 || c.http_oversized_refused.load(Ordering::Relaxed) > 0,
        "answers_at_end": answers,
    });
    let passed = checks
        .as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)));
    json!({
        "passed": passed,
        "checks": checks,
        "chat": { "sent": sent, "expected_deliveries": expected, "delivered": received, "lost": lost,
                  "clients_closed": c.chat_closed.load(Ordering::Relaxed),
                  "first_failure": c.chat_first_failure.lock().unwrap_or_else(|e| e.into_inner()).clone() },
        "abusers": {
            "non_reader_disconnects": c.non_readers_closed.load(Ordering::Relaxed),
            "slowloris_drops": c.slowloris_dropped.load(Ordering::Relaxed),
            "flood_refused_429": c.flood_refused.load(Ordering::Relaxed),
            "flood_accepted": c.flood_accepted.load(Ordering::Relaxed),
            "junk_error_frames": c.junk_errors.load(Ordering::Relaxed),
            "junk_clients_closed": c.junk_closed.load(Ordering::Relaxed),
            "junk_closed_1008_after_the_budget": c.junk_closed_as_promised.load(Ordering::Relaxed),
            "junk_closed_otherwise": c.junk_closed_otherwise.load(Ordering::Relaxed),
            "junk_first_surprise": c.junk_first_surprise.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "http_ok": c.http_ok.load(Ordering::Relaxed),
            "http_unexpected": c.http_unexpected.load(Ordering::Relaxed),
            "http_oversized_refused_431": c.http_oversized_refused.load(Ordering::Relaxed),
        },
        "server": {
            "samples": samples.len(),
            "rss_first_bytes": samples.first().map(|s| s.1),
            "rss_last_bytes": samples.last().map(|s| s.1),
            "rss_max_bytes": samples.iter().map(|s| s.1).max(),
            "rss_growth_after_warmup": rss_growth,
            "fds_first": samples.first().map(|s| s.2),
            "fds_last": samples.last().map(|s| s.2),
            "fds_max": samples.iter().map(|s| s.2).max(),
            "fd_growth_after_warmup": fd_growth,
            "fds_idle_before": fds_idle,
            "fds_idle_after": fds_after,
        },
    })
}

/// Compares the median of the second quarter of the run (after warm-up)
/// with the median of the last quarter. Memory is checked against the
/// tolerance; the descriptors' growth is only reported, because during the
/// run they are mostly the abusers' connections coming and going (a few
/// dozen either way). A leak is caught by [`fds_settled`] instead.
fn flatness(samples: &[(f64, u64, u64)], tolerance: f64) -> (bool, Option<f64>, Option<f64>) {
    if samples.len() < 8 {
        return (false, None, None);
    }
    let q = samples.len() / 4;
    let median = |xs: &mut Vec<u64>| {
        xs.sort_unstable();
        xs[xs.len() / 2] as f64
    };
    let mut early_rss: Vec<u64> = samples[q..2 * q].iter().map(|s| s.1).collect();
    let mut late_rss: Vec<u64> = samples[3 * q..].iter().map(|s| s.1).collect();
    let mut early_fd: Vec<u64> = samples[q..2 * q].iter().map(|s| s.2).collect();
    let mut late_fd: Vec<u64> = samples[3 * q..].iter().map(|s| s.2).collect();
    let rss = median(&mut late_rss) / median(&mut early_rss).max(1.0) - 1.0;
    let fd = median(&mut late_fd) / median(&mut early_fd).max(1.0) - 1.0;
    (rss <= tolerance, Some(rss), Some(fd))
}

/// How long the server may take to close what the run's clients left: the
/// soak's write and handshake timeouts (2 s each) plus the close timeout,
/// with room for a loaded machine.
const SETTLE: Duration = Duration::from_secs(20);

/// The server's descriptors once every client of the run is gone: polled
/// until they are back to `idle` or [`SETTLE`] has passed. Every descriptor
/// leaked for a connection stays open, so a leak of even one in the tens of
/// thousands of connections a soak makes shows here, where a ratio of
/// samples taken under load would hide it in the noise.
async fn fds_settled(pid: Option<u32>, idle: Option<u64>) -> Option<u64> {
    let pid = pid?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = fd_count(pid)?;
        if idle.is_some_and(|idle| now <= idle) || Instant::now() >= deadline {
            return Some(now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn answers_normally(target: &Target, source: usize, run: u32) -> bool {
    let Ok(mut ws) = target.connect(source).await else {
        return false;
    };
    let m = Marker::now(run, 999_999, 0);
    if ws.send(Message::text(m.frame())).await.is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if Marker::find(&t, run).is_some_and(|x| x.sender == 999_999) {
                    let _ = ws.close(None).await;
                    return true;
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return false,
        }
    }
    false
}
