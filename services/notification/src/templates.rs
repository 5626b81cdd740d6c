//! The e-mails, one readable text file per event type in `templates/`: a
//! `Subject:` line, a blank line, then the body. `{order}`, `{customer}`,
//! `{phase}`, `{total}` and `{reason}` are filled in; anything else in braces
//! is left as written.

use dishpatch_api::events::{CloudEvent, EventType};
use dishpatch_api::{Order, OrderPhase};

/// A template file that is not `Subject: ...`, a blank line, a body.
#[derive(Debug, thiserror::Error)]
#[error("template for {0} must start with a `Subject:` line followed by a blank line")]
pub struct TemplateError(EventType);

fn source(kind: EventType) -> &'static str {
    match kind {
        EventType::OrderAccepted => include_str!("../templates/order.accepted.txt"),
        EventType::OrderCancelled => include_str!("../templates/order.cancelled.txt"),
        EventType::OrderRejected => include_str!("../templates/order.rejected.txt"),
        EventType::PaymentSucceeded => include_str!("../templates/payment.succeeded.txt"),
        EventType::PaymentFailed => include_str!("../templates/payment.failed.txt"),
        EventType::PaymentRefunded => include_str!("../templates/payment.refunded.txt"),
        EventType::KitchenAccepted => include_str!("../templates/kitchen.accepted.txt"),
        EventType::KitchenReady => include_str!("../templates/kitchen.ready.txt"),
        EventType::DeliveryAssigned => include_str!("../templates/delivery.assigned.txt"),
        EventType::DeliveryPickedUp => include_str!("../templates/delivery.picked_up.txt"),
        EventType::DeliveryDelivered => include_str!("../templates/delivery.delivered.txt"),
    }
}

/// The subject and body templates of an event type.
fn template(kind: EventType) -> Result<(&'static str, &'static str), TemplateError> {
    let text = source(kind);
    let (first, rest) = text.split_once('\n').ok_or(TemplateError(kind))?;
    let subject = first.strip_prefix("Subject:").ok_or(TemplateError(kind))?;
    let body = rest.strip_prefix('\n').ok_or(TemplateError(kind))?;
    Ok((subject.trim(), body))
}

/// What the placeholders stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    pub order: String,
    pub customer: String,
    pub phase: String,
    pub total: String,
    pub reason: String,
}

impl Values {
    /// The values for `event` about `order`.
    pub fn new(event: &CloudEvent, order: &Order) -> Self {
        let status = order.status.as_ref();
        let phase = status.and_then(|s| s.phase).unwrap_or(OrderPhase::Pending);
        let total = status
            .and_then(|s| s.total.as_ref())
            .map(|t| t.to_string())
            .unwrap_or_else(|| "not priced yet".to_string());
        // The event's reason first; the order remembers why it was cancelled
        // or why payment failed when a re-published event carries none.
        let reason = event
            .data
            .reason
            .clone()
            .or_else(|| order.spec.cancellation.as_ref().map(|c| c.reason.clone()))
            .or_else(|| {
                status
                    .and_then(|s| s.payment.as_ref())
                    .and_then(|p| p.failure_reason.clone())
            })
            .unwrap_or_else(|| "no reason was given".to_string());
        Self {
            order: event.data.order.name.clone(),
            customer: order.spec.customer.name.clone(),
            phase: phase_in_words(phase).to_string(),
            total,
            reason,
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "order" => Some(&self.order),
            "customer" => Some(&self.customer),
            "phase" => Some(&self.phase),
            "total" => Some(&self.total),
            "reason" => Some(&self.reason),
            _ => None,
        }
    }
}

/// A phase as a customer would say it.
pub fn phase_in_words(phase: OrderPhase) -> &'static str {
    match phase {
        OrderPhase::Pending => "waiting for the restaurant",
        OrderPhase::Accepted => "accepted",
        OrderPhase::Rejected => "not accepted",
        OrderPhase::Paid => "paid",
        OrderPhase::Preparing => "being prepared",
        OrderPhase::Ready => "ready for pick-up",
        OrderPhase::OutForDelivery => "out for delivery",
        OrderPhase::Delivered => "delivered",
        OrderPhase::Cancelled => "cancelled",
    }
}

/// Fills in `{placeholder}`s in one pass, so a value that itself contains
/// braces (a customer called "{reason}") is inserted as written.
pub fn fill(template: &str, values: &Values) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after
            .find('}')
            .and_then(|close| values.get(&after[..close]).map(|v| (close, v)))
        {
            Some((close, value)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A rendered e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

/// The e-mail for an event of `kind`.
pub fn render(kind: EventType, values: &Values) -> Result<Rendered, TemplateError> {
    let (subject, body) = template(kind)?;
    // A subject is one header line whatever the customer's name holds.
    let subject = fill(subject, values)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok(Rendered {
        subject,
        body: fill(body, values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            order: "o1".into(),
            customer: "Jane Doe".into(),
            phase: "accepted".into(),
            total: "25.00 EUR".into(),
            reason: "changed my mind".into(),
        }
    }

    #[test]
    fn every_event_type_has_a_well_formed_template() {
        for kind in EventType::ALL {
            let r = render(kind, &values()).unwrap();
            assert!(r.subject.contains("o1"), "{kind}: {}", r.subject);
            assert!(r.body.contains("Hello Jane Doe,"), "{kind}: {}", r.body);
            // Every placeholder is one we fill: nothing in braces survives.
            assert!(
                !r.subject.contains('{') && !r.body.contains('{'),
                "{kind}: unknown placeholder in {r:?}"
            );
        }
    }

    #[test]
    fn reasons_appear_where_they_matter() {
        for kind in [EventType::OrderCancelled, EventType::PaymentFailed] {
            assert!(
                render(kind, &values())
                    .unwrap()
                    .body
                    .contains("Why: changed my mind")
            );
        }
    }

    #[test]
    fn fill_is_one_pass_and_keeps_unknown_braces() {
        let mut v = values();
        v.customer = "{reason}".into();
        assert_eq!(
            fill("Hi {customer}, {unknown} {total}{", &v),
            "Hi {reason}, {unknown} 25.00 EUR{"
        );
    }

    #[test]
    fn subjects_stay_on_one_line() {
        let mut v = values();
        v.order = "o1\r\nBcc: someone@example.com".into();
        let r = render(EventType::OrderAccepted, &v).unwrap();
        assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
    }

    #[test]
    fn values_from_an_order() {
        let order: Order = serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order",
            "metadata": {"name": "o1", "namespace": "shop", "uid": "u1"},
            "spec": {
                "customer": {"id": "c", "name": "Jane Doe", "contact": {"email": "jane@example.com"}},
                "restaurantRef": {"name": "roma"},
                "items": [{"menuItem": "pizza", "quantity": 1}],
                "deliveryAddress": {"street": "s", "city": "c", "postalCode": "1", "country": "DE"},
                "payment": {"token": "tok_visa"},
                "cancellation": {"reason": "changed my mind"}
            },
            "status": {"phase": "OutForDelivery", "total": {"amount": 2500, "currency": "EUR"}}
        }))
        .unwrap();
        let event = CloudEvent::new(
            EventType::OrderCancelled,
            "operator",
            dishpatch_api::events::OrderRef {
                namespace: "shop".into(),
                name: "o1".into(),
                uid: "u1".into(),
            },
            None,
            "2026-01-01T00:00:00Z".into(),
        );
        let v = Values::new(&event, &order);
        assert_eq!(
            v,
            Values {
                order: "o1".into(),
                customer: "Jane Doe".into(),
                phase: "out for delivery".into(),
                total: "25.00 EUR".into(),
                reason: "changed my mind".into(),
            }
        );
    }
}
