//! Which `Host` the server answers to: the defence against DNS rebinding.
//!
//! A rebinding page is served from a name its attacker controls, which then
//! resolves to this server (on localhost or a LAN). To the browser the page
//! and the server are then one origin, so the same-origin check passes, and
//! the page could read the history and post as its visitor, who is
//! identified by address. What the attacker cannot change is the name in
//! the request's `Host` header: it is the attacker's own. So every request,
//! plain HTTP and WebSocket handshake alike, must name a host the server
//! knows: one listed with `--public-host`, `localhost` (and names under
//! `.localhost`, which browsers resolve to loopback themselves), or an IP
//! address literal (a page loaded from an address involves no DNS to
//! rebind).
//!
//! With no list, a server listening on a loopback address accepts just
//! those; one listening on any other address accepts every `Host` (it
//! cannot know the names users type) and says so loudly at start.

use crate::http::{Refusal, Request};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use tokio_tungstenite::tungstenite::http::uri::Authority;
use tokio_tungstenite::tungstenite::http::{Version, header};

/// An entry of `--public-host`: a host name users reach the server by, or
/// `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicHost {
    /// Any `Host` is accepted (`*`).
    Any,
    /// This name, compared without regard to case and port.
    Name(String),
}

impl FromStr for PublicHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(PublicHost::Any);
        }
        let bad = |why: &str| format!("{s:?} is not a host name like chat.example.com ({why})");
        if s.is_empty() || s.contains(['/', ':', '@', ' ']) {
            return Err(bad("a bare name: no scheme, port or path"));
        }
        let authority: Authority = s.parse().map_err(|_| bad("does not parse"))?;
        if authority.host() != s {
            return Err(bad("does not parse"));
        }
        Ok(PublicHost::Name(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for PublicHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicHost::Any => f.write_str("*"),
            PublicHost::Name(name) => f.write_str(name),
        }
    }
}

/// The `Host` check every request passes first.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    names: Vec<String>,
    /// Every `Host` passes: `--public-host '*'`, or no list on a
    /// non-loopback address.
    any: bool,
}

impl HostPolicy {
    /// The policy for a server listening on `listen` with `--public-host`
    /// entries `listed`.
    pub fn new(listen: SocketAddr, listed: &[PublicHost]) -> Self {
        let any =
            listed.contains(&PublicHost::Any) || (listed.is_empty() && !listen.ip().is_loopback());
        let names = listed
            .iter()
            .filter_map(|h| match h {
                PublicHost::Name(name) => Some(name.clone()),
                PublicHost::Any => None,
            })
            .collect();
        HostPolicy { names, any }
    }

    /// Whether every `Host` is accepted (the start-up log warns of it).
    pub fn accepts_any(&self) -> bool {
        self.any
    }

    /// Checks the request's `Host`: exactly one (HTTP/1.1 requires it, and
    /// two would make the origin check ambiguous), well formed, and known.
    pub fn check(&self, request: &Request) -> Result<(), Refusal> {
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(host), None) => host,
            (None, _) if request.version() == Version::HTTP_10 && self.any => return Ok(()),
            _ => return Err(Refusal::BadHost),
        };
        let authority = host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<Authority>().ok())
            .filter(|a| !a.as_str().contains('@'))
            .ok_or(Refusal::BadHost)?;
        let name = authority.host();
        let literal = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok();
        let name = name.to_ascii_lowercase();
        let loopback_name = name == "localhost" || name.ends_with(".localhost");
        if self.any || literal || loopback_name || self.names.contains(&name) {
            Ok(())
        } else {
            Err(Refusal::HostNotAllowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(hosts: &[&str]) -> Request {
        let mut b = Request::builder().uri("/");
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("request")
    }

    fn check(policy: &HostPolicy, hosts: &[&str]) -> Result<(), Refusal> {
        policy.check(&request(hosts))
    }

    #[test]
    fn on_loopback_only_loopback_names_and_literals_pass() {
        let p = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &[]);
        assert!(!p.accepts_any());
        for ok in [
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.1.2.3",
        ] {
            assert_eq!(check(&p, &[ok]), Ok(()), "{ok}");
        }
        for rebinding in [
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert_eq!(
                check(&p, &[rebinding]),
                Err(Refusal::HostNotAllowed),
                "{rebinding}"
            );
        }
    }

    #[test]
    fn listed_names_pass_in_any_case_and_on_any_port() {
        let listed = ["Chat.Example.com".parse().unwrap()];
        let p = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), &listed);
        assert!(!p.accepts_any(), "a list closes the default");
        assert_eq!(check(&p, &["chat.example.com:443"]), Ok(()));
        assert_eq!(check(&p, &["CHAT.EXAMPLE.COM"]), Ok(()));
        assert_eq!(check(&p, &["other.example"]), Err(Refusal::HostNotAllowed));
        assert_eq!(
            check(&p, &["192.168.1.5:8080"]),
            Ok(()),
            "an address literal"
        );
    }

    #[test]
    fn elsewhere_without_a_list_every_host_passes() {
        let p = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), &[]);
        assert!(p.accepts_any());
        assert_eq!(check(&p, &["anything.example"]), Ok(()));
        let star = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &[PublicHost::Any]);
        assert_eq!(check(&star, &["anything.example"]), Ok(()));
    }

    #[test]
    fn one_well_formed_host_is_required() {
        let p = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), &[]);
        assert_eq!(check(&p, &[]), Err(Refusal::BadHost), "HTTP/1.1 needs one");
        assert_eq!(
            check(&p, &["a.example", "b.example"]),
            Err(Refusal::BadHost)
        );
        assert_eq!(check(&p, &["user@a.example"]), Err(Refusal::BadHost));
        assert_eq!(check(&p, &["a b"]), Err(Refusal::BadHost));
        let old = Request::builder()
            .uri("/")
            .version(Version::HTTP_10)
            .body(())
            .expect("request");
        assert_eq!(
            p.check(&old),
            Ok(()),
            "HTTP/1.0 may omit it where any host passes"
        );
        let closed = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &[]);
        assert_eq!(closed.check(&old), Err(Refusal::BadHost));
    }

    #[test]
    fn public_hosts_parse_strictly() {
        assert_eq!("*".parse(), Ok(PublicHost::Any));
        assert_eq!(
            " Chat.Example ".parse(),
            Ok(PublicHost::Name("chat.example".into()))
        );
        for bad in [
            "",
            "https://chat.example",
            "chat.example:443",
            "chat.example/x",
            "a b",
        ] {
            assert!(bad.parse::<PublicHost>().is_err(), "{bad:?}");
        }
    }
}
