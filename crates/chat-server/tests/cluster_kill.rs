//! A cluster node killed with SIGKILL behind a real nginx: the real binary,
//! a real `nats-server`, a real nginx.
//!
//! Two nodes serve one chat. A client on node a follows it with `?sync`;
//! node a is killed mid-chat, so the client's socket just dies (no close
//! frame). The chat goes on through node b. The client comes back through
//! nginx, which can only send it to node b, resumes with `?since=&epoch=`,
//! and must then have seen every confirmed message exactly once, in order.
//! Node a is restarted with its data directory and must compute the same
//! chat as node b from its own snapshot and the stream.

#[allow(dead_code, unreachable_pub)]
#[path = "../../../tests/support/nats.rs"]
mod nats;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../tests/support/nginx.rs"]
mod nginx;

mod binary;

use binary::ws::{connect, frame, frame_of, say, until_sync};
use binary::{ServerProcess, serving};
use chat_proto::ServerFrame;
use std::net::SocketAddr;
use std::path::Path;

/// A node of the cluster on `nats`, its data in `dir`, trusting nginx's
/// `X-Forwarded-For`.
fn node(nats: &nats::NatsServer, name: &str, dir: &Path, port: u16) -> ServerProcess {
    ServerProcess::start_on(
        dir,
        port,
        &[
            "--cluster",
            &nats.url(),
            "--node-id",
            name,
            "--identity",
            "raw-ip",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--cluster-snapshot-every",
            "5",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_behind_nginx_its_client_resumes_on_another_and_it_comes_back_the_same() {
    let nats = nats::NatsServer::start();
    let dir_a = tempfile::tempdir().expect("dir");
    let dir_b = tempfile::tempdir().expect("dir");
    let (port_a, port_b) = (binary::free_port(), binary::free_port());
    let mut a = node(&nats, "a", dir_a.path(), port_a);
    let b = node(&nats, "b", dir_b.path(), port_b);
    serving(port_a).await;
    serving(port_b).await;
    let nginx = nginx::Nginx::start(
        binary::free_port(),
        &[
            SocketAddr::from(([127, 0, 0, 1], port_a)),
            SocketAddr::from(([127, 0, 0, 1], port_b)),
        ],
    );

    // A follower on node a, a sender on node b.
    let mut follower = connect(port_a, 2, "/ws?sync").await;
    let (history, start) = until_sync(&mut follower).await;
    assert!(history.is_empty());
    assert_eq!(start.position.0, 0);
    let mut sender = connect(port_b, 3, "/ws").await;
    let mut confirmed = Vec::new();
    for i in 0..12 {
        let text = format!("before the kill {i}");
        say(&mut sender, &text).await;
        confirmed.push(text);
    }
    // The follower reads some of it, then node a dies under it.
    let mut seen: Vec<String> = Vec::new();
    let mut last = loop {
        match frame_of(&mut follower).await {
            ServerFrame::Message(m) => seen.push(m.text),
            ServerFrame::Sync(s) if seen.len() >= 6 => break s,
            ServerFrame::Sync(_) => {}
            other => panic!("{other:?}"),
        }
    };
    a.kill().expect("SIGKILL node a");
    a.wait().expect("node a is gone");
    assert!(
        dir_a.path().join("cluster-chat.snapshot.json").exists(),
        "node a wrote its own snapshot while it ran"
    );
    // Its socket just ends: no close frame from a dead process.
    loop {
        match frame(&mut follower).await {
            None => break,
            Some(ServerFrame::Message(m)) => seen.push(m.text),
            Some(ServerFrame::Sync(s)) => last = s,
            Some(other) => panic!("{other:?}"),
        }
    }
    // Only what a sync covers counts as received; the rest comes again.
    seen.truncate(usize::try_from(last.position.0).expect("small"));

    // The chat goes on through node b while a is gone.
    for i in 0..5 {
        let text = format!("while a is dead {i}");
        say(&mut sender, &text).await;
        confirmed.push(text);
    }

    // Back through nginx, which can only reach node b now: exactly what
    // was missed, once, in order.
    let path = format!("/ws?since={}&epoch={}", last.position, last.epoch);
    let mut back = connect(nginx.port, 2, &path).await;
    while seen.len() < confirmed.len() {
        let (missed, sync) = until_sync(&mut back).await;
        seen.extend(missed.into_iter().map(|m| m.text));
        last = sync;
    }
    assert_eq!(seen, confirmed);
    assert_eq!(
        last.position.0,
        u64::try_from(confirmed.len()).expect("small")
    );

    // Node a comes back with its data directory and computes the same
    // chat: the same history, epoch and position as node b.
    let a = node(&nats, "a", dir_a.path(), port_a);
    serving(port_a).await;
    let (on_a, at_a) = until_sync(&mut connect(port_a, 9, "/ws?sync").await).await;
    let (on_b, at_b) = until_sync(&mut connect(port_b, 9, "/ws?sync").await).await;
    assert_eq!(at_a, at_b);
    assert_eq!(at_a, last);
    assert_eq!(format!("{on_a:?}"), format!("{on_b:?}"));
    drop((a, b, nginx));
}
