//! The broker topology, declared idempotently by every component at start-up,
//! so no event is published before the queue that must hold it exists.

use dishpatch_api::events::EventType;

/// The topic exchange every event goes through; routing key = event type.
pub const EXCHANGE: &str = "dishpatch.events";
/// Where messages go that a consumer rejected or that kept failing.
pub const DEAD_LETTER_EXCHANGE: &str = "dishpatch.dead-letter";
/// Deliveries of one message before the broker dead-letters it (quorum queues).
pub const DELIVERY_LIMIT: i64 = 5;
/// Most messages a dead-letter queue keeps; past it the oldest are dropped,
/// so a flood of poison can't fill the broker's disk. The operator
/// re-publishes for every order still waiting, so nothing an order needs
/// lives only here.
pub const DEAD_LETTER_MAX_LENGTH: i64 = 10_000;
/// How long a dead letter is kept for inspection and replay: one week.
pub const DEAD_LETTER_TTL_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// A consuming service's queue and the events it needs.
#[derive(Debug, Clone, Copy)]
pub struct ServiceQueue {
    pub service: &'static str,
    pub queue: &'static str,
    pub events: &'static [EventType],
}

/// Every service queue; all are declared by whoever starts first.
pub const SERVICE_QUEUES: &[ServiceQueue] = &[
    ServiceQueue {
        service: "payment",
        queue: "dishpatch.payment",
        events: &[EventType::OrderAccepted, EventType::OrderCancelled],
    },
    ServiceQueue {
        service: "kitchen",
        queue: "dishpatch.kitchen",
        events: &[EventType::PaymentSucceeded, EventType::OrderCancelled],
    },
    ServiceQueue {
        service: "delivery",
        queue: "dishpatch.delivery",
        events: &[EventType::KitchenReady, EventType::OrderCancelled],
    },
    ServiceQueue {
        service: "notification",
        queue: "dishpatch.notification",
        events: &EventType::ALL,
    },
];

/// The dead-letter queue of a service queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead-letter")
}
