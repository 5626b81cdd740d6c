//! The apiserver's own write ceiling for objects of an Order's size, with no
//! dishpatch component running: creates and status merge-patches per second,
//! once under the Order CRD (schema, CEL) and once under a CRD with no schema
//! (`x-kubernetes-preserve-unknown-fields`) carrying the same JSON. Every
//! throughput figure of the platform is best read as a fraction of this,
//! measured on the same machine in the same run: `make bench`.
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
}

async fn measure(api: &Api<DynamicObject>, api_version: &str, kind: &str) -> Rates {
    let started = Instant::now();
    let created = futures::stream::iter(0..OBJECTS)
        .map(|i| {
            let api = api.clone();
            let obj = body(i, api_version, kind);
            async move { api.create(&PostParams::default(), &obj).await.is_ok() }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let creates = created as f64 / started.elapsed().as_secs_f64();
    assert_eq!(created, OBJECTS, "every create succeeded");

    let started = Instant::now();
    let patched = futures::stream::iter(0..OBJECTS)
        .map(|i| {
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
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let patches = patched as f64 / started.elapsed().as_secs_f64();
    assert_eq!(patched, OBJECTS, "every status patch succeeded");
    Rates { creates, patches }
}

#[tokio::main]
async fn main() {
    let client = client()
        .await
        .expect("the local control plane (hack/cluster.sh up)");
    ensure_crds(&client).await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let blob = schemaless_crd();
    crds.patch(
        "blobs.bench.dishpatch.dev",
        &PatchParams::apply("dishpatch-bench").force(),
        &Patch::Apply(&blob),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds.clone(),
            "blobs.bench.dishpatch.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .unwrap()
    .unwrap();

    let ns = TestNamespace::create(&client, "ceiling").await.unwrap();
    let orders: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<dishpatch_api::Order>(&()),
    );
    let blob_resource = ApiResource {
        group: "bench.dishpatch.dev".into(),
        version: "v1alpha1".into(),
        api_version: "bench.dishpatch.dev/v1alpha1".into(),
        kind: "Blob".into(),
        plural: "blobs".into(),
    };
    let blobs: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &blob_resource);

    // Warm the apiserver's caches and connections, then measure both in one run.
    let _ = measure_warmup(&orders).await;
    let order = measure(&orders, "dishpatch.dev/v1alpha1", "Order").await;
    let plain = measure(&blobs, "bench.dishpatch.dev/v1alpha1", "Blob").await;

    println!(
        "apiserver write ceiling: {OBJECTS} objects of an Order's size, {IN_FLIGHT} requests in flight"
    );
    println!("| CRD | creates/s | status patches/s |");
    println!("| --- | --- | --- |");
    println!(
        "| Order (schema + CEL) | {:.0} | {:.0} |",
        order.creates, order.patches
    );
    println!(
        "| no schema | {:.0} | {:.0} |",
        plain.creates, plain.patches
    );
    println!(
        "| Order / no schema | {:.2} | {:.2} |",
        order.creates / plain.creates,
        order.patches / plain.patches
    );
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
