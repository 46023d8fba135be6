//! `cargo run -p chat-server`: the chat server with its flags.
#![forbid(unsafe_code)]

use chat_server::{Config, Server, Stopped, shutdown};
use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is not set: this server's `info`, and only
/// warnings from the NATS client, whose own `info` lines repeat every
/// reconnection try (the node logs what an operator needs to know about
/// NATS itself, with the URL).
const DEFAULT_LOG: &str = "info,async_nats=warn";

fn main() -> ExitCode {
    // Colours only for a person at a terminal (https://no-color.org).
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG)),
        )
        .with_ansi(ansi)
        .init();
    let config = Config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.threads))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    // With a store the pseudonym key is kept there; only an in-memory
    // server forgets it. Raw addresses need no key.
    if config.identity_secret.is_none()
        && config.in_memory
        && config.identity == chat_server::IdentityMode::Pseudonym
    {
        tracing::warn!(
            "--in-memory without --identity-secret: user ids will change when the server restarts"
        );
    }
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(shutdown::on_signal(server.shutdown_handle()));
    match server.run().await {
        Stopped::Gracefully => ExitCode::SUCCESS,
        Stopped::StoreFailed => ExitCode::FAILURE,
    }
}
