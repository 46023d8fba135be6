//! A reaction storm: what one toggle on a crowded message costs in egress.
//!
//! Every `reaction_updated` carries the whole message, so a toggle on a
//! message at every reaction limit sends the largest frame the server makes
//! to every client. This scenario fills one message to the limits, connects
//! the receivers, then toggles at a fixed rate and counts the bytes each
//! receiver gets: WebSocket payload plus the frame header, as it crossed
//! the wire.

use crate::client::{Target, Ws};
use crate::scenario::{Progress, connect_all};
use chat_proto::{AddReaction, ClientFrame, SendMessage, ServerFrame, Uuid};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The emojis reactors use, in order.
const EMOJIS: [&str; 20] = [
    "👍", "❤️", "😂", "🎉", "😮", "😢", "🙏", "🔥", "👀", "💯", "🚀", "✅", "👏", "🤔", "😍", "🙌",
    "💡", "⭐", "🍕", "🌈",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct Storm {
    /// Receiving clients during the measured toggles.
    pub clients: usize,
    /// Distinct users filling the message (each toggles every emoji once).
    pub reactors: usize,
    /// Emojis used (at most 20).
    pub emojis: usize,
    /// Toggles measured (each reactor in turn removes, then re-adds, its
    /// first emoji).
    pub toggles: usize,
    /// Measured toggles per second.
    pub rate: f64,
}

fn toggle(id: Uuid, emoji: &str) -> Message {
    Message::text(
        ClientFrame::AddReaction(AddReaction {
            message_id: id,
            emoji: emoji.into(),
        })
        .encode(),
    )
}

/// The bytes a server frame of `payload` bytes takes on the wire.
fn on_wire(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    (payload + header) as u64
}

/// Reads the next text frame, skipping pings, within 30 s.
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => return Err(format!("connection ended: {other:?}")),
        }
    }
}

/// Runs the storm; the reactors use source indexes after the receivers'.
pub async fn run(
    target: &Target,
    storm: &Storm,
    parallel: usize,
    progress: &Arc<Progress>,
) -> Value {
    match run_inner(target, storm, parallel, progress).await {
        Ok(v) => v,
        Err(e) => json!({ "error": e }),
    }
}

async fn run_inner(
    target: &Target,
    storm: &Storm,
    parallel: usize,
    progress: &Arc<Progress>,
) -> Result<Value, String> {
    let emojis = &EMOJIS[..storm.emojis.min(EMOJIS.len())];
    let base = storm.clients;
    let mut poster = target.connect(base + storm.reactors).await?;
    let post = ClientFrame::SendMessage(SendMessage {
        text: "the popular one".into(),
        author_name: None,
    });
    poster
        .send(Message::text(post.encode()))
        .await
        .map_err(|e| e.to_string())?;
    let id = loop {
        if let Ok(ServerFrame::Message(m)) = ServerFrame::decode(&next_text(&mut poster).await?)
            && m.text == "the popular one"
        {
            break m.id;
        }
    };
    drop(poster);

    // Fill: one reactor at a time, so every frame it reads answers it.
    let (mut accepted, mut refused) = (0u64, 0u64);
    let mut reactors = Vec::with_capacity(storm.reactors);
    for r in 0..storm.reactors {
        let mut ws = target.connect(base + r).await?;
        next_text(&mut ws).await?; // the history: the message
        for emoji in emojis {
            ws.feed(toggle(id, emoji))
                .await
                .map_err(|e| e.to_string())?;
        }
        ws.flush().await.map_err(|e| e.to_string())?;
        for _ in emojis {
            match ServerFrame::decode(&next_text(&mut ws).await?) {
                Ok(ServerFrame::ReactionUpdated(_)) => accepted += 1,
                Ok(ServerFrame::Error(_)) => refused += 1,
                other => return Err(format!("fill: unexpected {other:?}")),
            }
        }
        reactors.push(ws);
    }

    // The togglers keep reading (or the server would rightly drop them);
    // the other reactors leave.
    reactors.truncate(storm.toggles.div_ceil(2).max(1));
    let mut togglers = Vec::with_capacity(reactors.len());
    for ws in reactors {
        let (sink, mut stream) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        togglers.push(sink);
    }

    // Receivers: read the history, then count what the toggles bring.
    let (clients, failed) = connect_all(target, storm.clients, parallel, progress).await;
    let bytes = Arc::new(AtomicU64::new(0));
    let largest = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(clients.len());
    for ws in clients {
        let (bytes, largest, progress) = (
            Arc::clone(&bytes),
            Arc::clone(&largest),
            Arc::clone(progress),
        );
        let expected = storm.toggles as u64;
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            let mut seen = 0u64;
            let mut history = true;
            while seen < expected {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) if history => {
                        history = false;
                        drop(t);
                    }
                    Some(Ok(Message::Text(t))) => {
                        let wire = on_wire(t.len());
                        bytes.fetch_add(wire, Ordering::Relaxed);
                        largest.fetch_max(wire, Ordering::Relaxed);
                        progress.delivered.fetch_add(1, Ordering::Relaxed);
                        seen += 1;
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            seen
        }));
    }
    // Let every receiver take its history before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / storm.rate));
    for t in 0..storm.toggles {
        tick.tick().await;
        // Reactor t/2 removes (even t) then re-adds (odd t) its first emoji,
        // so the message stays full and every toggle is accepted.
        let n = togglers.len();
        togglers[(t / 2) % n]
            .send(toggle(id, emojis[0]))
            .await
            .map_err(|e| e.to_string())?;
        progress.sent.fetch_add(1, Ordering::Relaxed);
    }
    let mut received = 0u64;
    let mut short = 0usize;
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .map_err(|_| "a receiver did not get every toggle within 60 s".to_owned())?
            .map_err(|e| e.to_string())?;
        received += seen;
        short += usize::from(seen < storm.toggles as u64);
    }
    let took = started.elapsed().as_secs_f64();
    let total = bytes.load(Ordering::Relaxed);
    let receivers = storm.clients - failed;
    Ok(json!({
        "fill": {"toggles_accepted": accepted, "toggles_refused": refused},
        "receivers": receivers,
        "connect_failures": failed,
        "receivers_cut_short": short,
        "frames_expected": (receivers * storm.toggles) as u64,
        "frames_received": received,
        "largest_frame_bytes": largest.load(Ordering::Relaxed),
        "bytes_received": total,
        "bytes_per_toggle": total as f64 / storm.toggles as f64,
        "bytes_per_toggle_per_client": total as f64 / (storm.toggles * receivers.max(1)) as f64,
        "egress_bytes_per_s": total as f64 / took,
        "seconds": took,
    }))
}
