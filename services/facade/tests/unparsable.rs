//! One Order that does not parse must not break the façade's cache: other
//! orders are still placed, read, listed and followed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Facade, order_body};
use hyper::StatusCode;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// `9999-12-31T23:59:59Z` is a valid date-time to the apiserver's schema
/// but past the largest timestamp the Rust types hold.
async fn broken_order(client: kube::Client, ns: &str) {
    kube::Api::<dishpatch_api::Order>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &dishpatch_testkit::fixtures::order("broken", "trattoria", &[("pizza", 1)]),
        )
        .await
        .unwrap();
    let untyped: kube::Api<kube::core::DynamicObject> = kube::Api::namespaced_with(
        client,
        ns,
        &kube::core::ApiResource::erase::<dishpatch_api::Order>(&()),
    );
    let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order",
        "status": {"kitchen": {"state": "Queued", "estimatedReadyAt": "9999-12-31T23:59:59Z"}}});
    untyped
        .patch_status(
            "broken",
            &PatchParams::apply("a-broken-tool").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_order_that_does_not_parse_breaks_nothing_else() {
    // There when the façade starts: its first list of Orders meets it.
    let f = Facade::start_with("fc-unparsable", &[], |client, ns| async move {
        broken_order(client, &ns).await
    })
    .await;
    let token = f.token("customer", "cust-after").await;
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);
    let id = placed.json["id"].as_str().unwrap().to_string();
    let read = f.get(&format!("/api/v1/orders/{id}"), &token).await;
    assert_eq!(
        read.status,
        StatusCode::OK,
        "a new order is not in the cache: {}",
        read.json
    );
    let list = f.get("/api/v1/orders", &token).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(
        list.json["items"].as_array().unwrap().len(),
        1,
        "{}",
        list.json
    );
}
