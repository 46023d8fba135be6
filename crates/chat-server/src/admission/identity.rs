//! Who a client is: from its address to a user id.
//!
//! The protocol identifies users by IP address. Three things make that
//! usable in practice:
//!
//! - **One user per address.** An IPv6 host usually owns a whole /64, so
//!   keying on the full address would let one machine be 2^64 users (and
//!   dodge the rate limit); the key is the /64. An IPv4-mapped IPv6
//!   address (`::ffff:a.b.c.d`) is the IPv4 address it maps.
//! - **No address leak.** Every message carries its author's id to every
//!   client. By default the id is a keyed hash of the address, stable for
//!   as long as the secret is, and useless for finding the person.
//! - **Proxies.** Behind a reverse proxy every TCP peer is the proxy.
//!   `X-Forwarded-For` is believed only when the peer is a configured
//!   trusted proxy, and then the right-most address not itself a trusted
//!   proxy is the client: everything left of it was written by the client
//!   and can be forged.

use chat_proto::UserId;
use clap::ValueEnum;
use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How user ids are derived from client addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentityMode {
    /// A keyed hash of the address: stable, but reveals nothing.
    Pseudonym,
    /// The address itself (an IPv6 client's /64).
    RawIp,
}

/// The part of an address that identifies one user: an IPv4 address or an
/// IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddrKey {
    /// An IPv4 client (including IPv4-mapped IPv6).
    V4(Ipv4Addr),
    /// An IPv6 client's /64 prefix.
    V6Prefix(u64),
}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(v4),
                None => AddrKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for AddrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrKey::V4(v4) => write!(f, "{v4}"),
            AddrKey::V6Prefix(p) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*p) << 64)),
        }
    }
}

impl AddrKey {
    fn to_bytes(self) -> [u8; 9] {
        let mut out = [0u8; 9];
        match self {
            AddrKey::V4(v4) => {
                out[0] = 4;
                out[1..5].copy_from_slice(&v4.octets());
            }
            AddrKey::V6Prefix(p) => {
                out[0] = 6;
                out[1..9].copy_from_slice(&p.to_be_bytes());
            }
        }
        out
    }
}

/// Bytes of hash in a pseudonym. 64 bits: collisions need ~4 billion
/// distinct addresses.
const PSEUDONYM_BYTES: usize = 8;

/// Turns client addresses into user ids.
#[derive(Clone)]
pub struct Identity {
    mode: IdentityMode,
    key: [u8; 32],
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Identity {
    /// Ids keyed by `secret`; the same secret gives the same ids.
    pub fn new(mode: IdentityMode, secret: &str) -> Self {
        Identity {
            mode,
            key: blake3::derive_key(
                "chat-server 2026 user id from client address",
                secret.as_bytes(),
            ),
        }
    }

    /// Ids keyed by `key` (e.g. one kept in the store across restarts).
    pub fn from_key(mode: IdentityMode, key: [u8; 32]) -> Self {
        Identity { mode, key }
    }

    /// A fingerprint of how this identity names users, the same on every
    /// node that names them alike: `raw-ip`, or a one-way hash of the key
    /// (which reveals neither the key nor the secret it came from). A
    /// cluster's stream records it, so that a node with another secret
    /// refuses to start instead of making one address two users.
    pub fn fingerprint(&self) -> String {
        match self.mode {
            IdentityMode::RawIp => "raw-ip".to_owned(),
            IdentityMode::Pseudonym => {
                let hash = blake3::derive_key("chat-server 2026 identity fingerprint", &self.key);
                format!("pseudonym-{}", &blake3::Hash::from(hash).to_hex()[..16])
            }
        }
    }

    /// A fresh random key.
    pub fn random_key() -> Result<[u8; 32], getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(key)
    }

    /// The longest user id `mode` produces, in bytes: it bounds the size of
    /// every frame that lists reactors.
    pub fn max_user_id_len(mode: IdentityMode) -> usize {
        match mode {
            IdentityMode::Pseudonym => PSEUDONYM_BYTES * 2,
            IdentityMode::RawIp => [
                AddrKey::V4(Ipv4Addr::BROADCAST),
                AddrKey::V6Prefix(u64::MAX),
            ]
            .iter()
            .map(|a| a.to_string().len())
            .max()
            .unwrap_or_default(),
        }
    }

    /// The user id of a client at `ip`.
    pub fn user_id(&self, ip: IpAddr) -> UserId {
        let addr = AddrKey::from(ip);
        match self.mode {
            IdentityMode::RawIp => UserId::from(addr.to_string()),
            IdentityMode::Pseudonym => {
                let hash = blake3::keyed_hash(&self.key, &addr.to_bytes());
                let hex: String = hash.as_bytes()[..PSEUDONYM_BYTES]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                UserId::from(hex)
            }
        }
    }
}

/// The client's address: the TCP peer, or, when the peer is a trusted
/// proxy, the right-most untrusted `X-Forwarded-For` entry.
///
/// `forwarded_for` holds every `X-Forwarded-For` header value in order.
/// Returns `None` when a trusted proxy sent an entry that is not an address,
/// so the request can be refused rather than guessed at.
pub(crate) fn client_addr<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| is_trusted(*ip, trusted);
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut client = peer;
    let entries = forwarded_for
        .rev()
        .flat_map(|value| value.rsplit(','))
        .map(str::trim);
    for entry in entries {
        let ip = parse_forwarded(entry)?;
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// Whether `ip` is in one of the `trusted` proxy networks.
pub(crate) fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&canonical(ip)))
}

/// IPv4-mapped IPv6 compares as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`
/// or `[2001:db8::1]:5678`.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn ipv6_is_keyed_by_its_slash_64_and_mapped_v4_is_v4() {
        let id = Identity::new(IdentityMode::Pseudonym, "s");
        assert_eq!(
            id.user_id(ip("2001:db8:1:2::1")),
            id.user_id(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            id.user_id(ip("2001:db8:1:2::1")),
            id.user_id(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            id.user_id(ip("::ffff:10.1.2.3")),
            id.user_id(ip("10.1.2.3"))
        );
        assert_ne!(id.user_id(ip("10.1.2.3")), id.user_id(ip("10.1.2.4")));
    }

    #[test]
    fn pseudonyms_depend_on_the_secret_and_hide_the_address() {
        let a = Identity::new(IdentityMode::Pseudonym, "one");
        let b = Identity::new(IdentityMode::Pseudonym, "two");
        let addr = ip("192.0.2.7");
        assert_eq!(
            a.user_id(addr),
            Identity::new(IdentityMode::Pseudonym, "one").user_id(addr)
        );
        assert_ne!(a.user_id(addr), b.user_id(addr));
        let id = a.user_id(addr).to_string();
        assert_eq!(id.len(), 16);
        assert!(!id.contains("192"));
    }

    #[test]
    fn raw_ids_are_readable() {
        let id = Identity::new(IdentityMode::RawIp, "x");
        assert_eq!(id.user_id(ip("192.0.2.7")).as_str(), "192.0.2.7");
        assert_eq!(id.user_id(ip("::ffff:192.0.2.7")).as_str(), "192.0.2.7");
        assert_eq!(
            id.user_id(ip("2001:db8:1:2::5")).as_str(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let got = client_addr(ip("203.0.113.9"), ["1.1.1.1"].into_iter(), &[]);
        assert_eq!(got, Some(ip("203.0.113.9")));
        let got = client_addr(
            ip("203.0.113.9"),
            ["1.1.1.1"].into_iter(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(got, Some(ip("203.0.113.9")));
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged "6.6.6.6"; the proxy appended the real peer.
        let got = client_addr(
            ip("10.0.0.1"),
            ["6.6.6.6, 198.51.100.4"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Some(ip("198.51.100.4")));
        // Two proxies: skip the inner trusted hop.
        let got = client_addr(
            ip("10.0.0.1"),
            ["6.6.6.6, 198.51.100.4", "10.0.0.2"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Some(ip("198.51.100.4")));
        // Ports and brackets.
        let got = client_addr(ip("10.0.0.1"), ["[2001:db8::1]:443"].into_iter(), &trusted);
        assert_eq!(got, Some(ip("2001:db8::1")));
        let got = client_addr(ip("10.0.0.1"), ["198.51.100.4:5000"].into_iter(), &trusted);
        assert_eq!(got, Some(ip("198.51.100.4")));
        // No header: the proxy itself.
        let got = client_addr(ip("10.0.0.1"), std::iter::empty(), &trusted);
        assert_eq!(got, Some(ip("10.0.0.1")));
        // Mapped peer address matches an IPv4 network.
        let got = client_addr(
            ip("::ffff:10.0.0.1"),
            ["198.51.100.4"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Some(ip("198.51.100.4")));
        // Garbage from a trusted proxy is refused, not guessed at.
        let got = client_addr(ip("10.0.0.1"), ["1.2.3.4, nonsense"].into_iter(), &trusted);
        assert_eq!(got, None);
        // Every entry trusted: the left-most is the best we know.
        let got = client_addr(ip("10.0.0.1"), ["10.0.0.7, 10.0.0.3"].into_iter(), &trusted);
        assert_eq!(got, Some(ip("10.0.0.7")));
    }
}
