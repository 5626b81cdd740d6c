//! Faults as tests (docs/faults.md): the kube-apiserver, etcd and RabbitMQ
//! go away in the middle of a flow, and the operator leader dies, while
//! every component runs as a real process. Nothing may be lost: every order
//! ends Delivered, charged once and never refunded.
//!
//! The faults hit a private control plane and broker of this test's own
//! (`private_cluster`), never the shared one other tests use.
//!
//!   cargo test -p dishpatch-e2e --test faults -- --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod private_cluster;

use std::time::{Duration, Instant};

use hyper::StatusCode;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use private_cluster::{Bed, Follower, LEASE, Reply, Scenario, begin};

/// Simulated durations a hundredth of real ones: an order takes about
/// 5 s (a 0.6 s pizza, a 3.6 s ride), so many are under way when a fault hits.
const SCALE: &str = "0.01";
const ORDERS: usize = 30;
/// Orders followed live over server-sent events.
const FOLLOWED: usize = 8;
const DRAIN: Duration = Duration::from_secs(120);
/// How long after a restarted apiserver is ready the façade's watch may
/// still be listing again: its retry cap (2 s, with jitter) and the list.
const RELIST: Duration = Duration::from_secs(5);

/// Places orders at a steady rate, the last few followed live from their
/// creation on: when this returns, orders are in every phase, and the
/// followed ones are still under way.
async fn flow(bed: &Bed, orders: usize) -> Vec<Follower> {
    bed.place(0, orders - FOLLOWED, 10.0).await;
    let mut followers = Vec::new();
    for i in orders - FOLLOWED..orders {
        bed.place(i, i + 1, 10.0).await;
        followers.push(Follower::start(bed, i).await);
    }
    let census = bed.census().await;
    let terminal = census.get("Delivered").copied().unwrap_or(0);
    assert!(
        terminal < orders,
        "every order finished before the fault: nothing in flight ({census:?})"
    );
    eprintln!("faults: in flight when the fault hits: {census:?}");
    followers
}

/// Every follower drops its connection and reconnects with `Last-Event-ID`
/// while the fault lasts; waits until all have.
async fn reconnect_all(followers: &[Follower]) {
    let before: Vec<u32> = followers.iter().map(Follower::reconnects).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for f in followers {
        f.cut();
    }
    let started = Instant::now();
    while followers
        .iter()
        .zip(&before)
        .any(|(f, b)| f.reconnects() <= *b)
    {
        let behind: Vec<&str> = followers
            .iter()
            .zip(&before)
            .filter(|(f, b)| f.reconnects() <= **b)
            .map(|(f, _)| f.order.as_str())
            .collect();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SSE clients of {behind:?} did not reconnect during the fault (their orders done already?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn retry_after(r: &Reply) -> Option<u64> {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// While the order store is down, placing an order is a 503 with a
/// Retry-After (a number of seconds), never a hang or a 500.
async fn assert_unavailable(bed: &Bed, token: &str, key: &str) {
    let started = Instant::now();
    let r = bed
        .facade
        .call(
            hyper::Method::POST,
            "/api/v1/orders",
            token,
            &[("idempotency-key", key)],
            Some(order_body()),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "placing an order during the fault: {}",
        r.body
    );
    let secs = retry_after(&r);
    assert!(
        secs.is_some_and(|s| s >= 1),
        "503 without a Retry-After in seconds: {:?}",
        r.headers
    );
    eprintln!(
        "faults: façade answered 503, Retry-After {} s, in {:.2} s",
        secs.unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
}

fn order_body() -> serde_json::Value {
    serde_json::json!({
        "restaurant": "roma",
        "items": [{"menuItem": "water", "quantity": 1}],
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    })
}

/// The customer retries the order the fault refused, with the same
/// Idempotency-Key, once the fault is over (as Retry-After says): it is
/// placed exactly once, whatever the first attempt did.
async fn retry_placement(bed: &Bed, token: &str, key: &str) {
    let started = Instant::now();
    loop {
        let r = bed
            .facade
            .call(
                hyper::Method::POST,
                "/api/v1/orders",
                token,
                &[("idempotency-key", key)],
                Some(order_body()),
            )
            .await
            .unwrap();
        match r.status {
            StatusCode::CREATED | StatusCode::OK => return,
            StatusCode::SERVICE_UNAVAILABLE if started.elapsed() < Duration::from_secs(60) => {
                let wait = retry_after(&r).unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            other => panic!("retrying the refused order: {other} {}", r.body),
        }
    }
}

/// The shared shape of the store faults: flow, fault (`stop`), checks while
/// it lasts, recovery (`start`), drain, nothing lost.
async fn store_fault(s: &Scenario, name: &str, stop: &str, down_for: Duration) {
    let bed = Bed::new(s, name, SCALE, ORDERS).await;
    let token = bed.facade.token("cust-late").await;
    let key = format!("{name}-during-the-fault");
    let followers = flow(&bed, ORDERS).await;

    let down = Instant::now();
    // The live-tracking clients lose their connections as the fault
    // begins, and reconnect while it lasts.
    tokio::join!(s.cluster.stop(stop), reconnect_all(&followers));
    eprintln!(
        "faults: {name}: {stop} stopped (SIGTERM) in {:.1} s",
        down.elapsed().as_secs_f64()
    );
    assert_unavailable(&bed, &token, &key).await;
    tokio::time::sleep(down_for.saturating_sub(down.elapsed())).await;

    let restarting = Instant::now();
    s.cluster.start_control_plane().await;
    // A restarted apiserver starts its watch cache afresh, so the façade's
    // watch lists again.
    let relisted = (stop == "kube-apiserver").then(|| (restarting, Instant::now() + RELIST));
    eprintln!(
        "faults: {name}: {stop} started and ready in {:.1} s",
        restarting.elapsed().as_secs_f64()
    );
    eprintln!(
        "faults: {name}: {stop} back after {:.1} s down",
        down.elapsed().as_secs_f64()
    );
    retry_placement(&bed, &token, &key).await;
    let drained = bed.drain(DRAIN).await;
    eprintln!(
        "faults: {name}: drained {} orders in {:.1} s after {stop} came back",
        ORDERS + 1,
        drained.as_secs_f64()
    );
    bed.assert_nothing_lost(ORDERS + 1).await;
    for f in followers {
        f.assert_saw_every_transition(&bed.truth, relisted).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stops_for_10_s_mid_flow() {
    let s = begin("apiserver").await;
    store_fault(&s, "apiserver", "kube-apiserver", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarts_mid_flow() {
    let s = begin("etcd").await;
    store_fault(&s, "etcd", "etcd", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarts_mid_flow() {
    let s = begin("rabbitmq").await;
    let bed = Bed::new(&s, "rabbitmq", SCALE, ORDERS).await;
    let token = bed.facade.token("cust-late").await;
    let followers = flow(&bed, ORDERS).await;

    let down = Instant::now();
    tokio::join!(s.cluster.rabbitmq_down(), reconnect_all(&followers));
    eprintln!(
        "faults: rabbitmq: stopped in {:.1} s",
        down.elapsed().as_secs_f64()
    );
    // The façade needs no broker: orders are still taken.
    let placed = bed.facade.place(&token).await.unwrap();
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.body);
    s.cluster.rabbitmq_up().await;
    eprintln!(
        "faults: rabbitmq: back after {:.1} s down",
        down.elapsed().as_secs_f64()
    );
    let drained = bed.drain(DRAIN).await;
    eprintln!(
        "faults: rabbitmq restart: drained {} orders in {:.1} s after the broker came back",
        ORDERS + 1,
        drained.as_secs_f64()
    );
    bed.assert_nothing_lost(ORDERS + 1).await;
    for f in followers {
        f.assert_saw_every_transition(&bed.truth, None).await;
    }
}

fn holder(l: &Option<Lease>) -> Option<String> {
    l.as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

/// Polls the Lease until someone other than `old` holds it; returns who and when.
async fn await_takeover(leases: &Api<Lease>, old: &str, since: Instant) -> (String, Duration) {
    loop {
        if let Ok(l) = leases.get_opt("dishpatch-operator").await
            && let Some(h) = holder(&l)
            && h != old
        {
            return (h, since.elapsed());
        }
        assert!(
            since.elapsed() < LEASE * 3,
            "nobody took the lease over from {old}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The replica (`a` or `b`) an identity `op-a-3` belongs to.
fn replica(identity: &str) -> &str {
    identity.split('-').nth(1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_leader_dies_while_50_orders_flow() {
    let s = begin("leader").await;
    let bed = Bed::new(&s, "leader", SCALE, 50).await;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.ns);
    // The standby's retry period (client-go's): it polls the lease this often.
    let retry = LEASE / 5;

    for (signal, from, to) in [("KILL", 0, 50), ("TERM", 50, 70)] {
        let started = Instant::now();
        let leader = loop {
            if let Some(h) = holder(&leases.get_opt("dishpatch-operator").await.unwrap()) {
                break h;
            }
            assert!(started.elapsed() < LEASE * 2, "nobody leads");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let placing = bed.place(from, to, 10.0);
        let kill = async {
            // Orders in every phase by now.
            tokio::time::sleep(Duration::from_secs(2)).await;
            bed.proc(&format!("operator-{}", replica(&leader)))
                .signal(signal);
            let at = Instant::now();
            let census = bed.census().await;
            (at, census)
        };
        let ((killed_at, census), ()) = tokio::join!(kill, placing);
        let (new, took) = await_takeover(&leases, &leader, killed_at).await;
        eprintln!(
            "faults: operator leader SIG{signal}: {leader} → {new} took over in {:.1} s (lease {} s; in flight: {census:?})",
            took.as_secs_f64(),
            LEASE.as_secs()
        );
        // A crash: the lease runs out first (the standby measures it from when
        // it saw the last renewal, polling every retry period). A SIGTERM:
        // the leader gives the lease up and the standby's next poll takes it.
        let bound = match signal {
            "KILL" => LEASE + retry * 2,
            _ => retry * 2,
        };
        assert!(
            took <= bound,
            "SIG{signal}: takeover took {took:?}, more than {bound:?}"
        );
        let drained = bed.drain(DRAIN).await;
        eprintln!(
            "faults: operator leader SIG{signal}: drained {to} orders in {:.1} s after the takeover",
            drained.as_secs_f64()
        );
        bed.assert_nothing_lost(to).await;
    }
}
