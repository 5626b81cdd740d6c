//! The whole platform as real processes, scoped to one namespace and one
//! RabbitMQ vhost, against the real local control plane.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_messaging::Broker;
use dishpatch_testkit::{
    TestNamespace, amqp_vhost, binary, client, ensure_crds, eventually, kubeconfig_path,
};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use tokio::process::{Child, Command};

pub struct Platform {
    pub client: Client,
    pub ns: TestNamespace,
    pub amqp_url: String,
    pub broker: Broker,
    pub ledger: PathBuf,
}

pub const SCALE: &str = "0";

impl Platform {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await.unwrap();
        ensure_crds(&client).await.unwrap();
        let ns = TestNamespace::create(&client, prefix).await.unwrap();
        let amqp_url = amqp_vhost(&ns.name).await.unwrap();
        let broker = Broker::connect(&amqp_url, "test").await.unwrap();
        let ledger = std::env::temp_dir().join(format!("dishpatch-ledger-{}.jsonl", ns.name));
        let _ = std::fs::remove_file(&ledger);
        Self {
            client,
            ns,
            amqp_url,
            broker,
            ledger,
        }
    }

    /// Starts one component (`operator`, `payment`, `kitchen`, `delivery`).
    pub fn start(&self, component: &str, extra: &[&str]) -> Child {
        self.start_env(component, extra, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_env(&self, component: &str, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let path = binary(&format!("dishpatch-{component}"));
        assert!(
            path.exists(),
            "{} is not built: run `cargo build --workspace --bins` (make test does)",
            path.display()
        );
        let mut cmd = Command::new(path);
        cmd.arg("run")
            .args(["--amqp-url", &self.amqp_url])
            .args(["--admin-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let scale = if extra.contains(&"--time-scale") {
            &[][..]
        } else {
            &["--time-scale", SCALE][..]
        };
        match component {
            "operator" => {
                cmd.args(["--namespace", &self.ns.name, "--identity", "e2e"]);
            }
            "payment" => {
                cmd.args(["--gateway", "simulated"])
                    .args(["--ledger", &self.ledger.display().to_string()]);
            }
            "kitchen" => {
                cmd.args(["--namespace", &self.ns.name]).args(scale);
            }
            "delivery" => {
                cmd.args(["--namespace", &self.ns.name, "--auto-accept"])
                    .args(scale);
            }
            _ => {}
        }
        cmd.args(extra);
        cmd.spawn().unwrap()
    }

    /// Every component, one replica each.
    pub fn start_all(&self) -> Vec<Child> {
        ["operator", "payment", "kitchen", "delivery"]
            .iter()
            .map(|c| self.start(c, &[]))
            .collect()
    }

    pub fn orders(&self) -> Api<Order> {
        self.ns.api()
    }

    pub async fn create_restaurant(&self, r: Restaurant) {
        self.ns
            .api::<Restaurant>()
            .create(&PostParams::default(), &r)
            .await
            .unwrap();
    }

    pub async fn create_couriers(&self, n: usize) {
        let api: Api<Courier> = self.ns.api();
        for i in 0..n {
            let c: Courier = serde_json::from_value(serde_json::json!({
                "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
                "metadata": {"name": format!("courier-{i}")},
                "spec": {"displayName": format!("Courier {i}"), "zone": "mitte", "onShift": true, "vehicle": "Bicycle"}
            }))
            .unwrap();
            api.create(&PostParams::default(), &c).await.unwrap();
        }
    }

    pub async fn create_order(&self, o: Order) -> Order {
        self.orders()
            .create(&PostParams::default(), &o)
            .await
            .unwrap()
    }

    pub async fn wait_order(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Order) -> bool,
    ) -> Order {
        dishpatch_testkit::wait_for(&self.orders(), name, timeout, what, done, |o| o).await
    }

    /// Waits until every order is in a terminal phase; returns them.
    pub async fn wait_all_terminal(&self, timeout: Duration) -> Vec<Order> {
        let api = self.orders();
        let lp = ListParams::default();
        let (ok, last) = eventually(
            timeout,
            || api.list(&lp),
            |l| {
                l.as_ref().is_ok_and(|l| {
                    l.items
                        .iter()
                        .all(|o| phase(o).is_some_and(|p| p.is_terminal()))
                })
            },
        )
        .await;
        let items = last.unwrap().items;
        if !ok {
            let mut by_phase = std::collections::BTreeMap::new();
            for o in &items {
                *by_phase.entry(format!("{:?}", phase(o))).or_insert(0) += 1;
            }
            panic!("not all orders finished within {timeout:?}: {by_phase:?}");
        }
        items
    }

    /// The simulated gateway's ledger lines for one order.
    pub fn ledger(&self, uid: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["orderUid"] == uid)
            .collect()
    }
}

pub fn phase(o: &Order) -> Option<OrderPhase> {
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

pub fn kinds(entries: &[serde_json::Value], kind: &str) -> usize {
    entries.iter().filter(|e| e["kind"] == kind).count()
}
