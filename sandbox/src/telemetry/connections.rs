//! The connection metrics of both listeners: open, refused at the cap, closed
//! by a timeout. `server`'s accept loops record into [`ConnectionMetrics`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::names;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// Why a connection was closed by the daemon rather than by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// A request's headers did not arrive within `server.header_read_timeout_ms`.
    Header,
    /// No request (or no reading of an answer) within `server.idle_timeout_ms`.
    Idle,
}

impl TimeoutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Header => "header",
            TimeoutPhase::Idle => "idle",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    listener: &'static str,
    phase: &'static str,
}

/// Cheap to clone; clones share the metrics.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: Family<ListenerLabels, Gauge>,
    max: Gauge,
    refused: Family<ListenerLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
}

impl ConnectionMetrics {
    pub(super) fn register(registry: &mut Registry) -> ConnectionMetrics {
        let metrics = ConnectionMetrics {
            open: Family::default(),
            max: Gauge::default(),
            refused: Family::default(),
            timeouts: Family::default(),
        };
        registry.register(
            names::CONNECTIONS_OPEN,
            "Client connections open now, by listener",
            metrics.open.clone(),
        );
        registry.register(
            names::CONNECTIONS_MAX,
            "The cap on open client connections, both listeners together (server.max_connections)",
            metrics.max.clone(),
        );
        registry.register(
            names::CONNECTIONS_REFUSED,
            "Connections closed at once because server.max_connections were open",
            metrics.refused.clone(),
        );
        registry.register(
            names::CONNECTION_TIMEOUTS,
            "Connections closed by the header-read or idle timeout",
            metrics.timeouts.clone(),
        );
        metrics
    }

    /// Records the cap in force.
    pub fn set_max(&self, max: u64) {
        self.max.set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Counts a connection on `listener` as open until the guard is dropped;
    /// the listener's series exist from the start, at 0.
    pub fn opened(&self, listener: &'static str) -> OpenConnection {
        let gauge = self
            .open
            .get_or_create(&ListenerLabels { listener })
            .clone();
        gauge.inc();
        OpenConnection { gauge }
    }

    /// Makes `listener`'s series visible before its first connection.
    pub fn listening(&self, listener: &'static str) {
        let labels = ListenerLabels { listener };
        drop(self.open.get_or_create(&labels));
        drop(self.refused.get_or_create(&labels));
    }

    /// Counts a connection refused at the cap; returns the total so far.
    pub fn refused(&self, listener: &'static str) -> u64 {
        let counter = self.refused.get_or_create(&ListenerLabels { listener });
        counter.inc() + 1
    }

    /// Counts a connection closed by a timeout.
    pub fn timed_out(&self, listener: &'static str, phase: TimeoutPhase) {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                listener,
                phase: phase.as_str(),
            })
            .inc();
    }
}

/// Decrements the open-connections gauge when the connection ends.
pub struct OpenConnection {
    gauge: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
