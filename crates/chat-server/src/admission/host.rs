//! Which `Host` the server answers to: the defence against DNS rebinding.
//!
//! A rebinding page is served from a name its attacker controls, which then
//! resolves to this server (on localhost or a LAN). To the browser the page
//! and the server are then one origin, so the same-origin check passes, and
//! the page could read the history and post as its visitor, who is
//! identified by address. What the attacker cannot change is the name in
//! the request's `Host` header: it is the attacker's own. So every request,
//! plain HTTP and WebSocket handshake alike, must name a host the server
//! knows: one listed with `--public-host`, `localhost`, or an IP address
//! literal (a page loaded from an address involves no DNS to rebind).
//! Names under `.localhost` are not taken for loopback: some browsers ask
//! DNS for them, and DNS is what a rebinding attacker answers.
//!
//! The host a request names is its target's authority when the target is
//! in absolute form (`GET http://host/ws`: RFC 9112, 3.2.2, the `Host`
//! header is then ignored), else its one `Host` header. Either is parsed
//! strictly (RFC 9110, 7.2; RFC 3986, 3.2.2): a name, an IPv4 address or
//! a bracketed IPv6 address, and an optional port of one to five digits up
//! to 65535; anything else is 400. A name's one trailing dot (the
//! fully-qualified form, `localhost.`) is dropped.
//!
//! With no list, a server listening on a loopback address accepts just
//! those; one listening on any other address accepts every `Host` (it
//! cannot know the names users type) and says so loudly at start.

use crate::http::{Refusal, Request};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use tokio_tungstenite::tungstenite::http::uri::Authority;
use tokio_tungstenite::tungstenite::http::{Version, header};

/// The host a request names, parsed (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostName {
    /// The name in lower case without its trailing dot, or the address
    /// (an IPv6 one in brackets).
    pub name: String,
    /// The port, if one is given.
    pub port: Option<u16>,
    /// Whether it is an IP address literal.
    pub literal: bool,
}

impl FromStr for HostName {
    type Err = Refusal;

    fn from_str(s: &str) -> Result<Self, Refusal> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (address, after) = rest.split_once(']').ok_or(Refusal::BadHost)?;
                address.parse::<Ipv6Addr>().map_err(|_| Refusal::BadHost)?;
                let port = match after {
                    "" => None,
                    after => Some(after.strip_prefix(':').ok_or(Refusal::BadHost)?),
                };
                (&s[..address.len() + 2], port)
            }
            None => match s.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            },
        };
        let port = match port {
            None => None,
            Some(digits)
                if (1..=5).contains(&digits.len())
                    && digits.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Some(digits.parse::<u16>().map_err(|_| Refusal::BadHost)?)
            }
            Some(_) => return Err(Refusal::BadHost),
        };
        if host.starts_with('[') {
            return Ok(HostName {
                name: host.to_ascii_lowercase(),
                port,
                literal: true,
            });
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        let label = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.len() > 253 || !name.split('.').all(label) {
            return Err(Refusal::BadHost);
        }
        Ok(HostName {
            literal: name.parse::<Ipv4Addr>().is_ok(),
            name: name.to_ascii_lowercase(),
            port,
        })
    }
}

/// The host `request` names: its target's authority in absolute form,
/// else its one `Host` header (`None`: an HTTP/1.0 request without one).
pub(crate) fn requested(request: &Request) -> Result<Option<HostName>, Refusal> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host,
        (None, _) if request.version() == Version::HTTP_10 => return Ok(None),
        _ => return Err(Refusal::BadHost),
    };
    let named = match request.uri().authority() {
        // RFC 9112, 3.2.2: the absolute form's authority wins.
        Some(authority) => authority.as_str(),
        None => host.to_str().map_err(|_| Refusal::BadHost)?,
    };
    named.parse().map(Some)
}

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

    /// Checks the host the request names (`requested`): exactly one
    /// `Host` (HTTP/1.1 requires it, and two would make the origin check
    /// ambiguous), well formed, and known.
    pub fn check(&self, request: &Request) -> Result<(), Refusal> {
        let Some(host) = requested(request)? else {
            return if self.any {
                Ok(())
            } else {
                Err(Refusal::BadHost)
            };
        };
        if self.any || host.literal || host.name == "localhost" || self.names.contains(&host.name) {
            Ok(())
        } else {
            log_refused(&host.name);
            Err(Refusal::HostNotAllowed(host.name))
        }
    }
}

/// When a refused `Host` was last logged, in seconds since the Unix epoch.
static LAST_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs a refused `Host`, at most one line every ten seconds (a flood of
/// them stays a few lines; `handshakes_refused_total{reason="host_not_allowed"}`
/// counts them all): the operator of a proxy that does not pass the `Host`
/// on sees which name arrived.
fn log_refused(host: &str) {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST_LOGGED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            %host,
            "refused a request for a Host this server does not answer to: give the public name with \
             --public-host, and behind a proxy have it pass the Host on (nginx: proxy_set_header Host $host)"
        );
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
            "localhost.",
            "localhost.:8080",
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
            // Some browsers ask DNS for these.
            "app.localhost:8080",
        ] {
            assert!(
                matches!(check(&p, &[rebinding]), Err(Refusal::HostNotAllowed(_))),
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
        assert_eq!(
            check(&p, &["other.example"]),
            Err(Refusal::HostNotAllowed("other.example".into()))
        );
        assert!(
            Refusal::HostNotAllowed("other.example".into())
                .to_string()
                .contains("this request's Host is other.example"),
        );
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
        for malformed in [
            "user@a.example",
            "a b",
            "127.0.0.1:abc",
            ":99999",
            "a.example:99999",
            "a.example:",
            "name:",
            "[::1]evil",
            "[::1]:",
            "[::zz]",
            "a..example",
            "a.example:8080:8080",
            "a/b",
            "",
        ] {
            assert_eq!(
                check(&p, &[malformed]),
                Err(Refusal::BadHost),
                "{malformed:?}"
            );
        }
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
    fn an_absolute_target_s_authority_wins_over_the_host_header() {
        let p = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &[]);
        let absolute = |target: &str, host: &str| {
            Request::builder()
                .uri(target)
                .header(header::HOST, host)
                .body(())
                .expect("request")
        };
        assert!(
            matches!(
                p.check(&absolute("http://evil.example/ws", "localhost:8080")),
                Err(Refusal::HostNotAllowed(_))
            ),
            "RFC 9112, 3.2.2"
        );
        assert_eq!(
            p.check(&absolute("http://localhost:8080/ws", "evil.example")),
            Ok(())
        );
        assert_eq!(
            p.check(&absolute("http://127.0.0.1:abc/ws", "localhost")),
            Err(Refusal::BadHost)
        );
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
