//! Crash test: the real server binary with a data directory is killed with
//! SIGKILL at random moments while clients chat, and restarted each time.
//!
//! After every restart the replayed history must hold every message any
//! client ever received, with identical content, and each message's
//! reactions must equal the last state any client saw, or a later one
//! (toggles that were sent but not yet acknowledged may have been committed).
//! Zero lost is the only pass.
//!
//! The chatting clients opt in to positions (`?sync`) and keep what they
//! show across every kill: after each restart they resume with
//! `?since=&epoch=` from their last `sync` frame, and what they show must
//! then be exactly the replayed history, order and reactions included.

use chat_proto::{
    AddReaction, ClientFrame, Message, ReactionUpdated, SendMessage, ServerFrame, SyncPoint,
    UserId, Uuid,
};
mod binary;

use binary::{ServerProcess, free_port};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const CLIENTS: u8 = 3;
const KILLS: usize = 6;
const EMOJIS: [&str; 3] = ["👍", "🎉", "❤️"];

/// A tiny deterministic generator; the seed is printed so a failure can be
/// replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Every frame the server sends is checked against asyncapi.yaml.
fn decode(text: &str) -> ServerFrame {
    static V: std::sync::OnceLock<chat_testkit::FrameValidator> = std::sync::OnceLock::new();
    V.get_or_init(chat_testkit::FrameValidator::server_frames)
        .assert_valid(text);
    ServerFrame::decode(text).expect("server frames decode")
}

async fn connect(port: u16, n: u8) -> Ws {
    connect_to(port, n, "").await
}

async fn connect_to(port: u16, n: u8, query: &str) -> Ws {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
        .expect("bind");
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect");
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/ws{query}"), stream)
            .await
            .expect("handshake");
    ws
}

/// A message without its reactions: what must survive unchanged.
fn content(m: &Message) -> (Uuid, String, UserId, String, i64) {
    (
        m.id,
        m.text.clone(),
        m.author_id.clone(),
        m.author_name.clone(),
        m.created_at,
    )
}

/// Reactions as (emoji, ordered users), keeping both orders.
fn ordered(m: &Message) -> Vec<(String, Vec<String>)> {
    m.reactions
        .iter()
        .map(|(e, users)| (e.clone(), users.iter().map(|u| u.to_string()).collect()))
        .collect()
}

/// What a client that opted in shows, kept across restarts.
#[derive(Default)]
struct View {
    order: Vec<Uuid>,
    messages: HashMap<Uuid, Message>,
    /// The last `sync` frame.
    at: Option<SyncPoint>,
    /// Whether a `reset` is the right answer now (a new epoch).
    expect_reset: bool,
    resets: usize,
}

impl View {
    /// Applies a frame as a careful client does: by id, so a frame seen
    /// twice (received, then re-sent on resume) changes nothing.
    fn apply(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Message(m) => self.upsert(m),
            ServerFrame::ReactionUpdated(r) => {
                assert!(
                    self.messages.contains_key(&r.message_id),
                    "a reaction for a message this client never got: {r:?}"
                );
                self.upsert(&r.message);
            }
            ServerFrame::Sync(s) => self.at = Some(*s),
            ServerFrame::MessageRemoved(_)
            | ServerFrame::UserRestricted(_)
            | ServerFrame::RestrictionLifted(_)
            | ServerFrame::RoomUpdated(_) => panic!("no moderator in this test: {frame:?}"),
            ServerFrame::Reset(r) => {
                assert!(
                    self.expect_reset,
                    "a resume within one epoch was reset: {r:?}"
                );
                assert_eq!(r.reason, chat_proto::ResetReason::EpochChanged);
                // Drop everything shown: the full history follows.
                self.order.clear();
                self.messages.clear();
                self.resets += 1;
            }
            ServerFrame::Error(e) => panic!("unexpected refusal: {}", e.error),
        }
    }

    fn upsert(&mut self, m: &Message) {
        if self.messages.insert(m.id, m.clone()).is_none() {
            self.order.push(m.id);
        }
    }

    fn query(&self) -> String {
        match &self.at {
            Some(s) => format!("?since={}&epoch={}", s.position, s.epoch),
            None => "?sync".into(),
        }
    }
}

/// What one client saw during one server lifetime.
#[derive(Default)]
struct Seen {
    messages: Vec<Message>,
    /// Per message: how many `reaction_updated` this client received in
    /// this lifetime, and the latest full message.
    latest: HashMap<Uuid, (u64, Message)>,
    /// Toggles sent and not yet acknowledged: (message, emoji).
    pending: Vec<(Uuid, String)>,
    user: Option<UserId>,
}

async fn chat_until_killed(mut ws: Ws, seed: u64, n: u8, mut view: View) -> (Seen, View) {
    let mut rng = Rng(seed | 1);
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(Duration::from_millis(3));
    let mut known: Vec<Uuid> = Vec::new();
    let mut counter = 0u64;
    loop {
        tokio::select! {
            frame = ws.next() => {
                let Some(Ok(WsMessage::Text(text))) = frame else {
                    match frame {
                        Some(Ok(_)) => continue,
                        _ => return (seen, view), // killed
                    }
                };
                let frame = decode(&text);
                view.apply(&frame);
                match frame {
                    ServerFrame::Message(m) => {
                        if m.text.starts_with(&format!("c{n}-")) && seen.user.is_none() {
                            seen.user = Some(m.author_id.clone());
                        }
                        known.push(m.id);
                        seen.messages.push(m);
                    }
                    ServerFrame::ReactionUpdated(ReactionUpdated { message, user_id, emoji, message_id, .. }) => {
                        if Some(&user_id) == seen.user.as_ref()
                            && let Some(i) = seen.pending.iter().position(|(id, e)| *id == message_id && *e == emoji)
                        {
                            seen.pending.remove(i);
                        }
                        let entry = seen.latest.entry(message_id).or_insert((0, message.clone()));
                        entry.0 += 1;
                        entry.1 = message;
                    }
                    ServerFrame::Error(e) => panic!("unexpected refusal: {}", e.error),
                    ServerFrame::MessageRemoved(_)
                    | ServerFrame::UserRestricted(_)
                    | ServerFrame::RestrictionLifted(_)
                    | ServerFrame::RoomUpdated(_) => unreachable!("applied above, which refuses it"),
                    ServerFrame::Sync(_) | ServerFrame::Reset(_) => {}
                }
            }
            _ = tick.tick() => {
                counter += 1;
                // Toggle only once this client knows its own id, so every
                // toggle's acknowledgement can be recognised.
                let frame = if seen.user.is_none() || known.is_empty() || rng.below(3) > 0 {
                    ClientFrame::SendMessage(SendMessage { text: format!("c{n}-{counter}-{}", rng.next()), author_name: Some(format!("client {n}")) })
                } else {
                    let id = known[rng.below(known.len() as u64) as usize];
                    let emoji = EMOJIS[rng.below(3) as usize].to_owned();
                    seen.pending.push((id, emoji.clone()));
                    ClientFrame::AddReaction(AddReaction { message_id: id, emoji })
                };
                if ws.send(WsMessage::text(frame.encode())).await.is_err() {
                    return (seen, view);
                }
            }
        }
    }
}

/// Reads the replayed history of a fresh connection.
async fn history(port: u16, expected_at_least: usize) -> Vec<Message> {
    let mut ws = connect(port, 200).await;
    let mut out = Vec::new();
    loop {
        let wait = if out.len() < expected_at_least {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(300)
        };
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => match decode(&t) {
                ServerFrame::Message(m) => out.push(m),
                other => panic!("history holds only messages, got {other:?}"),
            },
            Ok(Some(Ok(_))) => {}
            _ => return out,
        }
    }
}

/// Applies `toggles` (one flip each: add the user if absent, else remove)
/// to `base`, as sets.
fn with_toggles(base: &Message, toggles: &[(UserId, String)]) -> BTreeSet<(String, String)> {
    let mut set: BTreeSet<(String, String)> = base
        .reactions
        .iter()
        .flat_map(|(e, users)| users.iter().map(move |u| (e.clone(), u.to_string())))
        .collect();
    for (user, emoji) in toggles {
        let key = (emoji.clone(), user.to_string());
        if !set.remove(&key) {
            set.insert(key);
        }
    }
    set
}

fn as_set(m: &Message) -> BTreeSet<(String, String)> {
    with_toggles(m, &[])
}

/// What a lifetime ended with: per message, the latest state any client
/// saw, and the toggles still in flight.
type Ending = (
    HashMap<Uuid, (u64, Message)>,
    HashMap<Uuid, Vec<(UserId, String)>>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // Everything any client ever received, by id.
    let mut ever: HashMap<Uuid, Message> = HashMap::new();
    let mut checked_reactions = 0usize;
    let mut previous: Option<Ending> = None;
    let mut views: Vec<View> = (0..CLIENTS).map(|_| View::default()).collect();
    let mut resumed = 0usize;

    for kill in 0..=KILLS {
        let mut server = ServerProcess::start_on(
            dir.path(),
            port,
            &["--message-rate", "100000", "--reaction-rate", "100000"],
        );
        // The restarted server's history must hold everything seen before.
        let replayed = history(port, ever.len()).await;
        let by_id: HashMap<Uuid, &Message> = replayed.iter().map(|m| (m.id, m)).collect();
        for (id, m) in &ever {
            let got = by_id
                .get(id)
                .unwrap_or_else(|| panic!("after kill {kill}: message {id} lost"));
            assert_eq!(
                content(got),
                content(m),
                "after kill {kill}: message {id} changed"
            );
        }
        // Reactions: the latest state any client saw before the kill, or
        // that state plus some of the toggles that were still in flight.
        if let Some((latest, pending)) = previous.take() {
            for (id, (_, expected)) in &latest {
                let got = by_id.get(id).unwrap_or_else(|| panic!("message {id} lost"));
                let toggles = pending.get(id).cloned().unwrap_or_default();
                if toggles.is_empty() {
                    assert_eq!(
                        ordered(got),
                        ordered(expected),
                        "reactions of {id} after kill {kill}"
                    );
                } else {
                    let n = toggles.len().min(12);
                    let reachable = (0u32..1 << n).any(|mask| {
                        let subset: Vec<_> = toggles[..n]
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0)
                            .map(|(_, t)| t.clone())
                            .collect();
                        with_toggles(expected, &subset) == as_set(got)
                    });
                    assert!(
                        reachable,
                        "reactions of {id} after kill {kill}: {:?} is not {:?} plus some of {toggles:?}",
                        ordered(got),
                        ordered(expected)
                    );
                }
                checked_reactions += 1;
            }
        }
        // Each chatting client resumes from its last sync: afterwards it
        // shows exactly the replayed history.
        let mut sockets = Vec::new();
        for (i, view) in views.iter_mut().enumerate() {
            let n = 2 + i as u8;
            let was = view.at;
            let mut ws = connect_to(port, n, &view.query()).await;
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .unwrap_or_else(|_| panic!("client {n}: no sync after resuming from {was:?}"));
                let Some(Ok(WsMessage::Text(text))) = frame else {
                    continue;
                };
                let frame = decode(&text);
                view.apply(&frame);
                if let ServerFrame::Sync(s) = frame {
                    if let Some(was) = was {
                        assert_eq!(s.epoch, was.epoch, "one data directory, one epoch");
                        assert!(s.position >= was.position);
                        resumed += 1;
                    }
                    break;
                }
            }
            let shown: Vec<Uuid> = view.order.clone();
            let history: Vec<Uuid> = replayed.iter().map(|m| m.id).collect();
            assert_eq!(
                shown, history,
                "after kill {kill}: client {n} resumed to a different history"
            );
            for m in &replayed {
                assert_eq!(
                    ordered(&view.messages[&m.id]),
                    ordered(m),
                    "after kill {kill}: client {n} shows other reactions on {}",
                    m.id
                );
            }
            sockets.push(ws);
        }
        if kill == KILLS {
            println!(
                "crash test: {} messages and {checked_reactions} reaction states checked across {KILLS} SIGKILLs; 0 lost; {resumed} resumes each showed exactly the history",
                ever.len()
            );
            let _ = server.kill();
            let _ = server.wait();
            // Restored from a backup, say: a new epoch. Every client's
            // position is stale; resuming, each is reset and then shows
            // exactly the history.
            let mut server = ServerProcess::start_on(dir.path(), port, &["--new-epoch"]);
            let replayed = history(port, ever.len()).await;
            for (i, view) in views.iter_mut().enumerate() {
                let n = 2 + i as u8;
                let old = view.at.expect("synced").epoch;
                view.expect_reset = true;
                let mut ws = connect_to(port, n, &view.query()).await;
                let sync = loop {
                    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                        .await
                        .expect("a sync after the reset");
                    let Some(Ok(WsMessage::Text(text))) = frame else {
                        continue;
                    };
                    let frame = decode(&text);
                    view.apply(&frame);
                    if let ServerFrame::Sync(s) = frame {
                        break s;
                    }
                };
                assert_eq!(view.resets, 1, "client {n}: one reset");
                assert_ne!(sync.epoch, old, "a new epoch");
                let shown: Vec<Uuid> = view.order.clone();
                let history: Vec<Uuid> = replayed.iter().map(|m| m.id).collect();
                assert_eq!(shown, history, "client {n}: after the reset, the history");
            }
            let _ = server.kill();
            let _ = server.wait();
            println!(
                "crash test: after --new-epoch, every client was reset to exactly the history"
            );
            break;
        }

        // Clients chat; the server dies at a random moment.
        let mut tasks = Vec::new();
        for (i, (ws, view)) in sockets.into_iter().zip(views.drain(..)).enumerate() {
            let n = 2 + i as u8;
            tasks.push(tokio::spawn(chat_until_killed(ws, rng.next(), n, view)));
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        server.kill().expect("SIGKILL");
        server.wait().expect("reaped");
        let mut latest: HashMap<Uuid, (u64, Message)> = HashMap::new();
        let mut pending: HashMap<Uuid, Vec<(UserId, String)>> = HashMap::new();
        for t in tasks {
            let (s, view) = t.await.expect("client task");
            views.push(view);
            for m in &s.messages {
                ever.entry(m.id).or_insert_with(|| m.clone());
            }
            for (id, (count, m)) in s.latest {
                let e = latest.entry(id).or_insert((0, m.clone()));
                if count > e.0 {
                    *e = (count, m);
                }
            }
            if let Some(user) = &s.user {
                for (id, emoji) in s.pending {
                    pending.entry(id).or_default().push((user.clone(), emoji));
                }
            }
        }
        assert!(
            !ever.is_empty(),
            "the clients exchanged nothing before the kill"
        );
        previous = Some((latest, pending));
    }
}
