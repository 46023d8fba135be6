//! Ports for test servers, which may be restarted on the port they had.
//!
//! A port from the kernel's ephemeral range (what binding port 0 gives)
//! can be taken, while its server is down, as the source port of an
//! outgoing connection on the same machine: a node's NATS client
//! reconnecting, nginx reaching a node. The server then cannot listen
//! there again for as long as that connection lives (a chaos run once
//! saw a node fail to bind 300 times over two minutes). So these ports
//! come from below that range, which the kernel never hands out by itself.
//!
//! A test that uses both support modules that load this file has two
//! copies of it, each with its own counter. So each loader names its part
//! of the range (`super::PORTS_PART`, of [`PARTS`]): with one counter,
//! the two would hand out the same ports in the same order, and a NATS
//! server killed by a fault could find its port taken by a new node when
//! it restarts.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port this picks from.
const LOWEST: u32 = 10_000;

/// How many parts the range is cut into, one for each module that loads
/// this file (`tests/support/nats.rs` and the chat-server tests' `binary`).
pub const PARTS: u32 = 2;
const _: () = assert!(
    super::PORTS_PART < PARTS,
    "a part of the range that is not there"
);

/// A loopback port no one listens on now, below the ephemeral range.
pub fn free_port() -> u16 {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST) / PARTS;
    let base = LOWEST + span * super::PORTS_PART;
    // Each test process starts at its own place, and goes on from there.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span.min(2_000) {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = base + start.wrapping_add(k) % span;
        if let Ok(port) = u16::try_from(port)
            && nobody_listens(port)
        {
            return port;
        }
    }
    // No room below the range (an unusual ip_local_port_range): any port.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether a server may listen on loopback `port` now: a socket binds
/// there as the server's does (`SO_REUSEADDR`, which only a listening
/// socket refuses), and is never put to listening. A listener would be
/// a trap: a child that another test thread forks at that moment holds a
/// copy of it until it execs. Meanwhile the server cannot bind the port,
/// and a client's connection lands in the copy and is reset when it
/// closes (a likely cause of a reset that CI saw once at a test server's
/// first connection, not reproduced here).
fn nobody_listens(port: u16) -> bool {
    use socket2::{Domain, Socket, Type};
    let Ok(socket) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
        return false;
    };
    socket.set_reuse_address(true).is_ok()
        && socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .is_ok()
}
