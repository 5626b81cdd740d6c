//! Two operator processes: one leads; SIGKILL it and the other takes over.

mod common;

use std::time::Duration;

use common::{Bed, phase};
use dishpatch_api::OrderPhase;
use dishpatch_testkit::{eventually, fixtures};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

fn holder(l: &Result<Option<Lease>, kube::Error>) -> Option<String> {
    match l {
        Ok(Some(l)) => l.spec.as_ref().and_then(|s| s.holder_identity.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn killing_the_leader_hands_over() {
    let bed = Bed::new("leader").await;
    let lease = ["--lease-duration", "3s"];
    let a = bed.operator("replica-a", &lease);
    let (ok, _) = {
        let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.ns.name);
        eventually(
            Duration::from_secs(20),
            || leases.get_opt("dishpatch-operator"),
            |l| holder(l).as_deref() == Some("replica-a"),
        )
        .await
    };
    assert!(ok, "replica-a leads");
    let mut b = bed.operator("replica-b", &lease);

    bed.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    bed.create_order(fixtures::order("before", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order(
        "before",
        Duration::from_secs(20),
        "acceptance by the leader",
        |o| phase(o) == Some(OrderPhase::Accepted),
    )
    .await;

    // The standby must not act: it has not taken the lease.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "the standby keeps running"
    );

    let mut a = a;
    a.child.start_kill().unwrap(); // SIGKILL: no chance to release the lease
    a.child.wait().await.unwrap();
    let killed = std::time::Instant::now();
    bed.create_order(fixtures::order("after", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order(
        "after",
        Duration::from_secs(20),
        "acceptance by the new leader",
        |o| phase(o) == Some(OrderPhase::Accepted),
    )
    .await;
    let took = killed.elapsed();

    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.ns.name);
    let l = leases.get("dishpatch-operator").await.unwrap();
    let spec = l.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    // Within the lease (3s) plus a retry period and the reconcile.
    assert!(took < Duration::from_secs(10), "handover took {took:?}");
    let _ = b.child.start_kill();
}
