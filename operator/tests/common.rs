//! A test bed: a namespace, a RabbitMQ vhost, and real operator processes
//! scoped to them, against the real local control plane.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use dishpatch_api::events::EventType;
use dishpatch_api::{Order, Restaurant};
use dishpatch_messaging::{Broker, EventTap};
use dishpatch_testkit::{TestNamespace, amqp_vhost, client, ensure_crds, kubeconfig_path};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::process::{Child, Command};

pub struct Bed {
    pub client: Client,
    pub ns: TestNamespace,
    pub amqp_url: String,
    pub broker: Broker,
}

pub struct Operator {
    pub identity: String,
    pub child: Child,
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
        }
    }

    pub async fn tap(&self, kinds: &[EventType]) -> EventTap {
        EventTap::new(&self.broker, kinds).await.unwrap()
    }

    /// Starts a real `dishpatch-operator run` scoped to this namespace.
    pub fn operator(&self, identity: &str, extra: &[&str]) -> Operator {
        self.operator_via(identity, extra, &kubeconfig_path())
    }

    /// Like [`operator`](Self::operator), talking to the apiserver through
    /// the given kubeconfig (for example one that points at a proxy).
    pub fn operator_via(
        &self,
        identity: &str,
        extra: &[&str],
        kubeconfig: &std::path::Path,
    ) -> Operator {
        let child = Command::new(env!("CARGO_BIN_EXE_dishpatch-operator"))
            .arg("run")
            .args(["--namespace", &self.ns.name])
            .args(["--amqp-url", &self.amqp_url])
            .args(if extra.contains(&"--admin-addr") {
                &[][..]
            } else {
                &["--admin-addr", "127.0.0.1:0"][..]
            })
            .args(["--identity", identity])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the operator");
        Operator {
            identity: identity.to_string(),
            child,
        }
    }

    pub fn orders(&self) -> Api<Order> {
        self.ns.api()
    }

    pub fn restaurants(&self) -> Api<Restaurant> {
        self.ns.api()
    }

    pub async fn create_restaurant(&self, r: Restaurant) -> Restaurant {
        self.restaurants()
            .create(&PostParams::default(), &r)
            .await
            .unwrap()
    }

    pub async fn create_order(&self, o: Order) -> Order {
        self.orders()
            .create(&PostParams::default(), &o)
            .await
            .unwrap()
    }

    /// Waits until the order satisfies `done`; panics with the last state otherwise.
    pub async fn wait_order(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Order) -> bool,
    ) -> Order {
        dishpatch_testkit::wait_for(&self.orders(), name, timeout, what, done, |o| o).await
    }

    pub async fn restaurant(&self, name: &str) -> Restaurant {
        self.restaurants().get(name).await.unwrap()
    }
}

pub fn phase(o: &Order) -> Option<dishpatch_api::OrderPhase> {
    o.status.as_ref().and_then(|s| s.phase)
}

pub fn condition<'a>(
    o: &'a Order,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    o.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// Available portions of `pizza` as the restaurant's status says.
pub fn pizza_available(r: &Restaurant) -> Option<i64> {
    r.status
        .as_ref()
        .and_then(|s| s.inventory.iter().find(|e| e.menu_item == "pizza"))
        .map(|e| e.available)
}
