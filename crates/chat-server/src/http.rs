//! Plain HTTP on the WebSocket port: the web client, `/healthz`,
//! `/metrics` and `/whoami`.
//!
//! Every accepted connection starts here. The request head is **peeked**,
//! not read, and parsed with `httparse`. Its `Host` must be one the server
//! answers to. A WebSocket upgrade that is well formed leaves this module
//! with its head still in the socket, for the chat's own checks and the
//! 101 ([`switch_protocols`]); every other request, and every refused
//! upgrade, is consumed and answered here.
//!
//! Bounds: a request head is at most `--max-request-head` bytes and
//! [`MAX_HEADERS`] headers (else 431), must arrive within
//! `--handshake-timeout` (else the connection is closed), and may have no
//! body (else 413). Only `GET` and `HEAD` are served (else 405). A
//! keep-alive connection serves at most [`MAX_REQUESTS`] requests and waits
//! at most `--handshake-timeout` for each.

use crate::Shared;
use crate::handshake::{Refusal, Request, UpgradeKey, WS_PATH, check_upgrade, wants_websocket};
use crate::metrics;
use crate::pending::PendingSlot;
use crate::web::{self, Asset};
use chat_proto::WhoAmI;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::http::{
    HeaderValue, Method, Response, StatusCode, Version, header,
};

/// Most headers in one request head; more gets 431.
pub const MAX_HEADERS: usize = 64;

/// Most requests served on one keep-alive connection.
pub const MAX_REQUESTS: usize = 100;

/// First peek buffer; it doubles up to `--max-request-head` only for the
/// rare head that does not fit.
const FIRST_PEEK: usize = 2048;

/// Longest pause between two peeks of a head that arrives in pieces.
const MAX_PEEK_PAUSE: Duration = Duration::from_millis(50);

/// After an error response: how long and how much to read (and discard)
/// before closing, so the client reads the response instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Where a connection goes after the plain HTTP part.
#[derive(Debug)]
pub(crate) enum Next {
    /// A well-formed WebSocket upgrade, its head still unread in the socket.
    Upgrade(Box<Upgrade>),
    /// The connection is finished.
    Done,
}

/// A WebSocket upgrade that passed the HTTP checks, waiting for the chat's
/// own (path, origin, address, admission).
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// Its head, still in the socket.
    pub(crate) head: Head,
    /// Its checked `Sec-WebSocket-Key`.
    pub(crate) key: UpgradeKey,
    /// When the handshake time runs out.
    pub(crate) deadline: Instant,
}

/// A parsed request head, still in the socket.
#[derive(Debug)]
pub struct Head {
    /// The request (method, path, version, headers).
    pub request: Request,
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
}

/// Why no request head could be had.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The head is larger than the bound, or has too many headers.
    TooLarge,
    /// The head is not HTTP/1.x.
    Malformed,
    /// The client closed (or reset) the connection first.
    Closed,
}

/// Parses a request head from the start of `bytes`: `Ok(None)` while it is
/// incomplete.
pub fn parse_head(bytes: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HeadError::Malformed);
    };
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut builder = Request::builder().method(method).uri(path).version(version);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let request = builder.body(()).map_err(|_| HeadError::Malformed)?;
    Ok(Some(Head { request, len }))
}

/// Waits for a complete request head at the front of the socket without
/// consuming it.
///
/// A peek returns the same bytes until more arrive, and the socket stays
/// readable meanwhile, so a head that comes in pieces is re-peeked after a
/// short pause (1 ms, doubling to [`MAX_PEEK_PAUSE`]). Real clients send
/// the head in one piece; only slow or hostile ones pay for the pauses, and
/// the caller's timeout bounds them.
pub async fn peek_head(stream: &TcpStream, max: usize) -> Result<Head, HeadError> {
    let mut buf = vec![0; FIRST_PEEK.min(max)];
    let mut seen = 0;
    let mut pause = Duration::from_millis(1);
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => n,
        };
        if let Some(head) = parse_head(&buf[..n])? {
            return Ok(head);
        }
        if n == buf.len() {
            if n >= max {
                return Err(HeadError::TooLarge);
            }
            buf.resize((n * 2).min(max), 0);
        } else if n == seen {
            sleep(pause).await;
            pause = (pause * 2).min(MAX_PEEK_PAUSE);
        } else {
            pause = Duration::from_millis(1);
        }
        seen = n;
    }
}

/// Serves plain HTTP requests on a new connection until a WebSocket
/// handshake for [`WS_PATH`] is next, or the connection is done.
///
/// `pending` is the connection's place in `--max-pending-per-ip` (none for
/// a trusted proxy). While a kept-alive connection waits for its next
/// request it is idle, and a new connection from the same address may
/// take its place; it then closes.
pub(crate) async fn serve(
    stream: &mut TcpStream,
    peer: IpAddr,
    pending: Option<&PendingSlot>,
    shared: &Shared,
) -> Next {
    for served in 1..=MAX_REQUESTS {
        let deadline = Instant::now() + shared.config.handshake_timeout;
        let idle = pending.filter(|_| served > 1);
        if let Some(slot) = idle {
            slot.idle();
        }
        let evicted = async {
            match idle {
                Some(slot) => slot.evicted().await,
                None => std::future::pending().await,
            }
        };
        let peeked = tokio::select! {
            () = shared.shutdown.cancelled() => return Next::Done,
            () = evicted => {
                shared.metrics.http_idle_evicted.inc();
                return Next::Done;
            }
            peeked = timeout_at(deadline, peek_head(stream, shared.config.max_request_head)) => peeked,
        };
        if idle.is_some_and(|slot| !slot.busy()) {
            // Evicted just as a request came: unanswered, so the client
            // sends it again on a new connection.
            shared.metrics.http_idle_evicted.inc();
            return Next::Done;
        }
        let head = match peeked {
            // Slow or silent: the connection just closes, as a stalled
            // handshake always has.
            Err(_) | Ok(Err(HeadError::Closed)) => return Next::Done,
            Ok(Err(HeadError::TooLarge)) => {
                let reply = text(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                );
                finish(stream, shared, "bad_request", reply, false).await;
                return Next::Done;
            }
            Ok(Err(HeadError::Malformed)) => {
                let reply = text(StatusCode::BAD_REQUEST, "malformed HTTP request\n");
                finish(stream, shared, "bad_request", reply, false).await;
                return Next::Done;
            }
            Ok(Ok(head)) => head,
        };
        let upgrade = wants_websocket(&head.request);
        let checked = shared.hosts.check(&head.request).and_then(|()| {
            if !upgrade {
                return Ok(None);
            }
            if has_body(&head.request) {
                return Err(Refusal::BodyNotAllowed);
            }
            check_upgrade(&head.request).map(Some)
        });
        match checked {
            Ok(Some(key)) => {
                return Next::Upgrade(Box::new(Upgrade {
                    head,
                    key,
                    deadline,
                }));
            }
            Ok(None) => {}
            Err(refusal) => {
                if !upgrade {
                    shared
                        .metrics
                        .http_response("bad_request", refusal.status().as_u16());
                }
                refuse(stream, &head, &refusal, upgrade, shared).await;
                return Next::Done;
            }
        }
        // Ours: take the head out of the socket.
        if consume(stream, &head).await.is_err() {
            return Next::Done;
        }
        let (route, reply) = route(&head.request, peer, shared);
        let keep_alive = reply.status().is_success() || reply.status() == StatusCode::NOT_MODIFIED;
        let keep_alive = keep_alive
            && served < MAX_REQUESTS
            && wants_keep_alive(&head.request)
            && !shared.shutdown.is_cancelled();
        if !finish(
            stream,
            shared,
            route,
            reply_for(&head.request, reply),
            keep_alive,
        )
        .await
        {
            return Next::Done;
        }
    }
    Next::Done
}

/// Answers a connection that arrived while the server is full: 503 to
/// whatever it asks, WebSocket handshake or page.
pub(crate) async fn refuse_full(stream: &mut TcpStream, shared: &Shared) {
    let max = shared.config.max_request_head;
    let Ok(Ok(head)) = timeout(shared.config.handshake_timeout, peek_head(stream, max)).await
    else {
        return;
    };
    refuse(stream, &head, &Refusal::ServerFull, true, shared).await;
}

/// Answers a refused request (its head still in the socket) with the
/// refusal's status and text, and closes. A refused WebSocket handshake is
/// counted as one.
pub(crate) async fn refuse(
    stream: &mut TcpStream,
    head: &Head,
    refusal: &Refusal,
    handshake: bool,
    shared: &Shared,
) {
    if handshake {
        shared.metrics.handshake_refused(refusal);
    }
    if consume(stream, head).await.is_err() {
        return;
    }
    let mut reply = text(refusal.status(), &format!("{refusal}\n"));
    let headers = reply.headers_mut();
    match refusal {
        Refusal::ServerFull => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        Refusal::UnsupportedVersion => {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Refusal::MethodNotAllowed => {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        _ => {}
    }
    write_response(stream, &reply_for(&head.request, reply), true, shared).await;
}

/// Completes an admitted upgrade: takes its head out of the socket and
/// answers 101. The socket then speaks WebSocket.
pub(crate) async fn switch_protocols(stream: &mut TcpStream, upgrade: &Upgrade) -> io::Result<()> {
    consume(stream, &upgrade.head).await?;
    let mut reply = Response::new(Bytes::new());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = HeaderValue::from_str(&upgrade.key.accept()).map_err(io::Error::other)?;
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    stream
        .write_all(encode_head(&reply, false).as_bytes())
        .await?;
    stream.flush().await
}

/// Reads a peeked head out of the socket (its bytes are already there).
async fn consume(stream: &mut TcpStream, head: &Head) -> io::Result<()> {
    let mut bytes = vec![0; head.len];
    stream.read_exact(&mut bytes).await.map(drop)
}

/// Counts, writes and (unless kept alive) closes; false when the
/// connection is finished.
async fn finish(
    stream: &mut TcpStream,
    shared: &Shared,
    route: &'static str,
    reply: Response<Bytes>,
    keep_alive: bool,
) -> bool {
    shared.metrics.http_response(route, reply.status().as_u16());
    write_response(stream, &reply, !keep_alive, shared).await && keep_alive
}

/// Decides the answer to a plain HTTP request, with the route's name for
/// metrics.
pub(crate) fn route(
    request: &Request,
    peer: IpAddr,
    shared: &Shared,
) -> (&'static str, Response<Bytes>) {
    if has_body(request) {
        let reply = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted\n",
        );
        return ("bad_request", reply);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        reply
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return ("bad_request", reply);
    }
    match request.uri().path() {
        "/healthz" => {
            if shared.metrics.store_failing.get() != 0 {
                let reply = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store failing: messages are waiting for the disk\n",
                );
                return ("healthz", no_store(reply));
            }
            ("healthz", no_store(text(StatusCode::OK, "ok\n")))
        }
        "/metrics" => {
            let reply = body(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                shared.metrics.encode(),
            );
            ("metrics", no_store(reply))
        }
        "/whoami" => match shared.policy.client_addr(request, peer) {
            Ok(addr) => {
                let who = WhoAmI {
                    user_id: shared.identity.user_id(addr),
                };
                let reply = body(StatusCode::OK, "application/json", who.encode());
                ("whoami", no_store(reply))
            }
            Err(refusal) => ("whoami", text(refusal.status(), &format!("{refusal}\n"))),
        },
        WS_PATH => {
            let mut reply = text(
                StatusCode::UPGRADE_REQUIRED,
                "this is the chat's WebSocket endpoint; open / in a browser\n",
            );
            reply
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            ("bad_request", reply)
        }
        path => match Asset::find(path) {
            Some((asset, etag)) => ("asset", asset_response(request, asset, etag)),
            None => ("not_found", text(StatusCode::NOT_FOUND, "not found\n")),
        },
    }
}

fn asset_response(request: &Request, asset: &'static Asset, etag: &'static str) -> Response<Bytes> {
    let fresh = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        });
    let mut reply = if fresh {
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        body(
            StatusCode::OK,
            asset.content_type,
            Bytes::from_static(asset.body),
        )
    };
    let headers = reply.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(etag));
    // Always revalidate: an upgraded server's page shows at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    reply
}

fn body(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut reply = Response::new(body.into());
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

fn text(status: StatusCode, message: &str) -> Response<Bytes> {
    body(
        status,
        "text/plain; charset=utf-8",
        Bytes::copy_from_slice(message.as_bytes()),
    )
}

fn no_store(mut reply: Response<Bytes>) -> Response<Bytes> {
    reply
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

/// A `HEAD` request gets the `GET` response's head only.
fn reply_for(request: &Request, reply: Response<Bytes>) -> Response<Bytes> {
    if request.method() == Method::HEAD {
        let (mut parts, body) = reply.into_parts();
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(parts, Bytes::new())
    } else {
        reply
    }
}

/// Whether the request asks for a WebSocket upgrade.
fn wants_keep_alive(request: &Request) -> bool {
    let close = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    request.version() == Version::HTTP_11 && !close
}

fn has_body(request: &Request) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

/// Serializes a response head.
pub fn encode_head(reply: &Response<Bytes>, close: bool) -> String {
    let status = reply.status();
    let mut head = String::with_capacity(256);
    // Writing into a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in reply.headers() {
        if let Ok(value) = value.to_str() {
            let _ = write!(head, "{name}: {value}\r\n");
        }
    }
    // A 304 describes the representation it did not send, and a 1xx has
    // no body at all: no length.
    let bodiless = status == StatusCode::NOT_MODIFIED || status.is_informational();
    if !bodiless && !reply.headers().contains_key(header::CONTENT_LENGTH) {
        let _ = write!(head, "content-length: {}\r\n", reply.body().len());
    }
    head.push_str("x-content-type-options: nosniff\r\n");
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Writes a response within the write timeout; with `close`, then shuts
/// the connection down gracefully. False when the connection is unusable.
async fn write_response(
    stream: &mut TcpStream,
    reply: &Response<Bytes>,
    close: bool,
    shared: &Shared,
) -> bool {
    let head = encode_head(reply, close);
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(reply.body()).await?;
        stream.flush().await
    };
    let written = matches!(
        timeout(shared.config.write_timeout, write).await,
        Ok(Ok(()))
    );
    if written && close {
        linger_close(stream).await;
    }
    written
}

/// Half-closes, then reads and discards what the client still sends (for
/// at most [`LINGER`] and [`LINGER_BYTES`]): closing a socket with unread
/// input makes the kernel send a reset, which can destroy the response
/// before the client reads it.
async fn linger_close(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        Ok::<(), io::Error>(())
    };
    let _ = timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_in_pieces_and_bounds_hold() {
        let full = b"GET /whoami?x=1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.9\r\n\r\nrest";
        for cut in 0..full.len() - 4 {
            let parsed = parse_head(&full[..cut]).expect("no error on a prefix");
            assert!(parsed.is_none(), "complete at {cut}");
        }
        let head = parse_head(full).expect("ok").expect("complete");
        assert_eq!(head.len, full.len() - 4);
        assert_eq!(head.request.uri().path(), "/whoami");
        assert_eq!(head.request.method(), Method::GET);
        assert_eq!(head.request.headers()["x-forwarded-for"], "192.0.2.9");

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many).err(), Some(HeadError::TooLarge));

        for junk in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(junk).err(),
                Some(HeadError::Malformed),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn response_heads_are_well_formed() {
        let mut r = text(StatusCode::NOT_FOUND, "not found\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        let head = encode_head(&r, true);
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains("\r\ncontent-length: 10\r\n"));
        assert!(head.contains("\r\nconnection: close\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        // It parses back as a response with the same status and length.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut headers);
        assert!(parsed.parse(head.as_bytes()).expect("parses").is_complete());
        assert_eq!(parsed.code, Some(404));
    }

    #[test]
    fn head_requests_get_the_length_without_the_body() {
        let request = Request::builder()
            .method(Method::HEAD)
            .uri("/")
            .body(())
            .expect("request");
        let reply = reply_for(&request, text(StatusCode::OK, "hello"));
        assert!(reply.body().is_empty());
        assert_eq!(reply.headers()[header::CONTENT_LENGTH], "5");
    }
}
