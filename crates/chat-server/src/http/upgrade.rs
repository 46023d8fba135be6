//! The form of a WebSocket upgrade (RFC 6455, 4.2.1), checked before the
//! chat's own rules ([`crate::admission`]), and the key that answers it.

use super::codec::{Head, Request, consume, encode_head};
use super::refusal::Refusal;
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response, StatusCode};
use tokio_tungstenite::tungstenite::http::{Method, Version, header};

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
pub(crate) fn wants_websocket(request: &Request) -> bool {
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

/// Completes an admitted upgrade: takes its head out of the socket and
/// answers 101. The socket then speaks WebSocket.
pub(crate) async fn switch_protocols(
    stream: &mut TcpStream,
    head: &Head,
    key: &UpgradeKey,
) -> io::Result<()> {
    consume(stream, head).await?;
    let mut reply = Response::new(Bytes::new());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = HeaderValue::from_str(&key.accept()).map_err(io::Error::other)?;
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    stream
        .write_all(encode_head(&reply, false).as_bytes())
        .await?;
    stream.flush().await
}
