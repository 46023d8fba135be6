//! Turning SIGINT and SIGTERM into a graceful stop.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn on_signal(token: CancellationToken) {
    wait_for_signal().await;
    info!("signal received");
    token.cancel();
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
