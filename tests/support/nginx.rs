//! A real nginx in front of cluster nodes, as an operator would put it:
//! WebSocket upgrades passed through, `X-Forwarded-For` set, and a node
//! that refuses or is gone skipped for the next. Runs `nginx` from `PATH`
//! (or `$NGINX_BIN`) in the foreground with its own prefix directory;
//! `.ci/run` installs Debian's.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on a free port, balancing over `upstreams`.
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        // Debian puts it in /usr/sbin, which a user's PATH may lack.
        let bin = std::env::var_os("NGINX_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let sbin = PathBuf::from("/usr/sbin/nginx");
                sbin.exists().then_some(sbin)
            })
            .unwrap_or_else(|| PathBuf::from("nginx"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("prefix dir");
        let d = dir.path().display();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a} max_fails=0;\n"))
            .collect();
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
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream chat {{
{servers}  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://chat;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 1h;
      proxy_next_upstream error timeout http_503;
    }}
  }}
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
