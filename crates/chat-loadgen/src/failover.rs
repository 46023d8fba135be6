//! Failover: `K` clients follow the chat on one node of a cluster (the
//! first URL) while a sender on another node posts at a steady rate. The
//! node is SIGKILLed; each of its clients notices its socket die and
//! resumes on one of the other nodes with `?since=&epoch=` from its last
//! `sync` frame. Reports how long after the kill every client had resumed
//! (its first `sync` on the new node: everything up to the head is then
//! delivered), and whether any client missed, or was sent twice, a message
//! the sender was acknowledged.

use crate::client::{Marker, Target, Ws, count_ready, run_id};
use crate::reconnect::{query, with_query};
use crate::scenario::Progress;
use crate::stats::latency_histogram;
use chat_proto::{ServerFrame, SyncPoint};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

/// What the scenario needs.
#[derive(Debug, Clone)]
pub struct Failover {
    /// Clients on the node that is killed.
    pub clients: usize,
    /// Messages per second from the sender, on another node.
    pub rate: f64,
    /// Sending before the kill.
    pub before: Duration,
    /// Sending after the kill.
    pub after: Duration,
    /// The PID of the node at the first URL, which is killed.
    pub kill_pid: u32,
    /// Handshakes in flight at once while connecting.
    pub parallel: usize,
}

/// How long a client may take, after the sender stopped, to hold every
/// message the sender was acknowledged.
const SETTLE: Duration = Duration::from_secs(10);

/// How long a client keeps trying to reach another node.
const GIVE_UP: Duration = Duration::from_secs(30);

/// What one client of the killed node saw.
#[derive(Debug, Default)]
struct Seen {
    /// The sender's messages it received, by sequence number.
    markers: BTreeSet<u64>,
    /// Messages received twice (with no `reset` between).
    duplicates: u64,
    /// `reset` frames: the new node could not resume it.
    resets: u64,
    /// From the kill to its socket's end.
    noticed: Option<Duration>,
    /// From the kill to its first `sync` on another node.
    resumed: Option<Duration>,
    /// Tries to connect to another node that failed.
    failed_tries: u64,
}

/// Runs the scenario: `target`'s first URL is the node to kill, the others
/// are where its clients resume (at least one).
pub async fn run(target: &Target, f: &Failover, progress: &Arc<Progress>) -> Value {
    if target.others.is_empty() {
        return json!({ "error": "failover needs several URLs: the node to kill first, then the others" });
    }
    let run = run_id();
    let (killed_tx, killed_rx) = watch::channel(None::<Instant>);
    let (acked_tx, acked_rx) = watch::channel(None::<Arc<BTreeSet<u64>>>);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(f.clients.max(1));
    let gate = Arc::new(Semaphore::new(f.parallel.max(1)));
    let victim = target.first_only(usize::MAX);
    let mut clients = JoinSet::new();
    for i in 0..f.clients {
        let (victim, target) = (victim.clone(), target.clone());
        let (gate, progress) = (Arc::clone(&gate), Arc::clone(progress));
        let (killed, acked, ready) = (killed_rx.clone(), acked_rx.clone(), ready_tx.clone());
        clients.spawn(async move {
            follow(i, run, victim, target, gate, progress, killed, acked, ready).await
        });
    }
    drop(ready_tx);
    // Every client has read the history to its first sync.
    let ready = count_ready(&mut ready_rx, f.clients, Duration::from_secs(120)).await;
    if ready < f.clients {
        return json!({ "error": format!("only {ready} of {} clients followed the node to kill", f.clients) });
    }
    // The sender, on the second node.
    let sender = tokio::spawn(send(target.server(1), run, f.rate, f.before + f.after));
    tokio::time::sleep(f.before).await;
    let killed_at = Instant::now();
    // Blocking for the millisecond `kill` takes, which the figures include.
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &f.kill_pid.to_string()])
        .status();
    if !kill.is_ok_and(|s| s.success()) {
        return json!({ "error": format!("could not kill {}", f.kill_pid) });
    }
    let _ = killed_tx.send(Some(killed_at));
    let (sent, acked, refused) = match sender.await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return json!({ "error": format!("sender: {e}") }),
        Err(e) => return json!({ "error": format!("sender: {e}") }),
    };
    let acked = Arc::new(acked);
    let _ = acked_tx.send(Some(Arc::clone(&acked)));
    let mut noticed = latency_histogram();
    let mut resumed = latency_histogram();
    let (mut missing, mut duplicates, mut resets, mut never, mut failed_tries) = (0, 0, 0, 0, 0);
    let mut clients_missing = 0;
    while let Some(done) = clients.join_next().await {
        let Ok(seen) = done else {
            never += 1;
            continue;
        };
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        if let Some(d) = seen.noticed {
            let _ = noticed.record(us(d));
        }
        match seen.resumed {
            Some(d) => {
                let _ = resumed.record(us(d));
            }
            None => never += 1,
        }
        let lacking = acked.difference(&seen.markers).count() as u64;
        missing += lacking;
        clients_missing += u64::from(lacking > 0);
        duplicates += seen.duplicates;
        resets += seen.resets;
        failed_tries += seen.failed_tries;
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "run": run,
        "clients": f.clients,
        "messages_sent": sent,
        "messages_acknowledged": acked.len(),
        "messages_refused": refused,
        "clients_resumed": resumed.len(),
        "clients_never_resumed": never,
        // From the kill until every client had resumed elsewhere (none if
        // one never did).
        "all_resumed_s": (never == 0 && !resumed.is_empty()).then(|| resumed.max() as f64 / 1e6),
        "resumed_ms": { "p50": ms(&resumed, 0.5), "p99": ms(&resumed, 0.99), "max": resumed.max() as f64 / 1000.0 },
        "noticed_ms": { "p50": ms(&noticed, 0.5), "max": noticed.max() as f64 / 1000.0 },
        "messages_missing": missing,
        "clients_missing_messages": clients_missing,
        "duplicates": duplicates,
        "resets": resets,
        "failed_connect_tries": failed_tries,
    })
}

/// One client: follows the chat on the node to kill, then on another, and
/// reads until it holds every acknowledged message (or [`SETTLE`] after
/// they are known).
#[allow(clippy::too_many_arguments)]
async fn follow(
    i: usize,
    run: u32,
    victim: Target,
    target: Target,
    gate: Arc<Semaphore>,
    progress: Arc<Progress>,
    killed: watch::Receiver<Option<Instant>>,
    mut acked: watch::Receiver<Option<Arc<BTreeSet<u64>>>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Seen {
    let mut seen = Seen::default();
    let mut at: Option<SyncPoint> = None;
    let mut ws: Ws = {
        let _permit = gate.acquire().await;
        match with_query(&victim, "?sync").connect(i).await {
            Ok(ws) => ws,
            Err(_) => return seen,
        }
    };
    progress.connected.fetch_add(1, Ordering::Relaxed);
    let mut ready = Some(ready);
    let mut moved = false;
    let mut settle_until: Option<Instant> = None;
    loop {
        if let (Some(want), Some(_)) = (acked.borrow().as_ref(), seen.resumed)
            && want.is_subset(&seen.markers)
        {
            break;
        }
        let deadline = settle_until.unwrap_or_else(|| Instant::now() + GIVE_UP);
        let next = tokio::select! {
            next = ws.next() => next,
            _ = acked.changed(), if settle_until.is_none() => {
                settle_until = Some(Instant::now() + SETTLE);
                continue;
            }
            _ = tokio::time::sleep_until(deadline.into()) => break,
        };
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            _ if moved => break,
            _ => {
                // The node is gone: resume on another.
                let Some(killed_at) = *killed.borrow() else {
                    // Closed before the kill: not this scenario's doing.
                    break;
                };
                seen.noticed = Some(killed_at.elapsed());
                moved = true;
                match resume(i, &target, &at, &mut seen).await {
                    Some(next) => ws = next,
                    None => break,
                }
                continue;
            }
        };
        progress.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = Marker::find(&text, run) {
            if !seen.markers.insert(m.seq) {
                seen.duplicates += 1;
            }
        } else if text.contains("\"type\":\"sync\"") || text.contains("\"type\":\"reset\"") {
            match ServerFrame::decode(&text) {
                Ok(ServerFrame::Sync(s)) => {
                    at = Some(s);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(()).await;
                    }
                    if moved && seen.resumed.is_none() {
                        seen.resumed = killed.borrow().map(|k| k.elapsed());
                    }
                }
                Ok(ServerFrame::Reset(_)) => {
                    // The full history follows.
                    seen.resets += 1;
                    seen.markers.clear();
                }
                _ => {}
            }
        }
    }
    let _ = ws.close(None).await;
    seen
}

/// Connects client `i` to one of the other nodes (its own first, then the
/// next), from its last `sync`; tries again every 20 ms for [`GIVE_UP`].
async fn resume(i: usize, target: &Target, at: &Option<SyncPoint>, seen: &mut Seen) -> Option<Ws> {
    let others = target.others.len();
    let since = query(at);
    let give_up = Instant::now() + GIVE_UP;
    for attempt in 0.. {
        let node = target.server(1 + (i + attempt) % others);
        match with_query(&node, &since).connect(i).await {
            Ok(ws) => return Some(ws),
            Err(_) if Instant::now() < give_up => {
                seen.failed_tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => return None,
        }
    }
    None
}

/// Sends at `rate` for `duration` from one client on `node`, and reads its
/// own messages back: (sent, acknowledged, refused).
async fn send(
    node: Target,
    run: u32,
    rate: f64,
    duration: Duration,
) -> Result<(u64, BTreeSet<u64>, u64), String> {
    let ws = node.connect(usize::MAX / 2).await?;
    let (mut sink, mut stream) = ws.split();
    let reader = tokio::spawn(async move {
        let (mut acked, mut refused) = (BTreeSet::new(), 0u64);
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(t) = msg else { continue };
            if let Some(m) = Marker::find(&t, run) {
                acked.insert(m.seq);
            } else if t.contains("\"type\":\"error\"") {
                refused += 1;
            }
        }
        (acked, refused)
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let until = tokio::time::Instant::now() + duration;
    let mut seq = 0;
    while tick.tick().await < until {
        let m = Marker::now(run, 0, seq);
        sink.send(Message::text(m.frame()))
            .await
            .map_err(|e| format!("sending: {e}"))?;
        seq += 1;
    }
    // Every answer is in once the close handshake is.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = sink.close().await;
    let (acked, refused) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .map_err(|_| "the sender's node did not close".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok((seq, acked, refused))
}
