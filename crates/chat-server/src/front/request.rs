//! Plain HTTP on the WebSocket port: the web client, `/healthz`,
//! `/metrics` and `/whoami`.
//!
//! Every accepted connection starts here. The request head is **peeked**,
//! not read, and parsed with `httparse`. Its `Host` must be one the server
//! answers to. A WebSocket upgrade that is well formed leaves this module
//! with its head still in the socket, for the chat's own checks and the
//! 101 (`super::upgrade`); every other request, and every refused
//! upgrade, is consumed and answered here.
//!
//! Bounds: a request head is at most `--max-request-head` bytes and
//! `MAX_HEADERS` headers (else 431), must arrive within
//! `--handshake-timeout` (else the connection is closed), and may have no
//! body (else 413). Only `GET` and `HEAD` are served (else 405). A
//! keep-alive connection serves at most `MAX_REQUESTS` requests and waits
//! at most `--handshake-timeout` for each.

use super::admin;
use super::routes::route;
use crate::admission::limits::AddressSlot;
use crate::http::codec::{
    Head, HeadError, consume, has_body, peek_head, reply_for, text, wants_keep_alive,
    write_response,
};
use crate::http::upgrade::{UpgradeKey, check_upgrade, wants_websocket};
use crate::http::{MAX_REQUESTS, Refusal};
use crate::shared::Shared;
use std::net::IpAddr;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response, StatusCode, header};

/// Where a connection goes after the plain HTTP part.
#[derive(Debug)]
pub(crate) enum Next {
    /// A well-formed WebSocket upgrade, its head still unread in the socket.
    Upgrade(Box<Upgrade>),
    /// The connection is finished.
    Done,
}

/// A WebSocket upgrade that passed the HTTP checks, waiting for the chat's
/// own (path, origin, address, admission).
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// Its head, still in the socket.
    pub(crate) head: Head,
    /// Its checked `Sec-WebSocket-Key`.
    pub(crate) key: UpgradeKey,
    /// When the handshake time runs out.
    pub(crate) deadline: Instant,
}

/// Serves plain HTTP requests on a new connection until a WebSocket
/// handshake for `/ws` is next, or the connection is done.
///
/// `pending` is the connection's place in `--max-pending-per-ip` (none for
/// a trusted proxy). While a kept-alive connection waits for its next
/// request it is idle, and a new connection from the same address may
/// take its place; it then closes.
pub(crate) async fn serve(
    stream: &mut TcpStream,
    peer: IpAddr,
    pending: Option<&AddressSlot>,
    shared: &Shared,
) -> Next {
    for served in 1..=MAX_REQUESTS {
        let deadline = Instant::now() + shared.config.handshake_timeout;
        let idle = pending.filter(|_| served > 1);
        if let Some(slot) = idle {
            slot.idle();
        }
        let evicted = async {
            match idle {
                Some(slot) => slot.evicted().await,
                None => std::future::pending().await,
            }
        };
        let peeked = tokio::select! {
            () = shared.shutdown.cancelled() => return Next::Done,
            () = evicted => {
                shared.metrics.http_idle_evicted.inc();
                return Next::Done;
            }
            peeked = timeout_at(deadline, peek_head(stream, shared.config.max_request_head)) => peeked,
        };
        if idle.is_some_and(|slot| !slot.busy()) {
            // Evicted just as a request came: unanswered, so the client
            // sends it again on a new connection.
            shared.metrics.http_idle_evicted.inc();
            return Next::Done;
        }
        let head = match peeked {
            // Slow or silent: the connection just closes, as a stalled
            // handshake always has.
            Err(_) | Ok(Err(HeadError::Closed)) => return Next::Done,
            Ok(Err(HeadError::TooLarge)) => {
                let reply = text(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                );
                finish(stream, shared, "bad_request", reply, false).await;
                return Next::Done;
            }
            Ok(Err(HeadError::Malformed)) => {
                let reply = text(StatusCode::BAD_REQUEST, "malformed HTTP request\n");
                finish(stream, shared, "bad_request", reply, false).await;
                return Next::Done;
            }
            Ok(Ok(head)) => head,
        };
        let upgrade = wants_websocket(&head.request);
        let checked = shared.hosts.check(&head.request).and_then(|()| {
            if !upgrade {
                return Ok(None);
            }
            if has_body(&head.request) {
                return Err(Refusal::BodyNotAllowed);
            }
            check_upgrade(&head.request).map(Some)
        });
        match checked {
            Ok(Some(key)) => {
                return Next::Upgrade(Box::new(Upgrade {
                    head,
                    key,
                    deadline,
                }));
            }
            Ok(None) => {}
            Err(refusal) => {
                if !upgrade {
                    shared
                        .metrics
                        .http_response("bad_request", refusal.status().as_u16());
                }
                refuse(stream, &head, &refusal, upgrade, shared).await;
                return Next::Done;
            }
        }
        // Ours: take the head out of the socket.
        if consume(stream, &head).await.is_err() {
            return Next::Done;
        }
        let (route, reply) = if head.request.uri().path().starts_with(admin::PREFIX) {
            (
                "admin",
                admin::serve(stream, &head.request, peer, shared).await,
            )
        } else {
            route(&head.request, peer, shared)
        };
        let keep_alive = reply.status().is_success() || reply.status() == StatusCode::NOT_MODIFIED;
        let keep_alive = keep_alive
            && served < MAX_REQUESTS
            && wants_keep_alive(&head.request)
            && !shared.shutdown.is_cancelled();
        if !finish(
            stream,
            shared,
            route,
            reply_for(&head.request, reply),
            keep_alive,
        )
        .await
        {
            return Next::Done;
        }
    }
    Next::Done
}

/// Answers a connection that arrived while the server is full: 503 to
/// whatever it asks, WebSocket handshake or page.
pub(crate) async fn refuse_full(stream: &mut TcpStream, shared: &Shared) {
    let max = shared.config.max_request_head;
    let Ok(Ok(head)) = timeout(shared.config.handshake_timeout, peek_head(stream, max)).await
    else {
        return;
    };
    refuse(stream, &head, &Refusal::ServerFull, true, shared).await;
}

/// Answers a refused request (its head still in the socket) with the
/// refusal's status and text, and closes. A refused WebSocket handshake is
/// counted as one.
pub(crate) async fn refuse(
    stream: &mut TcpStream,
    head: &Head,
    refusal: &Refusal,
    handshake: bool,
    shared: &Shared,
) {
    if handshake {
        shared.metrics.handshake_refused(refusal.kind());
    }
    if consume(stream, head).await.is_err() {
        return;
    }
    let mut reply = text(refusal.status(), &format!("{refusal}\n"));
    let headers = reply.headers_mut();
    match refusal {
        Refusal::ServerFull => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        Refusal::UnsupportedVersion => {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Refusal::MethodNotAllowed => {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        _ => {}
    }
    write_response(
        stream,
        &reply_for(&head.request, reply),
        true,
        shared.config.write_timeout,
    )
    .await;
}

/// Counts, writes and (unless kept alive) closes; false when the
/// connection is finished.
async fn finish(
    stream: &mut TcpStream,
    shared: &Shared,
    route: &'static str,
    reply: Response<Bytes>,
    keep_alive: bool,
) -> bool {
    shared.metrics.http_response(route, reply.status().as_u16());
    write_response(stream, &reply, !keep_alive, shared.config.write_timeout).await && keep_alive
}
