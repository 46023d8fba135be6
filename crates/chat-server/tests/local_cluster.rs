//! `deploy/local-cluster.sh`, the README's cluster quick start, run as a
//! newcomer would: one nats-server, three nodes and nginx with
//! `deploy/nginx.conf`. The page and the chat work through nginx; a node
//! killed with SIGKILL leaves the chat going; SIGTERM (as Ctrl-C) stops
//! every process it started.

mod binary;

use binary::free_port;
use binary::ws::{connect, frame_of, say, until_sync};
use chat_proto::ServerFrame;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An HTTP GET of `path` on a loopback port: the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_script_serves_one_chat_through_nginx_and_stops_whole() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local-cluster.sh");
    let http = free_port();
    let nodes = [free_port(), free_port(), free_port()];
    let nats = free_port();
    let mut child = Command::new("bash")
        .arg(script)
        .env("CHAT_SERVER", binary::program())
        .env("HTTP_PORT", http.to_string())
        .env("NODE_PORTS", nodes.map(|p| p.to_string()).join(" "))
        .env("NATS_PORT", nats.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run deploy/local-cluster.sh");
    // Stopped whatever happens below.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
        }
    }
    let _stop = Stop(child.id());

    // What it prints: the URL, and each node's pid.
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed.contains("Ctrl-C stops everything") {
        assert!(Instant::now() < deadline, "the script said: {printed}");
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).expect("read") > 0,
            "the script ended: {printed}"
        );
        printed.push_str(&line);
    }
    assert!(
        printed.contains(&format!("http://localhost:{http}/")),
        "{printed}"
    );
    let pid_of = |name: &str| -> u32 {
        printed
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}'s pid in: {printed}"))
    };

    // The page, through nginx.
    let (status, body) = get(http, "/");
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("<html"), "{body}");
    for port in nodes {
        binary::serving(port).await;
    }

    // A message said through nginx reaches a follower on each node.
    let mut followers = Vec::new();
    for port in nodes {
        let mut f = connect(port, 2, "/ws?sync").await;
        until_sync(&mut f).await;
        followers.push(f);
    }
    let mut sender = connect(http, 3, "/ws").await;
    say(&mut sender, "hello, cluster").await;
    for f in &mut followers {
        match frame_of(f).await {
            ServerFrame::Message(m) => assert_eq!(m.text, "hello, cluster"),
            other => panic!("{other:?}"),
        }
    }

    // node-1 killed: the chat goes on through nginx.
    let killed = Command::new("kill")
        .args(["-KILL", &pid_of("node-1").to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while listening(nodes[0]) {
        assert!(Instant::now() < deadline, "node-1 still listens");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        let mut again = connect(http, 4, "/ws?sync").await;
        let (history, _) = until_sync(&mut again).await;
        assert!(
            history.iter().any(|m| m.text == "hello, cluster"),
            "{history:?}"
        );
        say(&mut again, &format!("after node-1 died {i}")).await;
    }

    // SIGTERM (Ctrl-C sends SIGINT to the whole group; either ends it):
    // every process it started is gone.
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the script did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    for port in [http, nats].into_iter().chain(nodes) {
        assert!(!listening(port), "port {port} still listens");
    }
}
