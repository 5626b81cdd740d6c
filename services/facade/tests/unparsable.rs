//! One Order that does not parse must not break the façade's cache: other
//! orders are still placed, read, listed and followed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Facade, SseReader, order_body};
use hyper::{Method, StatusCode};
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
    break_order(client, ns, "broken").await;
}

/// Makes the existing order `name` unparsable (see [`broken_order`]).
async fn break_order(client: kube::Client, ns: &str, name: &str) {
    dishpatch_testkit::break_order(&client, ns, name, "Queued")
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

#[tokio::test]
async fn an_order_that_stops_parsing_and_goes_is_gone() {
    let f = Facade::start("fc-unparsable-gone", &[]).await;
    let token = f.token("customer", "cust-gone").await;
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);
    let id = placed.json["id"].as_str().unwrap().to_string();
    let response = f
        .send(
            Method::GET,
            &format!("/api/v1/orders/{id}/events"),
            Some(&token),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut sse = SseReader::new(response);
    assert!(sse.next(Duration::from_secs(10)).await.is_some());

    // Some writer breaks the order, then it is deleted: the façade can't
    // parse what the watch says of it, but it is gone all the same.
    let client = dishpatch_testkit::client().await.unwrap();
    break_order(client.clone(), &f.ns.name, &id).await;
    kube::Api::<kube::core::DynamicObject>::namespaced_with(
        client,
        &f.ns.name,
        &kube::core::ApiResource::erase::<dishpatch_api::Order>(&()),
    )
    .delete(&id, &Default::default())
    .await
    .unwrap();

    let (gone, last) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || async { f.get(&format!("/api/v1/orders/{id}"), &token).await.status },
        |s| *s == StatusCode::NOT_FOUND,
    )
    .await;
    assert!(gone, "a deleted order is still served: {last:?}");
    let mut ended = false;
    while let Some(event) = sse.next(Duration::from_secs(5)).await {
        if event.event == "deleted" {
            ended = true;
            break;
        }
    }
    assert!(ended, "the stream of a deleted order did not end");
}

/// A Courier whose offer expires past the largest timestamp the Rust types
/// hold (the schema only says date-time).
async fn broken_courier(client: kube::Client, ns: &str) {
    let untyped: kube::Api<kube::core::DynamicObject> = kube::Api::namespaced_with(
        client,
        ns,
        &kube::core::ApiResource::erase::<dishpatch_api::Courier>(&()),
    );
    let courier: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
        "metadata": {"name": "broken"},
        "spec": {"displayName": "Broken", "zone": "mitte", "onShift": true, "vehicle": "Bicycle"}
    }))
    .unwrap();
    untyped
        .create(&PostParams::default(), &courier)
        .await
        .unwrap();
    let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
        "status": {"offer": {"order": "o-1", "expiresAt": "9999-12-31T23:59:59Z"}}});
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
async fn a_courier_that_does_not_parse_breaks_nothing_else() {
    // Facade::start waits for readiness, which needs every cache listed.
    let f = Facade::start_with("fc-unparsable-cour", &[], |client, ns| async move {
        broken_courier(client, &ns).await
    })
    .await;
    let token = f.token("customer", "cust-cour").await;
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);
}
