//! A real server on a loopback port and real WebSocket clients, for the
//! end-to-end tests. Every frame a client receives is checked against the
//! schemas in `asyncapi.yaml`.
#![allow(dead_code, unreachable_pub)]

pub mod admin;
pub mod nats;
pub mod nginx;
pub mod raw;

use chat_proto::{
    AddReaction, ClientFrame, Message, ReactionUpdated, SendMessage, ServerFrame, Uuid,
};
use chat_server::Clock;
use chat_server::{CancellationToken, Config, IdentityMode, Server, Stopped};
use chat_testkit::FrameValidator;
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// The identity secret of [`test_config`] (as long as a real one must be).
pub const TEST_SECRET: &str = "a secret for the tests, long enough";

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

fn validator() -> &'static FrameValidator {
    static V: OnceLock<FrameValidator> = OnceLock::new();
    V.get_or_init(FrameValidator::server_frames)
}

/// A config for tests: port 0, raw-IP ids (readable in assertions), and a
/// fixed secret.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        identity: IdentityMode::RawIp,
        identity_secret: Some(TEST_SECRET.into()),
        in_memory: true,
        ..Config::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<Stopped>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        TestServer::start_with_clock(config, Clock::system()).await
    }

    /// A server whose clock starts at a chosen time.
    pub async fn start_with_clock(config: Config, clock: Clock) -> Self {
        let server = Server::bind_with_clock(config, clock)
            .await
            .expect("server binds");
        TestServer::from_bound(server)
    }

    /// Runs a server the test bound itself.
    pub fn from_bound(server: Server) -> Self {
        let addr = server.local_addr();
        let stop = server.shutdown_handle();
        let task = tokio::spawn(server.run());
        TestServer {
            addr,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Stops the server and waits for `run` to return.
    pub async fn shutdown(self) -> Stopped {
        self.stop.cancel();
        self.stopped_within(PATIENCE).await
    }

    /// Waits up to `within` for `run` to return, without asking it to.
    pub async fn stopped_within(mut self, within: Duration) -> Stopped {
        let task = self.task.take().expect("running");
        tokio::time::timeout(within, task)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
    }

    /// A TCP connection from `127.0.0.<n>`.
    pub async fn tcp_from(&self, n: u8) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
            .expect("bind loopback source");
        socket.connect(self.addr).await.expect("tcp connect")
    }

    /// After whatever a test did, a fresh client (from 127.0.0.250) can still
    /// chat: its own message comes back, after any history.
    pub async fn still_serves(&self) {
        let mut c = self.client(250).await;
        c.say("are you there?").await;
        loop {
            let m = c.message().await;
            if m.text == "are you there?" && m.author_id.as_str() == "127.0.0.250" {
                return;
            }
        }
    }

    /// A client from `127.0.0.<n>` on `path` whose kernel receive buffer
    /// is 4 KiB: once it stops reading, the server's writes back up fast.
    pub async fn tight_client(&self, n: u8, path: &str) -> Client {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket
            .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
            .expect("bind loopback source");
        let stream = socket.connect(self.addr).await.expect("tcp connect");
        let (ws, _) = tokio_tungstenite::client_async(self.url(path), stream)
            .await
            .expect("handshake");
        Client { ws }
    }

    /// A client from `127.0.0.<n>`: a distinct user per `n`.
    pub async fn client(&self, n: u8) -> Client {
        self.try_client(n, "/ws", &[]).await.expect("handshake")
    }

    /// A client from `127.0.0.<n>` with a chosen path and extra headers.
    pub async fn try_client(
        &self,
        n: u8,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, tungstenite::Error> {
        let stream = self.tcp_from(n).await;
        let mut request = self.url(path).into_client_request()?;
        for (k, v) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
        Ok(Client { ws })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a client saw next.
#[derive(Debug)]
pub enum Seen {
    Frame(ServerFrame),
    Closed(Option<CloseFrame>),
}

pub struct Client {
    pub ws: WebSocketStream<TcpStream>,
}

impl Client {
    pub async fn send(&mut self, frame: &ClientFrame) {
        self.send_text(&frame.encode()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text)).await.expect("send");
    }

    pub async fn say(&mut self, text: &str) {
        self.send(&say(text)).await;
    }

    pub async fn react(&mut self, id: Uuid, emoji: &str) {
        self.send(&ClientFrame::AddReaction(AddReaction {
            message_id: id,
            emoji: emoji.into(),
        }))
        .await;
    }

    /// The next frame or close, checked against asyncapi.yaml. Pings and
    /// pongs are skipped.
    pub async fn next(&mut self) -> Seen {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("nothing arrived in time");
            match msg {
                None => return Seen::Closed(None),
                Some(Err(_)) => return Seen::Closed(None),
                Some(Ok(WsMessage::Text(text))) => {
                    validator().assert_valid(&text);
                    let frame = ServerFrame::decode(&text).expect("server frames decode");
                    return Seen::Frame(frame);
                }
                Some(Ok(WsMessage::Close(frame))) => return Seen::Closed(frame),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Seen::Frame(f) => f,
            Seen::Closed(c) => panic!("expected a frame, connection closed: {c:?}"),
        }
    }

    pub async fn message(&mut self) -> Message {
        match self.frame().await {
            ServerFrame::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn reaction(&mut self) -> ReactionUpdated {
        match self.frame().await {
            ServerFrame::ReactionUpdated(r) => r,
            other => panic!("expected reaction_updated, got {other:?}"),
        }
    }

    pub async fn error(&mut self) -> String {
        match self.frame().await {
            ServerFrame::Error(e) => e.error,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Reads messages until an error frame; returns the messages' texts and
    /// the error.
    pub async fn texts_until_error(&mut self) -> (Vec<String>, String) {
        let mut texts = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Message(m) => texts.push(m.text),
                ServerFrame::Error(e) => return (texts, e.error),
                other => panic!("expected messages, then an error; got {other:?}"),
            }
        }
    }

    /// For a client that opted in (`?sync`, `?since=`): reads frames until
    /// a `sync`, and returns the frames before it and the sync.
    pub async fn until_sync(&mut self) -> (Vec<ServerFrame>, chat_proto::SyncPoint) {
        let mut frames = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Sync(s) => return (frames, s),
                other => frames.push(other),
            }
        }
    }

    /// For a client that opted in: the next `n` frames that are not
    /// `sync`s.
    pub async fn frames_but_syncs(&mut self, n: usize) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.frame().await {
                ServerFrame::Sync(_) => {}
                other => out.push(other),
            }
        }
        out
    }

    /// Reads until the connection closes; returns the close frame, if any.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            if let Seen::Closed(c) = self.next().await {
                return c;
            }
        }
    }

    /// Asserts that no frame arrives for `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// Polls `check` every 20 ms until it holds; fails the test, naming
/// `what`, once [`PATIENCE`] has passed.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn say(text: &str) -> ClientFrame {
    ClientFrame::SendMessage(SendMessage {
        text: text.into(),
        author_name: None,
    })
}

pub fn say_as(text: &str, name: &str) -> ClientFrame {
    ClientFrame::SendMessage(SendMessage {
        text: text.into(),
        author_name: Some(name.into()),
    })
}
