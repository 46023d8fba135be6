//! Deciding whether a WebSocket handshake may proceed, and who it is.
//!
//! Every refusal here is an HTTP error response during the handshake; the
//! connection never reaches the chat. The checks are plain functions of the
//! request so they can be tested (and fuzzed) without sockets.

use crate::identity::{self, AddrKey};
use chat_proto::UserId;
use ipnet::IpNet;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

/// The HTTP request of a WebSocket handshake, as the checks see it.
pub use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::uri::Authority;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Method, StatusCode, Uri, Version, header};

/// The only path that upgrades.
pub const WS_PATH: &str = "/ws";

/// Why a handshake (or, for the `Host` checks, any request) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path is not [`WS_PATH`].
    NotFound,
    /// No `Host`, two, or one that is not a host.
    BadHost,
    /// The `Host` is not one this server answers to (see [`crate::host`]).
    HostNotAllowed,
    /// An upgrade with a method other than `GET`.
    MethodNotAllowed,
    /// An upgrade with a body.
    BodyNotAllowed,
    /// An upgrade that is not HTTP/1.1, lacks `Connection: upgrade`, or has
    /// no valid `Sec-WebSocket-Key`.
    BadUpgrade(&'static str),
    /// A `Sec-WebSocket-Version` other than 13.
    UnsupportedVersion,
    /// A `/ws` query whose `since` or `epoch` cannot be used (see
    /// [`crate::resume`]).
    BadResume(&'static str),
    /// The `Origin` header is not in the allowed list.
    OriginNotAllowed,
    /// A trusted proxy sent an `X-Forwarded-For` that is not a list of
    /// addresses.
    BadForwardedFor,
    /// The client's address already has the most connections allowed.
    TooManyFromAddress,
    /// The TCP peer already has the most connections still in their
    /// request phase. Such a connection is closed at once, without a
    /// response.
    TooManyPendingFromAddress,
    /// The server is at its connection limit.
    ServerFull,
}

impl Refusal {
    /// The HTTP status sent for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::BadHost | Refusal::BadUpgrade(_) | Refusal::BadResume(_) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::HostNotAllowed => StatusCode::FORBIDDEN,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BodyNotAllowed => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Refusal::OriginNotAllowed => StatusCode::FORBIDDEN,
            Refusal::BadForwardedFor => StatusCode::BAD_REQUEST,
            Refusal::TooManyFromAddress | Refusal::TooManyPendingFromAddress => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::ServerFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short stable name, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::BadHost => "bad_host",
            Refusal::HostNotAllowed => "host_not_allowed",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::BodyNotAllowed => "body_not_allowed",
            Refusal::BadUpgrade(_) => "bad_upgrade",
            Refusal::BadResume(_) => "bad_resume",
            Refusal::UnsupportedVersion => "unsupported_version",
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::BadForwardedFor => "bad_forwarded_for",
            Refusal::TooManyFromAddress => "too_many_from_address",
            Refusal::TooManyPendingFromAddress => "too_many_pending_from_address",
            Refusal::ServerFull => "server_full",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotFound => "not found: the chat is at /ws",
            Refusal::BadHost => "a request needs exactly one well-formed Host header",
            Refusal::HostNotAllowed => {
                "host not allowed: this server answers to the names given with --public-host"
            }
            Refusal::MethodNotAllowed => "a WebSocket handshake is a GET",
            Refusal::BodyNotAllowed => "a WebSocket handshake has no body",
            Refusal::BadUpgrade(why) | Refusal::BadResume(why) => why,
            Refusal::UnsupportedVersion => "only WebSocket version 13 is supported",
            Refusal::OriginNotAllowed => "origin not allowed",
            Refusal::BadForwardedFor => "malformed X-Forwarded-For from a trusted proxy",
            Refusal::TooManyFromAddress => "too many connections from your address",
            Refusal::TooManyPendingFromAddress => "too many unfinished requests from your address",
            Refusal::ServerFull => "server at its connection limit, try again later",
        })
    }
}

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

    /// Whether this origin is the host the request was sent to, by its
    /// `Host` header: the page was served by this server (directly, or
    /// through a proxy that passes `Host` on).
    fn is_host(&self, host: Option<&HeaderValue>) -> bool {
        let Some(host) = host.and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let Ok(host) = host.parse::<Authority>() else {
            return false;
        };
        let default = Origin::default_port(&self.scheme);
        default.is_some()
            && !host.as_str().contains('@')
            && host.host().eq_ignore_ascii_case(&self.host)
            && host.port_u16().or(default) == self.port.or(default)
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

/// A `Sec-WebSocket-Key` that passed [`check_upgrade`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeKey(String);

impl UpgradeKey {
    /// The `Sec-WebSocket-Accept` value that answers it (RFC 6455, 4.2.2).
    pub fn accept(&self) -> String {
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.0.as_bytes())
    }
}

/// Whether the request asks to become a WebSocket: its `Upgrade` header
/// lists `websocket` (among possibly others, such as `h2c`).
pub fn wants_websocket(request: &Request) -> bool {
    header_tokens(request, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

/// The comma-separated tokens of every `name` header, trimmed.
fn header_tokens<'a>(
    request: &'a Request,
    name: header::HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    request
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Checks an upgrade request against RFC 6455 (section 4.2.1), so that every
/// malformed handshake gets its own HTTP status rather than a silent close.
/// Header lists may be split over lines or hold other tokens
/// (`Connection: keep-alive, Upgrade`; `Upgrade: h2c, websocket`), as
/// proxies send them. The path and body are checked before this.
pub fn check_upgrade(request: &Request) -> Result<UpgradeKey, Refusal> {
    if request.method() != Method::GET {
        return Err(Refusal::MethodNotAllowed);
    }
    if request.version() != Version::HTTP_11 {
        return Err(Refusal::BadUpgrade("a WebSocket handshake needs HTTP/1.1"));
    }
    if !header_tokens(request, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(Refusal::BadUpgrade(
            "a WebSocket handshake needs Connection: Upgrade",
        ));
    }
    let mut versions = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_VERSION)
        .iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(Refusal::UnsupportedVersion),
    }
    let mut keys = request.headers().get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key.to_str().ok().map(str::trim),
        _ => None,
    };
    // A key is 16 random bytes in base64: 22 characters and "==".
    let well_formed = |k: &&str| {
        k.len() == 24
            && k.ends_with("==")
            && k[..22]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    };
    key.filter(well_formed)
        .map(|k| UpgradeKey(k.to_owned()))
        .ok_or(Refusal::BadUpgrade(
            "a WebSocket handshake needs one Sec-WebSocket-Key of 16 bytes in base64",
        ))
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
        origin.is_host(request.headers().get(header::HOST))
            || self
                .allowed_origins
                .iter()
                .any(|allowed| matches!(allowed, AllowedOrigin::Exact(o) if *o == origin))
    }
}

/// Counts open connections per client address.
#[derive(Debug)]
pub struct AddressLimits {
    max: usize,
    open: Mutex<HashMap<AddrKey, usize>>,
}

/// One counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct AddressSlot {
    limits: Arc<AddressLimits>,
    key: AddrKey,
}

impl AddressLimits {
    /// At most `max` connections per address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(AddressLimits {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `ip`, or refuses when its address is full.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, Refusal> {
        let key = AddrKey::from(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            if *count == 0 {
                open.remove(&key);
            }
            return Err(Refusal::TooManyFromAddress);
        }
        *count += 1;
        Ok(AddressSlot {
            limits: Arc::clone(self),
            key,
        })
    }

    /// How many addresses have a connection open.
    pub fn addresses(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A client that passed the handshake checks.
#[derive(Debug)]
pub struct Admitted {
    /// The client's address (after `X-Forwarded-For`, if trusted).
    pub addr: IpAddr,
    /// Its user id.
    pub user: UserId,
    /// Its place in the per-address limit.
    pub slot: AddressSlot,
    /// Whether it opted in to positions, and where it resumes.
    pub resume: crate::resume::Resume,
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

    #[test]
    fn address_limits_count_and_release() {
        let limits = AddressLimits::new(2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let s1 = limits.acquire(a).expect("1");
        let s2 = limits.acquire(a).expect("2");
        assert_eq!(
            limits.acquire(a).expect_err("3"),
            Refusal::TooManyFromAddress
        );
        // Same /64 is the same address.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::2".parse().expect("ip");
        let _x = limits.acquire(v6a).expect("v6 1");
        let _y = limits.acquire(v6b).expect("v6 2");
        assert!(limits.acquire(v6a).is_err());
        drop(s1);
        let _s3 = limits.acquire(a).expect("freed");
        drop(s2);
        drop(_s3);
        assert_eq!(limits.addresses(), 1, "empty entries are removed");
    }
}
