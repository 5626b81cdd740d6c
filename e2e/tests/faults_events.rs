//! Faults as tests, part 2: a worker's storage fails, events arrive out of
//! order or for orders that are gone, and a flood of orders no restaurant
//! takes. Each scenario is its own test against the real processes in its
//! own namespace and vhost, bounded in time, and checks that nothing is
//! lost: every order ends in a terminal phase, each paid order is charged
//! once, and only orders called off are refunded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod procs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Platform, kinds, phase};
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::transition_allowed;
use dishpatch_api::order::PaymentState;
use dishpatch_api::{Order, OrderPhase};
use dishpatch_testkit::fixtures;
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::watcher;
use procs::{Spec, metric_sum};

const T: Duration = Duration::from_secs(60);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn spec(p: &Platform) -> Spec<'_> {
    Spec {
        namespace: &p.ns.name,
        amqp_url: &p.amqp_url,
        ledger: &p.ledger,
        log: None,
        rust_log: "warn",
    }
}

fn payment_state(o: &Order) -> Option<PaymentState> {
    o.status
        .as_ref()
        .and_then(|s| s.payment.as_ref())
        .map(|p| p.state)
}

fn order_ref(p: &Platform, o: &Order) -> OrderRef {
    OrderRef {
        namespace: p.ns.name.clone(),
        name: o.name_any(),
        uid: o.uid().unwrap(),
    }
}

async fn publish(p: &Platform, kind: EventType, r: &OrderRef) {
    let e = CloudEvent::new(
        kind,
        "faults-test",
        r.clone(),
        None,
        jiff::Timestamp::now().to_string(),
    );
    p.broker.publish(&e, TRACEPARENT).await.unwrap();
}

/// A small tmpfs of its own that can be switched read-only. Root ignores
/// file modes, so `chmod` would not stop a write; a read-only mount does
/// (EROFS for root too). Unmounted on drop, also when the test panics.
struct Disk {
    dir: PathBuf,
}

fn sh(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Disk {
    fn mount(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dishpatch-disk-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=4m",
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Self { dir }
    }

    fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        sh("mount", &["-o", opt, self.dir.to_str().unwrap()]);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn dead_lettered(depths: &[(String, u32, u32)]) -> Vec<(String, u32)> {
    depths
        .iter()
        .filter(|(q, n, _)| q.ends_with(".dead-letter") && *n > 0)
        .map(|(q, n, _)| (q.clone(), *n))
        .collect()
}

#[tokio::test]
async fn a_read_only_ledger_holds_the_charge_until_the_disk_is_back() {
    let mut p = Platform::new("fault-disk").await;
    let disk = Disk::mount(&p.ns.name);
    p.ledger = disk.dir.join("ledger.jsonl");
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    p.create_couriers(4).await;
    // A long stage deadline: the operator's re-publish must not be what
    // rescues the order; the message held through the fault must.
    let _op = p.start("operator", &["--stage-deadline", "10m"]);
    let _kitchen = p.start("kitchen", &[]);
    let _delivery = p.start("delivery", &[]);
    let mut pay = spec(&p).start("payment", &[]);
    pay.wait_ready(T).await;

    // The disk works: an order is charged and delivered.
    let before = p
        .create_order(fixtures::order("before", "roma", &[("water", 1)]))
        .await;
    p.wait_order("before", T, "delivery", |o| {
        phase(o) == Some(OrderPhase::Delivered)
    })
    .await;
    assert_eq!(kinds(&p.ledger(&before.uid().unwrap()), "charge"), 1);

    disk.read_only(true);
    let faulted_at = Instant::now();
    let names = ["held-0", "held-1", "held-2"];
    for n in names {
        p.create_order(fixtures::order(n, "roma", &[("water", 1)]))
            .await;
    }
    // Longer than a message's whole retry budget (in-process attempts times
    // the queue's delivery limit, about 20 s), so a message that was merely
    // retried would be dead-lettered by now.
    const FAULT: Duration = Duration::from_secs(30);
    let mut not_ready: Option<(Duration, String)> = None;
    let mut seen: HashMap<&str, Vec<Option<OrderPhase>>> = HashMap::new();
    while faulted_at.elapsed() < FAULT {
        if not_ready.is_none()
            && let Some((503, body)) = pay.readyz().await
        {
            not_ready = Some((faulted_at.elapsed(), body));
        }
        for n in names {
            let o = p.orders().get(n).await.unwrap();
            assert!(
                !matches!(
                    payment_state(&o),
                    Some(PaymentState::Succeeded | PaymentState::Failed)
                ),
                "{n} was settled on a read-only ledger: {:?}",
                o.status
            );
            let v = seen.entry(n).or_default();
            if v.last() != Some(&phase(&o)) {
                v.push(phase(&o));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let depths = procs::queue_depths(&p.amqp_url).await;
    let payment_metrics = pay.metrics().await;
    let accepted = |outcome: &str| {
        metric_sum(
            &payment_metrics,
            "dishpatch_payment_messages_total",
            &["order.accepted", &format!("outcome=\"{outcome}\"")],
        )
    };
    let (ok, held) = (accepted("ok"), accepted("held"));
    disk.read_only(false);
    let repaired_at = Instant::now();
    println!("phases seen during the fault: {seen:?}");
    println!(
        "payment during the fault: readyz {not_ready:?}; order.accepted ok {ok}, held {held}, retried {}",
        accepted("retried")
    );
    println!("queues at the end of the fault: {depths:?}");
    for (n, phases) in &seen {
        assert!(
            phases.last() == Some(&Some(OrderPhase::Accepted))
                && phases
                    .iter()
                    .all(|p| matches!(p, None | Some(OrderPhase::Pending | OrderPhase::Accepted))),
            "{n} waits in Accepted through the fault: {phases:?}"
        );
    }
    assert!(
        dead_lettered(&depths).is_empty(),
        "nothing is dead-lettered while the disk is read-only: {depths:?}"
    );
    assert_eq!(ok, 1.0, "only the order from before the fault was acked");
    assert!(
        held >= names.len() as f64,
        "each order's message was held: {held}"
    );
    let (after, reason) =
        not_ready.expect("payment's /readyz answers 503 while its ledger is read-only");
    println!("payment reported not ready {after:?} into the fault: {reason}");

    // Repaired: the held messages complete, each order with one charge.
    for n in names {
        p.wait_order(n, T, "delivery after the repair", |o| {
            phase(o) == Some(OrderPhase::Delivered)
        })
        .await;
    }
    println!(
        "all held orders delivered {:?} after the repair",
        repaired_at.elapsed()
    );
    pay.wait_ready(Duration::from_secs(10)).await;
    assert!(pay.alive(), "payment kept running");
    for o in p.orders().list(&Default::default()).await.unwrap() {
        let ledger = p.ledger(&o.uid().unwrap());
        assert_eq!(
            (kinds(&ledger, "charge"), kinds(&ledger, "refund")),
            (1, 0),
            "{}: {ledger:#?}",
            o.name_any()
        );
    }
    let depths = procs::queue_depths(&p.amqp_url).await;
    assert!(dead_lettered(&depths).is_empty(), "{depths:?}");
}

/// What a watch saw of every order in a namespace, version by version.
#[derive(Default)]
struct Seen {
    /// Phases in the order they were observed (repeats collapsed).
    phases: HashMap<String, Vec<OrderPhase>>,
    /// Versions with a kitchen section while the payment had not succeeded,
    /// or a delivery section while the kitchen was not ready.
    out_of_turn: Vec<String>,
}

/// Watches the namespace's Orders until dropped (aborted).
fn watch_orders(api: Api<Order>) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    use dishpatch_api::order::KitchenState;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let _ = watcher(api, watcher::Config::default())
            .try_for_each(move |event| {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = event {
                    let mut s = log.lock().unwrap();
                    let name = o.name_any();
                    let st = o.status.clone().unwrap_or_default();
                    if st.kitchen.is_some()
                        && st.payment.as_ref().map(|p| p.state) != Some(PaymentState::Succeeded)
                        && st.payment.as_ref().map(|p| p.state) != Some(PaymentState::Refunded)
                    {
                        s.out_of_turn.push(format!("{name}: cooked unpaid: {st:?}"));
                    }
                    if st.delivery.is_some()
                        && st.kitchen.as_ref().map(|k| k.state) != Some(KitchenState::Ready)
                    {
                        s.out_of_turn
                            .push(format!("{name}: delivered before ready: {st:?}"));
                    }
                    if let Some(ph) = st.phase {
                        let v = s.phases.entry(name).or_default();
                        if v.last() != Some(&ph) {
                            v.push(ph);
                        }
                    }
                }
                std::future::ready(Ok(()))
            })
            .await;
    });
    (seen, task)
}

impl Seen {
    /// Panics when any order's phase moved somewhere the lifecycle forbids.
    fn assert_never_backwards(&self) {
        for (name, phases) in &self.phases {
            for w in phases.windows(2) {
                assert!(
                    transition_allowed(w[0], w[1]),
                    "{name} went {:?} → {:?}: {phases:?}",
                    w[0],
                    w[1]
                );
            }
        }
        assert!(self.out_of_turn.is_empty(), "{:#?}", self.out_of_turn);
    }
}

/// Waits until the workers' queues in the vhost are empty (notification
/// runs nowhere here, so its queue only fills).
async fn wait_drained(p: &Platform) -> Vec<(String, u32, u32)> {
    let (ok, depths) = dishpatch_testkit::eventually(
        Duration::from_secs(30),
        || procs::queue_depths(&p.amqp_url),
        |d| {
            d.iter().all(|(q, n, _)| {
                q.ends_with(".dead-letter") || q == "dishpatch.notification" || *n == 0
            })
        },
    )
    .await;
    assert!(ok, "the queues drained: {depths:?}");
    depths
}

#[tokio::test]
async fn out_of_order_stray_and_replayed_events_never_move_a_phase_back() {
    let p = Platform::new("fault-events").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    p.create_couriers(2).await;
    let (seen, watch) = watch_orders(p.orders());
    let s = spec(&p);
    let mut running = vec![
        s.start("operator", &[]),
        s.start("kitchen", &[]),
        s.start("delivery", &[]),
    ];
    for w in &running[1..] {
        w.wait_ready(T).await;
    }

    // 1. kitchen.ready and payment.succeeded for an order nobody has paid:
    // no payment service runs yet, so the order can only be Accepted.
    let early = p
        .create_order(fixtures::order("early", "roma", &[("pizza", 1)]))
        .await;
    let early_ref = order_ref(&p, &early);
    p.wait_order("early", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    publish(&p, EventType::KitchenReady, &early_ref).await;
    publish(&p, EventType::PaymentSucceeded, &early_ref).await;

    // 2. Events for uids nobody has: one under a live order's name (a name
    // reused by a later object), one under a name that does not exist.
    let strangers = [
        OrderRef {
            uid: "00000000-0000-4000-8000-00000000dead".into(),
            ..early_ref.clone()
        },
        OrderRef {
            namespace: p.ns.name.clone(),
            name: "ghost".into(),
            uid: "00000000-0000-4000-8000-00000000beef".into(),
        },
    ];
    for r in &strangers {
        for kind in EventType::ALL {
            publish(&p, kind, r).await;
        }
    }

    // 3. An order deleted before it was paid; then its events arrive.
    let gone = p
        .create_order(fixtures::order("gone", "roma", &[("water", 1)]))
        .await;
    let gone_ref = order_ref(&p, &gone);
    p.wait_order("gone", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    p.orders()
        .delete("gone", &Default::default())
        .await
        .unwrap();
    let api = p.orders();
    let (deleted, _) =
        dishpatch_testkit::eventually(T, || api.get_opt("gone"), |o| matches!(o, Ok(None))).await;
    assert!(deleted, "the order was deleted");
    for kind in EventType::ALL {
        publish(&p, kind, &gone_ref).await;
    }

    // 4. A poison message: a well-formed event whose id does not match its
    // order and type (parsing refuses it), on a key two queues are bound to.
    let mut forged = serde_json::to_value(CloudEvent::new(
        EventType::KitchenReady,
        "faults-test",
        early_ref.clone(),
        None,
        jiff::Timestamp::now().to_string(),
    ))
    .unwrap();
    forged["id"] = "forged".into();
    {
        use lapin::options::BasicPublishOptions;
        let conn = lapin::Connection::connect(&p.amqp_url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_publish(
            "dishpatch.events".into(),
            "kitchen.ready".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&forged).unwrap(),
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    // Nothing moves the early order while it is unpaid.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = p.orders().get("early").await.unwrap();
    assert_eq!(phase(&o), Some(OrderPhase::Accepted), "{:?}", o.status);
    let st = o.status.unwrap();
    assert!(
        st.kitchen.is_none() && st.delivery.is_none(),
        "an unpaid order was cooked or dispatched: {st:?}"
    );

    // Now the payment service: the early order goes its whole way.
    let pay = s.start("payment", &[]);
    pay.wait_ready(T).await;
    running.push(pay);
    let delivered = p
        .wait_order("early", T, "delivery", |o| {
            phase(o) == Some(OrderPhase::Delivered)
        })
        .await;

    // 5. Every event the delivered order ever had, and those it never had
    // (cancelled, rejected, refunded, failed), delivered again.
    for _ in 0..2 {
        for kind in EventType::ALL {
            publish(&p, kind, &early_ref).await;
        }
    }
    let depths = wait_drained(&p).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let after = p.orders().get("early").await.unwrap();
    assert_eq!(phase(&after), Some(OrderPhase::Delivered));
    assert_eq!(
        after
            .status
            .as_ref()
            .map(|s| (&s.payment, &s.kitchen, &s.delivery)),
        delivered
            .status
            .as_ref()
            .map(|s| (&s.payment, &s.kitchen, &s.delivery)),
        "the replay changed a delivered order's stages"
    );
    let ledger = p.ledger(&early_ref.uid);
    assert_eq!(
        (kinds(&ledger, "charge"), kinds(&ledger, "refund")),
        (1, 0),
        "{ledger:#?}"
    );
    for r in strangers.iter().chain([&gone_ref]) {
        assert!(
            p.ledger(&r.uid).is_empty(),
            "{}: {:?}",
            r.uid,
            p.ledger(&r.uid)
        );
    }
    assert!(
        p.orders().get_opt("ghost").await.unwrap().is_none(),
        "nothing was made for the unknown order"
    );
    for w in &mut running {
        assert!(w.alive(), "{} crashed", w.name);
        assert_eq!(
            w.readyz().await.map(|r| r.0),
            Some(200),
            "{} is not ready",
            w.name
        );
    }
    // Stray events about orders that are gone or unknown are dropped
    // (acked: nothing to do), and so are replays (the result is already
    // there). The poison message is dead-lettered by the queue whose
    // consumer got it (notification runs nowhere here). An early event is
    // retried; only if its order took longer than its whole delivery limit
    // to catch up (a slow machine) would it be dead-lettered too.
    println!("queues after the replay: {depths:?}");
    let mut dead = Vec::new();
    for q in [
        "dishpatch.payment",
        "dishpatch.kitchen",
        "dishpatch.delivery",
    ] {
        for body in procs::take_all(&p.amqp_url, &dishpatch_messaging::dead_letter_queue(q)).await {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            dead.push((q, v["id"].as_str().unwrap_or_default().to_string()));
        }
    }
    println!("dead-lettered: {dead:?}");
    assert!(
        dead.contains(&("dishpatch.delivery", "forged".to_string())),
        "the poison message is dead-lettered: {dead:?}"
    );
    let early_ok = [
        (
            "dishpatch.delivery",
            format!("{}.kitchen.ready", early_ref.uid),
        ),
        (
            "dishpatch.kitchen",
            format!("{}.payment.succeeded", early_ref.uid),
        ),
    ];
    for (q, id) in &dead {
        assert!(
            id == "forged" && *q == "dishpatch.delivery"
                || early_ok.iter().any(|(eq, eid)| eq == q && eid == id),
            "{q} dead-lettered {id}, which should have been dropped: {dead:?}"
        );
    }
    watch.abort();
    let seen = seen.lock().unwrap();
    println!("phases seen: {:?}", seen.phases);
    seen.assert_never_backwards();
    assert_eq!(
        seen.phases.get("early").and_then(|v| v.last()),
        Some(&OrderPhase::Delivered)
    );
}

/// Samples a process's resident memory every 100 ms until stopped; keeps the peak.
fn sample_peak(
    pid: u32,
) -> (
    Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let peak = Arc::new(AtomicU64::new(0));
    let p = peak.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Some(kib) = procs::rss_kib(pid) {
                p.fetch_max(kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (peak, task)
}

/// Creates `names` as orders for `restaurant`, 32 at a time; returns how
/// many the apiserver refused as already existing.
async fn offer(p: &Platform, names: &[String], restaurant: &str) -> usize {
    let results: Vec<Result<Order, kube::Error>> = futures::stream::iter(names)
        .map(|n| {
            let api = p.orders();
            async move {
                api.create(
                    &Default::default(),
                    &fixtures::order(n, restaurant, &[("pizza", 1)]),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results
        .into_iter()
        .filter_map(|r| match r {
            Ok(_) => None,
            Err(kube::Error::Api(e)) if e.code == 409 => Some(()),
            Err(e) => panic!("creating an order: {e}"),
        })
        .count()
}

/// Waits until `n` orders are Rejected; returns how long that took.
async fn wait_rejected(p: &Platform, n: usize, started: Instant) -> Duration {
    let api = p.orders();
    let lp = kube::api::ListParams::default();
    let (ok, last) = dishpatch_testkit::eventually(
        // Bounded, generously: the 2-core machine is shared with other tests.
        Duration::from_secs(240),
        || api.list(&lp),
        |l| {
            l.as_ref().is_ok_and(|l| {
                l.items
                    .iter()
                    .filter(|o| phase(o) == Some(OrderPhase::Rejected))
                    .count()
                    == n
            })
        },
    )
    .await;
    let took = started.elapsed();
    if !ok {
        let mut by_phase = std::collections::BTreeMap::new();
        for o in last.unwrap().items {
            *by_phase.entry(format!("{:?}", phase(&o))).or_insert(0) += 1;
        }
        panic!("not all {n} orders were rejected: {by_phase:?}");
    }
    took
}

#[tokio::test]
async fn a_thousand_orders_for_a_closed_restaurant_are_rejected_and_memory_stays_flat() {
    const N: usize = 1000;
    let p = Platform::new("fault-flood").await;
    p.create_restaurant(fixtures::restaurant("shut", false, None))
        .await;
    let s = spec(&p);
    let mut op = s.start("operator", &[]);
    op.wait_ready(T).await;
    // One order first, so the caches and the connections exist before the baseline.
    p.create_order(fixtures::order("warm", "shut", &[("pizza", 1)]))
        .await;
    wait_rejected(&p, 1, Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = op.rss_kib().unwrap();
    let (peak, sampler) = sample_peak(op.pid());

    let wave: Vec<String> = (0..N).map(|i| format!("flood-{i}")).collect();
    let started = Instant::now();
    assert_eq!(offer(&p, &wave, "shut").await, 0);
    let created = started.elapsed();
    let took = wait_rejected(&p, N + 1, started).await;
    println!(
        "{N} orders for a closed restaurant: created in {:.1}s, all Rejected after {:.1}s ({:.0} rejections/s)",
        created.as_secs_f64(),
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
    let rejected = p.orders().get("flood-0").await.unwrap();
    let c = common::condition(&rejected, "Accepted").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RestaurantClosed"),
        "{c:?}"
    );

    // The same thousand requests again (a client replaying them): the
    // apiserver refuses each as already existing and nothing changes.
    let replayed = Instant::now();
    assert_eq!(offer(&p, &wave, "shut").await, N, "every replay is refused");
    println!(
        "{N} replayed creates refused in {:.1}s",
        replayed.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = peak.load(std::sync::atomic::Ordering::Relaxed);
    let after = op.rss_kib().unwrap();
    sampler.abort();
    let list = p.orders().list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), N + 1);
    assert!(
        list.items
            .iter()
            .all(|o| phase(o) == Some(OrderPhase::Rejected)),
        "a replay moved a rejected order"
    );
    assert!(op.alive(), "the operator survived the flood");
    let m = op.metrics().await;
    println!(
        "operator: {} reconciles, {} reconcile errors, {} apiserver writes ({:.2} per order)",
        metric_sum(&m, "dishpatch_operator_reconciles_total", &[]),
        metric_sum(&m, "dishpatch_operator_reconcile_errors_total", &[]),
        metric_sum(&m, "dishpatch_operator_api_writes_total", &[]),
        metric_sum(&m, "dishpatch_operator_api_writes_total", &[]) / (N + 1) as f64,
    );
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "operator VmRSS: before {:.1} MiB, peak during {:.1} MiB, after {:.1} MiB (growth {:+.1} MiB)",
        mib(before),
        mib(during),
        mib(after),
        mib(after) - mib(before)
    );
    // Generous: the operator keeps every Order in its watch cache (about
    // 3 KiB each as JSON), so some growth is expected; a leak per order or
    // per reconcile would be far more.
    assert!(
        after.saturating_sub(before) < 96 * 1024,
        "the operator's memory grew {:.1} MiB for {N} rejected orders",
        mib(after) - mib(before)
    );
}
