//! The event schema carried over RabbitMQ: CloudEvents 1.0 structured JSON.
//!
//! Events carry news, not truth: consumers re-read the Order before acting.
//! Every id is deterministic (`<order uid>.<event type>`), so a re-published
//! event is recognisably the same event.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// CloudEvents `source` prefix for every dishpatch event.
pub const SOURCE_PREFIX: &str = "/dishpatch";
/// CloudEvents `type` prefix; the routing key follows it.
pub const TYPE_PREFIX: &str = "dev.dishpatch.";

/// Every kind of event; its routing key is `Display`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    #[serde(rename = "order.accepted")]
    OrderAccepted,
    #[serde(rename = "order.cancelled")]
    OrderCancelled,
    /// The operator refused a new order (closed, out of stock, …); the reason says why.
    #[serde(rename = "order.rejected")]
    OrderRejected,
    #[serde(rename = "payment.succeeded")]
    PaymentSucceeded,
    #[serde(rename = "payment.failed")]
    PaymentFailed,
    #[serde(rename = "payment.refunded")]
    PaymentRefunded,
    #[serde(rename = "kitchen.accepted")]
    KitchenAccepted,
    #[serde(rename = "kitchen.ready")]
    KitchenReady,
    #[serde(rename = "delivery.assigned")]
    DeliveryAssigned,
    #[serde(rename = "delivery.picked_up")]
    DeliveryPickedUp,
    #[serde(rename = "delivery.delivered")]
    DeliveryDelivered,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::OrderAccepted,
        EventType::OrderCancelled,
        EventType::OrderRejected,
        EventType::PaymentSucceeded,
        EventType::PaymentFailed,
        EventType::PaymentRefunded,
        EventType::KitchenAccepted,
        EventType::KitchenReady,
        EventType::DeliveryAssigned,
        EventType::DeliveryPickedUp,
        EventType::DeliveryDelivered,
    ];

    /// The AMQP routing key, for example `order.accepted`.
    pub fn routing_key(self) -> &'static str {
        match self {
            EventType::OrderAccepted => "order.accepted",
            EventType::OrderCancelled => "order.cancelled",
            EventType::OrderRejected => "order.rejected",
            EventType::PaymentSucceeded => "payment.succeeded",
            EventType::PaymentFailed => "payment.failed",
            EventType::PaymentRefunded => "payment.refunded",
            EventType::KitchenAccepted => "kitchen.accepted",
            EventType::KitchenReady => "kitchen.ready",
            EventType::DeliveryAssigned => "delivery.assigned",
            EventType::DeliveryPickedUp => "delivery.picked_up",
            EventType::DeliveryDelivered => "delivery.delivered",
        }
    }

    /// The CloudEvents `type`, for example `dev.dishpatch.order.accepted`.
    pub fn cloudevents_type(self) -> String {
        format!("{TYPE_PREFIX}{}", self.routing_key())
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.routing_key())
    }
}

/// An unknown routing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.strip_prefix(TYPE_PREFIX).unwrap_or(s);
        EventType::ALL
            .into_iter()
            .find(|t| t.routing_key() == key)
            .ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

/// Which order an event is about.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OrderRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The event's payload: the order it concerns, and a reason where one applies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OrderEventData {
    pub order: OrderRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A CloudEvents 1.0 event in structured JSON mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CloudEvent {
    pub specversion: String,
    /// `<order uid>.<routing key>`: deterministic, so duplicates are recognisable.
    pub id: String,
    /// `/dishpatch/<component>`.
    pub source: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// `<namespace>/<name>` of the order.
    pub subject: String,
    /// RFC 3339 time the event was produced.
    pub time: String,
    pub datacontenttype: String,
    pub data: OrderEventData,
}

/// An event that does not parse or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("malformed event JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Type(#[from] UnknownEventType),
    #[error("event id {id:?} does not match its order uid and type")]
    Id { id: String },
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
}

impl CloudEvent {
    /// A new event of `kind` about `order`, produced by `component` at `time` (RFC 3339).
    pub fn new(
        kind: EventType,
        component: &str,
        order: OrderRef,
        reason: Option<String>,
        time: String,
    ) -> Self {
        Self {
            specversion: "1.0".into(),
            id: event_id(&order.uid, kind),
            source: format!("{SOURCE_PREFIX}/{component}"),
            type_: kind.cloudevents_type(),
            subject: format!("{}/{}", order.namespace, order.name),
            time,
            datacontenttype: "application/json".into(),
            data: OrderEventData { order, reason },
        }
    }

    pub fn event_type(&self) -> Result<EventType, UnknownEventType> {
        self.type_.parse()
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Parses and checks an event: a poison message fails here, once, and is
    /// dead-lettered rather than retried.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EventError> {
        let event: CloudEvent = serde_json::from_slice(bytes)?;
        if event.specversion != "1.0" {
            return Err(EventError::SpecVersion(event.specversion));
        }
        let kind = event.event_type()?;
        if event.id != event_id(&event.data.order.uid, kind) {
            return Err(EventError::Id { id: event.id });
        }
        Ok(event)
    }
}

/// The deterministic event id.
pub fn event_id(order_uid: &str, kind: EventType) -> String {
    format!("{order_uid}.{}", kind.routing_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> OrderRef {
        OrderRef {
            namespace: "shop".into(),
            name: "o1".into(),
            uid: "3f1c".into(),
        }
    }

    #[test]
    fn round_trips_and_keeps_deterministic_id() {
        let e = CloudEvent::new(
            EventType::PaymentFailed,
            "payment",
            order(),
            Some("card declined".into()),
            "2026-01-01T00:00:00Z".into(),
        );
        assert_eq!(e.id, "3f1c.payment.failed");
        assert_eq!(e.type_, "dev.dishpatch.payment.failed");
        let back = CloudEvent::from_json(&e.to_json().unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.event_type().unwrap(), EventType::PaymentFailed);
    }

    #[test]
    fn every_routing_key_parses_back() {
        for t in EventType::ALL {
            assert_eq!(t.routing_key().parse::<EventType>().unwrap(), t);
            assert_eq!(t.cloudevents_type().parse::<EventType>().unwrap(), t);
        }
        assert!("order.eaten".parse::<EventType>().is_err());
    }

    #[test]
    fn rejects_poison() {
        assert!(matches!(
            CloudEvent::from_json(b"{not json"),
            Err(EventError::Json(_))
        ));
        let mut e = CloudEvent::new(
            EventType::OrderAccepted,
            "operator",
            order(),
            None,
            "t".into(),
        );
        e.id = "other.order.accepted".into();
        assert!(matches!(
            CloudEvent::from_json(&e.to_json().unwrap()),
            Err(EventError::Id { .. })
        ));
        e.id = "3f1c.order.accepted".into();
        e.specversion = "0.3".into();
        assert!(matches!(
            CloudEvent::from_json(&e.to_json().unwrap()),
            Err(EventError::SpecVersion(_))
        ));
    }
}
