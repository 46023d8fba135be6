//! Turning SIGINT and SIGTERM into a graceful stop, and a second one into
//! an immediate exit.

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Exit status after a second signal: 128 + SIGINT, as shells report an
/// interrupted program.
const SECOND_SIGNAL_EXIT: i32 = 130;

/// Cancels `token` on the first SIGINT (Ctrl-C) or SIGTERM; on a second
/// one, exits the process at once. What the store had committed is on disk
/// (SQLite's journal keeps it whole); anything not yet committed was never
/// shown to anyone.
pub async fn on_signal(token: CancellationToken) {
    wait_for_signal().await;
    info!("signal received: stopping gracefully (a second signal exits at once)");
    token.cancel();
    wait_for_signal().await;
    error!(
        "second signal: exiting now; everything shown to clients is on disk, anything not yet written was never shown"
    );
    std::process::exit(SECOND_SIGNAL_EXIT);
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
