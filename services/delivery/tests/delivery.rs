//! The delivery service against the real apiserver and RabbitMQ: real
//! `dishpatch-delivery` processes, the test playing the kitchen and operator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Bed, delivery, state};
use dishpatch_api::events::EventType;
use dishpatch_api::order::DeliveryState;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};

const DELIVERY_EVENTS: [EventType; 3] = [
    EventType::DeliveryAssigned,
    EventType::DeliveryPickedUp,
    EventType::DeliveryDelivered,
];

fn is(s: DeliveryState) -> impl Fn(&dishpatch_api::Order) -> bool {
    move |o| state(o) == Some(s)
}

#[tokio::test]
async fn one_order_is_assigned_picked_up_and_delivered() {
    let bed = Bed::new("dlv-happy").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    let mut tap = bed.tap(&DELIVERY_EVENTS).await;
    let _d = bed.delivery(&["--time-scale", "0.005"]).await;

    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;

    // The events arrive in order, each about this order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let d = tap
            .next_matching(Duration::from_secs(20), |_| true)
            .await
            .unwrap_or_else(|| panic!("only saw {seen:?}"));
        let e = d.event.unwrap();
        assert_eq!(e.data.order.uid, o.uid().unwrap());
        assert!(d.traceparent.is_some());
        seen.push(d.routing_key);
    }
    assert_eq!(
        seen,
        [
            "delivery.assigned",
            "delivery.picked_up",
            "delivery.delivered"
        ]
    );

    let done = bed
        .wait_order(
            "o1",
            Duration::from_secs(5),
            "delivered",
            is(DeliveryState::Delivered),
        )
        .await;
    let d = delivery(&done).unwrap();
    assert_eq!(d.courier.as_deref(), Some("ada"));
    let (assigned, picked, delivered) = (
        d.assigned_at.clone().expect("assignedAt").0,
        d.picked_up_at.clone().expect("pickedUpAt").0,
        d.delivered_at.clone().expect("deliveredAt").0,
    );
    assert!(assigned <= picked && picked <= delivered, "{d:?}");
    assert!(d.eta.is_some());
    // The section is the delivery service's, by server-side apply.
    let owners: Vec<_> = done
        .managed_fields()
        .iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        owners.contains(&"dishpatch-delivery".to_string()),
        "{owners:?}"
    );

    let free = bed
        .wait_courier("ada", Duration::from_secs(5), "freed", |s| {
            s.current_order.is_none()
        })
        .await;
    assert_eq!(free.available, Some(true));
    assert_eq!(free.offer, None);
}

#[tokio::test]
async fn two_replicas_never_give_a_courier_two_orders() {
    let bed = Bed::new("dlv-race").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    bed.courier("grace", true).await;
    let args = [
        "--time-scale",
        "1",
        "--pickup-time",
        "300ms",
        "--travel-time",
        "1200ms",
    ];
    let (a, b) = tokio::join!(bed.delivery(&args), bed.delivery(&args));

    let names: Vec<String> = (1..=5).map(|i| format!("o{i}")).collect();
    let mut orders = Vec::new();
    for n in &names {
        orders.push(bed.ready_order(n).await);
    }
    for o in &orders {
        bed.kitchen_ready(o).await;
    }

    // Poll while it runs. Couriers are read before orders: a courier is
    // claimed before the order records it and freed only after the order
    // is delivered, so these checks hold across the two reads.
    let mut holding: HashMap<String, String> = HashMap::new();
    let mut max_in_flight = 0;
    let mut polls = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all delivered in time; logs: {}, {}",
            a.log.display(),
            b.log.display()
        );
        let couriers = bed
            .couriers()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let orders = bed
            .orders()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        polls += 1;
        let by_name: HashMap<String, &dishpatch_api::Order> =
            orders.iter().map(|o| (o.name_any(), o)).collect();

        for c in &couriers {
            let cname = c.name_any();
            let current = c.status.as_ref().and_then(|s| s.current_order.clone());
            if let Some(order) = &current {
                // The order it holds names it, or has not recorded it yet.
                let named = by_name
                    .get(order)
                    .and_then(|o| delivery(o))
                    .and_then(|d| d.courier.clone());
                assert!(
                    named.is_none() || named.as_deref() == Some(cname.as_str()),
                    "courier {cname} holds {order}, which names {named:?}"
                );
            }
            match (holding.get(&cname), &current) {
                (Some(before), Some(now)) if before != now => {
                    // Moved on between two polls: only after delivering the first.
                    let first = bed.order(before).await;
                    assert_eq!(
                        state(&first),
                        Some(DeliveryState::Delivered),
                        "courier {cname} took {now} while {before} was {:?}",
                        delivery(&first)
                    );
                }
                _ => {}
            }
            match current {
                Some(o) => holding.insert(cname, o),
                None => holding.remove(&cname),
            };
        }

        let in_flight: Vec<(String, String)> = orders
            .iter()
            .filter_map(|o| {
                let d = delivery(o)?;
                matches!(d.state, DeliveryState::Assigned | DeliveryState::PickedUp)
                    .then(|| (o.name_any(), d.courier.clone().unwrap_or_default()))
            })
            .collect();
        max_in_flight = max_in_flight.max(in_flight.len());
        assert!(
            in_flight.len() <= 2,
            "more orders on the road than couriers: {in_flight:?}"
        );
        let distinct: HashSet<&String> = in_flight.iter().map(|(_, c)| c).collect();
        assert_eq!(
            distinct.len(),
            in_flight.len(),
            "one courier on two orders: {in_flight:?}"
        );

        if orders
            .iter()
            .filter(|o| state(o) == Some(DeliveryState::Delivered))
            .count()
            == names.len()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(polls > 20, "too few polls to mean anything: {polls}");
    assert_eq!(max_in_flight, 2, "the couriers never worked in parallel");
    for n in ["ada", "grace"] {
        bed.wait_courier(n, Duration::from_secs(5), "freed", |s| {
            s.current_order.is_none() && s.offer.is_none()
        })
        .await;
    }
    // Every order went out exactly once, with one of the two couriers.
    for n in &names {
        let d = delivery(&bed.order(n).await).cloned().unwrap();
        assert!(
            matches!(d.courier.as_deref(), Some("ada" | "grace")),
            "{n}: {d:?}"
        );
        assert!(
            d.assigned_at.is_some() && d.picked_up_at.is_some() && d.delivered_at.is_some(),
            "{n}: {d:?}"
        );
    }
    assert_eq!(bed.dead_letters().await, 0);
}

#[tokio::test]
async fn the_same_ready_event_three_times_assigns_once() {
    let bed = Bed::new("dlv-dup").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    bed.courier("grace", true).await;
    // Two replicas, so the duplicates are handled concurrently; a long pick-up keeps the order Assigned.
    let (_a, _b) = tokio::join!(bed.delivery(&[]), bed.delivery(&[]));
    let mut tap = bed.tap(&[EventType::DeliveryAssigned]).await;

    let o = bed.ready_order("o1").await;
    for _ in 0..3 {
        bed.kitchen_ready(&o).await;
    }
    let first = bed
        .wait_order(
            "o1",
            Duration::from_secs(10),
            "assigned",
            is(DeliveryState::Assigned),
        )
        .await;
    let d = delivery(&first).cloned().unwrap();
    let courier = d.courier.clone().unwrap();
    assert!(
        tap.next_matching(Duration::from_secs(5), |_| true)
            .await
            .is_some()
    );

    // Let every duplicate (and any retry of one) play out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let check = |when: &'static str| {
        let (bed, d, courier) = (&bed, &d, &courier);
        async move {
            let now = delivery(&bed.order("o1").await).cloned().unwrap();
            assert_eq!(&now, d, "{when}: the delivery section changed");
            let holders: Vec<String> = bed
                .couriers()
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|c| {
                    c.status
                        .as_ref()
                        .is_some_and(|s| s.current_order.is_some() || s.offer.is_some())
                })
                .map(|c| c.name_any())
                .collect();
            assert_eq!(
                holders,
                std::slice::from_ref(courier),
                "{when}: couriers holding something"
            );
        }
    };
    check("after three deliveries").await;

    // A fourth, later (as the operator's re-publish would be): still nothing changes.
    while tap
        .next_matching(Duration::from_millis(300), |_| true)
        .await
        .is_some()
    {}
    bed.kitchen_ready(&o).await;
    // Re-publishing the outcome is allowed: it says the same thing.
    let again = tap.next_matching(Duration::from_secs(10), |_| true).await;
    assert!(again.is_some(), "the redelivered event was not handled");
    check("after a fourth").await;
    assert_eq!(bed.dead_letters().await, 0);
}

#[tokio::test]
async fn an_order_waits_for_a_courier_instead_of_dead_lettering() {
    let bed = Bed::new("dlv-wait").await;
    bed.restaurant().await;
    bed.courier("linus", false).await;
    let d = bed.delivery(&["--time-scale", "0.002"]).await;

    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;

    // The message is handled and acked at once, not retried into the dead-letter queue.
    let (ok, metrics) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || d.metrics(),
        |m| {
            m.contains(r#"dishpatch_delivery_messages_total{event="kitchen.ready",outcome="ok"} 1"#)
        },
    )
    .await;
    assert!(ok, "kitchen.ready was not acked: {metrics}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        state(&bed.order("o1").await),
        None,
        "assigned without a courier on shift"
    );
    assert!(!d.metrics().await.contains(r#"outcome="retried""#));
    assert_eq!(bed.dead_letters().await, 0);
    assert_eq!(bed.courier_status("linus").await.current_order, None);

    // A courier goes on shift: the waiting order gets them.
    bed.couriers()
        .patch(
            "linus",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"onShift": true}})),
        )
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", Duration::from_secs(10), "assigned", |o| {
            state(o).is_some()
        })
        .await;
    assert_eq!(delivery(&o).unwrap().courier.as_deref(), Some("linus"));
    bed.wait_order(
        "o1",
        Duration::from_secs(15),
        "delivered",
        is(DeliveryState::Delivered),
    )
    .await;
    assert_eq!(bed.dead_letters().await, 0);
}

#[tokio::test]
async fn cancelling_an_assigned_order_frees_its_courier() {
    let bed = Bed::new("dlv-cancel").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    // Real-time pick-up (60 s): the order stays Assigned while the test cancels it.
    let _d = bed.delivery(&[]).await;

    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;
    let assigned = bed
        .wait_order(
            "o1",
            Duration::from_secs(10),
            "assigned",
            is(DeliveryState::Assigned),
        )
        .await;
    let before = delivery(&assigned).cloned().unwrap();
    assert_eq!(
        bed.courier_status("ada").await.current_order.as_deref(),
        Some("o1")
    );

    bed.cancel(&o).await;
    let released = bed
        .wait_order(
            "o1",
            Duration::from_secs(10),
            "released",
            is(DeliveryState::Released),
        )
        .await;
    let after = delivery(&released).cloned().unwrap();
    assert_eq!(
        (after.courier.clone(), after.assigned_at.clone()),
        (before.courier, before.assigned_at)
    );
    assert_eq!(after.picked_up_at, None);
    let free = bed
        .wait_courier("ada", Duration::from_secs(5), "freed", |s| {
            s.current_order.is_none()
        })
        .await;
    assert_eq!(free.available, Some(true));

    // A duplicate cancellation changes nothing.
    bed.publish(EventType::OrderCancelled, "operator", &o).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(delivery(&bed.order("o1").await), Some(&after));
}

#[tokio::test]
async fn an_unanswered_offer_moves_on_and_an_accepted_one_is_assigned() {
    let bed = Bed::new("dlv-offer").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    bed.courier("grace", true).await;
    let _d = bed
        .delivery(&[
            "--auto-accept",
            "false",
            "--offer-timeout",
            "1s",
            "--pickup-time",
            "200ms",
            "--travel-time",
            "200ms",
        ])
        .await;

    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;
    let offered = bed
        .wait_order(
            "o1",
            Duration::from_secs(10),
            "offered",
            is(DeliveryState::Offered),
        )
        .await;
    let first = delivery(&offered).unwrap().courier.clone().unwrap();
    let offer = bed
        .courier_status(&first)
        .await
        .offer
        .expect("the courier sees the offer");
    assert_eq!(offer.order, "o1");

    // Nobody answers: it moves to the other courier, and the first one's offer is withdrawn.
    let moved = bed
        .wait_order(
            "o1",
            Duration::from_secs(10),
            "offered to someone else",
            |o| {
                delivery(o).is_some_and(|d| {
                    d.state == DeliveryState::Offered
                        && d.courier.as_deref() != Some(first.as_str())
                })
            },
        )
        .await;
    assert!(delivery(&moved).unwrap().courier.is_some());
    assert_eq!(bed.courier_status(&first).await.offer, None);

    // The courier now offered accepts, as the façade records it: the
    // annotation `dishpatch.dev/accept: o1` on its Courier. If the offer
    // lapses before the service sees it, the request is refused; try again.
    let accepted_by = loop {
        let o = bed.order("o1").await;
        let d = delivery(&o).cloned().unwrap();
        if d.state != DeliveryState::Offered {
            break d.courier.unwrap();
        }
        let who = d.courier.unwrap();
        bed.couriers()
            .patch(
                &who,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"dishpatch.dev/accept": "o1"}}})),
            )
            .await
            .unwrap();
        bed.wait_order("o1", Duration::from_secs(10), "an answer", |o| {
            delivery(o).is_some_and(|n| {
                n.state != DeliveryState::Offered || n.courier.as_deref() != Some(who.as_str())
            })
        })
        .await;
    };
    let assigned = bed
        .wait_order("o1", Duration::from_secs(10), "assigned", |o| {
            state(o).is_some_and(|s| s != DeliveryState::Offered)
        })
        .await;
    assert_eq!(
        delivery(&assigned).unwrap().courier.as_deref(),
        Some(accepted_by.as_str())
    );
    // Without auto-accept nothing is simulated: the courier confirms pick-up
    // and drop-off through the façade, as annotations on the Courier.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(state(&bed.order("o1").await), Some(DeliveryState::Assigned));
    for (request, next) in [
        ("dishpatch.dev/picked-up", DeliveryState::PickedUp),
        ("dishpatch.dev/delivered", DeliveryState::Delivered),
    ] {
        bed.couriers()
            .patch(
                &accepted_by,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {request: "o1"}}})),
            )
            .await
            .unwrap();
        bed.wait_order("o1", Duration::from_secs(10), request, is(next))
            .await;
    }
    for n in ["ada", "grace"] {
        bed.wait_courier(n, Duration::from_secs(5), "free", |s| {
            s.current_order.is_none() && s.offer.is_none()
        })
        .await;
    }
    // The request was acted on, so it is gone.
    let c = bed.couriers().get(&accepted_by).await.unwrap();
    for request in [
        "dishpatch.dev/accept",
        "dishpatch.dev/picked-up",
        "dishpatch.dev/delivered",
    ] {
        assert!(
            !c.annotations().contains_key(request),
            "{:?}",
            c.annotations()
        );
    }
}

#[tokio::test]
async fn a_restarted_service_resumes_deliveries_in_progress() {
    let bed = Bed::new("dlv-resume").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    let args = ["--pickup-time", "2s", "--travel-time", "1s"];
    let mut first = bed.delivery(&args).await;

    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;
    bed.wait_order(
        "o1",
        Duration::from_secs(10),
        "assigned",
        is(DeliveryState::Assigned),
    )
    .await;
    first.child.kill().await.unwrap();

    // Nothing publishes kitchen.ready again: the new process finds the order itself.
    let _second = bed.delivery(&args).await;
    let done = bed
        .wait_order(
            "o1",
            Duration::from_secs(15),
            "delivered",
            is(DeliveryState::Delivered),
        )
        .await;
    assert_eq!(delivery(&done).unwrap().courier.as_deref(), Some("ada"));
    bed.wait_courier("ada", Duration::from_secs(5), "freed", |s| {
        s.current_order.is_none()
    })
    .await;
}

#[tokio::test]
async fn a_new_courier_shows_available_from_the_start() {
    let bed = Bed::new("dlv-avail").await;
    let _d = bed.delivery(&["--time-scale", "0.005"]).await;
    bed.courier("ada", true).await;
    bed.courier("bob", false).await;

    // `kubectl get couriers` reads .status.available: never blank for long
    let shown = |s: &dishpatch_api::courier::CourierStatus| s.available.is_some();
    let ada = bed
        .wait_courier("ada", Duration::from_secs(15), "a status", shown)
        .await;
    assert_eq!(ada.available, Some(true));
    assert_eq!(ada.current_order, None);
    let bob = bed
        .wait_courier("bob", Duration::from_secs(15), "a status", shown)
        .await;
    assert_eq!(bob.available, Some(false));

    // a free courier's column follows their shift
    bed.couriers()
        .patch(
            "ada",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"onShift": false}})),
        )
        .await
        .unwrap();
    bed.wait_courier("ada", Duration::from_secs(15), "shown off shift", |s| {
        s.available == Some(false)
    })
    .await;
}
