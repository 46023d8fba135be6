//! The processes of a chaos run: NATS (one server, or three routed with
//! R3), three chat-server nodes with data directories, and nginx with
//! `deploy/nginx.conf` in front of them; and a supervisor that does what
//! systemd and an operator would: a node that exits is started again, and
//! one that stopped serving (a rewound stream) is restarted.

use crate::binary;
use crate::nats::{NatsCluster, NatsServer};
use crate::nginx::Nginx;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nodes' `--cluster-timeout`: a SIGSTOP lasts longer.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(2);

/// NATS in one of the two shapes the run tries.
pub enum Nats {
    One(NatsServer),
    Three(NatsCluster),
}

impl Nats {
    /// What the nodes are given with `--cluster`: every server.
    /// Every NATS server's address, for a client of the test itself
    /// (`async_nats::connect` takes no comma-separated list).
    pub fn addrs(&self) -> Vec<async_nats::ServerAddr> {
        self.urls()
            .split(',')
            .map(|u| u.parse().expect("a NATS URL"))
            .collect()
    }

    pub fn urls(&self) -> String {
        match self {
            Nats::One(n) => n.url(),
            Nats::Three(c) => (0..3).map(|i| c.url(i)).collect::<Vec<_>>().join(","),
        }
    }

    pub fn replicas(&self) -> usize {
        match self {
            Nats::One(_) => 1,
            Nats::Three(_) => 3,
        }
    }

    pub fn kill(&mut self, i: usize) {
        match self {
            Nats::One(n) => n.kill(),
            Nats::Three(c) => c.kill(i),
        }
    }

    pub fn restart(&mut self, i: usize) {
        match self {
            Nats::One(n) => n.restart(),
            Nats::Three(c) => c.restart(i),
        }
    }

    /// The index of the server that leads stream `chat` (R3), if known.
    pub fn leader(&self) -> Option<usize> {
        let Nats::Three(_) = self else {
            return Some(0);
        };
        let addrs = self.addrs();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let client = tokio::time::timeout(Duration::from_secs(3), async_nats::connect(addrs))
                .await
                .ok()?
                .ok()?;
            let js = async_nats::jetstream::new(client);
            let mut stream = tokio::time::timeout(Duration::from_secs(3), js.get_stream("chat"))
                .await
                .ok()?
                .ok()?;
            let info = tokio::time::timeout(Duration::from_secs(3), stream.info())
                .await
                .ok()?
                .ok()?;
            let leader = info.cluster.as_ref()?.leader.clone()?;
            leader.strip_prefix('n')?.parse().ok()
        })
    }
}

/// One chat-server node: a slot (its port), and the process in it.
pub struct Node {
    pub slot: usize,
    pub port: u16,
    /// Bumped when the slot gets a brand-new node (empty data directory).
    generation: u32,
    dir: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
    pub paused: bool,
    /// Consecutive supervisor checks that found it stopped serving.
    stopped_checks: u32,
}

impl Node {
    pub fn new(slot: usize, logs: &Path) -> Node {
        Node {
            slot,
            port: binary::free_port(),
            generation: 0,
            dir: tempfile::tempdir().expect("data dir"),
            log: logs.join(format!("node-{slot}.log")),
            child: None,
            paused: false,
            stopped_checks: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn start(&mut self, nats: &Nats) {
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        let _ = writeln!(
            log,
            "==== chaos: starting n{}-{} ====",
            self.slot, self.generation
        );
        let err = log.try_clone().expect("log");
        let child = Command::new(binary::program())
            .args(["--listen", &self.addr().to_string()])
            .args(["--data-dir", &self.dir.path().display().to_string()])
            .args(["--cluster", &nats.urls()])
            .args(["--cluster-replicas", &nats.replicas().to_string()])
            .args(["--node-id", &format!("n{}-{}", self.slot, self.generation)])
            .args(["--identity", "raw-ip", "--trusted-proxy", "127.0.0.1"])
            .args([
                "--cluster-timeout",
                &format!("{}s", CLUSTER_TIMEOUT.as_secs()),
            ])
            .args(["--cluster-snapshot-every", "40"])
            .args(["--history-limit", "100000", "--message-rate", "40"])
            .args(["--shutdown-grace", "2s"])
            .args([
                "--admin-keys-file",
                &keys_file(&self.log).display().to_string(),
            ])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start chat-server");
        self.child = Some(child);
        self.paused = false;
        self.stopped_checks = 0;
    }

    /// SIGKILL (a SIGSTOPped process dies too).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// The next start is a brand-new node: another id, an empty directory.
    pub fn forget(&mut self) {
        self.generation += 1;
        self.dir = tempfile::tempdir().expect("data dir");
    }

    pub fn signal(&mut self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            self.paused = signal == "-STOP";
        }
    }

    /// Whether its process has ended (and so a supervisor starts it).
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_some(),
            None => false,
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `/healthz`: the status code and body, or `None` if it does not
    /// answer within a second.
    pub fn health(&self) -> Option<(u16, String)> {
        let mut s =
            std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        let code = answer.get(9..12)?.parse().ok()?;
        let body = answer.split_once("\r\n\r\n")?.1.to_owned();
        Some((code, body))
    }

    /// The last line of its log.
    fn last_words(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
            .to_owned()
    }

    /// Every line of its log that shows a panic.
    pub fn panics(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM, and its exit status.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The operator keys file, beside the nodes' logs.
fn keys_file(log: &Path) -> PathBuf {
    log.with_file_name("operators.keys")
}

/// Everything a run starts.
pub struct Cluster {
    pub nats: Nats,
    pub nodes: Vec<Node>,
    pub nginx: Nginx,
    /// Restarts the supervisor made, and why.
    pub restarts: Vec<String>,
    pub logs: tempfile::TempDir,
}

impl Cluster {
    pub fn start(three_nats: bool) -> Cluster {
        let nats = if three_nats {
            Nats::Three(NatsCluster::start(3))
        } else {
            Nats::One(NatsServer::start())
        };
        let logs = tempfile::tempdir().expect("logs");
        let keys = keys_file(&logs.path().join("node"));
        std::fs::write(&keys, crate::moderator::keys_file()).expect("keys file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the keys file");
        }
        let mut nodes: Vec<Node> = (0..3).map(|i| Node::new(i, logs.path())).collect();
        for node in &mut nodes {
            node.start(&nats);
        }
        let nginx = Nginx::start(
            binary::free_port(),
            &nodes.iter().map(Node::addr).collect::<Vec<_>>(),
        );
        let mut cluster = Cluster {
            nats,
            nodes,
            nginx,
            restarts: Vec::new(),
            logs,
        };
        cluster.settle(Duration::from_secs(60));
        cluster
    }

    /// One supervisor round: a node whose process ended is started again
    /// (as systemd's `Restart=on-failure`); one that answers 503 with a
    /// reason other than catching up, three checks in a row, is restarted
    /// (as an operator would; a node that found the stream rewound stays
    /// stopped until then).
    pub fn supervise(&mut self) {
        for node in &mut self.nodes {
            if !node.running() || node.paused {
                continue;
            }
            if node.exited() {
                node.child = None;
                self.restarts.push(format!(
                    "node {} exited ({}); started again",
                    node.slot,
                    node.last_words()
                ));
                node.start(&self.nats);
                continue;
            }
            match node.health() {
                Some((503, why)) if !why.contains("catching up") => {
                    node.stopped_checks += 1;
                    if node.stopped_checks >= 3 {
                        self.restarts.push(format!(
                            "node {} stopped serving ({}); restarted",
                            node.slot,
                            why.trim()
                        ));
                        node.kill();
                        node.start(&self.nats);
                    }
                }
                _ => node.stopped_checks = 0,
            }
        }
    }

    /// Sleeps `total`, supervising every 250 ms.
    pub fn wait(&mut self, total: Duration) {
        let end = Instant::now() + total;
        while Instant::now() < end {
            self.supervise();
            std::thread::sleep(Duration::from_millis(250).min(end - Instant::now()));
        }
    }

    /// Starts a brand-new node (an empty data directory, not behind
    /// nginx): it must compute the same chat from the stream and the
    /// snapshots alone.
    pub fn add_fresh_node(&mut self) {
        let mut node = Node::new(self.nodes.len(), self.logs.path());
        node.start(&self.nats);
        self.nodes.push(node);
    }

    /// Supervises until every node answers 200, or `within` passes.
    pub fn settle(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            self.supervise();
            if self
                .nodes
                .iter()
                .all(|n| n.health().is_some_and(|(code, _)| code == 200))
            {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
