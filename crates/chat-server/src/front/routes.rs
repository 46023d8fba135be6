//! What each plain HTTP path answers: the page's files, `/healthz`,
//! `/readyz`, `/metrics`, `/whoami`, and 426 for `/ws` without an upgrade.

use super::web::{self, Asset};
use crate::http::codec::{Request, body, has_body, no_store, text};
use crate::http::refusal::WS_PATH;
use crate::metrics;
use crate::shared::Shared;
use chat_proto::WhoAmI;
use std::net::IpAddr;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Method, Response, StatusCode, header};

/// Decides the answer to a plain HTTP request, with the route's name for
/// metrics.
pub(crate) fn route(
    request: &Request,
    peer: IpAddr,
    shared: &Shared,
) -> (&'static str, Response<Bytes>) {
    if has_body(request) {
        let reply = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted\n",
        );
        return ("bad_request", reply);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        reply
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return ("bad_request", reply);
    }
    match request.uri().path() {
        "/healthz" => {
            if shared.metrics.store_failing.get() != 0 {
                let reply = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store failing: messages are waiting for the disk\n",
                );
                return ("healthz", no_store(reply));
            }
            if let Some(why) = shared.not_serving() {
                let reply = text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n"));
                return ("healthz", no_store(reply));
            }
            ("healthz", no_store(text(StatusCode::OK, "ok\n")))
        }
        "/readyz" => {
            if shared.metrics.store_failing.get() != 0 {
                let reply = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store failing: messages are waiting for the disk\n",
                );
                return ("readyz", no_store(reply));
            }
            if let Err(why) = shared.sequencer.ready() {
                let reply = text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n"));
                return ("readyz", no_store(reply));
            }
            ("readyz", no_store(text(StatusCode::OK, "ready\n")))
        }
        "/metrics" => {
            let reply = body(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                shared.metrics.encode(),
            );
            ("metrics", no_store(reply))
        }
        "/whoami" => match shared.admission.user_id(request, peer) {
            Ok(user_id) => {
                let who = WhoAmI { user_id };
                let reply = body(StatusCode::OK, "application/json", who.encode());
                ("whoami", no_store(reply))
            }
            Err(refusal) => ("whoami", text(refusal.status(), &format!("{refusal}\n"))),
        },
        WS_PATH => {
            let mut reply = text(
                StatusCode::UPGRADE_REQUIRED,
                "this is the chat's WebSocket endpoint; open / in a browser\n",
            );
            reply
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            ("bad_request", reply)
        }
        path => match Asset::find(path) {
            Some((asset, etag)) => ("asset", asset_response(request, asset, etag)),
            None => ("not_found", text(StatusCode::NOT_FOUND, "not found\n")),
        },
    }
}

fn asset_response(request: &Request, asset: &'static Asset, etag: &'static str) -> Response<Bytes> {
    let fresh = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        });
    let mut reply = if fresh {
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        body(
            StatusCode::OK,
            asset.content_type,
            Bytes::from_static(asset.body),
        )
    };
    let headers = reply.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(etag));
    // Always revalidate: an upgraded server's page shows at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    reply
}
