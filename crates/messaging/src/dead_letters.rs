//! Dead-letter queues: what a consumer rejected as poison or what kept
//! failing past the delivery limit. They are bounded (length and age, see
//! the topology) and have no consumer: a person looks at them, fixes the
//! cause, and moves the messages back onto the service's work queue.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::broker::{Broker, PublishError};
use crate::topology::{SERVICE_QUEUES, ServiceQueue, dead_letter_queue};

/// A service queue by its service's name (`payment`, `kitchen`, …).
pub fn service_queue(service: &str) -> Option<&'static ServiceQueue> {
    SERVICE_QUEUES.iter().find(|q| q.service == service)
}

/// Messages waiting in a service's dead-letter queue.
pub async fn count(broker: &Broker, queue: &ServiceQueue) -> Result<u32, PublishError> {
    let channel = broker.channel().await?;
    let declared = channel
        .queue_declare(
            dead_letter_queue(queue.queue).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(declared.message_count())
}

/// Moves up to `max` dead letters back onto the service's work queue, the
/// oldest first, each with its body and properties (trace context
/// included). A message is removed from the dead-letter queue only after
/// the broker confirmed its copy on the work queue, so a crash midway
/// duplicates at most one message and loses none; consumers are idempotent.
pub async fn replay(
    broker: &Broker,
    queue: &ServiceQueue,
    max: usize,
) -> Result<usize, PublishError> {
    let channel = broker.channel().await?;
    let dlq = dead_letter_queue(queue.queue);
    let mut moved = 0;
    while moved < max {
        let Some(message) = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        broker
            .send_to_queue(queue.queue, &delivery.data, delivery.properties.clone())
            .await?;
        delivery.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(moved)
}
