//! The real `chat-server` binary as a child process, for tests that kill
//! or signal it.
#![allow(dead_code, unreachable_pub)]

pub mod ws;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary: this build's, or another (a change's "before", to show
/// that a test fails there) named by `CHAT_SERVER_BIN`.
pub fn program() -> String {
    std::env::var("CHAT_SERVER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_chat-server").to_owned())
}

/// Starts the binary with `args`, its log (level `info`, no colours) on a
/// pipe to read.
pub fn logging(args: &[&str]) -> Child {
    Command::new(program())
        .args(args)
        .env("RUST_LOG", "info")
        // Not set: the log is on a pipe, which alone must turn colours off.
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chat-server")
}

// Also loaded by the other support module when a test uses both: each
// picks from its own part of the range.
#[allow(clippy::duplicate_mod)]
#[path = "../../../../tests/support/ports.rs"]
mod ports;
const PORTS_PART: u32 = 1;
/// A loopback port nobody listens on now (below the ephemeral range, so
/// that a server restarted on it finds it free).
pub use ports::free_port;

/// The server process; killed when dropped, so a failing test leaves no
/// server behind.
pub struct ServerProcess {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
}

impl ServerProcess {
    /// Starts the binary on a free loopback port with its store in `dir`
    /// and `args` besides, and waits until it accepts connections.
    pub fn start(dir: &Path, args: &[&str]) -> ServerProcess {
        ServerProcess::start_on(dir, free_port(), args)
    }

    /// [`start`](Self::start) on a chosen port (a restart keeps its port).
    pub fn start_on(dir: &Path, port: u16, args: &[&str]) -> ServerProcess {
        let child = Command::new(program())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", &dir.display().to_string()])
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start chat-server");
        let mut server = ServerProcess { child, port };
        server.wait_until_it_answers();
        server
    }

    /// Waits until this process answers HTTP on its port (any status: a
    /// cluster node catching up answers 503). A TCP connect alone is not
    /// enough: it only shows that some socket listens there.
    fn wait_until_it_answers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "chat-server on port {} exited while starting ({status}); its log is above",
                    self.port
                );
            }
            if answers_http(self.port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chat-server on port {} did not answer within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A panic message for a client that failed against this server: the
    /// client's error, and whether the process is still running.
    pub fn failed(&mut self, what: &str, error: impl std::fmt::Debug) -> String {
        let state = match self.child.try_wait() {
            Ok(None) => "still running".to_owned(),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("unknown: {e}"),
        };
        format!(
            "{what} on port {}: {error:?} (the server is {state}; its log is above)",
            self.port
        )
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// Waits for the process to end.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// SIGTERM.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(sent, "SIGTERM sent");
    }

    /// The exit code, if the process ends within `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Whether something on `port` answers `GET /healthz` with an HTTP status
/// line.
fn answers_http(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 ")
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the node at `port` says it serves.
pub async fn serving(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "node on {port} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
