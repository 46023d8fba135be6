//! The handshake checks on arbitrary requests: path, origin, host,
//! upgrade and X-Forwarded-For parsing never panic, and a believed client
//! address only ever comes from the peer or from a forwarded header sent by
//! a trusted proxy; a browser's `Origin` passes only alone, and without a
//! `Host` header only when it is the listed origin; a `Host` passes the
//! loopback policy only when it is one header naming localhost, an address
//! literal or the listed name; an upgrade passes only as a GET over
//! HTTP/1.1 with a 24-character key and version 13.
#![no_main]

use arbitrary::Arbitrary;
use chat_server::checks::{Origin, Policy};
use chat_server::checks::{Request, check_upgrade};
use chat_server::checks::HostPolicy;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

#[derive(Debug, Arbitrary)]
struct Input {
    path: String,
    method: bool,
    http10: bool,
    upgrade: Vec<Vec<u8>>,
    connection: Vec<Vec<u8>>,
    keys: Vec<Vec<u8>>,
    versions: Vec<Vec<u8>>,
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
    let mut b = Request::builder()
        .uri(input.path.as_str())
        .method(if input.method { "GET" } else { "POST" })
        .version(if input.http10 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        });
    for (name, values) in [
        ("upgrade", &input.upgrade),
        ("connection", &input.connection),
        ("sec-websocket-key", &input.keys),
        ("sec-websocket-version", &input.versions),
    ] {
        for v in values {
            b = b.header(name, v.as_slice());
        }
    }
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
    if let Ok(key) = check_upgrade(&request) {
        assert_eq!(request.method(), "GET");
        assert_eq!(request.version(), http::Version::HTTP_11);
        assert_eq!(request.headers().get_all("sec-websocket-key").iter().count(), 1);
        assert_eq!(key.accept().len(), 28, "a SHA-1 in base64");
    }
    let loopback = HostPolicy::new(
        "127.0.0.1:8080".parse().unwrap(),
        &["chat.example".parse().unwrap()],
    );
    if loopback.check(&request).is_ok() {
        let hosts: Vec<_> = request.headers().get_all("host").iter().collect();
        assert_eq!(hosts.len(), 1, "one Host");
        let host = hosts[0].to_str().unwrap().to_ascii_lowercase();
        let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        assert!(
            name == "localhost"
                || name.ends_with(".localhost")
                || name == "chat.example"
                || name.parse::<IpAddr>().is_ok()
                || host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok(),
            "{host} passed on loopback"
        );
    }
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
