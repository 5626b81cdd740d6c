//! One Order that does not deserialize jams nothing: its stock stays held,
//! other orders are decided, and deleting it completes.
//!
//! How such an order comes about: `9999-12-31T23:59:59Z` is a valid
//! date-time to the apiserver's schema (a "never" some tools write), but
//! past the largest timestamp the Rust types can hold, so the typed Order
//! fails to parse while the apiserver stores it happily.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Bed, phase, pizza_available};
use dishpatch_api::OrderPhase;
use dishpatch_testkit::{eventually, fixtures};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_order_that_does_not_parse_keeps_its_stock_and_can_be_deleted() {
    let bed = Bed::new("unparsable").await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(2)))
        .await;
    bed.create_order(fixtures::order("bad", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order("bad", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(1));

    dishpatch_testkit::break_order(&bed.client, &bed.ns.name, "bad", "Queued")
        .await
        .unwrap();
    // Through an untyped API: the answer is the order the typed one can't read.
    let untyped = dishpatch_testkit::untyped_orders(&bed.client, &bed.ns.name);
    assert!(
        bed.orders().get("bad").await.is_err(),
        "the typed Order must fail to parse for this test to mean anything"
    );

    // A restaurant change runs the orphan sweep, which must not take the
    // unparsable order for a vanished one and free its pizza.
    let poke = json!({"spec": {"displayName": "Roma Centro"}});
    bed.restaurants()
        .patch("roma", &PatchParams::default(), &Patch::Merge(&poke))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pizza_available(&bed.restaurant("roma").await),
        Some(1),
        "the unparsable order's stock hold was released"
    );

    // Other orders are still decided.
    bed.create_order(fixtures::order("good", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order("good", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(0));

    // Deleting it completes: nothing was charged, its stock comes back.
    untyped
        .delete("bad", &DeleteParams::default())
        .await
        .unwrap();
    let raw = bed
        .ns
        .api::<kube::core::PartialObjectMeta<dishpatch_api::Order>>();
    let (gone, _) = eventually(T, || raw.get_metadata_opt("bad"), |o| matches!(o, Ok(None))).await;
    assert!(gone, "the unparsable order hangs in Terminating");
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(1));
}
