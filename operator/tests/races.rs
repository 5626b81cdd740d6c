//! A cancellation and the courier's pick-up race: exactly one may win.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Bed, condition, phase};
use dishpatch_api::OrderPhase;
use dishpatch_api::events::EventType;
use dishpatch_testkit::{FreezableProxy, apiserver_addr, fixtures, kubeconfig_via};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The operator decides to cancel from what it saw; before its write lands,
/// the courier picks the order up. Its write must lose (409), and it must
/// decide again: too late to cancel. Without the precondition the customer
/// would get the food and the refund. Nor may the lost decision be
/// announced: an `order.cancelled` for a delivered order would have payment
/// look for a refund and the customer told it was called off.
#[tokio::test]
async fn a_cancellation_decided_before_a_pick_up_loses_to_it() {
    let bed = Bed::new("race-cancel").await;
    let mut cancellations = bed.tap(&[EventType::OrderCancelled]).await;
    let proxy = FreezableProxy::start(apiserver_addr().unwrap())
        .await
        .unwrap();
    let kubeconfig = std::env::temp_dir().join(format!("{}-proxy.kubeconfig", bed.ns.name));
    kubeconfig_via(proxy.addr, &kubeconfig).unwrap();
    let _op = bed.operator_via("op-1", &[], &kubeconfig);
    bed.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    bed.create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    let report = |manager: &'static str, section: &'static str, body: serde_json::Value| {
        let api = bed.orders();
        async move {
            let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {section: body}});
            api.patch_status(
                "o1",
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
        }
    };
    let now = jiff::Timestamp::now().to_string();
    let now = now.as_str();
    report(
        "dishpatch-payment",
        "payment",
        json!({"state": "Succeeded", "provider": "simulated", "chargedAt": now}),
    )
    .await;
    report(
        "dishpatch-kitchen",
        "kitchen",
        json!({"state": "Ready", "ticketAcceptedAt": now, "readyAt": now}),
    )
    .await;
    report(
        "dishpatch-delivery",
        "delivery",
        json!({"state": "Assigned", "courier": "ada", "assignedAt": now}),
    )
    .await;
    bed.wait_order("o1", T, "Ready", |o| phase(o) == Some(OrderPhase::Ready))
        .await;

    // The operator still hears everything, but what it sends is held.
    proxy.freeze_upstream(true);
    bed.orders()
        .patch(
            "o1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancellation": {"reason": "too slow"}}})),
        )
        .await
        .unwrap();
    // It sees the request, decides to cancel, and its write waits in the proxy.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report(
        "dishpatch-delivery",
        "delivery",
        json!({"state": "PickedUp", "courier": "ada", "assignedAt": now, "pickedUpAt": now}),
    )
    .await;
    proxy.freeze_upstream(false);

    let o = bed
        .wait_order("o1", T, "the operator to decide again", |o| {
            condition(o, "Cancelled").is_some_and(|c| c.reason == "TooLateToCancel")
                || condition(o, "Cancelled").is_some_and(|c| c.status == "True")
        })
        .await;
    let _ = std::fs::remove_file(&kubeconfig);
    let cancelled = condition(&o, "Cancelled").unwrap();
    assert_eq!(
        (cancelled.status.as_str(), cancelled.reason.as_str()),
        ("False", "TooLateToCancel"),
        "cancelled although the courier had picked the order up"
    );
    assert_eq!(phase(&o), Some(OrderPhase::OutForDelivery));
    // The operator retries a conflicted reconcile within a second or two.
    let announced = cancellations
        .next_matching(Duration::from_secs(5), |_| true)
        .await;
    assert!(
        announced.is_none(),
        "order.cancelled was published for a cancellation that lost the race: {announced:?}"
    );
}
