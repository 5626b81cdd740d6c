//! The kitchen against a real apiserver and RabbitMQ: a ticket whose
//! announcement can't be published still cooks, and several replicas share
//! each restaurant's capacity and queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Platform;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::KitchenState;
use dishpatch_testkit::fixtures;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Resource, ResourceExt};
use lapin::options::QueueDeleteOptions;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// An order the operator accepted and payment charged, as they would write it.
async fn paid_order(p: &Platform, name: &str) -> dishpatch_api::Order {
    paid_order_at(p, name, "roma", &[("pizza", 1)]).await
}

async fn paid_order_at(
    p: &Platform,
    name: &str,
    restaurant: &str,
    items: &[(&str, i32)],
) -> dishpatch_api::Order {
    let order = p
        .create_order(fixtures::order(name, restaurant, items))
        .await;
    let now = jiff::Timestamp::now().to_string();
    for (manager, status) in [
        (
            "dishpatch-operator",
            json!({"phase": "Paid", "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "priced", "lastTransitionTime": now}]}),
        ),
        (
            "dishpatch-payment",
            json!({"payment": {"state": "Succeeded", "provider": "simulated", "paymentId": "ch_1",
                "amount": {"amount": 950, "currency": "EUR"}, "chargedAt": now}}),
        ),
    ] {
        let patch =
            json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": status});
        p.orders()
            .patch_status(
                name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
    }
    order
}

#[tokio::test]
async fn a_ticket_cooks_even_when_announcing_it_fails() {
    let p = Platform::new("kitchen-publish").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    let _kitchen = p.start("kitchen", &[]);
    let order = paid_order(&p, "o1").await;

    // kitchen.accepted goes only to the notification queue: without it the
    // announcement is unroutable, so every publish of it fails.
    tokio::time::sleep(Duration::from_secs(1)).await; // the kitchen has declared its topology
    let channel = p.broker.channel().await.unwrap();
    channel
        .queue_delete(
            "dishpatch.notification".into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    publish_paid(&p, &order).await;

    let o = p
        .wait_order("o1", T, "the ticket to be ready", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.kitchen.as_ref())
                .is_some_and(|k| k.state == KitchenState::Ready)
        })
        .await;
    assert!(o.status.unwrap().kitchen.unwrap().ready_at.is_some());
}

/// Makes an Order that the apiserver stores but the Rust types can't parse:
/// `9999-12-31T23:59:59Z` is a valid date-time to the schema, yet past the
/// largest timestamp the types hold.
async fn unparsable_order(p: &Platform, name: &str) {
    p.create_order(fixtures::order(name, "roma", &[("water", 1)]))
        .await;
    dishpatch_testkit::break_order(&p.client, &p.ns.name, name, "Queued")
        .await
        .unwrap();
    assert!(
        p.orders().get(name).await.is_err(),
        "the order must not parse"
    );
}

#[tokio::test]
async fn an_order_that_does_not_parse_does_not_stop_the_kitchen() {
    let p = Platform::new("kitchen-unparsable").await;
    p.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    unparsable_order(&p, "broken").await;
    let order = paid_order(&p, "o1").await;
    // Starting lists every Order to resume tickets still cooking.
    let mut kitchen = p.start("kitchen", &[]);
    publish_paid(&p, &order).await;
    p.wait_order("o1", T, "the ticket to be ready", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.kitchen.as_ref())
            .is_some_and(|k| k.state == KitchenState::Ready)
    })
    .await;
    assert!(kitchen.try_wait().unwrap().is_none(), "the kitchen exited");
}

async fn publish_paid(p: &Platform, order: &dishpatch_api::Order) {
    let event = CloudEvent::new(
        EventType::PaymentSucceeded,
        "payment",
        OrderRef {
            namespace: p.ns.name.clone(),
            name: order.name_any(),
            uid: order.uid().unwrap(),
        },
        None,
        jiff::Timestamp::now().to_string(),
    );
    p.broker
        .publish(
            &event,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .await
        .unwrap();
}

/// Every committed version of every object of a kind in the namespace, in
/// etcd's order: a watch from a list's resourceVersion misses no write, so
/// this samples at every step rather than every so often.
struct Record<K> {
    versions: Arc<Mutex<Vec<K>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Record<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    async fn start(api: Api<K>) -> Self {
        let versions: Arc<Mutex<Vec<K>>> = Arc::default();
        let out = versions.clone();
        let mut rv = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let task = tokio::spawn(async move {
            loop {
                let mut stream = api
                    .watch(&WatchParams::default().timeout(290), &rv)
                    .await
                    .unwrap()
                    .boxed();
                while let Some(event) = stream.try_next().await.unwrap() {
                    match event {
                        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                            rv = o.resource_version().unwrap();
                            out.lock().unwrap().push(o);
                        }
                        WatchEvent::Bookmark(b) => rv = b.metadata.resource_version,
                        WatchEvent::Error(e) => panic!("the watch failed: {e:?}"),
                    }
                }
            }
        });
        Self { versions, task }
    }

    /// What was recorded, once the watch has caught up.
    async fn stop(self) -> Vec<K> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.task.abort();
        self.versions.lock().unwrap().clone()
    }
}

fn kitchen_state(o: &dishpatch_api::Order) -> Option<KitchenState> {
    o.status
        .as_ref()
        .and_then(|s| s.kitchen.as_ref())
        .map(|k| k.state)
}

/// A rail as the test reads it: the ticket numbers, cooking or waiting.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RailSeen {
    capacity: usize,
    tickets: Vec<TicketSeen>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketSeen {
    number: i64,
    owner: String,
    #[serde(default)]
    started_at: Option<String>,
}

/// Three kitchen replicas take the tickets of four restaurants that cook two
/// orders at a time, all offered at once, and one replica is killed on the
/// way. Replaying every recorded version of the Orders and of the rails: no
/// restaurant ever has more than two orders Preparing, each rail starts its
/// tickets in number order and never while a lower number waits, every
/// ticket is ready in the end, and each restaurant did cook two at a time.
#[tokio::test]
async fn replicas_share_each_restaurants_capacity_and_queue() {
    const RESTAURANTS: usize = 4;
    const ORDERS: usize = 10;
    const CAPACITY: usize = 2; // fixtures::restaurant
    let p = Platform::new("kitchen-replicas").await;
    let names: Vec<String> = (0..RESTAURANTS).map(|i| format!("r{i}")).collect();
    for n in &names {
        p.create_restaurant(fixtures::restaurant(n, true, None))
            .await;
    }
    let orders = Record::start(p.orders()).await;
    let rails = Record::start(Api::<ConfigMap>::namespaced(p.client.clone(), &p.ns.name)).await;
    let mut paid = Vec::new();
    for r in &names {
        for i in 0..ORDERS {
            // A pizza cooks 1.2 s at this scale, water 20 ms: queues form,
            // and a short ticket behind a long one must not overtake it.
            let items: &[(&str, i32)] = if i % 3 == 2 {
                &[("water", 1)]
            } else {
                &[("pizza", 1)]
            };
            paid.push(paid_order_at(&p, &format!("{r}-o{i}"), r, items).await);
        }
    }
    let mut kitchens: Vec<_> = (0..3)
        .map(|i| {
            let identity = format!("kitchen-{i}");
            p.start(
                "kitchen",
                &[
                    "--time-scale",
                    "0.02",
                    "--identity",
                    &identity,
                    "--adopt-after",
                    "2s",
                ],
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await; // the kitchens have declared their queue

    // Every ticket at once: the replicas race for each restaurant's rail.
    for order in &paid {
        publish_paid(&p, order).await;
    }
    // One replica dies holding tickets: the others finish them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kitchens[0].kill().await.unwrap(); // SIGKILL, and reaped
    let (mut held, mut cooking) = (0, 0);
    for cm in Api::<ConfigMap>::namespaced(p.client.clone(), &p.ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get("rail")) else {
            continue;
        };
        let rail: RailSeen = serde_json::from_str(text).unwrap();
        for t in rail.tickets.iter().filter(|t| t.owner == "kitchen-0") {
            held += 1;
            cooking += usize::from(t.started_at.is_some());
        }
    }
    eprintln!("the killed replica held {held} tickets, {cooking} of them cooking");
    assert!(held > 0, "the killed replica should have held tickets");

    let api = p.orders();
    let lp = ListParams::default();
    let (done, last) = dishpatch_testkit::eventually(
        Duration::from_secs(60),
        || api.list(&lp),
        |l| {
            l.as_ref().is_ok_and(|l| {
                l.items
                    .iter()
                    .all(|o| kitchen_state(o) == Some(KitchenState::Ready))
            })
        },
    )
    .await;
    let last = last.unwrap().items;
    let states: BTreeMap<String, Option<KitchenState>> = last
        .iter()
        .map(|o| (o.name_any(), kitchen_state(o)))
        .collect();
    assert!(done, "not every ticket was ready within 60 s: {states:?}");

    // Replay the Orders: never more than the capacity Preparing.
    let seen = orders.stop().await;
    let mut state: HashMap<String, (String, KitchenState)> = HashMap::new();
    let mut most: BTreeMap<String, usize> = BTreeMap::new();
    let mut over = Vec::new();
    for (at, o) in seen.iter().enumerate() {
        let restaurant = o.spec.restaurant_ref.name.clone();
        let Some(now) = kitchen_state(o) else {
            continue;
        };
        state.insert(o.name_any(), (restaurant.clone(), now));
        let cooking = state
            .values()
            .filter(|(r, s)| *r == restaurant && *s == KitchenState::Preparing)
            .count();
        let m = most.entry(restaurant.clone()).or_default();
        *m = (*m).max(cooking);
        if cooking > CAPACITY {
            over.push(format!(
                "version {at}: {restaurant} has {cooking} Preparing"
            ));
        }
    }
    eprintln!(
        "{} Order versions recorded; most Preparing at once per restaurant: {most:?}",
        seen.len()
    );
    assert!(
        over.is_empty(),
        "over capacity ({} times), first: {:?}",
        over.len(),
        over.first()
    );
    for r in &names {
        assert_eq!(
            most[r], CAPACITY,
            "{r}: the kitchen used its whole capacity"
        );
        let mut numbers: Vec<i64> = last
            .iter()
            .filter(|o| o.spec.restaurant_ref.name == *r)
            .map(|o| {
                o.status
                    .as_ref()
                    .unwrap()
                    .kitchen
                    .as_ref()
                    .unwrap()
                    .ticket
                    .unwrap()
            })
            .collect();
        numbers.sort_unstable();
        let expected: Vec<i64> = (1..=i64::try_from(ORDERS).unwrap()).collect();
        assert_eq!(numbers, expected, "{r}: one ticket number per order");
    }

    // Replay the rails: FIFO and the capacity hold on every version.
    let seen = rails.stop().await;
    let mut started: HashMap<String, Vec<i64>> = HashMap::new();
    let mut versions = 0;
    for cm in &seen {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get("rail")) else {
            continue;
        };
        versions += 1;
        let rail: RailSeen = serde_json::from_str(text).unwrap();
        let name = cm.name_any();
        let cooking: Vec<i64> = rail
            .tickets
            .iter()
            .filter(|t| t.started_at.is_some())
            .map(|t| t.number)
            .collect();
        let waiting: Vec<i64> = rail
            .tickets
            .iter()
            .filter(|t| t.started_at.is_none())
            .map(|t| t.number)
            .collect();
        assert!(
            cooking.len() <= rail.capacity && rail.capacity == CAPACITY,
            "{name}: {cooking:?} cooking"
        );
        if let (Some(c), Some(w)) = (cooking.iter().max(), waiting.iter().min()) {
            assert!(c < w, "{name}: ticket {c} cooks while {w} waits");
        }
        let log = started.entry(name).or_default();
        for c in cooking {
            if !log.contains(&c) {
                log.push(c);
            }
        }
    }
    eprintln!("{versions} rail versions recorded");
    assert_eq!(started.len(), RESTAURANTS, "one rail per restaurant");
    for (rail, order) in &started {
        assert!(
            order.is_sorted(),
            "{rail} started tickets out of order: {order:?}"
        );
        assert_eq!(
            order.len(),
            ORDERS,
            "{rail}: every ticket started on the rail"
        );
    }
}
