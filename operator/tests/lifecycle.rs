//! The operator against the real apiserver and the real RabbitMQ.

mod common;

use std::time::Duration;

use common::{Bed, condition, phase, pizza_available};
use dishpatch_api::OrderPhase;
use dishpatch_api::events::EventType;
use dishpatch_testkit::net::{free_port, http_get};
use dishpatch_testkit::{eventually, fixtures};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn accepted_order_is_priced_reserved_and_announced() {
    let bed = Bed::new("accept").await;
    let mut tap = bed.tap(&[EventType::OrderAccepted]).await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    let created = bed
        .create_order(fixtures::order("o1", "roma", &[("pizza", 2), ("water", 3)]))
        .await;
    let uid = created.uid().unwrap();

    let o = bed
        .wait_order("o1", T, "acceptance", |o| {
            phase(o) == Some(OrderPhase::Accepted)
        })
        .await;
    let total = o.status.as_ref().unwrap().total.clone().unwrap();
    assert_eq!(
        (total.amount, total.currency.as_str()),
        (2 * 950 + 3 * 200, "EUR")
    );
    assert_eq!(total.display.as_deref(), Some("25.00 EUR"));
    let accepted = condition(&o, "Accepted").unwrap();
    assert_eq!(
        (accepted.status.as_str(), accepted.observed_generation),
        ("True", Some(1))
    );
    assert_eq!(o.status.as_ref().unwrap().observed_generation, Some(1));
    assert_eq!(condition(&o, "StockReserved").unwrap().status, "True");
    assert!(
        o.finalizers()
            .contains(&"dishpatch.dev/compensate".to_string())
    );

    let event = tap
        .next_matching(T, |d| {
            d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid)
        })
        .await
        .expect("order.accepted on the broker");
    let ce = event.event.unwrap();
    assert_eq!(ce.id, format!("{uid}.order.accepted"));
    assert_eq!(ce.subject, format!("{}/o1", bed.ns.name));
    let traceparent = event.traceparent.expect("traceparent header");
    assert!(traceparent.contains(&uid.replace('-', "")), "{traceparent}");

    let r = bed.restaurant("roma").await;
    assert_eq!(pizza_available(&r), Some(3));
    assert_eq!(r.status.as_ref().unwrap().menu_items, Some(2));

    // A no-op reconcile writes nothing: the resourceVersion stays put.
    let rv = o.resource_version();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bed.orders().get("o1").await.unwrap().resource_version(), rv);

    // Its story is in the conditions; Events are for what a person may act
    // on (rejections, cancellations, stalls), and acceptance is not one.
    let events: Api<Event> = Api::namespaced(bed.client.clone(), &bed.ns.name);
    let on_o1: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("o1"))
        .map(|e| e.reason)
        .collect();
    assert!(on_o1.is_empty(), "Events on an accepted order: {on_o1:?}");
}

#[tokio::test]
async fn rejections_say_why() {
    let bed = Bed::new("reject").await;
    let mut tap = bed.tap(&[EventType::OrderRejected]).await;
    let _op = bed.operator("op-1", &["--restaurant-grace", "1s"]);
    bed.create_restaurant(fixtures::restaurant("open", true, Some(1)))
        .await;
    bed.create_restaurant(fixtures::restaurant("closed", false, None))
        .await;
    bed.create_order(fixtures::order("unknown-item", "open", &[("sushi", 1)]))
        .await;
    bed.create_order(fixtures::order(
        "closed-restaurant",
        "closed",
        &[("pizza", 1)],
    ))
    .await;
    bed.create_order(fixtures::order("out-of-stock", "open", &[("pizza", 2)]))
        .await;
    bed.create_order(fixtures::order("no-restaurant", "nowhere", &[("pizza", 1)]))
        .await;

    let mut rejected = Vec::new();
    for (name, reason, words) in [
        (
            "unknown-item",
            "UnknownMenuItem",
            "\"sushi\" is not on the menu",
        ),
        (
            "closed-restaurant",
            "RestaurantClosed",
            "restaurant closed is closed",
        ),
        ("out-of-stock", "OutOfStock", "2 requested, 1 available"),
        (
            "no-restaurant",
            "RestaurantNotFound",
            "restaurant nowhere does not exist",
        ),
    ] {
        let o = bed
            .wait_order(name, T, "rejection", |o| {
                phase(o) == Some(OrderPhase::Rejected)
            })
            .await;
        let c = condition(&o, "Accepted").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason),
            "{name}"
        );
        assert!(
            c.message.contains(words),
            "{name}: {:?} lacks {words:?}",
            c.message
        );
        assert!(
            o.status.as_ref().unwrap().total.is_none(),
            "{name} is not priced"
        );
        rejected.push((o.uid().unwrap(), reason));
    }
    // Each customer is told, with the reason (notification sends it on).
    let mut told = std::collections::HashMap::new();
    while told.len() < rejected.len() {
        let Some(d) = tap.next_matching(T, |_| true).await else {
            break;
        };
        let e = d.event.unwrap();
        assert_eq!(e.id, format!("{}.order.rejected", e.data.order.uid));
        told.insert(e.data.order.uid, e.data.reason.unwrap_or_default());
    }
    for (uid, reason) in &rejected {
        let why = told
            .get(uid)
            .unwrap_or_else(|| panic!("no order.rejected for the {reason} order"));
        assert!(why.starts_with(reason), "{reason}: {why:?}");
    }
    // A rejection is something a person acts on: a Warning Event says why.
    let events: Api<Event> = Api::namespaced(bed.client.clone(), &bed.ns.name);
    let lp = ListParams::default();
    let (found, _) = eventually(
        T,
        || events.list(&lp),
        |l| {
            l.as_ref().is_ok_and(|l| {
                l.items.iter().any(|e| {
                    e.reason.as_deref() == Some("Rejected")
                        && e.type_.as_deref() == Some("Warning")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.starts_with("OutOfStock"))
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("out-of-stock")
                })
            })
        },
    )
    .await;
    assert!(found, "a Warning Rejected Event on the out-of-stock order");
    // Nothing was held for the rejected orders.
    let r = bed.restaurant("open").await;
    assert_eq!(pizza_available(&r), Some(1));
    assert!(r.status.unwrap().holds.is_empty());
}

#[tokio::test]
async fn concurrent_orders_never_oversell() {
    let bed = Bed::new("oversell").await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(10)))
        .await;
    let creates = (0..100)
        .map(|i| bed.create_order(fixtures::order(&format!("o{i}"), "roma", &[("pizza", 1)])));
    futures::future::join_all(creates).await;

    let api = bed.orders();
    let lp = ListParams::default();
    let (done, list) = eventually(
        Duration::from_secs(60),
        || api.list(&lp),
        |l| {
            l.as_ref().is_ok_and(|l| {
                l.items
                    .iter()
                    .all(|o| matches!(phase(o), Some(OrderPhase::Accepted | OrderPhase::Rejected)))
            })
        },
    )
    .await;
    let list = list.unwrap();
    assert!(done, "not every order was decided");
    let accepted = list
        .items
        .iter()
        .filter(|o| phase(o) == Some(OrderPhase::Accepted))
        .count();
    let out_of_stock = list
        .items
        .iter()
        .filter(|o| condition(o, "Accepted").is_some_and(|c| c.reason == "OutOfStock"))
        .count();
    assert_eq!((accepted, out_of_stock), (10, 90));

    let status = bed.restaurant("roma").await.status.unwrap();
    let entry = &status.inventory[0];
    assert_eq!((entry.reserved, entry.available), (10, 0));
    assert_eq!(status.holds.len(), 10);
}

#[tokio::test]
async fn cancellation_releases_stock_exactly_once() {
    let bed = Bed::new("cancel").await;
    let mut tap = bed.tap(&[EventType::OrderCancelled]).await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    let uid = bed
        .create_order(fixtures::order("o1", "roma", &[("pizza", 2)]))
        .await
        .uid()
        .unwrap();
    bed.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(3));

    let cancel = json!({"spec": {"cancellation": {"reason": "changed my mind"}}});
    bed.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&cancel))
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", T, "cancellation", |o| {
            phase(o) == Some(OrderPhase::Cancelled)
        })
        .await;
    let c = condition(&o, "Cancelled").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
        ("True", "CustomerRequested", "changed my mind")
    );
    assert_eq!(condition(&o, "StockReserved").unwrap().reason, "Released");
    assert_eq!(o.status.as_ref().unwrap().observed_generation, Some(2));
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(5));
    let event = tap
        .next_matching(T, |d| {
            d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid)
        })
        .await;
    assert!(event.is_some(), "order.cancelled on the broker");

    // Wake the reconciler again and again: nothing more is given back.
    for i in 0..3 {
        let poke = json!({"metadata": {"annotations": {"test/poke": i.to_string()}}});
        bed.orders()
            .patch("o1", &PatchParams::default(), &Patch::Merge(&poke))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = bed.restaurant("roma").await.status.unwrap();
    assert_eq!(
        (status.inventory[0].reserved, status.inventory[0].available),
        (0, 5)
    );
}

#[tokio::test]
async fn stalled_order_is_republished_then_cancelled() {
    let bed = Bed::new("deadline").await;
    let mut tap = bed
        .tap(&[EventType::OrderAccepted, EventType::OrderCancelled])
        .await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin_arg = admin.to_string();
    let _op = bed.operator(
        "op-1",
        &[
            "--stage-deadline",
            "2s",
            "--max-republishes",
            "2",
            "--admin-addr",
            &admin_arg,
        ],
    );
    // What an alert on stuck orders reads (helm/dishpatch/files/alerts.yaml).
    let overdue = || async move {
        let (_, body) = http_get(admin, "/metrics").await.unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with("dishpatch_operator_orders_overdue{phase=\"Accepted\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    let uid = bed
        .create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await
        .uid()
        .unwrap();

    // Nobody pays: order.accepted goes out once, then once per missed deadline.
    let mine =
        |d: &dishpatch_messaging::Delivery| d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid);
    let mut accepted = 0;
    let mut cancelled = None;
    let mut overdue_seen = None;
    while cancelled.is_none() {
        let Some(d) = tap.next_matching(Duration::from_secs(20), mine).await else {
            panic!("no more events after {accepted} order.accepted");
        };
        match d.event.unwrap() {
            e if e.type_.ends_with("order.accepted") => accepted += 1,
            e => cancelled = Some(e),
        }
        if accepted == 2 && overdue_seen.is_none() {
            // Re-published once: one deadline passed, one still to go.
            overdue_seen = overdue().await;
        }
    }
    assert_eq!(accepted, 3, "published once and re-published twice");
    assert_eq!(
        overdue_seen.as_deref(),
        Some("1"),
        "dishpatch_operator_orders_overdue{{phase=\"Accepted\"}} while the order waited past its deadline"
    );
    assert!(
        cancelled
            .unwrap()
            .data
            .reason
            .unwrap()
            .starts_with("DeadlineExceeded")
    );
    let o = bed
        .wait_order("o1", T, "cancellation", |o| {
            phase(o) == Some(OrderPhase::Cancelled)
        })
        .await;
    assert_eq!(
        condition(&o, "Cancelled").unwrap().reason,
        "DeadlineExceeded"
    );
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(5));
    assert_eq!(
        overdue().await.as_deref(),
        Some("0"),
        "a cancelled order that owes nothing is not overdue"
    );
}

#[tokio::test]
async fn deleting_an_order_compensates_first() {
    let bed = Bed::new("finalizer").await;
    let mut tap = bed.tap(&[EventType::OrderCancelled]).await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(4)))
        .await;
    let uid = bed
        .create_order(fixtures::order("o1", "roma", &[("pizza", 3)]))
        .await
        .uid()
        .unwrap();
    bed.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(1));

    bed.orders()
        .delete("o1", &DeleteParams::default())
        .await
        .unwrap();
    let api = bed.orders();
    let (gone, _) = eventually(T, || api.get_opt("o1"), |o| matches!(o, Ok(None))).await;
    assert!(gone, "the finalizer let the order go");
    assert_eq!(pizza_available(&bed.restaurant("roma").await), Some(4));
    let d = tap
        .next_matching(T, |d| {
            d.event.as_ref().is_ok_and(|e| e.data.order.uid == uid)
        })
        .await
        .expect("order.cancelled for the deleted order");
    assert!(d.event.unwrap().data.reason.unwrap().starts_with("Deleted"));
}

/// What the workers will do, done by hand with their own field managers:
/// each stage section drives the phase, and nobody's apply wipes another's.
#[tokio::test]
async fn stage_reports_drive_the_phase_side_by_side() {
    let bed = Bed::new("stages").await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, Some(5)))
        .await;
    bed.create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;

    let report = |manager: &'static str, section: &'static str, body: serde_json::Value| {
        let api = bed.orders();
        async move {
            let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {section: body}});
            api.patch_status(
                "o1",
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
        }
    };
    let now = jiff::Timestamp::now().to_string();
    let now = now.as_str();
    report(
        "dishpatch-payment",
        "payment",
        json!({"state": "Succeeded", "provider": "simulated", "chargedAt": now}),
    )
    .await;
    bed.wait_order("o1", T, "Paid", |o| phase(o) == Some(OrderPhase::Paid))
        .await;
    report(
        "dishpatch-kitchen",
        "kitchen",
        json!({"state": "Preparing", "ticketAcceptedAt": now}),
    )
    .await;
    bed.wait_order("o1", T, "Preparing", |o| {
        phase(o) == Some(OrderPhase::Preparing)
    })
    .await;
    report(
        "dishpatch-kitchen",
        "kitchen",
        json!({"state": "Ready", "ticketAcceptedAt": now, "readyAt": now}),
    )
    .await;
    bed.wait_order("o1", T, "Ready", |o| phase(o) == Some(OrderPhase::Ready))
        .await;
    report(
        "dishpatch-delivery",
        "delivery",
        json!({"state": "PickedUp", "courier": "ada", "pickedUpAt": now}),
    )
    .await;
    bed.wait_order("o1", T, "OutForDelivery", |o| {
        phase(o) == Some(OrderPhase::OutForDelivery)
    })
    .await;

    // Too late to cancel now.
    let cancel = json!({"spec": {"cancellation": {"reason": "hungry no more"}}});
    bed.orders()
        .patch("o1", &PatchParams::default(), &Patch::Merge(&cancel))
        .await
        .unwrap();
    let o = bed
        .wait_order("o1", T, "a refused cancellation", |o| {
            condition(o, "Cancelled").is_some_and(|c| c.reason == "TooLateToCancel")
        })
        .await;
    assert_eq!(phase(&o), Some(OrderPhase::OutForDelivery));

    report(
        "dishpatch-delivery",
        "delivery",
        json!({"state": "Delivered", "courier": "ada", "pickedUpAt": now, "deliveredAt": now}),
    )
    .await;
    let o = bed
        .wait_order("o1", T, "Delivered", |o| {
            phase(o) == Some(OrderPhase::Delivered)
        })
        .await;
    let status = o.status.clone().unwrap();
    assert!(status.payment.is_some() && status.kitchen.is_some() && status.delivery.is_some());
    assert_eq!(
        condition(&o, "Accepted").unwrap().status,
        "True",
        "the operator's conditions survive the workers' applies"
    );
    assert_eq!(condition(&o, "StockReserved").unwrap().reason, "Consumed");
    let managers: Vec<_> = o
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    for m in [
        "dishpatch-operator",
        "dishpatch-payment",
        "dishpatch-kitchen",
        "dishpatch-delivery",
    ] {
        assert!(managers.iter().any(|x| x == m), "{m} in {managers:?}");
    }
    // Delivered stock stays used.
    let status = bed.restaurant("roma").await.status.unwrap();
    assert_eq!((status.inventory[0].reserved, status.holds.len()), (1, 0));
}

#[tokio::test]
async fn a_charge_waiting_for_the_customer_is_a_condition_until_it_settles() {
    let bed = Bed::new("action").await;
    let _op = bed.operator("op-1", &[]);
    bed.create_restaurant(fixtures::restaurant("roma", true, None))
        .await;
    bed.create_order(fixtures::order("o1", "roma", &[("pizza", 1)]))
        .await;
    bed.wait_order("o1", T, "acceptance", |o| {
        phase(o) == Some(OrderPhase::Accepted)
    })
    .await;
    let pay = |body: serde_json::Value| {
        let api = bed.orders();
        async move {
            let patch = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {"payment": body}});
            api.patch_status(
                "o1",
                &PatchParams::apply("dishpatch-payment").force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
        }
    };
    // 3-D Secure: the provider waits for the customer at a page.
    pay(
        json!({"state": "RequiresAction", "provider": "stripe", "paymentId": "pi_3ds",
               "actionUrl": "https://hooks.stripe.com/3d_secure_2/authenticate/pi_3ds"}),
    )
    .await;
    let o = bed
        .wait_order("o1", T, "the action condition", |o| {
            condition(o, "PaymentActionRequired").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(
        phase(&o),
        Some(OrderPhase::Accepted),
        "not paid while waiting"
    );
    let c = condition(&o, "PaymentActionRequired").unwrap();
    assert_eq!(c.reason, "RequiresAction");
    assert!(
        c.message
            .contains("https://hooks.stripe.com/3d_secure_2/authenticate/pi_3ds"),
        "{}",
        c.message
    );
    // The webhook settles it: paid, and the condition says it no longer waits.
    let now = jiff::Timestamp::now().to_string();
    pay(json!({"state": "Succeeded", "provider": "stripe", "paymentId": "pi_3ds", "chargedAt": now}))
        .await;
    let o = bed
        .wait_order("o1", T, "Paid", |o| {
            phase(o) == Some(OrderPhase::Paid)
                && condition(o, "PaymentActionRequired").is_some_and(|c| c.status == "False")
        })
        .await;
    assert_eq!(
        condition(&o, "PaymentActionRequired").unwrap().reason,
        "PaymentSettled"
    );
}

#[tokio::test]
async fn a_restaurant_that_confirms_by_hand_holds_payment_until_its_staff_decide() {
    let bed = Bed::new("confirm").await;
    let mut tap = bed
        .tap(&[EventType::OrderAccepted, EventType::OrderCancelled])
        .await;
    let _op = bed.operator("op-1", &[]);
    let mut roma = fixtures::restaurant("roma", true, Some(5));
    roma.spec.confirmation = Some(dishpatch_api::restaurant::ConfirmationSpec {
        mode: dishpatch_api::restaurant::ConfirmationMode::Manual,
        timeout: Some("4s".into()),
    });
    bed.create_restaurant(roma).await;
    let mut uids = std::collections::HashMap::new();
    for name in ["yes", "no", "late"] {
        let o = bed
            .create_order(fixtures::order(name, "roma", &[("pizza", 1)]))
            .await;
        uids.insert(o.uid().unwrap(), name);
    }
    for name in ["yes", "no", "late"] {
        let o = bed
            .wait_order(name, T, "awaiting confirmation", |o| {
                condition(o, "RestaurantConfirmed").is_some_and(|c| c.status == "Unknown")
            })
            .await;
        assert_eq!(phase(&o), Some(OrderPhase::Accepted));
        assert_eq!(condition(&o, "StockReserved").unwrap().status, "True");
    }
    let decide = |name: &'static str, decision: &'static str, reason: Option<&'static str>| {
        let api = bed.orders();
        async move {
            let now = jiff::Timestamp::now().to_string();
            let patch = json!({"spec": {
                "confirmation": {"decision": decision, "reason": reason, "by": "chef-mario", "at": now}}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    decide("yes", "Confirmed", None).await;
    decide("no", "Declined", Some("out of mozzarella")).await;

    let yes = bed
        .wait_order("yes", T, "confirmed", |o| {
            condition(o, "RestaurantConfirmed").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(phase(&yes), Some(OrderPhase::Accepted));
    // The decision is final: the apiserver refuses to change it.
    let change = json!({"spec": {"confirmation": {"decision": "Declined", "by": "someone-else",
        "at": jiff::Timestamp::now().to_string()}}});
    let refused = bed
        .orders()
        .patch("yes", &PatchParams::default(), &Patch::Merge(&change))
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("cannot be withdrawn or changed")),
        "{refused:?}"
    );
    let no = bed
        .wait_order("no", T, "declined", |o| {
            phase(o) == Some(OrderPhase::Cancelled)
        })
        .await;
    let cancelled = condition(&no, "Cancelled").unwrap();
    assert_eq!(cancelled.reason, "RestaurantDeclined");
    assert!(
        cancelled.message.contains("out of mozzarella"),
        "{}",
        cancelled.message
    );
    let late = bed
        .wait_order("late", T, "not confirmed in time", |o| {
            phase(o) == Some(OrderPhase::Cancelled)
        })
        .await;
    assert_eq!(
        condition(&late, "Cancelled").unwrap().reason,
        "RestaurantDidNotConfirm"
    );
    for o in [&no, &late] {
        bed.wait_order(&o.name_any(), T, "stock returned", |o| {
            condition(o, "StockReserved").is_some_and(|c| c.status == "False")
        })
        .await;
    }

    // Payment heard of the confirmed order only; each called-off one was
    // announced as cancelled once.
    let mut seen: Vec<(String, &str)> = Vec::new();
    while let Some(d) = tap.next_matching(Duration::from_secs(3), |_| true).await {
        let Ok(e) = d.event else { continue };
        if let Some(name) = uids.get(&e.data.order.uid) {
            seen.push((e.type_.clone(), name));
        }
    }
    let count = |kind: &str, name: &str| {
        seen.iter()
            .filter(|(t, n)| t.ends_with(kind) && *n == name)
            .count()
    };
    assert_eq!(count("order.accepted", "yes"), 1, "{seen:?}");
    assert_eq!(count("order.accepted", "no"), 0, "{seen:?}");
    assert_eq!(count("order.accepted", "late"), 0, "{seen:?}");
    assert_eq!(count("order.cancelled", "no"), 1, "{seen:?}");
    assert_eq!(count("order.cancelled", "late"), 1, "{seen:?}");
}
