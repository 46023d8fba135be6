//! Ports for test servers, which may be restarted on the port they had.
//!
//! A port from the kernel's ephemeral range (what binding port 0 gives)
//! can be taken, while its server is down, as the source port of an
//! outgoing connection on the same machine: a node's NATS client
//! reconnecting, nginx reaching a node. The server then cannot listen
//! there again for as long as that connection lives (a chaos run once
//! saw a node fail to bind 300 times over two minutes). So these ports
//! come from below that range, which the kernel never hands out by itself.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port this picks from.
const LOWEST: u32 = 10_000;

/// A loopback port no one listens on now, below the ephemeral range.
pub fn free_port() -> u16 {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST);
    // Each test process starts at its own place, and goes on from there.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span.min(2_000) {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + start.wrapping_add(k) % span;
        if let Ok(port) = u16::try_from(port)
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
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
