//! Embedding `chat-core` with no WebSocket at all: a chat on stdin/stdout.
//!
//! Each line you type is posted as a message; a line starting with `{` is
//! taken as a protocol frame, e.g.
//! `{"type":"add_reaction","data":{"message_id":"<id>","emoji":"👍"}}`.
//! Every frame a server would broadcast is printed as JSON.
//!
//! Run: `cargo run --example embed`

use chat_core::{Chat, Config, Context, Timestamp};
use chat_proto::{ClientFrame, DecodeError, SendMessage, ServerFrame, Uuid};
use std::io::{BufRead, Write};
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
                    writeln!(out, "{}", event.into_frame().encode())?;
                }
            }
        }
    }
    Ok(())
}
