//! End to end, every component a real process at time scale zero (operator,
//! payment, kitchen, delivery, notification with a real SMTP sink):
//!
//! 1. a burst of orders: orders per second to Delivered, and the API writes
//!    each delivered order cost, per resource and verb, as the apiserver
//!    counts them (`apiserver_request_total`);
//! 2. steady load at half the burst's rate for 60 s: creation → Delivered
//!    p50 and p99, and per stage hop (accepted, paid, preparing, ready, out
//!    for delivery, delivered).
//!
//! `make bench` (release builds); run it alone on the control plane: the
//! apiserver counts everyone's requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/procs/mod.rs"]
mod procs;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_testkit::apiserver::{self, Write};
use dishpatch_testkit::{TestNamespace, amqp_vhost, client, ensure_crds, fixtures};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use procs::Spec;

const BURST: usize = 200;
const COURIERS: usize = 40;
const STEADY: Duration = Duration::from_secs(60);

/// The phases an order passes on the happy path after creation, in order.
const HOPS: [OrderPhase; 6] = [
    OrderPhase::Accepted,
    OrderPhase::Paid,
    OrderPhase::Preparing,
    OrderPhase::Ready,
    OrderPhase::OutForDelivery,
    OrderPhase::Delivered,
];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// When each order was first seen in each phase.
type Seen = Arc<Mutex<HashMap<String, BTreeMap<OrderPhase, Instant>>>>;

/// The writes orders cause: to dishpatch's resources, Events and ConfigMaps
/// (the kitchen's ticket rails). Not leases (leader election and node
/// heartbeats run whether or not orders flow) and not deletions (namespace
/// cleanup of earlier runs; orders are deleted a retention period later).
async fn order_writes(client: &Client) -> BTreeMap<Write, f64> {
    let mut all = apiserver::writes(client).await.expect("apiserver /metrics");
    all.retain(|w, _| {
        let base = w.resource.split('/').next().unwrap_or("");
        matches!(
            base,
            "orders" | "restaurants" | "couriers" | "events" | "configmaps"
        ) && w.verb != "DELETE"
    });
    all
}

/// Creates `names` at most `in_flight` at a time, or one every `every`;
/// returns when each was created.
async fn place(
    orders: &Api<Order>,
    names: Vec<String>,
    every: Option<Duration>,
) -> HashMap<String, Instant> {
    let mut created = HashMap::new();
    match every {
        None => {
            created = futures::stream::iter(names)
                .map(|name| {
                    let orders = orders.clone();
                    async move {
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
        }
        Some(every) => {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = tokio::task::JoinSet::new();
            for name in names {
                tick.tick().await;
                let orders = orders.clone();
                tasks.spawn(async move {
                    let at = Instant::now();
                    orders
                        .create(
                            &PostParams::default(),
                            &fixtures::order(&name, "roma", &[("pizza", 1)]),
                        )
                        .await
                        .unwrap();
                    (name, at)
                });
            }
            while let Some(r) = tasks.join_next().await {
                let (name, at) = r.unwrap();
                created.insert(name, at);
            }
        }
    }
    created
}

/// Waits until every one of `names` was seen Delivered (or `limit` passes).
async fn delivered(seen: &Seen, names: &HashMap<String, Instant>, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let done = {
            let seen = seen.lock().unwrap();
            names
                .keys()
                .filter(|n| {
                    seen.get(*n)
                        .is_some_and(|p| p.contains_key(&OrderPhase::Delivered))
                })
                .count()
        };
        if done == names.len() || Instant::now() > deadline {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let client = client()
        .await
        .expect("a control plane: run `make up` or `make bench`");
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "bench-e2e").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&work).unwrap();
    let ledger = work.join("ledger.jsonl");

    // A real SMTP server that accepts and discards every e-mail.
    let (_smtp, smtp_port) = procs::smtp_sink();
    let smtp_port = smtp_port.to_string();
    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: &ledger,
        log: None,
        rust_log: "warn",
    };
    let procs = [
        spec.start("operator", &["--concurrency", "32"]),
        spec.start("payment", &[]),
        spec.start("kitchen", &[]),
        spec.start("delivery", &[]),
        spec.start(
            "notification",
            &["--smtp-host", "127.0.0.1", "--smtp-port", &smtp_port],
        ),
    ];
    ns.api::<Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("roma", true, None),
        )
        .await
        .unwrap();
    let couriers: Api<Courier> = ns.api();
    for i in 0..COURIERS {
        couriers
            .create(
                &PostParams::default(),
                &fixtures::courier(&format!("c{i}"), "mitte", true),
            )
            .await
            .unwrap();
    }
    for p in &procs {
        p.wait_ready(Duration::from_secs(60)).await;
    }

    // Watch first, so no phase is observed late.
    let orders: Api<Order> = ns.api();
    let seen: Seen = Arc::default();
    let watch = tokio::spawn({
        let seen = seen.clone();
        watcher(orders.clone(), watcher::Config::default()).try_for_each(move |event| {
            let seen = seen.clone();
            async move {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = event
                    && let Some(phase) = o.status.as_ref().and_then(|s| s.phase)
                {
                    let now = Instant::now();
                    seen.lock()
                        .unwrap()
                        .entry(o.metadata.name.unwrap_or_default())
                        .or_default()
                        .entry(phase)
                        .or_insert(now);
                }
                Ok(())
            }
        })
    });

    println!(
        "dishpatch end-to-end benchmark: {BURST} orders in a burst, then {}s at half its rate; {COURIERS} couriers, time scale 0\n",
        STEADY.as_secs()
    );

    // 1. The burst: the most the platform delivers, and what each order costs.
    let before = order_writes(&client).await;
    let started = Instant::now();
    let names = (0..BURST).map(|i| format!("b{i}")).collect();
    let created = place(&orders, names, None).await;
    let finished = delivered(&seen, &created, Duration::from_secs(600)).await;
    let elapsed = finished.duration_since(started);
    // Trailing writes (the last notifications, kitchen rail commits) land now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = apiserver::delta(&before, &order_writes(&client).await);
    let done = count_delivered(&seen, &created);
    let rate = done as f64 / elapsed.as_secs_f64();
    println!(
        "burst: {done}/{BURST} delivered in {:.2}s = {rate:.1} orders/s to Delivered",
        elapsed.as_secs_f64()
    );
    let per_order = |v: f64| v / done.max(1) as f64;
    let succeeded: f64 = writes
        .iter()
        .filter(|(k, _)| k.succeeded())
        .map(|(_, v)| v)
        .sum();
    println!(
        "API writes per delivered order: {:.2} (2xx), by resource and verb:",
        per_order(succeeded)
    );
    println!("| write | per order |\n| --- | --- |");
    for (k, v) in &writes {
        println!("| {k} | {:.2} |", per_order(*v));
    }

    // 2. Steady load at half the burst's rate: latency when not saturated.
    let half = (rate / 2.0).max(0.5);
    let every = Duration::from_secs_f64(1.0 / half);
    let count = (STEADY.as_secs_f64() * half).round() as usize;
    let names = (0..count).map(|i| format!("s{i}")).collect();
    let created = place(&orders, names, Some(every)).await;
    delivered(&seen, &created, Duration::from_secs(300)).await;
    watch.abort();
    let seen = seen.lock().unwrap().clone();
    let mut total = Vec::new();
    let mut hops: BTreeMap<OrderPhase, Vec<Duration>> = BTreeMap::new();
    for (name, at) in &created {
        let Some(phases) = seen.get(name) else {
            continue;
        };
        if let Some(d) = phases.get(&OrderPhase::Delivered) {
            total.push(d.duration_since(*at));
        }
        // Each hop from the previous phase seen (a watch may fold two).
        let mut prev = *at;
        for hop in HOPS {
            if let Some(t) = phases.get(&hop) {
                hops.entry(hop).or_default().push(t.duration_since(prev));
                prev = *t;
            }
        }
    }
    total.sort();
    println!(
        "\nsteady: {count} orders at {half:.1}/s for {}s; {}/{count} delivered",
        STEADY.as_secs(),
        total.len()
    );
    println!("| hop | seen | p50 ms | p99 ms |\n| --- | --- | --- | --- |");
    for hop in HOPS {
        let mut v = hops.remove(&hop).unwrap_or_default();
        v.sort();
        println!(
            "| → {hop} | {} | {:.0} | {:.0} |",
            v.len(),
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.99))
        );
    }
    println!(
        "| creation → Delivered | {} | {:.0} | {:.0} |",
        total.len(),
        ms(percentile(&total, 0.5)),
        ms(percentile(&total, 0.99))
    );
    drop(procs);
}

fn count_delivered(seen: &Seen, names: &HashMap<String, Instant>) -> usize {
    let seen = seen.lock().unwrap();
    names
        .keys()
        .filter(|n| {
            seen.get(*n)
                .is_some_and(|p| p.contains_key(&OrderPhase::Delivered))
        })
        .count()
}
