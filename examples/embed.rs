//! Embedding `chat-core` with no WebSocket at all: a chat on stdin/stdout
//! that persists, and resumes where it stopped.
//!
//! Each line you type is posted as a message; a line starting with `{` is
//! taken as a protocol frame, e.g.
//! `{"type":"add_reaction","data":{"message_id":"<id>","emoji":"👍"}}`.
//! Every frame a server would broadcast is printed as JSON, after the
//! event's position in the chat's log.
//!
//! What an embedder needs in order to persist and resume, both ways:
//!
//! - **A snapshot** ([`Chat::snapshot`], [`Chat::from_snapshot`]): the whole
//!   state as plain serde data, rate limits and the chat's clock included.
//!   With `--state FILE`, it is read at start and written at the end.
//! - **A store of events**, as `chat-server`'s SQLite store keeps them:
//!   each event's `position`, the message a post `evicted` (delete it), and
//!   [`Chat::restore`] to rebuild the chat from the messages and the head.
//!   At the end the example rebuilds a chat from its store and checks that
//!   it holds the same history at the same position as the live one.
//!
//! Run: `cargo run --example embed -- --state /tmp/chat.json`

use chat_core::{Chat, ChatSnapshot, Config, Context, Event, EventKind, Timestamp};
use chat_proto::{ClientFrame, DecodeError, Message, Position, SendMessage, ServerFrame, Uuid};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::SystemTime;

/// Turns a typed line into a command: JSON frames as they are, anything
/// else as the text of a new message.
fn parse(line: &str) -> Result<ClientFrame, DecodeError> {
    if line.starts_with('{') {
        ClientFrame::decode(line)
    } else {
        Ok(ClientFrame::SendMessage(SendMessage {
            text: line.to_owned(),
            author_name: Some("console".into()),
        }))
    }
}

/// What a durable store keeps of the events: the messages held, oldest
/// first, and the position of the latest event.
struct Store {
    messages: Vec<Message>,
    head: Position,
}

impl Store {
    /// The store of a chat as it starts.
    fn of(chat: &Chat) -> Store {
        Store {
            messages: chat.history().iter().cloned().collect(),
            head: chat.head(),
        }
    }

    /// Writes one event, as a store does before it is broadcast.
    fn write(&mut self, event: &Event) {
        match &event.kind {
            EventKind::MessagePosted { message, evicted } => {
                // The bounded history pushed its oldest message out.
                if let Some(gone) = evicted {
                    self.messages.retain(|m| m.id != gone.id);
                }
                self.messages.push(message.clone());
            }
            EventKind::ReactionUpdated(update) => {
                if let Some(held) = self.messages.iter_mut().find(|m| m.id == update.message_id) {
                    *held = update.message.clone();
                }
            }
            // A moderator removed it: erase it, do not just hide it.
            EventKind::MessageRemoved { message, .. } => {
                self.messages.retain(|m| m.id != message.id);
            }
            // Restrictions and the room's modes: a store that keeps them
            // saves `Chat::moderation()` and gives it back with
            // `Chat::restore_moderation` (this example does not moderate).
            EventKind::UserRestricted { .. }
            | EventKind::RestrictionLifted { .. }
            | EventKind::RoomUpdated { .. } => {}
        }
        self.head = event.position;
    }
}

/// `--state FILE`, if given.
fn state_file() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--state" {
            return args.next().map(PathBuf::from);
        }
    }
    None
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(
        state_file(),
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        std::io::stderr(),
    )
}

/// The chat on `input`, broadcasting to `out` and saying what it resumed
/// from and saved to on `status`; persisted to `state`, if given.
pub(crate) fn run(
    state: Option<PathBuf>,
    input: impl BufRead,
    mut out: impl Write,
    mut status: impl Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::default();
    // Resume from the snapshot an earlier run wrote, if there is one.
    let mut chat = match state.as_ref().filter(|path| path.exists()) {
        Some(path) => {
            let snapshot: ChatSnapshot = serde_json::from_slice(&std::fs::read(path)?)?;
            Chat::from_snapshot(config.clone(), snapshot)
        }
        None => Chat::new(config.clone()),
    };
    writeln!(
        status,
        "{} messages, at position {}",
        chat.history().len(),
        chat.head()
    )?;
    let mut store = Store::of(&chat);
    for line in input.lines() {
        let line = line?;
        // The shell supplies what the core never fetches itself: time and ids.
        let ctx = Context {
            user: "local".into(),
            now: Timestamp::from(SystemTime::now()),
            message_id: Uuid::now_v7(),
        };
        // A malformed frame and a refused command are both answered with an
        // `error` frame, to the sender only.
        let refusal = match parse(&line) {
            Err(malformed) => Some(ServerFrame::error(&malformed)),
            Ok(command) => chat
                .handle(ctx, command)
                .err()
                .map(|refused| ServerFrame::error(&refused)),
        };
        match refusal {
            Some(frame) => writeln!(out, "{}", frame.encode())?,
            None => {
                while let Some(event) = chat.poll_event() {
                    // Written first, then broadcast: nothing shown is lost.
                    store.write(&event);
                    writeln!(out, "{} {}", event.position, event.frame().encode())?;
                }
            }
        }
    }
    // What the store holds rebuilds the same chat (the rate limits start
    // empty; a snapshot keeps them too).
    let (rebuilt, dropped) = Chat::restore(config, store.messages, store.head);
    assert!(dropped.is_empty(), "the store held more than the history");
    assert_eq!(rebuilt.head(), chat.head());
    assert!(rebuilt.history().iter().eq(chat.history().iter()));
    if let Some(path) = state {
        std::fs::write(&path, serde_json::to_vec(&chat.snapshot())?)?;
        writeln!(status, "saved to {}", path.display())?;
    }
    Ok(())
}
