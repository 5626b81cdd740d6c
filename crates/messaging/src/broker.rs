//! A RabbitMQ connection that declares the topology, publishes with
//! confirms, and reconnects after the broker restarts.

use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventError, EventType};
use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tracing::Instrument as _;

use crate::topology::{
    DEAD_LETTER_EXCHANGE, DEAD_LETTER_MAX_LENGTH, DEAD_LETTER_TTL_MS, DELIVERY_LIMIT, EXCHANGE,
    SERVICE_QUEUES, dead_letter_queue,
};
use crate::trace::TRACEPARENT_HEADER;

/// A publish can hang when the broker goes away mid-flight (lapin#409); give up
/// after this and let the caller retry.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an event was not confirmed by the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0}")]
    Unroutable(String),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("encoding event: {0}")]
    Encode(#[from] serde_json::Error),
}

struct Live {
    connection: Connection,
    publisher: Channel,
}

/// Connections to RabbitMQ for one component: one for publishing, one for
/// consuming. A resource alarm (memory, disk) makes the broker block every
/// connection that publishes, reading nothing more from it; on a shared
/// connection the consumers' acks would be stuck behind it, so the queues
/// could not drain and the alarm could not clear. Cheap to share behind an
/// `Arc`.
pub struct Broker {
    url: String,
    component: String,
    live: Mutex<Option<Live>>,
    consuming: Mutex<Option<Connection>>,
}

/// How long opening a connection may take before the caller retries; an
/// unanswered TCP connect or handshake would otherwise hang (and hold the
/// lock every other publisher waits on).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Broker {
    /// Connects, declares the whole topology and enables publisher confirms.
    pub async fn connect(url: &str, component: &str) -> Result<Self, PublishError> {
        let broker = Self {
            url: url.to_string(),
            component: component.to_string(),
            live: Mutex::new(None),
            consuming: Mutex::new(None),
        };
        broker.publisher().await?;
        Ok(broker)
    }

    /// The component name this broker publishes as (CloudEvents `source`).
    pub fn component(&self) -> &str {
        &self.component
    }

    /// Whether the publishing connection is up right now.
    pub async fn is_connected(&self) -> bool {
        self.live
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.connection.status().connected() && l.publisher.status().connected())
    }

    async fn open(&self, role: &str) -> Result<Connection, PublishError> {
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("dishpatch-{}-{role}", self.component),
        ));
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.url, properties))
            .await
        {
            Ok(connection) => Ok(connection?),
            Err(_) => Err(PublishError::Timeout(CONNECT_TIMEOUT)),
        }
    }

    /// The publishing channel, reconnecting (and re-declaring) if the
    /// connection was lost.
    async fn publisher(&self) -> Result<Channel, PublishError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && l.connection.status().connected()
            && l.publisher.status().connected()
        {
            return Ok(l.publisher.clone());
        }
        let connection = self.open("publish").await?;
        let publisher = connection.create_channel().await?;
        declare_topology(&publisher).await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        tracing::info!(component = %self.component, "connected to the broker");
        *live = Some(Live {
            connection,
            publisher: publisher.clone(),
        });
        Ok(publisher)
    }

    async fn forget(&self) {
        *self.live.lock().await = None;
    }

    /// A fresh channel for consuming, on a connection that never publishes
    /// (see [`Broker`]). The topology is declared on it, so consuming works
    /// even against a broker that lost its state.
    pub async fn channel(&self) -> Result<Channel, PublishError> {
        let mut consuming = self.consuming.lock().await;
        if let Some(c) = consuming.as_ref()
            && c.status().connected()
        {
            return Ok(c.create_channel().await?);
        }
        let connection = self.open("consume").await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel).await?;
        *consuming = Some(connection);
        Ok(channel)
    }

    /// Publishes an event persistently and waits for the broker's confirm.
    /// Returns only once the broker has taken responsibility for it.
    pub async fn publish(&self, event: &CloudEvent, traceparent: &str) -> Result<(), PublishError> {
        let kind = event
            .event_type()
            .map_err(|e| PublishError::Unroutable(e.0))?;
        let payload = event.to_json()?;
        // A span of its own on the order's trace: the consumer's span is its child.
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish {}", kind.routing_key()),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.destination.name = EXCHANGE,
            order.name = %event.data.order.name,
            order.namespace = %event.data.order.namespace,
            order.uid = %event.data.order.uid,
        );
        crate::trace::adopt(&span, traceparent);
        let sent = crate::trace::traceparent_of(&span, || traceparent.to_string());
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(TRACEPARENT_HEADER),
            AMQPValue::LongString(LongString::from(sent)),
        );
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/cloudevents+json"))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(event.id.clone()))
            .with_type(ShortString::from(event.type_.clone()))
            .with_app_id(ShortString::from(self.component.clone()))
            .with_headers(headers);
        let attempt = async {
            let channel = self.publisher().await?;
            let confirm = channel
                .basic_publish(
                    ShortString::from(EXCHANGE),
                    ShortString::from(kind.routing_key()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload,
                    properties,
                )
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(kind.to_string())),
                Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
            }
        };
        let result = match tokio::time::timeout(PUBLISH_TIMEOUT, attempt.instrument(span)).await {
            Ok(result) => result,
            Err(_) => Err(PublishError::Timeout(PUBLISH_TIMEOUT)),
        };
        if matches!(
            result,
            Err(PublishError::Amqp(_) | PublishError::Timeout(_))
        ) {
            // Start from a fresh connection next time.
            self.forget().await;
        }
        result
    }
}

impl Broker {
    /// Publishes a raw message straight to one queue (through the default
    /// exchange) and waits for the confirm: for moving dead letters back.
    pub(crate) async fn send_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let attempt = async {
            let channel = self.publisher().await?;
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    properties,
                )
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(queue.to_string())),
                Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
            }
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => {
                self.forget().await;
                Err(PublishError::Timeout(PUBLISH_TIMEOUT))
            }
        }
    }
}

/// Declares the exchanges and every service queue with its dead-letter queue.
/// Idempotent: declaring what exists with the same arguments is a no-op.
pub async fn declare_topology(channel: &Channel) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for sq in SERVICE_QUEUES {
        let dlq = dead_letter_queue(sq.queue);
        let mut dlq_args = FieldTable::default();
        dlq_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        // Bounded: dead letters wait for a person (`dishpatch-operator
        // dead-letters`), but not forever and not without limit.
        dlq_args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(DEAD_LETTER_MAX_LENGTH),
        );
        dlq_args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        dlq_args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(DEAD_LETTER_TTL_MS),
        );
        channel
            .queue_declare(dlq.as_str().into(), queue_options, dlq_args)
            .await?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                sq.queue.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        // Quorum queues count deliveries; past the limit a message is
        // dead-lettered instead of looping forever.
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(sq.queue.into()),
        );
        channel
            .queue_declare(sq.queue.into(), queue_options, args)
            .await?;
        for kind in sq.events {
            channel
                .queue_bind(
                    sq.queue.into(),
                    EXCHANGE.into(),
                    kind.routing_key().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

/// A received event with what travelled beside it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub routing_key: String,
    pub event: Result<CloudEvent, String>,
    pub traceparent: Option<String>,
    pub redelivered: bool,
}

impl Delivery {
    fn from_lapin(d: &lapin::message::Delivery) -> Self {
        let traceparent =
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(TRACEPARENT_HEADER) {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                });
        Self {
            routing_key: d.routing_key.to_string(),
            event: CloudEvent::from_json(&d.data).map_err(|e: EventError| e.to_string()),
            traceparent,
            redelivered: d.redelivered,
        }
    }
}

/// A private, temporary queue bound to some event types: lets a test or a
/// tool watch what goes over the exchange without taking it from anyone.
pub struct EventTap {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl EventTap {
    pub async fn new(broker: &Broker, kinds: &[EventType]) -> Result<Self, PublishError> {
        let channel = broker.channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for kind in kinds {
            channel
                .queue_bind(
                    queue.name().clone(),
                    EXCHANGE.into(),
                    kind.routing_key().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            _channel: channel,
            consumer,
        })
    }

    /// The next delivery that satisfies `pred`, or `None` after `timeout`.
    pub async fn next_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Delivery) -> bool,
    ) -> Option<Delivery> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(Ok(raw))) = next else {
                return None;
            };
            let _ = raw.ack(BasicAckOptions::default()).await;
            let delivery = Delivery::from_lapin(&raw);
            if pred(&delivery) {
                return Some(delivery);
            }
        }
    }
}
