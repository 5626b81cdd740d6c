//! End-to-end throughput and latency: orders per second from creation to
//! Delivered, and p50/p99 creation-to-delivered latency, with every
//! component a real release-built process at time scale zero. `make bench`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_testkit::{
    TestNamespace, amqp_vhost, binary, client, ensure_crds, fixtures, kubeconfig_path,
};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;

const ORDERS: usize = 400;
const COURIERS: usize = 40;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let client = client()
        .await
        .expect("a control plane: run `make up` or `make bench`");
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "bench-e2e").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let ledger = std::env::temp_dir().join(format!("{}-ledger.jsonl", ns.name));
    let mut procs = Vec::new();
    for (component, extra) in [
        (
            "operator",
            vec!["--namespace", &ns.name, "--concurrency", "32"],
        ),
        (
            "payment",
            vec![
                "--gateway",
                "simulated",
                "--ledger",
                ledger.to_str().unwrap(),
            ],
        ),
        (
            "kitchen",
            vec!["--namespace", &ns.name, "--time-scale", "0"],
        ),
        (
            "delivery",
            vec![
                "--namespace",
                &ns.name,
                "--time-scale",
                "0",
                "--auto-accept",
            ],
        ),
    ] {
        let path = binary(&format!("dishpatch-{component}"));
        assert!(
            path.exists(),
            "{} missing: `cargo build --release --workspace --bins` first (make bench does)",
            path.display()
        );
        procs.push(
            tokio::process::Command::new(path)
                .arg("run")
                .args(["--amqp-url", &amqp, "--admin-addr", "127.0.0.1:0"])
                .args(extra)
                .env("KUBECONFIG", kubeconfig_path())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    ns.api::<Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("roma", true, None),
        )
        .await
        .unwrap();
    let couriers: Api<Courier> = ns.api();
    for i in 0..COURIERS {
        let c: Courier = serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
            "metadata": {"name": format!("c{i}")},
            "spec": {"displayName": "C", "zone": "mitte", "onShift": true, "vehicle": "Bicycle"}
        }))
        .unwrap();
        couriers.create(&PostParams::default(), &c).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Watch first, so no delivery is observed late.
    let orders: Api<Order> = ns.api();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch = tokio::spawn(
        watcher(orders.clone(), watcher::Config::default()).try_for_each(move |event| {
            let tx = tx.clone();
            async move {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = event
                    && o.status.as_ref().and_then(|s| s.phase) == Some(OrderPhase::Delivered)
                {
                    let _ = tx.send((o.metadata.name.unwrap_or_default(), Instant::now()));
                }
                Ok(())
            }
        }),
    );

    println!(
        "dishpatch end-to-end benchmark: {ORDERS} orders, {COURIERS} couriers, time scale 0\n"
    );
    let started = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..ORDERS)
        .map(|i| {
            let orders = orders.clone();
            async move {
                let name = format!("o{i}");
                let at = Instant::now();
                orders
                    .create(
                        &PostParams::default(),
                        &fixtures::order(&name, "roma", &[("pizza", 1)]),
                    )
                    .await
                    .unwrap();
                (name, at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut delivered: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while delivered.len() < ORDERS && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(c) = created.get(&name) {
                    delivered.entry(name).or_insert(at.duration_since(*c));
                }
            }
            _ => break,
        }
    }
    let elapsed = started.elapsed();
    watch.abort();
    for p in &mut procs {
        let _ = p.start_kill();
    }
    let mut latencies: Vec<Duration> = delivered.values().copied().collect();
    latencies.sort();
    assert!(!latencies.is_empty(), "nothing was delivered");
    println!(
        "{}/{ORDERS} delivered in {:.2}s = {:.1} orders/s to Delivered",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "creation → Delivered latency: p50 {:.0} ms, p99 {:.0} ms (p99/p50 = {:.1}x), max {:.0} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64()
            / percentile(&latencies, 0.50).as_secs_f64().max(1e-9),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
}
