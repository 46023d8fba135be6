//! The moderator of a chaos run: while the faults go on, it gives orders
//! through the operator API of a random node or of nginx: it removes
//! messages clients were told were taken, times users out (some with a
//! purge of their last minute), lifts restrictions and turns slow mode on
//! and off. It remembers what each order was answered. At the end the
//! audit trail, read from a node, says what was applied, and [`check`]
//! holds the history to it.

use chat_proto::{
    Applied, AuditEntry, ErrorBody, LiftRestriction, Moderation, Position, Purge, RemoveMessage,
    RestrictUser, Room, Term, Uuid,
};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The operator key every node is given (`--admin-keys-file`).
pub const KEY: &str = "chaos-moderator-0123456789abcdef";

/// The keys file's text: one operator, `chaos`.
pub fn keys_file() -> String {
    format!("chaos {KEY}\n")
}

/// How long an order may wait for its answer (a node waits for the
/// stream; under faults that can be a while).
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// What an order was answered.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200: applied, at this position.
    Applied(Position),
    /// A refusal (4xx, or 503 unavailable): not applied.
    Refused(u16, String),
    /// No answer, or one that leaves it open (a 503 "not confirmed", a
    /// 500 "not yet written", a dead socket): applied or not, the audit
    /// trail tells.
    Unknown(String),
}

/// One order and its answer.
#[derive(Debug, Clone)]
pub struct Order {
    pub order: Moderation,
    pub answer: Answer,
    /// When it was answered.
    pub at: Instant,
}

/// Runs until `stop`: an order every 1 to 3 seconds. `taken` is every
/// message id a client was told was taken; `users` the clients' user ids.
pub async fn run(
    seed: u64,
    targets: Vec<u16>,
    taken: Arc<Mutex<Vec<Uuid>>>,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Vec<Order> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x6d6f64);
    let mut orders = Vec::new();
    let mut asked: HashSet<Uuid> = HashSet::new();
    let mut slow = false;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        let user = users[rng.random_range(0..users.len())].as_str().into();
        let order = match rng.random_range(0..100) {
            0..60 => {
                // A recent message: one that others may be reacting to.
                let id = {
                    let taken = taken.lock().expect("taken");
                    let recent = taken.len().saturating_sub(40);
                    (recent < taken.len()).then(|| taken[rng.random_range(recent..taken.len())])
                };
                let Some(id) = id.filter(|id| asked.insert(*id)) else {
                    continue;
                };
                Moderation::RemoveMessage(RemoveMessage {
                    message_id: id,
                    reason: Some("chaos".into()),
                })
            }
            60..85 => Moderation::RestrictUser(RestrictUser {
                user_id: user,
                term: Term::Seconds(rng.random_range(2..6)),
                purge: if rng.random_bool(0.5) {
                    Purge::LastMinutes(1)
                } else {
                    Purge::None
                },
                reason: None,
            }),
            85..93 => Moderation::LiftRestriction(LiftRestriction {
                user_id: user,
                reason: None,
            }),
            _ => {
                slow = !slow;
                Moderation::SetRoom(Room {
                    slow_mode_seconds: u32::from(slow),
                })
            }
        };
        let port = targets[rng.random_range(0..targets.len())];
        let answer = give(port, &order).await;
        orders.push(Order {
            order,
            answer,
            at: Instant::now(),
        });
    }
    orders
}

/// The operator API's path and body of `order`.
fn request(order: &Moderation) -> (&'static str, String) {
    let (path, body) = match order {
        Moderation::RemoveMessage(o) => ("/admin/remove_message", serde_json::to_string(o)),
        Moderation::RestrictUser(o) => ("/admin/restrict_user", serde_json::to_string(o)),
        Moderation::LiftRestriction(o) => ("/admin/lift_restriction", serde_json::to_string(o)),
        Moderation::SetRoom(o) => ("/admin/set_room", serde_json::to_string(o)),
    };
    (path, body.expect("json"))
}

/// Gives `order` to the node (or nginx) on `port`.
async fn give(port: u16, order: &Moderation) -> Answer {
    let (path, body) = request(order);
    match call(port, "POST", path, Some(&body)).await {
        Err(e) => Answer::Unknown(e),
        Ok((200, body)) => match serde_json::from_slice::<Applied>(&body) {
            Ok(applied) => Answer::Applied(applied.position),
            Err(e) => Answer::Unknown(format!("200 with an unreadable body: {e}")),
        },
        Ok((code, body)) => {
            let why = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            // Refusals say nothing was applied; these two leave it open.
            let open = (code == 503
                && (why.contains("not confirmed") || why.contains("not yet written")))
                || code == 502
                || code == 504;
            if open {
                Answer::Unknown(format!("{code}: {why}"))
            } else {
                Answer::Refused(code, why)
            }
        }
    }
}

/// One request with the key, `Connection: close`: the status and body.
async fn call(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n"
        );
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None => request.push_str("\r\n"),
        }
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let head_end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no complete answer")?;
        let code = std::str::from_utf8(answer.get(9..12).ok_or("no status")?)
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        Ok((code, answer[head_end + 4..].to_vec()))
    };
    tokio::time::timeout(ANSWER_WAIT, exchange)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

/// The whole audit trail as the node on `port` serves it.
pub async fn audit(port: u16) -> Result<Vec<AuditEntry>, String> {
    let mut all: Vec<AuditEntry> = Vec::new();
    loop {
        let since = all.last().map_or(0, |e| e.position.0);
        let (code, body) = call(
            port,
            "GET",
            &format!("/admin/audit?since={since}&limit=1000"),
            None,
        )
        .await?;
        if code != 200 {
            return Err(format!("{code}: {}", String::from_utf8_lossy(&body)));
        }
        let page: Vec<AuditEntry> =
            serde_json::from_slice(&body).map_err(|e| format!("the audit: {e}"))?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}

/// What the audit trail says was removed.
pub fn removed(audit: &[AuditEntry]) -> HashSet<Uuid> {
    audit
        .iter()
        .flat_map(|e| e.removed.iter().copied())
        .collect()
}

/// The checks of the moderator's orders against the audit trail and the
/// history every node serves. `lost_tail` is when the log was rewound, if
/// it was: an order applied before it may have been lost with the tail.
pub fn check(
    orders: &[Order],
    audit: &[AuditEntry],
    history: &[chat_proto::Message],
    lost_tail: Option<Instant>,
    failures: &mut Vec<String>,
) {
    let in_history: HashMap<Uuid, &chat_proto::Message> =
        history.iter().map(|m| (m.id, m)).collect();
    // Nothing the audit trail says was removed is served.
    for id in removed(audit) {
        if in_history.contains_key(&id) {
            failures.push(format!(
                "message {id} is removed in the audit trail, yet in the history"
            ));
        }
    }
    // Every order answered "applied" is in the audit trail at its position
    // (unless a lost tail took it), and one that removed a message did.
    let by_position: HashMap<Position, &AuditEntry> =
        audit.iter().map(|e| (e.position, e)).collect();
    for o in orders {
        let Answer::Applied(position) = o.answer else {
            continue;
        };
        let lost = lost_tail.is_some_and(|then| o.at < then);
        match by_position.get(&position) {
            Some(e) if e.command == o.order => {
                if let Moderation::RemoveMessage(r) = &o.order
                    && !e.removed.contains(&r.message_id)
                {
                    failures.push(format!(
                        "the removal of {} at {position:?} removed {:?}",
                        r.message_id, e.removed
                    ));
                }
            }
            _ if lost => {}
            Some(e) => failures.push(format!(
                "{:?} was applied at {position:?}, where the audit trail has {:?}",
                o.order, e.command
            )),
            None => failures.push(format!(
                "{:?} was applied at {position:?}, which is not in the audit trail",
                o.order
            )),
        }
    }
    // Nobody but this moderator gave an order; but after a lost tail, the
    // cluster removes again what the tail took the removal of, once its
    // entry was erased (`by: cluster`).
    let given: Vec<&Moderation> = orders.iter().map(|o| &o.order).collect();
    for e in audit {
        if lost_tail.is_some()
            && e.by.as_str() == "cluster"
            && matches!(e.command, Moderation::RemoveMessage(_))
        {
            continue;
        }
        if !given.contains(&&e.command) {
            failures.push(format!(
                "the audit trail has an order nobody gave: {:?}",
                e.command
            ));
        }
    }
}

/// A one-line account of the orders.
pub fn summary(orders: &[Order], audit: &[AuditEntry]) -> String {
    let mut applied = 0;
    let mut refused: HashMap<String, usize> = HashMap::new();
    let mut unknown = Vec::new();
    for o in orders {
        match &o.answer {
            Answer::Applied(_) => applied += 1,
            Answer::Refused(code, why) => {
                let why: String = why.chars().take(40).collect();
                *refused.entry(format!("{code} {why}")).or_default() += 1;
            }
            Answer::Unknown(why) => unknown.push(why.as_str()),
        }
    }
    format!(
        "{} orders: {applied} applied, refused {refused:?}, unknown {unknown:?}; the audit trail has {} entries removing {} messages",
        orders.len(),
        audit.len(),
        removed(audit).len()
    )
}

/// The texts among `texts` that some entry of the chat's stream still
/// holds, after waiting up to 30 s for the nodes' erasers: a removed
/// message's text must leave the stream.
pub async fn still_in_the_stream(
    nats: Vec<async_nats::ServerAddr>,
    texts: &[String],
) -> Result<Vec<String>, String> {
    let client = async_nats::connect(nats)
        .await
        .map_err(|e| format!("no NATS connection: {e}"))?;
    let js = async_nats::jetstream::new(client);
    // How a text is written in an entry (JSON).
    let written: Vec<(String, &String)> = texts
        .iter()
        .map(|t| (serde_json::to_string(t).expect("json"), t))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = js
            .get_stream("chat")
            .await
            .map_err(|e| format!("the stream: {e}"))?;
        let state = stream
            .info()
            .await
            .map_err(|e| format!("the stream: {e}"))?
            .state
            .clone();
        let mut held = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let payload = String::from_utf8_lossy(&m.payload);
                held.extend(
                    written
                        .iter()
                        .filter(|(w, _)| payload.contains(w.as_str()))
                        .map(|(_, t)| (*t).clone()),
                );
            }
        }
        if held.is_empty() || Instant::now() > deadline {
            return Ok(held);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
