//! An order from Accepted to Delivered through every real component.

mod common;

use std::time::Duration;

use common::{Platform, condition, kinds, phase};
use dishpatch_api::OrderPhase;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::{DeliveryState, KitchenState, PaymentState};
use dishpatch_testkit::fixtures;
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn with_token(mut o: dishpatch_api::Order, token: &str) -> dishpatch_api::Order {
    o.spec.payment.token = Some(token.to_string());
    o
}

#[tokio::test]
async fn two_hundred_concurrent_orders_all_finish_with_every_stage_filled() {
    let p = Platform::new("e2e-load").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    p.create_couriers(20).await;
    let _procs = p.start_all();
    futures::stream::iter(0..200)
        .map(|i| {
            p.create_order(fixtures::order(
                &format!("o{i}"),
                "roma",
                &[("pizza", 1), ("water", 2)],
            ))
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let orders = p.wait_all_terminal(Duration::from_secs(240)).await;
    assert_eq!(orders.len(), 200);
    for o in &orders {
        let s = o.status.as_ref().unwrap();
        assert_eq!(phase(o), Some(OrderPhase::Delivered), "{}", o.name_any());
        assert_eq!(
            s.payment.as_ref().map(|x| x.state),
            Some(PaymentState::Succeeded)
        );
        assert_eq!(
            s.kitchen.as_ref().map(|x| x.state),
            Some(KitchenState::Ready)
        );
        let d = s.delivery.as_ref().unwrap();
        assert_eq!(d.state, DeliveryState::Delivered);
        assert!(d.courier.is_some() && d.delivered_at.is_some());
    }
    // Every order charged exactly once.
    for o in &orders {
        assert_eq!(kinds(&p.ledger(&o.uid().unwrap()), "charge"), 1);
    }
}

#[tokio::test]
async fn a_declined_card_cancels_with_the_reason_and_releases_stock() {
    let p = Platform::new("e2e-declined").await;
    p.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    let _procs = p.start_all();
    p.create_order(with_token(
        fixtures::order("o1", "roma", &[("pizza", 2)]),
        "tok_chargeDeclined",
    ))
    .await;
    let o = p
        .wait_order("o1", T, "cancellation", |o| {
            phase(o) == Some(OrderPhase::Cancelled)
        })
        .await;
    let c = condition(&o, "Cancelled").unwrap();
    assert_eq!(c.reason, "PaymentFailed");
    assert!(c.message.contains("declined"), "{}", c.message);
    let pay = o.status.as_ref().unwrap().payment.clone().unwrap();
    assert_eq!(
        (pay.state, pay.failure_reason.as_deref()),
        (PaymentState::Failed, Some("Your card was declined."))
    );
    let r =
        p.ns.api::<dishpatch_api::Restaurant>()
            .get("roma")
            .await
            .unwrap();
    let inv = &r.status.unwrap().inventory[0];
    assert_eq!((inv.reserved, inv.available), (0, 5));
}

#[tokio::test]
async fn cancelling_after_payment_refunds_exactly_once() {
    let p = Platform::new("e2e-refund").await;
    p.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    let _op = p.start("operator", &[]);
    let _pay = p.start("payment", &[]);
    // A real-time kitchen: the pizza takes 60 s, long enough to cancel while it cooks.
    let _kitchen = p.start("kitchen", &["--time-scale", "1"]);
    let uid = p
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    p.wait_order("o1", T, "cooking", |o| {
        phase(o) == Some(OrderPhase::Preparing)
    })
    .await;

    let cancel = json!({"spec": {"cancellation": {"reason": "too slow"}}});
    p.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&cancel))
        .await
        .unwrap();
    let o = p
        .wait_order("o1", T, "the refund", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.payment.as_ref())
                .is_some_and(|x| x.state == PaymentState::Refunded)
        })
        .await;
    assert_eq!(phase(&o), Some(OrderPhase::Cancelled));
    // The kitchen hears of the cancellation on its own queue, in its own time.
    p.wait_order("o1", T, "the ticket dropped", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.kitchen.as_ref())
            .is_some_and(|k| k.state == KitchenState::Dropped)
    })
    .await;

    // order.cancelled again and again: still one refund.
    let r = OrderRef {
        namespace: p.ns.name.clone(),
        name: "o1".into(),
        uid: uid.clone(),
    };
    for _ in 0..3 {
        let e = CloudEvent::new(
            EventType::OrderCancelled,
            "test",
            r.clone(),
            None,
            jiff::Timestamp::now().to_string(),
        );
        p.broker
            .publish(
                &e,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ledger = p.ledger(&uid);
    assert_eq!(
        (kinds(&ledger, "charge"), kinds(&ledger, "refund")),
        (1, 1),
        "{ledger:#?}"
    );
}

#[tokio::test]
async fn the_same_order_accepted_three_times_charges_once() {
    let p = Platform::new("e2e-dupes").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _op = p.start("operator", &[]);
    let uid = p
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    p.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    // The operator's copy is queued; two more copies of the same event join it.
    let r = OrderRef {
        namespace: p.ns.name.clone(),
        name: "o1".into(),
        uid: uid.clone(),
    };
    for _ in 0..2 {
        let e = CloudEvent::new(
            EventType::OrderAccepted,
            "operator",
            r.clone(),
            None,
            jiff::Timestamp::now().to_string(),
        );
        p.broker
            .publish(
                &e,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .await
            .unwrap();
    }
    let _pay = p.start("payment", &[]);
    p.wait_order("o1", T, "payment", |o| phase(o) == Some(OrderPhase::Paid))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = p.ledger(&uid);
    assert_eq!(kinds(&ledger, "charge"), 1, "{ledger:#?}");
}

#[tokio::test]
async fn killing_workers_mid_flight_loses_no_order() {
    let p = Platform::new("e2e-kill").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    p.create_couriers(10).await;
    let _op = p.start("operator", &[]);
    let mut pay = p.start("payment", &[]);
    // Slow enough that tickets are cooking when the kitchen dies (60 s × 0.05 = 3 s).
    let mut kitchen = p.start("kitchen", &["--time-scale", "0.05"]);
    let _delivery = p.start("delivery", &[]);
    futures::stream::iter(0..30)
        .map(|i| p.create_order(fixtures::order(&format!("o{i}"), "roma", &[("pizza", 1)])))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no goodbye, unacked messages and cooking tickets mid-flight.
    kitchen.start_kill().unwrap();
    pay.start_kill().unwrap();
    kitchen.wait().await.unwrap();
    pay.wait().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _pay = p.start("payment", &[]);
    let _kitchen = p.start("kitchen", &["--time-scale", "0.05"]);
    let orders = p.wait_all_terminal(Duration::from_secs(180)).await;
    assert_eq!(orders.len(), 30);
    for o in &orders {
        assert_eq!(phase(o), Some(OrderPhase::Delivered), "{}", o.name_any());
        assert_eq!(kinds(&p.ledger(&o.uid().unwrap()), "charge"), 1);
    }
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_worker_keeps_serving() {
    let p = Platform::new("e2e-poison").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _procs = p.start_all();
    let conn = Connection::connect(&p.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_publish(
            "dishpatch.events".into(),
            "order.accepted".into(),
            BasicPublishOptions::default(),
            b"{ this is not an event",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    p.create_order(fixtures::order("after-poison", "roma", &[("water", 1)]))
        .await;
    p.wait_order("after-poison", T, "payment", |o| {
        o.status.as_ref().and_then(|s| s.payment.as_ref()).is_some()
    })
    .await;
    let (found, _) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || {
            channel.basic_get(
                "dishpatch.payment.dead-letter".into(),
                BasicGetOptions::default(),
            )
        },
        |m| matches!(m, Ok(Some(m)) if m.delivery.data.starts_with(b"{ this is not")),
    )
    .await;
    assert!(
        found,
        "the poison message is in dishpatch.payment.dead-letter"
    );
}

#[tokio::test]
async fn deleting_a_delivered_order_refunds_nothing() {
    let p = Platform::new("e2e-retention").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    p.create_couriers(1).await;
    let mut tap = dishpatch_messaging::EventTap::new(&p.broker, &[EventType::OrderCancelled])
        .await
        .unwrap();
    let _procs = p.start_all();
    let uid = p
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    p.wait_order("o1", T, "delivery", |o| {
        phase(o) == Some(OrderPhase::Delivered)
    })
    .await;

    // What retention does, done now: the finalizer must not "compensate" a delivered order.
    p.orders().delete("o1", &Default::default()).await.unwrap();
    let api = p.orders();
    let (gone, _) =
        dishpatch_testkit::eventually(T, || api.get_opt("o1"), |o| matches!(o, Ok(None))).await;
    assert!(gone);
    let cancelled = tap
        .next_matching(Duration::from_secs(3), |d| {
            d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid)
        })
        .await;
    assert!(
        cancelled.is_none(),
        "no order.cancelled for a delivered order: {cancelled:?}"
    );
    let ledger = p.ledger(&uid);
    assert_eq!(
        (kinds(&ledger, "charge"), kinds(&ledger, "refund")),
        (1, 0),
        "{ledger:#?}"
    );
}
