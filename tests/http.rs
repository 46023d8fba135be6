//! Plain HTTP on the WebSocket port: the page, `/healthz`, `/metrics`,
//! `/whoami`, and the bounds on requests. Requests are written byte for
//! byte on raw TCP connections; responses are parsed with `httparse`.

mod support;

use chat_loadgen::http::{Response, read_response_to};
use chat_proto::WhoAmI;
use std::time::Duration;
use support::{PATIENCE, TestServer, eventually, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The body as text.
fn text(reply: &Response) -> &str {
    std::str::from_utf8(&reply.body).expect("utf-8 body")
}

/// Reads one response (the head only for a `HEAD`), within [`PATIENCE`].
async fn read_reply(stream: &mut TcpStream, head_only: bool) -> Response {
    timeout(PATIENCE, read_response_to(stream, head_only))
        .await
        .expect("response in time")
        .expect("a well-formed response")
}

/// Sends `request` on a new connection from 127.0.0.`n` and reads the reply.
async fn request_from(server: &TestServer, n: u8, request: &str) -> Response {
    let mut stream = server.tcp_from(n).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    read_reply(&mut stream, request.starts_with("HEAD")).await
}

async fn get(server: &TestServer, path: &str) -> Response {
    request_from(
        server,
        2,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )
    .await
}

/// Whether the server closes the connection (EOF or reset) within `within`.
async fn closes(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 1024];
    let read_all = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    timeout(within, read_all).await.is_ok()
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_safe_headers() {
    let server = TestServer::start(test_config()).await;
    let page = get(&server, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(text(&page).contains("<script src=\"/app.js\""));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    for (path, kind) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/icon.svg", "image/svg+xml"),
    ] {
        let file = get(&server, path).await;
        assert_eq!(file.status, 200, "{path}");
        assert!(file.header("content-type").expect("type").starts_with(kind));
        assert!(!file.body.is_empty());
    }
    // A query string does not change the route.
    assert_eq!(get(&server, "/?utm=x").await.status, 200);

    // Revalidation: the same ETag gets 304 with no body; another gets 200.
    let etag = page.header("etag").expect("etag").to_owned();
    let again = request_from(
        &server,
        2,
        &format!("GET / HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: {etag}\r\n\r\n"),
    )
    .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    let stale = request_from(
        &server,
        2,
        "GET / HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: \"old\"\r\n\r\n",
    )
    .await;
    assert_eq!(stale.status, 200);

    // HEAD: the length of the page, no body.
    let head = request_from(&server, 2, "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(page.body.len().to_string().as_str())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn healthz_and_unknown_paths() {
    let server = TestServer::start(test_config()).await;
    let health = get(&server, "/healthz").await;
    assert_eq!((health.status, text(&health)), (200, "ok\n"));
    assert_eq!(health.header("cache-control"), Some("no-store"));
    for path in [
        "/nope",
        "/ws/",
        "/app.js/",
        "/healthz/x",
        "/%2e%2e/etc/passwd",
    ] {
        assert_eq!(get(&server, path).await.status, 404, "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn whoami_is_the_id_the_server_gives_this_client() {
    let mut config = test_config();
    config.trusted_proxies = vec!["127.0.0.9/32".parse().expect("net")];
    let server = TestServer::start(config).await;
    let mut client = server.client(5).await;
    client.say("who am I?").await;
    let author = client.message().await.author_id;

    let reply = request_from(
        &server,
        5,
        "GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let who: WhoAmI = serde_json::from_slice(&reply.body).expect("a WhoAmI body");
    assert_eq!(who.user_id, author);

    // Another address is another user.
    let other = request_from(
        &server,
        6,
        "GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    let other: WhoAmI = serde_json::from_slice(&other.body).expect("body");
    assert_ne!(other.user_id, author);

    // Behind a trusted proxy, the forwarded address counts, as it does for
    // the WebSocket; an untrusted peer's header is ignored.
    let forwarded = "GET /whoami HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 127.0.0.5\r\n\r\n";
    let proxied: WhoAmI =
        serde_json::from_slice(&request_from(&server, 9, forwarded).await.body).expect("body");
    assert_eq!(proxied.user_id, author);
    let spoofed: WhoAmI =
        serde_json::from_slice(&request_from(&server, 6, forwarded).await.body).expect("body");
    assert_ne!(spoofed.user_id, author);
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let mut config = test_config();
    config.message_rate = 2;
    let server = TestServer::start(config).await;
    let mut a = server.client(2).await;
    let mut b = server.client(3).await;
    a.say("one").await;
    let id = b.message().await.id;
    a.message().await;
    a.say("two").await;
    b.message().await;
    a.message().await;
    a.say("three").await;
    assert!(a.error().await.starts_with("Rate limit exceeded"));
    a.send_text("not json").await;
    assert!(a.error().await.starts_with("Invalid message format"));
    b.react(id, "👍").await;
    a.reaction().await;
    let refused = server.try_client(2, "/elsewhere", &[]).await;
    assert!(refused.is_err());

    let metrics = get(&server, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .expect("type")
            .starts_with("application/openmetrics-text")
    );
    let scraped = text(&metrics);
    for line in [
        "chat_connections_open 2",
        "chat_messages_accepted_total 2",
        "chat_reactions_accepted_total 1",
        "chat_history_messages 2",
        "chat_frames_refused_total{reason=\"rate_limited\"} 1",
        "chat_frames_refused_total{reason=\"invalid_format\"} 1",
        "chat_handshakes_refused_total{reason=\"not_found\"} 1",
        "chat_slow_clients_dropped_total 0",
        "chat_store_failing 0",
    ] {
        assert!(
            scraped.lines().any(|l| l == line),
            "missing {line:?} in\n{scraped}"
        );
    }
    assert!(scraped.contains("# TYPE chat_store_commit_seconds histogram"));
    assert!(scraped.ends_with("# EOF\n"));

    drop(b);
    // Closed connections are counted by reason once the server sees them.
    eventually("the close is counted", || async {
        let scraped = text(&get(&server, "/metrics").await).to_owned();
        // Every reason is listed from the start, at 0: one must be at 1.
        scraped.lines().any(|l| l == "chat_connections_open 1")
            && scraped.lines().any(|l| {
                l.starts_with("chat_connections_closed_total{reason=") && l.ends_with("} 1")
            })
    })
    .await;
    server.shutdown().await;
}

/// A server with its store in a fresh directory (kept while the handle is).
async fn durable_server() -> (tempfile::TempDir, TestServer) {
    durable_server_with(test_config()).await
}

async fn durable_server_with(mut config: chat_server::Config) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    config.in_memory = false;
    config.data_dir = dir.path().to_owned();
    (dir, TestServer::start(config).await)
}

/// Takes SQLite's write lock beside the server, so its commits fail.
fn block_the_store(dir: &tempfile::TempDir) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(dir.path().join(chat_server::DB_FILE))
        .expect("open the database beside the server");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    blocker
}

/// While the store cannot write, a shutdown still ends within the grace
/// period (plus the moment the committer takes to notice), and what was
/// accepted but never written was never shown: after a restart, the
/// committed message is there and the held-back one is not.
#[tokio::test]
async fn shutdown_is_bounded_while_the_store_fails() {
    let grace = Duration::from_secs(1);
    let config = chat_server::Config {
        shutdown_grace: grace,
        ..test_config()
    };
    let (dir, server) = durable_server_with(config.clone()).await;
    let mut a = server.client(2).await;
    a.say("committed").await;
    assert_eq!(a.message().await.text, "committed");
    let blocker = block_the_store(&dir);
    a.say("held back").await;
    eventually("commits fail", || async {
        get(&server, "/healthz").await.status == 503
    })
    .await;
    let started = std::time::Instant::now();
    assert_eq!(server.shutdown().await, chat_server::Stopped::Gracefully);
    let took = started.elapsed();
    assert!(took < grace + Duration::from_secs(3), "took {took:?}");
    // In a real process the abandoned committer ends with the process; in
    // this test it lives on until its current attempt fails (the lock is
    // still held, so it does), holding the data directory until then.
    let config = chat_server::Config {
        in_memory: false,
        data_dir: dir.path().to_owned(),
        ..config
    };
    let mut tries = 0;
    let server = loop {
        match chat_server::Server::bind(config.clone()).await {
            Ok(server) => break server,
            Err(chat_server::StartError::Store(chat_server::StoreError::Locked { .. }))
                if tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart: {e}"),
        }
    };
    drop(blocker);
    let restarted = TestServer::from_bound(server);
    let mut b = restarted.client(3).await;
    assert_eq!(b.message().await.text, "committed");
    b.quiet_for(Duration::from_millis(300)).await;
    restarted.shutdown().await;
}

/// A store that keeps failing stops the server by itself, and `run` says
/// why, so the process exits non-zero.
#[tokio::test]
async fn a_store_failing_for_too_long_stops_the_server() {
    let config = chat_server::Config {
        shutdown_grace: Duration::from_secs(1),
        max_store_outage: Duration::from_secs(1),
        ..test_config()
    };
    let (dir, server) = durable_server_with(config).await;
    let mut a = server.client(2).await;
    let _blocker = block_the_store(&dir);
    a.say("held back").await;
    // SQLite waits out its 5 s busy timeout per attempt, then the outage
    // is noticed and the server stops within its grace.
    let stopped = server.stopped_within(Duration::from_secs(15)).await;
    assert_eq!(stopped, chat_server::Stopped::StoreFailed);
    let close = a.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
}

#[tokio::test]
async fn store_commits_are_timed() {
    let (_dir, server) = durable_server().await;
    let mut a = server.client(2).await;
    for i in 0..3 {
        a.say(&format!("durable {i}")).await;
        a.message().await;
    }
    let scraped = text(&get(&server, "/metrics").await).to_owned();
    let count: u64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("chat_store_commit_seconds_count "))
        .expect("commit count")
        .parse()
        .expect("a number");
    assert!((1..=3).contains(&count), "{count} commits for 3 messages");
    server.shutdown().await;
}

/// A store that cannot write: another connection holds SQLite's write lock,
/// so the server's commits fail (after SQLite's busy timeout) and are
/// retried. Meanwhile `/healthz` says 503, the gauge says failing, and the
/// message is neither published nor lost; once the lock goes, it arrives.
#[tokio::test]
async fn a_failing_store_turns_healthz_red_and_holds_messages_back() {
    let (dir, server) = durable_server().await;
    let mut a = server.client(2).await;
    assert_eq!(get(&server, "/healthz").await.status, 200);

    let blocker = rusqlite::Connection::open(dir.path().join(chat_server::DB_FILE))
        .expect("open the database beside the server");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    a.say("held back").await;
    eventually("/healthz turns 503 while commits fail", || async {
        get(&server, "/healthz").await.status == 503
    })
    .await;
    let scraped = text(&get(&server, "/metrics").await).to_owned();
    assert!(
        scraped.lines().any(|l| l == "chat_store_failing 1"),
        "{scraped}"
    );
    assert!(
        timeout(Duration::from_millis(50), a.next()).await.is_err(),
        "nothing is published before it is on disk"
    );

    blocker.execute_batch("ROLLBACK").expect("release the lock");
    assert_eq!(a.message().await.text, "held back");
    eventually("/healthz recovers", || async {
        get(&server, "/healthz").await.status == 200
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_a_close() {
    let mut config = test_config();
    config.max_request_head = 1024;
    let server = TestServer::start(config).await;
    let cases: Vec<(String, u16)> = vec![
        (
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".into(),
            405,
        ),
        (
            "DELETE /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n".into(),
            405,
        ),
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello".into(),
            413,
        ),
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .into(),
            413,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                "a".repeat(2000)
            ),
            431,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                (0..80).map(|i| format!("h{i}: v\r\n")).collect::<String>()
            ),
            431,
        ),
        ("GET / HTTP/9.9\r\n\r\n".into(), 400),
        (
            "\x16\x03\x01\x00\x25\x01\x00\x00\x21\x03\x03\r\n\r\n".into(),
            400,
        ),
        ("GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n".into(), 426),
        // RFC 9112: an HTTP/1.1 request without Host, or with two, is 400.
        ("GET / HTTP/1.1\r\n\r\n".into(), 400),
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n".into(),
            400,
        ),
    ];
    for (request, status) in cases {
        let mut stream = server.tcp_from(2).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let reply = read_reply(&mut stream, false).await;
        assert_eq!(reply.status, status, "{request:?}");
        assert_eq!(reply.header("connection"), Some("close"), "{request:?}");
        assert!(closes(&mut stream, PATIENCE).await, "{request:?} left open");
    }
    let allow = request_from(&server, 2, "PUT / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(allow.header("allow"), Some("GET, HEAD"));
    server.still_serves().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_still_understood() {
    let server = TestServer::start(test_config()).await;
    let mut stream = server.tcp_from(2).await;
    stream.set_nodelay(true).expect("nodelay");
    for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" {
        stream.write_all(&[*byte]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let reply = read_reply(&mut stream, false).await;
    assert_eq!((reply.status, text(&reply)), (200, "ok\n"));
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_serves_several_requests_then_upgrades() {
    let server = TestServer::start(test_config()).await;
    let mut stream = server.tcp_from(2).await;
    for path in ["/healthz", "/whoami", "/app.js"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let reply = read_reply(&mut stream, false).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("connection"), None, "{path}: kept alive");
    }
    // The same connection can then become a WebSocket.
    let request = "ws://localhost/ws"
        .parse::<tokio_tungstenite::tungstenite::http::Uri>()
        .expect("uri");
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade after plain requests");
    use futures_util::{SinkExt, StreamExt};
    let frame = support::say("after keep-alive").encode();
    ws.send(tokio_tungstenite::tungstenite::Message::text(frame))
        .await
        .expect("send");
    let echoed = timeout(PATIENCE, ws.next())
        .await
        .expect("in time")
        .expect("a frame")
        .expect("ok");
    assert!(echoed.to_text().expect("text").contains("after keep-alive"));

    // HTTP/1.0 and `Connection: close` are answered, then closed.
    for request in [
        "GET /healthz HTTP/1.0\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let mut stream = server.tcp_from(2).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let reply = read_reply(&mut stream, false).await;
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(closes(&mut stream, PATIENCE).await);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_server_answers_plain_requests_with_503_too() {
    let mut config = test_config();
    config.max_connections = 1;
    let server = TestServer::start(config).await;
    let _only = server.client(2).await;
    let reply = get(&server, "/").await;
    assert_eq!(reply.status, 503);
    assert!(reply.header("retry-after").is_some());
    server.shutdown().await;
}

/// A valid `Sec-WebSocket-Key` (RFC 6455's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A WebSocket handshake for /ws with `extra` header lines.
fn upgrade(method_and_version: (&str, &str), extra: &str) -> String {
    let (method, version) = method_and_version;
    format!("{method} /ws {version}\r\nHost: localhost\r\n{extra}\r\n")
}

fn standard(extra: &str) -> String {
    upgrade(
        ("GET", "HTTP/1.1"),
        &format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}"
        ),
    )
}

/// Handshakes that are legal but written as proxies write them: header
/// lists split over lines, or with other tokens beside the one that counts.
#[tokio::test]
async fn handshakes_as_proxies_write_them_are_accepted() {
    let server = TestServer::start(test_config()).await;
    let base = "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for headers in [
        "Upgrade: websocket\r\nConnection: keep-alive\r\nConnection: Upgrade\r\n",
        "Upgrade: h2c, websocket\r\nConnection: keep-alive, Upgrade\r\n",
        "upgrade: WebSocket\r\nconnection: upgrade\r\n",
    ] {
        let request = upgrade(("GET", "HTTP/1.1"), &format!("{headers}{base}"));
        let mut stream = server.tcp_from(2).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let reply = read_reply(&mut stream, true).await;
        assert_eq!(reply.status, 101, "{request:?}");
        assert_eq!(
            reply.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "RFC 6455's example answer"
        );
        assert_eq!(reply.header("content-length"), None, "a 101 has no body");
    }
    server.shutdown().await;
}

/// Every malformed handshake gets its HTTP status, and is counted: none is
/// closed without a word.
#[tokio::test]
async fn malformed_handshakes_get_their_status_and_are_counted() {
    let server = TestServer::start(test_config()).await;
    let upgrade_only = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases: Vec<(String, u16, &str)> = vec![
        (
            standard("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
            400,
            "bad_upgrade",
        ),
        (standard("").replace(KEY, "short"), 400, "bad_upgrade"),
        (
            standard("").replace("Version: 13", "Version: 8"),
            426,
            "unsupported_version",
        ),
        (
            standard("").replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "bad_upgrade",
        ),
        (
            standard("").replace("GET", "POST"),
            405,
            "method_not_allowed",
        ),
        (
            standard("").replace("GET", "HEAD"),
            405,
            "method_not_allowed",
        ),
        (
            standard("Content-Length: 5\r\n") + "hello",
            413,
            "body_not_allowed",
        ),
        (
            upgrade(("GET", "HTTP/1.1"), upgrade_only),
            400,
            "bad_upgrade",
        ),
        (
            standard("").replace("Host: localhost\r\n", ""),
            400,
            "bad_host",
        ),
        (standard("Host: localhost\r\n"), 400, "bad_host"),
    ];
    for (request, status, reason) in &cases {
        let mut stream = server.tcp_from(2).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let reply = read_reply(&mut stream, request.starts_with("HEAD")).await;
        assert_eq!(reply.status, *status, "{request:?}");
        if *status == 426 {
            assert_eq!(reply.header("sec-websocket-version"), Some("13"));
        }
        if *status == 405 {
            assert_eq!(reply.header("allow"), Some("GET"));
        }
        assert!(closes(&mut stream, PATIENCE).await, "{request:?} left open");
        let scraped = text(&get(&server, "/metrics").await).to_owned();
        let counted = format!("chat_handshakes_refused_total{{reason=\"{reason}\"}}");
        assert!(
            scraped.contains(&counted),
            "{request:?}: {counted} in {scraped}"
        );
    }
    server.still_serves().await;
    server.shutdown().await;
}

/// DNS rebinding: a page on the attacker's name, resolved to this server,
/// sends its own name as `Host` and its own origin as `Origin`, a pair the
/// same-origin check alone would pass. On loopback only loopback names and
/// address literals are answered; a listed public host is.
#[tokio::test]
async fn a_rebinding_page_is_refused_on_loopback() {
    let server = TestServer::start(test_config()).await;
    let port = server.addr.port();
    let forged = format!("rebind.example:{port}");
    let origin = format!("http://rebind.example:{port}");
    let ws = standard(&format!("Origin: {origin}\r\n"))
        .replace("Host: localhost", &format!("Host: {forged}"));
    let page = format!("GET / HTTP/1.1\r\nHost: {forged}\r\n\r\n");
    assert_eq!(request_from(&server, 2, &ws).await.status, 403);
    assert_eq!(request_from(&server, 2, &page).await.status, 403);
    let whoami = format!("GET /whoami HTTP/1.1\r\nHost: {forged}\r\n\r\n");
    assert_eq!(request_from(&server, 2, &whoami).await.status, 403);
    // The same pair on a loopback name or literal is the server's own page.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let own = standard(&format!("Origin: http://{host}\r\n"))
            .replace("Host: localhost", &format!("Host: {host}"));
        assert_eq!(request_from(&server, 2, &own).await.status, 101, "{host}");
    }
    server.shutdown().await;

    // Listed, the name is the server's own.
    let config = chat_server::Config {
        public_hosts: vec!["rebind.example".parse().expect("host")],
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let port = server.addr.port();
    let ws = standard(&format!("Origin: http://rebind.example:{port}\r\n"))
        .replace("Host: localhost", &format!("Host: rebind.example:{port}"));
    assert_eq!(request_from(&server, 2, &ws).await.status, 101);
    server.shutdown().await;
}

/// One keep-alive connection serves at most 100 requests: the 100th answer
/// says `connection: close`, and the connection closes.
#[tokio::test]
async fn a_keep_alive_connection_serves_at_most_100_requests() {
    let server = TestServer::start(test_config()).await;
    let mut stream = server.tcp_from(2).await;
    for n in 1..=chat_server::checks::MAX_REQUESTS {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let reply = read_reply(&mut stream, false).await;
        assert_eq!(reply.status, 200, "request {n}");
        let last = n == chat_server::checks::MAX_REQUESTS;
        assert_eq!(
            reply.header("connection"),
            last.then_some("close"),
            "request {n}"
        );
    }
    assert!(closes(&mut stream, PATIENCE).await, "closed after the last");
    server.shutdown().await;
}

/// The edges of the request line and `Host` (RFC 9110, 9112): an
/// absolute-form target's authority wins over `Host`; malformed hosts are
/// 400; the fully-qualified `localhost.` is `localhost`; names under
/// `.localhost` are not loopback (some browsers ask DNS for them); a
/// target with a fragment is 400.
#[tokio::test]
async fn hosts_and_targets_at_their_edges() {
    let server = TestServer::start(test_config()).await;
    let upgrade_with = |target: &str, host: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        )
    };
    let status = async |request: String| request_from(&server, 2, &request).await.status;
    assert_eq!(
        status(upgrade_with("http://evil.example/ws", "localhost")).await,
        403,
        "the absolute form's authority is the host"
    );
    assert_eq!(
        status(upgrade_with("http://localhost/ws", "localhost")).await,
        101
    );
    for malformed in [
        "127.0.0.1:abc",
        ":99999",
        "name:",
        "[::1]evil",
        "localhost:65536",
    ] {
        assert_eq!(
            status(upgrade_with("/ws", malformed)).await,
            400,
            "{malformed}"
        );
        let page = format!("GET / HTTP/1.1\r\nHost: {malformed}\r\n\r\n");
        assert_eq!(status(page).await, 400, "{malformed}");
    }
    assert_eq!(status(upgrade_with("/ws", "localhost.")).await, 101);
    assert_eq!(status(upgrade_with("/ws", "foo.localhost")).await, 403);
    assert_eq!(status(upgrade_with("/ws#top", "localhost")).await, 400);
    assert_eq!(status(upgrade_with("/ws?sync#top", "localhost")).await, 400);
    server.shutdown().await;
}

/// A client that sends half a request head and hangs up is done at once:
/// its place among the address's pending connections is free again, not
/// held until `--handshake-timeout`. (The server peeks at the head, and a
/// peek sees no end of stream behind the bytes: 64 such requests used to
/// lock the address out for ten seconds.)
#[tokio::test]
async fn a_half_sent_request_whose_client_hung_up_frees_its_place_at_once() {
    let mut config = test_config();
    config.max_pending_per_ip = 4;
    config.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(config).await;
    let mut gone = Vec::new();
    for _ in 0..8 {
        let mut stream = server.tcp_from(2).await;
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgr")
            .await
            .expect("write");
        stream.shutdown().await.expect("FIN");
        assert!(
            closes(&mut stream, Duration::from_secs(2)).await,
            "closed at once, not at the handshake timeout"
        );
        gone.push(stream);
    }
    // The address still gets in, at once.
    let ok = tokio::time::timeout(Duration::from_secs(2), server.try_client(2, "/ws", &[]))
        .await
        .expect("in time");
    assert!(ok.is_ok(), "{:?}", ok.err());
    server.shutdown().await;
}
