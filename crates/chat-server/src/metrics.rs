//! What `GET /metrics` reports, in the Prometheus (OpenMetrics) text format.
//!
//! Every metric is a `prometheus-client` handle (an atomic behind an `Arc`),
//! so updating one on a hot path is one atomic add, and nothing is computed
//! until a scrape. Label values are all `&'static str` or status codes, so
//! no client can grow the label sets.

use crate::http::refusal::Refusal;
use crate::wire::close::CloseReason;
use chat_core::ChatError;
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

/// A cluster node's state label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct State {
    /// One of [`CLUSTER_STATES`].
    pub state: &'static str,
}

/// Every state a cluster node reports (`chat_cluster_state`); the
/// sequencer names its own with one of these.
pub(crate) const CLUSTER_STATES: &[&str] = &[
    "catching_up",
    "serving",
    "stopped_unknown_version",
    "stopped_read_ended",
    "stopped_rewound",
    "stopped_replaced",
    "stopped_recreated",
    "stopped_gap",
];

/// What a cluster node reports besides (registered only in cluster mode).
#[derive(Debug, Clone)]
pub(crate) struct ClusterMetrics {
    /// The stream sequence of the last entry this node applied.
    pub applied: Gauge,
    /// The stream's last sequence, as of the last check (every second):
    /// minus `applied`, how far behind this node is.
    pub stream_last: Gauge,
    /// 1 while the NATS client is connected, else 0.
    pub nats_connected: Gauge,
    /// Connections to NATS after the first.
    pub nats_reconnects: Counter,
    /// 1 for the node's state now, 0 for every other.
    pub state: Family<State, Gauge>,
    /// Time from a command's first publish until it is known to be stored:
    /// JetStream's ack, or this node's apply of it if that comes first
    /// (retries included).
    pub publish: Histogram,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics {
            applied: Gauge::default(),
            stream_last: Gauge::default(),
            nats_connected: Gauge::default(),
            nats_reconnects: Counter::default(),
            state: Family::default(),
            // 1 ms .. ~16 s: a local JetStream up to retries through an
            // election.
            publish: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl ClusterMetrics {
    /// Sets the state gauge: `now` to 1, every other to 0.
    pub(crate) fn set_state(&self, now: &'static str) {
        for &state in CLUSTER_STATES {
            self.state
                .get_or_create(&State { state })
                .set(i64::from(state == now));
        }
    }
}

/// The `frames_refused` reason of a frame that is not a command.
pub(crate) const FRAME_MALFORMED: &str = "invalid_format";
/// The `frames_refused` reason of a command whose fate is not known (a
/// cluster node lost the stream while it waited).
pub(crate) const FRAME_UNAVAILABLE: &str = "unavailable";
/// The `frames_refused` reason of a command the stream surely did not take.
pub(crate) const FRAME_NOT_TAKEN: &str = "not_taken";

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
    /// Messages a moderator removed (one by one, or with a restriction).
    pub messages_removed: Counter,
    /// Operator API requests refused for their key, by reason.
    pub admin_denied: Family<Reason, Counter>,
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
    /// A cluster node's own (reported only in cluster mode).
    pub cluster: ClusterMetrics,
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
            messages_removed: Counter::default(),
            admin_denied: Family::default(),
            history_messages: Gauge::default(),
            // 0.25 ms .. ~4 s: an fsync on a fast SSD up to a struggling disk.
            store_commit: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            store_commit_commands: Histogram::new(exponential_buckets(1.0, 4.0, 6)),
            store_failing: Gauge::default(),
            http_responses: Family::default(),
            http_idle_evicted: Counter::default(),
            cluster: ClusterMetrics::default(),
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
            "admin_denied",
            "Operator API requests refused for their key (none, wrong, or too many failures from the address)",
            m.admin_denied.clone(),
        );
        registry.register(
            "messages_removed",
            "Messages a moderator removed from the history",
            m.messages_removed.clone(),
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
        // Every label of the labelled counters, at 0 until it happens, so
        // that a rate or an alert on one needs no "absent" case.
        for &reason in CloseReason::KINDS {
            m.connections_closed
                .get_or_create(&Reason { reason })
                .inc_by(0);
        }
        for &reason in Refusal::KINDS {
            m.handshakes_refused
                .get_or_create(&Reason { reason })
                .inc_by(0);
        }
        for &reason in ChatError::KINDS.iter().chain([&FRAME_MALFORMED]) {
            m.frames_refused.get_or_create(&Reason { reason }).inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// [`new`](Self::new), with a cluster node's metrics too: each
    /// labelled one present from the start, at 0.
    pub(crate) fn with_cluster() -> Self {
        let mut m = Metrics::new();
        let c = m.cluster.clone();
        let r = m.registry.sub_registry_with_prefix("cluster");
        r.register(
            "applied_sequence",
            "The stream sequence of the last entry this node applied",
            c.applied.clone(),
        );
        r.register(
            "stream_last_sequence",
            "The stream's last sequence at the last check (every second); minus applied_sequence, how far behind this node is",
            c.stream_last.clone(),
        );
        r.register(
            "nats_connected",
            "1 while this node's NATS client is connected, else 0",
            c.nats_connected.clone(),
        );
        r.register(
            "nats_reconnects",
            "Connections to NATS after the first",
            c.nats_reconnects.clone(),
        );
        r.register(
            "state",
            "1 for this node's state now (catching_up, serving, stopped_<why>), 0 for the others",
            c.state.clone(),
        );
        r.register_with_unit(
            "publish",
            "Time from a command's first publish until it is stored (JetStream's ack, or this node's apply of it if sooner), retries included",
            Unit::Seconds,
            c.publish.clone(),
        );
        c.set_state("catching_up");
        // Commands refused because the chat was unavailable, at 0 until one is.
        for reason in [FRAME_UNAVAILABLE, FRAME_NOT_TAKEN] {
            m.frames_refused.get_or_create(&Reason { reason }).inc_by(0);
        }
        m
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

    /// Counts an operator API request refused for its key.
    pub(crate) fn admin_denied(&self, reason: &'static str) {
        self.admin_denied.get_or_create(&Reason { reason }).inc();
    }

    /// Shows each of the operator API's refusals at 0 (when it is on).
    pub(crate) fn expect_admin_denials(&self, reasons: &[&'static str]) {
        for &reason in reasons {
            self.admin_denied
                .get_or_create(&Reason { reason })
                .inc_by(0);
        }
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

    /// Panics unless every one of `lines` is a whole line of `text`.
    fn assert_reports(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in\n{text}"
            );
        }
    }

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
        assert_reports(
            &text,
            &[
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
            ],
        );
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("cluster"), "a single node has none: {text}");
    }

    #[test]
    fn every_labelled_counter_has_each_label_from_the_start() {
        let text = Metrics::new().encode();
        let families = [
            ("connections_closed", CloseReason::KINDS),
            ("handshakes_refused", Refusal::KINDS),
            ("frames_refused", ChatError::KINDS),
            ("frames_refused", &[FRAME_MALFORMED]),
        ];
        let mut lines = Vec::new();
        for (family, kinds) in families {
            assert!(!kinds.is_empty());
            for kind in kinds {
                lines.push(format!("chat_{family}_total{{reason=\"{kind}\"}} 0"));
            }
        }
        assert_reports(&text, &lines.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            !text.contains(FRAME_NOT_TAKEN),
            "a single node refuses nothing as not taken: {text}"
        );
    }

    #[test]
    fn a_cluster_node_reports_its_own_with_every_label_from_the_start() {
        let m = Metrics::with_cluster();
        let text = m.encode();
        assert_reports(
            &text,
            &[
                "chat_cluster_applied_sequence 0",
                "chat_cluster_stream_last_sequence 0",
                "chat_cluster_nats_connected 0",
                "chat_cluster_nats_reconnects_total 0",
                "chat_cluster_state{state=\"catching_up\"} 1",
                "chat_cluster_state{state=\"serving\"} 0",
                "chat_cluster_state{state=\"stopped_rewound\"} 0",
                "chat_cluster_publish_seconds_count 0",
                "chat_frames_refused_total{reason=\"unavailable\"} 0",
                "chat_frames_refused_total{reason=\"not_taken\"} 0",
            ],
        );
        m.cluster.set_state("serving");
        let text = m.encode();
        assert!(
            text.lines()
                .any(|l| l == "chat_cluster_state{state=\"serving\"} 1")
        );
        assert!(
            text.lines()
                .any(|l| l == "chat_cluster_state{state=\"catching_up\"} 0")
        );
    }
}
