//! A bounded soak: every component a real process (operator, payment,
//! kitchen, delivery, notification with a real SMTP server, the façade),
//! orders offered through the façade at a steady rate for a fixed time, a
//! share of them cancelled, then a drain. Reports how each process's
//! resident memory grew, the error counters on every admin port, failed
//! creates, the queues at the end and the orders that did not finish.
//! `make soak` (not in CI); docs/benchmarks.md has the figures.
//!
//! Settings (environment): `SOAK_RATE` orders/s (default 1),
//! `SOAK_DURATION` (default 10m), `SOAK_DRAIN` longest wait for the last
//! orders (default 3m), `SOAK_TIME_SCALE` for kitchen and delivery (default
//! 0.01: a 60 s pizza takes 0.6 s), `SOAK_CANCEL_EVERY` (default 20: every
//! 20th order is cancelled as soon as it is placed; 0 for none).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/procs/mod.rs"]
mod procs;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dishpatch_api::order::PaymentState;
use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_testkit::{TestNamespace, amqp_vhost, client, ensure_crds, fixtures};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use procs::{Proc, Spec, free_port, http_json, metric_sum};

const RESTAURANTS: usize = 4;
const COURIERS: usize = 24;

fn env_duration(name: &str, default: &str) -> Duration {
    let v = std::env::var(name).unwrap_or_else(|_| default.to_string());
    dishpatch_runtime::time::parse_duration(&v)
        .unwrap_or_else(|e| panic!("{name}={v:?} is not a duration: {e}"))
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
    })
}

#[derive(Default, Clone, Copy)]
struct Rss {
    start: u64,
    peak: u64,
    end: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let rate = env_f64("SOAK_RATE", 1.0);
    let duration = env_duration("SOAK_DURATION", "10m");
    let drain = env_duration("SOAK_DRAIN", "3m");
    let scale = env_f64("SOAK_TIME_SCALE", 0.01).to_string();
    let cancel_every = env_f64("SOAK_CANCEL_EVERY", 20.0) as u64;
    assert!(rate > 0.0, "SOAK_RATE must be positive");

    let client = client()
        .await
        .expect("a control plane: run `make up` (or hack/cluster.sh up)");
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "soak").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = std::env::temp_dir().join(format!("dishpatch-{}", ns.name));
    std::fs::create_dir_all(&work).unwrap();
    let ledger = work.join("ledger.jsonl");
    let log = work.join("components.log");

    // A real SMTP server that accepts and discards every e-mail.
    let (_smtp, smtp_port) = procs::smtp_sink();

    let key_file = work.join("jwt.key");
    std::fs::write(&key_file, format!("soak-key-{}-0123456789abcdef", ns.name)).unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: &ledger,
        log: Some(&log),
        // Retries are logged at info: the soak says why they happened.
        rust_log: "warn,dishpatch_worker=info",
    };
    let smtp_port_s = smtp_port.to_string();
    let listen_s = listen.to_string();
    let key_s = key_file.to_str().unwrap();
    let mut procs: Vec<Proc> = vec![
        spec.start("operator", &[]),
        spec.start("payment", &[]),
        spec.start("kitchen", &["--time-scale", &scale]),
        spec.start("delivery", &["--time-scale", &scale]),
        spec.start(
            "notification",
            &["--smtp-host", "127.0.0.1", "--smtp-port", &smtp_port_s],
        ),
        spec.start(
            "facade",
            &[
                "--listen",
                &listen_s,
                "--jwt-key-file",
                key_s,
                "--rate-limit",
                "1000",
                "--rate-burst",
                "1000",
            ],
        ),
    ];
    for i in 0..RESTAURANTS {
        ns.api::<Restaurant>()
            .create(
                &PostParams::default(),
                &fixtures::restaurant(&format!("r{i}"), true, None),
            )
            .await
            .unwrap();
    }
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
    let bearer = procs::customer_bearer(
        &key_file,
        "soak",
        "24h",
        &["--name", "Soak Test", "--email", "soak@example.com"],
    );

    println!(
        "dishpatch soak: {rate} orders/s for {duration:?} through the façade, time scale {scale}, \
         every {cancel_every}th cancelled, {RESTAURANTS} restaurants, {COURIERS} couriers; \
         logs in {}\n",
        log.display()
    );
    let mut rss = vec![Rss::default(); procs.len()];
    for (r, p) in rss.iter_mut().zip(&procs) {
        let kib = p.rss_kib().unwrap_or_default();
        *r = Rss {
            start: kib,
            peak: kib,
            end: kib,
        };
    }

    // Offer orders on a fixed schedule; each request runs on its own task so
    // a slow answer doesn't slow the rate.
    let counts = Arc::new(Counts::default());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // A late tick is made up for, so the rate holds when the machine stalls.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sample = tokio::time::interval(Duration::from_secs(5));
    let mut report = tokio::time::interval(Duration::from_secs(60));
    report.tick().await;
    let mut requests = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut offered = 0_u64;
    while started.elapsed() < duration {
        tokio::select! {
            _ = tick.tick() => {
                requests.spawn(offer(counts.clone(), listen, bearer.clone(), offered, cancel_every));
                offered += 1;
            }
            _ = sample.tick() => {
                for (r, p) in rss.iter_mut().zip(&procs) {
                    if let Some(kib) = p.rss_kib() {
                        r.peak = r.peak.max(kib);
                    }
                }
            }
            _ = report.tick() => {
                // Whether the platform keeps up: orders still on their way.
                // Listed on a task of its own, so a slow list never delays an offer.
                let (api, placed) = (ns.api::<Order>(), counts.placed.load(Ordering::Relaxed));
                let (at, offered) = (started.elapsed(), offered);
                requests.spawn(async move {
                    let open = api.list(&Default::default()).await.map_or(0, |l| {
                        l.items.iter().filter(|o| !phase(o).is_some_and(|p| p.is_terminal())).count()
                    });
                    println!(
                        "  {:>4.0}s: {offered} offered, {placed} placed, {open} not yet terminal",
                        at.as_secs_f64()
                    );
                });
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    while requests.join_next().await.is_some() {}
    let offering = started.elapsed();

    // Drain: wait for every order to end (or give up after SOAK_DRAIN).
    let orders: Api<Order> = ns.api();
    let drain_started = Instant::now();
    let mut last;
    loop {
        last = orders.list(&Default::default()).await.unwrap().items;
        for (r, p) in rss.iter_mut().zip(&procs) {
            if let Some(kib) = p.rss_kib() {
                r.peak = r.peak.max(kib);
            }
        }
        let open = last
            .iter()
            .filter(|o| !phase(o).is_some_and(|p| p.is_terminal()))
            .count();
        if open == 0 || drain_started.elapsed() > drain {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let drained = drain_started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (r, p) in rss.iter_mut().zip(&procs) {
        if let Some(kib) = p.rss_kib() {
            r.end = kib;
            r.peak = r.peak.max(kib);
        }
    }

    // What happened to the orders, and the money.
    let mut by_phase = BTreeMap::<String, usize>::new();
    for o in &last {
        *by_phase.entry(format!("{:?}", phase(o))).or_insert(0) += 1;
    }
    let not_terminal = last
        .iter()
        .filter(|o| !phase(o).is_some_and(|p| p.is_terminal()))
        .count();
    let ledger_entries: Vec<serde_json::Value> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let count = |uid: &str, kind: &str| {
        ledger_entries
            .iter()
            .filter(|e| e["orderUid"] == uid && e["kind"] == kind)
            .count()
    };
    let mut money_wrong = Vec::new();
    for o in &last {
        let uid = o.uid().unwrap_or_default();
        let paid = o
            .status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .is_some_and(|p| matches!(p.state, PaymentState::Succeeded | PaymentState::Refunded));
        let want_refund = paid && phase(o) == Some(OrderPhase::Cancelled);
        let (charges, refunds) = (count(&uid, "charge"), count(&uid, "refund"));
        if (paid && charges != 1) || refunds != usize::from(want_refund) {
            money_wrong.push(format!(
                "{} {:?}: {charges} charges, {refunds} refunds",
                o.name_any(),
                phase(o)
            ));
        }
    }

    println!(
        "\noffered {offered} orders in {:.0}s ({:.2}/s); {} placed, {} cancel requests accepted",
        offering.as_secs_f64(),
        offered as f64 / offering.as_secs_f64(),
        counts.placed.load(Ordering::Relaxed),
        counts.cancelled.load(Ordering::Relaxed)
    );
    println!("failed requests: {:?}", counts.failures.lock().unwrap());
    println!(
        "drained in {:.1}s; orders by phase: {by_phase:?}",
        drained.as_secs_f64()
    );
    println!("orders not terminal after the drain: {not_terminal}");
    println!(
        "charges/refunds that are not exactly one per paid order and one per cancelled paid order: {}{}",
        money_wrong.len(),
        if money_wrong.is_empty() {
            String::new()
        } else {
            format!(" {:?}", &money_wrong[..money_wrong.len().min(10)])
        }
    );

    println!("\n| process | RSS start MiB | peak MiB | end MiB | end − start MiB |");
    println!("| --- | --- | --- | --- | --- |");
    for (r, p) in rss.iter().zip(&procs) {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:+.1} |",
            p.name,
            mib(r.start),
            mib(r.peak),
            mib(r.end),
            mib(r.end) - mib(r.start)
        );
    }

    println!("\nerror counters on the admin ports:");
    for p in &mut procs {
        let alive = p.alive();
        let m = p.metrics().await;
        let line = match p.name.as_str() {
            "operator" => format!(
                "reconcile errors {}, events re-published {}, compensation failures {}",
                metric_sum(&m, "dishpatch_operator_reconcile_errors_total", &[]),
                metric_sum(&m, "dishpatch_operator_events_republished_total", &[]),
                metric_sum(&m, "dishpatch_operator_compensation_failures_total", &[]),
            ),
            "facade" => format!(
                "responses 5xx {}, 4xx {}",
                m.lines()
                    .filter(|l| !l.starts_with('#') && l.contains("code=\"5xx\""))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .fold(0.0, |a, b| a + b),
                m.lines()
                    .filter(|l| !l.starts_with('#') && l.contains("code=\"4xx\""))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .fold(0.0, |a, b| a + b),
            ),
            svc => {
                let fam = format!("dishpatch_{svc}_messages_total");
                format!(
                    "messages ok {}, retried {}, held {}, dead-lettered {}, poison {}",
                    metric_sum(&m, &fam, &["outcome=\"ok\""]),
                    metric_sum(&m, &fam, &["outcome=\"retried\""]),
                    metric_sum(&m, &fam, &["outcome=\"held\""]),
                    metric_sum(&m, &fam, &["outcome=\"failed\""]),
                    metric_sum(&m, &fam, &["outcome=\"poison\""]),
                )
            }
        };
        println!(
            "  {:<12} {}{line}",
            p.name,
            if alive { "" } else { "EXITED; " }
        );
    }

    println!("\nqueues at the end (messages ready, consumers):");
    let depths = procs::queue_depths(&amqp).await;
    for (q, n, c) in &depths {
        println!("  {q:<36} {n:>6} {c:>3}");
    }
    // What was dead-lettered, by event type and order phase now.
    for (q, n, _) in &depths {
        if !q.ends_with(".dead-letter") || *n == 0 {
            continue;
        }
        let mut what = BTreeMap::<String, usize>::new();
        for body in procs::take_all(&amqp, q).await {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let name = v["data"]["order"]["name"].as_str().unwrap_or_default();
            let now = last.iter().find(|o| o.name_any() == name).and_then(phase);
            *what
                .entry(format!(
                    "{} (order now {now:?})",
                    v["type"].as_str().unwrap_or("poison")
                ))
                .or_insert(0) += 1;
        }
        println!("  {q}: {what:?}");
    }
    for p in &mut procs {
        let _ = p.child.start_kill();
    }
    println!("\ncomponent logs: {}", log.display());
}

#[derive(Default)]
struct Counts {
    placed: AtomicU64,
    cancelled: AtomicU64,
    /// Failed requests by what failed (`create 503`).
    failures: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// Places order `i` through the façade (with an Idempotency-Key), and
/// cancels it at once if it is one of every `cancel_every`.
async fn offer(counts: Arc<Counts>, facade: SocketAddr, bearer: String, i: u64, cancel_every: u64) {
    let body = serde_json::json!({
        "restaurant": format!("r{}", i as usize % RESTAURANTS),
        "items": [{"menuItem": "pizza", "quantity": 1}, {"menuItem": "water", "quantity": 2}],
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    });
    let key = format!("soak-{i}");
    let fail = |what: String| {
        *counts.failures.lock().unwrap().entry(what).or_insert(0) += 1;
    };
    let auth = [("Authorization", bearer.as_str())];
    let headers = [auth[0], ("Idempotency-Key", key.as_str())];
    let id = match http_json(facade, "POST", "/api/v1/orders", &headers, &body).await {
        Ok((201 | 200, b)) => {
            counts.placed.fetch_add(1, Ordering::Relaxed);
            serde_json::from_str::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["id"].as_str().map(String::from))
        }
        Ok((code, _)) => {
            fail(format!("create {code}"));
            None
        }
        Err(e) => {
            fail(format!("create: {e}"));
            None
        }
    };
    let Some(id) = id else { return };
    if cancel_every == 0 || i % cancel_every != cancel_every - 1 {
        return;
    }
    let reason = serde_json::json!({"reason": "soak: changed my mind"});
    let path = format!("/api/v1/orders/{id}/cancel");
    match http_json(facade, "POST", &path, &auth, &reason).await {
        Ok((200 | 202, _)) => {
            counts.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        // Too late (already picked up) is an answer, not an error.
        Ok((409, _)) => {}
        Ok((code, _)) => fail(format!("cancel {code}")),
        Err(e) => fail(format!("cancel: {e}")),
    }
}

fn phase(o: &Order) -> Option<OrderPhase> {
    o.status.as_ref().and_then(|s| s.phase)
}
