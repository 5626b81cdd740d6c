//! Every decision uses the Restaurant at its current generation: a price
//! change, closing, reopening and a restock each reach the next order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Bed, condition, phase};
use dishpatch_api::{OrderPhase, Restaurant};
use dishpatch_testkit::{eventually, fixtures};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Replaces the restaurant's spec with `change` applied, and waits until the
/// operator reports that it observed the new generation.
async fn change_restaurant(bed: &Bed, name: &str, change: impl Fn(&mut Restaurant)) {
    let api = bed.restaurants();
    let mut r = api.get(name).await.unwrap();
    change(&mut r);
    let patch = json!({"spec": r.spec});
    let written = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let generation = written.metadata.generation;
    let (seen, last) = eventually(
        T,
        || api.get(name),
        |r| {
            r.as_ref()
                .is_ok_and(|r| r.status.as_ref().and_then(|s| s.observed_generation) == generation)
        },
    )
    .await;
    let observed = last
        .ok()
        .and_then(|r| r.status)
        .and_then(|s| s.observed_generation);
    assert!(
        seen,
        "the operator never observed generation {generation:?} of {name} (status says {observed:?})"
    );
}

async fn order(bed: &Bed, name: &str, items: &[(&str, i32)]) -> dishpatch_api::Order {
    bed.create_order(fixtures::order(name, "roma", items)).await;
    bed.wait_order(name, T, "a decision", |o| {
        matches!(phase(o), Some(OrderPhase::Accepted | OrderPhase::Rejected))
    })
    .await
}

fn total(o: &dishpatch_api::Order) -> Option<i64> {
    o.status.as_ref()?.total.as_ref().map(|t| t.amount)
}

#[tokio::test]
async fn price_closing_reopening_and_restock_reach_the_next_order() {
    let bed = Bed::new("fresh-restaurant").await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(1)))
        .await;

    // Water is unlimited: deciding on it writes nothing to the Restaurant,
    // which is exactly when a stale copy used to be reused.
    let o = order(&bed, "o1", &[("water", 1)]).await;
    assert_eq!(
        (phase(&o), total(&o)),
        (Some(OrderPhase::Accepted), Some(200))
    );

    change_restaurant(&bed, "roma", |r| {
        r.spec
            .menu
            .iter_mut()
            .find(|i| i.id == "water")
            .unwrap()
            .price = 1200;
    })
    .await;
    let o = order(&bed, "o2", &[("water", 1)]).await;
    assert_eq!(total(&o), Some(1200), "priced at the new price");

    change_restaurant(&bed, "roma", |r| r.spec.open = false).await;
    let o = order(&bed, "o3", &[("water", 1)]).await;
    assert_eq!(
        phase(&o),
        Some(OrderPhase::Rejected),
        "the restaurant is closed"
    );
    assert_eq!(
        condition(&o, "Accepted").unwrap().reason,
        "RestaurantClosed"
    );

    change_restaurant(&bed, "roma", |r| r.spec.open = true).await;
    let o = order(&bed, "o4", &[("water", 1)]).await;
    assert_eq!(phase(&o), Some(OrderPhase::Accepted), "open again");

    // Sell out the one pizza, then restock.
    let o = order(&bed, "o5", &[("pizza", 1)]).await;
    assert_eq!(phase(&o), Some(OrderPhase::Accepted));
    let o = order(&bed, "o6", &[("pizza", 1)]).await;
    assert_eq!(condition(&o, "Accepted").unwrap().reason, "OutOfStock");
    change_restaurant(&bed, "roma", |r| {
        r.spec
            .menu
            .iter_mut()
            .find(|i| i.id == "pizza")
            .unwrap()
            .stock = Some(3);
    })
    .await;
    let o = order(&bed, "o7", &[("pizza", 2)]).await;
    assert_eq!(
        phase(&o),
        Some(OrderPhase::Accepted),
        "restocked: {:?}",
        condition(&o, "Accepted").map(|c| &c.message)
    );
    let r = bed.restaurant("roma").await;
    let inv = &r.status.unwrap().inventory[0];
    assert_eq!((inv.stock, inv.reserved, inv.available), (3, 3, 0));
}
