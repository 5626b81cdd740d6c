//! How fast the operator accepts orders, and how many apiserver writes each
//! accepted order costs. Runs a real operator (release build) against the
//! real local control plane and RabbitMQ: `make bench`.
//!
//! Writes are counted by the apiserver itself (`apiserver_request_total`):
//! updates of Orders and Restaurants (the finalizer patch, status applies,
//! Restaurant status updates) and Kubernetes Events. The apiserver counts
//! everyone's requests, so run it with nothing else using the control plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dishpatch_api::{Order, OrderPhase};
use dishpatch_testkit::apiserver::{self, Write};
use dishpatch_testkit::{
    TestNamespace, amqp_vhost, client, ensure_crds, fixtures, kubeconfig_path,
};
use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

const ORDERS: usize = 300;
const IN_FLIGHT: usize = 32;

/// The operator's writes as the apiserver counts them: updates of orders
/// and restaurants (creations and deletions are the benchmark's, or
/// namespace cleanup's) and Events.
async fn operator_writes(client: &Client) -> BTreeMap<Write, f64> {
    let mut all = apiserver::writes(client).await.expect("apiserver /metrics");
    all.retain(|w, _| {
        let base = w.resource.split('/').next().unwrap_or("");
        match base {
            "orders" | "restaurants" => matches!(w.verb.as_str(), "PUT" | "PATCH" | "APPLY"),
            "events" => matches!(w.verb.as_str(), "POST" | "PATCH"),
            _ => false,
        }
    });
    all
}

struct Figures {
    seconds: f64,
    accepted: usize,
    writes: BTreeMap<Write, f64>,
}

async fn scenario(client: &Client, name: &str, stock: Option<i64>) -> Figures {
    let ns = TestNamespace::create(client, &format!("bench-{name}"))
        .await
        .unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_dishpatch-operator"))
        .args([
            "run",
            "--namespace",
            &ns.name,
            "--amqp-url",
            &amqp,
            "--admin-addr",
            "127.0.0.1:0",
            "--concurrency",
            "16",
        ])
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let orders: Api<Order> = ns.api();
    ns.api::<dishpatch_api::Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("roma", true, stock),
        )
        .await
        .unwrap();
    // Let the operator take the lease and sync before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let before = operator_writes(client).await;
    let started = Instant::now();
    futures::stream::iter(0..ORDERS)
        .map(|i| {
            let orders = orders.clone();
            async move {
                orders
                    .create(
                        &PostParams::default(),
                        &fixtures::order(&format!("o{i}"), "roma", &[("pizza", 1)]),
                    )
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let accepted = loop {
        let list = orders.list(&ListParams::default()).await.unwrap();
        let accepted = list
            .items
            .iter()
            .filter(|o| o.status.as_ref().and_then(|s| s.phase) == Some(OrderPhase::Accepted))
            .count();
        if accepted == ORDERS || started.elapsed() > Duration::from_secs(300) {
            break accepted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    // Trailing writes (events series, the last status applies) land now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = operator_writes(client).await;
    let _ = operator.start_kill();
    let writes = apiserver::delta(&before, &after);
    Figures {
        seconds,
        accepted,
        writes,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let client = client()
        .await
        .expect("a control plane: run `make up` or `make bench`");
    ensure_crds(&client).await.unwrap();
    println!(
        "dishpatch operator acceptance benchmark: {ORDERS} orders per scenario, {IN_FLIGHT} creations in flight\n"
    );
    let mut rows = Vec::new();
    for (name, stock) in [("stock-limited", Some(ORDERS as i64)), ("unlimited", None)] {
        let f = scenario(&client, name, stock).await;
        let total: f64 = f.writes.values().sum();
        let per = total / f.accepted.max(1) as f64;
        println!(
            "{name:>14}: {}/{ORDERS} accepted in {:.2}s = {:.1} orders/s; {:.2} apiserver writes per accepted order",
            f.accepted,
            f.seconds,
            f.accepted as f64 / f.seconds,
            per
        );
        for (k, v) in &f.writes {
            println!(
                "{:>16}{k}: {:.2} per order",
                "",
                v / f.accepted.max(1) as f64
            );
        }
        rows.push((name, f.accepted as f64 / f.seconds, per));
    }
    if let [(_, a, wa), (_, b, wb)] = rows.as_slice() {
        println!(
            "\nstock-limited vs unlimited in this run: {:.2}x the throughput, {:.2}x the writes",
            a / b,
            wa / wb
        );
    }
}
