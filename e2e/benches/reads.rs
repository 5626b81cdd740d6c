//! Façade reads (issue 10, goal 8): `GET /api/v1/orders/{id}` from the
//! façade's watch cache, as a customer's app polls it, requests per second
//! and latency p50/p99 over keep-alive connections:
//!
//! 1. idle: 1,000 stored orders, nothing else moving;
//! 2. while orders are written: the same, with new orders created at
//!    `WRITE_RATE` and the operator, payment, kitchen and delivery (time
//!    scale 0) writing each one's status through to Delivered, so the
//!    façade's watch applies a stream of changes while it serves.
//!
//! The ratio of the two runs is measured in one process.
//!
//!   cargo bench -p dishpatch-e2e --bench reads           (release builds: make bench)

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/procs/mod.rs"]
mod procs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_testkit::{TestNamespace, amqp_vhost, binary, client, ensure_crds, fixtures};
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, PostParams};
use procs::{Spec, free_port};

const STORED: usize = 1_000;
const CONNECTIONS: usize = 16;
const RUN: Duration = Duration::from_secs(15);
/// Orders created per second during the second run.
const WRITE_RATE: f64 = 10.0;
const COURIERS: usize = 40;

struct Figures {
    requests: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

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

/// `CONNECTIONS` clients, each sending its next GET as the last one
/// answers, for `RUN`.
async fn read_load(facade: SocketAddr, bearer: &str, ids: &[String]) -> Figures {
    let http: HttpClient<_, Empty<Bytes>> = HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONNECTIONS)
        .build_http();
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (http, errors, bearer) = (http.clone(), errors.clone(), bearer.to_string());
        let ids: Vec<String> = ids.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c * 7919;
            while started.elapsed() < RUN {
                i = (i + 104_729) % ids.len();
                let req = Request::get(format!("http://{facade}/api/v1/orders/{}", ids[i]))
                    .header("authorization", &bearer)
                    .body(Empty::new())
                    .unwrap();
                let sent = Instant::now();
                match http.request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                        latencies.push(sent.elapsed());
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    Figures {
        requests: all.len(),
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

async fn create_orders(orders: &Api<Order>, prefix: &str, n: usize) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| {
            let orders = orders.clone();
            let name = format!("{prefix}-{i}");
            async move {
                orders
                    .create(
                        &PostParams::default(),
                        &fixtures::order(&name, "roma", &[("pizza", 1)]),
                    )
                    .await
                    .unwrap();
                name
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

#[tokio::main]
async fn main() {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "bench-reads").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = dishpatch_testkit::cache_dir().join("bench-reads");
    std::fs::create_dir_all(&work).unwrap();
    let ledger = work.join(format!("{}.ledger", ns.name));
    let key_file = work.join("jwt.key");
    std::fs::write(&key_file, format!("reads-key-{}-0123456789abcdef", ns.name)).unwrap();

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
    let orders: Api<Order> = ns.api();
    // Stored before the façade starts: it lists them into its cache.
    let ids = create_orders(&orders, "stored", STORED).await;

    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: &ledger,
        log: None,
        rust_log: "warn",
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen_s = listen.to_string();
    let key_s = key_file.to_str().unwrap();
    // Polling clients would hit the per-subject limit: lifted, as for a load test.
    let facade = spec.start(
        "facade",
        &[
            "--listen",
            &listen_s,
            "--jwt-key-file",
            key_s,
            "--rate-limit",
            "1000000",
            "--rate-burst",
            "1000000",
        ],
    );
    facade.wait_ready(Duration::from_secs(60)).await;
    let token = {
        let out = std::process::Command::new(binary("dishpatch-facade"))
            .args([
                "token", "--role", "customer", "--sub", "cust-1", "--ttl", "1h",
            ])
            .arg("--key-file")
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let bearer = format!("Bearer {token}");
    // The cache holds every stored order before the clock starts.
    let last = format!("http://{listen}/api/v1/orders/{}", ids[ids.len() - 1]);
    let probe: HttpClient<_, Empty<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = Request::get(&last)
            .header("authorization", &bearer)
            .body(Empty::new())
            .unwrap();
        if probe
            .request(req)
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the façade never served {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let idle = read_load(listen, &bearer, &ids).await;

    // The pipeline, then orders flowing through it while the reads run.
    let pipeline = [
        spec.start("operator", &[]),
        spec.start("payment", &[]),
        spec.start("kitchen", &[]),
        spec.start("delivery", &[]),
    ];
    for p in &pipeline {
        p.wait_ready(Duration::from_secs(60)).await;
    }
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (orders, writing) = (orders.clone(), writing.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / WRITE_RATE));
            let mut names = Vec::new();
            let mut i = 0;
            while writing.load(Ordering::Relaxed) {
                tick.tick().await;
                let name = format!("live-{i}");
                i += 1;
                let orders = orders.clone();
                let n = name.clone();
                tokio::spawn(async move {
                    let _ = orders
                        .create(
                            &PostParams::default(),
                            &fixtures::order(&n, "roma", &[("pizza", 1)]),
                        )
                        .await;
                });
                names.push(name);
            }
            names
        })
    };
    // Let the first orders reach the stages before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = read_load(listen, &bearer, &ids).await;
    writing.store(false, Ordering::Relaxed);
    let placed = writer.await.unwrap();
    let mut delivered = 0;
    for name in &placed {
        if let Ok(o) = orders.get(name).await
            && o.status.and_then(|s| s.phase) == Some(OrderPhase::Delivered)
        {
            delivered += 1;
        }
    }

    println!();
    println!(
        "façade reads: GET /api/v1/orders/{{id}} over {CONNECTIONS} keep-alive connections, {} s each, {STORED} stored orders",
        RUN.as_secs()
    );
    println!();
    println!("| run | requests | requests/s | p50 | p99 | errors |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (what, f) in [
        ("idle", &idle),
        (
            &*format!(
                "while {WRITE_RATE}/s orders are written (placed {}, {delivered} Delivered by the end)",
                placed.len()
            ),
            &busy,
        ),
    ] {
        println!(
            "| {what} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            f.requests,
            f.rps,
            ms(f.p50),
            ms(f.p99),
            f.errors
        );
    }
    println!();
    println!(
        "while writing ÷ idle: requests/s {:.2}, p99 {:.2}",
        busy.rps / idle.rps,
        ms(busy.p99) / ms(idle.p99).max(f64::EPSILON)
    );
    drop(pipeline);
    drop(facade);
}
