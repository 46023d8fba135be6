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
use std::sync::{Arc, Mutex, PoisonError};
use tokio_tungstenite::tungstenite::handshake::server::ErrorResponse;

/// The HTTP request of a WebSocket handshake, as the checks see it.
pub use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::{StatusCode, header};

/// The only path that upgrades.
pub const WS_PATH: &str = "/ws";

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path is not [`WS_PATH`].
    NotFound,
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
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::BadForwardedFor => "bad_forwarded_for",
            Refusal::TooManyFromAddress => "too_many_from_address",
            Refusal::TooManyPendingFromAddress => "too_many_pending_from_address",
            Refusal::ServerFull => "server_full",
        }
    }

    /// The HTTP response for this refusal.
    pub fn response(&self) -> ErrorResponse {
        let mut response = ErrorResponse::new(Some(format!("{self}\n")));
        *response.status_mut() = self.status();
        response
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotFound => "not found: the chat is at /ws",
            Refusal::OriginNotAllowed => "origin not allowed",
            Refusal::BadForwardedFor => "malformed X-Forwarded-For from a trusted proxy",
            Refusal::TooManyFromAddress => "too many connections from your address",
            Refusal::TooManyPendingFromAddress => "too many unfinished requests from your address",
            Refusal::ServerFull => "server at its connection limit, try again later",
        })
    }
}

/// The handshake rules that do not change while the server runs.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Networks whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Allowed browser origins; empty allows all.
    pub allowed_origins: Vec<String>,
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

    fn origin_allowed(&self, request: &Request) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        let mut origins = request.headers().get_all(header::ORIGIN).iter();
        let Some(origin) = origins.next() else {
            // Not a browser: origin checks protect browser users from
            // hostile pages, and a non-browser client can send any header.
            return true;
        };
        if origins.next().is_some() {
            return false;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/');
        self.allowed_origins
            .iter()
            .any(|allowed| allowed.trim_end_matches('/').eq_ignore_ascii_case(origin))
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
        assert_eq!(Refusal::NotFound.response().status(), 404);
    }

    #[test]
    fn origins() {
        let p = Policy {
            allowed_origins: vec!["https://chat.example".into()],
            ..Policy::default()
        };
        let ok = |h: &[(&str, &str)]| p.check(&request("/ws", h), peer()).is_ok();
        assert!(ok(&[]), "no Origin: not a browser");
        assert!(ok(&[("origin", "https://chat.example")]));
        assert!(ok(&[("origin", "HTTPS://CHAT.EXAMPLE")]));
        assert!(!ok(&[("origin", "https://evil.example")]));
        assert!(!ok(&[("origin", "https://chat.example.evil")]));
        assert!(!ok(&[("origin", "null")]));
        assert!(!ok(&[
            ("origin", "https://chat.example"),
            ("origin", "https://evil.example")
        ]));
        assert_eq!(Refusal::OriginNotAllowed.response().status(), 403);
        let open = Policy::default();
        assert!(
            open.check(
                &request("/ws", &[("origin", "https://any.example")]),
                peer()
            )
            .is_ok()
        );
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
