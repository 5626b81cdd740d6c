//! The notification service against a real apiserver, a real RabbitMQ, a
//! real SMTP server (aiosmtpd) and a real HTTP webhook receiver.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Bed, Hook, SECRET};
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::NotificationState;
use dishpatch_testkit::{eventually, fixtures};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn accepted() -> Value {
    json!({"phase": "Accepted", "total": {"amount": 2500, "currency": "EUR", "display": "25.00 EUR"}})
}

/// Waits until `f` holds of the bed; panics with `what` otherwise.
async fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut get: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
{
    let (ok, last) = eventually(timeout, || std::future::ready(get()), done).await;
    assert!(
        ok,
        "{what} did not happen within {timeout:?}; last seen: {last:#?}"
    );
    last
}

#[tokio::test]
async fn emails_the_customer_and_posts_signed_webhooks() {
    let mut bed = Bed::new("notify").await;
    let order = bed
        .create_order(
            fixtures::order("o1", "roma", &[("pizza", 2), ("water", 3)]),
            Some("jane@example.com"),
            accepted(),
        )
        .await;
    let uid = order.uid().unwrap();
    let version_before = order.resource_version();
    bed.start_service().await;

    let accepted_event = bed
        .publish(bed.order_ref(&order), EventType::OrderAccepted, None)
        .await;
    let cancelled_event = bed
        .publish(
            bed.order_ref(&order),
            EventType::OrderCancelled,
            Some("changed my mind"),
        )
        .await;

    // The e-mails, as the customer's mail client sees them.
    let mails = wait_for(
        T,
        "two e-mails to jane@example.com",
        || bed.smtp.to("jane@example.com"),
        |m| m.len() == 2,
    )
    .await;
    let by_subject = |needle: &str| {
        mails
            .iter()
            .find(|m| m["subject"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no e-mail with {needle:?} in its subject: {mails:#?}"))
    };
    let welcome = by_subject("We have your order o1");
    assert_eq!(welcome["to"], "jane@example.com");
    assert_eq!(welcome["from"], "dishpatch <orders@dishpatch.dev>");
    assert_eq!(welcome["content_type"], "text/plain");
    assert_eq!(
        welcome["message_id"],
        format!("<{uid}.order.accepted@dishpatch.dev>")
    );
    let body = welcome["body"].as_str().unwrap();
    for words in [
        "Hello Jane Doe,",
        "The total comes to 25.00 EUR.",
        "Status: accepted",
    ] {
        assert!(body.contains(words), "{words:?} not in {body}");
    }
    assert!(!body.contains('{'), "an unfilled placeholder in {body}");
    let cancelled = by_subject("Your order o1 has been cancelled");
    assert_eq!(
        cancelled["message_id"],
        format!("<{uid}.order.cancelled@dishpatch.dev>")
    );
    assert!(
        cancelled["body"]
            .as_str()
            .unwrap()
            .contains("Why: changed my mind")
    );

    // The webhooks: the CloudEvent as published, signed with the secret.
    let hooks = wait_for(T, "two webhooks", || bed.receiver.hooks(), |h| h.len() == 2).await;
    let now = jiff::Timestamp::now().as_second();
    for hook in &hooks {
        assert!(hook.verifies(SECRET), "signature does not verify: {hook:?}");
        assert!(!hook.verifies("another secret"));
        let ts: i64 = hook.timestamp.as_deref().unwrap().parse().unwrap();
        assert!((now - ts).abs() < 300, "timestamp {ts} is not now ({now})");
        assert_eq!(
            hook.content_type.as_deref(),
            Some("application/cloudevents+json")
        );
        // On the order's trace: the trace id is the order's uid.
        let traceparent = hook.traceparent.as_deref().unwrap_or_default();
        assert!(
            traceparent.contains(&uid.replace('-', "")),
            "traceparent {traceparent:?} is not on order {uid}'s trace"
        );
    }
    let events: Vec<CloudEvent> = hooks.iter().map(Hook::event).collect();
    assert!(events.contains(&accepted_event), "{events:#?}");
    assert!(events.contains(&cancelled_event), "{events:#?}");
    // A tampered body no longer verifies.
    let mut tampered = hooks[0].clone();
    tampered.body = tampered.body.slice(1..);
    assert!(!tampered.verifies(SECRET));

    // Health and metrics.
    let (ok, ready) = eventually(
        T,
        || bed.admin_get("/readyz"),
        |r| matches!(r, Some((200, _))),
    )
    .await;
    assert!(ok, "/readyz: {ready:?}");
    let (ok, metrics) = eventually(
        T,
        || bed.admin_get("/metrics"),
        |m| {
            m.as_ref().is_some_and(|(_, body)| {
                body.contains(r#"dishpatch_notification_notifications_total{channel="email",outcome="sent"} 2"#)
                    && body.contains(r#"dishpatch_notification_notifications_total{channel="webhook",outcome="sent"} 2"#)
                    && body.contains(r#"dishpatch_notification_messages_total{event="order.accepted",outcome="ok"} 1"#)
            })
        },
    )
    .await;
    assert!(ok, "/metrics: {metrics:?}");

    // What was sent is recorded in the Order, in the notification
    // component's own section and nothing else, in two writes per event
    // (claim, then record): one per notification.
    let (ok, after) = eventually(
        T,
        || async { bed.orders().get("o1").await.unwrap() },
        |o| {
            let records = &o.status.as_ref().unwrap().notifications;
            records.len() == 4 && records.iter().all(|r| r.state == NotificationState::Sent)
        },
    )
    .await;
    assert!(ok, "{:#?}", after.status);
    assert_ne!(after.resource_version(), version_before);
    let records = &after.status.as_ref().unwrap().notifications;
    let mut recorded: Vec<(String, &str)> = records
        .iter()
        .filter(|r| r.state == NotificationState::Sent)
        .map(|r| (r.event.clone(), r.channel.as_str()))
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        vec![
            (accepted_event.id.clone(), "email"),
            (accepted_event.id.clone(), "webhook"),
            (cancelled_event.id.clone(), "email"),
            (cancelled_event.id.clone(), "webhook"),
        ],
        "{records:#?}"
    );
    let ours: Vec<_> = after
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() == Some("dishpatch-notification"))
        .collect();
    assert_eq!(ours.len(), 1, "{:#?}", after.managed_fields());
    assert_eq!(ours[0].subresource.as_deref(), Some("status"));
    let fields = &ours[0].fields_v1.as_ref().unwrap().0;
    assert_eq!(
        fields,
        &json!({"f:status": {"f:notifications": fields["f:status"]["f:notifications"]}}),
        "it owns more than status.notifications"
    );
    let (_, metrics) = bed.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"dishpatch_notification_record_writes_total{outcome="written"} 4"#),
        "{metrics}"
    );

    // The operator's status apply (forced, its own fields only) leaves the section alone.
    let applied = bed
        .orders()
        .patch_status(
            "o1",
            &PatchParams::apply("dishpatch-operator").force(),
            &Patch::Apply(json!({
                "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order",
                "status": {"phase": "Cancelled", "observedGeneration": 1},
            })),
        )
        .await
        .unwrap();
    assert_eq!(&applied.status.unwrap().notifications, records);
}

#[tokio::test]
async fn a_rejected_order_tells_the_customer_why() {
    let mut bed = Bed::new("notify-rejected").await;
    let order = bed
        .create_order(
            fixtures::order("o1", "roma", &[("pizza", 2)]),
            Some("jane@example.com"),
            json!({"phase": "Rejected"}),
        )
        .await;
    let uid = order.uid().unwrap();
    bed.start_service().await;
    let event = bed
        .publish(
            bed.order_ref(&order),
            EventType::OrderRejected,
            Some("OutOfStock: not enough \"pizza\" in stock: 2 requested, 0 available"),
        )
        .await;
    let mails = wait_for(
        T,
        "the rejection e-mail",
        || bed.smtp.to("jane@example.com"),
        |m| m.len() == 1,
    )
    .await;
    assert_eq!(mails[0]["subject"], "We could not take your order o1");
    assert_eq!(
        mails[0]["message_id"],
        format!("<{uid}.order.rejected@dishpatch.dev>")
    );
    let body = mails[0]["body"].as_str().unwrap();
    assert!(body.contains("Why: OutOfStock: not enough"), "{body}");
    assert!(body.contains("Status: not accepted"), "{body}");
    assert!(!body.contains('{'), "an unfilled placeholder in {body}");
    let hooks = wait_for(
        T,
        "the rejection webhook",
        || bed.receiver.hooks(),
        |h| h.len() == 1,
    )
    .await;
    assert!(hooks[0].verifies(SECRET));
    assert_eq!(hooks[0].event(), event);
}

#[tokio::test]
async fn only_the_events_a_customer_waits_for_are_emailed_and_the_rest_cost_no_email_writes() {
    let mut bed = Bed::new("notify-which").await;
    let o = bed
        .create_order(
            fixtures::order("o1", "roma", &[("pizza", 1)]),
            Some("jane@example.com"),
            accepted(),
        )
        .await;
    bed.start_service().await;
    // The kitchen's progress is for integrators (the webhook), not e-mail;
    // being on the way is for the customer.
    bed.publish(bed.order_ref(&o), EventType::KitchenReady, None)
        .await;
    bed.publish(bed.order_ref(&o), EventType::DeliveryPickedUp, None)
        .await;
    let hooks = wait_for(T, "two webhooks", || bed.receiver.hooks(), |h| h.len() == 2).await;
    assert!(hooks.iter().all(|h| h.verifies(SECRET)));
    let mails = wait_for(T, "one e-mail", || bed.smtp.messages(), |m| !m.is_empty()).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert!(
        mails[0]["subject"].as_str().unwrap().contains("on its way"),
        "{}",
        mails[0]["subject"]
    );
    let (ok, after) = eventually(
        T,
        || async { bed.orders().get("o1").await.unwrap() },
        |o| {
            let r = &o.status.as_ref().unwrap().notifications;
            r.len() == 3 && r.iter().all(|r| r.state == NotificationState::Sent)
        },
    )
    .await;
    assert!(ok, "{:#?}", after.status);
    let mut recorded: Vec<(String, &str)> = after
        .status
        .as_ref()
        .unwrap()
        .notifications
        .iter()
        .map(|r| (r.event.clone(), r.channel.as_str()))
        .collect();
    recorded.sort();
    let uid = o.uid().unwrap();
    assert_eq!(
        recorded,
        vec![
            (format!("{uid}.delivery.picked_up"), "email"),
            (format!("{uid}.delivery.picked_up"), "webhook"),
            (format!("{uid}.kitchen.ready"), "webhook"),
        ]
    );
}

#[tokio::test]
async fn no_email_without_an_address_or_an_order_but_the_webhook_still_goes() {
    let mut bed = Bed::new("notify-skip").await;
    let phone_only = bed
        .create_order(
            fixtures::order("phone-only", "roma", &[("pizza", 1)]),
            None,
            accepted(),
        )
        .await;
    bed.start_service().await;

    bed.publish(
        bed.order_ref(&phone_only),
        EventType::DeliveryPickedUp,
        None,
    )
    .await;
    // An order that is gone (retention deleted it, say).
    let ghost = OrderRef {
        namespace: bed.ns.name.clone(),
        name: "ghost".into(),
        uid: "00000000-0000-4000-8000-000000000000".into(),
    };
    bed.publish(ghost, EventType::DeliveryDelivered, None).await;
    // A name reused by a new order: the event is about the old one.
    let reused = bed
        .create_order(
            fixtures::order("reused", "roma", &[("pizza", 1)]),
            Some("someone@example.com"),
            accepted(),
        )
        .await;
    let mut stale = bed.order_ref(&reused);
    stale.uid = "11111111-1111-4111-8111-111111111111".into();
    bed.publish(stale, EventType::OrderAccepted, None).await;

    // Once the service has counted three skipped e-mails, any e-mail it
    // had sent would be in the mailbox.
    let (ok, metrics) = eventually(
        T,
        || bed.admin_get("/metrics"),
        |m| {
            m.as_ref().is_some_and(|(_, body)| {
                body.contains(r#"dishpatch_notification_notifications_total{channel="email",outcome="skipped"} 3"#)
            })
        },
    )
    .await;
    assert!(ok, "/metrics: {metrics:?}");
    assert_eq!(bed.smtp.messages(), Vec::<Value>::new());

    let hooks = wait_for(
        T,
        "three webhooks",
        || bed.receiver.hooks(),
        |h| h.len() == 3,
    )
    .await;
    let names: BTreeSet<String> = hooks.iter().map(Hook::order_name).collect();
    assert_eq!(
        names,
        BTreeSet::from(["ghost".into(), "phone-only".into(), "reused".into()])
    );
    assert!(hooks.iter().all(|h| h.verifies(SECRET)));
    // Skipping is success: nothing was dead-lettered.
    assert!(bed.drain_dead_letters().await.is_empty());
}

#[tokio::test]
async fn failures_are_retried_then_dead_lettered_without_holding_up_the_rest() {
    let mut bed = Bed::new("notify-fail").await;
    let fail = bed
        .create_order(
            fixtures::order("fail-1", "roma", &[("pizza", 1)]),
            Some("fail@example.com"),
            accepted(),
        )
        .await;
    let reject = bed
        .create_order(
            fixtures::order("reject-1", "roma", &[("pizza", 1)]),
            Some("reject@example.com"),
            accepted(),
        )
        .await;
    let bounce = bed
        .create_order(
            fixtures::order("bounce-1", "roma", &[("pizza", 1)]),
            Some("bounce@example.com"),
            accepted(),
        )
        .await;
    let flaky = bed
        .create_order(
            fixtures::order("flaky-1", "roma", &[("pizza", 1)]),
            Some("flaky@example.com"),
            accepted(),
        )
        .await;
    let good = bed
        .create_order(
            fixtures::order("good-1", "roma", &[("pizza", 1)]),
            Some("good@example.com"),
            accepted(),
        )
        .await;
    bed.start_service().await;

    // Poison first: it must not stop anything behind it.
    bed.publish_raw("order.accepted", b"this is not a CloudEvent")
        .await;
    let fail_event = bed
        .publish(bed.order_ref(&fail), EventType::OrderAccepted, None)
        .await;
    let reject_event = bed
        .publish(bed.order_ref(&reject), EventType::OrderAccepted, None)
        .await;
    let bounce_event = bed
        .publish(bed.order_ref(&bounce), EventType::OrderAccepted, None)
        .await;
    bed.publish(bed.order_ref(&flaky), EventType::OrderAccepted, None)
        .await;
    bed.publish(bed.order_ref(&good), EventType::OrderAccepted, None)
        .await;

    // The good order is served while fail-1 is still being retried.
    wait_for(
        T,
        "good-1's e-mail and webhook",
        || {
            (
                bed.smtp.to("good@example.com").len(),
                bed.receiver.for_order("good-1").len(),
            )
        },
        |&(mails, hooks)| mails == 1 && hooks == 1,
    )
    .await;

    // Everything that can't be delivered ends in the dead-letter queue,
    // after retries where retrying may help.
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while dead.len() < 4 && tokio::time::Instant::now() < deadline {
        dead.extend(bed.drain_dead_letters().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dead_ids: BTreeSet<String> = dead
        .iter()
        .filter_map(|d| CloudEvent::from_json(d).ok().map(|e| e.id))
        .collect();
    assert_eq!(
        dead_ids,
        BTreeSet::from([fail_event.id, reject_event.id, bounce_event.id])
    );
    assert!(
        dead.iter().any(|d| d == b"this is not a CloudEvent"),
        "the poison message is not in the dead-letter queue"
    );

    let hooks = bed.receiver.hooks();
    let attempts = |name: &str| hooks.iter().filter(|h| h.order_name() == name).count();
    // 5xx is retried, in process and then by redelivery, until the delivery limit.
    assert!(
        attempts("fail-1") > 5,
        "fail-1 webhook attempts: {}",
        attempts("fail-1")
    );
    let good_at = hooks
        .iter()
        .position(|h| h.order_name() == "good-1")
        .unwrap();
    let last_fail_at = hooks
        .iter()
        .rposition(|h| h.order_name() == "fail-1")
        .unwrap();
    assert!(good_at < last_fail_at, "good-1 waited for fail-1's retries");
    // 4xx is final: one attempt, then the dead-letter queue.
    assert_eq!(attempts("reject-1"), 1);
    // The e-mails that went out were sent once, though their events were retried.
    assert_eq!(bed.smtp.to("fail@example.com").len(), 1);
    assert_eq!(bed.smtp.to("reject@example.com").len(), 1);
    // A 550 dead-letters without e-mail; its webhook went out once.
    assert!(bed.smtp.to("bounce@example.com").is_empty());
    assert_eq!(attempts("bounce-1"), 1);
    // A 451 is retried: the e-mail arrives once, and the webhook, which
    // succeeded the first time, is not repeated.
    assert_eq!(bed.smtp.to("flaky@example.com").len(), 1);
    assert_eq!(attempts("flaky-1"), 1);
    assert!(
        hooks
            .iter()
            .filter(|h| h.status == 200)
            .all(|h| h.verifies(SECRET))
    );

    // And the service still serves.
    let later = bed
        .create_order(
            fixtures::order("later", "roma", &[("pizza", 1)]),
            Some("later@example.com"),
            accepted(),
        )
        .await;
    bed.publish(bed.order_ref(&later), EventType::DeliveryDelivered, None)
        .await;
    let mails = wait_for(
        T,
        "the e-mail to later@example.com",
        || bed.smtp.to("later@example.com"),
        |m| m.len() == 1,
    )
    .await;
    assert_eq!(mails[0]["subject"], "Your order later has been delivered");
}

/// How many copies of events of `kind` each of `replicas` has handled, over `base`.
async fn handled_since(bed: &Bed, replicas: &[usize], kind: EventType, base: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (n, &i) in replicas.iter().enumerate() {
        out.push(bed.handled(i, kind.routing_key()).await - base[n]);
    }
    out
}

/// Publishes the same event about `order` again and again, each copy once
/// the one before is handled by one of the `running` replicas, until every
/// replica in `targets` has handled at least one copy. The replicas compete
/// on one queue, so which of them gets a copy is the broker's choice (round
/// robin in practice); this makes sure each target saw it. Returns the
/// copies published.
async fn deliver_to_each(
    bed: &Bed,
    order: &OrderRef,
    kind: EventType,
    running: &[usize],
    targets: &[usize],
) -> u64 {
    let mut base = Vec::new();
    for &i in running {
        base.push(bed.handled(i, kind.routing_key()).await);
    }
    for published in 1..=20_u64 {
        bed.publish(order.clone(), kind, None).await;
        let (ok, counts) = eventually(
            T,
            || handled_since(bed, running, kind, &base),
            |c| c.iter().sum::<u64>() == published,
        )
        .await;
        assert!(ok, "copy {published} of {kind} was not handled: {counts:?}");
        let reached = |t: &usize| {
            running
                .iter()
                .position(|r| r == t)
                .is_some_and(|n| counts[n] >= 1)
        };
        if targets.iter().all(reached) {
            return published;
        }
    }
    panic!("20 copies of {kind} did not reach every one of the replicas {targets:?}");
}

#[tokio::test]
async fn one_email_and_one_webhook_per_event_across_replicas_and_restarts() {
    let mut bed = Bed::new("notify-replicas").await;
    let order = bed
        .create_order(
            fixtures::order("twice", "roma", &[("pizza", 1)]),
            Some("twice@example.com"),
            accepted(),
        )
        .await;
    let order = bed.order_ref(&order);
    bed.start_replica(0, &[]).await;
    bed.start_replica(1, &[]).await;
    bed.wait_ready(0).await;
    bed.wait_ready(1).await;

    // The same event reaches both replicas.
    let copies = deliver_to_each(&bed, &order, EventType::OrderAccepted, &[0, 1], &[0, 1]).await;
    assert!(copies >= 2);

    // Replica 0 crashes and comes back with an empty memory; the event
    // comes again (a re-publish, a redelivery) and reaches the new process.
    bed.kill_replica(0).await;
    bed.start_replica(0, &[]).await;
    bed.wait_ready(0).await;
    deliver_to_each(&bed, &order, EventType::OrderAccepted, &[0, 1], &[0]).await;

    // Every copy has been handled (acked), so anything sent is in the sink.
    let mails = bed.smtp.to("twice@example.com");
    let hooks = bed.receiver.for_order("twice");
    assert_eq!(
        (mails.len(), hooks.len()),
        (1, 1),
        "e-mails and webhooks for one event delivered {} times to two replicas and a restarted one: {mails:#?}",
        copies + 1
    );
    assert!(hooks[0].verifies(SECRET));
}

#[tokio::test]
async fn replicas_racing_for_the_same_event_send_it_once() {
    let mut bed = Bed::new("notify-race").await;
    const ORDERS: usize = 6;
    let mut orders = Vec::new();
    for n in 0..ORDERS {
        let order = bed
            .create_order(
                fixtures::order(&format!("race-{n}"), "roma", &[("pizza", 1)]),
                Some(&format!("race-{n}@example.com")),
                accepted(),
            )
            .await;
        orders.push(bed.order_ref(&order));
    }
    bed.start_replica(0, &[]).await;
    bed.start_replica(1, &[]).await;
    bed.wait_ready(0).await;
    bed.wait_ready(1).await;

    // Two copies of each event at once: the broker hands them to the two
    // idle consumers in turn, so both replicas handle the same event at the
    // same moment.
    for order in &orders {
        futures::join!(
            bed.publish(order.clone(), EventType::DeliveryPickedUp, None),
            bed.publish(order.clone(), EventType::DeliveryPickedUp, None),
        );
    }
    let (ok, counts) = eventually(
        T,
        || handled_since(&bed, &[0, 1], EventType::DeliveryPickedUp, &[0, 0]),
        |c| c.iter().sum::<u64>() == 2 * ORDERS as u64,
    )
    .await;
    assert!(ok, "not every copy was handled: {counts:?}");
    // The race took place: each replica handled copies.
    assert!(counts.iter().all(|&c| c >= 1), "{counts:?}");

    for n in 0..ORDERS {
        let mails = bed.smtp.to(&format!("race-{n}@example.com"));
        let hooks = bed.receiver.for_order(&format!("race-{n}"));
        assert_eq!(
            (mails.len(), hooks.len()),
            (1, 1),
            "race-{n}: e-mails and webhooks for one event handled by two replicas at once"
        );
    }
    // Each event cost its winner two writes (claim, record); a loser's
    // claim failed its compare-and-swap and wrote nothing.
    let mut writes = [0_u64; 2];
    for i in 0..2 {
        let (_, body) = bed.get_from(bed.admin_of(i), "/metrics").await.unwrap();
        for (n, outcome) in ["written", "changed"].iter().enumerate() {
            let needle =
                format!(r#"dishpatch_notification_record_writes_total{{outcome="{outcome}"}} "#);
            writes[n] += body
                .lines()
                .find_map(|l| l.strip_prefix(needle.as_str()))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap());
        }
    }
    eprintln!(
        "record writes for {ORDERS} raced events: written {}, lost races {}",
        writes[0], writes[1]
    );
    assert_eq!(writes[0], 2 * ORDERS as u64);
}

#[tokio::test]
async fn a_claim_left_by_a_dead_replica_is_taken_over_after_the_claim_timeout() {
    let mut bed = Bed::new("notify-takeover").await;
    let order = bed
        .create_order(
            fixtures::order("orphan", "roma", &[("pizza", 1)]),
            Some("orphan@example.com"),
            accepted(),
        )
        .await;
    let uid = order.uid().unwrap();
    let event_id = format!("{uid}.order.accepted");
    // A replica claimed both channels and died before sending.
    let claimed_at = jiff::Timestamp::now();
    let claim = |channel: &str| {
        json!({"event": event_id, "channel": channel, "state": "Claimed",
               "holder": "dead-replica/1-1",
               "at": claimed_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()})
    };
    bed.orders()
        .patch_status(
            "orphan",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"notifications": [claim("Email"), claim("Webhook")]}})),
        )
        .await
        .unwrap();
    bed.start_replica(0, &["--claim-timeout", "4s"]).await;
    bed.publish(bed.order_ref(&order), EventType::OrderAccepted, None)
        .await;

    let mails = wait_for(
        T,
        "the e-mail, once the dead replica's claim expired",
        || bed.smtp.to("orphan@example.com"),
        |m| !m.is_empty(),
    )
    .await;
    assert_eq!(mails.len(), 1);
    wait_for(
        T,
        "the webhook",
        || bed.receiver.for_order("orphan"),
        |h| h.len() == 1,
    )
    .await;
    // Recorded as sent by this replica, no earlier than the claim's expiry.
    let (ok, records) = eventually(
        T,
        || async {
            bed.orders()
                .get("orphan")
                .await
                .unwrap()
                .status
                .unwrap()
                .notifications
        },
        |r| r.len() == 2 && r.iter().all(|r| r.state == NotificationState::Sent),
    )
    .await;
    assert!(ok, "{records:#?}");
    let expiry = jiff::Timestamp::from_second(claimed_at.as_second() + 4).unwrap();
    for r in &records {
        assert_ne!(r.holder, "dead-replica/1-1");
        assert!(
            r.at.0 >= expiry,
            "sent at {} before the claim expired at {expiry}",
            r.at.0
        );
    }
}

#[tokio::test]
async fn sigterm_while_waiting_on_another_replicas_claim_gives_the_event_back() {
    let mut bed = Bed::new("notify-sigterm").await;
    let order = bed
        .create_order(
            fixtures::order("waiting", "roma", &[("pizza", 1)]),
            Some("waiting@example.com"),
            accepted(),
        )
        .await;
    let uid = order.uid().unwrap();
    let event_id = format!("{uid}.order.accepted");
    // Another replica, alive, claimed both channels just now and is sending.
    const CLAIM_TIMEOUT: &str = "15s";
    let claimed_at = jiff::Timestamp::now();
    let expiry = jiff::Timestamp::from_second(claimed_at.as_second() + 15).unwrap();
    let claim = |channel: &str| {
        json!({"event": event_id, "channel": channel, "state": "Claimed",
               "holder": "other-replica/1-1",
               "at": claimed_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()})
    };
    bed.orders()
        .patch_status(
            "waiting",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"notifications": [claim("Email"), claim("Webhook")]}})),
        )
        .await
        .unwrap();
    bed.start_replica(0, &["--claim-timeout", CLAIM_TIMEOUT])
        .await;
    bed.wait_ready(0).await;
    bed.publish(bed.order_ref(&order), EventType::OrderAccepted, None)
        .await;
    // The broker confirmed the event, so once the queue shows nothing ready
    // the replica holds it, unacknowledged, behind the other's claim.
    let (ok, ready) = eventually(T, || bed.queued(), |&ready| ready == 0).await;
    assert!(
        ok,
        "the event was not delivered to replica 0: {ready} ready"
    );

    // The pod is being replaced: it must stop now, not when the claim expires.
    let left = Duration::try_from(expiry - jiff::Timestamp::now()).unwrap_or_default();
    let stopped = bed.terminate_replica(0, Duration::from_secs(25)).await;
    eprintln!("SIGTERM to exit: {stopped:?}, with {left:?} left on the other replica's claim");
    let (took, status) = stopped.expect("still running 25 s after SIGTERM");
    assert!(status.success(), "exited with {status}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} to stop after SIGTERM ({left:?} were left on the claim it waited for)"
    );
    // It gave the event back: queued again, not acknowledged, not
    // dead-lettered, and nothing went out. (The broker requeues what a
    // closed channel held a moment after the close, so wait for it.)
    let (ok, ready) = eventually(T, || bed.queued(), |&ready| ready == 1).await;
    assert!(ok, "the event is not back on the queue: {ready} ready");
    assert!(bed.drain_dead_letters().await.is_empty());
    assert!(bed.smtp.to("waiting@example.com").is_empty());
    assert!(bed.receiver.for_order("waiting").is_empty());

    // The next process to start takes the event and sends it, once, when
    // the other replica's claim expires.
    bed.start_replica(0, &["--claim-timeout", CLAIM_TIMEOUT])
        .await;
    let (ok, handled) = eventually(T, || bed.handled(0, "order.accepted"), |&n| n == 1).await;
    assert!(ok, "the event was not handled after the restart: {handled}");
    // Acknowledged, so anything sent is in the sink.
    let mails = bed.smtp.to("waiting@example.com");
    let hooks = bed.receiver.for_order("waiting");
    assert_eq!((mails.len(), hooks.len()), (1, 1), "{mails:#?}");
    assert!(hooks[0].verifies(SECRET));
    let records = bed
        .orders()
        .get("waiting")
        .await
        .unwrap()
        .status
        .unwrap()
        .notifications;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r.state, NotificationState::Sent, "{records:#?}");
        assert_ne!(r.holder, "other-replica/1-1");
        assert!(
            r.at.0 >= expiry,
            "sent at {} before the claim expired",
            r.at.0
        );
    }
}

#[tokio::test]
async fn sigterm_while_backing_off_before_a_retry_gives_the_event_back() {
    let mut bed = Bed::new("notify-sigterm-retry").await;
    // The integrator answers 500 for fail-*: the webhook is retried with
    // backoff (about 5 s over five attempts) before the event is requeued.
    let order = bed
        .create_order(
            fixtures::order("fail-backoff", "roma", &[("pizza", 1)]),
            Some("backoff@example.com"),
            accepted(),
        )
        .await;
    bed.start_service().await;
    bed.wait_ready(0).await;
    bed.publish(bed.order_ref(&order), EventType::OrderAccepted, None)
        .await;
    wait_for(
        T,
        "a second webhook attempt",
        || bed.receiver.for_order("fail-backoff"),
        |h| h.len() >= 2,
    )
    .await;

    let attempts_at_sigterm = bed.receiver.for_order("fail-backoff").len();
    let stopped = bed.terminate_replica(0, Duration::from_secs(25)).await;
    eprintln!("SIGTERM to exit while backing off: {stopped:?}");
    let (took, status) = stopped.expect("still running 25 s after SIGTERM");
    assert!(status.success(), "exited with {status}");
    // At most the attempt in flight at the SIGTERM lands after it; the
    // backoff itself ends at once.
    let attempts = bed.receiver.for_order("fail-backoff").len();
    assert!(
        attempts <= attempts_at_sigterm + 1,
        "{attempts} webhook attempts: it went on retrying after SIGTERM ({attempts_at_sigterm} before it), for {took:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
    // The e-mail went out once, on the first attempt; the event is back on
    // the queue for the webhook, not dead-lettered.
    assert_eq!(bed.smtp.to("backoff@example.com").len(), 1);
    let (ok, ready) = eventually(T, || bed.queued(), |&ready| ready == 1).await;
    assert!(ok, "the event is not back on the queue: {ready} ready");
    assert!(bed.drain_dead_letters().await.is_empty());
}
