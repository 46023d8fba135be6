//! A small terminal chat client.
//!
//! Prints the history and live messages with short ids and reactions, and
//! sends each line you type. Commands:
//! - `/react <id-prefix> <emoji>` toggles a reaction on a message;
//! - `/name <name>` sets the author name sent with your messages;
//! - `/quit` leaves.
//!
//! Run: `cargo run --example client -- ws://127.0.0.1:8080/ws`

use chat_proto::{AddReaction, ClientFrame, Message, SendMessage, ServerFrame, Uuid};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Parser)]
#[command(about = "A terminal client for the chat server")]
struct Args {
    /// The server's WebSocket URL.
    #[arg(default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Your display name.
    #[arg(long, default_value = "Anonymous")]
    name: String,
}

/// Ids are printed as their last 8 hex digits: the server's ids are UUIDv7,
/// whose leading digits are a timestamp and so alike for close messages.
fn short(id: &Uuid) -> String {
    let hex = id.simple().to_string();
    hex[hex.len() - 8..].to_owned()
}

fn show(m: &Message) -> String {
    let reactions: Vec<String> = m
        .reactions
        .iter()
        .map(|(emoji, users)| format!("{emoji}{}", users.len()))
        .collect();
    let reactions = if reactions.is_empty() {
        String::new()
    } else {
        format!("  [{}]", reactions.join(" "))
    };
    format!(
        "{} {}: {}{}",
        short(&m.id),
        m.author_name,
        m.text,
        reactions
    )
}

/// What a typed line asks for.
enum Input {
    Say(String),
    React { prefix: String, emoji: String },
    Name(String),
    Quit,
    Unknown(String),
}

fn parse(line: &str) -> Input {
    let mut words = line.splitn(3, ' ');
    match words.next() {
        Some("/react") => match (words.next(), words.next()) {
            (Some(prefix), Some(emoji)) => Input::React {
                prefix: prefix.into(),
                emoji: emoji.trim().into(),
            },
            _ => Input::Unknown("usage: /react <id-prefix> <emoji>".into()),
        },
        Some("/name") => Input::Name(line["/name".len()..].trim().to_owned()),
        Some("/quit") => Input::Quit,
        Some(cmd) if cmd.starts_with('/') => Input::Unknown(format!("unknown command {cmd}")),
        _ => Input::Say(line.to_owned()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (ws, _) = tokio_tungstenite::connect_async(&args.url).await?;
    let (mut tx, mut rx) = ws.split();
    let mut name = args.name;
    let mut seen: Vec<Uuid> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!(
        "connected to {} as {name}; /react <id> <emoji>, /name <name>, /quit",
        args.url
    );
    loop {
        tokio::select! {
            frame = rx.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => match ServerFrame::decode(&text) {
                    Ok(ServerFrame::Message(m)) => {
                        println!("{}", show(&m));
                        seen.push(m.id);
                    }
                    Ok(ServerFrame::ReactionUpdated(r)) => println!("~ {}", show(&r.message)),
                    Ok(ServerFrame::Error(e)) => println!("! {}", e.error),
                    // Only sent to clients that opt in with `?sync`/`?since=`.
                    Ok(ServerFrame::Sync(s)) => println!("- at position {} of epoch {}", s.position, s.epoch),
                    Ok(ServerFrame::Reset(r)) => println!("- reset ({:?}): the full history follows", r.reason),
                    // Moderation, also only for clients that opt in.
                    Ok(ServerFrame::MessageRemoved(r)) => {
                        seen.retain(|id| *id != r.message_id);
                        println!("x [{}] removed by a moderator", short(&r.message_id));
                    }
                    Ok(ServerFrame::UserRestricted(r)) => println!("- {} restricted until {:?}", r.user_id, r.until),
                    Ok(ServerFrame::RestrictionLifted(r)) => println!("- {} may post again", r.user_id),
                    Ok(ServerFrame::RoomUpdated(room)) => println!("- slow mode: {} s", room.slow_mode_seconds),
                    Err(e) => println!("! unreadable frame: {e}"),
                },
                Some(Ok(WsMessage::Close(frame))) => {
                    println!("closed by server: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let frame = match parse(&line) {
                    Input::Say(text) => ClientFrame::SendMessage(SendMessage { text, author_name: Some(name.clone()) }),
                    Input::React { prefix, emoji } => {
                        let matches: Vec<&Uuid> = seen.iter().filter(|id| short(id).starts_with(&prefix) || id.to_string().starts_with(&prefix)).collect();
                        match matches.as_slice() {
                            [id] => ClientFrame::AddReaction(AddReaction { message_id: **id, emoji }),
                            [] => { println!("! no message starts with {prefix}"); continue; }
                            _ => { println!("! {prefix} is ambiguous"); continue; }
                        }
                    }
                    Input::Name(new) => { name = new; println!("name set to {name}"); continue; }
                    Input::Quit => break,
                    Input::Unknown(why) => { println!("! {why}"); continue; }
                };
                tx.send(WsMessage::text(frame.encode())).await?;
            }
        }
    }
    tx.send(WsMessage::Close(None)).await?;
    Ok(())
}
