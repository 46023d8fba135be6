//! The operator API, under `/admin/` on the chat's own port.
//!
//! Off unless the server was started with `--admin-keys-file` (every path
//! is then 404). Every request needs `Authorization: Bearer KEY` with one
//! of the operators' keys (`crate::admission::operators`), checked before
//! anything else is read; failures are counted in `/metrics` and limited
//! per address. Bodies are JSON, at most [`MAX_BODY`] bytes, of the types
//! in `chat_proto` (the schemas in `asyncapi.yaml`), and so are answers.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/admin/remove_message` | `RemoveMessage` | `Applied` |
//! | POST | `/admin/restrict_user` | `RestrictUser` | `Applied` |
//! | POST | `/admin/lift_restriction` | `LiftRestriction` | `Applied` |
//! | POST | `/admin/set_room` | `Room` | `Applied` |
//! | GET | `/admin/restrictions` | | `[RestrictionEntry]` |
//! | GET | `/admin/room` | | `Room` |
//! | GET | `/admin/audit?since=P&limit=N` | | `[AuditEntry]` |
//!
//! An order is a command like a client's: it goes through the sequencer
//! (in cluster mode, the stream), so it is durable and replicated before
//! anyone sees it, and the answer comes only once it is published, with
//! the position of its last event. A refusal is an `ErrorBody` with the
//! chat's text: 404 for a message or restriction that is not there, 422
//! for an order against the rules, 409 when the restrictions are full,
//! 503 when the chat cannot take it now.

use crate::admission::operators::Denied;
use crate::http::codec::{BodyError, Request, body, no_store, read_body};
use crate::sequencer::ApplyError;
use crate::shared::Shared;
use chat_core::{ChatError, Command};
use chat_proto::{
    Applied, AuditEntry, ErrorBody, LiftRestriction, Moderation, Position, RemoveMessage,
    RestrictUser, RestrictionEntry, Room,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Method, Response, StatusCode, header};

/// The operator API's paths start with this.
pub(crate) const PREFIX: &str = "/admin/";

/// The largest request body taken.
pub(crate) const MAX_BODY: usize = 16 * 1024;

/// The most audit entries one request returns.
pub(crate) const MAX_AUDIT_PAGE: usize = 1000;

/// The orders, by path.
const ORDERS: &[&str] = &[
    "remove_message",
    "restrict_user",
    "lift_restriction",
    "set_room",
];

/// The readings, by path.
const READINGS: &[&str] = &["restrictions", "room", "audit"];

/// Answers a request under [`PREFIX`] (its head consumed; its body, if
/// any, still in `stream`).
pub(crate) async fn serve(
    stream: &mut TcpStream,
    request: &Request,
    peer: IpAddr,
    shared: &Shared,
) -> Response<Bytes> {
    let Some(operators) = &shared.operators else {
        return error(
            StatusCode::NOT_FOUND,
            "the operator API is off: start the server with --admin-keys-file",
        );
    };
    let addr = match shared.admission.policy.client_addr(request, peer) {
        Ok(addr) => addr,
        Err(refusal) => return error(refusal.status(), &refusal.to_string()),
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let who = match operators.authenticate(authorization, addr, Instant::now()) {
        Ok(who) => who,
        Err(denied) => {
            shared.metrics.admin_denied(denied.kind());
            tracing::warn!(%addr, reason = denied.kind(), "operator API request denied");
            return denied_reply(&denied);
        }
    };
    let path = request
        .uri()
        .path()
        .strip_prefix(PREFIX)
        .unwrap_or_default();
    let method = request.method();
    let known = |paths: &[&str]| paths.contains(&path);
    if known(ORDERS) && method != Method::POST {
        return not_allowed("POST");
    }
    if known(READINGS) && method != Method::GET && method != Method::HEAD {
        return not_allowed("GET, HEAD");
    }
    if !known(ORDERS) && !known(READINGS) {
        return error(StatusCode::NOT_FOUND, "no such operator API path");
    }
    if known(READINGS) {
        return read(path, request, shared);
    }
    let within = shared.config.handshake_timeout;
    let bytes = match read_body(stream, request, MAX_BODY, within).await {
        Ok(bytes) => bytes,
        Err(e) => return body_error(e),
    };
    let order = match path {
        "remove_message" => parse::<RemoveMessage>(&bytes).map(Moderation::RemoveMessage),
        "restrict_user" => parse::<RestrictUser>(&bytes).map(Moderation::RestrictUser),
        "lift_restriction" => parse::<LiftRestriction>(&bytes).map(Moderation::LiftRestriction),
        "set_room" => parse::<Room>(&bytes).map(Moderation::SetRoom),
        _ => unreachable!("an order's path"),
    };
    let order = match order {
        Ok(order) => order,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    tracing::info!(by = %who, ?order, "moderation order");
    match shared
        .sequencer
        .submit(&who, Command::Moderation(order))
        .await
    {
        Ok(position) => published(position, shared).await,
        Err(ApplyError::Refused(refusal)) => error(refused_status(&refusal), &refusal.to_string()),
        Err(e @ (ApplyError::Stopping | ApplyError::NotTaken)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not applied ({e}); send it again"),
        ),
        Err(ApplyError::Unavailable) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not confirmed: the cluster's log could not be reached; it is applied only if it was taken (see GET /admin/audit)",
        ),
    }
}

/// Waits until the order's last event is published (written, and shown to
/// clients), then says where it is.
async fn published(position: Position, shared: &Shared) -> Response<Bytes> {
    shared
        .log
        .wait_for(position, shared.config.cluster_timeout)
        .await;
    if shared.log.head() < position {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("applied at position {position}, but not yet written: see GET /admin/audit"),
        );
    }
    json(StatusCode::OK, &Applied { position })
}

/// Answers a reading.
fn read(path: &str, request: &Request, shared: &Shared) -> Response<Bytes> {
    let moderation = shared.sequencer.moderation();
    match path {
        "restrictions" => {
            let now = shared.clock.now();
            let list: Vec<RestrictionEntry> = moderation
                .restrictions
                .iter()
                .filter(|(_, held)| held.in_force(now))
                .map(|(user, held)| held.entry(user))
                .collect();
            json(StatusCode::OK, &list)
        }
        "room" => json(StatusCode::OK, &moderation.room),
        "audit" => {
            let (since, limit) = match audit_query(request.uri().query()) {
                Ok(q) => q,
                Err(why) => return error(StatusCode::BAD_REQUEST, why),
            };
            let page: Vec<&AuditEntry> = moderation
                .audit
                .iter()
                .filter(|e| e.position > since)
                .take(limit)
                .collect();
            json(StatusCode::OK, &page)
        }
        _ => unreachable!("a reading's path"),
    }
}

/// `since` (a position; entries after it) and `limit` from the audit's
/// query.
fn audit_query(query: Option<&str>) -> Result<(Position, usize), &'static str> {
    let mut since = Position::ZERO;
    let mut limit = 100;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = Position(v.parse().map_err(|_| "since must be a position")?);
            }
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_AUDIT_PAGE).contains(n))
                    .ok_or("limit must be 1 to 1000")?;
            }
            _ => return Err("the audit takes since= and limit="),
        }
    }
    Ok((since, limit))
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("Invalid body: {e}"))
}

/// The status of a chat's refusal of an order.
fn refused_status(refusal: &ChatError) -> StatusCode {
    match refusal {
        ChatError::MessageNotFound | ChatError::NotRestricted => StatusCode::NOT_FOUND,
        ChatError::TooManyRestrictions { .. } => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn body_error(e: BodyError) -> Response<Bytes> {
    match e {
        BodyError::TooLarge => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is over {MAX_BODY} bytes"),
        ),
        BodyError::NoLength => error(StatusCode::LENGTH_REQUIRED, "send a Content-Length"),
        BodyError::BadLength | BodyError::Closed => {
            error(StatusCode::BAD_REQUEST, "the body did not arrive whole")
        }
    }
}

fn denied_reply(denied: &Denied) -> Response<Bytes> {
    let status = match denied {
        Denied::NoKey | Denied::WrongKey => StatusCode::UNAUTHORIZED,
        Denied::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
    };
    let mut reply = error(status, &denied.to_string());
    let headers = reply.headers_mut();
    match denied {
        Denied::TooManyFailures => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        Denied::NoKey | Denied::WrongKey => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
    }
    reply
}

fn not_allowed(allow: &'static str) -> Response<Bytes> {
    let mut reply = error(StatusCode::METHOD_NOT_ALLOWED, &format!("only {allow}"));
    reply
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    reply
}

fn error(status: StatusCode, why: &str) -> Response<Bytes> {
    json(
        status,
        &ErrorBody {
            error: why.to_owned(),
        },
    )
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Bytes> {
    // The API's types are plain data: they always serialize.
    let text = serde_json::to_vec(value).expect("API values serialize");
    no_store(body(status, "application/json", text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_query_is_bounded() {
        assert_eq!(audit_query(None), Ok((Position::ZERO, 100)));
        assert_eq!(audit_query(Some("since=5&limit=10")), Ok((Position(5), 10)));
        assert!(audit_query(Some("limit=0")).is_err());
        assert!(audit_query(Some("limit=1001")).is_err());
        assert!(audit_query(Some("since=x")).is_err());
        assert!(audit_query(Some("other=1")).is_err());
    }
}
