//! Memory under a reaction burst within the rules: 100 addresses each
//! toggle 20 emojis on one message, so every frame carries a message of
//! 30 to 40 KB, while 100 clients read everything. What the server holds
//! is bounded in bytes by its settings (SECURITY.md lists each bound), so
//! its peak resident memory stays within them, whatever the burst. (It
//! used to reach 340 MB: the commit queue held 4,096 whole messages.)

mod binary;

use binary::ServerProcess;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Twenty distinct emojis, the default `--max-emojis-per-message`.
const EMOJIS: [&str; 20] = [
    "👍", "❤️", "😂", "🎉", "😮", "😢", "🙏", "🔥", "👀", "💯", "🚀", "✅", "👏", "🤔", "😍", "🙌",
    "💡", "⭐", "🍕", "🌈",
];

/// `--log-bytes`: the recent events the log keeps.
const LOG_BYTES: u64 = 4 << 20;

/// `--commit-queue-bytes`.
const COMMIT_QUEUE_BYTES: u64 = 8 << 20;

/// `--send-queue-bytes`, the default.
const SEND_QUEUE_BYTES: u64 = 128 << 10;

/// Reactors, each a connection.
const REACTORS: u64 = 100;

/// What the process may hold past these bounds: the allocator's slack,
/// the tables of 100 connections, tungstenite's buffers.
const SLACK: u64 = 32 << 20;

/// How many times each reactor toggles each emoji (on, off, on, ...).
const ROUNDS: usize = 5;

/// A resident-memory figure of a process, in bytes (`VmRSS`, or the peak
/// `VmHWM`).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("the field");
    kb * 1024
}

/// A client frame, masked as a client must.
fn masked(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x5a, 0x11, 0xc3, 0x07];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A client from `127.0.0.<n>`, upgraded by hand, with a kernel receive
/// buffer of `recv_buffer` bytes if given: its socket, and the bytes that
/// came after the 101.
async fn connect(port: u16, n: u8, recv_buffer: Option<u32>) -> (tokio::net::TcpStream, Vec<u8>) {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("rcvbuf");
    }
    socket
        .bind(([127, 0, 0, n], 0).into())
        .expect("bind a loopback source");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("handshake");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(got.starts_with(b"HTTP/1.1 101"), "upgraded");
            return (stream, got[end + 4..].to_vec());
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed during the handshake");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// The binary in memory, with the bounds above and `args` besides.
fn bounded_server(dir: &std::path::Path, args: &[&str]) -> ServerProcess {
    let log_bytes = LOG_BYTES.to_string();
    let commit_queue_bytes = COMMIT_QUEUE_BYTES.to_string();
    let bounds = [
        "--in-memory",
        "--log-bytes",
        &log_bytes,
        "--commit-queue-bytes",
        &commit_queue_bytes,
    ];
    let all: Vec<&str> = bounds.iter().chain(args).copied().collect();
    ServerProcess::start(dir, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_burst_stays_within_the_memory_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = bounded_server(
        dir.path(),
        &[
            "--identity-secret",
            "a secret for the memory test",
            "--reaction-rate",
            "1000",
        ],
    );
    let pid = server.pid();
    let port = server.port;
    // The message, from 127.0.0.1.
    let (mut author, mut seen) = connect(port, 1, None).await;
    author
        .write_all(&masked(
            r#"{"type":"send_message","data":{"text":"the popular one"}}"#,
        ))
        .await
        .expect("post");
    let id = loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(at) = text.find(r#""id":""#) {
            break text[at + 6..at + 42].to_owned();
        }
        let mut chunk = [0u8; 4096];
        let n = author.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed");
        seen.extend_from_slice(&chunk[..n]);
    };
    drop(author);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = memory(pid, "VmRSS:");

    // 100 reactors, each reading everything it is sent (and counting it),
    // toggling 20 emojis five times over as fast as it can.
    let mut clients = Vec::new();
    for n in 2..=(1 + REACTORS as u8) {
        let (stream, _) = connect(port, n, None).await;
        let (mut reader, mut writer) = stream.into_split();
        let toggles: Vec<u8> = std::iter::repeat_n(EMOJIS, ROUNDS)
            .flatten()
            .flat_map(|emoji| {
                masked(&format!(
                    r#"{{"type":"add_reaction","data":{{"message_id":"{id}","emoji":"{emoji}"}}}}"#
                ))
            })
            .collect();
        clients.push(tokio::spawn(async move {
            writer.write_all(&toggles).await.expect("toggles");
            let mut total = 0usize;
            let mut chunk = vec![0u8; 64 * 1024];
            let quiet = Duration::from_secs(3);
            while let Ok(Ok(n)) = tokio::time::timeout(quiet, reader.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            drop(writer);
            total
        }));
    }
    let started = Instant::now();
    let mut delivered = 0;
    for client in clients {
        delivered += client.await.expect("client");
    }
    let peak = memory(pid, "VmHWM:");
    let after = memory(pid, "VmRSS:");
    eprintln!(
        "reaction burst: {:.1} GB delivered in {:.1?}; resident {:.1} MB before, peak {:.1} MB, {:.1} MB after",
        delivered as f64 / 1e9,
        started.elapsed(),
        before as f64 / 1e6,
        peak as f64 / 1e6,
        after as f64 / 1e6
    );
    assert!(
        delivered > 500_000_000,
        "the burst happened: {delivered} bytes"
    );
    // A queued event holds its message as data, about three times its
    // frame's bytes (SECURITY.md): the commit queue counts frame bytes.
    let bound = LOG_BYTES + 3 * COMMIT_QUEUE_BYTES + REACTORS * SEND_QUEUE_BYTES + SLACK;
    assert!(
        peak - before <= bound,
        "resident memory grew by {:.1} MB, past the bounds' {:.1} MB",
        (peak - before) as f64 / 1e6,
        bound as f64 / 1e6
    );
}

/// Clients that join and read their replay slowly hold no copy of the
/// history: they read it as it is, a batch at a time, so while a flood of
/// new messages evicts the whole history five times over, what was
/// evicted is freed. (Each joiner used to pin the history it joined with
/// for its whole replay: joining one after another during the flood,
/// each pinned another generation of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_joiners_pin_no_history() {
    const HISTORY: usize = 2000;
    const JOINERS: u8 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let history = HISTORY.to_string();
    let server = bounded_server(
        dir.path(),
        &[
            "--identity",
            "raw-ip",
            "--message-rate",
            "1000000",
            "--history-limit",
            &history,
        ],
    );
    let pid = server.pid();
    let port = server.port;
    // Messages of about 2 KB: 500 four-byte characters.
    let post = masked(&format!(
        r#"{{"type":"send_message","data":{{"text":"{}"}}}}"#,
        "😀".repeat(500)
    ));
    let (poster, _) = connect(port, 1, None).await;
    let (mut poster_reads, mut poster) = poster.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n) = poster_reads.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    for _ in 0..HISTORY {
        poster.write_all(&post).await.expect("post");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memory(pid, "VmRSS:");
    // The flood, steady: the whole history evicted about once a second,
    // five times over.
    let flood = tokio::spawn(async move {
        for _ in 0..5 * HISTORY / 100 {
            for _ in 0..100 {
                poster.write_all(&post).await.expect("post");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Meanwhile joiners, one every 100 ms, with small receive buffers,
    // reading 2 KB every 10 ms: each replay would take ten seconds.
    let mut joiners = Vec::new();
    for n in 0..JOINERS {
        let (mut stream, _) = connect(port, 10 + n, Some(4096)).await;
        joiners.push(tokio::spawn(async move {
            let mut chunk = [0u8; 2048];
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flood.await.expect("flood");
    for joiner in joiners {
        joiner.await.expect("joiner");
    }
    let peak = memory(pid, "VmHWM:");
    eprintln!(
        "slow joiners: resident {:.1} MB with the history, peak {:.1} MB",
        before as f64 / 1e6,
        peak as f64 / 1e6
    );
    // One history is about 4 MB. Held: the log's recent events, what is
    // queued for each joiner, and a few MB of the allocator's own.
    let bound = LOG_BYTES + u64::from(JOINERS) * SEND_QUEUE_BYTES + (8 << 20);
    assert!(
        peak - before <= bound,
        "resident memory grew by {:.1} MB, past the bounds' {:.1} MB",
        (peak - before) as f64 / 1e6,
        bound as f64 / 1e6
    );
}
