//! Order history in PostgreSQL (issue 13, part 3): the operator and the
//! façade as real processes, a real apiserver, and a real PostgreSQL of the
//! test's own (Debian's package). Orders are placed through the façade; the
//! stage services' facts are written into their status as those services
//! would (payment, kitchen and delivery are not what is tested here).
//!
//!   cargo test -p dishpatch-e2e --test history -- --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod procs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dishpatch_api::{Order, OrderPhase, Restaurant};
use dishpatch_archive::Archive;
use dishpatch_testkit::postgres::Postgres;
use dishpatch_testkit::{TestNamespace, amqp_vhost, cache_dir, client, ensure_crds, fixtures};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use procs::{Proc, Spec, free_port, http_json};
use serde_json::Value;

struct Setup {
    ns: TestNamespace,
    amqp: String,
    key_file: PathBuf,
}

async fn setup(prefix: &str) -> Setup {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, prefix).await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = cache_dir().join("e2e-history").join(&ns.name);
    std::fs::create_dir_all(&work).unwrap();
    let key_file = work.join("jwt.key");
    std::fs::write(
        &key_file,
        format!("history-key-{}-0123456789abcdef", ns.name),
    )
    .unwrap();
    ns.api::<Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("roma", true, None),
        )
        .await
        .unwrap();
    ns.api::<Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("napoli", true, None),
        )
        .await
        .unwrap();
    Setup { ns, amqp, key_file }
}

impl Setup {
    fn spec(&self) -> Spec<'_> {
        Spec {
            namespace: &self.ns.name,
            amqp_url: &self.amqp,
            ledger: Path::new("/dev/null"),
            log: None,
            rust_log: "warn",
        }
    }

    async fn operator(&self, retention: &str, archive_url: &str) -> Proc {
        let p = self.spec().start(
            "operator",
            &["--retention", retention, "--archive-url", archive_url],
        );
        p.wait_ready(Duration::from_secs(60)).await;
        p
    }

    async fn facade(&self, archive_url: &str) -> (Proc, SocketAddr) {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let p = self.spec().start(
            "facade",
            &[
                "--listen",
                &listen.to_string(),
                "--jwt-key-file",
                self.key_file.to_str().unwrap(),
                "--archive-url",
                archive_url,
                "--rate-limit",
                "1000",
                "--rate-burst",
                "1000",
            ],
        );
        p.wait_ready(Duration::from_secs(60)).await;
        (p, listen)
    }

    fn bearer(&self, role: &str, sub: &str) -> String {
        procs::bearer(&self.key_file, role, sub, "1h", &[])
    }
}

async fn get(facade: SocketAddr, path: &str, bearer: &str) -> (u16, Value) {
    let (code, body) = http_json(
        facade,
        "GET",
        path,
        &[("authorization", bearer)],
        &Value::Null,
    )
    .await
    .unwrap();
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Places an order through the façade; its id.
async fn place(facade: SocketAddr, bearer: &str, restaurant: &str, key: &str) -> String {
    let body = serde_json::json!({
        "restaurant": restaurant,
        "items": [{"menuItem": "pizza", "quantity": 2, "notes": "extra basil"}],
        "contact": {"email": "jane@example.com"},
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    });
    let (code, answer) = http_json(
        facade,
        "POST",
        "/api/v1/orders",
        &[("authorization", bearer), ("idempotency-key", key)],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{answer}");
    serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_phase(orders: &Api<Order>, name: &str, phase: OrderPhase) -> Order {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = orders.get(name).await.unwrap();
        if o.status.as_ref().and_then(|s| s.phase) == Some(phase)
            && o.finalizers()
                .iter()
                .any(|f| f == "dishpatch.dev/compensate")
        {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {phase}: {:?}",
            o.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes what payment, kitchen and delivery record for a delivered order,
/// keeping the operator's conditions: a full story to find in the history.
async fn deliver(orders: &Api<Order>, name: &str) -> Order {
    let o = wait_phase(orders, name, OrderPhase::Accepted).await;
    let now = Time(jiff::Timestamp::now());
    let mut conditions = serde_json::to_value(&o.status.as_ref().unwrap().conditions).unwrap();
    conditions.as_array_mut().unwrap().push(serde_json::json!({
        "type": "Delivered", "status": "True", "reason": "HandedOver",
        "message": "handed to the customer at the door", "lastTransitionTime": now,
    }));
    let story = serde_json::json!({"status": {
        "phase": "Delivered",
        "conditions": conditions,
        "payment": {"provider": "simulated", "state": "Succeeded", "paymentId": format!("pi_{name}"), "chargedAt": now,
                    "amount": {"amount": 1900, "currency": "EUR"}},
        "kitchen": {"state": "Ready", "readyAt": now},
        "delivery": {"state": "Delivered", "courier": "c1", "pickedUpAt": now, "deliveredAt": now},
    }});
    orders
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&story))
        .await
        .unwrap()
}

async fn wait_gone(orders: &Api<Order>, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while orders.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{name} was never deleted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every page of `path` (which has `?limit=`), following `continue`.
async fn all_pages(facade: SocketAddr, path: &str, bearer: &str) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut pages = 0;
    let mut next: Option<String> = None;
    loop {
        let url = match &next {
            Some(c) => format!("{path}&continue={c}"),
            None => path.to_string(),
        };
        let (code, page) = get(facade, &url, bearer).await;
        assert_eq!(code, 200, "{page}");
        assert_ne!(page["incomplete"], true, "{page}");
        pages += 1;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["continue"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => return (items, pages),
        }
    }
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// The façade's view of an order that left etcd, once the façade's cache
/// has seen it go (until then it still serves the live copy).
async fn archived_view(facade: SocketAddr, name: &str, bearer: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, view) = get(facade, &format!("/api/v1/orders/{name}"), bearer).await;
        assert_eq!(code, 200, "{view}");
        if view["archived"] == true {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "the façade never served {name} from history: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The view without what changes when an order leaves the cluster.
fn settled(mut view: Value) -> Value {
    let o = view.as_object_mut().unwrap();
    o.remove("resourceVersion");
    o.remove("archived");
    view
}

#[tokio::test]
async fn an_order_past_its_retention_leaves_etcd_and_stays_in_the_customers_history() {
    let pg = Postgres::start().await.unwrap();
    let s = setup("history").await;
    let orders: Api<Order> = s.ns.api();
    let _operator = s.operator("2s", &pg.url()).await;
    let (_facade, facade) = s.facade(&pg.url()).await;
    let alice = s.bearer("customer", "alice");
    let bob = s.bearer("customer", "bob");
    let admin = s.bearer("admin", "ops");

    // Alice: two orders that are delivered, then one that stays live; Bob: one delivered.
    let a1 = place(facade, &alice, "roma", "a1").await;
    let a2 = place(facade, &alice, "napoli", "a2").await;
    let b1 = place(facade, &bob, "roma", "b1").await;
    // Creation times are in seconds: a new second orders the live one last.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a3 = place(facade, &alice, "roma", "a3").await;
    let mut last_live = Vec::new();
    for (name, bearer) in [(&a1, &alice), (&a2, &alice), (&b1, &bob)] {
        let delivered = deliver(&orders, name).await;
        // The façade's cache follows the watch: wait until it shows the delivery.
        let deadline = Instant::now() + Duration::from_secs(30);
        let view = loop {
            let (code, view) = get(facade, &format!("/api/v1/orders/{name}"), bearer).await;
            assert_eq!(code, 200, "{view}");
            if view["phase"] == "Delivered" {
                break view;
            }
            assert!(
                Instant::now() < deadline,
                "the façade never showed {name} delivered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        last_live.push((name.clone(), delivered, view));
    }
    wait_phase(&orders, &a3, OrderPhase::Accepted).await;

    let archive = Archive::connect(&pg.url()).unwrap();
    for (name, delivered, live_view) in &last_live {
        wait_gone(&orders, name, Duration::from_secs(60)).await;
        // The row is the order as it ended: every field of spec and status.
        let kept = archive
            .get(&s.ns.name, name)
            .await
            .unwrap()
            .expect("archived");
        assert_eq!(kept.uid(), delivered.uid());
        assert_eq!(
            serde_json::to_value(&kept.spec).unwrap(),
            serde_json::to_value(&delivered.spec).unwrap()
        );
        let (kept_status, delivered_status) =
            (kept.status.unwrap(), delivered.status.clone().unwrap());
        assert_eq!(kept_status.phase, Some(OrderPhase::Delivered));
        assert_eq!(kept_status.payment, delivered_status.payment);
        assert_eq!(kept_status.kitchen, delivered_status.kitchen);
        assert_eq!(kept_status.delivery, delivered_status.delivery);
        assert_eq!(kept_status.total, delivered_status.total);
        let types = |c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            c.iter()
                .map(|c| (c.type_.clone(), c.last_transition_time.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            types(&kept_status.conditions),
            types(&delivered_status.conditions)
        );

        // And the façade serves it as before, marked as history.
        let bearer = if name == &b1 { &bob } else { &alice };
        let view = archived_view(facade, name, bearer).await;
        assert_eq!(settled(view.clone()), settled(live_view.clone()));
        assert!(
            view["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["type"] == "Delivered"),
            "{view}"
        );
    }
    assert_eq!(archive.count(&s.ns.name).await.unwrap(), 3);
    // Another customer's history stays theirs.
    let (code, _) = get(facade, &format!("/api/v1/orders/{b1}"), &alice).await;
    assert_eq!(code, 404);

    // One list across the cluster and the history, a page at a time.
    let (items, pages) = all_pages(facade, "/api/v1/orders?limit=1", &alice).await;
    assert_eq!(
        ids(&items),
        [a3.clone(), a2.clone(), a1.clone()].map(|s| s.to_string())
    );
    assert_eq!(pages, 3);
    assert_eq!(items[0]["archived"], Value::Null, "a3 is live");
    assert_eq!(items[1]["archived"], true);

    // Admin search: by customer, restaurant and creation time.
    let (items, _) = all_pages(facade, "/api/v1/orders?limit=2&customer=bob", &admin).await;
    assert_eq!(ids(&items), vec![b1.clone()]);
    let (items, _) = all_pages(facade, "/api/v1/orders?limit=2&restaurant=roma", &admin).await;
    let mut roma = ids(&items);
    roma.sort();
    let mut want = vec![a1.clone(), a3.clone(), b1.clone()];
    want.sort();
    assert_eq!(roma, want);
    let created = |v: &Value| v["createdAt"].as_str().unwrap().to_string();
    let a3_created = created(&get(facade, &format!("/api/v1/orders/{a3}"), &alice).await.1);
    let (items, _) = all_pages(
        facade,
        &format!("/api/v1/orders?limit=5&createdBefore={a3_created}"),
        &admin,
    )
    .await;
    assert!(!ids(&items).contains(&a3), "{items:?}");
    assert_eq!(items.len(), 3);
    let (items, _) = all_pages(
        facade,
        &format!("/api/v1/orders?limit=5&createdFrom={a3_created}"),
        &admin,
    )
    .await;
    assert_eq!(ids(&items), vec![a3.clone()]);
    // A customer cannot search another's history; a bad time is a 400.
    let (code, problem) = get(facade, "/api/v1/orders?customer=bob", &alice).await;
    assert_eq!(code, 403, "{problem}");
    let (code, problem) = get(facade, "/api/v1/orders?createdFrom=yesterday", &alice).await;
    assert_eq!(code, 400, "{problem}");
}

#[tokio::test]
async fn a_crash_between_the_insert_and_the_delete_leaves_one_row() {
    let pg = Postgres::start().await.unwrap();
    let s = setup("history-crash").await;
    let orders: Api<Order> = s.ns.api();
    let archive = Archive::connect(&pg.url()).unwrap();
    let (_facade, facade) = s.facade(&pg.url()).await;
    let alice = s.bearer("customer", "alice");

    // An operator that keeps terminal orders for an hour delivers one…
    let operator = s.operator("1h", &pg.url()).await;
    let name = place(facade, &alice, "roma", "k1").await;
    let delivered = deliver(&orders, &name).await;
    // …writes it to the history, and dies before its delete.
    archive.put(&delivered).await.unwrap();
    drop(operator);
    assert_eq!(archive.count(&s.ns.name).await.unwrap(), 1);

    // The next operator (retention now passed) writes it again and deletes.
    let _operator = s.operator("1s", &pg.url()).await;
    wait_gone(&orders, &name, Duration::from_secs(60)).await;
    assert_eq!(
        archive.count(&s.ns.name).await.unwrap(),
        1,
        "archived twice"
    );
    let kept = archive
        .get(&s.ns.name, &name)
        .await
        .unwrap()
        .expect("archived");
    assert_eq!(kept.uid(), delivered.uid());
    assert_eq!(
        kept.status.unwrap().delivery,
        delivered.status.unwrap().delivery
    );
    archived_view(facade, &name, &alice).await;
}

#[tokio::test]
async fn with_the_archive_down_the_delete_waits_and_nothing_is_lost() {
    let pg = Postgres::start().await.unwrap();
    let s = setup("history-down").await;
    let orders: Api<Order> = s.ns.api();
    let operator = s.operator("1s", &pg.url()).await;
    let (_facade, facade) = s.facade(&pg.url()).await;
    let alice = s.bearer("customer", "alice");
    let name = place(facade, &alice, "roma", "d1").await;
    wait_phase(&orders, &name, OrderPhase::Accepted).await;

    pg.stop().await.unwrap();
    deliver(&orders, &name).await;
    // Past its retention, the order stays while the history cannot take it.
    let failed_at = Instant::now() + Duration::from_secs(60);
    loop {
        let failures = procs::metric_sum(
            &operator.metrics().await,
            "dishpatch_operator_archive_writes_total",
            &["result=\"error\""],
        );
        if failures >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < failed_at,
            "the operator never tried the archive"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let o = orders.get(&name).await.unwrap();
    assert_eq!(o.status.and_then(|s| s.phase), Some(OrderPhase::Delivered));
    let events: Api<Event> = s.ns.api();
    let told = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap()
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("ArchiveFailed"));
    assert!(told, "no ArchiveFailed Event on {name}");
    // The live order is still served; a list says history is missing.
    let (code, view) = get(facade, &format!("/api/v1/orders/{name}"), &alice).await;
    assert_eq!(code, 200, "{view}");
    let (code, page) = get(facade, "/api/v1/orders", &alice).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["incomplete"], true, "{page}");
    assert_eq!(ids(page["items"].as_array().unwrap()), vec![name.clone()]);
    // An order not in the cluster cannot be looked up: 503, not 404.
    let (code, problem) = get(facade, "/api/v1/orders/not-here", &alice).await;
    assert_eq!(code, 503, "{problem}");

    // The database is back: the order is archived, then deleted.
    pg.resume().await.unwrap();
    wait_gone(&orders, &name, Duration::from_secs(90)).await;
    let archive = Archive::connect(&pg.url()).unwrap();
    let kept = archive
        .get(&s.ns.name, &name)
        .await
        .unwrap()
        .expect("archived once back");
    assert_eq!(kept.status.unwrap().phase, Some(OrderPhase::Delivered));
    archived_view(facade, &name, &alice).await;
}
