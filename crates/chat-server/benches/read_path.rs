//! What tungstenite's read buffer size costs per incoming command.
//!
//! The server gives tungstenite no read buffer of its own
//! (`read_buffer_size(0)`), so that a connection that has sent nothing
//! holds none; tungstenite then asks its stream for at most 14 bytes (a
//! frame header's worth) per read. The connection's reads from the
//! socket are `--read-buffer-size` chunks, so those small reads are copies
//! out of memory, not system calls. This measures what they cost, against
//! a 4 KiB buffer, decoding 1,000 masked 500-byte commands from memory.
//!
//! Run: `cargo bench -p chat-server --bench read_path`

use divan::Bencher;
use futures_util::StreamExt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

fn main() {
    divan::main();
}

const COMMANDS: usize = 1000;

/// Bytes to read, served as a socket's chunks are.
struct Feed {
    bytes: Vec<u8>,
    at: usize,
    /// How many reads tungstenite made.
    reads: usize,
}

impl AsyncRead for Feed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let n = buf.remaining().min(this.bytes.len() - this.at);
        buf.put_slice(&this.bytes[this.at..this.at + n]);
        this.at += n;
        this.reads += 1;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Feed {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// 1,000 masked text frames of a 500-character command each.
fn commands() -> Vec<u8> {
    let text = format!(
        r#"{{"type":"send_message","data":{{"text":"{}"}}}}"#,
        "x".repeat(500)
    );
    let mask = [1u8, 2, 3, 4];
    let mut out = Vec::new();
    for _ in 0..COMMANDS {
        out.extend_from_slice(&[0x81, 0x80 | 126]);
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(&mask);
        out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    out
}

#[divan::bench(args = [0, 4096])]
fn decode_1000_commands(bencher: Bencher<'_, '_>, read_buffer_size: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let bytes = commands();
    let config = WebSocketConfig::default().read_buffer_size(read_buffer_size);
    bencher.bench_local(|| {
        runtime.block_on(async {
            let feed = Feed {
                bytes: bytes.clone(),
                at: 0,
                reads: 0,
            };
            let mut ws = WebSocketStream::from_raw_socket(feed, Role::Server, Some(config)).await;
            for _ in 0..COMMANDS {
                ws.next().await.expect("a frame").expect("a command");
            }
            ws.get_ref().reads
        })
    });
}
