//! Why a connection ended, and the close code that says so.

use std::fmt;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Why a connection ended. Each reason has its close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client sent a close frame (answered by tungstenite).
    ClientClosed,
    /// The TCP connection ended without a close frame.
    PeerGone,
    /// Nothing arrived within the idle timeout.
    IdleTimeout,
    /// A frame or message exceeded the size limit.
    TooBig,
    /// A text frame was not UTF-8.
    InvalidUtf8,
    /// The client broke the WebSocket protocol.
    Protocol,
    /// The client sent more refused frames than allowed in a window.
    TooManyRefusals,
    /// The client fell further behind the live ring than allowed.
    Lagged(u64),
    /// A write batch did not finish within the write timeout.
    Stalled,
    /// The server is shutting down.
    Shutdown,
    /// This node stopped serving the chat (cluster mode: the stream is no
    /// longer the log it applied); the client should reconnect, to
    /// another node.
    NotServing,
    /// The server could not carry out a write that was not the client's
    /// fault (for example a frame larger than its write buffer).
    ServerError(String),
}

impl CloseReason {
    /// The close frame the server sends, if it sends one.
    pub(crate) fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            CloseReason::ClientClosed | CloseReason::PeerGone => return None,
            CloseReason::IdleTimeout => (CloseCode::Policy, "idle timeout"),
            CloseReason::TooManyRefusals => (CloseCode::Policy, "too many refused frames"),
            CloseReason::TooBig => (CloseCode::Size, "message too big"),
            CloseReason::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8"),
            // tungstenite's words for the 1002 it sends itself (a close
            // frame with a code the RFC does not allow), so every 1002 reads alike.
            CloseReason::Protocol => (CloseCode::Protocol, "Protocol violation"),
            CloseReason::Lagged(_) | CloseReason::Stalled => {
                (CloseCode::Again, "too slow, reconnect")
            }
            CloseReason::Shutdown => (CloseCode::Away, "server shutting down"),
            CloseReason::NotServing => (CloseCode::Away, "this node stopped serving the chat"),
            CloseReason::ServerError(_) => (CloseCode::Error, "internal error"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }

    /// Why a write failed. Only an I/O error or a connection already
    /// closed is the peer's doing; anything else (a frame the write buffer
    /// cannot take, a frame tungstenite will not encode) is the server's,
    /// and must not pass for a client that went away.
    pub(crate) fn from_write_error(err: WsError) -> Self {
        match err {
            WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed => {
                CloseReason::PeerGone
            }
            WsError::Protocol(ProtocolError::SendAfterClosing) => CloseReason::ClientClosed,
            other => CloseReason::ServerError(other.to_string()),
        }
    }

    pub(crate) fn from_read_error(err: &WsError) -> Self {
        match err {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig,
            WsError::Capacity(_) => CloseReason::TooBig,
            WsError::Utf8(_) => CloseReason::InvalidUtf8,
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::PeerGone,
            WsError::Protocol(_) => CloseReason::Protocol,
            WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::ClientClosed,
            _ => CloseReason::PeerGone,
        }
    }

    /// Every [`kind`](CloseReason::kind), so that the metric shows each at
    /// 0 before the first close.
    pub(crate) const KINDS: &'static [&'static str] = &[
        "client_closed",
        "peer_gone",
        "idle_timeout",
        "too_big",
        "invalid_utf8",
        "protocol_error",
        "too_many_refusals",
        "lagged",
        "stalled",
        "shutdown",
        "not_serving",
        "server_error",
    ];

    /// A short stable name, for metrics labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::TooBig => "too_big",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::Protocol => "protocol_error",
            CloseReason::TooManyRefusals => "too_many_refusals",
            CloseReason::Lagged(_) => "lagged",
            CloseReason::Stalled => "stalled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::NotServing => "not_serving",
            CloseReason::ServerError(_) => "server_error",
        }
    }

    /// Whether the client was dropped for reading too slowly.
    pub(crate) fn is_slow_client(&self) -> bool {
        matches!(self, CloseReason::Lagged(_) | CloseReason::Stalled)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ClientClosed => f.write_str("client closed"),
            CloseReason::PeerGone => f.write_str("peer gone"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::TooBig => f.write_str("message too big"),
            CloseReason::InvalidUtf8 => f.write_str("invalid utf-8"),
            CloseReason::Protocol => f.write_str("protocol error"),
            CloseReason::TooManyRefusals => f.write_str("too many refused frames"),
            CloseReason::Lagged(n) => write!(f, "lagged by {n} frames"),
            CloseReason::Stalled => f.write_str("write stalled"),
            CloseReason::Shutdown => f.write_str("server shutdown"),
            CloseReason::NotServing => f.write_str("this node stopped serving the chat"),
            CloseReason::ServerError(e) => write!(f, "server error: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn kinds_lists_each_reasons_kind_once() {
        let every = [
            CloseReason::ClientClosed,
            CloseReason::PeerGone,
            CloseReason::IdleTimeout,
            CloseReason::TooBig,
            CloseReason::InvalidUtf8,
            CloseReason::Protocol,
            CloseReason::TooManyRefusals,
            CloseReason::Lagged(1),
            CloseReason::Stalled,
            CloseReason::Shutdown,
            CloseReason::NotServing,
            CloseReason::ServerError("e".into()),
        ];
        // No wildcard: a new reason does not compile until it is above.
        for r in &every {
            match r {
                CloseReason::ClientClosed
                | CloseReason::PeerGone
                | CloseReason::IdleTimeout
                | CloseReason::TooBig
                | CloseReason::InvalidUtf8
                | CloseReason::Protocol
                | CloseReason::TooManyRefusals
                | CloseReason::Lagged(_)
                | CloseReason::Stalled
                | CloseReason::Shutdown
                | CloseReason::NotServing
                | CloseReason::ServerError(_) => {}
            }
        }
        let mut of_every: Vec<_> = every.iter().map(CloseReason::kind).collect();
        of_every.sort_unstable();
        let mut listed = CloseReason::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(of_every, listed);
    }
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn only_the_peer_s_failures_pass_for_a_gone_peer() {
        let reset = WsError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(CloseReason::from_write_error(reset), CloseReason::PeerGone);
        let full = WsError::WriteBufferFull(Box::new(Message::text("x")));
        let reason = CloseReason::from_write_error(full);
        assert_eq!(reason.kind(), "server_error");
        let frame = reason.close_frame().expect("the server says why");
        assert_eq!(frame.code, CloseCode::Error, "1011");
        let capacity = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert_eq!(
            CloseReason::from_write_error(capacity).kind(),
            "server_error"
        );
    }
}
