//! RabbitMQ for dishpatch: one durable topic exchange, a durable quorum queue
//! per consuming service with a dead-letter queue beside it, publishing that
//! waits for broker confirms, and W3C trace context in message headers.
//!
//! The broker carries news, never truth: consumers re-read the Order before
//! acting, and the operator re-publishes when an order stalls.

mod broker;
pub mod dead_letters;
mod topology;
pub mod trace;

pub use broker::{Broker, Delivery, EventTap, PublishError};
pub use topology::{
    DEAD_LETTER_EXCHANGE, DEAD_LETTER_MAX_LENGTH, DEAD_LETTER_TTL_MS, DELIVERY_LIMIT, EXCHANGE,
    SERVICE_QUEUES, ServiceQueue, dead_letter_queue,
};
