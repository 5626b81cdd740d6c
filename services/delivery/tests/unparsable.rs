//! One Order that does not parse must not jam the delivery service: the
//! courier sweep reads the order each courier points at, and a read that
//! fails to parse used to abort the whole sweep, so couriers listed after
//! it were never freed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Bed, RESTAURANT};
use dishpatch_api::order::DeliveryState;
use dishpatch_testkit::fixtures;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// Makes an Order that the apiserver stores but the Rust types can't parse.
/// The trick: `9999-12-31T23:59:59Z` is a valid `date-time` to the CRD
/// schema, yet lies past the largest timestamp `jiff` (and so the Order
/// type) holds. Written untyped, as a broken tool would.
async fn unparsable_order(bed: &Bed, name: &str) {
    bed.orders()
        .create(
            &PostParams::default(),
            &fixtures::order(name, RESTAURANT, &[("pizza", 1)]),
        )
        .await
        .unwrap();
    dishpatch_testkit::break_order(&bed.client, &bed.ns.name, name, "Ready")
        .await
        .unwrap();
    assert!(
        bed.orders().get(name).await.is_err(),
        "the order must not parse"
    );
}

/// Points a courier at an order, as a claim by the delivery service would.
async fn claimed_for(bed: &Bed, courier: &str, order: &str) {
    let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
        "status": {"available": false, "currentOrder": order}});
    bed.couriers()
        .patch_status(
            courier,
            &PatchParams::apply("dishpatch-delivery").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_courier_on_an_unparsable_order_does_not_stop_the_courier_sweep() {
    let bed = Bed::new("dlv-unparsable").await;
    bed.restaurant().await;
    unparsable_order(&bed, "broken").await;
    // Couriers are listed by name: the one on the broken order comes first.
    bed.courier("a-on-broken", true).await;
    bed.courier("b-on-gone", true).await;
    claimed_for(&bed, "a-on-broken", "broken").await;
    // An order that does not exist: the sweep frees this courier.
    claimed_for(&bed, "b-on-gone", "gone").await;

    let mut d = bed.delivery(&[]).await;
    let freed = bed
        .wait_courier("b-on-gone", Duration::from_secs(15), "freed", |s| {
            s.current_order.is_none()
        })
        .await;
    assert_eq!(freed.available, Some(true));
    // Nobody can tell what the broken order needs: its courier stays put.
    assert_eq!(
        bed.courier_status("a-on-broken")
            .await
            .current_order
            .as_deref(),
        Some("broken")
    );

    // And the service still delivers other orders.
    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;
    bed.wait_order("o1", Duration::from_secs(10), "assigned", |o| {
        common::delivery(o).is_some_and(|d| d.courier.as_deref() == Some("b-on-gone"))
    })
    .await;
    assert!(d.child.try_wait().unwrap().is_none(), "delivery exited");
}

/// Start-up recovery reads every delivery under way; one Order that does not
/// parse must not hide the others from a restarted service.
#[tokio::test]
async fn a_restarted_service_resumes_deliveries_past_an_unparsable_order() {
    let bed = Bed::new("dlv-unparsable-resume").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    unparsable_order(&bed, "broken").await;
    let args = ["--pickup-time", "2s", "--travel-time", "1s"];
    let mut first = bed.delivery(&args).await;
    let o = bed.ready_order("o1").await;
    bed.kitchen_ready(&o).await;
    bed.wait_order("o1", Duration::from_secs(10), "assigned", |o| {
        common::state(o) == Some(DeliveryState::Assigned)
    })
    .await;
    first.child.kill().await.unwrap();

    // Nothing publishes kitchen.ready again: the new process must find o1 itself.
    let _second = bed.delivery(&args).await;
    bed.wait_order("o1", Duration::from_secs(15), "delivered", |o| {
        common::state(o) == Some(DeliveryState::Delivered)
    })
    .await;
}
