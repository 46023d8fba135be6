//! A chaos client: one user (its own loopback address), connecting through
//! nginx or straight to a node, posting and toggling reactions at random,
//! one command at a time, and remembering what it was told: its own
//! message or reaction back (acknowledged), an error (refused), or nothing
//! before its socket died (unknown). It follows the chat with `?sync`,
//! keeps its own view of the history (applied by message id), and resumes
//! with `?since=&epoch=` whenever its socket dies.

use chat_proto::{
    AddReaction, ClientFrame, Message, ResetReason, SendMessage, ServerFrame, SyncPoint, Uuid,
};
use chat_testkit::FrameValidator;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub const EMOJIS: [&str; 3] = ["👍", "🎉", "😂"];

/// How long a command may wait for its outcome before the client calls it
/// unknown and reconnects.
const OUTCOME_WAIT: Duration = Duration::from_secs(12);

/// A message this client was told was taken.
#[derive(Debug, Clone)]
pub struct Acked {
    pub id: Uuid,
    pub text: String,
    /// Epoch resets this client had been told of when it was acknowledged.
    pub resets_before: usize,
}

/// The last acknowledged toggle of one (message, emoji) by this user.
#[derive(Debug, Clone, Default)]
pub struct Toggled {
    /// Whether the user had reacted after it, and the epoch resets told
    /// of by then.
    pub last: Option<(bool, usize)>,
    /// A toggle whose outcome is unknown: the pair is not touched again,
    /// and not checked.
    pub uncertain: bool,
}

/// What a client did and saw, for the checks at the end.
#[derive(Debug, Default)]
pub struct Record {
    pub user: String,
    pub acked: Vec<Acked>,
    pub refused: Vec<(String, String)>,
    pub unknown: Vec<String>,
    pub sent: Vec<String>,
    pub toggles: HashMap<(Uuid, String), Toggled>,
    pub toggles_acked: usize,
    pub epoch_resets: usize,
    pub other_resets: Vec<ResetReason>,
    pub connections: usize,
    pub frames: u64,
    /// Frames that failed `asyncapi.yaml`, or came when none could.
    pub anomalies: Vec<String>,
    /// The client's own view: messages in the order first seen.
    pub order: Vec<Uuid>,
    pub view: HashMap<Uuid, Message>,
    pub at: Option<SyncPoint>,
}

impl Record {
    fn apply(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Message(m) => self.upsert(m.clone()),
            ServerFrame::ReactionUpdated(r) => self.upsert(r.message.clone()),
            ServerFrame::Sync(s) => self.at = Some(*s),
            ServerFrame::Reset(r) => {
                // The full history follows: the view starts over.
                self.order.clear();
                self.view.clear();
                match r.reason {
                    ResetReason::EpochChanged => self.epoch_resets += 1,
                    other => self.other_resets.push(other),
                }
            }
            ServerFrame::MessageRemoved(r) => {
                self.view.remove(&r.message_id);
                self.order.retain(|id| *id != r.message_id);
            }
            ServerFrame::Error(_)
            | ServerFrame::UserRestricted(_)
            | ServerFrame::RestrictionLifted(_)
            | ServerFrame::RoomUpdated(_) => {}
        }
    }

    fn upsert(&mut self, m: Message) {
        if self.view.insert(m.id, m.clone()).is_none() {
            self.order.push(m.id);
        }
    }

    /// The view, in order.
    pub fn history(&self) -> Vec<&Message> {
        self.order.iter().map(|id| &self.view[id]).collect()
    }

    fn reacted(&self, id: Uuid, emoji: &str) -> bool {
        self.view.get(&id).is_some_and(|m| {
            m.reactions
                .get(emoji)
                .is_some_and(|users| users.iter().any(|u| u.as_str() == self.user))
        })
    }
}

/// What the run tells its clients.
#[derive(Clone)]
pub struct Control {
    /// Set when the faults are over: finish the command in hand, then
    /// follow the chat only.
    pub stop: Arc<AtomicBool>,
    /// Where every node agrees the chat ended: catch up to it and return.
    pub target: watch::Receiver<Option<SyncPoint>>,
    /// Every message id a client was told was taken (the moderator picks
    /// from them).
    pub taken: Arc<Mutex<Vec<Uuid>>>,
}

// One at a time, moved once: the size of a frame is no cost here.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// A frame was read and applied.
    Frame(ServerFrame),
    /// The socket died or went silent.
    Dead,
}

struct Conn {
    ws: Ws,
}

/// Client `i`'s own address, and so its user id (`--identity raw-ip`).
pub fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(i).expect("few clients"))
}

/// Runs client `i` until it has caught up with the target.
pub async fn run(
    i: usize,
    seed: u64,
    targets: Vec<u16>,
    validator: Arc<FrameValidator>,
    control: Control,
) -> Record {
    let addr = address(i);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(i as u64));
    let mut rec = Record {
        user: addr.to_string(),
        ..Record::default()
    };
    let mut counter = 0u32;
    let mut conn: Option<Conn> = None;
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        let Some(c) = conn.as_mut() else {
            conn = connect(addr, &targets, &mut rng, &mut rec, &validator).await;
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
            }
            continue;
        };
        if control.stop.load(Ordering::SeqCst) {
            // Follow until the target is known and reached.
            let target = *control.target.borrow();
            if let Some(target) = target {
                if rec.at == Some(target) {
                    return rec;
                }
                let give_up = *give_up
                    .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(40));
                if tokio::time::Instant::now() > give_up {
                    rec.anomalies.push(format!(
                        "never reached where the nodes agree ({target:?}); it stands at {:?}",
                        rec.at
                    ));
                    return rec;
                }
            }
            match next(c, &mut rec, &validator, Duration::from_millis(500)).await {
                Some(Outcome::Dead) => conn = None,
                Some(Outcome::Frame(ServerFrame::Error(e))) => {
                    rec.anomalies
                        .push(format!("an error with no command: {}", e.error));
                }
                _ => {}
            }
            continue;
        }
        // One command, and its outcome.
        let react_on = if rec.order.is_empty() || rng.random_bool(0.5) {
            None
        } else {
            let recent = rec.order.len().saturating_sub(30);
            let id = rec.order[rng.random_range(recent..rec.order.len())];
            let emoji = EMOJIS[rng.random_range(0..EMOJIS.len())];
            let pair = (id, emoji.to_owned());
            (!rec.toggles.get(&pair).is_some_and(|t| t.uncertain)).then_some(pair)
        };
        let dead = match react_on {
            None => {
                counter += 1;
                let text = format!("{} #{counter}", rec.user);
                let before = rec.acked.len();
                let dead = say(c, &mut rec, &validator, text).await;
                if rec.acked.len() > before {
                    let id = rec.acked[before].id;
                    control.taken.lock().expect("taken").push(id);
                }
                dead
            }
            Some((id, emoji)) => react(c, &mut rec, &validator, id, emoji).await,
        };
        if dead {
            conn = None;
            continue;
        }
        // A pause, reading what comes meanwhile.
        let pause = tokio::time::Instant::now() + Duration::from_millis(rng.random_range(100..700));
        while let Some(left) = pause.checked_duration_since(tokio::time::Instant::now()) {
            match next(c, &mut rec, &validator, left).await {
                Some(Outcome::Dead) => {
                    conn = None;
                    break;
                }
                Some(Outcome::Frame(ServerFrame::Error(e))) => {
                    rec.anomalies
                        .push(format!("an error with no command: {}", e.error));
                }
                Some(Outcome::Frame(_)) => {}
                None => break,
            }
        }
    }
}

/// Sends `text`; true if the socket died.
async fn say(c: &mut Conn, rec: &mut Record, v: &FrameValidator, text: String) -> bool {
    rec.sent.push(text.clone());
    let frame = ClientFrame::SendMessage(SendMessage {
        text: text.clone(),
        author_name: None,
    });
    if c.ws.send(WsMessage::text(frame.encode())).await.is_err() {
        rec.unknown.push(text);
        return true;
    }
    let deadline = tokio::time::Instant::now() + OUTCOME_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(c, rec, v, left).await {
            Some(Outcome::Frame(ServerFrame::Message(m)))
                if m.text == text && m.author_id.as_str() == rec.user =>
            {
                rec.acked.push(Acked {
                    id: m.id,
                    text,
                    resets_before: rec.epoch_resets,
                });
                return false;
            }
            Some(Outcome::Frame(ServerFrame::Error(e))) => {
                if e.error.contains("not confirmed") {
                    rec.unknown.push(text);
                } else {
                    rec.refused.push((text, e.error));
                }
                return false;
            }
            Some(Outcome::Frame(_)) => {}
            Some(Outcome::Dead) | None => {
                rec.unknown.push(text);
                return true;
            }
        }
    }
}

/// Toggles `emoji` on `id`; true if the socket died.
async fn react(
    c: &mut Conn,
    rec: &mut Record,
    v: &FrameValidator,
    id: Uuid,
    emoji: String,
) -> bool {
    let pair = (id, emoji.clone());
    let frame = ClientFrame::AddReaction(AddReaction {
        message_id: id,
        emoji: emoji.clone(),
    });
    let uncertain =
        |rec: &mut Record| rec.toggles.entry(pair.clone()).or_default().uncertain = true;
    if c.ws.send(WsMessage::text(frame.encode())).await.is_err() {
        uncertain(rec);
        return true;
    }
    let deadline = tokio::time::Instant::now() + OUTCOME_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(c, rec, v, left).await {
            Some(Outcome::Frame(ServerFrame::ReactionUpdated(r)))
                if r.message_id == id && r.emoji == emoji && r.user_id.as_str() == rec.user =>
            {
                let now = rec.reacted(id, &emoji);
                let resets = rec.epoch_resets;
                rec.toggles.entry(pair.clone()).or_default().last = Some((now, resets));
                rec.toggles_acked += 1;
                return false;
            }
            Some(Outcome::Frame(ServerFrame::Error(e))) => {
                if e.error.contains("not confirmed") {
                    uncertain(rec);
                }
                return false;
            }
            Some(Outcome::Frame(_)) => {}
            Some(Outcome::Dead) | None => {
                uncertain(rec);
                return true;
            }
        }
    }
}

/// The next frame within `within`, validated, decoded and applied; `None`
/// if none came in time.
async fn next(
    c: &mut Conn,
    rec: &mut Record,
    v: &FrameValidator,
    within: Duration,
) -> Option<Outcome> {
    loop {
        let got = match tokio::time::timeout(within, c.ws.next()).await {
            Err(_) => return None,
            Ok(got) => got,
        };
        match got {
            Some(Ok(WsMessage::Text(t))) => {
                rec.frames += 1;
                if let Err(e) = v.check(&t) {
                    rec.anomalies.push(e);
                }
                match ServerFrame::decode(&t) {
                    Ok(frame) => {
                        rec.apply(&frame);
                        return Some(Outcome::Frame(frame));
                    }
                    Err(e) => {
                        rec.anomalies.push(format!("undecodable ({e}): {t}"));
                    }
                }
            }
            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return Some(Outcome::Dead),
            Some(Ok(_)) => {}
        }
    }
}

/// A connection to a random target, resumed where the client stands, and
/// read up to its first `sync`; `None` if that failed.
async fn connect(
    addr: Ipv4Addr,
    targets: &[u16],
    rng: &mut Xoshiro256PlusPlus,
    rec: &mut Record,
    v: &FrameValidator,
) -> Option<Conn> {
    let port = targets[rng.random_range(0..targets.len())];
    let path = match rec.at {
        Some(at) => format!("/ws?since={}&epoch={}", at.position, at.epoch),
        None => "/ws?sync".to_owned(),
    };
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((addr, 0))).ok()?;
    let handshake = async {
        let stream = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .ok()?;
        let url = format!("ws://127.0.0.1:{port}{path}");
        tokio_tungstenite::client_async(url, stream).await.ok()
    };
    let (ws, _) = tokio::time::timeout(Duration::from_secs(3), handshake)
        .await
        .ok()??;
    let mut c = Conn { ws };
    rec.connections += 1;
    // The replay, up to its sync.
    loop {
        match next(&mut c, rec, v, Duration::from_secs(10)).await {
            Some(Outcome::Frame(ServerFrame::Sync(_))) => return Some(c),
            Some(Outcome::Frame(ServerFrame::Error(e))) => {
                rec.anomalies
                    .push(format!("an error during the replay: {}", e.error));
            }
            Some(Outcome::Frame(_)) => {}
            Some(Outcome::Dead) | None => return None,
        }
    }
}
