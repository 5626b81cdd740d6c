//! A test bed: a namespace, a RabbitMQ vhost, and real `dishpatch-delivery`
//! processes scoped to them, against the real local control plane. The test
//! plays the other components: it writes what the kitchen (and, for
//! cancellations, the operator) would write and publishes their events.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dishpatch_api::courier::{Courier, CourierStatus};
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::DeliveryStatus;
use dishpatch_api::{Order, Restaurant};
use dishpatch_messaging::{Broker, EventTap, dead_letter_queue, trace};
use dishpatch_testkit::net::free_port;
pub use dishpatch_testkit::net::http_get;
use dishpatch_testkit::{
    TestNamespace, amqp_vhost, client, ensure_crds, eventually, fixtures, kubeconfig_path,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lapin::options::BasicGetOptions;
use tokio::process::{Child, Command};

pub const ZONE: &str = "mitte";
pub const RESTAURANT: &str = "trattoria";

pub struct Bed {
    pub client: Client,
    pub ns: TestNamespace,
    pub amqp_url: String,
    pub broker: Broker,
    started: std::sync::atomic::AtomicU32,
}

/// A running `dishpatch-delivery run`; killed when dropped.
pub struct Delivery {
    pub child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Delivery {
    /// Waits until it consumes its queue (`/readyz` answers 200).
    pub async fn ready(&self) {
        let (ok, last) = eventually(
            Duration::from_secs(30),
            || http_get(self.admin, "/readyz"),
            |r| matches!(r, Some((200, _))),
        )
        .await;
        assert!(
            ok,
            "delivery at {} never got ready: {last:?}; log: {}",
            self.admin,
            self.log.display()
        );
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

impl Bed {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await.unwrap();
        ensure_crds(&client).await.unwrap();
        let ns = TestNamespace::create(&client, prefix).await.unwrap();
        let amqp_url = amqp_vhost(&ns.name).await.unwrap();
        let broker = Broker::connect(&amqp_url, "test").await.unwrap();
        Self {
            client,
            ns,
            amqp_url,
            broker,
            started: Default::default(),
        }
    }

    /// Starts a real `dishpatch-delivery run` scoped to this namespace and
    /// vhost and waits until it consumes. Its log goes to a file named in failures.
    pub async fn delivery(&self, extra: &[&str]) -> Delivery {
        self.delivery_via(extra, &kubeconfig_path()).await
    }

    /// Like [`delivery`](Self::delivery), reaching the apiserver through the
    /// given kubeconfig (for example one that points at a proxy).
    pub async fn delivery_via(&self, extra: &[&str], kubeconfig: &std::path::Path) -> Delivery {
        let n = self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{}-delivery-{n}.log", self.ns.name));
        let file = std::fs::File::create(&log).unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_dishpatch-delivery"))
            .arg("run")
            .args(["--namespace", &self.ns.name])
            .args(["--amqp-url", &self.amqp_url])
            .args(["--admin-addr", &admin.to_string()])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("starting dishpatch-delivery");
        let d = Delivery { child, admin, log };
        d.ready().await;
        d
    }

    pub async fn tap(&self, kinds: &[EventType]) -> EventTap {
        EventTap::new(&self.broker, kinds).await.unwrap()
    }

    pub fn orders(&self) -> Api<Order> {
        self.ns.api()
    }

    pub fn couriers(&self) -> Api<Courier> {
        self.ns.api()
    }

    pub async fn restaurant(&self) -> Restaurant {
        self.ns
            .api::<Restaurant>()
            .create(
                &PostParams::default(),
                &fixtures::restaurant(RESTAURANT, true, None),
            )
            .await
            .unwrap()
    }

    pub async fn courier(&self, name: &str, on_shift: bool) -> Courier {
        self.couriers()
            .create(
                &PostParams::default(),
                &fixtures::courier(name, ZONE, on_shift),
            )
            .await
            .unwrap()
    }

    /// Creates an order and reports its food ready, as the kitchen would:
    /// server-side apply of `status.kitchen` as `dishpatch-kitchen`.
    pub async fn ready_order(&self, name: &str) -> Order {
        let o = self
            .orders()
            .create(
                &PostParams::default(),
                &fixtures::order(name, RESTAURANT, &[("pizza", 1)]),
            )
            .await
            .unwrap();
        let now = Time(jiff::Timestamp::now());
        let patch = serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Order",
            "status": {"kitchen": {"state": "Ready", "ticketAcceptedAt": now, "readyAt": now}},
        });
        self.orders()
            .patch_status(
                name,
                &PatchParams::apply("dishpatch-kitchen").force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
        o
    }

    /// Publishes an event about `o` as `source` would.
    pub async fn publish(&self, kind: EventType, source: &str, o: &Order) {
        let r = OrderRef {
            namespace: self.ns.name.clone(),
            name: o.name_any(),
            uid: o.uid().unwrap(),
        };
        let tp = trace::child_traceparent(&trace::trace_id(&r.uid, None));
        let event = CloudEvent::new(kind, source, r, None, jiff::Timestamp::now().to_string());
        self.broker.publish(&event, &tp).await.unwrap();
    }

    pub async fn kitchen_ready(&self, o: &Order) {
        self.publish(EventType::KitchenReady, "kitchen", o).await;
    }

    /// Cancels the order as the customer and the operator would: the request
    /// in the spec, the `Cancelled` condition, then `order.cancelled`.
    pub async fn cancel(&self, o: &Order) {
        let name = o.name_any();
        self.orders()
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"cancellation": {"reason": "changed my mind"}}}),
                ),
            )
            .await
            .unwrap();
        let patch = serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Order",
            "status": {"phase": "Cancelled", "conditions": [{
                "type": "Cancelled", "status": "True", "reason": "CustomerRequested",
                "message": "changed my mind", "lastTransitionTime": Time(jiff::Timestamp::now()),
            }]},
        });
        self.orders()
            .patch_status(
                &name,
                &PatchParams::apply("dishpatch-operator").force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
        self.publish(EventType::OrderCancelled, "operator", o).await;
    }

    pub async fn order(&self, name: &str) -> Order {
        self.orders().get(name).await.unwrap()
    }

    pub async fn courier_status(&self, name: &str) -> CourierStatus {
        self.couriers()
            .get(name)
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    /// Waits until the order satisfies `done`; panics with the last state otherwise.
    pub async fn wait_order(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Order) -> bool,
    ) -> Order {
        dishpatch_testkit::wait_for(&self.orders(), name, timeout, what, done, |o| o.status).await
    }

    pub async fn wait_courier(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&CourierStatus) -> bool,
    ) -> CourierStatus {
        let api = self.couriers();
        let (ok, last) = eventually(
            timeout,
            || async {
                api.get(name)
                    .await
                    .ok()
                    .map(|c| c.status.unwrap_or_default())
            },
            |s| s.as_ref().is_some_and(&done),
        )
        .await;
        assert!(
            ok,
            "courier {name}: {what} did not happen within {timeout:?}; last seen: {last:#?}"
        );
        last.unwrap_or_default()
    }

    /// Messages in the delivery queue's dead-letter queue (taken out to count them).
    pub async fn dead_letters(&self) -> usize {
        let channel = self.broker.channel().await.unwrap();
        let queue = dead_letter_queue("dishpatch.delivery");
        let mut n = 0;
        while channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some()
        {
            n += 1;
        }
        n
    }
}

pub fn delivery(o: &Order) -> Option<&DeliveryStatus> {
    o.status.as_ref().and_then(|s| s.delivery.as_ref())
}

pub fn state(o: &Order) -> Option<dishpatch_api::order::DeliveryState> {
    delivery(o).map(|d| d.state)
}
