//! Worker metrics: messages handled and failed, and handling latency, by event type.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub event: String,
    /// `ok`, `retried`, `held` (kept unacknowledged while the replica's own
    /// probe fails), `failed` (dead-lettered) or `poison`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

pub struct WorkerMetrics {
    pub messages: Family<MessageLabels, Counter>,
    pub latency: Family<EventLabel, Histogram>,
    pub published: Family<EventLabel, Counter>,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry, service: &str) -> Self {
        let m = Self {
            messages: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            published: Family::default(),
        };
        let r = registry.sub_registry_with_prefix(format!("dishpatch_{service}"));
        r.register(
            "messages",
            "Messages handled, by event type and outcome",
            m.messages.clone(),
        );
        r.register(
            "handle_duration_seconds",
            "Time from delivery to ack, by event type",
            m.latency.clone(),
        );
        r.register(
            "events_published",
            "Outcome events confirmed by the broker",
            m.published.clone(),
        );
        m
    }

    pub fn handled(&self, event: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                event: event.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}
