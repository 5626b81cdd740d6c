//! The order lifecycle as pure functions: the phase computed from facts
//! (conditions and stage sections), which transitions are legal, and
//! Kubernetes-style condition bookkeeping.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::order::{DeliveryState, KitchenState, OrderPhase, OrderStatus, PaymentState};

/// Condition types the operator owns on an Order.
pub mod condition {
    /// True once the order is checked, priced and its stock reserved; False when rejected.
    pub const ACCEPTED: &str = "Accepted";
    /// True while stock is held for the order; False once released or consumed.
    pub const STOCK_RESERVED: &str = "StockReserved";
    /// True once the order is cancelled (and why); False when a cancellation was refused.
    pub const CANCELLED: &str = "Cancelled";
    /// True when undoing a called-off order (a refund, a charge to settle)
    /// kept failing and the operator stopped retrying: a person must act.
    pub const COMPENSATION_FAILED: &str = "CompensationFailed";
    /// True while the charge waits for the customer (3-D Secure): the
    /// message says where to complete it. False once the provider settled it.
    pub const PAYMENT_ACTION_REQUIRED: &str = "PaymentActionRequired";
    /// At restaurants that confirm by hand: Unknown while the staff have not
    /// decided (payment waits), True once confirmed, False when declined or
    /// not confirmed in time (the order is then cancelled).
    pub const RESTAURANT_CONFIRMED: &str = "RestaurantConfirmed";
}

/// Annotations people set on an Order.
pub mod annotation {
    /// Set (to a note of what was done) after settling a failed
    /// compensation by hand, for example a refund made in the provider's
    /// dashboard: the operator then treats the order as compensated.
    pub const COMPENSATION_RESOLVED: &str = "dishpatch.dev/compensation-resolved";
    /// Set by a restaurant's staff (through the façade, to who marked it) when
    /// an order is ready, in a `Manual` kitchen: the kitchen then records it.
    pub const KITCHEN_READY: &str = "dishpatch.dev/kitchen-ready";
}

/// CamelCase reasons used in conditions and Events.
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESTAURANT_NOT_FOUND: &str = "RestaurantNotFound";
    pub const WAITING_FOR_RESTAURANT: &str = "WaitingForRestaurant";
    pub const RESTAURANT_CLOSED: &str = "RestaurantClosed";
    pub const UNKNOWN_MENU_ITEM: &str = "UnknownMenuItem";
    pub const OUT_OF_STOCK: &str = "OutOfStock";
    pub const PRICING_FAILED: &str = "PricingFailed";
    pub const RESERVED: &str = "Reserved";
    pub const NOT_LIMITED: &str = "NotLimited";
    pub const RELEASED: &str = "Released";
    pub const CONSUMED: &str = "Consumed";
    pub const CUSTOMER_REQUESTED: &str = "CustomerRequested";
    pub const PAYMENT_FAILED: &str = "PaymentFailed";
    pub const KITCHEN_FAILED: &str = "KitchenFailed";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const DELETED: &str = "Deleted";
    pub const TOO_LATE: &str = "TooLateToCancel";
    pub const COMPENSATION_EXHAUSTED: &str = "CompensationExhausted";
    pub const COMPENSATED: &str = "Compensated";
    pub const RESOLVED_BY_HAND: &str = "ResolvedByHand";
    pub const REQUIRES_ACTION: &str = "RequiresAction";
    pub const AWAITING_CONFIRMATION: &str = "AwaitingConfirmation";
    pub const CONFIRMED: &str = "Confirmed";
    pub const RESTAURANT_DECLINED: &str = "RestaurantDeclined";
    pub const RESTAURANT_DID_NOT_CONFIRM: &str = "RestaurantDidNotConfirm";
    pub const PAYMENT_SETTLED: &str = "PaymentSettled";
    /// Event: the order history database did not take the order, so its delete waits.
    pub const ARCHIVE_FAILED: &str = "ArchiveFailed";
}

/// The facts the phase is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// The `Accepted` condition: `None` while undecided.
    pub accepted: Option<bool>,
    /// The `Cancelled` condition is True.
    pub cancelled: bool,
    pub payment: Option<PaymentState>,
    pub kitchen: Option<KitchenState>,
    pub delivery: Option<DeliveryState>,
}

impl Facts {
    pub fn of(status: Option<&OrderStatus>) -> Self {
        let Some(s) = status else {
            return Self::default();
        };
        let flag = |t: &str| {
            find(&s.conditions, t).and_then(|c| match c.status.as_str() {
                "True" => Some(true),
                "False" => Some(false),
                _ => None,
            })
        };
        Self {
            accepted: flag(condition::ACCEPTED),
            cancelled: flag(condition::CANCELLED).unwrap_or(false),
            payment: s.payment.as_ref().map(|p| p.state),
            kitchen: s.kitchen.as_ref().map(|k| k.state),
            delivery: s.delivery.as_ref().map(|d| d.state),
        }
    }
}

/// The phase the facts describe.
pub fn phase_of(f: &Facts) -> OrderPhase {
    if f.cancelled {
        return OrderPhase::Cancelled;
    }
    match f.accepted {
        None => return OrderPhase::Pending,
        Some(false) => return OrderPhase::Rejected,
        Some(true) => {}
    }
    match (f.delivery, f.kitchen, f.payment) {
        (Some(DeliveryState::Delivered), _, _) => OrderPhase::Delivered,
        (Some(DeliveryState::PickedUp), _, _) => OrderPhase::OutForDelivery,
        (_, Some(KitchenState::Ready), _) => OrderPhase::Ready,
        (_, Some(KitchenState::Queued | KitchenState::Preparing), _) => OrderPhase::Preparing,
        (_, _, Some(PaymentState::Succeeded | PaymentState::Refunded)) => OrderPhase::Paid,
        _ => OrderPhase::Accepted,
    }
}

/// Position on the happy path; `None` for the two failure ends.
fn rank(p: OrderPhase) -> Option<u8> {
    Some(match p {
        OrderPhase::Pending => 0,
        OrderPhase::Accepted => 1,
        OrderPhase::Paid => 2,
        OrderPhase::Preparing => 3,
        OrderPhase::Ready => 4,
        OrderPhase::OutForDelivery => 5,
        OrderPhase::Delivered => 6,
        OrderPhase::Rejected | OrderPhase::Cancelled => return None,
    })
}

/// Whether a customer may still cancel: until the courier picks the order up.
pub fn cancellable(p: OrderPhase) -> bool {
    !p.is_terminal() && p != OrderPhase::OutForDelivery
}

/// Whether the lifecycle may move from `from` to `to`. Forward jumps along the
/// happy path are legal (several stage reports can arrive between two
/// reconciles); going back, leaving a terminal phase, rejecting anything but
/// a pending order, or cancelling after pick-up are not.
pub fn transition_allowed(from: OrderPhase, to: OrderPhase) -> bool {
    if from == to {
        return true;
    }
    if from.is_terminal() {
        return false;
    }
    match to {
        OrderPhase::Rejected => from == OrderPhase::Pending,
        OrderPhase::Cancelled => cancellable(from),
        _ => matches!((rank(from), rank(to)), (Some(a), Some(b)) if b > a),
    }
}

/// What to do with an observed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    Stay,
    Move(OrderPhase),
    /// The facts point somewhere the lifecycle can't go; keep the phase.
    Illegal {
        from: OrderPhase,
        to: OrderPhase,
    },
}

pub fn advance(current: OrderPhase, observed: OrderPhase) -> Advance {
    if current == observed {
        Advance::Stay
    } else if transition_allowed(current, observed) {
        Advance::Move(observed)
    } else {
        Advance::Illegal {
            from: current,
            to: observed,
        }
    }
}

/// The phase to record for a status whose facts just changed: where the
/// facts point when the lifecycle may go there, else the recorded phase.
/// Every writer of a stage's fact records it in the same write (so no second
/// write is needed to move the phase), and since each such write carries the
/// resourceVersion it was computed from, the phase always summarises the
/// facts stored beside it.
pub fn next_phase(status: &OrderStatus) -> OrderPhase {
    let observed = phase_of(&Facts::of(Some(status)));
    let current = status.phase.unwrap_or(observed);
    match advance(current, observed) {
        Advance::Move(next) => next,
        Advance::Stay | Advance::Illegal { .. } => current,
    }
}

/// The condition of a type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// Sets a condition the Kubernetes way: `lastTransitionTime` changes only when
/// `status` does, so a repeated reconcile writes nothing new. Returns whether
/// anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: impl Into<Status>,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = status.into().as_str();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let same = c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation;
        if same {
            return false;
        }
        if c.status != status {
            c.last_transition_time = now.clone();
        }
        c.status = status.to_string();
        c.reason = reason.to_string();
        c.message = message.to_string();
        c.observed_generation = generation;
        return true;
    }
    conditions.push(Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAIN: [OrderPhase; 7] = [
        OrderPhase::Pending,
        OrderPhase::Accepted,
        OrderPhase::Paid,
        OrderPhase::Preparing,
        OrderPhase::Ready,
        OrderPhase::OutForDelivery,
        OrderPhase::Delivered,
    ];

    #[test]
    fn every_transition_of_the_matrix() {
        use OrderPhase::*;
        for from in OrderPhase::ALL {
            for to in OrderPhase::ALL {
                let want = if from == to {
                    true
                } else if from.is_terminal() {
                    false
                } else {
                    match to {
                        Rejected => from == Pending,
                        Cancelled => from != OutForDelivery,
                        _ => {
                            let i = MAIN.iter().position(|p| *p == from).unwrap();
                            let j = MAIN.iter().position(|p| *p == to).unwrap();
                            j > i
                        }
                    }
                };
                assert_eq!(transition_allowed(from, to), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn illegal_jumps_are_refused() {
        use OrderPhase::*;
        for (from, to) in [
            (Delivered, Preparing),
            (Cancelled, Accepted),
            (Rejected, Accepted),
            (Paid, Accepted),
            (Accepted, Rejected),
            (OutForDelivery, Cancelled),
            (Ready, Pending),
            (Delivered, Cancelled),
        ] {
            assert_eq!(
                advance(from, to),
                Advance::Illegal { from, to },
                "{from} -> {to}"
            );
        }
        assert_eq!(advance(Paid, Ready), Advance::Move(Ready));
        assert_eq!(advance(Ready, Ready), Advance::Stay);
    }

    #[test]
    fn phase_follows_the_furthest_stage() {
        let mut f = Facts::default();
        assert_eq!(phase_of(&f), OrderPhase::Pending);
        f.accepted = Some(false);
        assert_eq!(phase_of(&f), OrderPhase::Rejected);
        f.accepted = Some(true);
        assert_eq!(phase_of(&f), OrderPhase::Accepted);
        f.payment = Some(PaymentState::Pending);
        assert_eq!(
            phase_of(&f),
            OrderPhase::Accepted,
            "not paid until it succeeds"
        );
        f.payment = Some(PaymentState::Succeeded);
        assert_eq!(phase_of(&f), OrderPhase::Paid);
        f.kitchen = Some(KitchenState::Queued);
        assert_eq!(phase_of(&f), OrderPhase::Preparing);
        f.kitchen = Some(KitchenState::Ready);
        assert_eq!(phase_of(&f), OrderPhase::Ready);
        f.delivery = Some(DeliveryState::Assigned);
        assert_eq!(phase_of(&f), OrderPhase::Ready);
        f.delivery = Some(DeliveryState::PickedUp);
        assert_eq!(phase_of(&f), OrderPhase::OutForDelivery);
        f.delivery = Some(DeliveryState::Delivered);
        assert_eq!(phase_of(&f), OrderPhase::Delivered);
        f.cancelled = true;
        assert_eq!(phase_of(&f), OrderPhase::Cancelled);
    }

    #[test]
    fn condition_time_moves_only_when_status_changes() {
        let t0 = Time(jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(2_000).unwrap());
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Accepted",
            true,
            "Accepted",
            "ok",
            Some(1),
            &t0
        ));
        assert!(!set_condition(
            &mut c,
            "Accepted",
            true,
            "Accepted",
            "ok",
            Some(1),
            &t1
        ));
        assert!(set_condition(
            &mut c,
            "Accepted",
            true,
            "Accepted",
            "fine",
            Some(2),
            &t1
        ));
        assert_eq!(c[0].last_transition_time, t0);
        assert!(set_condition(
            &mut c,
            "Accepted",
            false,
            "OutOfStock",
            "no",
            Some(2),
            &t1
        ));
        assert_eq!(c[0].last_transition_time, t1);
        assert_eq!(c.len(), 1);
    }

    /// A status whose facts are `f`, with `phase` recorded.
    fn status_of(f: &Facts, phase: Option<OrderPhase>) -> OrderStatus {
        let flag = |t: &str, v: bool| {
            serde_json::json!({"type": t, "status": if v { "True" } else { "False" },
                "reason": "R", "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"})
        };
        let mut conditions = Vec::new();
        if let Some(a) = f.accepted {
            conditions.push(flag(condition::ACCEPTED, a));
        }
        if f.cancelled {
            conditions.push(flag(condition::CANCELLED, true));
        }
        let mut s = serde_json::json!({"phase": phase, "conditions": conditions});
        if let Some(state) = f.payment {
            s["payment"] = serde_json::json!({"state": state, "provider": "simulated"});
        }
        if let Some(state) = f.kitchen {
            s["kitchen"] = serde_json::json!({"state": state});
        }
        if let Some(state) = f.delivery {
            s["delivery"] = serde_json::json!({"state": state});
        }
        serde_json::from_value(s).unwrap()
    }

    fn facts() -> impl Strategy<Value = Facts> {
        (
            prop::option::of(any::<bool>()),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![
                PaymentState::Pending,
                PaymentState::RequiresAction,
                PaymentState::Succeeded,
                PaymentState::Failed,
                PaymentState::Refunded,
            ])),
            prop::option::of(prop::sample::select(vec![
                KitchenState::Queued,
                KitchenState::Preparing,
                KitchenState::Ready,
                KitchenState::Dropped,
            ])),
            prop::option::of(prop::sample::select(vec![
                DeliveryState::Offered,
                DeliveryState::Assigned,
                DeliveryState::PickedUp,
                DeliveryState::Delivered,
                DeliveryState::Released,
            ])),
        )
            .prop_map(|(accepted, cancelled, payment, kitchen, delivery)| Facts {
                accepted,
                cancelled,
                payment,
                kitchen,
                delivery,
            })
    }

    proptest! {
        /// Whatever the workers report and in whatever order, the phase the
        /// operator records only moves along legal transitions and never
        /// leaves a terminal phase.
        #[test]
        fn recorded_phase_only_moves_legally(observations in prop::collection::vec(facts(), 1..40)) {
            let mut current = OrderPhase::Pending;
            for f in observations {
                let before = current;
                match advance(current, phase_of(&f)) {
                    Advance::Move(to) => {
                        prop_assert!(transition_allowed(before, to));
                        current = to;
                    }
                    Advance::Stay => {}
                    Advance::Illegal { from, to } => {
                        prop_assert!(!transition_allowed(from, to));
                    }
                }
                if before.is_terminal() {
                    prop_assert_eq!(current, before);
                }
            }
        }

        /// Recording the phase with each fact, in any order of facts, ends
        /// where the operator's own walk over the same facts ends: the stage
        /// writers and the operator agree on the phase.
        #[test]
        fn next_phase_agrees_with_the_operators_walk(observations in prop::collection::vec(facts(), 1..40)) {
            let mut status = status_of(&Facts::default(), Some(OrderPhase::Pending));
            let mut walked = OrderPhase::Pending;
            for f in observations {
                status = status_of(&f, status.phase);
                let recorded = next_phase(&status);
                if let Advance::Move(to) = advance(walked, phase_of(&f)) {
                    walked = to;
                }
                prop_assert_eq!(recorded, walked);
                status.phase = Some(recorded);
            }
        }

        /// A cancellation fact always wins over stage facts.
        #[test]
        fn cancelled_fact_wins(mut f in facts()) {
            f.cancelled = true;
            prop_assert_eq!(phase_of(&f), OrderPhase::Cancelled);
        }
    }
}
