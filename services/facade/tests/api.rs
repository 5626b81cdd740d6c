//! The façade against the real apiserver: idempotency, isolation, error
//! mapping, rate limiting, live tracking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Facade, SseReader, order_body};
use dishpatch_api::Order;
use hyper::{Method, StatusCode};
use kube::api::{ListParams, Patch, PatchParams};

#[tokio::test]
async fn idempotent_retries_create_one_order() {
    let f = Facade::start("fc-idem", &[]).await;
    let token = f.token("customer", "cust-idem").await;
    let body = order_body(&[("pizza", 2), ("water", 1)]);
    let key = [("idempotency-key", "retry-1")];

    let first = f
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&token),
            &key,
            Some(body.clone()),
        )
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.json);
    let id = first.json["id"].as_str().unwrap().to_string();
    assert_eq!(
        first.headers.get("location").unwrap(),
        &format!("/api/v1/orders/{id}")
    );
    assert_eq!(first.json["phase"], "Pending");
    assert!(
        first.json.get("payment").is_none(),
        "payment token must not be shown"
    );

    let retry = f
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&token),
            &key,
            Some(body.clone()),
        )
        .await
        .unwrap();
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.json);
    assert_eq!(retry.json["id"], id.as_str());

    // Same key, different order: a conflict, not a second order.
    let other = f
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&token),
            &key,
            Some(order_body(&[("pizza", 3)])),
        )
        .await
        .unwrap();
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.json);
    assert!(other.content_type().starts_with("application/problem+json"));

    let orders =
        f.ns.api::<Order>()
            .list(&ListParams::default())
            .await
            .unwrap();
    assert_eq!(orders.items.len(), 1);
    // The order carries a trace context for every component to join.
    let tp = orders.items[0]
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("dishpatch.dev/traceparent"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tp.split('-').count(), 4, "{tp:?}");

    // A caller's trace context is continued, not replaced.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced = f
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&token),
            &[(
                "traceparent",
                &format!("00-{caller_trace}-00f067aa0ba902b7-01"),
            )],
            Some(order_body(&[("water", 1)])),
        )
        .await
        .unwrap();
    assert_eq!(traced.status, StatusCode::CREATED, "{}", traced.json);
    let traced_id = traced.json["id"].as_str().unwrap().to_string();
    let o = f.ns.api::<Order>().get(&traced_id).await.unwrap();
    let tp = o
        .metadata
        .annotations
        .unwrap_or_default()
        .remove("dishpatch.dev/traceparent")
        .unwrap_or_default();
    assert!(tp.starts_with(&format!("00-{caller_trace}-")), "{tp}");
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a new span, not the caller's: {tp}"
    );
    f.ns.api::<Order>()
        .delete(&traced_id, &Default::default())
        .await
        .unwrap();

    // The same key from another customer is another order.
    let token_b = f.token("customer", "cust-other").await;
    let b = f
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&token_b),
            &key,
            Some(body),
        )
        .await
        .unwrap();
    assert_eq!(b.status, StatusCode::CREATED);
    assert_ne!(b.json["id"], id.as_str());

    // Without a key each request is a new order, listed newest first.
    // Creation timestamps have one-second resolution: let one tick by.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let c = f
        .post("/api/v1/orders", &token, order_body(&[("water", 1)]))
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.json);
    let page = f.get("/api/v1/orders?limit=1", &token).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.json["items"].as_array().unwrap().len(), 1);
    assert_eq!(page.json["items"][0]["id"], c.json["id"]);
    let cont = page.json["continue"].as_str().unwrap();
    let page2 = f
        .get(&format!("/api/v1/orders?limit=10&continue={cont}"), &token)
        .await;
    let ids: Vec<_> = page2.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].clone())
        .collect();
    assert_eq!(ids, vec![serde_json::Value::from(id.as_str())]);
    assert!(page2.json.get("continue").is_none());
}

#[tokio::test]
async fn customers_see_only_their_own_orders() {
    let f = Facade::start("fc-iso", &[]).await;
    let alice = f.token("customer", "alice").await;
    let bob = f.token("customer", "bob").await;
    let admin = f.token("admin", "ops").await;
    let placed = f
        .post("/api/v1/orders", &alice, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);
    let id = placed.json["id"].as_str().unwrap();

    assert_eq!(
        f.get(&format!("/api/v1/orders/{id}"), &alice).await.status,
        StatusCode::OK
    );
    for reply in [
        f.get(&format!("/api/v1/orders/{id}"), &bob).await,
        f.get(&format!("/api/v1/orders/{id}/events"), &bob).await,
        f.post(
            &format!("/api/v1/orders/{id}/cancel"),
            &bob,
            serde_json::json!({"reason": "mine now"}),
        )
        .await,
    ] {
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.json);
        assert!(reply.content_type().starts_with("application/problem+json"));
    }
    let bobs = f.get("/api/v1/orders", &bob).await;
    assert_eq!(bobs.json["items"].as_array().unwrap().len(), 0);
    assert_eq!(
        f.get(&format!("/api/v1/orders/{id}"), &admin).await.status,
        StatusCode::OK
    );

    // A courier token is not a customer token; no token is 401.
    let courier = f.token("courier", "carla").await;
    assert_eq!(
        f.get(&format!("/api/v1/orders/{id}"), &courier)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let anon = f
        .call(Method::GET, "/api/v1/orders", None, &[], None)
        .await
        .unwrap();
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
    assert!(anon.headers.contains_key("www-authenticate"));
    assert_eq!(anon.json["instance"], "/api/v1/orders");

    // Cancelling: Alice may, once; a different reason later is refused.
    let cancel = f
        .post(
            &format!("/api/v1/orders/{id}/cancel"),
            &alice,
            serde_json::json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED, "{}", cancel.json);
    assert_eq!(cancel.json["cancellationReason"], "changed my mind");
    let again = f
        .post(
            &format!("/api/v1/orders/{id}/cancel"),
            &alice,
            serde_json::json!({"reason": "other"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.json);
    // Rating needs a delivered order.
    let rate = f
        .post(
            &format!("/api/v1/orders/{id}/feedback"),
            &alice,
            serde_json::json!({"rating": 5}),
        )
        .await;
    assert_eq!(rate.status, StatusCode::CONFLICT, "{}", rate.json);
}

#[tokio::test]
async fn crd_rejections_are_422_problems_naming_the_field() {
    let f = Facade::start("fc-422", &[]).await;
    let token = f.token("customer", "cust-422").await;
    // Each menu item at most once: only the CRD's CEL rule knows that.
    let dup = f
        .post(
            "/api/v1/orders",
            &token,
            order_body(&[("pizza", 1), ("pizza", 2)]),
        )
        .await;
    assert_eq!(dup.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", dup.json);
    assert!(dup.content_type().starts_with("application/problem+json"));
    let fields: Vec<&str> = dup.json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.iter().any(|f| f.starts_with("spec.items")),
        "{}",
        dup.json
    );
    assert!(
        dup.json["detail"].as_str().unwrap().contains("only once"),
        "{}",
        dup.json
    );
    assert_eq!(dup.json["status"], 422);

    // Quantity out of the schema's bounds.
    let big = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 100)]))
        .await;
    assert_eq!(big.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", big.json);
    assert!(
        big.json["errors"][0]["field"]
            .as_str()
            .unwrap()
            .contains("quantity"),
        "{}",
        big.json
    );

    // The façade's own checks: not on the menu, a card number as token, a bad body.
    let unknown = f
        .post("/api/v1/orders", &token, order_body(&[("sushi", 1)]))
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unknown.json["errors"][0]["field"], "items[0].menuItem");
    let mut card = order_body(&[("pizza", 1)]);
    card["payment"]["token"] = "4242424242424242".into();
    let card = f.post("/api/v1/orders", &token, card).await;
    assert_eq!(card.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(card.json["errors"][0]["field"], "payment.token");
    assert!(!card.json.to_string().contains("4242"));
    // behind a provider prefix too: the façade refuses it itself (the field
    // is its own `payment.token`, not the CRD's `spec.payment.token`), so
    // the number never reaches the apiserver or its audit log
    for t in ["tok_4242424242424242", "pm_4000056655665556"] {
        let mut card = order_body(&[("pizza", 1)]);
        card["payment"]["token"] = t.into();
        let card = f.post("/api/v1/orders", &token, card).await;
        assert_eq!(
            card.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{t}: {}",
            card.json
        );
        assert_eq!(card.json["errors"][0]["field"], "payment.token", "{t}");
        assert!(
            !card.json.to_string().contains(&t[t.len() - 12..]),
            "{}",
            card.json
        );
    }
    let mut wrong = order_body(&[("pizza", 1)]);
    wrong["items"][0]["quantity"] = "two".into();
    let wrong = f.post("/api/v1/orders", &token, wrong).await;
    assert_eq!(wrong.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(wrong.json["errors"][0]["field"], "items[0].quantity");

    let orders =
        f.ns.api::<Order>()
            .list(&ListParams::default())
            .await
            .unwrap();
    assert!(orders.items.is_empty());

    // The log is written (an accepted order is logged), and no card number is in it.
    let ok = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.json);
    let (logged, log) = dishpatch_testkit::eventually(
        Duration::from_secs(5),
        || async { std::fs::read_to_string(&f.log).unwrap_or_default() },
        |l| l.contains("order placed"),
    )
    .await;
    assert!(logged, "the façade's log has no 'order placed': {log}");
    for digits in ["4242424242", "4000056655665556"] {
        assert!(
            !log.contains(digits),
            "a card number is in the façade's log"
        );
    }
}

#[tokio::test]
async fn bursts_get_429_with_retry_after() {
    let f = Facade::start("fc-429", &["--rate-limit", "1", "--rate-burst", "5"]).await;
    let token = f.token("customer", "cust-burst").await;
    let mut limited = None;
    for _ in 0..20 {
        let r = f.get("/api/v1/restaurants", &token).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = limited.expect("no 429 in a burst of 20");
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert!(r.content_type().starts_with("application/problem+json"));
    // Other clients are not throttled by this one's burst.
    let other = f.token("customer", "cust-calm").await;
    assert_eq!(
        f.get("/api/v1/restaurants", &other).await.status,
        StatusCode::OK
    );
    // Probes never are.
    let ready = f
        .call(Method::GET, &f.admin_url("/readyz"), None, &[], None)
        .await
        .unwrap();
    assert_eq!(ready.status, StatusCode::OK);
}

async fn set_phase(f: &Facade, name: &str, phase: &str) {
    let patch = serde_json::json!({
        "apiVersion": "dishpatch.dev/v1alpha1",
        "kind": "Order",
        "status": {"phase": phase}
    });
    f.ns.api::<Order>()
        .patch_status(
            name,
            &PatchParams::apply("dishpatch-operator").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn sse_delivers_every_transition_in_order() {
    let f = Facade::start("fc-sse", &[]).await;
    let token = f.token("customer", "cust-sse").await;
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
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut sse = SseReader::new(response);
    let first = sse
        .next(Duration::from_secs(10))
        .await
        .expect("initial state");
    assert_eq!(first.event, "order");
    let first_json: serde_json::Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(first_json["phase"], "Pending");
    assert_eq!(first.id, first_json["resourceVersion"].as_str().unwrap());

    let phases = [
        "Accepted",
        "Paid",
        "Preparing",
        "Ready",
        "OutForDelivery",
        "Delivered",
    ];
    for p in phases {
        set_phase(&f, &id, p).await;
    }
    let mut seen = Vec::new();
    let mut last_id = first.id.clone();
    while seen.len() < phases.len() {
        let Some(ev) = sse.next(Duration::from_secs(15)).await else {
            break;
        };
        let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(ev.id, data["resourceVersion"].as_str().unwrap());
        last_id = ev.id.clone();
        seen.push(data["phase"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, phases, "transitions out of order or missing");

    // Resuming with the current id sends nothing new; an old id sends the current state.
    let stale = f
        .send(
            Method::GET,
            &format!("/api/v1/orders/{id}/events"),
            Some(&token),
            &[("last-event-id", &first.id)],
            None,
        )
        .await
        .unwrap();
    let ev = SseReader::new(stale)
        .next(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ev.id, last_id);
    let current = f
        .send(
            Method::GET,
            &format!("/api/v1/orders/{id}/events"),
            Some(&token),
            &[("last-event-id", &last_id)],
            None,
        )
        .await
        .unwrap();
    assert!(
        SseReader::new(current)
            .next(Duration::from_secs(1))
            .await
            .is_none()
    );

    // Delivered: rate it once.
    let rate = f
        .post(
            &format!("/api/v1/orders/{id}/feedback"),
            &token,
            serde_json::json!({"rating": 5, "comment": "hot and fast"}),
        )
        .await;
    assert_eq!(rate.status, StatusCode::OK, "{}", rate.json);
    assert_eq!(rate.json["feedback"]["rating"], 5);
    let again = f
        .post(
            &format!("/api/v1/orders/{id}/feedback"),
            &token,
            serde_json::json!({"rating": 1}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let bad = f
        .post(
            &format!("/api/v1/orders/{id}/feedback"),
            &token,
            serde_json::json!({"rating": 9}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let stored = f.ns.api::<Order>().get(&id).await.unwrap();
    let ann = stored.metadata.annotations.unwrap();
    assert_eq!(ann["dishpatch.dev/rating"], "5");
    assert_eq!(ann["dishpatch.dev/feedback"], "hot and fast");
}

#[tokio::test]
async fn openapi_and_pages_are_served() {
    let f = Facade::start("fc-doc", &[]).await;
    let spec = f
        .call(Method::GET, "/api/v1/openapi.json", None, &[], None)
        .await
        .unwrap();
    assert_eq!(spec.status, StatusCode::OK);
    assert!(spec.json["openapi"].as_str().unwrap().starts_with("3.1"));
    for page in ["/", "/courier", "/api/v1/docs"] {
        let r = f.call(Method::GET, page, None, &[], None).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{page}");
        assert!(r.content_type().starts_with("text/html"), "{page}");
    }
    // Metrics and probes are on the admin listener, not the public port.
    for path in ["/metrics", "/readyz", "/healthz"] {
        let public = f.call(Method::GET, path, None, &[], None).await.unwrap();
        assert_eq!(
            public.status,
            StatusCode::NOT_FOUND,
            "{path} on the public port"
        );
    }
    // A client can't mint label values: invented methods share one series.
    for i in 0..5 {
        let m = Method::from_bytes(format!("BREW{i}").as_bytes()).unwrap();
        let _ = f.call(m, "/api/v1/restaurants", None, &[], None).await;
    }
    let metrics = f
        .call(Method::GET, &f.admin_url("/metrics"), None, &[], None)
        .await
        .unwrap();
    let text = metrics.json.as_str().unwrap();
    assert!(text.contains("dishpatch_facade_http_requests_total"));
    assert!(
        !text.contains("BREW"),
        "client-chosen methods became labels"
    );
    assert!(text.contains(r#"method="OTHER""#), "{text}");
    // Dev login is off by default.
    let dev = f
        .call(Method::POST, "/dev/token", None, &[], None)
        .await
        .unwrap();
    assert_eq!(dev.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn courier_requests_become_annotations() {
    let f = Facade::start("fc-cour", &[]).await;
    let courier: dishpatch_api::Courier = serde_json::from_value(serde_json::json!({
        "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
        "metadata": {"name": "carla"},
        "spec": {"displayName": "Carla", "zone": "mitte", "onShift": false, "vehicle": "Bicycle"}
    }))
    .unwrap();
    let api = f.ns.api::<dishpatch_api::Courier>();
    api.create(&Default::default(), &courier).await.unwrap();
    let token = f.token("courier", "carla").await;
    let (found, _) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || async { f.get("/api/v1/courier/offer", &token).await.status },
        |s| *s == StatusCode::OK,
    )
    .await;
    assert!(found);
    let shift = f
        .post(
            "/api/v1/courier/shift",
            &token,
            serde_json::json!({"onShift": true}),
        )
        .await;
    assert_eq!(shift.status, StatusCode::OK, "{}", shift.json);
    assert!(api.get("carla").await.unwrap().spec.on_shift);
    // No offer yet.
    let accept = f
        .post(
            "/api/v1/courier/offer/accept",
            &token,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(accept.status, StatusCode::CONFLICT, "{}", accept.json);
    // The delivery service offers an order (we play its part).
    let status = serde_json::json!({
        "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
        "status": {"available": true, "offer": {"order": "o-123", "expiresAt": "2099-01-01T00:00:00Z"}}
    });
    api.patch_status(
        "carla",
        &PatchParams::apply("dishpatch-delivery").force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
    let (offered, _) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || async { f.get("/api/v1/courier/offer", &token).await.json },
        |j| j["offer"]["order"] == "o-123",
    )
    .await;
    assert!(offered);
    let accept = f
        .post(
            "/api/v1/courier/offer/accept",
            &token,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(accept.status, StatusCode::ACCEPTED, "{}", accept.json);
    let stored = api.get("carla").await.unwrap();
    assert_eq!(
        stored.metadata.annotations.unwrap()["dishpatch.dev/accept"],
        "o-123"
    );
    // A customer is not a courier.
    let customer = f.token("customer", "carla").await;
    assert_eq!(
        f.get("/api/v1/courier/offer", &customer).await.status,
        StatusCode::FORBIDDEN
    );
}
