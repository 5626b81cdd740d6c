//! Stage deadlines, computed from the order's own facts: no timers, no
//! stored counters. The time an order entered its phase comes from the stage
//! sections and conditions; how many deadlines have passed since is simple
//! arithmetic, so a restarted operator reaches the same conclusions.

use std::time::Duration;

use dishpatch_api::events::EventType;
use dishpatch_api::lifecycle::{condition, find};
use dishpatch_api::order::{DeliveryState, KitchenState, OrderPhase, OrderStatus, PaymentState};
use jiff::Timestamp;

/// What a stalled order is waiting for, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Awaiting {
    /// The event whose consumer must act; re-published when overdue.
    pub event: EventType,
    pub since: Timestamp,
    /// Whether the order is cancelled after too many re-publishes. Orders
    /// waiting for a courier, or for compensation, only get nudged.
    pub cancel_when_exhausted: bool,
}

fn ts(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

/// What a called-off (cancelled or deleted) order still owes its customer,
/// if anything: a charge that is not refunded, or one whose outcome is not
/// recorded yet. A delivered order owes nothing.
pub fn money_outstanding(status: &OrderStatus) -> Option<&'static str> {
    let delivered = status
        .delivery
        .as_ref()
        .is_some_and(|d| d.state == DeliveryState::Delivered);
    match status.payment.as_ref().map(|p| p.state) {
        Some(PaymentState::Pending) => Some("the charge's outcome is not recorded yet"),
        Some(PaymentState::RequiresAction) => {
            Some("the charge waits for the customer's authentication and is not cancelled yet")
        }
        Some(PaymentState::Succeeded) if !delivered => Some("the charge is not refunded yet"),
        _ => None,
    }
}

/// Whether a cancelled order still waits for a worker to undo something.
pub fn compensation_outstanding(status: &OrderStatus) -> bool {
    let charged = status.payment.as_ref().is_some_and(|p| {
        matches!(
            p.state,
            PaymentState::Succeeded | PaymentState::Pending | PaymentState::RequiresAction
        )
    });
    let cooking = status
        .kitchen
        .as_ref()
        .is_some_and(|k| matches!(k.state, KitchenState::Queued | KitchenState::Preparing));
    let courier = status
        .delivery
        .as_ref()
        .is_some_and(|d| matches!(d.state, DeliveryState::Offered | DeliveryState::Assigned));
    charged || cooking || courier
}

/// What the order in `phase` waits for, if anything.
pub fn awaiting(phase: OrderPhase, status: &OrderStatus) -> Option<Awaiting> {
    let condition_time = |t: &str| find(&status.conditions, t).map(|c| c.last_transition_time.0);
    // At a restaurant that confirms by hand, payment starts at the
    // confirmation; before it, nothing is awaited from the workers.
    let confirmation = find(&status.conditions, condition::RESTAURANT_CONFIRMED);
    if confirmation.is_some_and(|c| c.status == "Unknown") {
        return None;
    }
    let accepted_at = confirmation
        .filter(|c| c.status == "True")
        .map(|c| c.last_transition_time.0)
        .or(condition_time(condition::ACCEPTED));
    let (event, since, cancel_when_exhausted) = match phase {
        OrderPhase::Accepted => (EventType::OrderAccepted, accepted_at?, true),
        OrderPhase::Paid => {
            let p = status.payment.as_ref();
            (
                EventType::PaymentSucceeded,
                p.and_then(|p| ts(&p.charged_at)).or(accepted_at)?,
                true,
            )
        }
        OrderPhase::Preparing => {
            let k = status.kitchen.as_ref()?;
            // The kitchen said when it would be done; the deadline runs from then.
            let since = ts(&k.estimated_ready_at)
                .or(ts(&k.ticket_accepted_at))
                .or(accepted_at)?;
            (EventType::PaymentSucceeded, since, true)
        }
        OrderPhase::Ready => {
            let k = status.kitchen.as_ref()?;
            (
                EventType::KitchenReady,
                ts(&k.ready_at).or(accepted_at)?,
                false,
            )
        }
        OrderPhase::Cancelled if compensation_outstanding(status) => (
            EventType::OrderCancelled,
            condition_time(condition::CANCELLED)?,
            false,
        ),
        _ => return None,
    };
    Some(Awaiting {
        event,
        since,
        cancel_when_exhausted,
    })
}

/// How many whole deadlines have passed since `since`.
pub fn deadlines_passed(since: Timestamp, now: Timestamp, deadline: Duration) -> u32 {
    let elapsed = now.duration_since(since);
    let Ok(elapsed) = Duration::try_from(elapsed) else {
        return 0; // `since` is in the future (clock skew): nothing is overdue.
    };
    let per = deadline.as_millis().max(1);
    u32::try_from(elapsed.as_millis() / per).unwrap_or(u32::MAX)
}

/// When the next deadline after `passed` ones falls, from now.
pub fn until_next(since: Timestamp, now: Timestamp, deadline: Duration, passed: u32) -> Duration {
    let next = deadline.saturating_mul(passed.saturating_add(1));
    let elapsed = Duration::try_from(now.duration_since(since)).unwrap_or_default();
    next.saturating_sub(elapsed).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dishpatch_api::lifecycle::set_condition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn counts_whole_deadlines() {
        let d = Duration::from_secs(10);
        assert_eq!(deadlines_passed(at(100), at(105), d), 0);
        assert_eq!(deadlines_passed(at(100), at(110), d), 1);
        assert_eq!(deadlines_passed(at(100), at(135), d), 3);
        assert_eq!(deadlines_passed(at(100), at(90), d), 0);
        assert_eq!(until_next(at(100), at(105), d, 0), Duration::from_secs(5));
        assert_eq!(until_next(at(100), at(135), d, 3), Duration::from_secs(5));
    }

    #[test]
    fn accepted_waits_for_payment_and_cancelled_waits_for_refund() {
        let mut st = OrderStatus::default();
        set_condition(
            &mut st.conditions,
            condition::ACCEPTED,
            true,
            "Accepted",
            "",
            None,
            &Time(at(50)),
        );
        let a = awaiting(OrderPhase::Accepted, &st).unwrap();
        assert_eq!(
            (a.event, a.since, a.cancel_when_exhausted),
            (EventType::OrderAccepted, at(50), true)
        );

        assert_eq!(
            awaiting(OrderPhase::Cancelled, &st),
            None,
            "nothing to undo"
        );
        st.payment = Some(dishpatch_api::order::PaymentStatus {
            charged_at: Some(Time(at(60))),
            ..dishpatch_api::order::PaymentStatus::new(PaymentState::Succeeded, "simulated")
        });
        set_condition(
            &mut st.conditions,
            condition::CANCELLED,
            true,
            "CustomerRequested",
            "",
            None,
            &Time(at(70)),
        );
        let c = awaiting(OrderPhase::Cancelled, &st).unwrap();
        assert_eq!(
            (c.event, c.since, c.cancel_when_exhausted),
            (EventType::OrderCancelled, at(70), false)
        );
        assert_eq!(awaiting(OrderPhase::Delivered, &st), None);
        assert_eq!(awaiting(OrderPhase::OutForDelivery, &st), None);
    }

    #[test]
    fn money_is_outstanding_until_refunded_failed_or_delivered() {
        let mut st = OrderStatus::default();
        assert_eq!(money_outstanding(&st), None, "never charged");
        let mut pay = |state| {
            st.payment = Some(dishpatch_api::order::PaymentStatus::new(state, "simulated"));
            money_outstanding(&st).is_some()
        };
        assert!(pay(PaymentState::Pending), "a charge may be in flight");
        assert!(
            pay(PaymentState::RequiresAction),
            "the customer may still authorise it"
        );
        assert!(pay(PaymentState::Succeeded), "charged, not refunded");
        assert!(!pay(PaymentState::Failed));
        assert!(!pay(PaymentState::Refunded));
        pay(PaymentState::Succeeded);
        st.delivery = Some(dishpatch_api::order::DeliveryStatus {
            state: DeliveryState::Delivered,
            courier: None,
            assigned_at: None,
            picked_up_at: None,
            delivered_at: None,
            eta: None,
        });
        assert_eq!(
            money_outstanding(&st),
            None,
            "a delivered order keeps its charge"
        );
        st.payment.as_mut().unwrap().state = PaymentState::Pending;
        assert!(money_outstanding(&st).is_some());
    }
}
