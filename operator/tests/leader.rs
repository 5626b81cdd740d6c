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

/// The leader's connection to the apiserver stalls: its renewal hangs (the
/// client's read timeout is minutes). It must stop leading within the renew
/// deadline, before the standby takes the lease over, instead of going on as
/// a second leader once its requests flow again.
#[tokio::test]
async fn a_leader_whose_renewal_hangs_steps_down_in_time() {
    let bed = Bed::new("leader-hang").await;
    let proxy =
        dishpatch_testkit::FreezableProxy::start(dishpatch_testkit::apiserver_addr().unwrap())
            .await
            .unwrap();
    let kubeconfig = std::env::temp_dir().join(format!("{}-proxy.kubeconfig", bed.ns.name));
    dishpatch_testkit::kubeconfig_via(proxy.addr, &kubeconfig).unwrap();
    let lease = ["--lease-duration", "3s"];
    let mut a = bed.operator_via("replica-a", &lease, &kubeconfig);
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.ns.name);
    let (ok, _) = eventually(
        Duration::from_secs(20),
        || leases.get_opt("dishpatch-operator"),
        |l| holder(l).as_deref() == Some("replica-a"),
    )
    .await;
    assert!(ok, "replica-a leads");
    let b = bed.operator("replica-b", &lease);

    proxy.freeze(true);
    // Watch both: replica-a exiting (it gave up leading) and replica-b
    // holding the lease. The old leader must be gone first.
    let mut a_exited = None;
    let mut b_took_over = None;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) && b_took_over.is_none() {
        if a_exited.is_none() && a.child.try_wait().unwrap().is_some() {
            a_exited = Some(started.elapsed());
        }
        if holder(&leases.get_opt("dishpatch-operator").await).as_deref() == Some("replica-b") {
            b_took_over = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&kubeconfig);
    let b_took_over = b_took_over.expect("the standby took the lease over");
    match a_exited {
        Some(a_exited) => assert!(
            a_exited <= b_took_over,
            "replica-a stepped down at {a_exited:?}, after replica-b took over at {b_took_over:?}"
        ),
        None => {
            panic!("replica-a still runs as leader although replica-b took over at {b_took_over:?}")
        }
    }
    drop(b);
}
