//! Why a request (a page, or a WebSocket handshake) was refused, and the
//! HTTP answer for each reason.

use std::fmt;
use tokio_tungstenite::tungstenite::http::StatusCode;

/// The only path that upgrades.
pub(crate) const WS_PATH: &str = "/ws";

/// Why a handshake (or, for the `Host` checks, any request) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path is not `/ws` (`WS_PATH`).
    NotFound,
    /// No `Host`, two, or one that is not a host.
    BadHost,
    /// The `Host` is not one this server answers to (see
    /// `crate::admission::host`): the name it gave (well formed, so safe
    /// to show).
    HostNotAllowed(String),
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
    /// `crate::admission::query`).
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
    /// The node does not serve yet (catching up with its cluster), or no
    /// more (it stopped applying); the text says which.
    NotServing(&'static str),
}

impl Refusal {
    /// The HTTP status sent for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::BadHost | Refusal::BadUpgrade(_) | Refusal::BadResume(_) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::HostNotAllowed(_) => StatusCode::FORBIDDEN,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BodyNotAllowed => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Refusal::OriginNotAllowed => StatusCode::FORBIDDEN,
            Refusal::BadForwardedFor => StatusCode::BAD_REQUEST,
            Refusal::TooManyFromAddress | Refusal::TooManyPendingFromAddress => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::ServerFull | Refusal::NotServing(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Every [`kind`](Refusal::kind), so that the metric shows each at 0
    /// before the first refusal.
    pub(crate) const KINDS: &'static [&'static str] = &[
        "not_found",
        "bad_host",
        "host_not_allowed",
        "method_not_allowed",
        "body_not_allowed",
        "bad_upgrade",
        "bad_resume",
        "unsupported_version",
        "origin_not_allowed",
        "bad_forwarded_for",
        "too_many_from_address",
        "too_many_pending_from_address",
        "server_full",
        "not_serving",
    ];

    /// A short stable name, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::BadHost => "bad_host",
            Refusal::HostNotAllowed(_) => "host_not_allowed",
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
            Refusal::NotServing(_) => "not_serving",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Refusal::NotFound => "not found: the chat is at /ws",
            Refusal::BadHost => "a request needs exactly one well-formed Host header",
            Refusal::HostNotAllowed(host) => {
                return write!(
                    f,
                    "host not allowed: this request's Host is {host}, and this server answers to \
                     the names given with --public-host (behind a proxy, give it the public name, \
                     and have the proxy pass the Host on: nginx's proxy_set_header Host $host)"
                );
            }
            Refusal::MethodNotAllowed => "a WebSocket handshake is a GET",
            Refusal::BodyNotAllowed => "a WebSocket handshake has no body",
            Refusal::BadUpgrade(why) | Refusal::BadResume(why) | Refusal::NotServing(why) => why,
            Refusal::UnsupportedVersion => "only WebSocket version 13 is supported",
            Refusal::OriginNotAllowed => "origin not allowed",
            Refusal::BadForwardedFor => "malformed X-Forwarded-For from a trusted proxy",
            Refusal::TooManyFromAddress => "too many connections from your address",
            Refusal::TooManyPendingFromAddress => "too many unfinished requests from your address",
            Refusal::ServerFull => "server at its connection limit, try again later",
        };
        f.write_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_lists_each_refusals_kind_once() {
        let every = [
            Refusal::NotFound,
            Refusal::BadHost,
            Refusal::HostNotAllowed("h".into()),
            Refusal::MethodNotAllowed,
            Refusal::BodyNotAllowed,
            Refusal::BadUpgrade("u"),
            Refusal::UnsupportedVersion,
            Refusal::BadResume("r"),
            Refusal::OriginNotAllowed,
            Refusal::BadForwardedFor,
            Refusal::TooManyFromAddress,
            Refusal::TooManyPendingFromAddress,
            Refusal::ServerFull,
            Refusal::NotServing("n"),
        ];
        // No wildcard: a new refusal does not compile until it is above.
        for r in &every {
            match r {
                Refusal::NotFound
                | Refusal::BadHost
                | Refusal::HostNotAllowed(_)
                | Refusal::MethodNotAllowed
                | Refusal::BodyNotAllowed
                | Refusal::BadUpgrade(_)
                | Refusal::UnsupportedVersion
                | Refusal::BadResume(_)
                | Refusal::OriginNotAllowed
                | Refusal::BadForwardedFor
                | Refusal::TooManyFromAddress
                | Refusal::TooManyPendingFromAddress
                | Refusal::ServerFull
                | Refusal::NotServing(_) => {}
            }
        }
        let mut of_every: Vec<_> = every.iter().map(Refusal::kind).collect();
        of_every.sort_unstable();
        let mut listed = Refusal::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(of_every, listed);
    }
}
