//! The listen backlog (`--listen-backlog`): connections the kernel
//! completes while the server is not accepting, as when a dead node's
//! clients all arrive at another at once. Past the backlog the kernel
//! drops a client's first packet, and the client waits a second to retry.

mod binary;

use binary::ServerProcess;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// Clients arriving together.
const CROWD: usize = 600;

/// How many of [`CROWD`] connections the kernel completes, within half a
/// second each, while the server with `backlog` is stopped (SIGSTOP), so
/// that only the kernel's queue can hold them.
fn completed_while_stopped(backlog: &str) -> usize {
    let dir = tempfile::tempdir().expect("dir");
    let server = ServerProcess::start(dir.path(), &["--listen-backlog", backlog]);
    let signal = |sig: &str| {
        let sent = Command::new("kill")
            .args([sig, &server.pid().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "{sig} sent");
    };
    signal("-STOP");
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let completed = runtime.block_on(async {
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..CROWD {
            tries.spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .ok()
                .and_then(Result::ok)
            });
        }
        let mut open = Vec::new();
        while let Some(done) = tries.join_next().await {
            open.extend(done.ok().flatten());
        }
        open.len()
    });
    signal("-CONT");
    completed
}

#[test]
fn a_crowd_arriving_at_once_waits_in_the_kernel_not_a_second_for_a_retry() {
    // The default (4,096) and the README's advice hold a crowd whole.
    assert_eq!(completed_while_stopped("4096"), CROWD);
    // And the flag is what does it: a small backlog leaves most of the
    // crowd to the kernel's retry (about backlog + 1 complete).
    let few = completed_while_stopped("100");
    assert!(
        few < CROWD / 2,
        "{few} of {CROWD} completed with a backlog of 100"
    );
}
