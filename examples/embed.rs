//! Embedding `chat-core` with no WebSocket at all: a chat on stdin/stdout.
//!
//! Each line you type is posted as a message; a line starting with `{` is
//! taken as a protocol frame, e.g.
//! `{"type":"add_reaction","data":{"message_id":"<id>","emoji":"👍"}}`.
//! Every frame a server would broadcast is printed as JSON.
//!
//! Run: `cargo run --example embed`

use chat_core::{Chat, ChatError, Config, Context, Timestamp};
use chat_proto::{ClientFrame, SendMessage, ServerFrame, Uuid};
use std::io::{BufRead, Write};
use std::time::SystemTime;

/// Turns a typed line into a command: JSON frames as they are, anything
/// else as the text of a new message.
fn parse(line: &str) -> Result<ClientFrame, ChatError> {
    if line.starts_with('{') {
        Ok(ClientFrame::decode(line)?)
    } else {
        Ok(ClientFrame::SendMessage(SendMessage {
            text: line.to_owned(),
            author_name: Some("console".into()),
        }))
    }
}

fn main() -> std::io::Result<()> {
    let mut chat = Chat::new(Config::default());
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        // The shell supplies what the core never fetches itself: time and ids.
        let now = Timestamp::from(SystemTime::now());
        let ctx = Context {
            user: "local".into(),
            now,
            message_id: Uuid::now_v7(),
        };
        match parse(&line).and_then(|command| chat.handle(ctx, command)) {
            Ok(()) => {
                while let Some(event) = chat.poll_event() {
                    writeln!(out, "{}", event.into_frame().encode())?;
                }
            }
            Err(refusal) => writeln!(out, "{}", ServerFrame::error(&refusal).encode())?,
        }
    }
    Ok(())
}
