//! HTTP/1 on the wire: request heads peeked and parsed with `httparse`,
//! responses built and written, and the careful close after an error.

use std::fmt::Write as _;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::Bytes;

/// The HTTP request of a WebSocket handshake, as the checks see it.
pub use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::{
    HeaderValue, Method, Response, StatusCode, Version, header,
};

/// Most headers in one request head; more gets 431.
pub(crate) const MAX_HEADERS: usize = 64;

/// First peek buffer; it doubles up to `--max-request-head` only for the
/// rare head that does not fit.
const FIRST_PEEK: usize = 2048;

/// Longest pause between two peeks of a head that arrives in pieces.
const MAX_PEEK_PAUSE: Duration = Duration::from_millis(50);

/// After an error response: how long and how much to read (and discard)
/// before closing, so the client reads the response instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

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
    // A request target has no fragment (RFC 9112, 3.2): a `#` is a
    // client's mistake, not something to drop quietly.
    if path.contains('#') {
        return Err(HeadError::Malformed);
    }
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
pub(crate) async fn peek_head(stream: &TcpStream, max: usize) -> Result<Head, HeadError> {
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
            // A peek sees no end of stream behind the bytes: the readiness
            // does (EPOLLRDHUP). A client that sent half a head and hung
            // up is done, and gives its place back now.
            if stream
                .ready(Interest::READABLE)
                .await
                .map_or(true, |ready| ready.is_read_closed())
            {
                return Err(HeadError::Closed);
            }
            sleep(pause).await;
            pause = (pause * 2).min(MAX_PEEK_PAUSE);
        } else {
            pause = Duration::from_millis(1);
        }
        seen = n;
    }
}

/// Reads a peeked head out of the socket (its bytes are already there).
pub(crate) async fn consume(stream: &mut TcpStream, head: &Head) -> io::Result<()> {
    let mut bytes = vec![0; head.len];
    stream.read_exact(&mut bytes).await.map(drop)
}

/// Why a request's body could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Longer than the bound: 413.
    TooLarge,
    /// Sent in chunks, with no length given: 411.
    NoLength,
    /// A `Content-Length` that is not one number: 400.
    BadLength,
    /// The client went away, or was too slow.
    Closed,
}

/// Reads the body of `request` (its head already consumed) from `stream`,
/// at most `max` bytes, within `within`. Only bodies with a
/// `Content-Length` are taken.
pub(crate) async fn read_body(
    stream: &mut TcpStream,
    request: &Request,
    max: usize,
    within: Duration,
) -> Result<Vec<u8>, BodyError> {
    let headers = request.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(BodyError::NoLength);
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or(BodyError::BadLength)?,
        (Some(_), Some(_)) => return Err(BodyError::BadLength),
    };
    if len > max {
        return Err(BodyError::TooLarge);
    }
    let mut body = vec![0; len];
    match timeout(within, stream.read_exact(&mut body)).await {
        Ok(Ok(_)) => Ok(body),
        _ => Err(BodyError::Closed),
    }
}

pub(crate) fn body(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    let mut reply = Response::new(body.into());
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

pub(crate) fn text(status: StatusCode, message: &str) -> Response<Bytes> {
    body(
        status,
        "text/plain; charset=utf-8",
        Bytes::copy_from_slice(message.as_bytes()),
    )
}

pub(crate) fn no_store(mut reply: Response<Bytes>) -> Response<Bytes> {
    reply
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

/// A `HEAD` request gets the `GET` response's head only.
pub(crate) fn reply_for(request: &Request, reply: Response<Bytes>) -> Response<Bytes> {
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

/// Whether the client wants the connection kept open (HTTP/1.1 without
/// `Connection: close`).
pub(crate) fn wants_keep_alive(request: &Request) -> bool {
    let close = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    request.version() == Version::HTTP_11 && !close
}

pub(crate) fn has_body(request: &Request) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

/// Serializes a response head.
pub(crate) fn encode_head(reply: &Response<Bytes>, close: bool) -> String {
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

/// Writes a response within `write_timeout`; with `close`, then shuts the
/// connection down gracefully. False when the connection is unusable.
pub(crate) async fn write_response(
    stream: &mut TcpStream,
    reply: &Response<Bytes>,
    close: bool,
    write_timeout: Duration,
) -> bool {
    let head = encode_head(reply, close);
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(reply.body()).await?;
        stream.flush().await
    };
    let written = matches!(timeout(write_timeout, write).await, Ok(Ok(())));
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
