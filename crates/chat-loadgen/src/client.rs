//! Connecting many clients, spread over loopback source addresses, and
//! recognising the load generator's own messages in what they receive.

use chat_proto::{ClientFrame, SendMessage};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Instant;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::Uri;

/// A connected client.
pub type Ws = WebSocketStream<TcpStream>;

/// Where to connect, and from which addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// The full `ws://` URL (the first, with several).
    pub url: String,
    /// The resolved server address.
    pub addr: SocketAddr,
    /// Distinct loopback source addresses to spread clients over, so that
    /// neither ephemeral ports nor per-address limits run out. Empty when
    /// the server is not on IPv4 loopback.
    pub sources: Vec<Ipv4Addr>,
    /// The other servers, with several URLs (the nodes of one cluster).
    pub others: Vec<(String, SocketAddr)>,
    /// With others: how many clients, from number 0, go to the first
    /// server (the senders, so that what they send crosses to the other
    /// nodes); the rest go round the others. With none set (0), every
    /// client goes round all of them.
    pub first_only: usize,
}

impl Target {
    /// Resolves `urls`, one or several separated by commas (a cluster's
    /// nodes); with a loopback server, clients use `sources` addresses
    /// `127.1.x.y`.
    pub async fn resolve(urls: &str, sources: usize) -> Result<Self, String> {
        let mut all = urls.split(',').map(str::trim);
        let mut target = Target::resolve_one(all.next().unwrap_or_default(), sources).await?;
        for url in all {
            let other = Target::resolve_one(url, 0).await?;
            target.others.push((other.url, other.addr));
        }
        Ok(target)
    }

    /// This target, with clients `0..n` on the first server only.
    pub fn first_only(&self, n: usize) -> Target {
        Target {
            first_only: n,
            ..self.clone()
        }
    }

    /// Server `k` alone: 0 is the first URL, 1 and on the others (round
    /// them when `k` is past the last).
    pub fn server(&self, k: usize) -> Target {
        let (url, addr) = match k {
            0 => (self.url.clone(), self.addr),
            k if !self.others.is_empty() => self.others[(k - 1) % self.others.len()].clone(),
            _ => (self.url.clone(), self.addr),
        };
        Target {
            url,
            addr,
            sources: self.sources.clone(),
            others: Vec::new(),
            first_only: 0,
        }
    }

    /// Client number `i`'s server.
    fn endpoint(&self, i: usize) -> (&str, SocketAddr) {
        let first = (self.url.as_str(), self.addr);
        if self.others.is_empty() || i < self.first_only {
            return first;
        }
        let k = if self.first_only > 0 {
            (i - self.first_only) % self.others.len()
        } else {
            match i % (self.others.len() + 1) {
                0 => return first,
                k => k - 1,
            }
        };
        (self.others[k].0.as_str(), self.others[k].1)
    }

    async fn resolve_one(url: &str, sources: usize) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad url {url}: {e}"))?;
        if uri.scheme_str() != Some("ws") {
            return Err(format!("{url}: only ws:// URLs are supported"));
        }
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let sources = match addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => (0..sources.max(1))
                .map(|i| Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 2))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Target {
            url: url.to_owned(),
            addr,
            sources,
            others: Vec::new(),
            first_only: 0,
        })
    }

    /// Connects client number `i` (its source address is `i`-th in the
    /// pool, round robin).
    pub async fn connect(&self, i: usize) -> Result<Ws, String> {
        self.connect_with(i, None).await
    }

    /// Like [`connect`](Self::connect), with the socket's receive buffer
    /// (SO_RCVBUF) set: a client that stops reading then holds little in
    /// its own kernel, and the server sees it stall sooner.
    pub async fn connect_with(&self, i: usize, recv_buffer: Option<u32>) -> Result<Ws, String> {
        let stream = self.tcp(i, recv_buffer).await?;
        let _ = stream.set_nodelay(true);
        let (ws, _) = tokio_tungstenite::client_async(self.endpoint(i).0, stream)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(ws)
    }

    /// A plain TCP connection from client number `i`'s source address, with
    /// no handshake (what a slowloris client opens).
    pub async fn tcp(&self, i: usize, recv_buffer: Option<u32>) -> Result<TcpStream, String> {
        let addr = self.endpoint(i).1;
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| e.to_string())?;
        if let Some(size) = recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| e.to_string())?;
        }
        if !self.sources.is_empty() {
            let src = self.sources[i % self.sources.len()];
            socket
                .bind(SocketAddr::new(IpAddr::V4(src), 0))
                .map_err(|e| format!("bind {src}: {e}"))?;
        }
        socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))
    }
}

/// Microseconds since the load generator started: one clock for senders
/// and receivers, which share the process.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Counts the readiness signals on `ready` until `want` came, the senders
/// are gone, or `within` passed: how many came.
pub async fn count_ready(
    ready: &mut tokio::sync::mpsc::Receiver<()>,
    want: usize,
    within: std::time::Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut came = 0;
    while came < want {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some(())) => came += 1,
            _ => break,
        }
    }
    came
}

/// A number that tells this run's messages from those of earlier runs still
/// in the server's history.
pub fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    nanos / 4 + std::process::id() % 1000
}

/// A load-generator message: `lg<run> <sender> <seq> <sent_us>`. Only ASCII
/// digits and spaces, so it appears unescaped in any server's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Distinguishes this run from messages left in history by earlier ones.
    pub run: u32,
    /// Which sender.
    pub sender: u32,
    /// The sender's sequence number, from 0.
    pub seq: u64,
    /// When it was (meant to be) sent, in [`now_us`] time.
    pub sent_us: u64,
}

impl Marker {
    /// Sender `sender`'s message `seq` of run `run`, sent now.
    pub fn now(run: u32, sender: u32, seq: u64) -> Marker {
        Marker {
            run,
            sender,
            seq,
            sent_us: now_us(),
        }
    }

    /// The `send_message` frame carrying this marker.
    pub fn frame(&self) -> String {
        ClientFrame::SendMessage(SendMessage {
            text: format!(
                "lg{} {} {} {}",
                self.run, self.sender, self.seq, self.sent_us
            ),
            author_name: Some("loadgen".into()),
        })
        .encode()
    }

    /// Finds a marker of run `run` in a received frame's text, without
    /// decoding the JSON (the receivers would otherwise need more CPU than
    /// the server under test).
    pub fn find(frame: &str, run: u32) -> Option<Marker> {
        let start = frame.find("\"lg")? + 3;
        let rest = &frame[start..];
        let end = rest.find('"')?;
        let mut parts = rest[..end].split(' ');
        let r: u32 = parts.next()?.parse().ok()?;
        if r != run {
            return None;
        }
        Some(Marker {
            run,
            sender: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            sent_us: parts.next()?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_through_a_message_frame() {
        let m = Marker {
            run: 7,
            sender: 3,
            seq: 42,
            sent_us: 123_456,
        };
        let sent = m.frame();
        // What a server would broadcast: the text inside a message frame.
        let text = chat_proto::ClientFrame::decode(&sent).expect("valid");
        let chat_proto::ClientFrame::SendMessage(s) = text else {
            panic!()
        };
        let broadcast = format!(
            r#"{{"type":"message","data":{{"id":"x","text":{},"author_id":"a"}}}}"#,
            serde_json::to_string(&s.text).expect("json")
        );
        assert_eq!(Marker::find(&broadcast, 7), Some(m));
        assert_eq!(Marker::find(&broadcast, 8), None, "other runs are ignored");
        assert_eq!(Marker::find(r#"{"text":"hello"}"#, 7), None);
    }

    #[tokio::test]
    async fn with_several_servers_the_senders_go_to_the_first_and_the_rest_round_the_others() {
        let t = Target::resolve(
            "ws://127.0.0.1:1/ws, ws://127.0.0.1:2/ws,ws://127.0.0.1:3/ws",
            4,
        )
        .await
        .expect("urls");
        let ports = |t: &Target| -> Vec<u16> { (0..6).map(|i| t.endpoint(i).1.port()).collect() };
        assert_eq!(ports(&t), [1, 2, 3, 1, 2, 3]);
        assert_eq!(ports(&t.first_only(2)), [1, 1, 2, 3, 2, 3]);
        assert_eq!(t.first_only(2).endpoint(2).0, "ws://127.0.0.1:2/ws");
        let one = Target::resolve("ws://127.0.0.1:1/ws", 4)
            .await
            .expect("url");
        assert_eq!(ports(&one.first_only(2)), [1; 6]);
        let port = |t: Target| t.addr.port();
        assert_eq!([0, 1, 2, 3].map(|k| port(t.server(k))), [1, 2, 3, 2]);
        assert_eq!(port(one.server(1)), 1, "with one server, every k is it");
    }
}
