//! What `GET /metrics` reports, in the Prometheus (OpenMetrics) text format.
//!
//! Every metric is a `prometheus-client` handle (an atomic behind an `Arc`),
//! so updating one on a hot path is one atomic add, and nothing is computed
//! until a scrape. Label values are all `&'static str` or status codes, so
//! no client can grow the label sets.

use crate::wire::close::CloseReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A reason label: why a connection closed, a handshake or frame was
/// refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    /// A short stable name, e.g. `rate_limited` or `too_slow`.
    pub reason: &'static str,
}

/// A route label for plain HTTP responses.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Response {
    /// Which route answered (`page`, `healthz`, `metrics`, `whoami`,
    /// `asset`, `not_found`, or `bad_request` for unparsable requests).
    pub route: &'static str,
    /// The HTTP status code.
    pub code: u16,
}

/// Every metric the server keeps.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// WebSocket connections open now (past the handshake).
    pub connections_open: Gauge,
    /// WebSocket connections closed, by close reason.
    pub connections_closed: Family<Reason, Counter>,
    /// Clients dropped for reading too slowly (lagged or stalled writes).
    pub slow_clients_dropped: Counter,
    /// Handshakes refused with an HTTP error, by reason.
    pub handshakes_refused: Family<Reason, Counter>,
    /// Client frames refused with an `error` frame, by reason.
    pub frames_refused: Family<Reason, Counter>,
    /// Messages accepted and broadcast.
    pub messages_accepted: Counter,
    /// Reaction toggles accepted and broadcast.
    pub reactions_accepted: Counter,
    /// Messages in the published history.
    pub history_messages: Gauge,
    /// Time to write one batch to the store, fsync included.
    pub store_commit: Histogram,
    /// Commands (each a message or a toggle) per store commit.
    pub store_commit_commands: Histogram,
    /// 1 while the store is failing to commit (messages wait), else 0.
    pub store_failing: Gauge,
    /// Plain HTTP responses, by route and status.
    pub http_responses: Family<Response, Counter>,
    /// Idle keep-alive connections closed to give their place to a new
    /// connection from the same address.
    pub http_idle_evicted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric, all at zero.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("chat");
        let m = Metrics {
            connections_open: Gauge::default(),
            connections_closed: Family::default(),
            slow_clients_dropped: Counter::default(),
            handshakes_refused: Family::default(),
            frames_refused: Family::default(),
            messages_accepted: Counter::default(),
            reactions_accepted: Counter::default(),
            history_messages: Gauge::default(),
            // 0.25 ms .. ~4 s: an fsync on a fast SSD up to a struggling disk.
            store_commit: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            store_commit_commands: Histogram::new(exponential_buckets(1.0, 4.0, 6)),
            store_failing: Gauge::default(),
            http_responses: Family::default(),
            http_idle_evicted: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_open",
            "WebSocket connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket connections closed, by reason",
            m.connections_closed.clone(),
        );
        registry.register(
            "slow_clients_dropped",
            "Clients dropped for reading too slowly (close code 1013)",
            m.slow_clients_dropped.clone(),
        );
        registry.register(
            "handshakes_refused",
            "WebSocket handshakes refused with an HTTP error, by reason",
            m.handshakes_refused.clone(),
        );
        registry.register(
            "frames_refused",
            "Client frames answered with an error frame, by reason",
            m.frames_refused.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages accepted and broadcast",
            m.messages_accepted.clone(),
        );
        registry.register(
            "reactions_accepted",
            "Reaction toggles accepted and broadcast",
            m.reactions_accepted.clone(),
        );
        registry.register(
            "history_messages",
            "Messages in the history replayed to new clients",
            m.history_messages.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Time to write one batch to the store, fsync included",
            Unit::Seconds,
            m.store_commit.clone(),
        );
        registry.register(
            "store_commit_commands",
            "Commands written per store commit",
            m.store_commit_commands.clone(),
        );
        registry.register(
            "store_failing",
            "1 while commits to the store fail and messages wait, else 0",
            m.store_failing.clone(),
        );
        registry.register(
            "http_responses",
            "Plain HTTP responses, by route and status code",
            m.http_responses.clone(),
        );
        registry.register(
            "http_idle_evicted",
            "Idle keep-alive connections closed to make room for a new connection from the same address",
            m.http_idle_evicted.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a WebSocket handshake refused with an HTTP error, by the
    /// refusal's short name.
    pub(crate) fn handshake_refused(&self, reason: &'static str) {
        self.handshakes_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts a client frame answered with an `error` frame, by the
    /// refusal's short name.
    pub(crate) fn frame_refused(&self, reason: &'static str) {
        self.frames_refused.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a WebSocket connection past its handshake.
    pub(crate) fn connection_opened(&self) {
        self.connections_open.inc();
    }

    /// Counts a WebSocket connection's end, and a slow client's drop.
    pub(crate) fn connection_closed(&self, why: &CloseReason) {
        self.connections_open.dec();
        let reason = why.kind();
        self.connections_closed
            .get_or_create(&Reason { reason })
            .inc();
        if why.is_slow_client() {
            self.slow_clients_dropped.inc();
        }
    }

    /// Counts a plain HTTP response.
    pub(crate) fn http_response(&self, route: &'static str, code: u16) {
        self.http_responses
            .get_or_create(&Response { route, code })
            .inc();
    }

    /// The text a scrape returns.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_reported_with_its_labels() {
        let m = Metrics::new();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed(&CloseReason::Stalled);
        m.frame_refused("message_not_found");
        m.handshake_refused("server_full");
        m.store_commit.observe(0.003);
        m.http_response("healthz", 200);
        let text = m.encode();
        for line in [
            "chat_connections_open 1",
            "chat_connections_closed_total{reason=\"stalled\"} 1",
            "chat_slow_clients_dropped_total 1",
            "chat_frames_refused_total{reason=\"message_not_found\"} 1",
            "chat_handshakes_refused_total{reason=\"server_full\"} 1",
            "chat_store_commit_seconds_count 1",
            "chat_http_responses_total{route=\"healthz\",code=\"200\"} 1",
            "chat_messages_accepted_total 0",
            "chat_history_messages 0",
            "chat_store_failing 0",
            "chat_http_idle_evicted_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
