//! The restaurant's side (issue 13, part 1): a restaurant that confirms by
//! hand, its staff through the façade, the operator and the payment service
//! as real processes. Payment waits for the staff's confirmation; a decline
//! cancels the order with the staff's reason; closing the restaurant
//! rejects new orders.
//!
//!   cargo test -p dishpatch-e2e --test restaurant_staff -- --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod procs;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dishpatch_api::restaurant::{ConfirmationMode, ConfirmationSpec};
use dishpatch_api::{Order, OrderPhase, Restaurant};
use dishpatch_testkit::{TestNamespace, amqp_vhost, cache_dir, client, ensure_crds, fixtures};
use kube::api::{Api, PostParams};
use procs::{Spec, free_port, http_json};
use serde_json::{Value, json};

async fn call(
    facade: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: &Value,
) -> (u16, Value) {
    let (code, text) = http_json(facade, method, path, &[("authorization", bearer)], body)
        .await
        .unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn place(facade: SocketAddr, bearer: &str, restaurant: &str) -> (u16, Value) {
    let body = json!({
        "restaurant": restaurant,
        "items": [{"menuItem": "pizza", "quantity": 1}],
        "contact": {"email": "jane@example.com"},
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    });
    call(facade, "POST", "/api/v1/orders", bearer, &body).await
}

async fn wait_phase(orders: &Api<Order>, name: &str, want: OrderPhase) -> Order {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = orders.get(name).await.unwrap();
        if o.status.as_ref().and_then(|s| s.phase) == Some(want) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {want}: {:?}",
            o.status
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn condition<'a>(
    o: &'a Order,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    o.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

#[tokio::test]
async fn staff_confirm_and_decline_orders_and_close_their_restaurant() {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "staff").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = cache_dir().join("e2e-staff").join(&ns.name);
    std::fs::create_dir_all(&work).unwrap();
    let key_file = work.join("jwt.key");
    std::fs::write(&key_file, format!("staff-key-{}-0123456789abcdef", ns.name)).unwrap();
    let mut roma = fixtures::restaurant("roma", true, None);
    roma.spec.confirmation = Some(ConfirmationSpec {
        mode: ConfirmationMode::Manual,
        timeout: Some("5m".into()),
    });
    let restaurants: Api<Restaurant> = ns.api();
    restaurants
        .create(&PostParams::default(), &roma)
        .await
        .unwrap();
    // napoli confirms on its own but its staff say when an order is ready.
    let mut napoli = fixtures::restaurant("napoli", true, None);
    napoli.spec.kitchen.mode = dishpatch_api::restaurant::KitchenMode::Manual;
    restaurants
        .create(&PostParams::default(), &napoli)
        .await
        .unwrap();

    let ledger = work.join("ledger.jsonl");
    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: &ledger,
        log: None,
        rust_log: "warn",
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let procs = [
        spec.start("operator", &[]),
        spec.start("payment", &[]),
        spec.start("kitchen", &[]),
        spec.start(
            "facade",
            &[
                "--listen",
                &listen.to_string(),
                "--jwt-key-file",
                key_file.to_str().unwrap(),
            ],
        ),
    ];
    for p in &procs {
        p.wait_ready(Duration::from_secs(60)).await;
    }
    let customer = procs::customer_bearer(&key_file, "cust-1", "1h", &[]);
    let chef = procs::bearer(
        &key_file,
        "restaurant",
        "chef-mario",
        "1h",
        &["--restaurant", "roma"],
    );
    let napoli_staff = procs::bearer(&key_file, "restaurant", "napoli", "1h", &[]);
    let orders: Api<Order> = ns.api();

    // A new order waits for the staff: priced, stock held, not charged.
    let (code, placed) = place(listen, &customer, "roma").await;
    assert_eq!(code, 201, "{placed}");
    let yes = placed["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = orders.get(&yes).await.unwrap();
        if condition(&o, "RestaurantConfirmed").is_some_and(|c| c.status == "Unknown") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never awaited confirmation: {:?}",
            o.status
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let o = orders.get(&yes).await.unwrap();
    assert!(
        o.status.as_ref().unwrap().payment.is_none(),
        "charged before the restaurant confirmed"
    );

    // The staff see it; nobody else may decide for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, list) = call(
            listen,
            "GET",
            "/api/v1/restaurants/roma/orders",
            &chef,
            &Value::Null,
        )
        .await;
        assert_eq!(code, 200, "{list}");
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == yes.as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the staff never saw {yes}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let confirm = format!("/api/v1/restaurants/roma/orders/{yes}/confirm");
    for (who, bearer) in [
        ("the customer", &customer),
        ("another restaurant", &napoli_staff),
    ] {
        let (code, problem) = call(listen, "POST", &confirm, bearer, &Value::Null).await;
        assert_eq!(code, 403, "{who}: {problem}");
    }
    let (code, list) = call(
        listen,
        "GET",
        "/api/v1/restaurants/roma/orders",
        &napoli_staff,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403, "{list}");

    // Confirmed: it goes on to payment.
    let (code, view) = call(listen, "POST", &confirm, &chef, &Value::Null).await;
    assert_eq!(code, 200, "{view}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let paid = loop {
        let o = orders.get(&yes).await.unwrap();
        let charged = o
            .status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .is_some_and(|p| p.state == dishpatch_api::order::PaymentState::Succeeded);
        if charged {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "never paid after the confirmation: {:?}",
            o.status
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert_eq!(
        condition(&paid, "RestaurantConfirmed").unwrap().status,
        "True"
    );
    assert_eq!(paid.spec.confirmation.as_ref().unwrap().by, "chef-mario");
    // Deciding again: the same decision is an answer, another a conflict.
    let (code, _) = call(listen, "POST", &confirm, &chef, &Value::Null).await;
    assert_eq!(code, 200);
    let decline_yes = format!("/api/v1/restaurants/roma/orders/{yes}/decline");
    let (code, problem) = call(
        listen,
        "POST",
        &decline_yes,
        &chef,
        &json!({"reason": "oops"}),
    )
    .await;
    assert_eq!(code, 409, "{problem}");

    // Declined with a reason: cancelled, and the customer sees why.
    let (_, placed) = place(listen, &customer, "roma").await;
    let no = placed["id"].as_str().unwrap().to_string();
    let decline = format!("/api/v1/restaurants/roma/orders/{no}/decline");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, problem) = call(
            listen,
            "POST",
            &decline,
            &chef,
            &json!({"reason": "out of mozzarella"}),
        )
        .await;
        if code == 200 {
            break;
        }
        // Until the operator has priced it, the order does not wait yet.
        assert_eq!(code, 409, "{problem}");
        assert!(Instant::now() < deadline, "could never decline: {problem}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (code, problem) = call(listen, "POST", &decline, &chef, &json!({"reason": " "})).await;
    assert_eq!(code, 422, "{problem}");
    let cancelled = wait_phase(&orders, &no, OrderPhase::Cancelled).await;
    assert_eq!(
        condition(&cancelled, "Cancelled").unwrap().reason,
        "RestaurantDeclined"
    );
    assert!(
        cancelled.status.as_ref().unwrap().payment.is_none(),
        "a declined order was charged"
    );
    // The façade's cache follows the watch: the customer sees why shortly.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, view) = call(
            listen,
            "GET",
            &format!("/api/v1/orders/{no}"),
            &customer,
            &Value::Null,
        )
        .await;
        assert_eq!(code, 200, "{view}");
        let why = view["reason"].as_str().unwrap_or_default();
        if view["phase"] == "Cancelled" {
            assert!(why.contains("out of mozzarella"), "{view}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the customer never saw the decline: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A manual kitchen: the order cooks until napoli's staff say it is ready.
    let (code, placed) = place(listen, &customer, "napoli").await;
    assert_eq!(code, 201, "{placed}");
    let cooking = placed["id"].as_str().unwrap().to_string();
    wait_phase(&orders, &cooking, OrderPhase::Preparing).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = orders.get(&cooking).await.unwrap();
    assert_eq!(
        o.status.and_then(|s| s.phase),
        Some(OrderPhase::Preparing),
        "ready without the staff"
    );
    let ready = format!("/api/v1/restaurants/napoli/orders/{cooking}/ready");
    let (code, problem) = call(listen, "POST", &ready, &chef, &Value::Null).await;
    assert_eq!(code, 403, "roma's chef at napoli: {problem}");
    let (code, view) = call(listen, "POST", &ready, &napoli_staff, &Value::Null).await;
    assert_eq!(code, 202, "{view}");
    let done = wait_phase(&orders, &cooking, OrderPhase::Ready).await;
    assert!(done.status.unwrap().kitchen.unwrap().ready_at.is_some());
    let (code, problem) = call(
        listen,
        "POST",
        &format!("/api/v1/restaurants/roma/orders/{yes}/ready"),
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 409, "roma's kitchen is timed: {problem}");

    // Sold out: orders with the dish are turned away until it is restocked.
    let (code, r) = call(
        listen,
        "POST",
        "/api/v1/restaurants/roma/menu/pizza/sold-out",
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let pizza = r["menu"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "pizza")
        .unwrap()
        .clone();
    assert_eq!(pizza["soldOut"], true, "{r}");
    let (code, problem) = call(
        listen,
        "POST",
        "/api/v1/restaurants/roma/menu/calzone/sold-out",
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 404, "{problem}");
    let (code, placed) = place(listen, &customer, "roma").await;
    assert_eq!(code, 201, "{placed}");
    let id = placed["id"].as_str().unwrap().to_string();
    let rejected = wait_phase(&orders, &id, OrderPhase::Rejected).await;
    let accepted = condition(&rejected, "Accepted").unwrap();
    assert_eq!(accepted.reason, "OutOfStock");
    assert!(
        accepted.message.contains("sold out"),
        "{}",
        accepted.message
    );
    let (code, r) = call(
        listen,
        "POST",
        "/api/v1/restaurants/roma/menu/pizza/restock",
        &chef,
        &json!({"stock": 20}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let pizza = r["menu"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "pizza")
        .unwrap()
        .clone();
    assert_eq!(
        (pizza["soldOut"].clone(), pizza["available"].clone()),
        (Value::Null, json!(20)),
        "{r}"
    );

    // Closed: new orders are turned away; opened again, taken.
    let (code, r) = call(
        listen,
        "POST",
        "/api/v1/restaurants/roma/close",
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!((code, r["open"].as_bool()), (200, Some(false)), "{r}");
    let (code, problem) = call(
        listen,
        "POST",
        "/api/v1/restaurants/napoli/close",
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403, "{problem}");
    let (code, placed) = place(listen, &customer, "roma").await;
    if code == 201 {
        // Taken before the façade saw the change: the operator turns it away.
        let id = placed["id"].as_str().unwrap().to_string();
        let rejected = wait_phase(&orders, &id, OrderPhase::Rejected).await;
        assert_eq!(
            condition(&rejected, "Accepted").unwrap().reason,
            "RestaurantClosed"
        );
    } else {
        assert!(
            (400..500).contains(&code) && placed.to_string().contains("closed"),
            "{code} {placed}"
        );
    }
    let (code, r) = call(
        listen,
        "POST",
        "/api/v1/restaurants/roma/open",
        &chef,
        &Value::Null,
    )
    .await;
    assert_eq!((code, r["open"].as_bool()), (200, Some(true)), "{r}");
    drop(procs);
}
