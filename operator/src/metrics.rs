//! Prometheus metrics of the operator.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub resource: String,
}

pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub orders: Family<PhaseLabels, Gauge>,
    pub overdue: Family<PhaseLabels, Gauge>,
    pub published: Family<KindLabel, Counter>,
    pub republished: Family<KindLabel, Counter>,
    pub writes: Family<WriteLabels, Counter>,
    pub is_leader: Gauge,
    pub compensation_failed: Counter,
    pub archived: Family<ResultLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            orders: Family::default(),
            overdue: Family::default(),
            published: Family::default(),
            republished: Family::default(),
            writes: Family::default(),
            is_leader: Gauge::default(),
            compensation_failed: Counter::default(),
            archived: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("dishpatch_operator");
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciles that failed, by error kind",
            m.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "How long reconciles take",
            m.duration.clone(),
        );
        r.register(
            "orders",
            "Orders by phase (from the watch cache)",
            m.orders.clone(),
        );
        r.register(
            "orders_overdue",
            "Orders past their stage deadline, by phase: what they wait for is re-published, and they are cancelled if it stays overdue",
            m.overdue.clone(),
        );
        r.register(
            "events_published",
            "Events confirmed by the broker",
            m.published.clone(),
        );
        r.register(
            "events_republished",
            "Events re-published because an order stalled",
            m.republished.clone(),
        );
        r.register(
            "api_writes",
            "Writes the operator sent to the apiserver",
            m.writes.clone(),
        );
        r.register(
            "compensation_failures",
            "Orders whose compensation (refund, settling a charge) kept failing until the operator gave up",
            m.compensation_failed.clone(),
        );
        r.register(
            "archive_writes",
            "Orders written to the history database before their delete, by result",
            m.archived.clone(),
        );
        for result in ["ok", "error"] {
            let _ = m.archived.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        r.register(
            "leader",
            "1 while this replica holds the lease",
            m.is_leader.clone(),
        );
        // Series that exist from the start, at zero: a rate over them (the
        // dashboard, alerts) is 0 rather than missing until the first error.
        for controller in ["order", "restaurant"] {
            let _ = m.reconciles.get_or_create(&ControllerLabels {
                controller: controller.into(),
            });
            for error in crate::error::Error::KINDS {
                let _ = m.errors.get_or_create(&ErrorLabels {
                    controller: controller.into(),
                    error: error.into(),
                });
            }
        }
        m
    }

    pub fn write(&self, resource: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource: resource.to_string(),
            })
            .inc();
    }

    pub fn published(&self, event: &str, republish: bool) {
        let labels = KindLabel {
            event: event.to_string(),
        };
        self.published.get_or_create(&labels).inc();
        if republish {
            self.republished.get_or_create(&labels).inc();
        }
    }
}
