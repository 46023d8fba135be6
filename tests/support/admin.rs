//! The operator API from a test: a keys file, and requests on raw
//! sockets, answers parsed with `httparse`.

use super::{PATIENCE, TestServer};
use chat_loadgen::http::{Response, read_response_to};
use chat_proto::{Applied, ErrorBody, Position, RemoveMessage, Uuid};
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

/// Alice's operator key.
pub const ALICE: &str = "alice-key-0123456789abcdefghij";
/// Bob's operator key.
pub const BOB: &str = "bob-key-0123456789abcdefghijkl";

/// A keys file naming alice and bob, and `config` reading it. Keep the
/// file while the server runs.
pub fn with_keys(
    mut config: chat_server::Config,
) -> (tempfile::NamedTempFile, chat_server::Config) {
    let mut keys = tempfile::NamedTempFile::new().expect("keys file");
    std::io::Write::write_all(
        &mut keys,
        format!("# operators\nalice {ALICE}\nbob {BOB}\n").as_bytes(),
    )
    .expect("write keys");
    config.admin_keys_file = Some(keys.path().to_owned());
    (keys, config)
}

/// A request to `server` from 127.0.0.`from`, with `key` (if any) as a
/// bearer and a JSON `body` (if any).
pub async fn request(
    server: &TestServer,
    from: u8,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Response {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(key) = key {
        request.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    match body {
        Some(body) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => request.push_str("\r\n"),
    }
    let mut stream = server.tcp_from(from).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    timeout(PATIENCE, read_response_to(&mut stream, false))
        .await
        .expect("response in time")
        .expect("a well-formed response")
}

/// A request as alice, from 127.0.0.9.
pub async fn as_alice(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    request(server, 9, method, path, Some(ALICE), body).await
}

/// The JSON body of `reply`.
pub fn decode<T: DeserializeOwned>(reply: &Response) -> T {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )
    })
}

/// The refusal's text of `reply`.
pub fn refusal(reply: &Response) -> String {
    decode::<ErrorBody>(reply).error
}

/// An order alice gives, which must be applied: its position.
pub async fn order(server: &TestServer, path: &str, body: &str) -> Position {
    let reply = as_alice(server, "POST", path, Some(body)).await;
    assert_eq!(
        reply.status,
        200,
        "{path} {body}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    decode::<Applied>(&reply).position
}

/// Alice removes message `id` (with `reason`): its position.
pub async fn remove(server: &TestServer, id: Uuid, reason: Option<&str>) -> Position {
    let body = serde_json::to_string(&RemoveMessage {
        message_id: id,
        reason: reason.map(str::to_owned),
    })
    .expect("json");
    order(server, "/admin/remove_message", &body).await
}
