//! Pure dispatch logic: which couriers may take an order, how a courier's
//! status and an order's delivery section change, and what is due next.

use std::collections::HashSet;
use std::time::Duration;

use dishpatch_api::Order;
use dishpatch_api::courier::{Courier, CourierOffer, CourierStatus};
use dishpatch_api::events::EventType;
use dishpatch_api::lifecycle::{condition, find};
use dishpatch_api::order::{DeliveryState, DeliveryStatus, KitchenState};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::timing::Timing;

/// `t + d`, saturating at the end of time.
pub fn after(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// `t` rounded up to a whole second. Kubernetes times have second
/// precision; a deadline must not move earlier when it is stored.
pub fn ceil_second(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() == 0 {
        return t;
    }
    Timestamp::from_second(t.as_second().saturating_add(1)).unwrap_or(Timestamp::MAX)
}

/// Whether the courier's status refers to `order` (as its current order or an offer).
pub fn points_at(c: &Courier, order: &str) -> bool {
    c.status.as_ref().is_some_and(|s| {
        s.current_order.as_deref() == Some(order)
            || s.offer.as_ref().is_some_and(|o| o.order == order)
    })
}

/// On shift in `zone`, carrying nothing and holding no offer.
pub fn is_free(c: &Courier, zone: &str) -> bool {
    c.spec.on_shift
        && c.spec.zone == zone
        && c.status
            .as_ref()
            .is_none_or(|s| s.current_order.is_none() && s.offer.is_none())
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The free couriers in the order to try them: ones this order was not yet
/// offered to first, and within that by name, rotated by the order's uid so
/// that replicas dispatching different orders start at different couriers
/// instead of all fighting over the first.
pub fn candidates<'a>(
    couriers: &'a [Courier],
    zone: &str,
    order_uid: &str,
    tried: &HashSet<String>,
) -> Vec<&'a Courier> {
    let mut free: Vec<&Courier> = couriers.iter().filter(|c| is_free(c, zone)).collect();
    free.sort_by_key(|c| c.name_any());
    if !free.is_empty() {
        let start = usize::try_from(fnv(order_uid) % free.len() as u64).unwrap_or(0);
        free.rotate_left(start);
    }
    // Stable: keeps the rotation within each group.
    free.sort_by_key(|c| tried.contains(&c.name_any()));
    free
}

/// How a courier is claimed for an order.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The courier takes it at once (auto-accept).
    Assign,
    /// The courier is asked and has until `expires_at` to answer.
    Offer { expires_at: Timestamp },
}

/// The courier's status once claimed for `order`.
pub fn claimed(status: Option<&CourierStatus>, order: &str, claim: &Claim) -> CourierStatus {
    let mut s = status.cloned().unwrap_or_default();
    match claim {
        Claim::Assign => {
            s.available = Some(false);
            s.current_order = Some(order.to_string());
            s.offer = None;
        }
        Claim::Offer { expires_at } => {
            s.offer = Some(CourierOffer {
                order: order.to_string(),
                expires_at: Time(*expires_at),
            });
        }
    }
    s
}

/// The courier's status once it has accepted `order`: from an offer for it,
/// or normalising an acceptance already recorded as `currentOrder`. `None`
/// when the courier has neither (the offer lapsed or went elsewhere).
pub fn accepted(status: Option<&CourierStatus>, order: &str) -> Option<CourierStatus> {
    let s = status?;
    let offered = s.offer.as_ref().is_some_and(|o| o.order == order);
    let current = s.current_order.as_deref() == Some(order);
    // An offer can't be taken while carrying another order.
    if !(current || (offered && s.current_order.is_none())) {
        return None;
    }
    let mut s = s.clone();
    s.available = Some(false);
    s.current_order = Some(order.to_string());
    if offered {
        s.offer = None;
    }
    Some(s)
}

/// The courier's status once it no longer works on `order`; `None` when it
/// does not refer to that order (someone else's assignment is never touched).
pub fn freed(status: Option<&CourierStatus>, order: &str, on_shift: bool) -> Option<CourierStatus> {
    let s = status?;
    let current = s.current_order.as_deref() == Some(order);
    let offered = s.offer.as_ref().is_some_and(|o| o.order == order);
    if !current && !offered {
        return None;
    }
    let mut s = s.clone();
    if current {
        s.current_order = None;
    }
    if offered {
        s.offer = None;
    }
    s.available = Some(on_shift && s.current_order.is_none());
    Some(s)
}

/// What a courier that carries nothing and holds no offer should show:
/// available exactly while on shift. Covers a new Courier, whose status
/// nobody has written yet (so `kubectl get couriers` is not blank), and a
/// free one whose shift changed. `None` when it already shows that, or when
/// it is busy (then the delivery under way owns its status).
pub fn settled(c: &Courier) -> Option<CourierStatus> {
    let s = c.status.clone().unwrap_or_default();
    let free = s.current_order.is_none() && s.offer.is_none();
    if !free || (c.status.is_some() && s.available == Some(c.spec.on_shift)) {
        return None;
    }
    Some(CourierStatus {
        available: Some(c.spec.on_shift),
        observed_generation: c.metadata.generation,
        ..s
    })
}

/// Delivery offered to `courier`, waiting for an answer.
pub fn offered(courier: &str) -> DeliveryStatus {
    DeliveryStatus {
        state: DeliveryState::Offered,
        courier: Some(courier.to_string()),
        assigned_at: None,
        picked_up_at: None,
        delivered_at: None,
        eta: None,
    }
}

/// Delivery assigned to `courier` at `now`; the eta assumes the simulated timings.
pub fn assigned(courier: &str, now: Timestamp, timing: &Timing) -> DeliveryStatus {
    DeliveryStatus {
        state: DeliveryState::Assigned,
        courier: Some(courier.to_string()),
        assigned_at: Some(Time(now)),
        picked_up_at: None,
        delivered_at: None,
        eta: Some(Time(after(
            now,
            timing.pickup.saturating_add(timing.travel),
        ))),
    }
}

/// Every write re-sends the whole section, so each step keeps what came before.
pub fn picked_up(prev: &DeliveryStatus, now: Timestamp) -> DeliveryStatus {
    DeliveryStatus {
        state: DeliveryState::PickedUp,
        picked_up_at: Some(Time(now)),
        ..prev.clone()
    }
}

pub fn delivered(prev: &DeliveryStatus, now: Timestamp) -> DeliveryStatus {
    DeliveryStatus {
        state: DeliveryState::Delivered,
        delivered_at: Some(Time(now)),
        ..prev.clone()
    }
}

pub fn released(prev: &DeliveryStatus) -> DeliveryStatus {
    DeliveryStatus {
        state: DeliveryState::Released,
        ..prev.clone()
    }
}

/// The event that announces a delivery state, if it has one.
pub fn event_of(state: DeliveryState) -> Option<EventType> {
    match state {
        DeliveryState::Assigned => Some(EventType::DeliveryAssigned),
        DeliveryState::PickedUp => Some(EventType::DeliveryPickedUp),
        DeliveryState::Delivered => Some(EventType::DeliveryDelivered),
        DeliveryState::Offered | DeliveryState::Released => None,
    }
}

/// What the simulated courier does next with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Waiting for the offered courier's answer.
    AwaitAnswer,
    /// Pick the order up at `at`.
    PickUp { at: Timestamp },
    /// Hand it over at `at`.
    Deliver { at: Timestamp },
    /// Nothing left but making sure the courier is free.
    Finish,
}

/// The next step, timed from the section's own timestamps so a restarted
/// process resumes where the last one stopped. A missing timestamp means due now.
pub fn next_step(d: &DeliveryStatus, timing: &Timing) -> Next {
    let since = |t: &Option<Time>| t.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    match d.state {
        DeliveryState::Offered => Next::AwaitAnswer,
        DeliveryState::Assigned => Next::PickUp {
            at: after(since(&d.assigned_at), timing.pickup),
        },
        DeliveryState::PickedUp => Next::Deliver {
            at: after(since(&d.picked_up_at), timing.travel),
        },
        DeliveryState::Delivered | DeliveryState::Released => Next::Finish,
    }
}

/// The section with the sub-second time this process recorded for its
/// current state, if `known` is that state and matches the stored second:
/// stored times are truncated to seconds, which would cut simulated steps
/// short by up to a second. Only for timing; writes use the stored section.
pub fn refined(d: &DeliveryStatus, known: Option<(DeliveryState, Timestamp)>) -> DeliveryStatus {
    let mut d = d.clone();
    let Some((state, t)) = known.filter(|(s, _)| *s == d.state) else {
        return d;
    };
    let stored = match state {
        DeliveryState::Assigned => &mut d.assigned_at,
        DeliveryState::PickedUp => &mut d.picked_up_at,
        _ => return d,
    };
    if stored
        .as_ref()
        .is_some_and(|s| s.0.as_second() == t.as_second())
    {
        *stored = Some(Time(t));
    }
    d
}

/// The order's delivery section, if written.
pub fn delivery(order: &Order) -> Option<&DeliveryStatus> {
    order.status.as_ref().and_then(|s| s.delivery.as_ref())
}

/// The kitchen's state, if it reported one.
pub fn kitchen(order: &Order) -> Option<KitchenState> {
    order
        .status
        .as_ref()
        .and_then(|s| s.kitchen.as_ref())
        .map(|k| k.state)
}

/// Cancelled, being deleted, or asked to be cancelled. Before pick-up the
/// operator always grants a request, so no courier should set off for it.
pub fn cancel_pending(order: &Order) -> bool {
    let cancelled = order
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, condition::CANCELLED))
        .is_some_and(|c| c.status == "True");
    cancelled || order.metadata.deletion_timestamp.is_some() || order.spec.cancellation.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dishpatch_api::courier::CourierSpec;

    fn courier(name: &str, zone: &str, on_shift: bool, status: Option<CourierStatus>) -> Courier {
        let mut c = Courier::new(
            name,
            CourierSpec {
                display_name: name.into(),
                zone: zone.into(),
                on_shift,
                vehicle: dishpatch_api::courier::Vehicle::Bicycle,
                phone: None,
            },
        );
        c.status = status;
        c
    }

    fn busy(order: &str) -> Option<CourierStatus> {
        Some(CourierStatus {
            available: Some(false),
            current_order: Some(order.into()),
            ..Default::default()
        })
    }

    fn offering(order: &str) -> Option<CourierStatus> {
        Some(CourierStatus {
            offer: Some(CourierOffer {
                order: order.into(),
                expires_at: Time(Timestamp::UNIX_EPOCH),
            }),
            ..Default::default()
        })
    }

    fn names(cs: &[&Courier]) -> Vec<String> {
        cs.iter().map(|c| c.name_any()).collect()
    }

    #[test]
    fn a_free_courier_shows_available_while_on_shift() {
        let mut new = courier("ada", "mitte", true, None);
        new.metadata.generation = Some(1);
        let s = settled(&new).expect("a new courier gets a status");
        assert_eq!(s.available, Some(true));
        assert_eq!(s.observed_generation, Some(1));
        let off = courier("bob", "mitte", false, None);
        assert_eq!(settled(&off).and_then(|s| s.available), Some(false));
        // already right: nothing to write
        let shown = courier(
            "cy",
            "mitte",
            true,
            Some(CourierStatus {
                available: Some(true),
                ..Default::default()
            }),
        );
        assert_eq!(settled(&shown), None);
        // a free courier whose shift ended follows it
        let ended = courier(
            "di",
            "mitte",
            false,
            Some(CourierStatus {
                available: Some(true),
                ..Default::default()
            }),
        );
        assert_eq!(settled(&ended).and_then(|s| s.available), Some(false));
        // a busy one is left to its delivery
        let busy = courier(
            "ed",
            "mitte",
            false,
            Some(CourierStatus {
                available: Some(false),
                current_order: Some("o1".into()),
                ..Default::default()
            }),
        );
        assert_eq!(settled(&busy), None);
    }

    #[test]
    fn only_free_on_shift_couriers_in_the_zone_are_candidates() {
        let cs = vec![
            courier("a", "mitte", true, None),
            courier("b", "mitte", false, None),
            courier("c", "kreuzberg", true, None),
            courier("d", "mitte", true, busy("o1")),
            courier("e", "mitte", true, offering("o2")),
            courier("f", "mitte", true, Some(CourierStatus::default())),
        ];
        let mut got = names(&candidates(&cs, "mitte", "uid-1", &HashSet::new()));
        got.sort();
        assert_eq!(got, ["a", "f"]);
        assert!(candidates(&cs, "nowhere", "uid-1", &HashSet::new()).is_empty());
    }

    #[test]
    fn candidates_rotate_by_order_and_put_tried_ones_last() {
        let cs: Vec<Courier> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| courier(n, "mitte", true, None))
            .collect();
        let firsts: HashSet<String> = (0..32)
            .map(|i| {
                names(&candidates(
                    &cs,
                    "mitte",
                    &format!("uid-{i}"),
                    &HashSet::new(),
                ))[0]
                    .clone()
            })
            .collect();
        assert!(
            firsts.len() > 1,
            "every order starts at the same courier: {firsts:?}"
        );
        // Deterministic for one order, and every free courier appears once.
        let one = names(&candidates(&cs, "mitte", "uid-7", &HashSet::new()));
        assert_eq!(
            one,
            names(&candidates(&cs, "mitte", "uid-7", &HashSet::new()))
        );
        let mut sorted = one.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c", "d"]);
        let tried: HashSet<String> = [one[0].clone()].into();
        let again = names(&candidates(&cs, "mitte", "uid-7", &tried));
        assert_eq!(again.last(), Some(&one[0]));
        assert_eq!(again[..3], one[1..]);
    }

    #[test]
    fn claiming_and_freeing_a_courier() {
        let s = claimed(None, "o1", &Claim::Assign);
        assert_eq!(s.current_order.as_deref(), Some("o1"));
        assert_eq!(s.available, Some(false));
        let c = courier("a", "mitte", true, Some(s.clone()));
        assert!(points_at(&c, "o1") && !points_at(&c, "o2"));
        assert!(!is_free(&c, "mitte"));

        // Freeing for another order touches nothing.
        assert_eq!(freed(Some(&s), "o2", true), None);
        assert_eq!(freed(None, "o1", true), None);
        let f = freed(Some(&s), "o1", true).unwrap();
        assert_eq!(f.current_order, None);
        assert_eq!(f.available, Some(true));
        assert!(is_free(&courier("a", "mitte", true, Some(f)), "mitte"));
        // Off shift by now: free, but not available.
        assert_eq!(freed(Some(&s), "o1", false).unwrap().available, Some(false));
    }

    #[test]
    fn offers_are_accepted_or_lapse() {
        let at = Timestamp::from_second(1_000).unwrap();
        let s = claimed(None, "o1", &Claim::Offer { expires_at: at });
        assert_eq!(s.offer.as_ref().map(|o| o.order.as_str()), Some("o1"));
        assert_eq!(s.current_order, None);
        assert!(points_at(
            &courier("a", "mitte", true, Some(s.clone())),
            "o1"
        ));

        let a = accepted(Some(&s), "o1").unwrap();
        assert_eq!(
            (a.current_order.as_deref(), a.offer.clone(), a.available),
            (Some("o1"), None, Some(false))
        );
        // An acceptance recorded as currentOrder is normalised the same way.
        assert_eq!(accepted(busy("o1").as_ref(), "o1"), Some(a.clone()));
        assert_eq!(accepted(Some(&a), "o1"), Some(a));
        assert_eq!(accepted(Some(&s), "o2"), None);
        assert_eq!(accepted(None, "o1"), None);
        let mut both = busy("o9").unwrap();
        both.offer = s.offer.clone();
        assert_eq!(
            accepted(Some(&both), "o1"),
            None,
            "already carrying another order"
        );

        let lapsed = freed(Some(&s), "o1", true).unwrap();
        assert_eq!(lapsed.offer, None);
        assert_eq!(
            freed(Some(&both), "o1", true)
                .unwrap()
                .current_order
                .as_deref(),
            Some("o9")
        );
        assert_eq!(
            freed(Some(&both), "o1", true).unwrap().available,
            Some(false)
        );
    }

    #[test]
    fn the_section_keeps_what_it_had_at_every_step() {
        let timing = Timing::new(
            Duration::from_secs(60),
            Duration::from_secs(300),
            Duration::from_secs(30),
            1.0,
        );
        let t0 = Timestamp::from_second(1_000).unwrap();
        let a = assigned("ada", t0, &timing);
        assert_eq!(
            a.eta.as_ref().map(|t| t.0),
            Some(after(t0, Duration::from_secs(360)))
        );
        assert_eq!(
            next_step(&a, &timing),
            Next::PickUp {
                at: after(t0, Duration::from_secs(60))
            }
        );

        let t1 = after(t0, Duration::from_secs(61));
        let p = picked_up(&a, t1);
        assert_eq!(p.state, DeliveryState::PickedUp);
        assert_eq!(
            (p.courier.clone(), p.assigned_at.clone(), p.eta.clone()),
            (a.courier.clone(), a.assigned_at.clone(), a.eta.clone())
        );
        assert_eq!(
            next_step(&p, &timing),
            Next::Deliver {
                at: after(t1, Duration::from_secs(300))
            }
        );

        let t2 = after(t1, Duration::from_secs(301));
        let d = delivered(&p, t2);
        assert_eq!(d.state, DeliveryState::Delivered);
        assert_eq!(
            (d.picked_up_at.clone(), d.assigned_at.clone()),
            (p.picked_up_at.clone(), a.assigned_at.clone())
        );
        assert_eq!(d.delivered_at.as_ref().map(|t| t.0), Some(t2));
        assert_eq!(next_step(&d, &timing), Next::Finish);

        let r = released(&a);
        assert_eq!(
            (r.state, r.courier.clone(), r.assigned_at.clone()),
            (
                DeliveryState::Released,
                a.courier.clone(),
                a.assigned_at.clone()
            )
        );
        assert_eq!(next_step(&r, &timing), Next::Finish);
        assert_eq!(next_step(&offered("ada"), &timing), Next::AwaitAnswer);

        // A section without its timestamp is due at once.
        let mut bare = a.clone();
        bare.assigned_at = None;
        assert!(matches!(next_step(&bare, &timing), Next::PickUp { at } if at < t0));
    }

    #[test]
    fn deadlines_round_up_to_what_the_apiserver_stores() {
        let whole = Timestamp::from_second(1_000).unwrap();
        assert_eq!(ceil_second(whole), whole);
        let later = after(whole, Duration::from_millis(1));
        assert_eq!(ceil_second(later), Timestamp::from_second(1_001).unwrap());
        assert!(ceil_second(later) >= later);
    }

    #[test]
    fn steps_are_timed_from_the_precise_time_when_known() {
        let timing = Timing::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::ZERO,
            1.0,
        );
        let precise = after(
            Timestamp::from_second(1_000).unwrap(),
            Duration::from_millis(900),
        );
        let stored = assigned("ada", Timestamp::from_second(1_000).unwrap(), &timing);
        let due = |d: &DeliveryStatus| match next_step(d, &timing) {
            Next::PickUp { at } | Next::Deliver { at } => at,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            due(&refined(&stored, Some((DeliveryState::Assigned, precise)))),
            after(precise, Duration::from_secs(1))
        );
        // Unknown, another state, or another second: the stored time stands.
        assert_eq!(refined(&stored, None), stored);
        assert_eq!(
            refined(&stored, Some((DeliveryState::PickedUp, precise))),
            stored
        );
        let elsewhere = after(precise, Duration::from_secs(5));
        assert_eq!(
            refined(&stored, Some((DeliveryState::Assigned, elsewhere))),
            stored
        );
        let p = picked_up(&stored, Timestamp::from_second(1_002).unwrap());
        let t = after(
            Timestamp::from_second(1_002).unwrap(),
            Duration::from_millis(400),
        );
        assert_eq!(
            due(&refined(&p, Some((DeliveryState::PickedUp, t)))),
            after(t, Duration::from_secs(1))
        );
    }

    #[test]
    fn events_follow_states() {
        assert_eq!(
            event_of(DeliveryState::Assigned),
            Some(EventType::DeliveryAssigned)
        );
        assert_eq!(
            event_of(DeliveryState::PickedUp),
            Some(EventType::DeliveryPickedUp)
        );
        assert_eq!(
            event_of(DeliveryState::Delivered),
            Some(EventType::DeliveryDelivered)
        );
        assert_eq!(event_of(DeliveryState::Offered), None);
        assert_eq!(event_of(DeliveryState::Released), None);
    }

    #[test]
    fn cancellation_requests_count_as_cancelled() {
        let mut o: Order = serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "metadata": {"name": "o"},
            "spec": {
                "customer": {"id": "c", "name": "C", "contact": {"email": "c@example.com"}},
                "restaurantRef": {"name": "r"}, "items": [{"menuItem": "pizza", "quantity": 1}],
                "deliveryAddress": {"street": "s", "city": "c", "postalCode": "1", "country": "DE"},
                "payment": {"token": "tok_visa"}
            }
        }))
        .unwrap();
        assert!(!cancel_pending(&o));
        o.spec.cancellation = Some(dishpatch_api::order::CancellationRequest {
            reason: "no".into(),
        });
        assert!(cancel_pending(&o));
    }
}
