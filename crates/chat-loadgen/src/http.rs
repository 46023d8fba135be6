//! Reading one plain HTTP/1.1 response, for clients that load the page,
//! `/whoami` or `/metrics` (the soak's "browsers", and the end-to-end
//! tests). Parsed with `httparse`; head and body are bounded.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// A response as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (`content-length` bytes).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response to a `GET`. See [`read_response_to`].
pub async fn read_response(stream: &mut TcpStream) -> Result<Response, String> {
    read_response_to(stream, false).await
}

/// Reads one response; with `head_only` (the answer to a `HEAD`, or a 304)
/// there is no body whatever `content-length` says. Bytes past the body are
/// an error: without pipelining, the server has nothing else to send.
pub async fn read_response_to(stream: &mut TcpStream, head_only: bool) -> Result<Response, String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed
            .parse(&buf)
            .map_err(|e| format!("bad response: {e}"))?
        {
            httparse::Status::Complete(len) => {
                let status = parsed.code.ok_or("no status")?;
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_owned(), value)
                    })
                    .collect();
                let mut response = Response {
                    status,
                    headers,
                    body: buf.split_off(len),
                };
                // 1xx, 204 and 304 responses never have a body.
                let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
                let length = if head_only || bodiless {
                    0
                } else {
                    response
                        .header("content-length")
                        .ok_or("no content-length")?
                        .parse::<usize>()
                        .map_err(|e| format!("bad content-length: {e}"))?
                };
                if length > MAX_BODY {
                    return Err(format!("body of {length} bytes is over the bound"));
                }
                while response.body.len() < length {
                    let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("closed mid-body".into());
                    }
                    response.body.extend_from_slice(&chunk[..n]);
                }
                // After a 101 the connection speaks another protocol.
                if status != 101 && response.body.len() != length {
                    return Err("bytes past the body".into());
                }
                return Ok(response);
            }
            httparse::Status::Partial if buf.len() >= MAX_HEAD => {
                return Err("response head over the bound".into());
            }
            httparse::Status::Partial => {
                let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed before a response".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}
