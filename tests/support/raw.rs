//! A WebSocket client on a raw socket that keeps every byte the server
//! sent, for tests of the framing itself: where a frame ends, what
//! follows a close, and how the TCP stream ends.

use super::TestServer;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A text frame's opcode.
pub const TEXT: u8 = 0x1;
/// A close frame's opcode.
pub const CLOSE: u8 = 0x8;
/// A ping frame's opcode.
pub const PING: u8 = 0x9;
/// A pong frame's opcode.
pub const PONG: u8 = 0xA;

/// One frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    /// The reserved bits and the opcode: the first byte without FIN.
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// A close frame's code.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Splits what a server sent into its frames; also returns how many bytes
/// at the end are not a whole frame. Server frames are never masked: a
/// masked one is returned as an error.
pub fn parse(mut bytes: &[u8]) -> Result<(Vec<RawFrame>, usize), String> {
    let mut frames = Vec::new();
    loop {
        if bytes.len() < 2 {
            return Ok((frames, bytes.len()));
        }
        if bytes[1] & 0x80 != 0 {
            return Err(format!(
                "a masked server frame after {} frames",
                frames.len()
            ));
        }
        let (len, header) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u64::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return Ok((frames, bytes.len())),
            n => (u64::from(n), 2),
        };
        let end = header + usize::try_from(len).map_err(|_| "a frame longer than memory")?;
        if bytes.len() < end {
            return Ok((frames, bytes.len()));
        }
        frames.push(RawFrame {
            fin: bytes[0] & 0x80 != 0,
            opcode: bytes[0] & 0x7f,
            payload: bytes[header..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
}

/// How a TCP stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An orderly end (FIN).
    Eof,
    /// A reset (RST), or another read error.
    Reset,
    /// Still open when the test stopped waiting.
    Open,
}

/// A client that does its own framing.
pub struct RawClient {
    pub stream: TcpStream,
    /// Every byte received after the handshake's response head.
    pub received: Vec<u8>,
}

/// A valid `Sec-WebSocket-Key` (RFC 6455's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl RawClient {
    /// Connects from `127.0.0.<n>` to `path`, with a kernel receive buffer
    /// of `recv_buffer` bytes if given, and completes the handshake.
    pub async fn connect(
        server: &TestServer,
        n: u8,
        path: &str,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("rcvbuf");
        }
        socket
            .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
            .expect("bind loopback source");
        let mut stream = socket.connect(server.addr).await.expect("tcp connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write the handshake");
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        let body_at = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = tokio::time::timeout(super::PATIENCE, stream.read(&mut chunk))
                .await
                .expect("a response in time")
                .expect("read the response");
            assert!(n > 0, "the server hung up during the handshake");
            head.extend_from_slice(&chunk[..n]);
        };
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "not upgraded: {}",
            String::from_utf8_lossy(&head[..body_at])
        );
        RawClient {
            stream,
            received: head[body_at..].to_vec(),
        }
    }

    /// Sends one masked frame: `first` is the first byte (FIN, reserved
    /// bits and opcode).
    pub async fn send(&mut self, first: u8, payload: &[u8]) -> io::Result<()> {
        assert!(payload.len() < 126, "short frames only");
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![first, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await
    }

    /// Sends a close frame with `code`.
    pub async fn send_close(&mut self, code: u16) -> io::Result<()> {
        self.send(0x80 | CLOSE, &code.to_be_bytes()).await
    }

    /// Reads until at least `n` whole frames have arrived.
    pub async fn read_frames(&mut self, n: usize) -> Vec<RawFrame> {
        loop {
            let (frames, _) = parse(&self.received).expect("well-formed frames");
            if frames.len() >= n {
                return frames;
            }
            let mut chunk = [0u8; 4096];
            let got = tokio::time::timeout(super::PATIENCE, self.stream.read(&mut chunk))
                .await
                .expect("frames in time")
                .expect("read");
            assert!(got > 0, "the server hung up after {} frames", frames.len());
            self.received.extend_from_slice(&chunk[..got]);
        }
    }

    /// Reads everything until the stream ends or `within` passes,
    /// answering the server's close frame with one of its own (as a
    /// client must), and says how the stream ended.
    pub async fn read_to_end(&mut self, within: Duration) -> End {
        let deadline = tokio::time::Instant::now() + within;
        let mut answered = false;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if !answered
                && let Ok((frames, _)) = parse(&self.received)
                && let Some(code) = frames.iter().find_map(RawFrame::close_code)
            {
                answered = true;
                // The server may be gone already: that is for the caller
                // to judge from what arrived.
                let _ = self.send_close(code).await;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return End::Open,
                Ok(Ok(0)) => return End::Eof,
                Ok(Ok(n)) => self.received.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => return End::Reset,
            }
        }
    }
}
