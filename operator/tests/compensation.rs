//! Compensation that can never succeed stops after a bounded number of
//! re-publishes, says so on the order, and leaves a way out for a person.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Bed, condition, phase};
use dishpatch_api::OrderPhase;
use dishpatch_api::events::EventType;
use dishpatch_testkit::{eventually, fixtures};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// An accepted order that the test charges itself, as the payment service
/// would, with no payment service around to ever refund it.
async fn charged_order(bed: &Bed, name: &str) -> String {
    let uid = bed
        .create_order(fixtures::order(name, "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    bed.wait_order(name, T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    let now = jiff::Timestamp::now().to_string();
    let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {"payment": {
        "state": "Succeeded", "provider": "simulated", "paymentId": "ch_1",
        "amount": {"amount": 950, "currency": "EUR"}, "chargedAt": now}}});
    bed.orders()
        .patch_status(
            name,
            &PatchParams::apply("dishpatch-payment").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
    bed.wait_order(name, T, "Paid", |o| phase(o) == Some(OrderPhase::Paid))
        .await;
    uid
}

/// order.cancelled events for `uid` seen on the tap within `window`.
async fn cancellations(
    tap: &mut dishpatch_messaging::EventTap,
    uid: &str,
    window: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + window;
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return n;
        }
        match tap
            .next_matching(left, |d| {
                d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid)
            })
            .await
        {
            Some(_) => n += 1,
            None => return n,
        }
    }
}

#[tokio::test]
async fn a_refund_that_never_comes_ends_in_compensation_failed() {
    let bed = Bed::new("comp-cancel").await;
    let mut tap = bed.tap(&[EventType::OrderCancelled]).await;
    let _op = bed.operator(
        "op-1",
        &["--stage-deadline", "1s", "--max-compensation-attempts", "2"],
    );
    bed.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let uid = charged_order(&bed, "o1").await;

    let cancel = json!({"spec": {"cancellation": {"reason": "changed my mind"}}});
    bed.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&cancel))
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", T, "CompensationFailed", |o| {
            condition(o, "CompensationFailed").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(phase(&o), Some(OrderPhase::Cancelled));
    let c = condition(&o, "CompensationFailed").unwrap();
    assert_eq!(c.reason, "CompensationExhausted");
    assert!(c.message.contains("not refunded"), "{}", c.message);

    // The first publish and two re-publishes, then silence.
    let seen = cancellations(&mut tap, &uid, Duration::from_secs(1)).await;
    assert!(seen <= 3, "{seen} order.cancelled events before giving up");
    let after = cancellations(&mut tap, &uid, Duration::from_secs(4)).await;
    assert_eq!(after, 0, "re-published after giving up");

    let events: Api<Event> = Api::namespaced(bed.client.clone(), &bed.ns.name);
    let lp = ListParams::default();
    let (found, _) = eventually(
        T,
        || events.list(&lp),
        |l| {
            l.as_ref().is_ok_and(|l| {
                l.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("CompensationFailed"))
            })
        },
    )
    .await;
    assert!(found, "a CompensationFailed Event");

    // A person refunds by hand and says so: the condition clears.
    let resolved = json!({"metadata": {"annotations": {"dishpatch.dev/compensation-resolved": "refunded in the dashboard, ticket 42"}}});
    bed.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&resolved))
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", T, "the resolution", |o| {
            condition(o, "CompensationFailed").is_some_and(|c| c.status == "False")
        })
        .await;
    assert_eq!(
        condition(&o, "CompensationFailed").unwrap().reason,
        "ResolvedByHand"
    );
}

#[tokio::test]
async fn a_deleted_charged_order_waits_for_a_person_when_no_refund_comes() {
    let bed = Bed::new("comp-delete").await;
    let _op = bed.operator(
        "op-1",
        &["--stage-deadline", "1s", "--max-compensation-attempts", "2"],
    );
    bed.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    charged_order(&bed, "o1").await;
    bed.orders()
        .delete("o1", &DeleteParams::default())
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", T, "CompensationFailed while deleting", |o| {
            condition(o, "CompensationFailed").is_some_and(|c| c.status == "True")
        })
        .await;
    assert!(o.metadata.deletion_timestamp.is_some());
    assert!(
        o.finalizers()
            .contains(&"dishpatch.dev/compensate".to_string()),
        "the finalizer holds while the money is outstanding"
    );

    let resolved = json!({"metadata": {"annotations": {"dishpatch.dev/compensation-resolved": "refunded by hand"}}});
    bed.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&resolved))
        .await
        .unwrap();
    let api = bed.orders();
    let (gone, _) = eventually(T, || api.get_opt("o1"), |o| matches!(o, Ok(None))).await;
    assert!(gone, "resolved by hand, the order goes");
}
