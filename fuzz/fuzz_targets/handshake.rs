//! The handshake checks on arbitrary requests: path, origin and
//! X-Forwarded-For parsing never panic, and a believed client address only
//! ever comes from the peer or from a forwarded header sent by a trusted
//! proxy; a browser's `Origin` passes only alone, and without a `Host`
//! header only when it is the listed origin.
#![no_main]

use arbitrary::Arbitrary;
use chat_server::handshake::{Origin, Policy, Request};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

#[derive(Debug, Arbitrary)]
struct Input {
    path: String,
    origins: Vec<Vec<u8>>,
    host: Option<Vec<u8>>,
    forwarded: Vec<Vec<u8>>,
    peer: [u8; 4],
    peer_v6: Option<[u8; 16]>,
}

fuzz_target!(|input: Input| {
    let policy = Policy {
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        allowed_origins: vec!["https://chat.example".parse().unwrap()],
    };
    let mut b = Request::builder().uri(input.path.as_str());
    for o in &input.origins {
        b = b.header("origin", o.as_slice());
    }
    if let Some(host) = &input.host {
        b = b.header("host", host.as_slice());
    }
    for f in &input.forwarded {
        b = b.header("x-forwarded-for", f.as_slice());
    }
    let Ok(request) = b.body(()) else { return };
    let peer = match input.peer_v6 {
        Some(v6) => IpAddr::from(v6),
        None => IpAddr::from(input.peer),
    };
    if let Ok(client) = policy.check(&request, peer) {
        let origins: Vec<_> = request.headers().get_all("origin").iter().collect();
        assert!(origins.len() <= 1, "two origins passed");
        if let (Some(origin), None) = (origins.first(), request.headers().get("host")) {
            let origin: Origin = origin.to_str().unwrap().parse().unwrap();
            assert_eq!(origin.to_string(), "https://chat.example");
        }
        let trusted = |ip: &IpAddr| policy.trusted_proxies.iter().any(|n| n.contains(ip));
        if client != peer {
            // Only a trusted peer's header may replace the peer.
            let canonical = match peer {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
                v4 => v4,
            };
            assert!(trusted(&canonical), "believed {client} from untrusted {peer}");
        }
    }
});
