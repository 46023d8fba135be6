//! Reconnecting after a blip: `K` clients holding a long history lose
//! their connections, `M` messages are sent while they are away, and they
//! all reconnect at once. Done twice over the same clients: once resuming
//! with `?since=&epoch=` from their last `sync` frame, once as a client of
//! the seed protocol does (a plain `/ws`, which replays the whole history).
//! For each: the bytes the clients received, the time until every client
//! had every missed message, and the server's CPU meanwhile.

use crate::client::{Marker, Target, Ws, run_id};
use crate::scenario::Progress;
use crate::stats::{CpuWindow, Pids};
use chat_proto::{ServerFrame, SyncPoint};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// What the scenario needs.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Clients that drop and reconnect.
    pub clients: usize,
    /// Messages in history (put there first, by `scenario::prefill`).
    pub history: usize,
    /// Messages sent while the clients are away.
    pub missed: usize,
    /// Handshakes in flight at once.
    pub parallel: usize,
    /// The server's PID, for its CPU.
    pub server_pid: Option<u32>,
}

/// How the clients come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `?since=P&epoch=E`, from the last `sync` frame.
    Since,
    /// A plain `/ws`: the whole history again.
    Full,
}

/// Where a client is, for its next resume: its last `sync` frame.
type LastSync = Option<SyncPoint>;

/// A target whose URLs carry `query`.
pub(crate) fn with_query(target: &Target, query: &str) -> Target {
    let mut t = target.clone();
    let with = |url: &str| format!("{}{query}", url.split('?').next().unwrap_or_default());
    t.url = with(&t.url);
    for (url, _) in &mut t.others {
        *url = with(url);
    }
    t
}

/// The query that resumes from `at` (or follows from the start).
pub(crate) fn query(at: &LastSync) -> String {
    match at {
        Some(s) => format!("?since={}&epoch={}", s.position, s.epoch),
        None => "?sync".into(),
    }
}

/// Runs the scenario against a server whose history already holds
/// `r.history` messages.
pub async fn run(target: &Target, r: &Reconnect, progress: &Arc<Progress>) -> Value {
    // Everyone connects with `?sync` and reads the history to its sync.
    let first = match rejoin(
        target,
        r,
        vec![None; r.clients],
        Mode::Since,
        None,
        progress,
    )
    .await
    {
        Ok(first) => first,
        Err(e) => return json!({ "error": format!("first connect: {e}") }),
    };
    let mut results = serde_json::Map::new();
    for mode in [Mode::Since, Mode::Full] {
        // The blip: the connections are gone, and messages are sent
        // meanwhile.
        let run = match send(target, r.missed).await {
            Ok(run) => run,
            Err(e) => return json!({ "error": format!("sending while away: {e}") }),
        };
        let cpu = CpuWindow::start(&Pids::server(r.server_pid));
        let started = Instant::now();
        let positions = first.positions.clone();
        let back = match rejoin(target, r, positions, mode, Some(run), progress).await {
            Ok(back) => back,
            Err(e) => return json!({ "error": format!("{mode:?} reconnect: {e}") }),
        };
        let took = started.elapsed();
        let cpu = cpu.finish();
        let name = match mode {
            Mode::Since => "since",
            Mode::Full => "full",
        };
        results.insert(
            name.into(),
            json!({
                "all_caught_up_s": took.as_secs_f64(),
                "bytes_received": back.bytes,
                "bytes_per_client": back.bytes as f64 / r.clients as f64,
                "frames_received": back.frames,
                "resets": back.resets,
                "server_cpu_s": cpu.server.map(|share| share * took.as_secs_f64()),
                "failures": back.failures,
            }),
        );
    }
    let ratio = |key: &str| {
        let get = |m: &str| results.get(m)?.get(key)?.as_f64();
        Some(get("full")? / get("since")?.max(f64::MIN_POSITIVE))
    };
    json!({
        "clients": r.clients,
        "history": r.history,
        "missed": r.missed,
        "since": results.get("since"),
        "full": results.get("full"),
        "full_over_since": {
            "bytes": ratio("bytes_received"),
            "time": ratio("all_caught_up_s"),
            "server_cpu": ratio("server_cpu_s"),
        },
    })
}

/// What a round of reconnects came to.
#[derive(Debug, Clone, Default)]
struct Back {
    positions: Vec<LastSync>,
    bytes: u64,
    frames: u64,
    resets: u64,
    failures: u64,
}

/// Every client connects (from its position, or with a plain `/ws`) and
/// reads until it is caught up, then closes. Caught up means: with no
/// `run`, its first `sync`; resuming, every marker of `run` and the `sync`
/// after them; plainly, every marker of `run` (the end of the history).
async fn rejoin(
    target: &Target,
    r: &Reconnect,
    positions: Vec<LastSync>,
    mode: Mode,
    run: Option<u32>,
    progress: &Arc<Progress>,
) -> Result<Back, String> {
    let gate = Arc::new(Semaphore::new(r.parallel.max(1)));
    let missed = if run.is_some() { r.missed } else { 0 };
    let mut tasks = JoinSet::new();
    for (i, at) in positions.into_iter().enumerate() {
        let target = match mode {
            Mode::Since => with_query(target, &query(&at)),
            Mode::Full => with_query(target, ""),
        };
        let gate = Arc::clone(&gate);
        let progress = Arc::clone(progress);
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.ok();
            let mut ws: Ws = target.connect(i).await.ok()?;
            drop(permit);
            progress.connected.fetch_add(1, Ordering::Relaxed);
            let (mut bytes, mut frames, mut resets) = (0u64, 0u64, 0u64);
            let mut seen = vec![false; missed];
            let mut have = 0;
            let mut at = at;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(60), ws.next()).await;
                let t = match next {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    _ => return None,
                };
                bytes += t.len() as u64;
                frames += 1;
                progress.delivered.fetch_add(1, Ordering::Relaxed);
                let mut is_sync = false;
                if let Some(m) = run.and_then(|run| Marker::find(&t, run)) {
                    if let Some(s) = seen.get_mut(m.seq as usize)
                        && !*s
                    {
                        *s = true;
                        have += 1;
                    }
                } else if t.contains("\"type\":\"sync\"") || t.contains("\"type\":\"reset\"") {
                    // Only these few frames are decoded.
                    match ServerFrame::decode(&t) {
                        Ok(ServerFrame::Sync(s)) => {
                            at = Some(s);
                            is_sync = true;
                        }
                        Ok(ServerFrame::Reset(_)) => resets += 1,
                        _ => {}
                    }
                }
                let caught_up = match (mode, run) {
                    (_, None) => is_sync,
                    (Mode::Since, Some(_)) => have == missed && is_sync,
                    (Mode::Full, Some(_)) => have == missed,
                };
                if caught_up {
                    break;
                }
            }
            let _ = ws.close(None).await;
            Some((i, at, bytes, frames, resets))
        });
    }
    let mut back = Back {
        positions: vec![None; r.clients],
        ..Back::default()
    };
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Some((i, at, bytes, frames, resets))) => {
                back.positions[i] = at;
                back.bytes += bytes;
                back.frames += frames;
                back.resets += resets;
            }
            _ => back.failures += 1,
        }
    }
    if back.failures as usize == r.clients {
        return Err("every client failed".into());
    }
    Ok(back)
}

/// Sends `n` messages from one client, waiting for each echo; returns
/// their run id.
async fn send(target: &Target, n: usize) -> Result<u32, String> {
    let run = run_id();
    let mut ws = target.connect(usize::MAX / 2).await?;
    for seq in 0..n as u64 {
        let m = Marker::now(run, 0, seq);
        ws.send(Message::text(m.frame()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if Marker::find(&t, run).is_some_and(|m| m.seq == seq) {
                        break;
                    }
                    if let Ok(ServerFrame::Error(e)) = ServerFrame::decode(&t) {
                        return Err(format!("refused: {}", e.error));
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => return Err(format!("sender closed: {other:?}")),
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(run)
}
