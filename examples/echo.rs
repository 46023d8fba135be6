//! An echo server built from the chat server's own connection set-up: the
//! same handshake checks, `WebSocketConfig`, limits, timeouts and close
//! handling, with every data frame sent straight back. It exists for the
//! Autobahn|Testsuite (`tests/autobahn/run.sh` runs the same mode through
//! `chat-server --echo`).
//!
//! Run: `cargo run --example echo -- 127.0.0.1:9001`

use chat_server::{Config, Server, shutdown};

#[tokio::main]
async fn main() -> Result<(), chat_server::StartError> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let config = Config {
        listen: listen
            .parse()
            .map_err(|e| chat_server::StartError::Config(format!("{listen}: {e}")))?,
        echo: true,
        in_memory: true,
        ..Config::default()
    };
    let server = Server::bind(config).await?;
    println!("echoing on ws://{}/ws", server.local_addr());
    tokio::spawn(shutdown::on_signal(server.shutdown_handle()));
    server.run().await;
    Ok(())
}
