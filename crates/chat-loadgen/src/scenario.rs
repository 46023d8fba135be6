//! The four scenarios: fan-out latency (open loop), saturation (closed
//! loop), a connect storm against a long history, and idle memory.

use crate::client::{Marker, Target, Ws, now_us, run_id};
use crate::stats::{CpuWindow, Pids, latency_histogram, rss_bytes};
use chat_proto::ServerFrame;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

type Sink = SplitSink<Ws, Message>;

/// How late tokio's timer may fire on its own (it has 1 ms resolution).
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Counters the progress line reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages sent by all senders.
    pub sent: AtomicU64,
    /// Frames received by all clients.
    pub delivered: AtomicU64,
    /// Clients connected.
    pub connected: AtomicU64,
}

/// Connects `n` clients, at most `parallel` handshakes at a time.
pub async fn connect_all(
    target: &Target,
    n: usize,
    parallel: usize,
    progress: &Arc<Progress>,
) -> (Vec<Ws>, usize) {
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let target = target.clone();
        let gate = Arc::clone(&gate);
        let progress = Arc::clone(progress);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let ws = target.connect(i).await;
            if ws.is_ok() {
                progress.connected.fetch_add(1, Ordering::Relaxed);
            }
            ws.ok().map(|ws| (i, ws))
        });
    }
    let mut clients: Vec<(usize, Ws)> = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Some(c)) => clients.push(c),
            _ => failed += 1,
        }
    }
    clients.sort_by_key(|(i, _)| *i);
    (clients.into_iter().map(|(_, ws)| ws).collect(), failed)
}

/// What one receiving client saw.
struct Tally {
    /// Frames received inside the measurement window.
    frames_in_window: u64,
    /// Latency of this run's messages sent inside the window.
    latency: Histogram<u64>,
    /// Per sender: how many of its messages arrived, and the highest seq.
    per_sender: Vec<(u64, Option<u64>)>,
    reordered: u64,
    closed_early: bool,
}

/// The window in which rates and latencies count, in [`now_us`] time. It
/// is set once the history replay of the fresh connections has drained;
/// until then it contains nothing.
#[derive(Debug)]
struct Window {
    start_us: AtomicU64,
    end_us: AtomicU64,
}

impl Window {
    fn unset() -> Self {
        Window {
            start_us: AtomicU64::new(u64::MAX),
            end_us: AtomicU64::new(u64::MAX),
        }
    }

    fn set(&self, start_us: u64, len: Duration) {
        self.end_us
            .store(start_us + len.as_micros() as u64, Ordering::Relaxed);
        self.start_us.store(start_us, Ordering::Relaxed);
    }

    fn contains(&self, t: u64) -> bool {
        t >= self.start_us.load(Ordering::Relaxed) && t < self.end_us.load(Ordering::Relaxed)
    }
}

/// Reads frames until `stop` flips, tallying this run's messages. When a
/// message from `notify_sender` arrives, a permit is added to `echo`
/// (closed-loop senders wait on it).
async fn receive(
    mut stream: SplitStream<Ws>,
    run: u32,
    senders: usize,
    window: Arc<Window>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
    echo: Option<(u32, Arc<Semaphore>)>,
) -> Tally {
    let mut t = Tally {
        frames_in_window: 0,
        latency: latency_histogram(),
        per_sender: vec![(0, None); senders],
        reordered: 0,
        closed_early: false,
    };
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => break,
            msg = stream.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            _ => {
                t.closed_early = true;
                break;
            }
        };
        let now = now_us();
        progress.delivered.fetch_add(1, Ordering::Relaxed);
        if window.contains(now) {
            t.frames_in_window += 1;
        }
        let Some(m) = Marker::find(&text, run) else {
            continue;
        };
        if let Some((me, permits)) = &echo
            && m.sender == *me
        {
            permits.add_permits(1);
        }
        if window.contains(m.sent_us) {
            let _ = t.latency.record(now.saturating_sub(m.sent_us).max(1));
        }
        if let Some(entry) = t.per_sender.get_mut(m.sender as usize) {
            entry.0 += 1;
            match entry.1 {
                Some(last) if m.seq < last => t.reordered += 1,
                _ => entry.1 = Some(m.seq),
            }
        }
    }
    t
}

/// Parameters shared by the fan-out and saturation scenarios.
#[derive(Debug, Clone)]
pub struct Load {
    /// Connected clients, all receiving.
    pub clients: usize,
    /// How many of them also send.
    pub senders: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// Handshakes in flight while connecting.
    pub connect_parallel: usize,
    /// The processes whose CPU is reported (the server's, and a
    /// cluster's other nodes and NATS servers).
    pub pids: Pids,
    /// With several servers: the senders go round all of them, rather
    /// than all to the first.
    pub spread_senders: bool,
}

/// How senders pace themselves.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Open loop: this many messages per second in total.
    Rate(f64),
    /// Closed loop: each sender keeps this many messages in flight.
    InFlight(usize),
}

/// Runs one load: connects, sends, drains, and reports.
pub async fn run_load(target: &Target, load: &Load, pace: Pace, progress: &Arc<Progress>) -> Value {
    // With several servers (a cluster's nodes), the senders are on the
    // first and the other clients on the others: every message crosses.
    // Spread, every client goes round all of them.
    let target = &target.first_only(if load.spread_senders { 0 } else { load.senders });
    let run = run_id();
    let (clients, failed) =
        connect_all(target, load.clients, load.connect_parallel, progress).await;
    if clients.len() < load.senders.max(1) {
        return json!({ "error": format!("only {} of {} clients connected", clients.len(), load.clients) });
    }
    let senders = load.senders.min(clients.len());
    let window = Arc::new(Window::unset());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = JoinSet::new();
    // Each sender's write half, with its echo permits in closed loop.
    let mut sinks: Vec<(Sink, Option<Arc<Semaphore>>)> = Vec::new();
    for (i, ws) in clients.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let echo = match pace {
            Pace::InFlight(k) if i < senders => Some((i as u32, Arc::new(Semaphore::new(k)))),
            _ => None,
        };
        if i < senders {
            sinks.push((sink, echo.as_ref().map(|(_, s)| Arc::clone(s))));
        }
        receivers.spawn(receive(
            stream,
            run,
            senders,
            Arc::clone(&window),
            stop_rx.clone(),
            Arc::clone(progress),
            echo,
        ));
    }
    // Fresh connections first receive the server's history; measure only
    // once that has drained (nothing arrived for half a second).
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = progress.delivered.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if progress.delivered.load(Ordering::Relaxed) == before || Instant::now() > settle_deadline
        {
            break;
        }
    }
    window.set(now_us() + load.warmup.as_micros() as u64, load.duration);
    let cpu_start_at = tokio::time::Instant::now() + load.warmup;
    let cpu_probe = tokio::spawn({
        let pids = load.pids.clone();
        let duration = load.duration;
        async move {
            tokio::time::sleep_until(cpu_start_at).await;
            let w = CpuWindow::start(&pids);
            tokio::time::sleep(duration).await;
            w.finish()
        }
    });
    let send_until = tokio::time::Instant::now() + load.warmup + load.duration;
    let mut send_tasks = JoinSet::new();
    for (s, (mut sink, echo)) in sinks.into_iter().enumerate() {
        let progress = Arc::clone(progress);
        send_tasks.spawn(async move {
            let mut seq = 0u64;
            match pace {
                Pace::Rate(rate) => {
                    let period = Duration::from_secs_f64(senders as f64 / rate.max(0.001));
                    // Senders are spread evenly over the period, so the total
                    // rate is steady rather than a burst from every sender
                    // at the same instant.
                    let phase = period.mul_f64(s as f64 / senders as f64);
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
                    // Open loop: a late tick is sent at once, and its
                    // latency counts from when it was due.
                    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                    loop {
                        let due = tick.tick().await;
                        if due >= send_until {
                            break;
                        }
                        // Lateness beyond the timer's own granularity is
                        // the server holding us up (backpressure), and
                        // counts; within it, it is this process's timer.
                        let late = tokio::time::Instant::now()
                            .saturating_duration_since(due)
                            .saturating_sub(TIMER_SLACK);
                        let sent_us = now_us().saturating_sub(late.as_micros() as u64);
                        let m = Marker {
                            run,
                            sender: s as u32,
                            seq,
                            sent_us,
                        };
                        if sink.send(Message::text(m.frame())).await.is_err() {
                            break;
                        }
                        seq += 1;
                        progress.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Pace::InFlight(_) => {
                    let Some(permits) = echo else { return 0 };
                    while tokio::time::Instant::now() < send_until {
                        let Ok(p) =
                            tokio::time::timeout(Duration::from_secs(5), permits.acquire()).await
                        else {
                            break;
                        };
                        if let Ok(p) = p {
                            p.forget();
                        }
                        let m = Marker::now(run, s as u32, seq);
                        if sink.send(Message::text(m.frame())).await.is_err() {
                            break;
                        }
                        seq += 1;
                        progress.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Dropping the sink half leaves the connection open: the
            // receiving half still owns it.
            seq
        });
    }
    let mut sent_total = 0u64;
    while let Some(done) = send_tasks.join_next().await {
        sent_total += done.unwrap_or(0);
    }
    let cpu = cpu_probe.await.unwrap_or_default();
    // Drain: give in-flight frames time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut latency = latency_histogram();
    let mut frames = 0u64;
    let mut received = 0u64;
    let mut reordered = 0u64;
    let mut closed_early = 0u64;
    let mut receiving_clients = 0u64;
    while let Some(done) = receivers.join_next().await {
        let Ok(t) = done else { continue };
        receiving_clients += 1;
        frames += t.frames_in_window;
        let _ = latency.add(&t.latency);
        received += t.per_sender.iter().map(|(n, _)| n).sum::<u64>();
        reordered += t.reordered;
        closed_early += u64::from(t.closed_early);
    }
    let expected = sent_total * receiving_clients;
    let secs = load.duration.as_secs_f64();
    json!({
        "run": run,
        "clients_connected": receiving_clients,
        "connect_failures": failed,
        "senders": senders,
        "messages_sent": sent_total,
        "send_rate_per_s": sent_total as f64 / (load.warmup + load.duration).as_secs_f64(),
        "delivered_frames_per_s": frames as f64 / secs,
        "latency_ms": {
            "p50": latency.value_at_quantile(0.50) as f64 / 1000.0,
            "p99": latency.value_at_quantile(0.99) as f64 / 1000.0,
            "p99_9": latency.value_at_quantile(0.999) as f64 / 1000.0,
            "max": latency.max() as f64 / 1000.0,
            "samples": latency.len(),
        },
        "frames_lost": expected.saturating_sub(received),
        "frames_reordered": reordered,
        "clients_closed_early": closed_early,
        "cpu_cores": { "loadgen": cpu.loadgen, "server": cpu.server, "peers": cpu.peers, "nats": cpu.nats },
    })
}

/// Messages each prefill sender keeps in flight.
const PREFILL_IN_FLIGHT: u64 = 8;

/// Fills the server's history with `messages` messages from `senders`
/// addresses. Each sender waits for its own messages to come back, so when
/// this returns, every message is in the server's history.
pub async fn prefill(
    target: &Target,
    messages: usize,
    senders: usize,
    progress: &Arc<Progress>,
) -> Result<u32, String> {
    let run = run_id();
    let (clients, failed) = connect_all(target, senders, 64, progress).await;
    if failed > 0 || clients.is_empty() {
        return Err(format!(
            "prefill: {failed} of {senders} senders failed to connect"
        ));
    }
    let n = clients.len();
    let mut tasks = JoinSet::new();
    for (s, ws) in clients.into_iter().enumerate() {
        let count = (messages / n + usize::from(s < messages % n)) as u64;
        tasks.spawn(async move {
            let (mut sink, mut stream) = ws.split();
            // Closed loop, a few in flight per sender: a burst of thousands
            // would (rightly) get slow readers dropped for lagging.
            let (mut sent, mut echoed) = (0u64, 0u64);
            while echoed < count {
                while sent < count && sent < echoed + PREFILL_IN_FLIGHT {
                    let m = Marker::now(run, s as u32, sent);
                    sink.feed(Message::text(m.frame()))
                        .await
                        .map_err(|e| e.to_string())?;
                    sent += 1;
                }
                sink.flush().await.map_err(|e| e.to_string())?;
                let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
                match next {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if Marker::find(&t, run).is_some_and(|m| m.sender == s as u32) {
                            echoed += 1;
                        } else if let Ok(ServerFrame::Error(e)) = ServerFrame::decode(&t) {
                            return Err(format!(
                                "prefill refused: {} (is the server's rate limit raised?)",
                                e.error
                            ));
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => return Err(format!("prefill sender closed: {other:?}")),
                    Err(_) => return Err("prefill: no echo within 30 s".into()),
                }
            }
            // Keep reading, or the server would drop this client later.
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            Ok((sink, drain))
        });
    }
    let mut keep = Vec::new();
    while let Some(done) = tasks.join_next().await {
        keep.push(done.map_err(|e| e.to_string())??);
    }
    Ok(run)
}

/// `k` clients connect at once to a server holding `history` messages;
/// reports how long each took to have all of them.
pub async fn connect_storm(
    target: &Target,
    k: usize,
    history: usize,
    run: u32,
    progress: &Arc<Progress>,
) -> Value {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..k {
        let target = target.clone();
        let progress = Arc::clone(progress);
        tasks.spawn(async move {
            let t0 = Instant::now();
            let mut ws = target.connect(i).await.ok()?;
            progress.connected.fetch_add(1, Ordering::Relaxed);
            let mut seen = 0;
            while seen < history {
                match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        progress.delivered.fetch_add(1, Ordering::Relaxed);
                        if Marker::find(&t, run).is_some() {
                            seen += 1;
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => return None,
                }
            }
            Some((t0.elapsed(), ws))
        });
    }
    let mut times = latency_histogram();
    let mut failures = 0;
    let mut keep = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Some((d, ws))) => {
                let _ = times.record(d.as_micros().max(1) as u64);
                keep.push(ws);
            }
            _ => failures += 1,
        }
    }
    let all = start.elapsed();
    json!({
        "clients": k,
        "history": history,
        "failures": failures,
        "all_have_history_s": all.as_secs_f64(),
        "per_client_s": {
            "p50": times.value_at_quantile(0.5) as f64 / 1e6,
            "p99": times.value_at_quantile(0.99) as f64 / 1e6,
            "max": times.max() as f64 / 1e6,
        },
        "history_frames_per_s": (k - failures) as f64 * history as f64 / all.as_secs_f64(),
    })
}

/// Holds `k` idle connections and reports the server's memory growth.
pub async fn idle(
    target: &Target,
    k: usize,
    server_pid: Option<u32>,
    parallel: usize,
    progress: &Arc<Progress>,
) -> Value {
    let before = server_pid.and_then(rss_bytes);
    let (clients, failed) = connect_all(target, k, parallel, progress).await;
    // Let the clients read their history and go quiet.
    let mut held = Vec::with_capacity(clients.len());
    for ws in clients {
        let (sink, mut stream) = ws.split();
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        held.push((sink, reader));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = server_pid.and_then(rss_bytes);
    let connected = held.len();
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if connected > 0 => Some(a.saturating_sub(b) as f64 / connected as f64),
        _ => None,
    };
    json!({
        "connections": connected,
        "failures": failed,
        "server_rss_before_bytes": before,
        "server_rss_after_bytes": after,
        "server_bytes_per_connection": per_conn,
    })
}
