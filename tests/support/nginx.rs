//! A real nginx in front of cluster nodes, with the configuration an
//! operator is given: `deploy/nginx.conf`, with only its node addresses and
//! its port replaced. Runs `nginx` from `PATH` (or `$NGINX_BIN`) in the
//! foreground with its own prefix directory; `.ci/run` installs Debian's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The documented configuration (`http {}` context).
const DEPLOYED: &str = include_str!("../../deploy/nginx.conf");

/// `DEPLOYED` with `upstreams` for its nodes and nginx on `port`. Panics if
/// the file no longer has the shape this replaces, so that the document
/// and the tests cannot drift apart unnoticed.
pub fn site(upstreams: &[SocketAddr], port: u16) -> String {
    let mut out = String::new();
    let (mut in_upstream, mut nodes, mut listens) = (false, 0, 0);
    for line in DEPLOYED.lines() {
        let code = line.trim();
        if code.starts_with("upstream chat {") {
            in_upstream = true;
        } else if in_upstream && code == "}" {
            in_upstream = false;
        } else if in_upstream && code.starts_with("server ") {
            nodes += 1;
            if nodes == 1 {
                // The documented parameters (max_fails, ...), kept.
                let params: Vec<&str> = code.trim_end_matches(';').split_whitespace().collect();
                for a in upstreams {
                    out.push_str(&format!("    server {a} {};\n", params[2..].join(" ")));
                }
            }
            continue;
        } else if code.starts_with("listen ") {
            listens += 1;
            out.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        nodes > 0 && listens == 1,
        "deploy/nginx.conf: expected `server` lines in `upstream chat` and one `listen`"
    );
    out
}

pub struct Nginx {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on loopback `port` (a free one from the tests' `free_port`:
    /// not one the kernel hands out, which an outgoing connection could
    /// hold), balancing over `upstreams`.
    pub fn start(port: u16, upstreams: &[SocketAddr]) -> Nginx {
        // Debian puts it in /usr/sbin, which a user's PATH may lack.
        let bin = std::env::var_os("NGINX_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let sbin = PathBuf::from("/usr/sbin/nginx");
                sbin.exists().then_some(sbin)
            })
            .unwrap_or_else(|| PathBuf::from("nginx"));
        let dir = tempfile::tempdir().expect("prefix dir");
        let d = dir.path().display();
        std::fs::write(dir.path().join("chat.conf"), site(upstreams, port)).expect("chat.conf");
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  include {d}/chat.conf;
}}
"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}. This test needs nginx: `apt-get install nginx`, or set NGINX_BIN",
                    bin.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
