//! Deleting an order never keeps the customer's money: the finalizer holds
//! until the payment is settled (refunded, failed or never charged).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Platform, kinds, phase};
use dishpatch_api::OrderPhase;
use dishpatch_api::order::PaymentState;
use dishpatch_testkit::{eventually, fixtures};
use kube::ResourceExt;
use kube::api::DeleteParams;

const T: Duration = Duration::from_secs(60);

/// The operator with short deadlines, so re-publishing shows within the test.
fn operator(p: &Platform) -> tokio::process::Child {
    // How long deletion once waited for a refund before letting a charged
    // order go (`--cleanup-timeout`); shortened so that shows in the test.
    // Ignored by an operator that no longer gives up.
    p.start_env(
        "operator",
        &["--stage-deadline", "2s"],
        &[("DISHPATCH_CLEANUP_TIMEOUT", "3s")],
    )
}

async fn wait_gone(p: &Platform, name: &str, timeout: Duration) -> bool {
    let api = p.orders();
    let (gone, _) = eventually(timeout, || api.get_opt(name), |o| matches!(o, Ok(None))).await;
    gone
}

#[tokio::test]
async fn deleting_a_charged_order_while_payment_is_down_still_refunds() {
    let p = Platform::new("e2e-delete-down").await;
    // No courier: the order stops at Ready, charged and undelivered.
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _op = operator(&p);
    let _kitchen = p.start("kitchen", &[]);
    let mut payment = p.start("payment", &[]);
    let uid = p
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    p.wait_order("o1", T, "the charge", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .is_some_and(|pay| pay.state == PaymentState::Succeeded)
    })
    .await;

    payment.kill().await.unwrap();
    p.orders()
        .delete("o1", &DeleteParams::default())
        .await
        .unwrap();
    // Several deadlines pass (and the old 60 s give-up, shortened below)
    // while nobody can refund: the order must still be there.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let held = p.orders().get_opt("o1").await.unwrap();
    assert!(
        held.is_some(),
        "the order was let go while its charge was not refunded"
    );

    let _payment = p.start("payment", &[]);
    assert!(wait_gone(&p, "o1", T).await, "the refund let the order go");
    let ledger = p.ledger(&uid);
    assert_eq!(
        (kinds(&ledger, "charge"), kinds(&ledger, "refund")),
        (1, 1),
        "{ledger:?}"
    );
}

#[tokio::test]
async fn deleting_an_order_while_its_charge_is_in_flight_refunds_it() {
    let p = Platform::new("e2e-delete-inflight").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _op = operator(&p);
    let _kitchen = p.start("kitchen", &[]);
    // Each gateway call takes 3 s: the deletion lands mid-charge.
    let _payment = p.start("payment", &["--simulated-latency", "3s"]);
    let uid = p
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();
    p.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.orders()
        .delete("o1", &DeleteParams::default())
        .await
        .unwrap();

    assert!(wait_gone(&p, "o1", T).await, "the order was let go");
    // Let a charge that was still in flight land, and anything it triggers.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ledger = p.ledger(&uid);
    assert_eq!(
        kinds(&ledger, "charge"),
        1,
        "the charge was in flight: {ledger:?}"
    );
    assert_eq!(
        kinds(&ledger, "refund"),
        1,
        "a charge for a deleted order is refunded: {ledger:?}"
    );
}
