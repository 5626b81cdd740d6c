//! The apiserver's own write ceiling for objects of an Order's size, with no
//! dishpatch component running: creates, status merge-patches and status
//! server-side applies (what the workers send) per second, under the Order
//! CRD (schema, CEL), under the Order's spec schema with an unvalidated
//! status, and under a CRD with no schema (`x-kubernetes-preserve-unknown-
//! fields`) carrying the same JSON. Every throughput figure of the platform
//! is best read as a fraction of this, measured on the same machine in the
//! same run: `make bench`.
//!
//! `cargo bench -p dishpatch-e2e --bench ceiling` against the local control
//! plane (`hack/cluster.sh up`); run it with nothing else using the control
//! plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use dishpatch_testkit::{TestNamespace, client, ensure_crds, fixtures};
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

const OBJECTS: usize = 600;
const IN_FLIGHT: usize = 32;

/// A CRD that stores whatever it is given: the cost of a write without
/// schema validation or CEL.
fn schemaless_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "blobs.bench.dishpatch.dev"},
        "spec": {
            "group": "bench.dishpatch.dev",
            "names": {"kind": "Blob", "plural": "blobs", "singular": "blob", "listKind": "BlobList"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                }}
            }]
        }
    }))
    .unwrap()
}

/// The Order CRD under another group, with its spec schema and CEL rules as
/// they are but a status the apiserver stores unvalidated: what a status
/// write costs when only `spec`, where users write, is checked.
fn order_with_open_status_crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(dishpatch_api::Order::crd()).unwrap();
    crd["metadata"]["name"] = "openorders.bench.dishpatch.dev".into();
    crd["spec"]["group"] = "bench.dishpatch.dev".into();
    crd["spec"]["names"] = json!({"kind": "OpenOrder", "plural": "openorders",
        "singular": "openorder", "listKind": "OpenOrderList"});
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        v["schema"]["openAPIV3Schema"]["properties"]["status"] =
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    }
    serde_json::from_value(crd).unwrap()
}

/// An Order as a dynamic object (same body for both kinds).
fn body(i: usize, api_version: &str, kind: &str) -> DynamicObject {
    let mut order = serde_json::to_value(fixtures::order(
        &format!("o{i}"),
        "roma",
        &[("pizza", 2), ("water", 3)],
    ))
    .unwrap();
    order["apiVersion"] = api_version.into();
    order["kind"] = kind.into();
    serde_json::from_value(order).unwrap()
}

/// A status section of the size the workers write.
fn status_patch(i: usize) -> Value {
    let now = jiff::Timestamp::now().to_string();
    json!({"status": {"payment": {
        "state": "Succeeded", "provider": "simulated", "paymentId": format!("ch_sim_{i:016x}"),
        "amount": {"amount": 2500, "currency": "EUR", "display": "25.00 EUR"}, "chargedAt": now
    }}})
}

struct Rates {
    creates: f64,
    patches: f64,
    /// Server-side applies of a second section, as the workers write.
    applies: f64,
}

/// Runs `write` for every object, `IN_FLIGHT` at a time; writes per second.
async fn rate<F, Fut>(write: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let ok = futures::stream::iter(0..OBJECTS)
        .map(write)
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, OBJECTS, "every write succeeded");
    ok as f64 / started.elapsed().as_secs_f64()
}

async fn measure(api: &Api<DynamicObject>, api_version: &str, kind: &str) -> Rates {
    let creates = rate(|i| {
        let api = api.clone();
        let obj = body(i, api_version, kind);
        async move { api.create(&PostParams::default(), &obj).await.is_ok() }
    })
    .await;
    let patches = rate(|i| {
        let api = api.clone();
        async move {
            api.patch_status(
                &format!("o{i}"),
                &PatchParams::default(),
                &Patch::Merge(&status_patch(i)),
            )
            .await
            .is_ok()
        }
    })
    .await;
    let applies = rate(|i| {
        let api = api.clone();
        let now = jiff::Timestamp::now().to_string();
        let section = json!({"apiVersion": api_version, "kind": kind, "status": {
            "phase": "Preparing",
            "kitchen": {"state": "Preparing", "ticket": i + 1, "ticketAcceptedAt": now, "estimatedReadyAt": now}
        }});
        async move {
            api.patch_status(
                &format!("o{i}"),
                &PatchParams::apply("dishpatch-kitchen").force(),
                &Patch::Apply(&section),
            )
            .await
            .is_ok()
        }
    })
    .await;
    Rates {
        creates,
        patches,
        applies,
    }
}

async fn install(crds: &Api<CustomResourceDefinition>, crd: &CustomResourceDefinition) {
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(
        &name,
        &PatchParams::apply("dishpatch-bench").force(),
        &Patch::Apply(crd),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds.clone(), &name, conditions::is_crd_established()),
    )
    .await
    .unwrap()
    .unwrap();
}

fn bench_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "bench.dishpatch.dev".into(),
        version: "v1alpha1".into(),
        api_version: "bench.dishpatch.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[tokio::main]
async fn main() {
    let client = client()
        .await
        .expect("the local control plane (hack/cluster.sh up)");
    ensure_crds(&client).await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    install(&crds, &schemaless_crd()).await;
    install(&crds, &order_with_open_status_crd()).await;

    let ns = TestNamespace::create(&client, "ceiling").await.unwrap();
    let orders: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<dishpatch_api::Order>(&()),
    );
    let open: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &bench_resource("OpenOrder", "openorders"),
    );
    let blobs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &bench_resource("Blob", "blobs"));

    // Warm the apiserver's caches and connections, then measure all in one run.
    let _ = measure_warmup(&orders).await;
    let order = measure(&orders, "dishpatch.dev/v1alpha1", "Order").await;
    let open_status = measure(&open, "bench.dishpatch.dev/v1alpha1", "OpenOrder").await;
    let plain = measure(&blobs, "bench.dishpatch.dev/v1alpha1", "Blob").await;

    println!(
        "apiserver write ceiling: {OBJECTS} objects of an Order's size, {IN_FLIGHT} requests in flight"
    );
    println!(
        "| CRD | creates/s | status merge-patches/s | status applies/s | applies ÷ no schema |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, r) in [
        ("Order (schema + CEL)", &order),
        ("Order spec, status unvalidated", &open_status),
        ("no schema", &plain),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} |",
            r.creates,
            r.patches,
            r.applies,
            r.applies / plain.applies
        );
    }
    drop(ns);
}

/// A few writes first, so connection set-up and cold caches don't count.
async fn measure_warmup(api: &Api<DynamicObject>) -> usize {
    futures::stream::iter(0..IN_FLIGHT)
        .map(|i| {
            let api = api.clone();
            let obj = body(OBJECTS + i, "dishpatch.dev/v1alpha1", "Order");
            async move { api.create(&PostParams::default(), &obj).await.is_ok() }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}
