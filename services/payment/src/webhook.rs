//! Stripe's webhooks, `POST /webhooks/stripe`: card payments that settle
//! after the charge call returned (3-D Secure, bank delays), refunds made in
//! the dashboard, and disputes.
//!
//! The signature (an HMAC over the timestamped payload, within Stripe's
//! five-minute tolerance) is checked by the Stripe SDK (`async-stripe-webhook`).
//! What an event means for the order is [`apply`], a pure function: an event
//! id already applied changes nothing, and a state is never overtaken by one
//! that comes before it (a late `payment_failed` after `succeeded` is stale),
//! so events may arrive twice and in any order. The payment service owns
//! `status.payment`, so it is the one that writes what the webhook says.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dishpatch_api::events::{EventType, OrderRef};
use dishpatch_api::order::{PaymentState, PaymentStatus};
use dishpatch_worker::OrderAccess;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;
use stripe_webhook::{EventObject, Webhook, WebhookError};

use crate::stripe::{Stripe, order_of};

/// How many applied event ids an order keeps (the schema's bound).
pub const KEPT_EVENT_IDS: usize = 32;

/// What a webhook event says about a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Succeeded,
    Failed { reason: String },
    RequiresAction { url: Option<String> },
    Refunded { refund_id: Option<String> },
    Disputed { reason: String },
}

/// One event about one PaymentIntent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub event_id: String,
    pub payment_id: String,
    pub settlement: Settlement,
}

/// Where a state stands on the way a charge can only go: each later state
/// overtakes the earlier ones, never the other way. A success after a
/// failure is real money (a retried card), so it overtakes the failure: the
/// cancelled order's compensation then refunds it.
fn rank(s: PaymentState) -> u8 {
    match s {
        PaymentState::Pending => 0,
        PaymentState::RequiresAction => 1,
        PaymentState::Failed => 2,
        PaymentState::Succeeded => 3,
        PaymentState::Refunded => 4,
    }
}

/// The payment section after `notice`, or `None` when it changes nothing
/// (already applied, stale, or about another charge).
pub fn apply(current: &PaymentStatus, notice: &Notice, now: &Time) -> Option<PaymentStatus> {
    if current.webhook_events.contains(&notice.event_id) {
        return None;
    }
    if current
        .payment_id
        .as_ref()
        .is_some_and(|id| *id != notice.payment_id)
    {
        return None;
    }
    let mut next = current.clone();
    next.payment_id = Some(notice.payment_id.clone());
    let target = match &notice.settlement {
        Settlement::Succeeded => PaymentState::Succeeded,
        Settlement::Failed { .. } => PaymentState::Failed,
        Settlement::RequiresAction { .. } => PaymentState::RequiresAction,
        Settlement::Refunded { .. } => PaymentState::Refunded,
        Settlement::Disputed { reason } => {
            if current.disputed_at.is_some() {
                return None;
            }
            next.disputed_at = Some(now.clone());
            next.dispute_reason = Some(reason.clone());
            return Some(remember(next, &notice.event_id));
        }
    };
    if rank(target) <= rank(current.state) {
        return None;
    }
    next.state = target;
    match &notice.settlement {
        Settlement::Succeeded => {
            next.charged_at = Some(now.clone());
            next.action_url = None;
            next.failure_reason = None;
        }
        Settlement::Failed { reason } => {
            next.failure_reason = Some(reason.clone());
            next.action_url = None;
        }
        Settlement::RequiresAction { url } => next.action_url = url.clone(),
        Settlement::Refunded { refund_id } => {
            next.refund_id = refund_id.clone().or(next.refund_id);
            next.refunded_at = Some(now.clone());
        }
        Settlement::Disputed { .. } => {}
    }
    Some(remember(next, &notice.event_id))
}

fn remember(mut status: PaymentStatus, event_id: &str) -> PaymentStatus {
    status.webhook_events.push(event_id.to_string());
    let extra = status.webhook_events.len().saturating_sub(KEPT_EVENT_IDS);
    status.webhook_events.drain(..extra);
    status
}

/// The event the rest of the platform hears for a payment in `state`.
pub fn announcement(state: PaymentState) -> Option<EventType> {
    match state {
        PaymentState::Succeeded => Some(EventType::PaymentSucceeded),
        PaymentState::Failed => Some(EventType::PaymentFailed),
        PaymentState::Refunded => Some(EventType::PaymentRefunded),
        PaymentState::Pending | PaymentState::RequiresAction => None,
    }
}

pub struct Webhooks {
    pub access: OrderAccess,
    pub stripe: Arc<Stripe>,
    /// The endpoint's signing secret (`whsec_…`).
    pub secret: String,
}

pub fn router(state: Arc<Webhooks>) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .with_state(state)
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn answer(code: StatusCode, key: &str, message: impl Into<String>) -> Answer {
    (code, Json(json!({ key: message.into() })))
}

/// Where an event's order is named: in the object's metadata (the intent's,
/// which the charge sets; a charge's or dispute's if someone put it there),
/// or else read from the intent at Stripe (charges and disputes name it).
enum Route {
    Order(Option<OrderRef>),
    Intent(String),
}

fn notice_of(event: &stripe_webhook::Event) -> Option<(Route, Notice)> {
    let event_id = event.id.as_str().to_string();
    let intent = |pi: &stripe_shared::PaymentIntent, settlement| {
        Some((
            Route::Order(order_of(&pi.metadata)),
            Notice {
                event_id: event_id.clone(),
                payment_id: pi.id.as_str().to_string(),
                settlement,
            },
        ))
    };
    match &event.data.object {
        EventObject::PaymentIntentSucceeded(pi) => intent(pi, Settlement::Succeeded),
        EventObject::PaymentIntentPaymentFailed(pi) => intent(
            pi,
            Settlement::Failed {
                reason: pi
                    .last_payment_error
                    .as_ref()
                    .and_then(|e| e.message.clone())
                    .unwrap_or_else(|| "the payment failed".into()),
            },
        ),
        EventObject::PaymentIntentRequiresAction(pi) => intent(
            pi,
            Settlement::RequiresAction {
                url: pi
                    .next_action
                    .as_ref()
                    .and_then(|a| a.redirect_to_url.as_ref())
                    .and_then(|r| r.url.clone()),
            },
        ),
        EventObject::ChargeRefunded(charge) => {
            let pi = charge.payment_intent.as_ref()?.id().as_str().to_string();
            let route = order_of(&charge.metadata)
                .map_or(Route::Intent(pi.clone()), |o| Route::Order(Some(o)));
            let refund_id = charge
                .refunds
                .as_ref()
                .and_then(|l| l.data.first())
                .map(|r| r.id.as_str().to_string());
            Some((
                route,
                Notice {
                    event_id,
                    payment_id: pi,
                    settlement: Settlement::Refunded { refund_id },
                },
            ))
        }
        EventObject::ChargeDisputeCreated(dispute) => {
            let pi = dispute.payment_intent.as_ref()?.id().as_str().to_string();
            let route = order_of(&dispute.metadata)
                .map_or(Route::Intent(pi.clone()), |o| Route::Order(Some(o)));
            Some((
                route,
                Notice {
                    event_id,
                    payment_id: pi,
                    settlement: Settlement::Disputed {
                        reason: dispute.reason.clone(),
                    },
                },
            ))
        }
        _ => None,
    }
}

#[tracing::instrument(name = "POST /webhooks/stripe", skip_all, fields(
    otel.kind = "server",
    stripe.event = tracing::field::Empty,
))]
async fn receive(State(hooks): State<Arc<Webhooks>>, headers: HeaderMap, body: String) -> Answer {
    let Some(signature) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return answer(
            StatusCode::BAD_REQUEST,
            "error",
            "no Stripe-Signature header",
        );
    };
    let event = match Webhook::construct_event(&body, signature, &hooks.secret) {
        Ok(event) => event,
        Err(e) => {
            let why = match e {
                WebhookError::BadSignature => "the signature does not match the payload".into(),
                WebhookError::BadTimestamp(t) => {
                    format!("the signature's timestamp {t} is outside the tolerance")
                }
                WebhookError::BadHeader(_) => "the Stripe-Signature header is malformed".into(),
                other => other.to_string(),
            };
            tracing::warn!(%why, "refused a webhook");
            return answer(StatusCode::BAD_REQUEST, "error", why);
        }
    };
    tracing::Span::current().record("stripe.event", event.id.as_str());
    let Some((route, notice)) = notice_of(&event) else {
        return answer(StatusCode::OK, "ignored", "not an event dishpatch acts on");
    };
    let order = match route {
        Route::Order(order) => order,
        Route::Intent(id) => match hooks.stripe.intent_order(&id).await {
            Ok(order) => order,
            Err(e) => {
                // Stripe retries a webhook that did not answer 2xx.
                return answer(StatusCode::SERVICE_UNAVAILABLE, "error", e.to_string());
            }
        },
    };
    let Some(order) = order else {
        return answer(
            StatusCode::OK,
            "ignored",
            "the intent names no dishpatch order",
        );
    };
    match settle(&hooks.access, &order, &notice).await {
        Ok(outcome) => answer(StatusCode::OK, "result", outcome),
        Err(e) => {
            tracing::warn!(error = %e, order = %order.name, "applying a webhook");
            answer(StatusCode::SERVICE_UNAVAILABLE, "error", e.to_string())
        }
    }
}

/// Applies `notice` to the order's payment section, conditionally on the
/// copy it was decided from, and announces a settled charge.
async fn settle(
    access: &OrderAccess,
    r: &OrderRef,
    notice: &Notice,
) -> Result<&'static str, dishpatch_worker::HandleError> {
    let traceparent = dishpatch_worker::child_traceparent(&r.uid);
    for _ in 0..5 {
        let Some(order) = access.order(r).await? else {
            return Ok("the order is gone");
        };
        let Some(current) = order.status.as_ref().and_then(|s| s.payment.clone()) else {
            return Ok("the order has no charge");
        };
        if current.webhook_events.contains(&notice.event_id) {
            // Redelivered: say again what it settled, in case the first
            // answer's announcement was lost.
            if let Some(kind) = announcement(current.state) {
                access
                    .publish(r, kind, current.failure_reason.clone(), &traceparent)
                    .await?;
            }
            return Ok("already applied");
        }
        let Some(next) = apply(&current, notice, &Time(jiff::Timestamp::now())) else {
            return Ok("nothing to change");
        };
        let section = serde_json::to_value(&next)
            .map_err(|e| dishpatch_worker::HandleError::Permanent(e.to_string()))?;
        if access.write_if_unchanged(&order, section).await?.is_none() {
            continue; // written meanwhile: decide again on the new copy
        }
        if next.state != current.state
            && let Some(kind) = announcement(next.state)
        {
            access
                .publish(r, kind, next.failure_reason.clone(), &traceparent)
                .await?;
        }
        return Ok("applied");
    }
    Err(dishpatch_worker::HandleError::Retryable(
        "the order kept changing".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at() -> Time {
        Time("2026-12-01T10:00:00Z".parse().unwrap_or_default())
    }

    fn waiting() -> PaymentStatus {
        PaymentStatus {
            payment_id: Some("pi_1".into()),
            action_url: Some("https://hooks.stripe.com/3ds".into()),
            ..PaymentStatus::new(PaymentState::RequiresAction, "stripe")
        }
    }

    fn notice(id: &str, settlement: Settlement) -> Notice {
        Notice {
            event_id: id.into(),
            payment_id: "pi_1".into(),
            settlement,
        }
    }

    #[test]
    fn success_settles_a_waiting_charge_once() {
        let n = notice("evt_1", Settlement::Succeeded);
        let Some(paid) = apply(&waiting(), &n, &at()) else {
            panic!("not applied")
        };
        assert_eq!(paid.state, PaymentState::Succeeded);
        assert_eq!(paid.action_url, None);
        assert_eq!(paid.webhook_events, ["evt_1"]);
        assert_eq!(apply(&paid, &n, &at()), None, "a replay changes nothing");
    }

    #[test]
    fn a_late_failure_does_not_undo_a_success() {
        let paid = apply(&waiting(), &notice("evt_2", Settlement::Succeeded), &at());
        let paid = paid.unwrap_or_else(|| panic!("not applied"));
        let late = notice(
            "evt_1",
            Settlement::Failed {
                reason: "declined".into(),
            },
        );
        assert_eq!(apply(&paid, &late, &at()), None);
    }

    #[test]
    fn another_intent_is_not_this_charge() {
        let mut n = notice("evt_1", Settlement::Succeeded);
        n.payment_id = "pi_other".into();
        assert_eq!(apply(&waiting(), &n, &at()), None);
    }

    #[test]
    fn a_dispute_is_recorded_once_and_keeps_the_state() {
        let paid = apply(&waiting(), &notice("evt_1", Settlement::Succeeded), &at())
            .unwrap_or_else(|| panic!("not applied"));
        let d = |id: &str| {
            notice(
                id,
                Settlement::Disputed {
                    reason: "fraudulent".into(),
                },
            )
        };
        let disputed = apply(&paid, &d("evt_2"), &at()).unwrap_or_else(|| panic!("not applied"));
        assert_eq!(disputed.state, PaymentState::Succeeded);
        assert_eq!(disputed.dispute_reason.as_deref(), Some("fraudulent"));
        assert_eq!(apply(&disputed, &d("evt_3"), &at()), None);
    }

    #[test]
    fn only_the_last_event_ids_are_kept() {
        let mut s = waiting();
        for i in 0..40 {
            s = remember(s, &format!("evt_{i}"));
        }
        assert_eq!(s.webhook_events.len(), KEPT_EVENT_IDS);
        assert_eq!(s.webhook_events.last().map(String::as_str), Some("evt_39"));
    }

    fn settlement() -> impl Strategy<Value = Settlement> {
        prop_oneof![
            Just(Settlement::Succeeded),
            Just(Settlement::Failed {
                reason: "declined".into()
            }),
            Just(Settlement::RequiresAction { url: None }),
            Just(Settlement::Refunded { refund_id: None }),
        ]
    }

    proptest! {
        /// Whatever order the events come in, and however often each is
        /// delivered, the charge ends in the furthest state any of them names.
        #[test]
        fn events_in_any_order_and_repeated_end_in_the_same_state(
            events in prop::collection::vec(settlement(), 1..6),
            order in prop::collection::vec(0usize..100, 1..15),
        ) {
            let notices: Vec<Notice> = events
                .iter()
                .enumerate()
                .map(|(i, s)| notice(&format!("evt_{i}"), s.clone()))
                .collect();
            let start = PaymentStatus {
                payment_id: Some("pi_1".into()),
                ..PaymentStatus::new(PaymentState::Pending, "stripe")
            };
            let deliver = |seq: &mut dyn Iterator<Item = &Notice>| {
                seq.fold(start.clone(), |s, n| apply(&s, n, &at()).unwrap_or(s))
            };
            // Every event once, in the shuffled order, then again.
            let mut shuffled: Vec<&Notice> = order.iter().map(|i| &notices[i % notices.len()]).collect();
            shuffled.extend(notices.iter());
            let got = deliver(&mut shuffled.iter().copied());
            let want = notices
                .iter()
                .map(|n| apply(&start, n, &at()).map_or(PaymentState::Pending, |s| s.state))
                .max_by_key(|s| rank(*s))
                .unwrap_or(PaymentState::Pending);
            prop_assert_eq!(got.state, want);
            // And all of them once more on top: nothing changes.
            let again = shuffled.iter().fold(got.clone(), |s, n| apply(&s, n, &at()).unwrap_or(s));
            prop_assert_eq!(again, got);
        }
    }
}
