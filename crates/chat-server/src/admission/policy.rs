//! The handshake rules that do not change while the server runs: the
//! path, the browser's origin, and which proxies' `X-Forwarded-For` is
//! believed.

use super::identity;
use crate::http::{Refusal, Request, WS_PATH};
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use tokio_tungstenite::tungstenite::http::{Uri, header};

/// A web origin as browsers send it in `Origin`: scheme, host and port,
/// compared without regard to case and with default ports made explicit
/// (`https://chat.example` is `https://chat.example:443`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    /// The port browsers assume for a scheme when the origin names none.
    fn default_port(scheme: &str) -> Option<u16> {
        match scheme {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        }
    }

    /// Whether this origin is the host the request was sent to
    /// ([`super::host::requested`]): the page was served by this server
    /// (directly, or through a proxy that passes `Host` on).
    fn is_host(&self, request: &Request) -> bool {
        let Ok(Some(host)) = super::host::requested(request) else {
            return false;
        };
        let default = Origin::default_port(&self.scheme);
        default.is_some()
            && host.name == self.host.strip_suffix('.').unwrap_or(&self.host)
            && host.port.or(default) == self.port.or(default)
    }
}

impl FromStr for Origin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("{s:?} is not an origin like https://chat.example.com ({why})");
        let uri: Uri = s.parse().map_err(|_| bad("does not parse"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(bad("needs a scheme and a host"));
        };
        if authority.as_str().contains('@') {
            return Err(bad("has a user name"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("an origin has no path"));
        }
        let scheme = scheme.to_ascii_lowercase();
        let default = Origin::default_port(&scheme);
        Ok(Origin {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().filter(|p| Some(*p) != default),
            scheme,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// An entry of `--allowed-origin`: one origin, or `*` for every page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigin {
    /// Every page may connect (`*`).
    Any,
    /// Pages from this origin may connect.
    Exact(Origin),
}

impl FromStr for AllowedOrigin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "*" => Ok(AllowedOrigin::Any),
            s => s.parse().map(AllowedOrigin::Exact),
        }
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedOrigin::Any => f.write_str("*"),
            AllowedOrigin::Exact(origin) => origin.fmt(f),
        }
    }
}

/// The handshake rules that do not change while the server runs.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Networks whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Browser origins allowed besides the server's own (the one its
    /// `Host` header names); [`AllowedOrigin::Any`] allows every page.
    pub allowed_origins: Vec<AllowedOrigin>,
}

impl Policy {
    /// Checks path and origin, and finds the client's address.
    pub fn check(&self, request: &Request, peer: IpAddr) -> Result<IpAddr, Refusal> {
        if request.uri().path() != WS_PATH {
            return Err(Refusal::NotFound);
        }
        if !self.origin_allowed(request) {
            return Err(Refusal::OriginNotAllowed);
        }
        self.client_addr(request, peer)
    }

    /// Whether `peer` is a trusted proxy (many clients behind one address).
    pub fn trusts(&self, peer: IpAddr) -> bool {
        identity::is_trusted(peer, &self.trusted_proxies)
    }

    /// The client's address: `peer`, or what a trusted proxy's
    /// `X-Forwarded-For` says.
    pub fn client_addr(&self, request: &Request, peer: IpAddr) -> Result<IpAddr, Refusal> {
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        let values: Vec<&str> = forwarded.collect();
        identity::client_addr(peer, values.into_iter(), &self.trusted_proxies)
            .ok_or(Refusal::BadForwardedFor)
    }

    /// Identity by address is ambient authority, so a page from another
    /// site must not be able to post as its visitor: a browser's handshake
    /// passes only from the server's own origin or a listed one.
    fn origin_allowed(&self, request: &Request) -> bool {
        let mut origins = request.headers().get_all(header::ORIGIN).iter();
        let Some(origin) = origins.next() else {
            // Not a browser: origin checks protect browser users from
            // hostile pages, and a non-browser client can send any header.
            return true;
        };
        if origins.next().is_some() {
            return false;
        }
        if self.allowed_origins.contains(&AllowedOrigin::Any) {
            return true;
        }
        // `null` (a sandboxed or file page) and junk parse as no origin.
        let Some(origin) = origin.to_str().ok().and_then(|o| o.parse::<Origin>().ok()) else {
            return false;
        };
        origin.is_host(request)
            || self
                .allowed_origins
                .iter()
                .any(|allowed| matches!(allowed, AllowedOrigin::Exact(o) if *o == origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    fn peer() -> IpAddr {
        "192.0.2.1".parse().expect("ip")
    }

    #[test]
    fn only_ws_upgrades_and_query_strings_are_fine() {
        let p = Policy::default();
        assert!(p.check(&request("/ws", &[]), peer()).is_ok());
        assert!(p.check(&request("/ws?room=1", &[]), peer()).is_ok());
        for path in ["/", "/ws/", "/WS", "/wss", "/ws/x", "/other"] {
            assert_eq!(
                p.check(&request(path, &[]), peer()),
                Err(Refusal::NotFound),
                "{path}"
            );
        }
        assert_eq!(Refusal::NotFound.status(), 404);
    }

    #[test]
    fn listed_origins() {
        let p = Policy {
            allowed_origins: vec!["https://chat.example".parse().expect("origin")],
            ..Policy::default()
        };
        let ok = |h: &[(&str, &str)]| p.check(&request("/ws", h), peer()).is_ok();
        assert!(ok(&[]), "no Origin: not a browser");
        assert!(ok(&[("origin", "https://chat.example")]));
        assert!(ok(&[("origin", "HTTPS://CHAT.EXAMPLE")]));
        assert!(ok(&[("origin", "https://chat.example:443")]));
        assert!(!ok(&[("origin", "http://chat.example")]), "another scheme");
        assert!(!ok(&[("origin", "https://chat.example:8443")]));
        assert!(!ok(&[("origin", "https://evil.example")]));
        assert!(!ok(&[("origin", "https://chat.example.evil")]));
        assert!(!ok(&[("origin", "null")]));
        assert!(!ok(&[("origin", "")]));
        assert!(!ok(&[
            ("origin", "https://chat.example"),
            ("origin", "https://evil.example")
        ]));
        assert_eq!(Refusal::OriginNotAllowed.status(), 403);
    }

    #[test]
    fn the_servers_own_origin_passes_by_default() {
        let p = Policy::default();
        let ok = |h: &[(&str, &str)]| p.check(&request("/ws", h), peer()).is_ok();
        let own = [
            ("localhost:8080", "http://localhost:8080"),
            ("LocalHost:8080", "http://localhost:8080"),
            ("chat.example", "https://chat.example"),
            ("chat.example:443", "https://chat.example"),
            ("chat.example", "http://chat.example:80"),
            ("[::1]:8080", "http://[::1]:8080"),
        ];
        for (host, origin) in own {
            assert!(
                ok(&[("host", host), ("origin", origin)]),
                "{origin} on {host}"
            );
        }
        let foreign = [
            ("localhost:8080", "http://evil.example"),
            ("localhost:8080", "http://localhost:8081"),
            ("localhost:8080", "http://localhost"),
            ("chat.example", "https://chat.example:8443"),
            ("chat.example.evil", "https://chat.example"),
            ("user@chat.example", "https://chat.example"),
            ("chat.example", "ftp://chat.example"),
            ("chat.example", "null"),
        ];
        for (host, origin) in foreign {
            assert!(
                !ok(&[("host", host), ("origin", origin)]),
                "{origin} on {host}"
            );
        }
        assert!(!ok(&[("origin", "http://localhost:8080")]), "no Host");
        assert!(
            ok(&[("host", "localhost:8080")]),
            "no Origin: not a browser"
        );
    }

    #[test]
    fn a_star_allows_every_page() {
        let p = Policy {
            allowed_origins: vec!["*".parse().expect("star")],
            ..Policy::default()
        };
        for origin in ["https://any.example", "null", "chrome-extension://abc"] {
            assert!(
                p.check(&request("/ws", &[("origin", origin)]), peer())
                    .is_ok(),
                "{origin}"
            );
        }
    }

    #[test]
    fn allowed_origins_parse_strictly() {
        let parse = |s: &str| s.parse::<AllowedOrigin>();
        assert_eq!(parse("*"), Ok(AllowedOrigin::Any));
        for (written, shown) in [
            ("https://Chat.Example", "https://chat.example"),
            ("https://chat.example/", "https://chat.example"),
            ("https://chat.example:443", "https://chat.example"),
            ("http://localhost:8080", "http://localhost:8080"),
        ] {
            assert_eq!(parse(written).expect(written).to_string(), shown);
        }
        for bad in [
            "chat.example",
            "https://",
            "https://chat.example/chat",
            "https://chat.example?x=1",
            "https://me@chat.example",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_needs_a_trusted_peer() {
        let p = Policy {
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
            ..Policy::default()
        };
        let h = [("x-forwarded-for", "198.51.100.4")];
        assert_eq!(p.check(&request("/ws", &h), peer()), Ok(peer()));
        let proxy: IpAddr = "10.1.1.1".parse().expect("ip");
        assert_eq!(
            p.check(&request("/ws", &h), proxy),
            Ok("198.51.100.4".parse().expect("ip"))
        );
        let bad = [("x-forwarded-for", "not an address")];
        assert_eq!(
            p.check(&request("/ws", &bad), proxy),
            Err(Refusal::BadForwardedFor)
        );
    }
}
