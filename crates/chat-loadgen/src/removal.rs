//! Removal: how long a moderator's removal takes to reach every client.
//!
//! `K` clients follow the chat with `?sync` (spread over every URL: the
//! nodes of a cluster). A poster on the first URL posts a message; once
//! every client holds it, the operator API of the first URL is asked to
//! remove it (`POST /admin/remove_message`, with `--admin-key`). Reports,
//! per removal, how long the API took to answer (it answers once the
//! removal is published on that node) and how long until each client had
//! its `message_removed`; medians over the removals.

use crate::client::{Target, Ws, count_ready, run_id};
use crate::http::read_response_to;
use crate::reconnect::with_query;
use crate::scenario::Progress;
use crate::stats::latency_histogram;
use chat_proto::{ClientFrame, RemoveMessage, SendMessage, ServerFrame, Uuid};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// What the scenario needs.
#[derive(Debug, Clone)]
pub struct Removal {
    /// Clients following the chat.
    pub clients: usize,
    /// Removals measured, one after the other.
    pub removals: usize,
    /// An operator key of the server(s).
    pub admin_key: String,
    /// Handshakes in flight at once while connecting.
    pub parallel: usize,
}

/// How long one removal may take to reach every client.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a client reports: it holds message `id` (posted), or saw it
/// removed, at an instant.
#[derive(Debug)]
enum Saw {
    Posted(Uuid),
    Removed(Uuid, Instant),
}

/// Runs the scenario.
pub async fn run(target: &Target, r: &Removal, progress: &Arc<Progress>) -> Value {
    let (tx, mut rx) = mpsc::unbounded_channel::<Saw>();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(r.clients.max(1));
    let gate = Arc::new(Semaphore::new(r.parallel.max(1)));
    let followers = with_query(target, "?sync");
    let mut clients = JoinSet::new();
    for i in 0..r.clients {
        let (target, gate, progress) = (followers.clone(), Arc::clone(&gate), Arc::clone(progress));
        let (tx, ready) = (tx.clone(), ready_tx.clone());
        // Number 1 and on: number 0 is the poster's address.
        clients.spawn(async move { follow(i + 1, target, gate, progress, tx, ready).await });
    }
    drop((tx, ready_tx));
    let ready = count_ready(&mut ready_rx, r.clients, Duration::from_secs(120)).await;
    if ready < r.clients {
        return json!({ "error": format!("only {ready} of {} clients followed the chat", r.clients) });
    }
    let mut poster = match target.server(0).connect(0).await {
        Ok(ws) => ws,
        Err(e) => return json!({ "error": format!("poster: {e}") }),
    };
    let run = run_id();
    let (mut api, mut all, mut each) = (
        latency_histogram(),
        latency_histogram(),
        latency_histogram(),
    );
    let us = |d: Duration| (d.as_micros() as u64).max(1);
    for k in 0..r.removals {
        let text = format!("to be removed {run} {k}");
        let id = match post(&mut poster, &text).await {
            Ok(id) => id,
            Err(e) => return json!({ "error": format!("posting: {e}") }),
        };
        // Every client holds it before it is removed.
        let mut holding = 0;
        while holding < r.clients {
            match tokio::time::timeout(PATIENCE, rx.recv()).await {
                Ok(Some(Saw::Posted(got))) if got == id => holding += 1,
                Ok(Some(_)) => {}
                _ => {
                    return json!({ "error": format!("removal {k}: only {holding} clients got the post") });
                }
            }
        }
        let asked = Instant::now();
        match remove(target, &r.admin_key, id).await {
            Ok(()) => {
                let _ = api.record(us(asked.elapsed()));
            }
            Err(e) => return json!({ "error": format!("removal {k}: {e}") }),
        }
        let mut removed = 0;
        let mut last = asked;
        while removed < r.clients {
            match tokio::time::timeout(PATIENCE, rx.recv()).await {
                Ok(Some(Saw::Removed(got, at))) if got == id => {
                    removed += 1;
                    last = last.max(at);
                    let _ = each.record(us(at.saturating_duration_since(asked)));
                }
                Ok(Some(_)) => {}
                _ => {
                    return json!({ "error": format!("removal {k}: only {removed} clients were told") });
                }
            }
        }
        let _ = all.record(us(last.saturating_duration_since(asked)));
    }
    clients.abort_all();
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "clients": r.clients,
        "removals": r.removals,
        // From the request to its answer (published on the node asked).
        "api_ms": { "p50": ms(&api, 0.5), "max": api.max() as f64 / 1000.0 },
        // From the request until the last client was told, per removal.
        "all_clients_ms": { "p50": ms(&all, 0.5), "max": all.max() as f64 / 1000.0 },
        // From the request until each client was told.
        "each_client_ms": { "p50": ms(&each, 0.5), "p99": ms(&each, 0.99), "max": each.max() as f64 / 1000.0 },
    })
}

/// One client: reads the history to its first `sync`, then reports every
/// message and every removal it gets.
async fn follow(
    i: usize,
    target: Target,
    gate: Arc<Semaphore>,
    progress: Arc<Progress>,
    saw: mpsc::UnboundedSender<Saw>,
    ready: mpsc::Sender<()>,
) {
    let mut ws: Ws = {
        let _permit = gate.acquire().await;
        match target.connect(i).await {
            Ok(ws) => ws,
            Err(_) => return,
        }
    };
    progress.connected.fetch_add(1, Ordering::Relaxed);
    let mut ready = Some(ready);
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        progress.delivered.fetch_add(1, Ordering::Relaxed);
        match ServerFrame::decode(&text) {
            Ok(ServerFrame::Sync(_)) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(()).await;
                }
            }
            Ok(ServerFrame::Message(m)) if ready.is_none() => {
                let _ = saw.send(Saw::Posted(m.id));
            }
            Ok(ServerFrame::MessageRemoved(r)) => {
                let _ = saw.send(Saw::Removed(r.message_id, Instant::now()));
            }
            _ => {}
        }
    }
}

/// Posts `text`; its id, once the server echoes it.
async fn post(ws: &mut Ws, text: &str) -> Result<Uuid, String> {
    let frame = ClientFrame::SendMessage(SendMessage {
        text: text.to_owned(),
        author_name: None,
    });
    ws.send(Message::text(frame.encode()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let next = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .map_err(|_| "no echo".to_owned())?;
        match next {
            Some(Ok(Message::Text(t))) => match ServerFrame::decode(&t) {
                Ok(ServerFrame::Message(m)) if m.text == text => return Ok(m.id),
                Ok(ServerFrame::Error(e)) => return Err(e.error),
                _ => {}
            },
            Some(Ok(_)) => {}
            _ => return Err("the poster's socket closed".into()),
        }
    }
}

/// Asks the first server's operator API to remove `id`.
async fn remove(target: &Target, key: &str, id: Uuid) -> Result<(), String> {
    let body = serde_json::to_string(&RemoveMessage {
        message_id: id,
        reason: None,
    })
    .map_err(|e| e.to_string())?;
    let request = format!(
        "POST /admin/remove_message HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let reply = read_response_to(&mut stream, false).await?;
    if reply.status != 200 {
        return Err(format!(
            "{}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    Ok(())
}
