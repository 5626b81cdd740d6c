//! The handler: for every event, an e-mail to the customer and a signed
//! webhook to the integrator. Writes nothing to the Order.
//!
//! Delivery is at least once, so a notification can go out twice: when the
//! broker redelivers, when the operator re-publishes a stalled order's event,
//! or when one channel failed and the event is retried. Both channels carry
//! the event id (the e-mail's `Message-ID` is `<event id>@dishpatch.dev`, the
//! webhook body is the CloudEvent with its deterministic `id`), so duplicates
//! are recognisable. Within one process a channel that already succeeded for
//! an event is not sent again (see [`Sent`]); across restarts and replicas it
//! may be.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use dishpatch_api::events::{CloudEvent, EventType};
use dishpatch_worker::{HandleError, Handler, OrderAccess};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::mail::{self, Mailer};
use crate::templates::{self, Values};
use crate::webhook::Webhook;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Channel {
    Email,
    Webhook,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SentLabels {
    channel: String,
    /// `sent`, `skipped` (no address, order gone), `retryable` or `failed`.
    outcome: String,
}

/// Notifications by channel and outcome.
pub struct NotificationMetrics {
    notifications: Family<SentLabels, Counter>,
}

impl NotificationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            notifications: Family::default(),
        };
        registry
            .sub_registry_with_prefix("dishpatch_notification")
            .register(
                "notifications",
                "Notifications by channel (email, webhook) and outcome (sent, skipped, retryable, failed)",
                m.notifications.clone(),
            );
        m
    }

    fn count(&self, channel: Channel, outcome: &str) {
        self.notifications
            .get_or_create(&SentLabels {
                channel: channel.as_str().to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// The (event id, channel) pairs this process has delivered, bounded,
/// oldest forgotten first. It keeps an event retried for its webhook from
/// e-mailing the customer again, and absorbs re-published events.
struct Sent {
    order: VecDeque<(String, Channel)>,
    set: HashSet<(String, Channel)>,
    capacity: usize,
}

impl Sent {
    fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str, channel: Channel) -> bool {
        self.set.contains(&(id.to_string(), channel))
    }

    fn insert(&mut self, id: &str, channel: Channel) {
        let key = (id.to_string(), channel);
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Remembered deliveries; about 100 bytes each.
const SENT_CAPACITY: usize = 20_000;

pub struct Notifier {
    orders: OrderAccess,
    mailer: Mailer,
    webhook: Option<Webhook>,
    metrics: NotificationMetrics,
    sent: Mutex<Sent>,
}

impl Notifier {
    pub fn new(
        orders: OrderAccess,
        mailer: Mailer,
        webhook: Option<Webhook>,
        metrics: NotificationMetrics,
    ) -> Self {
        Self {
            orders,
            mailer,
            webhook,
            metrics,
            sent: Mutex::new(Sent::new(SENT_CAPACITY)),
        }
    }

    fn already_sent(&self, event: &CloudEvent, channel: Channel) -> bool {
        // A poisoned lock only means another handler panicked mid-insert; the set is still usable.
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.contains(&event.id, channel)
    }

    fn mark_sent(&self, event: &CloudEvent, channel: Channel) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.insert(&event.id, channel);
    }

    /// Runs one channel's `send` unless it already succeeded for this event,
    /// and remembers, counts and logs what happened.
    async fn once(
        &self,
        event: &CloudEvent,
        traceparent: &str,
        channel: Channel,
        send: impl Future<Output = Result<Outcome, HandleError>>,
    ) -> Result<Outcome, HandleError> {
        if self.already_sent(event, channel) {
            return Ok(Outcome::Skipped("already sent"));
        }
        let result = send.await;
        if matches!(result, Ok(Outcome::Sent)) {
            self.mark_sent(event, channel);
        }
        self.record(event, traceparent, channel, &result);
        result
    }

    /// Counts and logs one channel's outcome.
    fn record(
        &self,
        event: &CloudEvent,
        traceparent: &str,
        channel: Channel,
        result: &Result<Outcome, HandleError>,
    ) {
        let outcome = match result {
            Ok(Outcome::Sent) => {
                tracing::info!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %traceparent, "notified");
                "sent"
            }
            Ok(Outcome::Skipped(why)) => {
                tracing::info!(order = %event.subject, event = %event.type_, channel = channel.as_str(), why, %traceparent, "not notifying");
                "skipped"
            }
            Err(HandleError::Retryable(why)) => {
                tracing::warn!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %why, %traceparent, "notification failed; will retry");
                "retryable"
            }
            Err(HandleError::Permanent(why)) => {
                tracing::warn!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %why, %traceparent, "notification failed for good");
                "failed"
            }
        };
        self.metrics.count(channel, outcome);
    }

    async fn email(&self, event: &CloudEvent, kind: EventType) -> Result<Outcome, HandleError> {
        let Some(order) = self.orders.order(&event.data.order).await? else {
            return Ok(Outcome::Skipped("the order no longer exists"));
        };
        let Some(to) = order.spec.customer.contact.email.as_deref() else {
            return Ok(Outcome::Skipped("the customer has no e-mail address"));
        };
        let rendered = templates::render(kind, &Values::new(event, &order))
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        match self
            .mailer
            .send(to, mail::message_id(&event.id), &rendered)
            .await
        {
            Ok(()) => Ok(Outcome::Sent),
            Err(e) if e.is_permanent() => Err(HandleError::Permanent(format!("e-mail: {e}"))),
            Err(e) => Err(HandleError::Retryable(format!("e-mail: {e}"))),
        }
    }

    async fn webhook(
        &self,
        webhook: &Webhook,
        event: &CloudEvent,
        traceparent: &str,
    ) -> Result<Outcome, HandleError> {
        let body = event
            .to_json()
            .map_err(|e| HandleError::Permanent(format!("encoding the event: {e}")))?;
        match webhook.post(body, traceparent).await {
            Ok(()) => Ok(Outcome::Sent),
            Err(e) if e.is_permanent() => Err(HandleError::Permanent(format!(
                "webhook {}: {e}",
                webhook.url()
            ))),
            Err(e) => Err(HandleError::Retryable(format!(
                "webhook {}: {e}",
                webhook.url()
            ))),
        }
    }
}

/// What one channel did with an event.
enum Outcome {
    Sent,
    Skipped(&'static str),
}

/// Both channels' results as one: retry while anything may still succeed
/// (channels already done are not repeated), dead-letter when something
/// failed for good and nothing is left to retry.
fn combine(results: [Result<Outcome, HandleError>; 2]) -> Result<(), HandleError> {
    let mut retryable = Vec::new();
    let mut permanent = Vec::new();
    for result in results {
        match result {
            Ok(_) => {}
            Err(HandleError::Retryable(why)) => retryable.push(why),
            Err(HandleError::Permanent(why)) => permanent.push(why),
        }
    }
    if !retryable.is_empty() {
        retryable.extend(permanent);
        Err(HandleError::Retryable(retryable.join("; ")))
    } else if !permanent.is_empty() {
        Err(HandleError::Permanent(permanent.join("; ")))
    } else {
        Ok(())
    }
}

impl Handler for Notifier {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        let kind = event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        // Both channels at once and each whatever the other does, so a slow
        // or broken SMTP server doesn't hold back webhooks and vice versa.
        let (email, webhook) = tokio::join!(
            self.once(
                &event,
                &traceparent,
                Channel::Email,
                self.email(&event, kind)
            ),
            self.once(&event, &traceparent, Channel::Webhook, async {
                match &self.webhook {
                    Some(webhook) => self.webhook(webhook, &event, &traceparent).await,
                    None => Ok(Outcome::Skipped("no webhook configured")),
                }
            }),
        );
        combine([email, webhook])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_is_bounded_and_forgets_the_oldest() {
        let mut sent = Sent::new(2);
        sent.insert("a", Channel::Email);
        sent.insert("a", Channel::Email);
        sent.insert("b", Channel::Email);
        assert!(sent.contains("a", Channel::Email));
        assert!(!sent.contains("a", Channel::Webhook));
        sent.insert("c", Channel::Webhook);
        assert!(!sent.contains("a", Channel::Email));
        assert!(sent.contains("b", Channel::Email) && sent.contains("c", Channel::Webhook));
        assert_eq!((sent.order.len(), sent.set.len()), (2, 2));
    }

    #[test]
    fn retry_wins_over_dead_letter_while_something_may_succeed() {
        let retry = || Err(HandleError::Retryable("smtp down".into()));
        let fail = || Err(HandleError::Permanent("webhook said 400".into()));
        assert!(combine([Ok(Outcome::Sent), Ok(Outcome::Skipped("x"))]).is_ok());
        assert!(matches!(
            combine([retry(), fail()]),
            Err(HandleError::Retryable(why)) if why.contains("smtp down") && why.contains("400")
        ));
        assert!(matches!(
            combine([Ok(Outcome::Sent), fail()]),
            Err(HandleError::Permanent(_))
        ));
        assert!(matches!(
            combine([retry(), Ok(Outcome::Sent)]),
            Err(HandleError::Retryable(_))
        ));
    }
}
