//! What every connection's task shares: the settings, the sequencer, the
//! published log, the admission rules, the limits and the metrics.
//!
//! Only the layers above it see it (`front`, `connection`, `server`); the
//! ones below are handed what they need.

use crate::admission::Admission;
use crate::admission::host::HostPolicy;
use crate::admission::limits::AddressLimits;
use crate::admission::operators::Operators;
use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::fanout::Fanout;
use crate::publish::log::Log;
use crate::sequencer::Sequencer;
use crate::wire::delivery;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The operator API's keys (`--admin-keys-file`); without them the API
    /// is off.
    pub(crate) operators: Option<Operators>,
    /// The time commands get (the operator API reads restrictions in
    /// force by it).
    pub(crate) clock: Clock,
    /// Where commands are put in the chat's one order.
    pub(crate) sequencer: Arc<dyn Sequencer>,
    /// What has been published, for connections to read.
    pub(crate) log: Arc<Log>,
    /// The connections, for the publisher to write to while they wait at
    /// the log's head.
    pub(crate) fanout: Arc<Fanout>,
    /// The chat's rules for joining.
    pub(crate) admission: Admission,
    /// Which `Host` every request must name.
    pub(crate) hosts: HostPolicy,
    /// Connections per TCP peer still in their request phase.
    pub(crate) pending: Arc<AddressLimits>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when this node stops serving its chat (cluster mode: the
    /// stream is no longer the log it applied): every connection closes,
    /// so that its client reconnects to a node that serves.
    pub(crate) unserved: CancellationToken,
    /// Once stopping: when `--shutdown-grace` ends.
    pub(crate) stop_by: std::sync::OnceLock<tokio::time::Instant>,
    /// Every connection's bounds and deadlines.
    pub(crate) delivery: Arc<delivery::Settings>,
}

impl Shared {
    /// Why the node does not serve now, if it does not: catching up with
    /// its cluster, or stopped applying.
    pub(crate) fn not_serving(&self) -> Option<&'static str> {
        self.sequencer.health().serving().err()
    }

    /// The deadline of a close that would end at `wanted`: no later than
    /// the end of the grace period, once the server is stopping.
    pub(crate) fn closing_deadline(&self, wanted: tokio::time::Instant) -> tokio::time::Instant {
        match self.stop_by.get() {
            Some(by) => wanted.min(*by),
            None => wanted,
        }
    }
}
