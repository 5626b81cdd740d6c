//! The kitchen against a real apiserver and RabbitMQ: a ticket whose
//! announcement can't be published still cooks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Platform;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::KitchenState;
use dishpatch_testkit::fixtures;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use lapin::options::QueueDeleteOptions;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// An order the operator accepted and payment charged, as they would write it.
async fn paid_order(p: &Platform, name: &str) -> dishpatch_api::Order {
    let order = p
        .create_order(fixtures::order(name, "roma", &[("pizza", 1)]))
        .await;
    let now = jiff::Timestamp::now().to_string();
    for (manager, status) in [
        (
            "dishpatch-operator",
            json!({"phase": "Paid", "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "priced", "lastTransitionTime": now}]}),
        ),
        (
            "dishpatch-payment",
            json!({"payment": {"state": "Succeeded", "provider": "simulated", "paymentId": "ch_1",
                "amount": {"amount": 950, "currency": "EUR"}, "chargedAt": now}}),
        ),
    ] {
        let patch =
            json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": status});
        p.orders()
            .patch_status(
                name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
    }
    order
}

#[tokio::test]
async fn a_ticket_cooks_even_when_announcing_it_fails() {
    let p = Platform::new("kitchen-publish").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _kitchen = p.start("kitchen", &[]);
    let order = paid_order(&p, "o1").await;

    // kitchen.accepted goes only to the notification queue: without it the
    // announcement is unroutable, so every publish of it fails.
    tokio::time::sleep(Duration::from_secs(1)).await; // the kitchen has declared its topology
    let channel = p.broker.channel().await.unwrap();
    channel
        .queue_delete(
            "dishpatch.notification".into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    let event = CloudEvent::new(
        EventType::PaymentSucceeded,
        "payment",
        OrderRef {
            namespace: p.ns.name.clone(),
            name: "o1".into(),
            uid: order.uid().unwrap(),
        },
        None,
        jiff::Timestamp::now().to_string(),
    );
    p.broker
        .publish(
            &event,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .await
        .unwrap();

    let o = p
        .wait_order("o1", T, "the ticket to be ready", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.kitchen.as_ref())
                .is_some_and(|k| k.state == KitchenState::Ready)
        })
        .await;
    assert!(o.status.unwrap().kitchen.unwrap().ready_at.is_some());
}

/// Makes an Order that the apiserver stores but the Rust types can't parse:
/// `9999-12-31T23:59:59Z` is a valid date-time to the schema, yet past the
/// largest timestamp the types hold.
async fn unparsable_order(p: &Platform, name: &str) {
    p.create_order(fixtures::order(name, "roma", &[("water", 1)]))
        .await;
    dishpatch_testkit::break_order(&p.client, &p.ns.name, name, "Queued")
        .await
        .unwrap();
    assert!(
        p.orders().get(name).await.is_err(),
        "the order must not parse"
    );
}

#[tokio::test]
async fn an_order_that_does_not_parse_does_not_stop_the_kitchen() {
    let p = Platform::new("kitchen-unparsable").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    unparsable_order(&p, "broken").await;
    let order = paid_order(&p, "o1").await;
    // Starting lists every Order to resume tickets still cooking.
    let mut kitchen = p.start("kitchen", &[]);
    let event = CloudEvent::new(
        EventType::PaymentSucceeded,
        "payment",
        OrderRef {
            namespace: p.ns.name.clone(),
            name: "o1".into(),
            uid: order.uid().unwrap(),
        },
        None,
        jiff::Timestamp::now().to_string(),
    );
    p.broker
        .publish(
            &event,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .await
        .unwrap();
    p.wait_order("o1", T, "the ticket to be ready", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.kitchen.as_ref())
            .is_some_and(|k| k.state == KitchenState::Ready)
    })
    .await;
    assert!(kitchen.try_wait().unwrap().is_none(), "the kitchen exited");
}
